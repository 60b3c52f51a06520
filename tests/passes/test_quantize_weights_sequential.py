"""quantize-weights{sequential=true}: GPTQ block after block, each block's Gram matrices gathered on
the model whose earlier blocks are already quantized."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import pytest

from tests.models import tiny
from tforge import testing
from tforge.compiler import distributed
from tforge.compiler.calibration import FEEDS_KEY
from tforge.compiler.pipeline import PassManager
from tforge.compiler.structure import block_map
from tforge.errors import PassConfigError, PreconditionError
from tforge.passes.quantize_weights import QuantizeWeights
from tforge.runtime import ort as ort_runtime

TWO_LAYERS = tiny.pre_norm_layers(2, width=32, inner=64, seq=8)


def _model(rng: np.random.Generator) -> tuple[ir.Model, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Two pre-norm layers of width 32, the pipeline's calibration feeds, and held-out feeds."""
    weights = testing.random_float_initializers(TWO_LAYERS, rng)
    for name, w in weights.items():
        if name.startswith("w"):  # weights of unit gain: the residual stream keeps its scale
            weights[name] = (np.asarray(w) / np.sqrt(w.shape[0])).astype(np.float32)
    model = testing.model_from_onnx_text(
        TWO_LAYERS, **weights, heads=np.array([0, 8, 4, 8], np.int64), merged=np.array([0, 8, 32], np.int64),
    )  # fmt: skip
    mixing = rng.normal(size=(32, 32)) / 4 + np.eye(32)  # correlated channels: GPTQ has work to do
    feeds = [{"x": (rng.normal(size=(2, 8, 32)) @ mixing).astype(np.float32)} for _ in range(64)]
    model.meta[FEEDS_KEY] = feeds[:48]
    PassManager.parse("canonicalize", progress=lambda _: None).run(model)
    return model, feeds[:48], feeds[48:]


def _output_error(reference: ir.Model, model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> float:
    a = ort_runtime.create_session(reference, optimize=False)
    b = ort_runtime.create_session(model, optimize=False)
    num = sum(float(((ort_runtime.run(a, f)["y"] - ort_runtime.run(b, f)["y"]) ** 2).sum()) for f in feeds)
    den = sum(float((ort_runtime.run(a, f)["y"] ** 2).sum()) for f in feeds)
    return num / den


def _packed(model: ir.Model) -> dict[str, np.ndarray]:
    return {
        name: np.asarray(value.const_value.numpy())
        for name, value in model.graph.initializers.items()
        if name.endswith(".q4")
    }


def _quantize(model: ir.Model, sequential: bool) -> dict:
    spec = f"calibrate,quantize-weights{{method=gptq block=16 accuracy-level=0 sequential={str(sequential).lower()}}}"
    return PassManager.parse(spec, progress=lambda _: None).run(model).passes[-1]


def test_sequential_calibrates_once_per_block_on_the_partially_quantized_model(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model, feeds, held_out = _model(rng)
    reference, plain = model.clone(), model.clone()
    plain.meta[FEEDS_KEY] = feeds
    layer_of = {lin.name: ("_0" if lin.name.endswith("_0") else "_1") for lin in block_map(model).linears}
    assert len(block_map(model).blocks) == 2 and len(layer_of) == 12
    calls: list[list[str]] = []
    real = distributed.calibrate_model

    def counting(model_: ir.Model, feeds_, values, **kwargs):  # noqa: ANN001, ANN202
        if values is None:  # the calibrate pass before it (every linear input), not a round
            return real(model_, feeds_, values, **kwargs)
        calls.append(list(values))
        # the model calibrated has every earlier block on MatMulNBits already
        calls[-1].append(f"nbits={sum(n.op_type == 'MatMulNBits' for n in model_.graph)}")
        return real(model_, feeds_, values, **kwargs)

    monkeypatch.setattr(distributed, "calibrate_model", counting)
    with caplog.at_level(logging.INFO, logger="tforge.passes.quantize_weights"):
        sequential = _quantize(model, sequential=True)
    monkeypatch.setattr(distributed, "calibrate_model", real)
    non_sequential = _quantize(plain, sequential=False)

    assert len(calls) == 2  # one calibration run per block, each exposing that block's linear inputs only
    assert calls[0][-1] == "nbits=0" and calls[1][-1] == "nbits=6"
    assert len(calls[0]) - 1 == 4 and len(calls[1]) - 1 == 4  # h, cm, h2, a of one layer
    assert sequential.stats["sequential calibration runs"] == 2
    assert sequential.stats["quantized"] == non_sequential.stats["quantized"] == 12
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("quantize-weights: block 1/2") for m in messages)
    assert any(m.startswith("quantize-weights: block 2/2") for m in messages)

    # block 1 sees the same float inputs either way: the same codes; block 2's inputs changed
    a, b = _packed(model), _packed(plain)
    assert a.keys() == b.keys() and len(a) == 12
    for name in a:
        same = np.array_equal(a[name], b[name])
        assert same == ("_0" in name), name
    rows_seq = {r["linear"]: r for r in sequential.details["layers"]}
    rows_plain = {r["linear"]: r for r in non_sequential.details["layers"]}
    assert rows_seq.keys() == rows_plain.keys() == layer_of.keys()
    assert all(rows_seq[n]["round"] == (1 if layer_of[n] == "_0" else 2) for n in rows_seq)

    # the error of the whole model, on held-out inputs, is no worse than without the propagation
    # (measured over seeds 0-9: 0.95-1.03x the non-sequential error at 4 bits, 0.97-1.03x at 2: on two
    # layers the propagated error is small; 5% slack)
    err_seq, err_plain = _output_error(reference, model, held_out), _output_error(reference, plain, held_out)
    assert err_seq <= 1.05 * err_plain, (err_seq, err_plain)


def test_sequential_without_pipeline_data_is_refused(rng: np.random.Generator) -> None:
    model, _, _ = _model(rng)
    del model.meta[FEEDS_KEY]
    with pytest.raises(PreconditionError, match="sequential=true re-runs calibration before each block"):
        QuantizeWeights(method="gptq", block=16, sequential=True)(model)


def test_sequential_options_are_checked() -> None:
    with pytest.raises(PassConfigError, match="sequential=true applies to method=gptq"):
        QuantizeWeights(sequential=True)
    with pytest.raises(PassConfigError, match="cannot be combined"):
        QuantizeWeights(method="gptq", sequential=True, avg_bits=5.0)
    assert QuantizeWeights(method="gptq", sequential=True).reads_calibration_data
    assert not QuantizeWeights(method="gptq").reads_calibration_data


def test_sequential_reads_the_pipeline_text_itself_without_calibrate(rng: np.random.Generator) -> None:
    import tforge
    from tests.models import tiny
    from tforge import data as tforge_data
    from tforge.compiler.calibration import CalibrationData
    from tforge.frontends import hf_models

    model = testing.model_from_onnx_text(
        tiny.text_encoder(32, 48, 16), emb=rng.normal(size=(tiny.MINILM_VOCAB, 32)), w1=rng.normal(size=(32, 48)),
        w2=rng.normal(size=(48, 16)), last=np.array([-1], np.int64),
    )  # fmt: skip
    data = CalibrationData(text=str(tforge_data.WIKITEXT), tokenizer=str(hf_models.minilm_dir()), samples=4, seq_len=32)

    # no 'calibrate' in the pipeline: the pass reads the text itself (reads_calibration_data)
    result = tforge.compile(model, "canonicalize,quantize-weights{method=gptq block=16 sequential=true}", calibration=data)

    record = result.report.passes[-1]
    assert record.stats["quantized: 4-bit gptq"] == 2 and record.stats["sequential calibration runs"] == 1
    assert record.details["sequential_rounds"] == [
        {"round": 1, "block": "layer 0", "linears": ["w1", "w2"], "samples": 4}
    ]
