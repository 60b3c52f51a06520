"""The graph editor, the skip records and the cached block map."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from tests.models.tiny import pre_norm_block
from tforge import testing
from tforge.compiler.pass_infra import PROVENANCE_KEY, SiteStats, Skip
from tforge.compiler.pipeline import PassManager
from tforge.compiler.rewrite import GraphEditor
from tforge.compiler.structure import BLOCK_MAP_KEY, block_map
from tforge.errors import PreconditionError
from tforge.runtime import spill

SHARED = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[2, 4] x) => (float[2, 3] y, float[2, 3] z) <float[4, 3] w>
{
    y = MatMul (x, w)
    z = MatMul (x, w)
}
"""


def _block(rng: np.random.Generator) -> ir.Model:
    text = pre_norm_block()
    consts = testing.random_float_initializers(text, rng)
    return testing.model_from_onnx_text(
        text, **consts, heads=np.array([0, 4, 2, 4], np.int64), merged=np.array([0, 4, 8], np.int64)
    )


def test_names_are_unique_per_namespace_and_marked(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(SHARED, w=rng.normal(size=(4, 3)).astype(np.float32))
    editor = GraphEditor(model, "demo")
    a = editor.initializer("w", np.zeros(3, np.float32))  # "w" is taken by the weight
    b = editor.initializer("w", np.zeros(3, np.float32))
    assert (a.name, b.name) == ("w.1", "w.2")
    node = editor.node("Add", [model.graph.outputs[0], a], name="y", outputs="y")
    assert node.outputs[0].name == "y.1"  # the value name y exists; no node is called y
    assert node.name == "y"
    assert node.metadata_props[PROVENANCE_KEY] == "demo" and a.metadata_props[PROVENANCE_KEY] == "demo"
    scalar = editor.initializer("s", np.float32(2.0))
    assert scalar.shape is not None and scalar.shape.rank() == 0  # a 0-d constant stays 0-d


def test_set_constant_splits_off_a_shared_weight(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(SHARED, w=rng.normal(size=(4, 3)).astype(np.float32))
    first, second = list(model.graph)
    shared = first.inputs[1]
    editor = GraphEditor(model, "demo")
    new = editor.set_constant(shared, [(first, 1)], np.ones((4, 3)))
    assert new is not shared and first.inputs[1] is new and second.inputs[1] is shared
    again = editor.set_constant(shared, [(second, 1)], np.zeros((4, 3)))
    assert again is shared  # now its only reader: rewritten in place
    assert np.all(shared.const_value.numpy() == 0)


def test_rewritten_weights_spill_for_large_models(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spill, "MIN_SPILL_BYTES", 16)
    model = testing.model_from_onnx_text(SHARED, w=rng.normal(size=(4, 3)).astype(np.float32))
    spill.enable_if_large(model, spill.threshold())
    value = GraphEditor(model, "demo").initializer("big", np.ones((8, 8), np.float32))
    assert isinstance(value.const_value, ir.ExternalTensor)
    assert np.array_equal(value.const_value.numpy(), np.ones((8, 8), np.float32))


def test_placement_follows_the_cursor(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(SHARED, w=rng.normal(size=(4, 3)).astype(np.float32))
    editor = GraphEditor(model, "demo")
    x = model.graph.inputs[0]
    editor.place_after(x)  # a graph input: the chain starts first in the graph
    a = editor.op("Relu", [x], name="a")
    editor.op("Neg", [a], name="b")
    assert [n.name for n in model.graph][:2] == ["a", "b"]


def test_block_map_is_cached_until_the_graph_changes(rng: np.random.Generator) -> None:
    model = _block(rng)
    first = block_map(model)
    assert block_map(model) is first
    editor = GraphEditor(model, "demo")
    editor.initializer("unused", np.zeros(2, np.float32))
    assert BLOCK_MAP_KEY not in model.meta  # the editor dropped it
    second = block_map(model)
    assert second is not first and len(second.blocks) == 1
    # an edit by hand, without the editor: the fingerprint sees it
    relu = next(n for n in model.graph if n.op_type == "Relu")
    relu.replace_input_with(0, relu.inputs[0].producer().inputs[0])  # type: ignore[union-attr]
    assert block_map(model) is not second


def test_skips_are_counted_and_listed() -> None:
    stats = SiteStats()
    stats.skip("gamma already 1", "LayerNormalization 'ln'", blocked=False)
    stats.skip(Skip("skipped: weight is shared", "'w'"), count=2)
    assert stats == {"skipped: gamma already 1": 1, "skipped: weight is shared": 2}
    assert [s.to_dict() for s in stats.skips] == [
        {"at": "LayerNormalization 'ln'", "reason": "gamma already 1", "blocked": False},
        {"at": "'w'", "reason": "weight is shared", "blocked": True},
    ]


def test_explain_lists_skipped_sites_and_strict_refuses_a_pass_that_skipped_all(rng: np.random.Generator) -> None:
    model = _block(rng)
    report = PassManager.parse("canonicalize,svd{rank=8}").run(model)  # 8 = full rank: saves nothing
    record = report.passes[-1]
    assert not record.changed and record.skipped
    assert all(s["reason"] == "rank saves no parameters" for s in record.skipped)
    assert "svd{rank=8}: " in report.explain() and "rank saves no parameters" in report.explain()
    with pytest.raises(PreconditionError, match="strict: svd changed nothing"):
        PassManager.parse("canonicalize,svd{rank=8}", strict=True).run(_block(rng))
    # nothing to do is not an error: a second ln-migrate finds every gamma already 1
    twice = _block(rng)
    PassManager.parse("canonicalize,ln-migrate,ln-migrate", strict=True).run(twice)
