"""Token embeddings and the LM head that may share their table.

An embedding is ``Gather(table, ids)`` with a constant 2-D ``table`` [vocab, hidden] read along
axis 0 by integer indices that come from a graph input (the token ids). Models tie the LM head
to it: ``logits = h @ table^T``. ``canonicalize`` unties a head read through a runtime
``Transpose`` into an ordinary linear whose weight is the transposed copy; :func:`tied_head`
finds that linear again by value (its weight equals the table transposed exactly), never by
name, so that a weight-quantizing pass can store one copy for both.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from tforge.compiler.structure import Linear, const_array

__all__ = ["Embedding", "find_embeddings", "tied_head"]

_INDEX_TYPES = (ir.DataType.INT64, ir.DataType.INT32)


@dataclasses.dataclass(frozen=True, eq=False)
class Embedding:
    """``Gather(table, ids)`` along axis 0 with a constant table [vocab, hidden]."""

    gather: ir.Node
    table: ir.Value

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(d) for d in self.table.shape)  # type: ignore[return-value,union-attr]

    @property
    def ids(self) -> ir.Value:
        return self.gather.inputs[1]  # type: ignore[return-value]


def find_embeddings(graph: ir.Graph) -> list[Embedding]:
    """Every ``Gather`` of rows of a constant 2-D float table by integer indices from the inputs."""
    inputs = {id(v) for v in graph.inputs}
    found = []
    for node in graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        axis = node.attributes.get("axis")
        table, ids = node.inputs
        if (axis is not None and axis.value != 0) or table is None or ids is None:
            continue
        if table.const_value is None or table.shape is None or len(table.shape) != 2:
            continue
        if table.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or ids.dtype not in _INDEX_TYPES:
            continue
        if not _from_inputs(ids, inputs):
            continue
        found.append(Embedding(node, table))
    return found


def _from_inputs(value: ir.Value, inputs: set[int], limit: int = 8) -> bool:
    """Whether ``value`` is a graph input or computed from one by a few index ops (Cast, Reshape)."""
    for _ in range(limit):
        if id(value) in inputs:
            return True
        node = value.producer()
        if node is None or node.op_type not in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten"):
            return False
        value = node.inputs[0]  # type: ignore[assignment]
    return False


def tied_head(embedding: Embedding, linears: list[Linear]) -> Linear | None:
    """The linear whose weight is ``embedding``'s table transposed, exactly (a tied LM head)."""
    vocab, hidden = embedding.shape
    table = None
    for lin in linears:
        if lin.in_features != hidden or lin.out_features != vocab:
            continue
        if table is None:
            table = np.asarray(const_array(embedding.table))
        w = const_array(lin.weight)
        if w is not None and w.dtype == table.dtype and np.array_equal(w, table.T):
            return lin
    return None
