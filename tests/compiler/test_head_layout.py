"""The head-layout analysis, one transfer rule at a time.

Each test builds one node in ONNX text, gives its traced input the roles it would have on an
attention path (4 query heads of head_dim 2, 2 KV heads; query heads 1 and 3 removed, hence KV
head 1 too), runs the op's rule from ``TRANSFER`` and checks the roles of its outputs and the
constant edits it records. The whole analysis on real attention blocks is tested by
``tests/passes/test_prune_heads.py``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from tforge import testing
from tforge.compiler.head_layout import (
    TRANSFER,
    Axis,
    LayoutContext,
    Roles,
    SlotGrid,
    _extent,
    _rewrite,
    _target,
    apply_edits,
    kept_qkv_columns,
    qkv_columns,
)
from tforge.compiler.ops import AXIS_PRESERVING
from tforge.compiler.pass_infra import Skip
from tforge.compiler.rewrite import GraphEditor
from tforge.compiler.structure import const_array

H, KV, D = 4, 2, 2
KEEP_Q = [0, 2]  # one query head kept in each KV group: GQA stays valid, 1 per group
KEEP_KV = [0, 1]


def _ctx(keep_q: list[int] = KEEP_Q, keep_kv: list[int] = KEEP_KV, per_group: int = 1) -> LayoutContext:
    return LayoutContext.keeping(H, KV, D, keep_q, keep_kv, per_group)


def _mask(size: int, kept: list[int]) -> np.ndarray:
    m = np.zeros(size, bool)
    m[kept] = True
    return m


OTHER = Axis("other")
DIM = Axis("dim")
HEADS = Axis("heads", _mask(H, KEEP_Q))
WIDTH = Axis("width", np.repeat(_mask(H, KEEP_Q), D))


def _node(text: str, **consts: np.ndarray) -> tuple[ir.Model, ir.Node]:
    model = testing.model_from_onnx_text(text, **consts)
    return model, next(n for n in model.graph if n.op_type not in ("Constant",))


def _apply(node: ir.Node, inputs: dict[int, Roles], ctx: LayoutContext | None = None) -> tuple[list[Roles], LayoutContext]:
    ctx = ctx or _ctx()
    roles = {id(node.inputs[i]): r for i, r in inputs.items()}
    out = TRANSFER[node.op_type](ctx, node, roles, sorted(inputs))
    return out, ctx


def _kinds(roles: Roles) -> list[str]:
    assert roles is not None
    return [a.kind for a in roles]


def test_reshape_splits_width_into_heads_and_rewrites_the_head_count() -> None:
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 8] x) => (float[B, S, 4, 2] y) <int64[4] t> { y = Reshape (x, t) }""",
        t=np.array([0, 0, 4, 2], np.int64),
    )
    (out,), ctx = _apply(node, {0: [OTHER, OTHER, WIDTH]})
    assert _kinds(out) == ["other", "other", "heads", "dim"]
    assert np.array_equal(out[2].keep, _mask(H, KEEP_Q))
    ((target, new),) = ctx.edits.targets
    assert new == [0, 0, 2, 2]


def test_reshape_merges_heads_back_into_width() -> None:
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 4, 2] x) => (float[B, S, 8] y) <int64[3] t> { y = Reshape (x, t) }""",
        t=np.array([0, 0, 8], np.int64),
    )
    (out,), ctx = _apply(node, {0: [OTHER, OTHER, HEADS, DIM]})
    assert _kinds(out) == ["other", "other", "width"]
    assert out[2].new == 4 and ctx.edits.targets[0][1] == [0, 0, 4]


def test_reshape_merges_repeated_kv_heads_into_query_heads() -> None:
    kv = Axis("heads", _mask(KV, KEEP_KV))
    rep = _ctx().rep_axis()
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, 2, 2, S, 2] x) => (float[B, 4, S, 2] y) <int64[4] t> { y = Reshape (x, t) }""",
        t=np.array([0, 4, -1, 2], np.int64),
    )
    (out,), ctx = _apply(node, {0: [OTHER, kv, rep, OTHER, DIM]})
    assert _kinds(out) == ["other", "heads", "other", "dim"]
    assert ctx.edits.targets[0][1] == [0, 2, -1, 2]


def test_reshape_with_an_untraced_constant_target_is_skipped() -> None:
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 8] x) => (float[B, S, 2, 4] y) <int64[4] t> { y = Reshape (x, t) }""",
        t=np.array([0, 0, 2, 4], np.int64),
    )
    with pytest.raises(Skip, match="constant target whose axes were not traced"):
        _apply(node, {0: [OTHER, OTHER, WIDTH]})


def test_expand_of_a_unit_axis_after_kv_heads_becomes_the_repeat() -> None:
    kv = Axis("heads", _mask(KV, KEEP_KV))
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, 2, 1, S, 2] x) => (float[B, 2, 2, S, 2] y) <int64[5] t> { y = Expand (x, t) }""",
        t=np.array([1, 2, 2, 1, 2], np.int64),
    )
    (out,), ctx = _apply(node, {0: [OTHER, kv, OTHER, OTHER, DIM]})
    assert _kinds(out) == ["other", "heads", "rep", "other", "dim"]
    assert ctx.edits.targets[0][1] == [1, 2, 1, 1, 2]  # one query head per KV head is kept


def test_transpose_permutes_roles() -> None:
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 4, 2] x) => (float[B, 4, S, 2] y) { y = Transpose <perm = [0, 2, 1, 3]> (x) }"""
    )
    (out,), _ = _apply(node, {0: [OTHER, OTHER, HEADS, DIM]})
    assert _kinds(out) == ["other", "heads", "other", "dim"]


def test_unsqueeze_inserts_an_other_axis() -> None:
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, 4, S, 2] x) => (float[B, 4, 1, S, 2] y) <int64[1] a> { y = Unsqueeze (x, a) }""",
        a=np.array([2], np.int64),
    )
    (out,), _ = _apply(node, {0: [OTHER, HEADS, OTHER, DIM]})
    assert _kinds(out) == ["other", "heads", "other", "other", "dim"]


def test_squeeze_may_not_remove_a_heads_axis() -> None:
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, 4, 1, 2] x) => (float[B, 4, 2] y) <int64[1] a> { y = Squeeze (x, a) }""",
        a=np.array([2], np.int64),
    )
    (out,), _ = _apply(node, {0: [OTHER, HEADS, OTHER, DIM]})
    assert _kinds(out) == ["other", "heads", "dim"]
    _, bad = _node(  # the roles say axis 1 counts 4 heads: squeezing it would drop them
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, 1, 1, 2] x) => (float[B, 1, 2] y) <int64[1] a> { y = Squeeze (x, a) }""",
        a=np.array([1], np.int64),
    )
    with pytest.raises(Skip, match="removes a heads axis"):
        _apply(bad, {0: [OTHER, HEADS, OTHER, DIM]})


def test_slice_of_a_fused_width_rewrites_its_bounds() -> None:
    fused = Axis("width", np.concatenate([np.repeat(_mask(H, KEEP_Q), D), np.repeat(_mask(KV, KEEP_KV), D)]))
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 12] x) => (float[B, S, 4] y) <int64[1] s, int64[1] e, int64[1] a> { y = Slice (x, s, e, a) }""",
        s=np.array([8], np.int64), e=np.array([12], np.int64), a=np.array([-1], np.int64),
    )
    (out,), ctx = _apply(node, {0: [OTHER, OTHER, fused]})
    assert out[2].kind == "width" and out[2].old == 4 and out[2].new == 4
    # the start moves from 8 to 4; the end (12, "to the end" of the old width) stays a sentinel
    assert [new for _, new in ctx.edits.targets] == [[4]]


def test_split_of_a_fused_width_rewrites_its_sizes() -> None:
    fused = Axis("width", np.concatenate([np.repeat(_mask(H, KEEP_Q), D), np.repeat(_mask(KV, [0]), D), np.repeat(_mask(KV, [0]), D)]))
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 16] x) => (float[B, S, 8] q, float[B, S, 4] k, float[B, S, 4] v) <int64[3] n>
        { q, k, v = Split <axis = -1> (x, n) }""",
        n=np.array([8, 4, 4], np.int64),
    )
    outs, ctx = _apply(node, {0: [OTHER, OTHER, fused]}, _ctx(KEEP_Q, [0], 2))
    assert [o[2].new for o in outs] == [4, 2, 2]  # type: ignore[index]
    ((_, sizes),) = ctx.edits.split_sizes
    assert sizes == [4, 2, 2]


def _per_head_ctx() -> LayoutContext:
    """Keeping heads 0 and 2 of a fused QKV laid out per head (``[H, 3, D]``, no grouped-query attention)."""
    ctx = LayoutContext.keeping(H, H, D, KEEP_Q, KEEP_Q, 1)
    ctx.per_head_width = 3 * D
    return ctx


def test_reshape_of_a_per_head_fused_width_splits_whole_heads_of_q_k_and_v() -> None:
    per_head = Axis("width", np.repeat(_mask(H, KEEP_Q), 3 * D))
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 24] x) => (float[B, S, 4, 6] y) <int64[4] t> { y = Reshape (x, t) }""",
        t=np.array([0, 0, 4, 6], np.int64),
    )
    (out,), ctx = _apply(node, {0: [OTHER, OTHER, per_head]}, _per_head_ctx())
    assert _kinds(out) == ["other", "other", "heads", "dim"]
    assert np.array_equal(out[2].keep, _mask(H, KEEP_Q))
    assert [new for _, new in ctx.edits.targets] == [[0, 0, 2, 6]]
    # Q, K and V cut inside each head: the last axis does not change, nor do the sizes
    _, split = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 4, 6] x) => (float[B, S, 4, 2] q, float[B, S, 4, 2] k, float[B, S, 4, 2] v) <int64[3] n>
        { q, k, v = Split <axis = -1> (x, n) }""",
        n=np.array([2, 2, 2], np.int64),
    )
    outs, ctx = _apply(split, {0: out}, ctx)
    assert all(_kinds(o) == ["other", "other", "heads", "other"] for o in outs)
    assert not ctx.edits.split_sizes and len(ctx.edits.targets) == 1


def test_a_per_head_fused_width_is_not_split_by_head_dim() -> None:
    per_head = Axis("width", np.repeat(_mask(H, KEEP_Q), 3 * D))
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 24] x) => (float[B, S, 12, 2] y) <int64[4] t> { y = Reshape (x, t) }""",
        t=np.array([0, 0, 12, 2], np.int64),
    )
    with pytest.raises(Skip):  # 12 pieces of head_dim would be Q, K and V of every head mixed
        _apply(node, {0: [OTHER, OTHER, per_head]}, _per_head_ctx())


def test_fused_qkv_columns_per_head_layout() -> None:
    from types import SimpleNamespace

    attn = SimpleNamespace(num_heads=3, num_kv_heads=3, head_dim=2, qkv_slots=None, qkv_per_head=True)
    q, k, v = qkv_columns(attn)  # type: ignore[arg-type]
    assert q.tolist() == [0, 1, 6, 7, 12, 13]
    assert k.tolist() == [2, 3, 8, 9, 14, 15]
    assert v.tolist() == [4, 5, 10, 11, 16, 17]
    # each kept head keeps its 3 * head_dim contiguous columns, in head order
    assert kept_qkv_columns(attn, [0, 2], [0, 2]).tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17]  # type: ignore[arg-type]


def test_concat_along_another_axis_keeps_roles() -> None:
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, 4, S, 2] x, float[B, 4, T, 2] p) => (float[B, 4, N, 2] y) { y = Concat <axis = 2> (p, x) }"""
    )
    (out,), _ = _apply(node, {0: [OTHER, HEADS, OTHER, DIM], 1: [OTHER, HEADS, OTHER, DIM]})
    assert _kinds(out) == ["other", "heads", "other", "dim"]


def test_concat_along_the_heads_axis_is_skipped() -> None:
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, 4, S, 2] x, float[B, 4, S, 2] z) => (float[B, 8, S, 2] y) { y = Concat <axis = 1> (x, z) }"""
    )
    with pytest.raises(Skip, match="joins along a heads axis"):
        _apply(node, {0: [OTHER, HEADS, OTHER, DIM]})


def test_elementwise_slices_a_per_head_constant() -> None:
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, 4, S, S] x) => (float[B, 4, S, S] y) <float[1, 4, 1, 1] bias> { y = Add (x, bias) }""",
        bias=np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1),
    )
    (out,), ctx = _apply(node, {0: [OTHER, HEADS, OTHER, OTHER]})
    assert _kinds(out) == ["other", "heads", "other", "other"]
    ((_, index, sliced),) = ctx.edits.constants
    assert index == 1 and sliced.reshape(-1).tolist() == [0.0, 2.0]


def test_softmax_over_heads_is_skipped() -> None:
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, 4, S, S] x) => (float[B, 4, S, S] y) { y = Softmax <axis = 1> (x) }"""
    )
    with pytest.raises(Skip, match="normalises over heads"):
        _apply(node, {0: [OTHER, HEADS, OTHER, OTHER]})


def test_every_axis_preserving_op_has_the_elementwise_rule() -> None:
    rule = TRANSFER["Add"]
    assert all(TRANSFER[op] is rule for op in AXIS_PRESERVING)
    assert {"Reshape", "Expand", "Transpose", "Unsqueeze", "Squeeze", "Slice", "Split", "Concat", "Gather", "GatherND"} <= set(TRANSFER)


def test_static_reshape_merges_batch_and_heads_and_splits_them_back() -> None:
    """Static exports of batched 3-D matmuls: [B, H, S, d] -> [B*H, S, d] -> [B, H, S, d]."""
    _, merge = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[3, 4, 5, 2] x) => (float[12, 5, 2] y) <int64[3] t> { y = Reshape (x, t) }""",
        t=np.array([12, 5, 2], np.int64),
    )
    (merged,), ctx = _apply(merge, {0: [OTHER, HEADS, OTHER, DIM]})
    assert _kinds(merged) == ["heads", "other", "dim"]
    assert (merged[0].outer, merged[0].old, merged[0].new) == (3, 12, 6)  # type: ignore[index]
    assert ctx.edits.targets[0][1] == [6, 5, 2]
    _, split = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[12, 5, 2] x) => (float[3, 4, 5, 2] y) <int64[4] t> { y = Reshape (x, t) }""",
        t=np.array([3, 4, 5, 2], np.int64),
    )
    (back,), ctx = _apply(split, {0: merged})
    assert _kinds(back) == ["other", "heads", "other", "dim"] and back[1].outer == 1  # type: ignore[index]
    assert ctx.edits.targets[0][1] == [3, 2, 5, 2]


def test_static_reshape_merges_batch_kv_heads_and_repeat() -> None:
    kv = Axis("heads", _mask(KV, KEEP_KV))
    rep = _ctx().rep_axis()
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[3, 2, 2, 5, 2] x) => (float[12, 5, 2] y) <int64[3] t> { y = Reshape (x, t) }""",
        t=np.array([12, 5, 2], np.int64),
    )
    (out,), ctx = _apply(node, {0: [OTHER, kv, rep, OTHER, DIM]})
    assert out[0].kind == "heads" and out[0].new == 6  # type: ignore[index]
    assert ctx.edits.targets[0][1] == [6, 5, 2]


# TorchScript's repeat-KV: expand(x, [b, kv, n_rep, s, d]) with -1 meaning "keep" is written
# Where(Equal(s, -1), 1, s) on s = Reshape(Concat(Shape parts, [2], ...), [-1]).
TS_EXPAND = """<ir_version: 10, opset_import: ["" : 18]>
g (float[B, 2, 1, S, 2] x, int64[1] b, int64[1] kv, int64[1] s) => (float[B, 2, 2, S, 2] y)
<int64[1] rep, int64[1] d, int64[1] flat, int64[1] n5, int64 minus>
{
    cat = Concat <axis = 0> (b, kv, rep, s, d)
    shp = Reshape (cat, flat)
    ones = ConstantOfShape <value = int64[1] {1}> (n5)
    neg = Mul (ones, minus)
    eq = Equal (shp, neg)
    t = Where (eq, ones, shp)
    y = Expand (x, t)
}
"""


def _ts_expand(d: int = 2) -> ir.Node:
    model = testing.model_from_onnx_text(
        TS_EXPAND, rep=np.array([2], np.int64), d=np.array([d], np.int64), flat=np.array([-1], np.int64),
        n5=np.array([5], np.int64), minus=np.array(-1, np.int64),
    )  # fmt: skip
    return next(n for n in model.graph if n.op_type == "Expand")


def test_expand_through_torchscript_shape_arithmetic_finds_and_rewrites_the_repeat() -> None:
    node = _ts_expand()
    kv = Axis("heads", _mask(KV, KEEP_KV))
    (out,), ctx = _apply(node, {0: [OTHER, kv, OTHER, OTHER, DIM]})
    assert _kinds(out) == ["other", "heads", "rep", "other", "dim"]
    [(target, new)] = ctx.edits.targets
    assert new == [None, None, 1, None, 2] and target.source is not None
    # applied on the Concat under the chain: the repeat constant becomes 1, nothing else moves
    model = node.graph
    apply_edits(GraphEditor(_owner(node), "test"), ctx.edits)
    concat = next(n for n in model if n.op_type == "Concat")
    assert const_array(concat.inputs[2]).tolist() == [1]
    assert node.inputs[1].producer().op_type == "Where"  # the chain still feeds the Expand


def _owner(node: ir.Node) -> ir.Model:
    return ir.Model(node.graph, ir_version=10)


def test_expand_through_shape_arithmetic_refuses_a_value_it_would_replace() -> None:
    """A rewrite to -1 would select Where's other branch: refused, not written."""
    node = _ts_expand()
    kv = Axis("heads", _mask(KV, KEEP_KV))
    target = _target(node, 1)
    assert target.avoid == [None, None, -1, None, -1]
    with pytest.raises(Skip, match="which the shape arithmetic before it replaces"):
        _rewrite(_ctx(), target, [None, None, -1, None, 2])
    (out,), _ = _apply(node, {0: [OTHER, kv, OTHER, OTHER, DIM]}, _ctx([0, 1, 2, 3], [0, 1], 2))
    assert _kinds(out) == ["other", "heads", "rep", "other", "dim"]


def test_run_time_merge_of_repeated_kv_heads_skips_a_changed_repeat() -> None:
    kv = Axis("heads", _mask(KV, KEEP_KV))
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, 2, 2, S, 2] x, int64[4] t) => (float[B, 4, S, 2] y) { y = Reshape (x, t) }"""
    )
    with pytest.raises(Skip, match=r"count computed at run time.*\(2 -> 1 query heads per KV head\)"):
        _apply(node, {0: [OTHER, kv, _ctx().rep_axis(), OTHER, DIM]})
    # the repeat kept (whole KV groups removed): Shape(kv) * 2 follows by itself
    whole = _ctx([0, 1], [0], 2)
    (out,), ctx = _apply(node, {0: [OTHER, Axis("heads", _mask(KV, [0])), whole.rep_axis(), OTHER, DIM]}, whole)
    assert _kinds(out) == ["other", "heads", "other", "dim"] and ctx.edits.targets == []


def test_slice_at_run_time_bounds_of_head_dim_is_traced_but_not_of_heads() -> None:
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, 4, S, 2] x, int64[1] e) => (float[B, 4, S, 1] y) <int64[1] st, int64[1] ax, int64[1] one>
        { y = Slice (x, st, e, ax, one) }""",
        st=np.array([0], np.int64), ax=np.array([3], np.int64), one=np.array([1], np.int64),
    )
    (out,), _ = _apply(node, {0: [OTHER, HEADS, OTHER, DIM]})
    assert _kinds(out) == ["other", "heads", "other", "other"]
    with pytest.raises(Skip, match="cuts a width axis at run-time bounds"):
        _apply(node, {0: [OTHER, OTHER, OTHER, WIDTH]})


def test_reduce_mean_over_head_dim_keeps_the_heads() -> None:
    """A QK-norm's mean of squares over each head (Qwen3): head_dim becomes a kept unit axis."""
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 4, 2] x) => (float[B, S, 4, 1] y) <int64[1] axes> { y = ReduceMean <keepdims = 1> (x, axes) }""",
        axes=np.array([-1], np.int64),
    )
    (out,), ctx = _apply(node, {0: [OTHER, OTHER, HEADS, DIM]})
    assert _kinds(out) == ["other", "other", "heads", "other"]
    assert not ctx.edits.targets and not ctx.edits.constants


def test_reduce_mean_over_the_width_is_followed_but_not_over_heads() -> None:
    """OLMo2 normalises the whole projection before the head split: the mean then runs over the
    kept heads' channels. A mean over the heads axis itself is refused."""
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 8] x) => (float[B, S, 1] y) <int64[1] axes> { y = ReduceMean (x, axes) }""",
        axes=np.array([-1], np.int64),
    )
    (out,), _ = _apply(node, {0: [OTHER, OTHER, WIDTH]})
    assert _kinds(out) == ["other", "other", "other"]
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, 4, S, 2] x) => (float[B, 1, S, 2] y) <int64[1] axes> { y = ReduceMean (x, axes) }""",
        axes=np.array([1], np.int64),
    )
    with pytest.raises(Skip, match="averages over the heads axis"):
        _apply(node, {0: [OTHER, HEADS, OTHER, DIM]})


def test_layer_norm_over_the_width_slices_its_scale_and_bias() -> None:
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 8] x) => (float[B, S, 8] y) <float[8] gamma, float[8] beta>
        { y = LayerNormalization <axis = -1> (x, gamma, beta) }""",
        gamma=np.arange(8, dtype=np.float32), beta=-np.arange(8, dtype=np.float32),
    )
    (out,), ctx = _apply(node, {0: [OTHER, OTHER, WIDTH]})
    assert _kinds(out) == ["other", "other", "width"]
    kept = np.flatnonzero(WIDTH.keep).astype(np.float32)
    sliced = {index: arr.tolist() for _, index, arr in ctx.edits.constants}
    assert sliced == {1: kept.tolist(), 2: (-kept).tolist()}


def test_layer_norm_over_heads_is_skipped() -> None:
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 4, 2] x) => (float[B, S, 4, 2] y) <float[4, 2] gamma>
        { y = LayerNormalization <axis = -2> (x, gamma) }""",
        gamma=np.ones((4, 2), np.float32),
    )
    with pytest.raises(Skip, match="normalises over the heads axis"):
        _apply(node, {0: [OTHER, OTHER, HEADS, DIM]})


def test_run_time_batch_merged_with_heads_and_split_back() -> None:
    """``[b, H, s, d] -> [-1, s, d] -> [-1, H, s, d]`` with constant trailing dims (a transposed
    key once run-time shapes are folded): the -1 is batch x heads, the split rewrites H."""
    _, merge = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, 4, 5, 2] x) => (float[N, 5, 2] y) <int64[3] t> { y = Reshape (x, t) }""",
        t=np.array([-1, 5, 2], np.int64),
    )
    (merged,), ctx = _apply(merge, {0: [OTHER, HEADS, OTHER, DIM]})
    assert _kinds(merged) == ["heads", "other", "dim"] and merged[0].outer == 0  # type: ignore[index]
    assert ctx.edits.targets == []  # nothing in [-1, 5, 2] counts heads
    _, split = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[N, 5, 2] x) => (float[B, 4, 5, 2] y) <int64[4] t> { y = Reshape (x, t) }""",
        t=np.array([-1, 4, 5, 2], np.int64),
    )
    (back,), ctx = _apply(split, {0: merged})
    assert _kinds(back) == ["other", "heads", "other", "dim"] and back[1].new == 2  # type: ignore[index]
    assert ctx.edits.targets[0][1] == [-1, 2, 5, 2]


def test_reshape_keeping_the_width_whole_follows_a_run_time_last_dim() -> None:
    """TorchScript's Conv1D: ``[b*s, W] -> [b, s, W]`` (a constant W, rewritten) and back with
    ``Shape(x)[-1:]``, which adapts by itself."""
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[N, 8] x, int64[1] b, int64[1] s) => (float[B, S, 8] y) <int64[1] w>
        { t = Concat <axis = 0> (b, s, w)
          y = Reshape (x, t) }""",
        w=np.array([8], np.int64),
    )
    reshape = next(n for n in node.graph if n.op_type == "Reshape")
    (out,), ctx = _apply(reshape, {0: [OTHER, WIDTH]})
    assert _kinds(out) == ["other", "other", "width"] and ctx.edits.targets[0][1] == [None, None, 4]
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 8] x) => (float[N, 8] y) <int64[1] minus, int64[1] big, int64[1] zero>
        { shape = Shape (x)
          last = Slice (shape, minus, big, zero)
          t = Concat <axis = 0> (minus, last)
          y = Reshape (x, t) }""",
        minus=np.array([-1], np.int64), big=np.array([2**62], np.int64), zero=np.array([0], np.int64),
    )
    reshape = next(n for n in node.graph if n.op_type == "Reshape")
    (out,), ctx = _apply(reshape, {0: [OTHER, OTHER, WIDTH]})
    assert _kinds(out) == ["other", "width"] and ctx.edits.targets == []


def _ts_expand_shared(**consts: np.ndarray) -> tuple[ir.Node, ir.Node]:
    """``TS_EXPAND`` with a second Expand reading the same shape arithmetic (as TorchScript
    shares one shape between layers): the two Expands."""
    text = TS_EXPAND.replace("=> (float[B, 2, 2, S, 2] y)", "=> (float[B, 2, N, S, 2] y, float[B, 2, N, S, 2] y2)")
    model = testing.model_from_onnx_text(
        text.replace("y = Expand (x, t)", "y = Expand (x, t)\n    y2 = Expand (x, t)"),
        d=np.array([2], np.int64), flat=np.array([-1], np.int64), n5=np.array([5], np.int64),
        minus=np.array(-1, np.int64), **consts,
    )  # fmt: skip
    first, second = (n for n in model.graph if n.op_type == "Expand")
    return first, second


def test_an_extent_is_read_through_shape_arithmetic_other_layers_share() -> None:
    """TorchScript builds every layer's mask with one ``expand(mask, [b, -1, q, k])`` shape:
    shared (a rewrite would get its own copy of the arithmetic), and read to prove the mask has
    one entry on the heads axis."""
    expand, _ = _ts_expand_shared(rep=np.array([-1], np.int64))
    assert _target(expand, 1).shared is not None
    assert _target(expand, 1, reading=True).elems[2] == 1  # -1 ("keep") replaced by 1
    assert _extent(expand.outputs[0], -3) == 1


def test_shared_shape_arithmetic_of_constants_gives_the_reader_a_constant_of_its_own() -> None:
    """A fixed-shape TorchScript export computes one repeat-KV shape from constants for every
    layer: the Expand being rewritten reads its new shape as a constant, the others keep theirs."""
    consts = {name: np.array([v], np.int64) for name, v in (("b", 3), ("kv", 2), ("s", 5), ("rep", 2))}
    expand, other = _ts_expand_shared(**consts)
    kv = Axis("heads", _mask(KV, KEEP_KV))
    (out,), ctx = _apply(expand, {0: [OTHER, kv, OTHER, OTHER, DIM]})
    assert _kinds(out) == ["other", "heads", "rep", "other", "dim"]
    [(target, new)] = ctx.edits.targets
    assert target.materialize and new == [3, 2, 1, 5, 2]
    apply_edits(GraphEditor(_owner(expand), "test"), ctx.edits)
    assert const_array(expand.inputs[1]).tolist() == [3, 2, 1, 5, 2]
    assert other.inputs[1].producer().op_type == "Where"


# ----------------------------------------------------------------------------- head slots (Falcon)

# Multi-query: 4 query heads, then the one key and value: slots [q0 q1 q2 q3 k v]; heads 1 goes
MQ_SLOTS = ((0, 1, 2, 3), (4,), (5,))


def _mq_ctx() -> LayoutContext:
    return LayoutContext.keeping(H, 1, D, [0, 2, 3], [0], 3)


def _fused(ctx: LayoutContext, slots: tuple[tuple[int, ...], ...]) -> Axis:
    grid = SlotGrid.of(slots, ctx.q_mask, ctx.kv_mask)  # type: ignore[arg-type]
    return Axis("width", np.repeat(grid.kept[0], D), slots=grid)


def _mq_slots() -> tuple[Axis, LayoutContext]:
    ctx = _mq_ctx()
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 12] x) => (float[B, S, 6, 2] y) <int64[4] t> { y = Reshape (x, t) }""",
        t=np.array([0, 0, 6, 2], np.int64),
    )
    (out,), ctx = _apply(node, {0: [OTHER, OTHER, _fused(ctx, MQ_SLOTS)]}, ctx)
    assert _kinds(out) == ["other", "other", "slots", "dim"]
    assert ctx.edits.targets[0][1] == [0, 0, 5, 2]  # one query slot fewer
    return out[2], ctx  # type: ignore[index]


def test_multi_query_slots_selected_by_slice_and_gather_become_heads() -> None:
    slots, _ = _mq_slots()
    _, q = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 6, 2] x) => (float[B, S, 4, 2] y) <int64[1] s, int64[1] e, int64[1] a> { y = Slice (x, s, e, a) }""",
        s=np.array([0], np.int64), e=np.array([-2], np.int64), a=np.array([2], np.int64),
    )
    (out,), ctx = _apply(q, {0: [OTHER, OTHER, slots, DIM]}, _mq_ctx())
    assert out[2].kind == "heads" and out[2].keep.tolist() == [True, False, True, True]  # type: ignore[index,union-attr]
    assert ctx.edits.targets == []  # [0, -2) still selects the query slots
    for index, new in ((-2, None), (4, 3)):  # the key: from the end it stays, counted from 0 it moves
        _, k = _node(
            """<ir_version: 10, opset_import: ["" : 18]>
            g (float[B, S, 6, 2] x) => (float[B, S, 1, 2] y) <int64[1] i> { y = Gather <axis = 2> (x, i) }""",
            i=np.array([index], np.int64),
        )
        (out,), ctx = _apply(k, {0: [OTHER, OTHER, slots, DIM]}, _mq_ctx())
        assert out[2].kind == "heads" and (out[2].old, out[2].new) == (1, 1)  # type: ignore[index]
        assert [arr.tolist() for _, _, arr in ctx.edits.constants] == ([] if new is None else [[new]])


def test_split_of_the_slots_gets_new_sizes_and_heads() -> None:
    slots, _ = _mq_slots()
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 6, 2] x) => (float[B, S, 4, 2] q, float[B, S, 1, 2] k, float[B, S, 1, 2] v) <int64[3] n>
        { q, k, v = Split <axis = 2> (x, n) }""",
        n=np.array([4, 1, 1], np.int64),
    )
    outs, ctx = _apply(node, {0: [OTHER, OTHER, slots, DIM]}, _mq_ctx())
    assert [(o[2].kind, o[2].new) for o in outs] == [("heads", 3), ("heads", 1), ("heads", 1)]  # type: ignore[index]
    ((_, sizes),) = ctx.edits.split_sizes
    assert sizes == [3, 1, 1]


def test_gather_nd_of_a_leading_slots_axis_selects_the_value() -> None:
    slots, _ = _mq_slots()
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[6, B, S, 2] x) => (float[1, B, S, 2] y) <int64[1, 1] i> { y = GatherND (x, i) }""",
        i=np.array([[5]], np.int64),
    )
    (out,), ctx = _apply(node, {0: [slots, OTHER, OTHER, DIM]}, _mq_ctx())
    assert _kinds(out) == ["heads", "other", "other", "dim"] and out[0].old == 1  # type: ignore[index]
    ((_, index, arr),) = ctx.edits.constants
    assert index == 1 and arr.tolist() == [[4]]


# Grouped (the new decoder architecture): per KV group [q, q, k, v]; query heads 1 and 2 go,
# one from each group at different places, which the rectangular layout allows
GQA_SLOTS = ((0, 1, 4, 5), (2, 6), (3, 7))


def _grouped() -> tuple[list[Axis], LayoutContext]:
    ctx = _ctx([0, 3], [0, 1], 1)
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 16] x) => (float[B, S, 2, 4, 2] y) <int64[5] t> { y = Reshape (x, t) }""",
        t=np.array([0, 0, -1, 4, 2], np.int64),
    )
    (out,), ctx = _apply(node, {0: [OTHER, OTHER, _fused(ctx, GQA_SLOTS)]}, ctx)
    assert _kinds(out) == ["other", "other", "heads", "slots", "dim"]
    assert ctx.edits.targets[0][1] == [0, 0, -1, 3, 2]
    return out, ctx  # type: ignore[return-value]


def test_grouped_query_slots_merge_into_the_query_heads() -> None:
    roles, ctx = _grouped()
    _, q = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 2, 4, 2] x) => (float[B, S, 2, 2, 2] y) <int64[1] s, int64[1] e, int64[1] a> { y = Slice (x, s, e, a) }""",
        s=np.array([0], np.int64), e=np.array([2], np.int64), a=np.array([3], np.int64),
    )
    (sliced,), ctx = _apply(q, {0: roles}, ctx)
    assert _kinds(sliced) == ["other", "other", "heads", "slots", "dim"]
    assert ctx.edits.targets[-1][1] == [1]  # one query slot per group is left
    _, merge = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 2, 2, 2] x) => (float[B, S, 4, 2] y) <int64[4] t> { y = Reshape (x, t) }""",
        t=np.array([0, 0, 4, 2], np.int64),
    )
    (out,), ctx = _apply(merge, {0: sliced}, _ctx([0, 3], [0, 1], 1))
    assert _kinds(out) == ["other", "other", "heads", "dim"]
    assert out[2].keep.tolist() == [True, False, False, True]  # type: ignore[index,union-attr]
    assert ctx.edits.targets[0][1] == [0, 0, 2, 2]


def test_grouped_slots_cut_where_the_groups_keep_different_heads_is_skipped() -> None:
    roles, ctx = _grouped()
    _, q = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 2, 4, 2] x) => (float[B, S, 2, 1, 2] y) <int64[1] s, int64[1] e, int64[1] a> { y = Slice (x, s, e, a) }""",
        s=np.array([0], np.int64), e=np.array([1], np.int64), a=np.array([3], np.int64),
    )
    with pytest.raises(Skip, match="kept heads differ from one KV group to another"):
        _apply(q, {0: roles}, ctx)
    _, add = _node(  # a constant varying along the slots has no one mask to be sliced by
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 2, 4, 2] x) => (float[B, S, 2, 4, 2] y) <float[4, 1] c> { y = Add (x, c) }""",
        c=np.ones((4, 1), np.float32),
    )
    with pytest.raises(Skip, match="varies along the head slots"):
        _apply(add, {0: roles}, ctx)


def test_slots_cut_into_rows_that_are_not_kv_groups_are_skipped() -> None:
    ctx = _mq_ctx()
    _, node = _node(
        """<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, S, 12] x) => (float[B, S, 2, 3, 2] y) <int64[5] t> { y = Reshape (x, t) }""",
        t=np.array([0, 0, 2, 3, 2], np.int64),
    )
    with pytest.raises(Skip, match="not one KV group each"):
        _apply(node, {0: [OTHER, OTHER, _fused(ctx, MQ_SLOTS)]}, ctx)


# ----------------------------------------------------------------------------- multi-query repeat (GPT-BigCode)

# The one KV head's channels whole on the last axis of [b, 1, 1, s, d] (GPT-BigCode unsqueezes the
# fused output before splitting it), repeated to the 4 query heads: [b, 1, 4, s, d], then merged.
MQ_WIDTH = Axis("width", np.ones(D, bool))
MQ_EXPAND = """<ir_version: 10, opset_import: ["" : 18]>
g (float[B, 1, 1, S, 2] x) => (float[B, 1, 4, S, 2] y) <int64[5] t> { y = Expand (x, t) }"""
MQ_MERGE = """<ir_version: 10, opset_import: ["" : 18]>
g (float[B, 1, 4, S, 2] x) => (float[B, 4, S, 2] y) <int64[4] t> { y = Reshape (x, t) }"""


def test_expand_of_the_one_kv_head_finds_the_multi_query_repeat() -> None:
    _, node = _node(MQ_EXPAND, t=np.array([1, 1, 4, 1, 2], np.int64))
    (out,), ctx = _apply(node, {0: [OTHER, OTHER, OTHER, OTHER, MQ_WIDTH]}, _mq_ctx())
    assert _kinds(out) == ["other", "heads", "rep", "other", "dim"]
    assert (out[1].old, out[1].new, out[2].old, out[2].new) == (1, 1, 4, 3)  # type: ignore[index]
    assert ctx.edits.targets[0][1] == [1, 1, 3, 1, 2]  # three query heads per KV head now

    _, merge = _node(MQ_MERGE, t=np.array([0, 4, -1, 2], np.int64))
    (merged,), ctx = _apply(merge, {0: out}, ctx)
    assert _kinds(merged) == ["other", "heads", "other", "dim"]
    assert np.array_equal(merged[1].keep, ctx.q_mask)  # type: ignore[index]
    assert ctx.edits.targets[-1][1] == [0, 3, -1, 2]


@pytest.mark.parametrize(
    ("dims", "shape", "why"),
    [
        (("B, 2, 1, S, 2", "B, 2, 4, S, 2"), [1, 2, 4, 1, 2], "the axis before is not one: no single KV head"),
        (("B, 1, 1, S, 2", "B, 4, 4, S, 2"), [1, 4, 4, 1, 2], "the axis before is expanded too"),
    ],
)
def test_expand_not_proven_a_multi_query_repeat_keeps_its_count(dims: tuple[str, str], shape: list[int], why: str) -> None:
    text = MQ_EXPAND.replace("B, 1, 1, S, 2", dims[0]).replace("B, 1, 4, S, 2", dims[1])
    _, node = _node(text, t=np.array(shape, np.int64))
    (out,), ctx = _apply(node, {0: [OTHER, OTHER, OTHER, OTHER, MQ_WIDTH]}, _mq_ctx())
    assert "rep" not in _kinds(out), why
    assert not ctx.edits.targets, why


def test_one_heads_width_is_not_split_onto_an_axis_that_is_not_one() -> None:
    """``[b, 1, 4, s, d] -> [b, 4, s, d]`` of one KV head's channels is no head split: the axis
    before head_dim is the sequence, not a heads axis of one (it was, before the fix, and the
    repeat count 4 stayed when the query heads went to 3)."""
    _, node = _node(MQ_MERGE, t=np.array([0, 4, -1, 2], np.int64))
    (out,), ctx = _apply(node, {0: [OTHER, OTHER, OTHER, OTHER, MQ_WIDTH]}, _mq_ctx())
    assert "heads" not in _kinds(out)
    assert not ctx.edits.targets
