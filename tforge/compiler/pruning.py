"""The graph side of structured pruning, shared by ``prune-heads`` and ``prune-ffn``.

Both passes score units, slice weights through the graph editor, and repair the projection that
read the removed units (the math of scores, budgets and compensation is in
:mod:`tforge.passes.math.importance` and :mod:`tforge.passes.math.compensation`). What they
share on the graph side is here: the option checks, the statistics a compensation may use,
applying a compensation to the projection, and the size figures of the report.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from tforge.compiler import calibration
from tforge.compiler.calibration import ChannelStats, attached_stats
from tforge.compiler.rewrite import GraphEditor, current_weight
from tforge.compiler.structure import BlockMap, Linear, const_array
from tforge.errors import PassConfigError

__all__ = [
    "Budget",
    "Compensation",
    "Importance",
    "Moments",
    "apply_row_compensation",
    "check_amount",
    "check_common",
    "compare_sizes",
    "input_moments",
    "input_stats",
    "linear_bias",
    "require_stats",
    "size_figures",
    "weight_of",
]

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
        raise PassConfigError(f"{name}: give exactly one of ratio=, keep=, per-layer= (got {given})")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise PassConfigError(f"{name}: ratio must be in [0, 1), got {ratio}")
    if keep is not None and keep < 0:
        raise PassConfigError(f"{name}: keep must be >= 0, got {keep}")


def check_common(name: str, max_layer_ratio: float, ridge: float) -> None:
    if not 0.0 < max_layer_ratio <= 1.0:
        raise PassConfigError(f"{name}: max-layer-ratio must be in (0, 1], got {max_layer_ratio}")
    if not ridge >= 0.0:
        raise PassConfigError(f"{name}: ridge must be >= 0, got {ridge}")


def require_stats(model: ir.Model, pass_name: str, importance: str) -> None:
    """PreconditionError when a data-driven importance finds no (or only stale) statistics."""
    if importance != "magnitude":
        calibration.require_stats(
            model,
            f"{pass_name}: importance={importance}",
            f"add 'calibrate' right before '{pass_name}' or use importance=magnitude",
        )


# ----------------------------------------------------------------------------- weights and statistics


def weight_of(lin: Linear) -> np.ndarray:
    """The linear's current weight as an array."""
    arr = const_array(current_weight(lin))
    if arr is None:  # the block map only lists linears with constant weights
        raise ValueError(f"'{lin.name}' has no constant weight")
    return np.asarray(arr)


def linear_bias(lin: Linear) -> np.ndarray | None:
    if lin.bias_add is None:
        return None
    idx = 1 if lin.bias_add.inputs[0] is lin.matmul.outputs[0] else 0
    arr = const_array(lin.bias_add.inputs[idx])
    return None if arr is None else np.asarray(arr)


def input_stats(model: ir.Model, value: ir.Value) -> ChannelStats | None:
    stats = attached_stats(model)
    return stats.get(value.name or "") if stats is not None else None


@dataclasses.dataclass(frozen=True)
class Moments:
    """What a compensation may use of a projection input's statistics."""

    mean: np.ndarray | None  # E[x], None without channel sums
    second_moment: np.ndarray | None  # E[x x^T], None without a Gram matrix
    missing: str = ""  # why nothing can be used


def input_moments(model: ir.Model, lin: Linear) -> Moments:
    """The moments of ``lin``'s input from the attached statistics, if they match its width."""
    act = input_stats(model, lin.input)
    if act is None or act.count == 0 or act.channels != lin.in_features:
        return Moments(None, None, "no calibration statistics of the projection's input")
    if act.sum is None:
        return Moments(None, None, "calibration statistics without channel sums")
    return Moments(act.mean, act.second_moment if act.gram is not None else None)


# ----------------------------------------------------------------------------- compensation


@dataclasses.dataclass(frozen=True)
class Compensation:
    """How the projection reading pruned channels was repaired, for the report."""

    kind: Literal["none", "bias", "refit"]
    reason: str = ""  # why a weaker kind than asked was used


def apply_row_compensation(
    editor: GraphEditor,
    lin: Linear,
    kept: np.ndarray,
    rows: np.ndarray,
    bias_delta: np.ndarray | None,
    kind: Literal["none", "bias", "refit"],
    reason: str = "",
) -> Compensation:
    """Give ``lin`` the input ``rows`` (its kept rows, maybe refitted) and add ``bias_delta``.

    A bias cannot follow a graph output; then the plain kept rows are used without compensation.
    """
    plain = weight_of(lin)[kept]
    editor.set_weight(lin, rows)
    if bias_delta is not None and not editor.add_to_bias(lin, bias_delta):
        editor.set_weight(lin, plain)  # refitted rows are only right with the bias change
        return Compensation("none", "the projection's output is a graph output")
    return Compensation(kind, reason)


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
