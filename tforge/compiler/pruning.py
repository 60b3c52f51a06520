"""The graph side of structured pruning, shared by ``prune-heads`` and ``prune-ffn``.

Both passes score units, slice weights through the graph editor, and repair the projection that
read the removed units (the math of scores, budgets and compensation is in
:mod:`tforge.passes.math.importance` and :mod:`tforge.passes.math.compensation`). What they
share on the graph side is here: the option checks, the statistics a compensation may use,
applying a compensation to the projection, and the size figures of the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import onnx
import onnx.shape_inference
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
    "shape_inference_error",
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


# ----------------------------------------------------------------------------- self-check


#: What the self-check follows back from the checked nodes: integer shape arithmetic
_INTEGER_TYPES = frozenset({ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL})
_CHECK_LIMIT = 1000  # nodes in one check
_SMALL_CONSTANT = 4096  # elements of a constant the check copies (shapes, indices); larger ones are inputs


def shape_inference_error(model: ir.Model, nodes: Sequence[ir.Node]) -> str | None:
    """What ONNX's strict shape inference (types checked, shape values propagated) finds wrong
    with ``nodes``, checked on their own: a small model of ``nodes`` and the integer shape
    arithmetic that feeds them (back to ``Shape`` of any value and to small constants), reading
    every other value as an input with its declared type and shape. Cheap (no weights are
    copied); None when nothing is wrong or the nodes cannot be checked on their own."""
    members = _with_shape_arithmetic(nodes)
    if members is None:
        return None
    produced = {id(out) for node in members for out in node.outputs}
    graph = onnx.GraphProto(name="check")
    seen: set[int] = set()
    for node in members:
        for value in node.inputs:
            if value is None or id(value) in produced or id(value) in seen:
                continue
            seen.add(id(value))
            tensor = value.const_value
            if tensor is not None and tensor.size <= _SMALL_CONSTANT:
                proto = ir.serde.serialize_tensor(tensor)
                proto.name = value.name or ""
                graph.initializer.append(proto)
            elif value.type is None:
                return None
            else:
                graph.input.append(ir.serde.serialize_value(value))
        graph.node.append(ir.serde.serialize_node(node))
    inside = {id(node) for node in members}
    for node in members:
        for out in node.outputs:
            if not out.name or out.type is None:
                continue
            last = out.is_graph_output() or not any(id(u.node) in inside for u in out.uses())
            (graph.output if last else graph.value_info).append(ir.serde.serialize_value(out))
    proto = onnx.helper.make_model(graph, opset_imports=[
        onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()
    ])  # fmt: skip
    proto.ir_version = model.ir_version
    try:
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as e:
        return str(e)
    return None


def _with_shape_arithmetic(nodes: Sequence[ir.Node]) -> list[ir.Node] | None:
    """``nodes`` and the integer shape arithmetic feeding them, in a topological order."""
    found: dict[int, ir.Node] = {id(n): n for n in nodes}
    queue = list(nodes)
    while queue:
        node = queue.pop()
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is None or id(producer) in found or not _shape_arithmetic(producer):
                continue
            found[id(producer)] = producer
            queue.append(producer)
            if len(found) > _CHECK_LIMIT:
                return None
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for n in found.values() for attr in n.attributes.values()):
        return None
    ordered: list[ir.Node] = []
    done: set[int] = set()

    def visit(node: ir.Node) -> None:
        stack = [(node, False)]
        while stack:
            current, expanded = stack.pop()
            if id(current) in done:
                continue
            if expanded:
                done.add(id(current))
                ordered.append(current)
                continue
            stack.append((current, True))
            for value in current.inputs:
                producer = value.producer() if value is not None else None
                if producer is not None and id(producer) in found and id(producer) not in done:
                    stack.append((producer, False))

    for node in found.values():
        visit(node)
    return ordered


def _shape_arithmetic(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in ("Shape", "Size", "Constant"):
        return True
    return bool(node.outputs) and all(out.dtype in _INTEGER_TYPES for out in node.outputs)


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
