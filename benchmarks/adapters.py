"""Adapters (issue 13): ``lowrank.adapters`` against PEFT 0.21 and against each other, side by side in one process.

Four parts, chosen with ``--part`` (``all`` runs them in this order):

1. **speed.** One training step (forward, backward, AdamW step) of the bundled all-MiniLM-L6-v2 with LoRA on
   every linear layer (37: the 36 encoder linears and the pooler) at rank 8 and 64: ``lowrank.adapters.add``
   against ``peft.get_peft_model(LoraConfig(r, lora_alpha, target_modules=<the 37 names>))``, on deep copies of
   the same model after the same ``torch.manual_seed``, the same batch (dropout on, as in training).
   Time: medians of alternating repeats. Memory, two measures, each in a fresh subprocess per configuration:
   the peak resident memory of three training steps above the resident memory before them (Linux
   ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus ``VmRSS``: what the steps add,
   activations, gradients and AdamW state together, whatever the allocator does), and the bytes autograd
   saves for the backward (``torch.autograd.graph.saved_tensors_hooks``, each storage once, the model's own
   parameters not counted: the activation memory an adapter implementation decides). Before timing, both
   models take two identical seeded steps and their outputs are compared (our LoRA initialises as PEFT's).
2. **quality.** MiniLM fine-tuned to tell which standard-library package a docstring comes from (the first
   paragraph of the module, class, function and method docstrings of 8 packages, deduplicated, balanced,
   a fixed held-out split): mean-pooled embedding and a linear head; our LoRA, our FLoRA, PEFT's LoRA (all
   at rank 8 on the 36 encoder linears: equal trainable parameters but FLoRA's 8 x 8 cores), full
   fine-tuning, and the head alone on the frozen model; held-out accuracy over 3 seeds (adapter and head
   initialisation, data order; the same for every method).
3. **conv.** ``examples/digits_cnn.py``'s CNN trained on scikit-learn's digits 0-4, then adapted to digits
   5-9 (a new 5-way head) with LoRA vs FLoRA on its three convolutions at (about) equal trainable
   parameters (FLoRA's rank is the one whose parameter count is closest to LoRA's), with all the 5-9
   training images and with a few per class; test accuracy over 3 seeds.
4. **heal.** MiniLM's 37 linears compressed to 50% (``lowrank.compress(model, ratio=0.5)``), then healed for
   the same wall time towards the dense model's outputs on the same calibration text: by training the
   factors (``lowrank.compress(..., calibration=..., heal_seconds=T)`` with a calibration config that
   factorizes exactly as the plain call: uniform ranks, no whitening, no refit) and by a LoRA adapter on the
   factorized layers (the same objective, batches, optimizer and time bound as ``lowrank.heal``); the mean
   cosine of the embeddings to the dense model's and the retrieval accuracy of ``examples/minilm_task.py``
   on held-out text (the 331 pydoc pairs; the calibration paragraphs are disjoint from them).

Usage::

    python benchmarks/adapters.py --quick              # smoke test of every part (about a minute)
    python benchmarks/adapters.py --part all --record  # every table, appended to benchmarks/RESULTS.md
    python benchmarks/adapters.py --part speed --repeats 20
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn.functional as F  # noqa: N812
from _timing import alternate, record
from torch import nn

import lowrank
import lowrank.adapters as adapters
import lowrank.heal
from lowrank.calibrate import calibration_batches
from lowrank.heal import reference_outputs
from lowrank.nn import FactorizedModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import digits_cnn  # noqa: E402
import minilm_task  # noqa: E402

HIDDEN = 384  # MiniLM's width


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def mean_spread(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std (min-max)`` of ``values`` times ``scale``."""
    scaled = [scale * v for v in values]
    std = statistics.stdev(scaled) if len(scaled) > 1 else 0.0
    low, high = min(scaled), max(scaled)
    return f"{statistics.mean(scaled):.{digits}f} ± {std:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


_BASE: dict[str, nn.Module] = {}


def minilm() -> nn.Module:
    """The bundled MiniLM (a BertModel), loaded once; callers deep-copy it."""
    if "model" not in _BASE:
        _BASE["model"] = lowrank.io.load_pretrained(minilm_task.checkpoint_dir())
    return _BASE["model"]


def linear_names(model: nn.Module, prefix: str = "") -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith(prefix)]


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def with_lora(base: nn.Module, impl: str, rank: int, names: list[str], seed: int = 0) -> nn.Module:
    """A deep copy of ``base`` with LoRA(rank, alpha = 2 rank) on ``names``: ours or PEFT's, after the same seed."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    if impl == "ours":
        adapters.add(model, adapters.LoRA(rank=rank, alpha=2 * rank), include=names)
        return model
    return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=names))


# ---------------------------------------------------------------------------------------------------------------
# part 1: speed and memory of a training step
# ---------------------------------------------------------------------------------------------------------------


def speed_batch(batch: int, length: int) -> dict[str, torch.Tensor]:
    texts = [document for _, document in minilm_task.retrieval_pairs()[:batch]]
    return dict(minilm_task.tokenizer()(texts, padding="max_length", truncation=True, max_length=length,
                                        return_tensors="pt"))


def step_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    return out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()


def trainer(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One AdamW training step of ``model`` on ``batch``, as a callable."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = step_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(key + r":\s+(\d+)", handle.read()).group(1))


def memory_probe(spec: str, batch_size: int, length: int) -> None:
    """Child process: print the step memory of one configuration ``impl:rank`` as JSON (see the module doc)."""
    torch.set_num_threads(1)
    impl, rank = spec.split(":")
    base = minilm()
    model = with_lora(base, impl, int(rank), linear_names(base))
    batch = speed_batch(batch_size, length)
    step = trainer(model, batch)
    del base
    _BASE.clear()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:  # reset the high-water mark (Linux >= 4.0)
        handle.write("5")
    before = _proc_status_kib("VmRSS")
    for _ in range(3):
        step()
    peak = _proc_status_kib("VmHWM") - before
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step_loss(model, batch)
    loss.backward()
    print(json.dumps({"peak_kib": peak, "saved_bytes": sum(saved.values())}))


def measure_memory(spec: str, batch_size: int, length: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--memory-probe", spec, "--speed-batch", str(batch_size),
               "--speed-length", str(length)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe {spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def speed_part(ranks: list[int], batch_size: int, length: int, repeats: int, recording: bool) -> None:
    base = minilm()
    names = linear_names(base)
    batch = speed_batch(batch_size, length)
    rows = []
    for rank in ranks:
        # the same initialisation: two seeded steps each, then compare the outputs
        models = {impl: with_lora(base, impl, rank, names) for impl in ("ours", "peft")}
        steps = {impl: trainer(model, batch) for impl, model in models.items()}
        for i in range(2):
            for impl in models:
                torch.manual_seed(100 + i)  # the same dropout masks
                steps[impl]()
        with torch.no_grad():
            outputs = {impl: model.eval()(**batch).last_hidden_state for impl, model in models.items()}
        gap = float((outputs["ours"] - outputs["peft"]).abs().max())
        for model in models.values():
            model.train()
        params = {impl: trainable_count(model) for impl, model in models.items()}
        times = alternate({impl: steps[impl] for impl in models}, repeats, warmup=1)
        memory = {impl: measure_memory(f"{impl}:{rank}", batch_size, length) for impl in models}
        ratio = times["peft"] / times["ours"]
        peak = {impl: memory[impl]["peak_kib"] / 1024 for impl in models}
        saved = {impl: memory[impl]["saved_bytes"] / 2**20 for impl in models}
        fast = "aim met" if ratio >= 1.2 else ("met" if ratio >= 0.97 else "MISSED")
        small = "met" if peak["ours"] <= 1.05 * peak["peft"] and saved["ours"] <= saved["peft"] else "MISSED"
        rows.append([f"LoRA r={rank}, {len(names)} linears", f"{params['ours']:,} / {params['peft']:,}",
                     f"{times['ours'] * 1e3:.0f} ms", f"{times['peft'] * 1e3:.0f} ms", f"{ratio:.2f}x", fast,
                     f"{peak['ours']:.0f} / {peak['peft']:.0f} MiB", f"{saved['ours']:.1f} / {saved['peft']:.1f} MiB",
                     small, f"{gap:.1e}"])
        print(" | ".join(rows[-1]), flush=True)
        del models, steps
        gc.collect()
    header = ["configuration", "trainable params (ours / PEFT)", "step, lowrank", "step, PEFT",
              "speed-up (PEFT time / ours)", "speed goal (>= 1x; aim 1.2x)", "peak step memory (ours / PEFT)",
              "saved for backward (ours / PEFT)", "memory goal", "max |out diff| after 2 equal steps"]
    table = markdown(header, rows)
    print(table)
    if recording:
        record("adapters: MiniLM LoRA training step, lowrank vs PEFT", table,
               f"peft {peft.__version__}. Bundled all-MiniLM-L6-v2, batch {batch_size} x {length} tokens (pydoc "
               "paragraphs padded to the length), train mode (dropout 0.1), loss = mean square of the token "
               "states plus of the pooler output, AdamW; LoRA alpha = 2 x rank on all 37 linears, ours "
               "`lowrank.adapters.add(model, LoRA(rank, alpha), include=names)` vs PEFT "
               "`get_peft_model(model, LoraConfig(r, lora_alpha, target_modules=names))` on deep copies after "
               f"the same seed. Step time: median of {repeats} alternating repeats in one process. Peak step "
               "memory: in a fresh 1-thread subprocess per configuration, VmHWM after 3 steps (reset through "
               "/proc/self/clear_refs just before) minus VmRSS before them. Saved for backward: bytes of the "
               "tensors autograd keeps for one step (saved_tensors_hooks, each storage once, parameters "
               "excluded). 'met' on speed allows 3% of timing noise; on memory 5% on the peak, none on the saved "
               "bytes. Last column: both models after two seeded steps on the same batch (same dropout masks).")


# ---------------------------------------------------------------------------------------------------------------
# part 2: quality at equal trainable parameters (MiniLM, docstring classification)
# ---------------------------------------------------------------------------------------------------------------

PACKAGES = ("asyncio", "email", "importlib", "logging", "multiprocessing", "tarfile", "typing", "xml")
MIN_CHARS = 40


def _first_paragraph(doc: str) -> str:
    return " ".join(inspect.cleandoc(doc).strip().split("\n\n")[0].split())


def package_docstrings() -> dict[str, list[str]]:
    """Per package of :data:`PACKAGES`, the first paragraphs of the docstrings defined in it (each text once)."""
    seen: set[str] = set()
    docs: dict[str, list[str]] = {}
    for package in PACKAGES:
        texts = []
        for module in minilm_task.package_modules(package):
            objects = [module]
            for _, obj in sorted(vars(module).items()):
                if inspect.ismodule(obj) or getattr(obj, "__module__", module.__name__) != module.__name__:
                    continue
                objects.append(obj)
                if inspect.isclass(obj):
                    objects += [member for _, member in sorted(vars(obj).items())]
            for obj in objects:
                doc = getattr(obj, "__doc__", None) if callable(obj) or inspect.ismodule(obj) else None
                if isinstance(doc, str):
                    text = _first_paragraph(doc)
                    if len(text) >= MIN_CHARS and text not in seen:
                        seen.add(text)
                        texts.append(text)
        docs[package] = texts
    return docs


def docstring_task(test_per_class: int, train_per_class: int | None
                   ) -> tuple[list[str], list[int], list[str], list[int]]:
    """Balanced train and held-out splits (a fixed shuffle, seed 0): ``(train texts, labels, test texts, labels)``."""
    docs = package_docstrings()
    available = min(len(texts) for texts in docs.values()) - test_per_class
    per_class = available if train_per_class is None else min(train_per_class, available)
    generator = torch.Generator().manual_seed(0)
    train_x, train_y, test_x, test_y = [], [], [], []
    for label, package in enumerate(PACKAGES):
        texts = docs[package]
        order = torch.randperm(len(texts), generator=generator).tolist()
        test_x += [texts[i] for i in order[:test_per_class]]
        test_y += [label] * test_per_class
        train_x += [texts[i] for i in order[test_per_class:test_per_class + per_class]]
        train_y += [label] * per_class
    return train_x, train_y, test_x, test_y


class Classifier(nn.Module):
    """Mean-pooled MiniLM embedding (as sentence-transformers) and a linear head."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(HIDDEN, classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def _rows(encoding: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows ``index`` of a padded encoding, cut to their longest text."""
    length = int(encoding["attention_mask"][index].sum(1).max())
    return {key: value[index, :length] for key, value in encoding.items()}


@torch.no_grad()
def classify_accuracy(model: Classifier, encoding: dict[str, torch.Tensor], labels: torch.Tensor) -> float:
    model.eval()
    hits = 0
    for index in torch.arange(len(labels)).split(64):
        hits += int((model(_rows(encoding, index)).argmax(1) == labels[index]).sum())
    return hits / len(labels)


def quality_run(method: str, seed: int, data: dict[str, Any], cfg: dict[str, Any]) -> tuple[float, int, float]:
    """Fine-tune one method from seed ``seed``: held-out accuracy, trainable parameters, seconds."""
    base = minilm()
    names = linear_names(base, "encoder.")
    rank, alpha = cfg["rank"], 2 * cfg["rank"]
    torch.manual_seed(seed)
    encoder = copy.deepcopy(base)
    if method == "lowrank LoRA":
        adapters.add(encoder, adapters.LoRA(rank=rank, alpha=alpha), include=names)
    elif method == "lowrank FLoRA":
        adapters.add(encoder, adapters.FLoRA(rank=rank, alpha=alpha), include=names)
    elif method == "PEFT LoRA":
        encoder = peft.get_peft_model(encoder, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=names))
    elif method == "head only (frozen MiniLM)":
        encoder.requires_grad_(False)
    model = Classifier(encoder, len(PACKAGES))
    body = [p for p in model.encoder.parameters() if p.requires_grad]
    lr = method_lr(method, cfg)
    groups = [{"params": list(model.head.parameters()), "lr": cfg["head_lr"]}] + ([{"params": body, "lr": lr}]
                                                                                 if body else [])
    optimizer = torch.optim.AdamW(groups)
    labels = data["train_y"]
    generator = torch.Generator().manual_seed(seed)
    batches = [index for _ in range(cfg["epochs"]) for index in
               torch.randperm(len(labels), generator=generator).split(cfg["batch"])]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 - t / len(batches))
    start = time.perf_counter()
    model.train()
    for index in batches:
        loss = F.cross_entropy(model(_rows(data["train"], index)), labels[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    seconds = time.perf_counter() - start
    accuracy = classify_accuracy(model, data["test"], data["test_y"])
    return accuracy, trainable_count(model), seconds


QUALITY_METHODS = ("lowrank LoRA", "PEFT LoRA", "lowrank FLoRA", "full fine-tuning", "head only (frozen MiniLM)")


def method_lr(method: str, cfg: dict[str, Any]) -> float | None:
    """The body's learning rate of a quality method (None: no body parameter trains)."""
    if method.startswith("head"):
        return None
    return cfg["full_lr"] if method.startswith("full") else cfg["flora_lr" if "FLoRA" in method else "lora_lr"]


def quality_part(seeds: int, cfg: dict[str, Any], recording: bool) -> None:
    train_x, train_y, test_x, test_y = docstring_task(cfg["test_per_class"], cfg["train_per_class"])
    tok = minilm_task.tokenizer()

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tok(texts, padding="max_length", truncation=True, max_length=cfg["length"], return_tensors="pt"))

    data = {"train": encode(train_x), "train_y": torch.tensor(train_y), "test": encode(test_x),
            "test_y": torch.tensor(test_y)}
    print(f"task: {len(PACKAGES)} packages, {len(train_x)} training / {len(test_x)} held-out texts", flush=True)
    results: dict[str, list[tuple[float, int, float]]] = {method: [] for method in QUALITY_METHODS}
    for seed in range(seeds):
        for method in QUALITY_METHODS:
            results[method].append(quality_run(method, seed, data, cfg))
            accuracy, params, seconds = results[method][-1]
            print(f"seed {seed} {method}: accuracy {accuracy:.3f}, {params:,} trainable, {seconds:.0f} s", flush=True)
    accuracy = {method: [r[0] for r in runs] for method, runs in results.items()}
    spread = {method: statistics.stdev(values) if len(values) > 1 else 0.0 for method, values in accuracy.items()}
    gap = statistics.mean(accuracy["lowrank LoRA"]) - statistics.mean(accuracy["PEFT LoRA"])
    noise = max(spread["lowrank LoRA"], spread["PEFT LoRA"], 1 / len(test_y))
    within = abs(gap) <= noise
    flora_gap = statistics.mean(accuracy["lowrank FLoRA"]) - statistics.mean(accuracy["lowrank LoRA"])
    rows = []
    for method, runs in results.items():
        goal = ""
        if method == "lowrank LoRA":
            goal = f"equals PEFT within noise: {'met' if within else 'MISSED'} ({100 * gap:+.1f} points)"
        lr = method_lr(method, cfg)
        rows.append([method, f"{runs[0][1]:,}", mean_spread(accuracy[method]),
                     ", ".join(f"{100 * a:.1f}" for a in accuracy[method]),
                     f"{statistics.median(r[2] for r in runs):.0f} s",
                     "-" if lr is None else f"{lr:g}", goal])
    table = markdown(["method", "trainable params (with the head)", "held-out accuracy % (mean ± std, min-max)",
                      "per seed", "train time (median)", "lr (body)", "goal"], rows)
    print(table)
    per_seed = max(abs(a - b) for a, b in zip(accuracy["lowrank LoRA"], accuracy["PEFT LoRA"]))
    print(f"largest per-seed |ours - PEFT|: {100 * per_seed:.2f} points; FLoRA - LoRA: {100 * flora_gap:+.1f} points")
    if recording:
        record("adapters: MiniLM fine-tuning quality at equal trainable parameters", table,
               f"peft {peft.__version__}. Task: which of {len(PACKAGES)} standard-library packages "
               f"({', '.join(PACKAGES)}) a docstring comes from (first paragraph, >= {MIN_CHARS} characters, of "
               "the module, class, function and method docstrings defined in each package and its submodules, "
               f"each text once), balanced: {len(train_x)} training and {len(test_x)} held-out texts (a fixed "
               f"shuffle), {cfg['length']} tokens at most. Mean-pooled all-MiniLM-L6-v2 embedding and a linear "
               f"head; AdamW, batch {cfg['batch']}, {cfg['epochs']} epochs, learning rate decaying linearly to 0, "
               f"head lr {cfg['head_lr']:g}; dropout on. Body learning rates (column 'lr') chosen beforehand on a "
               "validation split of the training texts (seeds 0 and 1): LoRA from 1e-3, 3e-3, 1e-2; FLoRA from 3e-3, "
               "1e-2, 3e-2; full fine-tuning from 5e-5, 1e-4. Adapters on the 36 encoder linears at rank "
               f"{cfg['rank']}, "
               f"alpha {2 * cfg['rank']}. Seeds 0-{seeds - 1} set the adapter and head initialisation and the data "
               "order, the same for every method (ours and PEFT's LoRA start from the same factors). 'Within "
               "noise': the difference of the means at most the larger seed standard deviation (or one held-out "
               f"example). Largest per-seed difference ours - PEFT: {100 * per_seed:.2f} points; FLoRA - LoRA: "
               f"{100 * flora_gap:+.1f} points.")


# ---------------------------------------------------------------------------------------------------------------
# part 3: a CNN adapted from digits 0-4 to 5-9, LoRA vs FLoRA on its convolutions
# ---------------------------------------------------------------------------------------------------------------

CONVS = ["0", "2", "5"]  # examples/digits_cnn.make_cnn's three convolutions


def conv_adapter_params(base: nn.Module, config: adapters.LoRA | adapters.FLoRA) -> int:
    """Adapter parameters on the convolutions :data:`CONVS` (each built on a copy of its layer alone)."""
    return sum(p.numel() for name in CONVS for p in adapters.layers.make_adapter(
        config, copy.deepcopy(base.get_submodule(name)), name).adapter_parameters())


def matched_flora_rank(base: nn.Module, lora_rank: int) -> tuple[int, int, int]:
    """``(FLoRA rank, its parameters, LoRA's parameters)``: the FLoRA rank with the closest parameter count."""
    target = conv_adapter_params(base, adapters.LoRA(rank=lora_rank))
    low, high = 1, 64  # the count grows with the rank: bisect for the last rank at or below the target
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if conv_adapter_params(base, adapters.FLoRA(rank=mid)) <= target else (low, mid - 1)
    counts = {r: conv_adapter_params(base, adapters.FLoRA(rank=r)) for r in (low, min(low + 1, 64))}
    best = min(counts, key=lambda r: abs(counts[r] - target))
    return best, counts[best], target


def adapt_cnn(base: nn.Module, method: str, rank: int, seed: int, images: torch.Tensor, labels: torch.Tensor,
              steps: int, lr: float) -> nn.Module:
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    if method == "LoRA":
        adapters.add(model, adapters.LoRA(rank=rank, alpha=2 * rank), include=CONVS, kinds=("conv",))
    elif method == "FLoRA":
        adapters.add(model, adapters.FLoRA(rank=rank, alpha=2 * rank), include=CONVS, kinds=("conv",))
    elif method == "head only":
        model.requires_grad_(False)
    model[-1] = nn.Linear(model[-1].in_features, 5)  # a new head for the new classes, trained by every method
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    order: list[torch.Tensor] = []
    for _ in range(steps):
        if not order:
            order = list(torch.randperm(len(labels), generator=generator).split(64))
        index = order.pop()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images[index]), labels[index]).backward()
        optimizer.step()
    return model.eval()


def few_shot(labels: torch.Tensor, per_class: int | None, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` images of each class drawn with ``seed`` (all indices for None)."""
    if per_class is None:
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([torch.nonzero(labels == c).flatten()[
        torch.randperm(int((labels == c).sum()), generator=generator)[:per_class]] for c in range(5)])


def conv_part(seeds: int, ranks: list[int], shots: int, pre_epochs: int, steps: int, lrs: list[float],
              recording: bool) -> None:
    train_x, train_y, test_x, test_y = digits_cnn.digits()
    old, test_new = train_y < 5, test_y >= 5
    base = digits_cnn.train(digits_cnn.make_cnn(seed=0), train_x[old], train_y[old], pre_epochs)
    base_accuracy = digits_cnn.accuracy(base, test_x[test_y < 5], test_y[test_y < 5])
    new = torch.nonzero(train_y >= 5).flatten()
    new = new[torch.randperm(len(new), generator=torch.Generator().manual_seed(0))]
    n_val = len(new) // 4  # a validation quarter of the 5-9 training images chooses each row's learning rate
    val_x, val_y = train_x[new[:n_val]], train_y[new[:n_val]] - 5
    pool_x, pool_y = train_x[new[n_val:]], train_y[new[n_val:]] - 5
    settings = {f"all {len(pool_y)} images": None, f"{shots} per class": shots}
    rows_spec: list[tuple[str, str, int]] = [("head only", "head only", 0)]
    pairs = []
    for rank in ranks:
        flora_rank, flora_params, lora_params = matched_flora_rank(base, rank)
        rows_spec += [(f"LoRA r={rank} ({lora_params:,} adapter params)", "LoRA", rank),
                      (f"FLoRA r={flora_rank} ({flora_params:,} adapter params)", "FLoRA", flora_rank)]
        pairs.append((rank, flora_rank))
    rows_spec.append(("full fine-tuning", "full", 0))
    results: dict[str, dict[str, list[float]]] = {label: {s: [] for s in settings} for label, _, _ in rows_spec}
    chosen_lr: dict[str, dict[str, float]] = {label: {} for label, _, _ in rows_spec}
    for setting, per_class in settings.items():
        for label, method, rank in rows_spec:
            index = few_shot(pool_y, per_class, 0)
            scores = {lr: digits_cnn.accuracy(adapt_cnn(base, method, rank, 0, pool_x[index], pool_y[index], steps,
                                                        lr), val_x, val_y) for lr in lrs}
            chosen_lr[label][setting] = lr = max(scores, key=scores.get)
            for seed in range(seeds):
                index = few_shot(pool_y, per_class, seed)
                model = adapt_cnn(base, method, rank, seed, pool_x[index], pool_y[index], steps, lr)
                results[label][setting].append(digits_cnn.accuracy(model, test_x[test_new], test_y[test_new] - 5))
            validation = ", ".join(f"{k:g}: {v:.3f}" for k, v in scores.items())
            print(f"{setting}, {label}: lr {lr:g} (validation {validation}), test "
                  f"{', '.join(f'{a:.3f}' for a in results[label][setting])}", flush=True)
    verdicts = []
    for rank, flora_rank in pairs:
        lora = next(label for label, m, r in rows_spec if m == "LoRA" and r == rank)
        flora = next(label for label, m, r in rows_spec if m == "FLoRA" and r == flora_rank)
        for setting in settings:
            diff = statistics.mean(results[flora][setting]) - statistics.mean(results[lora][setting])
            verdicts.append(f"LoRA r={rank} vs FLoRA r={flora_rank}, {setting}: FLoRA {100 * diff:+.1f} points "
                            f"({'FLoRA >= LoRA' if diff >= 0 else 'FLoRA < LoRA'})")
    rows = [[label] + [f"{mean_spread(results[label][s])} at lr {chosen_lr[label][s]:g}" for s in settings]
            for label, _, _ in rows_spec]
    table = markdown(["adaptation (convs 0, 2, 5; new 5-way head always trained)"]
                     + [f"test accuracy % on 5-9, {s} (mean ± std, min-max)" for s in settings], rows)
    print(table)
    print("\n".join(verdicts))
    if recording:
        record("adapters: digits CNN adapted from 0-4 to 5-9, LoRA vs FLoRA on the convolutions", table,
               f"examples/digits_cnn.py CNN (width 64, three 3x3 convs), trained {pre_epochs} epochs on the digits "
               f"0-4 of the training split (test accuracy on 0-4: {100 * base_accuracy:.1f}%), then adapted to 5-9: "
               "adapters on the three convolutions (`include=['0', '2', '5']`, alpha = 2 x rank) plus a new 5-way "
               f"head, Adam, batches of 64, {steps} steps for every row and setting. The 5-9 training images: a "
               f"validation quarter ({n_val}) and the rest to adapt on (all, or {shots} per class drawn per seed). "
               f"Each row's learning rate is the best of {', '.join(f'{lr:g}' for lr in lrs)} on the validation "
               f"images (seed 0), then seeds 0-{seeds - 1} (adapter and head initialisation, data order, the "
               "few-shot draw) are scored on the 5-9 test images. FLoRA's rank is the one whose adapter parameter "
               "count is closest to LoRA's. " + "; ".join(verdicts) + ".")


# ---------------------------------------------------------------------------------------------------------------
# part 4: healing a compressed MiniLM, LoRA adapter vs the factors, equal time
# ---------------------------------------------------------------------------------------------------------------


def relative_distance(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The healing objective of ``lowrank.heal``: mean squared distance over real tokens over the target's."""
    squared, reference = (output - target) ** 2, target**2
    if mask is not None and output.shape[:2] == mask.shape:
        squared, reference = squared[mask], reference[mask]
    return squared.mean() / reference.mean().clamp_min(torch.finfo(reference.dtype).tiny)


def mean_distance(model: nn.Module, batches: list[Any], targets: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(relative_distance(b.run(model).last_hidden_state, t, b.token_mask))
                   for b, t in zip(batches, targets)) / len(batches)


def lora_heal(model: nn.Module, batches: list[Any], targets: list[torch.Tensor], seconds: float, lr: float
              ) -> tuple[int, float]:
    """``lowrank.heal``'s loop with the adapters as the trained parameters: steps taken and the final loss."""
    start = time.perf_counter()
    model.eval()  # as lowrank.heal: no dropout
    mean_distance(model, batches, targets)  # lowrank.heal spends this evaluation inside its time bound too
    optimizer = torch.optim.Adam(adapters.trainable_parameters(model), lr=lr)
    taken = 0
    while time.perf_counter() - start < seconds:
        batch = batches[taken % len(batches)]
        loss = relative_distance(batch.run(model).last_hidden_state, targets[taken % len(batches)], batch.token_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        taken += 1
    return taken, mean_distance(model, batches, targets)


def layer_params(model: nn.Module, names: list[str]) -> int:
    return sum(p.numel() for name in names for p in model.get_submodule(name).parameters())


def heal_part(seconds: float, rank: int, lr: float, factor_lr: float, n_pairs: int | None, n_calibration: int,
              recording: bool, include: list[str] | None = None) -> None:
    dense = minilm().eval()
    tok = minilm_task.tokenizer()
    pairs = minilm_task.retrieval_pairs()[:n_pairs]
    queries, documents = [q for q, _ in pairs], [d for _, d in pairs]
    dense_q, dense_d = minilm_task.embed(dense, tok, queries), minilm_task.embed(dense, tok, documents)
    base_scores = minilm_task.retrieval_scores(dense_q, dense_d)
    texts = minilm_task.calibration_texts(n_calibration)
    batches = calibration_batches(texts, tokenizer=tok)
    targets = reference_outputs(dense, batches)

    def evaluate(label: str, model: nn.Module, steps: str, trained: str) -> None:
        model.eval()
        q, d = minilm_task.embed(model, tok, queries), minilm_task.embed(model, tok, documents)
        scores = minilm_task.retrieval_scores(q, d)
        cosine = float(torch.cat([(q * dense_q).sum(1), (d * dense_d).sum(1)]).mean())
        distance = mean_distance(model, batches, targets)
        rows.append([label, trained, steps, f"{cosine:.4f}", f"{scores['top1']:.3f}", f"{scores['mrr']:.3f}",
                     f"{distance:.4f}", f"{layer_params(model, names) / dense_layer_params:.3f}"])
        print(" | ".join(rows[-1]), flush=True)

    rows: list[list[str]] = []
    rows.append(["dense", "-", "-", "1.0000", f"{base_scores['top1']:.3f}", f"{base_scores['mrr']:.3f}", "0",
                 "1.000"])
    compressed = copy.deepcopy(dense)
    report = lowrank.compress(compressed, ratio=0.5, include=include, progress=False)
    ranks = {row.name: row.rank for row in report.layers if row.replaced}
    names = list(ranks)
    dense_layer_params = layer_params(dense, names)
    evaluate("compress(ratio=0.5), not healed", compressed, "0", "-")

    # the factors: compress with healing, its calibration config factorizing exactly as the plain call
    healed = copy.deepcopy(dense)
    plain_calibration = lowrank.CalibrationConfig(texts, tokenizer=tok, allocation="uniform", whiten=False,
                                                  refit=False, sequential=False)
    heal_report = lowrank.compress(healed, ratio=0.5, include=include, calibration=plain_calibration,
                                   heal_seconds=seconds, progress=False)
    if {row.name: row.rank for row in heal_report.layers if row.replaced} != ranks:
        raise RuntimeError("the healing call chose other ranks than compress(ratio=0.5)")
    factor_params = sum(p.numel() for m in healed.modules() if isinstance(m, FactorizedModule)
                        for name, p in m.named_parameters() if name != "bias")
    healing = heal_report.healing
    evaluate(f"factors healed by compress(heal_seconds={seconds:g}) ({healing['seconds']:.0f} s, Adam lr 1e-4, "
             "the default)", healed, str(healing["steps"]), f"{factor_params:,} (the factors)")
    # the same healing at the learning rate of the LoRA row (lowrank.heal.heal: what compress runs after factorizing)
    healed = copy.deepcopy(compressed)
    healing = lowrank.heal.heal(healed, batches, targets, lowrank.HealConfig(seconds=seconds, lr=factor_lr))
    evaluate(f"factors healed by lowrank.heal.heal ({healing.seconds:.0f} s, Adam lr {factor_lr:g})", healed,
             str(healing.steps), f"{factor_params:,} (the factors)")

    # a LoRA adapter on the factorized layers, the factors frozen
    adapted = copy.deepcopy(compressed)
    torch.manual_seed(0)
    adapters.add(adapted, adapters.LoRA(rank=rank, alpha=2 * rank),
                 filter_fn=lambda _, module: isinstance(module, FactorizedModule))
    adapter_params = sum(p.numel() for p in adapters.trainable_parameters(adapted))
    start = time.perf_counter()
    steps, _ = lora_heal(adapted, batches, targets, seconds, lr)
    spent = time.perf_counter() - start
    evaluate(f"LoRA r={rank} on the factorized layers ({spent:.0f} s, Adam lr {lr:g})", adapted, str(steps),
             f"{adapter_params:,} (the adapters)")
    with torch.no_grad():  # merging folds the adapter into wider LowRankLinear layers, exactly
        before = adapted(**batches[0].kwargs).last_hidden_state
        adapters.merge_and_unload(adapted)
        merge_gap = float((adapted(**batches[0].kwargs).last_hidden_state - before).abs().max())
    evaluate(f"the same, merged (merge_and_unload: rank + {rank} per layer)", adapted, str(steps), "-")
    table = markdown(["model", "trained parameters", "healing steps", "mean cosine to dense embeddings",
                      "retrieval top-1", "MRR", "distillation loss (calibration)", "linear params vs dense"], rows)
    print(table)
    print(f"merge_and_unload: max |output change| {merge_gap:.1e}")
    best_factors = max(float(rows[2][3]), float(rows[3][3]))
    better = "LoRA" if float(rows[4][3]) > best_factors else "the factors"
    if recording:
        record("adapters: healing a 50% MiniLM, LoRA adapter vs the factors, equal time", table,
               f"Bundled all-MiniLM-L6-v2, its 37 linears compressed by `lowrank.compress(model, ratio=0.5)` "
               f"(plain SVD, uniform share). Healing towards the dense model's token states on "
               f"{len(texts)} calibration paragraphs ({len(batches)} batches, `minilm_task.calibration_texts`), "
               f"{seconds:g} s each, the time bound counting lowrank.heal's initial loss evaluation in both: the "
               "factors by `compress(..., calibration=CalibrationConfig(texts, allocation='uniform', whiten=False, "
               f"refit=False, sequential=False), heal_seconds={seconds:g})` (checked to choose the same ranks as the "
               f"plain call), and `lowrank.adapters.add(model, LoRA(rank={rank}, alpha={2 * rank}), "
               "filter_fn=<factorized layers>)` trained by the same loop (relative squared distance over real "
               "tokens, Adam, batches in turn, eval mode). Evaluation on held-out text: the "
               f"{len(pairs)} pydoc retrieval pairs of examples/minilm_task.py (queries and documents embedded; "
               "cosine to the dense model's embeddings, top-1 and MRR of retrieving each query's document). "
               f"Higher cosine to dense: {better}. merge_and_unload changed the outputs by at most {merge_gap:.1e}.")


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("speed", "quality", "conv", "heal", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="a smoke test of every part at tiny sizes")
    parser.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats of the speed part (default 20)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of the quality and conv parts (default 3)")
    parser.add_argument("--heal-seconds", type=float, default=None, help="healing time per arm (default 60)")
    parser.add_argument("--speed-batch", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--speed-length", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine two threads stall on each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args.memory_probe, args.speed_batch, args.speed_length)
        return
    quick = args.quick
    seeds = args.seeds or (1 if quick else 3)
    if quick:
        args.speed_batch, args.speed_length = 2, 16
    quality_cfg = {"rank": 8, "lora_lr": 3e-3, "flora_lr": 1e-2, "full_lr": 1e-4, "head_lr": 2e-3, "batch": 16,
                   "epochs": 1 if quick else 3,
                   "length": 16 if quick else 48, "test_per_class": 4 if quick else 32,
                   "train_per_class": 2 if quick else None}
    parts = ("speed", "quality", "conv", "heal") if args.part == "all" else (args.part,)
    recording = args.record and not quick
    started = time.perf_counter()
    for part in parts:
        print(f"\n=== {part} ===", flush=True)
        part_start = time.perf_counter()
        if part == "speed":
            speed_part([8] if quick else [8, 64], args.speed_batch, args.speed_length,
                       args.repeats or (2 if quick else 20), recording)
        elif part == "quality":
            quality_part(seeds, quality_cfg, recording)
        elif part == "conv":
            conv_part(seeds, [2] if quick else [2, 8], shots=10, pre_epochs=2 if quick else 15,
                      steps=5 if quick else 150, lrs=[3e-3] if quick else [1e-3, 3e-3, 1e-2], recording=recording)
        else:
            heal_part(args.heal_seconds or (2 if quick else 60), rank=8, lr=3e-3, factor_lr=1e-3,
                      n_pairs=16 if quick else None, n_calibration=16 if quick else 256, recording=recording,
                      include=["encoder.layer.0.*"] if quick else None)
        print(f"({part}: {time.perf_counter() - part_start:.0f} s)", flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
