"""linear-attention: exact cases against the original, chunked vs unchunked, no N x N, selection."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from tests.models import zoo
from tforge import testing
from tforge.compiler.calibration import FEEDS_KEY
from tforge.compiler.pipeline import PassManager
from tforge.compiler.structure import find_blocks
from tforge.compiler.verify import compare_outputs
from tforge.errors import PassConfigError, PreconditionError
from tforge.passes.linear_attention import (
    LinearAttention,
    ort_has_linear_attention,
    quadratic_values,
)

ZooModel = Callable[[str], Path]


def _load(zoo_model: ZooModel, name: str) -> ir.Model:
    return ir.load(str(zoo_model(name)))


def _zero_query_key(model: ir.Model) -> None:
    """Q = K = 0: softmax attention becomes the uniform average over visible keys, and so does
    linear attention with elu+1 (phi(0) = 1 for every feature): an exactly representable case."""
    for block in find_blocks(model).blocks:
        attn = block.attention
        assert attn is not None
        for lin in (attn.q, attn.k):
            for value in (lin.weight, lin.bias):
                if value is not None:
                    value.const_value = ir.tensor(
                        np.zeros(value.shape, np.float32), name=value.name
                    )  # type: ignore[arg-type]


def _feeds(name: str, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    return zoo.ZOO[name].inputs(batch, seq, np.random.default_rng(seed))


IMPLS = [
    "chunked",
    pytest.param(
        "ort-op", marks=pytest.mark.skipif(not ort_has_linear_attention(), reason="no ORT op")
    ),
]


@pytest.mark.parametrize("name", ["llama", pytest.param("qwen2", marks=pytest.mark.slow), "bert"])
@pytest.mark.parametrize("impl", IMPLS)
def test_uniform_attention_is_exact(zoo_model: ZooModel, name: str, impl: str) -> None:
    model = _load(zoo_model, name)
    _zero_query_key(model)
    original = model.clone()

    result = LinearAttention(causal_impl=impl, chunk=4)(model)

    truth = zoo.ZOO[name].truth
    kind = f"causal {impl}" if truth.causal else "non-causal"
    assert result.changed
    assert result.stats == {"converted": 2, f"converted: {kind}": 2}
    assert not [n for n in model.graph if n.op_type == "Softmax"]
    assert all(row["padding_mask"] == "attention_mask" for row in result.details["layers"])
    # right padding in the last row (zoo inputs): padded keys must be left out
    testing.assert_ort_allclose(original, model, _feeds(name, 2, 11), atol=1e-5)


def test_chunked_equals_unchunked_and_the_ort_op(zoo_model: ZooModel) -> None:
    # random weights and inputs; chunk 64 >= the sequence is one chunk: the plain masked form
    base = _load(zoo_model, "llama")
    models = {}
    for label, options in {
        "chunk=3": {"chunk": 3},
        "chunk=5": {"chunk": 5},
        "one chunk": {"chunk": 64},
        **({"ort-op": {"causal_impl": "ort-op"}} if ort_has_linear_attention() else {}),
    }.items():
        model = base.clone()
        LinearAttention(**options)(model)  # type: ignore[arg-type]
        models[label] = model
    feeds = _feeds("llama", 3, 17, seed=1)
    for label, model in models.items():
        if label != "one chunk":
            testing.assert_ort_allclose(models["one chunk"], model, feeds, atol=1e-5)


def test_no_sequence_squared_tensor_and_dynamic_shapes(zoo_model: ZooModel) -> None:
    model = _load(zoo_model, "llama")
    seq = 151  # longer than every width of the model (64, 128), so only sequence dims reach it
    feeds = _feeds("llama", 1, seq)
    before = quadratic_values(model, feeds, seq)
    assert any("[1, 4, 151, 151]" in v for v in before)  # the check sees the scores

    LinearAttention(chunk=16)(model)

    assert quadratic_values(model, feeds, seq) == []
    graph_inputs = {v.name: v.shape for v in model.graph.inputs}
    assert [str(d) for d in graph_inputs["input_ids"]] == ["batch", "sequence"]  # type: ignore[union-attr]
    for batch, n in ((1, 1), (1, 16), (3, 37)):
        out = compare_outputs(model, model, _feeds("llama", batch, n))
        assert out[0].shape == (batch, n, zoo.HIDDEN)


def test_skips_are_reported(zoo_model: ZooModel) -> None:
    vit = _load(zoo_model, "vit")
    result = LinearAttention()(vit)
    assert not result.changed
    assert result.stats == {"skipped: a constant mask on non-causal attention": 2}

    llama = _load(zoo_model, "llama")
    result = LinearAttention(indices=(1,))(llama)
    assert result.stats == {
        "skipped: not in indices": 1,
        "converted": 1,
        "converted: causal chunked": 1,
    }
    assert len([n for n in llama.graph if n.op_type == "Softmax"]) == 1
    again = LinearAttention(indices=(1,))(llama)  # idempotent: nothing left to convert there
    assert not again.changed and again.stats == {"skipped: not in indices": 1}


def test_selection_by_measured_error(zoo_model: ZooModel) -> None:
    model = _load(zoo_model, "llama")
    model.meta[FEEDS_KEY] = [_feeds("llama", 2, 24, seed=s) for s in range(3)]

    result = LinearAttention(layers=1)(model)

    rows = result.details["layers"]
    errors = [row["error"] for row in rows]
    assert all(e > 0 for e in errors)
    assert [row["converted"] for row in rows] == [errors[0] <= errors[1], errors[0] > errors[1]]
    assert result.stats["skipped: larger error than the selected layers"] == 1

    none = _load(zoo_model, "llama")
    none.meta[FEEDS_KEY] = model.meta[FEEDS_KEY]
    assert not LinearAttention(budget=0.0)(none).changed
    both = _load(zoo_model, "llama")
    both.meta[FEEDS_KEY] = model.meta[FEEDS_KEY]
    assert LinearAttention(budget=sum(errors) * 1.01)(both).stats["converted"] == 2


def test_fitted_maps_beat_elu(zoo_model: ZooModel) -> None:
    pytest.importorskip("torch")
    feeds = [_feeds("llama", 2, 24, seed=s) for s in range(3)]
    errors = {}
    for fmap in ("elu", "fitted"):
        model = _load(zoo_model, "llama")
        original = model.clone()
        model.meta[FEEDS_KEY] = feeds
        result = LinearAttention(feature_map=fmap, fit_steps=40, fit_seconds=20.0)(model)  # type: ignore[arg-type]
        errors[fmap] = [row["error"] for row in result.details["layers"]]
        if fmap == "fitted":
            assert all(
                row["fit"]["loss_end"] < row["fit"]["loss_start"]
                for row in result.details["layers"]
            )
            assert any(n.op_type == "Softmax" and "linattn" in (n.name or "") for n in model.graph)
            # the emitted graph computes what the measured error assumed: compare to the original
            out = compare_outputs(original, model, _feeds("llama", 2, 24, seed=0))
            assert out[0].cosine > 0.9
    assert all(f < e for f, e in zip(errors["fitted"], errors["elu"], strict=True))


def test_pipeline_and_options(zoo_model: ZooModel) -> None:
    model = _load(zoo_model, "llama")
    report = PassManager.parse(
        "canonicalize,linear-attention{indices=0 chunk=8}", verify_each=True
    ).run(model)
    assert report is not None
    assert len([n for n in model.graph if n.op_type == "Softmax"]) == 1
    with pytest.raises(PassConfigError):
        PassManager.parse("linear-attention{layers=1 budget=0.1}")
    with pytest.raises(PassConfigError):
        PassManager.parse("linear-attention{chunk=0}")
    with pytest.raises(PreconditionError, match="needs calibration data"):
        LinearAttention(layers=1)(_load(zoo_model, "llama"))
