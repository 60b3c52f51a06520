"""Small graph edits every rewriting pass needs, written once.

Passes build new nodes and then make the rest of the graph read them; the subtle part is a
value that is also a graph output, whose name is the model's interface and must survive the
rewrite.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["replace_value", "retype_node"]


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Make every reader of ``old`` read ``new``; a graph output keeps its name (``new`` takes it)."""
    is_output = old.is_graph_output()
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if is_output:
        old.name = f"{name}.replaced"
        new.name = name


def retype_node(graph: ir.Graph, node: ir.Node, op_type: str) -> ir.Node:
    """Replace single-output ``node`` by an ``op_type`` node (default domain, no attributes) on the same inputs.

    Its output keeps the old value's name, type and shape, so dumps and graph outputs read the same.
    """
    old = node.outputs[0]
    new = ir.node(op_type, list(node.inputs), name=node.name)
    graph.insert_before(node, new)
    name, dtype, shape = old.name, old.dtype, old.shape
    old.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    graph.remove(node, safe=True)
    result = new.outputs[0]
    result.name, result.dtype, result.shape = name, dtype, shape
    return new
