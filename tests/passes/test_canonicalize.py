"""canonicalize: decomposed LayerNorm fused, Gemm unified to MatMul+Add, static shapes, idempotence."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from tforge import testing
from tforge.compiler.pipeline import PassManager
from tforge.errors import PassConfigError
from tforge.passes.canonicalize import Canonicalize

DECOMPOSED = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, 8] x) => (float[B, 4] y)
<float[8] gamma, float[8] beta, float[4, 8] w, float[4] c, int64[1] axes, float two, float eps>
{
    mean = ReduceMean <keepdims = 1> (x, axes)
    d = Sub (x, mean)
    d2 = Pow (d, two)
    var = ReduceMean <keepdims = 1> (d2, axes)
    ve = Add (var, eps)
    sd = Sqrt (ve)
    n = Div (d, sd)
    s = Mul (n, gamma)
    h = Add (s, beta)
    y = Gemm <transB = 1> (h, w, c)
}
"""


@pytest.fixture
def model(rng: np.random.Generator) -> ir.Model:
    return testing.model_from_onnx_text(
        DECOMPOSED,
        gamma=rng.uniform(0.5, 2, 8),
        beta=rng.normal(size=8),
        w=rng.normal(size=(4, 8)),
        c=rng.normal(size=4),
        axes=np.array([-1], dtype=np.int64),
        two=np.array(2.0, dtype=np.float32),
        eps=np.array(1e-5, dtype=np.float32),
    )


def test_fuses_layernorm_and_unifies_gemm(model: ir.Model, rng: np.random.Generator) -> None:
    original = model.clone()
    result = Canonicalize()(model)
    assert result.changed
    assert result.stats["layernorm fused"] == 1 and result.stats["gemm -> matmul+add"] == 1
    assert [n.op_type for n in model.graph] == ["LayerNormalization", "MatMul", "Add"]
    testing.assert_ir_golden(model, "canonicalize/fused_layernorm_gemm.ir")
    testing.assert_ort_allclose(original, model, {"x": rng.normal(size=(3, 8))}, atol=1e-5)


def test_second_run_changes_nothing(model: ir.Model) -> None:
    Canonicalize()(model)
    again = Canonicalize()(model)
    assert not again.changed


def test_static_shapes_follow_symbols(model: ir.Model, rng: np.random.Generator) -> None:
    result = Canonicalize(input_shapes={"x": "5x8"})(model)
    assert result.stats["inputs made static"] == 1
    assert model.graph.inputs[0].shape == ir.Shape([5, 8])
    assert model.graph.outputs[0].shape == ir.Shape([5, 4])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("canonicalize{input-shapes=x:5by8}", "not of the form 8x128"),
        ("canonicalize{input-shapes=x}", "expected key:value pairs"),
        ("canonicalize{fold-size-limit=0}", "must be positive"),
    ],
)
def test_bad_options(spec: str, message: str) -> None:
    with pytest.raises(PassConfigError, match=message):
        PassManager.parse(spec)


def test_shape_for_unknown_input_is_rejected(model: ir.Model) -> None:
    with pytest.raises(PassConfigError, match="the model's inputs are x"):
        Canonicalize(input_shapes={"input_ids": "1x8"})(model)
    with pytest.raises(PassConfigError, match="has rank 2"):
        Canonicalize(input_shapes={"x": "1x8x3"})(model)
