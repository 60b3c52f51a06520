"""svd: replace a linear ``x @ W (+ b)`` by ``(x @ A) @ B (+ b)`` with ``W ~ A B`` of rank ``r``.

The factors come from a truncated SVD of ``W`` (``method=plain``) or of ``L^T W`` with
``L L^T = E[x x^T]`` (``method=activation``, the output error on calibration data is what is
minimised; see :mod:`tforge.passes.math.factorization`). Ranks are chosen one of three ways:

- ``rank=R``: the same rank everywhere (clipped to the weight's smaller side);
- ``energy=E``: per layer, the smallest rank keeping a fraction ``E`` of the output energy
  ``E||x W||^2`` (of ``||W||_F^2`` without calibration statistics), rounded up to ``multiple``;
- ``ratio=F``: a global budget, ``F`` of the parameters of the linears in scope removed, spent
  where the output error per removed parameter is least: greedy over the ranks that are
  multiples of ``multiple``, adding up :func:`~tforge.passes.math.factorization.budget_cost`
  (the squared relative output error) of each layer. The error is measured under the
  calibration second moment when there is one (``E[x x^T]``, or ``E[x^2]`` per channel), else
  it is the weight's Frobenius error; relative means over the layer's output energy.

A layer is factorised only when ``r (K + N) < K N`` (fewer parameters and fewer multiply-adds);
every layer left alone is counted in the statistics with the reason. The original MatMul node
stays as the second factor (its output, and the bias ``Add`` after it, are unchanged); a new
MatMul computes the rank-``r`` intermediate. Leading dimensions (batch, sequence) are untouched,
so dynamic shapes keep working. Factor weights are named ``<weight>.svd_a`` and ``<weight>.svd_b``
so that later passes can tell them apart: ``quantize`` sees both MatMuls as linears, and
``quantize{exclude=.svd_b}`` keeps the rank-``r`` intermediate (and the second product) in float.

A weight shared by several linears (exporters merge identical initializers) is factorised once;
with ``method=activation`` its second moment is the token-weighted mean of its readers'.
Factor nodes carry ``tforge.factor`` metadata, so a second run leaves them alone and counts the
parameters they already removed against ``ratio``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from tforge.compiler.calibration import CalibrationStats, attached_stats
from tforge.compiler.pass_infra import Pass, PassResult, Property, mark_provenance
from tforge.compiler.registry import register_pass
from tforge.compiler.structure import BlockMap, Linear, const_array, find_blocks
from tforge.errors import PassConfigError, PreconditionError
from tforge.passes.ln_migrate import ConstantRewriter
from tforge.passes.math import factorization as fz

logger = logging.getLogger(__name__)

__all__ = [
    "FACTOR_KEY",
    "PARAMS_AFTER_KEY",
    "PARAMS_BEFORE_KEY",
    "Svd",
    "WeightGroup",
    "already_removed",
    "eligible_groups",
    "lower_low_rank",
]

#: Node metadata: which factorization pass created the node ("svd" or "kronecker").
FACTOR_KEY = "tforge.factor"
#: On one node per factorised weight: its parameters before and after (decimal strings).
PARAMS_BEFORE_KEY = "tforge.factor.params_before"
PARAMS_AFTER_KEY = "tforge.factor.params_after"

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


# ----------------------------------------------------------------------------- shared plumbing


@dataclasses.dataclass
class WeightGroup:
    """One weight and the linears that read it (more than one when the exporter merged them)."""

    weight: ir.Value
    linears: list[Linear]

    @property
    def name(self) -> str:
        return self.linears[0].name

    @property
    def shape(self) -> tuple[int, int]:
        return self.linears[0].in_features, self.linears[0].out_features

    @property
    def params(self) -> int:
        k, n = self.shape
        return k * n

    def array(self) -> np.ndarray:
        arr = const_array(self.weight)
        if arr is None:  # the block map only lists MatMuls with a constant weight
            raise ValueError(f"'{self.name}' is not a constant")
        return np.asarray(arr, dtype=np.float64)

    def second_moment(self, stats: CalibrationStats | None, *, full: bool) -> np.ndarray | None:
        """Token-weighted mean of ``E[x x^T]`` (``full``) or of ``E[x^2]`` over the readers' inputs.

        None when some reader's input has no statistics of that kind.
        """
        if stats is None:
            return None
        total, count = None, 0
        for lin in self.linears:
            cs = stats.get(lin.input.name or "")
            if cs is None or cs.count == 0 or (full and cs.gram is None):
                return None
            part = cs.gram if full else cs.sum_sq
            total = part.copy() if total is None else total + part
            count += cs.count
        return None if total is None else total / count


def _in_scope(bm: BlockMap, blocks_only: bool) -> set[int]:
    """ids of the linears inside recognised transformer blocks (all linears without blocks_only)."""
    if not blocks_only:
        return {id(lin) for lin in bm.linears}
    ids: set[int] = set()
    for block in bm.blocks:
        if block.attention is not None:
            a = block.attention
            ids.update(id(lin) for lin in (a.q, a.k, a.v, a.o))
        if block.ffn is not None:
            f = block.ffn
            ids.update(id(lin) for lin in (f.up, f.gate, f.down) if lin is not None)
    return ids


def eligible_groups(
    model: ir.Model,
    pass_name: str,
    *,
    exclude: Sequence[str],
    blocks_only: bool,
    stats: Counter[str],
) -> tuple[list[WeightGroup], int]:
    """The weights a factorization pass may rewrite, and the parameters of all linears in scope.

    Every linear not returned is counted in ``stats`` with the reason. The parameter total
    counts each weight once, excluded ones too (they are linear parameters the budget is a
    fraction of), and factor weights made by an earlier run at their size before it.
    """
    bm = find_blocks(model)
    scope = _in_scope(bm, blocks_only)
    by_weight: dict[int, WeightGroup] = {}
    rejected: dict[int, str] = {}
    for lin in bm.linears:
        if FACTOR_KEY in lin.matmul.metadata_props:
            stats["skipped: already factorised"] += 1
            continue
        if id(lin) not in scope:
            stats["skipped: not in a transformer block (blocks-only)"] += 1
            continue
        group = by_weight.setdefault(id(lin.weight), WeightGroup(lin.weight, []))
        group.linears.append(lin)
        reason = _skip_reason(lin, exclude)
        if reason is not None:
            rejected.setdefault(id(lin.weight), reason)
    total = sum(g.params for g in by_weight.values()) + _factored_before(model)
    groups = []
    for key, group in by_weight.items():
        reason = rejected.get(key) or _shared_reason(group)
        if reason is not None:
            stats[f"skipped: {reason}"] += len(group.linears)
            logger.debug("%s: %s skipped: %s", pass_name, group.name, reason)
            continue
        groups.append(group)
    return groups, total


def _skip_reason(lin: Linear, exclude: Sequence[str]) -> str | None:
    if any(pattern == lin.name or pattern in lin.name for pattern in exclude):
        return "excluded"
    if lin.weight.dtype not in _FLOAT_TYPES:
        return "weight is not floating point"
    if lin.input.shape is None:
        return "input rank unknown"
    return None


def _shared_reason(group: WeightGroup) -> str | None:
    """A weight read by anything but these linears' MatMuls stays, so factors would add parameters."""
    ours = {id(lin.matmul) for lin in group.linears}
    for use in group.weight.uses():
        if id(use.node) not in ours or use.idx != 1:
            return "weight is also read by other nodes"
    if group.weight.is_graph_output() or group.weight.is_graph_input():
        return "weight is also a graph input or output"
    return None


def _factored_before(model: ir.Model) -> int:
    return sum(
        int(node.metadata_props[PARAMS_BEFORE_KEY])
        for node in model.graph
        if PARAMS_BEFORE_KEY in node.metadata_props
    )


def already_removed(model: ir.Model) -> int:
    """Parameters that factorization passes have already removed from this model."""
    return sum(
        int(node.metadata_props[PARAMS_BEFORE_KEY]) - int(node.metadata_props[PARAMS_AFTER_KEY])
        for node in model.graph
        if PARAMS_BEFORE_KEY in node.metadata_props
    )


def mark_factor(node: ir.Node, pass_name: str) -> None:
    node.metadata_props[FACTOR_KEY] = pass_name
    mark_provenance(node, pass_name)


def drop_if_unused(model: ir.Model, value: ir.Value) -> None:
    if not list(value.uses()) and value.name in model.graph.initializers and not value.is_graph_output():
        del model.graph.initializers[value.name]


def lower_low_rank(
    rewriter: ConstantRewriter, group: WeightGroup, a: np.ndarray, b: np.ndarray
) -> None:
    """Rewrite every linear of ``group`` as ``(x @ a) @ b``; the weight goes when unused.

    The original MatMul becomes the second product, so its output and the bias ``Add`` reading it
    stay as they were.
    """
    k, n = group.shape
    rank = a.shape[1]
    if a.shape != (k, rank) or b.shape != (rank, n):
        raise ValueError(f"lower_low_rank: factors {a.shape} x {b.shape} do not make [{k}, {n}]")
    dtype = group.weight.dtype.numpy() if group.weight.dtype is not None else np.dtype(np.float32)
    base = group.weight.name or "weight"
    name = rewriter.pass_name
    a_value = rewriter.add_initializer(f"{base}.{name}_a", a.astype(dtype))
    b_value = rewriter.add_initializer(f"{base}.{name}_b", b.astype(dtype))
    for i, lin in enumerate(group.linears):
        x = lin.input
        first = ir.node("MatMul", [x, a_value], name=rewriter.unique_name(f"{lin.matmul.name or base}.{name}_a"))
        hidden = first.outputs[0]
        hidden.name = rewriter.unique_name(f"{lin.matmul.outputs[0].name or base}.{name}_rank")
        hidden.type = x.type
        hidden.shape = ir.Shape([*list(x.shape)[:-1], rank])  # type: ignore[union-attr]
        rewriter.graph.insert_before(lin.matmul, first)
        lin.matmul.replace_input_with(0, hidden)
        lin.matmul.replace_input_with(1, b_value)
        mark_factor(first, name)
        mark_factor(lin.matmul, name)
        if i == 0:
            first.metadata_props[PARAMS_BEFORE_KEY] = str(k * n)
            first.metadata_props[PARAMS_AFTER_KEY] = str(fz.low_rank_params(k, n, rank))
    drop_if_unused(rewriter.model, group.weight)


def check_second_moments(model: ir.Model, pass_name: str, method: str) -> None:
    """``method=activation`` needs Gram matrices from ``calibrate{gram=true}``."""
    if method != "activation":
        return
    stats = attached_stats(model)
    if stats is None or not any(cs.gram is not None for cs in stats.stats.values()):
        have = "no calibration statistics" if stats is None else "statistics without Gram matrices"
        raise PreconditionError(
            f"{pass_name}: method=activation needs E[x x^T] of each linear's input, but the model "
            f"has {have}; add 'calibrate{{gram=true}}' before '{pass_name}' or use method=plain"
        )


def check_common_options(pass_name: str, ratio: float | None, exclude: Sequence[str], method: str) -> None:
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise PassConfigError(f"{pass_name}: ratio must be in (0, 1), got {ratio}")
    if any(not pattern for pattern in exclude):
        raise PassConfigError(f"{pass_name}: exclude holds an empty name, which would match every linear")
    if method not in ("plain", "activation"):
        raise PassConfigError(f"{pass_name}: method must be plain or activation, got {method!r}")


# ----------------------------------------------------------------------------- the pass


@register_pass("svd")
@dataclasses.dataclass(frozen=True)
class Svd(Pass):
    """Factorise linears as (x @ A) @ B by truncated SVD, plain or activation-aware; rank by rank, energy or global ratio."""

    rank: int | None = None
    ratio: float | None = None  # fraction of the parameters of the linears in scope to remove
    energy: float | None = None  # per layer, fraction of the output energy to keep
    method: Literal["plain", "activation"] = "plain"
    multiple: int = 8  # ranks chosen by ratio or energy are multiples of this
    exclude: tuple[str, ...] = ()  # weight names, or substrings of them, to leave alone
    blocks_only: bool = True  # only the linears of recognised attention blocks and FFNs
    ridge: float = fz.DEFAULT_RIDGE  # relative ridge on E[x x^T] before its Cholesky factor

    requires: ClassVar = frozenset({Property.CANONICAL})
    # Outputs of factorised linears move, and so do activations after them.
    invalidates: ClassVar = frozenset({Property.CALIBRATED})

    def __post_init__(self) -> None:
        given = [k for k in ("rank", "ratio", "energy") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PassConfigError(
                f"svd: give exactly one of rank=, ratio= or energy= (got {', '.join(given) or 'none'})"
            )
        if self.rank is not None and self.rank < 1:
            raise PassConfigError(f"svd: rank must be at least 1, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy < 1.0:
            raise PassConfigError(f"svd: energy must be in (0, 1), got {self.energy}")
        if self.multiple < 1:
            raise PassConfigError(f"svd: multiple must be at least 1, got {self.multiple}")
        if not self.ridge > 0.0:
            raise PassConfigError(f"svd: ridge must be > 0, got {self.ridge}")
        check_common_options("svd", self.ratio, self.exclude, self.method)

    def check(self, model: ir.Model) -> None:
        check_second_moments(model, self.name, self.method)

    def run(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        groups, total = eligible_groups(
            model, self.name, exclude=self.exclude, blocks_only=self.blocks_only, stats=stats
        )
        calibration = attached_stats(model)
        spectra: list[tuple[WeightGroup, fz.LowRankSpectrum]] = []
        for group in groups:
            moment = group.second_moment(calibration, full=True)
            if moment is None:
                moment = group.second_moment(calibration, full=False)  # errors by E[x^2] only
            if self.method == "activation" and (moment is None or moment.ndim != 2):
                stats["skipped: no E[x x^T] for its input (calibrate with gram=true)"] += len(group.linears)
                continue
            spectra.append((group, fz.low_rank_spectrum(group.array(), self.method, moment, ridge=self.ridge)))
        ranks = self._choose_ranks(model, spectra, total, stats)

        rewriter = ConstantRewriter(model, self.name)
        rows: list[dict[str, Any]] = []
        removed = 0
        for (group, spectrum), rank in zip(spectra, ranks, strict=True):
            if rank is None:
                continue
            a, b = spectrum.factors(rank)
            k, n = group.shape
            lower_low_rank(rewriter, group, a, b)
            after = fz.low_rank_params(k, n, rank)
            removed += group.params - after
            stats["factorised"] += len(group.linears)
            rows.append(
                {
                    "weight": group.name,
                    "linears": [lin.matmul.name for lin in group.linears],
                    "shape": [k, n],
                    "rank": rank,
                    "params_before": group.params,
                    "params_after": after,
                    "relative_output_error": spectrum.relative_error(rank),
                    "error_measured_on": "calibration" if spectrum.weighted else "weights",
                }
            )
            logger.debug(
                "svd: %s [%d, %d] -> rank %d, %d -> %d parameters, relative output error %.3g",
                group.name, k, n, rank, group.params, after, spectrum.relative_error(rank),
            )  # fmt: skip
        if rows:
            logger.info(
                "svd: %d weights factorised, %d of %d linear parameters removed (%.1f%%)",
                len(rows), removed, total, 100.0 * removed / max(total, 1),
            )  # fmt: skip
        removed_all = already_removed(model)  # this run's and earlier runs'
        details = {
            "layers": rows,
            "linear_params": total,
            "removed_params": removed_all,
            "reduction": removed_all / total if total else 0.0,
        }
        return PassResult(model, changed=bool(rows), stats=stats, details=details)

    def _choose_ranks(
        self,
        model: ir.Model,
        spectra: list[tuple[WeightGroup, fz.LowRankSpectrum]],
        total: int,
        stats: Counter[str],
    ) -> list[int | None]:
        """A rank per weight, or None (with the reason counted) to leave it alone."""
        ranks: list[int | None] = []
        if self.ratio is not None:
            return self._budget_ranks(model, spectra, total, stats)
        for group, spectrum in spectra:
            k, n = group.shape
            limit = fz.max_saving_rank(k, n)
            if self.rank is not None:
                rank = min(self.rank, spectrum.full_rank)
                why = f"rank {rank} saves no parameters (needs rank <= {limit})"
            else:
                rank = _round_up(spectrum.rank_for_energy(self.energy or 1.0), self.multiple)
                rank = min(rank, spectrum.full_rank)
                why = f"energy needs rank {rank}, which saves no parameters (needs rank <= {limit})"
            if rank > limit:
                stats[f"skipped: {_reason_key(why)}"] += len(group.linears)
                logger.debug("svd: %s [%d, %d] skipped: %s", group.name, k, n, why)
                ranks.append(None)
            else:
                ranks.append(rank)
        return ranks

    def _budget_ranks(
        self,
        model: ir.Model,
        spectra: list[tuple[WeightGroup, fz.LowRankSpectrum]],
        total: int,
        stats: Counter[str],
    ) -> list[int | None]:
        curves: list[list[tuple[int, float]]] = []
        options: list[list[int | None]] = []
        for group, spectrum in spectra:
            k, n = group.shape
            limit = fz.max_saving_rank(k, n)
            candidates = list(range(self.multiple, min(limit, spectrum.full_rank) + 1, self.multiple))
            curves.append(
                [(0, 0.0)]
                + [
                    (group.params - fz.low_rank_params(k, n, r), fz.budget_cost(spectrum.relative_error(r)))
                    for r in candidates
                ]
            )
            options.append([None, *candidates])
        target = int(np.ceil((self.ratio or 0.0) * total)) - already_removed(model)
        chosen = fz.allocate_budget(curves, target)
        ranks: list[int | None] = []
        for (group, _), opts, choice in zip(spectra, options, chosen, strict=True):
            if len(opts) == 1:
                stats[f"skipped: no rank that is a multiple of {self.multiple} saves parameters"] += len(group.linears)
                ranks.append(None)
            elif choice == 0:
                stats["skipped: budget met on other layers"] += len(group.linears)
                ranks.append(None)
            else:
                ranks.append(opts[choice])
        return ranks


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _reason_key(why: str) -> str:
    """The reason without its numbers, so that the statistics group layers by cause."""
    if why.startswith("rank"):
        return "rank saves no parameters"
    return "rank for the energy saves no parameters"
