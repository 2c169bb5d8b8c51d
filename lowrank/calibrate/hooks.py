"""The shared machinery of hook-based collection: row accumulators, token masks, layer inputs, early stops.

Every collector of :mod:`lowrank.calibrate` watches some layers of a model with
hooks while the calibration runs. What they have in common lives here: the
float64 accumulator of a layer's rows (:class:`RowAccumulator`), the token mask
of the batch being run (:class:`BatchMask`) and the rows it keeps
(:func:`counted_rows`), eval mode for the duration of a pass
(:func:`eval_mode`), the checks of the ``layers`` mapping, the feature sizes a
layer declares, and the forward pre-hooks that read each layer's input and may
abandon a forward pass once every watched layer has received it
(:class:`InputWatcher`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lowrank.calibrate.data import CalibrationBatch
from lowrank.nn.dense import is_hf_conv1d, linear_weight

# Rows converted to float64 at a time: bounds the temporary copy, whatever the batch size (2048 rows of an
# 11008-wide input are 172 MiB).
_CHUNK_ROWS = 2048


class RowAccumulator:
    """Running float64 ``sum_t r_t r_t^T`` (and optionally ``sum_t |r_t|``) of the rows a layer sees.

    Parameters
    ----------
    name : str
        The layer's name, used in error messages.
    features : int or None
        The size of each row; None: taken from the first rows added.
    abs_sum : bool
        Also accumulate ``sum_t |r_t|``.

    Attributes
    ----------
    gram : torch.Tensor or None
        ``(features, features)`` float64 sum of outer products (None before the first rows).
    abs_sum : torch.Tensor or None
        ``(features,)`` float64 sum of absolute values (None unless asked for).
    count : int
        Rows added.
    calls : int
        Times the layer ran; kept by the hooks, which may add no rows on a call.

    """

    def __init__(self, name: str, features: int | None, abs_sum: bool) -> None:
        self.name, self.features, self.track_abs = name, features, abs_sum
        self.gram: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.count = 0
        self.calls = 0

    def add(self, rows: torch.Tensor, what: str) -> None:
        """Add the ``(n, features)`` ``rows`` (``what`` they are, such as ``"input"``, names them in errors)."""
        if self.features is None:
            self.features = rows.shape[-1]
        if rows.shape[-1] != self.features:
            raise ValueError(
                f"layer {self.name!r}: {what} of shape {tuple(rows.shape)} does not end in its "
                f"{self.features} features"
            )
        if self.gram is None:
            self.gram = torch.zeros(self.features, self.features, dtype=torch.float64, device=rows.device)
            if self.track_abs:
                self.abs_sum = torch.zeros(self.features, dtype=torch.float64, device=rows.device)
        for start in range(0, rows.shape[0], _CHUNK_ROWS):
            chunk = rows[start : start + _CHUNK_ROWS].detach().to(device=self.gram.device, dtype=torch.float64)
            self.gram.addmm_(chunk.T, chunk)
            if self.abs_sum is not None:
                self.abs_sum += chunk.abs().sum(0)
        self.count += rows.shape[0]

    def check_ran(self) -> None:
        """Raise if the layer never ran during calibration."""
        if self.calls == 0:
            raise no_input_error(self.name)

    def check_counted(self) -> None:
        """Raise if no row was counted (the layer only saw padding positions)."""
        if self.count == 0:
            raise ValueError(f"layer {self.name!r} received only padding positions during calibration")


def no_input_error(name: str) -> ValueError:
    """The error for a watched layer that never ran during calibration."""
    return ValueError(f"layer {name!r} received no input during calibration (is it part of the model?)")


class BatchMask:
    """The token mask of the batch being run, for hooks to read (None: every row counts).

    Attributes
    ----------
    mask : torch.Tensor or None
        Bool ``(batch, seq)``, the last batch's ``token_mask``.

    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def set(self, batch: CalibrationBatch) -> None:
        """Take the mask of ``batch``, about to run (the ``on_batch`` of :func:`run_calibration`)."""
        self.mask = batch.token_mask


def counted_rows(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """The ``(rows, features)`` matrix of ``x``'s last dimension, padding rows left out.

    Parameters
    ----------
    x : torch.Tensor
        ``(..., features)``.
    token_mask : torch.Tensor or None
        Bool ``(batch, seq)``. Rows are dropped where it is False when ``x``'s
        leading dimensions are ``(batch, seq)``, or when ``x`` is 2-D with
        ``batch * seq`` rows (a flattened sequence); any other ``x`` (such as a
        pooled ``(batch, features)`` input) keeps every row.

    Returns
    -------
    torch.Tensor
        ``(rows, features)``, a view of ``x`` where no row is dropped.

    Examples
    --------
    >>> import torch
    >>> from lowrank.calibrate import counted_rows
    >>> counted_rows(torch.ones(2, 3, 4), torch.tensor([[True, True, False], [True, False, False]])).shape
    torch.Size([3, 4])

    """
    if token_mask is not None:
        if tuple(x.shape[:-1]) == tuple(token_mask.shape):
            return x[token_mask.to(x.device)]
        if x.dim() == 2 and x.shape[0] == token_mask.numel() and token_mask.dim() == 2 and token_mask.shape[1] > 1:
            return x[token_mask.to(x.device).reshape(-1)]
    return x.reshape(-1, x.shape[-1])


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule of ``model`` in eval mode; restore each one's own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def check_layers(layers: Mapping[str, nn.Module]) -> None:
    """Check that ``layers`` is a non-empty mapping from names to modules."""
    if not isinstance(layers, Mapping):
        raise TypeError(f"layers must be a mapping from names to modules, got {type(layers).__name__}")
    if not layers:
        raise ValueError("layers is empty: name at least one layer to collect statistics of")
    for name, layer in layers.items():
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer {name!r} is a {type(layer).__name__}, not an nn.Module")


def declared_features(layer: nn.Module, side: str) -> int | None:
    """The layer's ``"in"`` or ``"out"`` features when it declares them (None: taken from the first call)."""
    if isinstance(layer, nn.Linear) or is_hf_conv1d(layer):
        out_features, in_features = linear_weight(layer).shape
        return in_features if side == "in" else out_features
    value = getattr(layer, f"{side}_features", None)
    return value if isinstance(value, int) else None


def layer_input(name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The first input of a layer's forward (positional, else keyword), which must be a tensor."""
    candidates = [*args, *kwargs.values()]
    if not candidates or not isinstance(candidates[0], torch.Tensor):
        got = type(candidates[0]).__name__ if candidates else "no input"
        raise TypeError(f"layer {name!r}: expected a tensor as its first input, got {got}")
    return candidates[0]


class _AllInputsSeenError(Exception):
    """Raised by a hook to abandon a forward pass once every watched layer has received its input."""


class InputWatcher:
    """Forward pre-hooks that hand each watched layer's input on, and can cut a forward pass short.

    Parameters
    ----------
    stop_early : bool
        Abandon each forward pass run by :meth:`run` as soon as every watched
        layer has received its input (the rest of the model is not needed).
        Only right when each layer runs once per forward pass.

    """

    def __init__(self, stop_early: bool) -> None:
        self.stop_early = stop_early
        self.names: set[str] = set()
        self.pending: set[str] = set()

    def watch(self, name: str, layer: nn.Module, on_input: Callable[[str, torch.Tensor], None]) -> RemovableHandle:
        """Call ``on_input(name, x)`` with the first input ``x`` of every forward of ``layer``.

        Returns the hook's handle (a context manager that removes it). Several
        layers (of different models) may be watched under the same name: a
        pass waits for the name once.
        """
        self.names.add(name)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            on_input(name, layer_input(name, args, kwargs))
            self.pending.discard(name)
            if self.stop_early and not self.pending:
                raise _AllInputsSeenError

        return layer.register_forward_pre_hook(hook, with_kwargs=True)

    def run(self, model: nn.Module, batch: CalibrationBatch) -> None:
        """Run ``model`` on ``batch``; with ``stop_early``, only until every watched layer has received its input."""
        self.pending = set(self.names)
        try:
            batch.run(model)
        except _AllInputsSeenError:
            pass
