"""Tiny hand-written transformer blocks in ONNX text, shared by the tests of several passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tforge import testing


def pre_norm_block(batch: str = "B") -> str:
    """LN -> 2-head attention (V with bias) -> residual -> LN -> ReLU FFN -> residual, hidden size 8.

    ``batch`` is the batch dimension: a symbol (``B``) or a fixed size (``1``, for golden IR
    files). Initializers are declared, not given: ``testing.random_float_initializers`` and the
    test fill them in (``heads`` and ``merged`` are the Reshape targets ``[b, 4, 2, 4]``/``[b, 4, 8]``).
    """
    layer = _PRE_NORM_LAYER.format(s="", inp="x", out="y")
    return f"{_PRE_NORM_HEADER.replace('BATCH', batch)}{{\n{layer}}}\n"


def pre_norm_layers(layers: int, width: int, inner: int, seq: int) -> str:
    """``layers`` of :func:`pre_norm_block`'s layer stacked, ``width`` wide, FFN ``inner`` wide,
    ``x: float[B, seq, width] -> y``; layer ``i``'s values and weights end in ``_i``, and the
    Reshape targets ``heads``/``merged`` are shared (the test gives them)."""
    decls, body = [], []
    for i in range(layers):
        decls.append(
            f"float[{width}] g1_{i}, float[{width}] b1_{i}, float[{width}, {width}] wq_{i}, "
            f"float[{width}, {width}] wk_{i}, float[{width}, {width}] wv_{i}, float[{width}] bv_{i}, "
            f"float[{width}, {width}] wo_{i}, float[{width}] bo_{i}, float[{width}] g2_{i}, float[{width}] b2_{i}, "
            f"float[{width}, {inner}] wu_{i}, float[{inner}] bu_{i}, float[{inner}, {width}] wd_{i}"
        )
        out = "y" if i == layers - 1 else f"y_{i}"
        body.append(_PRE_NORM_LAYER.format(s=f"_{i}", inp="x" if i == 0 else f"y_{i - 1}", out=out))
    return (
        '<ir_version: 10, opset_import: ["" : 18]>\n'
        f"layers (float[B, {seq}, {width}] x) => (float[B, {seq}, {width}] y)\n"
        f"<{', '.join(decls)}, int64[4] heads, int64[3] merged>\n"
        "{\n" + "".join(body) + "}\n"
    )


_PRE_NORM_HEADER = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[BATCH, 4, 8] x) => (float[BATCH, 4, 8] y)
<float[8] g1, float[8] b1, float[8, 8] wq, float[8, 8] wk, float[8, 8] wv, float[8] bv,
 float[8, 8] wo, float[8] bo, int64[4] heads, int64[3] merged,
 float[8] g2, float[8] b2, float[8, 16] wu, float[16] bu, float[16, 8] wd>
"""

#: One pre-norm layer: ``{inp}`` in, ``{out}`` out, ``{s}`` suffixed to its values and weights
#: (``heads`` and ``merged`` are shared by every layer).
_PRE_NORM_LAYER = """    h{s} = LayerNormalization <axis = -1> ({inp}, g1{s}, b1{s})
    q{s} = MatMul (h{s}, wq{s})
    k{s} = MatMul (h{s}, wk{s})
    v0{s} = MatMul (h{s}, wv{s})
    v{s} = Add (v0{s}, bv{s})
    q4{s} = Reshape (q{s}, heads)
    qt{s} = Transpose <perm = [0, 2, 1, 3]> (q4{s})
    k4{s} = Reshape (k{s}, heads)
    kt{s} = Transpose <perm = [0, 2, 3, 1]> (k4{s})
    v4{s} = Reshape (v{s}, heads)
    vt{s} = Transpose <perm = [0, 2, 1, 3]> (v4{s})
    s{s} = MatMul (qt{s}, kt{s})
    p{s} = Softmax <axis = -1> (s{s})
    c{s} = MatMul (p{s}, vt{s})
    ct{s} = Transpose <perm = [0, 2, 1, 3]> (c{s})
    cm{s} = Reshape (ct{s}, merged)
    o0{s} = MatMul (cm{s}, wo{s})
    o{s} = Add (o0{s}, bo{s})
    r{s} = Add ({inp}, o{s})
    h2{s} = LayerNormalization <axis = -1> (r{s}, g2{s}, b2{s})
    u0{s} = MatMul (h2{s}, wu{s})
    u{s} = Add (u0{s}, bu{s})
    a{s} = Relu (u{s})
    d{s} = MatMul (a{s}, wd{s})
    {out} = Add (r{s}, d{s})
"""


#: One pre-norm block with a GELU FFN at fixed shape ``[1, 4, 8]``, opset 20, its value projection
#: left as ``VALUE_SOURCE`` for the test to write; ``heads`` ``[1, 4, 2, 4]`` and ``merged``
#: ``[1, 4, 8]`` are initializers the test gives with the weights. The block map tests vary the
#: value path; the bad-input corpus breaks one thing at a time in it.
GELU_BLOCK = """
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



def qk_norm_block(norm: str = "head", batch: str = "B") -> str:
    """:func:`pre_norm_block` with a QK-norm on Q and K, between their projections and the scores.

    ``norm``: ``"head"`` (Qwen3: an RMSNorm over each head's 4 channels after the head split,
    gamma ``gq``/``gk`` ``[4]`` shared by both heads), ``"width"`` (OLMo2: an RMSNorm over the
    projection's 8 channels before the head split, gamma ``[8]``), ``"layer"`` (a
    LayerNormalization over each head, gamma and beta ``[4]``) or ``"heads-axis"`` (an RMS over
    the heads axis, which is no QK-norm). Besides the float initializers, the test gives
    ``heads`` ``[b, 4, 2, 4]``, ``merged`` ``[b, 4, 8]`` and, but for ``layer``, ``eps`` and
    ``axes`` (``[-1]``; ``[-2]`` for ``heads-axis``).
    """
    width = norm == "width"
    g = 8 if width else 4
    decl = f"float[{g}] gq, float[{g}] gk, " + ("float[4] bq, float[4] bk, " if norm == "layer" else "")
    body = _PRE_NORM_LAYER.format(s="", inp="x", out="y")
    qk = []
    for t in ("q", "k"):
        src = t if width else f"{t}4"
        if norm == "layer":
            qk.append(f"    {t}n = LayerNormalization <axis = -1> ({t}4, g{t}, b{t})\n")
        else:
            qk.append(
                f"    {t}sq = Mul ({src}, {src})\n"
                f"    {t}ms = ReduceMean <keepdims = 1> ({t}sq, axes)\n"
                f"    {t}e = Add ({t}ms, eps)\n"
                f"    {t}rt = Sqrt ({t}e)\n"
                f"    {t}inv = Reciprocal ({t}rt)\n"
                f"    {t}n0 = Mul ({src}, {t}inv)\n"
                f"    {t}n = Mul ({t}n0, g{t})\n"
            )
        if width:  # normalise first, then split into heads
            body = body.replace(f"    {t}4 = Reshape ({t}, heads)\n", qk[-1] + f"    {t}4 = Reshape ({t}n, heads)\n")
        else:
            body = body.replace(f"Transpose <perm = [0, 2, {'1, 3' if t == 'q' else '3, 1'}]> ({t}4)",
                                f"Transpose <perm = [0, 2, {'1, 3' if t == 'q' else '3, 1'}]> ({t}n)")
            body = body.replace(f"    {t}t = Transpose", qk[-1] + f"    {t}t = Transpose")
    header = _PRE_NORM_HEADER.replace("BATCH", batch).replace(
        "int64[4] heads,", f"{decl}{'' if norm == 'layer' else 'float eps, int64[1] axes, '}int64[4] heads,"
    )
    return f"{header}{{\n{body}}}\n"


def qk_norm_model(norm: str, rng: np.random.Generator) -> ir.Model:
    """:func:`qk_norm_block` with random weights (gammas near 1) and its int64 constants."""
    text = qk_norm_block(norm)
    arrays = testing.random_float_initializers(text, rng, scale=0.5)
    for g in ("gq", "gk"):
        arrays[g] = 1.0 + arrays[g]
    if norm != "layer":
        arrays["eps"] = np.array(1e-6, np.float32)
        arrays["axes"] = np.array([-2 if norm == "heads-axis" else -1], np.int64)
    return testing.model_from_onnx_text(
        text, **arrays, heads=np.array([0, 0, 2, 4], np.int64), merged=np.array([0, 0, 8], np.int64)
    )


def output_norm_block(pre_norms: bool = True, batch: str = "B") -> str:
    """:func:`pre_norm_block` that normalises each sub-block's output before its residual add.

    ``x + LN(o(...))`` and ``r + LN(down(...))`` with LayerNorms ``gp1, bp1`` / ``gp2, bp2``:
    with ``pre_norms`` the pre-norms stay (Gemma 2/3 "sandwich"), without them Q/K/V read ``x``
    and up reads ``r`` directly (OLMo 2).
    """
    body = _PRE_NORM_LAYER.format(s="", inp="x", out="y")
    body = body.replace(
        "    r = Add (x, o)\n", "    on = LayerNormalization <axis = -1> (o, gp1, bp1)\n    r = Add (x, on)\n"
    ).replace(
        "    y = Add (r, d)\n", "    dn = LayerNormalization <axis = -1> (d, gp2, bp2)\n    y = Add (r, dn)\n"
    )
    header = _PRE_NORM_HEADER.replace("BATCH", batch).replace(
        "int64[4] heads,", "float[8] gp1, float[8] bp1, float[8] gp2, float[8] bp2, int64[4] heads,"
    )
    if not pre_norms:
        body = body.replace("    h = LayerNormalization <axis = -1> (x, g1, b1)\n", "").replace("(h, ", "(x, ")
        body = body.replace("    h2 = LayerNormalization <axis = -1> (r, g2, b2)\n", "").replace("(h2, ", "(r, ")
        header = header.replace("<float[8] g1, float[8] b1, ", "<").replace(" float[8] g2, float[8] b2,", "")
    return f"{header}{{\n{body}}}\n"


def output_norm_model(pre_norms: bool, rng: np.random.Generator) -> ir.Model:
    """:func:`output_norm_block` with random weights (gammas near 1)."""
    text = output_norm_block(pre_norms)
    arrays = testing.random_float_initializers(text, rng, scale=0.5)
    for g in ("g1", "g2", "gp1", "gp2"):
        if g in arrays:
            arrays[g] = 1.0 + arrays[g]
    return testing.model_from_onnx_text(
        text, **arrays, heads=np.array([0, 0, 2, 4], np.int64), merged=np.array([0, 0, 8], np.int64)
    )
