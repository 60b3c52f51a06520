"""The block map on tiny hand-written blocks: what it finds, and what it says when it cannot."""

from __future__ import annotations

import numpy as np
import pytest

from tests.models import tiny
from tforge import testing
from tforge.compiler.structure import find_blocks

BLOCK = tiny.GELU_BLOCK


def _model(rng: np.random.Generator, value_source: str = "MatMul (h, wv)"):
    weights = {name: rng.normal(size=shape) for name, shape in {
        "g": 8, "b": 8, "wq": (8, 8), "wk": (8, 8), "wv": (8, 8), "wo": (8, 8), "bo": 8,
        "g2": 8, "b2": 8, "wu": (8, 16), "wd": (16, 8)}.items()}
    if "wv" not in value_source:
        del weights["wv"]
    return testing.model_from_onnx_text(
        BLOCK.replace("VALUE_SOURCE", value_source),
        heads=np.array([1, 4, 2, 4], dtype=np.int64),
        merged=np.array([1, 4, 8], dtype=np.int64),
        **weights,
    )


def test_pre_norm_block_is_mapped(rng: np.random.Generator) -> None:
    block_map = find_blocks(_model(rng))
    assert block_map.unrecognized == []
    (block,) = block_map.blocks
    attn, ffn = block.attention, block.ffn
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (2, 2, 4)
    assert [attn.q.weight.name, attn.k.weight.name, attn.v.weight.name, attn.o.weight.name] == ["wq", "wk", "wv", "wo"]
    assert attn.o.bias is not None and attn.o.bias.name == "bo"
    assert not attn.causal and not attn.rotary and not attn.fused_qkv
    assert (ffn.up.weight.name, ffn.gate, ffn.down.weight.name, ffn.activation) == ("wu", None, "wd", "gelu")
    assert block.pre_norm
    assert block.attention_norm.gamma.name == "g" and block.ffn_norm.gamma.name == "g2"
    assert [lin.weight.name for lin in block.attention_norm.linears] == ["wq", "wk", "wv"]
    # the Reshapes that encode the head count: three head splits and the merge before wo
    reshapes = [n for n in attn.shape_nodes if n.op_type == "Reshape"]
    assert sorted(n.outputs[0].name for n in reshapes) == ["cm", "k4", "q4", "v4"]


def test_unrecognised_attention_names_the_node(rng: np.random.Generator) -> None:
    block_map = find_blocks(_model(rng, value_source="Identity (h)"))
    assert block_map.blocks == [] or block_map.blocks[0].attention is None
    (message,) = block_map.unrecognized
    assert "Softmax" in message
    assert "the value input of MatMul" in message and "does not come from exactly one linear (found: none)" in message
    assert "reached a norm output 'h'" in message


def _qk_norm_model(rng: np.random.Generator, norm: str):
    return tiny.qk_norm_model(norm, rng)


@pytest.mark.parametrize(("norm", "kind", "axis"), [("head", "rms", "head_dim"), ("layer", "layer", "head_dim"), ("width", "rms", "width")])
def test_qk_norm_between_projection_and_scores_is_part_of_the_attention(
    norm: str, kind: str, axis: str, rng: np.random.Generator
) -> None:
    """Qwen3/Gemma3 normalise each head of Q and K (gamma [head_dim]), OLMo2 the whole projection
    before the head split (gamma [width]): the walk to the projections goes through the norm."""
    block_map = find_blocks(_qk_norm_model(rng, norm))
    assert block_map.unrecognized == []
    (block,) = block_map.blocks
    attn = block.attention
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (2, 2, 4)
    assert [attn.q.weight.name, attn.k.weight.name, attn.v.weight.name] == ["wq", "wk", "wv"]
    assert attn.qk_norm and attn.qk_norm_axis == axis
    assert (attn.q_norm.gamma.name, attn.k_norm.gamma.name) == ("gq", "gk")
    assert (attn.q_norm.kind, attn.q_norm.normalizes, attn.k_norm.normalizes) == (kind, "query", "key")
    # the block's own norms are unchanged: the pre-norm feeds Q, K and V
    assert [lin.weight.name for lin in block.attention_norm.linears] == ["wq", "wk", "wv"]
    assert block.attention_norm.normalizes is None and block.ffn_norm.normalizes is None
    described = block.describe()["attention"]
    assert described["qk_norm"] == axis
    assert (described["q_norm"], described["k_norm"]) == (attn.q_norm.name, attn.k_norm.name)
    assert [n["normalizes"] for n in block_map.describe()["norms"]].count("query") == 1


def test_no_qk_norm_is_reported_as_none(rng: np.random.Generator) -> None:
    (block,) = find_blocks(_model(rng)).blocks
    assert not block.attention.qk_norm and block.attention.qk_norm_axis is None
    assert block.describe()["attention"]["qk_norm"] is None


def test_a_norm_across_heads_is_no_qk_norm(rng: np.random.Generator) -> None:
    """An RMS over the heads axis mixes heads: the walk stops there and says so."""
    block_map = find_blocks(_qk_norm_model(rng, "heads-axis"))
    assert all(b.attention is None for b in block_map.blocks)
    assert len(block_map.unrecognized) == 1
    message = block_map.unrecognized[0]
    assert "the query input of MatMul" in message and "reached a norm output 'qn'" in message


# Phi-3: one qkv projection cut by three Slices (2 query heads and 1 KV head of dim 4: widths
# 8, 4, 4), one gate_up projection cut in halves (GATE_UP), SiLU on the first half.
FUSED_SLICES = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, S, 8] x) => (float[B, S, 8] y)
<float[8, 16] wqkv, float[8, 8] wo, float[8, 32] wgu, float[16, 8] wd, int64[1] zero, int64[1] q_end,
 int64[1] k_end, int64[1] big, int64[1] last, int64[4] heads, int64[5] rep, int64[4] merged_kv,
 int64[3] merged, int64[1] two>
{
    qkv = MatMul (x, wqkv)
    q = Slice (qkv, Q_BOUNDS, last)
    k = Slice (qkv, K_BOUNDS, last)
    v = Slice (qkv, V_BOUNDS, last)
    q4 = Reshape (q, heads)
    qt = Transpose <perm = [0, 2, 1, 3]> (q4)
    k4 = Reshape (k, heads)
    kt0 = Transpose <perm = [0, 2, 1, 3]> (k4)
    ku = Unsqueeze (kt0, two)
    ke = Expand (ku, rep)
    kr = Reshape (ke, merged_kv)
    kt = Transpose <perm = [0, 1, 3, 2]> (kr)
    v4 = Reshape (v, heads)
    vt0 = Transpose <perm = [0, 2, 1, 3]> (v4)
    vu = Unsqueeze (vt0, two)
    ve = Expand (vu, rep)
    vt = Reshape (ve, merged_kv)
    s = MatMul (qt, kt)
    p = Softmax <axis = -1> (s)
    c = MatMul (p, vt)
    ct = Transpose <perm = [0, 2, 1, 3]> (c)
    cm = Reshape (ct, merged)
    o = MatMul (cm, wo)
    r = Add (x, o)
    gu = MatMul (r, wgu)
GATE_UP
    sg = Sigmoid (g)
    act = Mul (g, sg)
    m = Mul (act, u)
    d = MatMul (m, wd)
    y = Add (r, d)
}
"""
_SPLIT_HALVES = "    g, u = Split <axis = -1, num_outputs = 2> (gu)"
_SLICE_HALVES = "    u = Slice (gu, half, big, last)\n    g = Slice (gu, zero, half, last)"


def _fused_slices(rng: np.random.Generator, *, order: str = "qkv", gate_up: str = _SPLIT_HALVES):
    bounds = {"q": "zero, q_end", "k": "q_end, k_end", "v": "k_end, big"}
    if order == "kqv":  # K's columns first: not the query, key, value layout the passes assume
        bounds = {"k": "zero, q_end", "q": "q_end, k_end", "v": "k_end, big"}
    text = FUSED_SLICES.replace("GATE_UP", gate_up)
    for role in "qkv":
        text = text.replace(f"{role.upper()}_BOUNDS", bounds[role])
    if "half" in gate_up:
        text = text.replace("int64[1] two>", "int64[1] two, int64[1] half>")
    consts = {"half": np.array([16], np.int64)} if "half" in gate_up else {}
    return testing.model_from_onnx_text(
        text,
        **testing.random_float_initializers(text, rng),
        **consts,
        zero=np.array([0], np.int64), q_end=np.array([8], np.int64), k_end=np.array([12], np.int64),
        big=np.array([2**63 - 1], np.int64), last=np.array([-1], np.int64),
        heads=np.array([0, 0, -1, 4], np.int64), rep=np.array([1, 1, 2, 1, 1], np.int64),
        merged_kv=np.array([0, 2, -1, 4], np.int64), merged=np.array([0, 0, 8], np.int64),
        two=np.array([2], np.int64),
    )  # fmt: skip


@pytest.mark.parametrize("gate_up", [_SPLIT_HALVES, _SLICE_HALVES], ids=["split", "slices"])
def test_fused_qkv_cut_by_slices_and_fused_gate_up_are_mapped(gate_up: str, rng: np.random.Generator) -> None:
    block_map = find_blocks(_fused_slices(rng, gate_up=gate_up))
    assert block_map.unrecognized == []
    (block,) = block_map.blocks
    attn, ffn = block.attention, block.ffn
    assert attn.fused_qkv and attn.qkv_split == (8, 4, 4)
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (2, 1, 4)
    assert sorted(n.outputs[0].name for n in attn.shape_nodes if n.op_type == "Slice") == ["k", "q", "v"]
    assert ffn.up is ffn.gate and ffn.up.weight.name == "wgu" and ffn.down.weight.name == "wd"
    assert ffn.fused_gate_up and ffn.gate_up_halves == (0, 16)  # SiLU reads the first half
    assert (ffn.gated, ffn.intermediate_size, ffn.activation) == (True, 16, "silu")
    assert block.describe()["ffn"]["fused_gate_up"] == [0, 16]


def test_fused_qkv_slices_out_of_order_are_reported(rng: np.random.Generator) -> None:
    block_map = find_blocks(_fused_slices(rng, order="kqv"))
    assert all(b.attention is None for b in block_map.blocks)
    (message,) = block_map.unrecognized
    assert "fused QKV linear 'wqkv' is not split into three parts" in message
    assert "three Slices of its last axis (query, key, value in that order)" in message


@pytest.mark.parametrize(("pre_norms", "placement"), [(True, "sandwich"), (False, "output")])
def test_norms_of_sub_block_outputs_before_the_residual_adds(
    pre_norms: bool, placement: str, rng: np.random.Generator
) -> None:
    """``x + LN(o(...))``, ``r + LN(down(...))``: beside the pre-norms (Gemma 2/3) or instead of
    them (OLMo 2). The output norms are recorded on the block, with the adds found through them."""
    block_map = find_blocks(tiny.output_norm_model(pre_norms, rng))
    assert block_map.unrecognized == []
    (block,) = block_map.blocks
    attn, ffn = block.attention, block.ffn
    assert attn is not None and ffn is not None and attn.num_heads == 2
    assert block.pre_norm and block.norm_placement == placement
    post_attn, post_ffn = block.attention_post_norm, block.ffn_post_norm
    assert post_attn is not None and post_attn.gamma.name == "gp1" and post_attn.follows == "attention"
    assert post_ffn is not None and post_ffn.gamma.name == "gp2" and post_ffn.follows == "ffn"
    assert post_attn.input is attn.o.output and post_ffn.input is ffn.down.output
    assert not post_attn.linears and not post_ffn.linears
    assert [add.outputs[0].name for add in block.residual_adds] == ["r", "y"]
    if pre_norms:
        assert block.attention_norm.gamma.name == "g1" and block.ffn_norm.gamma.name == "g2"
        assert block.attention_norm.follows is None and block.ffn_norm.follows is None
    else:
        assert block.attention_norm is None and block.ffn_norm is None
    described = block.describe()
    assert described["norm_placement"] == placement
    assert described["attention_post_norm"]["gamma"] == "gp1" and described["ffn_post_norm"]["follows"] == "ffn"


def test_pre_and_post_norm_blocks_have_no_output_norms(rng: np.random.Generator) -> None:
    (pre,) = find_blocks(_model(rng)).blocks
    assert pre.norm_placement == "pre" and pre.attention_post_norm is None and pre.ffn_post_norm is None
    # a norm of the attention output that a linear reads (no residual add after it) is no output norm
    text = tiny.output_norm_block(pre_norms=False).replace("r = Add (x, on)", "r = MatMul (on, wo)")
    arrays = testing.random_float_initializers(text, rng)
    model = testing.model_from_onnx_text(
        text, **arrays, heads=np.array([0, 0, 2, 4], np.int64), merged=np.array([0, 0, 8], np.int64)
    )
    (block,) = find_blocks(model).blocks
    assert block.attention is not None and block.attention_post_norm is None
    assert block.ffn_post_norm is not None and [add.outputs[0].name for add in block.residual_adds] == ["y"]


PER_HEAD_QKV = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[B, 4, 8] x) => (float[B, 4, 8] y)
<float[8, 24] wqkv, float[8, 8] wo, int64[4] heads, int64[3] merged, int64[3] parts>
{
    qkv = MatMul (x, wqkv)
    h4 = Reshape (qkv, heads)
    ht = Transpose <perm = [0, 2, 1, 3]> (h4)
    q, k, v = Split <axis = -1> (ht, parts)
    kt = Transpose <perm = [0, 1, 3, 2]> (k)
    s = MatMul (q, kt)
    p = Softmax <axis = -1> (s)
    c = MatMul (p, v)
    ct = Transpose <perm = [0, 2, 1, 3]> (c)
    cm = Reshape (ct, merged)
    o = MatMul (cm, wo)
    y = Add (x, o)
}
"""


def test_fused_qkv_laid_out_per_head_is_mapped_and_pruned(rng: np.random.Generator) -> None:
    """GPT-NeoX: the fused output is reshaped to [b, s, heads, 3 * head_dim] first, then split
    into Q, K, V inside each head. Head pruning keeps each kept head's 3 * head_dim columns
    (exactness: tests/passes/test_prune_heads.py)."""
    from tforge.passes.prune_heads import PruneHeads

    model = testing.model_from_onnx_text(
        PER_HEAD_QKV, wqkv=rng.normal(size=(8, 24)), wo=rng.normal(size=(8, 8)),
        heads=np.array([0, 0, 2, 12], np.int64), merged=np.array([0, 0, 8], np.int64),
        parts=np.array([4, 4, 4], np.int64),
    )  # fmt: skip
    block_map = find_blocks(model)
    assert block_map.unrecognized == []
    (block,) = block_map.blocks
    attn = block.attention
    assert attn is not None and attn.fused_qkv and attn.qkv_per_head
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.qkv_split) == (2, 2, 4, (8, 8, 8))
    assert attn.describe()["qkv_layout"] == "per_head"

    result = PruneHeads(keep=1, importance="magnitude")(model)
    assert result.changed and result.stats["pruned"] == 1, result.stats
    # one head of 3 * 4 columns is left; its split and the merge follow (a single head's per-head
    # layout is a plain fused split to the block map, so the constants are checked directly)
    targets = {n.inputs[1].name: n.inputs[1].const_value.numpy().tolist() for n in model.graph if n.op_type == "Reshape"}
    assert sorted(targets.values()) == [[0, 0, 1, 12], [0, 0, 4]], targets
    (matmul,) = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None and n.inputs[0].name == "x"]
    assert matmul.inputs[1].const_value.numpy().shape == (8, 12)
