"""What lies between an FFN's up (and gate) projections and its down projection.

Three rewrites act on the FFN intermediate channel by channel: smoothquant scales its channels
(into up's columns and down's rows), rptq permutes them, prune-ffn removes some. Each is exact
only when every op on the way acts on each channel separately and nothing outside the FFN
reads the intermediate values (whose channels change). :func:`ffn_intermediate` answers that
once per FFN and says what it found; each pass adds only its own condition (smoothquant:
a positively homogeneous path; rptq: no per-channel constants to permute; prune-ffn: no
reshape to rewrite).
"""

from __future__ import annotations

import dataclasses
from collections import deque

import onnx_ir as ir

from tforge.compiler.ops import is_pointwise, only_reader
from tforge.compiler.pass_infra import Skip
from tforge.compiler.structure import FFN, BlockMap, const_array, static_dims

__all__ = ["Intermediate", "check_rescalable_up_down", "ffn_intermediate"]


@dataclasses.dataclass(frozen=True, eq=False)
class Intermediate:
    """The path from up/gate to down of one FFN: every node on it acts channel by channel."""

    ffn: FFN
    nodes: list[ir.Node]  # elementwise ops, in the order found walking back from down
    reshapes: list[ir.Node]  # Reshapes that keep the channel (last) axis (GPT-2's Conv1D flattening)
    channel_constants: list[tuple[ir.Node, int]]  # (node, input) of per-channel constant operands

    @property
    def values(self) -> list[ir.Value]:
        """Every value the path produces, and the up/gate outputs it starts from."""
        produced = [out for n in (*self.nodes, *self.reshapes) for out in n.outputs]
        return [*produced, *(lin.output for lin in (self.ffn.up, self.ffn.gate) if lin is not None)]


def ffn_intermediate(ffn: FFN, block_map: BlockMap | None = None) -> Intermediate:
    """The FFN's intermediate path, or :class:`Skip` saying why it is not channel-wise and private.

    With ``block_map`` the answer is remembered for that state of the graph.
    """
    if block_map is not None:
        return block_map.derived(("ffn_intermediate", id(ffn)), lambda: _walk(ffn))
    return _walk(ffn)


def _walk(ffn: FFN) -> Intermediate:
    if ffn.fused_gate_up:
        # the intermediate's channels are two halves of one weight's columns: a rewrite of up's
        # columns would have to take the gate's matching columns and the split with it
        raise Skip("gate and up are halves of one fused linear", ffn.up.matmul)
    sources = {id(ffn.up.output)} | ({id(ffn.gate.output)} if ffn.gate is not None else set())
    width = ffn.intermediate_size
    where = ffn.down.matmul
    nodes: dict[int, ir.Node] = {}
    reshapes: dict[int, ir.Node] = {}
    constants: list[tuple[ir.Node, int]] = []
    queue = deque([ffn.down.input])
    seen: set[int] = set()
    while queue:
        value = queue.popleft()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if id(value) in sources:
            continue
        node = value.producer()
        if node is None:
            raise Skip(f"down's input does not come from up/gate only (reached '{value.name}')", where)
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx"):
            before, after = static_dims(node.inputs[0]), static_dims(node.outputs[0])
            if not before or not after or before[-1] is None or before[-1] != after[-1]:
                raise Skip("a Reshape on the intermediate changes its last axis", node)
            reshapes[id(node)] = node
            queue.append(node.inputs[0])  # type: ignore[arg-type]
            continue
        if not is_pointwise(node):
            raise Skip(f"{node.op_type} between up and down", node)
        nodes[id(node)] = node
        for idx, inp in enumerate(node.inputs):
            if inp is None:
                continue
            arr = const_array(inp)
            if arr is not None:
                if arr.ndim and arr.shape[-1] == width and width > 1:
                    constants.append((node, idx))
                elif arr.ndim and arr.shape[-1] != 1:
                    raise Skip(f"constant of shape {list(arr.shape)} between up and down", node)
                continue
            queue.append(inp)
    found = Intermediate(ffn, list(nodes.values()), list(reshapes.values()), constants)
    inside = {id(n) for n in (*found.nodes, *found.reshapes)} | {id(ffn.down.matmul)}
    for value in found.values:
        if value.is_graph_output():
            raise Skip(f"FFN activation '{value.name}' is a graph output", value.producer())
        if any(id(use.node) not in inside for use in value.uses()):
            raise Skip(f"FFN activation '{value.name}' is also read outside the FFN", value.producer())
    return found


def check_rescalable_up_down(ffn: FFN, block_map: BlockMap | None = None) -> None:
    """:class:`Skip` unless ``down``'s input is ``relu(up)`` or ``act(gate) * up``, read by nothing else.

    Scaling up's columns by ``1/s`` then scales down's input by ``1/s`` exactly, so ``s`` can
    move into down's rows: the path is linear in ``up``, or positively homogeneous (ReLU)
    without a gate. Both smoothquant and quantize-weights' AWQ move scales across this site.
    """
    if ffn.fused_gate_up:
        raise Skip("up->down: gate and up are halves of one fused linear", ffn.up.matmul)
    if ffn.gate is None and ffn.activation != "relu":
        raise Skip(f"up->down: {ffn.activation} is not positively homogeneous", ffn.down.matmul)
    down_in = ffn.down.input
    up_out = ffn.up.output
    node = down_in.producer()
    if only_reader(down_in) is None or only_reader(up_out) is None or node is None:
        raise Skip("up->down: an intermediate activation is also read elsewhere", ffn.down.matmul)
    try:
        ffn_intermediate(ffn, block_map)
    except Skip as why:
        raise Skip(f"up->down: {why.reason}", why.at) from None
    if ffn.gate is None:
        if node.op_type != "Relu" or node.inputs[0] is not up_out:
            raise Skip("up->down: down's input is not relu(up)", node)
        return
    if node.op_type != "Mul" or sum(1 for i in node.inputs if i is up_out) != 1:
        raise Skip("up->down: down's input is not act(gate) * up", node)
