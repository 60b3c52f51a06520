"""merge-projections: sibling linears become one wide linear and a Split; the numbers stay the same.

Hand-built graphs check each kind (MatMulNBits 4/8-bit, symmetric or with zero points, with and
without bias; float MatMul with and without bias), the skips, and the packed QKV fed to
GroupQueryAttention; the cache LLaMA checks the whole pipeline teacher-forced.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tests.conftest import teacher_forced
from tforge.compiler.pipeline import PassManager
from tforge.compiler.registry import get_pass_class
from tforge.passes.math import block_quant as bq
from tforge.passes.merge_projections import concat_columns, merged_name
from tforge.runtime import ort as ort_runtime

K = 40  # not a multiple of the blocks: the last block is padded, zero points of 3 blocks packed
WIDTHS = (24, 8, 16)
F32 = ir.DataType.FLOAT


def _const(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                    const_value=ir.tensor(array, name=name))  # fmt: skip


class _Builder:
    """A graph reading ``x [1, 3, K]``; every node output named; ``model()`` wraps it."""

    def __init__(self, k: int = K) -> None:
        self.x = ir.Value(name="x", shape=ir.Shape([1, 3, k]), type=ir.TensorType(F32))
        self.inputs = [self.x]
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.outputs: list[ir.Value] = []

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        value = _const(name, array)
        self.initializers.append(value)
        return value

    def node(
        self, op: str, inputs: list, name: str, *, domain: str = "", outputs: int = 1, **attrs
    ) -> list[ir.Value]:
        node = ir.node(
            op, inputs, attributes=attrs or None, domain=domain, num_outputs=outputs, name=name
        )
        for i, out in enumerate(node.outputs):
            out.name = name if outputs == 1 else f"{name}.{i}"
        self.nodes.append(node)
        return list(node.outputs)

    def nbits(self, name: str, w: np.ndarray, *, bits: int = 4, block: int = 16, symmetric: bool = True,
              bias: np.ndarray | None = None, accuracy_level: int = 0, flat_scales: bool = False) -> ir.Value:  # fmt: skip
        t = bq.pack_matmul_nbits(bq.quantize_rtn(w, bits, block, symmetric))
        scales = t.scales.reshape(-1) if flat_scales else t.scales
        inputs = [self.x, self.const(f"{name}.q", t.B), self.const(f"{name}.scales", scales)]
        inputs.append(
            self.const(f"{name}.zero_points", t.zero_points) if t.zero_points is not None else None
        )
        if bias is not None:
            inputs += [None, self.const(f"{name}.bias", bias.astype(np.float32))]
        while inputs[-1] is None:
            inputs.pop()
        (out,) = self.node(
            "MatMulNBits", inputs, name, domain="com.microsoft", **t.attributes(accuracy_level)
        )
        return out

    def matmul(self, name: str, w: np.ndarray, bias: np.ndarray | None = None) -> ir.Value:
        (out,) = self.node(
            "MatMul", [self.x, self.const(f"{name}.weight", w.astype(np.float32))], name
        )
        if bias is not None:
            (out,) = self.node(
                "Add", [out, self.const(f"{name}.bias", bias.astype(np.float32))], f"{name}.add"
            )
        return out

    def model(self) -> ir.Model:
        graph = ir.Graph(self.inputs, self.outputs, nodes=self.nodes, initializers=self.initializers,
                         opset_imports={"": 20, "com.microsoft": 1}, name="siblings")  # fmt: skip
        return ir.Model(graph, ir_version=10)


def _expose(b: _Builder, values: list[ir.Value]) -> None:
    """The first value is a graph output itself; the others are read by a Relu that is one."""
    b.outputs.append(values[0])
    for i, v in enumerate(values[1:]):
        b.outputs += b.node("Relu", [v], f"relu{i}")


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort_runtime.create_session(model, optimize=False)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def _merge(model: ir.Model, spec: str = "merge-projections"):
    return PassManager.parse(spec, progress=lambda _: None).run(model).passes[-1]


def _ops(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph)


def _assert_same(reference: ir.Model, merged: ir.Model, feeds: dict[str, np.ndarray]) -> None:
    want, got = _run(reference, feeds), _run(merged, feeds)
    assert list(got) == list(want)  # the interface and its names are unchanged
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.fixture
def feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((1, 3, K)).astype(np.float32)}


@pytest.mark.parametrize(
    ("bits", "symmetric", "with_bias", "accuracy_level", "flat_scales"),
    [(4, True, False, 0, False), (4, False, True, 0, False), (4, True, True, 4, True), (8, True, True, 0, False),
     (8, False, False, 4, False)],
    ids=["4bit-sym", "4bit-zp-bias", "4bit-sym-bias-acc4-flat-scales", "8bit-sym-bias", "8bit-zp-acc4"],
)  # fmt: skip
def test_matmul_nbits_siblings_merge_exactly(
    rng, feeds, bits, symmetric, with_bias, accuracy_level, flat_scales
) -> None:
    b = _Builder()
    outs = [
        b.nbits(f"proj{i}", rng.standard_normal((K, n)), bits=bits, symmetric=symmetric,
                bias=rng.standard_normal(n) if with_bias else None, accuracy_level=accuracy_level,
                flat_scales=flat_scales)
        for i, n in enumerate(WIDTHS)
    ]  # fmt: skip
    _expose(b, outs)
    reference = b.model()
    model = reference.clone()
    record = _merge(model)

    assert record.stats == {"MatMulNBits x3 -> 1": 1} and not record.skipped
    assert _ops(model)["MatMulNBits"] == 1 and _ops(model)["Split"] == 1
    (wide,) = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert wide.attributes["N"].value == sum(WIDTHS) and wide.attributes["bits"].value == bits
    assert wide.inputs[1].name == "proj0_proj1_proj2.q"  # named after the siblings' weights
    assert [o.name for o in model.graph.outputs] == [o.name for o in reference.graph.outputs]
    _assert_same(reference, model, feeds)


@pytest.mark.parametrize("with_bias", [False, True])
def test_float_matmul_siblings_merge_exactly(rng, feeds, with_bias: bool) -> None:
    b = _Builder()
    outs = [b.matmul(f"lin{i}", rng.standard_normal((K, n)), rng.standard_normal(n) if with_bias else None)
            for i, n in enumerate(WIDTHS)]  # fmt: skip
    _expose(b, outs)
    reference = b.model()
    model = reference.clone()
    record = _merge(model)

    assert record.stats == {"MatMul x3 -> 1": 1} and not record.skipped
    ops = _ops(model)
    assert ops["MatMul"] == 1 and ops["Split"] == 1 and ops["Add"] == int(with_bias)
    assert sum(ops.values()) == sum(_ops(reference).values()) - 2 * (1 + with_bias) + 1
    _assert_same(reference, model, feeds)


def test_two_siblings_gate_up(rng, feeds) -> None:
    b = _Builder()
    gate = b.nbits("mlp.gate_proj", rng.standard_normal((K, 32)))
    up = b.nbits("mlp.up_proj", rng.standard_normal((K, 32)))
    (act,) = b.node("Sigmoid", [gate], "act")
    (mul,) = b.node("Mul", [act, up], "mul")
    b.outputs.append(mul)
    reference = b.model()
    model = reference.clone()
    record = _merge(model)
    assert record.stats == {"MatMulNBits x2 -> 1": 1}
    assert record.details["groups"][0]["widths"] == [32, 32]
    names = {n.inputs[1].name for n in model.graph if n.op_type == "MatMulNBits"}
    assert names == {"mlp.gate_up_proj.q"}
    # the Split's outputs took over the siblings' value names, in the siblings' order
    (split,) = [n for n in model.graph if n.op_type == "Split"]
    assert [o.name for o in split.outputs] == ["mlp.gate_proj", "mlp.up_proj"]
    _assert_same(reference, model, feeds)


@pytest.mark.parametrize(
    ("second", "seen_from_a", "seen_from_b"),
    [({"bits": 8}, "bits 4 vs 8", "bits 8 vs 4"),
     ({"block": 32}, "block_size 16 vs 32", "block_size 32 vs 16"),
     ({"symmetric": False}, "zero_points None vs UINT8", "zero_points UINT8 vs None"),
     ({"accuracy_level": 4}, "accuracy_level 0 vs 4", "accuracy_level 4 vs 0")],
)  # fmt: skip
def test_siblings_that_differ_are_skipped_with_the_reason(
    rng, feeds, second: dict, seen_from_a: str, seen_from_b: str
) -> None:
    b = _Builder()
    outs = [
        b.nbits("a", rng.standard_normal((K, 16))),
        b.nbits("b", rng.standard_normal((K, 16)), **second),
    ]
    _expose(b, outs)
    model = b.model()
    record = _merge(model)
    assert not record.changed and _ops(model)["MatMulNBits"] == 2
    prefix = "not merged with its sibling linears: "
    assert [(s["at"], s["reason"]) for s in record.skipped] == [
        ("MatMulNBits 'a'", prefix + seen_from_a),
        ("MatMulNBits 'b'", prefix + seen_from_b),
    ]


def test_compatible_siblings_merge_and_the_odd_one_is_skipped(rng, feeds) -> None:
    """Q and K at 4 bits, V at 8 (a mixed-precision budget): Q and K merge, V stays alone."""
    b = _Builder()
    outs = [b.nbits("q", rng.standard_normal((K, 16))), b.nbits("k", rng.standard_normal((K, 8))),
            b.nbits("v", rng.standard_normal((K, 8)), bits=8)]  # fmt: skip
    _expose(b, outs)
    reference = b.model()
    model = reference.clone()
    record = _merge(model)
    assert record.stats["MatMulNBits x2 -> 1"] == 1
    assert [s["at"] for s in record.skipped] == ["MatMulNBits 'v'"]
    assert _ops(model)["MatMulNBits"] == 2
    _assert_same(reference, model, feeds)


def test_mixed_kinds_and_integer_linears_are_skipped(rng, feeds) -> None:
    b = _Builder()
    outs = [b.nbits("q", rng.standard_normal((K, 16))), b.matmul("k", rng.standard_normal((K, 16)))]
    for name in ("i0", "i1"):  # int8 linears on the same activation
        w = b.const(f"{name}.w", rng.integers(-127, 127, (K, 8)).astype(np.int8))
        s = b.const(f"{name}.s", np.full(8, 0.01, np.float32))
        outs += b.node("DynamicQuantizeMatMul", [b.x, w, s], name, domain="com.microsoft")
    _expose(b, outs)
    reference = b.model()
    model = reference.clone()
    record = _merge(model)
    assert not record.changed
    reasons = {s["at"]: s["reason"] for s in record.skipped}
    assert reasons["MatMulNBits 'q'"].endswith(
        "MatMulNBits vs MatMul (a merged group is all MatMulNBits or all float MatMul)"
    )
    assert reasons["DynamicQuantizeMatMul 'i0'"].startswith(
        "integer linears (DynamicQuantizeMatMul) read one activation"
    )
    _assert_same(reference, model, feeds)


# ----------------------------------------------------------------------------- GroupQueryAttention

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 16, 64


def _attention_graph(rng: np.random.Generator, do_rotary: int) -> ir.Model:
    """x -> Q/K/V MatMulNBits -> GroupQueryAttention with a past cache (and rotary if asked)."""
    b = _Builder(HIDDEN)
    b.x.shape = ir.Shape([1, "seq", HIDDEN])
    q, k, v = (b.nbits(n, rng.standard_normal((HIDDEN, h * HEAD_DIM)) * 0.3, block=32, accuracy_level=4)
               for n, h in (("q_proj", HEADS), ("k_proj", KV_HEADS), ("v_proj", KV_HEADS)))  # fmt: skip
    cache = ir.Shape([1, KV_HEADS, "past", HEAD_DIM])
    past_k, past_v = (
        ir.Value(name=n, shape=cache, type=ir.TensorType(F32)) for n in ("past_key", "past_value")
    )
    seqlens = ir.Value(name="seqlens_k", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT32))
    total = ir.Value(name="total", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT32))
    positions = ir.Value(
        name="position_ids", shape=ir.Shape([1, "seq"]), type=ir.TensorType(ir.DataType.INT64)
    )
    b.inputs += [past_k, past_v, seqlens, total, *([positions] if do_rotary else [])]
    angles = np.arange(64)[:, None] * 10000.0 ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)[None, :]
    inputs = [q, k, v, past_k, past_v, seqlens, total]
    if do_rotary:
        inputs += [
            b.const("cos", np.cos(angles).astype(np.float32)),
            b.const("sin", np.sin(angles).astype(np.float32)),
            positions,
        ]
    b.outputs += b.node("GroupQueryAttention", inputs, "gqa", domain="com.microsoft", outputs=3,
                        num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=do_rotary)  # fmt: skip
    return b.model()


@pytest.mark.parametrize("do_rotary", [1, 0])
def test_qkv_packed_into_group_query_attention(rng, do_rotary: int) -> None:
    reference = _attention_graph(rng, do_rotary)
    model = reference.clone()
    record = _merge(model)
    assert record.stats == {
        "MatMulNBits x3 -> 1": 1,
        "merged Q/K/V -> GroupQueryAttention packed query": 1,
    }
    assert _ops(model)["Split"] == 0 and _ops(model)["MatMulNBits"] == 1
    (gqa,) = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert (
        gqa.inputs[0].producer().op_type == "MatMulNBits"
        and gqa.inputs[1] is None
        and gqa.inputs[2] is None
    )
    unpacked = reference.clone()
    assert not _merge(unpacked, "merge-projections{packed-qkv=false}").stats.get(
        "merged Q/K/V -> GroupQueryAttention packed query"
    )
    assert _ops(unpacked)["Split"] == 1

    past_key = past_value = np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)
    seq, done = 5, 0
    for step in range(3):  # a prompt from an empty cache, then two steps of one token
        feeds = {
            "x": rng.standard_normal((1, seq, HIDDEN)).astype(np.float32), "past_key": past_key, "past_value": past_value,
            "seqlens_k": np.array([done + seq - 1], np.int32), "total": np.array(done + seq, np.int32),
            "position_ids": np.arange(done, done + seq, dtype=np.int64)[None, :],
        }  # fmt: skip
        if not do_rotary:
            del feeds["position_ids"]
        want = _run(reference, feeds)
        for merged in (model, unpacked):
            got = _run(merged, feeds)
            for name in want:
                np.testing.assert_allclose(
                    got[name], want[name], rtol=0, atol=1e-6, err_msg=f"step {step}: {name}"
                )
        past_key, past_value, done, seq = want["gqa.1"], want["gqa.2"], done + seq, 1


# ----------------------------------------------------------------------------- cache LLaMA

LAYERS = 2
IDS = np.random.default_rng(2).integers(3, 96, 12)
PREFILL = 8  # then 4 decode steps


@pytest.mark.parametrize(
    "spec", ["quantize-weights{bits=4 block=32},ort-fuse", "ort-fuse"], ids=["4bit", "float"]
)
def test_cache_llama_logits_equal_with_fewer_linears(llama_canonical, spec: str) -> None:
    reference = llama_canonical["dynamo"].clone()
    tforge.compile(reference, spec, progress=lambda _: None)
    model = llama_canonical["dynamo"].clone()  # one pipeline: its properties check out together
    result = tforge.compile(model, f"{spec},merge-projections", progress=lambda _: None)
    record = result.report.passes[-1]

    op = "MatMulNBits" if "quantize" in spec else "MatMul"
    assert record.stats == {f"{op} x3 -> 1": LAYERS, f"{op} x2 -> 1": LAYERS}, record.stats
    assert not record.skipped
    # head_dim 8: ort-fuse rotates Q and K with RotaryEmbedding before GQA, so the Q/K/V Split stays
    assert _ops(model)[op] == _ops(reference)[op] - 3 * LAYERS
    assert _ops(model)["Split"] == _ops(reference)["Split"] + 2 * LAYERS

    want, _ = teacher_forced(reference, IDS, PREFILL, optimize=False)
    got, shapes = teacher_forced(model, IDS, PREFILL, optimize=False)
    assert shapes == [(1, 2, len(IDS), 8)] * 2 * LAYERS
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(
            g, w, rtol=0, atol=1e-6 * float(np.abs(w).max()), err_msg=f"step {step}"
        )


def test_registered_and_in_a_pipeline_after_ort_fuse() -> None:
    cls = get_pass_class("merge-projections")
    assert cls.summary.startswith("Merge sibling linears")
    passes = PassManager.parse("canonicalize,quantize-weights,ort-fuse,merge-projections").passes
    assert [p.name for p in passes][-1] == "merge-projections"


def test_names_and_concatenation() -> None:
    assert merged_name(["a.q_proj.w", "a.k_proj.w", "a.v_proj.w"]) == "a.q_k_v_proj.w"
    assert merged_name(["m/gate_proj/MatMul", "m/up_proj/MatMul"]) == "m/gate_up_proj/MatMul"
    assert merged_name(["w", "w"]) == "w.merged"
    flat = concat_columns([np.arange(6.0), np.arange(4.0)], [3, 2], 0)  # 2 values a column, flat
    assert flat.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    blocks = concat_columns([np.zeros((3, 2, 8)), np.ones((2, 2, 8))], [3, 2], 0)
    assert blocks.shape == (5, 2, 8) and blocks[3:].all()
    assert concat_columns([np.zeros((4, 3)), np.ones((4, 2))], [3, 2], 1).shape == (4, 5)
