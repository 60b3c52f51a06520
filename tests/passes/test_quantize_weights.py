"""quantize-weights: block-wise 4/8-bit linears on MatMulNBits, embeddings on GatherBlockQuantized."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from tests.models.tiny import pre_norm_block
from tforge import testing
from tforge.backends.ort import kernels_run
from tforge.compiler.calibration import STATS_KEY, calibrate_model
from tforge.compiler.pass_infra import PassResult
from tforge.compiler.pipeline import PassManager
from tforge.compiler.rewrite import current_weight
from tforge.compiler.structure import block_map, const_array
from tforge.errors import PassConfigError
from tforge.passes.math import block_quant as bq
from tforge.passes.quantize_weights import QuantizeWeights
from tforge.runtime import ort as ort_runtime

# A tiny LM: embedding, one linear, and an LM head tied to the embedding (read transposed).
TIED_LM = """
<ir_version: 10, opset_import: ["" : 21]>
lm (int64[B, S] input_ids) => (float[B, S, 96] logits)
<float[96, 64] emb, float[64, 64] w, float[64] b>
{
    e = Gather (emb, input_ids)
    h0 = MatMul (e, w)
    h = Add (h0, b)
    et = Transpose <perm = [1, 0]> (emb)
    logits = MatMul (h, et)
}
"""


def _block(rng: np.random.Generator) -> ir.Model:
    text = pre_norm_block()
    # 8-wide linears: blocks of 16 pad K; the FFN's down projection (K = 16) is one block
    return testing.model_from_onnx_text(
        text, **testing.random_float_initializers(text, rng),
        heads=np.array([0, 4, 2, 4], np.int64), merged=np.array([0, 4, 8], np.int64),
    )  # fmt: skip


def _dequantized_reference(model: ir.Model, bits: int, block: int, symmetric: bool) -> ir.Model:
    """The float model whose weights are what MatMulNBits will compute with."""
    ref = model.clone()
    for lin in block_map(ref).linears:
        w = np.asarray(const_array(current_weight(lin)), np.float32)
        current_weight(lin).const_value = ir.tensor(bq.dequantize(bq.quantize_rtn(w, bits, block, symmetric)))
    return ref


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (2, False)])
def test_rtn_lowering_computes_with_the_dequantized_weights(rng: np.random.Generator, bits: int, symmetric: bool) -> None:
    model = _block(rng)
    reference = _dequantized_reference(model, bits, 16, symmetric)

    result = QuantizeWeights(bits=bits, block=16, symmetric=symmetric, accuracy_level=0)(model)

    assert result.stats["quantized"] == 6
    assert not block_map(model).linears  # no MatMul by a constant weight is left
    feeds = {"x": rng.normal(size=(3, 4, 8)).astype(np.float32)}
    testing.assert_ort_allclose(reference, model, feeds, atol=1e-5)
    ran = kernels_run(model, feeds)
    assert sum(n for (op, _), n in ran.items() if op == "MatMulNBits") == 6


def test_grid_entries_give_matching_linears_their_own_block_and_zero_points(rng: np.random.Generator) -> None:
    model = _block(rng)
    names = [lin.name for lin in block_map(model).linears]
    picked = names[1]  # one linear by its full name, the others on the pass's grid
    reference = model.clone()
    for lin in block_map(reference).linears:
        block, symmetric = (16, False) if lin.name == picked else (32, True)
        w = np.asarray(const_array(current_weight(lin)), np.float32)
        current_weight(lin).const_value = ir.tensor(bq.dequantize(bq.quantize_rtn(w, 4, block, symmetric)))

    result = QuantizeWeights(block=32, grid=(f"{picked}:16:asym",), accuracy_level=0)(model)

    assert result.stats["quantized"] == 6
    grids = {
        (n.attributes["block_size"].value, len(n.inputs) > 3 and n.inputs[3] is not None)
        for n in model.graph if n.op_type == "MatMulNBits"
    }  # fmt: skip
    assert grids == {(16, True), (32, False)}
    feeds = {"x": rng.normal(size=(3, 4, 8)).astype(np.float32)}
    testing.assert_ort_allclose(reference, model, feeds, atol=1e-5)
    for bad in ("v_proj:16", "v_proj:48:asym", "v_proj:16:zero", ":16:asym"):
        with pytest.raises(PassConfigError, match="grid entry"):
            QuantizeWeights(grid=(bad,))


def test_accuracy_level_4_runs_int8_activations_close_to_float(rng: np.random.Generator) -> None:
    model = _block(rng)
    reference = _dequantized_reference(model, 4, 16, True)
    QuantizeWeights(block=16)(model)  # accuracy-level 4: activations quantized inside the kernel
    feeds = {"x": rng.normal(size=(3, 4, 8)).astype(np.float32)}
    a = ort_runtime.run(ort_runtime.create_session(reference, optimize=False), feeds)["y"]
    b = ort_runtime.run(ort_runtime.create_session(model, optimize=False), feeds)["y"]
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


@pytest.mark.parametrize(("embedding_bits", "embedding_block"), [(4, 0), (8, 0), (8, 16)])
def test_tied_embedding_and_head_share_one_copy(rng: np.random.Generator, embedding_bits: int, embedding_block: int) -> None:
    """At the linears' width or wider (an 8-bit table with 4-bit linears), in the linears' blocks
    or its own: one copy either way, which the head reads with the table's bits and block."""
    from tforge.compiler.pipeline import PassManager

    model = testing.model_from_onnx_text(
        TIED_LM, emb=rng.normal(size=(96, 64)).astype(np.float32), w=rng.normal(size=(64, 64)).astype(np.float32) / 8,
        b=rng.normal(size=64).astype(np.float32),
    )  # fmt: skip
    PassManager.parse("canonicalize", progress=lambda _: None).run(model)  # unties the head (W = emb^T)
    emb = np.asarray(const_array(model.graph.initializers["emb"]))

    result = QuantizeWeights(
        block=32, accuracy_level=0, embedding_bits=embedding_bits, embedding_block=embedding_block
    )(model)

    assert result.stats["embedding quantized"] == 1 and result.stats["quantized"] == 2
    assert not [v for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT and v.const_value.size >= 96 * 64]
    table_bytes = 96 * 64 * embedding_bits // 8
    packed = [v for v in model.graph.initializers.values() if v.dtype == ir.DataType.UINT8 and v.const_value.size == table_bytes]
    assert len(packed) == 1  # the table's bytes, once: the gather and the head read them
    head = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.outputs[0].is_graph_output())
    assert head.attributes["bits"].value == embedding_bits
    assert head.attributes["block_size"].value == (embedding_block or 32)
    q = bq.quantize_rtn(emb.T, embedding_bits, embedding_block or 32, True)
    table = bq.dequantize(q).T  # [vocab, hidden]: what both the gather and the head compute with
    ids = rng.integers(0, 96, size=(2, 5))
    outputs = ort_runtime.run(ort_runtime.create_session(_with_head_input(model), optimize=False), {"input_ids": ids})
    np.testing.assert_allclose(outputs["logits"], outputs["h"] @ table.T, rtol=1e-5, atol=1e-4)


def test_the_tables_first_rows_at_8_bits_feed_the_gather_and_the_tied_head(rng: np.random.Generator) -> None:
    """embedding-8bit-rows: the first rows (a BPE vocabulary's most frequent tokens) at 8 bits, the
    rest at 4, each stored once; every id, negative ones too, gathers its row from the part it
    lies in, and the head's logits come out in the table's row order."""
    from tforge.runtime.torch_exec import TorchGraph

    model = testing.model_from_onnx_text(
        TIED_LM, emb=rng.normal(size=(96, 64)).astype(np.float32), w=rng.normal(size=(64, 64)).astype(np.float32) / 8,
        b=rng.normal(size=64).astype(np.float32),
    )  # fmt: skip
    PassManager.parse("canonicalize", progress=lambda _: None).run(model)
    emb = np.asarray(const_array(model.graph.initializers["emb"]))

    result = QuantizeWeights(block=32, accuracy_level=0, embedding_bits=4, embedding_8bit_rows=40)(model)

    assert result.stats["embedding quantized"] == 1 and result.stats["quantized"] == 2
    assert result.stats["embedding rows at 8 bits: the first 40 of 96"] == 1
    packed = sorted(v.const_value.size for v in model.graph.initializers.values() if v.dtype == ir.DataType.UINT8)
    assert packed == [56 * 64 // 2, 64 * 64 // 2, 40 * 64]  # each table row once; the other linear
    head = next(r for r in result.details["layers"] if "tied" in r["method"])
    assert head["rows_8bit"] == 40
    table = np.concatenate([
        bq.dequantize(bq.quantize_rtn(emb[:40].T, 8, 32, True)).T,
        bq.dequantize(bq.quantize_rtn(emb[40:].T, 4, 32, True)).T,
    ])  # fmt: skip
    ids = np.array([[0, 39, 40, 95, -1], [-96, -57, -56, 7, 63]], np.int64)
    probed = model.clone()
    linear = next(n for n in probed.graph if n.op_type == "MatMulNBits" and len(n.inputs) == 6)  # w, with its bias
    linear.inputs[0].name, linear.outputs[0].name = "embedded", "h"
    probed.graph.outputs.extend([linear.inputs[0], linear.outputs[0]])
    outputs = ort_runtime.run(ort_runtime.create_session(probed, optimize=False), {"input_ids": ids})
    np.testing.assert_array_equal(outputs["embedded"], table[ids])
    np.testing.assert_allclose(outputs["logits"], outputs["h"] @ table.T, rtol=1e-5, atol=1e-4)
    torch_logits = TorchGraph(model.graph, ["logits"]).run({"input_ids": ids})[0].numpy()
    np.testing.assert_allclose(torch_logits, outputs["logits"], rtol=1e-5, atol=1e-4)
    with pytest.raises(PassConfigError, match="embedding-8bit-rows keeps some rows at 8 bits"):
        QuantizeWeights(embedding_bits=8, embedding_8bit_rows=40)


def test_embedding_block_that_does_not_divide_the_width_is_a_skip_with_the_fix(rng: np.random.Generator) -> None:
    def lm() -> ir.Model:
        model = testing.model_from_onnx_text(
            TIED_LM, emb=rng.normal(size=(96, 64)).astype(np.float32), w=rng.normal(size=(64, 64)).astype(np.float32),
            b=rng.normal(size=64).astype(np.float32),
        )  # fmt: skip
        PassManager.parse("canonicalize", progress=lambda _: None).run(model)
        return model

    coarse = QuantizeWeights(block=128, accuracy_level=0)(lm())
    assert coarse.stats["embedding quantized"] == 0
    assert [s.reason for s in coarse.skips] == [
        "embedding width 64 is not a multiple of block 128 (set embedding-block to a divisor)"
    ]
    assert QuantizeWeights(block=128, embedding_block=32, accuracy_level=0)(lm()).stats["embedding quantized"] == 1
    with pytest.raises(PassConfigError, match="embedding-block: block must be a power of two"):
        QuantizeWeights(embedding_block=48)


def _with_head_input(model: ir.Model) -> ir.Model:
    """A copy that also outputs the head's input ``h`` (the first linear's output)."""
    clone = model.clone()
    head = next(n for n in clone.graph if n.op_type == "MatMulNBits" and n.outputs[0].is_graph_output())
    h = head.inputs[0]
    h.name = "h"
    clone.graph.outputs.append(h)
    return clone


def test_gptq_has_lower_output_error_than_rtn(rng: np.random.Generator) -> None:
    model = _block(rng)
    mixing = rng.normal(size=(8, 8))
    feeds = [{"x": (rng.normal(size=(4, 4, 8)) @ mixing).astype(np.float32)} for _ in range(32)]
    model.meta[STATS_KEY] = calibrate_model(model, feeds, gram=True, progress=lambda _: None)
    rtn = model.clone()
    rtn.meta[STATS_KEY] = model.meta[STATS_KEY]

    by_rtn = QuantizeWeights(block=16)(rtn).details["layers"]
    by_gptq = QuantizeWeights(block=16, method="gptq")(model).details["layers"]

    total = lambda rows: sum(r["relative_output_error"] for r in rows)  # noqa: E731
    assert total(by_gptq) < 0.7 * total(by_rtn), (total(by_gptq), total(by_rtn))


def test_gptq_chooses_the_tied_tables_codes_from_the_heads_inputs(rng: np.random.Generator) -> None:
    """The tied head is the model's most sensitive tensor (SmolLM2: +14.8% perplexity at 4-bit
    RTN, +2.5% with GPTQ codes): method=gptq picks the table's codes from the head's E[h h^T],
    and the gather still reads the same bytes as the head."""

    def lm() -> ir.Model:
        model = testing.model_from_onnx_text(
            TIED_LM, emb=rng.normal(size=(96, 64)).astype(np.float32),
            w=(rng.normal(size=(64, 64)) @ np.diag(np.geomspace(0.05, 3.0, 64))).astype(np.float32),
            b=rng.normal(size=64).astype(np.float32),
        )  # fmt: skip
        PassManager.parse("canonicalize", progress=lambda _: None).run(model)
        feeds = [{"input_ids": rng.integers(0, 96, size=(2, 8))} for _ in range(24)]
        model.meta[STATS_KEY] = calibrate_model(model, feeds, gram=True, progress=lambda _: None)
        return model

    base = lm()
    rtn, gptq_model = base.clone(), base.clone()
    rtn.meta[STATS_KEY] = gptq_model.meta[STATS_KEY] = base.meta[STATS_KEY]
    by_rtn = QuantizeWeights(block=32, accuracy_level=0, embedding_bits=4)(rtn)
    by_gptq = QuantizeWeights(block=32, accuracy_level=0, embedding_bits=4, method="gptq")(gptq_model)

    def head_error(result: PassResult) -> float:
        return next(r for r in result.details["layers"] if r["method"].endswith("(tied to the embedding)"))[
            "relative_output_error"
        ]

    assert by_gptq.stats["quantized: 4-bit gptq (tied to the embedding)"] == 1
    assert by_rtn.stats["quantized: 4-bit rtn (tied to the embedding)"] == 1
    assert head_error(by_gptq) < 0.8 * head_error(by_rtn), (head_error(by_gptq), head_error(by_rtn))

    # sequential rounds pack the table first, from the head's statistics on the float model
    head_input = next(n for n in base.graph if n.op_type == "MatMul" and n.outputs[0].is_graph_output()).inputs[0]
    assert QuantizeWeights(method="gptq", sequential=True).gram_wanted(base) == {head_input.name}
    assert QuantizeWeights(method="gptq", sequential=True, embedding_bits=0).gram_wanted(base) == set()

    clone = _with_head_input(gptq_model)  # the gather's rows are the head's columns, one copy
    gather = next(n for n in clone.graph if n.op_type == "GatherBlockQuantized")
    gather.outputs[0].name = "rows"
    clone.graph.outputs.append(gather.outputs[0])
    ids = np.arange(96, dtype=np.int64).reshape(1, 96)
    outputs = ort_runtime.run(ort_runtime.create_session(clone, optimize=False), {"input_ids": ids})
    np.testing.assert_allclose(outputs["logits"][0], outputs["h"][0] @ outputs["rows"][0].T, rtol=1e-5, atol=1e-3)


def test_qdq_format_uses_dequantize_linear_with_blocks(rng: np.random.Generator) -> None:
    text = pre_norm_block().replace('"" : 18', '"" : 21')
    model = testing.model_from_onnx_text(
        text, **testing.random_float_initializers(text, rng),
        heads=np.array([0, 4, 2, 4], np.int64), merged=np.array([0, 4, 8], np.int64),
    )  # fmt: skip
    reference = _dequantized_reference(model, 4, 16, False)
    QuantizeWeights(block=16, symmetric=False, format="qdq")(model)
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph) == 6
    testing.assert_ort_allclose(reference, model, {"x": rng.normal(size=(2, 4, 8)).astype(np.float32)}, atol=1e-5)


def test_options_are_checked() -> None:
    with pytest.raises(PassConfigError, match="quantize-weights: bits must be one of"):
        QuantizeWeights(bits=3)
    with pytest.raises(PassConfigError, match="block must be a power of two"):
        QuantizeWeights(block=48)
    with pytest.raises(PassConfigError, match="format=qdq has 4- and 8-bit types only"):
        QuantizeWeights(bits=2, format="qdq")


@pytest.mark.parametrize(("act_order", "clip_search"), [(True, True), (False, False)])
def test_gptq_math_lowers_the_output_error_on_correlated_inputs(
    rng: np.random.Generator, act_order: bool, clip_search: bool
) -> None:
    from tforge.passes.math import gptq

    k, n = 80, 24  # K not a multiple of the block: the last block is padded
    x = rng.normal(size=(2048, k)) @ rng.normal(size=(k, k))  # correlated input channels
    w = rng.normal(size=(k, n)).astype(np.float32)
    gram = x.T @ x / len(x)

    result = gptq.gptq_quantize(
        w, gram, 4, 32, symmetric=False, act_order=act_order, clips=gptq.DEFAULT_CLIPS if clip_search else None
    )

    assert result.error < 0.7 * result.rtn_error, (result.error, result.rtn_error)
    y_hat = x @ bq.dequantize(result.q)  # the error reported is the one on the samples
    np.testing.assert_allclose(((x @ w - y_hat) ** 2).sum(axis=1).mean(), result.error, rtol=1e-6)
