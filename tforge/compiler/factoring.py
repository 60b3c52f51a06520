"""The graph side of factorization, shared by ``svd`` and ``kronecker``.

Both replace a linear's weight by factors: they choose the same weights (:func:`eligible_groups`:
one group per weight, since exporters merge identical initializers and a shared weight is
factorised once), read the same second moments, mark their nodes the same way (so that a second
run of either pass leaves factors alone and counts what they already removed against a
``ratio``), and check the same options. The factor math is in
:mod:`tforge.passes.math.factorization`; each pass keeps its own lowering.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from tforge.compiler.calibration import CalibrationStats, attached_stats
from tforge.compiler.pass_infra import SiteStats, Skip, mark_provenance
from tforge.compiler.rewrite import GraphEditor
from tforge.compiler.structure import BlockMap, Linear, block_map, const_array
from tforge.errors import PassConfigError, PreconditionError

logger = logging.getLogger(__name__)

__all__ = [
    "FACTOR_KEY",
    "PARAMS_AFTER_KEY",
    "PARAMS_BEFORE_KEY",
    "WeightGroup",
    "already_removed",
    "check_common_options",
    "check_second_moments",
    "eligible_groups",
    "lower_low_rank",
    "mark_factor",
    "scope_inputs",
]


#: Node metadata: which factorization pass created the node ("svd" or "kronecker").
FACTOR_KEY = "tforge.factor"
#: On one node per factorised weight: its parameters before and after (decimal strings).
PARAMS_BEFORE_KEY = "tforge.factor.params_before"
PARAMS_AFTER_KEY = "tforge.factor.params_after"

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


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


    def input_mean(self, stats: CalibrationStats | None, lin: Linear) -> np.ndarray | None:
        """``E[x]`` of one reader's input, or None without channel sums."""
        cs = stats.get(lin.input.name or "") if stats is not None else None
        if cs is None or cs.count == 0 or cs.sum is None:
            return None
        return cs.mean

    def mean(self, stats: CalibrationStats | None) -> np.ndarray | None:
        """Token-weighted ``E[x]`` over the readers' inputs, or None without channel sums."""
        if stats is None:
            return None
        total, count = None, 0
        for lin in self.linears:
            cs = stats.get(lin.input.name or "")
            if cs is None or cs.count == 0 or cs.sum is None:
                return None
            total = cs.sum.copy() if total is None else total + cs.sum
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
    stats: SiteStats,
) -> tuple[list[WeightGroup], int]:
    """The weights a factorization pass may rewrite, and the parameters of all linears in scope.

    Every linear not returned is counted in ``stats`` with the reason. The parameter total
    counts each weight once, excluded ones too (they are linear parameters the budget is a
    fraction of), and factor weights made by an earlier run at their size before it.
    """
    bm = block_map(model)
    scope = _in_scope(bm, blocks_only)
    by_weight: dict[int, WeightGroup] = {}
    rejected: dict[int, Skip] = {}
    for lin in bm.linears:
        if FACTOR_KEY in lin.matmul.metadata_props:
            stats.skip("already factorised", lin.matmul, blocked=False)
            continue
        if id(lin) not in scope:
            stats.skip("not in a transformer block (blocks-only)", lin.matmul, blocked=False)
            continue
        group = by_weight.setdefault(id(lin.weight), WeightGroup(lin.weight, []))
        group.linears.append(lin)
        try:
            _check_linear(lin, exclude)
        except Skip as skip:
            rejected.setdefault(id(lin.weight), skip)
    total = sum(g.params for g in by_weight.values()) + _factored_before(model)
    groups = []
    for key, group in by_weight.items():
        try:
            if key in rejected:
                raise rejected[key]
            _check_shared(group)
        except Skip as skip:
            stats.skip(skip, count=len(group.linears))
            logger.debug("%s: %s skipped: %s", pass_name, group.name, skip)
            continue
        groups.append(group)
    return groups, total


def scope_inputs(model: ir.Model, *, exclude: Sequence[str], blocks_only: bool) -> set[str]:
    """Names of the inputs of the linears a factorization pass may rewrite (for Gram requests)."""
    bm = block_map(model)
    scope = _in_scope(bm, blocks_only)
    return {
        lin.input.name
        for lin in bm.linears
        if id(lin) in scope
        and lin.input.name
        and FACTOR_KEY not in lin.matmul.metadata_props
        and not any(pattern == lin.name or pattern in lin.name for pattern in exclude)
    }


def _check_linear(lin: Linear, exclude: Sequence[str]) -> None:
    if any(pattern == lin.name or pattern in lin.name for pattern in exclude):
        raise Skip("excluded", lin.weight, blocked=False)
    if lin.weight.dtype not in _FLOAT_TYPES:
        raise Skip("weight is not floating point", lin.weight)
    if lin.input.shape is None:
        raise Skip("input rank unknown", lin.weight)


def _check_shared(group: WeightGroup) -> None:
    """A weight read by anything but these linears' MatMuls stays, so factors would add parameters."""
    ours = {id(lin.matmul) for lin in group.linears}
    for use in group.weight.uses():
        if id(use.node) not in ours or use.idx != 1:
            raise Skip("weight is also read by other nodes", group.weight)
    if group.weight.is_graph_output() or group.weight.is_graph_input():
        raise Skip("weight is also a graph input or output", group.weight)


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


def lower_low_rank(editor: GraphEditor, group: WeightGroup, a: np.ndarray, b: np.ndarray) -> None:
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
    name = editor.pass_name
    a_value = editor.initializer(f"{base}.{name}_a", a.astype(dtype))
    b_value = editor.initializer(f"{base}.{name}_b", b.astype(dtype))
    for i, lin in enumerate(group.linears):
        x = lin.input
        first = editor.node(
            "MatMul", [x, a_value], name=f"{lin.matmul.name or base}.{name}_a",
            outputs=f"{lin.matmul.outputs[0].name or base}.{name}_rank", before=lin.matmul,
        )  # fmt: skip
        hidden = first.outputs[0]
        hidden.type = x.type
        hidden.shape = ir.Shape([*list(x.shape)[:-1], rank])  # type: ignore[union-attr]
        lin.matmul.replace_input_with(0, hidden)
        lin.matmul.replace_input_with(1, b_value)
        mark_factor(first, name)
        mark_factor(lin.matmul, name)
        if i == 0:
            first.metadata_props[PARAMS_BEFORE_KEY] = str(k * n)
            first.metadata_props[PARAMS_AFTER_KEY] = str(rank * (k + n))
    editor.drop_if_unused(group.weight)


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


def check_common_options(
    pass_name: str,
    ratio: float | None,
    exclude: Sequence[str],
    method: str,
    methods: Sequence[str] = ("plain", "activation"),
) -> None:
    """Option checks shared by the factorization passes (raise PassConfigError)."""
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise PassConfigError(f"{pass_name}: ratio must be in (0, 1), got {ratio}")
    if any(not pattern for pattern in exclude):
        raise PassConfigError(f"{pass_name}: exclude holds an empty name, which would match every linear")
    if method not in methods:
        raise PassConfigError(f"{pass_name}: method must be {' or '.join(methods)}, got {method!r}")
