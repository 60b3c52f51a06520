"""kronecker: replace a linear's weight by a sum of Kronecker products, lowered to standard ops.

``W [K, N] ~ sum_{i<r} A_i (x) B_i`` with ``A_i [m1, n1]``, ``B_i [m2, n2]``, ``K = m1 m2``,
``N = n1 n2`` (Van Loan-Pitsianis, :mod:`tforge.passes.math.factorization`). With ``x`` viewed
as ``X [..., m1, m2]``, ``x @ (A (x) B) = vec(A^T X B)``, which is computed as

    Reshape x [..., m1, m2] -> Transpose [..., m2, m1] -> MatMul A_cat [m1, r n1]
    -> Reshape [..., m2, r, n1] -> Transpose [..., n1, r, m2] -> Reshape [..., n1, r m2]
    -> MatMul B_stack [r m2, n2] -> Reshape [..., n1 n2]

(``A_cat`` holds the ``A_i`` side by side, ``B_stack`` the ``B_i`` stacked; with one term the
middle Reshapes go). Reshapes copy the leading dimensions with 0 entries, so dynamic batch and
sequence dimensions keep working. Both MatMuls have a constant 2-D weight and a flattened
leading part, so ONNX Runtime runs each as one GEMM. Multiply-adds per row are
``r (K n1 + n1 m2 n2)``, i.e. ``r (1/n2 + 1/m1)`` times the dense layer's: a sum of many terms can
cost more time than the one GEMM it replaces even while it saves parameters; the pass reports
this ratio for every layer and ``tools/bench.py --section factor`` measures the latency.

Terms and shapes: ``terms=R`` uses ``R`` terms per layer with the given ``factors`` or the most
parameter-efficient shape; ``ratio=F`` spends a global budget of ``F`` of the linear parameters
in scope where the error per removed parameter is least (as ``svd`` does), over every term
count of the ``shapes`` most efficient factor shapes (``factors=auto``, see
:func:`~tforge.passes.math.factorization.auto_kronecker_shapes`) or of the given one. A layer
is rewritten only when the factors have fewer parameters than ``W`` and the lowering costs at
most ``max-macs`` times the dense layer's multiply-adds (default 1: never more work than the
GEMM it replaces; without that bound a 25% parameter cut on MiniLM chose sums costing 5-9x
the dense multiply-adds, and the intermediates took over 20 GB in ORT).

``method=activation`` whitens by the nearest Kronecker product to the input's second moment,
``S ~ S1 (x) S2`` (exact when ``S`` has that structure, an approximation otherwise; see the
math module). With calibration statistics, both methods weigh their options by the output
error under the measured ``S`` (computed exactly at a few term counts per shape and
interpolated between), and each layer's details give that error (with ``method=activation``
also the plain factors' error at the same shape and terms, for comparison).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from tforge.compiler.calibration import attached_stats
from tforge.compiler.factoring import (
    FACTOR_KEY,
    PARAMS_AFTER_KEY,
    PARAMS_BEFORE_KEY,
    WeightGroup,
    already_removed,
    check_common_options,
    check_second_moments,
    eligible_groups,
    scope_inputs,
)
from tforge.compiler.pass_infra import Pass, PassResult, Property, SiteStats
from tforge.compiler.registry import register_pass
from tforge.compiler.rewrite import GraphEditor
from tforge.errors import PassConfigError
from tforge.passes.math import factorization as fz

logger = logging.getLogger(__name__)

__all__ = ["Kronecker", "lower_kronecker", "macs_ratio"]

# Term counts per factor shape at which the output error is measured exactly (and interpolated
# between) when a layer's budget options are weighed.
_ERROR_GRID = 6


def macs_ratio(shape: fz.KroneckerShape, terms: int) -> float:
    """Multiply-adds of the lowered sum of ``terms`` products over those of the dense layer."""
    return terms * (1.0 / shape.n2 + 1.0 / shape.m1)


@dataclasses.dataclass
class _Candidate:
    group: WeightGroup
    spectra: list[fz.KroneckerSpectrum]
    moment: np.ndarray | None


@register_pass("kronecker")
@dataclasses.dataclass(frozen=True)
class Kronecker(Pass):
    """Approximate linears by sums of Kronecker products (Van Loan-Pitsianis) lowered to Reshape/Transpose/MatMul."""

    factors: str = "auto"  # or "m1xn1,m2xn2", the shapes of A_i and B_i
    terms: int | None = None
    ratio: float | None = None  # fraction of the parameters of the linears in scope to remove
    method: Literal["plain", "activation"] = "plain"
    shapes: int = 2  # factors=auto with ratio: how many of the most efficient shapes to try
    # Largest multiply-add count of a lowered layer, relative to the dense layer: more terms
    # than this allows are never chosen (a sum of many products is slower than one GEMM).
    max_macs: float = 1.0
    exclude: tuple[str, ...] = ()
    blocks_only: bool = True
    ridge: float = fz.DEFAULT_RIDGE

    requires: ClassVar = frozenset({Property.CANONICAL})
    invalidates: ClassVar = frozenset({Property.CALIBRATED})

    def __post_init__(self) -> None:
        if (self.terms is None) == (self.ratio is None):
            raise PassConfigError("kronecker: give exactly one of terms= or ratio=")
        if self.terms is not None and self.terms < 1:
            raise PassConfigError(f"kronecker: terms must be at least 1, got {self.terms}")
        if self.factors != "auto":
            try:
                fz.parse_kronecker_shape(self.factors)
            except ValueError as error:
                raise PassConfigError(f"kronecker: {error}") from None
        if not self.max_macs > 0.0:
            raise PassConfigError(f"kronecker: max-macs must be > 0, got {self.max_macs}")
        if self.shapes < 1:
            raise PassConfigError(f"kronecker: shapes must be at least 1, got {self.shapes}")
        if not self.ridge > 0.0:
            raise PassConfigError(f"kronecker: ridge must be > 0, got {self.ridge}")
        check_common_options("kronecker", self.ratio, self.exclude, self.method)

    def check(self, model: ir.Model) -> None:
        check_second_moments(model, self.name, self.method)

    def gram_wanted(self, model: ir.Model) -> set[str]:
        # method=activation whitens by them; both methods weigh their budget options by them
        return scope_inputs(model, exclude=self.exclude, blocks_only=self.blocks_only)

    def run(self, model: ir.Model) -> PassResult:
        stats = SiteStats()
        groups, total = eligible_groups(
            model, self.name, exclude=self.exclude, blocks_only=self.blocks_only, stats=stats
        )
        calibration = attached_stats(model)
        candidates: list[_Candidate] = []
        whitenings: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}
        for group in groups:
            shapes = self._shapes(group)
            if not shapes:
                stats.skip("factors do not match the weight's shape", group.weight, count=len(group.linears))
                continue
            moment = group.second_moment(calibration, full=True)
            if self.method == "activation" and moment is None:
                stats.skip("no E[x x^T] for its input (calibrate with gram=true)", group.weight, count=len(group.linears))
                continue
            w = group.array()
            spectra = []
            for shape in shapes:
                whitening = None
                if self.method == "activation" and moment is not None:
                    # q, k and v read one input: its whitening is computed once per split
                    key = (tuple(lin.input.name for lin in group.linears), shape.m1, shape.m2)
                    if key not in whitenings:
                        whitenings[key] = fz.kronecker_whitening(moment, shape.m1, shape.m2, ridge=self.ridge)
                    whitening = whitenings[key]
                spectra.append(
                    fz.kronecker_spectrum(w, shape, self.method, moment, ridge=self.ridge, whitening=whitening)
                )
            candidates.append(_Candidate(group, spectra, moment))
        choices = (
            self._budget_choices(model, candidates, total, stats)
            if self.ratio is not None
            else self._fixed_choices(candidates, stats)
        )

        editor = GraphEditor(model, self.name)
        rows: list[dict[str, Any]] = []
        for cand, choice in zip(candidates, choices, strict=True):
            if choice is None:
                continue
            spectrum, terms = choice
            group = cand.group
            a, b = spectrum.factors(terms)
            lower_kronecker(editor, group, a, b)
            stats["factorised"] += len(group.linears)
            rows.append(self._row(cand, spectrum, terms, a, b))
        removed_all = already_removed(model)
        if rows:
            logger.info(
                "kronecker: %d weights factorised, %d of %d linear parameters removed in all (%.1f%%)",
                len(rows), removed_all, total, 100.0 * removed_all / max(total, 1),
            )  # fmt: skip
        details = {
            "layers": rows,
            "linear_params": total,
            "removed_params": removed_all,
            "reduction": removed_all / total if total else 0.0,
        }
        return PassResult(model, changed=bool(rows), stats=stats, details=details)

    # ------------------------------------------------------------------ choices

    def _shapes(self, group: WeightGroup) -> list[fz.KroneckerShape]:
        k, n = group.shape
        if self.factors != "auto":
            shape = fz.parse_kronecker_shape(self.factors)
            return [shape] if (shape.k, shape.n) == (k, n) else []
        limit = 1 if self.terms is not None else self.shapes
        return fz.auto_kronecker_shapes(k, n, limit, self.max_macs)

    def _fixed_choices(
        self, candidates: list[_Candidate], stats: SiteStats
    ) -> list[tuple[fz.KroneckerSpectrum, int] | None]:
        out: list[tuple[fz.KroneckerSpectrum, int] | None] = []
        for cand in candidates:
            spectrum = cand.spectra[0]
            terms = min(self.terms or 1, spectrum.max_terms)
            if macs_ratio(spectrum.shape, terms) > self.max_macs:
                stats.skip("that many terms exceed max-macs", cand.group.weight, count=len(cand.group.linears))
                out.append(None)
            elif not fz.kronecker_saves(spectrum.shape, terms):
                stats.skip("that many terms save no parameters", cand.group.weight, count=len(cand.group.linears))
                logger.debug(
                    "kronecker: %s skipped: %d terms of %s have %d >= %d parameters",
                    cand.group.name, terms, spectrum.shape,
                    fz.kronecker_params(spectrum.shape, terms), cand.group.params,
                )  # fmt: skip
                out.append(None)
            else:
                out.append((spectrum, terms))
        return out

    def _budget_choices(
        self, model: ir.Model, candidates: list[_Candidate], total: int, stats: SiteStats
    ) -> list[tuple[fz.KroneckerSpectrum, int] | None]:
        curves: list[list[tuple[int, float]]] = []
        options: list[list[tuple[fz.KroneckerSpectrum, int] | None]] = []
        for cand in candidates:
            curve: list[tuple[int, float]] = [(0, 0.0)]
            opts: list[tuple[fz.KroneckerSpectrum, int] | None] = [None]
            for spectrum in cand.spectra:
                allowed = [
                    t
                    for t in range(1, spectrum.max_terms + 1)
                    if fz.kronecker_saves(spectrum.shape, t) and macs_ratio(spectrum.shape, t) <= self.max_macs
                ]
                for terms, error in zip(allowed, self._errors(cand, spectrum, allowed), strict=True):
                    removed = cand.group.params - fz.kronecker_params(spectrum.shape, terms)
                    curve.append((removed, fz.budget_cost(error)))
                    opts.append((spectrum, terms))
            curves.append(curve)
            options.append(opts)
        target = int(np.ceil((self.ratio or 0.0) * total)) - already_removed(model)
        chosen = fz.allocate_budget(curves, target)
        out: list[tuple[fz.KroneckerSpectrum, int] | None] = []
        for cand, opts, choice in zip(candidates, options, chosen, strict=True):
            if len(opts) == 1:
                stats.skip("no term count saves parameters within max-macs", cand.group.weight, count=len(cand.group.linears))
            elif choice == 0:
                stats.skip("budget met on other layers", cand.group.weight, count=len(cand.group.linears), blocked=False)
            out.append(opts[choice])
        return out

    @staticmethod
    def _errors(cand: _Candidate, spectrum: fz.KroneckerSpectrum, terms: list[int]) -> np.ndarray:
        """Relative output error of each term count: under the measured second moment when there
        is one (exact at a few counts, interpolated between), else the Frobenius error."""
        if not terms:
            return np.zeros(0)
        if cand.moment is None:
            return np.array([spectrum.relative_error(t) for t in terms])
        grid = sorted({int(round(t)) for t in np.linspace(terms[0], terms[-1], _ERROR_GRID)})
        measured = spectrum.measured_relative_errors(cand.group.array(), cand.moment, grid)
        return np.interp(terms, grid, measured)

    def _row(
        self, cand: _Candidate, spectrum: fz.KroneckerSpectrum, terms: int, a: np.ndarray, b: np.ndarray
    ) -> dict[str, Any]:
        group = cand.group
        w = group.array()
        approx = fz.kronecker_sum(a, b)
        energy = fz.output_energy(w, cand.moment)
        row: dict[str, Any] = {
            "weight": group.name,
            "linears": [lin.matmul.name for lin in group.linears],
            "shape": list(group.shape),
            "factors": str(spectrum.shape),
            "terms": terms,
            "params_before": group.params,
            "params_after": fz.kronecker_params(spectrum.shape, terms),
            "macs_ratio": macs_ratio(spectrum.shape, terms),
            "relative_output_error": fz.output_error(w, approx, cand.moment) / energy if energy > 0 else 0.0,
            "error_measured_on": "calibration" if cand.moment is not None else "weights",
        }
        if self.method == "activation":
            plain = fz.kronecker_spectrum(w, spectrum.shape, "plain")
            pa, pb = plain.factors(terms)
            row["plain_relative_output_error"] = (
                fz.output_error(w, fz.kronecker_sum(pa, pb), cand.moment) / energy if energy > 0 else 0.0
            )
        return row


# ----------------------------------------------------------------------------- lowering


def lower_kronecker(editor: GraphEditor, group: WeightGroup, a: np.ndarray, b: np.ndarray) -> None:
    """Rewrite every linear of ``group`` as ``x @ sum_i a[i] (x) b[i]`` (see the module docstring).

    ``a`` is ``[r, m1, n1]`` and ``b`` ``[r, m2, n2]``; the weight goes when nothing else reads it.
    """
    k, n = group.shape
    terms, m1, n1 = a.shape
    _, m2, n2 = b.shape
    if b.shape[0] != terms or m1 * m2 != k or n1 * n2 != n:
        raise ValueError(f"lower_kronecker: factors {a.shape} and {b.shape} do not make [{k}, {n}]")
    dtype = group.weight.dtype.numpy() if group.weight.dtype is not None else np.dtype(np.float32)
    name = editor.pass_name
    base = group.weight.name or "weight"
    a_cat = a.transpose(1, 0, 2).reshape(m1, terms * n1)  # [i1, t n1 + j1] = a[t, i1, j1]
    b_stack = b.reshape(terms * m2, n2)  # [t m2 + i2, j2] = b[t, i2, j2]
    a_value = editor.initializer(f"{base}.{name}_a", a_cat.astype(dtype))
    b_value = editor.initializer(f"{base}.{name}_b", b_stack.astype(dtype))
    for i, lin in enumerate(group.linears):
        x = lin.input
        lead = list(x.shape)[:-1]  # type: ignore[arg-type]
        nlead = len(lead)
        build = _Chain(editor, lin.matmul, x.type)
        h = build.reshape("split", x, lead, [m1, m2])
        h = build.op("swap", "Transpose", [h], lead + [m2, m1], perm=[*range(nlead), nlead + 1, nlead])
        h = build.op("a", "MatMul", [h, a_value], lead + [m2, terms * n1])
        first = h.producer()
        if terms > 1:
            h = build.reshape("terms", h, lead, [m2, terms, n1])
            perm = [*range(nlead), nlead + 2, nlead + 1, nlead]
            h = build.op("regroup", "Transpose", [h], lead + [n1, terms, m2], perm=perm)
            h = build.reshape("stack", h, lead, [n1, terms * m2])
        else:
            h = build.op("regroup", "Transpose", [h], lead + [n1, m2], perm=[*range(nlead), nlead + 1, nlead])
        h = build.op("b", "MatMul", [h, b_value], lead + [n1, n2])
        out = build.reshape("merge", h, lead, [n])
        if i == 0 and first is not None:
            first.metadata_props[PARAMS_BEFORE_KEY] = str(k * n)
            first.metadata_props[PARAMS_AFTER_KEY] = str(a.size + b.size)
        editor.replace_value(lin.matmul.outputs[0], out)
        editor.remove(lin.matmul)
    editor.drop_if_unused(group.weight)


class _Chain:
    """Nodes inserted one after another before ``anchor`` (the MatMul they replace), named after it."""

    def __init__(self, editor: GraphEditor, anchor: ir.Node, type_: ir.TypeProtocol | None) -> None:
        self.editor = editor
        self.anchor = anchor
        self.type = type_
        pass_name = editor.pass_name
        self.node_base = f"{anchor.name or 'matmul'}.{pass_name}"
        self.value_base = f"{anchor.outputs[0].name or anchor.name or 'matmul'}.{pass_name}"

    def op(self, step: str, op_type: str, inputs: list[ir.Value], dims: list[Any], **attributes: Any) -> ir.Value:
        node = self.editor.node(
            op_type, inputs, attributes=attributes or None, name=f"{self.node_base}_{step}",
            outputs=f"{self.value_base}_{step}", before=self.anchor, shape=dims,
        )  # fmt: skip
        node.metadata_props[FACTOR_KEY] = self.editor.pass_name
        value = node.outputs[0]
        value.type = self.type
        return value

    def reshape(self, step: str, x: ir.Value, lead: list[Any], tail: list[int]) -> ir.Value:
        """Reshape keeping the leading dims (0 = copy the input's dim) and setting the last ones."""
        target = np.array([0] * len(lead) + tail, dtype=np.int64)
        const = self.editor.initializer(f"{self.value_base}_{step}_shape", target)
        return self.op(step, "Reshape", [x, const], lead + tail)


