"""Int8 linears on VNNI: ``quantize``'s integer linears lowered to TVM's ``vpdpbusd``.

TVM imports no quantized operator usefully (QDQ becomes fake-quant float, ``MatMulInteger`` an
int32 x int32 matmul), so the int8 path is tforge's own, in three steps:

1. ONNX side (``lower_int8_linears``): each ``com.microsoft::MatMulIntegerToFloat`` that
   ``quantize`` wrote (uint8 activations with a per-tensor or per-row scale, int8 weights with
   per-channel scales, zero weight zero points) becomes one ``tforge.tvm::TforgeInt8Linear``
   node. Its weight is pre-packed to ``[N/16, K/4, 16, 4]``: the 16 x 4 block one ``vpdpbusd``
   multiplies is then 64 contiguous bytes. The column sums of the weight ride along, because
   ``sum_k (x_k - zp) w_kn = sum_k x_k w_kn - zp * colsum_n`` lets the kernel multiply the raw
   uint8 codes (what ``vpdpbusd`` takes) and correct once per output.
2. Import (``converters``): the node becomes a ``call_tir`` to ``u8s8_packed_matmul`` (an int32
   product, scheduled here, not by the generic rules) followed by the float rescale in Relax ops,
   which the generic rules schedule as elementwise.
3. Kernel schedule (``schedule_packed_matmul``): 8 rows x 32 columns of int32 accumulators in
   registers, the inner 16 x 4 block tensorized with ``vpdpbusd``. TVM ships this intrinsic, but
   written with the operand types LLVM stopped accepting (``<16 x i32>``; LLVM 22 verifies
   ``<64 x i8>``), so it is re-registered here with those types.

Linears this cannot take (N not a multiple of 16, K not a multiple of 4, a non-zero weight zero
point, other shapes of scale) are lowered to standard ``MatMulInteger`` + rescale instead, which
TVM imports as an int32 matmul (correct, not fast), and counted in the statistics.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from tforge.compiler.rewrite import GraphEditor

logger = logging.getLogger(__name__)

__all__ = ["OP_TYPE", "TFORGE_DOMAIN", "converters", "lower_int8_linears", "pack_weight", "schedule_packed_matmul"]

OP_TYPE = "TforgeInt8Linear"
#: The domain of tforge's own nodes for TVM (imported by this backend's converters only).
TFORGE_DOMAIN = "tforge.tvm"
_MS = "com.microsoft"
LANES = 16  # int32 outputs of one vpdpbusd
GROUP = 4  # uint8 x int8 products summed into each int32 lane
INTRIN_NAME = "tforge_dot_16x4_u8i8i32_vnni"


# ----------------------------------------------------------------------------- the math


def pack_weight(q: np.ndarray) -> np.ndarray:
    """``[K, N]`` int8 -> ``[N/16, K/4, 16, 4]`` with ``packed[a, b, c, d] = q[4b + d, 16a + c]``."""
    k, n = q.shape
    if n % LANES or k % GROUP:
        raise ValueError(
            f"pack_weight: [K, N] = [{k}, {n}] needs N % {LANES} == 0 and K % {GROUP} == 0"
        )
    return np.ascontiguousarray(
        q.reshape(k // GROUP, GROUP, n // LANES, LANES).transpose(2, 0, 3, 1)
    )


def unpack_weight(packed: np.ndarray) -> np.ndarray:
    n16, k4, lanes, group = packed.shape
    return np.ascontiguousarray(packed.transpose(1, 3, 0, 2).reshape(k4 * group, n16 * lanes))


# ----------------------------------------------------------------------------- ONNX side


def lower_int8_linears(model: ir.Model) -> dict[str, int]:
    """Rewrite ``quantize``'s integer linears into ``TforgeInt8Linear`` / standard ops, in place."""
    stats: Counter[str] = Counter()
    graph = model.graph
    editor = GraphEditor(model, "tvm-legalize")
    for node in list(graph):
        if node.domain != _MS:
            continue
        if node.op_type != "MatMulIntegerToFloat":
            continue  # DynamicQuantizeMatMul and others: named by check_importable
        a, b, a_scale, b_scale, a_zp, b_zp, *rest = (*node.inputs, None)[:7]
        bias = rest[0] if rest else None
        w = b.const_value.numpy() if b is not None and b.const_value is not None else None
        ws = (
            b_scale.const_value.numpy()
            if b_scale is not None and b_scale.const_value is not None
            else None
        )
        wzp = (
            b_zp.const_value.numpy() if b_zp is not None and b_zp.const_value is not None else None
        )
        reason = None
        if w is None or ws is None or w.ndim != 2 or w.dtype != np.int8:
            reason = "weight is not a constant int8 matrix"
        elif a is None or a.dtype != ir.DataType.UINT8:
            reason = "activation is not uint8"
        elif wzp is not None and np.any(wzp != 0):
            reason = "weight zero point is not 0"
        elif w.shape[1] % LANES or w.shape[0] % GROUP:
            reason = f"[K, N] = {list(w.shape)} is not a multiple of [{GROUP}, {LANES}]"
        elif ws.size not in (1, w.shape[1]):
            reason = "weight scale is neither per tensor nor per column"
        if reason is not None:
            stats[f"int8 linear kept as int32 matmul: {reason}"] += 1
            _to_standard_ops(editor, node)
            continue
        packed = pack_weight(w)
        colsum = w.astype(np.int32).sum(axis=0).astype(np.float32)
        name = b.name or node.name
        packed_v = editor.initializer(f"{name}.vnni_packed", packed)
        colsum_v = editor.initializer(f"{name}.colsum", colsum)
        scale_v = editor.initializer(
            f"{name}.col_scale", np.broadcast_to(ws.astype(np.float32), (w.shape[1],)).copy()
        )
        zp = a_zp if a_zp is not None else editor.initializer(f"{name}.a_zero_point", np.array(0, np.uint8))
        inputs = [a, packed_v, colsum_v, a_scale, scale_v, zp] + (
            [bias] if bias is not None else []
        )
        new = editor.node(
            OP_TYPE, inputs, domain=TFORGE_DOMAIN, name=node.name,
            outputs=f"{node.outputs[0].name}.tvm", before=node,
        )  # fmt: skip
        new.outputs[0].type = node.outputs[0].type
        new.outputs[0].shape = node.outputs[0].shape
        for value in (b, b_scale, b_zp):
            if value is not None:
                editor.retire(value)
        editor.replace_value(node.outputs[0], new.outputs[0])
        editor.remove(node)
        stats["int8 linears to VNNI"] += 1
    editor.drop_retired()  # the unpacked int8 weights and their scales
    return dict(stats)


def _to_standard_ops(editor: GraphEditor, node: ir.Node) -> None:
    """``MatMulIntegerToFloat`` as ``(MatMulInteger -> Cast) * a_scale * b_scale (+ bias)``."""
    a, b, a_scale, b_scale, a_zp, b_zp, *rest = (*node.inputs, None)[:7]
    bias = rest[0] if rest else None
    chain = editor.scope(node, f"{node.name}.")
    out = chain.op("MatMulInteger", [a, b, a_zp, b_zp], "int32")
    out = chain.op("Cast", [out], "float", to=ir.DataType.FLOAT)
    out = chain.op("Mul", [out, b_scale], "col_scale")
    out = chain.op("Mul", [out, a_scale], "row_scale")
    if bias is not None:
        out = chain.op("Add", [out, bias], "bias")
    out.type = node.outputs[0].type
    out.shape = node.outputs[0].shape
    editor.replace_value(node.outputs[0], out)
    editor.remove(node)


# ----------------------------------------------------------------------------- Relax import


@contextlib.contextmanager
def converters() -> Iterator[None]:
    """Make ``from_onnx`` convert ``TforgeInt8Linear`` (it has no hook for extra converters)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map

    def with_ours() -> dict[str, Any]:
        return {**original(), OP_TYPE: _Int8LinearConverter}

    onnx_frontend._get_convert_map = with_ours
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


class _Int8LinearConverter:
    @classmethod
    def get_converter(cls, opset: int) -> Any:
        return cls._impl

    @staticmethod
    def _impl(bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
        from tvm import relax

        x, packed, colsum, a_scale, col_scale, a_zp = (inputs[i] for i in range(6))
        bias = inputs[6] if len(inputs) > 6 else None
        x_shape = [int(d) for d in x.ty.shape]
        n16, k4 = int(packed.ty.shape[0]), int(packed.ty.shape[1])
        k, n = k4 * GROUP, n16 * LANES
        m = int(np.prod(x_shape[:-1]))
        rows = bb.normalize(relax.op.reshape(x, [m, k]))
        gv = bb.add_func(packed_matmul_func(m, n, k), "u8s8_packed_matmul")
        acc = bb.normalize(relax.call_tir(gv, [rows, packed], relax.TensorType([m, n], "int32")))
        acc = relax.op.reshape(acc, [*x_shape[:-1], n])
        value = relax.op.astype(acc, "float32")
        zp = relax.op.astype(a_zp, "float32")
        value = relax.op.subtract(value, relax.op.multiply(zp, colsum))
        value = relax.op.multiply(relax.op.multiply(value, col_scale), a_scale)
        if bias is not None:
            value = relax.op.add(value, bias)
        return value


# ----------------------------------------------------------------------------- the kernel


def packed_matmul_func(m: int, n: int, k: int) -> Any:
    """``C[m, n] = sum_k int32(X[m, k]) * int32(W[n/16, k/4, n%16, k%4])``, scheduled for VNNI."""
    from tvm import te

    x = te.placeholder((m, k), "uint8", name="X")
    w = te.placeholder((n // LANES, k // GROUP, LANES, GROUP), "int8", name="W")
    r = te.reduce_axis((0, k), name="k")
    c = te.compute(
        (m, n),
        lambda i, j: te.sum(
            x[i, r].astype("int32")
            * w[j // LANES, r // GROUP, j % LANES, r % GROUP].astype("int32"),
            axis=r,
        ),
        name="C",
    )
    func = te.create_prim_func([x, w, c])
    sch = schedule_packed_matmul(func, m, n, k)
    # Opaque: FuseOps must not merge the rescale into it (that would drop this schedule).
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)


def _register_intrin() -> None:
    from tvm import s_tir
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for kk in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, kk])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_u8x4 = A.vload([0], "uint8x4")
            a_i32 = T.reinterpret(a_u8x4, dtype="int32")
            # LLVM 22's vpdpbusd takes <64 x i8> for both multiplicands
            a_u8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="int8x64")
            b_i8x64 = B.vload([0, 0], dtype="int8x64")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                a_u8x64,
                b_i8x64,
                dtype="int32x16",
            )

    s_tir.TensorIntrin.register(INTRIN_NAME, desc, impl, override=True)


_registered = False


def schedule_packed_matmul(func: Any, m: int, n: int, k: int) -> Any:
    """8 x 32 register tiles, parallel over tiles, the 16 x 4 inner block on ``vpdpbusd``."""
    global _registered
    from tvm import s_tir

    from .schedules import _divisor_at_most

    if not _registered:
        _register_intrin()
        _registered = True
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("C")
    i, j, r = sch.get_loops(block)
    ti = _divisor_at_most(m, 8)
    tj = 2 if (n // LANES) % 2 == 0 else 1
    i0, i1 = sch.split(i, [None, ti])
    j0, j1, j2 = sch.split(j, [None, tj, LANES])
    r0, r1 = sch.split(r, [None, GROUP])
    sch.reorder(i0, j0, r0, i1, j1, j2, r1)
    outer = sch.fuse(i0, j0)
    sch.parallel(outer)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, outer, preserve_unit_loops=True)
    init = sch.decompose_reduction(block, r0)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.tensorize(j2, INTRIN_NAME)
    sch.unroll(i1)
    sch.unroll(j1)
    return sch
