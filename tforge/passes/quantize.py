"""quantize: lower every linear to int8 in a layout ONNX Runtime's CPU provider runs with integer kernels.

Weights are int8, symmetric, one scale per output channel (``W ~ q * s[None, :]``, ``q`` in
[-127, 127]). Activations, the linear's input ``x``, are quantized one of these ways:

- ``dynamic-per-token`` (default): one scale per row (token), computed at run time as
  ``max|x_row| / 127``; the int8 codes are stored as uint8 with zero point 128 so that ORT runs
  its u8 x s8 kernels. Needs no calibration, and a token with huge activations (the first token
  of a decoder) does not crush the resolution of the others.
- ``static``: one scale and zero point per tensor, fixed from the calibration statistics
  (``calib-method=absmax`` uses the observed min and max, ``percentile`` clips both ends at the
  given percentile of ``|x|``); uint8, asymmetric. Needs ``calibrate`` earlier in the pipeline.
- ``auto``: per activation, ``static`` when the calibration statistics predict a per-tensor
  signal-to-quantization-noise ratio of at least ``min-sqnr`` dB; else ``dynamic`` when they
  predict at least ``min-sqnr-dynamic`` dB (unset: never); else ``fallback``
  (``dynamic-per-token`` by default, or ``dynamic``). The prediction is a lower bound for
  ``dynamic``, whose range is that of one batch, inside the calibration range.
  Static is the cheapest at run time; dynamic per tensor is one fused kernel (bias included);
  per-token is the most accurate on outlier-heavy activations and the slowest.
- ``dynamic``: one scale and zero point per tensor, computed at run time
  (``DynamicQuantizeLinear``); uint8, asymmetric. What ``onnxruntime.quantization.quantize_dynamic``
  does; kept for comparison.
- ``none``: weight-only; the float MatMul reads ``DequantizeLinear(q)`` (ORT turns the pair into
  its ``MatMulNBits`` kernel).

Two output formats:

- ``integer`` (default): ONNX Runtime's fused integer operators (``com.microsoft`` domain)
  written out directly: ``MatMulIntegerToFloat`` (the bias folded in, except with per-token
  scales, which the kernel applies after the bias) or ``DynamicQuantizeMatMul``. The model loads
  only in ONNX Runtime, but runs integer kernels whatever ORT's optimization level.
- ``qdq``: standard ONNX operators only. ``QuantizeLinear``/``DequantizeLinear`` around a float
  ``MatMul``, which ORT's optimizer fuses into ``MatMulIntegerToFloat`` / ``DynamicQuantizeMatMul``
  (bias ``Add`` left outside). A per-row scale has no Q/DQ form, so per-token activations are
  written as ``MatMulInteger`` followed by the column and row rescaling ``Mul``s. Fusion is
  ORT's decision: ORT 1.31 leaves ``DequantizeLinear -> MatMul`` unfused (a float MatMul on
  dequantized values) when a ``Relu`` reads the MatMul, so check with ``kernels_run``.

Activations are uint8 and weights int8 because that is the operand pair ORT's MLAS kernels run
fastest on x86 with VNNI (``vpdpbusd``); int8 x int8 (``MatMulInteger`` on two int8 inputs) took
twice as long as float here. On x86 CPUs without VNNI the u8 x s8 products of the AVX2 kernel can
saturate 16-bit intermediates, the reason ORT offers ``reduce_range``; this pass targets VNNI CPUs.

Linears reading the same activation (Q, K and V; gate and up) share one quantization of it.
A linear is skipped, with the reason counted in the statistics, when excluded by name, when its
weight or input is not float32, or (static) when no statistics describe its input. ``details``
gives, per linear, the relative Frobenius error of its int8 weight, the activation mode, and for
calibrated activations the predicted per-tensor SQNR.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from tforge.compiler.calibration import (
    CalibrationStats,
    ChannelStats,
    attached_stats,
    require_stats,
)
from tforge.compiler.pass_infra import Pass, PassResult, Property, SiteStats, Skip
from tforge.compiler.registry import register_pass
from tforge.compiler.rewrite import GraphEditor
from tforge.compiler.structure import Linear, block_map, const_array
from tforge.errors import PassConfigError, PassError, PreconditionError, UnsupportedModelError
from tforge.passes.math.int8 import (
    QMAX,
    dequantize_weight,
    quantize_weight,
    uint8_qparams,
    weight_error,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Quantize",
    "activation_range",
    "dequantize_weight",
    "predicted_sqnr_db",
    "quantize_weight",
    "uint8_qparams",
    "weight_error",
]

_MS = "com.microsoft"
_TOKEN_ZERO_POINT = 128  # per-token int8 values are stored as uint8 shifted by 128
_TINY = np.float32(1e-12)  # scale floor for all-zero rows
_MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear


# ----------------------------------------------------------------------------- the math


def activation_range(
    stats: ChannelStats, method: Literal["absmax", "percentile"], percentile: float
) -> tuple[float, float]:
    """The per-tensor ``[lo, hi]`` range to quantize an activation to, always containing 0.

    ``absmax``: the observed min and max over all channels. ``percentile``: the same, clipped at
    the ``percentile`` of ``|x|`` over the whole tensor.
    """
    lo = float(np.min(stats.min))
    hi = float(np.max(stats.max))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("activation_range: the statistics hold no data")
    if method == "percentile":
        clip = stats.percentile(percentile)
        lo, hi = max(lo, -clip), min(hi, clip)
    return min(lo, 0.0), max(hi, 0.0)


def predicted_sqnr_db(stats: ChannelStats, lo: float, hi: float) -> float:
    """Signal-to-quantization-noise ratio (dB) of uint8 per-tensor quantization over ``[lo, hi]``.

    Signal power is the mean of ``x^2`` over all channels; noise is the rounding noise of the
    step, ``step^2 / 12``, plus, when ``[lo, hi]`` clips the observed values, the clipping error
    estimated from the ``|x|`` histogram (an upper bound after rescaling, see ``ChannelStats.scaled``).
    """
    signal = float(np.mean(stats.mean_sq))
    if signal <= 0.0:
        return float("inf")
    step = (hi - lo) / 255.0
    noise = step * step / 12.0
    clip = max(-lo, hi)
    total = int(stats.tensor_hist.sum())
    if clip < float(np.max(stats.absmax)) and total:
        centres = (np.arange(stats.tensor_hist.shape[0]) + 0.5) * stats.bin_width
        over = np.clip(centres - clip, 0.0, None)
        noise += float((over * over * stats.tensor_hist).sum() / total)
    return float(10.0 * np.log10(signal / max(noise, 1e-30)))


# ----------------------------------------------------------------------------- the pass


Activations = Literal["auto", "static", "dynamic", "dynamic-per-token", "none"]
_Mode = Literal["static", "dynamic", "dynamic-per-token", "none"]


@register_pass("quantize")
@dataclasses.dataclass(frozen=True)
class Quantize(Pass):
    """Lower linears to int8 (per-channel weights; static, dynamic or per-token activations) for ORT's integer kernels."""

    weights: Literal["int8"] = "int8"
    activations: Activations = "dynamic-per-token"
    calib_method: Literal["absmax", "percentile"] = "absmax"
    percentile: float = 99.99
    min_sqnr: float = 33.0  # auto: static per tensor at or above this predicted SQNR (dB)
    # auto, below min-sqnr: dynamic per tensor at or above this predicted SQNR (dB), else `fallback`
    min_sqnr_dynamic: float | None = None
    # auto, below min-sqnr: per token (accurate on outlier rows) or per tensor at run time (one fused kernel)
    fallback: Literal["dynamic-per-token", "dynamic"] = "dynamic-per-token"
    exclude: tuple[str, ...] = ()  # weight names, or substrings of them, to keep in float
    format: Literal["qdq", "integer"] = "integer"

    requires: ClassVar = frozenset({Property.CANONICAL})
    establishes: ClassVar = frozenset({Property.QUANTIZED})
    # Activations after a quantized linear no longer match the statistics taken in float.
    invalidates: ClassVar = frozenset({Property.CALIBRATED})

    def __post_init__(self) -> None:
        if self.weights != "int8":
            raise PassConfigError(f"quantize: weights must be int8, got {self.weights!r}")
        if self.activations not in typing.get_args(Activations):
            raise PassConfigError(
                f"quantize: activations must be one of {', '.join(typing.get_args(Activations))}, got {self.activations!r}"
            )
        if self.calib_method not in ("absmax", "percentile"):
            raise PassConfigError(f"quantize: calib-method must be absmax or percentile, got {self.calib_method!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise PassConfigError(f"quantize: percentile must be in (50, 100], got {self.percentile}")
        if not 0.0 < self.min_sqnr < 100.0:
            raise PassConfigError(f"quantize: min-sqnr must be in (0, 100) dB, got {self.min_sqnr}")
        if self.min_sqnr_dynamic is not None and not 0.0 < self.min_sqnr_dynamic <= self.min_sqnr:
            raise PassConfigError(
                f"quantize: min-sqnr-dynamic must be in (0, min-sqnr={self.min_sqnr}] dB, got {self.min_sqnr_dynamic}"
            )
        if self.fallback not in ("dynamic-per-token", "dynamic"):
            raise PassConfigError(f"quantize: fallback must be dynamic-per-token or dynamic, got {self.fallback!r}")
        if self.format not in ("qdq", "integer"):
            raise PassConfigError(f"quantize: format must be qdq or integer, got {self.format!r}")
        if any(not pattern for pattern in self.exclude):
            raise PassConfigError("quantize: exclude holds an empty name, which would match every linear")

    def check(self, model: ir.Model) -> None:
        if self.activations in ("static", "auto"):
            require_stats(
                model,
                f"quantize: activations={self.activations}",
                "add 'calibrate' before 'quantize' (with --calib-text FILE --tokenizer PATH) "
                "or use activations=dynamic-per-token",
            )
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset < _MIN_OPSET:
            raise PreconditionError(
                f"quantize: the model imports opset {opset}, but per-channel int8 needs opset "
                f"{_MIN_OPSET} or later; re-export the model with a newer opset"
            )

    def run(self, model: ir.Model) -> PassResult:
        stats = SiteStats()
        details: dict[str, Any] = {}
        calibration = attached_stats(model) if self.activations in ("static", "auto") else None
        editor = GraphEditor(model, self.name)
        groups: dict[int, list[Linear]] = {}
        for lin in block_map(model).linears:
            try:
                self._check_linear(lin, calibration)
            except Skip as skip:
                stats.skip(skip)
                logger.debug("quantize: %s skipped: %s", lin.name, skip)
                continue
            groups.setdefault(id(lin.input), []).append(lin)
        for linears in groups.values():
            x = linears[0].input
            try:
                plan = self._plan(x, calibration)
            except ValueError as error:  # statistics that cannot give a range
                stats.skip("unusable calibration statistics", x, count=len(linears))
                logger.debug("quantize: input %s skipped: %s", x.name, error)
                continue
            width = _width(x) or _contracted(linears[0])
            if plan.mode == "dynamic-per-token" and width is None:
                stats.skip("per-token input has no static last dimension", x, count=len(linears))
                continue
            quantized_input = self._quantize_input(editor, x, plan, len(linears), width)
            for lin in linears:
                entry = self._lower(editor, lin, quantized_input)
                if plan.sqnr_db is not None:
                    entry["input_sqnr_db"] = plan.sqnr_db
                details[lin.name] = entry
                stats["quantized"] += 1
                stats[f"activations {plan.mode}"] += 1
        editor.drop_retired()
        if stats["quantized"]:
            logger.info(
                "quantize: %d linears to int8 (%s), %d skipped",
                stats["quantized"],
                ", ".join(f"{v} {k[12:]}" for k, v in stats.items() if k.startswith("activations ")),
                sum(v for k, v in stats.items() if k.startswith("skipped")),
            )
        return PassResult(model, changed=stats["quantized"] > 0, stats=stats, details=details)

    # ------------------------------------------------------------------ decisions

    def _check_linear(self, lin: Linear, calibration: CalibrationStats | None) -> None:
        """Skip a linear this pass must leave in float."""
        if any(pattern == lin.name or pattern in lin.name for pattern in self.exclude):
            raise Skip("excluded", lin.matmul, blocked=False)
        if lin.weight.dtype != ir.DataType.FLOAT:
            raise Skip("weight is not float32", lin.matmul)
        if lin.input.dtype != ir.DataType.FLOAT:
            raise Skip("input is not float32", lin.matmul)
        if (
            self.activations == "static"
            and calibration is not None
            and calibration.get(lin.input.name or "") is None
        ):
            raise Skip("no calibration statistics for its input", lin.matmul)

    def _plan(self, x: ir.Value, calibration: CalibrationStats | None) -> _Plan:
        """How to quantize one activation: the mode, and for static its range and predicted SQNR."""
        if self.activations not in ("static", "auto"):
            return _Plan(self.activations)  # type: ignore[arg-type]
        channel_stats = calibration.get(x.name or "") if calibration is not None else None
        if channel_stats is None:  # auto without statistics for this input: the fallback needs none
            return _Plan(self.fallback)
        lo, hi = activation_range(channel_stats, self.calib_method, self.percentile)
        sqnr = predicted_sqnr_db(channel_stats, lo, hi)
        if self.activations == "auto" and sqnr < self.min_sqnr:
            if self.min_sqnr_dynamic is not None and sqnr >= self.min_sqnr_dynamic:
                return _Plan("dynamic", sqnr_db=sqnr)
            return _Plan(self.fallback, sqnr_db=sqnr)
        return _Plan("static", lo=lo, hi=hi, sqnr_db=sqnr)

    # ------------------------------------------------------------------ input side

    def _quantize_input(
        self, editor: GraphEditor, x: ir.Value, plan: _Plan, readers: int, width: int | None
    ) -> _QuantizedInput:
        base = x.name or "x"
        editor.place_after(x)
        if plan.mode == "none":
            return _QuantizedInput(plan.mode, float_input=x)
        if plan.mode == "static":
            scale, zero_point = uint8_qparams(plan.lo, plan.hi)
            s = editor.initializer(f"{base}.scale", np.array(scale, np.float32))
            zp = editor.initializer(f"{base}.zero_point", np.array(zero_point, np.uint8))
            q = editor.node("QuantizeLinear", [x, s, zp], name=f"{base}.quantize", outputs=f"{base}.q")
            _annotate(q.outputs[0], ir.DataType.UINT8, x.shape)
            return _QuantizedInput(plan.mode, float_input=x, q=q.outputs[0], scale=s, zero_point=zp)
        if plan.mode == "dynamic":
            if self.format == "integer" and readers == 1:
                return _QuantizedInput(plan.mode, float_input=x)  # DynamicQuantizeMatMul does it
            dq = editor.node(
                "DynamicQuantizeLinear", [x], name=f"{base}.quantize", num_outputs=3,
                outputs=[f"{base}.q", f"{base}.scale", f"{base}.zero_point"],
            )
            _annotate(dq.outputs[0], ir.DataType.UINT8, x.shape)
            _annotate(dq.outputs[1], ir.DataType.FLOAT, ir.Shape([]))
            _annotate(dq.outputs[2], ir.DataType.UINT8, ir.Shape([]))
            return _QuantizedInput(
                plan.mode, float_input=x, q=dq.outputs[0], scale=dq.outputs[1], zero_point=dq.outputs[2]
            )
        return self._quantize_per_token(editor, x, width)

    def _quantize_per_token(self, editor: GraphEditor, x: ir.Value, width: int | None) -> _QuantizedInput:
        """Row scale ``s = max(max(x_row), -min(x_row), tiny) / 127``; codes ``round(x / s) + 128``.

        The quantization itself is one per-axis ``QuantizeLinear`` over the rows of a 2-D view of
        ``x`` (its zero point, 128, expanded to one per row); max and min are two reductions
        that write nothing of the size of ``x``. This is the cheapest chain measured on ORT's
        CPU provider (about 1.3-1.7x faster than ``Abs``, ``ReduceMax``, ``Div``, ``QuantizeLinear``).
        """
        base = x.name or "x"
        if width is None:
            raise PassError(f"quantize: per-token input '{base}' has no static last dimension; this is a bug")
        rank = len(x.shape) if x.shape is not None else None
        row_shape = _row_shape(x.shape)
        reduced = []
        axes = editor.initializer(f"{base}.row_axes", np.array([-1], np.int64)) if editor.opset >= 18 else None
        for op in ("ReduceMax", "ReduceMin"):
            label = f"{base}.row_{op[6:].lower()}"
            if axes is not None:
                node = editor.node(op, [x, axes], attributes={"keepdims": 1}, name=label, outputs=label)
            else:
                node = editor.node(op, [x], attributes={"axes": [-1], "keepdims": 1}, name=label, outputs=label)
            reduced.append(node.outputs[0])
        neg_min = editor.node("Neg", [reduced[1]], name=f"{base}.row_neg_min", outputs=f"{base}.row_neg_min")
        absmax = editor.node("Max", [reduced[0], neg_min.outputs[0], editor.initializer(f"{base}.tiny", np.array(_TINY, np.float32))],
                            name=f"{base}.row_absmax", outputs=f"{base}.row_absmax")
        inv_qmax = editor.initializer(f"{base}.inv_qmax", np.array(1.0 / QMAX, np.float32))
        scale = editor.node("Mul", [absmax.outputs[0], inv_qmax], name=f"{base}.row_scale", outputs=f"{base}.row_scale")
        for value in (*reduced, neg_min.outputs[0], absmax.outputs[0], scale.outputs[0]):
            _annotate(value, ir.DataType.FLOAT, row_shape)
        rows = editor.node("Reshape", [x, editor.initializer(f"{base}.rows_shape", np.array([-1, width], np.int64))],
                          name=f"{base}.rows", outputs=f"{base}.rows")
        flat_scale = editor.node("Reshape", [scale.outputs[0], editor.initializer(f"{base}.flat_shape", np.array([-1], np.int64))],
                                name=f"{base}.row_scale_flat", outputs=f"{base}.row_scale_flat")
        count = editor.node("Shape", [flat_scale.outputs[0]], name=f"{base}.row_count", outputs=f"{base}.row_count")
        zp = editor.initializer(f"{base}.zero_point", np.array(_TOKEN_ZERO_POINT, np.uint8))
        zps = editor.node("Expand", [zp, count.outputs[0]], name=f"{base}.row_zero_points", outputs=f"{base}.row_zero_points")
        q_rows = editor.node("QuantizeLinear", [rows.outputs[0], flat_scale.outputs[0], zps.outputs[0]],
                            attributes={"axis": 0}, name=f"{base}.quantize", outputs=f"{base}.q_rows")
        x_shape = editor.node("Shape", [x], name=f"{base}.shape", outputs=f"{base}.shape")
        q = editor.node("Reshape", [q_rows.outputs[0], x_shape.outputs[0]], name=f"{base}.q", outputs=f"{base}.q")
        _annotate(rows.outputs[0], ir.DataType.FLOAT, ir.Shape([None, width]) if rank != 2 else x.shape)
        _annotate(flat_scale.outputs[0], ir.DataType.FLOAT, ir.Shape([None]))
        _annotate(count.outputs[0], ir.DataType.INT64, ir.Shape([1]))
        _annotate(zps.outputs[0], ir.DataType.UINT8, ir.Shape([None]))
        _annotate(q_rows.outputs[0], ir.DataType.UINT8, rows.outputs[0].shape)
        _annotate(x_shape.outputs[0], ir.DataType.INT64, ir.Shape([rank]))  # [None]: rank unknown
        _annotate(q.outputs[0], ir.DataType.UINT8, x.shape)
        return _QuantizedInput(
            "dynamic-per-token", float_input=x, q=q.outputs[0], scale=scale.outputs[0], zero_point=zp
        )

    # ------------------------------------------------------------------ one linear

    def _lower(self, editor: GraphEditor, lin: Linear, xq: _QuantizedInput) -> dict[str, Any]:
        weight = const_array(lin.weight)
        if weight is None:  # find_linears only returns constant weights
            raise UnsupportedModelError(f"quantize: weight of linear '{lin.name}' is not a constant")
        q, scale = quantize_weight(weight)
        entry: dict[str, Any] = {"weight_error": weight_error(weight, q, scale), "activations": xq.mode}
        wname = lin.name
        wq = editor.initializer(f"{wname}.int8", q)
        ws = editor.initializer(f"{wname}.scale", scale)
        wzp = editor.initializer(f"{wname}.zero_point", np.zeros(scale.shape, np.int8))
        editor.retire(lin.weight)
        if xq.mode == "static":
            entry["input_scale"] = float(xq.scale.const_value.numpy())  # type: ignore[union-attr]
            entry["input_zero_point"] = int(xq.zero_point.const_value.numpy())  # type: ignore[union-attr]
        if xq.mode == "none" or (self.format == "qdq" and xq.mode != "dynamic-per-token"):
            # Q/DQ around the float MatMul, which stays; ORT fuses the pattern.
            if xq.mode != "none":
                dqx = editor.node(
                    "DequantizeLinear", [xq.q, xq.scale, xq.zero_point],
                    name=f"{wname}.input_dequantize", outputs=f"{wname}.input_dequantized", before=lin.matmul,
                )
                _annotate(dqx.outputs[0], ir.DataType.FLOAT, lin.input.shape)
                lin.matmul.replace_input_with(0, dqx.outputs[0])
            dqw = editor.node(
                "DequantizeLinear", [wq, ws, wzp], attributes={"axis": 1},
                name=f"{wname}.dequantize", outputs=f"{wname}.dequantized", before=lin.matmul,
            )
            _annotate(dqw.outputs[0], ir.DataType.FLOAT, lin.weight.shape)
            lin.matmul.replace_input_with(1, dqw.outputs[0])
            editor.mark(lin.matmul)
            return entry
        result, keep_bias_add = self._lower_integer(editor, lin, xq, wq, ws, wzp)
        if keep_bias_add and lin.bias_add is not None:
            _annotate(result, ir.DataType.FLOAT, lin.matmul.outputs[0].shape)
            lin.bias_add.replace_input_with(list(lin.bias_add.inputs).index(lin.matmul.outputs[0]), result)
        else:
            end = lin.bias_add or lin.matmul
            _annotate(result, ir.DataType.FLOAT, end.outputs[0].shape)
            editor.replace_value(end.outputs[0], result)
            if lin.bias_add is not None:
                editor.remove(lin.bias_add)
        editor.remove(lin.matmul)
        return entry

    def _lower_integer(
        self,
        editor: GraphEditor,
        lin: Linear,
        xq: _QuantizedInput,
        wq: ir.Value,
        ws: ir.Value,
        wzp: ir.Value,
    ) -> tuple[ir.Value, bool]:
        """Integer operators for one linear; returns the float result and whether the bias Add stays."""
        wname = lin.name
        bias = [lin.bias] if lin.bias is not None else []
        if xq.mode == "dynamic" and xq.q is None:
            node = editor.node("DynamicQuantizeMatMul", [xq.float_input, wq, ws, wzp, *bias],
                              domain=_MS, name=f"{wname}.matmul", outputs=f"{wname}.out", before=lin.matmul)
            return node.outputs[0], not bias
        if self.format == "integer":
            # A per-row a_scale is applied by the kernel after the product (ScaleOutput), which
            # would scale a folded bias too: with per-token scales the bias Add stays outside.
            fold = bool(bias) and xq.mode != "dynamic-per-token"
            node = editor.node(
                "MatMulIntegerToFloat",
                [xq.q, wq, xq.scale, ws, xq.zero_point, wzp, *(bias if fold else [])],
                domain=_MS, name=f"{wname}.matmul", outputs=f"{wname}.out", before=lin.matmul,
            )
            return node.outputs[0], not fold
        # Per-token, standard operators: int32 product, then column scale and row scale.
        mm = editor.node("MatMulInteger", [xq.q, wq, xq.zero_point, wzp],
                        name=f"{wname}.matmul", outputs=f"{wname}.int32", before=lin.matmul)
        _annotate(mm.outputs[0], ir.DataType.INT32, lin.matmul.outputs[0].shape)
        cast = editor.node("Cast", [mm.outputs[0]], attributes={"to": ir.DataType.FLOAT},
                          name=f"{wname}.cast", outputs=f"{wname}.float", before=lin.matmul)
        _annotate(cast.outputs[0], ir.DataType.FLOAT, lin.matmul.outputs[0].shape)
        by_col = editor.node("Mul", [cast.outputs[0], ws], name=f"{wname}.col_scale",
                            outputs=f"{wname}.col_scaled", before=lin.matmul)
        _annotate(by_col.outputs[0], ir.DataType.FLOAT, lin.matmul.outputs[0].shape)
        by_row = editor.node("Mul", [by_col.outputs[0], xq.scale], name=f"{wname}.row_scale",
                            outputs=f"{wname}.out", before=lin.matmul)
        return by_row.outputs[0], True


# ----------------------------------------------------------------------------- plumbing


@dataclasses.dataclass(frozen=True)
class _Plan:
    mode: _Mode
    lo: float = 0.0
    hi: float = 0.0
    sqnr_db: float | None = None


@dataclasses.dataclass
class _QuantizedInput:
    """An activation as the linears reading it see it: uint8 codes with scale and zero point."""

    mode: _Mode
    float_input: ir.Value
    q: ir.Value | None = None
    scale: ir.Value | None = None
    zero_point: ir.Value | None = None


def _width(value: ir.Value) -> int | None:
    """The static size of the last axis (the channels a linear contracts), or None."""
    if value.shape is None or len(value.shape) == 0 or not isinstance(value.shape[-1], int):
        return None
    return int(value.shape[-1])


def _contracted(lin: Linear) -> int | None:
    """The channels ``lin`` contracts, from its constant [K, N] weight: MatMul(x, W) runs only
    when x's last axis is K, so this is x's static width even where shape inference lost it.
    (TorchScript exports of attention merge the heads with ``Reshape(x, [b, s, -1])`` whose input
    shape is computed at run time through the repeat-kv ``Expand``; ONNX shape inference leaves
    the o_proj input as [?, ?, ?] although heads x head_dim is fixed.)"""
    shape = lin.weight.shape
    if shape is None or len(shape) != 2 or not isinstance(shape[0], int):
        return None
    return int(shape[0])


def _annotate(value: ir.Value, dtype: ir.DataType, shape: ir.Shape | None) -> None:
    value.type = ir.TensorType(dtype)
    if shape is not None:
        value.shape = ir.Shape(list(shape))


def _row_shape(shape: ir.Shape | None) -> ir.Shape | None:
    if shape is None or len(shape) == 0:
        return None
    return ir.Shape([*list(shape)[:-1], 1])

