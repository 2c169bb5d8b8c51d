"""Rank-regularized training (issue 12): ``lowrank.train`` against dense training and compress-then-fine-tune.

Four parts, chosen with ``--part`` (``all`` runs them in this order):

1. **lm.** A byte-level causal transformer (vocabulary 256) trained from scratch on the docstrings of the
   Python standard library (those of its modules, classes, functions and methods, deduplicated, in sorted
   module order; a module goes to the validation split when ``crc32(name) % 10 == 0``). Every row takes
   the same number of optimizer steps on the same batches, with AdamW and the same warm-up + cosine learning
   rate; all rows train interleaved, step by step, in one process, so their step times see the same machine
   load. Rows: dense; low-rank from the first step (``compress(ratio=0.5)`` of the initialisation); TRP
   with an energy ramp, finalized, then fine-tuned (the default end energy 0.9, and a tuned one beside it);
   RankScheduler to 50% from a factorized start about the dense size; DLRT when ``lowrank.train.dlrt``
   imports; dense then ``compress(ratio=0.5)`` (plain, and data-aware on training batches) then fine-tuned.
   "Block params" are the parameters (weights and biases) of the six linears of each block.
2. **digits.** A CNN (three 3x3 convolutions with batch norm) on scikit-learn's digits with random
   one-pixel shifts: dense, TRP with the channel and the spatial scheme (its two inner convolutions; the
   end energy is the largest of a grid that cuts the conv MACs at least 2x on seed 0), and dense then
   ``compress`` (Tucker-2, the default for k x k convolutions) at the TRP channel row's parameter ratio,
   then fine-tuned; test accuracy over 3 seeds.
3. **planted.** A teacher MLP 64-128-128-10 (tanh) whose weights have ranks 8, 16 and 4; a student of the
   same dense shapes fitted to its outputs (MSE) with TRP, and with RankScheduler from a full-rank
   factorized start at the teacher's parameter share: the ranks each recovers.
4. **overhead.** The time of a whole short run with TRP (on the dense model) and with RankScheduler (on
   the factorized one) against the same run without the method, alternating repeats, medians: on the lm
   model and on an MLP.

Usage::

    python benchmarks/train.py --quick                 # smoke test of every part (under a minute)
    python benchmarks/train.py --part lm --record      # one part, appended to benchmarks/RESULTS.md
    python benchmarks/train.py --part all --steps 1500 # the lm run at another length
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import io
import math
import pkgutil
import statistics
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from _timing import alternate, record
from torch import nn

import lowrank
from lowrank.nn import LowRankLinear
from lowrank.nn.surgery import swap_modules
from lowrank.train import TRP, Ramp, RankScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import digits_cnn  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# part 1: a byte-level language model on the standard library's docstrings
# ---------------------------------------------------------------------------------------------------------------

# Modules never imported: they open windows or browsers, print on import, or are test suites and tools.
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "ensurepip", "lib2to3",
                "pydoc_data", "venv", "test", "msilib"}
MIN_DOC = 40  # shorter docstrings ("Return self==value.") are mostly boilerplate
BLOCK_LINEARS = ("q", "k", "v", "o", "up", "down")
BLOCKS = ["blocks.*"]  # the target globs: the linears inside the blocks (never the head or the embeddings)


@dataclass(frozen=True)
class LMConfig:
    """Size of the language model and of its run."""

    d_model: int = 128
    heads: int = 4
    ffn: int = 512
    layers: int = 4
    context: int = 64
    batch: int = 16
    steps: int = 2000
    lr: float = 2e-3
    warmup: float = 0.05  # share of the steps with a linear warm-up
    val_batches: int = 48
    timing_repeats: int = 15


def _quiet_import(name: str) -> Any:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(
            io.StringIO()):
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def stdlib_modules() -> list[str]:
    """The standard library's public modules that import here, submodules of packages included, sorted."""
    names = set()
    for name in sorted(sys.stdlib_module_names):
        if name in SKIP_MODULES or name.startswith("_"):
            continue
        try:
            module = _quiet_import(name)
        except BaseException:  # noqa: BLE001 - platform modules raise anything from ImportError to SystemExit
            continue
        names.add(name)
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + ".", onerror=lambda _: None):
            parts = info.name.split(".")
            if not any(p.startswith("_") or p in ("test", "tests") or p.startswith("test_") for p in parts):
                names.add(info.name)
    return sorted(names)


def stdlib_docstrings() -> dict[str, list[str]]:
    """Per module, the docstrings first seen there (module, its classes and functions, their members)."""
    seen: set[str] = set()
    docs: dict[str, list[str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in stdlib_modules():
            try:
                module = _quiet_import(name)
            except BaseException:  # noqa: BLE001
                continue
            texts: list[str] = []

            def add(obj: Any, texts: list[str] = texts) -> None:
                try:
                    doc = obj.__doc__
                except Exception:  # noqa: BLE001 - a few objects raise on attribute access
                    return
                if isinstance(doc, str):
                    doc = inspect.cleandoc(doc).strip()
                    if len(doc) >= MIN_DOC and doc not in seen:
                        seen.add(doc)
                        texts.append(doc)

            add(module)
            for attribute in sorted(vars(module)):
                obj = vars(module)[attribute]
                if inspect.ismodule(obj):
                    continue
                add(obj)
                if inspect.isclass(obj):
                    for member in sorted(vars(obj)):
                        add(vars(obj)[member])
            docs[name] = texts
    return docs


def corpus() -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Training and validation bytes (uint8), split by module-name hash (~10% validation), and counts."""
    docs = stdlib_docstrings()
    train, val = [], []
    for name, texts in docs.items():
        (val if zlib.crc32(name.encode()) % 10 == 0 else train).extend(texts)
    as_bytes = [torch.frombuffer(bytearray("\n\n".join(part).encode()), dtype=torch.uint8) for part in (train, val)]
    counts = {"modules": len(docs), "docstrings": len(train) + len(val), "train_bytes": as_bytes[0].numel(),
              "val_bytes": as_bytes[1].numel()}
    return as_bytes[0], as_bytes[1], counts


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (q, k, v, o linears) and a GELU FFN (up, down)."""

    def __init__(self, d_model: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))
        self.up, self.down = nn.Linear(d_model, ffn), nn.Linear(ffn, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        y = self.ln1(x)
        q, k, v = (m(y).view(b, t, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attention.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class ByteLM(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a final norm and a linear head over 256 bytes."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, cfg.d_model), nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.heads, cfg.ffn) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def block_params(model: nn.Module) -> int:
    """Parameters of the linears inside the blocks (dense or factorized)."""
    total = 0
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "blocks" and parts[2] in BLOCK_LINEARS:
            total += sum(p.numel() for p in module.parameters())
    return total


def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy of a ``(batch, context + 1)`` window."""
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> torch.Tensor:
    """The ``context + 1`` bytes from each start, as int64."""
    return data[starts[..., None] + torch.arange(context + 1)].long()


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of every lm row (its learning rate is set at each step)."""
    return torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.95), weight_decay=0.01)


def lr_at(step: int, cfg: LMConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak, by the global step."""
    warmup = max(1, int(cfg.warmup * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Row:
    """One training run of the lm table: its model, optimizer, method and what happens at which step."""

    label: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    method: Any = None
    events: dict[int, Callable[[Row], None]] = field(default_factory=dict)  # run before that step
    at_end: Callable[[Row], None] | None = None
    times: list[float] = field(default_factory=list)
    switch_seconds: float = 0.0
    note: str = ""
    first_step: int = 0  # a fork's first own step (its earlier steps are the dense row's)

    def step(self, t: int, x: torch.Tensor, lr: float) -> None:
        if t in self.events:
            start = time.perf_counter()
            self.events[t](self)
            self.switch_seconds += time.perf_counter() - start
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        lm_loss(self.model, x).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)

    def finish(self) -> None:
        if self.at_end is not None:
            start = time.perf_counter()
            self.at_end(self)
            self.switch_seconds += time.perf_counter() - start


def _ranks_note(ranks: dict[str, Any]) -> str:
    """The ranks of the block linears by kind, as min-max over the blocks."""
    by_kind: dict[str, list[int]] = {}
    for name, rank in ranks.items():
        value = rank if isinstance(rank, int) else max(rank.values())
        by_kind.setdefault(name.split(".")[-1], []).append(value)
    return " ".join(f"{kind} {min(v)}-{max(v)}" if min(v) != max(v) else f"{kind} {v[0]}"
                    for kind, v in by_kind.items())


def _final_ranks(model: nn.Module) -> dict[str, int]:
    return {name: module.rank for name, module in model.named_modules() if isinstance(module, LowRankLinear)}


def trp_row(label: str, base: nn.Module, energy: Ramp, finalize_at: int, nuclear_weight: float = 3e-4) -> Row:
    """TRP on the dense model with the ``energy`` ramp until ``finalize_at``, then the factorized model."""
    model = copy.deepcopy(base)
    optimizer = adamw(model)
    trp = TRP(model, optimizer, energy=energy, period=10, nuclear_weight=nuclear_weight, include=BLOCKS)

    def finalize(row: Row) -> None:
        trp.finalize()
        row.optimizer = adamw(row.model)
        row.note = f"TRP to step {finalize_at}, ranks {_ranks_note(_final_ranks(row.model))}"

    return Row(label, model, optimizer, trp, events={finalize_at: finalize})


def lm_rows(base: nn.Module, cfg: LMConfig, tuned_energy: float, dlrt_rank: int) -> tuple[list[Row], list[str]]:
    """The rows that start at step 0 (the forks from the dense row are made while training), and notes."""
    n = cfg.steps
    rows = [Row("dense", copy.deepcopy(base), None)]  # type: ignore[arg-type]
    rows[0].optimizer = adamw(rows[0].model)
    notes = []

    low = copy.deepcopy(base)
    report = lowrank.compress(low, ratio=0.5, include=BLOCKS, progress=False)
    rows.append(Row("low-rank from step 0 (compress(init, ratio=0.5))", low, adamw(low),
                    note=f"ranks {_ranks_note({r.name: r.rank for r in report.layers if r.replaced})}"))

    ramp_end, finalize_at = int(0.5 * n), int(0.8 * n)
    rows.append(trp_row(f"TRP, Ramp(0.99 -> 0.9) (default energy 0.9), finalized at step {finalize_at}, fine-tuned",
                        base, Ramp(0.99, 0.9, ramp_end), finalize_at))
    rows.append(trp_row(f"TRP, Ramp(0.999 -> {tuned_energy}) (tuned), finalized at step {finalize_at}, fine-tuned",
                        base, Ramp(0.999, tuned_energy, ramp_end), finalize_at))

    start = copy.deepcopy(base)
    lowrank.compress(start, ratio=0.99, include=BLOCKS, progress=False)
    optimizer = adamw(start)
    scheduler = RankScheduler(start, optimizer, ratio=0.5, total_steps=n, include=BLOCKS)

    def finalize_scheduler(row: Row) -> None:
        row.method.finalize()
        row.note = (f"start {row.method.start_budget / block_params(base):.2f} of dense, ranks "
                    f"{_ranks_note(_final_ranks(row.model))}")

    rows.append(Row("RankScheduler(ratio=0.5) from compress(init, ratio=0.99)", start, optimizer, scheduler,
                    at_end=finalize_scheduler))

    try:
        from lowrank.train.dlrt import DLRT
    except Exception as error:  # noqa: BLE001 - being written concurrently
        notes.append(f"DLRT row skipped: `from lowrank.train.dlrt import DLRT` failed ({type(error).__name__}: "
                     f"{error}).")
    else:
        model = copy.deepcopy(base)
        optimizer = adamw(model)
        try:
            dlrt = DLRT(model, optimizer, dlrt_rank, include=BLOCKS)
        except Exception as error:  # noqa: BLE001
            notes.append(f"DLRT row skipped: DLRT(...) raised {type(error).__name__}: {error}.")
        else:
            def finalize_dlrt(row: Row) -> None:
                row.method.finalize()
                row.note = f"ranks {_ranks_note(_final_ranks(row.model))}"

            rows.append(Row(f"DLRT(rank={dlrt_rank}, tol=0.1)", model, optimizer, dlrt, at_end=finalize_dlrt))
    return rows, notes


def fork_rows(dense: Row, calibration: list[torch.Tensor], fork_at: int) -> list[Row]:
    """Dense until ``fork_at``, then ``compress(ratio=0.5)`` plain / data-aware, then fine-tuned."""
    rows = []
    for label, options in (("plain", {}), ("data-aware", {"calibration": calibration})):
        model = copy.deepcopy(dense.model)
        start = time.perf_counter()
        report = lowrank.compress(model, ratio=0.5, include=BLOCKS, progress=False, **options)
        seconds = time.perf_counter() - start
        rows.append(Row(f"dense {fork_at} steps, compress {label} (ratio=0.5), fine-tuned", model, adamw(model),
                        switch_seconds=seconds, first_step=fork_at,
                        note=f"ranks {_ranks_note({r.name: r.rank for r in report.layers if r.replaced})}"))
    return rows


@torch.no_grad()
def validation_loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    loss = statistics.fmean(float(lm_loss(model, x)) for x in batches)
    model.train()
    return loss


def lm_part(cfg: LMConfig, tuned_energy: float, dlrt_rank: int, recording: bool) -> str:
    start_wall = time.perf_counter()
    train_bytes, val_bytes, counts = corpus()
    print(f"corpus: {counts}", flush=True)
    torch.manual_seed(0)
    base = ByteLM(cfg)
    dense_block = block_params(base)
    generator = torch.Generator().manual_seed(1)
    starts = torch.randint(0, train_bytes.numel() - cfg.context - 1, (cfg.steps, cfg.batch), generator=generator)
    calibration = [windows(train_bytes, s, cfg.context)[:, :-1]
                   for s in torch.randint(0, train_bytes.numel() - cfg.context - 1, (8, cfg.batch),
                                          generator=generator)]
    val_starts = torch.arange(0, val_bytes.numel() - cfg.context - 1, cfg.context + 1)[: cfg.val_batches * cfg.batch]
    val = [windows(val_bytes, s, cfg.context) for s in val_starts.split(cfg.batch)]
    rows, notes = lm_rows(base, cfg, tuned_energy, dlrt_rank)
    dense = rows[0]
    fork_at = int(0.7 * cfg.steps)
    for t in range(cfg.steps):
        if t == fork_at:
            rows += fork_rows(dense, calibration, fork_at)
        x, lr = windows(train_bytes, starts[t], cfg.context), lr_at(t, cfg)
        for row in rows:
            row.step(t, x, lr)
        if t % max(1, cfg.steps // 10) == 0 or t == cfg.steps - 1:
            print(f"  step {t}: " + ", ".join(f"{statistics.median(r.times[-50:]) * 1e3:.0f} ms" for r in rows),
                  flush=True)
    for row in rows:
        row.finish()
        if row.first_step:
            row.times = dense.times[: row.first_step] + row.times
    train_seconds = time.perf_counter() - start_wall

    losses = {row.label: validation_loss(row.model, val) for row in rows}
    for row in rows:
        row.model.eval()
    probe = val[0][:, :-1]
    with torch.no_grad():
        infer = alternate({row.label: (lambda m=row.model: m(probe)) for row in rows}, cfg.timing_repeats)
    base_loss, base_step = losses["dense"], statistics.median(dense.times)
    base_total, base_infer = sum(dense.times), infer["dense"]
    lines = ["| row | val loss | vs dense | block params | of dense | train step (median) | train total | "
             "inference | notes |", "|---|---|---|---|---|---|---|---|---|"]
    results = []
    for row in rows:
        params = block_params(row.model)
        results.append((row, losses[row.label], params / dense_block))
        lines.append(
            f"| {row.label} | {losses[row.label]:.4f} | {100 * (losses[row.label] / base_loss - 1):+.1f}% "
            f"| {params:,} | {params / dense_block:.2f} | {statistics.median(row.times) / base_step:.2f}x "
            f"| {(sum(row.times) + row.switch_seconds) / base_total:.2f}x | {infer[row.label] / base_infer:.2f}x "
            f"| {row.note} |")
    table = "\n".join(lines)
    verdict = lm_verdict(results, base_loss)
    wall = time.perf_counter() - start_wall
    total_params = sum(p.numel() for p in base.parameters())
    note = (f"Byte-level LM ({cfg.layers} blocks, d_model {cfg.d_model}, {cfg.heads} heads, FFN {cfg.ffn}, context "
            f"{cfg.context}, batch {cfg.batch}; {dense_block:,} block params of {total_params:,}) "
            f"trained {cfg.steps} steps from one initialisation (seed 0) on the same batches, AdamW (lr {cfg.lr}, "
            f"betas 0.9/0.95, weight decay 0.01, clip 1.0), {cfg.warmup:.0%} warm-up then cosine to a tenth. Corpus: "
            f"{counts['docstrings']:,} stdlib docstrings from {counts['modules']} modules, {counts['train_bytes']:,} "
            f"training / {counts['val_bytes']:,} validation bytes. Validation loss: mean next-byte cross-entropy "
            f"(nats) over {len(val)} fixed batches of {cfg.batch} x {cfg.context}. Step times: median of each row's "
            f"per-step times (rows interleaved step by step; a fork's first {fork_at} steps are the dense row's); "
            f"train total adds the finalize / compress calls. Inference: forward of one {cfg.batch} x {cfg.context} "
            f"batch, median of {cfg.timing_repeats} alternating repeats. Training took {train_seconds / 60:.1f} min "
            f"({wall / 60:.1f} min with the evaluation). {verdict} {' '.join(notes)}")
    print(table + "\n\n" + note, flush=True)
    if recording:
        record("train: rank-regularized training of a byte-level LM", table, note)
    return table


def lm_verdict(results: list[tuple[Row, float, float]], base_loss: float) -> str:
    """The goal: the best rank-regularized row at <= 50% within 2% of dense and below dense-then-compress."""
    regularized = [(loss, ratio, row.label) for row, loss, ratio in results
                   if row.label.startswith(("TRP", "RankScheduler", "DLRT")) and ratio <= 0.5]
    forks = [loss for row, loss, _ in results if row.first_step]
    if not regularized:
        return "Goal MISSED: no rank-regularized row ended at <= 50% of the block params."
    loss, ratio, label = min(regularized)
    within = loss <= 1.02 * base_loss
    better = not forks or loss < min(forks)
    verdict = "met" if within and better else "MISSED"
    return (f"Goal ({verdict}): best rank-regularized row at <= 50% is '{label}' ({ratio:.2f} of the block params), "
            f"{100 * (loss / base_loss - 1):+.1f}% against dense (target <= +2%: {'yes' if within else 'no'}), "
            f"{'below' if better else 'not below'} the best dense-then-compress row"
            + (f" ({min(forks):.4f})." if forks else "."))


# ---------------------------------------------------------------------------------------------------------------
# part 2: a CNN on scikit-learn's digits
# ---------------------------------------------------------------------------------------------------------------

DIGIT_CONVS = ["3", "7"]  # the two inner convolutions (the first sees one input channel and stays dense)
ENERGY_GRID = (0.999, 0.998, 0.995, 0.99, 0.98, 0.97, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)


def digits_model(width: int, seed: int) -> nn.Sequential:
    """Three 3x3 convolutions with batch norm, a max-pool, a global average pool and a linear classifier."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(width, 10),
    )


def shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The batch shifted by one random offset in {-1, 0, 1}^2 (zero padding)."""
    padded = F.pad(images, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + images.shape[2], dx:dx + images.shape[3]]


def train_digits(model: nn.Module, data: tuple[torch.Tensor, ...], epochs: int, seed: int,
                 switch_epoch: int | None = None, start: Callable[[nn.Module, Any], Any] | None = None,
                 switch: Callable[[nn.Module, Any], None] | None = None, lr: float = 3e-3) -> nn.Module:
    """Adam, batches of 64 with random shifts, cosine learning rate over all epochs.

    ``start(model, optimizer)`` attaches a method; at ``switch_epoch``, ``switch(model, method)`` runs
    (finalize, or compress) and a new optimizer takes over.
    """
    train_x, train_y = data[0], data[1]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr)
    method = start(model, optimizer) if start is not None else None
    per_epoch = math.ceil(len(train_y) / 64)
    total, t = epochs * per_epoch, 0
    for epoch in range(epochs):
        if epoch == switch_epoch and switch is not None:
            switch(model, method)
            optimizer = torch.optim.Adam(model.parameters(), lr)
        model.train()
        for batch in torch.randperm(len(train_y), generator=generator).split(64):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t / total))
            loss = F.cross_entropy(model(shift(train_x[batch], generator)), train_y[batch])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t += 1
    return model.eval()


def conv_params(model: nn.Module) -> int:
    return sum(p.numel() for name in DIGIT_CONVS for p in model.get_submodule(name).parameters())


def digits_trp(data: tuple[torch.Tensor, ...], width: int, epochs: int, seed: int, scheme: str,
               energy: float) -> nn.Module:
    """TRP on the inner convolutions (energy ramp over half the run) for 3/4 of the epochs, finalized, fine-tuned."""
    steps = epochs * math.ceil(len(data[1]) / 64)

    def start(model: nn.Module, optimizer: Any) -> TRP:
        return TRP(model, optimizer, energy=Ramp(0.999, energy, steps // 2), period=10, conv_scheme=scheme,
                   include=DIGIT_CONVS)

    return train_digits(digits_model(width, seed), data, epochs, seed, switch_epoch=3 * epochs // 4, start=start,
                        switch=lambda model, trp: trp.finalize())


def digits_part(width: int, epochs: int, seeds: int, recording: bool) -> str:
    data = digits_cnn.digits(seed=0)
    test_x, test_y = data[2], data[3]
    shape = (1, 8, 8)
    dense_flops = digits_cnn.conv_flops(digits_model(width, 0), shape)
    dense_conv = conv_params(digits_model(width, 0))

    energies = {}
    for scheme in ("channel", "spatial"):  # the largest end energy of the grid that cuts the conv MACs >= 2x
        low, high = 0, len(ENERGY_GRID) - 1  # bisection over the grid (descending energies, rising cuts)
        energies[scheme] = ENERGY_GRID[-1]
        while low <= high:
            middle = (low + high) // 2
            model = digits_trp(data, width, epochs, 0, scheme, ENERGY_GRID[middle])
            cut = dense_flops / digits_cnn.conv_flops(model, shape)
            print(f"  {scheme} energy {ENERGY_GRID[middle]}: conv MACs {cut:.2f}x fewer", flush=True)
            if cut >= 2:
                energies[scheme] = ENERGY_GRID[middle]
                high = middle - 1
            else:
                low = middle + 1

    results: dict[str, list[tuple[float, float, float]]] = {}  # accuracy, MACs cut, conv param ratio
    for seed in range(seeds):
        dense = train_digits(digits_model(width, seed), data, epochs, seed)
        results.setdefault("dense", []).append((digits_cnn.accuracy(dense, test_x, test_y), 1.0, 1.0))
        for scheme in ("channel", "spatial"):
            model = digits_trp(data, width, epochs, seed, scheme, energies[scheme])
            results.setdefault(scheme, []).append((digits_cnn.accuracy(model, test_x, test_y),
                                                   dense_flops / digits_cnn.conv_flops(model, shape),
                                                   conv_params(model) / dense_conv))
        ratio = results["channel"][-1][2]

        def compress(model: nn.Module, _: Any, ratio: float = ratio) -> None:
            lowrank.compress(model, ratio=ratio, include=DIGIT_CONVS, progress=False)

        model = train_digits(digits_model(width, seed), data, epochs, seed, switch_epoch=3 * epochs // 4,
                             switch=compress)
        results.setdefault("compress", []).append((digits_cnn.accuracy(model, test_x, test_y),
                                                   dense_flops / digits_cnn.conv_flops(model, shape),
                                                   conv_params(model) / dense_conv))
        print(f"  seed {seed}: " + ", ".join(f"{k} {v[-1][0]:.4f}" for k, v in results.items()), flush=True)

    switch = 3 * epochs // 4
    labels = {
        "dense": f"dense, {epochs} epochs",
        "channel": f"TRP channel scheme, Ramp(0.999 -> {energies['channel']}), finalized at epoch {switch}, fine-tuned",
        "spatial": f"TRP spatial scheme, Ramp(0.999 -> {energies['spatial']}), finalized at epoch {switch}, fine-tuned",
        "compress": f"dense {switch} epochs, compress (Tucker-2) at the TRP channel row's ratio, fine-tuned",
    }
    base = statistics.fmean(a for a, _, _ in results["dense"])
    lines = ["| row | test accuracy (mean, min-max over seeds) | vs dense (points) | conv MACs cut (min) | "
             "inner conv params | target |", "|---|---|---|---|---|---|"]
    for key, label in labels.items():
        accs = [a for a, _, _ in results[key]]
        mean = statistics.fmean(accs)
        target = "" if key == "dense" else f"within 0.5 points ({'met' if mean >= base - 0.005 else 'MISSED'})"
        lines.append(f"| {label} | {100 * mean:.2f}% ({100 * min(accs):.2f}-{100 * max(accs):.2f}) "
                     f"| {100 * (mean - base):+.2f} | {min(c for _, c, _ in results[key]):.2f}x "
                     f"| {statistics.fmean(p for _, _, p in results[key]):.2f} | {target} |")
    table = "\n".join(lines)
    note = (f"scikit-learn digits (8x8; 1,347 training / 450 test images, split seed 0), CNN of width {width} "
            f"(3x3 convolutions with batch norm), Adam lr 3e-3 with cosine decay, batches of 64 with a random "
            f"one-pixel shift, {epochs} epochs for every row; seeds 0-{seeds - 1} (initialisation and data order). "
            f"TRP: period 10, nuclear weight 3e-4, energy ramped over the first half of the steps, on the two inner "
            f"convolutions; its end energy is the largest of {ENERGY_GRID} that cuts the conv MACs at least 2x on "
            f"seed 0 (bisection over the grid). Conv MACs: all three convolutions per image "
            f"(`FactorizedModule.flops` against `lowrank.nn.dense.dense_flops`), dense {dense_flops:,}; conv params: "
            f"the two inner convolutions, as a "
            f"share of dense ({dense_conv:,}).")
    print(table + "\n\n" + note, flush=True)
    if recording:
        record("train: TRP on the digits CNN", table, note)
    return table


# ---------------------------------------------------------------------------------------------------------------
# part 3: recovering planted ranks
# ---------------------------------------------------------------------------------------------------------------

PLANTED = ((64, 128, 8), (128, 128, 16), (128, 10, 4))  # (in, out, rank) of the teacher's layers


def planted_teacher(seed: int = 0) -> nn.Sequential:
    """The teacher: weights ``A @ B`` of the planted ranks (unit-variance pre-activations), small biases."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out, rank) in enumerate(PLANTED):
        linear = nn.Linear(n_in, n_out)
        with torch.no_grad():
            a = torch.randn(n_out, rank, generator=generator) / math.sqrt(rank)
            b = torch.randn(rank, n_in, generator=generator) / math.sqrt(n_in)
            linear.weight.copy_(a @ b * (2.0 if i else 1.0))
            linear.bias.copy_(0.1 * torch.randn(n_out, generator=generator))
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers[:-1]).requires_grad_(False)


def student(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))


def fit_student(model: nn.Module, teacher: nn.Module, steps: int, seed: int,
                start: Callable[[nn.Module, Any], Any] | None = None, lr: float = 3e-3) -> Any:
    """Adam on the MSE to the teacher's outputs, fresh Gaussian inputs each step; the method ``start`` made."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr)
    method = start(model, optimizer) if start is not None else None
    for t in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / steps)))
        x = torch.randn(256, 64, generator=generator)
        F.mse_loss(model(x), teacher(x)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return method


@torch.no_grad()
def relative_error(model: nn.Module, teacher: nn.Module) -> float:
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(123))
    target = teacher(x)
    return float((model(x) - target).square().mean() / target.var(0).mean())


def planted_part(steps: int, energy: float, nuclear_weight: float, recording: bool) -> str:
    teacher = planted_teacher()
    names = ["0", "2", "4"]
    dense_params = sum(n_in * n_out + n_out for n_in, n_out, _ in PLANTED)
    true_params = sum(r * (n_in + n_out) + n_out for n_in, n_out, r in PLANTED)

    dense = student(0)
    fit_student(dense, teacher, steps, 0)
    spectra = {name: torch.linalg.svdvals(dense.get_submodule(name).weight.detach()) for name in names}

    trp_model = student(0)
    trp = fit_student(trp_model, teacher, steps, 0, start=lambda m, o: TRP(
        m, o, energy=Ramp(0.999, energy, steps // 2), period=10, nuclear_weight=nuclear_weight))
    trp_report = trp.finalize()
    trp_ranks = dict(trp.ranks)  # the trained ranks (a layer above break-even stays dense at finalize)
    kept_dense = {row.name for row in trp_report.layers if not row.replaced}

    rs_model = student(0)
    swap_modules(rs_model, [(name, LowRankLinear.from_dense(rs_model.get_submodule(name), min(n_in, n_out)))
                            for name, (n_in, n_out, _) in zip(names, PLANTED)])
    ratio = (true_params + 0.5) / dense_params  # the teacher's share (the half keeps float rounding off the floor)
    scheduler = fit_student(rs_model, teacher, steps, 0, start=lambda m, o: RankScheduler(
        m, o, ratio=ratio, total_steps=steps))
    scheduler.finalize()
    rs_ranks = {name: rs_model.get_submodule(name).rank for name in names}

    def verdict(rank: int, true: int) -> str:
        return "yes" if true <= rank <= 1.25 * true else ("no (below)" if rank < true else "no")

    lines = ["| layer | shape | true rank | dense student: rank at 99% energy | TRP rank | within +25% | "
             "RankScheduler rank | within +25% |", "|---|---|---|---|---|---|---|---|"]
    for name, (n_in, n_out, rank) in zip(names, PLANTED):
        s2 = spectra[name].double() ** 2
        rank99 = int(torch.searchsorted(torch.cumsum(s2, 0) / s2.sum(), 0.99)) + 1
        dense_note = " (kept dense at finalize)" if name in kept_dense else ""
        lines.append(f"| {name} | {n_out}x{n_in} | {rank} | {rank99} | {trp_ranks[name]}{dense_note} "
                     f"| {verdict(trp_ranks[name], rank)} | {rs_ranks[name]} | {verdict(rs_ranks[name], rank)} |")
    errors = {"dense": relative_error(dense, teacher), "TRP": relative_error(trp_model, teacher),
              "RankScheduler": relative_error(rs_model, teacher)}
    ok = {method: all(verdict(ranks[name], r) == "yes" for name, (_, _, r) in zip(names, PLANTED))
          for method, ranks in (("TRP", trp_ranks), ("RankScheduler", rs_ranks))}
    table = "\n".join(lines)
    note = (f"Teacher 64-128-128-10 with tanh, weights `A @ B` (Gaussian factors) of ranks "
            f"{[r for _, _, r in PLANTED]} ({true_params:,} parameters as factors, {true_params / dense_params:.3f} "
            f"of the dense {dense_params:,}); students trained {steps} steps on fresh Gaussian inputs (batch 256), "
            f"Adam lr 3e-3 with cosine decay to a tenth, MSE to the teacher's outputs, seed 0. TRP on every layer: "
            f"`Ramp(0.999, {energy}, {steps // 2})`, period 10, nuclear weight {nuclear_weight}. RankScheduler: every "
            f"layer a full-rank LowRankLinear at the start, ratio = the teacher's share. Relative test MSE (to the "
            f"output variance): dense {errors['dense']:.2e}, TRP {errors['TRP']:.2e}, RankScheduler "
            f"{errors['RankScheduler']:.2e}. Goal (every layer within +25% of its true rank): TRP "
            f"{'met' if ok['TRP'] else 'MISSED'}, RankScheduler {'met' if ok['RankScheduler'] else 'MISSED'}.")
    print(table + "\n\n" + note, flush=True)
    if recording:
        record("train: planted ranks", table, note)
    return table


# ---------------------------------------------------------------------------------------------------------------
# part 4: overhead per step
# ---------------------------------------------------------------------------------------------------------------


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def overhead_part(cfg: LMConfig, lm_steps: int, mlp_steps: int, repeats: int, recording: bool) -> str:
    torch.manual_seed(0)
    lm_model = ByteLM(cfg)
    data = torch.randint(0, 256, (cfg.batch, cfg.context + 1), generator=torch.Generator().manual_seed(0))
    mlp_x = torch.randn(256, 784, generator=torch.Generator().manual_seed(0))
    mlp_y = torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(1))

    def lm_step(model: nn.Module) -> torch.Tensor:
        return lm_loss(model, data)

    def mlp_step(model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(mlp_x), mlp_y)

    cases = [("lm (TRP on the block linears)", lm_model, lm_step, lm_steps, BLOCKS),
             ("MLP 784-512-512-10, batch 256", mlp(0), mlp_step, mlp_steps, None)]
    lines = ["| model | steps per run | plain run | with TRP | TRP overhead | plain run (factorized) | "
             "with RankScheduler | RankScheduler overhead | target |", "|---|---|---|---|---|---|---|---|---|"]
    for label, model, loss_fn, steps, include in cases:
        factorized = copy.deepcopy(model)
        lowrank.compress(factorized, ratio=0.99, include=include, progress=False)

        def run(source: nn.Module, method: str | None, loss_fn: Any = loss_fn, steps: int = steps,
                include: Any = include) -> float:
            """Seconds of one whole run of ``steps`` steps (the copy and the method's construction not timed)."""
            model = copy.deepcopy(source)
            optimizer = adamw(model)
            if method == "trp":
                TRP(model, optimizer, energy=Ramp(0.99, 0.9, steps), period=10, include=include)
            elif method == "scheduler":
                RankScheduler(model, optimizer, ratio=0.5, total_steps=steps, include=include)
            for group in optimizer.param_groups:
                group["lr"] = 1e-3
            start = time.perf_counter()
            for _ in range(steps):
                loss_fn(model).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        configs = {"plain": (model, None), "trp": (model, "trp"), "plain factorized": (factorized, None),
                   "scheduler": (factorized, "scheduler")}
        samples: dict[str, list[float]] = {name: [] for name in configs}
        for repeat in range(repeats + 1):  # alternating; the first round warms up
            for name, (source, method) in configs.items():
                seconds = run(source, method)
                if repeat:
                    samples[name].append(seconds)
        medians = {name: statistics.median(values) for name, values in samples.items()}
        trp_cost = medians["trp"] / medians["plain"] - 1
        rs_cost = medians["scheduler"] / medians["plain factorized"] - 1
        met = "met" if max(trp_cost, rs_cost) <= 0.10 else "MISSED"
        lines.append(f"| {label} | {steps} | {medians['plain'] * 1e3 / steps:.1f} ms/step "
                     f"| {medians['trp'] * 1e3 / steps:.1f} ms/step | {100 * trp_cost:+.1f}% "
                     f"| {medians['plain factorized'] * 1e3 / steps:.1f} ms/step "
                     f"| {medians['scheduler'] * 1e3 / steps:.1f} ms/step | {100 * rs_cost:+.1f}% "
                     f"| <= 10% ({met}) |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    note = (f"Whole runs of N steps (the run's training loop timed; the model copy and the method's construction "
            f"not), with and without the method, alternating, {repeats} repeats after a warm-up round, medians. TRP: "
            f"`Ramp(0.99, 0.9, N)`, period 10, nuclear weight 3e-4, on the dense model; RankScheduler: ratio 0.5, "
            f"total_steps N (its warm-up, fall and final steps all inside the run), on the model compressed at "
            f"ratio 0.99, against that factorized model's plain run. AdamW, same batch every step. The lm model is "
            f"part 1's ({cfg.batch} x {cfg.context} batches).")
    print(table + "\n\n" + note, flush=True)
    if recording:
        record("train: per-step overhead of TRP and RankScheduler", table, note)
    return table


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("lm", "digits", "planted", "overhead", "all"), default="all")
    parser.add_argument("--steps", type=int, default=None, help="lm training steps (default 2000)")
    parser.add_argument("--quick", action="store_true", help="a smoke test of every part at tiny sizes")
    parser.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    parser.add_argument("--tuned-energy", type=float, default=0.993, help="end energy of the tuned TRP lm row")
    parser.add_argument("--dlrt-rank", type=int, default=32, help="starting rank of the DLRT lm row")
    args = parser.parse_args()
    quick = args.quick
    cfg = LMConfig(steps=args.steps or (40 if quick else 2000))
    if quick:  # tiny models: one thread (two only add OpenMP waits, which a loaded machine turns into stalls)
        torch.set_num_threads(1)
        cfg = LMConfig(d_model=32, heads=2, ffn=64, layers=2, context=16, batch=8, steps=args.steps or 40,
                       val_batches=4, timing_repeats=3)
    parts = ("lm", "digits", "planted", "overhead") if args.part == "all" else (args.part,)
    recording = args.record and not quick
    started = time.perf_counter()
    for part in parts:
        print(f"\n=== {part} ===", flush=True)
        part_start = time.perf_counter()
        if part == "lm":
            lm_part(cfg, args.tuned_energy, args.dlrt_rank if not quick else 4, recording)
        elif part == "digits":
            digits_part(width=8 if quick else 32, epochs=2 if quick else 20, seeds=1 if quick else 3,
                        recording=recording)
        elif part == "planted":
            planted_part(steps=200 if quick else 4000, energy=0.99, nuclear_weight=3e-4, recording=recording)
        else:
            overhead_part(cfg, lm_steps=10 if quick else 50, mlp_steps=10 if quick else 100,
                          repeats=1 if quick else 5, recording=recording)
        print(f"({part}: {time.perf_counter() - part_start:.0f} s)", flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
