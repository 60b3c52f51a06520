"""quantize-weights' packings, bit for bit against ONNX Runtime's own kernels and quantizer.

Each test builds a one-node model, runs it in ORT with its graph optimizations off on an
identity input (so the output is the weight ORT dequantized, with no rounding from a dot
product) and compares with :func:`block_quant.dequantize` exactly. K is never a multiple of
the block, so the padding of the last block is always exercised.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnxruntime.capi import _pybind_state as ort_c

from tforge.passes.math import block_quant as bq
from tforge.runtime import ort as ort_runtime

_MS = "com.microsoft"


def _weight(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    w = rng.normal(size=(k, n)).astype(np.float32)
    w[rng.integers(0, k, 3), rng.integers(0, n, 3)] *= 8  # a few outliers: uneven block ranges
    w[:, 0] = np.abs(w[:, 0])  # a column of one sign: asymmetric zero points at the edge
    return w


def _one_node_model(
    op: str,
    domain: str,
    inputs: list[tuple[str, np.ndarray | None]],
    graph_input: tuple[str, ir.DataType, list[int]],
    attributes: dict[str, int],
    out_shape: list[int],
    opset: int = 21,
) -> ir.Model:
    """``y = op(...)`` where one input is a graph input and the others are initializers."""
    name, dtype, shape = graph_input
    x = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
    values: list[ir.Value | None] = []
    initializers = []
    for input_name, array in inputs:
        if input_name == name:
            values.append(x)
        elif array is None:
            values.append(None)
        else:
            v = ir.Value(name=input_name, const_value=ir.tensor(array, name=input_name))
            v.type, v.shape = ir.TensorType(v.const_value.dtype), ir.Shape(v.const_value.shape)
            initializers.append(v)
            values.append(v)
    while values[-1] is None:
        values.pop()
    attrs = [ir.AttrInt64(key, value) for key, value in attributes.items()]
    node = ir.Node(domain, op, values, attributes=attrs, outputs=[ir.Value(name="y")], name="node")
    y = node.outputs[0]
    y.type, y.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(out_shape)
    graph = ir.Graph(
        [x], [y], nodes=[node], initializers=initializers, opset_imports={"": opset, _MS: 1}
    )
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort_runtime.create_session(model, optimize=False)
    return ort_runtime.run(session, feeds)["y"]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("bits", bq.MATMUL_NBITS_BITS)
def test_matmul_nbits_dequantizes_bit_for_bit(rng: np.random.Generator, bits: int, block: int, symmetric: bool) -> None:
    k, n = 3 * block + 5, 12  # the last block is padded
    w = _weight(rng, k, n)
    q = bq.quantize_rtn(w, bits, block, symmetric)
    t = bq.pack_matmul_nbits(q)
    model = _one_node_model(
        "MatMulNBits", _MS,
        [("a", None), ("B", t.B), ("scales", t.scales), ("zero_points", t.zero_points)],
        ("a", ir.DataType.FLOAT, [k, k]), t.attributes(accuracy_level=0), [k, n],
    )  # fmt: skip

    got = _run(model, {"a": np.eye(k, dtype=np.float32)})

    expected = bq.dequantize(q)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(expected - w).max() > 0  # the weight really was rounded (the test can fail)
    back = bq.unpack_matmul_nbits(t.B, t.scales, t.zero_points, k=k, n=n, bits=bits, block_size=block)
    np.testing.assert_array_equal(back.codes[:, :k], q.codes[:, :k])
    np.testing.assert_array_equal(back.zero_point_values(), q.zero_point_values())


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("bits", bq.MATMUL_NBITS_BITS)
def test_rtn_with_ort_rounding_is_ort_quantizer(rng: np.random.Generator, bits: int, block: int, symmetric: bool) -> None:
    """``rounding="ort"`` gives ORT's own quantizer's bytes, scales and zero points exactly."""
    k, n = 2 * block + 7, 10
    w = _weight(rng, k, n)
    q = bq.quantize_rtn(w, bits, block, symmetric, rounding="ort")
    t = bq.pack_matmul_nbits(q)
    n_blocks = q.n_blocks
    packed = np.zeros((n, n_blocks, block * bits // 8), np.uint8)
    scales = np.zeros(n * n_blocks, np.float32)
    zero_points = np.zeros(n * -(-(n_blocks * bits) // 8), np.uint8)
    quantize = {2: ort_c.quantize_matmul_2bits, 4: ort_c.quantize_matmul_4bits, 8: ort_c.quantize_matmul_8bits}[bits]
    quantize(packed, np.ascontiguousarray(w), scales, zero_points, block, n, k, symmetric)

    np.testing.assert_array_equal(t.scales.reshape(-1), scales)
    # codes of the padding rows are never read; compare the codes of the K real rows
    ours = bq.unpack_bits(t.B, bits).reshape(n, -1)[:, :k]
    theirs = bq.unpack_bits(packed, bits).reshape(n, -1)[:, :k]
    np.testing.assert_array_equal(ours, theirs)
    if not symmetric:
        # the zero points of the real blocks (ORT fills the padding slots of a byte differently
        # for 2 and 4 bits; they are never read)
        theirs_zp = bq.unpack_bits(zero_points.reshape(n, -1), bits)[:, :n_blocks]
        np.testing.assert_array_equal(q.zero_points, theirs_zp)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_linear_with_block_size_bit_for_bit(rng: np.random.Generator, bits: int, block: int, symmetric: bool) -> None:
    k, n = 2 * block + 5, 6  # DequantizeLinear allows a short last block
    w = _weight(rng, k, n)
    q = bq.quantize_rtn(w, bits, block, symmetric)
    t = bq.pack_dequantize_linear(q)
    model = _one_node_model(
        "MatMul", "", [("x", t.x), ("a", None)], ("a", ir.DataType.FLOAT, [n, n]), {}, [k, n],
    )  # fmt: skip
    # x = DequantizeLinear(codes, scales, zero_points) feeding MatMul(x, I): the weight itself
    x_value = model.graph.initializers["x"]
    inputs = [x_value]
    for name, array in (("x_scale", t.x_scale), ("x_zero_point", t.x_zero_point)):
        if array is not None:
            v = ir.Value(name=name, const_value=ir.tensor(array, name=name))
            v.type, v.shape = ir.TensorType(v.const_value.dtype), ir.Shape(v.const_value.shape)
            model.graph.register_initializer(v)
            inputs.append(v)
    dq = ir.Node("", "DequantizeLinear", inputs, attributes=[ir.AttrInt64(k_, v) for k_, v in t.attributes().items()], name="dq")
    model.graph.insert_before(model.graph.node("node"), dq)
    model.graph.node("node").replace_input_with(0, dq.outputs[0])

    got = _run(model, {"a": np.eye(n, dtype=np.float32)})

    np.testing.assert_array_equal(got, bq.dequantize(q))


@pytest.mark.parametrize(
    ("bits", "storage", "symmetric"),
    [(4, "uint8", True), (4, "uint8", False), (8, "uint8", True), (8, "uint8", False),
     (2, "uint8", True), (2, "uint8", False), (4, "int4", True), (4, "int4", False)],
)  # fmt: skip
@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_gather_block_quantized_bit_for_bit(rng: np.random.Generator, bits: int, storage: str, symmetric: bool, block: int) -> None:
    vocab, hidden = 11, 2 * block
    table = _weight(rng, vocab, hidden)
    q = bq.quantize_rtn(table.T, bits, block, symmetric)
    t = bq.pack_gather_block_quantized(q, storage)  # type: ignore[arg-type]
    ids = rng.integers(0, vocab, size=(2, 7))
    model = _one_node_model(
        "GatherBlockQuantized", _MS,
        [("data", t.data), ("ids", None), ("scales", t.scales), ("zero_points", t.zero_points)],
        ("ids", ir.DataType.INT64, [2, 7]), t.attributes(), [2, 7, hidden],
    )  # fmt: skip

    got = _run(model, {"ids": ids})

    np.testing.assert_array_equal(got, bq.dequantize(q).T[ids])
