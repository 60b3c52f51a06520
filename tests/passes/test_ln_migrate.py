"""ln-migrate: gamma leaves the norm for the linears reading it; the function stays the same."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tests.models import tiny
from tforge import testing
from tforge.compiler import verify
from tforge.compiler.calibration import STATS_KEY, attached_stats, calibrate_model
from tforge.compiler.pipeline import PassManager
from tforge.compiler.printer import print_ir
from tforge.compiler.structure import const_array
from tforge.errors import PassConfigError
from tforge.passes.ln_migrate import LnMigrate
from tforge.runtime import ort as ort_runtime

PRE_NORM = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, 4, 8] x) => (float[B, 4, 6] y1, float[B, 4, 5] y2)
<float[8] gamma, float[8] beta, float[8, 6] w1, float[6] b1, float[8, 5] w2>
{
    h = LayerNormalization <axis = -1> (x, gamma, beta)
    m1 = MatMul (h, w1)
    y1 = Add (m1, b1)
    y2 = MatMul (h, w2)
}
"""

# Post-norm: the norm output is also the residual stream.
POST_NORM = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, 4, 8] x) => (float[B, 4, 8] y)
<float[8] gamma, float[8] beta, float[8, 8] w>
{
    h = LayerNormalization <axis = -1> (x, gamma, beta)
    f = MatMul (h, w)
    y = Add (h, f)
}
"""

RMS_NORM = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, 4, 8] x) => (float[B, 4, 6] y)
<float[8] gamma, float[8, 6] w, int64[1] axes, float eps>
{
    sq = Mul (x, x)
    ms = ReduceMean <keepdims = 1> (sq, axes)
    e = Add (ms, eps)
    rt = Sqrt (e)
    inv = Reciprocal (rt)
    n = Mul (x, inv)
    h = Mul (n, gamma)
    y = MatMul (h, w)
}
"""

# One gamma/beta for two norms, one weight for three MatMuls (one reads no norm): the
# exporter's merged initializers.
SHARED = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, 8] x, float[B, 8] z) => (float[B, 8] y1, float[B, 8] y2, float[B, 8] y3)
<float[8] gamma, float[8] beta, float[8, 8] w>
{
    h1 = LayerNormalization <axis = -1> (x, gamma, beta)
    h2 = LayerNormalization <axis = -1> (z, gamma, beta)
    y1 = MatMul (h1, w)
    y2 = MatMul (h2, w)
    y3 = MatMul (x, w)
}
"""

GRAPH_OUTPUT_NORM = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, 8] x) => (float[B, 8] h, float[B, 8] y)
<float[8] gamma, float[8] beta, float[8, 8] w>
{
    h = LayerNormalization <axis = -1> (x, gamma, beta)
    y = MatMul (h, w)
}
"""


def _ln_model(text: str, rng: np.random.Generator, *, gamma: np.ndarray | None = None) -> ir.Model:
    """Random values for every float initializer declared in ``text``; gamma away from 0."""
    arrays = testing.random_float_initializers(text, rng)
    arrays["gamma"] = gamma if gamma is not None else rng.uniform(0.2, 3.0, 8) * rng.choice([-1, 1], 8)
    return testing.model_from_onnx_text(text, **arrays)


def _assert_same_function(reference: ir.Model, candidate: ir.Model, feeds: dict) -> None:
    """Max abs error at most 1e-4 of the reference output's max abs (ORT optimizations off)."""
    expected = ort_runtime.run(ort_runtime.create_session(reference, optimize=False), feeds)
    scale = max(float(np.abs(v).max()) for v in expected.values())
    testing.assert_ort_allclose(reference, candidate, feeds, atol=1e-4 * scale, rtol=0.0)


def _x(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


def test_gamma_moves_into_every_reading_linear(rng: np.random.Generator) -> None:
    model = _ln_model(PRE_NORM, rng)
    original = model.clone()
    gamma, beta = const_array(model.graph.initializers["gamma"]), const_array(model.graph.initializers["beta"])
    w1 = const_array(model.graph.initializers["w1"])

    result = LnMigrate()(model)

    assert result.changed and result.stats == {"migrated": 1}
    init = model.graph.initializers
    np.testing.assert_array_equal(const_array(init["gamma"]), np.ones(8, np.float32))
    np.testing.assert_allclose(const_array(init["beta"]), beta / gamma, rtol=1e-6)
    np.testing.assert_allclose(const_array(init["w1"]), gamma[:, None] * w1, rtol=1e-6)
    np.testing.assert_array_equal(const_array(init["b1"]), const_array(original.graph.initializers["b1"]))
    testing.assert_ir_golden(model, "ln_migrate/pre_norm.ir")
    _assert_same_function(original, model, {"x": _x(rng, 2, 4, 8)})


def test_post_norm_residual_gets_gamma_back(rng: np.random.Generator) -> None:
    model = _ln_model(POST_NORM, rng)
    original = model.clone()

    result = LnMigrate()(model)

    assert result.stats == {"migrated": 1, "gamma re-applied for non-linear readers": 1}
    # the residual Add reads Mul(h, gamma), the linear reads h itself
    testing.assert_ir_golden(model, "ln_migrate/post_norm.ir")
    _assert_same_function(original, model, {"x": _x(rng, 3, 4, 8)})


def test_rmsnorm_keeps_its_pattern_with_unit_gamma(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(
        RMS_NORM,
        gamma=rng.uniform(0.1, 4.0, 8),
        w=rng.normal(size=(8, 6)),
        axes=np.array([-1], np.int64),
        eps=np.array(1e-6, np.float32),
    )
    original = model.clone()

    result = LnMigrate()(model)

    assert result.stats == {"migrated": 1}
    assert result.details["norms"][0]["kind"] == "rms"
    testing.assert_ir_golden(model, "ln_migrate/rms_norm.ir")
    _assert_same_function(original, model, {"x": _x(rng, 2, 4, 8)})


def test_shared_initializers_are_copied_not_mutated(rng: np.random.Generator) -> None:
    model = _ln_model(SHARED, rng)
    original = model.clone()
    w = const_array(model.graph.initializers["w"]).copy()

    result = LnMigrate()(model)

    assert result.stats == {"migrated": 2}
    # the MatMul that reads no norm still reads the untouched weight
    y3 = next(n for n in model.graph if n.outputs[0].name == "y3")
    np.testing.assert_array_equal(const_array(y3.inputs[1]), w)
    readers = [n for n in model.graph if n.op_type == "MatMul"]
    assert len({id(n.inputs[1]) for n in readers}) == 3
    feeds = {"x": _x(rng, 3, 8), "z": _x(rng, 3, 8) * 2}
    _assert_same_function(original, model, feeds)


def test_calibration_stats_follow_the_norm_output(rng: np.random.Generator) -> None:
    model = _ln_model(PRE_NORM, rng)
    feeds = [{"x": _x(rng, 2, 4, 8)} for _ in range(3)]
    model.meta[STATS_KEY] = calibrate_model(model, feeds)

    LnMigrate()(model)

    updated = attached_stats(model).get("h")
    fresh = calibrate_model(model, feeds).get("h")
    np.testing.assert_allclose(updated.absmax, fresh.absmax, rtol=1e-5)
    np.testing.assert_allclose(updated.sum_sq, fresh.sum_sq, rtol=1e-4)
    np.testing.assert_allclose(updated.min, fresh.min, rtol=1e-5)


def test_tiny_gamma_is_skipped(rng: np.random.Generator) -> None:
    gamma = rng.uniform(0.5, 2.0, 8)
    gamma[5] = 1e-4
    model = _ln_model(PRE_NORM, rng, gamma=gamma)
    before = print_ir(model, tensors="digest")

    result = LnMigrate()(model)

    assert not result.changed
    assert result.stats == {"skipped: |gamma| below min-abs-gamma": 1}
    assert print_ir(model, tensors="digest") == before
    assert LnMigrate(min_abs_gamma=1e-5)(model).stats == {"migrated": 1}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (GRAPH_OUTPUT_NORM, "skipped: norm output is a graph output"),
        (POST_NORM.replace("f = MatMul (h, w)", "f = Relu (h)").replace(", float[8, 8] w", ""),
         "skipped: no linear reads the norm output"),
    ],
)  # fmt: skip
def test_unmigratable_norms_are_reported(text: str, reason: str, rng: np.random.Generator) -> None:
    model = _ln_model(text, rng)
    result = LnMigrate()(model)
    assert not result.changed and result.stats == {reason: 1}


def test_second_run_finds_gamma_already_one(rng: np.random.Generator) -> None:
    model = _ln_model(POST_NORM, rng)
    LnMigrate()(model)
    after_first = print_ir(model, tensors="digest")

    again = LnMigrate()(model)

    assert not again.changed
    assert again.stats == {"skipped: gamma already 1": 1}
    assert print_ir(model, tensors="digest") == after_first


@pytest.mark.parametrize("value", ["-1", "0", "nan"])
def test_bad_option_is_rejected(value: str) -> None:
    with pytest.raises(PassConfigError, match="min-abs-gamma must be a finite number > 0"):
        PassManager.parse(f"ln-migrate{{min-abs-gamma={value}}}")


def test_zoo_model_keeps_its_outputs(zoo_name: str, zoo_model, zoo_entries) -> None:
    entry = zoo_entries[zoo_name]
    original = tforge.load(zoo_model(zoo_name))
    model = tforge.load(zoo_model(zoo_name))

    report = PassManager.parse("canonicalize,ln-migrate", verify_each=True, progress=lambda _: None).run(model)

    stats = report.passes[1].stats
    # every norm but the last one (which reads no linear) feeds a block
    assert stats["migrated"] == 2 * entry.truth.num_layers, stats
    _assert_same_function(original, model, entry.inputs(2, 9, np.random.default_rng(1)))


@pytest.mark.slow
def test_minilm_keeps_its_outputs(minilm_onnx) -> None:
    original = tforge.load(minilm_onnx)
    model = tforge.load(minilm_onnx)
    report = PassManager.parse("canonicalize,ln-migrate", progress=lambda _: None).run(model)
    assert report.passes[1].stats["migrated"] == 12
    feeds = verify.make_inputs(original, dims={"batch": 2, "sequence": 20}, rng=np.random.default_rng(0))
    _assert_same_function(original, model, feeds)


@pytest.mark.slow
def test_smollm2_keeps_its_outputs(smollm2_onnx) -> None:
    original = tforge.load(smollm2_onnx)
    model = tforge.load(smollm2_onnx)
    report = PassManager.parse("canonicalize,ln-migrate", progress=lambda _: None).run(model)
    stats = report.passes[1].stats
    # About half of the trained RMSNorm gammas hold entries below 1e-3, but without a beta
    # nothing divides by gamma, so all 60 block norms and the final norm (which feeds the
    # untied lm_head) migrate.
    assert stats["migrated"] == 61, stats
    assert "skipped: |gamma| below min-abs-gamma" not in stats
    feeds = verify.make_inputs(original, dims={"batch": 1, "sequence": 24}, rng=np.random.default_rng(0))
    _assert_same_function(original, model, feeds)


@pytest.mark.parametrize("pre_norms", [True, False], ids=["sandwich", "output-only"])
def test_output_norms_before_residual_adds_are_left_with_their_reason(pre_norms: bool, rng: np.random.Generator) -> None:
    """``x + LN(o(...))`` (Gemma 2/3 beside pre-norms, OLMo 2 alone): the residual add reads the
    output norm, no linear does; only the pre-norms migrate, and the function is unchanged."""
    model = tiny.output_norm_model(pre_norms, rng)
    original = model.clone()
    gp1 = const_array(model.graph.initializers["gp1"]).copy()

    result = LnMigrate()(model)

    assert result.stats == {
        **({"migrated": 2} if pre_norms else {}),
        "skipped: output norm of the attention before its residual add: no linear reads it": 1,
        "skipped: output norm of the ffn before its residual add: no linear reads it": 1,
    }
    assert result.changed == pre_norms
    np.testing.assert_array_equal(const_array(model.graph.initializers["gp1"]), gp1)
    _assert_same_function(original, model, {"x": _x(rng, 2, 4, 8)})
