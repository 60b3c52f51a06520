"""What lies on an attention block's paths, beyond what the block map records.

- :func:`value_columns`: the columns of V inside the value linear's output, when the way from
  the value projection to ``probs @ V`` only moves data and nothing else reads it, so scaling or
  permuting V's channels reaches the context and nothing else (smoothquant, rptq).
- :func:`score_chain`: how the scores become probabilities: the constant scale, the additive
  mask and the ``[batch, seq]`` padding-mask input it comes from (linear attention, and the
  attention fusions for ONNX Runtime).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import onnx_ir as ir

from tforge.compiler.ops import LAYOUT, only_reader
from tforge.compiler.pass_infra import Skip
from tforge.compiler.structure import Attention, const_array, nan_guarded_softmax, slice_bounds

__all__ = ["ScoreChain", "graph_inputs_reached", "score_chain", "value_columns"]

# Between the V projection and probs @ V: layout ops only (a Cast would change what is scaled).
_VALUE_PATH = LAYOUT - {"Cast"}


def value_columns(attn: Attention) -> tuple[int, int]:
    """(first column, width) of V inside the value linear's output, or :class:`Skip` saying why V -> O is unsafe.

    Walks from the probs @ V MatMul back to the value linear through data-movement ops only,
    each value read by nothing else. With a fused QKV linear the walk ends at the Split, whose
    output index gives V's columns. V must be ``num_kv_heads * head_dim`` wide and O read
    ``num_heads * head_dim``.
    """
    start, width = _walk_to_value_columns(attn)
    if width != attn.num_kv_heads * attn.head_dim or attn.o.in_features != attn.num_heads * attn.head_dim:
        raise Skip("v->o: head layout does not match the widths", attn.o.matmul)
    return start, width


def _walk_to_value_columns(attn: Attention) -> tuple[int, int]:
    v = attn.v
    value = attn.context_matmul.inputs[1]
    at = attn.context_matmul
    for _ in range(32):
        if value is None:
            break
        if only_reader(value) is None:
            raise Skip("v->o: the value projection's output is also read elsewhere", value.producer() or at)
        if value is v.output:
            if attn.fused_qkv:
                break
            return 0, v.out_features
        node = value.producer()
        if node is None:
            break
        if node.op_type == "Split" and attn.fused_qkv and node.inputs[0] is v.output:
            widths = _split_widths(node)
            if widths is None or only_reader(v.output) is None:
                break
            index = next(i for i, out in enumerate(node.outputs) if out is value)
            return int(sum(widths[:index])), int(widths[index])
        if node.op_type == "Slice" and attn.fused_qkv and node.inputs[0] is v.output:
            return _sliced_value_columns(v.output, node, v.out_features)
        if node.op_type not in _VALUE_PATH:
            raise Skip(f"v->o: {node.op_type} between the value projection and probs @ V", node)
        if node.op_type == "Tile" and attn.num_heads != attn.num_kv_heads:
            raise Skip("v->o: KV heads repeated by Tile (query-head order unknown)", node)
        value = node.inputs[0]
    raise Skip("v->o: the path to the value projection was not followed", at)


def _sliced_value_columns(fused: ir.Value, value_slice: ir.Node, width: int) -> tuple[int, int]:
    """V's columns when a fused QKV output is cut by Slices of its last axis (Phi-3): every reader
    of the fused output must be such a Slice, none of the others overlapping V's columns."""
    bounds = slice_bounds(value_slice, width)
    if bounds is None or fused.is_graph_output():
        raise Skip("v->o: the Slice of the fused QKV output has no constant bounds on its last axis", value_slice)
    start, end = bounds
    for use in fused.uses():
        if use.node is value_slice:
            continue
        other = slice_bounds(use.node, width) if use.idx == 0 else None
        if other is None or (other[0] < end and start < other[1]):
            raise Skip("v->o: the value columns of the fused QKV output are also read elsewhere", use.node)
    return start, end - start


def _split_widths(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        if arr is not None:
            return [int(x) for x in arr.ravel()]
    widths = []
    for out in node.outputs:
        if out.shape is None or out.shape.rank() == 0 or not isinstance(out.shape[-1], int):
            return None
        widths.append(int(out.shape[-1]))
    return widths


# ----------------------------------------------------------------------------- scores


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreChain:
    """``Softmax(scale * (Q @ K^T) + mask)``, read off the graph."""

    scale: float  # product of the scalar Mul/Div between the scores MatMul and the Softmax
    mask: ir.Value | None  # the additive mask's operand, if any
    key_mask: ir.Value | None  # the [batch, seq] graph input the mask is computed from, if one
    nan_guard: ir.Node | None  # Where(IsNaN(p), 0, p) between Softmax and context, if any


def score_chain(attn: Attention, graph: ir.Graph) -> ScoreChain:
    """How the attention's scores become its probabilities, or :class:`Skip` saying what is in the way.

    The chain from the scores ``MatMul`` to the ``Softmax`` may hold scalar ``Mul``/``Div``
    (the scale), one additive mask and casts, each read only by the chain. The mask is traced
    back to the graph inputs whose values it reads: one ``[batch, seq]`` integer or bool input
    is the key padding mask; a mask reading no input is a constant (allowed for causal
    attention only, whose mask it is).
    """
    at = attn.softmax
    axis = attn.softmax.attributes.get("axis")
    if axis is not None and axis.value not in (-1, 3):
        raise Skip("Softmax is not over the last axis", at)
    if attn.softmax.outputs[0].is_graph_output():
        raise Skip("the attention weights are a graph output", at)
    scale, mask_value = 1.0, None
    value = attn.softmax.inputs[0]
    scores_out = attn.scores_matmul.outputs[0]
    while value is not scores_out:
        node = value.producer() if value is not None else None
        if node is None:
            raise Skip("the Softmax input does not come from the scores MatMul", at)
        if len(list(value.uses())) != 1:
            raise Skip("the scores are read by more than the Softmax chain", node)
        data = [i for i in node.inputs if i is not None and const_array(i) is None]
        consts = [
            const_array(i) for i in node.inputs if i is not None and const_array(i) is not None
        ]
        if (
            node.op_type in ("Mul", "Div")
            and len(data) == 1
            and len(consts) == 1
            and consts[0].size == 1
        ):
            c = float(consts[0].reshape(()))
            if node.op_type == "Div" and node.inputs[1] is data[0]:
                raise Skip("scores divide a constant", node)
            scale *= c if node.op_type == "Mul" else 1.0 / c
            value = data[0]
        elif node.op_type == "Add" and len(data) == 2 and mask_value is None:
            on_path = [i is scores_out or _reaches(i, scores_out) for i in data]
            if sum(on_path) != 1:
                raise Skip("the additive mask depends on the scores", node)
            value, mask_value = (data[0], data[1]) if on_path[0] else (data[1], data[0])
        elif node.op_type in ("Cast", "Identity") and len(data) == 1:
            value = data[0]
        else:
            raise Skip(f"{node.op_type} between the scores and the Softmax is not supported", node)
    if len(list(scores_out.uses())) != 1:
        raise Skip("the scores are read by more than the Softmax chain", attn.scores_matmul)
    guard = None
    probs_in = attn.context_matmul.inputs[0]
    if probs_in is not attn.softmax.outputs[0]:
        guard = probs_in.producer() if probs_in is not None else None
        if guard is None or nan_guarded_softmax(guard) is not attn.softmax:
            raise Skip("ops between the Softmax and the context MatMul are not supported", attn.context_matmul)
    key_mask = None
    if mask_value is not None:
        inputs = graph_inputs_reached(mask_value, graph)
        candidates = [
            v for v in inputs
            if v.shape is not None and v.shape.rank() == 2
            and v.dtype in (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL)
        ]  # fmt: skip
        if len(inputs) == 1 and len(candidates) == 1:
            key_mask = candidates[0]
        elif inputs:
            raise Skip("the attention mask is not traced to one [batch, seq] mask input", mask_value.producer() or at)
        elif not attn.causal:
            raise Skip("a constant mask on non-causal attention", at)
    return ScoreChain(scale, mask_value, key_mask, guard)


def _reaches(value: ir.Value, target: ir.Value, limit: int = 64) -> bool:
    stack, seen = [value], 0
    while stack and seen < limit:
        v = stack.pop()
        if v is target:
            return True
        node = v.producer()
        seen += 1
        if node is not None:
            stack.extend(i for i in node.inputs if i is not None)
    return False


def graph_inputs_reached(value: ir.Value, graph: ir.Graph, *, stop: Iterable[ir.Value] = ()) -> list[ir.Value]:
    """Graph inputs whose *values* (not only shapes) ``value`` depends on, not looking past ``stop``."""
    graph_inputs = {id(v) for v in graph.inputs}
    found: dict[int, ir.Value] = {}
    stack, seen = [value], {id(v) for v in stop}
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if id(v) in graph_inputs:
            found[id(v)] = v
            continue
        node = v.producer()
        if node is None or node.op_type in ("Shape", "Size"):
            continue  # only the shape is read: no data dependence
        stack.extend(i for i in node.inputs if i is not None)
    return list(found.values())
