"""ln-migrate: move each norm's gamma into the linears that read it (Outlier Suppression).

``LN(x) = gamma * n(x) + beta = gamma * (n(x) + beta / gamma)``, so with ``gamma -> 1`` and
``beta -> beta / gamma`` the norm's output is divided by ``gamma`` per channel, and every linear
reading it gets ``W' = gamma[:, None] * W`` (rows are input channels). The per-channel outliers
that gamma amplifies then live in the weights, which are quantized per output channel, instead
of in the activation, which is quantized per tensor. RMSNorm has no beta; its gamma ``Mul``
stays in the graph with ones so the pattern is still recognised by later passes.

Readers of the norm output that are not linears (post-norm models add it to the residual
stream) get ``gamma`` back: a ``Mul`` by a constant folds it, anything else reads one new
``Mul(norm_out, gamma)``.

The plumbing, "divide a norm's output channels by ``s`` and compensate in its readers", is
shared with ``smoothquant`` and lives in :mod:`tforge.compiler.rescale`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from tforge.compiler.pass_infra import Pass, PassResult, Property, SiteStats, Skip
from tforge.compiler.registry import register_pass
from tforge.compiler.rescale import check_norm_scalable, scale_norm_output, scale_stats
from tforge.compiler.rewrite import GraphEditor
from tforge.compiler.structure import Norm, block_map
from tforge.errors import PassConfigError

logger = logging.getLogger(__name__)

__all__ = ["LnMigrate"]


# ----------------------------------------------------------------------------- the pass


@register_pass("ln-migrate")
@dataclasses.dataclass(frozen=True)
class LnMigrate(Pass):
    """Fold each norm's gamma into the linears reading it (gamma -> 1, beta -> beta/gamma).

    ``gamma * n(x) + beta`` read by ``@ W`` equals ``(n(x) + beta / gamma) @ (gamma[:, None] * W)``;
    valid when no ``|gamma|`` is tiny (``min-abs-gamma``, checked only where there is a beta to
    divide: for RMSNorm any nonzero gamma migrates exactly). Attached calibration statistics of
    the norm outputs are rescaled by ``1 / gamma`` so a calibrated model stays calibrated.
    """

    min_abs_gamma: float = 1e-3

    requires: ClassVar = frozenset({Property.CANONICAL})
    invalidates: ClassVar = frozenset()  # attached stats are rescaled, not invalidated

    def __post_init__(self) -> None:
        # beta / gamma must stay finite, so a zero gamma is never migrated
        if not np.isfinite(self.min_abs_gamma) or self.min_abs_gamma <= 0:
            raise PassConfigError(
                f"ln-migrate: min-abs-gamma must be a finite number > 0, got {self.min_abs_gamma}"
            )

    def run(self, model: ir.Model) -> PassResult:
        stats = SiteStats()
        rows: list[dict[str, Any]] = []
        editor = GraphEditor(model, self.name)
        for norm in block_map(model).norms:
            try:
                gamma = self._gamma(norm)
            except Skip as skip:
                stats.skip(skip)
                logger.debug("%s: skipped: %s", norm.name, skip)
                continue
            done = scale_norm_output(editor, norm, gamma)
            scale_stats(model, norm.output.name, 1.0 / gamma)
            stats["migrated"] += 1
            if done.folded:
                stats["gamma folded into a Mul reader"] += done.folded
            if done.reapplied:
                stats["gamma re-applied for non-linear readers"] += 1
            rows.append(
                {
                    "norm": norm.name,
                    "kind": norm.kind,
                    "linears": [lin.name for lin in norm.linears],
                    "min_abs_gamma": float(np.abs(gamma).min()),
                    "max_abs_gamma": float(np.abs(gamma).max()),
                    "reapplied_for": done.reapplied + done.folded,
                }
            )
            logger.debug(
                "%s: migrated gamma (|gamma| in [%g, %g]) into %d linears",
                norm.name, np.abs(gamma).min(), np.abs(gamma).max(), len(norm.linears),
            )
        return PassResult(
            model, changed=stats["migrated"] > 0, stats=stats, details={"norms": rows}
        )

    def _gamma(self, norm: Norm) -> np.ndarray:
        """The gamma to migrate, or Skip."""
        gamma = check_norm_scalable(norm)
        if np.all(gamma == 1.0):
            raise Skip("gamma already 1", norm.node, blocked=False)
        if np.any(gamma == 0.0):
            raise Skip("gamma has zero entries", norm.node)
        if norm.beta is not None and np.abs(gamma).min() < self.min_abs_gamma:
            # only beta / gamma divides; without a beta (RMSNorm) any nonzero gamma is exact
            raise Skip("|gamma| below min-abs-gamma", norm.node)
        return gamma
