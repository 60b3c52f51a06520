"""quantize-weights{budget-mb= | avg-bits=}: 4, 8 or float per linear by measured sensitivity."""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import pytest

from tests.models.tiny import pre_norm_block
from tforge import testing
from tforge.compiler.calibration import STATS_KEY, calibrate_model
from tforge.compiler.structure import block_map
from tforge.errors import PassConfigError
from tforge.passes.math import block_quant as bq
from tforge.passes.quantize_weights import QuantizeWeights
from tforge.runtime import ort as ort_runtime


def _calibrated_block(rng: np.random.Generator) -> tuple[ir.Model, list[dict[str, np.ndarray]]]:
    text = pre_norm_block()
    model = testing.model_from_onnx_text(
        text, **testing.random_float_initializers(text, rng),
        heads=np.array([0, 4, 2, 4], np.int64), merged=np.array([0, 4, 8], np.int64),
    )  # fmt: skip
    mixing = rng.normal(size=(8, 8))
    feeds = [{"x": (rng.normal(size=(4, 4, 8)) @ mixing).astype(np.float32)} for _ in range(32)]
    model.meta[STATS_KEY] = calibrate_model(model, feeds, gram=True, progress=lambda _: None)
    return model, feeds


def _copy(model: ir.Model) -> ir.Model:
    clone = model.clone()
    clone.meta[STATS_KEY] = copy.deepcopy(model.meta[STATS_KEY])
    return clone


def _sizes(model: ir.Model, bits: int, size=bq.matmul_nbits_bytes) -> int:  # noqa: ANN001
    return sum(size(lin.in_features, lin.out_features, bits, 16, True) for lin in block_map(model).linears)


def test_budget_mb_is_respected_in_the_graph_and_every_layer_is_reported(rng: np.random.Generator) -> None:
    model, feeds = _calibrated_block(rng)
    reference = model.clone()
    linears = {lin.name: (lin.in_features, lin.out_features) for lin in block_map(model).linears}
    weights = {lin.name: lin.weight.name for lin in block_map(model).linears}
    budget = (_sizes(model, 4) + _sizes(model, 8)) // 2

    result = QuantizeWeights(block=16, accuracy_level=0, budget_mb=budget / 1e6)(model)

    rows = {row["linear"]: row for row in result.details["layers"]}
    assert rows.keys() == linears.keys()
    for name, row in rows.items():
        k, n = linears[name]
        assert row["bytes_at"] == {
            "4": bq.matmul_nbits_bytes(k, n, 4, 16, True), "8": bq.matmul_nbits_bytes(k, n, 8, 16, True), "32": 4 * k * n,
        }  # fmt: skip
        assert row["sensitivity"]["32"] == 0.0 <= row["sensitivity"]["8"] < row["sensitivity"]["4"]
        assert row["bits"] in (4, 8, 32) and row["bytes"] == row["bytes_at"][str(row["bits"])]
        assert row["relative_output_error"] == row["sensitivity"][str(row["bits"])]
    chosen = {row["bits"] for row in rows.values()}
    assert {4, 8} <= chosen  # half way between all-4 and all-8: a mix
    summary = result.details["bit_budget"]
    assert summary["bytes"] == sum(row["bytes"] for row in rows.values()) <= budget
    assert summary["total_sensitivity"] == pytest.approx(sum(row["relative_output_error"] for row in rows.values()))

    # the bytes in the graph are the bytes reported: packed codes and scales, float weights kept
    in_graph = 0
    for name, row in rows.items():
        if row["bits"] == 32:
            in_graph += model.graph.initializers[weights[name]].const_value.nbytes
        else:
            for suffix in (f".q{row['bits']}", ".scales"):
                in_graph += model.graph.initializers[name + suffix].const_value.nbytes
    assert in_graph == summary["bytes"]
    floats = sum(row["bits"] == 32 for row in rows.values())
    assert result.stats.get("skipped: kept in float by the bit budget", 0) == floats
    assert result.stats["quantized"] == len(rows) - floats
    assert result.stats["quantized: 4-bit rtn"] + result.stats["quantized: 8-bit rtn"] == len(rows) - floats
    y = ort_runtime.run(ort_runtime.create_session(reference, optimize=False), feeds[0])["y"]
    testing.assert_ort_allclose(reference, model, feeds[0], atol=0.1 * float(np.abs(y).max()))


def test_avg_bits_and_more_budget_never_raise_the_total_sensitivity(rng: np.random.Generator) -> None:
    model, _ = _calibrated_block(rng)
    params = {lin.name: lin.in_features * lin.out_features for lin in block_map(model).linears}
    totals = []
    for avg_bits in (4.0, 6.0, 12.0, 24.0, 32.0):
        result = QuantizeWeights(block=16, method="gptq", avg_bits=avg_bits)(_copy(model))
        rows = result.details["layers"]
        assert {row["linear"] for row in rows} == params.keys()
        mean = sum(row["bits"] * params[row["linear"]] for row in rows) / sum(params.values())
        assert mean <= avg_bits and result.details["bit_budget"]["avg_bits"] == pytest.approx(mean)
        totals.append(result.details["bit_budget"]["total_sensitivity"])
        floats = sum(row["bits"] == 32 for row in rows)
        assert result.stats.get("skipped: kept in float by the bit budget", 0) == floats
        if avg_bits == 4.0:
            assert all(row["bits"] == 4 for row in rows)
        if avg_bits >= 24.0:
            assert floats >= 1  # a float32 layer is 32 bits a weight: only a large budget keeps one
    assert all(b <= a for a, b in zip(totals, totals[1:], strict=False)), totals
    assert totals[-1] == 0.0 and totals[0] > totals[1]


def test_budget_options_are_checked(rng: np.random.Generator) -> None:
    with pytest.raises(PassConfigError, match="give budget-mb or avg-bits, not both"):
        QuantizeWeights(budget_mb=1.0, avg_bits=5.0)
    with pytest.raises(PassConfigError, match="avg-bits must be in"):
        QuantizeWeights(avg_bits=3.0)
    with pytest.raises(PassConfigError, match="budget-mb must be a positive number"):
        QuantizeWeights(budget_mb=0.0)
    with pytest.raises(PassConfigError, match="drop bits="):
        QuantizeWeights(bits=8, budget_mb=1.0)
    model, _ = _calibrated_block(rng)
    least = _sizes(model, 4)
    with pytest.raises(PassConfigError, match=f"below what 6 linears take at 4 bits \\({least / 1e6:.6g} MB"):
        QuantizeWeights(block=16, budget_mb=(least - 1) / 1e6)(model)


def test_qdq_budget_counts_the_bytes_onnx_stores(rng: np.random.Generator) -> None:
    model, _ = _calibrated_block(rng)
    model.opset_imports[""] = 21
    qdq = bq.dequantize_linear_bytes  # K is not padded to a whole block: smaller than MatMulNBits'
    budget = (_sizes(model, 4, qdq) + _sizes(model, 8, qdq)) // 2

    result = QuantizeWeights(block=16, format="qdq", budget_mb=budget / 1e6)(model)

    rows = result.details["layers"]
    quantized = [row for row in rows if row["bits"] != 32]
    assert {row["bits"] for row in quantized} == {4, 8}
    for row in quantized:  # int4 two a byte, as onnx_ir counts them; scales float32
        packed = sum(
            model.graph.initializers[row["linear"] + suffix].const_value.nbytes for suffix in (f".q{row['bits']}", ".scales")
        )
        k, n = row["shape"]
        assert packed == row["bytes"] == bq.dequantize_linear_bytes(k, n, row["bits"], 16, True)
    assert result.details["bit_budget"]["bytes"] <= budget


def test_an_impossible_budget_leaves_the_model_unchanged(rng: np.random.Generator) -> None:
    model, _ = _calibrated_block(rng)
    before = {name: value.const_value.numpy().copy() for name, value in model.graph.initializers.items()}
    with pytest.raises(PassConfigError, match="below what 6 linears take at 4 bits"):
        QuantizeWeights(block=16, method="awq", budget_mb=1e-6)(model)  # awq would rescale first
    after = {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[name], after[name]) for name in before)
