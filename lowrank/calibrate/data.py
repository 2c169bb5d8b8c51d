"""Calibration inputs: normalise texts, data loaders and tensors into batches, and run a model on them.

A *calibration* is what the statistics collectors of :mod:`lowrank.calibrate`
run the model on. It is either

- a sequence of :class:`CalibrationBatch` (build one with :func:`calibration_batches`
  from texts, a ``DataLoader`` or any iterable of batches), or
- a callable ``calibrate(model) -> None`` that runs the model itself, for
  models whose forward needs more than positional and keyword tensors.

:func:`run_calibration` runs either kind, :func:`check_calibration` checks it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank.checks import check_int


@dataclass(frozen=True, eq=False)
class CalibrationBatch:
    """One calibration batch: the model is called as ``model(*args, **kwargs)``.

    Attributes
    ----------
    args : tuple
        Positional inputs of the model's forward.
    kwargs : dict
        Keyword inputs of the model's forward (``input_ids``, ``attention_mask``, ...).
    token_mask : torch.Tensor or None
        Boolean ``(batch, seq)`` tensor, True where a position is a real token;
        statistics skip the rows of the other (padding) positions. None: every
        position counts.

    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    token_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.args, tuple):
            raise TypeError(f"CalibrationBatch.args must be a tuple, got {type(self.args).__name__}")
        if not isinstance(self.kwargs, dict):
            raise TypeError(f"CalibrationBatch.kwargs must be a dict, got {type(self.kwargs).__name__}")
        mask = self.token_mask
        if mask is None or (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 2):
            return
        got = f"a {mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else (
            f"a {type(mask).__name__}")
        raise TypeError(f"CalibrationBatch.token_mask must be a 2-D (batch, seq) bool tensor, got {got}")

    def run(self, model: nn.Module) -> Any:
        """Return ``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)

    def to(self, device: torch.device | str | None) -> CalibrationBatch:
        """The batch with every tensor (nested in tuples, lists and dicts too) moved to ``device``."""
        if device is None:
            return self
        mask = None if self.token_mask is None else self.token_mask.to(device)
        return CalibrationBatch(_to_device(self.args, device), _to_device(self.kwargs, device), mask)


# Texts per batch and tokens per text when calibration texts are tokenised (calibration_batches).
TEXT_BATCH_SIZE = 16
TEXT_MAX_LENGTH = 128

# A calibration set: ready batches, or a callable that runs the model itself.
Calibration = Sequence[CalibrationBatch] | Callable[[nn.Module], None]


def _to_device(obj: Any, device: torch.device | str | None) -> Any:
    """``obj`` with its tensors (nested in tuples, lists and mappings) moved to ``device``."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {key: _to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(value, device) for value in obj)
    return obj


def _mask_from_kwargs(kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """A 2-D ``attention_mask`` among the keyword inputs, as a bool token mask."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.bool()
    return None


def _batch_from_item(item: Any, index: int) -> CalibrationBatch:
    """One item of an iterable of batches as a :class:`CalibrationBatch`."""
    if isinstance(item, CalibrationBatch):
        return item
    if isinstance(item, (tuple, list)):
        if not item:
            raise ValueError(f"calibration batch {index} is an empty {type(item).__name__}")
        item = item[0]  # (inputs, targets, ...): the first element is the model's input
    if isinstance(item, Mapping):
        kwargs = dict(item)
        return CalibrationBatch((), kwargs, _mask_from_kwargs(kwargs))
    if isinstance(item, torch.Tensor):
        return CalibrationBatch((item,), {}, None)
    raise TypeError(
        f"calibration batch {index} is a {type(item).__name__}; expected a tensor, a dict of model inputs, "
        "a tuple/list whose first element is one of those, or a CalibrationBatch"
    )


def _text_batches(
    texts: Sequence[str], tokenizer: Any, batch_size: int, max_length: int | None
) -> list[CalibrationBatch]:
    if tokenizer is None:
        raise ValueError(
            "calibration data is a list of strings but no tokenizer was given; pass tokenizer= "
            "(e.g. transformers.AutoTokenizer.from_pretrained(checkpoint))"
        )
    ordered = sorted(texts, key=len)  # similar lengths side by side: little padding
    batches = []
    for start in range(0, len(ordered), batch_size):
        encoding = tokenizer(
            ordered[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
            return_tensors="pt",
        )
        kwargs = dict(encoding)
        batches.append(CalibrationBatch((), kwargs, _mask_from_kwargs(kwargs)))
    return batches


def calibration_batches(
    data: Any,
    *,
    tokenizer: Any = None,
    batch_size: int = TEXT_BATCH_SIZE,
    max_length: int | None = TEXT_MAX_LENGTH,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> list[CalibrationBatch]:
    """Normalise calibration data into a list of :class:`CalibrationBatch`.

    Parameters
    ----------
    data : str, sequence of str, DataLoader or iterable of batches
        - Texts (a string or a list/tuple of strings) are tokenised with
          ``tokenizer(texts, padding=True, truncation=True, max_length=max_length,
          return_tensors="pt")``, ``batch_size`` texts at a time, after sorting
          them by length so that each batch holds texts of similar length (little
          padding). The encoding becomes the keyword inputs and its
          ``attention_mask`` the token mask.
        - Any other iterable (a ``torch.utils.data.DataLoader``, a list, a
          generator) yields one batch per item, taken as it is (``batch_size`` is
          not used): a ``dict`` becomes the keyword inputs (a 2-D
          ``attention_mask`` among them becomes the token mask); a tensor the
          single positional input; a tuple or list follows the ``(inputs,
          targets)`` convention of supervised data loaders, so its *first*
          element (a tensor or a dict) is the input and the rest is ignored; a
          :class:`CalibrationBatch` is kept.
    tokenizer : callable, optional
        A Hugging Face tokenizer; required for texts.
    batch_size : int
        Texts per batch (texts only).
    max_length : int or None
        Longest tokenised text, in tokens (texts only).
    device : torch.device or str, optional
        Where the batches' tensors are moved; None leaves them where they are
        (the tokenizer's on the CPU).
    max_batches : int, optional
        Stop after this many batches (for long or endless loaders).

    Returns
    -------
    list of CalibrationBatch

    Raises
    ------
    ValueError
        If ``data`` holds no batch, or holds texts and ``tokenizer`` is None.
    TypeError
        If ``data`` is not iterable (a callable calibration is run by
        :func:`run_calibration` directly), or a batch has an unsupported type.

    Examples
    --------
    >>> import torch
    >>> from lowrank.calibrate import calibration_batches
    >>> loader = torch.utils.data.DataLoader(
    ...     torch.utils.data.TensorDataset(torch.randn(10, 4), torch.zeros(10)), batch_size=4)
    >>> batches = calibration_batches(loader)
    >>> len(batches), batches[0].args[0].shape, batches[0].token_mask
    (3, torch.Size([4, 4]), None)

    """
    batch_size = check_int(batch_size, "batch_size")
    if max_length is not None:
        max_length = check_int(max_length, "max_length")
    if max_batches is not None:
        max_batches = check_int(max_batches, "max_batches")
    if isinstance(data, str):
        data = [data]
    if isinstance(data, (list, tuple)) and data and all(isinstance(text, str) for text in data):
        batches = _text_batches(data, tokenizer, batch_size, max_length)[:max_batches]
    elif isinstance(data, (list, tuple)) and any(isinstance(text, str) for text in data):
        kinds = sorted({type(item).__name__ for item in data})
        raise TypeError(f"calibration data mixes strings with other items ({', '.join(kinds)}); give texts only")
    elif isinstance(data, Iterable) and not isinstance(data, (torch.Tensor, Mapping)):
        batches = []
        for index, item in enumerate(data):
            if max_batches is not None and index >= max_batches:
                break
            batches.append(_batch_from_item(item, index))
    elif callable(data):
        raise TypeError(
            "calibration data is a callable; pass it to run_calibration / the collect_* functions directly "
            "instead of calibration_batches"
        )
    else:
        hint = " (wrap a single batch in a list)" if isinstance(data, (torch.Tensor, Mapping)) else ""
        raise TypeError(f"calibration data must be texts or an iterable of batches, got {type(data).__name__}{hint}")
    if not batches:
        raise ValueError("calibration data is empty: it holds no batch")
    return [batch.to(device) for batch in batches]


def check_calibration(calibration: Any, *, needs_batches: str | None = None) -> None:
    """Check that ``calibration`` is a non-empty sequence of :class:`CalibrationBatch`, or a callable.

    Parameters
    ----------
    calibration : object
        The calibration to check.
    needs_batches : str, optional
        What needs batches, when a callable will not do (such as ``"loss_fn"``);
        the error names it. None: a callable is accepted.

    Raises
    ------
    TypeError
        If ``calibration`` is neither kind, holds something other than
        :class:`CalibrationBatch`, or is a callable where ``needs_batches`` is given.
    ValueError
        If ``calibration`` holds no batch.

    Examples
    --------
    >>> import torch
    >>> from lowrank.calibrate import calibration_batches, check_calibration
    >>> check_calibration(calibration_batches([torch.zeros(2, 3)]))
    >>> check_calibration(lambda model: None, needs_batches="stop_early")
    Traceback (most recent call last):
    ...
    TypeError: stop_early needs a sequence of CalibrationBatch, not a calibration callable

    """
    if callable(calibration) and not isinstance(calibration, Sequence):
        if needs_batches is not None:
            raise TypeError(f"{needs_batches} needs a sequence of CalibrationBatch, not a calibration callable")
        return
    if not isinstance(calibration, Sequence) or isinstance(calibration, str):
        raise TypeError(
            "calibration must be a sequence of CalibrationBatch (see calibration_batches) or a callable "
            f"taking the model; got {type(calibration).__name__}"
        )
    if len(calibration) == 0:
        raise ValueError("calibration is empty: it holds no batch")
    for index, batch in enumerate(calibration):
        if not isinstance(batch, CalibrationBatch):
            raise TypeError(
                f"calibration batch {index} is a {type(batch).__name__}, not a CalibrationBatch; "
                "normalise the data with calibration_batches(...) first"
            )


def progress_bar(batches: Sequence[CalibrationBatch], progress: bool) -> Iterable[CalibrationBatch]:
    """``batches``, iterated behind the progress bar of a calibration pass when ``progress`` is True."""
    return tqdm(batches, desc="lowrank.calibrate", unit="batch", disable=not progress)


def run_calibration(
    model: nn.Module,
    calibration: Calibration,
    *,
    on_batch: Callable[[CalibrationBatch], None] | None = None,
    grad: bool = False,
    progress: bool = False,
) -> None:
    """Run ``model`` on a calibration set; outputs are discarded (hooks collect what they need).

    Parameters
    ----------
    model : nn.Module
        The model; its mode (train / eval) is left as it is.
    calibration : sequence of CalibrationBatch, or callable
        Batches are run one by one as ``model(*batch.args, **batch.kwargs)``. A
        callable is called once as ``calibration(model)`` and runs the model as
        it likes; it has no token masks (every position counts) and
        ``on_batch`` is not called.
    on_batch : callable, optional
        Called with each batch just before its forward pass, so that hooks can
        read the batch's ``token_mask``.
    grad : bool
        Run with autograd recording (the gradient statistics need it); by
        default everything runs under ``torch.no_grad()``.
    progress : bool
        Show a progress bar over the batches.

    Raises
    ------
    TypeError, ValueError
        If ``calibration`` is neither kind, or holds no batch.

    """
    check_calibration(calibration)
    with torch.set_grad_enabled(grad):
        if not isinstance(calibration, Sequence):
            calibration(model)
            return
        for batch in progress_bar(calibration, progress):
            if on_batch is not None:
                on_batch(batch)
            batch.run(model)
