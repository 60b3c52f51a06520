"""Accuracy on real text: sentence embeddings for encoders, perplexity for decoders.

Pure functions over NumPy arrays and callables, so the benchmark, the demo and the tests score
every model variant the same way:

- text: :func:`read_text` (``\\r\\n`` normalised), :func:`text_half` (cut by character offset at a
  line boundary: calibration reads the first half, evaluation the second), :func:`sentences`;
- encoders: :func:`encode_sentences` (one padded batch), :func:`mean_pool` (mean over the attention
  mask, L2-normalised), :func:`sentence_embeddings` (batches through any ``run``),
  :func:`row_cosines`;
- decoders: :func:`token_windows`, :func:`nll_sum` (log-softmax in float64), :func:`perplexity`,
  :func:`window_perplexity` (a graph without cache), :func:`cache_perplexity` (a KV-cache graph,
  each window prefilled from an empty cache).

A ``run`` is any callable from a feed dict to the model's first output, e.g.
``lambda feeds: session.run(None, feeds)[0]``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tforge.errors import UnsupportedModelError

__all__ = [
    "EmbeddingAgreement",
    "sharded_embeddings",
    "sharded_perplexity",
    "agreement",
    "cache_perplexity",
    "encode_sentences",
    "mean_pool",
    "nll_sum",
    "perplexity",
    "read_text",
    "row_cosines",
    "sentence_embeddings",
    "sentences",
    "text_half",
    "token_windows",
    "tokenize_lines",
    "window_perplexity",
]

Run = Callable[[Mapping[str, np.ndarray]], np.ndarray]

# A sentence ends at " . ", " ! " or " ? " (WikiText puts spaces around punctuation).
_SENTENCE_END = re.compile(r"(?<=\s[.!?])\s+(?=\S)")


# ----------------------------------------------------------------------------- text


def read_text(path: str | os.PathLike[str]) -> str:
    """A UTF-8 text file with ``\\r\\n`` line endings normalised to ``\\n``."""
    p = Path(path)
    if not p.is_file():
        raise UnsupportedModelError(f"evaluate: text file '{p}' does not exist; pass an existing file")
    return p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")


def text_half(text: str, half: Literal["first", "second"]) -> str:
    """The first or second half of ``text`` by character offset, cut at the last line break
    before the middle so that the halves never share a line."""
    if half not in ("first", "second"):
        raise ValueError(f"text_half: half must be 'first' or 'second', got {half!r}")
    split = text.rfind("\n", 0, len(text) // 2) + 1
    return text[:split] if half == "first" else text[split:]


def sentences(text: str, count: int | None, *, min_words: int = 6, max_words: int = 64) -> list[str]:
    """The first ``count`` sentences of ``text`` with ``min_words`` to ``max_words`` words (all of
    them when ``count`` is None).

    Lines are split into sentences at ``.``, ``!`` or ``?`` preceded and followed by a space (the
    WikiText tokenization); a line is a sentence otherwise. Empty lines and WikiText headings
    (``= Title =``) are skipped; WikiText's ``@-@``-style markup is undone. Raises ValueError when
    the text holds fewer than ``count`` such sentences.
    """
    if (count is not None and count < 1) or min_words < 1 or max_words < min_words:
        raise ValueError(f"sentences: need count >= 1 and 1 <= min_words <= max_words, got {count}, {min_words}, {max_words}")
    found: list[str] = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or (line.startswith("=") and line.endswith("=")):
            continue
        for sentence in _SENTENCE_END.split(line):
            words = sentence.split()
            if min_words <= len(words) <= max_words:
                found.append(_unmarkup(" ".join(words)))
                if len(found) == count:
                    return found
    if count is None:
        return found
    raise ValueError(f"sentences: the text holds only {len(found)} sentences of {min_words}-{max_words} words, {count} asked")


def _unmarkup(sentence: str) -> str:
    return re.sub(r" @(.)@ ", r"\1", sentence)


# ----------------------------------------------------------------------------- encoders


def encode_sentences(tokenizer: Any, batch: Sequence[str], *, max_length: int = 128) -> dict[str, np.ndarray]:
    """Feeds ``input_ids``/``attention_mask`` (int64, right-padded to the longest row) for a
    ``tokenizers.Tokenizer``; rows are truncated to ``max_length`` tokens."""
    rows = [tokenizer.encode(s).ids[:max_length] for s in batch]
    if not rows:
        raise ValueError("encode_sentences: empty batch")
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``hidden [B, S, H]`` over the positions where ``mask [B, S]`` is 1, L2-normalised
    per row (the sentence-transformers embedding). Computed in float64."""
    if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"mean_pool: expected hidden [B, S, H] and mask [B, S], got {hidden.shape} and {mask.shape}")
    m = mask.astype(np.float64)[..., None]
    summed = (hidden.astype(np.float64) * m).sum(axis=1)
    pooled = summed / np.maximum(m.sum(axis=1), 1e-9)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.maximum(norms, 1e-12)


def sentence_embeddings(
    run: Run, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128
) -> np.ndarray:
    """Pooled, normalised embeddings ``[len(texts), H]`` of ``texts``, ``batch_size`` at a time."""
    out = []
    for start in range(0, len(texts), batch_size):
        feeds = encode_sentences(tokenizer, texts[start : start + batch_size], max_length=max_length)
        out.append(mean_pool(np.asarray(run(feeds)), feeds["attention_mask"]))
    return np.concatenate(out, axis=0)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (float64)."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"row_cosines: expected two [N, H] arrays of one shape, got {a.shape} and {b.shape}")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(axis=1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return num / np.maximum(den, 1e-300)


@dataclass(frozen=True)
class EmbeddingAgreement:
    """How close a variant's sentence embeddings are to the reference's."""

    mean: float
    min: float
    sentences: int


def agreement(reference: np.ndarray, candidate: np.ndarray) -> EmbeddingAgreement:
    cos = row_cosines(reference, candidate)
    return EmbeddingAgreement(float(cos.mean()), float(cos.min()), int(cos.shape[0]))


# ----------------------------------------------------------------------------- decoders


def tokenize_lines(encode: Callable[[str], Sequence[int]], text: str, limit: int) -> list[int]:
    """Token ids of ``text`` encoded line by line (each with its ``\n``, empty lines skipped),
    stopping once ``limit`` tokens are collected, so only the needed prefix is tokenized."""
    ids: list[int] = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        ids.extend(encode(line + "\n"))
        if len(ids) >= limit:
            break
    return ids


def token_windows(ids: Sequence[int] | np.ndarray, context: int, count: int) -> np.ndarray:
    """The first ``count`` non-overlapping windows of ``context`` tokens, ``[count, context]`` int64."""
    if context < 2 or count < 1:
        raise ValueError(f"token_windows: need context >= 2 and count >= 1, got {context} and {count}")
    arr = np.asarray(ids, dtype=np.int64)
    if arr.shape[0] < context * count:
        raise ValueError(
            f"token_windows: {arr.shape[0]} tokens make only {arr.shape[0] // context} windows of {context}, {count} asked"
        )
    return arr[: context * count].reshape(count, context)


def nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum over positions of ``-log softmax(logits)[target]``; ``logits [T, V]``, ``targets [T]``."""
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"nll_sum: expected logits [T, V] and targets [T], got {logits.shape} and {targets.shape}")
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(x - top).sum(axis=1)) + top[:, 0]
    picked = x[np.arange(x.shape[0]), targets]
    return float((log_z - picked).sum())


def perplexity(total_nll: float, tokens: int) -> float:
    if tokens < 1:
        raise ValueError("perplexity: no tokens were scored")
    return math.exp(total_nll / tokens)


def window_perplexity(run: Run, windows: Iterable[np.ndarray], *, input_name: str = "input_ids") -> float:
    """Perplexity of a causal LM over windows scored independently: in each window of ``T``
    tokens, the logits at positions ``0..T-2`` predict tokens ``1..T-1``."""
    total, tokens = 0.0, 0
    for window in windows:
        ids = np.asarray(window, dtype=np.int64).reshape(1, -1)
        logits = np.asarray(run({input_name: ids}))
        if logits.ndim != 3 or logits.shape[:2] != ids.shape:
            raise ValueError(f"window_perplexity: expected logits [1, {ids.shape[1]}, V], got {logits.shape}")
        total += nll_sum(logits[0, :-1], ids[0, 1:])
        tokens += ids.shape[1] - 1
    return perplexity(total, tokens)


def cache_perplexity(session: Any, windows: Iterable[np.ndarray]) -> float:
    """:func:`window_perplexity` of a KV-cache graph (an ``onnxruntime.InferenceSession``, or a
    path): each window is one prefill from an empty cache (past length 0), with the mask and
    positions the graph takes, as :func:`tforge.runtime.generate.cache_layout` reads them."""
    from tforge.runtime import generate

    session = generate.open_session(session)
    layout = generate.cache_layout(session)

    def run(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        (logits,) = session.run([layout.logits], layout.prefill_feeds(feeds["input_ids"]))
        return logits

    return window_perplexity(run, windows)


# ----------------------------------------------------------------------------- on a Ray cluster


def sharded_perplexity(
    model: Any,
    windows: np.ndarray,
    *,
    workers: int,
    address: str | None = None,
    shard_size: int = 2,
    cache: bool = False,
    input_name: str = "input_ids",
) -> float:
    """:func:`window_perplexity` (or :func:`cache_perplexity` with ``cache``) of ``model`` (an
    ``onnx_ir.Model`` or a path) over ``windows`` ``[count, T]``, in shards on a Ray cluster.

    Each task scores ``shard_size`` windows and returns its log-likelihood sum and token count;
    the sums are added in shard order, so the result does not depend on the number of workers.
    """
    from tforge.runtime import cluster

    arr = np.asarray(windows, dtype=np.int64)
    job = {"model": _payload(model), "cache": cache, "input_name": input_name}
    with cluster.cluster(workers, address):
        parts = cluster.map_shards(_perplexity_shard, job, cluster.shards_of(list(arr), shard_size), what="perplexity shard")
    return perplexity(sum(nll for nll, _ in parts), sum(tokens for _, tokens in parts))


def sharded_embeddings(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    workers: int,
    address: str | None = None,
    batch_size: int = 32,
    max_length: int = 128,
) -> np.ndarray:
    """:func:`sentence_embeddings` of ``model`` on a Ray cluster: one batch a task, in order."""
    from tforge.runtime import cluster

    batches = [
        encode_sentences(tokenizer, texts[start : start + batch_size], max_length=max_length)
        for start in range(0, len(texts), batch_size)
    ]
    job = {"model": _payload(model)}
    with cluster.cluster(workers, address):
        parts = cluster.map_shards(_embedding_shard, job, batches, what="embedding batch")
    return np.concatenate(parts, axis=0)


def _payload(model: Any) -> dict[str, Any]:
    if isinstance(model, (str, os.PathLike)):
        return {"path": os.fspath(model)}
    from tforge.compiler.distributed import model_payload

    return model_payload(model)


def _session(payload: dict[str, Any]) -> Any:
    from tforge.compiler.distributed import payload_model
    from tforge.runtime import ort as ort_runtime

    if "path" in payload and "bytes" not in payload:
        return ort_runtime.create_session(payload["path"])
    return ort_runtime.create_session(payload_model(payload))


def _perplexity_shard(job: dict[str, Any], windows: list[np.ndarray], index: int) -> tuple[float, int]:
    del index
    session = _session(job["model"])
    if job["cache"]:
        from tforge.runtime import generate

        layout = generate.cache_layout(session)

        def run(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
            (logits,) = session.run([layout.logits], layout.prefill_feeds(feeds["input_ids"]))
            return logits

    else:

        def run(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
            return session.run(None, feeds)[0]

    total, tokens = 0.0, 0
    for window in windows:
        ids = np.asarray(window, dtype=np.int64).reshape(1, -1)
        logits = np.asarray(run({job["input_name"]: ids}))
        total += nll_sum(logits[0, :-1], ids[0, 1:])
        tokens += ids.shape[1] - 1
    return total, tokens


def _embedding_shard(job: dict[str, Any], feeds: dict[str, np.ndarray], index: int) -> np.ndarray:
    del index
    session = _session(job["model"])
    return mean_pool(np.asarray(session.run(None, feeds)[0]), feeds["attention_mask"])

