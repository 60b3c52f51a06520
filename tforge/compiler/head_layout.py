"""Which axis of each value on an attention path counts heads: the head-layout analysis.

Head pruning must rewrite every constant that encodes the head count or the width on the way
from the Q/K/V projections to the output projection: ``Reshape`` targets (``[b, s, H, d]``
splits, ``[b, s, H*d]`` merges, the ``[b, KV, rep, s, d] -> [b, H, s, d]`` merge of grouped-query
attention, also with multi-query's one KV head), ``Expand`` shapes (the ``rep`` of repeat-KV),
``Split`` sizes and ``Slice`` bounds of a fused QKV output, ``Gather``/``GatherND`` indices of its
head slots (Falcon), as constants or as constant parts of a ``Concat``-built shape; per-head
constants broadcast against the heads axis (sliced); per-head tensors computed at run time and
broadcast against it (MPT's ALiBi, MPNet's relative-position bias: each reader gets a ``Gather``
of the kept heads, the tensor may serve every layer); and the value shape annotations on those
paths.

To know which dimension of each shape is the heads axis, every value in the attention's region
(:func:`attention_region`) gets a role per axis: ``heads``, ``rep`` (KV repeat), ``dim``
(head_dim), ``width`` (heads x head_dim, head-major), ``slots`` (head-sized slots of a fused QKV
output that Q, K and V select, Falcon: :class:`SlotGrid`) or ``other``, with a mask of what is
kept on the counted ones. Roles start at the projections' ``[.., width]`` outputs (a fused QKV
laid out per head, GPT-NeoX, is a width of ``3 * head_dim`` per head, split into heads of that
width; a fused QKV cut into groups of head slots along a new axis, CodeGen, is a heads axis
when each group is one head) and are propagated op by op by the rules of :data:`TRANSFER` (one
function per op; elementwise and other axis-preserving ops share one). A Reshape that only
regroups the axes after the last counted one (interleaved rotary's ``[.., H, d/2, 2] -> [.., H,
d]``) keeps the roles of the axes up to it once each is proven to be the input's (a copy, a
``Shape`` of a value with that axis, its extent, or annotations that agree). A constant element
is rewritten only where its role says what it counts; a shape computed at run time from
``Shape`` adapts by itself. Anything a rule does not understand is a
:class:`~tforge.compiler.pass_infra.Skip` naming the node.
:func:`plan_head_removal` collects the edits for one choice of kept heads before anything
changes; :func:`apply_edits` makes them through the graph editor, cloning constants and
``Concat`` shapes that the exporter shared between layers, and copying the run-time shape
arithmetic before an ``Expand`` (TorchScript's ``Where(Equal(s, -1), 1, s)``) for the readers
that get one rewrite when others read it too.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from tforge.compiler.ops import AXIS_PRESERVING, data_uses, is_default_domain
from tforge.compiler.pass_infra import Skip
from tforge.compiler.rewrite import GraphEditor
from tforge.compiler.structure import Attention, const_array, static_dims

__all__ = [
    "Axis",
    "HeadEdits",
    "LayoutContext",
    "Roles",
    "SlotGrid",
    "TRANSFER",
    "apply_edits",
    "attention_region",
    "kept_qkv_columns",
    "plan_head_removal",
    "qkv_columns",
]

_WALK_LIMIT = 600


# ----------------------------------------------------------------------------- axis roles


@dataclasses.dataclass(frozen=True, eq=False)
class Axis:
    """What one dimension of a value on an attention path counts.

    ``heads``, ``rep``, ``width`` and ``slots`` carry a mask over their old extent (True = kept);
    ``width`` is heads x head_dim, head-major. ``dim`` is head_dim (unchanged); ``other`` is
    anything else (batch, sequence, broadcast ones). ``outer > 1`` is a heads axis merged with
    the axes before it (``[B*H, S, d]``, batch-major, as static-shape exports of batched matmuls
    write attention): ``outer`` blocks of the heads, each masked by ``keep``; ``outer = 0`` when
    the axes before were merged at run time (a batch of unknown size). ``slots`` says what
    each head-sized slot of a fused QKV output holds: on a ``slots`` axis, and on the fused
    ``width`` before the Reshape that cuts it into slots.
    """

    kind: Literal["heads", "rep", "width", "slots", "dim", "other"]
    keep: np.ndarray | None = None
    outer: int = 1
    slots: SlotGrid | None = None

    @property
    def old(self) -> int:
        return self.outer * int(self.keep.shape[0]) if self.keep is not None else -1

    @property
    def new(self) -> int:
        return self.outer * int(self.keep.sum()) if self.keep is not None else -1

    @property
    def full_keep(self) -> np.ndarray:
        """The mask over the whole extent (``keep`` repeated ``outer`` times)."""
        assert self.keep is not None  # only asked of counted axes
        return np.tile(self.keep, self.outer)

    @property
    def counted(self) -> bool:
        return self.keep is not None


_OTHER = Axis("other")
_DIM = Axis("dim")
Roles = list[Axis] | None  # None: not known (a shape computed at run time reordered the axes)


Label = tuple[Literal["q", "k", "v"], int]


@dataclasses.dataclass(frozen=True, eq=False)
class SlotGrid:
    """What the positions of a ``slots`` axis hold: head-sized slots of a fused QKV output.

    Falcon reshapes its fused output into slots (``Attention.qkv_slots``) and Q, K and V select
    theirs with Slice, Gather or GatherND. ``labels[r][j]`` is what position ``j`` holds in row
    ``r``: ``("q", h)`` query head ``h``, ``("k", j)`` / ``("v", j)`` KV head ``j``'s key /
    value; ``kept[r, j]`` whether it stays. ``grouped``: the rows are the positions of a groups
    axis before this one, one KV head each (the new decoder architecture,
    ``[..., kv_heads, heads / kv_heads + 2, head_dim]``); else there is one row, the whole fused
    output (multi-query ``[..., heads + 2, head_dim]``). Removing columns keeps the layout
    rectangular because every kept group keeps as many slots as the others.
    """

    labels: tuple[tuple[Label, ...], ...]
    kept: np.ndarray  # bool [rows, positions]
    grouped: bool = False

    @classmethod
    def of(
        cls, qkv_slots: tuple[Sequence[int], Sequence[int], Sequence[int]], q_mask: np.ndarray, kv_mask: np.ndarray
    ) -> SlotGrid:
        """One row: the slots of a whole fused output (``Attention.qkv_slots``), kept by the masks."""
        q_slots, k_slots, v_slots = qkv_slots
        labels: list[Label] = [("q", 0)] * (len(q_slots) + len(k_slots) + len(v_slots))
        kept = np.zeros(len(labels), bool)
        for kind, slots, mask in (("q", q_slots, q_mask), ("k", k_slots, kv_mask), ("v", v_slots, kv_mask)):
            for i, slot in enumerate(slots):
                labels[slot] = (kind, i)  # type: ignore[assignment]
                kept[slot] = mask[i]
        return cls((tuple(labels),), kept[None, :])

    @property
    def kept_rows(self) -> np.ndarray:
        return self.kept[self.kept.any(axis=1)]

    def axis(self) -> Axis:
        rows = self.kept_rows
        return Axis("slots", (rows[0] if len(rows) else self.kept[0]).copy(), slots=self)

    def take(self, positions: Sequence[int]) -> SlotGrid:
        labels = tuple(tuple(row[p] for p in positions) for row in self.labels)
        return SlotGrid(labels, self.kept[:, list(positions)], self.grouped)

    def bounds(self, start: int, end: int, node: ir.Node) -> tuple[int, int]:
        """The kept positions before ``start`` and up to ``end``, the same in every kept row."""
        found = {(int(r[:start].sum()), int(r[:end].sum())) for r in self.kept_rows}
        if len(found) != 1:
            raise Skip(
                f"{node.op_type} '{node.name}' cuts the head slots between positions whose kept "
                "heads differ from one KV group to another", node,
            )  # fmt: skip
        return found.pop()

    def picks(self, positions: Sequence[int], node: ir.Node) -> tuple[list[int], np.ndarray]:
        """The new positions of the kept ones of ``positions`` and which of them are kept."""
        rows = self.kept_rows
        chosen = rows[:, list(positions)]
        if not (chosen == chosen[:1]).all():
            raise Skip(f"{node.op_type} '{node.name}' selects head slots kept in some KV groups only", node)
        keep = chosen[0].copy()
        return [int(rows[0, :p].sum()) for p, k in zip(positions, keep, strict=True) if k], keep

    def regrouped(self, per_row: int, ctx: LayoutContext, node: ir.Node) -> SlotGrid:
        """The one row of the fused output cut into rows of ``per_row`` positions, one KV group each."""
        (flat,) = self.labels
        rows = [flat[i : i + per_row] for i in range(0, len(flat), per_row)]
        pattern = [kind for kind, _ in rows[0]]
        for g, row in enumerate(rows):
            if [kind for kind, _ in row] != pattern or sorted(x for x in row if x[0] != "q") != [("k", g), ("v", g)]:
                raise Skip(
                    f"Reshape '{node.name}' cuts the fused QKV output into rows of {per_row} head "
                    "slots that are not one KV group each (its query heads, key and value)", node,
                )  # fmt: skip
        if len(rows) != ctx.num_kv_heads:
            raise Skip(f"Reshape '{node.name}' cuts the fused QKV output into {len(rows)} groups of head slots", node)
        kept = self.kept.reshape(len(rows), per_row)
        counts = {int(r.sum()) for r in kept if r.any()}
        if len(counts) != 1:
            raise Skip(f"Reshape '{node.name}': the kept KV groups would keep different numbers of head slots", node)
        return SlotGrid(tuple(tuple(r) for r in rows), kept, grouped=True)


def qkv_columns(attn: Attention) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The output columns of a fused QKV linear holding Q (head-major), K and V (KV-head-major)."""
    d = attn.head_dim
    if attn.qkv_slots is not None:
        return tuple(  # type: ignore[return-value]
            np.asarray([s * d + i for s in slots for i in range(d)], np.int64) for slots in attn.qkv_slots
        )
    if attn.qkv_per_head:  # [heads, 3, head_dim]: head h's Q, K and V are its 3 * head_dim columns in turn
        first = np.arange(attn.num_heads, dtype=np.int64)[:, None] * 3 * d
        return tuple((first + part * d + np.arange(d, dtype=np.int64)).ravel() for part in range(3))  # type: ignore[return-value]
    q_w, kv_w = attn.num_heads * d, attn.num_kv_heads * d
    return np.arange(q_w), np.arange(q_w, q_w + kv_w), np.arange(q_w + kv_w, q_w + 2 * kv_w)


def kept_qkv_columns(attn: Attention, heads: Sequence[int], kv_heads: Sequence[int]) -> np.ndarray:
    """The columns of a fused QKV linear that keeping ``heads`` and ``kv_heads`` keeps, in order
    (the layout of what is left is the old one with fewer heads)."""
    d = attn.head_dim
    q, k, v = (c.reshape(-1, d) for c in qkv_columns(attn))
    return np.sort(np.concatenate([q[list(heads)].ravel(), k[list(kv_heads)].ravel(), v[list(kv_heads)].ravel()]))


@dataclasses.dataclass
class _Target:
    """A 1-D int64 shape-like input: its elements, and where each constant one lives."""

    node: ir.Node
    index: int
    elems: list[int | None]  # None: computed at run time
    concat: ir.Node | None  # the Concat building it, or None for a plain constant
    parts: list[tuple[int, int]]  # per element: (Concat input index or -1, offset in that part)
    #: With a chain of shape arithmetic between the constant (or Concat) and the reader (see
    #: :func:`_shape_chain`): the value the chain starts from and its readers there; per element
    #: the value it must never take (it would select the chain's other branch), and whether it is
    #: fixed (it already selected that branch: its value is not the constant's).
    source: ir.Value | None = None
    source_readers: list[tuple[ir.Node, int]] | None = None
    avoid: list[int | None] | None = None
    fixed: list[bool] | None = None
    #: The reader gets a constant of its own instead of a rewritten start: the chain is shared
    #: with other readers, and it computes only constants (a fixed-shape TorchScript export)
    materialize: bool = False
    #: The chain's nodes, the reader's side first, when a value in it is read by anything but the
    #: chain and the reader and some elements are computed at run time (Falcon's repeat of K and
    #: V to the query's run-time shape, one chain for both): :func:`apply_edits` gives the readers
    #: that get one rewrite a copy of the chain of their own unless they are all it has
    shared: list[ir.Node] | None = None


@dataclasses.dataclass
class HeadEdits:
    """Everything one attention's rewrite changes, collected before anything is changed."""

    targets: list[tuple[_Target, list[int]]] = dataclasses.field(default_factory=list)
    constants: list[tuple[ir.Node, int, np.ndarray]] = dataclasses.field(default_factory=list)
    split_sizes: list[tuple[ir.Node, list[int]]] = dataclasses.field(default_factory=list)
    shapes: list[tuple[ir.Value, ir.Shape | None]] = dataclasses.field(default_factory=list)
    #: KV cache inputs (past key/values) whose heads axis shrinks: the model's interface changes
    cache_inputs: list[ir.Value] = dataclasses.field(default_factory=list)
    #: Per-head tensors computed at run time beside a heads axis (MPT's ALiBi, MPNet's relative
    #: position bias): ``(reader, input index, [(axis, kept indices), ...])``. Each reader gets
    #: Gathers of its own: the tensor may be computed once for every layer.
    gathers: list[tuple[ir.Node, int, list[tuple[int, np.ndarray]]]] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------- region


def attention_region(attn: Attention, order: dict[int, int]) -> list[ir.Node]:
    """Nodes on the paths projections -> scores/context MatMuls -> output projection, in order."""
    starts = _start_values(attn)
    ends = [attn.scores_matmul.inputs[0], attn.scores_matmul.inputs[1], attn.context_matmul.inputs[1]]
    nodes = _between(starts, ends)
    nodes += _between([attn.scores_matmul.outputs[0]], [attn.context_matmul.inputs[0]])
    nodes += _between([attn.context_matmul.outputs[0]], [attn.o.input])
    unique = {id(n): n for n in nodes}
    inside = set(unique) | {id(attn.scores_matmul), id(attn.context_matmul), id(attn.o.matmul)}
    # a layout op off the paths whose output only Shape reads (TorchScript's MPT transposes the
    # key once more only to read its length) is traced with them, so its annotations follow
    for node in list(unique.values()):
        for out in node.outputs:
            for use in out.uses():
                if id(use.node) not in inside and _read_by_shape_only(use.node):
                    unique[id(use.node)] = use.node
                    inside.add(id(use.node))
    region = sorted(unique.values(), key=lambda n: order.get(id(n), -1))
    for node in region:
        for out in node.outputs:
            if out.is_graph_output() and _cache_input(node) is None:
                raise Skip(f"attention value '{out.name}' is a graph output", node)
            for use in out.uses():
                if id(use.node) not in inside and use.node.op_type != "Shape":
                    raise Skip(
                        f"attention value '{out.name}' is also read by {use.node.op_type} "
                        f"'{use.node.name}' outside the attention"
                    )
    return region


def _read_by_shape_only(node: ir.Node) -> bool:
    """A default-domain op with a transfer rule whose outputs only ``Shape`` reads."""
    return (
        is_default_domain(node)
        and node.op_type in TRANSFER
        and all(not out.is_graph_output() for out in node.outputs)
        and all(use.node.op_type == "Shape" for out in node.outputs for use in out.uses())
    )


def _sizes_read_count_nothing(node: ir.Node, roles: dict[int, Roles]) -> None:
    """A value off the attention paths that only ``Shape`` reads (see :func:`attention_region`):
    each size read, ``Gather(Shape(x), i)``, must count no heads, which a smaller graph would not
    select (only the count would change)."""
    for out in node.outputs:
        axes = roles.get(id(out))
        for use in out.uses():
            shape = use.node
            readers = [u.node for u in shape.outputs[0].uses()]
            for reader in readers:
                index = const_array(reader.inputs[1]) if reader.op_type == "Gather" else None
                if (
                    axes is None
                    or shape.attributes
                    or index is None
                    or any(axes[int(i)].counted for i in np.asarray(index).ravel())
                ):
                    raise Skip(f"Shape '{shape.name}' may read a head count of '{out.name}' off the attention paths", shape)


def _cache_input(node: ir.Node) -> ir.Value | None:
    """The past input of a KV cache ``Concat(past, new)`` whose output is the present output.

    Such a graph output may carry heads: pruning rewrites the declared shapes of the past input
    and the present output (the caller feeds back what the graph returned), see :func:`_concat`.
    """
    if node.op_type != "Concat" or not is_default_domain(node):
        return None
    pasts = [v for v in node.inputs if v is not None and v.is_graph_input()]
    if len(pasts) != 1 or len(node.inputs) != 2:
        return None
    return pasts[0]


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
                raise Skip("the attention paths are too long to follow")
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


def plan_head_removal(
    attn: Attention,
    region: list[ir.Node],
    heads: Sequence[int],
    kv_heads: Sequence[int],
    per_group: int,
) -> HeadEdits:
    """Propagate axis roles through ``region`` for keeping query ``heads`` and ``kv_heads``
    (``per_group`` query heads per kept KV head); collect the edits that needs, or Skip."""
    if attn.qkv_per_head and attn.num_kv_heads != attn.num_heads:
        raise Skip(
            f"fused QKV laid out per head ([heads, 3, head_dim]) with {attn.num_kv_heads} KV heads "
            f"for {attn.num_heads} query heads: only one K and V per query head is understood",
            attn.q.matmul,
        )  # fmt: skip
    d = attn.head_dim
    ctx = LayoutContext.keeping(attn.num_heads, attn.num_kv_heads, d, heads, kv_heads, per_group, attn)
    q_mask, kv_mask = ctx.q_mask, ctx.kv_mask
    roles: dict[int, Roles] = {}
    if attn.qkv_per_head:  # whole heads of 3 * head_dim columns; the Reshape after the projection cuts them
        if not np.array_equal(q_mask, kv_mask):
            raise Skip("fused QKV laid out per head: the kept KV heads are not the kept query heads", attn.q.matmul)
        ctx.per_head_width = 3 * d
        ctx.slot_counts = {attn.num_heads * 3 * d}
        roles[id(attn.q.output)] = _leading(attn.q.output, Axis("width", np.repeat(q_mask, 3 * d)))
    elif attn.qkv_slots is not None:  # the slots keep their order; the Reshape after the projection cuts them
        grid = SlotGrid.of(attn.qkv_slots, q_mask, kv_mask)
        width = np.repeat(grid.kept[0], d)
        roles[id(attn.q.output)] = _leading(attn.q.output, Axis("width", width, slots=grid))
        ctx.slot_counts = {len(grid.kept[0]), len(grid.kept[0]) * d}
    elif attn.fused_qkv:
        width = np.concatenate([np.repeat(q_mask, d), np.repeat(kv_mask, d), np.repeat(kv_mask, d)])
        roles[id(attn.q.output)] = _leading(attn.q.output, Axis("width", width))
    else:
        roles[id(attn.q.output)] = _leading(attn.q.output, Axis("width", np.repeat(q_mask, d)))
        roles[id(attn.k.output)] = _leading(attn.k.output, Axis("width", np.repeat(kv_mask, d)))
        roles[id(attn.v.output)] = _leading(attn.v.output, Axis("width", np.repeat(kv_mask, d)))

    scores, context = attn.scores_matmul, attn.context_matmul
    started_scores = started_context = False
    for node in region:
        if not started_scores and _reads(node, scores.outputs[0]):
            _start_scores(ctx, attn, roles)
            started_scores = True
        if not started_context and _reads(node, context.outputs[0]):
            _start_context(ctx, attn, roles)
            started_context = True
        _transfer(ctx, node, roles)
    if not started_scores:
        _start_scores(ctx, attn, roles)
    if not started_context:
        _start_context(ctx, attn, roles)
    for node in region:
        if _read_by_shape_only(node):
            _sizes_read_count_nothing(node, roles)

    merged = roles.get(id(attn.o.input))
    want = np.repeat(q_mask, d)
    if (
        merged is None
        or not merged[-1].counted
        or merged[-1].kind != "width"
        or merged[-1].old != attn.o.in_features
        or not np.array_equal(merged[-1].keep, want)
    ):
        raise Skip("the merged heads reaching the output projection were not traced", attn.o.matmul)
    ctx.record_shapes(region, roles)
    return ctx.edits


@dataclasses.dataclass
class LayoutContext:
    """What the rules know of the attention: its head counts and which heads are kept."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_mask: np.ndarray  # [num_heads], True = kept
    kv_mask: np.ndarray  # [num_kv_heads]
    per_group: int  # query heads kept per kept KV head
    edits: HeadEdits = dataclasses.field(default_factory=lambda: HeadEdits())
    scores_matmul: ir.Node | None = None
    context_matmul: ir.Node | None = None
    #: sizes that count head slots of a fused QKV output (their number, their width)
    slot_counts: set[int] = dataclasses.field(default_factory=set)
    #: a fused QKV output laid out per head (``Attention.qkv_per_head``): the width of one head's
    #: Q, K and V together (``3 * head_dim``), which the Reshape after the projection splits off
    per_head_width: int | None = None

    @classmethod
    def keeping(
        cls, num_heads: int, num_kv_heads: int, head_dim: int, heads: Sequence[int],
        kv_heads: Sequence[int], per_group: int, attn: Attention | None = None,
    ) -> LayoutContext:  # fmt: skip
        return cls(
            num_heads, num_kv_heads, head_dim, _mask(num_heads, heads), _mask(num_kv_heads, kv_heads),
            per_group, HeadEdits(),
            attn.scores_matmul if attn is not None else None,
            attn.context_matmul if attn is not None else None,
        )  # fmt: skip

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def rep_axis(self) -> Axis:
        keep = np.zeros(self.group, bool)
        keep[: self.per_group] = True
        return Axis("rep", keep)

    def record_shapes(self, region: list[ir.Node], roles: dict[int, Roles]) -> None:
        counts = {self.num_heads, self.num_kv_heads, self.group}
        counts |= {c * self.head_dim for c in counts} | self.slot_counts
        counts.discard(1)
        values = [out for node in region for out in node.outputs]
        values += [m.outputs[0] for m in (self.scores_matmul, self.context_matmul) if m is not None]
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


def _leading(value: ir.Value, last: Axis) -> list[Axis]:
    rank = value.shape.rank() if value.shape is not None else None
    if rank is None or rank < 1:
        raise Skip(f"projection output '{value.name}' has no known rank", value.producer())
    return [_OTHER] * (rank - 1) + [last]


def _reads(node: ir.Node, value: ir.Value) -> bool:
    return any(i is value for i in node.inputs)


def _start_scores(ctx: LayoutContext, attn: Attention, roles: dict[int, Roles]) -> None:
    q = roles.get(id(attn.scores_matmul.inputs[0]))
    if q is None or not any(a.kind == "heads" for a in q):
        raise Skip("the query heads axis at the scores MatMul was not traced", attn.scores_matmul)
    heads = next(a for a in q if a.kind == "heads")
    if not np.array_equal(heads.keep, ctx.q_mask):
        raise Skip("the query heads at the scores MatMul are not the query projection's", attn.scores_matmul)
    k = roles.get(id(attn.scores_matmul.inputs[1]))
    if k is not None:
        k_heads = [a for a in k if a.kind == "heads"]
        if len(k_heads) != 1:
            raise Skip(f"the key at the scores MatMul has no one traced heads axis ({_kinds(k)})", attn.scores_matmul)
        if k_heads[0].new != heads.new and not _one_kv_head(ctx, k_heads[0]):
            raise Skip("the key heads at the scores MatMul do not match the query heads", attn.scores_matmul)
    roles[id(attn.scores_matmul.outputs[0])] = q[:-1] + [_OTHER]


def _start_context(ctx: LayoutContext, attn: Attention, roles: dict[int, Roles]) -> None:
    probs = roles.get(id(attn.context_matmul.inputs[0]))
    if probs is None:
        raise Skip("the attention probabilities' heads axis was not traced", attn.context_matmul)
    v = roles.get(id(attn.context_matmul.inputs[1]))
    if v is not None:
        v_heads = [a for a in v if a.kind == "heads"]
        if len(v_heads) != 1:
            raise Skip(
                f"the value at the context MatMul has no one traced heads axis ({_kinds(v)})", attn.context_matmul
            )
        if v_heads[0].new != int(ctx.q_mask.sum()) and not _one_kv_head(ctx, v_heads[0]):
            raise Skip("the value heads at the context MatMul do not match the query heads", attn.context_matmul)
    roles[id(attn.context_matmul.outputs[0])] = probs[:-1] + [_DIM]


def _kinds(roles: list[Axis]) -> str:
    """The roles of a value's axes, as a Skip reason names them: ``other, heads 4, dim``."""
    return ", ".join(f"{a.kind} {a.old}" if a.counted else a.kind for a in roles)


def _one_kv_head(ctx: LayoutContext, axis: Axis) -> bool:
    """The one KV head of multi-query attention, broadcast by the MatMul to every query head."""
    return ctx.num_kv_heads == 1 and axis.old == axis.new == 1 and axis.outer == 1


def _transfer(ctx: LayoutContext, node: ir.Node, roles: dict[int, Roles]) -> None:
    """Roles of ``node``'s outputs from those of its traced inputs, by the op's rule in :data:`TRANSFER`."""
    path = [i for i, v in enumerate(node.inputs) if v is not None and id(v) in roles]
    if not path:
        raise Skip(f"{node.op_type} '{node.name}' on the attention path reads no traced value", node)
    op = node.op_type
    if not is_default_domain(node):
        raise Skip(f"{node.domain}::{op} on the attention path", node)
    rule = TRANSFER.get(op)
    if rule is None:
        raise Skip(f"{op} '{node.name}' on the attention path is not understood", node)
    for value, out in zip(node.outputs, rule(ctx, node, roles, path), strict=True):
        roles[id(value)] = out


#: A rule: (context, node, roles of the values traced so far, indices of the node's traced
#: inputs) -> the roles of each of the node's outputs. Rules record the constant edits they
#: need in ``context.edits`` and raise Skip for what they cannot follow.
Rule = Callable[[LayoutContext, ir.Node, dict[int, Roles], list[int]], list[Roles]]


def _of_first(fn: Callable[[LayoutContext, ir.Node, Roles], Roles]) -> Rule:
    """A rule for a one-output op whose roles follow from its first traced input."""

    def rule(ctx: LayoutContext, node: ir.Node, roles: dict[int, Roles], path: list[int]) -> list[Roles]:
        return [fn(ctx, node, roles[id(node.inputs[path[0]])])] * len(node.outputs)

    return rule


def _split_rule(ctx: LayoutContext, node: ir.Node, roles: dict[int, Roles], path: list[int]) -> list[Roles]:
    return _split(ctx, node, roles[id(node.inputs[path[0]])])


def _concat_rule(ctx: LayoutContext, node: ir.Node, roles: dict[int, Roles], path: list[int]) -> list[Roles]:
    return [_concat(ctx, node, roles[id(node.inputs[path[0]])], path)]


def _elementwise_rule(ctx: LayoutContext, node: ir.Node, roles: dict[int, Roles], path: list[int]) -> list[Roles]:
    return [_elementwise(ctx, node, roles, path)] * len(node.outputs)


# ------------------------------------------------------------------ shapes read from inputs


def _target(node: ir.Node, index: int, *, reading: bool = False) -> _Target:
    """The shape-like input ``index`` of ``node``; ``reading``: only its values are wanted
    (nothing will be rewritten). Shape arithmetic shared with other readers is materialized as a
    constant when it computes only constants, else marked ``shared`` (copied when rewritten)."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None:
        raise Skip(f"{node.op_type} '{node.name}' has no shape input", node)
    chain = _shape_chain(value, node)
    if chain is None:
        return _plain_target(node, index, value)
    source, readers, selects, inside, shared = chain
    target = _plain_target(node, index, source)
    avoid: list[int | None] = [None] * len(target.elems)
    fixed = [False] * len(target.elems)
    elems = list(target.elems)
    for equal_to, replacement in selects:  # innermost first
        for i, e in enumerate(elems):
            if fixed[i]:
                continue
            if e is None:
                continue
            if e == int(equal_to[i]):
                elems[i], fixed[i] = int(replacement[i]), True
            elif avoid[i] is None:
                avoid[i] = int(equal_to[i])
            else:  # two conditions on one element: keep the stricter reading, no rewrite
                fixed[i] = True
    if shared and not reading and all(e is not None for e in elems):
        return _Target(node, index, elems, None, [(-1, i) for i in range(len(elems))], materialize=True)
    return dataclasses.replace(
        target, node=node, index=index, elems=elems, source=source, source_readers=readers,
        avoid=avoid, fixed=fixed, shared=inside if shared and not reading else None,
    )  # fmt: skip


def _plain_target(node: ir.Node, index: int, value: ir.Value) -> _Target:
    arr = const_array(value)
    if arr is not None:
        elems = [int(x) for x in np.asarray(arr).ravel()]
        return _Target(node, index, elems, None, [(-1, i) for i in range(len(elems))])
    producer = value.producer()
    if producer is None or producer.op_type != "Concat":
        dims = static_dims(value)
        if dims is None or len(dims) != 1 or dims[0] is None:
            raise Skip(f"the shape input of {node.op_type} '{node.name}' has no known length", node)
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
            raise Skip(f"a part of the shape of {node.op_type} '{node.name}' has no known length", node)
        elems += [None] * dims[0]
        parts += [(part_index, i) for i in range(dims[0])]
    return _Target(node, index, elems, producer, parts)


def _rewrite(ctx: LayoutContext, target: _Target, new: list[int]) -> None:
    if new != target.elems:
        for i, (old, value) in enumerate(zip(target.elems, new, strict=True)):
            if old is None and value is not None:
                raise Skip(f"a run-time part of the shape of '{target.node.name}' would need a change", target.node)
            if old == value or target.source is None:
                continue
            if target.fixed and target.fixed[i]:
                raise Skip(
                    f"element {i} of the shape of '{target.node.name}' is chosen by run-time "
                    f"arithmetic and would need a change", target.node,
                )  # fmt: skip
            if target.avoid and target.avoid[i] is not None and value == target.avoid[i]:
                raise Skip(
                    f"element {i} of the shape of '{target.node.name}' would become {value}, which "
                    f"the shape arithmetic before it replaces", target.node,
                )  # fmt: skip
        ctx.edits.targets.append((target, new))


#: Reshape targets in a shape chain that keep a 1-D shape as it is.
_FLAT = ([-1],)
_CHAIN_LIMIT = 8
_SMALL = 64  # elements of a constant the shape arithmetic evaluator handles


def _shape_chain(
    value: ir.Value, reader: ir.Node
) -> tuple[ir.Value, list[tuple[ir.Node, int]], list[tuple[np.ndarray, np.ndarray]], list[ir.Node], bool] | None:
    """See through the arithmetic TorchScript writes between a shape and the ``Expand`` reading it.

    ``expand(x, sizes)`` with ``-1`` meaning "keep" is exported as
    ``Where(Equal(s, -1), 1, s)`` on ``s = Reshape(Concat(...), [-1])``. Returns the value the
    chain starts from (a Concat's output or a constant), its readers in the chain, and per
    ``Where`` (innermost first) the constants it compares with and substitutes, the chain's nodes
    (``reader``'s side first), and whether a value inside the chain is read by anything but the
    chain and ``reader`` (then rewriting the start would change other readers too); None when
    ``value`` is not such a chain. What the chain reads besides its start is computed from
    constants alone (:func:`_small_constant`), so a copy of its nodes computes the same.
    """
    selects: list[tuple[np.ndarray, np.ndarray]] = []
    inside: list[ir.Node] = []
    current = value
    for _ in range(_CHAIN_LIMIT):
        node = current.producer()
        if node is None or not is_default_domain(node) or const_array(current) is not None:
            break
        if node.op_type == "Reshape" and len(node.inputs) > 1:
            flat = const_array(node.inputs[1])
            dims = static_dims(node.inputs[0])
            if flat is None or [int(x) for x in np.asarray(flat).ravel()] not in [list(f) for f in _FLAT]:
                break
            if dims is None or len(dims) != 1:
                break
            inside.append(node)
            current = node.inputs[0]  # type: ignore[assignment]
            continue
        if node.op_type == "Where" and len(node.inputs) == 3:
            cond, repl, data = node.inputs
            test = cond.producer() if cond is not None else None
            if data is None or test is None or test.op_type != "Equal" or not is_default_domain(test):
                break
            if data not in test.inputs:
                break
            other = test.inputs[1] if test.inputs[0] is data else test.inputs[0]
            dims = static_dims(data)
            equal_to, replacement = _small_constant(other), _small_constant(repl)
            if dims is None or len(dims) != 1 or dims[0] is None or equal_to is None or replacement is None:
                break
            try:
                equal_to = np.broadcast_to(equal_to.ravel() if equal_to.ndim else equal_to, (dims[0],))
                replacement = np.broadcast_to(replacement.ravel() if replacement.ndim else replacement, (dims[0],))
            except ValueError:
                break
            selects.append((equal_to, replacement))
            inside += [node, test]
            current = data
            continue
        break
    if not inside:
        return None
    members = {id(n) for n in inside} | {id(reader)}
    shared = any(
        out.is_graph_output() or any(id(u.node) not in members for u in out.uses())
        for node in inside
        for out in node.outputs
    )
    readers = [(u.node, u.idx) for u in current.uses() if id(u.node) in members]
    selects.reverse()
    return current, readers, selects, inside, shared


def _small_constant(value: ir.Value | None, depth: int = 0) -> np.ndarray | None:
    """The value of a small integer tensor computed from constants only (shape arithmetic), or None."""
    if value is None or depth > 6:
        return None
    arr = const_array(value)
    if arr is not None:
        return np.asarray(arr) if np.asarray(arr).size <= _SMALL else None
    node = value.producer()
    if node is None or not is_default_domain(node) or len(node.outputs) != 1:
        return None
    args = [_small_constant(i, depth + 1) if i is not None else None for i in node.inputs]
    if any(a is None for a in args):
        return None
    op = node.op_type
    if op == "ConstantOfShape":
        shape = [int(x) for x in args[0].ravel()]  # type: ignore[union-attr]
        if np.prod(shape, dtype=np.int64) > _SMALL:
            return None
        attr = node.attributes.get("value")
        fill = attr.value.numpy().ravel() if attr is not None else np.zeros(1, np.float32)
        return np.full(shape, fill[0], dtype=fill.dtype)
    binary = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract}
    if op in binary and len(args) == 2:
        return binary[op](args[0], args[1])
    if op == "Neg" and len(args) == 1:
        return -args[0]  # type: ignore[operator]
    if op == "Identity" and len(args) == 1:
        return args[0]
    return None


def _scaled(axis: Axis, elem: int | None) -> int | None:
    """The new value of a shape element that counts ``axis``, or the element unchanged."""
    if elem is None or not axis.counted or elem in (-1, 0):
        return elem
    if elem == axis.old:
        return axis.new
    if elem == 1:
        return 1
    raise Skip(f"a shape element {elem} stands where {axis.old} ({axis.kind}) was expected")


def _reshape(ctx: LayoutContext, node: ir.Node, inp: Roles) -> Roles:
    target = _target(node, 1)
    elems = target.elems
    k = len(elems)
    d = ctx.head_dim
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
        leading_only = all(a.kind == "other" for a in inp[:-1])
        # a fused QKV output cut into head slots: [.., T*d] -> [.., T, d] or [.., KV, T/KV, d]
        if inp[-1].slots is not None and leading_only and size(k - 1) == d:
            return _slot_split(ctx, node, inp, target, size)
        # ... or into groups along a new axis, [.., T*d] -> [.., G, T/G*d] (CodeGen's mp_num groups)
        grouped = _slot_groups(ctx, node, inp, target, size) if inp[-1].slots is not None and leading_only else None
        if grouped is not None:
            return grouped
        # split: [.., H*d] -> [.., H, d]; a fused QKV laid out per head: [.., H*3d] -> [.., H, 3d]
        # (the last axis is then cut into Q, K and V inside each head, which removing heads leaves alone)
        split = d
        if (
            ctx.per_head_width is not None
            and inp[-1].kind == "width"
            and inp[-1].old == ctx.num_heads * ctx.per_head_width
        ):  # never by head_dim: that would mix one head's Q, K and V into "heads"
            split = ctx.per_head_width
        if (
            inp[-1].kind == "width" and k >= 2 and leading_only and size(k - 1) == split
            and _heads_element(inp[-1], elems, size, split)
        ):  # fmt: skip
            width = inp[-1]
            if width.old % split:
                raise Skip(f"Reshape '{node.name}' splits {width.old} channels by {split}", node)
            per_head = width.keep.reshape(-1, split)
            if not (per_head.all(axis=1) | ~per_head.any(axis=1)).all():
                raise Skip(f"Reshape '{node.name}' would split a head", node)
            heads = Axis("heads", per_head[:, 0].copy())
            _rewrite(ctx, target, elems[:-2] + [_scaled(heads, elems[-2]), elems[-1]])
            return [_OTHER] * (k - 2) + [heads, _DIM]
        # merge: [.., H, d] -> [.., H*d]
        if n >= 2 and inp[-2].kind == "heads" and inp[-1].kind == "dim" and k < n and all(
            a.kind == "other" for a in inp[:-2]
        ):
            width = Axis("width", np.repeat(inp[-2].keep, d))
            _rewrite(ctx, target, elems[:-1] + [_scaled(width, elems[-1])])
            return [_OTHER] * (k - 1) + [width]
        # the width kept whole, the axes before it regrouped (TorchScript's Conv1D: [b*s, W] <-> [b, s, W])
        if inp[-1].kind == "width" and leading_only and k >= 1 and (
            size(k - 1) == inp[-1].old or _is_last_dim_of(target, k - 1, node.inputs[0], n)
        ):
            _rewrite(ctx, target, elems[:-1] + [_scaled(inp[-1], elems[-1])])
            return [_OTHER] * (k - 1) + [inp[-1]]
        # query heads in their KV groups merged: [.., KV, slots, ..] -> [.., H, ..] (Falcon)
        for a in range(n - 1):
            if inp[a].kind == "heads" and inp[a + 1].kind == "slots" and k == n - 1:
                out = inp[:a] + [_grouped_queries(ctx, node, inp[a], inp[a + 1])] + inp[a + 2 :]
                _rewrite(ctx, target, [_scaled(r, e) for r, e in zip(out, elems, strict=True)])
                return out
        # repeat-KV merge: [.., KV, rep, ..] -> [.., H, ..]
        for a in range(n - 1):
            if inp[a].kind == "heads" and inp[a + 1].kind == "rep" and k == n - 1:
                old = inp[a].old * inp[a + 1].old
                if old != ctx.num_heads or inp[a].new * inp[a + 1].new != int(ctx.q_mask.sum()):
                    raise Skip(f"Reshape '{node.name}' merges KV heads into an unexpected count", node)
                if elems[a] is None and inp[a + 1].new != inp[a + 1].old:
                    # TorchScript writes the merged count as Shape(kv)[1] * n_rep at run time:
                    # it follows the KV heads but not a change of the repeat count
                    raise Skip(
                        f"Reshape '{node.name}' merges repeated KV heads into a count computed at "
                        f"run time, and the repeat count would change ({inp[a + 1].old} -> "
                        f"{inp[a + 1].new} query heads per KV head)", node,
                    )  # fmt: skip
                heads = Axis("heads", ctx.q_mask)
                out = inp[:a] + [heads] + inp[a + 2 :]
                _rewrite(ctx, target, [_scaled(r, e) for r, e in zip(out, elems, strict=True)])
                return out
        # same layout: every counted axis keeps its place
        if k == n and all(
            not a.counted or e in (None, -1, 0) or e == a.old for a, e in zip(inp, elems, strict=True)
        ) and all(a.counted or e is None or e in (-1, 0) or e == size(j) for j, (a, e) in enumerate(zip(inp, elems, strict=True))):
            _rewrite(ctx, target, [_scaled(a, e) for a, e in zip(inp, elems, strict=True)])
            return list(inp)
        # static shapes: axes merged or split as a whole (batch x heads for a 3-D matmul)
        regrouped = (
            _regroup(ctx, node, inp, target)
            or _batch_heads(ctx, node, inp, target)
            or _trailing_regroup(ctx, node, inp, target)
        )
        if regrouped is not None:
            return regrouped
    # anything else must be computed at run time, which adapts by itself
    if any(e is not None and e not in (-1, 0) for e in elems):
        _refuse_run_time_product(node, inp, target)
        what = "" if inp is None else f": ({_kinds(inp)}) to [{', '.join('?' if e is None else str(e) for e in elems)}]"
        raise Skip(
            f"Reshape '{node.name}' on the attention path has a constant target whose axes were not traced{what}", node
        )
    return None


def _refuse_run_time_product(node: ir.Node, inp: Roles, target: _Target) -> None:
    """Skip naming the arithmetic when an element computed at run time is a size times the head
    count (Bloom's ``[batch * heads, s, d]``: ``Mul(batch, 4)``, the 4 often shared by every layer
    and by the ALiBi tensor laid out the same way): that product is not rewritten."""
    counts = {a.old for a in inp or [] if a.kind == "heads" and a.outer == 1}
    if target.concat is None or not counts:
        return
    for (part, _), elem in zip(target.parts, target.elems, strict=True):
        if elem is not None or part < 0:
            continue
        value = target.concat.inputs[part]
        for _ in range(3):  # through Unsqueeze and Reshape to [-1] to the scalar
            producer = value.producer() if value is not None else None
            if producer is None or producer.op_type not in ("Unsqueeze", "Reshape", "Squeeze"):
                break
            value = producer.inputs[0]
        mul = value.producer() if value is not None else None
        if mul is None or mul.op_type != "Mul" or not is_default_domain(mul):
            continue
        factors = [_small_constant(v) for v in mul.inputs]
        sizes = [int(f.ravel()[0]) for f in factors if f is not None and f.size == 1]
        count = next((c for c in sizes if c in counts), None)
        if count is not None:
            raise Skip(
                f"Reshape '{node.name}' merges the heads with the batch into a size computed at run "
                f"time (Mul '{mul.name}': a size times {count}): rewriting that product is not built", node,
            )  # fmt: skip


def _heads_element(width: Axis, elems: list[int | None], size: Callable[[int], int | None], d: int) -> bool:
    """Whether the next-to-last element of a Reshape target splitting ``width`` by head_dim can be
    its head count. One head's channels (the KV head of multi-query attention) split off a width
    of ``d`` leave a one there: a target whose element is not known to be one is not such a split
    (``[b, 1, G, s, d] -> [b, G, s, d]`` of repeat-KV would make the sequence axis the heads)."""
    if width.old != d:
        return True
    return elems[-2] == 1 or size(len(elems) - 2) == 1


def _slot_split(
    ctx: LayoutContext, node: ir.Node, inp: list[Axis], target: _Target, size: Callable[[int], int | None]
) -> Roles:
    """The Reshape cutting a fused QKV output into head slots (``Attention.qkv_slots``).

    ``[.., T*d] -> [.., T, d]``: one axis of all the slots (multi-query Falcon). ``[.., T*d] ->
    [.., KV, T/KV, d]``: a groups axis, one KV head each (its role is those KV heads), and the
    slots of each group (Falcon's new decoder architecture).
    """
    grid = inp[-1].slots
    assert grid is not None
    elems, k, n = target.elems, len(target.elems), len(inp)
    total = grid.kept.shape[1]
    if k == n + 1 and size(k - 2) in (None, total):
        axis = grid.axis()
        _rewrite(ctx, target, elems[:-2] + [_scaled(axis, elems[-2]), elems[-1]])
        return [_OTHER] * (k - 2) + [axis, _DIM]
    per_row = size(k - 2)
    if k == n + 2 and per_row is not None and total % per_row == 0:
        axis = grid.regrouped(per_row, ctx, node).axis()
        groups = Axis("heads", ctx.kv_mask)
        _rewrite(ctx, target, elems[:-3] + [_scaled(groups, elems[-3]), _scaled(axis, elems[-2]), elems[-1]])
        return [_OTHER] * (k - 3) + [groups, axis, _DIM]
    raise Skip(f"Reshape '{node.name}' cuts the fused QKV output into head slots in a way not understood", node)


def _slot_groups(
    ctx: LayoutContext, node: ir.Node, inp: list[Axis], target: _Target, size: Callable[[int], int | None]
) -> Roles:
    """The Reshape cutting a fused QKV output into groups of head slots, ``[.., T*d] -> [.., G,
    T/G*d]``, each group then cut into its parts by a Split (CodeGen: ``mp_num`` groups, query,
    value and key in each). Understood when group ``g`` is one head, query head ``g`` with its key
    and value: the groups axis is then the heads axis, and a head leaves with its whole group.
    None when the target is not such a cut (a constant ``G``, the group's width or a ``-1``)."""
    grid = inp[-1].slots
    assert grid is not None
    elems, k = target.elems, len(target.elems)
    total, groups = grid.kept.shape[1], elems[-2] if k == len(inp) + 1 else None
    if groups is None or groups < 2 or total % groups:
        return None
    per_group = total // groups
    width = per_group * ctx.head_dim
    if size(k - 1) != width and not (  # a -1 is the group's width when the axes before are the input's
        elems[-1] == -1 and all(_keeps_axis(node, target, j, inp[j]) for j in range(k - 2))
    ):
        return None
    (flat,) = grid.labels
    queries = [[i for kind, i in flat[g * per_group : (g + 1) * per_group] if kind == "q"] for g in range(groups)]
    if queries != [[g] for g in range(groups)]:  # several heads a group would lose heads inside groups
        raise Skip(
            f"Reshape '{node.name}' cuts the fused QKV output into {groups} groups of head slots holding "
            f"query heads {queries}: only groups of one head each are understood", node,
        )  # fmt: skip
    grid.regrouped(per_group, ctx, node)  # each group also holds that head's key and value
    if not np.array_equal(ctx.q_mask, ctx.kv_mask):
        raise Skip(f"Reshape '{node.name}' cuts the fused QKV output into heads whose query and KV heads differ", node)
    heads = Axis("heads", ctx.q_mask.copy())
    _rewrite(ctx, target, elems[:-2] + [_scaled(heads, elems[-2]), elems[-1]])
    return [_OTHER] * (k - 2) + [heads, _OTHER]


def _grouped_queries(ctx: LayoutContext, node: ir.Node, groups: Axis, slots: Axis) -> Axis:
    """The query heads of a Reshape merging KV groups with the query slots each group holds."""
    grid = slots.slots
    labels = [label for row in grid.labels for label in row] if grid is not None else []
    if (
        grid is None
        or not grid.grouped
        or labels != [("q", h) for h in range(ctx.num_heads)]
        or groups.keep is None
        or not np.array_equal(groups.keep, ctx.kv_mask)
    ):
        raise Skip(f"Reshape '{node.name}' merges head slots of the fused QKV output that are not the query heads", node)
    return Axis("heads", ctx.q_mask)


def _selected(ctx: LayoutContext, grid: SlotGrid) -> Axis:
    """The role of the slots a Slice, Split, Gather or GatherND selected: all the query heads,
    keys or values in order become their heads axis; one key or value per KV group is no head
    axis (the groups axis before it counts the KV heads); anything else stays slots."""
    kinds = {kind for row in grid.labels for kind, _ in row}
    if not grid.grouped and len(kinds) == 1:
        kind = kinds.pop()
        count = ctx.num_heads if kind == "q" else ctx.num_kv_heads
        if [i for _, i in grid.labels[0]] == list(range(count)):
            return Axis("heads", (ctx.q_mask if kind == "q" else ctx.kv_mask).copy())
    if grid.grouped and kinds in ({"k"}, {"v"}) and all(len(row) == 1 for row in grid.labels):
        return _OTHER
    return grid.axis()


def _relative(new: int, old: int, extent: int) -> int:
    """``new`` written as ``old`` was: from the end when ``old`` was negative."""
    return new - extent if old < 0 and new < extent else new


def _is_last_dim_of(target: _Target, index: int, value: ir.Value | None, rank: int) -> bool:
    """Whether element ``index`` of ``target`` is computed at run time as the last dim of ``value``."""
    source = _shape_element(target, index)
    return source is not None and source[0] is value and source[1] == rank - 1


def _shape_element(target: _Target, index: int) -> tuple[ir.Value, int] | None:
    """The value and axis whose size element ``index`` of ``target`` is, when computed at run
    time from ``Shape(value)``, sliced or gathered, squeezed and unsqueezed (as TorchScript writes
    ``x.size(-1)`` and ``x.shape[:-2]``); None otherwise."""
    if target.concat is None or target.elems[index] is not None:
        return None
    part, offset = target.parts[index]
    current = target.concat.inputs[part]
    for _ in range(_CHAIN_LIMIT):
        node = current.producer() if current is not None else None
        if node is None or not is_default_domain(node):
            return None
        if node.op_type in ("Squeeze", "Unsqueeze", "Cast", "Identity"):
            current = node.inputs[0]
            continue
        shape = node if node.op_type == "Shape" else node.inputs[0].producer() if node.inputs[0] is not None else None
        if shape is None or shape.op_type != "Shape" or shape.attributes or shape.inputs[0] is None:
            return None
        rank = _rank(shape.inputs[0])
        if rank is None:
            return None
        if node is shape:
            return (shape.inputs[0], offset) if offset < rank else None
        if node.op_type == "Gather":
            index_arr = const_array(node.inputs[1])
            if index_arr is None or index_arr.size != 1 or offset != 0:
                return None
            axis = int(index_arr.ravel()[0])
            return (shape.inputs[0], axis % rank) if -rank <= axis < rank else None
        if node.op_type != "Slice":
            return None
        bounds = [const_array(i) for i in node.inputs[1:]]
        if any(b is None or b.size != 1 for b in bounds):
            return None
        start, end, *rest = (int(b.ravel()[0]) for b in bounds)  # type: ignore[union-attr]
        if rest not in ([], [0], [-1], [0, 1], [-1, 1]):  # the one axis of the shape, step 1
            return None
        axis = _clamp(start, rank) + offset
        return (shape.inputs[0], axis) if axis < _clamp(end, rank) else None
    return None


def _same_axis(source: ir.Value, value: ir.Value | None, j: int, depth: int = 0) -> bool:
    """Whether axis ``j`` of ``value`` is axis ``j`` of ``source``: ``value`` is computed from it
    by ops that keep every axis up to ``j`` (a Split, Slice, Concat, Squeeze or Unsqueeze of later
    axes, a Transpose leaving them in place, a Reshape keeping them, one-input elementwise ops)."""
    current = value
    for _ in range(_CHAIN_LIMIT):
        if current is source:
            return True
        node = current.producer() if current is not None else None
        rank = _rank(current)
        if node is None or not is_default_domain(node) or rank is None or depth > 2:
            return False
        op = node.op_type
        if op in ("Split", "Concat"):
            attr = node.attributes.get("axis")
            later = (int(attr.value) if attr is not None else 0) % rank > j
        elif op == "Slice":
            later = all(a + rank > j for a in _sliced_axes(node, rank))
        elif op in ("Squeeze", "Unsqueeze"):
            try:
                axes = _axes(node) or []
            except Skip:  # axes computed at run time
                return False
            axis_rank = rank if op == "Unsqueeze" else _rank(node.inputs[0])
            later = bool(axes) and axis_rank is not None and all(a % axis_rank > j for a in axes)
        elif op == "Transpose":
            perm = node.attributes.get("perm")
            later = perm is not None and list(perm.value)[: j + 1] == list(range(j + 1))
        elif op == "Reshape":
            try:
                target = _target(node, 1, reading=True)
            except Skip:
                return False
            later = all(_keeps_axis(node, target, i, _OTHER, depth + 1) for i in range(j + 1))
        else:
            later = op in _SAME_SHAPE
        if not later:
            return False
        current = node.inputs[0]
    return False


def _regroup(ctx: LayoutContext, node: ir.Node, inp: list[Axis], target: _Target) -> Roles:
    """A Reshape between fully static shapes that merges or splits whole groups of axes.

    Input and output dims are aligned into groups of equal products. A group of one axis keeps
    its role; ``[.., other.., heads] -> [one axis]`` merges the heads with the axes before them
    into a composite heads axis (``outer`` = their product); ``[composite] -> [outer, heads]``
    splits it back. None when the shapes are not all known or a group is anything else.
    """
    in_dims, out_dims = static_dims(node.inputs[0]), static_dims(node.outputs[0])
    if in_dims is None or out_dims is None or None in in_dims or None in out_dims or len(in_dims) != len(inp):
        return None
    groups = _align(in_dims, out_dims)  # type: ignore[arg-type]
    if groups is None:
        return None
    elems = list(target.elems)
    if len(elems) != len(out_dims):
        return None
    out: list[Axis] = []
    new = list(elems)
    for (ia, ib), (oa, ob) in groups:
        roles = inp[ia:ib]
        counted = [a for a in roles if a.counted]
        if not counted:
            out += [roles[0] if ib - ia == 1 and ob - oa == 1 else _OTHER] * (ob - oa)
            continue
        if ib - ia == 1 and ob - oa == 1:
            role = roles[0]
        elif ob - oa == 1 and len(counted) == 1 and roles[-1] is counted[0] and counted[0].kind == "heads" and counted[0].outer == 1:
            role = Axis("heads", counted[0].keep, outer=int(np.prod(in_dims[ia : ib - 1])))  # type: ignore[arg-type]
        elif (
            ob - oa == 1 and len(counted) == 2 and ib - ia >= 2
            and roles[-2].kind == "heads" and roles[-1].kind == "rep" and roles[-2].outer == 1
        ):  # fmt: skip
            # [.., KV, rep] -> [B*H]: repeated KV heads merged with the batch (repeat-KV, 3-D matmul)
            if roles[-2].old * roles[-1].old != ctx.num_heads or roles[-2].new * roles[-1].new != int(ctx.q_mask.sum()):
                raise Skip(f"Reshape '{node.name}' merges KV heads into an unexpected count", node)
            role = Axis("heads", ctx.q_mask, outer=int(np.prod(in_dims[ia : ib - 2])))  # type: ignore[arg-type]
        elif (
            ib - ia == 1 and ob - oa == 2 and roles[0].kind == "heads" and roles[0].outer > 1
            and out_dims[oa] == roles[0].outer and roles[0].keep is not None
            and out_dims[oa + 1] == roles[0].keep.shape[0]
        ):  # fmt: skip
            heads = Axis("heads", roles[0].keep)
            out += [_OTHER, heads]
            new[oa + 1] = _scaled(heads, elems[oa + 1])
            continue
        else:
            return None
        out.append(role)
        new[oa] = _scaled(role, elems[oa])
    _rewrite(ctx, target, new)  # type: ignore[arg-type]
    return out


def _trailing_regroup(ctx: LayoutContext, node: ir.Node, inp: list[Axis], target: _Target) -> Roles:
    """A Reshape that keeps every axis up to the last counted one and regroups only those after it.

    Interleaved rotary (GPT-J's ``rotate_every_two``, Cohere, GLM): ``stack((-x2, x1), -1)``
    of the two halves taken by stepped Slices, ``[.., H, d/2, 2]``, flattened back to
    ``[.., H, d]``. The regrouped axes count nothing (their product does not change); the kept
    ones keep their roles and the counted ones' constants are rewritten. Each kept axis must be
    provably the input's (:func:`_keeps_axis`); None when one is not.
    """
    counted = [j for j, a in enumerate(inp) if a.counted]
    if not counted or counted[-1] >= len(inp) - 1 or len(target.elems) <= counted[-1] + 1:
        return None
    last = counted[-1]
    if not all(_keeps_axis(node, target, j, inp[j]) for j in range(last + 1)):
        return None
    elems = target.elems
    _rewrite(ctx, target, [_scaled(a, e) for a, e in zip(inp[: last + 1], elems, strict=False)] + elems[last + 1 :])
    return inp[: last + 1] + [_OTHER] * (len(elems) - last - 1)


def _keeps_axis(node: ir.Node, target: _Target, j: int, role: Axis, depth: int = 0) -> bool:
    """Whether output axis ``j`` of a Reshape is its input's axis ``j``, given that every axis
    before it is: its target element copies it (``0``; at run time ``Shape(v)[j]`` of a value
    ``v`` whose axis ``j`` it is), or is its extent (the count of a counted axis, a static size),
    or the annotations of input and output agree on it (one static size, one named dim) and the
    element may stand for it."""
    e = target.elems[j]
    allowzero = node.attributes.get("allowzero")
    if e == 0 and (allowzero is None or not int(allowzero.value)):
        return True
    x = node.inputs[0]
    rank = _rank(x)
    if x is None or rank is None:
        return False
    source = _shape_element(target, j)
    if source is not None and source[1] == j and _same_axis(source[0], x, j, depth):
        return True
    dims = static_dims(x) or [None] * rank
    after = _product(target.elems[j + 1 :])
    if e == -1 and after is not None and after == _product(dims[j + 1 :]):
        return True  # the axes after it are constants as large as the input's: the -1 is this axis
    size = role.old if role.counted else dims[j]
    if e is not None and e > 0:
        return e == size
    out = node.outputs[0].shape
    if out is None or out.rank() != len(target.elems):
        return False
    before, after = x.shape[j], out[j]  # type: ignore[index]
    named = isinstance(before, ir.SymbolicDim) and before.value is not None
    return (isinstance(before, int) or named) and before == after


def _product(sizes: Sequence[int | None]) -> int | None:
    """The product of static sizes; None when one is not a known positive size."""
    if any(x is None or x <= 0 for x in sizes):
        return None
    return int(np.prod(sizes, dtype=np.int64))


def _batch_heads(ctx: LayoutContext, node: ir.Node, inp: list[Axis], target: _Target) -> Roles:
    """A run-time batch merged with the heads into a leading ``-1``, or split back out of it.

    ``[b, H, s, d] -> [-1, s, d]`` and ``[-1, s, d] -> [-1, H, s, d]`` (the 3-D matmul of a
    transposed key, once the shapes an export computes at run time are folded into constants):
    the axes after the leading ones are constants whose product is the input's, so the ``-1``
    is exactly batch x heads. The merged axis is a heads axis of an unknown number of blocks
    (``outer = 0``). None for anything else.
    """
    elems, dims = target.elems, static_dims(node.inputs[0])
    if dims is None or not elems or elems[0] != -1 or any(e is None or e <= 0 for e in elems[1:]):
        return None
    splitting = inp[0].kind == "heads" and inp[0].outer != 1
    lead = 1 if splitting else next((i + 1 for i, a in enumerate(inp) if a.counted), 0)
    rest, rest_elems = inp[lead:], elems[2:] if splitting else elems[1:]
    rest_dims = dims[lead:]
    if (
        lead == 0
        or any(a.counted for a in rest)
        or any(d is None for d in rest_dims)
        or int(np.prod(rest_dims)) != int(np.prod(rest_elems))  # type: ignore[arg-type]
    ):
        return None
    same = list(rest_dims) == list(rest_elems)  # the trailing axes kept one for one: their roles too
    tail = list(rest) if same else [_OTHER] * len(rest_elems)
    heads = inp[lead - 1]
    if splitting:
        assert heads.keep is not None
        if elems[1] != heads.keep.shape[0]:
            return None
        inner = Axis("heads", heads.keep)
        _rewrite(ctx, target, [-1, _scaled(inner, elems[1]), *rest_elems])
        return [_OTHER, inner, *tail]
    if heads.kind != "heads" or heads.outer != 1 or any(a.kind != "other" for a in inp[: lead - 1]):
        return None
    return [Axis("heads", heads.keep, outer=0), *tail]


def _align(a: list[int], b: list[int]) -> list[tuple[tuple[int, int], tuple[int, int]]] | None:
    """Split two shapes of equal size into consecutive groups of axes with equal products."""
    groups = []
    i = j = 0
    while i < len(a) or j < len(b):
        i0, j0 = i, j
        pa = pb = 1
        if i < len(a):
            pa *= a[i]
            i += 1
        if j < len(b):
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                pb *= b[j]
                j += 1
            else:
                return None
        groups.append(((i0, i), (j0, j)))
    return groups


def _expand(ctx: LayoutContext, node: ir.Node, inp: Roles) -> Roles:
    target = _target(node, 1)
    elems = target.elems
    k = len(elems)
    if inp is None:
        if any(e is not None and e != 1 for e in elems):
            raise Skip(f"Expand '{node.name}' on an untraced layout has a constant shape", node)
        return None
    n = len(inp)
    if k < n:
        k = n
        elems = [1] * (n - len(elems)) + elems  # never happens in valid ONNX
    in_dims = static_dims(node.inputs[0]) or [None] * n
    out: list[Axis] = [_OTHER] * (k - n)
    for j in range(k - n, k):
        role = inp[j - (k - n)]
        before = out[-1] if out else None
        e = elems[j]
        if (
            role.kind == "other"
            and in_dims[j - (k - n)] == 1
            and before is not None
            and e is not None
            and e == ctx.group
            and ctx.group > 1
        ):
            if before.kind == "heads":
                role = ctx.rep_axis()
            elif _single_kv_head(ctx, out, inp, in_dims, elems, j - (k - n)):
                out[-1] = Axis("heads", ctx.kv_mask.copy())
                role = ctx.rep_axis()
                inp = inp[:-1] + [_DIM]
        out.append(role)
    _rewrite(ctx, target, [_scaled(r, e) for r, e in zip(out, elems, strict=True)])
    return out


def _single_kv_head(
    ctx: LayoutContext, out: list[Axis], inp: list[Axis], in_dims: list[int | None], elems: list[int | None], j: int
) -> bool:
    """Whether axis ``j - 1`` of an Expand's input is the KV heads axis of multi-query attention
    and axis ``j`` its repeat: ``[.., 1, 1, .., width]`` (GPT-BigCode, ``[b, 1, 1, s, d]``
    expanded to ``[b, 1, H, s, d]``), the one KV head's channels whole on the last axis, an axis
    of one before the repeat that the Expand leaves at one. Then the last axis is its head_dim."""
    last = inp[-1]
    return (
        ctx.num_kv_heads == 1
        and j >= 1
        and j < len(inp) - 1
        and out[-1].kind == "other"
        and in_dims[j - 1] == 1
        and elems[len(out) - 1] == 1
        and last.kind == "width"
        and last.slots is None
        and last.outer == 1
        and last.old == ctx.head_dim
        and bool(last.keep.all())  # type: ignore[union-attr]
        and not any(a.counted for a in inp[:-1])
    )


def _transpose(ctx: LayoutContext, node: ir.Node, inp: Roles) -> Roles:
    if inp is None:
        return None
    perm_attr = node.attributes.get("perm")
    perm = list(perm_attr.value) if perm_attr is not None else list(range(len(inp)))[::-1]
    if len(perm) != len(inp):
        raise Skip(f"Transpose '{node.name}' permutes {len(perm)} axes of a rank-{len(inp)} value", node)
    return [inp[p] for p in perm]


def _axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        if arr is None:
            raise Skip(f"{node.op_type} '{node.name}' has axes computed at run time", node)
        return [int(x) for x in np.asarray(arr).ravel()]
    attr = node.attributes.get("axes")
    return list(attr.value) if attr is not None else None


def _unsqueeze(ctx: LayoutContext, node: ir.Node, inp: Roles) -> Roles:
    if inp is None:
        return None
    axes = _axes(node) or []
    rank = len(inp) + len(axes)
    axes = sorted(a + rank if a < 0 else a for a in axes)
    out = list(inp)
    for a in axes:
        out.insert(a, _OTHER)
    return out


def _squeeze(ctx: LayoutContext, node: ir.Node, inp: Roles) -> Roles:
    if inp is None:
        return None
    axes = _axes(node)
    if axes is None:
        raise Skip(f"Squeeze '{node.name}' without axes on the attention path", node)
    axes = {a + len(inp) if a < 0 else a for a in axes}
    if any(inp[a].counted and inp[a].old > 1 for a in axes):
        raise Skip(f"Squeeze '{node.name}' removes a heads axis", node)
    return [r for i, r in enumerate(inp) if i not in axes]


def _slice(ctx: LayoutContext, node: ir.Node, inp: Roles) -> Roles:
    if inp is None:
        raise Skip(f"Slice '{node.name}' on an untraced layout", node)
    starts, ends = _target(node, 1), _target(node, 2)
    axes = _target(node, 3).elems if len(node.inputs) > 3 and node.inputs[3] is not None else list(range(len(starts.elems)))
    steps = _target(node, 4).elems if len(node.inputs) > 4 and node.inputs[4] is not None else [1] * len(starts.elems)
    if any(x is None for x in [*axes, *steps]):
        raise Skip(f"Slice '{node.name}' on the attention path has run-time axes or steps", node)
    out = list(inp)
    new_starts, new_ends = list(starts.elems), list(ends.elems)
    for i, (axis, step) in enumerate(zip(axes, steps, strict=True)):
        axis = axis + len(inp) if axis < 0 else axis
        role = inp[axis]
        if not role.counted:
            # bounds computed at run time are fine here (rotate_half's halves of head_dim,
            # TorchScript's Shape(x)[-1] // 2): this axis counts no heads
            out[axis] = _OTHER
            continue
        if starts.elems[i] is None or ends.elems[i] is None:
            raise Skip(f"Slice '{node.name}' cuts a {role.kind} axis at run-time bounds", node)
        start, end = _clamp(starts.elems[i], role.old), _clamp(ends.elems[i], role.old)
        if step != 1:
            raise Skip(f"Slice '{node.name}' steps through a heads axis", node)
        if role.kind == "heads" and (start, end) == (0, role.old):
            continue
        if role.slots is not None and role.kind == "slots":
            grid = role.slots
            new_start, new_end = grid.bounds(start, end, node)
            new_starts[i] = _relative(new_start, starts.elems[i], role.new)
            new_ends[i] = ends.elems[i] if ends.elems[i] >= role.old else _relative(new_end, ends.elems[i], role.new)
            out[axis] = _selected(ctx, grid.take(range(start, end)))
            continue
        if role.kind != "width" or role.slots is not None:
            what = "the head slots of a fused QKV output along its width" if role.slots is not None else f"a {role.kind} axis"
            raise Skip(f"Slice '{node.name}' cuts {what}", node)
        new_starts[i] = int(role.keep[:start].sum())
        new_ends[i] = new_starts[i] + int(role.keep[start:end].sum())
        if ends.elems[i] >= role.old and new_ends[i] == int(role.keep.sum()):
            new_ends[i] = ends.elems[i]  # keep "to the end" sentinels as they are
        out[axis] = Axis("width", role.keep[start:end].copy())
    _rewrite(ctx, starts, new_starts)
    _rewrite(ctx, ends, new_ends)
    return out


def _clamp(x: int, size: int) -> int:
    x = x + size if x < 0 else x
    return min(max(x, 0), size)


def _split(ctx: LayoutContext, node: ir.Node, inp: Roles) -> list[Roles]:
    if inp is None:
        raise Skip(f"Split '{node.name}' on an untraced layout", node)
    axis_attr = node.attributes.get("axis")
    axis = int(axis_attr.value) if axis_attr is not None else 0
    axis = axis + len(inp) if axis < 0 else axis
    role = inp[axis]
    count = len(node.outputs)
    if not role.counted:
        return [list(inp[:axis]) + [_OTHER] + list(inp[axis + 1 :]) for _ in range(count)]
    if role.kind not in ("width", "slots") or (role.kind == "width" and role.slots is not None):
        what = "the head slots of a fused QKV output along its width" if role.slots is not None else f"a {role.kind} axis"
        raise Skip(f"Split '{node.name}' splits {what}", node)
    sizes: list[int] | None = None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        target = _target(node, 1)
        if any(e is None for e in target.elems):
            raise Skip(f"Split '{node.name}' has run-time sizes", node)
        sizes = [int(e) for e in target.elems]  # type: ignore[arg-type]
    elif role.old % count == 0:
        sizes = [role.old // count] * count
    if sizes is None or sum(sizes) != role.old:
        raise Skip(f"Split '{node.name}' sizes do not add up to the fused width", node)
    out: list[Roles] = []
    new_sizes = []
    start = 0
    for size in sizes:
        if role.slots is not None:  # Q, K and V slots split apart (the same cut in every KV group)
            first, last = role.slots.bounds(start, start + size, node)
            new_sizes.append(last - first)
            part_axis = _selected(ctx, role.slots.take(range(start, start + size)))
        else:
            part = role.keep[start : start + size].copy()
            new_sizes.append(int(part.sum()))
            part_axis = Axis("width", part)
        out.append(list(inp[:axis]) + [part_axis] + list(inp[axis + 1 :]))
        start += size
    if new_sizes != sizes:
        ctx.edits.split_sizes.append((node, new_sizes))
    return out


def _gather_rule(ctx: LayoutContext, node: ir.Node, roles: dict[int, Roles], path: list[int]) -> list[Roles]:
    """``Gather`` from a traced value with constant indices: of head slots (Falcon's K and V,
    TorchScript), rewritten to the slots' new places; of uncounted axes, passed through."""
    inp = roles[id(node.inputs[0])] if path == [0] else None
    if inp is None:
        raise Skip(f"Gather '{node.name}' on an untraced layout or with traced indices", node)
    axis_attr = node.attributes.get("axis")
    axis = int(axis_attr.value) if axis_attr is not None else 0
    axis = axis + len(inp) if axis < 0 else axis
    indices = const_array(node.inputs[1])
    role = inp[axis]
    if not role.counted:
        rank = np.asarray(indices).ndim if indices is not None else _rank(node.inputs[1])
        if rank is None:
            raise Skip(f"Gather '{node.name}' has indices of unknown rank", node)
        return [inp[:axis] + [_OTHER] * rank + inp[axis + 1 :]]
    if indices is None or np.asarray(indices).ndim > 1:
        raise Skip(f"Gather '{node.name}' selects from a {role.kind} axis with indices it cannot follow", node)
    picked, new = _pick_slots(ctx, node, role, np.asarray(indices))
    _set_indices(ctx, node, indices, new)
    return [inp[:axis] + ([picked] if picked is not None else []) + inp[axis + 1 :]]


def _gather_nd_rule(ctx: LayoutContext, node: ir.Node, roles: dict[int, Roles], path: list[int]) -> list[Roles]:
    """``GatherND`` of whole leading positions with constant indices (dynamo's Falcon: K and V
    slots of ``[slots, .., head_dim]``): like Gather along axis 0 when only that axis is indexed."""
    inp = roles[id(node.inputs[0])] if path == [0] else None
    batch = node.attributes.get("batch_dims")
    indices = const_array(node.inputs[1])
    if inp is None or indices is None or (batch is not None and int(batch.value)):
        raise Skip(f"GatherND '{node.name}' on the attention path is not understood", node)
    indices = np.asarray(indices)
    depth = int(indices.shape[-1]) if indices.ndim else 0
    if depth < 1 or depth > len(inp):
        raise Skip(f"GatherND '{node.name}' has indices of shape {list(indices.shape)}", node)
    if not any(a.counted for a in inp[:depth]):
        return [[_OTHER] * (indices.ndim - 1) + inp[depth:]]
    if depth != 1 or indices.ndim > 2:
        raise Skip(f"GatherND '{node.name}' selects from a {inp[0].kind} axis with indices it cannot follow", node)
    picked, new = _pick_slots(ctx, node, inp[0], indices[..., 0] if indices.ndim == 2 else indices[0])
    _set_indices(ctx, node, indices, np.asarray(new).reshape(-1, 1) if indices.ndim == 2 else np.asarray(new).reshape(1))
    return [([picked] if picked is not None else []) + inp[1:]]


def _pick_slots(ctx: LayoutContext, node: ir.Node, role: Axis, indices: np.ndarray) -> tuple[Axis | None, np.ndarray]:
    """The role of the head slots at ``indices`` (0-D: the axis goes; 1-D: it stays, selected)
    and the indices of the kept ones after the removal, written as before (from the end when negative)."""
    grid = role.slots
    if role.kind != "slots" or grid is None:
        raise Skip(f"{node.op_type} '{node.name}' selects from a {role.kind} axis", node)
    flat = [int(i) for i in indices.ravel()]
    if any(not -role.old <= i < role.old for i in flat):
        raise Skip(f"{node.op_type} '{node.name}' selects head slots out of range", node)
    positions = [i + role.old if i < 0 else i for i in flat]
    new_positions, keep = grid.picks(positions, node)
    picked = _selected(ctx, grid.take(positions))
    kept_old = [i for i, k in zip(flat, keep, strict=True) if k]
    new = [_relative(n, o, role.new) for n, o in zip(new_positions, kept_old, strict=True)]
    if indices.ndim == 0:
        if not keep.all() or (picked.counted and picked.old != 1):
            raise Skip(f"{node.op_type} '{node.name}' selects one head slot and drops its axis", node)
        return None, np.asarray(new[0], np.int64)
    if not new:
        raise Skip(f"{node.op_type} '{node.name}' selects only head slots that are removed", node)
    return picked, np.asarray(new, np.int64)


def _set_indices(ctx: LayoutContext, node: ir.Node, old: np.ndarray, new: np.ndarray) -> None:
    if np.asarray(old).shape != new.shape or not np.array_equal(np.asarray(old), new):
        ctx.edits.constants.append((node, 1, new))


def _rank(value: ir.Value | None) -> int | None:
    return value.shape.rank() if value is not None and value.shape is not None else None


def _concat(ctx: LayoutContext, node: ir.Node, first: Roles, path: list[int]) -> Roles:
    if first is None:
        raise Skip(f"Concat '{node.name}' on an untraced layout", node)
    axis_attr = node.attributes.get("axis")
    axis = int(axis_attr.value) if axis_attr is not None else 0
    axis = axis + len(first) if axis < 0 else axis
    if first[axis].counted:
        raise Skip(f"Concat '{node.name}' joins along a {first[axis].kind} axis", node)
    past = _cache_input(node)
    for i, value in enumerate(node.inputs):
        if i not in path and value is not None:
            if value is past:
                _cache_operand(ctx, node, value, first)
            else:
                _broadcast_operand(ctx, node, i, first)
    out = list(first)
    out[axis] = _OTHER
    return out


def _cache_operand(ctx: LayoutContext, node: ir.Node, past: ir.Value, roles: list[Axis]) -> None:
    """The past key/value input of a KV cache Concat: its declared heads shrink with the heads.

    The caller feeds the graph's present output back as the next past, so the input's heads
    axis counts what the present output does; only its declared shape changes. It must be read
    (as data) by this Concat alone.
    """
    dims = static_dims(past)
    if dims is None or len(dims) != len(roles):
        raise Skip(f"the KV cache input '{past.name}' has no shape of rank {len(roles)}", node)
    readers = [u.node for u in data_uses(past)]
    if any(r is not node for r in readers):
        others = ", ".join(f"{r.op_type} '{r.name}'" for r in readers if r is not node)
        raise Skip(f"the KV cache input '{past.name}' is also read by {others}", node)
    new: list[int | str | ir.SymbolicDim | None] = list(past.shape.dims)  # type: ignore[union-attr]
    changed = False
    for j, (axis, size) in enumerate(zip(roles, dims, strict=True)):
        if not axis.counted:
            continue
        if size is None or size != axis.old:
            raise Skip(
                f"the KV cache input '{past.name}' has {size if size is not None else 'a symbolic'} "
                f"entries on its {axis.kind} axis of {axis.old}", node,
            )  # fmt: skip
        if axis.new != axis.old:
            new[j] = axis.new
            changed = True
    if changed:
        ctx.edits.shapes.append((past, ir.Shape(new)))
        ctx.edits.cache_inputs.append(past)


def _elementwise(ctx: LayoutContext, node: ir.Node, roles: dict[int, Roles], path: list[int]) -> Roles:
    known = [roles[id(node.inputs[i])] for i in path]
    out_rank = max(len(r) if r is not None else 0 for r in known)
    rank_out = node.outputs[0].shape.rank() if node.outputs[0].shape is not None else None
    if any(r is None for r in known):
        for i, value in enumerate(node.inputs):
            if i not in path and value is not None:
                arr = const_array(value)
                if arr is None or arr.size != 1:
                    raise Skip(f"{node.op_type} '{node.name}' mixes an untraced layout with another tensor", node)
        return None
    result: list[Axis] = [_OTHER] * out_rank
    for r in known:
        offset = out_rank - len(r)  # type: ignore[arg-type]
        for j, axis in enumerate(r):  # type: ignore[union-attr]
            if axis.counted or axis.kind == "dim":
                current = result[offset + j]
                if current.counted and axis.counted and not np.array_equal(current.keep, axis.keep):
                    if current.new != axis.new:
                        raise Skip(f"{node.op_type} '{node.name}' combines different head sets", node)
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
            raise Skip(f"{node.op_type} '{node.name}' normalises over heads", node)
    return result


def _broadcast_operand(ctx: LayoutContext, node: ir.Node, index: int, roles: list[Axis]) -> None:
    """A tensor combined with a path value: size 1 on counted axes, or the full extent, whose kept
    entries are taken: a constant is sliced, a tensor computed at run time is read through a
    ``Gather`` of the kept indices."""
    value = node.inputs[index]
    if value is None:
        return
    arr = const_array(value)
    dims = list(arr.shape) if arr is not None else static_dims(value)
    if dims is None:
        if any(a.counted for a in roles):
            raise Skip(f"{node.op_type} '{node.name}' reads a tensor of unknown shape", node)
        return
    offset = len(roles) - len(dims)
    takes: list[tuple[int, np.ndarray]] = []
    for j, size in enumerate(dims):
        if j + offset < 0:
            continue
        axis = roles[j + offset]
        if axis.counted and size is None and arr is None:
            # a mask built at run time (TorchScript's causal mask, [b, 1, q, k] expanded from
            # shapes): its extent on this axis, worked out from how it was built
            size = _extent(value, j - len(dims))
            if size is None:
                raise Skip(
                    f"{node.op_type} '{node.name}' reads '{value.name}', whose extent on the "
                    f"{axis.kind} axis is computed at run time and not known to be 1 or {axis.old}", node,
                )  # fmt: skip
        if not axis.counted or size == 1:
            continue
        if axis.kind == "slots":  # kept slots may differ per KV group: no one mask slices it
            raise Skip(f"{node.op_type} '{node.name}' reads '{value.name}', which varies along the head slots", node)
        if size != axis.old:
            raise Skip(
                f"{node.op_type} '{node.name}' reads '{value.name}' with {size} entries on a "
                f"{axis.kind} axis of {axis.old}"
            )
        takes.append((j, np.flatnonzero(axis.full_keep)))
    if not takes:
        return
    if arr is None:
        ctx.edits.gathers.append((node, index, takes))
        return
    for j, kept in takes:
        arr = np.take(arr, kept, axis=j)
    ctx.edits.constants.append((node, index, arr))


def _reduce_mean(ctx: LayoutContext, node: ir.Node, inp: Roles) -> Roles:
    """``ReduceMean`` of a norm on the attention path (QK-norm): over ``head_dim`` (per head) or
    over the projection's ``width`` (OLMo2, before the head split; the mean is then taken over
    the kept heads' channels). Never over heads or the KV repeat."""
    if inp is None:
        raise Skip(f"ReduceMean '{node.name}' on an untraced layout", node)
    axes = _axes(node)
    noop = node.attributes.get("noop_with_empty_axes")
    if not axes:
        if noop is not None and int(noop.value):
            return list(inp)
        axes = list(range(len(inp)))
    axes = sorted({a + len(inp) if a < 0 else a for a in axes})
    for a in axes:
        if inp[a].kind in ("heads", "rep", "slots") and inp[a].old > 1:
            raise Skip(f"ReduceMean '{node.name}' averages over the {inp[a].kind} axis", node)
    keep = node.attributes.get("keepdims")
    if keep is not None and not int(keep.value):
        return [r for i, r in enumerate(inp) if i not in axes]
    return [_OTHER if i in axes else r for i, r in enumerate(inp)]


def _layer_norm_rule(ctx: LayoutContext, node: ir.Node, roles: dict[int, Roles], path: list[int]) -> list[Roles]:
    """``LayerNormalization`` on the attention path (QK-norm): normalised axes may be ``dim`` or
    ``width`` (scale and bias sliced with the width), never heads; Mean and InvStdDev outputs
    keep the other axes."""
    if path != [0]:
        raise Skip(f"LayerNormalization '{node.name}' has a scale or bias computed on the attention path", node)
    inp = roles[id(node.inputs[0])]
    if inp is None:
        raise Skip(f"LayerNormalization '{node.name}' on an untraced layout", node)
    axis_attr = node.attributes.get("axis")
    axis = int(axis_attr.value) if axis_attr is not None else -1
    axis = axis + len(inp) if axis < 0 else axis
    for r in inp[axis:]:
        if r.kind in ("heads", "rep", "slots") and r.old > 1:
            raise Skip(f"LayerNormalization '{node.name}' normalises over the {r.kind} axis", node)
    for i in range(1, len(node.inputs)):
        _broadcast_operand(ctx, node, i, inp)
    stats = [r for r in inp[:axis]] + [_OTHER] * (len(inp) - axis)
    return [list(inp), *([stats] * (len(node.outputs) - 1))]


#: Ops whose output has the broadcast shape of their inputs.
_BROADCASTING = frozenset({"And", "Or", "Xor", "Where", "Equal", "Add", "Sub", "Mul", "Div"})
_SAME_SHAPE = frozenset({"Not", "Cast", "Identity", "Neg", "IsNaN", "IsInf"})


def _extent(value: ir.Value | None, axis: int, depth: int = 0) -> int | None:
    """The extent of axis ``axis`` (negative: counted from the last) of ``value``, when its
    construction from shapes and broadcasts fixes it; None when it is not known."""
    if value is None or depth > 24:
        return None
    arr = const_array(value)
    dims = list(np.asarray(arr).shape) if arr is not None else static_dims(value)
    if dims is not None:
        if -axis > len(dims):
            return 1  # a missing leading axis broadcasts as 1
        if dims[axis] is not None:
            return int(dims[axis])  # type: ignore[arg-type]
    node = value.producer()
    if node is None or not is_default_domain(node):
        return None
    op = node.op_type
    if op in _SAME_SHAPE:
        return _extent(node.inputs[0], axis, depth + 1)
    if op in _BROADCASTING:
        extents = [_extent(i, axis, depth + 1) for i in node.inputs if i is not None]
        if any(e is None for e in extents):
            return None
        big = {e for e in extents if e != 1}  # type: ignore[misc]
        return big.pop() if len(big) == 1 else (1 if not big else None)
    if op in ("Expand", "Reshape"):
        try:
            # TorchScript builds every layer's mask with one Expand shape: shared, only read here
            target = _target(node, 1, reading=True)
        except Skip:
            return None
        k = len(target.elems)
        if -axis > k:
            return 1 if op == "Expand" else None
        e = target.elems[axis]
        if op == "Reshape":
            if e is not None and e > 0:
                return e
            # a target read whole from Shape(v): the extent of v
            shape = node.inputs[1]
            producer = shape.producer() if shape is not None else None
            if e is None and producer is not None and producer.op_type == "Shape" and not producer.attributes:
                return _extent(producer.inputs[0], axis, depth + 1)
            return None
        inner = _extent(node.inputs[0], axis, depth + 1)
        if e is None or inner is None:
            return None
        return inner if e == 1 else (e if inner in (1, e) else None)
    if op == "Slice" and axis not in _sliced_axes(node, _rank(node.inputs[0])):
        # bounds on the other axes only (TorchScript's MPT cuts its ALiBi bias to the key length)
        return _extent(node.inputs[0], axis, depth + 1)
    return None


def _sliced_axes(node: ir.Node, rank: int | None) -> set[int]:
    """The axes a ``Slice`` cuts, negative (counted from the last); every axis when not known."""
    if rank is None:
        return set(range(-64, 0))
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    if axes is None and len(node.inputs) > 3 and node.inputs[3] is not None:
        return set(range(-rank, 0))
    if axes is None:
        starts = static_dims(node.inputs[1])
        if starts is None or len(starts) != 1 or starts[0] is None:
            return set(range(-rank, 0))
        axes = np.arange(starts[0])
    return {int(a) % rank - rank for a in np.asarray(axes).ravel()}


#: The transfer table: one rule per op on an attention path.
TRANSFER: dict[str, Rule] = {
    "Reshape": _of_first(_reshape),
    "Expand": _of_first(_expand),
    "Transpose": _of_first(_transpose),
    "Unsqueeze": _of_first(_unsqueeze),
    "Squeeze": _of_first(_squeeze),
    "Slice": _of_first(_slice),
    "Split": _split_rule,
    "Concat": _concat_rule,
    "Gather": _gather_rule,
    "GatherND": _gather_nd_rule,
    "ReduceMean": _of_first(_reduce_mean),
    "LayerNormalization": _layer_norm_rule,
    **{op: _elementwise_rule for op in sorted(AXIS_PRESERVING)},
}


# ----------------------------------------------------------------------------- applying edits


def apply_edits(editor: GraphEditor, edits: HeadEdits) -> None:
    """Make the changes :func:`plan_head_removal` collected (constants cloned where shared)."""
    groups: dict[tuple[Any, ...], tuple[_Target, list[int], list[tuple[ir.Node, int]]]] = {}
    for target, new in _own_chains(editor, edits.targets):
        start = target.source if target.source is not None else target.node.inputs[target.index]
        holder = target.concat if target.concat is not None else start
        key = (id(holder), tuple(new))
        entry = groups.setdefault(key, (target, new, []))
        readers = target.source_readers if target.source is not None else [(target.node, target.index)]
        for reader in readers or []:
            if reader not in entry[2]:
                entry[2].append(reader)
    for target, new, readers in groups.values():
        if target.materialize:
            editor.set_constant(_input(target.node, target.index), readers, np.asarray(new, np.int64))
            continue
        if target.concat is None:
            value = target.source if target.source is not None else _input(target.node, target.index)
            original = np.asarray(const_array(value)).reshape(-1)
            fixed = target.fixed or [False] * len(new)
            array = np.asarray([o if f else n for o, n, f in zip(original, new, fixed, strict=True)], np.int64)
            editor.set_constant(value, readers, array.reshape(np.asarray(const_array(value)).shape))
            continue
        concat = _own_concat(editor, target.concat, readers)
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
            editor.set_constant(part_value, [(concat, part)], updated.reshape(arr.shape))
    for node, index, arr in edits.constants:
        editor.set_constant(_input(node, index), [(node, index)], arr)
    for node, index, takes in edits.gathers:
        _gather_kept(editor, node, index, takes)
    for node, sizes in edits.split_sizes:
        array = np.asarray(sizes, np.int64)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            editor.set_constant(node.inputs[1], [(node, 1)], array)
        else:  # equal parts given by num_outputs: now unequal, so explicit sizes
            node.attributes.pop("num_outputs", None)
            node.resize_inputs(2)
            node.replace_input_with(1, editor.initializer(f"{node.name or 'split'}.sizes", array))
        editor.mark(node)
    for value, shape in edits.shapes:
        value.shape = shape


def _own_chains(editor: GraphEditor, targets: list[tuple[_Target, list[int]]]) -> list[tuple[_Target, list[int]]]:
    """``targets`` with each shared shape chain (see :attr:`_Target.shared`) made the readers' own:
    the readers that get one rewrite keep the chain when they are all that reads it past its start,
    else they read a copy of it (its start is then cloned like any shared constant or Concat)."""
    readers: dict[tuple[int, tuple[int, ...]], list[tuple[ir.Node, int]]] = {}
    for target, new in targets:
        if target.shared is not None:
            readers.setdefault((id(target.shared[0]), tuple(new)), []).append((target.node, target.index))
    copies: dict[tuple[int, tuple[int, ...]], dict[int, ir.Node]] = {}
    result = []
    for target, new in targets:
        chain = target.shared
        if chain is None:
            result.append((target, new))
            continue
        key = (id(chain[0]), tuple(new))
        if key not in copies:
            copies[key] = _copy_chain(editor, chain, readers[key])
        copy = copies[key]
        source_readers = [(copy.get(id(node), node), index) for node, index in target.source_readers or []]
        result.append((dataclasses.replace(target, source_readers=source_readers, shared=None), new))
    return result


def _copy_chain(editor: GraphEditor, chain: list[ir.Node], readers: list[tuple[ir.Node, int]]) -> dict[int, ir.Node]:
    """Make ``readers`` (of the last value of ``chain``) the only readers of ``chain``'s values,
    through a copy when others read them; returns each node's copy by id (empty: none made)."""
    members = {id(n) for n in chain} | {id(node) for node, _ in readers}
    wanted = {(id(node), index) for node, index in readers}
    end = chain[0].outputs[0]
    if not any(
        out.is_graph_output()
        or any(id(u.node) not in members or (out is end and (id(u.node), u.idx) not in wanted) for u in out.uses())
        for node in chain
        for out in node.outputs
    ):
        return {}
    copies: dict[int, ir.Node] = {}
    values: dict[int, ir.Value] = {}
    for node in reversed(chain):  # the start's side first: each copy reads the copies before it
        copy = editor.node(
            node.op_type,
            [values.get(id(v), v) if v is not None else None for v in node.inputs],
            attributes={a.name: a.value for a in node.attributes.values()},
            domain=node.domain,
            name=f"{node.name or 'shape'}.{editor.pass_name}",
            outputs=[f"{out.name or 'shape'}.{editor.pass_name}" for out in node.outputs],
            after=node,
        )
        for out, new in zip(node.outputs, copy.outputs, strict=True):
            new.shape, new.type = out.shape, out.type
            values[id(out)] = new
        copies[id(node)] = copy
    for node, index in readers:
        node.replace_input_with(index, values[id(end)])
    return copies


def _gather_kept(editor: GraphEditor, node: ir.Node, index: int, takes: list[tuple[int, np.ndarray]]) -> None:
    """Make input ``index`` of ``node`` read only the kept entries of the tensor it reads, through
    ``Gather``s placed before ``node`` (the tensor itself and its other readers stay as they are)."""
    value = _input(node, index)
    base = node.name or "reader"
    for axis, kept in takes:
        indices = editor.initializer(f"{base}.kept_heads", kept.astype(np.int64))
        dims: list[int | str | ir.SymbolicDim | None] | None = list(value.shape.dims) if value.shape is not None else None
        if dims is not None:
            dims[axis] = len(kept)
        value = editor.op(
            "Gather", [value, indices], name=f"{base}.kept_heads", attributes={"axis": axis}, before=node,
            dtype=value.dtype, shape=ir.Shape(dims) if dims is not None else None,
        )  # fmt: skip
    node.replace_input_with(index, value)


def _input(node: ir.Node, index: int) -> ir.Value:
    value = node.inputs[index]
    if value is None:  # the plan only records inputs it has read
        raise ValueError(f"prune-heads: input {index} of '{node.name}' is missing")
    return value


def _own_concat(
    editor: GraphEditor, concat: ir.Node, readers: list[tuple[ir.Node, int]]
) -> ir.Node:
    """``concat`` itself when only ``readers`` use it, else a copy that only they read."""
    out = concat.outputs[0]
    uses = {(id(u.node), u.idx) for u in out.uses()}
    if uses <= {(id(n), i) for n, i in readers} and not out.is_graph_output():
        return concat
    clone = editor.node(
        "Concat",
        list(concat.inputs),
        attributes={a.name: a.value for a in concat.attributes.values()},
        domain=concat.domain,
        name=f"{concat.name or 'concat'}.{editor.pass_name}",
        outputs=f"{out.name or 'shape'}.{editor.pass_name}",
        after=concat,
    )
    clone.outputs[0].shape, clone.outputs[0].type = out.shape, out.type
    for node, index in readers:
        node.replace_input_with(index, clone.outputs[0])
    return clone
