"""ort-fuse on attention without a KV cache: the core becomes com.microsoft.MultiHeadAttention.

Encoders (BERT, ViT) and decoders run without a cache (GPT-2) keep their projections; the head
split, K^T, scale, mask add, Softmax, probs @ V and head merge become one MultiHeadAttention whose
``attention_bias`` is the graph's own additive mask. The fusion is opt-in
(``ort-fuse{encoder-attention=true}``). Outputs are compared with the unfused graph in ONNX
Runtime with its graph optimizations off, on batches with padded rows (attention_mask zeros).
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tforge import testing
from tforge.backends import ort
from tforge.compiler.attention_paths import attention_core
from tforge.compiler.calibration import FEEDS_KEY
from tforge.compiler.pipeline import PassManager
from tforge.presets import PRESETS
from tforge.runtime import ort as ort_runtime

MHA = "attention -> MultiHeadAttention"
FUSE = "ort-fuse{encoder-attention=true}"


def _run(model: ir.Model, spec: str):
    return PassManager.parse(spec, progress=lambda _: None).run(model).passes[-1]


def _ops(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph)


def _outputs(model: ir.Model, feeds, *, optimize: bool = False) -> dict[str, np.ndarray]:
    session = ort_runtime.create_session(model, optimize=optimize)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def _text_feeds(batch: int, seq: int, rng: np.random.Generator, vocab: int = 96) -> dict[str, np.ndarray]:
    """Token ids and an attention mask with padding: row 1 right-padded, row 2 mostly padding."""
    mask = np.ones((batch, seq), np.int64)
    mask[1, seq - 3 :] = 0
    mask[2, 2:] = 0
    return {"input_ids": rng.integers(0, vocab, (batch, seq)), "attention_mask": mask}


def _blocked(result) -> list[dict]:
    return [s for s in result.skipped if s["blocked"]]


# ----------------------------------------------------------------------------- zoo models


@pytest.mark.parametrize(
    ("zoo_name", "what"),
    [
        ("bert", "bidirectional, padding mask [batch, 1, seq, seq]"),
        ("gpt2", "causal (the mask carries it), fused QKV Split, heads merged straight to 2-D"),
        ("vit", "no mask: ORT's flash-attention path"),
    ],
)
def test_zoo_attention_becomes_multihead_attention(zoo_name: str, what: str, zoo_model, zoo_entries) -> None:
    reference = tforge.load(zoo_model(zoo_name))
    _run(reference, "canonicalize")
    model = reference.clone()

    result = _run(model, FUSE)

    assert result.stats.get(MHA, 0) == 2, what
    assert not _blocked(result), result.skipped
    ops = _ops(model)
    assert ops["MultiHeadAttention"] == 2 and ops["Softmax"] == 0
    assert ops["Transpose"] <= _ops(reference)["Transpose"] - 8  # Q, K, V splits and the merge, per layer
    assert sum(ops.values()) < 0.8 * sum(_ops(reference).values())
    if zoo_name == "vit":
        feeds = zoo_entries[zoo_name].inputs(3, 9, np.random.default_rng(1))
    else:
        feeds = _text_feeds(3, 9, np.random.default_rng(1))
    want = _outputs(reference, feeds)
    for optimize in (False, True):
        got = _outputs(model, feeds, optimize=optimize)
        for name, value in want.items():  # padded rows included
            np.testing.assert_allclose(got[name], value, rtol=0, atol=2e-5, err_msg=f"{name}, optimize={optimize}")
    ran = {op for op, _ in ort.kernels_run(model, feeds)}
    assert "MultiHeadAttention" in ran and "Softmax" not in ran


def test_bert_after_w8a8_preset(zoo_model) -> None:
    """Int8 projections (MatMulIntegerToFloat) stay; the float core between them is fused."""
    model = tforge.load(zoo_model("bert"))
    rng = np.random.default_rng(2)
    model.meta[FEEDS_KEY] = [_text_feeds(4, 12, rng) for _ in range(4)]
    _run(model, PRESETS["w8a8"])
    reference = model.clone()
    # the first attention's merged context as a graph output: exact before any quantization rounding
    first = next(n for n in reference.graph if n.op_type == "Softmax")
    context = attention_core(first).output
    reference.graph.outputs.append(context)
    model = reference.clone()

    result = _run(model, FUSE)

    assert result.stats.get(MHA, 0) == 2
    assert not _blocked(result), result.skipped
    assert _ops(model)["Softmax"] == 0
    feeds = _text_feeds(3, 9, np.random.default_rng(1))
    want, got = _outputs(reference, feeds), _outputs(model, feeds)
    assert set(got) == set(want)
    np.testing.assert_allclose(got[context.name], want[context.name], rtol=0, atol=1e-5)
    # later layers quantize inputs that moved by float rounding (a different summation order in
    # the fused kernel): an element may round to the next int8 step. Bound: no farther from the
    # unfused graph than ONNX Runtime's own optimizations move it, plus one step's worth.
    out = "last_hidden_state"
    drift = np.abs(_outputs(reference, feeds, optimize=True)[out] - want[out]).max()
    error = np.abs(got[out] - want[out]).max()
    assert error <= 2 * drift + 0.02 * np.abs(want[out]).max(), (error, drift)
    ran = collections.Counter(op for (op, _), n in ort.kernels_run(model, feeds).items() for _ in range(n))
    assert ran["MultiHeadAttention"] == 2 and ran["MatMulIntegerToFloat"] == 12 and ran["Softmax"] == 0


@pytest.mark.parametrize("spec", ["ort-fuse", "ort-fuse{encoder-attention=false}"])
def test_off_by_default_and_said_so(spec: str, zoo_model) -> None:
    model = tforge.load(zoo_model("bert"))
    _run(model, "canonicalize")
    result = _run(model, spec)
    assert MHA not in result.stats and _ops(model)["Softmax"] == 2
    off = [s for s in result.skipped if "encoder-attention=false" in s["reason"]]
    assert len(off) == 2 and not any(s["blocked"] for s in off)
    assert not result.changed


def test_rotary_attention_is_explained(zoo_model) -> None:
    """LLaMA without a cache: rotary on Q and K, which MultiHeadAttention does not apply here."""
    model = tforge.load(zoo_model("llama"))
    _run(model, "canonicalize")
    result = _run(model, FUSE)
    assert MHA not in result.stats
    reasons = [s["reason"] for s in _blocked(result)]
    assert reasons == ["rotary embedding on Q and K: MultiHeadAttention is fused only without rotary"] * 2


# ----------------------------------------------------------------------------- hand-written graphs


def _encoder(*, scores: str = "scaled", q_split: str = "", k_split: str = "", v_split: str = "", merge: str = "",
             mask: str = "padding") -> str:  # fmt: skip
    """Two attention layers (2 heads of 4) on ``x: [B, S, 8]`` sharing a mask from attention_mask.

    ``mask``: ``padding`` -> ``(1 - m) * -10000`` as ``[B, 1, 1, S]`` (broadcast over queries);
    ``where`` -> ``Where(m, 0, -inf)``. ``scores``: ``scaled`` (scale, then mask), ``late``
    (mask, then scale), ``guarded`` (NaN guard after the Softmax). The ``*_split`` / ``merge``
    arguments replace the head layout lines.
    """
    masks = {
        "padding": "mf = Cast <to = 1> (attention_mask)\n inv = Sub (one, mf)\n neg = Mul (inv, big)\n"
        " bias = Unsqueeze (neg, mask_axes)\n",
        "where": "mb = Cast <to = 9> (attention_mask)\n wm = Where (mb, zero, ninf)\n bias = Unsqueeze (wm, mask_axes)\n",
    }
    layer = {
        "scaled": " s{i} = MatMul (qt{i}, kt{i})\n ss{i} = Mul (s{i}, scale)\n sm{i} = Add (ss{i}, bias)\n"
        " pp{i} = Softmax <axis = -1> (sm{i})\n",
        "late": " s{i} = MatMul (qt{i}, kt{i})\n sm{i} = Add (s{i}, bias)\n ss{i} = Mul (sm{i}, scale)\n"
        " pp{i} = Softmax <axis = -1> (ss{i})\n",
        "guarded": " s{i} = MatMul (qt{i}, kt{i})\n ss{i} = Mul (s{i}, scale)\n sm{i} = Add (ss{i}, bias)\n"
        " p{i} = Softmax <axis = -1> (sm{i})\n nan{i} = IsNaN (p{i})\n pp{i} = Where (nan{i}, zero, p{i})\n",
    }[scores]
    q_split = q_split or " q4{i} = Reshape (q{i}, heads)\n qt{i} = Transpose <perm = [0, 2, 1, 3]> (q4{i})\n"
    k_split = k_split or " k4{i} = Reshape (k{i}, heads)\n kt{i} = Transpose <perm = [0, 2, 3, 1]> (k4{i})\n"
    v_split = v_split or " v4{i} = Reshape (v{i}, heads)\n vt{i} = Transpose <perm = [0, 2, 1, 3]> (v4{i})\n"
    merge = merge or " ct{i} = Transpose <perm = [0, 2, 1, 3]> (c{i})\n cm{i} = Reshape (ct{i}, merged)\n"
    body = ""
    for i in range(2):
        inp = "x" if i == 0 else "h0"
        out = "y" if i == 1 else "h0"
        text = (
            " q{i} = MatMul ({inp}, wq{i})\n k0{i} = MatMul ({inp}, wk{i})\n k{i} = Add (k0{i}, bk{i})\n"
            " v{i} = MatMul ({inp}, wv{i})\n"
            + q_split + k_split + v_split + layer
            + " c{i} = MatMul (pp{i}, vt{i})\n" + merge
            + " o{i} = MatMul (cm{i}, wo{i})\n {out} = Add ({inp}, o{i})\n"
        )  # fmt: skip
        body += text.replace("{i}", str(i)).replace("{inp}", inp).replace("{out}", out)
    weights = ", ".join(f"float[8, 8] w{p}{i}" for i in range(2) for p in "qkvo")
    return f"""
<ir_version: 10, opset_import: ["" : 18]>
enc (float[B, S, 8] x, int64[B, S] attention_mask) => (float[B, S, 8] y)
<{weights}, float[8] bk0, float[8] bk1, int64[4] heads, int64[3] merged, int64[2] mask_axes,
 float one, float big, float scale, float zero, float ninf, int64[4] dims_first>
{{
 {masks[mask]}{body}}}
"""


def _encoder_model(text: str) -> ir.Model:
    rng = np.random.default_rng(0)
    constants = {
        "heads": np.array([0, 0, 2, 4]), "merged": np.array([0, 0, 8]), "mask_axes": np.array([1, 2]),
        "one": np.float32(1), "big": np.float32(-10000), "scale": np.float32(0.3), "zero": np.float32(0),
        "ninf": np.float32(-np.inf), "dims_first": np.array([0, 0, 4, 2]),
    }  # fmt: skip
    body = text.split("{", 1)[1]
    used = {name: value for name, value in constants.items() if re.search(rf"\b{name}\b", body)}
    model = testing.model_from_onnx_text(text, **testing.random_float_initializers(text, rng), **used)
    _run(model, "canonicalize")
    return model


def _encoder_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    mask = np.ones((3, 6), np.int64)
    mask[1, 4:] = 0
    mask[2, :3] = 0  # left padding
    return {"x": rng.standard_normal((3, 6, 8)).astype(np.float32), "attention_mask": mask}


def test_broadcast_mask_is_expanded_once_and_scale_kept() -> None:
    """A ``[B, 1, 1, S]`` mask: ORT wants ``attention_bias`` as ``[.., .., S, T]``, so one Expand
    (shared by both layers); the graph's scale 0.3 is not 1/sqrt(head_dim) and is passed on."""
    reference = _encoder_model(_encoder())
    model = reference.clone()
    result = _run(model, FUSE)
    assert result.stats.get(MHA, 0) == 2 and not _blocked(result)
    ops = _ops(model)
    assert ops["Expand"] == 1 and ops["Softmax"] == 0
    mha = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
    assert all(n.attributes["scale"].value == pytest.approx(0.3) for n in mha)
    assert all(n.inputs[5] is mha[0].inputs[5] for n in mha)  # one attention_bias
    feeds = _encoder_feeds()
    np.testing.assert_allclose(_outputs(model, feeds)["y"], _outputs(reference, feeds)["y"], rtol=0, atol=1e-5)


def test_transpose_pair_for_k_is_traced() -> None:
    """K^T written as Transpose(0, 2, 1, 3) then Transpose(0, 1, 3, 2) instead of one (0, 2, 3, 1)."""
    k_split = (
        " k4{i} = Reshape (k{i}, heads)\n kh{i} = Transpose <perm = [0, 2, 1, 3]> (k4{i})\n"
        " kt{i} = Transpose <perm = [0, 1, 3, 2]> (kh{i})\n"
    )
    reference = _encoder_model(_encoder(k_split=k_split))
    model = reference.clone()
    assert _run(model, FUSE).stats.get(MHA, 0) == 2
    feeds = _encoder_feeds()
    np.testing.assert_allclose(_outputs(model, feeds)["y"], _outputs(reference, feeds)["y"], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        (
            {"scores": "late"},
            "the scores are scaled after the mask is added (the scale multiplies the mask too)",
        ),
        (
            {"scores": "guarded", "mask": "where"},
            "a NaN guard Where(IsNaN(p), 0, p) follows the Softmax (canonicalize drops it where it cannot fire)",
        ),
        (  # heads taken as the inner factor of the width (channel = d * heads + h): valid, not MHA's layout
            {
                "q_split": " q4{i} = Reshape (q{i}, dims_first)\n qt{i} = Transpose <perm = [0, 3, 1, 2]> (q4{i})\n",
                "k_split": " k4{i} = Reshape (k{i}, dims_first)\n kt{i} = Transpose <perm = [0, 3, 2, 1]> (k4{i})\n",
                "v_split": " v4{i} = Reshape (v{i}, dims_first)\n vt{i} = Transpose <perm = [0, 3, 1, 2]> (v4{i})\n",
                "merge": " ct{i} = Transpose <perm = [0, 2, 3, 1]> (c{i})\n cm{i} = Reshape (ct{i}, merged)\n",
            },
            "the query does not reach its MatMul as [batch, heads, seq, head_dim] split head-major from its width",
        ),
        (  # the context merged with the heads inner: a valid graph MultiHeadAttention would get wrong
            {"merge": " ct{i} = Transpose <perm = [0, 2, 3, 1]> (c{i})\n cm{i} = Reshape (ct{i}, merged)\n"},
            "the context heads are not merged back to [batch, seq, heads * head_dim] by layout ops",
        ),
    ],
    ids=["scale-after-mask", "nan-guard", "heads-inner", "merge-heads-inner"],
)
def test_unfusable_layouts_are_skipped_with_a_reason(variant: dict, reason: str) -> None:
    reference = _encoder_model(_encoder(**variant))
    model = reference.clone()
    result = _run(model, FUSE)
    assert MHA not in result.stats
    assert [s["reason"] for s in _blocked(result)] == [reason] * 2
    feeds = _encoder_feeds()
    np.testing.assert_allclose(_outputs(model, feeds)["y"], _outputs(reference, feeds)["y"], rtol=0, atol=0)


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_minilm_fused_float_and_w8a8(minilm_onnx: Path) -> None:
    from tforge.api import _with_calibration
    from tforge.frontends import hf_models

    feeds = _text_feeds(4, 32, np.random.default_rng(5), vocab=30522)
    reference = tforge.load(minilm_onnx)
    _run(reference, "canonicalize")
    model = reference.clone()
    assert _run(model, FUSE).stats.get(MHA, 0) == 6
    want, got = _outputs(reference, feeds), _outputs(model, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-4)

    int8 = tforge.load(minilm_onnx)
    manager = PassManager.parse(PRESETS["w8a8"], progress=lambda _: None)
    text = Path(tforge.__file__).parent / "data" / "wikitext-2-raw-test.txt"
    manager.passes = _with_calibration(manager.passes, text=text, tokenizer=hf_models.minilm_dir())
    manager.run(int8)
    fused = int8.clone()
    assert _run(fused, FUSE).stats.get(MHA, 0) == 6
    a, b = _outputs(int8, feeds)["last_hidden_state"], _outputs(fused, feeds)["last_hidden_state"]
    cosine = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() > 0.999, cosine.min()
    ran = {op for op, _ in ort.kernels_run(fused, feeds)}
    assert {"MultiHeadAttention", "MatMulIntegerToFloat"} <= ran and "Softmax" not in ran
