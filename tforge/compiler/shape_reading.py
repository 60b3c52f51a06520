"""Shape vectors computed at run time, read back as products of dims.

Exporters compute most ``Reshape`` targets at run time: TorchScript writes ``x.view(b, s, heads,
-1)`` as ``Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)),
[heads], [-1]))``. :func:`shape_elements` reads such a vector element by element, following
``Shape``, ``Gather``, ``Slice``, ``Concat``, ``(Un)Squeeze``, ``Cast`` and ``Mul``, each element
an *extent*: an integer times a product of symbols, one symbol per dim of the graph. A symbol is
the name a dim is annotated with (dims of one name are equal), or, for an unnamed dim, a symbol
that stands for that one dim of that one value (equal only to itself). :func:`reshape_extents`
reads what a ``Reshape`` output's dims are: in ``[b, s, 192] -> [b, s, 4, -1]`` the ``-1`` holds
the input's elements over the other target dims, ``b * s * 192 / (b * s * 4) = 48``: the dims the
target copies from the input cancel out, whatever they are at run time.

The symbols of unnamed dims exist only inside this module: the public functions give ``None``
for an extent that holds one (nothing outside can name it). The block map
(``structure``), the attention-core tracer (``attention_paths``) and ``canonicalize`` read
targets through here.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from tforge.compiler.ops import is_default_domain

__all__ = [
    "ONE",
    "Element",
    "Size",
    "annotated",
    "const_array",
    "div",
    "elements_at_ones",
    "mul",
    "reshape_extents",
    "reshape_output_is",
    "shape_elements",
    "static_dims",
]

#: An extent: an integer times a product of symbolic dims (sorted), e.g. ``(12, ("batch",))``.
Size = tuple[int, tuple[str, ...]]
ONE: Size = (1, ())
#: One element of a shape vector: an extent, ``-1``/``0`` when a constant (``Reshape``'s markers),
#: or None when not read.
Element = Size | int | None
_DEPTH = 12  # ops of shape arithmetic followed back from one element
_UNNAMED = "#"  # prefix of the symbol of an unnamed dim (see _with_unnamed)


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant content (initializer or Constant op), or None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].value.numpy()
    return None


def static_dims(value: ir.Value | None) -> list[int | None] | None:
    """The value's annotated dims, None where not an integer; None when its rank is unknown."""
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def mul(a: Size, b: Size) -> Size:
    return a[0] * b[0], tuple(sorted(a[1] + b[1]))


def div(a: Size, b: Size) -> Size | None:
    """``a / b`` when ``b`` divides ``a`` (integer part and symbols), else None."""
    if b[0] == 0 or a[0] % b[0]:
        return None
    have, take = collections.Counter(a[1]), collections.Counter(b[1])
    if take - have:
        return None
    return a[0] // b[0], tuple(sorted((have - take).elements()))


def annotated(value: ir.Value) -> list[Size | None] | None:
    """The value's annotated dims as extents: integers and named dims (None where unnamed)."""
    if value.shape is None:
        return None
    out: list[Size | None] = []
    for dim in value.shape.dims:
        if isinstance(dim, int):
            out.append((dim, ()))
        elif isinstance(dim, ir.SymbolicDim) and isinstance(dim.value, str) and dim.value:
            out.append((1, (dim.value,)))
        else:
            out.append(None)
    return out


#: Where a tracer reads a value's dims (``annotated``, or what it has traced about the value).
Dims = Callable[[ir.Value], list[Size | None] | None]


def shape_elements(value: ir.Value | None, dims: Dims = annotated) -> list[Element] | None:
    """The elements of a 1-D (or scalar) int64 shape value, read back through the shape
    arithmetic: per element an extent (from constants and from the dims ``Shape`` reads, given by
    ``dims``), ``-1``/``0`` when they are constants (Reshape's markers), or None; None when not
    even the length is known."""
    elements = _elements(value, dims, 0)
    return None if elements is None else [_named(e) if isinstance(e, tuple) else e for e in elements]


def elements_at_ones(value: ir.Value | None) -> list[int | None] | None:
    """:func:`shape_elements` with every dim not known statically taken as 1, named or not (an
    extent is its integer factor: ``batch * 4`` is 4), ``-1``/``0`` as themselves: the shape a
    graph computes when its run-time dims are 1."""
    elements = _elements(value, annotated, 0)
    return None if elements is None else [e[0] if isinstance(e, tuple) else e for e in elements]


def reshape_extents(node: ir.Node) -> list[Size | None] | None:
    """The extents of a ``Reshape``'s output that its target proves (None where it does not): the
    target's extents, a ``0`` the input's extent there (unless ``allowzero``), and a ``-1`` the
    input's extents over the others when they divide them. Proven for any run-time dims: a dim
    the target copies from the input is the same symbol on both sides and cancels out, named or
    not (TorchScript's ``view(b, s, heads, -1)`` on ``[?, ?, 192]``: 48)."""
    extents = _reshape_extents(node)
    return None if extents is None else [_named(e) for e in extents]


def reshape_output_is(node: ir.Node, source: ir.Value, axes: list[list[int]]) -> bool:
    """Whether the target of ``Reshape`` ``node`` proves its output dim ``k`` to be the product of
    ``source``'s dims ``axes[k]``, whatever they are at run time (``[[0, 1], [2], [3]]``: the
    first two axes merged). ``source`` is any value whose ``Shape`` the target may read."""
    extents = _reshape_extents(node)
    dims = _with_unnamed(source, annotated(source))
    if extents is None or dims is None or len(extents) != len(axes):
        return False
    if any(not 0 <= a < len(dims) for group in axes for a in group):
        return False
    return all(e is not None and e == _product([dims[a] for a in group]) for e, group in zip(extents, axes, strict=True))


def _reshape_extents(node: ir.Node) -> list[Size | None] | None:
    """:func:`reshape_extents`, the unnamed dims kept as their symbols."""
    target = _elements(node.inputs[1], annotated, 0) if len(node.inputs) > 1 else None
    data = node.inputs[0]
    source = _with_unnamed(data, annotated(data)) if data is not None else None
    if target is None:
        return None
    allowzero = node.attributes.get("allowzero")
    copies = not (allowzero is not None and int(allowzero.value))
    out: list[Size | None] = []
    for i, e in enumerate(target):
        if e == 0 and copies:
            out.append(source[i] if source is not None and i < len(source) else None)
        else:
            out.append(e if isinstance(e, tuple) else None)  # -1 (solved below) or an empty axis
    if target.count(-1) == 1 and source is not None:
        at = target.index(-1)
        rest = [e for i, e in enumerate(out) if i != at]
        if None not in rest:
            out[at] = div(_product(source), _product(rest))  # type: ignore[arg-type]
    return out


def _product(sizes: list[Size]) -> Size:
    total = ONE
    for size in sizes:
        total = mul(total, size)
    return total


def _with_unnamed(value: ir.Value, dims: list[Size | None] | None) -> list[Size] | None:
    """``dims`` (of ``value``) with each unknown dim ``i`` given a symbol of its own, standing for
    dim ``i`` of ``value`` and equal only to itself."""
    if dims is None:
        return None
    return [(1, (f"{_UNNAMED}{id(value)}.{i}",)) if d is None else d for i, d in enumerate(dims)]


def _named(size: Size | None) -> Size | None:
    """``size``, or None when it holds the symbol of an unnamed dim."""
    if size is None or any(s.startswith(_UNNAMED) for s in size[1]):
        return None
    return size


def _elements(value: ir.Value | None, dims: Dims, depth: int) -> list[Element] | None:
    """:func:`shape_elements`, the unnamed dims of the values ``Shape`` reads kept as symbols."""
    if value is None or depth > _DEPTH:
        return None
    arr = const_array(value)
    if arr is not None:
        flat = np.asarray(arr).ravel()
        if flat.size > 16:
            return None
        return [int(x) if int(x) in (-1, 0) else (int(x), ()) for x in flat]
    node = value.producer()
    if node is None or not is_default_domain(node):
        return None
    op = node.op_type
    if op == "Shape":
        data = node.inputs[0]
        read = _with_unnamed(data, dims(data)) if data is not None else None
        if read is None:
            return None
        start, end = node.attributes.get("start"), node.attributes.get("end")
        # ONNX clamps start and end as Python slicing does
        return list(read[int(start.value) if start is not None else 0 : int(end.value) if end is not None else len(read)])
    if op in ("Identity", "Cast", "Squeeze", "Unsqueeze") or (op == "Reshape" and _flat_target(node)):
        return _elements(node.inputs[0], dims, depth + 1)
    if op == "Concat":
        out: list[Element] = []
        for part in node.inputs:
            got = _elements(part, dims, depth + 1)
            if got is None:
                length = static_dims(part)
                if length is None or len(length) != 1 or length[0] is None:
                    return None
                got = [None] * int(length[0])
            out += got
        return out
    if op in ("Slice", "Gather"):
        inner = _elements(node.inputs[0], dims, depth + 1)
        if inner is None:
            return None
        picked = _picked(node, len(inner))
        return None if picked is None else [inner[i] for i in picked]
    if op == "Mul" and len(node.inputs) == 2:
        a, b = (_elements(i, dims, depth + 1) for i in node.inputs)
        if a is None or b is None or len(a) != 1 or len(b) != 1:
            return None
        x, y = a[0], b[0]
        return [mul(x, y) if isinstance(x, tuple) and isinstance(y, tuple) else None]
    length = static_dims(value)
    if length is not None and len(length) <= 1 and (not length or length[0] is not None):
        return [None] * (int(length[0]) if length else 1)
    return None


def _flat_target(node: ir.Node) -> bool:
    target = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    return target is not None and [int(x) for x in np.asarray(target).ravel()] == [-1]


def _picked(node: ir.Node, length: int) -> list[int] | None:
    """Indices a constant ``Slice`` (axis 0) or ``Gather`` (axis 0) takes from a 1-D vector."""
    if node.op_type == "Gather":
        axis = node.attributes.get("axis")
        idx = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if idx is None or (axis is not None and int(axis.value) != 0):
            return None
        out = [int(i) + length if int(i) < 0 else int(i) for i in np.asarray(idx).ravel()]
        return out if all(0 <= i < length for i in out) else None
    parts = [const_array(i) if i is not None else None for i in node.inputs[1:5]]
    if len(parts) < 2 or parts[0] is None or parts[1] is None:
        return None
    if any(p is not None and np.asarray(p).size != 1 for p in parts):
        return None
    start, stop = int(np.asarray(parts[0]).ravel()[0]), int(np.asarray(parts[1]).ravel()[0])
    axis = int(np.asarray(parts[2]).ravel()[0]) if len(parts) > 2 and parts[2] is not None else 0
    step = int(np.asarray(parts[3]).ravel()[0]) if len(parts) > 3 and parts[3] is not None else 1
    if axis not in (0, -1) or step != 1:
        return None
    return list(range(length))[slice(start, stop)]
