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
from collections import Counter, deque
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from tforge.compiler.pass_infra import Pass, PassResult, Property
from tforge.compiler.registry import register_pass
from tforge.compiler.structure import FFN, const_array, find_blocks
from tforge.passes import _pruning as pruning
from tforge.passes.ln_migrate import ConstantRewriter, current_weight
from tforge.passes.math import compensation
from tforge.passes.math import importance as imp

logger = logging.getLogger(__name__)

# Ops that may sit between up/gate and down: they act on each channel separately.
_CHANNELWISE = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Neg", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu",
        "Elu", "LeakyRelu", "HardSigmoid", "HardSwish", "Softplus", "Exp", "Cast", "Identity",
        "Clip", "Where", "Min", "Max", "Abs", "Reciprocal", "Silu", "Mish", "QuickGelu",
    }
)  # fmt: skip


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
    ``refit`` and a Gram matrix (``calibrate{gram=true}``), refits down's kept rows. Everything
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
            raise ValueError(f"prune-ffn: multiple must be >= 1, got {self.multiple}")
        if self.keep == 0:
            raise ValueError("prune-ffn: keep must be at least 1; removing a whole FFN is not supported")

    def check(self, model: ir.Model) -> None:
        pruning.require_stats(model, self.name, self.importance)

    def run(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        block_map = find_blocks(model)
        before = pruning.size_figures(model, block_map)
        sites: list[_Site] = []
        for block in block_map.blocks:
            if block.ffn is None:
                continue
            found = self._site(model, block.index, block.ffn)
            if isinstance(found, str):
                stats[found] += 1
                logger.debug("prune-ffn: block %d: %s", block.index, found)
                continue
            sites.append(found)

        sizes = [s.ffn.intermediate_size for s in sites]
        snap = lambda i, target: imp.round_to_multiple(target, sizes[i], self.multiple)  # noqa: E731
        if self.importance == "obs" and self.budget == "uniform" or self.keep is not None:
            counts = pruning.kept_counts(
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
            counts = pruning.kept_counts(
                sizes, [s.scores for s in sites], ratio=self.ratio, keep=self.keep,
                budget=self.budget, max_layer_ratio=self.max_layer_ratio, snap=snap,
                normalize=self.importance != "obs",
            )
        rewriter = ConstantRewriter(model, self.name)
        rows: list[dict[str, Any]] = []
        for site, keep in zip(sites, counts, strict=True):
            size = site.ffn.intermediate_size
            if keep >= size:
                stats["skipped: nothing to remove"] += 1
                rows.append({"layer": site.index, "before": size, "after": size})
                continue
            if site.order is not None:
                kept = np.setdiff1d(np.arange(size), site.order[: size - keep])
            else:
                kept = imp.select_channels(site.scores, keep)
            done = self._prune(model, rewriter, site, kept)
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
        after = pruning.size_figures(model, find_blocks(model)) if changed else before
        details = {"layers": rows, "size": pruning.compare_sizes(before, after)}
        return PassResult(model, changed=changed, stats=stats, details=details)

    # ------------------------------------------------------------------ analysis

    def _site(self, model: ir.Model, index: int, ffn: FFN) -> _Site | str:
        width = ffn.intermediate_size
        if ffn.down.in_features != width or (ffn.gate is not None and ffn.gate.out_features != width):
            return "skipped: up, gate and down widths disagree"
        found = _intermediate_nodes(ffn)
        if isinstance(found, str):
            return found
        nodes, constants = found
        scores = self._scores(model, ffn)
        if isinstance(scores, str):
            return scores
        return _Site(index, ffn, nodes, constants, scores)

    def _scores(self, model: ir.Model, ffn: FFN) -> np.ndarray | str:
        down = pruning.array(current_weight(ffn.down))
        if self.importance == "magnitude":
            up = pruning.array(current_weight(ffn.up))
            gate = pruning.array(current_weight(ffn.gate)) if ffn.gate is not None else None
            return imp.ffn_magnitude(up, down, gate)
        act = pruning.input_stats(model, ffn.down.input)
        if act is None or act.count == 0:
            return "skipped: no calibration statistics of the down projection's input"
        if act.channels != down.shape[0]:
            return "skipped: calibration statistics are stale (channel count differs)"
        if self.importance == "obs":
            if act.gram is None or act.sum is None:
                return "skipped: importance=obs needs a Gram matrix (calibrate with gram=true)"
            return np.zeros(down.shape[0])  # filled by _obs_order
        centered = self.compensate and act.sum is not None
        return imp.ffn_activation(down, act.mean_sq, act.mean if centered else None, centered=centered)

    def _obs_order(self, model: ir.Model, site: _Site, remove: int) -> None:
        """Greedy OBS removal order; scores rank removed channels by (monotone) normalised cost."""
        act = pruning.input_stats(model, site.ffn.down.input)
        down = pruning.array(current_weight(site.ffn.down)).astype(np.float64)
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
        self, model: ir.Model, rewriter: ConstantRewriter, site: _Site, kept: np.ndarray
    ) -> pruning.Compensation:
        ffn = site.ffn
        width = ffn.intermediate_size
        act = pruning.input_stats(model, ffn.down.input)
        pruning.take_columns(rewriter, ffn.up, kept)
        if ffn.gate is not None:
            pruning.take_columns(rewriter, ffn.gate, kept)
        for node, idx in site.constants:
            value = node.inputs[idx]
            arr = const_array(value)
            if value is not None and arr is not None:
                rewriter.set_constant(value, [(node, idx)], np.take(arr, kept, axis=-1))
        for node in site.nodes:
            for out in node.outputs:
                if out.shape is not None and out.shape.rank() and out.shape[-1] == width:
                    pruning.set_dim(out, -1, int(kept.size))
        return pruning.compensate_rows(
            rewriter, ffn.down, kept, act, enabled=self.compensate, refit=self.refit, ridge=self.ridge
        )


def _intermediate_nodes(ffn: FFN) -> tuple[list[ir.Node], list[tuple[ir.Node, int]]] | str:
    """Nodes between up/gate and down, and per-channel constants they read; or why not prunable.

    Every node must act channel by channel, and nothing outside the FFN may read its values
    (their width changes).
    """
    sources = {id(ffn.up.output)}
    if ffn.gate is not None:
        sources.add(id(ffn.gate.output))
    width = ffn.intermediate_size
    nodes: dict[int, ir.Node] = {}
    constants: list[tuple[ir.Node, int]] = []
    queue = deque([ffn.down.input])
    seen: set[int] = set()
    while queue:
        value = queue.popleft()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if id(value) in sources:
            continue
        node = value.producer()
        if node is None:
            return f"skipped: down's input does not come from up/gate only (reached '{value.name}')"
        if node.op_type not in _CHANNELWISE or node.domain not in ("", "ai.onnx"):
            return f"skipped: {node.op_type} between up and down"
        nodes[id(node)] = node
        for idx, inp in enumerate(node.inputs):
            if inp is None:
                continue
            arr = const_array(inp)
            if arr is not None:
                if arr.ndim and arr.shape[-1] == width and width > 1:
                    constants.append((node, idx))
                elif arr.ndim and arr.shape[-1] != 1:
                    return f"skipped: constant of shape {list(arr.shape)} between up and down"
                continue
            queue.append(inp)
    # Every value produced in the region (and up/gate outputs) is read only inside it.
    inside = {id(n) for n in nodes.values()} | {id(ffn.down.matmul)}
    produced = [out for n in nodes.values() for out in n.outputs]
    produced += [ffn.up.output] + ([ffn.gate.output] if ffn.gate is not None else [])
    for value in produced:
        if value.is_graph_output():
            return f"skipped: FFN activation '{value.name}' is a graph output"
        if any(id(use.node) not in inside for use in value.uses()):
            return f"skipped: FFN activation '{value.name}' is also read outside the FFN"
    order = list(nodes.values())
    return order, constants
