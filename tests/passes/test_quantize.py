"""quantize: int8 linears that ONNX Runtime runs with its integer kernels, close to the float model."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tforge import data as tforge_data
from tforge import evaluate, testing
from tforge.backends import ort as ort_backend
from tforge.compiler import verify
from tforge.compiler.calibration import FEEDS_KEY, STATS_KEY, ChannelStats, calibrate_model
from tforge.compiler.pipeline import PassManager, parse_pass, parse_pipeline
from tforge.compiler.printer import print_ir
from tforge.compiler.structure import find_blocks
from tforge.errors import PassConfigError, PreconditionError
from tforge.passes.quantize import (
    Quantize,
    activation_range,
    dequantize_weight,
    predicted_sqnr_db,
    quantize_weight,
    uint8_qparams,
    weight_error,
)
from tforge.runtime import ort as ort_runtime
from tforge.runtime import save as model_save

REPO = Path(__file__).resolve().parents[2]
WIKITEXT = tforge_data.WIKITEXT

# Two linears share the norm output (one with a bias, one a graph output); a third reads a Relu.
MODEL = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, 4, 8] x) => (float[B, 4, 6] y, float[B, 4, 5] z)
<float[8] gamma, float[8] beta, float[8, 6] w1, float[6] b1, float[8, 8] w2, float[8, 5] w3>
{
    h = LayerNormalization <axis = -1> (x, gamma, beta)
    m1 = MatMul (h, w1)
    y = Add (m1, b1)
    m2 = MatMul (h, w2)
    r = Relu (m2)
    z = MatMul (r, w3)
}
"""

# (op type, provider) of the int8 kernels; at least one must run for every quantized linear.
INT8_KERNELS = ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger", "QLinearMatMul")


def _model(rng: np.random.Generator) -> ir.Model:
    return testing.model_from_onnx_text(
        MODEL,
        gamma=rng.uniform(0.5, 2.0, 8),
        beta=rng.normal(size=8),
        w1=rng.normal(size=(8, 6)),
        b1=rng.normal(size=6),
        w2=rng.normal(size=(8, 8)),
        w3=rng.normal(size=(8, 5)),
    )


def _feeds(rng: np.random.Generator, batch: int = 3) -> dict[str, np.ndarray]:
    return {"x": rng.normal(size=(batch, 4, 8)).astype(np.float32)}


def _calibrate(model: ir.Model, rng: np.random.Generator) -> None:
    model.meta[STATS_KEY] = calibrate_model(model, [_feeds(rng) for _ in range(4)])


def _int8_kernels(model: ir.Model, feeds: dict[str, np.ndarray]) -> collections.Counter[str]:
    ran = ort_backend.kernels_run(model, feeds)
    return collections.Counter({op: n for (op, _), n in ran.items() if op in INT8_KERNELS})


def _min_cosine(reference: ir.Model, candidate: ir.Model, feeds: dict[str, np.ndarray]) -> float:
    return min(c.cosine for c in verify.compare_outputs(reference, candidate, feeds))


# ----------------------------------------------------------------------------- the math


def test_weight_codes_are_within_half_a_step(rng: np.random.Generator) -> None:
    w = rng.normal(size=(16, 5)).astype(np.float32) * np.array([1, 10, 0.1, 3, 0], np.float32)

    q, scale = quantize_weight(w)

    assert q.dtype == np.int8 and scale.shape == (5,) and int(np.abs(q).max()) == 127
    np.testing.assert_array_equal(q[:, 4], 0)  # an all-zero column stays zero
    assert scale[4] == 1.0
    assert np.all(np.abs(w - dequantize_weight(q, scale)) <= scale / 2 + 1e-7)
    assert 0.0 < weight_error(w, q, scale) < 0.01


def test_uint8_range_maps_ends_and_keeps_zero_exact() -> None:
    s, zp = uint8_qparams(-1.0, 3.0)
    scale, zero_point = float(s), int(zp)

    assert scale == pytest.approx(4.0 / 255) and zero_point == 64
    assert (0 - zero_point) * scale == pytest.approx(-1.0, abs=scale / 2)
    assert (255 - zero_point) * scale == pytest.approx(3.0, abs=scale / 2)
    assert uint8_qparams(0.0, 0.0) == (np.float32(1.0), np.uint8(0))
    with pytest.raises(ValueError, match="must contain 0"):
        uint8_qparams(0.5, 2.0)


def test_predicted_noise_matches_rounding_and_clipping() -> None:
    rng = np.random.default_rng(1)
    uniform = ChannelStats.empty(4)
    uniform.update(rng.uniform(-1.0, 1.0, size=(4000, 4)))
    lo, hi = activation_range(uniform, "absmax", 99.9)
    # rounding noise only: (2 / 255)^2 / 12 against E[x^2] = 1/3
    assert predicted_sqnr_db(uniform, lo, hi) == pytest.approx(10 * np.log10(255.0**2), abs=0.3)

    x = rng.normal(size=(4000, 4))
    x[:40, 2] *= 8.0  # a heavy tail in one channel
    tailed = ChannelStats.empty(4)
    tailed.update(x)
    clo, chi = activation_range(tailed, "percentile", 99.0)
    assert -x.max() < clo < 0 < chi < x.max()  # both ends clipped
    step = (chi - clo) / 255
    noise = np.mean((x - np.clip(x, clo, chi)) ** 2) + step**2 / 12
    measured = 10 * np.log10(np.mean(x**2) / noise)
    assert predicted_sqnr_db(tailed, clo, chi) == pytest.approx(measured, abs=1.0)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("quantize{activations=int4}", "expected one of"),
        ("quantize{percentile=20}", "percentile must be"),
        ("quantize{format=qoperator}", "expected one of"),
        ("quantize{min-sqnr=0}", "min-sqnr must be"),
        ("quantize{min-sqnr=30 min-sqnr-dynamic=31}", "min-sqnr-dynamic must be"),
        ("quantize{exclude=,}", None),  # an empty list: nothing excluded, accepted
    ],
)
def test_bad_options(spec: str, message: str | None) -> None:
    if message is None:
        assert parse_pass(spec).exclude == ()
        return
    with pytest.raises(PassConfigError, match=message):
        parse_pass(spec)


# ----------------------------------------------------------------------------- tiny graph


def test_per_token_integer_layout(rng: np.random.Generator) -> None:
    model = _model(rng)
    original = model.clone()

    result = Quantize()(model)

    assert result.changed
    assert result.stats == {"quantized": 3, "activations dynamic-per-token": 3}
    assert set(result.details) == {"w1", "w2", "w3"}
    assert all(0 < d["weight_error"] < 0.01 for d in result.details.values())
    assert not {"w1", "w2", "w3"} & set(model.graph.initializers)  # float weights are gone
    testing.assert_ir_golden(model, "quantize/per_token_integer.ir")
    feeds = _feeds(rng)
    assert _min_cosine(original, model, feeds) > 0.999
    # one int8 matmul per linear; the norm output is quantized once for both of its readers
    assert _int8_kernels(model, feeds) == {"MatMulIntegerToFloat": 3}
    ran = ort_backend.kernels_run(model, feeds)
    assert sum(n for (op, _), n in ran.items() if op == "QuantizeLinear") == 2


def test_static_qdq_layout_is_fused_by_ort(rng: np.random.Generator) -> None:
    model = _model(rng)
    _calibrate(model, rng)
    original = model.clone()

    result = Quantize(activations="static", format="qdq")(model)

    assert result.stats == {"quantized": 3, "activations static": 3}
    assert {"input_scale", "input_zero_point", "input_sqnr_db"} <= set(result.details["w1"])
    testing.assert_ir_golden(model, "quantize/static_qdq.ir")
    feeds = _feeds(rng)
    assert _min_cosine(original, model, feeds) > 0.995
    # ORT's QDQ fusion turns DQ -> MatMul <- DQ into an integer kernel: MatMulIntegerToFloat, or
    # QLinearMatMul where the output is itself quantized next (w2: Relu, then w3's QuantizeLinear)
    kernels = _int8_kernels(model, feeds)
    assert sum(kernels.values()) == 3 and kernels["MatMulIntegerToFloat"] >= 2, kernels


@pytest.mark.parametrize(
    ("options", "kernels"),
    [
        ({"activations": "dynamic", "format": "integer"}, {"MatMulIntegerToFloat": 2, "DynamicQuantizeMatMul": 1}),
        # ORT does not fuse DQ -> MatMul when a Relu follows (w2): one linear stays a float MatMul
        ({"activations": "dynamic", "format": "qdq"}, {"MatMulIntegerToFloat": 1, "DynamicQuantizeMatMul": 1}),
        ({"activations": "dynamic-per-token", "format": "qdq"}, {"MatMulInteger": 3}),
        ({"activations": "static", "format": "integer"}, {"MatMulIntegerToFloat": 3}),
    ],
)
def test_every_layout_runs_int8_kernels_and_stays_close(
    options: dict[str, str], kernels: dict[str, int], rng: np.random.Generator
) -> None:
    model = _model(rng)
    _calibrate(model, rng)
    original = model.clone()

    result = Quantize(**options)(model)  # type: ignore[arg-type]

    assert result.stats["quantized"] == 3
    feeds = _feeds(rng)
    assert _int8_kernels(model, feeds) == kernels
    # per-tensor scales over a whole batch lose more than per-token ones
    assert _min_cosine(original, model, feeds) > 0.99


def test_weight_only_keeps_float_activations(rng: np.random.Generator) -> None:
    model = _model(rng)
    original = model.clone()

    result = Quantize(activations="none")(model)

    assert result.stats == {"quantized": 3, "activations none": 3}
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["DequantizeLinear"] == 3 and ops["MatMul"] == 3 and ops["QuantizeLinear"] == 0
    feeds = _feeds(rng)
    assert _min_cosine(original, model, feeds) > 0.9995
    # ORT turns DequantizeLinear(int8 weight) -> MatMul into its weight-only MatMulNBits kernel,
    # except where a Relu reads the MatMul (w2), as for the dynamic Q/DQ layout
    ran = ort_backend.kernels_run(model, feeds)
    assert sum(n for (op, _), n in ran.items() if op == "MatMulNBits") == 2, ran


@pytest.mark.parametrize("fallback", ["dynamic-per-token", "dynamic"])
def test_auto_picks_static_where_the_predicted_noise_is_low(fallback: str, rng: np.random.Generator) -> None:
    model = _model(rng)
    _calibrate(model, rng)
    reference = model.clone()
    probe_model = model.clone()
    probe_model.meta[STATS_KEY] = model.meta[STATS_KEY]
    probe = Quantize(activations="auto")(probe_model)
    predicted = sorted({d["input_sqnr_db"] for d in probe.details.values()})
    threshold = (predicted[0] + predicted[-1]) / 2  # one activation on each side

    result = Quantize(activations="auto", min_sqnr=threshold, fallback=fallback)(model)

    sqnr = {name: d["input_sqnr_db"] for name, d in result.details.items()}
    modes = {name: d["activations"] for name, d in result.details.items()}
    assert sqnr["w1"] == sqnr["w2"]  # one activation
    for name in modes:
        assert modes[name] == ("static" if sqnr[name] >= threshold else fallback), (sqnr, modes)
    assert set(modes.values()) == {"static", fallback}
    assert result.stats["quantized"] == 3
    assert _int8_kernels(model, _feeds(rng)).total() >= 3
    assert _min_cosine(reference, model, _feeds(rng)) > 0.99


def test_auto_three_tiers(rng: np.random.Generator) -> None:
    """Above min-sqnr static, between the two thresholds dynamic per tensor, below them per token."""
    model = _model(rng)
    _calibrate(model, rng)
    reference = model.clone()
    probe_model = model.clone()
    probe_model.meta[STATS_KEY] = model.meta[STATS_KEY]
    predicted = sorted({d["input_sqnr_db"] for d in Quantize(activations="auto")(probe_model).details.values()})
    assert len(predicted) == 2
    low, high = predicted

    result = Quantize(activations="auto", min_sqnr=high + 1, min_sqnr_dynamic=(low + high) / 2)(model)

    modes = {d["input_sqnr_db"]: d["activations"] for d in result.details.values()}
    assert modes == {high: "dynamic", low: "dynamic-per-token"}
    assert {"DynamicQuantizeMatMul", "DynamicQuantizeLinear"} & {n.op_type for n in model.graph}
    assert _int8_kernels(model, _feeds(rng)).total() == 3
    assert _min_cosine(reference, model, _feeds(rng)) > 0.99


def test_statistics_made_stale_by_a_rewrite_are_not_used(rng: np.random.Generator) -> None:
    """calibrate, then a pass that changes activations: quantize must not read the old ranges."""
    model = _model(rng)
    _calibrate(model, rng)
    [prune] = parse_pipeline("prune-ffn{ratio=0.5 multiple=2 importance=magnitude}")
    assert prune(model).changed

    with pytest.raises(PreconditionError, match="dropped because 'prune-ffn' changed the graph"):
        Quantize(activations="static")(model)
    model.meta[FEEDS_KEY] = [_feeds(rng) for _ in range(2)]  # what tforge.compile(calibration=...) attaches
    for p in parse_pipeline("calibrate,quantize{activations=static}"):
        result = p(model)
    assert result.stats["activations static"] == 3


def test_excluded_linear_stays_float(rng: np.random.Generator) -> None:
    model = _model(rng)

    result = Quantize(exclude=("w3",))(model)

    assert result.stats == {"quantized": 2, "activations dynamic-per-token": 2, "skipped: excluded": 1}
    w3_readers = [use.node.op_type for use in model.graph.initializers["w3"].uses()]
    assert w3_readers == ["MatMul"]
    assert "w3" not in result.details


def test_second_run_finds_nothing_to_quantize(rng: np.random.Generator) -> None:
    model = _model(rng)
    Quantize()(model)
    before = print_ir(model)

    result = Quantize()(model)

    assert not result.changed and result.stats["quantized"] == 0
    assert print_ir(model) == before


def test_static_without_calibration_says_how_to_fix_it(rng: np.random.Generator) -> None:
    model = _model(rng)
    with pytest.raises(PreconditionError, match="add 'calibrate' before 'quantize'"):
        Quantize(activations="static")(model)
    with pytest.raises(PreconditionError, match="activations=auto needs calibration"):
        PassManager.parse("canonicalize,quantize{activations=auto}", progress=lambda _: None).run(model)


def test_static_skips_linears_without_statistics(rng: np.random.Generator) -> None:
    model = _model(rng)
    model.meta[STATS_KEY] = calibrate_model(model, [_feeds(rng)], values=["h"])

    result = Quantize(activations="static")(model)

    assert result.stats == {
        "quantized": 2,
        "activations static": 2,
        "skipped: no calibration statistics for its input": 1,
    }


def test_pipeline_establishes_quantized(rng: np.random.Generator) -> None:
    model = _model(rng)
    report = PassManager.parse("canonicalize,quantize", verify_each=True, progress=lambda _: None).run(model)
    assert "quantized" in report.properties
    assert report.passes[-1].details["w1"]["activations"] == "dynamic-per-token"


# ----------------------------------------------------------------------------- zoo


def test_zoo_model_runs_int8_kernels(zoo_name: str, zoo_model, zoo_entries) -> None:
    entry = zoo_entries[zoo_name]
    original = tforge.load(zoo_model(zoo_name))
    model = tforge.load(zoo_model(zoo_name))
    PassManager.parse("canonicalize", progress=lambda _: None).run(model)
    linears = len(find_blocks(model).linears)

    result = Quantize()(model)

    assert result.stats == {"quantized": linears, "activations dynamic-per-token": linears}
    feeds = entry.inputs(2, 9, np.random.default_rng(1))
    assert _int8_kernels(model, feeds) == {"MatMulIntegerToFloat": linears}
    assert _min_cosine(original, model, feeds) > 0.99

    assert not Quantize()(model).changed


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_minilm_w8a8_preset_keeps_sentence_embeddings(minilm_onnx: Path) -> None:
    if not WIKITEXT.is_file():
        pytest.fail(f"{WIKITEXT} is missing; it ships with tforge (tforge/data/README.md)")
    from tforge.frontends import hf_models
    from tforge.presets import ENCODER_PRESETS, preset_pipeline

    model = tforge.load(minilm_onnx)
    spec = preset_pipeline("w8a8", model)
    assert spec == ENCODER_PRESETS["w8a8"]
    pm = PassManager.parse(spec, progress=lambda _: None)
    from tforge.api import _with_calibration

    pm.passes = _with_calibration(pm.passes, text=WIKITEXT, tokenizer=hf_models.minilm_dir())
    report = pm.run(model)
    by_name = {record.name: record for record in report.passes}
    assert by_name["quantize"].stats["quantized"] == 36
    # the encoder pipeline: per tensor at run time from 20 dB, per token only below (layer 0's FFN down)
    assert by_name["quantize"].stats["activations dynamic-per-token"] == 1
    assert by_name["quantize"].stats["activations dynamic"] == 11
    assert by_name["ort-layernorm"].stats["residual add written as Sum"] == 13  # embeddings + 2 per layer

    tokenizer = hf_models.minilm_tokenizer()
    sentences = evaluate.sentences(evaluate.text_half(evaluate.read_text(WIKITEXT), "second"), 128)
    ref_session = ort_runtime.create_session(tforge.load(minilm_onnx))
    int8_session = ort_runtime.create_session(model)
    ref = evaluate.sentence_embeddings(lambda f: ref_session.run(None, f)[0], tokenizer, sentences)
    got = evaluate.sentence_embeddings(lambda f: int8_session.run(None, f)[0], tokenizer, sentences)
    agreement = evaluate.agreement(ref, got)
    # measured mean 0.9972, min 0.9950 on 256 sentences; the int8 issue's limits are 0.995 / 0.98
    assert agreement.mean > 0.995 and agreement.min > 0.98, agreement
    feeds = evaluate.encode_sentences(tokenizer, sentences[:4])
    kernels = _int8_kernels(model, feeds)
    assert (kernels["MatMulIntegerToFloat"], kernels["DynamicQuantizeMatMul"]) == (25, 11), kernels


# ----------------------------------------------------------------------------- preset and CLI


def test_w8a8_preset_compiles_from_the_command_line(rng: np.random.Generator, tmp_path: Path) -> None:
    from tforge.cli import main

    source, output, npz = tmp_path / "tiny.onnx", tmp_path / "tiny.int8.onnx", tmp_path / "calib.npz"
    model_save.save_model(_model(rng), source)
    np.savez(npz, x=rng.normal(size=(8, 2, 4, 8)).astype(np.float32))  # 8 samples of batch 2

    code = main(["-q", "compile", str(source), "--preset", "w8a8", "--calib-npz", str(npz), "-o", str(output)])

    assert code == 0
    compiled = tforge.load(output)
    feeds = _feeds(rng)
    assert sum(_int8_kernels(compiled, feeds).values()) == 3
    assert _min_cosine(tforge.load(source), compiled, feeds) > 0.995


@pytest.mark.parametrize("args", [[], ["--passes", "canonicalize", "--preset", "w8a8"]])
def test_cli_needs_exactly_one_of_passes_and_preset(args: list[str], tmp_path: Path) -> None:
    from tforge.cli import main

    assert main(["compile", str(tmp_path / "m.onnx"), *args]) == 2


def test_unknown_preset_names_the_known_ones() -> None:
    from tforge.presets import PRESETS, preset_pipeline

    assert preset_pipeline("w8a8") == PRESETS["w8a8"]
    with pytest.raises(PassConfigError, match="did you mean 'w8a8'"):
        preset_pipeline("w8a16")


@pytest.mark.parametrize("shaped", [True, False], ids=["symbolic-width", "no-shape"])
def test_per_token_reads_the_width_of_its_input_from_the_weight(shaped: bool, rng: np.random.Generator) -> None:
    # MatMul(x, W) with a [8, 6] weight runs only on an x whose last axis is 8, whatever the
    # graph declares (the TorchScript cache export's o_proj input is [?, ?, ?]).
    from tforge.runtime.ort import create_session

    text = """
    <ir_version: 10, opset_import: ["" : 18]>
    block (float[B, 4, C] x) => (float[B, 4, 6] y)
    <float[8, 6] w>
    {
        y = MatMul (x, w)
    }
    """
    model = testing.model_from_onnx_text(text, w=rng.normal(size=(8, 6)))
    if not shaped:  # not even the rank is declared
        model.graph.inputs[0].shape = None
    x = rng.normal(size=(2, 4, 8)).astype(np.float32)
    (ref,) = create_session(model.clone()).run(None, {"x": x})

    result = Quantize()(model)

    assert result.stats == {"quantized": 1, "activations dynamic-per-token": 1}
    (got,) = create_session(model).run(None, {"x": x})
    assert got.shape == ref.shape == (2, 4, 6)
    np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max())
