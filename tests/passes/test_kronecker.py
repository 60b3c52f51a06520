"""kronecker: x @ W becomes Reshape/Transpose/MatMul over sum_i A_i (x) B_i; exact for exact factors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tforge import testing
from tforge.compiler.calibration import FEEDS_KEY, STATS_KEY, calibrate_model
from tforge.compiler.factoring import WeightGroup
from tforge.compiler.pipeline import PassManager
from tforge.compiler.printer import print_ir
from tforge.compiler.rewrite import GraphEditor
from tforge.compiler.structure import const_array, find_blocks
from tforge.errors import PassConfigError, PreconditionError
from tforge.passes.kronecker import Kronecker, lower_kronecker, macs_ratio
from tforge.passes.math import factorization as fz
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

# No bias, the MatMul output is the graph output, and the input has no sequence axis.
FLAT = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, 48] x) => (float[B, 32] y)
<float[48, 32] w>
{
    y = MatMul (x, w)
}
"""

SHAPE = fz.KroneckerShape(6, 4, 8, 8)  # A_i [6, 4], B_i [8, 8]: W [48, 32]


def _kron(rng: np.random.Generator, terms: int, shape: fz.KroneckerShape = SHAPE) -> np.ndarray:
    return fz.kronecker_sum(
        rng.normal(size=(terms, shape.m1, shape.n1)), rng.normal(size=(terms, shape.m2, shape.n2))
    )


def _assert_same_function(reference: ir.Model, candidate: ir.Model, feeds: dict) -> None:
    """Max abs error at most 1e-4 of the reference output's max abs (ORT optimizations off)."""
    expected = ort_runtime.run(ort_runtime.create_session(reference, optimize=False), feeds)
    scale = max(float(np.abs(v).max()) for v in expected.values())
    testing.assert_ort_allclose(reference, candidate, feeds, atol=1e-4 * scale, rtol=0.0)


def _x(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


def test_exact_kronecker_product_is_recovered_and_outputs_match(rng: np.random.Generator) -> None:
    w, b = _kron(rng, 2), rng.normal(size=32)
    model = testing.model_from_onnx_text(LINEAR, w=w, b=b)
    original = model.clone()

    result = Kronecker(terms=2, factors="6x4,8x8", blocks_only=False, max_macs=2.0)(model)

    assert result.changed and result.stats == {"factorised": 1}
    testing.assert_ir_golden(model, "kronecker/two_terms.ir")
    init = model.graph.initializers
    a_cat, b_stack = const_array(init["w.kronecker_a"]), const_array(init["w.kronecker_b"])
    assert a_cat.shape == (6, 2 * 4) and b_stack.shape == (2 * 8, 8) and "w" not in init
    a = a_cat.reshape(6, 2, 4).transpose(1, 0, 2).astype(np.float64)
    np.testing.assert_allclose(fz.kronecker_sum(a, b_stack.reshape(2, 8, 8)), w, atol=1e-5 * np.abs(w).max())
    np.testing.assert_array_equal(const_array(init["b"]), b.astype(np.float32))  # bias kept
    (row,) = result.details["layers"]
    assert row["factors"] == "6x4,8x8" and row["terms"] == 2
    assert row["params_after"] == 2 * (24 + 64) and row["relative_output_error"] < 1e-12
    assert row["macs_ratio"] == pytest.approx(2 * (1 / 8 + 1 / 6))
    for shape in [(2, 3), (5, 1)]:  # dynamic batch and sequence
        _assert_same_function(original, model, {"x": _x(rng, *shape, 48)})


def test_one_term_graph_output_and_two_dimensional_input(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(FLAT, w=_kron(rng, 1))
    original = model.clone()

    result = Kronecker(terms=1, factors="6x4,8x8", blocks_only=False)(model)

    assert result.stats == {"factorised": 1}
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert [n.op_type for n in model.graph] == ["Reshape", "Transpose", "MatMul", "Transpose", "MatMul", "Reshape"]
    for batch in (1, 6):
        _assert_same_function(original, model, {"x": _x(rng, batch, 48)})


@pytest.mark.parametrize("method", ["plain", "activation"])
def test_all_terms_reproduce_the_outputs(method: str, rng: np.random.Generator) -> None:
    w = rng.normal(size=(48, 32))
    model = testing.model_from_onnx_text(LINEAR, w=w, b=rng.normal(size=32))
    original = model.clone()
    x = rng.normal(size=(300, 48)) * rng.uniform(0.1, 3.0, 48)
    spectrum = fz.kronecker_spectrum(w, SHAPE, method, x.T @ x / len(x))
    (lin,) = find_blocks(model).linears

    lower_kronecker(GraphEditor(model, "kronecker"), WeightGroup(lin.weight, [lin]), *spectrum.factors(24))

    for shape in [(2, 3), (4, 7)]:
        _assert_same_function(original, model, {"x": _x(rng, *shape, 48)})


def test_auto_factors_find_an_exact_product(rng: np.random.Generator) -> None:
    shape = fz.auto_kronecker_shapes(48, 32, limit=1, max_macs=1.0)[0]
    model = testing.model_from_onnx_text(LINEAR, w=_kron(rng, 1, shape), b=rng.normal(size=32))
    original = model.clone()

    result = Kronecker(terms=1, blocks_only=False)(model)

    (row,) = result.details["layers"]
    assert row["factors"] == str(shape) and row["relative_output_error"] < 1e-12
    _assert_same_function(original, model, {"x": _x(rng, 3, 5, 48)})


def test_layers_that_would_not_save_or_cost_too_much_are_left_alone(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(LINEAR, w=rng.normal(size=(48, 32)), b=rng.normal(size=32))
    before = print_ir(model)

    too_many = Kronecker(terms=20, factors="6x4,8x8", blocks_only=False, max_macs=100.0)(model)
    too_slow = Kronecker(terms=4, factors="6x4,8x8", blocks_only=False)(model)  # 4 * (1/8 + 1/6) > 1
    wrong_shape = Kronecker(terms=1, factors="4x4,8x8", blocks_only=False)(model)

    assert too_many.stats == {"skipped: that many terms save no parameters": 1}  # 20 * 88 > 1536
    assert too_slow.stats == {"skipped: that many terms exceed max-macs": 1}
    assert wrong_shape.stats == {"skipped: factors do not match the weight's shape": 1}
    assert not (too_many.changed or too_slow.changed or wrong_shape.changed)
    assert print_ir(model) == before


def test_ratio_reaches_the_budget_and_a_second_run_changes_nothing(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(LINEAR, w=_kron(rng, 2) + 1e-3 * rng.normal(size=(48, 32)), b=rng.normal(size=32))
    original = model.clone()

    result = Kronecker(ratio=0.5, blocks_only=False, shapes=4)(model)

    assert result.stats == {"factorised": 1}
    (row,) = result.details["layers"]
    assert result.details["reduction"] >= 0.5 and row["macs_ratio"] <= 1.0
    assert row["relative_output_error"] < 0.05
    again = Kronecker(ratio=0.5, blocks_only=False, shapes=4)(model)
    assert not again.changed and again.stats == {"skipped: already factorised": 2}
    for shape in [(1, 4), (3, 2)]:
        feeds = {"x": _x(rng, *shape, 48)}
        out = ort_runtime.run(ort_runtime.create_session(model), feeds)["y"]
        ref = ort_runtime.run(ort_runtime.create_session(original), feeds)["y"]
        assert out.shape == ref.shape == (*shape, 32)
        assert np.linalg.norm(out - ref) < 0.05 * np.linalg.norm(ref)


def test_activation_aware_has_lower_error_on_kronecker_structured_inputs(rng: np.random.Generator) -> None:
    c1 = rng.normal(size=(6, 6)) * rng.uniform(0.1, 3.0, 6)[:, None]
    c2 = rng.normal(size=(8, 8)) * rng.uniform(0.1, 3.0, 8)[:, None]

    def inputs(n: int) -> np.ndarray:
        z = rng.normal(size=(n, 6, 8))
        return np.einsum("nij,ia,jb->nab", z, c1, c2).reshape(1, n, 48).astype(np.float32)

    plain = testing.model_from_onnx_text(LINEAR, w=rng.normal(size=(48, 32)), b=rng.normal(size=32))
    plain.meta[STATS_KEY] = calibrate_model(plain, [{"x": inputs(512)} for _ in range(4)], gram=True)
    aware = plain.clone()
    aware.meta[STATS_KEY] = plain.meta[STATS_KEY]

    options = {"terms": 2, "factors": "6x4,8x8", "blocks_only": False}
    plain_row = Kronecker(**options)(plain).details["layers"][0]
    aware_row = Kronecker(**options, method="activation")(aware).details["layers"][0]

    assert aware_row["relative_output_error"] < 0.8 * plain_row["relative_output_error"]
    assert aware_row["plain_relative_output_error"] == pytest.approx(plain_row["relative_output_error"], rel=1e-6)


def test_activation_aware_needs_gram_matrices(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(LINEAR, w=rng.normal(size=(48, 32)), b=rng.normal(size=32))
    with pytest.raises(PreconditionError, match=r"add 'calibrate\{gram=true\}' before 'kronecker'"):
        Kronecker(terms=1, method="activation", blocks_only=False)(model)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("kronecker", "exactly one of terms= or ratio="),
        ("kronecker{terms=2 ratio=0.3}", "exactly one of"),
        ("kronecker{terms=0}", "terms must be at least 1"),
        ("kronecker{ratio=0}", "ratio must be in"),
        ("kronecker{terms=2 factors=16x24}", "factors must be 'auto' or 'm1xn1,m2xn2'"),
        ("kronecker{terms=2 max-macs=0}", "max-macs must be > 0"),
        ("kronecker{terms=2 shapes=0}", "shapes must be at least 1"),
    ],
)
def test_bad_options(spec: str, message: str) -> None:
    with pytest.raises(PassConfigError, match=message):
        PassManager.parse(spec)


def test_pipeline_on_an_exported_model(zoo_model, zoo_entries) -> None:
    entry = zoo_entries["gpt2"]
    model = tforge.load(zoo_model("gpt2"))
    model.meta[FEEDS_KEY] = [entry.inputs(2, 9, np.random.default_rng(i)) for i in range(4)]

    report = PassManager.parse(
        "canonicalize,calibrate{gram=true},kronecker{ratio=0.3 method=activation}",
        verify_each=True,
        progress=lambda _: None,
    ).run(model)

    record = report.passes[-1]
    assert record.stats["factorised"] >= 1 and record.details["reduction"] >= 0.3, record.stats
    assert all(row["macs_ratio"] <= 1.0 for row in record.details["layers"])
    session = ort_runtime.create_session(model)
    for batch, seq in [(1, 5), (3, 11)]:
        outputs = ort_runtime.run(session, entry.inputs(batch, seq, np.random.default_rng(batch)))
        first = next(iter(outputs.values()))
        assert first.shape[:2] == (batch, seq) and np.isfinite(first).all()


def test_macs_ratio_counts_both_products() -> None:
    # x [.., 48] -> [.., 8, 6] @ [6, r*4] and [.., 4, r*8] @ [r*8, 8], against 48 * 32 dense
    for terms in (1, 3):
        macs = 8 * 6 * terms * 4 + 4 * terms * 8 * 8
        assert macs_ratio(SHAPE, terms) == pytest.approx(macs / (48 * 32))


def test_quantize_treats_both_factor_products_as_linears(rng: np.random.Generator) -> None:
    from tforge.passes.quantize import Quantize

    model = testing.model_from_onnx_text(LINEAR, w=_kron(rng, 2), b=rng.normal(size=32))
    original = model.clone()
    Kronecker(terms=2, factors="6x4,8x8", blocks_only=False)(model)

    result = Quantize(activations="dynamic-per-token")(model)

    assert result.stats["quantized"] == 2
    feeds = {"x": _x(rng, 2, 5, 48)}
    out = ort_runtime.run(ort_runtime.create_session(model), feeds)["y"]
    ref = ort_runtime.run(ort_runtime.create_session(original), feeds)["y"]
    assert np.linalg.norm(out - ref) < 0.05 * np.linalg.norm(ref)
