"""Run a model on real data and reduce its activations to per-channel statistics.

The statistics of an activation are reduced over its last axis (the channel axis a linear
contracts) as each batch arrives, so memory does not depend on the number of samples: a
:class:`ChannelStats` holds a few ``[C]`` vectors and a fixed-size histogram of ``|x|``.
The calibration pass stores a :class:`CalibrationStats` in ``model.meta[STATS_KEY]``; passes
that rescale an activation analytically (SmoothQuant, gamma migration) update it with
:meth:`ChannelStats.scaled` instead of re-running the model.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from tforge.errors import PassConfigError, PreconditionError, UnsupportedModelError
from tforge.runtime.generate import CacheLayout, cache_layout, graph_io

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_KEY",
    "FEEDS_KEY",
    "GRAM_REQUEST_KEY",
    "DEFAULT_DECODE_STEPS",
    "CacheWindow",
    "CalibrationData",
    "has_pipeline_data",
    "pipeline_feeds",
    "STATS_KEY",
    "CalibrationStats",
    "ChannelStats",
    "attached_stats",
    "calibrate_model",
    "default_values",
    "feed_tokens",
    "until_enough",
    "DEFAULT_SAMPLES",
    "GRAM_TOKENS_PER_CHANNEL",
    "MAX_AUTO_SAMPLES",
    "missing_stats_reason",
    "npz_feeds",
    "text_feeds",
]

#: Set by a pass that invalidated the statistics (see pass_infra), cleared by calibrate.
STALE_STATISTICS_KEY = "tforge.calibration_stale_after"
#: ``model.meta[STATS_KEY]`` holds the :class:`CalibrationStats` of the current graph.
STATS_KEY = "tforge.calibration"
#: ``model.meta[FEEDS_KEY]`` holds the list of input feed dicts given through the API.
FEEDS_KEY = "tforge.calibration_feeds"
#: ``model.meta[DATA_KEY]``: the pipeline's :class:`CalibrationData` (``--calib-text`` etc.).
DATA_KEY = "tforge.calibration_data"
#: ``model.meta[GRAM_REQUEST_KEY]``: value names whose E[x x^T] the passes after a ``calibrate``
#: can use; the pass manager sets it before that ``calibrate`` runs (see ``Pass.gram_wanted``).
GRAM_REQUEST_KEY = "tforge.gram_request"


@dataclasses.dataclass(frozen=True)
class CalibrationData:
    """Where a pipeline's calibration data come from: one text file with its tokenizer, or an .npz.

    Given once to the pipeline (``tforge compile --calib-text/--tokenizer/--calib-npz``, or
    ``tforge.compile(calibration=CalibrationData(...))``) and read by every pass that runs the
    model on data: ``calibrate``, and passes that measure or fit on activations. ``samples`` and
    ``seq_len``, when given, override the readers' own counts.
    """

    text: str | None = None
    tokenizer: str | None = None
    npz: str | None = None
    samples: int | None = None
    seq_len: int | None = None
    workers: int | None = None  # calibrate in shards on this many Ray workers
    cluster: str | None = None  # a running Ray cluster's address (ray://HOST:PORT); default: local

    def __post_init__(self) -> None:
        if bool(self.text) != bool(self.tokenizer):
            given, needed = ("text", "tokenizer") if self.text else ("tokenizer", "text")
            raise PassConfigError(
                f"calibration: {given}= is given without {needed}=; text calibration needs both "
                "(--calib-text FILE --tokenizer PATH)"
            )
        if self.samples is not None and self.samples < 1:
            raise PassConfigError(f"calibration: samples must be at least 1, got {self.samples}")
        if self.workers is not None and self.workers < 1:
            raise PassConfigError(f"calibration: workers must be at least 1, got {self.workers}")

    @property
    def empty(self) -> bool:
        return not (self.text or self.npz)


def has_pipeline_data(model: ir.Model) -> bool:
    """Whether the pipeline gave calibration data (a CalibrationData or API feeds)."""
    data = model.meta.get(DATA_KEY)
    return bool((data is not None and not data.empty) or model.meta.get(FEEDS_KEY))


def pipeline_feeds(
    model: ir.Model, *, samples: int, seq_len: int, decode_steps: int | None = None
) -> tuple[str, Iterable[Mapping[str, np.ndarray]]] | None:
    """The pipeline's calibration feeds (a label for logs, the feeds), or None when none were given.

    ``samples``/``seq_len`` are the reader's defaults; the pipeline's own counts win.
    ``decode_steps`` is :func:`text_feeds`' (KV-cache graphs only; default
    :data:`DEFAULT_DECODE_STEPS`).
    """
    data = model.meta.get(DATA_KEY)
    if data is not None and not data.empty:
        count = data.samples or samples
        if data.npz:
            return f"npz '{data.npz}'", npz_feeds(data.npz, model, samples=count)
        return f"text '{data.text}'", text_feeds(
            model, data.text, data.tokenizer, samples=count, seq_len=data.seq_len or seq_len,
            decode_steps=DEFAULT_DECODE_STEPS if decode_steps is None else decode_steps,
        )
    given = model.meta.get(FEEDS_KEY)
    if given:
        return "the feeds given to tforge.compile", list(given)[:samples]
    return None


_DEFAULT_BINS = 2048
#: rows buffered before they are added to a Gram matrix: one [C, rows] x [rows, C] product per
#: ~1k tokens instead of one per sample (MiniLM sentences are ~25 tokens: 4x faster calibration)
_GRAM_BATCH_ROWS = 1024


@dataclasses.dataclass
class ChannelStats:
    """Per-channel statistics of one activation over its last axis, reduced on the fly."""

    absmax: np.ndarray  # [C] float64, max |x|
    min: np.ndarray  # [C] float64
    max: np.ndarray  # [C] float64
    sum_sq: np.ndarray  # [C] float64, sum of x^2
    count: int  # rows (tokens) reduced
    tensor_hist: np.ndarray  # [bins] int64 histogram of |x|, bins uniform on [0, hist_range]
    hist_range: float
    sum: np.ndarray | None = None  # [C] float64, sum of x (means for bias compensation)
    # [C, C] float64 sum of x x^T, only where asked for (pruning refits, activation-aware SVD):
    # C^2 memory per activation, independent of the number of samples.
    gram: np.ndarray | None = None
    _gram_rows: list[np.ndarray] = dataclasses.field(default_factory=list, repr=False, compare=False)

    def flush(self) -> None:
        """Add the rows buffered for the Gram matrix (every reader of ``gram`` calls it first)."""
        if self._gram_rows and self.gram is not None:
            rows = np.concatenate(self._gram_rows)
            self.gram += rows.T @ rows
        self._gram_rows.clear()

    @property
    def channels(self) -> int:
        return int(self.absmax.shape[0])

    @property
    def mean_sq(self) -> np.ndarray:
        """Per-channel mean of x^2 (zeros before any update)."""
        if self.count == 0:
            return np.zeros_like(self.sum_sq)
        return self.sum_sq / self.count

    @property
    def mean(self) -> np.ndarray:
        """Per-channel mean of x."""
        if self.sum is None:
            raise ValueError("ChannelStats.mean: these statistics were reduced without sums")
        return self.sum / max(self.count, 1)

    @property
    def second_moment(self) -> np.ndarray:
        """E[x x^T] of shape [C, C]; needs statistics calibrated with ``gram``."""
        if self.gram is None:
            raise ValueError(
                "ChannelStats.second_moment: no Gram matrix was accumulated; calibrate with gram=true"
            )
        self.flush()
        return self.gram / max(self.count, 1)

    @classmethod
    def empty(cls, channels: int, bins: int = _DEFAULT_BINS, *, gram: bool = False) -> ChannelStats:
        if channels <= 0:
            raise ValueError(f"ChannelStats: channels must be positive, got {channels}")
        if bins <= 0 or bins % 2:
            raise ValueError(f"ChannelStats: bins must be a positive even number, got {bins}")
        return cls(
            absmax=np.zeros(channels, np.float64),
            min=np.full(channels, np.inf),
            max=np.full(channels, -np.inf),
            sum_sq=np.zeros(channels, np.float64),
            count=0,
            tensor_hist=np.zeros(bins, np.int64),
            hist_range=0.0,
            sum=np.zeros(channels, np.float64),
            gram=np.zeros((channels, channels), np.float64) if gram else None,
        )

    def update(self, x: np.ndarray) -> None:
        """Reduce ``x`` of shape ``[..., C]`` into the statistics.

        The histogram keeps its number of bins: its range is a power of two above every ``|x|``
        seen; when ``|x|`` reaches it, the range doubles (as often as needed) and pairs of
        neighbouring bins merge, so every earlier count stays in the bin that covers it exactly
        and the histogram is the same whatever order the data came in.
        """
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[-1] != self.channels:
            raise ValueError(
                f"ChannelStats.update: expected an array with last axis {self.channels}, got shape {x.shape}"
            )
        rows = x.reshape(-1, self.channels)
        if rows.shape[0] == 0:
            return
        rows64 = rows.astype(np.float64, copy=False)
        if not np.isfinite(rows64).all():
            raise ValueError("ChannelStats.update: the activation holds NaN or infinite values")
        lo = rows64.min(axis=0)
        hi = rows64.max(axis=0)
        np.minimum(self.min, lo, out=self.min)
        np.maximum(self.max, hi, out=self.max)
        np.maximum(self.absmax, np.maximum(np.abs(lo), np.abs(hi)), out=self.absmax)
        self.sum_sq += np.einsum("ij,ij->j", rows64, rows64)
        if self.sum is not None:
            self.sum += rows64.sum(axis=0)
        if self.gram is not None:
            self._gram_rows.append(rows64)
            if sum(r.shape[0] for r in self._gram_rows) >= _GRAM_BATCH_ROWS:
                self.flush()
        self.count += rows.shape[0]
        self._update_hist(np.abs(rows64))

    def _update_hist(self, absx: np.ndarray) -> None:
        top = float(absx.max())
        bins = self.tensor_hist.shape[0]
        if self.hist_range <= 0.0:
            if top == 0.0:
                # Only zeros so far: they belong in bin 0 whatever the range turns out to be.
                self.tensor_hist[0] += absx.size
                return
            # The smallest power of two above top. Ranges stay powers of two, so a bin of range
            # R/2 is exactly half a bin of range R and the result does not depend on update order.
            self.hist_range = math.ldexp(1.0, math.frexp(top)[1])
        while top >= self.hist_range:
            self._double_range()
        idx = np.minimum((absx.ravel() * (bins / self.hist_range)).astype(np.int64), bins - 1)
        self.tensor_hist += np.bincount(idx, minlength=bins)

    def _double_range(self) -> None:
        merged = self.tensor_hist.reshape(-1, 2).sum(axis=1)
        self.tensor_hist = np.concatenate([merged, np.zeros_like(merged)])
        self.hist_range *= 2.0

    @property
    def bin_width(self) -> float:
        return self.hist_range / self.tensor_hist.shape[0]

    def percentile(self, q: float) -> float:
        """Per-tensor ``|x|`` percentile ``q`` (0..100) from the histogram, to within one bin width.

        The value is that of the element of rank ``ceil(q / 100 * n)`` (NumPy's
        ``method="inverted_cdf"``), interpolated linearly inside the bin that holds it; ``q=100``
        gives the exact per-tensor max.
        """
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"ChannelStats.percentile: q must be in [0, 100], got {q}")
        total = int(self.tensor_hist.sum())
        if total == 0:
            raise ValueError("ChannelStats.percentile: no data has been reduced yet")
        if q == 100.0:
            return float(self.absmax.max())
        rank = q / 100.0 * total
        cum = np.cumsum(self.tensor_hist)
        b = int(np.searchsorted(cum, rank, side="left"))
        b = min(b, cum.shape[0] - 1)
        before = int(cum[b - 1]) if b > 0 else 0
        in_bin = int(self.tensor_hist[b])
        frac = (rank - before) / in_bin if in_bin else 0.0
        value = (b + min(max(frac, 0.0), 1.0)) * self.bin_width
        return float(min(value, self.absmax.max()))

    def scaled(self, scale: np.ndarray) -> ChannelStats:
        """Statistics of ``x * scale`` for a per-channel ``scale`` of shape ``[C]``.

        Exact for absmax, min, max and sum_sq (a negative scale swaps min and max). The
        histogram of ``|x|`` cannot be rescaled per channel, so it is rescaled by ``max|scale|``:
        every percentile read from it is an upper bound of the true one.
        """
        self.flush()
        scale = np.asarray(scale, dtype=np.float64)
        if scale.shape != (self.channels,):
            raise ValueError(
                f"ChannelStats.scaled: scale must have shape ({self.channels},), got {scale.shape}"
            )
        if not np.isfinite(scale).all():
            raise ValueError("ChannelStats.scaled: scale holds NaN or infinite values")
        a, b = self.min * scale, self.max * scale
        if self.count == 0:
            new_min, new_max = self.min.copy(), self.max.copy()
        else:
            new_min, new_max = np.minimum(a, b), np.maximum(a, b)
        top = float(np.abs(scale).max())
        return ChannelStats(
            absmax=self.absmax * np.abs(scale),
            min=new_min,
            max=new_max,
            sum_sq=self.sum_sq * scale * scale,
            count=self.count,
            tensor_hist=self.tensor_hist.copy(),
            hist_range=self.hist_range * top if top > 0 else self.hist_range,
            sum=self.sum * scale if self.sum is not None else None,
            gram=self.gram * np.outer(scale, scale) if self.gram is not None else None,
        )

    def merge(self, other: ChannelStats) -> None:
        """Fold another reduction of the same activation (same channels and bins) into this one."""
        self.flush()
        other.flush()
        if other.channels != self.channels or other.tensor_hist.shape != self.tensor_hist.shape:
            raise ValueError(
                f"ChannelStats.merge: shapes differ ({self.channels} channels, {self.tensor_hist.shape[0]} bins "
                f"vs {other.channels}, {other.tensor_hist.shape[0]})"
            )
        if other.count == 0:
            return
        np.minimum(self.min, other.min, out=self.min)
        np.maximum(self.max, other.max, out=self.max)
        np.maximum(self.absmax, other.absmax, out=self.absmax)
        self.sum_sq += other.sum_sq
        self.sum = self.sum + other.sum if self.sum is not None and other.sum is not None else None
        self.gram = self.gram + other.gram if self.gram is not None and other.gram is not None else None
        self.count += other.count
        hist, rng = other.tensor_hist.copy(), other.hist_range
        if rng > 0.0:
            if self.hist_range <= 0.0:  # self has only zeros, all in bin 0
                self.tensor_hist, self.hist_range = self.tensor_hist + hist, rng
                return
            while self.hist_range < rng:
                self._double_range()
            while rng * 2.0 <= self.hist_range * (1.0 + 1e-12):
                merged = hist.reshape(-1, 2).sum(axis=1)
                hist = np.concatenate([merged, np.zeros_like(merged)])
                rng *= 2.0
            if not math.isclose(rng, self.hist_range, rel_tol=1e-9):
                # Ranges not a power of two apart (after scaled()): re-bin by bin centres.
                bins = hist.shape[0]
                centres = (np.arange(bins) + 0.5) * (rng / bins)
                idx = np.minimum((centres * (bins / self.hist_range)).astype(np.int64), bins - 1)
                hist = np.bincount(idx, weights=hist, minlength=bins).astype(np.int64)
        self.tensor_hist += hist


@dataclasses.dataclass
class CalibrationStats:
    """The statistics of every calibrated activation, keyed by the ONNX value name."""

    stats: dict[str, ChannelStats]
    samples: int  # number of calibration feeds run

    def __getitem__(self, name: str) -> ChannelStats:
        try:
            return self.stats[name]
        except KeyError:
            raise KeyError(
                f"calibration: no statistics for activation {name!r} "
                f"(have {len(self.stats)}); re-run 'calibrate' on this model"
            ) from None

    def get(self, name: str) -> ChannelStats | None:
        return self.stats.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.stats

    def __len__(self) -> int:
        return len(self.stats)


def attached_stats(model: ir.Model) -> CalibrationStats | None:
    """The CalibrationStats attached to ``model`` by the calibrate pass, or None."""
    stats = model.meta.get(STATS_KEY)
    return stats if isinstance(stats, CalibrationStats) else None


def missing_stats_reason(model: ir.Model) -> str:
    """Why no statistics are attached, for a pass's error message: never taken, or made stale."""
    stale_after = model.meta.get(STALE_STATISTICS_KEY)
    if stale_after:
        return (
            f"the statistics 'calibrate' took were dropped because {stale_after!r} changed the graph "
            "after it (run 'calibrate' again after that pass)"
        )
    return "none are attached to this model"


def require_stats(model: ir.Model, what: str, remedy: str) -> CalibrationStats:
    """The statistics attached to ``model``; without them a PreconditionError that says why.

    The message reads ``"<what> needs calibration statistics, but <why>; <remedy>"``, e.g.
    ``what="smoothquant:"``, ``remedy="run 'calibrate' right before 'smoothquant'"``.
    """
    stats = attached_stats(model)
    if stats is None:
        raise PreconditionError(f"{what} needs calibration statistics, but {missing_stats_reason(model)}; {remedy}")
    return stats


# ----------------------------------------------------------------------------- running the model

Feed = Mapping[str, np.ndarray]
MASK_INPUT = "attention_mask"
_PROGRESS_EVERY = 16  # samples between two progress lines


class CacheWindow(dict):  # type: ignore[type-arg]
    """One calibration sample of a KV-cache graph: a prefill feed that carries the tokens after it.

    As a mapping it is the prefill's feed (``input_ids``, ``attention_mask``, ``position_ids`` of
    the window's first tokens and an empty past), so a reader that knows nothing of decoding
    (``linear-attention``'s capture, ``prepare_feeds``) runs the prefill alone. :func:`calibrate_model`
    runs the prefill, then decodes ``decode_ids`` [batch, steps] one token a step, teacher-forced,
    feeding each step's ``present`` outputs back as the next step's past (``layout`` says which).
    A dict subclass, so that it pickles as it is to Ray workers (``compiler/distributed.py``).
    """

    def __init__(self, feed: Feed, decode_ids: np.ndarray, layout: CacheLayout) -> None:
        super().__init__(feed)
        self.decode_ids = np.asarray(decode_ids)
        self.layout = layout
        if self.decode_ids.ndim != 2:
            raise ValueError(f"CacheWindow: decode ids must be [batch, steps], got shape {self.decode_ids.shape}")


def feed_tokens(feed: Feed) -> int:
    """Real tokens a sample runs: the attention mask's ones (or the ``input_ids``), plus the
    decode steps of a :class:`CacheWindow`."""
    mask = _mask_of(feed)
    count = int(mask.sum()) if mask is not None else _token_count(feed)
    if isinstance(feed, CacheWindow):
        count += int(feed.decode_ids.size)
    return count


#: samples a calibration reads when none are asked for
DEFAULT_SAMPLES = 64
#: tokens per channel of the widest Gram matrix that an unset sample count reads at least
GRAM_TOKENS_PER_CHANNEL = 16
#: the most samples an unset sample count grows to
MAX_AUTO_SAMPLES = 1024


def until_enough(
    feeds: Iterable[Mapping[str, np.ndarray]], samples: int, tokens: int, most: int
) -> Iterator[Mapping[str, np.ndarray]]:
    """At least ``samples`` feeds, then more until ``tokens`` real tokens are read (at most ``most``).

    Used by ``calibrate`` and by passes that calibrate again themselves (sequential GPTQ), so an
    unset sample count means the same everywhere."""
    seen = 0
    for i, feed in enumerate(feeds):
        if i >= most or (i >= samples and seen >= tokens):
            return
        yield feed
        seen += feed_tokens(feed)  # decode steps of a KV-cache window included


def default_values(model: ir.Model) -> list[str]:
    """The input of every linear of the block map, deduplicated, in graph order."""
    from tforge.compiler.structure import block_map

    names: dict[str, None] = {}
    for lin in block_map(model).linears:
        name = lin.input.name
        if not name:
            raise UnsupportedModelError(
                f"calibration: the input of linear '{lin.name}' has no name; run 'canonicalize' first"
            )
        names.setdefault(name, None)
    return list(names)


def calibrate_model(
    model: ir.Model,
    feeds: Iterable[Feed],
    values: Sequence[str] | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    progress_every: int = _PROGRESS_EVERY,
    optimize: bool = True,
    bins: int = _DEFAULT_BINS,
    gram: bool | Collection[str] = False,
) -> CalibrationStats:
    """Run ``model`` on every feed and reduce the named activations to :class:`ChannelStats`.

    ``values`` are ONNX value names (default: :func:`default_values`, the linears' inputs). A
    clone of the model gets exactly those values as its outputs, so ONNX Runtime computes only
    what they need, and never fuses them away: ORT's rewrites keep every graph output. Each
    output is reduced as soon as it is returned and then dropped, and ``feeds`` is consumed
    one at a time, so memory is bounded by one sample's activations whatever the number of
    samples. Where a feed has an ``attention_mask`` of shape [batch, seq], the rows of a
    [batch, seq, C] (or flattened [batch*seq, C]) activation where the mask is 0 are padding
    and are left out. ``gram`` (True for all, or a set of value names) also accumulates the
    [C, C] matrix of sums of x x^T, which least-squares refits and activation-aware SVD need.

    A :class:`CacheWindow` feed (text calibration of a KV-cache graph) is run as a prefill and
    then one run per decode step, ``present`` fed back as the past; every run's activations are
    reduced, so the statistics cover both phases. Memory stays bounded by one sample: a step's
    past and present are the only caches alive.
    """
    if progress_every <= 0:
        raise ValueError(f"calibrate_model: progress_every must be positive, got {progress_every}")
    report = progress or (lambda message: logger.info("%s", message))
    names = list(dict.fromkeys(values)) if values is not None else default_values(model)
    if not names:
        raise PreconditionError(
            "calibration: the model has no linears (MatMul with a constant 2-D weight) whose inputs "
            "could be calibrated; name the activations to calibrate explicitly"
        )
    graph_inputs = {v.name: v for v in model.graph.inputs}
    from tforge.runtime.ort import session_exposing, values_by_name  # imports onnxruntime

    by_name = values_by_name(model.graph)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise PassConfigError(
            f"calibration: no value named {', '.join(repr(n) for n in unknown[:5])} in the graph "
            f"({len(unknown)} of {len(names)} requested); use ONNX value names from 'tforge inspect --ir'"
        )
    constant = [n for n in names if by_name[n].const_value is not None]
    if constant:
        raise PassConfigError(
            f"calibration: {', '.join(repr(n) for n in constant[:5])} are constants, not activations; "
            "calibrate the values that flow from the graph inputs"
        )
    computed = [n for n in names if n not in graph_inputs]
    # The first feed says whether decode steps follow (text feeds of a cache graph); their
    # session must also return the present key/values that become the next step's past.
    stream = iter(feeds)
    first = next(stream, None)
    cache = first.layout if isinstance(first, CacheWindow) else None
    # windows without decode steps (prefill only) feed nothing back: exposing no present lets the
    # session drop every node past the requested values
    decodes = cache is not None and first.decode_ids.shape[1] > 0
    presents = [c.present for c in cache.cache if c.present not in computed] if decodes else []
    exposed = [*computed, *presents]
    session = None
    if exposed:
        session = session_exposing(model, exposed, optimize=optimize)
        logger.debug("calibration: session exposes %d activations", len(computed))

    with_gram = set(names) if gram is True else set(gram or ())
    stats: dict[str, ChannelStats] = {}
    unmasked: set[str] = set()
    samples = tokens = 0

    def reduce_run(feed: Feed, mask: np.ndarray | None) -> dict[str, Any]:
        """Reduce one run's activations; returns the present outputs (cache feeds only)."""
        for name in names:
            if name in graph_inputs:
                if name not in feed:
                    raise PassConfigError(
                        f"calibration: sample {samples} has no input {name!r}; "
                        f"it has {', '.join(feed)}"
                    )
                _reduce(stats, name, np.asarray(feed[name]), mask, unmasked, bins, name in with_gram)
        if session is None:
            return {}
        outputs = _run(session, feed, exposed, samples)
        for i, name in enumerate(computed):
            _reduce(stats, name, outputs[i], mask, unmasked, bins, name in with_gram)
            outputs[i] = None  # drop each activation as soon as it is reduced
        return dict(zip(exposed[len(computed) :], outputs[len(computed) :], strict=True))

    started = last = time.perf_counter()
    for feed in itertools.chain([first], stream) if first is not None else ():
        samples += 1
        tokens += feed_tokens(feed)
        if isinstance(feed, CacheWindow):
            if feed.layout != cache:
                raise PassConfigError(
                    f"calibration: sample {samples} decodes with another cache layout than the "
                    "first sample; give the feeds of one model"
                )
            _run_window(feed, reduce_run)
        else:
            reduce_run(feed, _mask_of(feed))
        if samples % progress_every == 0:
            now = time.perf_counter()
            report(
                f"calibration: {samples} samples, {tokens} tokens, "
                f"{progress_every / max(now - last, 1e-9):.1f} samples/s"
            )
            last = now
    if samples == 0:
        raise PassConfigError(
            "calibration: the calibration data gave no samples; give a text file with content, "
            "an .npz with at least one row, or a non-empty list of feeds"
        )
    seconds = time.perf_counter() - started
    report(
        f"calibration: {len(names)} activations from {samples} samples ({tokens} tokens) "
        f"in {seconds:.2f}s, {samples / max(seconds, 1e-9):.1f} samples/s"
    )
    for name in names:
        if name in unmasked:
            logger.warning(
                "calibration: activation %r has no [batch, seq, C] layout matching the attention "
                "mask; its statistics include padding rows",
                name,
            )
        if stats[name].count == 0:
            logger.warning(
                "calibration: activation %r only ever saw padding; its statistics are empty", name
            )
    for st in stats.values():
        st.flush()
    return CalibrationStats(stats={n: stats[n] for n in names}, samples=samples)


def _run_window(window: CacheWindow, reduce_run: Callable[[Feed, np.ndarray | None], dict[str, Any]]) -> None:
    """The prefill of a :class:`CacheWindow`, then its decode steps, each fed the last present."""
    layout = window.layout
    # The prefill's mask is all ones over its rows (windows are never padded), so it is the
    # padding mask of the activations as for any feed.
    present = reduce_run(window, _mask_of(window))
    past = int(np.asarray(window[layout.input_ids]).shape[1])
    for step in range(window.decode_ids.shape[1]):
        feed = layout.step_feeds(window.decode_ids[:, step : step + 1], past)
        feed.update({c.past: present[c.present] for c in layout.cache})
        # A step's attention mask covers past + new tokens, not the activations' rows: no mask.
        present = reduce_run(feed, None)
        past += 1


def _run(session: Any, feed: Feed, names: list[str], index: int) -> list[Any]:
    try:
        from tforge.runtime.ort import prepare_feeds

        prepared = prepare_feeds(session, feed)
    except UnsupportedModelError as e:
        raise PassConfigError(f"calibration: sample {index}: {e}") from None
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    try:
        return list(session.run(names, prepared))
    except InvalidArgument as e:
        # ORT validates feed shapes against the model's fixed dimensions: a data problem of
        # the user's (e.g. an .npz without the sample axis), not a bug; keep its first line.
        first = " ".join(str(e).split("INVALID_ARGUMENT :")[-1].split())
        raise PassConfigError(
            f"calibration: sample {index} does not fit the model's inputs ({first[:300]}); "
            "check the calibration arrays' shapes (samples on axis 0)"
        ) from None


def _mask_of(feed: Feed) -> np.ndarray | None:
    mask = feed.get(MASK_INPUT)
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.ndim != 2:
        return None
    return mask != 0


def _token_count(feed: Feed) -> int:
    ids = feed.get("input_ids")
    return int(np.asarray(ids).size) if ids is not None else 0


def _reduce(
    stats: dict[str, ChannelStats],
    name: str,
    x: np.ndarray,
    mask: np.ndarray | None,
    unmasked: set[str],
    bins: int,
    gram: bool,
) -> None:
    if x.ndim == 0:
        raise UnsupportedModelError(
            f"calibration: activation {name!r} is a scalar; per-channel statistics need a last axis"
        )
    if mask is not None and not mask.all():
        if x.ndim == 3 and x.shape[:2] == mask.shape:
            x = x[mask]
        elif x.ndim == 2 and x.shape[0] == mask.size:
            x = x[mask.reshape(-1)]
        else:
            unmasked.add(name)
    if name not in stats:
        stats[name] = ChannelStats.empty(int(x.shape[-1]), bins, gram=gram)
    try:
        stats[name].update(x)
    except ValueError as e:
        raise UnsupportedModelError(f"calibration: activation {name!r}: {e}") from None


# ----------------------------------------------------------------------------- data sources

_TEXT_INPUTS = ("input_ids", MASK_INPUT, "token_type_ids", "position_ids")
#: tokens at the end of each window of a KV-cache graph decoded one at a time after the prefill
DEFAULT_DECODE_STEPS = 8
_SENTENCE_END = re.compile(r"(?<=\s[.!?])\s+(?=\S)")
_MIN_SENTENCE_WORDS = 4


@dataclasses.dataclass(frozen=True)
class _TextLayout:
    """What a text model's inputs look like: which optional inputs exist, static dims, dtypes,
    and for a KV-cache graph its cache (read by ``runtime.generate.cache_layout``)."""

    dtypes: dict[str, np.dtype]
    batch: int
    seq: int
    static_seq: bool
    vocab: int | None
    cache: CacheLayout | None = None

    @property
    def windows(self) -> bool:
        """Decoders (no attention mask input, or a KV cache) get contiguous windows; encoders get
        sentences."""
        return MASK_INPUT not in self.dtypes or self.cache is not None


class _Tokenizer:
    """One interface over ``tokenizers.Tokenizer`` and a transformers tokenizer read from GGUF."""

    def __init__(
        self, encode: Callable[[str, bool, int | None], list[int]], pad_id: int, label: str
    ) -> None:
        self.encode = encode
        self.pad_id = pad_id
        self.label = label


def load_tokenizer(path: str | os.PathLike[str]) -> _Tokenizer:
    """A folder with ``tokenizer.json``, a ``tokenizer.json`` file, or a ``.gguf`` file."""
    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise PassConfigError(
                f"calibrate: tokenizer file '{p}' does not exist; pass an existing .gguf file"
            )
        return _gguf_tokenizer(p)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file() or file.name != "tokenizer.json":
        raise PassConfigError(
            f"calibrate: no tokenizer.json at '{p}'; pass a folder containing tokenizer.json, "
            "the tokenizer.json file itself, or a .gguf file"
        )
    import tokenizers

    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust library raises a plain Exception on malformed files
        raise PassConfigError(f"calibrate: cannot read tokenizer '{file}': {e}") from None
    pad_id = (tok.padding or {}).get("pad_id")
    if pad_id is None:
        pad_id = next((i for t in ("[PAD]", "<pad>") if (i := tok.token_to_id(t)) is not None), 0)
    tok.no_padding()

    def encode(text: str, special: bool, max_length: int | None) -> list[int]:
        if max_length is None:
            tok.no_truncation()
        else:
            tok.enable_truncation(max_length=max_length)
        return tok.encode(text, add_special_tokens=special).ids

    return _Tokenizer(encode, int(pad_id), str(file))


def _gguf_tokenizer(path: Path) -> _Tokenizer:
    # There is no hub here: make any network access by transformers fail fast.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers raises many kinds for a file it cannot read
        raise PassConfigError(
            f"calibrate: cannot read a tokenizer from '{path}': {type(e).__name__}: {e}"
        ) from None

    def encode(text: str, special: bool, max_length: int | None) -> list[int]:
        kwargs: dict[str, Any] = {"add_special_tokens": special}
        if max_length is not None:
            kwargs.update(truncation=True, max_length=max_length)
        return list(tok.encode(text, **kwargs))

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    return _Tokenizer(encode, int(pad_id), str(path))


def read_text_half(
    path: str | os.PathLike[str], half: Literal["first", "second", "all"] = "first"
) -> str:
    """The text of ``path`` with ``\\r\\n`` normalised, cut by character offset at a line boundary.

    The first half ends at the last line break before the middle character; the second half
    starts right after it, so the two never share a line.
    """
    p = Path(path)
    if not p.is_file():
        raise PassConfigError(
            f"calibrate: text file '{p}' does not exist; pass an existing file with --calib-text"
        )
    text = p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    if half == "all":
        return text
    if half not in ("first", "second"):
        raise ValueError(f"read_text_half: half must be 'first', 'second' or 'all', got {half!r}")
    split = text.rfind("\n", 0, len(text) // 2) + 1
    return text[:split] if half == "first" else text[split:]


def _text_layout(model: ir.Model, seq_len: int) -> _TextLayout:
    inputs = {v.name: v for v in model.graph.inputs if v.name not in model.graph.initializers}
    if "input_ids" not in inputs:
        raise PassConfigError(
            f"calibrate: text calibration needs an 'input_ids' input, but the model's inputs are "
            f"{', '.join(inputs)}; give the inputs in an .npz with --calib-npz"
        )
    other = [n for n in inputs if n not in _TEXT_INPUTS]
    cache = None
    if other and all(inputs[n].shape is not None and inputs[n].shape.rank() == 4 for n in other):
        # Rank-4 inputs besides the token inputs: a KV cache, which the feeds fill themselves.
        try:
            cache = cache_layout(graph_io(model))
        except UnsupportedModelError as e:
            raise PassConfigError(
                f"calibrate: the model's input(s) {', '.join(other)} look like a KV cache, but text "
                f"calibration cannot feed them ({e}); give all inputs in an .npz with --calib-npz"
            ) from None
    elif other:
        raise PassConfigError(
            f"calibrate: text calibration can feed {', '.join(_TEXT_INPUTS)} and a KV cache, but the "
            f"model also has input(s) {', '.join(other)}; give all inputs in an .npz with --calib-npz"
        )
    dtypes = {}
    for name, value in inputs.items():
        if value.dtype is None:
            raise UnsupportedModelError(
                f"calibrate: input {name!r} has no known dtype; run 'canonicalize' first"
            )
        dtypes[name] = np.dtype(value.dtype.numpy())
    dims = list(inputs["input_ids"].shape or ())
    if len(dims) not in (0, 2):
        raise UnsupportedModelError(
            f"calibrate: input 'input_ids' has shape {inputs['input_ids'].shape}; text calibration expects [batch, seq]"
        )
    batch = dims[0] if dims and isinstance(dims[0], int) else 1
    seq = dims[1] if dims and isinstance(dims[1], int) else seq_len
    static_seq = len(dims) == 2 and isinstance(dims[1], int)
    if cache is not None and static_seq:
        raise PassConfigError(
            f"calibrate: the KV-cache graph's input_ids have a fixed length of {seq} tokens, so it "
            "cannot decode one token a step; calibrate the graph before fixing its shapes, or give "
            "all inputs in an .npz with --calib-npz"
        )
    if seq != seq_len:
        logger.info(
            "calibration: input_ids has a fixed length of %d tokens; using it instead of %d",
            seq,
            seq_len,
        )
    return _TextLayout(
        dtypes=dtypes,
        batch=batch,
        seq=seq,
        static_seq=static_seq,
        vocab=_embedding_rows(inputs["input_ids"]),
        cache=cache,
    )


def _embedding_rows(ids: ir.Value) -> int | None:
    for node, index in ids.uses():
        if node.op_type == "Gather" and index == 1 and node.inputs[0] is not None:
            shape = node.inputs[0].shape
            if shape is not None and shape.rank() == 2 and isinstance(shape[0], int):
                return shape[0]
    return None


def text_feeds(
    model: ir.Model,
    text_path: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str],
    *,
    samples: int,
    seq_len: int,
    half: Literal["first", "second", "all"] = "first",
    mode: Literal["auto", "sentences", "windows"] = "auto",
    decode_steps: int = DEFAULT_DECODE_STEPS,
) -> Iterator[dict[str, np.ndarray]]:
    """Feeds for a text model from real text, produced lazily (one sample in memory at a time).

    The text is cut by character offset (:func:`read_text_half`; calibration uses the first
    half). ``mode="auto"`` picks *sentences* for a model with an ``attention_mask`` input (an
    encoder): one sentence a row, with the tokenizer's special tokens, truncated to ``seq_len``
    tokens and right-padded to the longest row of the batch (padding is masked out of the
    statistics); and *windows* otherwise (a decoder): contiguous ``seq_len``-token
    windows of the running text. A fixed batch or sequence length in the model's ``input_ids``
    overrides 1 and ``seq_len``. ``token_type_ids`` are zeros and ``position_ids`` count from 0.
    Files and the tokenizer are checked now; the text is tokenized while the feeds are consumed.

    A KV-cache graph (inputs ``past_*`` [batch, kv_heads, past, head_dim] and outputs
    ``present_*``, as ``runtime.generate.cache_layout`` reads them) is calibrated as it is used:
    each ``seq_len``-token window is a :class:`CacheWindow`, whose first
    ``seq_len - decode_steps`` tokens are prefilled from an empty cache (past length 0), and whose
    last ``decode_steps`` tokens (at most ``seq_len - 1``) are then decoded one a step,
    teacher-forced, by :func:`calibrate_model`, each step's ``present`` fed back as the next
    step's past, the attention mask covering past + new tokens and the positions continuing.
    So the statistics include decode-step activations, and a window reads the same
    ``seq_len`` tokens it would in a graph without a cache; ``decode_steps=0`` is prefill only.
    """
    if samples <= 0 or seq_len <= 1:
        raise ValueError(
            f"text_feeds: samples must be >= 1 and seq_len >= 2, got {samples} and {seq_len}"
        )
    if decode_steps < 0:
        raise ValueError(f"text_feeds: decode_steps must be >= 0, got {decode_steps}")
    if mode not in ("auto", "sentences", "windows"):
        raise ValueError(f"text_feeds: mode must be 'auto', 'sentences' or 'windows', got {mode!r}")
    layout = _text_layout(model, seq_len)
    text = read_text_half(text_path, half)
    tokenizer = load_tokenizer(tokenizer_path)
    windows = layout.windows if mode == "auto" else mode == "windows"
    rows = (
        _windows(text, tokenizer, layout.seq)
        if windows
        else _sentences(text, tokenizer, layout.seq)
    )
    if layout.cache is not None and not windows:
        raise ValueError("text_feeds: a KV-cache graph is calibrated on windows, not sentences")
    steps = min(decode_steps, layout.seq - 1) if layout.cache is not None else 0
    return _batched(rows, layout, tokenizer, samples, str(text_path), steps)


def _sentences(text: str, tokenizer: _Tokenizer, seq: int) -> Iterator[list[int]]:
    for line in text.split("\n"):
        line = line.strip()
        if not line or (line.startswith("=") and line.endswith("=")):  # empty or a wikitext heading
            continue
        for sentence in _SENTENCE_END.split(line):
            if len(sentence.split()) >= _MIN_SENTENCE_WORDS:
                ids = tokenizer.encode(sentence, True, seq)
                if ids:
                    yield ids


def _windows(text: str, tokenizer: _Tokenizer, seq: int) -> Iterator[list[int]]:
    buffer: list[int] = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        buffer.extend(tokenizer.encode(line + "\n", False, None))
        while len(buffer) >= seq:
            yield buffer[:seq]
            del buffer[:seq]


def _batched(
    rows: Iterator[list[int]],
    layout: _TextLayout,
    tokenizer: _Tokenizer,
    samples: int,
    source: str,
    decode_steps: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    made = 0
    while made < samples:
        batch = list(itertools.islice(rows, layout.batch))
        if len(batch) < layout.batch:
            logger.warning(
                "calibration: '%s' gives only %d of the %d samples requested (batch %d, %d tokens)",
                source, made, samples, layout.batch, layout.seq,
            )  # fmt: skip
            return
        # A fixed sequence length is padded to; otherwise the longest row sets the width.
        width = layout.seq if layout.static_seq else max(len(row) for row in batch)
        ids = np.full((layout.batch, width), tokenizer.pad_id, dtype=np.int64)
        mask = np.zeros((layout.batch, width), dtype=np.int64)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        top = int(ids.max())
        if layout.vocab is not None and top >= layout.vocab:
            raise PassConfigError(
                f"calibrate: tokenizer {tokenizer.label} produced token id {top}, but the model's "
                f"embedding has {layout.vocab} rows; pass the tokenizer that belongs to this model"
            )
        if layout.cache is not None:
            # Windows are never padded (every row is `width` real tokens); see text_feeds.
            prefill = width - decode_steps
            made += 1
            yield CacheWindow(layout.cache.prefill_feeds(ids[:, :prefill]), ids[:, prefill:], layout.cache)
            continue
        feed = {"input_ids": ids.astype(layout.dtypes["input_ids"], copy=False)}
        if MASK_INPUT in layout.dtypes:
            feed[MASK_INPUT] = mask.astype(layout.dtypes[MASK_INPUT], copy=False)
        if "token_type_ids" in layout.dtypes:
            feed["token_type_ids"] = np.zeros_like(ids, dtype=layout.dtypes["token_type_ids"])
        if "position_ids" in layout.dtypes:
            positions = np.broadcast_to(np.arange(width), ids.shape)
            feed["position_ids"] = positions.astype(layout.dtypes["position_ids"])
        made += 1
        yield feed


def npz_feeds(
    path: str | os.PathLike[str], model: ir.Model | None = None, *, samples: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Feeds from an ``.npz`` whose arrays are named after the model's inputs, samples on axis 0.

    Sample ``i`` is ``array[i]`` for every array; when ``model`` is given and ``array[i]`` has
    one axis fewer than the input, a batch axis of 1 is added (so an ``[N, seq]`` array feeds an
    ``input_ids`` of shape [batch, seq]). With ``model``, the names must match its inputs exactly.
    """
    p = Path(path)
    if not p.is_file():
        raise PassConfigError(
            f"calibrate: .npz file '{p}' does not exist; pass an existing file with --calib-npz"
        )
    try:
        with np.load(p, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError) as e:
        raise PassConfigError(f"calibrate: cannot read '{p}' as an .npz archive: {e}") from None
    if not arrays:
        raise PassConfigError(f"calibrate: '{p}' holds no arrays; save one array per model input")
    ranks: dict[str, int] = {}
    if model is not None:
        inputs = {v.name: v for v in model.graph.inputs if v.name not in model.graph.initializers}
        missing = [n for n in inputs if n not in arrays]
        extra = [n for n in arrays if n not in inputs]
        if missing or extra:
            raise PassConfigError(
                f"calibrate: '{p}' does not match the model's inputs: missing {missing}, unknown {extra} "
                f"(inputs are {list(inputs)}); save one array per input, named after it"
            )
        ranks = {n: v.shape.rank() for n, v in inputs.items() if v.shape is not None}
    lengths = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1:
        raise PassConfigError(
            f"calibrate: arrays in '{p}' must share their first axis (the sample axis), got "
            + ", ".join(f"{k}: {a.shape}" for k, a in arrays.items())
        )
    count = next(iter(lengths.values()))
    if samples is not None:
        count = min(count, samples)

    def feeds() -> Iterator[dict[str, np.ndarray]]:
        for i in range(count):
            feed = {}
            for name, array in arrays.items():
                row = array[i]
                if name in ranks and row.ndim == ranks[name] - 1:
                    row = row[np.newaxis]
                feed[name] = row
            yield feed

    return feeds()
