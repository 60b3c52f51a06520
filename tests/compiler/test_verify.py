"""Structural verification, feed generation and numeric comparison."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from tforge import testing
from tforge.compiler.verify import (
    TOLERANCES,
    assert_close,
    compare_arrays,
    compare_outputs,
    make_inputs,
    verify_structure,
)
from tforge.errors import VerificationError

MLP = """
<ir_version: 10, opset_import: ["" : 18]>
mlp (float[B, 8] x) => (float[B, 4] y)
<float[8, 4] w>
{
    h = Relu (x)
    y = MatMul (h, w)
}
"""

EMBED = """
<ir_version: 10, opset_import: ["" : 18]>
embed (int64[batch, seq] input_ids, int64[batch, seq] attention_mask, float[batch, seq, 8] x,
       int64[3] flags) => (float[batch, seq, 8] y, float[batch, seq] m)
<float[50, 8] table>
{
    e = Gather (table, input_ids)
    y = Add (e, x)
    m = Cast <to = 1> (attention_mask)
}
"""


def mlp(rng: np.random.Generator) -> ir.Model:
    return testing.model_from_onnx_text(MLP, w=rng.normal(size=(8, 4)))


def test_a_valid_model_passes(rng: np.random.Generator) -> None:
    verify_structure(mlp(rng))


def test_use_before_definition_is_detected(rng: np.random.Generator) -> None:
    model = mlp(rng)
    relu = model.graph.node(0)
    model.graph.remove(relu)
    model.graph.append(relu)

    with pytest.raises(
        VerificationError, match=r"node 0 .*\(MatMul\) input 0 'h' is used before it is defined"
    ):
        verify_structure(model)


def test_duplicate_value_names_are_detected(rng: np.random.Generator) -> None:
    model = mlp(rng)
    model.graph.node(0).outputs[0].name = "x"

    with pytest.raises(VerificationError, match=r"output 'x' reuses a value name"):
        verify_structure(model)


def test_unproduced_graph_output_is_detected(rng: np.random.Generator) -> None:
    model = mlp(rng)
    model.graph.outputs.append(ir.Value(name="ghost"))

    with pytest.raises(VerificationError, match=r"output 1 'ghost' is not produced"):
        verify_structure(model)


def test_node_output_that_is_an_initializer_is_detected(rng: np.random.Generator) -> None:
    model = mlp(rng)
    model.graph.initializers["h"] = ir.Value(
        name="h", const_value=ir.tensor(np.zeros(8, np.float32))
    )

    with pytest.raises(VerificationError, match=r"output 'h' is also an initializer"):
        verify_structure(model)


def test_ops_missing_from_the_declared_opset_are_detected(rng: np.random.Generator) -> None:
    model = mlp(rng)
    model.graph.node(0).op_type = "Frobnicate"
    with pytest.raises(VerificationError, match=r"\(Frobnicate\) is not an operator of opset 18"):
        verify_structure(model)

    ln = testing.model_from_onnx_text(
        MLP.replace("Relu (x)", "LayerNormalization (x, g)").replace(
            "<float[8, 4] w>", "<float[8, 4] w, float[8] g>"
        ),
        w=rng.normal(size=(8, 4)),
        g=np.ones(8),
    )
    verify_structure(ln)
    ln.opset_imports[""] = 16  # LayerNormalization arrived in opset 17
    with pytest.raises(
        VerificationError, match=r"LayerNormalization\) is not an operator of opset 16"
    ):
        verify_structure(ln)


def test_subgraphs_see_outer_values_and_are_checked() -> None:
    model = testing.model_from_onnx_text(
        """
        <ir_version: 10, opset_import: ["" : 18]>
        branch (bool cond, float[8] x) => (float[8] y)
        {
            y = If (cond) <
                then_branch = then_g () => (float[8] t) { t = Relu (x) },
                else_branch = else_g () => (float[8] e) { e = Neg (x) }
            >
        }
        """
    )
    verify_structure(model)
    then_branch = model.graph.node(0).attributes["then_branch"].value
    then_branch.node(0).op_type = "Frobnicate"
    with pytest.raises(VerificationError, match=r"graph 'then_g'.*Frobnicate"):
        verify_structure(model)


def test_make_inputs_respects_embeddings_masks_and_dims() -> None:
    model = testing.model_from_onnx_text(EMBED, table=np.zeros((50, 8)))

    feeds = make_inputs(model, dims={"seq": 5}, rng=np.random.default_rng(1))

    assert set(feeds) == {"input_ids", "attention_mask", "x", "flags"}
    assert feeds["input_ids"].shape == (2, 5) and feeds["input_ids"].dtype == np.int64
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < 50
    assert len(np.unique(feeds["input_ids"])) > 2  # really drawn over the table, not [0, 2)
    assert np.array_equal(feeds["attention_mask"], np.ones((2, 5), np.int64))
    assert feeds["x"].shape == (2, 5, 8) and feeds["x"].dtype == np.float32
    assert set(np.unique(feeds["flags"])) <= {0, 1}
    assert make_inputs(model)["x"].shape == (2, 16, 8)


def test_compare_identical_models(rng: np.random.Generator) -> None:
    model = mlp(rng)
    feeds = make_inputs(model, rng=rng)

    (comparison,) = compare_outputs(model, model.clone(), feeds)

    assert comparison.name == "y" and comparison.shape == (2, 4)
    assert comparison.max_abs == 0.0 and comparison.max_rel == 0.0
    assert comparison.cosine == pytest.approx(1.0)
    assert_close([comparison])


def test_compare_perturbed_model_names_the_worst_element(rng: np.random.Generator) -> None:
    model = mlp(rng)
    perturbed = model.clone()
    w = perturbed.graph.initializers["w"]
    weights = w.const_value.numpy().copy()
    weights[:, 3] += 0.5
    w.const_value = ir.tensor(weights)
    feeds = {"x": np.abs(rng.normal(size=(2, 8))).astype(np.float32)}  # Relu keeps every row

    (comparison,) = compare_outputs(model, perturbed, feeds)

    assert comparison.max_abs > 0.1 and comparison.worst_index[1] == 3
    assert comparison.cosine < 1.0
    with pytest.raises(
        VerificationError, match=r"output 'y' differs at \[\d, 3\]: got .*, expected .* \(abs err"
    ):
        assert_close([comparison])
    assert_close([comparison], atol=10.0, rtol=0.0)  # explicit tolerances override the table
    with pytest.raises(AssertionError, match=r"output 'y' differs at"):
        testing.assert_ort_allclose(model, perturbed, feeds)


def test_assert_close_is_elementwise_and_catches_nan_and_inf() -> None:
    reference = np.array([100.0, 1e-9, 1.0, np.inf], dtype=np.float32)
    # abs error 1e-4 on 100 is within rtol, rel error 1e3 on 1e-9 is within atol: passes
    close = compare_arrays("y", reference, np.array([100.0001, 1e-6, 1.0, np.inf], np.float32))
    assert close.max_abs > 1e-5 and close.max_rel > 1e-4
    assert_close([close])
    assert set(dataclasses.asdict(close)) == {
        "name",
        "max_abs",
        "max_rel",
        "cosine",
        "worst_index",
        "shape",
    }

    nan = np.array([100.0, 1e-9, np.nan, np.inf], np.float32)
    with pytest.raises(VerificationError, match=r"output 'y' differs at \[2\]: got nan"):
        assert_close([compare_arrays("y", reference, nan)])
    finite = np.array([100.0, 1e-9, 1.0, 1.0], np.float32)  # 1 where inf was expected
    with pytest.raises(
        VerificationError, match=r"output 'y' differs at \[3\]: got 1, expected inf"
    ):
        assert_close([compare_arrays("y", reference, finite)])

    summary_only = dataclasses.replace(close)  # arrays lost: judged on max_abs / max_rel
    with pytest.raises(VerificationError, match="max abs err"):
        assert_close([summary_only])
    assert_close([summary_only], atol=1e-3)


def test_tolerance_table_has_one_entry_per_float_dtype() -> None:
    atol32, rtol32 = TOLERANCES[np.float32]
    atol16, rtol16 = TOLERANCES[np.float16]
    assert 0 < atol32 < atol16 and 0 < rtol32 < rtol16 < 1
    assert TOLERANCES[np.int64] == (0.0, 0.0)
