"""Facts about the dense layers that factorized modules replace: their weights, shapes and costs.

PyTorch's ``nn.Linear``, Hugging Face's ``Conv1D`` (a linear layer whose weight
is stored ``(in, out)``), ``nn.Conv1d/2d/3d`` and ``nn.Embedding``: how to read
their weight as a matrix, rebuild a linear layer, and count their parameters
and multiply-accumulates.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LINEAR_TYPES = ("Linear", "Conv1D")


def is_hf_conv1d(layer: nn.Module) -> bool:
    """Whether ``layer`` is Hugging Face's ``Conv1D`` (GPT-2 style linear, weight stored ``(in, out)``)."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and hasattr(layer, "nx")


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The ``(out_features, in_features)`` weight of an ``nn.Linear`` or a Hugging Face ``Conv1D``."""
    if is_hf_conv1d(layer):
        return layer.weight.T
    if isinstance(layer, nn.Linear):
        return layer.weight
    raise TypeError(f"expected an nn.Linear or a Hugging Face Conv1D, got {type(layer).__name__}")


def linear_type(layer: nn.Module) -> str:
    """``"Conv1D"`` for a Hugging Face ``Conv1D``, ``"Linear"`` otherwise: the type a factorized layer rebuilds."""
    return "Conv1D" if is_hf_conv1d(layer) else "Linear"


def linear_bias(layer: nn.Module) -> torch.Tensor | None:
    """The bias of an ``nn.Linear`` or a Hugging Face ``Conv1D``, detached (None without one)."""
    return None if layer.bias is None else layer.bias.detach()


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dense_type: str = "Linear") -> nn.Module:
    """An ``nn.Linear`` (or a Hugging Face ``Conv1D``) holding an ``(out, in)`` weight and a bias."""
    out_features, in_features = weight.shape
    if dense_type == "Conv1D":
        from transformers.pytorch_utils import Conv1D

        dense = Conv1D(out_features, in_features).to(weight)
        weight = weight.T
    else:
        dense = nn.Linear(in_features, out_features, bias is not None, weight.device, weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


def bias_size(layer: nn.Module) -> int:
    """The number of bias entries of ``layer`` (0 without a bias)."""
    bias = getattr(layer, "bias", None)
    return 0 if bias is None else bias.numel()


def count_params(module: nn.Module) -> int:
    """The number of parameters of ``module`` (tied ones counted once)."""
    return sum(p.numel() for p in module.parameters())


def conv_output_size(size: int, kernel: int, stride: int, padding: int | str, dilation: int) -> int:
    """Length of one spatial dimension after a convolution (``padding`` an int, ``"same"`` or ``"valid"``)."""
    if padding == "same":
        return size
    pad = 0 if padding == "valid" else 2 * int(padding)
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


def conv_output_shape(conv: nn.Module, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """Spatial output shape of a (dense or factorized) convolution on an input of spatial shape ``spatial``."""
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


# The kinds of dense layer that factorized modules replace.
KINDS = ("linear", "conv", "pointwise", "embedding")


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv"`` (kernel larger than 1), ``"pointwise"`` (1x1 conv), ``"embedding"`` or None.

    ``nn.Linear`` and Hugging Face ``Conv1D`` are linear; ``nn.Conv1d/2d/3d``
    (not transposed) are convolutions; anything else, factorized modules
    included, has no kind.
    """
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "conv" if math.prod(module.kernel_size) > 1 else "pointwise"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None
