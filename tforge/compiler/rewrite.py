"""Small graph edits every rewriting pass needs, written once.

Passes build new nodes and then make the rest of the graph read them; the subtle part is a
value that is also a graph output, whose name is the model's interface and must survive the
rewrite.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["replace_value"]


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Make every reader of ``old`` read ``new``; a graph output keeps its name (``new`` takes it)."""
    is_output = old.is_graph_output()
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if is_output:
        old.name = f"{name}.replaced"
        new.name = name
