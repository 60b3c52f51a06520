"""Print an onnx_ir model as stable, diffable text: the format of STYLE.md's "IR dump format".

Every IR state a test or ``--dump-dir`` looks at goes through here, so the text must not depend
on anything but the model: no ids, no addresses, no dict order other than the graph's own.
Unnamed values get ``%_0``, ``%_1``... in order of first appearance, attributes are sorted and
weights print as dtype, shape and a short digest so changed weights show up in a diff.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

TensorMode = Literal["digest", "shape"]

PROVENANCE_KEY = "tforge.pass"
# Digesting an external tensor reads it from disk; above this size we print `sha1:lazy` so that
# dumping an 8 GB model after every pass stays cheap.
LAZY_DIGEST_BYTES = 64 * 1024 * 1024
# Small integer tensors are structure (Reshape targets, axes, head counts), not weights: their
# values are printed even in "shape" mode so that goldens of structural passes show them.
SMALL_INT_ELEMENTS = 16
_INDENT = "  "


def print_ir(model: ir.Model, *, tensors: TensorMode = "digest", banner: str | None = None) -> str:
    """Return ``model`` as text, one definition per line, ending with a newline.

    ``tensors="shape"`` leaves out digests (but not small integer values), so goldens do not
    depend on RNG streams.
    """
    if tensors not in ("digest", "shape"):
        raise ValueError(f"print_ir: tensors must be 'digest' or 'shape', got {tensors!r}")
    printer = _Printer(model, tensors)
    lines = [f"// ----- {banner} ----- //"] if banner is not None else []
    printer.graph(model.graph, "graph", 0)
    for function in model.functions.values():
        printer.graph(function, "func", 0)
    lines.extend(printer.lines)
    return "\n".join(lines) + "\n"


def dump_path(directory: str | os.PathLike, index: int, pass_name: str) -> Path:
    """Where ``write_dump`` puts the dump of pass number ``index`` (``DIR/003-smoothquant.ir``)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in pass_name) or "pass"
    return Path(directory) / f"{index:03d}-{safe}.ir"


def write_dump(
    model: ir.Model,
    directory: str | os.PathLike,
    index: int,
    pass_name: str,
    banner: str | None,
    *,
    tensors: TensorMode = "digest",
) -> Path:
    """Write ``print_ir(model)`` to ``DIR/NNN-<pass>.ir`` atomically and return the path.

    Atomic (temp file + rename) so that a crash mid-pipeline never leaves a truncated dump that
    a later diff would misread as a pass deleting half the graph.
    """
    path = dump_path(directory, index, pass_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = print_ir(model, tensors=tensors, banner=banner)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.debug("wrote IR dump %s", path)
    return path


def format_scalar(value: object) -> str:
    """Shortest text that round-trips the scalar in its own dtype (`1e-05`, not `9.99e-06`)."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    text = str(value)  # numpy scalars print their shortest round-trip repr
    return text[:-2] if text.endswith(".0") else text


def format_type(value: ir.Value) -> str:
    """``f32[B,S,768]``; ``f32`` for unknown rank, ``?`` when nothing is known."""
    if value.type is None and value.shape is None:
        return "?"
    elem = _type_name(value.type) if value.type is not None else "?"
    if value.shape is None or not isinstance(value.type, (ir.TensorType, type(None))):
        return elem
    return f"{elem}{format_shape(value.shape)}"


def format_shape(shape: ir.Shape) -> str:
    """Symbolic dims by name, unknown dims as ``?``."""
    dims = []
    for dim in shape.dims:
        if isinstance(dim, int):
            dims.append(str(dim))
        else:
            dims.append("?" if dim.value is None else str(dim.value))
    return "[" + ",".join(dims) + "]"


def _type_name(type_: ir.TypeProtocol) -> str:
    if isinstance(type_, ir.TensorType):
        return _dtype_name(type_.dtype)
    if isinstance(type_, ir.SparseTensorType):
        return f"sparse<{_dtype_name(type_.dtype)}>"
    if isinstance(type_, ir.SequenceType):
        return f"seq<{_type_name(type_.elem_type)}>"
    if isinstance(type_, ir.OptionalType):
        return f"opt<{_type_name(type_.elem_type)}>"
    return "?"


def _dtype_name(dtype: ir.DataType | None) -> str:
    if dtype is None or dtype == ir.DataType.UNDEFINED:
        return "?"
    try:
        return dtype.short_name()
    except TypeError:
        return dtype.name.lower()


class _Printer:
    """Walks graphs in order and names unnamed values as it first meets them."""

    def __init__(self, model: ir.Model, tensors: TensorMode) -> None:
        self.tensors = tensors
        self.lines: list[str] = []
        self._names: dict[ir.Value, str] = {}
        self._counter = 0
        # Generated names must not collide with real ones, wherever they are in the model.
        self._taken = {v.name for g in _all_graphs(model) for v in _graph_values(g) if v.name}

    def name(self, value: ir.Value | None) -> str:
        if value is None:
            return "_"
        if value.name:
            return f"%{value.name}"
        if value.name == "" and not value.uses() and not value.is_graph_output():
            return "_"  # an optional output the producer does not emit
        if value not in self._names:
            while f"_{self._counter}" in self._taken:
                self._counter += 1
            self._names[value] = f"%_{self._counter}"
            self._counter += 1
        return self._names[value]

    def typed(self, value: ir.Value) -> str:
        name = self.name(value)
        return name if name == "_" else f"{name}: {format_type(value)}"

    def graph(
        self, graph: ir.Graph | ir.Function, keyword: str, depth: int, prefix: str = ""
    ) -> None:
        pad = _INDENT * depth
        if isinstance(graph, ir.Function):
            label = f"{graph.domain}::{graph.name}" if graph.domain else graph.name
            if graph.overload:
                label += f":{graph.overload}"
            params = sorted(graph.attributes.keys())
            label += f"<{','.join(params)}>" if params else ""
        else:
            label = graph.name or "main"
        inputs = ", ".join(self.typed(v) for v in graph.inputs)
        outputs = ", ".join(self.typed(v) for v in graph.outputs)
        self.lines.append(f"{pad}{prefix}{keyword} @{label}({inputs}) -> ({outputs}) {{")
        if isinstance(graph, ir.Graph):
            for value in graph.initializers.values():
                line = f"{pad}{_INDENT}{self.name(value)} = const "
                if value.const_value is None:
                    line += f"{format_type(value)} <no value>"
                else:
                    line += self.tensor(value.const_value)
                self.lines.append(line + _provenance(value.metadata_props))
        for node in graph:
            self.node(node, depth + 1)
        returned = ", ".join(self.name(v) for v in graph.outputs)
        self.lines.append(f"{pad}{_INDENT}return {returned}".rstrip())
        self.lines.append(f"{pad}}}")

    def node(self, node: ir.Node, depth: int) -> None:
        pad = _INDENT * depth
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        if node.overload:
            op += f":{node.overload}"
        lhs = ", ".join(self.typed(v) for v in node.outputs)
        args = ", ".join(self.name(v) for v in node.inputs)
        line = f"{pad}{lhs + ' = ' if lhs else ''}{op}({args})"
        attrs = sorted(node.attributes.values(), key=lambda a: a.name)
        flat = [f"{a.name}={self.attribute(a)}" for a in attrs if not _is_graph(a)]
        suffix = _provenance(node.metadata_props)
        if len(flat) == len(attrs):
            self.lines.append(line + (f" {{{', '.join(flat)}}}" if flat else "") + suffix)
            return
        # Subgraphs make the attribute block multi-line: one attribute per line, nested graphs
        # indented under it, so that a change inside a branch diffs as a change on one line.
        self.lines.append(f"{line} {{{suffix}")
        for attr in attrs:
            if not _is_graph(attr):
                self.lines.append(f"{pad}{_INDENT}{attr.name}={self.attribute(attr)}")
            elif attr.type == ir.AttributeType.GRAPH:
                self.graph(attr.value, "graph", depth + 1, prefix=f"{attr.name}=")
            else:
                for i, subgraph in enumerate(attr.value):
                    self.graph(subgraph, "graph", depth + 1, prefix=f"{attr.name}[{i}]=")
        self.lines.append(f"{pad}}}")

    def attribute(self, attr: ir.Attr) -> str:
        if attr.is_ref():
            return f"@{attr.ref_attr_name}"
        kind, value = attr.type, attr.value
        if kind == ir.AttributeType.INT:
            return str(value)
        if kind == ir.AttributeType.FLOAT:
            return format_scalar(np.float32(value))  # ONNX float attributes are float32
        if kind == ir.AttributeType.STRING:
            return json.dumps(value)
        if kind == ir.AttributeType.INTS:
            return "[" + ",".join(str(v) for v in value) + "]"
        if kind == ir.AttributeType.FLOATS:
            return "[" + ",".join(format_scalar(np.float32(v)) for v in value) + "]"
        if kind == ir.AttributeType.STRINGS:
            return "[" + ",".join(json.dumps(v) for v in value) + "]"
        if kind == ir.AttributeType.TENSOR:
            return self.tensor(value)
        if kind == ir.AttributeType.TENSORS:
            return "[" + ", ".join(self.tensor(t) for t in value) + "]"
        return kind.name.lower()  # sparse tensors and type protos: rare, print the kind only

    def tensor(self, tensor: ir.TensorProtocol) -> str:
        """``f32[768] sha1:5c1e0a92`` / ``fill(v)`` / ``[0,0,12,64]`` / ``sha1:lazy``."""
        text = f"{_dtype_name(tensor.dtype)}{format_shape(tensor.shape)}"
        lazy = isinstance(tensor, ir.ExternalTensor) and tensor.nbytes > LAZY_DIGEST_BYTES
        if lazy:
            return text if self.tensors == "shape" else f"{text} sha1:lazy"
        small_int = tensor.dtype.is_integer() and tensor.size <= SMALL_INT_ELEMENTS
        if self.tensors == "shape" and not small_int:
            return text
        try:
            array = tensor.numpy()
        except (TypeError, ValueError):  # dtypes numpy cannot hold: digest the bytes only
            return f"{text} sha1:{_sha1(tensor)}"
        except OSError:  # a dump is diagnostics: show the broken reference, do not crash
            return f"{text} <unreadable>"
        if small_int and array.ndim > 0:
            return f"{text} [" + ",".join(str(int(v)) for v in array.reshape(-1)) + "]"
        if array.size and np.all(array == array.reshape(-1)[0]):
            return f"{text} fill({format_scalar(array.reshape(-1)[0])})"
        return f"{text} sha1:{_sha1(tensor)}"


def _is_graph(attr: ir.Attr) -> bool:
    return not attr.is_ref() and attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


def _sha1(tensor: ir.TensorProtocol) -> str:
    try:
        data = tensor.tobytes()
    except (TypeError, ValueError, NotImplementedError):
        data = repr(tensor.numpy().tolist()).encode()  # string tensors have no raw bytes
    return hashlib.sha1(data).hexdigest()[:8]


def _provenance(props: dict[str, str]) -> str:
    source = props.get(PROVENANCE_KEY)
    return f"  // {source}" if source else ""


def _all_graphs(model: ir.Model) -> Iterable[ir.Graph | ir.Function]:
    yield from model.graphs()
    for function in model.functions.values():
        yield function
        yield from function.subgraphs()


def _graph_values(graph: ir.Graph | ir.Function) -> Sequence[ir.Value]:
    values: list[ir.Value] = [*graph.inputs, *graph.outputs]
    if isinstance(graph, ir.Graph):
        values.extend(graph.initializers.values())
    for node in graph:
        values.extend(node.outputs)
    return values
