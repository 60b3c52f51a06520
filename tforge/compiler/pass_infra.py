"""The pass contract: one frozen dataclass of options per pass, declared properties, a result with stats.

A pass is built on ``onnx_ir.passes.InPlacePass``: it mutates the model it is given and returns
that same model in a :class:`PassResult`. What a pass needs and what it breaks are declared as
:class:`Property` sets so that the pipeline can reject an impossible ordering before anything
runs (MLIR's pass preconditions, onnx_ir's ``requires``); data-dependent preconditions go in
:meth:`Pass.check`, which raises :class:`PreconditionError`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
from typing import Any, ClassVar

import onnx_ir as ir
import onnx_ir.passes

from tforge.compiler.calibration import STALE_STATISTICS_KEY, STATS_KEY
from tforge.compiler.structure import forget_block_map
from tforge.errors import (
    PassConfigError,
    PassError,
    PreconditionError,
    UnsupportedModelError,
    VerificationError,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Pass",
    "SiteStats",
    "Skip",
    "PassConfigError",
    "PassError",
    "PassResult",
    "PreconditionError",
    "Property",
    "UnsupportedModelError",
    "VerificationError",
    "PROPERTIES_METADATA_KEY",
    "PROVENANCE_KEY",
]

# Stored in the saved model so that a canonicalized model reloaded later still counts as canonical.
PROPERTIES_METADATA_KEY = "tforge.properties"
# Set on nodes and initializers a pass created or rewrote; the IR printer shows it as `// pass`.
PROVENANCE_KEY = "tforge.pass"


class Property(enum.Enum):
    """Facts about a model that passes establish, rely on and invalidate."""

    CANONICAL = "canonical"  # folded constants, fused norms, no dead code: the block map can read it
    STATIC_SHAPES = "static-shapes"  # every graph input has fixed dimensions
    CALIBRATED = "calibrated"  # activation statistics for the current graph are attached
    QUANTIZED = "quantized"  # linears are lowered to int8 (Q/DQ or integer ops)

    def __str__(self) -> str:
        return self.value


class Skip(Exception):  # noqa: N818 - it is a decision, not an error
    """A site a pass leaves alone: why, and the node or value it concerns.

    Raised by analyses and pass code that finds a site it cannot rewrite, caught by the pass's
    loop over sites and recorded with :meth:`SiteStats.skip`: counted under ``"skipped: <reason>"``
    as a statistic, and listed per site in the report and by ``tforge compile --explain``.
    """

    def __init__(
        self, reason: str, at: ir.Node | ir.Value | str | None = None, *, blocked: bool = True
    ) -> None:
        self.reason = reason.removeprefix("skipped: ")
        self.at = _label(at)
        # blocked: the pass could not rewrite the site (vs. nothing to do there: already done,
        # excluded by an option, left out by a budget); --strict fails only on blocked sites
        self.blocked = blocked
        super().__init__(self.reason)

    @property
    def key(self) -> str:
        """The statistics key: ``"skipped: <reason>"``."""
        return f"skipped: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "reason": self.reason, "blocked": self.blocked}


def _label(at: ir.Node | ir.Value | str | None) -> str:
    if at is None:
        return ""
    if isinstance(at, str):
        return at
    if isinstance(at, ir.Node):
        return f"{at.op_type} '{at.name}'"
    return f"'{at.name}'"


class SiteStats(collections.Counter):
    """A pass's statistics (counts by outcome) and the list of every site it skipped, with why."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skips: list[Skip] = []

    def skip(
        self,
        why: Skip | str,
        at: ir.Node | ir.Value | str | None = None,
        count: int = 1,
        *,
        blocked: bool = True,
    ) -> None:
        """Record a skipped site (``count`` sites, e.g. every linear reading one input)."""
        skip = why if isinstance(why, Skip) else Skip(why, at, blocked=blocked)
        self[skip.key] += count
        self.skips.append(skip)

    @property
    def skipped(self) -> int:
        return sum(v for k, v in self.items() if k.startswith("skipped"))


class PassResult(onnx_ir.passes.PassResult):
    """What a pass did: the (same) model, whether anything changed, and counts of what and why.

    ``stats`` counts sites by outcome (``{"migrated": 12, "skipped: |gamma| below min": 1}``);
    ``details`` carries per-layer figures for reports (JSON-serialisable values only);
    ``skips`` every skipped site with its reason (taken from ``stats`` when it is a SiteStats).
    """

    def __init__(
        self,
        model: ir.Model,
        changed: bool,
        stats: collections.Counter[str] | dict[str, int] | None = None,
        details: dict[str, Any] | None = None,
        skips: list[Skip] | None = None,
    ) -> None:
        super().__init__(model=model, modified=changed)
        self.stats: collections.Counter[str] = collections.Counter(stats or {})
        self.details: dict[str, Any] = dict(details or {})
        self.skips: list[Skip] = list(skips if skips is not None else getattr(stats, "skips", []))

    @property
    def changed(self) -> bool:
        return self.modified


class Pass(onnx_ir.passes.InPlacePass):
    """Base class of every tforge pass.

    Subclasses are frozen dataclasses whose fields are the pass's options, registered with
    ``@register_pass("kebab-name")``, which sets :attr:`name`. They implement :meth:`run`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    requires: ClassVar[frozenset[Property]] = frozenset()  # type: ignore[assignment]
    establishes: ClassVar[frozenset[Property]] = frozenset()
    invalidates: ClassVar[frozenset[Property]] = frozenset()

    def run(self, model: ir.Model) -> PassResult:
        raise NotImplementedError

    #: True for passes that run the model on the pipeline's calibration data (``calibrate``, and
    #: passes that measure or fit on activations): the CLI's --calib-* flags need one of them.
    reads_calibration_data: ClassVar[bool] = False
    #: True for a pass that collects calibration statistics (``calibrate``): before it runs, the
    #: pass manager asks the passes after it which Gram matrices they can use (``gram_wanted``).
    collects_statistics: ClassVar[bool] = False

    def check(self, model: ir.Model) -> None:
        """Raise PreconditionError when this model cannot be handled by the pass."""
        del model

    def gram_wanted(self, model: ir.Model) -> set[str]:
        """Names of the values whose second moment ``E[x x^T]`` this pass would use on ``model``.

        ``calibrate`` (with ``gram`` left unset) collects them for the passes after it, so that a
        pass that can do better with Gram matrices gets them without the user asking.
        """
        del model
        return set()

    # onnx_ir's entry points. ``requires`` is a property set here, so __call__ is redefined
    # instead of relying on PassBase.__call__ calling ``self.requires(model)``.
    def call(self, model: ir.Model) -> PassResult:
        return self.run(model)

    def __call__(self, model_or_result: ir.Model | onnx_ir.passes.PassResult, /) -> PassResult:
        model = (
            model_or_result.model
            if isinstance(model_or_result, onnx_ir.passes.PassResult)
            else model_or_result
        )
        self.check(model)
        had_statistics = model.meta.get(STATS_KEY) is not None
        result = self.run(model)
        if not isinstance(result, PassResult) or result.model is not model:
            raise PassError(
                f"{self.name}: run() must return PassResult of the model it was given; "
                "this is a bug in the pass"
            )
        if result.changed:
            forget_block_map(model)  # edits made without the graph editor are covered too
        if had_statistics and result.changed and Property.CALIBRATED in self.invalidates:
            _drop_stale_statistics(model, self.name)
        return result

    def spec(self) -> str:
        """The pass as it would be written in a pipeline spec, with non-default options."""
        parts = []
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            default = field.default
            if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            if value != default:
                parts.append(f"{field.name.replace('_', '-')}={format_option(value)}")
        return f"{self.name}{{{' '.join(parts)}}}" if parts else self.name


def format_option(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return ",".join(format_option(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    return str(value)


def _drop_stale_statistics(model: ir.Model, pass_name: str) -> None:
    """Detach calibration statistics a graph rewrite has made stale.

    Statistics describe the activations of the graph they were taken on; after a pass that changes
    those activations (and says so by invalidating CALIBRATED), a later pass reading them would
    quantize or prune with wrong ranges and no error. Passes whose rewrite is an exact rescaling
    (ln-migrate, smoothquant) rescale the statistics instead and do not invalidate them.
    """
    model.meta.pop(STATS_KEY, None)
    model.meta[STALE_STATISTICS_KEY] = pass_name
    logger.info("%s: calibration statistics dropped (re-run 'calibrate' if a later pass needs them)", pass_name)


def mark_provenance(obj: ir.Node | ir.Value, pass_name: str) -> None:
    """Record that ``pass_name`` created or rewrote this node or initializer (shown by the printer)."""
    obj.metadata_props[PROVENANCE_KEY] = pass_name


def model_properties(model: ir.Model) -> set[Property]:
    raw = model.metadata_props.get(PROPERTIES_METADATA_KEY, "")
    known = {p.value: p for p in Property}
    return {known[v] for v in raw.split(",") if v in known}


def set_model_properties(model: ir.Model, properties: set[Property]) -> None:
    # CALIBRATED lives only in memory (the statistics are not saved), so it is never persisted.
    persisted = sorted(p.value for p in properties if p is not Property.CALIBRATED)
    if persisted:
        model.metadata_props[PROPERTIES_METADATA_KEY] = ",".join(persisted)
    else:
        model.metadata_props.pop(PROPERTIES_METADATA_KEY, None)
