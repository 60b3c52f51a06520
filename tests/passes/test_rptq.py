"""rptq: channel clusters reordered exactly (free where possible), then quantized per cluster."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tests.models import tiny
from tforge import testing
from tforge.backends import ort as ort_backend
from tforge.compiler import verify
from tforge.compiler.calibration import FEEDS_KEY, STATS_KEY, calibrate_model
from tforge.compiler.pipeline import PassManager
from tforge.compiler.printer import print_ir
from tforge.errors import PassConfigError, PreconditionError
from tforge.passes.math import clustering
from tforge.passes.rptq import Rptq
from tforge.runtime import ort as ort_runtime

BLOCK = tiny.pre_norm_block()

# The FFN intermediate is also a graph output: up -> down cannot be permuted for free.
LEAKY = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, 4, 8] x) => (float[B, 4, 8] y, float[B, 4, 16] a)
<float[8] g1, float[8] b1, float[8, 16] wu, float[16, 8] wd>
{
    h = LayerNormalization <axis = -1> (x, g1, b1)
    u = MatMul (h, wu)
    a = Relu (u)
    d = MatMul (a, wd)
    y = Add (x, d)
}
"""


def _model(text: str, rng: np.random.Generator) -> ir.Model:
    """Random weights; gammas and V/up columns with outliers so that channel ranges differ a lot."""
    arrays = testing.random_float_initializers(text, rng, scale=0.5)
    for g in ("g1", "g2"):
        if g in arrays:
            arrays[g] = rng.uniform(0.2, 1.0, 8) * np.where(rng.random(8) < 0.25, 15.0, 1.0)
    for w in ("wv", "wu"):
        if w in arrays:
            arrays[w] *= np.exp(rng.normal(size=arrays[w].shape[1]))[None, :]
    if "int64[4] heads" in text:
        arrays["heads"] = np.array([0, 4, 2, 4], np.int64)
        arrays["merged"] = np.array([0, 4, 8], np.int64)
    return testing.model_from_onnx_text(text, **arrays)


def _feeds(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    return [{"x": rng.normal(size=(2, 4, 8)).astype(np.float32)} for _ in range(n)]


def _calibrated(text: str, rng: np.random.Generator) -> ir.Model:
    model = _model(text, rng)
    model.meta[STATS_KEY] = calibrate_model(model, _feeds(rng, 8))
    return model


def _assert_same_function(reference: ir.Model, candidate: ir.Model, feeds: dict) -> None:
    """Max abs error at most 1e-5 of the reference output's max abs (ORT optimizations off)."""
    expected = ort_runtime.run(ort_runtime.create_session(reference, optimize=False), feeds)
    scale = max(float(np.abs(v).max()) for v in expected.values())
    testing.assert_ort_allclose(reference, candidate, feeds, atol=1e-5 * scale, rtol=0.0)


def _relative_error(reference: ir.Model, candidate: ir.Model, feeds: dict) -> float:
    a = ort_runtime.run(ort_runtime.create_session(reference, optimize=False), feeds)
    b = ort_runtime.run(ort_runtime.create_session(candidate, optimize=False), feeds)
    name = next(iter(a))
    return float(np.linalg.norm(a[name] - b[name]) / np.linalg.norm(a[name]))


# ----------------------------------------------------------------------------- reordering


def test_reordering_is_exact_with_true_permutations_and_contiguous_clusters(
    rng: np.random.Generator,
) -> None:
    model = _calibrated(BLOCK, rng)
    original = model.clone()

    result = Rptq(clusters=3, lowering="none")(model)

    assert result.stats == {
        "reordered: up->down (free)": 1,
        "reordered: v->o (free, inside heads)": 1,
        "reordered: input (runtime gather)": 2,
    }
    _assert_same_function(original, model, _feeds(rng, 1)[0])
    sites = {s["kind"]: s for s in result.details["sites"] if s["kind"] != "input"}
    for site in result.details["sites"]:
        perm = np.array(site["permutation"])
        assert clustering.is_permutation(perm, site["channels"]), site["activation"]
        if site["kind"] != "v->o":  # clusters contiguous: one segment per cluster, in order
            assert site["segments"] == site["clusters"] and site["labels"] == sorted(site["labels"])
    # V -> O: permuted inside heads only (head_dim 4), each head's channels sorted by cluster key
    perm = np.array(sites["v->o"]["permutation"])
    np.testing.assert_array_equal(perm // 4, np.arange(8) // 4)
    assert sum(n.op_type == "Gather" for n in model.graph) == 2  # one per norm output


def test_pass_is_deterministic_for_a_fixed_seed(rng: np.random.Generator) -> None:
    model = _calibrated(BLOCK, rng)
    twin = model.clone()
    twin.meta[STATS_KEY] = calibrate_model(twin, _feeds(np.random.default_rng(0), 8))
    model.meta[STATS_KEY] = calibrate_model(model, _feeds(np.random.default_rng(0), 8))

    Rptq(clusters=3, lowering="emulate", seed=7)(model)
    Rptq(clusters=3, lowering="emulate", seed=7)(twin)

    assert print_ir(model, tensors="digest") == print_ir(twin, tensors="digest")


def test_second_reordering_changes_nothing(rng: np.random.Generator) -> None:
    model = _calibrated(BLOCK, rng)
    original = model.clone()
    Rptq(clusters=3, lowering="none")(model)
    after_first = print_ir(model, tensors="digest")

    again = Rptq(clusters=3, lowering="none")(model)

    assert not again.changed, again.stats
    assert print_ir(model, tensors="digest") == after_first
    _assert_same_function(original, model, _feeds(rng, 1)[0])


# ----------------------------------------------------------------------------- quantization


def test_int8_kernels_compute_what_the_emulation_computes(rng: np.random.Generator) -> None:
    model = _calibrated(BLOCK, rng)
    original = model.clone()
    emulated = model.clone()
    emulated.meta[STATS_KEY] = calibrate_model(emulated, _feeds(np.random.default_rng(5), 8))
    model.meta[STATS_KEY] = calibrate_model(model, _feeds(np.random.default_rng(5), 8))

    result = Rptq(clusters=3, lowering="integer")(model)
    Rptq(clusters=3, lowering="emulate")(emulated)

    assert result.stats["quantized (int8 kernels)"] == 6
    feeds = _feeds(rng, 1)[0]
    # the same rounding in both: they differ by float summation order and ties only
    assert _relative_error(emulated, model, feeds) < 2e-3
    assert _relative_error(original, model, feeds) < 0.05
    ran = ort_backend.kernels_run(model, feeds)
    counted = sum(n for (op, _), n in ran.items() if op == "MatMulIntegerToFloat")
    parts = sum(n.op_type == "MatMulIntegerToFloat" for n in model.graph)
    assert counted == parts >= 6 * 2
    # the attention's Q @ K^T and probs @ V are float MatMuls; no linear is left in float
    assert sum(n.op_type == "MatMul" for n in model.graph) == 2


def test_clusters_cut_the_4bit_activation_error(rng: np.random.Generator) -> None:
    model = _calibrated(BLOCK, rng)
    feeds = _feeds(np.random.default_rng(0), 8)
    errors = {}
    for k in (1, 4):
        variant = model.clone()
        variant.meta[STATS_KEY] = calibrate_model(variant, feeds)
        Rptq(clusters=k, bits=4, lowering="emulate")(variant)
        errors[k] = np.mean([_relative_error(model, variant, f) for f in feeds[:3]])
    assert errors[4] < 0.6 * errors[1], errors


# ----------------------------------------------------------------------------- negative


def test_needs_statistics_and_valid_options(rng: np.random.Generator) -> None:
    with pytest.raises(PreconditionError, match="calibrate"):
        Rptq()(_model(BLOCK, rng))
    with pytest.raises(PassConfigError, match="MatMulNBits"):
        PassManager.parse("rptq{bits=4}")
    with pytest.raises(PassConfigError, match="clusters"):
        PassManager.parse("rptq{clusters=0 lowering=emulate}")


def test_intermediate_read_elsewhere_is_not_permuted(rng: np.random.Generator) -> None:
    model = _calibrated(LEAKY, rng)
    original = model.clone()

    result = Rptq(clusters=3, lowering="none")(model)

    assert result.stats["skipped: up->down: FFN activation 'a' is a graph output"] == 1
    # down's input is still reordered, by a runtime Gather, and the graph output keeps its order
    assert result.stats["reordered: input (runtime gather)"] == 2
    _assert_same_function(original, model, _feeds(rng, 1)[0])


# ----------------------------------------------------------------------------- real graphs


def _zoo(path, entry) -> ir.Model:
    model = tforge.load(path)
    model.meta[FEEDS_KEY] = [entry.inputs(2, 9, np.random.default_rng(i)) for i in range(4)]
    return model


def test_zoo_reordering_is_exact(zoo_name: str, zoo_model, zoo_entries) -> None:
    entry = zoo_entries[zoo_name]
    original = tforge.load(zoo_model(zoo_name))
    model = _zoo(zoo_model(zoo_name), entry)

    report = PassManager.parse(
        "canonicalize,calibrate,rptq{lowering=none}", verify_each=True, progress=lambda _: None
    ).run(model)

    stats = report.passes[-1].stats
    layers = entry.truth.num_layers
    # GQA (llama, qwen2) and fused QKV (gpt2) included: V is permuted inside its KV heads
    assert stats["reordered: v->o (free, inside heads)"] == layers, stats
    if entry.truth.fused_gate_up:  # a fused gate+up linear's halves are not permuted: said so
        assert stats == {
            "reordered: v->o (free, inside heads)": layers,
            "reordered: input (runtime gather)": 3 * layers,
            "skipped: up->down: gate and up are halves of one fused linear": layers,
        }, stats
    else:
        assert stats["reordered: up->down (free)"] == layers, stats
        assert not any(k.startswith("skipped") for k in stats), stats
    _assert_same_function(original, model, entry.inputs(2, 9, np.random.default_rng(1)))


def test_zoo_gqa_model_runs_int8_kernels(zoo_model, zoo_entries) -> None:
    entry = zoo_entries["llama"]
    original = tforge.load(zoo_model("llama"))
    model = _zoo(zoo_model("llama"), entry)

    report = PassManager.parse(
        "canonicalize,calibrate,rptq{clusters=4}", verify_each=True, progress=lambda _: None
    ).run(model)

    assert report.passes[-1].stats["quantized (int8 kernels)"] == 14
    feeds = entry.inputs(2, 9, np.random.default_rng(1))
    assert _relative_error(original, model, feeds) < 0.05
    ran = ort_backend.kernels_run(model, feeds)
    assert sum(n for (op, _), n in ran.items() if op == "MatMulIntegerToFloat") >= 14 * 2


def _real(path, dims: dict[str, int], spec: str) -> tuple[ir.Model, ir.Model, dict, dict]:
    original = tforge.load(path)
    model = tforge.load(path)
    model.meta[FEEDS_KEY] = [
        verify.make_inputs(original, dims=dims, rng=np.random.default_rng(i)) for i in range(2)
    ]
    report = PassManager.parse(f"canonicalize,calibrate,{spec}", progress=lambda _: None).run(model)
    feeds = verify.make_inputs(original, dims=dims, rng=np.random.default_rng(7))
    return original, model, report.passes[-1].stats, feeds


@pytest.mark.slow
def test_minilm_reordering_is_exact(minilm_onnx) -> None:
    original, model, stats, feeds = _real(
        minilm_onnx, {"batch": 2, "sequence": 20}, "rptq{lowering=none}"
    )
    assert (
        stats["reordered: v->o (free, inside heads)"] == 6
        and stats["reordered: up->down (free)"] == 6
    ), stats
    _assert_same_function(original, model, feeds)


@pytest.mark.slow
def test_smollm2_reordering_is_exact(smollm2_onnx) -> None:
    original, model, stats, feeds = _real(
        smollm2_onnx, {"batch": 1, "sequence": 24}, "rptq{lowering=none}"
    )
    assert (
        stats["reordered: v->o (free, inside heads)"] == 30
        and stats["reordered: up->down (free)"] == 30
    ), stats
    _assert_same_function(original, model, feeds)


@pytest.mark.slow
def test_smollm2_w8a8_runs_int8_kernels(smollm2_onnx) -> None:
    original, model, stats, feeds = _real(
        smollm2_onnx, {"batch": 1, "sequence": 24}, "rptq{clusters=4}"
    )
    assert stats["quantized (int8 kernels)"] == 211, stats
    ran = ort_backend.kernels_run(model, feeds)
    assert sum(n for (op, _), n in ran.items() if op == "MatMulIntegerToFloat") >= 211 * 2
    assert not any(op == "MatMul" and n > 60 for (op, _), n in ran.items()), ran


def test_codes_layout_computes_what_the_split_layout_computes(rng: np.random.Generator) -> None:
    model = _calibrated(BLOCK, rng)
    split, codes = model.clone(), model.clone()
    for variant in (split, codes):
        variant.meta[STATS_KEY] = calibrate_model(variant, _feeds(np.random.default_rng(5), 8))

    Rptq(clusters=3, layout="split")(split)
    Rptq(clusters=3, layout="codes")(codes)

    assert sum(n.op_type == "QuantizeLinear" for n in codes.graph) == 4  # one per linear input
    assert _relative_error(split, codes, _feeds(rng, 1)[0]) < 1e-5


def test_excluded_linears_stay_float_but_are_reordered(rng: np.random.Generator) -> None:
    model = _calibrated(BLOCK, rng)
    original = model.clone()

    result = Rptq(clusters=3, exclude=("wd",))(model)

    assert result.stats["skipped: excluded"] == 1 and result.stats["quantized (int8 kernels)"] == 5
    down = next(
        n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].name.startswith("wd")
    )
    assert down.inputs[1].const_value is not None  # a float weight, rows permuted (up->down)
    assert _relative_error(original, model, _feeds(rng, 1)[0]) < 0.05
