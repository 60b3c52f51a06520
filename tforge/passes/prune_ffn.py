"""prune-ffn: remove FFN intermediate channels (up and gate columns with the matching down rows).

``down(act(gate(x)) * up(x))`` is computed channel by channel up to ``down``: channel ``j`` of
the intermediate activation reads only column ``j`` of up and gate and feeds only row ``j`` of
down. Removing it removes those three slices and nothing else changes shape, so the only
constants to rewrite are the weights and biases (and a per-channel constant on the way, if any).

Which channels go is decided by :mod:`tforge.passes.math.importance` (``magnitude`` of the
weights, or the ``activation``-aware expected output energy from calibration statistics); how
many per layer by ``ratio`` or ``keep``, rounded to a multiple of ``multiple`` for kernel
efficiency, spread ``uniform``ly or by a ``global`` ranking. ``compensate`` then repairs down's
output from the statistics of its input (:mod:`tforge.passes.math.compensation`): the removed
channels' mean goes into down's bias, and with a Gram matrix (``calibrate{gram=true}``) and
``refit`` the kept rows of down are refitted by least squares.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from tforge.compiler import pruning
from tforge.compiler.ffn_paths import ffn_intermediate
from tforge.compiler.pass_infra import Pass, PassResult, Property, SiteStats, Skip
from tforge.compiler.registry import register_pass
from tforge.compiler.rewrite import GraphEditor, set_last_dim
from tforge.compiler.structure import FFN, BlockMap, block_map, const_array
from tforge.errors import PassConfigError
from tforge.passes.math import compensation
from tforge.passes.math import importance as imp

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Site:
    """One FFN and what pruning it touches."""

    index: int  # block index
    ffn: FFN
    nodes: list[ir.Node]  # between up/gate and down
    constants: list[tuple[ir.Node, int]]  # per-channel constant operands on the way
    scores: np.ndarray
    order: np.ndarray | None = None  # importance=obs: channels in greedy removal order


@register_pass("prune-ffn")
@dataclasses.dataclass(frozen=True)
class PruneFfn(Pass):
    """Remove FFN intermediate channels: up/gate columns and down rows, with optional compensation.

    ``ratio`` (fraction removed per layer, or overall with ``budget=global``) or ``keep``
    (channels kept per layer); ratios are rounded to ``multiple``. ``importance``: ``magnitude``
    (weight norms), ``activation`` (expected output energy through down) or ``obs`` (greedy
    removal of the channel whose loss after refitting the rest is smallest, from the Gram
    matrix). ``compensate`` folds the removed channels' mean into down's bias and, with
    ``refit`` and a Gram matrix (which ``calibrate`` collects for this pass by itself), refits
down's kept rows. Everything
    but ``magnitude`` reads the statistics of ``calibrate``; they are dropped afterwards (every
    later activation changes).
    """

    ratio: float | None = None
    keep: int | None = None
    multiple: int = 32
    importance: pruning.Importance = "activation"
    budget: pruning.Budget = "uniform"
    max_layer_ratio: float = 0.9
    compensate: bool = True
    refit: bool = True
    ridge: float = 0.1  # refit regularisation, relative to the mean input energy E[x_c^2]

    requires: ClassVar = frozenset({Property.CANONICAL})
    invalidates: ClassVar = frozenset({Property.CALIBRATED})

    def __post_init__(self) -> None:
        pruning.check_amount("prune-ffn", self.ratio, self.keep)
        pruning.check_common("prune-ffn", self.max_layer_ratio, self.ridge)
        if self.multiple < 1:
            raise PassConfigError(f"prune-ffn: multiple must be >= 1, got {self.multiple}")
        if self.keep == 0:
            raise PassConfigError("prune-ffn: keep must be at least 1; removing a whole FFN is not supported")

    def check(self, model: ir.Model) -> None:
        pruning.require_stats(model, self.name, self.importance)

    def gram_wanted(self, model: ir.Model) -> set[str]:
        """The down projections' inputs: refits and importance=obs read their Gram matrices."""
        if not (self.importance == "obs" or (self.compensate and self.refit)):
            return set()
        return {b.ffn.down.input.name for b in block_map(model).blocks if b.ffn is not None and b.ffn.down.input.name}

    def run(self, model: ir.Model) -> PassResult:
        stats = SiteStats()
        blocks = block_map(model)
        before = pruning.size_figures(model, blocks)
        sites: list[_Site] = []
        for block in blocks.blocks:
            if block.ffn is None:
                continue
            try:
                sites.append(self._site(model, blocks, block.index, block.ffn))
            except Skip as skip:
                stats.skip(skip)
                logger.debug("prune-ffn: block %d: skipped: %s", block.index, skip)

        sizes = [s.ffn.intermediate_size for s in sites]
        snap = lambda i, target: imp.round_to_multiple(target, sizes[i], self.multiple)  # noqa: E731
        if self.importance == "obs" and self.budget == "uniform" or self.keep is not None:
            counts = imp.kept_counts(
                sizes, [], ratio=self.ratio, keep=self.keep, budget="uniform",
                max_layer_ratio=self.max_layer_ratio, snap=snap,
            )
            if self.importance == "obs":
                for site, keep in zip(sites, counts, strict=True):
                    self._obs_order(model, site, site.ffn.intermediate_size - keep)
        else:
            if self.importance == "obs":
                for site in sites:
                    cap = int(self.max_layer_ratio * site.ffn.intermediate_size + 1e-9)
                    self._obs_order(model, site, cap)
            counts = imp.kept_counts(
                sizes, [s.scores for s in sites], ratio=self.ratio, keep=self.keep,
                budget=self.budget, max_layer_ratio=self.max_layer_ratio, snap=snap,
                normalize=self.importance != "obs",
            )
        editor = GraphEditor(model, self.name)
        rows: list[dict[str, Any]] = []
        for site, keep in zip(sites, counts, strict=True):
            size = site.ffn.intermediate_size
            if keep >= size:
                stats.skip("nothing to remove", site.ffn.down.matmul, blocked=False)
                rows.append({"layer": site.index, "before": size, "after": size})
                continue
            if site.order is not None:
                kept = np.setdiff1d(np.arange(size), site.order[: size - keep])
            else:
                kept = imp.select_channels(site.scores, keep)
            done = self._prune(model, editor, site, kept)
            stats["pruned"] += 1
            stats[f"compensation: {done.kind}"] += 1
            if done.reason:
                stats[f"compensation weaker than asked: {done.reason}"] += 1
            rows.append(
                {
                    "layer": site.index,
                    "down": site.ffn.down.name,
                    "before": size,
                    "after": int(keep),
                    "compensation": done.kind,
                }
            )
            logger.debug(
                "prune-ffn: block %d: %d -> %d channels (%s importance), compensation %s",
                site.index, size, keep, self.importance, done.kind,
            )
        changed = stats["pruned"] > 0  # Pass.__call__ then drops the now stale statistics
        after = pruning.size_figures(model, block_map(model)) if changed else before
        details = {"layers": rows, "size": pruning.compare_sizes(before, after)}
        return PassResult(model, changed=changed, stats=stats, details=details)

    # ------------------------------------------------------------------ analysis

    def _site(self, model: ir.Model, blocks: BlockMap, index: int, ffn: FFN) -> _Site:
        width = ffn.intermediate_size
        path = ffn_intermediate(ffn, blocks)  # first: it names a fused gate+up linear
        if ffn.down.in_features != width or (ffn.gate is not None and ffn.gate.out_features != width):
            raise Skip("up, gate and down widths disagree", ffn.down.matmul)
        if path.reshapes:
            # their targets would need the new width; channel-wise ops adapt by themselves
            raise Skip("Reshape between up and down", path.reshapes[0])
        scores = self._scores(model, ffn)
        return _Site(index, ffn, path.nodes, path.channel_constants, scores)

    def _scores(self, model: ir.Model, ffn: FFN) -> np.ndarray:
        down = pruning.weight_of(ffn.down)
        if self.importance == "magnitude":
            up = pruning.weight_of(ffn.up)
            gate = pruning.weight_of(ffn.gate) if ffn.gate is not None else None
            return imp.ffn_magnitude(up, down, gate)
        act = pruning.input_stats(model, ffn.down.input)
        at = ffn.down.matmul
        if act is None or act.count == 0:
            raise Skip("no calibration statistics of the down projection's input", at)
        if act.channels != down.shape[0]:
            raise Skip("calibration statistics are stale (channel count differs)", at)
        if self.importance == "obs":
            if act.gram is None or act.sum is None:
                raise Skip("importance=obs needs a Gram matrix (calibrate with gram=true)", at)
            return np.zeros(down.shape[0])  # filled by _obs_order
        centered = self.compensate and act.sum is not None
        return imp.ffn_activation(down, act.mean_sq, act.mean if centered else None, centered=centered)

    def _obs_order(self, model: ir.Model, site: _Site, remove: int) -> None:
        """Greedy OBS removal order; scores rank removed channels by (monotone) normalised cost."""
        act = pruning.input_stats(model, site.ffn.down.input)
        down = pruning.weight_of(site.ffn.down).astype(np.float64)
        if act is None or remove <= 0:
            site.order = np.zeros(0, np.int64)
            return
        order, costs = compensation.greedy_removal(
            down, act.second_moment, act.mean, remove, ridge=self.ridge
        )
        site.order = order
        g = act.second_moment
        energy = max(float(np.einsum("ij,ij->", down, g @ down)), 1e-300)
        scores = np.full(down.shape[0], np.inf)
        scores[order] = np.maximum.accumulate(costs) / energy
        site.scores = scores

    # ------------------------------------------------------------------ rewrite

    def _prune(
        self, model: ir.Model, editor: GraphEditor, site: _Site, kept: np.ndarray
    ) -> pruning.Compensation:
        ffn = site.ffn
        width = ffn.intermediate_size
        moments = pruning.input_moments(model, ffn.down)
        editor.take_columns(ffn.up, kept)
        if ffn.gate is not None:
            editor.take_columns(ffn.gate, kept)
        for node, idx in site.constants:
            value = node.inputs[idx]
            arr = const_array(value)
            if value is not None and arr is not None:
                editor.set_constant(value, [(node, idx)], np.take(arr, kept, axis=-1))
        for node in site.nodes:
            for out in node.outputs:
                if out.shape is not None and out.shape.rank() and out.shape[-1] == width:
                    set_last_dim(out, int(kept.size))
        plan = compensation.compensate_rows(
            pruning.weight_of(ffn.down), kept, moments.mean, moments.second_moment,
            enabled=self.compensate, refit_rows=self.refit, ridge=self.ridge, missing=moments.missing,
        )  # fmt: skip
        return pruning.apply_row_compensation(
            editor, ffn.down, kept, plan.rows, plan.bias_delta, plan.kind, plan.reason
        )
