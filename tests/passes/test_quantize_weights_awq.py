"""quantize-weights: AWQ scales, Gram matrices through the pipeline, and end to end on the zoo."""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tests.models import tiny
from tests.models.tiny import pre_norm_block
from tforge import data as tforge_data
from tforge import testing
from tforge.backends.ort import kernels_run
from tforge.compiler.calibration import (
    FEEDS_KEY,
    STATS_KEY,
    CalibrationData,
    attached_stats,
    calibrate_model,
)
from tforge.compiler.pipeline import PassManager
from tforge.compiler.structure import block_map
from tforge.errors import PassConfigError
from tforge.frontends import hf_models
from tforge.passes.math import awq
from tforge.passes.math import block_quant as bq
from tforge.passes.quantize_weights import QuantizeWeights
from tforge.runtime import ort as ort_runtime
from tforge.runtime.save import save_model


def _outlier_inputs(rng: np.random.Generator, rows: int, k: int, outliers: int = 4) -> np.ndarray:
    x = rng.normal(size=(rows, k))
    x[:, rng.choice(k, outliers, replace=False)] *= 30  # a few large-magnitude channels
    return x


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_scale_beats_rtn_on_inputs_with_large_channels(rng: np.random.Generator, symmetric: bool) -> None:
    x = _outlier_inputs(rng, 4096, 128)
    w = rng.normal(size=(128, 48)).astype(np.float32)
    gram = x.T @ x / len(x)

    found = awq.search_scale([w], gram, np.sqrt(np.diag(gram)), 4, 32, symmetric)

    assert found.alpha > 0
    assert found.error < 0.5 * found.rtn_error, (found.error, found.rtn_error)
    # the error reported is the one of the scaled weight: x W vs (x / s) Q(s W), on the samples
    q = bq.quantize_rtn((found.scale[:, None] * w).astype(np.float32), 4, 32, symmetric)
    y, y_hat = x @ w, (x / found.scale) @ bq.dequantize(q)
    np.testing.assert_allclose(((y - y_hat) ** 2).sum(axis=1).mean(), found.error, rtol=1e-6)


def test_awq_scales_are_shared_within_groups() -> None:
    magnitude = np.array([1.0, 3.0, 10.0, 30.0])
    s = awq.awq_scales(magnitude, 0.5, groups=np.array([0, 0, 1, 1]))
    assert s[0] == s[1] and s[2] == s[3] and s[2] > s[0]
    np.testing.assert_allclose(s.max() * s.min(), 1.0)
    np.testing.assert_array_equal(awq.awq_scales(magnitude, 0.0), np.ones(4))


def _block_with_outliers(rng: np.random.Generator) -> ir.Model:
    text = pre_norm_block()
    weights = testing.random_float_initializers(text, rng)
    for gamma in ("g1", "g2"):  # a few norm output channels of large magnitude, as in real LLMs
        g = np.abs(np.asarray(weights[gamma])) + 0.5
        g[[1, 6]] *= 20
        weights[gamma] = g.astype(np.float32)
    return testing.model_from_onnx_text(
        text, **weights, heads=np.array([0, 4, 2, 4], np.int64), merged=np.array([0, 4, 8], np.int64),
    )  # fmt: skip


def _calibrate(model: ir.Model, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    feeds = [{"x": rng.normal(size=(4, 4, 8)).astype(np.float32)} for _ in range(16)]
    model.meta[STATS_KEY] = calibrate_model(model, feeds, gram=True, progress=lambda _: None)
    return feeds


def _copy(model: ir.Model) -> ir.Model:
    clone = model.clone()  # (clone() leaves meta behind; AWQ rescales the statistics in place)
    clone.meta[STATS_KEY] = copy.deepcopy(model.meta[STATS_KEY])
    return clone


def _output_error(reference: ir.Model, model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> float:
    a = ort_runtime.create_session(reference, optimize=False)
    b = ort_runtime.create_session(model, optimize=False)
    return float(sum(((ort_runtime.run(a, f)["y"] - ort_runtime.run(b, f)["y"]) ** 2).sum() for f in feeds))


def test_awq_folds_its_scales_exactly_and_lowers_the_error(rng: np.random.Generator) -> None:
    model = _block_with_outliers(rng)
    feeds = _calibrate(model, rng)
    reference, by_rtn = model.clone(), _copy(model)

    result = QuantizeWeights(block=16, method="awq", accuracy_level=0, clip_search=False)(model)
    rtn = QuantizeWeights(block=16, method="rtn", accuracy_level=0)(by_rtn)

    assert result.stats["quantized"] == 6
    assert result.stats["awq scaled: norm"] == 2  # both norms' outlier channels moved into q/k/v, up
    sites = result.details["awq_sites"]
    assert all(site["awq_output_error"] < site["rtn_output_error"] for site in sites)
    # the scales were folded exactly: the quantized model is closer to the float one than RTN's
    test_feeds = [{"x": rng.normal(size=(4, 4, 8)).astype(np.float32)} for _ in range(8)]
    assert _output_error(reference, model, test_feeds) < 0.7 * _output_error(reference, by_rtn, test_feeds)
    total = lambda r: sum(row["relative_output_error"] for row in r.details["layers"])  # noqa: E731
    assert total(result) < total(rtn)
    assert sum(n for (op, _), n in kernels_run(model, feeds[0]).items() if op == "MatMulNBits") == 6


def test_awq_at_8_bits_keeps_the_float_outputs(rng: np.random.Generator) -> None:
    """A wrongly folded scale would show at 8 bits, where rounding alone changes little."""
    model = _block_with_outliers(rng)
    feeds = _calibrate(model, rng)
    reference = model.clone()
    result = QuantizeWeights(bits=8, block=16, method="awq", accuracy_level=0)(model)
    assert sum(v for k, v in result.stats.items() if k.startswith("awq scaled")) >= 1
    y = ort_runtime.run(ort_runtime.create_session(reference, optimize=False), feeds[0])["y"]
    testing.assert_ort_allclose(reference, model, feeds[0], atol=0.02 * float(np.abs(y).max()))


def test_awq_without_gram_leaves_the_scales_and_rounds(rng: np.random.Generator) -> None:
    model = _block_with_outliers(rng)
    result = QuantizeWeights(block=16, method="awq")(model)
    assert result.stats["quantized"] == 6
    assert not [k for k in result.stats if k.startswith("awq scaled")]
    assert result.stats["skipped: awq: needs E[x x^T] of the input (run calibrate before it)"] >= 2


def test_awq_options_are_checked() -> None:
    with pytest.raises(PassConfigError, match="alpha-grid must be values in"):
        QuantizeWeights(method="awq", alpha_grid=(0.5, 1.5))
    with pytest.raises(PassConfigError, match="method must be rtn, gptq or awq"):
        QuantizeWeights(method="smooth")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the pipeline

VOCAB = tiny.MINILM_VOCAB
ENCODER = tiny.text_encoder(32, 48, 16)


def test_calibrate_collects_gram_matrices_for_gptq_from_text(rng: np.random.Generator) -> None:
    model = testing.model_from_onnx_text(
        ENCODER, emb=rng.normal(size=(VOCAB, 32)), w1=rng.normal(size=(32, 48)), w2=rng.normal(size=(48, 16)),
        last=np.array([-1], np.int64),
    )  # fmt: skip
    data = CalibrationData(text=str(tforge_data.WIKITEXT), tokenizer=str(hf_models.minilm_dir()), samples=4, seq_len=32)

    result = tforge.compile(model, "canonicalize,calibrate,quantize-weights{method=gptq block=16}", calibration=data)

    record = result.report.passes[-1]
    assert record.stats["quantized: 4-bit gptq"] == 2  # no "needs E[x x^T]" skip: calibrate collected them
    assert record.stats["embedding quantized"] == 1
    assert {row["linear"] for row in record.details["layers"]} == {"w1", "w2"}
    assert attached_stats(model) is None  # the statistics of the float activations were dropped


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_pipeline_on_a_zoo_model(zoo_model, zoo_entries, tmp_path, method: str) -> None:
    entry = zoo_entries["llama"]  # RMSNorm, SwiGLU, 4 query heads on 2 KV heads
    model = tforge.load(zoo_model("llama"))
    rng = np.random.default_rng(0)
    model.meta[FEEDS_KEY] = [entry.inputs(2, 9, rng) for _ in range(4)]
    PassManager.parse("canonicalize", progress=lambda _: None).run(model)
    reference = model.clone()
    linears = {lin.name for lin in block_map(model).linears}

    report = PassManager.parse(
        f"calibrate,quantize-weights{{method={method} block=32}}", verify_each=True, progress=lambda _: None,
    ).run(model)  # fmt: skip

    record = report.passes[-1]
    rows = record.details["layers"]
    assert {row["linear"] for row in rows} == linears and len(linears) == 7 * entry.truth.num_layers
    assert all(row["bits"] == 4 and 0 <= row["relative_output_error"] < 0.1 for row in rows)
    assert record.stats["quantized"] == len(linears)
    if method == "awq":
        assert record.stats["awq scaled: norm"] >= 1
    path = save_model(model, tmp_path / "llama.q4.onnx")
    session = ort_runtime.create_session(path)  # the saved file loads in ORT
    ref = ort_runtime.create_session(reference)
    feeds = entry.inputs(2, 9, np.random.default_rng(1))
    got, want = (next(iter(ort_runtime.run(s, feeds).values())) for s in (session, ref))
    cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine > 0.95, cosine
    ran = kernels_run(model, feeds)
    assert sum(n for (op, _), n in ran.items() if op == "MatMulNBits") == len(linears)


def test_gram_matrices_are_wanted_by_gptq_and_awq_only(rng: np.random.Generator) -> None:
    model = _block_with_outliers(rng)
    inputs = {lin.input.name for lin in block_map(model).linears}
    assert QuantizeWeights(method="gptq").gram_wanted(model) == inputs
    assert QuantizeWeights(method="awq", exclude=("wd",)).gram_wanted(model) == inputs - {"a"}
    assert QuantizeWeights(method="rtn").gram_wanted(model) == set()
