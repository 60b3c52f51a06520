"""prune-ffn: up/gate columns and down rows go together; zero-weight channels go without a trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.shape_inference
import onnx_ir as ir
import pytest

import tforge
from tforge import testing
from tforge.compiler import verify
from tforge.compiler.calibration import FEEDS_KEY, STATS_KEY, calibrate_model
from tforge.compiler.pipeline import PassManager
from tforge.compiler.structure import const_array, find_blocks
from tforge.errors import PassConfigError, PreconditionError
from tforge.passes.prune_ffn import PruneFfn
from tforge.runtime import ort as ort_runtime

# BERT-style: LayerNorm, GELU FFN with biases on up and down.
GELU_FFN = """
<ir_version: 10, opset_import: ["" : 20]>
block (float[B, S, 8] x) => (float[B, S, 8] y)
<float[8] g, float[8] b, float[8, 16] wu, float[16] bu, float[16, 8] wd, float[8] bd>
{
    h = LayerNormalization <axis = -1> (x, g, b)
    u0 = MatMul (h, wu)
    u = Add (u0, bu)
    a = Gelu (u)
    d0 = MatMul (a, wd)
    d = Add (d0, bd)
    y = Add (x, d)
}
"""

# LLaMA-style: RMSNorm, SwiGLU without biases (compensation must create down's bias).
GATED_FFN = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, S, 8] x) => (float[B, S, 8] y)
<float[8] g, int64[1] axes, float eps, float[8, 16] wg, float[8, 16] wu, float[16, 8] wd>
{
    sq = Mul (x, x)
    ms = ReduceMean <keepdims = 1> (sq, axes)
    e = Add (ms, eps)
    rt = Sqrt (e)
    inv = Reciprocal (rt)
    n = Mul (x, inv)
    h = Mul (n, g)
    gt = MatMul (h, wg)
    sg = Sigmoid (gt)
    act = Mul (gt, sg)
    u = MatMul (h, wu)
    m = Mul (act, u)
    y0 = MatMul (m, wd)
    y = Add (x, y0)
}
"""

# The FFN activation is also a graph output: its width must not change.
EXPOSED = """
<ir_version: 10, opset_import: ["" : 20]>
block (float[B, S, 8] x) => (float[B, S, 8] y, float[B, S, 16] a)
<float[8, 16] wu, float[16, 8] wd>
{
    u = MatMul (x, wu)
    a = Gelu (u)
    d = MatMul (a, wd)
    y = Add (x, d)
}
"""

ZERO_ROWS = np.array([1, 2, 5, 6, 9, 12, 13, 15])
KEPT = np.setdiff1d(np.arange(16), ZERO_ROWS)


def _model(text: str, rng: np.random.Generator) -> ir.Model:
    arrays = {
        "g": rng.uniform(0.5, 1.5, 8),
        "b": rng.normal(size=8) * 0.1,
        "wu": rng.normal(size=(8, 16)),
        "bu": rng.normal(size=16) * 0.1,
        "wg": rng.normal(size=(8, 16)),
        "wd": rng.normal(size=(16, 8)),
        "bd": rng.normal(size=8) * 0.1,
        "axes": np.array([-1], np.int64),
        "eps": np.array(1e-6, np.float32),
    }
    declared = text.split("{")[0]
    return testing.model_from_onnx_text(text, **{k: v for k, v in arrays.items() if f" {k}" in declared})


def _feeds(rng: np.random.Generator, batch: int = 2, seq: int = 5) -> dict[str, np.ndarray]:
    return {"x": rng.normal(size=(batch, seq, 8)).astype(np.float32)}


def _calibrate(model: ir.Model, rng: np.random.Generator, gram: bool = True) -> None:
    model.meta[STATS_KEY] = calibrate_model(model, [_feeds(rng, 4, 8) for _ in range(8)], gram=gram)


def _weight(model: ir.Model, node_output: str) -> np.ndarray:
    node = next(n for n in model.graph if n.outputs[0].name == node_output)
    return const_array(node.inputs[1])


@pytest.mark.parametrize("text", [GELU_FFN, GATED_FFN], ids=["gelu-biases", "swiglu-rmsnorm"])
@pytest.mark.parametrize("importance", ["activation", "obs"])
def test_channels_with_zero_down_rows_go_exactly(text: str, importance: str, rng: np.random.Generator) -> None:
    model = _model(text, rng)
    wd = next(v for k, v in model.graph.initializers.items() if k == "wd")
    rows = wd.const_value.numpy().copy()
    rows[ZERO_ROWS] = 0.0
    wd.const_value = ir.tensor(rows, name="wd")
    original = model.clone()
    _calibrate(model, rng)

    result = PruneFfn(keep=8, multiple=1, importance=importance)(model)

    assert result.changed and result.stats["pruned"] == 1, result.stats
    [row] = result.details["layers"]
    assert (row["before"], row["after"], row["compensation"]) == (16, 8, "refit")
    ffn = find_blocks(model).blocks[0].ffn
    assert ffn is not None and ffn.intermediate_size == 8 and ffn.down.in_features == 8
    np.testing.assert_array_equal(_weight(model, ffn.up.matmul.outputs[0].name), original.graph.initializers["wu"].const_value.numpy()[:, KEPT])
    for value in [ffn.up.output, ffn.down.input, *([ffn.gate.output] if ffn.gate else [])]:
        assert value.shape is not None and value.shape[-1] == 8, value
    assert STATS_KEY not in model.meta  # stale after pruning
    for batch, seq in [(1, 3), (3, 11)]:
        testing.assert_ort_allclose(original, model, _feeds(rng, batch, seq), atol=1e-5, rtol=0.0)


def test_refit_merges_duplicated_channels(rng: np.random.Generator) -> None:
    """Channels 8..15 repeat channels 0..7, so down's refit can take over their rows."""
    model = _model(GELU_FFN, rng)
    init = model.graph.initializers
    wu, bu = init["wu"].const_value.numpy().copy(), init["bu"].const_value.numpy().copy()
    wu[:, 8:], bu[8:] = wu[:, :8], bu[:8]
    init["wu"].const_value, init["bu"].const_value = ir.tensor(wu, name="wu"), ir.tensor(bu, name="bu")
    original = model.clone()
    feeds = _feeds(rng, 3, 7)

    plain = model.clone()
    _calibrate(plain, np.random.default_rng(1))
    PruneFfn(keep=8, multiple=1, importance="obs", compensate=False)(plain)
    _calibrate(model, np.random.default_rng(1))
    result = PruneFfn(keep=8, multiple=1, importance="obs", ridge=1e-9)(model)

    assert result.stats["compensation: refit"] == 1
    testing.assert_ort_allclose(original, model, feeds, atol=1e-3, rtol=0.0)
    [worst] = verify.compare_outputs(original, plain, feeds)
    assert worst.max_abs > 0.1  # without the refit the duplicates' rows are simply lost


def test_bias_compensation_restores_the_mean(rng: np.random.Generator) -> None:
    model = _model(GATED_FFN, rng)
    original = model.clone()
    feeds = [_feeds(np.random.default_rng(i), 4, 8) for i in range(8)]
    model.meta[STATS_KEY] = calibrate_model(model, feeds)

    result = PruneFfn(keep=8, multiple=1, importance="magnitude")(model)

    assert result.stats["compensation: bias"] == 1
    assert result.stats["compensation weaker than asked: no Gram matrix (calibrate with gram=true)"] == 1
    down = find_blocks(model).blocks[0].ffn.down
    assert down.bias is not None and down.bias.shape == ir.Shape([8])  # created: the SwiGLU had none
    a = ort_runtime.create_session(original, optimize=False)
    b = ort_runtime.create_session(model, optimize=False)
    diff = np.concatenate([ort_runtime.run(b, f)["y"] - ort_runtime.run(a, f)["y"] for f in feeds])
    # the same data as calibration: the mean error is gone, what is left has zero mean
    assert np.abs(diff.reshape(-1, 8).mean(axis=0)).max() < 1e-4 < np.abs(diff).max()


def test_ratio_is_rounded_to_the_multiple(rng: np.random.Generator) -> None:
    model = _model(GELU_FFN, rng)
    result = PruneFfn(ratio=0.3, multiple=4, importance="magnitude", compensate=False)(model)
    assert result.details["layers"][0]["after"] == 12  # 16 * 0.7 = 11.2 -> 12
    size = result.details["size"]
    assert size["params"]["before"] - size["params"]["after"] == 4 * (8 + 1 + 8)
    assert size["linear_flops_per_token"]["after"] == 2 * (8 * 12 + 12 * 8)


def test_second_run_with_keep_changes_nothing(rng: np.random.Generator) -> None:
    model = _model(GATED_FFN, rng)
    first = PruneFfn(keep=8, multiple=1, importance="magnitude")(model)
    second = PruneFfn(keep=8, multiple=1, importance="magnitude")(model)
    assert first.changed and not second.changed
    assert second.stats == {"skipped: nothing to remove": 1}


def test_activation_read_elsewhere_is_skipped(rng: np.random.Generator) -> None:
    model = _model(EXPOSED, rng)
    result = PruneFfn(ratio=0.5, multiple=1, importance="magnitude")(model)
    assert not result.changed
    assert result.stats == {"skipped: FFN activation 'a' is a graph output": 1}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("prune-ffn", "exactly one of ratio=, keep="),
        ("prune-ffn{ratio=0.5 keep=3}", "exactly one of ratio=, keep="),
        ("prune-ffn{ratio=1.0}", r"ratio must be in \[0, 1\)"),
        ("prune-ffn{keep=4 multiple=0}", "multiple must be >= 1"),
        ("prune-ffn{ratio=0.5 importance=random}", "expected one of magnitude, activation, obs"),
    ],
)
def test_bad_options(spec: str, message: str) -> None:
    with pytest.raises(PassConfigError, match=message):
        PassManager.parse(spec)


def test_activation_importance_needs_statistics(rng: np.random.Generator) -> None:
    with pytest.raises(PreconditionError, match="add 'calibrate' right before 'prune-ffn'"):
        PruneFfn(ratio=0.5)(_model(GELU_FFN, rng))


def test_golden(rng: np.random.Generator) -> None:
    model = _model(GELU_FFN, rng)
    PruneFfn(keep=12, multiple=4, importance="magnitude", compensate=False)(model)
    testing.assert_ir_golden(model, "prune_ffn/gelu_keep12.ir")


@pytest.mark.parametrize("zoo_name", ["gpt2", "llama"])  # GELU-tanh with biases; SwiGLU without
def test_zoo_models_run_at_new_widths(zoo_name: str, zoo_model, zoo_entries) -> None:
    """Calibrated, refitted pruning on real exports (test_prune_heads runs the whole zoo)."""
    entry = zoo_entries[zoo_name]
    original = tforge.load(zoo_model(zoo_name))
    model = tforge.load(zoo_model(zoo_name))
    model.meta[FEEDS_KEY] = [entry.inputs(2, 9, np.random.default_rng(i)) for i in range(4)]

    report = PassManager.parse(
        "canonicalize,calibrate{gram=true},prune-ffn{ratio=0.5 multiple=8}",
        verify_each=True,
        progress=lambda _: None,
    ).run(model)

    stats = report.passes[-1].stats
    assert stats["pruned"] == entry.truth.num_layers and stats["compensation: refit"] == stats["pruned"]
    half = entry.truth.intermediate_size // 2
    for block in find_blocks(model).blocks:
        ffn = block.ffn
        assert ffn is not None and ffn.intermediate_size == half and ffn.down.in_features == half
        assert ffn.gate is None or ffn.gate.out_features == half
    # ONNX's strict shape inference agrees with every annotation and constant
    onnx.shape_inference.infer_shapes(ir.to_proto(model), check_type=True, strict_mode=True, data_prop=True)
    for batch, seq in [(1, 5), (3, 12)]:
        [cmp] = verify.compare_outputs(original, model, entry.inputs(batch, seq, np.random.default_rng(7)))
        assert np.isfinite(cmp.max_abs) and cmp.cosine > 0.5, cmp


@pytest.mark.slow
def test_smollm2_heads_and_ffn_pruning_keeps_every_layer_valid(smollm2_onnx: Path) -> None:
    model = tforge.load(smollm2_onnx)
    PassManager.parse(
        "canonicalize,prune-heads{keep=6 importance=magnitude},prune-ffn{ratio=0.25 importance=magnitude}",
        progress=lambda _: None,
    ).run(model)
    blocks = find_blocks(model).blocks
    assert len(blocks) == 30
    for block in blocks:
        assert block.attention is not None and block.ffn is not None
        assert block.attention.num_heads == 6 and block.attention.num_kv_heads in (2, 3)
        assert block.ffn.intermediate_size == 1152
    onnx.shape_inference.infer_shapes(ir.to_proto(model), check_type=True, strict_mode=True, data_prop=True)
    session = ort_runtime.create_session(model)
    for batch, seq in [(1, 7), (2, 33)]:
        ids = np.random.default_rng(0).integers(0, 49152, size=(batch, seq), dtype=np.int64)
        [logits] = session.run(None, {"input_ids": ids})
        assert logits.shape == (batch, seq, 49152) and np.isfinite(logits).all()
