"""svd: replace a linear ``x @ W (+ b)`` by ``(x @ A) @ B (+ b)`` with ``W ~ A B`` of rank ``r``.

The factors come from a truncated SVD of ``W`` (``method=plain``) or of ``L^T W`` with
``L L^T = E[x x^T]`` (``method=activation``, the output error on calibration data is what is
minimised; see :mod:`tforge.passes.math.factorization`). The default, ``method=auto``, is
activation-aware wherever ``calibrate`` collected the input's ``E[x x^T]`` (which it does by
itself when ``svd`` follows it: the pass asks for those Gram matrices) and plain elsewhere; each
layer's details say which was used. Ranks are chosen one of three ways:

- ``rank=R``: the same rank everywhere (clipped to the weight's smaller side);
- ``energy=E``: per layer, the smallest rank keeping a fraction ``E`` of the output energy
  ``E||x W||^2`` (of ``||W||_F^2`` without calibration statistics), rounded up to ``multiple``;
- ``ratio=F``: a global budget, ``F`` of the parameters of the linears in scope removed, spent
  where the output error per removed parameter is least: greedy over the ranks that are
  multiples of ``multiple``, adding up :func:`~tforge.passes.math.factorization.budget_cost`
  (the squared relative output error) of each layer. The error is measured under the
  calibration second moment when there is one (``E[x x^T]``, or ``E[x^2]`` per channel), else
  it is the weight's Frobenius error; relative means over the layer's output energy.

A layer is factorised only when ``r (K + N) < K N`` (fewer parameters and fewer multiply-adds);
every layer left alone is counted in the statistics with the reason. The original MatMul node
stays as the second factor (its output, and the bias ``Add`` after it, are unchanged); a new
MatMul computes the rank-``r`` intermediate. Leading dimensions (batch, sequence) are untouched,
so dynamic shapes keep working. Factor weights are named ``<weight>.svd_a`` and ``<weight>.svd_b``
so that later passes can tell them apart: ``quantize`` sees both MatMuls as linears, and
``quantize{exclude=.svd_b}`` keeps the rank-``r`` intermediate (and the second product) in float.

A weight shared by several linears (exporters merge identical initializers) is factorised once;
with ``method=activation`` its second moment is the token-weighted mean of its readers'.
Factor nodes carry ``tforge.factor`` metadata, so a second run leaves them alone and counts the
parameters they already removed against ``ratio``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from tforge.compiler.calibration import attached_stats
from tforge.compiler.factoring import (
    WeightGroup,
    already_removed,
    check_common_options,
    check_second_moments,
    eligible_groups,
    lower_low_rank,
    scope_inputs,
)
from tforge.compiler.pass_infra import Pass, PassResult, Property, SiteStats
from tforge.compiler.registry import register_pass
from tforge.compiler.rewrite import GraphEditor
from tforge.errors import PassConfigError
from tforge.passes.math import factorization as fz

logger = logging.getLogger(__name__)

__all__ = ["Svd"]

# ----------------------------------------------------------------------------- the pass


@register_pass("svd")
@dataclasses.dataclass(frozen=True)
class Svd(Pass):
    """Factorise linears as (x @ A) @ B by truncated SVD, plain or activation-aware; rank by rank, energy or global ratio."""

    rank: int | None = None
    ratio: float | None = None  # fraction of the parameters of the linears in scope to remove
    energy: float | None = None  # per layer, fraction of the output energy to keep
    # auto: activation-aware where calibrate collected E[x x^T] of the input, else plain
    method: Literal["plain", "activation", "auto"] = "auto"
    multiple: int = 8  # ranks chosen by ratio or energy are multiples of this
    exclude: tuple[str, ...] = ()  # weight names, or substrings of them, to leave alone
    blocks_only: bool = True  # only the linears of recognised attention blocks and FFNs
    ridge: float = fz.DEFAULT_RIDGE  # relative ridge on E[x x^T] before its Cholesky factor
    # activation-aware: whiten by the covariance and fold the mean's error into the bias
    center: bool = True

    requires: ClassVar = frozenset({Property.CANONICAL})
    # Outputs of factorised linears move, and so do activations after them.
    invalidates: ClassVar = frozenset({Property.CALIBRATED})

    def __post_init__(self) -> None:
        given = [k for k in ("rank", "ratio", "energy") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PassConfigError(
                f"svd: give exactly one of rank=, ratio= or energy= (got {', '.join(given) or 'none'})"
            )
        if self.rank is not None and self.rank < 1:
            raise PassConfigError(f"svd: rank must be at least 1, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy < 1.0:
            raise PassConfigError(f"svd: energy must be in (0, 1), got {self.energy}")
        if self.multiple < 1:
            raise PassConfigError(f"svd: multiple must be at least 1, got {self.multiple}")
        if not self.ridge > 0.0:
            raise PassConfigError(f"svd: ridge must be > 0, got {self.ridge}")
        check_common_options("svd", self.ratio, self.exclude, self.method, ("plain", "activation", "auto"))

    def check(self, model: ir.Model) -> None:
        check_second_moments(model, self.name, self.method)

    def gram_wanted(self, model: ir.Model) -> set[str]:
        # activation-aware factors need them; plain ones measure their errors (the budget) by them
        return scope_inputs(model, exclude=self.exclude, blocks_only=self.blocks_only)

    def run(self, model: ir.Model) -> PassResult:
        stats = SiteStats()
        groups, total = eligible_groups(
            model, self.name, exclude=self.exclude, blocks_only=self.blocks_only, stats=stats
        )
        calibration = attached_stats(model)
        spectra: list[tuple[WeightGroup, fz.LowRankSpectrum]] = []
        methods: dict[int, str] = {}
        centered: set[int] = set()
        for group in groups:
            moment = group.second_moment(calibration, full=True)
            if moment is None:
                moment = group.second_moment(calibration, full=False)  # errors by E[x^2] only
            if self.method == "activation" and (moment is None or moment.ndim != 2):
                stats.skip("no E[x x^T] for its input (calibrate with gram=true)", group.weight, count=len(group.linears))
                continue
            method = self.method
            if method == "auto":  # activation-aware where the Gram matrix is there
                method = "activation" if moment is not None and moment.ndim == 2 else "plain"
            methods[id(group)] = method
            w = group.array()
            mean = group.mean(calibration) if self.center and method == "activation" else None
            if mean is not None and moment is not None:
                # E||x dW||^2 = tr(dW^T C dW) + ||mean dW||^2: truncate for the covariance C and
                # remove the mean's part exactly through the bias (below); errors stay relative
                # to the whole output energy
                spectrum = fz.low_rank_spectrum(w, method, moment - np.outer(mean, mean), ridge=self.ridge)
                spectrum = dataclasses.replace(spectrum, energy=fz.output_energy(w, moment))
                centered.add(id(group))
            else:
                spectrum = fz.low_rank_spectrum(w, method, moment, ridge=self.ridge)
            spectra.append((group, spectrum))
        ranks = self._choose_ranks(model, spectra, total, stats)

        editor = GraphEditor(model, self.name)
        rows: list[dict[str, Any]] = []
        removed = 0
        for (group, spectrum), rank in zip(spectra, ranks, strict=True):
            if rank is None:
                continue
            a, b = spectrum.factors(rank)
            k, n = group.shape
            # read before the lowering: each MatMul then reads the rank-r intermediate instead
            shifts = (
                [(lin, group.input_mean(calibration, lin)) for lin in group.linears]
                if id(group) in centered
                else []
            )
            residual = group.array() - a @ b if shifts else None
            lower_low_rank(editor, group, a, b)
            for lin, mu in shifts:
                if mu is not None and residual is not None:
                    editor.add_to_bias(lin, mu @ residual)
            after = fz.low_rank_params(k, n, rank)
            removed += group.params - after
            stats["factorised"] += len(group.linears)
            rows.append(
                {
                    "weight": group.name,
                    "linears": [lin.matmul.name for lin in group.linears],
                    "shape": [k, n],
                    "rank": rank,
                    "method": methods[id(group)] + (" (centered)" if id(group) in centered else ""),
                    "params_before": group.params,
                    "params_after": after,
                    "relative_output_error": spectrum.relative_error(rank),
                    "error_measured_on": "calibration" if spectrum.weighted else "weights",
                }
            )
            logger.debug(
                "svd: %s [%d, %d] -> rank %d, %d -> %d parameters, relative output error %.3g",
                group.name, k, n, rank, group.params, after, spectrum.relative_error(rank),
            )  # fmt: skip
        if rows:
            logger.info(
                "svd: %d weights factorised, %d of %d linear parameters removed (%.1f%%)",
                len(rows), removed, total, 100.0 * removed / max(total, 1),
            )  # fmt: skip
        removed_all = already_removed(model)  # this run's and earlier runs'
        details = {
            "layers": rows,
            "linear_params": total,
            "removed_params": removed_all,
            "reduction": removed_all / total if total else 0.0,
        }
        return PassResult(model, changed=bool(rows), stats=stats, details=details)

    def _choose_ranks(
        self,
        model: ir.Model,
        spectra: list[tuple[WeightGroup, fz.LowRankSpectrum]],
        total: int,
        stats: SiteStats,
    ) -> list[int | None]:
        """A rank per weight, or None (with the reason counted) to leave it alone."""
        ranks: list[int | None] = []
        if self.ratio is not None:
            return self._budget_ranks(model, spectra, total, stats)
        for group, spectrum in spectra:
            k, n = group.shape
            limit = fz.max_saving_rank(k, n)
            if self.rank is not None:
                rank = min(self.rank, spectrum.full_rank)
                why = f"rank {rank} saves no parameters (needs rank <= {limit})"
            else:
                rank = _round_up(spectrum.rank_for_energy(self.energy or 1.0), self.multiple)
                rank = min(rank, spectrum.full_rank)
                why = f"energy needs rank {rank}, which saves no parameters (needs rank <= {limit})"
            if rank > limit:
                stats.skip(_reason_key(why), group.weight, count=len(group.linears))
                logger.debug("svd: %s [%d, %d] skipped: %s", group.name, k, n, why)
                ranks.append(None)
            else:
                ranks.append(rank)
        return ranks

    def _budget_ranks(
        self,
        model: ir.Model,
        spectra: list[tuple[WeightGroup, fz.LowRankSpectrum]],
        total: int,
        stats: SiteStats,
    ) -> list[int | None]:
        curves: list[list[tuple[int, float]]] = []
        options: list[list[int | None]] = []
        for group, spectrum in spectra:
            k, n = group.shape
            limit = fz.max_saving_rank(k, n)
            candidates = list(range(self.multiple, min(limit, spectrum.full_rank) + 1, self.multiple))
            curves.append(
                [(0, 0.0)]
                + [
                    (group.params - fz.low_rank_params(k, n, r), fz.budget_cost(spectrum.relative_error(r)))
                    for r in candidates
                ]
            )
            options.append([None, *candidates])
        target = int(np.ceil((self.ratio or 0.0) * total)) - already_removed(model)
        chosen = fz.allocate_budget(curves, target)
        ranks: list[int | None] = []
        for (group, _), opts, choice in zip(spectra, options, chosen, strict=True):
            if len(opts) == 1:
                stats.skip(f"no rank that is a multiple of {self.multiple} saves parameters", group.weight, count=len(group.linears))
                ranks.append(None)
            elif choice == 0:
                stats.skip("budget met on other layers", group.weight, count=len(group.linears), blocked=False)
                ranks.append(None)
            else:
                ranks.append(opts[choice])
        return ranks


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _reason_key(why: str) -> str:
    """The reason without its numbers, so that the statistics group layers by cause."""
    if why.startswith("rank"):
        return "rank saves no parameters"
    return "rank for the energy saves no parameters"
