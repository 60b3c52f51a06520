"""The IR printer: goldens on tiny graphs, and the properties that make dumps diffable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from tforge import testing
from tforge.compiler import printer
from tforge.compiler.printer import print_ir, write_dump
from tforge.errors import UnsupportedModelError
from tforge.runtime import save as model_save

LN_MATMUL = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, S, 8] x) => (float[B, S, 4] y)
<float[8] gamma, float[8] beta, float[8, 4] w>
{
    h = LayerNormalization <axis = -1, epsilon = 1e-5> (x, gamma, beta)
    y = MatMul (h, w)
}
"""

OPS = """
<ir_version: 10, opset_import: ["" : 18, "com.microsoft" : 1]>
ops (float[N, ?, 8] x, float mx) => (float[N, ?, 4] a, float[N, ?, 4] b, float[N, ?, 8] g)
{
    c = Clip (x, , mx)
    a, b = Split <axis = -1, num_outputs = 2> (c)
    g = com.microsoft.Gelu (x)
}
"""

CONSTANT = """
<ir_version: 10, opset_import: ["" : 18]>
consts (float[2, 8] x) => (float[2, 8] y, float[2, 8] z)
{
    half = Constant <value = float {0.5}> ()
    ramp = Constant <value = float[8] {0, 1, 2, 3, 4, 5, 6, 7}> ()
    axes = Constant <value_ints = [1]> ()
    y = Mul (x, half)
    z = Add (x, ramp)
}
"""

IF_BRANCHES = """
<ir_version: 10, opset_import: ["" : 18]>
branch (bool cond, float[8] x) => (float[8] y)
{
    y = If (cond) <
        then_branch = then_g () => (float[8] t) { t = Relu (x) },
        else_branch = else_g () => (float[8] e) { e = Neg (x) }
    >
}
"""

SYMBOLIC = """
<ir_version: 10, opset_import: ["" : 18]>
dyn (float[batch, seq, 8] x, int64[batch, seq] mask) => (float[batch, seq, 8] y)
{
    m = Cast <to = 1> (mask)
    mu = Unsqueeze (m, axes)
    y = Mul (x, mu)
}
"""


def ln_matmul(rng: np.random.Generator) -> ir.Model:
    return testing.model_from_onnx_text(
        LN_MATMUL, gamma=np.ones(8), beta=rng.normal(size=8), w=rng.normal(size=(8, 4))
    )


def test_layernorm_matmul_golden(rng: np.random.Generator) -> None:
    testing.assert_ir_golden(ln_matmul(rng), "printer/layernorm_matmul.ir")


def test_optional_inputs_multiple_outputs_and_domains_golden() -> None:
    model = testing.model_from_onnx_text(OPS)
    text = print_ir(model)
    assert "Clip(%x, _, %mx)" in text
    assert "com.microsoft::Gelu(%x)" in text
    testing.assert_ir_golden(model, "printer/ops.ir")


def test_constant_nodes_golden() -> None:
    model = testing.model_from_onnx_text(CONSTANT)
    assert "{value=f32[] fill(0.5)}" in print_ir(model)
    testing.assert_ir_golden(model, "printer/constants.ir")


def test_if_subgraphs_golden() -> None:
    model = testing.model_from_onnx_text(IF_BRANCHES)
    testing.assert_ir_golden(model, "printer/if_branches.ir")


def test_symbolic_dims_golden() -> None:
    model = testing.model_from_onnx_text(SYMBOLIC, axes=np.array([2], dtype=np.int64))
    text = print_ir(model)
    assert "%x: f32[batch,seq,8]" in text
    testing.assert_ir_golden(model, "printer/symbolic_dims.ir")


def test_unnamed_values_get_deterministic_names_that_avoid_real_ones() -> None:
    x = ir.Value(name="_0", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 8]))
    relu = ir.node("Relu", [x])
    neg = ir.node("Neg", [relu.outputs[0]])
    graph = ir.Graph([x], neg.outputs, nodes=[relu, neg], name="anon", opset_imports={"": 18})
    relu.outputs[0].name = None  # the graph named them on insertion; unname them again
    neg.outputs[0].name = None
    model = ir.Model(graph, ir_version=10)

    text = print_ir(model)

    assert text == print_ir(model)
    # Named in order of first appearance: the graph signature comes first.
    assert "-> (%_1: ?)" in text and "%_2: ? = Relu(%_0)" in text and "%_1: ? = Neg(%_2)" in text
    testing.assert_ir_golden(model, "printer/unnamed_values.ir")


def test_output_is_stable_across_prints_and_a_save_load_round_trip(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    model = ln_matmul(rng)
    saved = model_save.save_model(model, tmp_path / "m.onnx")

    assert print_ir(model) == print_ir(model)
    assert print_ir(ir.load(saved)) == print_ir(model)


def test_external_tensors_round_trip_to_the_same_digests(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    model = ln_matmul(rng)
    saved = model_save.save_model(model, tmp_path / "m.onnx", external_data=True, size_threshold=0)
    loaded = ir.load(saved)

    assert isinstance(loaded.graph.initializers["w"].const_value, ir.ExternalTensor)
    assert print_ir(loaded) == print_ir(model)


def test_fills_digests_and_shape_mode(rng: np.random.Generator) -> None:
    model = ln_matmul(rng)
    text = print_ir(model)
    assert "%gamma = const f32[8] fill(1)" in text
    assert "%beta = const f32[8] sha1:" in text

    shapes = print_ir(model, tensors="shape")
    assert "%gamma = const f32[8]\n" in shapes and "sha1:" not in shapes and "fill(" not in shapes

    w = model.graph.initializers["w"]
    old_line = next(line for line in text.splitlines() if line.startswith("  %w ="))
    w.const_value = ir.tensor(w.const_value.numpy() * 2)
    assert old_line not in print_ir(model)


def test_provenance_suffix_on_nodes_and_initializers(rng: np.random.Generator) -> None:
    model = ln_matmul(rng)
    model.graph.initializers["w"].metadata_props[printer.PROVENANCE_KEY] = "ln-gamma-migration"
    model.graph.node(1).metadata_props[printer.PROVENANCE_KEY] = "smoothquant"

    lines = print_ir(model).splitlines()

    assert any(
        line.startswith("  %w = const") and line.endswith("  // ln-gamma-migration")
        for line in lines
    )
    assert "  %y: f32[B,S,4] = MatMul(%h, %w)  // smoothquant" in lines


def test_huge_external_tensors_are_not_read() -> None:
    shape = ir.Shape([8192, 8192])  # 256 MB of float32 in a file that does not even exist
    big = ir.ExternalTensor(
        "missing.data", 0, 4 * 8192 * 8192, ir.DataType.FLOAT, shape=shape, name="big"
    )
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 8192]))
    w = ir.Value(name="big", const_value=big)
    matmul = ir.node("MatMul", [x, w])
    graph = ir.Graph([x], matmul.outputs, nodes=[matmul], initializers=[w], opset_imports={"": 18})

    text = print_ir(ir.Model(graph, ir_version=10))

    assert "%big = const f32[8192,8192] sha1:lazy" in text


def test_banner_and_write_dump(rng: np.random.Generator, tmp_path: Path) -> None:
    model = ln_matmul(rng)

    path = write_dump(model, tmp_path / "ir", 3, "smoothquant", "IR after smoothquant [3/5]")

    assert path == tmp_path / "ir" / "003-smoothquant.ir"
    assert path.read_text().splitlines()[0] == "// ----- IR after smoothquant [3/5] ----- //"
    assert path.read_text() == print_ir(model, banner="IR after smoothquant [3/5]")
    assert sorted(p.name for p in path.parent.iterdir()) == ["003-smoothquant.ir"]


def test_bad_tensor_mode_is_rejected(rng: np.random.Generator) -> None:
    with pytest.raises(ValueError, match="tensors must be"):
        print_ir(ln_matmul(rng), tensors="values")  # type: ignore[arg-type]


def test_golden_helper_reports_missing_files_and_diffs(
    rng: np.random.Generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(testing, "GOLDEN_DIR", tmp_path)
    monkeypatch.delenv(testing.UPDATE_ENV, raising=False)
    model = ln_matmul(rng)

    with pytest.raises(
        AssertionError, match="does not exist; create it with TFORGE_UPDATE_GOLDENS=1"
    ):
        testing.assert_ir_golden(model, "p/m.ir")
    monkeypatch.setenv(testing.UPDATE_ENV, "1")
    testing.assert_ir_golden(model, "p/m.ir")
    monkeypatch.delenv(testing.UPDATE_ENV)
    testing.assert_ir_golden(model, "p/m.ir")
    model.graph.node(0).attributes["epsilon"] = ir.AttrFloat32("epsilon", 1e-6)
    with pytest.raises(AssertionError, match=r"(?s)-.*epsilon=1e-05.*\+.*epsilon=1e-06"):
        testing.assert_ir_golden(model, "p/m.ir")


def test_text_models_must_give_every_declared_initializer_a_value() -> None:
    with pytest.raises(UnsupportedModelError, match=r"\['w'\] are used but have no value"):
        testing.model_from_onnx_text(LN_MATMUL, gamma=np.ones(8), beta=np.zeros(8))
    with pytest.raises(UnsupportedModelError, match="no node reads 'gama'"):
        testing.model_from_onnx_text(LN_MATMUL, gama=np.ones(8))
