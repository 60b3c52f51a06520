"""ln-migrate: move each norm's gamma into the linears that read it (Outlier Suppression).

``LN(x) = gamma * n(x) + beta = gamma * (n(x) + beta / gamma)``, so with ``gamma -> 1`` and
``beta -> beta / gamma`` the norm's output is divided by ``gamma`` per channel, and every linear
reading it gets ``W' = gamma[:, None] * W`` (rows are input channels). The per-channel outliers
that gamma amplifies then live in the weights, which are quantized per output channel, instead
of in the activation, which is quantized per tensor. RMSNorm has no beta; its gamma ``Mul``
stays in the graph with ones so the pattern is still recognised by later passes.

Readers of the norm output that are not linears (post-norm models add it to the residual
stream) get ``gamma`` back: a ``Mul`` by a constant folds it, anything else reads one new
``Mul(norm_out, gamma)``.

The plumbing here, "divide a norm's output channels by ``s`` and compensate in its readers",
is also what ``smoothquant`` does at norms; it imports :func:`scale_norm_output`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from tforge.compiler.calibration import attached_stats
from tforge.compiler.pass_infra import Pass, PassResult, Property, mark_provenance
from tforge.compiler.registry import register_pass
from tforge.compiler.structure import Linear, Norm, const_array, find_blocks
from tforge.errors import PassConfigError
from tforge.runtime import spill

logger = logging.getLogger(__name__)

__all__ = [
    "ConstantRewriter",
    "LnMigrate",
    "current_weight",
    "NormScaling",
    "norm_skip_reason",
    "scale_norm_output",
    "scale_stats",
]


# ----------------------------------------------------------------------------- shared plumbing


class ConstantRewriter:
    """Replace constants for some readers without touching the others; create unique names.

    Exporters merge identical initializers, so one weight or gamma may feed several nodes. A
    constant is rewritten in place only when the readers being rewritten are all of its uses;
    otherwise those readers get a new initializer and the old one stays for the rest.
    """

    def __init__(self, model: ir.Model, pass_name: str) -> None:
        self.model = model
        self.graph = model.graph
        self.pass_name = pass_name
        self._names: set[str] | None = None

    def unique_name(self, base: str) -> str:
        if self._names is None:
            names = {v.name for v in self.graph.inputs} | set(self.graph.initializers)
            for node in self.graph:
                names.update(out.name for out in node.outputs if out.name)
            self._names = {n for n in names if n}
        name, i = base, 1
        while name in self._names:
            name = f"{base}.{i}"
            i += 1
        self._names.add(name)
        return name

    def set_constant(
        self, value: ir.Value, readers: Sequence[tuple[ir.Node, int]], array: np.ndarray
    ) -> ir.Value:
        """Make each ``(node, input index)`` in ``readers`` read ``array`` instead of ``value``.

        ``array`` is cast to ``value``'s dtype. Returns the value now read.
        """
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        array = np.ascontiguousarray(np.asarray(array).astype(dtype))
        wanted = {(id(node), idx) for node, idx in readers}
        uses = {(id(use.node), use.idx) for use in value.uses()}
        exclusive = (
            value.is_initializer()
            and value.const_value is not None
            and not value.is_graph_output()
            and not value.is_graph_input()
            and uses <= wanted
        )
        if exclusive:
            # spilled to a scratch file when the model is large (compiler/spill.py)
            value.const_value = spill.tensor(self.model, array, value.name)
            value.shape = ir.Shape(array.shape)
            mark_provenance(value, self.pass_name)
            return value
        base = value.name or "const"
        new = self.add_initializer(f"{base}.{self.pass_name}", array)
        for node, idx in readers:
            node.replace_input_with(idx, new)
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and not list(value.uses()):
            self.graph.remove(producer, safe=True)
        return new

    def add_initializer(self, base: str, array: np.ndarray) -> ir.Value:
        name = self.unique_name(base)
        array = np.ascontiguousarray(array)
        new = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=spill.tensor(self.model, array, name),
        )
        self.graph.register_initializer(new)
        mark_provenance(new, self.pass_name)
        return new

    def scale_rows(self, linears: Sequence[Linear], scale: np.ndarray) -> None:
        """``W' = scale[:, None] * W`` for each linear; a weight shared among them is scaled once."""
        by_weight: dict[int, tuple[ir.Value, list[tuple[ir.Node, int]]]] = {}
        for lin in linears:
            weight = current_weight(lin)
            entry = by_weight.setdefault(id(weight), (weight, []))
            entry[1].append((lin.matmul, 1))
        for weight, readers in by_weight.values():
            w = _array(weight)
            self.set_constant(weight, readers, scale[:, None] * w)

    def scale_columns(
        self, lin: Linear, scale: np.ndarray, start: int = 0
    ) -> None:
        """Divide output columns ``start .. start+len(scale)`` of ``lin`` (weight and bias) by ``scale``."""
        stop = start + scale.shape[0]
        weight = current_weight(lin)
        w = _array(weight)
        w[:, start:stop] /= scale[None, :]
        self.set_constant(weight, [(lin.matmul, 1)], w)
        if lin.bias_add is not None:
            idx = 1 if lin.bias_add.inputs[0] is lin.matmul.outputs[0] else 0
            bias = lin.bias_add.inputs[idx]
            if bias is not None:
                b = _array(bias)
                b[start:stop] /= scale
                self.set_constant(bias, [(lin.bias_add, idx)], b)


def current_weight(lin: Linear) -> ir.Value:
    """The weight the linear's MatMul reads now (a rewrite may have given it a new initializer)."""
    weight = lin.matmul.inputs[1]
    if weight is None:  # the block map only lists MatMuls with a constant weight
        raise ValueError(f"'{lin.name}' has no weight input")
    return weight


def _array(value: ir.Value) -> np.ndarray:
    arr = const_array(value)
    if arr is None:  # callers only pass constants found by the block map
        raise ValueError(f"'{value.name}' is not a constant")
    return np.array(arr, dtype=np.float64)


def norm_skip_reason(norm: Norm) -> str | None:
    """Why channel scaling cannot be folded into this norm and its readers, or None."""
    if not norm.linears:
        return "skipped: no linear reads the norm output"
    if norm.output.is_graph_output():
        return "skipped: norm output is a graph output"
    gamma = const_array(norm.gamma)
    if gamma is None or gamma.ndim != 1 or not np.issubdtype(gamma.dtype, np.floating):
        return "skipped: gamma is not a 1-D float constant"
    if any(lin.in_features != gamma.shape[0] for lin in norm.linears):
        return "skipped: a reading linear's width differs from the norm's channels"
    if norm.beta is not None:
        beta = const_array(norm.beta)
        if beta is None or beta.shape != gamma.shape:
            return "skipped: beta is not a constant of gamma's shape"
    return None


@dataclasses.dataclass(frozen=True)
class NormScaling:
    """What :func:`scale_norm_output` did for the norm's non-linear readers."""

    folded: int  # Mul-by-constant readers whose constant absorbed the scale
    reapplied: int  # readers switched to a new Mul(norm_out, scale)


def scale_norm_output(rewriter: ConstantRewriter, norm: Norm, scale: np.ndarray) -> NormScaling:
    """Divide the norm's output channel ``j`` by ``scale[j]`` and compensate in every reader.

    gamma and beta are divided by ``scale``; linear readers get their weight rows multiplied by
    it; other readers get it back. Call :func:`norm_skip_reason` first.
    """
    pass_name = rewriter.pass_name
    scale = np.asarray(scale, np.float64)
    node = norm.node
    gamma_idx = next(i for i, v in enumerate(node.inputs) if v is norm.gamma)
    rewriter.set_constant(norm.gamma, [(node, gamma_idx)], _array(norm.gamma) / scale)
    if norm.beta is not None:
        beta_idx = next(i for i, v in enumerate(node.inputs) if v is norm.beta)
        rewriter.set_constant(norm.beta, [(node, beta_idx)], _array(norm.beta) / scale)
    rewriter.scale_rows(norm.linears, scale)

    linear_reads = {id(lin.matmul) for lin in norm.linears}
    others = [
        (use.node, use.idx)
        for use in norm.output.uses()
        if not (id(use.node) in linear_reads and use.idx == 0)
    ]
    folded = 0
    rest: list[tuple[ir.Node, int]] = []
    for reader, idx in others:
        if _fold_into_mul(rewriter, reader, idx, scale, norm.output):
            folded += 1
        else:
            rest.append((reader, idx))
    if rest:
        dtype = norm.output.dtype.numpy() if norm.output.dtype is not None else np.float32
        factor = rewriter.add_initializer(
            f"{norm.gamma.name or 'norm'}.{pass_name}.reapply", scale.astype(dtype)
        )
        mul = ir.node(
            "Mul",
            [norm.output, factor],
            name=rewriter.unique_name(f"{node.name or 'norm'}.{pass_name}.reapply"),
        )
        out = mul.outputs[0]
        out.name = rewriter.unique_name(f"{norm.output.name or 'norm_out'}.{pass_name}")
        out.shape, out.type = norm.output.shape, norm.output.type
        mark_provenance(mul, pass_name)
        rewriter.graph.insert_after(node, mul)
        for reader, idx in rest:
            reader.replace_input_with(idx, out)
    return NormScaling(folded=folded, reapplied=len(rest))


def _fold_into_mul(
    rewriter: ConstantRewriter, reader: ir.Node, idx: int, scale: np.ndarray, value: ir.Value
) -> bool:
    """``Mul(y, c)`` with a scalar or ``[C]`` constant ``c`` reading ``y / s``: ``c -> c * s``."""
    if reader.op_type != "Mul" or reader.domain not in ("", "ai.onnx") or len(reader.inputs) != 2:
        return False
    other = reader.inputs[1 - idx]
    c = const_array(other)
    if other is None or c is None or other is value:
        return False
    if c.size != 1 and c.shape != scale.shape:
        return False
    if c.size == 1 and (value.shape is None or value.shape.rank() < 1):
        return False  # a scalar would become [C]: only safe when y is known to have channels
    rewriter.set_constant(other, [(reader, 1 - idx)], c.reshape(-1).astype(np.float64) * scale)
    return True


def scale_stats(model: ir.Model, value_name: str | None, factor: np.ndarray) -> bool:
    """Update attached calibration stats of ``value_name`` to those of ``x * factor``.

    Returns False when there is nothing to update. Stats of another width are stale: they are
    dropped (a later pass then reports them missing) rather than mis-scaled.
    """
    stats = attached_stats(model)
    if stats is None or value_name is None or value_name not in stats:
        return False
    current = stats.stats[value_name]
    if current.channels != factor.shape[0]:
        logger.warning(
            "calibration stats of '%s' have %d channels, expected %d; dropping them",
            value_name, current.channels, factor.shape[0],
        )
        del stats.stats[value_name]
        return False
    stats.stats[value_name] = current.scaled(factor)
    return True


# ----------------------------------------------------------------------------- the pass


@register_pass("ln-migrate")
@dataclasses.dataclass(frozen=True)
class LnMigrate(Pass):
    """Fold each norm's gamma into the linears reading it (gamma -> 1, beta -> beta/gamma).

    ``gamma * n(x) + beta`` read by ``@ W`` equals ``(n(x) + beta / gamma) @ (gamma[:, None] * W)``;
    valid when no ``|gamma|`` is tiny (``min-abs-gamma``, checked only where there is a beta to
    divide: for RMSNorm any nonzero gamma migrates exactly). Attached calibration statistics of
    the norm outputs are rescaled by ``1 / gamma`` so a calibrated model stays calibrated.
    """

    min_abs_gamma: float = 1e-3

    requires: ClassVar = frozenset({Property.CANONICAL})
    invalidates: ClassVar = frozenset()  # attached stats are rescaled, not invalidated

    def __post_init__(self) -> None:
        # beta / gamma must stay finite, so a zero gamma is never migrated
        if not np.isfinite(self.min_abs_gamma) or self.min_abs_gamma <= 0:
            raise PassConfigError(
                f"ln-migrate: min-abs-gamma must be a finite number > 0, got {self.min_abs_gamma}"
            )

    def run(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        rows: list[dict[str, Any]] = []
        rewriter = ConstantRewriter(model, self.name)
        for norm in find_blocks(model).norms:
            reason = norm_skip_reason(norm)
            gamma = const_array(norm.gamma)
            if reason is None and gamma is not None:
                gamma = gamma.astype(np.float64)
                if np.all(gamma == 1.0):
                    reason = "skipped: gamma already 1"
                elif np.any(gamma == 0.0):
                    reason = "skipped: gamma has zero entries"
                elif norm.beta is not None and np.abs(gamma).min() < self.min_abs_gamma:
                    # only beta / gamma divides; without a beta (RMSNorm) any nonzero gamma is exact
                    reason = "skipped: |gamma| below min-abs-gamma"
            if reason is not None or gamma is None:
                reason = reason or "skipped: gamma is not a 1-D float constant"
                stats[reason] += 1
                logger.debug("%s: %s", norm.name, reason)
                continue
            done = scale_norm_output(rewriter, norm, gamma)
            scale_stats(model, norm.output.name, 1.0 / gamma)
            stats["migrated"] += 1
            if done.folded:
                stats["gamma folded into a Mul reader"] += done.folded
            if done.reapplied:
                stats["gamma re-applied for non-linear readers"] += 1
            rows.append(
                {
                    "norm": norm.name,
                    "kind": norm.kind,
                    "linears": [lin.name for lin in norm.linears],
                    "min_abs_gamma": float(np.abs(gamma).min()),
                    "max_abs_gamma": float(np.abs(gamma).max()),
                    "reapplied_for": done.reapplied + done.folded,
                }
            )
            logger.debug(
                "%s: migrated gamma (|gamma| in [%g, %g]) into %d linears",
                norm.name, np.abs(gamma).min(), np.abs(gamma).max(), len(norm.linears),
            )
        return PassResult(
            model, changed=stats["migrated"] > 0, stats=stats, details={"norms": rows}
        )
