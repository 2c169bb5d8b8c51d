"""The interface every factorized module shares."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class FactorizedModule(nn.Module):
    """Base class of the factorized layers in :mod:`lowrank.nn`.

    A factorized module replaces one dense layer and computes its forward pass
    with the factors (never rebuilding the dense weight). Every subclass

    - is built empty from plain shapes and ranks (``cls(**module.config())``
      rebuilds a module of the same structure, which is how :func:`lowrank.load`
      re-applies a saved plan before loading the factors);
    - has a ``from_dense(layer, ...)`` classmethod (or a ``from_factorization``
      one) that fills the factors from a dense layer;
    - rebuilds an equivalent dense layer with :meth:`to_dense`;
    - counts its parameters (:attr:`num_params`) and estimates its forward
      cost (:meth:`flops`).
    """

    def config(self) -> dict[str, Any]:
        """The keyword arguments of ``__init__`` that rebuild this module's structure (JSON-able)."""
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        """An equivalent dense layer of the type this module replaced, with the same hyper-parameters."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The weight of :meth:`to_dense`, in the dense layer's own layout (for checks, not used in forward)."""
        return self.to_dense().weight

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulate operations of one forward pass on an input of ``input_shape``.

        ``input_shape`` includes the batch dimensions (for a convolution, the
        full ``(N, C, *spatial)`` shape).
        """
        raise NotImplementedError

    @property
    def num_params(self) -> int:
        """Number of parameters (factors and bias)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the factors."""
        return next(self.parameters()).dtype


def conv_output_size(size: int, kernel: int, stride: int, padding: int | str, dilation: int) -> int:
    """Length of one spatial dimension after a convolution (``padding`` an int, ``"same"`` or ``"valid"``)."""
    if padding == "same":
        return size
    pad = 0 if padding == "valid" else 2 * int(padding)
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


def conv_output_shape(conv: nn.modules.conv._ConvNd, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Spatial output shape of ``conv`` on an input of spatial shape ``spatial``."""
    paddings = [conv.padding] * len(spatial) if isinstance(conv.padding, str) else conv.padding
    return tuple(
        conv_output_size(n, k, s, p, d)
        for n, k, s, p, d in zip(spatial, conv.kernel_size, conv.stride, paddings, conv.dilation)
    )


def dense_flops(layer: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulate operations of a dense layer's forward on an input of ``input_shape``.

    ``nn.Linear`` and Hugging Face's ``Conv1D`` cost one MAC per weight entry and
    token, ``nn.ConvNd`` one per weight entry and output position (over the
    groups), ``nn.Embedding`` none (a lookup).
    """
    if isinstance(layer, nn.Embedding):
        return 0
    if isinstance(layer, nn.modules.conv._ConvNd):
        positions = input_shape[0] * math.prod(conv_output_shape(layer, tuple(input_shape[2:])))
        return positions * layer.weight.numel()
    return math.prod(input_shape[:-1]) * layer.weight.numel()


class UnsupportedLayerError(ValueError):
    """A layer whose structure a factorized module cannot represent (e.g. a depthwise conv for Tucker-2).

    :func:`lowrank.compress` leaves such a layer dense and records the message
    as its skip reason; any other error aborts the compression.
    """


def swap_modules(model: nn.Module, replacements: Sequence[tuple[str, nn.Module]]) -> None:
    """Set each named submodule of ``model`` to its replacement, all or none."""
    done = []
    try:
        for name, new in replacements:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            done.append((parent, child, getattr(parent, child)))
            setattr(parent, child, new)
    except Exception:
        for parent, child, old in reversed(done):
            setattr(parent, child, old)
        raise


def weight_ratio(ratio: float, weight_size: int, bias_size: int) -> float:
    """The fraction of its own parameters a weight keeps when ``ratio`` covers weight and bias, the bias kept whole."""
    return (ratio * (weight_size + bias_size) - bias_size) / weight_size
