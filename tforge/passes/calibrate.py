"""calibrate: run the model on real data and attach per-channel activation statistics.

The statistics of every linear's input (:mod:`tforge.compiler.calibration`) go to
``model.meta[STATS_KEY]``, where SmoothQuant and the int8 lowering read them. The graph itself
is not touched. Data comes from, in this order: an ``.npz`` of input arrays (``npz=``), a text
file and the model's tokenizer (``text=`` and ``tokenizer=``; the first half of the file, by
character offset, so that evaluation on the second half never sees calibration text), or the
feeds given to ``tforge.compile(..., calibration=...)``. A KV-cache graph calibrated from text
is run as it is deployed: each window is prefilled from an empty cache, then its last
``decode-steps`` tokens are decoded one a step with the cache fed back (see ``text_feeds``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from tforge.compiler import distributed
from tforge.compiler.calibration import (
    DATA_KEY,
    DEFAULT_DECODE_STEPS,
    DEFAULT_SAMPLES,
    GRAM_REQUEST_KEY,
    GRAM_TOKENS_PER_CHANNEL,
    MAX_AUTO_SAMPLES,
    STALE_STATISTICS_KEY,
    STATS_KEY,
    default_values,
    has_pipeline_data,
    npz_feeds,
    pipeline_feeds,
    text_feeds,
    until_enough,
)
from tforge.compiler.pass_infra import Pass, PassResult, Property
from tforge.compiler.registry import register_pass
from tforge.errors import PassConfigError, PreconditionError

logger = logging.getLogger(__name__)



def _widest(model: ir.Model, names: bool | set[str]) -> int:
    """The largest channel count among the values whose Gram matrices are collected.

    ``True`` means the calibrated values (the linears' inputs), not every value of the graph: an
    LLM's logits are vocabulary-wide, and sizing the sample count by them ran the maximum.
    """
    wanted = set(default_values(model)) if names is True else names
    widest = 0
    for out in [*model.graph.inputs, *(o for node in model.graph for o in node.outputs)]:
        if out.name in wanted and out.shape is not None and out.shape.rank():
            last = out.shape[-1]
            if isinstance(last, int):
                widest = max(widest, last)
    return widest


@register_pass("calibrate")
@dataclasses.dataclass(frozen=True)
class Calibrate(Pass):
    """Run the model on calibration data and attach per-channel statistics of every linear's input."""

    text: str = ""  # text file; calibration reads its first half
    tokenizer: str = ""  # folder with tokenizer.json, or a .gguf file
    npz: str = ""  # arrays named after the inputs, samples on axis 0
    # unset: 64, and more when Gram matrices are collected, until they rest on enough tokens
    # (GRAM_TOKENS_PER_CHANNEL x their width, at most MAX_AUTO_SAMPLES samples)
    samples: int | None = None
    # also accumulate E[x x^T] (C^2 floats each) of every linear input (true), of none (false), or
    # (unset) of exactly the inputs the passes after this one can use: pruning refits and
    # activation-aware SVD ask for theirs, int8 quantization asks for none
    gram: bool | None = None
    seq_len: int = 128
    # KV-cache graphs from text: the last tokens of each seq-len window decoded one a step after
    # the prefill of the others, so the statistics cover decoding too (0: prefill only)
    decode_steps: int = DEFAULT_DECODE_STEPS
    # >0: shards of the samples on this many Ray workers (tforge[ray]); the statistics are the same
    workers: int = 0
    cluster: str = ""  # a running Ray cluster (ray://HOST:PORT); default: a local one with `workers` CPUs

    requires: ClassVar = frozenset({Property.CANONICAL})
    establishes: ClassVar = frozenset({Property.CALIBRATED})
    reads_calibration_data: ClassVar = True
    collects_statistics: ClassVar = True

    def __post_init__(self) -> None:
        if self.samples is not None and self.samples < 1:
            raise PassConfigError(f"calibrate: samples must be at least 1, got {self.samples}")
        if self.seq_len < 2:
            raise PassConfigError(f"calibrate: seq-len must be at least 2, got {self.seq_len}")
        if self.decode_steps < 0:
            raise PassConfigError(f"calibrate: decode-steps must be >= 0, got {self.decode_steps}")
        if self.workers < 0:
            raise PassConfigError(f"calibrate: workers must be >= 0, got {self.workers}")
        if bool(self.text) != bool(self.tokenizer):
            given, needed = ("text", "tokenizer") if self.text else ("tokenizer", "text")
            raise PassConfigError(
                f"calibrate: {given}= is given without {needed}=; text calibration needs both "
                "(--calib-text FILE --tokenizer PATH)"
            )

    def check(self, model: ir.Model) -> None:
        if not self.npz and not self.text and not has_pipeline_data(model):
            raise PreconditionError(
                "calibrate: no calibration data; add --calib-text FILE --tokenizer PATH "
                "(a folder with tokenizer.json or a .gguf file) or --calib-npz FILE to "
                "'tforge compile', or pass calibration=[feeds] to tforge.compile"
            )

    def _feeds(self, model: ir.Model, samples: int) -> tuple[str, Iterable[Mapping[str, np.ndarray]]]:
        if self.npz:
            if self.text:
                logger.info("calibrate: both npz= and text= are given; using the .npz")
            return f"npz '{self.npz}'", npz_feeds(self.npz, model, samples=samples)
        if self.text:
            feeds = text_feeds(
                model, self.text, self.tokenizer, samples=samples, seq_len=self.seq_len,
                decode_steps=self.decode_steps,
            )
            return f"text '{self.text}'", feeds
        found = pipeline_feeds(model, samples=samples, seq_len=self.seq_len, decode_steps=self.decode_steps)
        if found is None:  # check() ran first
            raise PreconditionError("calibrate: no calibration data")
        return found

    def run(self, model: ir.Model) -> PassResult:
        gram: bool | set[str] = self.gram if self.gram is not None else set(model.meta.get(GRAM_REQUEST_KEY, ()))
        data = model.meta.get(DATA_KEY)
        explicit = self.samples is not None or (data is not None and data.samples is not None and not self.npz and not self.text)
        min_tokens = 0
        if gram and not explicit:
            # a [C, C] second moment from fewer than a few C tokens is rank-deficient, and the
            # refits and whitenings that read it fit noise (prune-ffn 25% on MiniLM: cosine 0.959
            # from 64 sentences, 0.98 from 768)
            min_tokens = GRAM_TOKENS_PER_CHANNEL * _widest(model, gram)
        samples = self.samples if self.samples is not None else DEFAULT_SAMPLES
        source, feeds = self._feeds(model, MAX_AUTO_SAMPLES if min_tokens else samples)
        if min_tokens:
            feeds = until_enough(feeds, samples, min_tokens, MAX_AUTO_SAMPLES)
            logger.info(
                "calibrate: at least %d tokens for the Gram matrices (at most %d samples)", min_tokens, MAX_AUTO_SAMPLES
            )
        logger.info("calibrate: reading %s", source)
        if gram and gram is not True:
            logger.info("calibrate: Gram matrices of %d activations, for the passes after it", len(gram))
        workers, address = distributed.pipeline_cluster(model)
        stats = distributed.calibrate(
            model, feeds, workers=self.workers or workers, address=self.cluster or address, gram=gram
        )
        model.meta[STATS_KEY] = stats
        model.meta.pop(STALE_STATISTICS_KEY, None)
        return PassResult(
            model,
            changed=False,
            stats={"activations": len(stats.stats), "samples": stats.samples},
        )
