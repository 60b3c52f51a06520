"""An ``onnx_ir`` graph run in PyTorch, so that gradients flow through it.

ONNX Runtime is tforge's reference interpreter (:mod:`tforge.runtime.ort`), but it cannot
differentiate. A pass that *learns* something about a graph (``quantize-weights{tune-steps=N}``
learns the block scales of its 4-bit weights) runs the graph here instead: each node becomes
the PyTorch operation with ONNX's semantics, and any value of the graph can be replaced, per run,
by a tensor that depends on parameters being trained.

:class:`TorchGraph` snapshots the graph when it is built (the ops, their attributes, the
initializers as tensors that share memory with the graph's arrays), so rewriting the graph
afterwards does not change it: a pass keeps the float model as a teacher while it quantizes.
Only the nodes the requested outputs depend on run, and the nodes that depend on constants
alone are evaluated once. An op this module does not know raises
:class:`~tforge.errors.UnsupportedModelError` at construction, naming the node, never a
wrong result; each op is checked against ONNX Runtime in ``tests/runtime/test_torch_exec.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from tforge.errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch

__all__ = ["CodedWeight", "TorchGraph", "supported_ops"]

_MS = "com.microsoft"
_INTERNAL = "tforge.torch_exec"  # ops this module rewrites quantized ops into (see _centered)


@dataclasses.dataclass(frozen=True)
class _Step:
    domain: str
    op: str
    name: str
    inputs: tuple[str | None, ...]
    outputs: tuple[str, ...]
    attributes: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class CodedWeight:
    """A ``MatMulNBits`` weight whose codes a :class:`TorchGraph` unpacked once (constant codes).

    ``run(..., replace={w.centered: codes, w.scales: scales})`` computes the node with other
    codes (floats, ``code - zero point``, shaped ``[N, blocks * block]``) and scales, so a caller
    can train both. A code stays on the grid when it lies in ``[low, high]`` (per block,
    ``[N, blocks, 1]``: ``-zero point`` and ``2^bits - 1 - zero point``).
    """

    node: str  # the MatMulNBits node's name
    packed: str  # the initializer of its packed codes (input B)
    centered: str  # the name the unpacked codes go by inside the TorchGraph
    scales: str  # the initializer of its scales
    bits: int
    block_size: int
    low: torch.Tensor
    high: torch.Tensor


class TorchGraph:
    """A graph's computation of ``outputs`` as PyTorch operations (see the module).

    ``run(feeds, replace)`` takes the graph inputs by name (arrays or tensors) and, in
    ``replace``, tensors to use instead of values of the graph (typically initializers computed
    from trainable parameters); it returns the requested outputs in order. ``given`` names values
    inside the graph that the feeds supply instead (one decoder block run from its input, say): the
    nodes that would compute them, and those only they need, are left out.
    """

    def __init__(
        self, graph: ir.Graph, outputs: Sequence[str], *, variable: Sequence[str] = (), given: Sequence[str] = ()
    ) -> None:
        import torch

        self._torch = torch
        producers: dict[str, ir.Node] = {}
        for node in graph:
            for out in node.outputs:
                if out.name:
                    producers[out.name] = node
        initializers = {name: value for name, value in graph.initializers.items() if value.const_value is not None}
        graph_inputs = {value.name for value in graph.inputs} | set(given)
        unknown = [name for name in given if name not in producers]
        if unknown:
            raise UnsupportedModelError(f"TorchGraph: no node computes the given value {unknown[0]!r}")
        for name in given:  # fed, not computed: the walk below stops there
            del producers[name]
        missing = [name for name in outputs if name not in producers and name not in initializers and name not in graph_inputs]
        if missing:
            raise UnsupportedModelError(f"TorchGraph: no value named {missing[0]!r} in the graph")
        # the nodes the outputs depend on, in graph order
        needed: set[int] = set()
        stack = [producers[name] for name in outputs if name in producers]
        while stack:
            node = stack.pop()
            if id(node) in needed:
                continue
            needed.add(id(node))
            stack += [producers[v.name] for v in node.inputs if v is not None and v.name in producers]
        self._steps: list[_Step] = []
        for node in graph:
            if id(node) not in needed:
                continue
            key = (node.domain or "", node.op_type)
            if key not in _OPS:
                where = node.name or node.op_type
                raise UnsupportedModelError(
                    f"TorchGraph: node {where!r} is {node.domain + '::' if node.domain else ''}{node.op_type}, "
                    "which has no PyTorch translation here"
                )
            self._steps.append(_Step(
                domain=key[0], op=node.op_type, name=node.name or "",
                inputs=tuple(v.name if v is not None else None for v in node.inputs),
                outputs=tuple(v.name or "" for v in node.outputs),
                attributes={k: _attribute(a) for k, a in node.attributes.items()},
            ))  # fmt: skip
        used = {name for step in self._steps for name in step.inputs if name}
        used |= set(outputs)
        self._constants: dict[str, torch.Tensor] = {
            name: _tensor(torch, value.const_value.numpy()) for name, value in initializers.items() if name in used
        }
        self._variable = set(variable)
        self.outputs = tuple(outputs)
        self.coded_weights: list[CodedWeight] = []  # filled by _fold, in graph order
        self._fold()

    def constant(self, name: str) -> torch.Tensor:
        """An initializer (or a value computed from initializers alone) as the graph holds it."""
        return self._constants[name]

    def _fold(self) -> None:
        """Evaluate once the steps whose inputs are all constants (and not replaced per run)."""
        constant = {name for name in self._constants if name not in self._variable}
        rest: list[_Step] = []
        for step in self._steps:
            if all(name is None or name in constant for name in step.inputs):
                values = self._execute(step, self._constants)
                for name, value in zip(step.outputs, values, strict=False):
                    self._constants[name] = value
                    constant.add(name)
            else:
                rest.append(self._centered(step, constant))
        self._steps = rest

    def _centered(self, step: _Step, constant: set[str]) -> _Step:
        """A quantized op whose codes are constant, rewritten to read them unpacked and centered
        (``code - zero point``, as floats) once, so that a run only multiplies by the scales."""
        if step.domain != _MS or step.op not in ("MatMulNBits", "GatherBlockQuantized"):
            return step
        packed, zp = step.inputs[0 if step.op == "GatherBlockQuantized" else 1], _at(step.inputs, 3)
        if packed not in constant or (zp is not None and zp not in constant):
            return step
        data = self._constants[packed]
        zero = self._constants[zp] if zp is not None else None
        if step.op == "MatMulNBits":  # a g_idx input (its name) is refused here, at construction
            centered = _nbits_centered(self._torch, data, zero, _at(step.inputs, 4), step.attributes)
        else:
            centered = _table_centered(self._torch, data, zero, step.attributes)
        name = f"{packed}::centered::{step.name or id(step)}"
        self._constants[name] = centered
        if step.op == "MatMulNBits":
            bits, block = step.attributes["bits"], step.attributes["block_size"]
            rows, blocks = int(step.attributes["N"]), centered.shape[1] // block
            zeros = _zero_points(self._torch, zero, rows, blocks, bits, self._torch.float32)[..., None]
            self.coded_weights.append(CodedWeight(
                node=step.name, packed=packed, centered=name, scales=step.inputs[2] or "", bits=bits,
                block_size=block, low=-zeros, high=float((1 << bits) - 1) - zeros,
            ))  # fmt: skip
        op = "CenteredMatMul" if step.op == "MatMulNBits" else "CenteredGather"
        inputs = (step.inputs[0], name, step.inputs[2], _at(step.inputs, 5)) if op == "CenteredMatMul" else (
            name, step.inputs[1], step.inputs[2])  # fmt: skip
        return dataclasses.replace(step, domain=_INTERNAL, op=op, inputs=inputs)

    def run(self, feeds: Mapping[str, Any], replace: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        torch = self._torch
        env: dict[str, torch.Tensor] = dict(self._constants)
        for name, value in feeds.items():
            env[name] = value if isinstance(value, torch.Tensor) else _tensor(torch, np.asarray(value))
        if replace:
            env.update(replace)
        for step in self._steps:
            for name, value in zip(step.outputs, self._execute(step, env), strict=False):
                if name:
                    env[name] = value
        return [env[name] for name in self.outputs]

    def _execute(self, step: _Step, env: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        args = [env[name] if name else None for name in step.inputs]
        try:
            result = _OPS[(step.domain, step.op)](self._torch, args, step.attributes)
        except KeyError as error:
            raise UnsupportedModelError(f"TorchGraph: node {step.name or step.op!r} reads {error}, which was never computed") from None
        return list(result) if isinstance(result, tuple | list) else [result]


def supported_ops() -> list[tuple[str, str]]:
    """The ``(domain, op_type)`` pairs :class:`TorchGraph` translates."""
    return sorted(key for key in _OPS if key[0] != _INTERNAL)


# ----------------------------------------------------------------------------- helpers


def _tensor(torch: Any, array: np.ndarray) -> torch.Tensor:
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return torch.from_numpy(array.copy())
    # read-only (memory-mapped) arrays are copied lazily by PyTorch only if written; none is
    return torch.from_numpy(np.array(array, copy=not array.flags.writeable))


def _attribute(attr: ir.Attr) -> Any:
    value = attr.value
    if isinstance(value, ir.TensorProtocol):
        return value.numpy()
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    return value


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


_DTYPES: dict[int, str] = {
    ir.DataType.FLOAT: "float32", ir.DataType.DOUBLE: "float64", ir.DataType.FLOAT16: "float16",
    ir.DataType.BFLOAT16: "bfloat16", ir.DataType.INT64: "int64", ir.DataType.INT32: "int32",
    ir.DataType.INT16: "int16", ir.DataType.INT8: "int8", ir.DataType.UINT8: "uint8", ir.DataType.BOOL: "bool",
}  # fmt: skip


def _dtype(torch: Any, onnx_type: int) -> Any:
    try:
        return getattr(torch, _DTYPES[onnx_type])
    except KeyError:
        raise UnsupportedModelError(f"TorchGraph: Cast to ONNX type {onnx_type} is not translated") from None


# ----------------------------------------------------------------------------- ops


def _reshape(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    x, shape = a[0], _ints(a[1])
    if not at.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _slice(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    x = a[0]
    starts, ends = _ints(a[1]), _ints(a[2])
    axes = _ints(a[3]) if len(a) > 3 and a[3] is not None else list(range(len(starts)))
    steps = _ints(a[4]) if len(a) > 4 and a[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step <= 0:
            raise UnsupportedModelError("TorchGraph: Slice with a negative step is not translated")
        index[_axis(axis, x.dim())] = slice(max(min(start, 2**62), -(2**62)), max(min(end, 2**62), -(2**62)), step)
    return x[tuple(index)]


def _gather(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    x, idx = a
    axis = _axis(at.get("axis", 0), x.dim())
    idx = _from_end(torch, idx, x.shape[axis])
    flat = x.index_select(axis, idx.reshape(-1))
    return flat.reshape([*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]])


def _from_end(torch: Any, idx: torch.Tensor, size: int) -> torch.Tensor:
    """Gather indices as ONNX reads them: a negative one counts from the end of the axis."""
    idx = idx.long()
    return torch.where(idx < 0, idx + size, idx)


def _gather_elements(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    x, idx = a
    axis = _axis(at.get("axis", 0), x.dim())
    return torch.gather(x, axis, _from_end(torch, idx, x.shape[axis]))


def _gather_nd(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    x, idx = a
    if at.get("batch_dims", 0):
        raise UnsupportedModelError("TorchGraph: GatherND with batch_dims is not translated")
    m = idx.shape[-1]
    parts = [_from_end(torch, idx[..., i], x.shape[i]) for i in range(m)]
    return x[tuple(parts)]


def _unsqueeze(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    x = a[0]
    axes = _ints(a[1]) if len(a) > 1 and a[1] is not None else list(at["axes"])
    rank = x.dim() + len(axes)
    for axis in sorted(_axis(ax, rank) for ax in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    x = a[0]
    axes = _ints(a[1]) if len(a) > 1 and a[1] is not None else list(at.get("axes", []))
    if not axes:
        return x.squeeze()
    for axis in sorted((_axis(ax, x.dim()) for ax in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def _reduce(name: str) -> Callable:
    def run(torch: Any, a: list, at: Mapping) -> torch.Tensor:
        x = a[0]
        axes = _ints(a[1]) if len(a) > 1 and a[1] is not None else list(at.get("axes", []))
        keep = bool(at.get("keepdims", 1))
        if not axes:
            if at.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        dims = tuple(_axis(ax, x.dim()) for ax in axes)
        if name == "mean":
            return x.mean(dim=dims, keepdim=keep)
        if name == "sum":
            return x.sum(dim=dims, keepdim=keep)
        out = x
        for dim in sorted(dims, reverse=True):
            out = (out.amax if name == "max" else out.amin)(dim=dim, keepdim=keep)
        return out

    return run


def _expand(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    shape = torch.broadcast_shapes(tuple(a[0].shape), tuple(_ints(a[1])))
    return a[0].expand(shape)


def _shape(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    dims = list(a[0].shape)
    start, end = at.get("start", 0), at.get("end", None)
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _range(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    start, limit, delta = (v.item() for v in a)
    return torch.arange(start, limit, delta, dtype=a[0].dtype)


def _constant_of_shape(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    value = at.get("value")
    fill = np.asarray(value).reshape(-1) if value is not None else np.zeros(1, np.float32)
    return torch.full(_ints(a[0]), fill[0].item(), dtype=_tensor(torch, fill).dtype)


def _constant(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    if "value" in at:
        return _tensor(torch, np.asarray(at["value"]))
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64), ("value_floats", np.float32), ("value_ints", np.int64)):
        if key in at:
            return _tensor(torch, np.asarray(at[key], dtype))
    raise UnsupportedModelError(f"TorchGraph: Constant with attributes {sorted(at)} is not translated")


def _split(torch: Any, a: list, at: Mapping) -> tuple:
    x = a[0]
    axis = _axis(at.get("axis", 0), x.dim())
    sizes = _ints(a[1]) if len(a) > 1 and a[1] is not None else at.get("split")
    if not sizes:
        parts = at["num_outputs"]
        size = -(-x.shape[axis] // parts)
        sizes = [min(size, x.shape[axis] - i * size) for i in range(parts)]
    return tuple(torch.split(x, list(sizes), dim=axis))


def _trilu(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    k = int(a[1].item()) if len(a) > 1 and a[1] is not None else 0
    return torch.triu(a[0], k) if at.get("upper", 1) else torch.tril(a[0], k)


def _layer_norm(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    x, scale = a[0], a[1]
    bias = a[2] if len(a) > 2 else None
    axis = _axis(at.get("axis", -1), x.dim())
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + at.get("epsilon", 1e-5)) * scale
    return y + bias if bias is not None else y


def _gemm(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    x, w = a[0], a[1]
    x = x.T if at.get("transA", 0) else x
    w = w.T if at.get("transB", 0) else w
    y = at.get("alpha", 1.0) * (x @ w)
    return y + at.get("beta", 1.0) * a[2] if len(a) > 2 and a[2] is not None else y


def _unpack_codes(torch: Any, packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes holding ``8 // bits`` codes each, the lowest bits first -> one code per element."""
    per_byte = 8 // bits
    b = packed.to(torch.int32)
    parts = [(b >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def _zero_points(torch: Any, zp: torch.Tensor | None, rows: int, blocks: int, bits: int, dtype: Any) -> torch.Tensor:
    if zp is None:
        return torch.full((rows, blocks), float(1 << (bits - 1)), dtype=dtype)
    if zp.dtype == torch.uint8:
        return _unpack_codes(torch, zp.reshape(rows, -1), bits)[:, :blocks].to(dtype)
    return zp.reshape(rows, blocks).to(dtype)


def _nbits_centered(torch: Any, packed: torch.Tensor, zp: torch.Tensor | None, g_idx: Any, at: Mapping) -> torch.Tensor:
    """``MatMulNBits``' weight codes less their zero points, as floats: ``[N, blocks * block]``."""
    if g_idx is not None:
        raise UnsupportedModelError("TorchGraph: MatMulNBits with g_idx is not translated")
    n, bits, block = at["N"], at["bits"], at["block_size"]
    blocks = -(-at["K"] // block)
    codes = _unpack_codes(torch, packed.reshape(n, -1), bits)[:, : blocks * block].float()
    zeros = _zero_points(torch, zp, n, blocks, bits, torch.float32)
    return (codes.reshape(n, blocks, block) - zeros[..., None]).reshape(n, blocks * block)


def _table_centered(torch: Any, packed: torch.Tensor, zp: torch.Tensor | None, at: Mapping) -> torch.Tensor:
    """``GatherBlockQuantized``'s table codes less their zero points, as floats: ``[rows, width]``."""
    if at.get("gather_axis", 0) != 0 or at.get("quantize_axis", 1) not in (1, -1) or packed.dim() != 2:
        raise UnsupportedModelError("TorchGraph: GatherBlockQuantized other than rows of a 2-D table is not translated")
    bits, block = at.get("bits", 4), at["block_size"]
    codes = _unpack_codes(torch, packed, bits).float()
    rows, blocks = codes.shape[0], codes.shape[1] // block
    zeros = _zero_points(torch, zp, rows, blocks, bits, torch.float32)
    return (codes.reshape(rows, blocks, block) - zeros[..., None]).reshape(rows, -1)


def _matmul_nbits(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    centered = _nbits_centered(torch, a[1], _at(a, 3), _at(a, 4), at)
    return _centered_matmul(torch, [a[0], centered, a[2], _at(a, 5)], at)


def _gather_block_quantized(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    return _centered_gather(torch, [_table_centered(torch, a[0], _at(a, 3), at), a[1], a[2]], at)


def _centered_matmul(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    x, centered, scales, bias = a
    n, k, block = at["N"], at["K"], at["block_size"]
    w = (centered.reshape(n, -1, block) * scales.reshape(n, -1, 1)).reshape(n, -1)[:, :k]
    y = x @ w.T
    return y + bias if bias is not None else y


def _centered_gather(torch: Any, a: list, at: Mapping) -> torch.Tensor:
    centered, idx, scales = a
    block = at["block_size"]
    rows = _from_end(torch, idx.reshape(-1), centered.shape[0])
    picked = centered.index_select(0, rows)
    s = scales.index_select(0, rows)
    out = (picked.reshape(rows.numel(), -1, block) * s.reshape(rows.numel(), -1, 1)).reshape(rows.numel(), -1)
    return out.reshape(*idx.shape, centered.shape[1])


def _at(items: Sequence[Any], index: int) -> Any:
    return items[index] if len(items) > index else None


def _binary(fn: Callable) -> Callable:
    return lambda torch, a, at: fn(torch, a[0], a[1])


def _unary(fn: Callable) -> Callable:
    return lambda torch, a, at: fn(torch, a[0])


_OPS: dict[tuple[str, str], Callable[[Any, list, Mapping], Any]] = {
    ("", "Add"): _binary(lambda t, x, y: x + y),
    ("", "Sub"): _binary(lambda t, x, y: x - y),
    ("", "Mul"): _binary(lambda t, x, y: x * y),
    ("", "Div"): _binary(lambda t, x, y: t.div(x, y, rounding_mode="trunc") if not x.is_floating_point() else x / y),
    ("", "Pow"): _binary(lambda t, x, y: t.pow(x, y)),
    ("", "MatMul"): _binary(lambda t, x, y: t.matmul(x, y)),
    ("", "Equal"): _binary(lambda t, x, y: t.eq(x, y)),
    ("", "Less"): _binary(lambda t, x, y: t.lt(x, y)),
    ("", "LessOrEqual"): _binary(lambda t, x, y: t.le(x, y)),
    ("", "Greater"): _binary(lambda t, x, y: t.gt(x, y)),
    ("", "GreaterOrEqual"): _binary(lambda t, x, y: t.ge(x, y)),
    ("", "And"): _binary(lambda t, x, y: t.logical_and(x, y)),
    ("", "Or"): _binary(lambda t, x, y: t.logical_or(x, y)),
    ("", "Not"): _unary(lambda t, x: t.logical_not(x)),
    ("", "Max"): lambda t, a, at: _fold_n(t.maximum, a),
    ("", "Min"): lambda t, a, at: _fold_n(t.minimum, a),
    ("", "Neg"): _unary(lambda t, x: -x),
    ("", "Abs"): _unary(lambda t, x: x.abs()),
    ("", "Sqrt"): _unary(lambda t, x: t.sqrt(x)),
    ("", "Reciprocal"): _unary(lambda t, x: t.reciprocal(x)),
    ("", "Exp"): _unary(lambda t, x: t.exp(x)),
    ("", "Log"): _unary(lambda t, x: t.log(x)),
    ("", "Sin"): _unary(lambda t, x: t.sin(x)),
    ("", "Cos"): _unary(lambda t, x: t.cos(x)),
    ("", "Tanh"): _unary(lambda t, x: t.tanh(x)),
    ("", "Erf"): _unary(lambda t, x: t.erf(x)),
    ("", "Sigmoid"): _unary(lambda t, x: t.sigmoid(x)),
    ("", "Relu"): _unary(lambda t, x: t.relu(x)),
    ("", "Floor"): _unary(lambda t, x: t.floor(x)),
    ("", "Ceil"): _unary(lambda t, x: t.ceil(x)),
    ("", "IsNaN"): _unary(lambda t, x: t.isnan(x)),
    ("", "IsInf"): _unary(lambda t, x: t.isinf(x)),
    ("", "Identity"): _unary(lambda t, x: x),
    ("", "Softmax"): lambda t, a, at: t.softmax(a[0], dim=at.get("axis", -1)),
    ("", "Gelu"): lambda t, a, at: t.nn.functional.gelu(a[0], approximate=at.get("approximate", "none")),
    ("", "Where"): lambda t, a, at: t.where(a[0], a[1], a[2]),
    ("", "Cast"): lambda t, a, at: a[0].to(_dtype(t, at["to"])),
    ("", "Transpose"): lambda t, a, at: a[0].permute(at["perm"]) if "perm" in at else a[0].permute(*reversed(range(a[0].dim()))),
    ("", "Concat"): lambda t, a, at: t.cat([x for x in a if x is not None], dim=at["axis"]),
    ("", "Reshape"): _reshape,
    ("", "Slice"): _slice,
    ("", "Gather"): _gather,
    ("", "GatherND"): _gather_nd,
    ("", "GatherElements"): _gather_elements,
    ("", "Unsqueeze"): _unsqueeze,
    ("", "Squeeze"): _squeeze,
    ("", "Expand"): _expand,
    ("", "Shape"): _shape,
    ("", "Size"): lambda t, a, at: t.tensor(a[0].numel(), dtype=t.int64),
    ("", "Range"): _range,
    ("", "ConstantOfShape"): _constant_of_shape,
    ("", "Constant"): _constant,
    ("", "Split"): _split,
    ("", "Trilu"): _trilu,
    ("", "ReduceMean"): _reduce("mean"),
    ("", "ReduceSum"): _reduce("sum"),
    ("", "ReduceMax"): _reduce("max"),
    ("", "ReduceMin"): _reduce("min"),
    ("", "LayerNormalization"): _layer_norm,
    ("", "Gemm"): _gemm,
    (_MS, "MatMulNBits"): _matmul_nbits,
    (_MS, "GatherBlockQuantized"): _gather_block_quantized,
    (_INTERNAL, "CenteredMatMul"): _centered_matmul,
    (_INTERNAL, "CenteredGather"): _centered_gather,
}


def _fold_n(fn: Callable, args: list) -> torch.Tensor:
    out = args[0]
    for x in args[1:]:
        out = fn(out, x)
    return out
