"""canonicalize: decomposed LayerNorm fused, Gemm unified to MatMul+Add, static shapes, idempotence."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from tforge import testing
from tforge.compiler.pipeline import PassManager
from tforge.errors import PassConfigError
from tforge.passes.canonicalize import Canonicalize
from tforge.runtime import ort as ort_runtime

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


# torch's SDPA export of a masked attention core: a boolean mask made additive with a constant
# (finfo.min there), scaled scores, Softmax, then a NaN guard before the context MatMul.
GUARDED_ATTENTION = """
<ir_version: 10, opset_import: ["" : 18]>
core (float[B, 2, S, 4] q, float[B, 2, S, 4] k, float[B, 2, S, 4] v, bool[B, 1, S, S] keep) => (float[B, 2, S, 4] y)
<float zero, float masked, float scale>
{
    bias = Where (keep, zero, masked)
    kt = Transpose <perm = [0, 1, 3, 2]> (k)
    raw = MatMul (q, kt)
    scaled = Mul (raw, scale)
    s = Add (scaled, bias)
    p = Softmax <axis = -1> (s)
    nan = IsNaN (p)
    guarded = Where (nan, zero, p)
    y = MatMul (guarded, v)
}
"""


def guarded_attention(masked: float) -> ir.Model:
    return testing.model_from_onnx_text(
        GUARDED_ATTENTION,
        zero=np.array(0.0, np.float32),
        masked=np.array(masked, np.float32),
        scale=np.array(0.5, np.float32),
    )


def attention_feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    keep = np.ones((3, 1, 5, 5), bool)
    keep[0] = False  # a fully masked sequence: every row masked
    keep[1, :, :, 3:] = False  # padding
    keep[2] = np.tril(np.ones((5, 5), bool))  # causal
    return {**{n: rng.normal(size=(3, 2, 5, 4)).astype(np.float32) for n in "qkv"}, "keep": keep}


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort_runtime.create_session(model, optimize=False).run(None, feeds)[0]


def test_nan_guard_dropped_when_the_mask_is_finite(rng: np.random.Generator) -> None:
    model = guarded_attention(float(np.finfo(np.float32).min))
    original = model.clone()
    result = Canonicalize()(model)
    assert result.stats["softmax NaN guard dropped"] == 1
    assert "IsNaN" not in [n.op_type for n in model.graph]
    feeds = attention_feeds(rng)
    expected = run(original, feeds)
    assert np.isfinite(expected).all()
    np.testing.assert_array_equal(run(model, feeds), expected)  # bit for bit


@pytest.mark.parametrize("masked", [-np.inf, np.nan])
def test_nan_guard_kept_when_the_mask_can_be_non_finite(masked: float, rng: np.random.Generator) -> None:
    model = guarded_attention(masked)
    result = Canonicalize()(model)
    assert not result.stats["softmax NaN guard dropped"]
    assert "IsNaN" in [n.op_type for n in model.graph]
    if masked == -np.inf:  # the fully masked rows really are NaN before the guard
        out = run(model, attention_feeds(rng))
        assert np.isfinite(out).all() and not out[0].any()


def test_nan_guard_kept_in_float16() -> None:
    """In float16, finfo.min plus a score below -16 overflows to -inf: the guard can fire."""
    text = GUARDED_ATTENTION.replace("float[B", "float16[B").replace("<float zero, float masked, float scale>", "<float16 zero, float16 masked, float16 scale>")
    model = testing.model_from_onnx_text(
        text,
        zero=np.array(0.0, np.float16),
        masked=np.array(np.finfo(np.float16).min, np.float16),
        scale=np.array(0.5, np.float16),
    )
    result = Canonicalize()(model)
    assert not result.stats["softmax NaN guard dropped"]



ROTATE_HALF = """
<ir_version: 10, opset_import: ["" : 18]>
rotate (float[B, 8] x) => (float[B, 8] y)
<int64[1] zero, int64[1] half, int64[1] full, int64[1] last>
{
    lo = Slice (x, zero, half, last)
    lo_neg = Neg (lo)
    hi = Slice (x, half, full, last)
    y = Concat <axis = -1> (hi, lo_neg)
}
"""


def test_halves_of_the_last_axis_become_one_split(rng: np.random.Generator) -> None:
    """Rotary's rotate_half: two Slices of one value's halves -> Split (found per value, not per pair),
    placed before the first Slice because a reader of the first half (Neg) sits between them."""
    model = testing.model_from_onnx_text(
        ROTATE_HALF,
        zero=np.array([0], np.int64), half=np.array([4], np.int64),
        full=np.array([8], np.int64), last=np.array([-1], np.int64),
    )  # fmt: skip
    original = model.clone()

    Canonicalize()(model)

    assert [n.op_type for n in model.graph] == ["Split", "Neg", "Concat"]
    feeds = {"x": rng.normal(size=(3, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(model, feeds), run(original, feeds))


# The TorchScript exporter's head split and rotate_half: the Reshape target and the half-width
# Slice bounds are computed at run time from Shape.
RUN_TIME_SHAPES = """
<ir_version: 10, opset_import: ["" : 18]>
heads (float[B, S, 8] x) => (float[B, 2, S, 4] y)
<int64[1] rest, int64[1] head_dim, int64 zero, int64 one, int64 three, int64 two, int64[1] first, int64[1] end, int64[1] last, int64[1] step>
{
    shape = Shape (x)
    b = Gather <axis = 0> (shape, zero)
    s = Gather <axis = 0> (shape, one)
    b1 = Unsqueeze (b, first)
    s1 = Unsqueeze (s, first)
    target = Concat <axis = 0> (b1, s1, rest, head_dim)
    split = Reshape (x, target)
    q = Transpose <perm = [0, 2, 1, 3]> (split)
    q_shape = Shape (q)
    d = Gather <axis = 0> (q_shape, three)
    h = Div (d, two)
    half = Unsqueeze (h, first)
    x1 = Slice (q, first, half, last, step)
    x2 = Slice (q, half, end, last, step)
    n = Neg (x2)
    y = Concat <axis = -1> (n, x1)
}
"""


def test_shapes_computed_at_run_time_are_read_back(rng: np.random.Generator) -> None:
    """The head split's output gets the dims its target proves ([B, S, -1, 4] of a [B, S, 8] input:
    [B, S, 2, 4]), and the rotate_half bound Shape(q)[3] / 2 folds to a constant."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    model = testing.model_from_onnx_text(
        RUN_TIME_SHAPES, rest=i64(-1), head_dim=i64(4), zero=np.array(0, np.int64), one=np.array(1, np.int64),
        three=np.array(3, np.int64), two=np.array(2, np.int64), first=i64(0), end=i64(2**63 - 1), last=i64(3), step=i64(1),
    )  # fmt: skip
    original = model.clone()

    Canonicalize()(model)

    split = next(n for n in model.graph if n.op_type == "Reshape")
    assert split.outputs[0].shape == ir.Shape(["B", "S", 2, 4])
    slices = [n for n in model.graph if n.op_type == "Slice"]
    assert [(s.inputs[1].const_value.numpy().tolist(), s.inputs[2].const_value.numpy().tolist()) for s in slices] == [([0], [2]), ([2], [2**63 - 1])]
    assert "Div" not in [n.op_type for n in model.graph]
    feeds = {"x": rng.normal(size=(3, 5, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(model, feeds), run(original, feeds))


# torch's export of scaled_dot_product_attention: K^T as a batched transpose of its last two axes
BATCHED_KEY_TRANSPOSE = """
<ir_version: 10, opset_import: ["" : 18]>
keyt (float[B, 4, S, 8] k) => (float[B, 4, Y2, Y3] y)
<int64[1] minus_one, int64[1] start_last, int64[1] start_lead, int64[1] big, int64[1] zero>
{
    shape = Shape (k)
    last = Slice (shape, start_last, big)
    second = Slice (shape, start_lead, start_last)
    lead = Slice (shape, zero, start_lead)
    flat_target = Concat <axis = 0> (minus_one, second, last)
    flat = Reshape (k, flat_target)
    flat_t = Transpose <perm = [0, 2, 1]> (flat)
    back_target = Concat <axis = 0> (lead, BACK)
    y = Reshape (flat_t, back_target)
}
"""


@pytest.mark.parametrize(("back", "folded"), [("last, second", True), ("second, last", False)])
def test_batched_transpose_of_the_last_two_axes_is_one_transpose(back: str, folded: bool, rng: np.random.Generator) -> None:
    """Reshape [b*h, s, d] -> Transpose [0, 2, 1] -> Reshape [b, h, d, s] is Transpose(k, [0, 1, 3, 2])
    (ONNX Runtime folds that into the scores MatMul); split back with [.., s, d] it is another
    reshuffle of the data, and stays."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    model = testing.model_from_onnx_text(
        BATCHED_KEY_TRANSPOSE.replace("BACK", back),
        minus_one=i64(-1), start_last=i64(-1), start_lead=i64(-2), big=i64(1 << 62), zero=i64(0),
    )  # fmt: skip
    original = model.clone()

    result = Canonicalize()(model)

    assert result.stats.get("last-two-axes transpose unbatched", 0) == int(folded)
    ops = [n.op_type for n in model.graph]
    if folded:
        assert ops == ["Transpose"] and list(model.graph[0].attributes["perm"].value) == [0, 1, 3, 2]
    else:
        assert "Reshape" in ops
    feeds = {"k": rng.normal(size=(3, 4, 5, 8)).astype(np.float32)}
    testing.assert_ort_allclose(original, model, feeds, atol=0.0, rtol=0.0)
