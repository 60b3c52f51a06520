"""The block map on tiny hand-written blocks: what it finds, and what it says when it cannot."""

from __future__ import annotations

import numpy as np

from tforge import testing
from tforge.compiler.structure import find_blocks

BLOCK = """
<ir_version: 10, opset_import: ["" : 20]>
block (float[1, 4, 8] x) => (float[1, 4, 8] y)
<float[8] g, float[8] b, float[8, 8] wq, float[8, 8] wk, float[8, 8] wv, float[8, 8] wo, float[8] bo,
 int64[4] heads, int64[3] merged, float[8] g2, float[8] b2, float[8, 16] wu, float[16, 8] wd>
{
    h = LayerNormalization <axis = -1> (x, g, b)
    q = MatMul (h, wq)
    k = MatMul (h, wk)
    v = VALUE_SOURCE
    q4 = Reshape (q, heads)
    qt = Transpose <perm = [0, 2, 1, 3]> (q4)
    k4 = Reshape (k, heads)
    kt = Transpose <perm = [0, 2, 3, 1]> (k4)
    v4 = Reshape (v, heads)
    vt = Transpose <perm = [0, 2, 1, 3]> (v4)
    s = MatMul (qt, kt)
    p = Softmax <axis = -1> (s)
    c = MatMul (p, vt)
    ct = Transpose <perm = [0, 2, 1, 3]> (c)
    cm = Reshape (ct, merged)
    o0 = MatMul (cm, wo)
    o = Add (o0, bo)
    r = Add (x, o)
    h2 = LayerNormalization <axis = -1> (r, g2, b2)
    u = MatMul (h2, wu)
    a = Gelu (u)
    d = MatMul (a, wd)
    y = Add (r, d)
}
"""


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
