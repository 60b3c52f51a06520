"""smoothquant: move activation outliers into weights with per-channel scales (SmoothQuant).

For an activation ``X`` read by linears ``W_1..W_n`` and a positive ``s`` per input channel,
``X @ W == (X / s) @ (s[:, None] * W)``. The division must be folded into whatever produces
``X``; three producers allow it exactly:

- a norm (LayerNorm or RMSNorm): gamma and beta divided by ``s``; readers of the norm output
  that are not linears (post-norm residual adds) get ``s`` back, folded into a ``Mul`` by a
  constant when there is one, else through one new ``Mul``;
- attention V -> O: the output projection reads the merged context, which is linear in V per
  channel (softmax weights do not depend on V), so V's output columns (and bias) are divided by
  ``s`` and O's rows multiplied. Under grouped-query attention a V channel feeds every query
  head of its group, so the heads of a group share ``s``;
- FFN up -> down: ``act(gate(x)) * up(x)`` is linear in ``up``, so up's columns are divided; a
  non-gated FFN allows it only for a positively homogeneous activation (ReLU): GELU and SiLU
  are not (``gelu(x / s) != gelu(x) / s``) and are skipped.

``s_j = max|X_j|^alpha / max_i |W_ji|^(1 - alpha)`` from the attached calibration statistics
(``alpha=auto`` picks per site the grid value with the least int8 error proxy, see
:func:`tforge.passes.math.smoothing.quantization_error_proxy`). The statistics of each smoothed
activation are rescaled by ``1 / s`` so that the model stays calibrated.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from tforge.compiler.attention_paths import value_columns
from tforge.compiler.calibration import (
    CalibrationStats,
    ChannelStats,
    attached_stats,
    require_stats,
)
from tforge.compiler.ffn_paths import check_rescalable_up_down
from tforge.compiler.pass_infra import Pass, PassResult, Property, SiteStats, Skip
from tforge.compiler.registry import register_pass
from tforge.compiler.rescale import check_norm_scalable, scale_norm_output, scale_stats
from tforge.compiler.rewrite import GraphEditor, current_weight
from tforge.compiler.structure import FFN, Attention, BlockMap, Linear, block_map, const_array
from tforge.errors import PassConfigError, PreconditionError
from tforge.passes.math import smoothing

logger = logging.getLogger(__name__)

# Scales this close to 1 everywhere are not applied: a second run on a smoothed model computes
# s = 1 up to rounding, and rewriting the weights for that would only add rounding.
_UNIT_TOLERANCE = 1e-3
_DEFAULT_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(11))  # 0.3 .. 0.8


@dataclasses.dataclass
class _Site:
    """One place to smooth: the activation (calibration key) and the weights of its readers."""

    kind: Literal["norm", "v->o", "up->down"]
    node: ir.Node  # the norm, or the reading linear's MatMul
    activation: str  # ONNX value name of the linears' input (the calibration key)
    weights: list[np.ndarray]  # [C, out] of each reading linear
    groups: np.ndarray | None = None  # channels tied to one scale (GQA)

    @property
    def name(self) -> str:
        return self.node.name or "?"


@register_pass("smoothquant")
@dataclasses.dataclass(frozen=True)
class SmoothQuant(Pass):
    """Balance activation and weight ranges per channel; fold the scales into norms and linears.

    Sites: every norm read by linears, attention V -> O (``vo``), FFN up -> down (``up-down``).
    ``alpha`` is a number in [0, 1] or ``auto`` (per site, the value of ``alpha-grid`` with the
    smallest int8 error proxy on the calibration statistics).
    """

    alpha: float | Literal["auto"] = 0.5
    alpha_grid: tuple[float, ...] = _DEFAULT_GRID
    min_scale: float = 1e-5
    max_scale: float = 1e5
    vo: bool = True
    up_down: bool = True

    requires: ClassVar = frozenset({Property.CANONICAL, Property.CALIBRATED})
    invalidates: ClassVar = frozenset()  # the attached stats are rescaled with the activations

    def __post_init__(self) -> None:
        if self.alpha != "auto" and (
            isinstance(self.alpha, str) or not 0.0 <= float(self.alpha) <= 1.0
        ):
            raise PassConfigError(f"smoothquant: alpha must be in [0, 1] or auto, got {self.alpha}")
        if not self.alpha_grid or any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise PassConfigError(
                f"smoothquant: alpha-grid must be non-empty values in [0, 1], got {self.alpha_grid}"
            )
        if not (0.0 < self.min_scale <= 1.0 <= self.max_scale < np.inf):
            raise PassConfigError(
                "smoothquant: need 0 < min-scale <= 1 <= max-scale (finite), got "
                f"min-scale={self.min_scale} max-scale={self.max_scale}"
            )

    def check(self, model: ir.Model) -> None:
        require_stats(model, "smoothquant:", "run 'calibrate' right before 'smoothquant'")

    def run(self, model: ir.Model) -> PassResult:
        calib = attached_stats(model)
        if calib is None:  # check() ran first; kept for direct run() calls
            raise PreconditionError("smoothquant: no calibration statistics are attached")
        stats = SiteStats()
        rows: list[dict[str, Any]] = []
        editor = GraphEditor(model, self.name)
        blocks = block_map(model)

        # Column-scaling sites first: V's and up's columns are then final when a norm's scales
        # are computed from the weights reading it, so a second run finds every scale ~1.
        for block in blocks.blocks:
            if self.vo and block.attention is not None:
                self._smooth_vo(block.attention, calib, editor, stats, rows)
            if self.up_down and block.ffn is not None:
                self._smooth_up_down(block.ffn, blocks, calib, editor, stats, rows)

        for norm in blocks.norms:
            try:
                check_norm_scalable(norm)
                site = _Site("norm", norm.node, norm.output.name or "", _weights(norm.linears))
                scale = self._scales(site, calib, rows)
            except Skip as skip:
                self._skip(stats, "norm", skip)
                continue
            done = scale_norm_output(editor, norm, scale)
            scale_stats(model, site.activation, 1.0 / scale)
            stats["smoothed: norm"] += 1
            if done.folded:
                stats["scale folded into a Mul reader"] += done.folded
            if done.reapplied:
                stats["scale re-applied for non-linear readers"] += 1

        changed = any(k.startswith("smoothed:") for k in stats)
        return PassResult(model, changed=changed, stats=stats, details={"sites": rows})

    # ------------------------------------------------------------------ sites

    def _smooth_vo(
        self,
        attn: Attention,
        calib: CalibrationStats,
        editor: GraphEditor,
        stats: SiteStats,
        rows: list[dict[str, Any]],
    ) -> None:
        try:
            start, kv_width = value_columns(attn)
            groups = smoothing.kv_channel_groups(attn.num_heads, attn.num_kv_heads, attn.head_dim)
            site = _Site("v->o", attn.o.matmul, attn.o.input.name or "", _weights([attn.o]), groups)
            scale = self._scales(site, calib, rows)
        except Skip as skip:
            self._skip(stats, "v->o", skip)
            return
        v_scale = np.empty(kv_width, np.float64)
        v_scale[groups] = scale  # one value per group: all members carry the same scale
        editor.scale_columns(attn.v, v_scale, start)
        editor.scale_rows([attn.o], scale)
        scale_stats(editor.model, site.activation, 1.0 / scale)
        stats["smoothed: v->o"] += 1

    def _smooth_up_down(
        self,
        ffn: FFN,
        blocks: BlockMap,
        calib: CalibrationStats,
        editor: GraphEditor,
        stats: SiteStats,
        rows: list[dict[str, Any]],
    ) -> None:
        try:
            check_rescalable_up_down(ffn, blocks)
            site = _Site("up->down", ffn.down.matmul, ffn.down.input.name or "", _weights([ffn.down]))
            scale = self._scales(site, calib, rows)
        except Skip as skip:
            self._skip(stats, "up->down", skip)
            return
        editor.scale_columns(ffn.up, scale)
        editor.scale_rows([ffn.down], scale)
        scale_stats(editor.model, site.activation, 1.0 / scale)
        stats["smoothed: up->down"] += 1

    # ------------------------------------------------------------------ scales

    def _scales(
        self,
        site: _Site,
        calib: CalibrationStats,
        rows: list[dict[str, Any]],
    ) -> np.ndarray:
        """The site's scales, or :class:`Skip`."""
        channels = site.weights[0].shape[0]
        act: ChannelStats | None = calib.get(site.activation)
        if act is None or act.count == 0:
            raise Skip(f"{site.kind}: no calibration stats", site.node)
        if act.channels != channels:
            raise Skip(f"{site.kind}: calibration stats are stale (channel count differs)", site.node)
        kwargs = {"min_scale": self.min_scale, "max_scale": self.max_scale, "groups": site.groups}
        if self.alpha == "auto":
            choice = smoothing.choose_alpha(
                act.absmax, act.mean_sq, site.weights, self.alpha_grid, **kwargs
            )
            alpha, scale = choice.alpha, choice.scale
        else:
            alpha = float(self.alpha)
            w_absmax = smoothing.weight_row_absmax(site.weights)
            scale = smoothing.smoothing_scales(act.absmax, w_absmax, alpha, **kwargs)
        if float(np.abs(scale - 1.0).max()) < _UNIT_TOLERANCE:
            raise Skip(f"{site.kind}: scales already ~1", site.node, blocked=False)
        unit = np.ones_like(scale)
        rows.append(
            {
                "site": site.kind,
                "name": site.name,
                "activation": site.activation,
                "alpha": alpha,
                "max_scale": float(scale.max()),
                "min_scale": float(scale.min()),
                "act_absmax_before": float(act.absmax.max()),
                "act_absmax_after": float((act.absmax / scale).max()),
                "error_proxy_before": smoothing.quantization_error_proxy(
                    act.absmax, act.mean_sq, site.weights, unit
                ),
                "error_proxy_after": smoothing.quantization_error_proxy(
                    act.absmax, act.mean_sq, site.weights, scale
                ),
            }
        )
        logger.debug(
            "%s %s: alpha %g, scales in [%g, %g], activation absmax %g -> %g",
            site.kind, site.name, alpha, scale.min(), scale.max(),
            act.absmax.max(), (act.absmax / scale).max(),
        )
        return scale

    @staticmethod
    def _skip(stats: SiteStats, kind: str, skip: Skip) -> None:
        stats.skip(skip)
        logger.debug("%s %s: skipped: %s", kind, skip.at, skip.reason)


# ----------------------------------------------------------------------------- structure checks


def _weights(linears: Sequence[Linear]) -> list[np.ndarray]:
    out = []
    for lin in linears:
        w = const_array(current_weight(lin))
        if w is None:  # the block map only lists linears with constant weights
            raise ValueError(f"smoothquant: weight of '{lin.name}' is not a constant")
        out.append(np.asarray(w, np.float64))
    return out
