"""svd: x @ W (+ b) becomes (x @ A) @ B (+ b); exact where W has rank r, skipped where it saves nothing."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tforge import testing
from tforge.compiler import verify
from tforge.compiler.calibration import FEEDS_KEY, STATS_KEY, calibrate_model
from tforge.compiler.factoring import WeightGroup, lower_low_rank
from tforge.compiler.pipeline import PassManager
from tforge.compiler.printer import print_ir
from tforge.compiler.rewrite import GraphEditor
from tforge.compiler.structure import const_array
from tforge.errors import PassConfigError, PreconditionError
from tforge.passes.math import factorization as fz
from tforge.passes.quantize import Quantize
from tforge.passes.svd import Svd
from tforge.runtime import ort as ort_runtime

LINEAR = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, S, 48] x) => (float[B, S, 32] y)
<float[48, 32] w, float[32] b>
{
    m = MatMul (x, w)
    y = Add (m, b)
}
"""

TWO_LINEARS = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, S, 48] x) => (float[B, S, 32] y1, float[B, S, 32] y2)
<float[48, 32] w1, float[48, 32] w2>
{
    y1 = MatMul (x, w1)
    y2 = MatMul (x, w2)
}
"""

# One weight read by two MatMuls (the exporter merges identical initializers).
SHARED = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, 48] x, float[B, 48] z) => (float[B, 32] y1, float[B, 32] y2)
<float[48, 32] w>
{
    y1 = MatMul (x, w)
    y2 = MatMul (z, w)
}
"""

SMALL = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, 8] x) => (float[B, 8] y)
<float[8, 8] w>
{
    y = MatMul (x, w)
}
"""


def _rank(rng: np.random.Generator, k: int, n: int, r: int) -> np.ndarray:
    return rng.normal(size=(k, r)) @ rng.normal(size=(r, n)) / np.sqrt(r)


def _assert_same_function(reference: ir.Model, candidate: ir.Model, feeds: dict) -> None:
    """Max abs error at most 1e-4 of the reference output's max abs (ORT optimizations off)."""
    expected = ort_runtime.run(ort_runtime.create_session(reference, optimize=False), feeds)
    scale = max(float(np.abs(v).max()) for v in expected.values())
    testing.assert_ort_allclose(reference, candidate, feeds, atol=1e-4 * scale, rtol=0.0)


def _x(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


def _mixing(rng: np.random.Generator, k: int = 48) -> np.ndarray:
    """Inputs ``z @ mixing`` have strongly unequal, correlated channels, like real activations."""
    return rng.normal(size=(k, k)) * rng.uniform(0.05, 3.0, size=k)[:, None]


def _correlated(rng: np.random.Generator, mixing: np.ndarray, *shape: int) -> np.ndarray:
    return (rng.normal(size=(*shape, mixing.shape[0])) @ mixing).astype(np.float32)


def test_exact_rank_weight_is_recovered_and_outputs_match(rng: np.random.Generator) -> None:
    w, b = _rank(rng, 48, 32, 4), rng.normal(size=32)
    model = testing.model_from_onnx_text(LINEAR, w=w, b=b)
    original = model.clone()

    result = Svd(rank=4, blocks_only=False)(model)

    assert result.changed and result.stats == {"factorised": 1}
    testing.assert_ir_golden(model, "svd/rank_4.ir")
    init = model.graph.initializers
    assert "w" not in init
    a, bb = const_array(init["w.svd_a"]), const_array(init["w.svd_b"])
    assert a.shape == (48, 4) and bb.shape == (4, 32)
    np.testing.assert_allclose(a.astype(np.float64) @ bb, w, atol=1e-5 * np.abs(w).max())
    np.testing.assert_array_equal(const_array(init["b"]), b.astype(np.float32))  # bias kept
    (row,) = result.details["layers"]
    assert row["rank"] == 4 and row["params_before"] == 48 * 32 and row["params_after"] == 4 * 80
    assert row["relative_output_error"] < 1e-12 and row["error_measured_on"] == "weights"
    for shape in [(2, 3), (5, 1)]:  # dynamic batch and sequence
        _assert_same_function(original, model, {"x": _x(rng, *shape, 48)})


@pytest.mark.parametrize("method", ["plain", "activation"])
def test_full_rank_factors_reproduce_the_outputs(method: str, rng: np.random.Generator) -> None:
    w = rng.normal(size=(48, 32))
    model = testing.model_from_onnx_text(LINEAR, w=w, b=rng.normal(size=32))
    original = model.clone()
    x = _correlated(rng, _mixing(rng), 200)
    spectrum = fz.low_rank_spectrum(w, method, x.T.astype(np.float64) @ x / len(x))
    (lin,) = _linears(model)

    lower_low_rank(GraphEditor(model, "svd"), WeightGroup(lin.weight, [lin]), *spectrum.factors(32))

    for shape in [(2, 3), (4, 7)]:
        _assert_same_function(original, model, {"x": _x(rng, *shape, 48)})


def _linears(model: ir.Model) -> list:
    from tforge.compiler.structure import find_blocks

    return find_blocks(model).linears


def test_layers_that_would_not_save_parameters_are_left_alone(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(SMALL, w=rng.normal(size=(8, 8)))
    before = print_ir(model)

    by_rank = Svd(rank=4, blocks_only=False)(model)  # 4 * (8 + 8) = 64 = 8 * 8
    by_energy = Svd(energy=0.999, multiple=1, blocks_only=False)(model)
    by_ratio = Svd(ratio=0.5, blocks_only=False)(model)  # ranks are multiples of 8 > 3

    assert not by_rank.changed and by_rank.stats == {"skipped: rank saves no parameters": 1}
    assert by_energy.stats == {"skipped: rank for the energy saves no parameters": 1}
    assert by_ratio.stats == {"skipped: no rank that is a multiple of 8 saves parameters": 1}
    assert not (by_energy.changed or by_ratio.changed)
    assert print_ir(model) == before


def test_energy_keeps_the_asked_fraction(rng: np.random.Generator) -> None:
    w = _rank(rng, 48, 32, 6) + 1e-3 * rng.normal(size=(48, 32))
    model = testing.model_from_onnx_text(LINEAR, w=w, b=rng.normal(size=32))

    result = Svd(energy=0.999, multiple=1, blocks_only=False)(model)

    (row,) = result.details["layers"]
    assert row["rank"] == 6 and row["relative_output_error"] <= 1e-3


def test_ratio_is_spent_on_the_layer_that_loses_least(rng: np.random.Generator) -> None:
    decaying = _rank(rng, 48, 32, 8) + 1e-3 * rng.normal(size=(48, 32))
    model = testing.model_from_onnx_text(TWO_LINEARS, w1=rng.normal(size=(48, 32)), w2=decaying)

    result = Svd(ratio=0.25, blocks_only=False)(model)

    (row,) = result.details["layers"]
    assert row["weight"] == "w2" and row["rank"] == 8
    assert result.stats == {"factorised": 1, "skipped: budget met on other layers": 1}
    assert result.details["linear_params"] == 2 * 48 * 32
    assert result.details["reduction"] >= 0.25
    assert result.details["removed_params"] == 48 * 32 - 8 * 80


def test_second_run_changes_nothing(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(TWO_LINEARS, w1=rng.normal(size=(48, 32)), w2=_rank(rng, 48, 32, 8))
    Svd(ratio=0.25, blocks_only=False)(model)
    before = print_ir(model)

    again = Svd(ratio=0.25, blocks_only=False)(model)

    assert not again.changed
    assert again.stats == {"skipped: already factorised": 2, "skipped: budget met on other layers": 1}
    assert again.details["reduction"] >= 0.25  # the first run's removal counts against the budget
    assert print_ir(model) == before


def test_shared_weight_is_factorised_once(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(SHARED, w=_rank(rng, 48, 32, 3))
    original = model.clone()

    result = Svd(rank=3, blocks_only=False)(model)

    assert result.stats == {"factorised": 2} and len(result.details["layers"]) == 1
    factors = sorted(n for n in model.graph.initializers if ".svd_" in n)
    assert factors == ["w.svd_a", "w.svd_b"] and "w" not in model.graph.initializers
    _assert_same_function(original, model, {"x": _x(rng, 3, 48), "z": _x(rng, 3, 48)})


def test_weight_read_by_other_nodes_is_left_alone(rng: np.random.Generator) -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    block (float[B, 48] x) => (float[B, 32] y, float[48, 32] t)
    <float[48, 32] w>
    {
        y = MatMul (x, w)
        t = Relu (w)
    }
    """
    model = testing.model_from_onnx_text(text, w=_rank(rng, 48, 32, 3))
    result = Svd(rank=3, blocks_only=False)(model)
    assert not result.changed and result.stats == {"skipped: weight is also read by other nodes": 1}


def test_exclude_and_blocks_only(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(LINEAR, w=_rank(rng, 48, 32, 4), b=rng.normal(size=32))
    assert Svd(rank=4)(model).stats == {"skipped: not in a transformer block (blocks-only)": 1}
    assert Svd(rank=4, blocks_only=False, exclude=("w",))(model).stats == {"skipped: excluded": 1}


def _calibrated(model: ir.Model, rng: np.random.Generator, mixing: np.ndarray, *, gram: bool = True) -> None:
    feeds = [{"x": _correlated(rng, mixing, 4, 16)} for _ in range(8)]
    model.meta[STATS_KEY] = calibrate_model(model, feeds, gram=gram)


def test_activation_aware_has_lower_output_error_than_plain(rng: np.random.Generator) -> None:
    w = rng.normal(size=(48, 32))
    plain = testing.model_from_onnx_text(LINEAR, w=w, b=rng.normal(size=32))
    mixing = _mixing(rng)
    _calibrated(plain, rng, mixing)
    aware = plain.clone()
    aware.meta[STATS_KEY] = plain.meta[STATS_KEY]
    original = plain.clone()

    plain_result = Svd(rank=8, method="plain", blocks_only=False)(plain)
    aware_result = Svd(rank=8, method="activation", blocks_only=False)(aware)

    plain_error = plain_result.details["layers"][0]["relative_output_error"]
    aware_error = aware_result.details["layers"][0]["relative_output_error"]
    assert plain_result.details["layers"][0]["error_measured_on"] == "calibration"
    assert aware_error < 0.7 * plain_error, (aware_error, plain_error)
    # and on inputs the calibration did not see
    feeds = {"x": _correlated(rng, mixing, 8, 32)}
    reference = ort_runtime.run(ort_runtime.create_session(original, optimize=False), feeds)["y"]
    errors = [
        float(np.sum((ort_runtime.run(ort_runtime.create_session(m, optimize=False), feeds)["y"] - reference) ** 2))
        for m in (plain, aware)
    ]
    assert errors[1] < 0.7 * errors[0], errors


def test_activation_aware_needs_gram_matrices(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(LINEAR, w=rng.normal(size=(48, 32)), b=rng.normal(size=32))
    with pytest.raises(PreconditionError, match=r"add 'calibrate\{gram=true\}' before 'svd'"):
        Svd(rank=8, method="activation", blocks_only=False)(model)
    _calibrated(model, rng, _mixing(rng), gram=False)
    with pytest.raises(PreconditionError, match="statistics without Gram matrices"):
        Svd(rank=8, method="activation", blocks_only=False)(model)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("svd", "exactly one of rank=, ratio= or energy="),
        ("svd{rank=4 ratio=0.2}", "exactly one of"),
        ("svd{ratio=1.5}", "ratio must be in"),
        ("svd{energy=0}", "energy must be in"),
        ("svd{rank=0}", "rank must be at least 1"),
        ("svd{rank=4 multiple=0}", "multiple must be at least 1"),
        ("svd{rank=4 method=fisher}", "expected one of plain, activation"),
    ],
)
def test_bad_options(spec: str, message: str) -> None:
    with pytest.raises(PassConfigError, match=message):
        PassManager.parse(spec)
    with pytest.raises(PassConfigError, match="empty name"):
        Svd(rank=4, exclude=("",))


def test_quantize_treats_both_factors_as_linears(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(LINEAR, w=_rank(rng, 48, 32, 8), b=rng.normal(size=32))
    Svd(rank=8, blocks_only=False)(model)
    float_intermediate = model.clone()

    both = Quantize(activations="dynamic", format="qdq")(model)
    first_only = Quantize(activations="dynamic", format="qdq", exclude=(".svd_b",))(float_intermediate)

    assert both.stats["quantized"] == 2
    assert first_only.stats["quantized"] == 1 and first_only.stats["skipped: excluded"] == 1
    feeds = {"x": _x(rng, 2, 5, 48)}
    for m in (model, float_intermediate):
        out = ort_runtime.run(ort_runtime.create_session(m), feeds)["y"]
        assert out.shape == (2, 5, 32) and np.isfinite(out).all()


# ----------------------------------------------------------------------------- real graphs


def test_pipeline_on_a_gqa_model(zoo_model, zoo_entries) -> None:
    entry = zoo_entries["llama"]  # RMSNorm, SwiGLU, 4 query heads on 2 KV heads
    model = tforge.load(zoo_model("llama"))
    rng = np.random.default_rng(0)
    model.meta[FEEDS_KEY] = [entry.inputs(2, 9, rng) for _ in range(4)]

    report = PassManager.parse(
        "canonicalize,calibrate{gram=true},svd{ratio=0.2 method=activation}",
        verify_each=True,
        progress=lambda _: None,
    ).run(model)

    record = report.passes[-1]
    layers = entry.truth.num_layers
    assert record.stats["factorised"] >= 1
    assert record.stats["factorised"] + record.stats["skipped: budget met on other layers"] == 7 * layers
    assert record.details["reduction"] >= 0.2
    assert "calibrated" not in report.properties
    removed = sum(row["params_before"] - row["params_after"] for row in record.details["layers"])
    assert removed == record.details["removed_params"]
    session = ort_runtime.create_session(model)
    for batch, seq in [(1, 5), (3, 11)]:
        feeds = entry.inputs(batch, seq, np.random.default_rng(batch))
        (logits,) = ort_runtime.run(session, feeds).values()
        assert logits.shape[:2] == (batch, seq) and np.isfinite(logits).all()


def test_rank_of_an_exported_model_keeps_its_outputs(zoo_model, zoo_entries) -> None:
    """Every in-block linear at its largest saving rank on a model whose weights have low rank."""
    entry = zoo_entries["bert"]
    model = tforge.load(zoo_model("bert"))
    PassManager.parse("canonicalize", progress=lambda _: None).run(model)
    rng = np.random.default_rng(0)
    for lin in _linears(model):  # give every weight rank 16
        low = _rank(rng, lin.in_features, lin.out_features, 16).astype(np.float32)
        lin.weight.const_value = ir.tensor(low, name=lin.weight.name)
    reference = model.clone()

    result = Svd(rank=16)(model)

    assert result.stats["factorised"] == 6 * entry.truth.num_layers
    feeds = verify.make_inputs(reference, dims={"batch": 2, "sequence": 7}, rng=rng)
    _assert_same_function(reference, model, feeds)
