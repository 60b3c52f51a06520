"""calibrate: run the model on real data and attach per-channel activation statistics.

The statistics of every linear's input (:mod:`tforge.compiler.calibration`) go to
``model.meta[STATS_KEY]``, where SmoothQuant and the int8 lowering read them. The graph itself
is not touched. Data comes from, in this order: an ``.npz`` of input arrays (``npz=``), a text
file and the model's tokenizer (``text=`` and ``tokenizer=``; the first half of the file, by
character offset, so that evaluation on the second half never sees calibration text), or the
feeds given to ``tforge.compile(..., calibration=...)``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from tforge.compiler.calibration import (
    FEEDS_KEY,
    STALE_STATISTICS_KEY,
    STATS_KEY,
    calibrate_model,
    npz_feeds,
    text_feeds,
)
from tforge.compiler.pass_infra import Pass, PassResult, Property
from tforge.compiler.registry import register_pass
from tforge.errors import PassConfigError, PreconditionError

logger = logging.getLogger(__name__)


@register_pass("calibrate")
@dataclasses.dataclass(frozen=True)
class Calibrate(Pass):
    """Run the model on calibration data and attach per-channel statistics of every linear's input."""

    text: str = ""  # text file; calibration reads its first half
    tokenizer: str = ""  # folder with tokenizer.json, or a .gguf file
    npz: str = ""  # arrays named after the inputs, samples on axis 0
    samples: int = 64
    # also accumulate E[x x^T] of every linear input (C^2 floats each): pruning refits and
    # activation-aware SVD need it, int8 calibration does not
    gram: bool = False
    seq_len: int = 128

    requires: ClassVar = frozenset({Property.CANONICAL})
    establishes: ClassVar = frozenset({Property.CALIBRATED})

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise PassConfigError(f"calibrate: samples must be at least 1, got {self.samples}")
        if self.seq_len < 2:
            raise PassConfigError(f"calibrate: seq-len must be at least 2, got {self.seq_len}")
        if bool(self.text) != bool(self.tokenizer):
            given, needed = ("text", "tokenizer") if self.text else ("tokenizer", "text")
            raise PassConfigError(
                f"calibrate: {given}= is given without {needed}=; text calibration needs both "
                "(--calib-text FILE --tokenizer PATH)"
            )

    def check(self, model: ir.Model) -> None:
        if not self.npz and not self.text and not model.meta.get(FEEDS_KEY):
            raise PreconditionError(
                "calibrate: no calibration data; add --calib-text FILE --tokenizer PATH "
                "(a folder with tokenizer.json or a .gguf file) or --calib-npz FILE to "
                "'tforge compile', or pass calibration=[feeds] to tforge.compile"
            )

    def _feeds(self, model: ir.Model) -> tuple[str, Iterable[Mapping[str, np.ndarray]]]:
        if self.npz:
            if self.text:
                logger.info("calibrate: both npz= and text= are given; using the .npz")
            return f"npz '{self.npz}'", npz_feeds(self.npz, model, samples=self.samples)
        if self.text:
            feeds = text_feeds(
                model, self.text, self.tokenizer, samples=self.samples, seq_len=self.seq_len
            )
            return f"text '{self.text}'", feeds
        given = model.meta[FEEDS_KEY]
        return "the feeds given to tforge.compile", list(given)[: self.samples]

    def run(self, model: ir.Model) -> PassResult:
        source, feeds = self._feeds(model)
        logger.info("calibrate: reading %s", source)
        stats = calibrate_model(model, feeds, gram=self.gram)
        model.meta[STATS_KEY] = stats
        model.meta.pop(STALE_STATISTICS_KEY, None)
        return PassResult(
            model,
            changed=False,
            stats={"activations": len(stats.stats), "samples": stats.samples},
        )
