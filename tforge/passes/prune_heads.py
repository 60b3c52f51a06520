"""prune-heads: remove whole attention heads, and every constant that knows how many there were.

A head ``h`` owns ``head_dim`` columns of Q (and, under grouped-query attention, its KV head owns
columns of K and V) and the same rows of the output projection; nothing else in the layer mixes
heads. Removing it takes those slices out of the weights (also inside a fused QKV weight) and
rewrites whatever encodes the head count or the width on the way from the projections to the
output projection:

- ``Reshape`` targets (``[b, s, H, d]`` splits, ``[b, s, H*d]`` merges, and the
  ``[b, KV, rep, s, d] -> [b, H, s, d]`` merge of grouped-query attention), ``Expand`` shapes
  (the ``rep`` of repeat-KV), ``Split`` sizes and ``Slice`` bounds of a fused QKV output, as
  constants or as constant parts of a ``Concat``-built shape;
- per-head constants broadcast against the heads axis (e.g. position biases), which are sliced;
  per-head tensors computed at run time (MPT's ALiBi, MPNet's relative-position bias), which each
  reader reads through a ``Gather`` of the kept heads (the tensor may serve every layer);
- the value shape annotations on those paths.

A fused QKV cut into head-sized slots that Q, K and V select (Falcon, ``Attention.qkv_slots``)
keeps the kept heads' slots in their order; the slot Reshape and the Slice/Gather/GatherND
selections are rewritten like the rest (the ``slots`` role of the head-layout analysis).
A fused QKV laid out per head (GPT-NeoX, ``Attention.qkv_per_head``: ``[.., heads, 3 * head_dim]``
cut into Q, K and V inside each head) keeps each kept head's ``3 * head_dim`` columns in order;
only the heads element of the per-head Reshape changes (the in-head Split or Slices do not).
A fused QKV cut into groups of one head each (CodeGen's ``mp_num`` groups of query, value and
key) loses the removed heads' groups; the group count of its Reshape changes.

Which dimension of each shape is the heads axis is the head-layout analysis of
:mod:`tforge.compiler.head_layout` (roles per axis, propagated op by op); an attention whose
paths hold anything it does not understand is skipped with the reason in the statistics.
Exporters share constants between layers (one ``Concat`` builds the head split of every layer;
``[2]`` is at once a KV count, a repeat count and an ``Unsqueeze`` axis): a shared constant or
``Concat`` is cloned for the readers being rewritten and left alone for the others.

KV-cache decoders: the past key/value inputs are concatenated with the new keys/values into
the present outputs; their declared heads axis shrinks with the KV heads (the caller feeds back
what the graph returns). TorchScript exports compute their shapes at run time from ``Shape``;
those adapt by themselves, except a merge of repeated KV heads written as ``kv * n_rep``, which
is skipped when the number of query heads per KV head would change.

Multi-query attention written as repeat-KV (GPT-BigCode: the one KV head ``[b, 1, 1, s, d]``
expanded to ``[b, 1, H, s, d]`` and merged to ``[b, H, s, d]``): the repeat count is the number
of query heads and is rewritten with them; a repeat the analysis cannot prove is a Skip.

Self-check: each rewritten attention (projections to output projection, with the integer shape
arithmetic feeding it) must pass ONNX's strict shape inference when the untouched one did; a
failure is a head-count constant the analysis missed, and the pass raises
:class:`~tforge.errors.VerificationError` rather than hand on a graph that does not load.

Grouped-query attention: a kept KV head keeps the same number of query heads as every other
(the graph repeats KV heads uniformly), and a KV head is removed only with all its query heads
(:func:`tforge.passes.math.importance.select_heads`). Rotary embeddings act per head on
``head_dim``, which does not change. A layer that loses every head becomes its output
projection's bias (plus the removed heads' mean contribution with ``compensate``), added to the
residual stream (through the attention's output norm, folded in NumPy, when the block normalises
the attention's output before the add: Gemma 2/3, OLMo 2); the rest of its attention is deleted.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from tforge.compiler import pruning
from tforge.compiler.head_layout import (
    HeadEdits,
    apply_edits,
    attention_region,
    kept_qkv_columns,
    plan_head_removal,
    qkv_columns,
)
from tforge.compiler.pass_infra import Pass, PassResult, Property, SiteStats, Skip
from tforge.compiler.registry import register_pass
from tforge.compiler.rewrite import GraphEditor
from tforge.compiler.structure import Attention, Block, Norm, block_map, const_array
from tforge.errors import PassConfigError, VerificationError
from tforge.passes.math import compensation
from tforge.passes.math import importance as imp

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Site:
    block: Block
    attn: Attention
    scores: np.ndarray
    region: list[ir.Node]
    #: Only whole KV groups can go: the graph fixes how many query heads share a KV head (a
    #: repeat count computed at run time from a constant, as TorchScript's repeat-KV does), so
    #: thinning every group would not be exact; dropping whole groups keeps that count.
    whole_groups: bool = False
    #: The untouched attention passes ONNX's strict shape inference: the rewritten one must too
    self_check: bool = False


# ----------------------------------------------------------------------------- the pass


@register_pass("prune-heads")
@dataclasses.dataclass(frozen=True)
class PruneHeads(Pass):
    """Remove whole attention heads (Q/K/V columns, output-projection rows, head-count constants).

    ``ratio`` (fraction of heads removed per layer, or overall with ``budget=global``), ``keep``
    (heads kept per layer) or ``per-layer`` (``layer:kept,...``). Counts are rounded to sizes
    valid under grouped-query attention. ``importance``: ``magnitude`` (weight norms),
    ``activation`` (each head's share of the output projection's output energy) or ``obs`` (the
    energy lost when the head goes and the rest is refitted, from the Gram matrix). ``compensate``
    folds the removed heads' mean into the output projection's bias and, with ``refit`` and a
    Gram matrix (``calibrate{gram=true}``), refits its kept rows. Everything but ``magnitude``
    reads the statistics of ``calibrate``; they are dropped afterwards (every later activation
    changes).
    """

    ratio: float | None = None
    keep: int | None = None
    per_layer: dict[int, int] = dataclasses.field(default_factory=dict)
    importance: pruning.Importance = "activation"
    budget: pruning.Budget = "uniform"
    max_layer_ratio: float = 0.75
    compensate: bool = True
    refit: bool = True
    ridge: float = 0.1  # refit regularisation, relative to the mean input energy E[x_c^2]

    requires: ClassVar = frozenset({Property.CANONICAL})
    invalidates: ClassVar = frozenset({Property.CALIBRATED})

    def __post_init__(self) -> None:
        pruning.check_amount("prune-heads", self.ratio, self.keep, extra=int(bool(self.per_layer)))
        pruning.check_common("prune-heads", self.max_layer_ratio, self.ridge)
        bad = {k: v for k, v in self.per_layer.items() if k < 0 or v < 0}
        if bad:
            raise PassConfigError(f"prune-heads: per-layer needs layer >= 0 and kept heads >= 0, got {bad}")

    def __hash__(self) -> int:  # per_layer is a dict
        return hash((type(self), self.spec()))

    def check(self, model: ir.Model) -> None:
        pruning.require_stats(model, self.name, self.importance)

    def gram_wanted(self, model: ir.Model) -> set[str]:
        """The output projections' inputs: refits and importance=obs read their Gram matrices."""
        if not (self.importance == "obs" or (self.compensate and self.refit)):
            return set()
        return {
            b.attention.o.input.name
            for b in block_map(model).blocks
            if b.attention is not None and b.attention.o.input.name
        }

    def run(self, model: ir.Model) -> PassResult:
        stats = SiteStats()
        blocks = block_map(model)
        before = pruning.size_figures(model, blocks)
        order = {id(node): i for i, node in enumerate(model.graph)}
        sites: list[_Site] = []
        for block in blocks.blocks:
            attn = block.attention
            if attn is None:
                continue
            if self.per_layer and block.index not in self.per_layer:
                continue
            try:
                region = attention_region(attn, order)
                # dry runs before any change: the structure is understood for what will be removed
                whole_groups = _dry_run(attn, region)
                scores = self._scores(model, attn)
            except Skip as why:
                stats.skip(Skip(why.reason, why.at or attn.softmax))
                logger.debug("prune-heads: block %d: skipped: %s", block.index, why)
                continue
            if whole_groups is not None:
                stats[f"whole KV groups only: {whole_groups.reason}"] += 1
            before_error = pruning.shape_inference_error(model, _checked_nodes(attn, region))
            if before_error is not None:
                logger.debug("prune-heads: block %d: no self-check, the export fails shape inference: %s",
                             block.index, before_error)  # fmt: skip
            sites.append(_Site(block, attn, scores, region, whole_groups is not None, before_error is None))

        counts = self._counts(sites, stats)
        editor = GraphEditor(model, self.name)
        rows: list[dict[str, Any]] = []
        removed_layers = 0
        for site, keep in zip(sites, counts, strict=True):
            attn = site.attn
            row: dict[str, Any] = {
                "layer": site.block.index,
                "heads_before": attn.num_heads,
                "kv_heads_before": attn.num_kv_heads,
            }
            rows.append(row)
            if keep >= attn.num_heads:
                stats.skip("nothing to remove", attn.softmax, blocked=False)
                row.update(heads_after=attn.num_heads, kv_heads_after=attn.num_kv_heads)
                continue
            if site.whole_groups:
                selection = _select_groups(site.scores, attn.num_kv_heads, keep)
            else:
                selection = imp.select_heads(site.scores, attn.num_kv_heads, keep)
            share = float(site.scores[list(selection.heads)].sum() / max(site.scores.sum(), 1e-300))
            row.update(
                heads_after=selection.num_heads,
                kv_heads_after=selection.num_kv_heads,
                kept=list(selection.heads),
                kept_score_share=round(share, 6),
            )
            try:
                if keep == 0:
                    kind = self._remove_attention(model, editor, site)
                    removed_layers += 1
                    stats["attention removed"] += 1
                else:
                    edits = _plan(attn, site.region, selection)
                    kind = self._prune(model, editor, site, selection, edits)
                    _self_check(model, site)
                    stats["pruned"] += 1
                    if edits.cache_inputs:
                        stats["KV cache inputs reshaped"] += len(edits.cache_inputs)
            except Skip as why:  # found only when applying (nothing was changed yet)
                stats.skip(Skip(why.reason, why.at or attn.softmax))
                row.update(heads_after=attn.num_heads, kv_heads_after=attn.num_kv_heads)
                row.pop("kept")
                continue
            row["compensation"] = kind.kind
            stats[f"compensation: {kind.kind}"] += 1
            if kind.reason:
                stats[f"compensation weaker than asked: {kind.reason}"] += 1
            logger.debug(
                "prune-heads: block %d: %d -> %d heads (%d -> %d KV), %.1f%% of the %s score kept",
                site.block.index, attn.num_heads, selection.num_heads, attn.num_kv_heads,
                selection.num_kv_heads, 100 * share, self.importance,
            )
        changed = stats["pruned"] + stats["attention removed"] > 0
        if changed and removed_layers:
            common_passes.RemoveUnusedNodesPass()(model)
        after = pruning.size_figures(model, block_map(model)) if changed else before
        details = {"layers": rows, "size": pruning.compare_sizes(before, after)}
        return PassResult(model, changed=changed, stats=stats, details=details)

    # ------------------------------------------------------------------ decisions

    def _scores(self, model: ir.Model, attn: Attention) -> np.ndarray:
        o = pruning.weight_of(attn.o)
        if self.importance == "magnitude":
            q, k, v = _qkv_weights(attn)
            return imp.head_magnitude(q, k, v, o, attn.num_heads, attn.num_kv_heads, attn.head_dim)
        act = pruning.input_stats(model, attn.o.input)
        if act is None or act.count == 0:
            raise Skip("no calibration statistics of the output projection's input", attn.o.matmul)
        if act.channels != o.shape[0]:
            raise Skip("calibration statistics are stale (channel count differs)", attn.o.matmul)
        if self.importance == "obs":
            if act.gram is None or act.sum is None:
                raise Skip("importance=obs needs a Gram matrix (calibrate with gram=true)", attn.o.matmul)
            return compensation.group_removal_costs(
                o.astype(np.float64), act.second_moment, act.mean, attn.head_dim, ridge=self.ridge
            )
        centered = self.compensate and act.sum is not None
        return imp.head_activation(
            o, act.mean_sq, attn.num_heads, attn.head_dim, act.mean if centered else None,
            centered=centered,
        )

    def _counts(self, sites: Sequence[_Site], stats: SiteStats) -> list[int]:
        def snap(i: int, target: float) -> int:
            a = sites[i].attn
            if sites[i].whole_groups:
                group = a.num_heads // a.num_kv_heads
                size = group * imp.nearest_gqa_size(a.num_kv_heads, a.num_kv_heads, target / group)
            else:
                size = imp.nearest_gqa_size(a.num_heads, a.num_kv_heads, target)
            if abs(size - target) > 1e-9 and (self.keep is not None or self.per_layer):
                stats["kept heads rounded to a valid grouped-query size"] += 1
            return size

        if self.per_layer:
            return [snap(i, min(self.per_layer[s.block.index], s.attn.num_heads)) for i, s in enumerate(sites)]
        if self.keep is not None:
            return [snap(i, min(self.keep, s.attn.num_heads)) for i, s in enumerate(sites)]
        return imp.kept_counts(
            [s.attn.num_heads for s in sites],
            [s.scores for s in sites],
            ratio=self.ratio,
            keep=None,
            budget=self.budget,
            max_layer_ratio=self.max_layer_ratio,
            snap=snap,
        )

    # ------------------------------------------------------------------ rewrites

    def _prune(
        self,
        model: ir.Model,
        editor: GraphEditor,
        site: _Site,
        selection: imp.HeadSelection,
        edits: HeadEdits,
    ) -> pruning.Compensation:
        attn = site.attn
        d = attn.head_dim
        q_cols = _head_columns(selection.heads, d)
        kv_cols = _head_columns(selection.kv_heads, d)
        moments = pruning.input_moments(model, attn.o)
        if attn.fused_qkv:  # the kept heads' slots, wherever the layout puts Q, K and V
            editor.take_columns(attn.q, kept_qkv_columns(attn, selection.heads, selection.kv_heads))
        else:
            editor.take_columns(attn.q, q_cols)
            editor.take_columns(attn.k, kv_cols)
            editor.take_columns(attn.v, kv_cols)
        apply_edits(editor, edits)
        plan = compensation.compensate_rows(
            pruning.weight_of(attn.o), q_cols, moments.mean, moments.second_moment,
            enabled=self.compensate, refit_rows=self.refit, ridge=self.ridge, missing=moments.missing,
        )  # fmt: skip
        done = pruning.apply_row_compensation(
            editor, attn.o, q_cols, plan.rows, plan.bias_delta, plan.kind, plan.reason
        )
        for node in site.region:
            editor.mark(node)
        return done

    def _remove_attention(
        self, model: ir.Model, editor: GraphEditor, site: _Site
    ) -> pruning.Compensation:
        """Replace the attention's contribution to the residual stream by a constant."""
        attn = site.attn
        post = site.block.attention_post_norm  # x + norm(o(...)): the constant goes through it
        add, index = _residual_input(attn, post)
        o = pruning.weight_of(attn.o).astype(np.float64)
        bias = pruning.linear_bias(attn.o)
        constant = np.zeros(o.shape[1]) if bias is None else bias.astype(np.float64)
        kind = pruning.Compensation("none")
        act = pruning.input_stats(model, attn.o.input)
        if self.compensate:
            if act is None or act.count == 0 or act.sum is None or act.channels != o.shape[0]:
                kind = pruning.Compensation("none", "no calibration statistics of the projection's input")
            else:
                constant = constant + compensation.mean_shift(o, np.arange(o.shape[0]), act.mean)
                kind = pruning.Compensation("bias")
        zero = bias is None and kind.kind == "none"
        if post is not None:
            if post.channels != constant.shape[0]:
                raise Skip("the attention's output norm does not normalise the projection's width", post.node)
            constant = post.apply(constant)
            zero = not np.any(constant)
        branch = add.inputs[index]
        stream = add.inputs[1 - index]
        out = add.outputs[0]
        if zero and not out.is_graph_output() and stream is not None:
            out.replace_all_uses_with(stream)
        else:
            dtype = branch.dtype.numpy() if branch is not None and branch.dtype is not None else np.float32
            value = editor.initializer(f"{attn.o.name}.removed_attention", constant.astype(dtype))
            add.replace_input_with(index, value)
            editor.mark(add)
        return kind


# ----------------------------------------------------------------------------- weights


def _qkv_weights(attn: Attention) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if attn.fused_qkv:
        w = pruning.weight_of(attn.q)
        q, k, v = qkv_columns(attn)
        return w[:, q], w[:, k], w[:, v]
    return tuple(pruning.weight_of(lin) for lin in (attn.q, attn.k, attn.v))  # type: ignore[return-value]


def _head_columns(heads: Sequence[int], head_dim: int) -> np.ndarray:
    return np.asarray([h * head_dim + i for h in heads for i in range(head_dim)], np.int64)


def _residual_input(attn: Attention, post: Norm | None = None) -> tuple[ir.Node, int]:
    """The residual Add reading the attention's output (or its output norm ``post``), and which
    of its inputs that is."""
    value = attn.o.output if post is None else post.output
    what = "attention output" if post is None else "attention's output norm"
    for _ in range(6):
        users = list(value.uses())
        if len(users) != 1 or value.is_graph_output():
            raise Skip(f"the {what} is not read by one residual Add only", value.producer())
        node, idx = users[0].node, users[0].idx
        if node.op_type == "Add" and const_array(node.inputs[1 - idx]) is None:
            return node, idx
        if node.op_type not in ("Reshape", "Identity", "Cast", "Dropout"):
            break
        value = node.outputs[0]
    raise Skip("no residual Add after the attention output (cannot remove the whole layer)", attn.o.matmul)


def _dry_run(attn: Attention, region: list[ir.Node]) -> Skip | None:
    """Plan the two kinds of removal on the untouched graph: one query head out of every KV
    group (thinning) and one whole KV group. Returns why thinning cannot be planned when whole
    groups can (then only whole groups go); None when every kind there is can be planned.
    Raises the first Skip when no kind can be planned."""
    group = attn.num_heads // attn.num_kv_heads
    thinning = whole = None
    if group > 1:  # every KV group loses its last query head
        heads = tuple(g * group + i for g in range(attn.num_kv_heads) for i in range(group - 1))
        thinning = imp.HeadSelection(heads, tuple(range(attn.num_kv_heads)), group - 1)
    if attn.num_kv_heads > 1:  # the last KV group goes with its query heads
        heads = tuple(range(group * (attn.num_kv_heads - 1)))
        whole = imp.HeadSelection(heads, tuple(range(attn.num_kv_heads - 1)), group)

    def fails(selection: imp.HeadSelection | None) -> Skip | None:
        if selection is None:
            return None
        try:
            _plan(attn, region, selection)
        except Skip as why:
            return why
        return None

    thin_why, whole_why = fails(thinning), fails(whole)
    if thin_why is not None and whole is not None and whole_why is None:
        return thin_why
    if whole_why is not None or thin_why is not None:  # a whole group failing is the deeper reason
        raise whole_why or thin_why  # type: ignore[misc]
    return None


def _select_groups(scores: np.ndarray, num_kv_heads: int, keep: int) -> imp.HeadSelection:
    """The ``keep // group`` KV groups with the largest summed head scores, all their heads kept."""
    group = scores.shape[0] // num_kv_heads
    sums = np.asarray(scores, np.float64).reshape(num_kv_heads, group).sum(axis=1)
    groups = np.sort(np.argsort(-sums, kind="stable")[: keep // group])
    heads = tuple(int(g * group + h) for g in groups for h in range(group))
    return imp.HeadSelection(heads, tuple(int(g) for g in groups), group)


def _checked_nodes(attn: Attention, region: list[ir.Node]) -> list[ir.Node]:
    """The attention's nodes from the Q/K/V projections to the output projection's MatMul."""
    nodes: dict[int, ir.Node] = {}
    for lin in (attn.q, attn.k, attn.v):
        for node in (lin.matmul, lin.bias_add):
            if node is not None:
                nodes.setdefault(id(node), node)
    for node in [*region, attn.scores_matmul, attn.context_matmul, attn.o.matmul]:
        nodes.setdefault(id(node), node)
    return list(nodes.values())


def _self_check(model: ir.Model, site: _Site) -> None:
    """The rewritten attention passes ONNX's strict shape inference when the original did: a
    failure is a head-count constant the head-layout analysis missed, a bug; the pass stops
    rather than hand on a graph that does not load."""
    if not site.self_check:
        return
    error = pruning.shape_inference_error(model, _checked_nodes(site.attn, site.region))
    if error is not None:
        raise VerificationError(
            f"prune-heads: block {site.block.index}: the rewritten attention fails ONNX's strict "
            f"shape inference (a head-count constant was not rewritten; a bug in the head-layout "
            f"analysis): {' '.join(error.split())[:600]}"
        )


def _plan(attn: Attention, region: list[ir.Node], selection: imp.HeadSelection) -> HeadEdits:
    return plan_head_removal(attn, region, selection.heads, selection.kv_heads, selection.per_group)
