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
- the value shape annotations on those paths.

To know which dimension of each shape is the heads axis, every value between the projections
and the output projection gets a role per axis (heads, KV repeat, head_dim, width = heads x
head_dim, or other), propagated op by op from the projections' ``[.., width]`` outputs. A
constant element is rewritten only where the role says what it counts; a shape computed at run
time from ``Shape`` adapts by itself. An attention whose paths hold anything the propagation
does not understand is skipped with the reason in the statistics. Exporters share constants
between layers (one ``Concat`` builds the head split of every layer; ``[2]`` is at once a KV
count, a repeat count and an ``Unsqueeze`` axis): a shared constant or ``Concat`` is cloned for
the readers being rewritten and left alone for the others.

Grouped-query attention: a kept KV head keeps the same number of query heads as every other
(the graph repeats KV heads uniformly), and a KV head is removed only with all its query heads
(:func:`tforge.passes.math.importance.select_heads`). Rotary embeddings act per head on
``head_dim``, which does not change. A layer that loses every head becomes its output
projection's bias (plus the removed heads' mean contribution with ``compensate``), added to the
residual stream; the rest of its attention is deleted.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from tforge.compiler.pass_infra import Pass, PassResult, Property, mark_provenance
from tforge.compiler.registry import register_pass
from tforge.compiler.structure import Attention, Block, const_array, find_blocks, static_dims
from tforge.passes import _pruning as pruning
from tforge.passes.ln_migrate import ConstantRewriter, current_weight
from tforge.passes.math import compensation
from tforge.passes.math import importance as imp

logger = logging.getLogger(__name__)

_ELEMENTWISE = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Neg", "Cast", "Where", "Sqrt", "Pow", "Softmax", "IsNaN",
        "Not", "Identity", "Dropout", "Relu", "Exp", "Tanh", "Max", "Min", "Equal", "Clip",
        "Erf", "Sigmoid", "Abs", "Reciprocal", "LogSoftmax", "IsInf", "And", "Or",
    }
)  # fmt: skip
_WALK_LIMIT = 600


# ----------------------------------------------------------------------------- axis roles


@dataclasses.dataclass(frozen=True, eq=False)
class _Axis:
    """What one dimension of a value on an attention path counts.

    ``heads``, ``rep`` and ``width`` carry a mask over their old extent (True = kept);
    ``width`` is heads x head_dim, head-major. ``dim`` is head_dim (unchanged); ``other`` is
    anything else (batch, sequence, broadcast ones).
    """

    kind: Literal["heads", "rep", "width", "dim", "other"]
    keep: np.ndarray | None = None

    @property
    def old(self) -> int:
        return int(self.keep.shape[0]) if self.keep is not None else -1

    @property
    def new(self) -> int:
        return int(self.keep.sum()) if self.keep is not None else -1

    @property
    def counted(self) -> bool:
        return self.keep is not None


_OTHER = _Axis("other")
_DIM = _Axis("dim")
Roles = list[_Axis] | None  # None: not known (a shape computed at run time reordered the axes)


class _Decline(Exception):
    """This attention cannot be pruned; the message is the statistics key."""


@dataclasses.dataclass
class _Target:
    """A 1-D int64 shape-like input: its elements, and where each constant one lives."""

    node: ir.Node
    index: int
    elems: list[int | None]  # None: computed at run time
    concat: ir.Node | None  # the Concat building it, or None for a plain constant
    parts: list[tuple[int, int]]  # per element: (Concat input index or -1, offset in that part)


@dataclasses.dataclass
class _Edits:
    """Everything one attention's rewrite changes, collected before anything is changed."""

    targets: list[tuple[_Target, list[int]]] = dataclasses.field(default_factory=list)
    constants: list[tuple[ir.Node, int, np.ndarray]] = dataclasses.field(default_factory=list)
    split_sizes: list[tuple[ir.Node, list[int]]] = dataclasses.field(default_factory=list)
    shapes: list[tuple[ir.Value, ir.Shape | None]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Site:
    block: Block
    attn: Attention
    scores: np.ndarray
    region: list[ir.Node]


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
            raise ValueError(f"prune-heads: per-layer needs layer >= 0 and kept heads >= 0, got {bad}")

    def __hash__(self) -> int:  # per_layer is a dict
        return hash((type(self), self.spec()))

    def check(self, model: ir.Model) -> None:
        pruning.require_stats(model, self.name, self.importance)

    def run(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        block_map = find_blocks(model)
        before = pruning.size_figures(model, block_map)
        order = {id(node): i for i, node in enumerate(model.graph)}
        sites: list[_Site] = []
        for block in block_map.blocks:
            attn = block.attention
            if attn is None:
                continue
            if self.per_layer and block.index not in self.per_layer:
                continue
            try:
                region = _region(attn, order)
                # dry run with one unit removed: the structure is understood before any change
                smaller = [s for s in imp.gqa_sizes(attn.num_heads, attn.num_kv_heads) if 0 < s < attn.num_heads]
                if smaller:
                    ranks = np.arange(attn.num_heads, 0, -1, dtype=np.float64)
                    _plan(attn, region, imp.select_heads(ranks, attn.num_kv_heads, max(smaller)))
                scores = self._scores(model, attn)
            except _Decline as why:
                stats[str(why)] += 1
                logger.debug("prune-heads: block %d: %s", block.index, why)
                continue
            sites.append(_Site(block, attn, scores, region))

        counts = self._counts(sites, stats)
        rewriter = ConstantRewriter(model, self.name)
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
                stats["skipped: nothing to remove"] += 1
                row.update(heads_after=attn.num_heads, kv_heads_after=attn.num_kv_heads)
                continue
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
                    kind = self._remove_attention(model, rewriter, site)
                    removed_layers += 1
                    stats["attention removed"] += 1
                else:
                    edits = _plan(attn, site.region, selection)
                    kind = self._prune(model, rewriter, site, selection, edits)
                    stats["pruned"] += 1
            except _Decline as why:  # found only when applying (nothing was changed yet)
                stats[str(why)] += 1
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
        after = pruning.size_figures(model, find_blocks(model)) if changed else before
        details = {"layers": rows, "size": pruning.compare_sizes(before, after)}
        return PassResult(model, changed=changed, stats=stats, details=details)

    # ------------------------------------------------------------------ decisions

    def _scores(self, model: ir.Model, attn: Attention) -> np.ndarray:
        o = pruning.array(current_weight(attn.o))
        if self.importance == "magnitude":
            q, k, v = _qkv_weights(attn)
            return imp.head_magnitude(q, k, v, o, attn.num_heads, attn.num_kv_heads, attn.head_dim)
        act = pruning.input_stats(model, attn.o.input)
        if act is None or act.count == 0:
            raise _Decline("skipped: no calibration statistics of the output projection's input")
        if act.channels != o.shape[0]:
            raise _Decline("skipped: calibration statistics are stale (channel count differs)")
        if self.importance == "obs":
            if act.gram is None or act.sum is None:
                raise _Decline("skipped: importance=obs needs a Gram matrix (calibrate with gram=true)")
            return compensation.group_removal_costs(
                o.astype(np.float64), act.second_moment, act.mean, attn.head_dim, ridge=self.ridge
            )
        centered = self.compensate and act.sum is not None
        return imp.head_activation(
            o, act.mean_sq, attn.num_heads, attn.head_dim, act.mean if centered else None,
            centered=centered,
        )

    def _counts(self, sites: Sequence[_Site], stats: Counter[str]) -> list[int]:
        def snap(i: int, target: float) -> int:
            a = sites[i].attn
            size = imp.nearest_gqa_size(a.num_heads, a.num_kv_heads, target)
            if abs(size - target) > 1e-9 and (self.keep is not None or self.per_layer):
                stats["kept heads rounded to a valid grouped-query size"] += 1
            return size

        if self.per_layer:
            return [snap(i, min(self.per_layer[s.block.index], s.attn.num_heads)) for i, s in enumerate(sites)]
        if self.keep is not None:
            return [snap(i, min(self.keep, s.attn.num_heads)) for i, s in enumerate(sites)]
        return pruning.kept_counts(
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
        rewriter: ConstantRewriter,
        site: _Site,
        selection: imp.HeadSelection,
        edits: _Edits,
    ) -> pruning.Compensation:
        attn = site.attn
        d = attn.head_dim
        q_cols = _head_columns(selection.heads, d)
        kv_cols = _head_columns(selection.kv_heads, d)
        act = pruning.input_stats(model, attn.o.input)
        if attn.fused_qkv:
            q_width = attn.num_heads * d
            kv_width = attn.num_kv_heads * d
            cols = np.concatenate([q_cols, q_width + kv_cols, q_width + kv_width + kv_cols])
            pruning.take_columns(rewriter, attn.q, cols)
        else:
            pruning.take_columns(rewriter, attn.q, q_cols)
            pruning.take_columns(rewriter, attn.k, kv_cols)
            pruning.take_columns(rewriter, attn.v, kv_cols)
        _apply(rewriter, edits)
        done = pruning.compensate_rows(
            rewriter, attn.o, q_cols, act, enabled=self.compensate, refit=self.refit, ridge=self.ridge
        )
        for node in site.region:
            mark_provenance(node, self.name)
        return done

    def _remove_attention(
        self, model: ir.Model, rewriter: ConstantRewriter, site: _Site
    ) -> pruning.Compensation:
        """Replace the attention's contribution to the residual stream by a constant."""
        attn = site.attn
        add, index = _residual_input(attn)
        o = pruning.array(current_weight(attn.o)).astype(np.float64)
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
        branch = add.inputs[index]
        stream = add.inputs[1 - index]
        out = add.outputs[0]
        if bias is None and kind.kind == "none" and not out.is_graph_output() and stream is not None:
            out.replace_all_uses_with(stream)
        else:
            dtype = branch.dtype.numpy() if branch is not None and branch.dtype is not None else np.float32
            value = rewriter.add_initializer(f"{attn.o.name}.removed_attention", constant.astype(dtype))
            add.replace_input_with(index, value)
            mark_provenance(add, self.name)
        return kind


# ----------------------------------------------------------------------------- weights


def _qkv_weights(attn: Attention) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if attn.fused_qkv:
        w = pruning.array(current_weight(attn.q))
        q_w = attn.num_heads * attn.head_dim
        kv_w = attn.num_kv_heads * attn.head_dim
        return w[:, :q_w], w[:, q_w : q_w + kv_w], w[:, q_w + kv_w : q_w + 2 * kv_w]
    return tuple(pruning.array(current_weight(lin)) for lin in (attn.q, attn.k, attn.v))  # type: ignore[return-value]


def _head_columns(heads: Sequence[int], head_dim: int) -> np.ndarray:
    return np.asarray([h * head_dim + i for h in heads for i in range(head_dim)], np.int64)


def _residual_input(attn: Attention) -> tuple[ir.Node, int]:
    """The residual Add reading the attention's output, and which of its inputs that is."""
    value = attn.o.output
    for _ in range(6):
        users = list(value.uses())
        if len(users) != 1 or value.is_graph_output():
            raise _Decline("skipped: the attention output is not read by one residual Add only")
        node, idx = users[0].node, users[0].idx
        if node.op_type == "Add" and const_array(node.inputs[1 - idx]) is None:
            return node, idx
        if node.op_type not in ("Reshape", "Identity", "Cast", "Dropout"):
            break
        value = node.outputs[0]
    raise _Decline("skipped: no residual Add after the attention output (cannot remove the whole layer)")


# ----------------------------------------------------------------------------- region


def _region(attn: Attention, order: dict[int, int]) -> list[ir.Node]:
    """Nodes on the paths projections -> scores/context MatMuls -> output projection, in order."""
    starts = _start_values(attn)
    ends = [attn.scores_matmul.inputs[0], attn.scores_matmul.inputs[1], attn.context_matmul.inputs[1]]
    nodes = _between(starts, ends)
    nodes += _between([attn.scores_matmul.outputs[0]], [attn.context_matmul.inputs[0]])
    nodes += _between([attn.context_matmul.outputs[0]], [attn.o.input])
    unique = {id(n): n for n in nodes}
    region = sorted(unique.values(), key=lambda n: order.get(id(n), -1))
    inside = set(unique) | {id(attn.scores_matmul), id(attn.context_matmul), id(attn.o.matmul)}
    for node in region:
        for out in node.outputs:
            if out.is_graph_output():
                raise _Decline(f"skipped: attention value '{out.name}' is a graph output")
            for use in out.uses():
                if id(use.node) not in inside and use.node.op_type != "Shape":
                    raise _Decline(
                        f"skipped: attention value '{out.name}' is also read by {use.node.op_type} "
                        f"'{use.node.name}' outside the attention"
                    )
    return region


def _start_values(attn: Attention) -> list[ir.Value]:
    if attn.fused_qkv:
        return [attn.q.output]
    return [attn.q.output, attn.k.output, attn.v.output]


def _between(starts: Sequence[ir.Value | None], ends: Sequence[ir.Value | None]) -> list[ir.Node]:
    """Nodes reachable forward from ``starts`` from which some value of ``ends`` is reachable."""
    end_ids = {id(e) for e in ends if e is not None}
    forward: dict[int, ir.Node] = {}
    queue = deque(v for v in starts if v is not None)
    seen: set[int] = set()
    while queue:
        value = queue.popleft()
        if id(value) in seen or id(value) in end_ids:
            continue
        seen.add(id(value))
        for use in value.uses():
            node = use.node
            if node.op_type in ("Shape", "MatMul") or id(node) in forward:
                continue
            forward[id(node)] = node
            if len(forward) > _WALK_LIMIT:
                raise _Decline("skipped: the attention paths are too long to follow")
            queue.extend(node.outputs)
    on_path: dict[int, ir.Node] = {}
    back = deque(e for e in ends if e is not None)
    seen = set()
    while back:
        value = back.popleft()
        if id(value) in seen:
            continue
        seen.add(id(value))
        node = value.producer()
        if node is None or id(node) not in forward:
            continue
        on_path[id(node)] = node
        back.extend(i for i in node.inputs if i is not None)
    return list(on_path.values())


# ----------------------------------------------------------------------------- role propagation


def _plan(attn: Attention, region: list[ir.Node], selection: imp.HeadSelection) -> _Edits:
    """Propagate axis roles through the region for ``selection``; collect the edits it needs."""
    h, kv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q_mask = _mask(h, selection.heads)
    kv_mask = _mask(kv, selection.kv_heads)
    ctx = _Context(attn, q_mask, kv_mask, selection.per_group, _Edits())
    roles: dict[int, Roles] = {}
    if attn.fused_qkv:
        width = np.concatenate([np.repeat(q_mask, d), np.repeat(kv_mask, d), np.repeat(kv_mask, d)])
        roles[id(attn.q.output)] = _leading(attn.q.output, _Axis("width", width))
    else:
        roles[id(attn.q.output)] = _leading(attn.q.output, _Axis("width", np.repeat(q_mask, d)))
        roles[id(attn.k.output)] = _leading(attn.k.output, _Axis("width", np.repeat(kv_mask, d)))
        roles[id(attn.v.output)] = _leading(attn.v.output, _Axis("width", np.repeat(kv_mask, d)))

    scores, context = attn.scores_matmul, attn.context_matmul
    started_scores = started_context = False
    for node in region:
        if not started_scores and _reads(node, scores.outputs[0]):
            _start_scores(ctx, roles)
            started_scores = True
        if not started_context and _reads(node, context.outputs[0]):
            _start_context(ctx, roles)
            started_context = True
        _transfer(ctx, node, roles)
    if not started_scores:
        _start_scores(ctx, roles)
    if not started_context:
        _start_context(ctx, roles)

    merged = roles.get(id(attn.o.input))
    want = np.repeat(q_mask, d)
    if (
        merged is None
        or not merged[-1].counted
        or merged[-1].kind != "width"
        or merged[-1].old != attn.o.in_features
        or not np.array_equal(merged[-1].keep, want)
    ):
        raise _Decline("skipped: the merged heads reaching the output projection were not traced")
    ctx.record_shapes(region, roles)
    return ctx.edits


@dataclasses.dataclass
class _Context:
    attn: Attention
    q_mask: np.ndarray
    kv_mask: np.ndarray
    per_group: int
    edits: _Edits

    @property
    def group(self) -> int:
        return self.attn.num_heads // self.attn.num_kv_heads

    def rep_axis(self) -> _Axis:
        keep = np.zeros(self.group, bool)
        keep[: self.per_group] = True
        return _Axis("rep", keep)

    def record_shapes(self, region: list[ir.Node], roles: dict[int, Roles]) -> None:
        counts = {self.attn.num_heads, self.attn.num_kv_heads, self.group}
        counts |= {c * self.attn.head_dim for c in counts}
        counts.discard(1)
        values = [out for node in region for out in node.outputs]
        values += [self.attn.scores_matmul.outputs[0], self.attn.context_matmul.outputs[0]]
        for value in values:
            shape = value.shape
            if shape is None:
                continue
            r = roles.get(id(value))
            dims = list(shape.dims)
            if r is None or len(r) != len(dims):
                # roles unknown: forget every static size that may count heads
                new = [None if isinstance(x, int) and x in counts else x for x in dims]
            else:
                new = [
                    axis.new if axis.counted and isinstance(x, int) and x == axis.old else x
                    for axis, x in zip(r, dims, strict=True)
                ]
            if new != dims:
                self.edits.shapes.append((value, ir.Shape(new)))


def _mask(size: int, kept: Sequence[int]) -> np.ndarray:
    mask = np.zeros(size, bool)
    mask[list(kept)] = True
    return mask


def _leading(value: ir.Value, last: _Axis) -> list[_Axis]:
    rank = value.shape.rank() if value.shape is not None else None
    if rank is None or rank < 1:
        raise _Decline(f"skipped: projection output '{value.name}' has no known rank")
    return [_OTHER] * (rank - 1) + [last]


def _reads(node: ir.Node, value: ir.Value) -> bool:
    return any(i is value for i in node.inputs)


def _start_scores(ctx: _Context, roles: dict[int, Roles]) -> None:
    q = roles.get(id(ctx.attn.scores_matmul.inputs[0]))
    if q is None or not any(a.kind == "heads" for a in q):
        raise _Decline("skipped: the query heads axis at the scores MatMul was not traced")
    heads = next(a for a in q if a.kind == "heads")
    if not np.array_equal(heads.keep, ctx.q_mask):
        raise _Decline("skipped: the query heads at the scores MatMul are not the query projection's")
    k = roles.get(id(ctx.attn.scores_matmul.inputs[1]))
    if k is not None:
        k_heads = [a for a in k if a.kind == "heads"]
        if len(k_heads) != 1 or k_heads[0].new != heads.new:
            raise _Decline("skipped: the key heads at the scores MatMul do not match the query heads")
    roles[id(ctx.attn.scores_matmul.outputs[0])] = q[:-1] + [_OTHER]


def _start_context(ctx: _Context, roles: dict[int, Roles]) -> None:
    probs = roles.get(id(ctx.attn.context_matmul.inputs[0]))
    if probs is None:
        raise _Decline("skipped: the attention probabilities' heads axis was not traced")
    v = roles.get(id(ctx.attn.context_matmul.inputs[1]))
    if v is not None:
        v_heads = [a for a in v if a.kind == "heads"]
        if len(v_heads) != 1 or v_heads[0].new != int(ctx.q_mask.sum()):
            raise _Decline("skipped: the value heads at the context MatMul do not match the query heads")
    roles[id(ctx.attn.context_matmul.outputs[0])] = probs[:-1] + [_DIM]


def _transfer(ctx: _Context, node: ir.Node, roles: dict[int, Roles]) -> None:
    path = [i for i, v in enumerate(node.inputs) if v is not None and id(v) in roles]
    if not path:
        raise _Decline(f"skipped: {node.op_type} '{node.name}' on the attention path reads no traced value")
    first = roles[id(node.inputs[path[0]])]
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        raise _Decline(f"skipped: {node.domain}::{op} on the attention path")
    if op == "Reshape":
        out = _reshape(ctx, node, first)
    elif op == "Expand":
        out = _expand(ctx, node, first)
    elif op == "Transpose":
        out = _transpose(node, first)
    elif op == "Unsqueeze":
        out = _unsqueeze(node, first)
    elif op == "Squeeze":
        out = _squeeze(node, first)
    elif op == "Slice":
        out = _slice(ctx, node, first)
    elif op == "Split":
        for value, r in zip(node.outputs, _split(ctx, node, first), strict=True):
            roles[id(value)] = r
        return
    elif op == "Concat":
        out = _concat(ctx, node, first, path)
    elif op in _ELEMENTWISE:
        out = _elementwise(ctx, node, roles, path)
    else:
        raise _Decline(f"skipped: {op} '{node.name}' on the attention path is not understood")
    for value in node.outputs:
        roles[id(value)] = out


# ------------------------------------------------------------------ shapes read from inputs


def _target(node: ir.Node, index: int) -> _Target:
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        raise _Decline(f"skipped: {node.op_type} '{node.name}' has no shape input")
    arr = const_array(value)
    if arr is not None:
        elems = [int(x) for x in np.asarray(arr).ravel()]
        return _Target(node, index, elems, None, [(-1, i) for i in range(len(elems))])
    producer = value.producer()
    if producer is None or producer.op_type != "Concat":
        dims = static_dims(value)
        if dims is None or len(dims) != 1 or dims[0] is None:
            raise _Decline(f"skipped: the shape input of {node.op_type} '{node.name}' has no known length")
        return _Target(node, index, [None] * dims[0], None, [(-1, i) for i in range(dims[0])])
    elems: list[int | None] = []
    parts: list[tuple[int, int]] = []
    for part_index, part in enumerate(producer.inputs):
        arr = const_array(part)
        if arr is not None:
            values = [int(x) for x in np.asarray(arr).ravel()]
            elems += values
            parts += [(part_index, i) for i in range(len(values))]
            continue
        dims = static_dims(part)
        if dims is None or len(dims) != 1 or dims[0] is None:
            raise _Decline(f"skipped: a part of the shape of {node.op_type} '{node.name}' has no known length")
        elems += [None] * dims[0]
        parts += [(part_index, i) for i in range(dims[0])]
    return _Target(node, index, elems, producer, parts)


def _rewrite(ctx: _Context, target: _Target, new: list[int]) -> None:
    if new != target.elems:
        for old, value in zip(target.elems, new, strict=True):
            if old is None and value is not None:
                raise _Decline(f"skipped: a run-time part of the shape of '{target.node.name}' would need a change")
        ctx.edits.targets.append((target, new))


def _scaled(axis: _Axis, elem: int | None) -> int | None:
    """The new value of a shape element that counts ``axis``, or the element unchanged."""
    if elem is None or not axis.counted or elem in (-1, 0):
        return elem
    if elem == axis.old:
        return axis.new
    if elem == 1:
        return 1
    raise _Decline(f"skipped: a shape element {elem} stands where {axis.old} ({axis.kind}) was expected")


def _reshape(ctx: _Context, node: ir.Node, inp: Roles) -> Roles:
    target = _target(node, 1)
    elems = target.elems
    k = len(elems)
    d = ctx.attn.head_dim
    out_dims = static_dims(node.outputs[0])
    if out_dims is not None and len(out_dims) != k:
        out_dims = None

    def size(j: int) -> int | None:
        if out_dims is not None and out_dims[j] is not None:
            return out_dims[j]
        e = elems[j]
        return e if e is not None and e > 0 else None

    if inp is not None:
        n = len(inp)
        # split: [.., H*d] -> [.., H, d]
        if inp[-1].kind == "width" and k >= 2 and all(a.kind == "other" for a in inp[:-1]) and size(k - 1) == d:
            width = inp[-1]
            if width.old % d:
                raise _Decline(f"skipped: Reshape '{node.name}' splits {width.old} channels by head_dim {d}")
            per_head = width.keep.reshape(-1, d)
            if not (per_head.all(axis=1) | ~per_head.any(axis=1)).all():
                raise _Decline(f"skipped: Reshape '{node.name}' would split a head")
            heads = _Axis("heads", per_head[:, 0].copy())
            _rewrite(ctx, target, elems[:-2] + [_scaled(heads, elems[-2]), elems[-1]])
            return [_OTHER] * (k - 2) + [heads, _DIM]
        # merge: [.., H, d] -> [.., H*d]
        if n >= 2 and inp[-2].kind == "heads" and inp[-1].kind == "dim" and k < n and all(
            a.kind == "other" for a in inp[:-2]
        ):
            width = _Axis("width", np.repeat(inp[-2].keep, d))
            _rewrite(ctx, target, elems[:-1] + [_scaled(width, elems[-1])])
            return [_OTHER] * (k - 1) + [width]
        # repeat-KV merge: [.., KV, rep, ..] -> [.., H, ..]
        for a in range(n - 1):
            if inp[a].kind == "heads" and inp[a + 1].kind == "rep" and k == n - 1:
                old = inp[a].old * inp[a + 1].old
                if old != ctx.attn.num_heads or inp[a].new * inp[a + 1].new != int(ctx.q_mask.sum()):
                    raise _Decline(f"skipped: Reshape '{node.name}' merges KV heads into an unexpected count")
                heads = _Axis("heads", ctx.q_mask)
                out = inp[:a] + [heads] + inp[a + 2 :]
                _rewrite(ctx, target, [_scaled(r, e) for r, e in zip(out, elems, strict=True)])
                return out
        # same layout: every counted axis keeps its place
        if k == n and all(
            not a.counted or e in (None, -1, 0) or e == a.old for a, e in zip(inp, elems, strict=True)
        ) and all(a.counted or e is None or e in (-1, 0) or e == size(j) for j, (a, e) in enumerate(zip(inp, elems, strict=True))):
            _rewrite(ctx, target, [_scaled(a, e) for a, e in zip(inp, elems, strict=True)])
            return list(inp)
    # anything else must be computed at run time, which adapts by itself
    if any(e is not None and e not in (-1, 0) for e in elems):
        raise _Decline(f"skipped: Reshape '{node.name}' on the attention path has a constant target whose axes were not traced")
    return None


def _expand(ctx: _Context, node: ir.Node, inp: Roles) -> Roles:
    target = _target(node, 1)
    elems = target.elems
    k = len(elems)
    if inp is None:
        if any(e is not None and e != 1 for e in elems):
            raise _Decline(f"skipped: Expand '{node.name}' on an untraced layout has a constant shape")
        return None
    n = len(inp)
    if k < n:
        k = n
        elems = [1] * (n - len(elems)) + elems  # never happens in valid ONNX
    in_dims = static_dims(node.inputs[0]) or [None] * n
    out: list[_Axis] = [_OTHER] * (k - n)
    for j in range(k - n, k):
        role = inp[j - (k - n)]
        before = out[-1] if out else None
        e = elems[j]
        if (
            role.kind == "other"
            and in_dims[j - (k - n)] == 1
            and before is not None
            and before.kind == "heads"
            and e is not None
            and e == ctx.group
            and ctx.group > 1
        ):
            role = ctx.rep_axis()
        out.append(role)
    _rewrite(ctx, target, [_scaled(r, e) for r, e in zip(out, elems, strict=True)])
    return out


def _transpose(node: ir.Node, inp: Roles) -> Roles:
    if inp is None:
        return None
    perm_attr = node.attributes.get("perm")
    perm = list(perm_attr.value) if perm_attr is not None else list(range(len(inp)))[::-1]
    if len(perm) != len(inp):
        raise _Decline(f"skipped: Transpose '{node.name}' permutes {len(perm)} axes of a rank-{len(inp)} value")
    return [inp[p] for p in perm]


def _axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        if arr is None:
            raise _Decline(f"skipped: {node.op_type} '{node.name}' has axes computed at run time")
        return [int(x) for x in np.asarray(arr).ravel()]
    attr = node.attributes.get("axes")
    return list(attr.value) if attr is not None else None


def _unsqueeze(node: ir.Node, inp: Roles) -> Roles:
    if inp is None:
        return None
    axes = _axes(node) or []
    rank = len(inp) + len(axes)
    axes = sorted(a + rank if a < 0 else a for a in axes)
    out = list(inp)
    for a in axes:
        out.insert(a, _OTHER)
    return out


def _squeeze(node: ir.Node, inp: Roles) -> Roles:
    if inp is None:
        return None
    axes = _axes(node)
    if axes is None:
        raise _Decline(f"skipped: Squeeze '{node.name}' without axes on the attention path")
    axes = {a + len(inp) if a < 0 else a for a in axes}
    if any(inp[a].counted and inp[a].old > 1 for a in axes):
        raise _Decline(f"skipped: Squeeze '{node.name}' removes a heads axis")
    return [r for i, r in enumerate(inp) if i not in axes]


def _slice(ctx: _Context, node: ir.Node, inp: Roles) -> Roles:
    if inp is None:
        raise _Decline(f"skipped: Slice '{node.name}' on an untraced layout")
    starts, ends = _target(node, 1), _target(node, 2)
    axes = _target(node, 3).elems if len(node.inputs) > 3 and node.inputs[3] is not None else list(range(len(starts.elems)))
    steps = _target(node, 4).elems if len(node.inputs) > 4 and node.inputs[4] is not None else [1] * len(starts.elems)
    if any(x is None for x in [*starts.elems, *ends.elems, *axes, *steps]):
        raise _Decline(f"skipped: Slice '{node.name}' on the attention path has run-time bounds")
    out = list(inp)
    new_starts, new_ends = list(starts.elems), list(ends.elems)
    for i, (axis, step) in enumerate(zip(axes, steps, strict=True)):
        axis = axis + len(inp) if axis < 0 else axis
        role = inp[axis]
        if not role.counted:
            out[axis] = _OTHER
            continue
        start, end = _clamp(starts.elems[i], role.old), _clamp(ends.elems[i], role.old)
        if step != 1:
            raise _Decline(f"skipped: Slice '{node.name}' steps through a heads axis")
        if role.kind == "heads" and (start, end) == (0, role.old):
            continue
        if role.kind != "width":
            raise _Decline(f"skipped: Slice '{node.name}' cuts a {role.kind} axis")
        new_starts[i] = int(role.keep[:start].sum())
        new_ends[i] = new_starts[i] + int(role.keep[start:end].sum())
        if ends.elems[i] >= role.old and new_ends[i] == int(role.keep.sum()):
            new_ends[i] = ends.elems[i]  # keep "to the end" sentinels as they are
        out[axis] = _Axis("width", role.keep[start:end].copy())
    _rewrite(ctx, starts, new_starts)
    _rewrite(ctx, ends, new_ends)
    return out


def _clamp(x: int, size: int) -> int:
    x = x + size if x < 0 else x
    return min(max(x, 0), size)


def _split(ctx: _Context, node: ir.Node, inp: Roles) -> list[Roles]:
    if inp is None:
        raise _Decline(f"skipped: Split '{node.name}' on an untraced layout")
    axis_attr = node.attributes.get("axis")
    axis = int(axis_attr.value) if axis_attr is not None else 0
    axis = axis + len(inp) if axis < 0 else axis
    role = inp[axis]
    count = len(node.outputs)
    if not role.counted:
        return [list(inp[:axis]) + [_OTHER] + list(inp[axis + 1 :]) for _ in range(count)]
    if role.kind != "width":
        raise _Decline(f"skipped: Split '{node.name}' splits a {role.kind} axis")
    sizes: list[int] | None = None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        target = _target(node, 1)
        if any(e is None for e in target.elems):
            raise _Decline(f"skipped: Split '{node.name}' has run-time sizes")
        sizes = [int(e) for e in target.elems]  # type: ignore[arg-type]
    elif role.old % count == 0:
        sizes = [role.old // count] * count
    if sizes is None or sum(sizes) != role.old:
        raise _Decline(f"skipped: Split '{node.name}' sizes do not add up to the fused width")
    out: list[Roles] = []
    new_sizes = []
    start = 0
    for size in sizes:
        part = role.keep[start : start + size].copy()
        new_sizes.append(int(part.sum()))
        out.append(list(inp[:axis]) + [_Axis("width", part)] + list(inp[axis + 1 :]))
        start += size
    if new_sizes != sizes:
        ctx.edits.split_sizes.append((node, new_sizes))
    return out


def _concat(ctx: _Context, node: ir.Node, first: Roles, path: list[int]) -> Roles:
    if first is None:
        raise _Decline(f"skipped: Concat '{node.name}' on an untraced layout")
    axis_attr = node.attributes.get("axis")
    axis = int(axis_attr.value) if axis_attr is not None else 0
    axis = axis + len(first) if axis < 0 else axis
    if first[axis].counted:
        raise _Decline(f"skipped: Concat '{node.name}' joins along a {first[axis].kind} axis")
    for i, value in enumerate(node.inputs):
        if i not in path and value is not None:
            _broadcast_operand(ctx, node, i, first)
    out = list(first)
    out[axis] = _OTHER
    return out


def _elementwise(ctx: _Context, node: ir.Node, roles: dict[int, Roles], path: list[int]) -> Roles:
    known = [roles[id(node.inputs[i])] for i in path]
    out_rank = max(len(r) if r is not None else 0 for r in known)
    rank_out = node.outputs[0].shape.rank() if node.outputs[0].shape is not None else None
    if any(r is None for r in known):
        for i, value in enumerate(node.inputs):
            if i not in path and value is not None:
                arr = const_array(value)
                if arr is None or arr.size != 1:
                    raise _Decline(f"skipped: {node.op_type} '{node.name}' mixes an untraced layout with another tensor")
        return None
    result: list[_Axis] = [_OTHER] * out_rank
    for r in known:
        offset = out_rank - len(r)  # type: ignore[arg-type]
        for j, axis in enumerate(r):  # type: ignore[union-attr]
            if axis.counted or axis.kind == "dim":
                current = result[offset + j]
                if current.counted and axis.counted and not np.array_equal(current.keep, axis.keep):
                    if current.new != axis.new:
                        raise _Decline(f"skipped: {node.op_type} '{node.name}' combines different head sets")
                    continue
                result[offset + j] = axis
    if rank_out is not None and rank_out != out_rank:
        out_rank = max(out_rank, rank_out)
        result = [_OTHER] * (out_rank - len(result)) + result
    for i, value in enumerate(node.inputs):
        if i not in path and value is not None:
            _broadcast_operand(ctx, node, i, result)
    if node.op_type in ("Softmax", "LogSoftmax"):
        axis_attr = node.attributes.get("axis")
        axis = int(axis_attr.value) if axis_attr is not None else -1
        if result[axis].counted:
            raise _Decline(f"skipped: {node.op_type} '{node.name}' normalises over heads")
    return result


def _broadcast_operand(ctx: _Context, node: ir.Node, index: int, roles: list[_Axis]) -> None:
    """A tensor combined with a path value: size 1 on counted axes, or a constant to slice."""
    value = node.inputs[index]
    if value is None:
        return
    arr = const_array(value)
    dims = list(arr.shape) if arr is not None else static_dims(value)
    if dims is None:
        if any(a.counted for a in roles):
            raise _Decline(f"skipped: {node.op_type} '{node.name}' reads a tensor of unknown shape")
        return
    offset = len(roles) - len(dims)
    sliced = arr
    for j, size in enumerate(dims):
        if j + offset < 0:
            continue
        axis = roles[j + offset]
        if not axis.counted or size == 1:
            continue
        if size != axis.old or arr is None:
            raise _Decline(
                f"skipped: {node.op_type} '{node.name}' reads '{value.name}' with {size} entries on a "
                f"{axis.kind} axis of {axis.old}"
            )
        sliced = np.take(sliced, np.flatnonzero(axis.keep), axis=j)
    if sliced is not arr and sliced is not None:
        ctx.edits.constants.append((node, index, sliced))


# ----------------------------------------------------------------------------- applying edits


def _apply(rewriter: ConstantRewriter, edits: _Edits) -> None:
    groups: dict[tuple[Any, ...], tuple[_Target, list[int], list[tuple[ir.Node, int]]]] = {}
    for target, new in edits.targets:
        holder = target.concat if target.concat is not None else target.node.inputs[target.index]
        key = (id(holder), tuple(new))
        entry = groups.setdefault(key, (target, new, []))
        if (target.node, target.index) not in entry[2]:
            entry[2].append((target.node, target.index))
    for target, new, readers in groups.values():
        if target.concat is None:
            value = _input(target.node, target.index)
            rewriter.set_constant(value, readers, np.asarray(new, np.int64))
            continue
        concat = _own_concat(rewriter, target.concat, readers)
        by_part: dict[int, list[tuple[int, int]]] = {}
        for (part, offset), old, value in zip(target.parts, target.elems, new, strict=True):
            if old != value:
                by_part.setdefault(part, []).append((offset, value))
        for part, changes in by_part.items():
            part_value = _input(concat, part)
            arr = np.asarray(const_array(part_value))
            updated = np.array(arr, copy=True).reshape(-1)
            for offset, value in changes:
                updated[offset] = value
            rewriter.set_constant(part_value, [(concat, part)], updated.reshape(arr.shape))
    for node, index, arr in edits.constants:
        rewriter.set_constant(_input(node, index), [(node, index)], arr)
    for node, sizes in edits.split_sizes:
        array = np.asarray(sizes, np.int64)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            rewriter.set_constant(node.inputs[1], [(node, 1)], array)
        else:  # equal parts given by num_outputs: now unequal, so explicit sizes
            node.attributes.pop("num_outputs", None)
            node.resize_inputs(2)
            node.replace_input_with(1, rewriter.add_initializer(f"{node.name or 'split'}.sizes", array))
        mark_provenance(node, rewriter.pass_name)
    for value, shape in edits.shapes:
        value.shape = shape


def _input(node: ir.Node, index: int) -> ir.Value:
    value = node.inputs[index]
    if value is None:  # the plan only records inputs it has read
        raise ValueError(f"prune-heads: input {index} of '{node.name}' is missing")
    return value


def _own_concat(
    rewriter: ConstantRewriter, concat: ir.Node, readers: list[tuple[ir.Node, int]]
) -> ir.Node:
    """``concat`` itself when only ``readers`` use it, else a copy that only they read."""
    out = concat.outputs[0]
    uses = {(id(u.node), u.idx) for u in out.uses()}
    if uses <= {(id(n), i) for n, i in readers} and not out.is_graph_output():
        return concat
    clone = ir.Node(
        concat.domain,
        "Concat",
        list(concat.inputs),
        attributes=[ir.Attr(a.name, a.type, a.value) for a in concat.attributes.values()],
        name=rewriter.unique_name(f"{concat.name or 'concat'}.{rewriter.pass_name}"),
    )
    clone.outputs[0].name = rewriter.unique_name(f"{out.name or 'shape'}.{rewriter.pass_name}")
    clone.outputs[0].shape, clone.outputs[0].type = out.shape, out.type
    rewriter.graph.insert_after(concat, clone)
    mark_provenance(clone, rewriter.pass_name)
    for node, index in readers:
        node.replace_input_with(index, clone.outputs[0])
    return clone
