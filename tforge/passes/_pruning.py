"""Graph plumbing shared by ``prune-heads`` and ``prune-ffn``.

Slicing a linear's output columns or input rows (weights merged between layers by the exporter
are split off first, through :class:`~tforge.passes.ln_migrate.ConstantRewriter`), adding a
bias where a compensation needs one, applying a compensation from the attached calibration
statistics, turning a pruning ratio into kept counts, and the size figures of the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from tforge.compiler import calibration
from tforge.compiler.calibration import ChannelStats, attached_stats
from tforge.compiler.pass_infra import mark_provenance
from tforge.compiler.structure import BlockMap, Linear, const_array
from tforge.passes.ln_migrate import ConstantRewriter, current_weight
from tforge.passes.math import compensation, importance

_FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)

Importance = Literal["magnitude", "activation", "obs"]
Budget = Literal["uniform", "global"]


# ----------------------------------------------------------------------------- options


def check_amount(name: str, ratio: float | None, keep: int | None, extra: int = 0) -> None:
    """Exactly one way of saying how much to remove; ``extra`` counts other ways given."""
    given = (ratio is not None) + (keep is not None) + extra
    if given != 1:
        raise ValueError(f"{name}: give exactly one of ratio=, keep=, per-layer= (got {given})")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise ValueError(f"{name}: ratio must be in [0, 1), got {ratio}")
    if keep is not None and keep < 0:
        raise ValueError(f"{name}: keep must be >= 0, got {keep}")


def check_common(name: str, max_layer_ratio: float, ridge: float) -> None:
    if not 0.0 < max_layer_ratio <= 1.0:
        raise ValueError(f"{name}: max-layer-ratio must be in (0, 1], got {max_layer_ratio}")
    if not ridge >= 0.0:
        raise ValueError(f"{name}: ridge must be >= 0, got {ridge}")


# ----------------------------------------------------------------------------- weights


def array(value: ir.Value) -> np.ndarray:
    arr = const_array(value)
    if arr is None:  # the block map only lists linears with constant weights
        raise ValueError(f"'{value.name}' is not a constant")
    return np.asarray(arr)


def bias_input(lin: Linear) -> tuple[ir.Node, int] | None:
    """(Add node, input index) of the linear's bias, or None."""
    if lin.bias_add is None:
        return None
    idx = 1 if lin.bias_add.inputs[0] is lin.matmul.outputs[0] else 0
    return lin.bias_add, idx


def linear_bias(lin: Linear) -> np.ndarray | None:
    where = bias_input(lin)
    if where is None:
        return None
    value = where[0].inputs[where[1]]
    return None if value is None else array(value)


def take_columns(rewriter: ConstantRewriter, lin: Linear, columns: np.ndarray) -> None:
    """Keep only output columns ``columns`` of ``lin`` (weight and bias); update output shapes."""
    weight = current_weight(lin)
    rewriter.set_constant(weight, [(lin.matmul, 1)], array(weight)[:, columns])
    where = bias_input(lin)
    if where is not None:
        node, idx = where
        bias = node.inputs[idx]
        if bias is not None:
            rewriter.set_constant(bias, [(node, idx)], array(bias)[columns])
    width = int(len(columns))
    set_dim(lin.matmul.outputs[0], -1, width)
    if lin.bias_add is not None:
        set_dim(lin.bias_add.outputs[0], -1, width)
    mark_provenance(lin.matmul, rewriter.pass_name)


def set_rows(rewriter: ConstantRewriter, lin: Linear, rows: np.ndarray) -> None:
    """Replace ``lin``'s weight by ``rows`` (``[k, out]``: the kept input rows, maybe refitted)."""
    weight = current_weight(lin)
    rewriter.set_constant(weight, [(lin.matmul, 1)], rows)
    mark_provenance(lin.matmul, rewriter.pass_name)


def add_to_bias(rewriter: ConstantRewriter, lin: Linear, delta: np.ndarray) -> bool:
    """Add ``delta`` to the linear's bias, creating ``Add(matmul, bias)`` when there is none.

    Returns False (nothing done) when a new bias would have to follow a graph output.
    """
    where = bias_input(lin)
    if where is not None:
        node, idx = where
        bias = node.inputs[idx]
        if bias is not None:
            rewriter.set_constant(bias, [(node, idx)], array(bias).astype(np.float64) + delta)
            return True
    out = lin.matmul.outputs[0]
    if out.is_graph_output():
        return False
    dtype = out.dtype.numpy() if out.dtype is not None else np.dtype(np.float32)
    bias = rewriter.add_initializer(f"{lin.name}.bias", np.asarray(delta, dtype))
    add = ir.node("Add", [out, bias], name=rewriter.unique_name(f"{lin.matmul.name or lin.name}.bias"))
    added = add.outputs[0]
    added.name = rewriter.unique_name(f"{out.name or lin.name}.biased")
    added.shape, added.type = out.shape, out.type
    for use in list(out.uses()):
        if use.node is not add:
            use.node.replace_input_with(use.idx, added)
    rewriter.graph.insert_after(lin.matmul, add)
    mark_provenance(add, rewriter.pass_name)
    return True


def set_dim(value: ir.Value, axis: int, size: int) -> None:
    """Set one annotated dimension of ``value``, if its shape is annotated."""
    shape = value.shape
    if shape is None or shape.rank() == 0:
        return
    dims = list(shape.dims)
    dims[axis] = size
    value.shape = ir.Shape(dims)


# ----------------------------------------------------------------------------- compensation


@dataclasses.dataclass(frozen=True)
class Compensation:
    """How the projection reading pruned channels was repaired, for the report."""

    kind: Literal["none", "bias", "refit"]
    reason: str = ""  # why a weaker kind than asked was used


def compensate_rows(
    rewriter: ConstantRewriter,
    lin: Linear,
    kept: np.ndarray,
    act: ChannelStats | None,
    *,
    enabled: bool,
    refit: bool,
    ridge: float,
) -> Compensation:
    """Slice ``lin``'s input rows to ``kept`` and repair its output from ``act``'s statistics."""
    w = array(current_weight(lin))
    channels = w.shape[0]
    removed = np.setdiff1d(np.arange(channels), kept)
    rows = w[kept]
    kind: Literal["none", "bias", "refit"] = "none"
    reason = ""
    delta = None
    if not enabled or removed.size == 0:
        pass
    elif act is None or act.count == 0 or act.channels != channels:
        reason = "no calibration statistics of the projection's input"
    elif act.sum is None:
        reason = "calibration statistics without channel sums"
    else:
        w64 = w.astype(np.float64)
        if refit and act.gram is not None:
            new_rows, delta = compensation.refit(
                w64, kept, act.second_moment, act.mean, ridge=ridge
            )
            rows = new_rows.astype(w.dtype)
            kind = "refit"
        else:
            delta = compensation.mean_shift(w64, removed, act.mean)
            kind = "bias"
            if refit:
                reason = "no Gram matrix (calibrate with gram=true)"
    set_rows(rewriter, lin, rows)
    if delta is not None and not add_to_bias(rewriter, lin, delta):
        kind, reason = "none", "the projection's output is a graph output"
        # the weight rows are refitted; without the bias change, fall back to the plain rows
        set_rows(rewriter, lin, w[kept])
    return Compensation(kind, reason)


def require_stats(model: ir.Model, pass_name: str, importance: str) -> None:
    """PreconditionError when a data-driven importance finds no (or only stale) statistics."""
    if importance != "magnitude":
        calibration.require_stats(
            model,
            f"{pass_name}: importance={importance}",
            f"add 'calibrate' right before '{pass_name}' or use importance=magnitude",
        )


def input_stats(model: ir.Model, value: ir.Value) -> ChannelStats | None:
    stats = attached_stats(model)
    return stats.get(value.name or "") if stats is not None else None


# ----------------------------------------------------------------------------- budgets


def kept_counts(
    sizes: Sequence[int],
    scores: Sequence[np.ndarray],
    *,
    ratio: float | None,
    keep: int | None,
    budget: Budget,
    max_layer_ratio: float,
    snap,
    normalize: bool = True,
) -> list[int]:
    """Kept units per layer; ``snap(layer, target)`` rounds a target to a valid count."""
    if keep is not None:
        return [min(keep, size) for size in sizes]
    if ratio is None:  # check_amount guarantees ratio or keep
        raise ValueError("kept_counts: neither ratio nor keep is given")
    if budget == "uniform":
        return [snap(i, size * (1.0 - min(ratio, max_layer_ratio))) for i, size in enumerate(sizes)]
    remove = int(round(ratio * sum(sizes)))
    targets = importance.global_keep(scores, remove, max_layer_ratio, normalize=normalize)
    return [snap(i, t) for i, t in enumerate(targets)]


# ----------------------------------------------------------------------------- report


def size_figures(model: ir.Model, block_map: BlockMap) -> dict[str, Any]:
    """Parameters, initializer bytes and FLOPs per token of the linears and attention."""
    params = 0
    nbytes = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or value.dtype not in _FLOAT_TYPES or not list(value.uses()):
            continue
        params += int(tensor.size)
        nbytes += int(tensor.nbytes)
    linear_flops = sum(2 * lin.in_features * lin.out_features for lin in block_map.linears)
    # Scores and context: 2 * 2 * heads * head_dim FLOPs per token per position attended.
    attention_flops = sum(
        4 * b.attention.num_heads * b.attention.head_dim for b in block_map.blocks if b.attention
    )
    return {
        "params": params,
        "initializer_bytes": nbytes,
        "linear_flops_per_token": linear_flops,
        "attention_flops_per_token_per_position": attention_flops,
    }


def compare_sizes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, old in before.items():
        new = after[key]
        out[key] = {"before": old, "after": new, "ratio": round(new / old, 4) if old else None}
    return out
