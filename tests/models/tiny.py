"""Tiny hand-written transformer blocks in ONNX text, shared by the tests of several passes."""

from __future__ import annotations


def pre_norm_block(batch: str = "B") -> str:
    """LN -> 2-head attention (V with bias) -> residual -> LN -> ReLU FFN -> residual, hidden size 8.

    ``batch`` is the batch dimension: a symbol (``B``) or a fixed size (``1``, for golden IR
    files). Initializers are declared, not given: ``testing.random_float_initializers`` and the
    test fill them in (``heads`` and ``merged`` are the Reshape targets ``[b, 4, 2, 4]``/``[b, 4, 8]``).
    """
    return _PRE_NORM_BLOCK.replace("BATCH", batch)


_PRE_NORM_BLOCK = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[BATCH, 4, 8] x) => (float[BATCH, 4, 8] y)
<float[8] g1, float[8] b1, float[8, 8] wq, float[8, 8] wk, float[8, 8] wv, float[8] bv,
 float[8, 8] wo, float[8] bo, int64[4] heads, int64[3] merged,
 float[8] g2, float[8] b2, float[8, 16] wu, float[16] bu, float[16, 8] wd>
{
    h = LayerNormalization <axis = -1> (x, g1, b1)
    q = MatMul (h, wq)
    k = MatMul (h, wk)
    v0 = MatMul (h, wv)
    v = Add (v0, bv)
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
    u0 = MatMul (h2, wu)
    u = Add (u0, bu)
    a = Relu (u)
    d = MatMul (a, wd)
    y = Add (r, d)
}
"""


#: the MiniLM tokenizer's vocabulary, so text calibration with that tokenizer can feed ``text_encoder``
MINILM_VOCAB = 30522


def text_encoder(width: int, inner: int, out: int, vocab: int = MINILM_VOCAB) -> str:
    """An embedding, a masked ReLU MLP (two linears): the smallest model text calibration feeds."""
    return f"""
<ir_version: 10, opset_import: ["" : 18]>
encoder (int64[B, S] input_ids, int64[B, S] attention_mask) => (float[B, S, {out}] y)
<float[{vocab}, {width}] emb, float[{width}, {inner}] w1, float[{inner}, {out}] w2, int64[1] last>
{{
    e = Gather <axis = 0> (emb, input_ids)
    m = Cast <to = 1> (attention_mask)
    mu = Unsqueeze (m, last)
    h = Mul (e, mu)
    a = MatMul (h, w1)
    r = Relu (a)
    y = MatMul (r, w2)
}}
"""

