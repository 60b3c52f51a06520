"""smoothquant: per-channel scales folded into norms, V->O and up->down; outputs stay the same."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tests.models import tiny
from tforge import testing
from tforge.compiler import verify
from tforge.compiler.calibration import FEEDS_KEY, STATS_KEY, attached_stats, calibrate_model
from tforge.compiler.pipeline import PassManager
from tforge.compiler.printer import print_ir
from tforge.compiler.structure import const_array
from tforge.errors import PassConfigError, PreconditionError
from tforge.passes.ln_migrate import LnMigrate
from tforge.passes.math import smoothing
from tforge.passes.smoothquant import SmoothQuant
from tforge.runtime import ort as ort_runtime

# Pre-norm block: LN -> 2-head attention (V with bias) -> residual -> LN -> ReLU FFN -> residual.
BLOCK = tiny.pre_norm_block(batch="1")

GATED_FFN = """
<ir_version: 10, opset_import: ["" : 20]>
block (float[B, 4, 8] x) => (float[B, 4, 8] y)
<float[8] g1, float[8] b1, float[8, 16] wg, float[8, 16] wu, float[16, 8] wd>
{
    h = LayerNormalization <axis = -1> (x, g1, b1)
    gt = MatMul (h, wg)
    u = MatMul (h, wu)
    sg = Sigmoid (gt)
    act = Mul (gt, sg)
    m = Mul (act, u)
    d = MatMul (m, wd)
    y = Add (x, d)
}
"""

GELU_FFN = """
<ir_version: 10, opset_import: ["" : 20]>
block (float[B, 4, 8] x) => (float[B, 4, 8] y)
<float[8] g1, float[8] b1, float[8, 16] wu, float[16, 8] wd>
{
    h = LayerNormalization <axis = -1> (x, g1, b1)
    u = MatMul (h, wu)
    m = Gelu (u)
    d = MatMul (m, wd)
    y = Add (x, d)
}
"""

# Post-norm: the norm output is also the residual stream.
POST_NORM = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, 4, 8] x) => (float[B, 4, 8] y)
<float[8] g1, float[8] b1, float[8, 8] w>
{
    h = LayerNormalization <axis = -1> (x, g1, b1)
    f = MatMul (h, w)
    y = Add (h, f)
}
"""


def _model(text: str, rng: np.random.Generator) -> ir.Model:
    """Random float initializers; an outlier channel in the first gamma (as trained LNs have)."""
    arrays = testing.random_float_initializers(text, rng, scale=0.5)
    arrays["g1"] = rng.uniform(0.5, 1.5, 8)
    arrays["g1"][3] = 12.0
    if "int64[4] heads" in text:
        arrays["heads"] = np.array([1, 4, 2, 4], np.int64)
        arrays["merged"] = np.array([1, 4, 8], np.int64)
    return testing.model_from_onnx_text(text, **arrays)


def _feeds(model: ir.Model, rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    shape = [d if isinstance(d, int) else 2 for d in model.graph.inputs[0].shape]
    return [{"x": rng.normal(size=shape).astype(np.float32)} for _ in range(n)]


def _calibrated(model: ir.Model, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    feeds = _feeds(model, rng, 4)
    model.meta[STATS_KEY] = calibrate_model(model, feeds)
    return feeds


def _assert_same_function(reference: ir.Model, candidate: ir.Model, feeds: dict) -> None:
    """Max abs error at most 1e-4 of the reference output's max abs (ORT optimizations off)."""
    expected = ort_runtime.run(ort_runtime.create_session(reference, optimize=False), feeds)
    scale = max(float(np.abs(v).max()) for v in expected.values())
    testing.assert_ort_allclose(reference, candidate, feeds, atol=1e-4 * scale, rtol=0.0)


def _init(model: ir.Model, reader_output: str, index: int) -> np.ndarray:
    """The constant that the node producing ``reader_output`` reads at ``index``."""
    node = next(n for n in model.graph if n.outputs[0].name == reader_output)
    return const_array(node.inputs[index]).astype(np.float64)


# ----------------------------------------------------------------------------- positive


def test_norms_vo_and_relu_ffn_are_smoothed(rng: np.random.Generator) -> None:
    model = _model(BLOCK, rng)
    _calibrated(model, rng)
    original = model.clone()
    absmax_h = attached_stats(model).get("h").absmax.copy()
    g1_before = _init(model, "h", 1)

    result = SmoothQuant()(model)

    assert result.stats == {"smoothed: norm": 2, "smoothed: v->o": 1, "smoothed: up->down": 1}
    testing.assert_ir_golden(model, "smoothquant/block.ir")
    _assert_same_function(original, model, _feeds(model, rng, 1)[0])
    # s = gamma_before / gamma_after and s_j = sqrt(max|X_j| / max_i |W_ji|) over q, k, v
    s = g1_before / _init(model, "h", 1)
    used = [_init(model, name, 1) / s[:, None] for name in ("q", "k", "v0")]
    expected = np.sqrt(absmax_h / smoothing.weight_row_absmax(used))
    np.testing.assert_allclose(s, expected, rtol=1e-5)
    site = next(r for r in result.details["sites"] if r["activation"] == "h")
    assert site["alpha"] == 0.5 and site["act_absmax_after"] < site["act_absmax_before"] / 2
    assert int(np.argmax(s)) == 3  # the outlier channel gets the largest scale


def test_attached_stats_match_a_fresh_calibration(rng: np.random.Generator) -> None:
    model = _model(BLOCK, rng)
    feeds = _calibrated(model, rng)

    SmoothQuant()(model)

    updated, fresh = attached_stats(model), calibrate_model(model, feeds)
    assert sorted(updated.stats) == sorted(fresh.stats)
    for name, stats in fresh.stats.items():
        np.testing.assert_allclose(updated.get(name).absmax, stats.absmax, rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(updated.get(name).sum_sq, stats.sum_sq, rtol=1e-4, err_msg=name)


def test_gated_ffn_scales_up_columns_and_down_rows(rng: np.random.Generator) -> None:
    model = _model(GATED_FFN, rng)
    _calibrated(model, rng)
    original = model.clone()
    wg_before = _init(model, "gt", 1)

    result = SmoothQuant()(model)

    assert result.stats == {"smoothed: norm": 1, "smoothed: up->down": 1}
    s_norm = _init(original, "h", 1) / _init(model, "h", 1)
    # the gate's columns are untouched (act(gate) is not linear): only its rows carry s_norm
    np.testing.assert_allclose(_init(model, "gt", 1), s_norm[:, None] * wg_before, rtol=1e-6)
    _assert_same_function(original, model, _feeds(model, rng, 1)[0])


def test_auto_alpha_lowers_the_error_proxy(rng: np.random.Generator) -> None:
    model = _model(BLOCK, rng)
    _calibrated(model, rng)
    original = model.clone()

    result = SmoothQuant(alpha="auto")(model)

    assert result.changed
    for site in result.details["sites"]:
        assert site["alpha"] in SmoothQuant.alpha_grid
        assert site["error_proxy_after"] <= site["error_proxy_before"], site
    _assert_same_function(original, model, _feeds(model, rng, 1)[0])


def test_post_norm_scale_folds_into_the_migrated_gamma_mul(rng: np.random.Generator) -> None:
    model = _model(POST_NORM, rng)
    original = model.clone()
    LnMigrate()(model)  # the residual now reads Mul(h, gamma)
    _calibrated(model, rng)
    ops = [n.op_type for n in model.graph]

    result = SmoothQuant()(model)

    assert result.stats == {"smoothed: norm": 1, "scale folded into a Mul reader": 1}
    assert [n.op_type for n in model.graph] == ops  # no second Mul on the residual
    testing.assert_ir_golden(model, "smoothquant/post_norm_after_ln_migrate.ir")
    _assert_same_function(original, model, _feeds(model, rng, 1)[0])


@pytest.mark.parametrize("pre_norms", [True, False], ids=["sandwich", "output-only"])
def test_output_norms_before_residual_adds_are_not_smoothed(pre_norms: bool, rng: np.random.Generator) -> None:
    model = tiny.output_norm_model(pre_norms, rng)
    original = model.clone()
    _calibrated(model, rng)

    result = SmoothQuant()(model)

    assert result.stats == {
        **({"smoothed: norm": 2} if pre_norms else {}),
        "smoothed: v->o": 1,
        "smoothed: up->down": 1,
        "skipped: output norm of the attention before its residual add: no linear reads it": 1,
        "skipped: output norm of the ffn before its residual add: no linear reads it": 1,
    }, result.stats
    _assert_same_function(original, model, _feeds(model, rng, 1)[0])


# ----------------------------------------------------------------------------- math


def test_scales_follow_the_formula_and_clamps() -> None:
    act = np.array([4.0, 1.0, 0.0, 9.0, 1e12])
    wgt = np.array([1.0, 4.0, 2.0, 0.0, 1.0])
    s = smoothing.smoothing_scales(act, wgt, 0.5, min_scale=1e-5, max_scale=1e3)
    # dead channels (zero range) keep 1; the huge one is clamped
    np.testing.assert_allclose(s, [2.0, 0.5, 1.0, 1.0, 1e3])
    np.testing.assert_allclose(smoothing.smoothing_scales(act[:2], wgt[:2], 1.0), [4.0, 1.0])
    with pytest.raises(ValueError, match="alpha"):
        smoothing.smoothing_scales(act, wgt, 1.5)


def test_gqa_heads_of_a_group_share_scales() -> None:
    groups = smoothing.kv_channel_groups(num_heads=4, num_kv_heads=2, head_dim=2)
    np.testing.assert_array_equal(groups, [0, 1, 0, 1, 2, 3, 2, 3])
    act = np.array([1.0, 2.0, 9.0, 2.0, 1.0, 1.0, 1.0, 4.0])
    s = smoothing.smoothing_scales(act, np.ones(8), 1.0, groups=groups)
    np.testing.assert_allclose(s, [9.0, 2.0, 9.0, 2.0, 1.0, 4.0, 1.0, 4.0])


def test_auto_alpha_picks_the_best_simulated_int8_error() -> None:
    """The proxy uses only absmax and mean squares; check its choice against real fake-quant."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2048, 32)) * np.exp(rng.normal(size=32))
    x[:, [4, 17]] *= 30.0
    w = rng.normal(size=(32, 24)) * 0.1
    grid = [round(0.1 * i, 1) for i in range(11)]

    choice = smoothing.choose_alpha(np.abs(x).max(0), (x * x).mean(0), [w], grid)

    def int8(a: np.ndarray, axis: int | None) -> np.ndarray:
        step = 2 * np.abs(a).max(axis=axis, keepdims=axis is not None) / 255
        return np.round(a / step) * step

    def simulated(alpha: float) -> float:
        s = smoothing.smoothing_scales(np.abs(x).max(0), np.abs(w).max(1), alpha)
        y = x @ w
        return float(((int8(x / s, None) @ int8(w * s[:, None], 0) - y) ** 2).sum() / (y * y).sum())

    errors = {a: simulated(a) for a in grid}
    assert errors[choice.alpha] <= 1.1 * min(errors.values())
    assert errors[choice.alpha] < errors[0.0] / 5  # alpha=0 leaves the outliers in place
    assert choice.errors[choice.alpha] == pytest.approx(errors[choice.alpha], rel=0.3)


# ----------------------------------------------------------------------------- negative


def test_needs_attached_statistics(rng: np.random.Generator) -> None:
    model = _model(BLOCK, rng)
    with pytest.raises(PreconditionError, match="add 'calibrate'|run 'calibrate'"):
        SmoothQuant()(model)


def test_non_homogeneous_activation_and_missing_stats_are_reported(rng: np.random.Generator) -> None:
    model = _model(GELU_FFN, rng)
    _calibrated(model, rng)
    del attached_stats(model).stats["h"]
    before = print_ir(model, tensors="digest")

    result = SmoothQuant()(model)

    assert not result.changed
    assert result.stats == {
        "skipped: up->down: gelu is not positively homogeneous": 1,
        "skipped: norm: no calibration stats": 1,
    }
    assert print_ir(model, tensors="digest") == before


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("smoothquant{alpha=1.5}", "alpha must be in"),
        ("smoothquant{alpha=best}", "expected float or auto"),
        ("smoothquant{min-scale=2}", "min-scale"),
        ("smoothquant{alpha-grid=0.2,1.4}", "alpha-grid"),
    ],
)
def test_bad_options(spec: str, message: str) -> None:
    with pytest.raises(PassConfigError, match=message):
        PassManager.parse(spec)


# ----------------------------------------------------------------------------- idempotence


@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_second_run_changes_nothing(alpha: float | str, rng: np.random.Generator) -> None:
    model = _model(BLOCK, rng)
    _calibrated(model, rng)
    original = model.clone()
    SmoothQuant(alpha=alpha)(model)
    after_first = print_ir(model, tensors="digest")

    again = SmoothQuant(alpha=alpha)(model)

    assert not again.changed, again.stats
    assert print_ir(model, tensors="digest") == after_first
    _assert_same_function(original, model, _feeds(model, rng, 1)[0])


# ----------------------------------------------------------------------------- real graphs


def _zoo_calibrated(path, entry, n: int = 4) -> ir.Model:
    model = tforge.load(path)
    rng = np.random.default_rng(0)
    model.meta[FEEDS_KEY] = [entry.inputs(2, 9, rng) for _ in range(n)]
    return model


def test_zoo_model_keeps_its_outputs(zoo_name: str, zoo_model, zoo_entries) -> None:
    entry = zoo_entries[zoo_name]
    original = tforge.load(zoo_model(zoo_name))
    model = _zoo_calibrated(zoo_model(zoo_name), entry)

    report = PassManager.parse(
        "canonicalize,calibrate,smoothquant{alpha=auto}", verify_each=True, progress=lambda _: None
    ).run(model)

    stats = report.passes[-1].stats
    layers = entry.truth.num_layers
    assert stats["smoothed: norm"] == 2 * layers and stats["smoothed: v->o"] == layers, stats
    if entry.truth.fused_gate_up:  # not moved across a fused gate+up linear's halves: said so
        assert stats["skipped: up->down: gate and up are halves of one fused linear"] == layers, stats
    elif entry.truth.gated:
        assert stats["smoothed: up->down"] == layers, stats
    else:
        assert stats[f"skipped: up->down: {entry.truth.activation} is not positively homogeneous"] == layers
    _assert_same_function(original, model, entry.inputs(2, 9, np.random.default_rng(1)))


def test_pipeline_with_gamma_migration_on_gqa_model(zoo_model, zoo_entries) -> None:
    entry = zoo_entries["llama"]  # RMSNorm, SwiGLU, 4 query heads on 2 KV heads
    original = tforge.load(zoo_model("llama"))
    model = _zoo_calibrated(zoo_model("llama"), entry)

    report = PassManager.parse(
        "canonicalize,ln-migrate,calibrate,smoothquant,smoothquant",
        verify_each=True,
        progress=lambda _: None,
    ).run(model)

    first, second = report.passes[3], report.passes[4]
    assert first.changed and first.stats["smoothed: v->o"] == 2 and first.stats["smoothed: norm"] == 4
    assert not second.changed, second.stats
    assert "calibrated" in report.properties
    _assert_same_function(original, model, entry.inputs(2, 9, np.random.default_rng(1)))


def _real_pipeline(path, dims: dict[str, int]) -> tuple[ir.Model, ir.Model, dict]:
    original = tforge.load(path)
    model = tforge.load(path)
    model.meta[FEEDS_KEY] = [
        verify.make_inputs(original, dims=dims, rng=np.random.default_rng(i)) for i in range(2)
    ]
    report = PassManager.parse(
        "canonicalize,ln-migrate,calibrate,smoothquant{alpha=auto}", progress=lambda _: None
    ).run(model)
    feeds = verify.make_inputs(original, dims=dims, rng=np.random.default_rng(7))
    _assert_same_function(original, model, feeds)
    return original, model, report.passes[-1].stats


@pytest.mark.slow
def test_minilm_pipeline_keeps_its_outputs(minilm_onnx) -> None:
    _, _, stats = _real_pipeline(minilm_onnx, {"batch": 2, "sequence": 20})
    assert stats["smoothed: norm"] == 12 and stats["smoothed: v->o"] == 6, stats


@pytest.mark.slow
def test_smollm2_pipeline_keeps_its_outputs(smollm2_onnx) -> None:
    _, _, stats = _real_pipeline(smollm2_onnx, {"batch": 1, "sequence": 24})
    # 60 block norms and the final norm, which feeds the untied lm_head
    assert stats["smoothed: norm"] == 61 and stats["smoothed: v->o"] == 30, stats
    assert stats["smoothed: up->down"] == 30, stats


@pytest.mark.parametrize("norm", ["head", "width", "layer"])
def test_qk_norms_are_left_alone_with_a_precise_reason(norm: str, rng: np.random.Generator) -> None:
    """A QK-norm's output goes to the scores: no linear reads it, so no scale is folded into it
    (and none into Q's or K's columns, which it would undo); everything else stays exact."""
    model = tiny.qk_norm_model(norm, rng)
    feeds = _calibrated(model, rng)
    original = model.clone()

    result = SmoothQuant()(model)
    migrated = LnMigrate()(model)

    reasons = {f"skipped: QK-norm of the {role} projection: no linear reads it" for role in ("query", "key")}
    assert {k: result.stats[k] for k in reasons} == dict.fromkeys(reasons, 1)
    assert {k: migrated.stats[k] for k in reasons} == dict.fromkeys(reasons, 1)
    assert result.stats["smoothed: norm"] == 2 and result.stats["smoothed: v->o"] == 1
    for name in ("gq", "gk"):  # the QK-norm gammas are untouched
        np.testing.assert_array_equal(
            const_array(model.graph.initializers[name]), const_array(original.graph.initializers[name])
        )
    _assert_same_function(original, model, feeds[0])
