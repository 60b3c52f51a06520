"""The graph editor: the one place where passes create and change graph content.

Every rewrite needs the same few things, and they are subtle enough to be written once:

- **Unique, readable names.** New values and nodes are named after what they replace
  (``<weight>.<pass>``, ``<input>.quantize``); a taken name gets ``.1``, ``.2``... Value names
  (graph inputs, initializers, node outputs) and node names are two namespaces, as in ONNX.
- **Provenance.** Every node and initializer the editor creates or rewrites is marked with the
  pass's name (``tforge.pass``), which the IR printer shows as ``// pass``.
- **Models larger than memory.** Weights the editor writes go through :func:`spill.tensor`, so a
  model over the spill threshold streams rewritten weights to a scratch file.
- **Shared constants.** Exporters merge identical initializers, so one weight or gamma may feed
  several nodes. :meth:`GraphEditor.set_constant` rewrites a constant in place only when the
  readers being rewritten are all of its uses; otherwise those readers get a new initializer.
- **Graph outputs.** A value that is also a graph output keeps its name (the model's interface)
  when another value replaces it (:func:`replace_value`).
- **Placement.** A new node goes before or after a given node, or after the node the editor
  placed last (so that a chain reads in the order it was built).

The editor also drops the cached block map of the model as soon as it changes the graph
(:func:`tforge.compiler.structure.block_map`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from tforge.compiler.pass_infra import mark_provenance
from tforge.compiler.structure import Linear, const_array, forget_block_map
from tforge.runtime import spill

__all__ = [
    "GraphEditor",
    "Scope",
    "bias_input",
    "constant_array",
    "current_weight",
    "replace_value",
    "retype_node",
    "set_last_dim",
]


class GraphEditor:
    """Creates and rewrites nodes and initializers of ``model`` on behalf of ``pass_name``."""

    def __init__(self, model: ir.Model, pass_name: str) -> None:
        self.model = model
        self.graph = model.graph
        self.pass_name = pass_name
        self._value_names: set[str] | None = None
        self._node_names: set[str] | None = None
        self._cursor: ir.Node | None = None
        self._retired: dict[int, ir.Value] = {}

    @property
    def opset(self) -> int:
        """The default-domain opset the model imports."""
        return self.model.opset_imports.get("", self.model.opset_imports.get("ai.onnx", 0))

    # ------------------------------------------------------------------ names

    def value_name(self, base: str) -> str:
        """``base``, or ``base.1``, ``base.2``... if a value of that name exists; reserved."""
        return _take(self._names()[0], base)

    def node_name(self, base: str) -> str:
        """``base``, or ``base.1``... if a node of that name exists; reserved."""
        return _take(self._names()[1], base)

    def shared_name(self, base: str) -> str:
        """One name free both as a value and as a node name (a node named like its output)."""
        values, nodes = self._names()
        name, i = base, 1
        while name in values or name in nodes:
            name = f"{base}.{i}"
            i += 1
        values.add(name)
        nodes.add(name)
        return name

    def _names(self) -> tuple[set[str], set[str]]:
        if self._value_names is None or self._node_names is None:
            values = {v.name for v in self.graph.inputs} | set(self.graph.initializers)
            for node in self.graph:
                values.update(out.name for out in node.outputs if out.name)
            self._value_names = {n for n in values if n}
            self._node_names = {n.name for n in self.graph if n.name}
        return self._value_names, self._node_names

    # ------------------------------------------------------------------ initializers

    def initializer(self, base: str, array: np.ndarray | np.generic) -> ir.Value:
        """A new initializer holding ``array`` (spilled when the model is large), named after ``base``."""
        name = self.value_name(base)
        array = np.asarray(array)
        if not array.flags.c_contiguous:  # (np.ascontiguousarray would make a 0-d array 1-d)
            array = np.ascontiguousarray(array)
        value = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=spill.tensor(self.model, array, name),
        )
        self.graph.register_initializer(value)
        mark_provenance(value, self.pass_name)
        forget_block_map(self.model)
        return value

    def set_constant(
        self, value: ir.Value, readers: Sequence[tuple[ir.Node, int]], array: np.ndarray
    ) -> ir.Value:
        """Make each ``(node, input index)`` in ``readers`` read ``array`` instead of ``value``.

        ``array`` is cast to ``value``'s dtype. The constant is rewritten in place when these
        readers are all of its uses; otherwise they get a new initializer (``<name>.<pass>``) and
        a ``Constant`` node left without readers is removed. Returns the value now read.
        """
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        array = np.asarray(array).astype(dtype, order="C")  # a copy
        wanted = {(id(node), idx) for node, idx in readers}
        uses = {(id(use.node), use.idx) for use in value.uses()}
        exclusive = (
            value.is_initializer()
            and value.const_value is not None
            and not value.is_graph_output()
            and not value.is_graph_input()
            and uses <= wanted
        )
        forget_block_map(self.model)
        if exclusive:
            value.const_value = spill.tensor(self.model, array, value.name)
            value.shape = ir.Shape(array.shape)
            mark_provenance(value, self.pass_name)
            return value
        new = self.initializer(f"{value.name or 'const'}.{self.pass_name}", array)
        for node, idx in readers:
            node.replace_input_with(idx, new)
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and not list(value.uses()):
            self.graph.remove(producer, safe=True)
        return new

    def retire(self, value: ir.Value) -> None:
        """Note a constant the rewrite stops reading; :meth:`drop_retired` removes it if unused."""
        self._retired[id(value)] = value

    def drop_retired(self) -> None:
        """Remove the retired initializers that nothing reads any more."""
        for value in self._retired.values():
            self.drop_if_unused(value)
        self._retired.clear()

    def drop_if_unused(self, value: ir.Value) -> None:
        """Remove initializer ``value`` if no node reads it and it is no graph input or output."""
        if (
            not list(value.uses())
            and value.name in self.graph.initializers
            and self.graph.initializers[value.name] is value
            and not value.is_graph_output()
            and not value.is_graph_input()
        ):
            del self.graph.initializers[value.name]
            forget_block_map(self.model)

    # ------------------------------------------------------------------ nodes

    def node(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        *,
        name: str,
        outputs: str | Sequence[str] | None = None,
        attributes: dict[str, Any] | None = None,
        domain: str = "",
        num_outputs: int | None = None,
        before: ir.Node | None = None,
        after: ir.Node | None = None,
        dtype: ir.DataType | None = None,
        shape: ir.Shape | Sequence[int | str | None] | None = None,
    ) -> ir.Node:
        """A new node named after ``name``, its outputs after ``outputs`` (default: ``name``).

        Placed before ``before``, after ``after``, or else right after the node this editor placed
        last (see :meth:`place_after`; first in the graph if none). ``dtype`` and ``shape``
        annotate the first output. A non-default ``domain`` is imported (version 1) if missing.
        """
        if domain and domain not in self.model.opset_imports:
            self.model.opset_imports[domain] = 1
        names = [name] if outputs is None else [outputs] if isinstance(outputs, str) else list(outputs)
        count = num_outputs if num_outputs is not None else len(names)
        if len(names) != count:
            raise ValueError(f"GraphEditor.node: {count} outputs but {len(names)} output names")
        node = ir.node(
            op_type,
            list(inputs),
            attributes=attributes,
            domain=domain,
            num_outputs=count,
            name=self.node_name(name),
        )
        for value, value_name in zip(node.outputs, names, strict=True):
            value.name = self.value_name(value_name)
        if dtype is not None:
            node.outputs[0].type = ir.TensorType(dtype)
        if shape is not None:
            node.outputs[0].shape = shape if isinstance(shape, ir.Shape) else ir.Shape(list(shape))
        mark_provenance(node, self.pass_name)
        self._place(node, before, after)
        return node

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], *, name: str, **kwargs: Any) -> ir.Value:
        """:meth:`node` with one output; returns that output."""
        return self.node(op_type, inputs, name=name, **kwargs).outputs[0]

    def place_after(self, where: ir.Value | ir.Node | None) -> None:
        """Place the next nodes (those given neither ``before`` nor ``after``) right after ``where``:
        a node, or the producer of a value (first in the graph for a graph input or None)."""
        self._cursor = where.producer() if isinstance(where, ir.Value) else where

    def _place(self, node: ir.Node, before: ir.Node | None, after: ir.Node | None) -> None:
        forget_block_map(self.model)
        if before is not None:
            self.graph.insert_before(before, node)
        elif after is not None:
            self.graph.insert_after(after, node)
        elif self._cursor is not None:
            self.graph.insert_after(self._cursor, node)
            self._cursor = node
        else:
            first = next(iter(self.graph), None)
            if first is None:
                self.graph.append(node)
            else:
                self.graph.insert_before(first, node)
            self._cursor = node

    def scope(self, before: ir.Node, prefix: str, value_prefix: str | None = None) -> Scope:
        """A :class:`Scope` placing nodes before ``before`` under names starting with ``prefix``."""
        return Scope(self, before, prefix, prefix if value_prefix is None else value_prefix)

    def remove(self, node: ir.Node) -> None:
        """Remove ``node``, whose outputs nothing reads any more."""
        forget_block_map(self.model)
        self.graph.remove(node, safe=True)

    def mark(self, obj: ir.Node | ir.Value) -> None:
        """Record that this pass rewrote ``obj`` in place (provenance only)."""
        mark_provenance(obj, self.pass_name)

    def replace_value(self, old: ir.Value, new: ir.Value) -> None:
        """:func:`replace_value`, and the block map is forgotten."""
        forget_block_map(self.model)
        replace_value(old, new)

    def retype(self, node: ir.Node, op_type: str) -> ir.Node:
        """:func:`retype_node` with provenance."""
        forget_block_map(self.model)
        new = retype_node(self.graph, node, op_type)
        mark_provenance(new, self.pass_name)
        return new

    # ------------------------------------------------------------------ linears

    def scale_rows(self, linears: Sequence[Linear], scale: np.ndarray) -> None:
        """``W' = scale[:, None] * W`` for each linear; a weight shared among them is scaled once."""
        for weight, readers in _by_weight(linears):
            self.set_constant(weight, readers, scale[:, None] * constant_array(weight))

    def scale_columns(self, lin: Linear, scale: np.ndarray, start: int = 0) -> None:
        """Divide output columns ``start .. start+len(scale)`` of ``lin`` (weight and bias) by ``scale``."""
        stop = start + scale.shape[0]
        weight = current_weight(lin)
        w = constant_array(weight)
        w[:, start:stop] /= scale[None, :]
        self.set_constant(weight, [(lin.matmul, 1)], w)
        where = bias_input(lin)
        if where is not None and where[0].inputs[where[1]] is not None:
            node, idx = where
            b = constant_array(node.inputs[idx])  # type: ignore[arg-type]
            b[start:stop] /= scale
            self.set_constant(node.inputs[idx], [(node, idx)], b)  # type: ignore[arg-type]

    def permute_rows(self, linears: Sequence[Linear], perm: np.ndarray) -> None:
        """``W' = W[perm]`` for each linear (the input channels reordered); shared weights once."""
        for weight, readers in _by_weight(linears):
            self.set_constant(weight, readers, np.asarray(const_array(weight))[perm])

    def permute_columns(self, lin: Linear, perm: np.ndarray, start: int = 0) -> None:
        """Reorder output columns ``start .. start+len(perm)`` of ``lin`` (weight and bias) by ``perm``."""
        stop = start + perm.shape[0]
        weight = current_weight(lin)
        w = np.array(const_array(weight))
        w[:, start:stop] = w[:, start:stop][:, perm]
        self.set_constant(weight, [(lin.matmul, 1)], w)
        where = bias_input(lin)
        if where is not None and where[0].inputs[where[1]] is not None:
            node, idx = where
            b = np.array(const_array(node.inputs[idx]))
            b[start:stop] = b[start:stop][perm]
            self.set_constant(node.inputs[idx], [(node, idx)], b)  # type: ignore[arg-type]

    def take_columns(self, lin: Linear, columns: np.ndarray) -> None:
        """Keep only output columns ``columns`` of ``lin`` (weight and bias); update output shapes."""
        weight = current_weight(lin)
        self.set_constant(weight, [(lin.matmul, 1)], np.asarray(const_array(weight))[:, columns])
        where = bias_input(lin)
        if where is not None and where[0].inputs[where[1]] is not None:
            node, idx = where
            bias = node.inputs[idx]
            self.set_constant(bias, [(node, idx)], np.asarray(const_array(bias))[columns])  # type: ignore[arg-type]
        width = int(len(columns))
        set_last_dim(lin.matmul.outputs[0], width)
        if lin.bias_add is not None:
            set_last_dim(lin.bias_add.outputs[0], width)
        self.mark(lin.matmul)

    def set_weight(self, lin: Linear, weight: np.ndarray) -> None:
        """Replace ``lin``'s weight by ``weight`` (e.g. its kept input rows, maybe refitted)."""
        self.set_constant(current_weight(lin), [(lin.matmul, 1)], weight)
        self.mark(lin.matmul)

    def add_to_bias(self, lin: Linear, delta: np.ndarray) -> bool:
        """Add ``delta`` to the linear's bias, creating ``Add(matmul, bias)`` when there is none.

        Returns False (nothing done) when a new bias would have to follow a graph output.
        """
        where = bias_input(lin)
        if where is not None and where[0].inputs[where[1]] is not None:
            node, idx = where
            bias = node.inputs[idx]
            self.set_constant(bias, [(node, idx)], constant_array(bias) + delta)  # type: ignore[arg-type]
            return True
        out = lin.matmul.outputs[0]
        if out.is_graph_output():
            return False
        dtype = out.dtype.numpy() if out.dtype is not None else np.dtype(np.float32)
        bias = self.initializer(f"{lin.name}.bias", np.asarray(delta, dtype))
        readers = list(out.uses())
        add = self.node(
            "Add", [out, bias], name=f"{lin.matmul.name or lin.name}.bias",
            outputs=f"{out.name or lin.name}.biased", after=lin.matmul,
        )  # fmt: skip
        added = add.outputs[0]
        added.shape, added.type = out.shape, out.type
        for use in readers:
            use.node.replace_input_with(use.idx, added)
        return True


class Scope:
    """A chain of new nodes before one anchor node (the node they replace or feed), named after it.

    ``op("Add", [a, b], "sum")`` is a node ``<prefix>sum`` whose output is ``<value_prefix>sum``,
    inserted before the anchor, so the chain reads in the order it was built.
    """

    def __init__(self, editor: GraphEditor, before: ir.Node, prefix: str, value_prefix: str) -> None:
        self.editor = editor
        self.before = before
        self.prefix = prefix
        self.value_prefix = value_prefix

    def const(self, name: str, array: np.ndarray | np.generic) -> ir.Value:
        return self.editor.initializer(f"{self.value_prefix}{name}", np.asarray(array))

    def i64(self, name: str, values: Sequence[int]) -> ir.Value:
        return self.const(name, np.asarray(list(values), dtype=np.int64))

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        name: str,
        *,
        domain: str = "",
        num_outputs: int = 1,
        dtype: ir.DataType | None = None,
        shape: ir.Shape | Sequence[Any] | None = None,
        **attributes: Any,
    ) -> ir.Value:
        value_name = f"{self.value_prefix}{name}"
        node = self.editor.node(
            op_type, inputs, name=f"{self.prefix}{name}",
            outputs=[value_name] + [f"{value_name}.{i}" for i in range(1, num_outputs)],
            attributes=attributes or None, domain=domain, before=self.before, dtype=dtype, shape=shape,
        )  # fmt: skip
        return node.outputs[0]


def _take(taken: set[str], base: str) -> str:
    name, i = base, 1
    while name in taken:
        name = f"{base}.{i}"
        i += 1
    taken.add(name)
    return name


def _by_weight(linears: Sequence[Linear]) -> list[tuple[ir.Value, list[tuple[ir.Node, int]]]]:
    """The linears' current weights, each once, with the MatMul inputs that read it."""
    by_weight: dict[int, tuple[ir.Value, list[tuple[ir.Node, int]]]] = {}
    for lin in linears:
        weight = current_weight(lin)
        by_weight.setdefault(id(weight), (weight, []))[1].append((lin.matmul, 1))
    return list(by_weight.values())


def current_weight(lin: Linear) -> ir.Value:
    """The weight the linear's MatMul reads now (a rewrite may have given it a new initializer)."""
    weight = lin.matmul.inputs[1]
    if weight is None:  # the block map only lists MatMuls with a constant weight
        raise ValueError(f"'{lin.name}' has no weight input")
    return weight


def bias_input(lin: Linear) -> tuple[ir.Node, int] | None:
    """(Add node, input index) of the linear's bias, or None."""
    if lin.bias_add is None:
        return None
    idx = 1 if lin.bias_add.inputs[0] is lin.matmul.outputs[0] else 0
    return lin.bias_add, idx


def constant_array(value: ir.Value) -> np.ndarray:
    """A float64 copy of a constant the block map found (weights, biases, gammas)."""
    arr = const_array(value)
    if arr is None:  # callers only pass constants found by the block map
        raise ValueError(f"'{value.name}' is not a constant")
    return np.array(arr, dtype=np.float64)


def set_last_dim(value: ir.Value, size: int) -> None:
    """Set the last annotated dimension of ``value``, if its shape is annotated."""
    shape = value.shape
    if shape is None or shape.rank() == 0:
        return
    dims = list(shape.dims)
    dims[-1] = size
    value.shape = ir.Shape(dims)


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
