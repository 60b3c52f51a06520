"""Named pipelines: the passes tforge recommends for a goal, so that a user needs one flag.

``tforge compile model.onnx --preset w8a8 --calib-text FILE --tokenizer PATH -o model.int8.onnx``
runs the preset's pipeline (``tforge.compile(model, preset="w8a8", ...)`` in Python). A preset
can have a second pipeline for graphs with a KV cache (``DECODER_PRESETS``): generation token
by token is bound by the weight bytes read and the nodes run per token, not by multiply-adds,
so what is fastest there is not what is fastest on an encoder's 8 x 128 batch. Each pipeline is
the best one measured (``tools/bench.py --section int8`` on MiniLM and SmolLM2,
``tools/bench_decode.py`` on SmolLM2 with a cache; see BENCHMARKS.md); change one only with a
new measurement.

- ``w8a8``: int8 weights and int8 activations.

  - Without a cache: ``smoothquant`` (alpha 0.5) first moves activation outliers into the
    weights; ``quantize{activations=auto}`` then quantizes each activation per tensor with a
    calibrated scale where the statistics predict at least 33 dB of signal-to-quantization
    noise (the cheapest kernel path), and per token at run time elsewhere (the FFN down
    projections, whose inputs keep outliers smoothing cannot fold through GELU/SiLU).
    Per-tensor activations everywhere (ORT's ``quantize_dynamic``/``quantize_static``) cost
    SmolLM2 18-300% perplexity; per token everywhere costs MiniLM several % of speed.
    ``ort-layernorm`` keeps ORT on LayerNormalization rather than its slower fused
    SkipLayerNormalization (post-norm models such as BERT). On a decoder a dynamic per-tensor
    middle tier (``min-sqnr-dynamic=28``) measured 2-5% faster, at +2.7% SmolLM2 perplexity
    against +2.1%: too little margin under the 3% limit.
  - On an encoder (``ENCODER_PRESETS``: no attention is causal, as the block map reads it) the
    middle tier goes down to 20 dB (``min-sqnr-dynamic=20``, noise at most 1% of the signal's
    power): those activations are quantized per tensor at run time inside one
    ``DynamicQuantizeMatMul`` with the bias, instead of a per-token chain of nodes and a separate
    bias add. Encoders lack the few huge-activation tokens of decoder LLMs that make per-tensor
    scales fail there. On MiniLM (8 x 128) the preset runs 1.21-1.26x faster than it did with the
    decoder pipeline before (three interleaved runs; 2.64x over fp32), at a mean cosine of 0.9972
    against 0.9989 (limits 0.995, min 0.98); only layer 0's FFN down projection (19.8 dB) stays
    per token. ``fallback=dynamic`` (that one too) measured 2-4% faster still, at 0.9959.
  - With a KV cache: every linear and the token embedding (with the tied LM head) as 8-bit
    symmetric blocks of 32 on ONNX Runtime's ``MatMulNBits``/``GatherBlockQuantized``, which at
    accuracy level 4 quantize the activations to int8 per block of 32 inside the kernel, then
    ``ort-fuse`` (GroupQueryAttention, the RMSNorm fusions), then ``merge-projections`` (Q/K/V in
    one ``MatMulNBits``, gate/up in one: 90 fewer kernels a token on SmolLM2). On SmolLM2 it
    decodes faster than the per-token int8 graph of the pipeline above (which runs a
    quantization chain of nodes per linear per token) at a smaller perplexity loss, and needs
    no calibration.

- ``w4a8``: 4-bit weights, int8 activations (``MatMulNBits`` accuracy level 4), GPTQ on the
  calibration data's second moments, symmetric blocks of 32 rows. Needs --calib-text/--tokenizer
  (or --calib-npz).

  - With a KV cache (decoding, what 4 bits are for): ``rotate-residual`` first turns the
    residual stream by a random-sign Hadamard matrix folded into the weights (exact in float),
    which spreads the channels a 4-bit block holds badly; then every linear at 4 bits (GPTQ,
    blocks of 32), and the token table with the LM head tied to it at 4 bits in blocks of 64
    along the hidden axis, the table's codes chosen by GPTQ on the head's input statistics (the
    head is the most sensitive tensor: on SmolLM2 the 4-bit head alone costs +14.8% perplexity
    by RTN, +2.5% by GPTQ, before rotation); then each decoder block's codes and scales trained
    for 100 steps of one 512-token window to reproduce the float block's output from the
    quantized model's input to it, token by token (``reconstruct-steps``, ``reconstruct-seq-len``);
    then every block scale (the table's too) tuned end to end for 100
    steps of one 512-token window against the float model's next-token distribution on the
    calibration text, the codes kept (``tune-steps``, ``tune-seq-len``; both need PyTorch); then
    ``ort-fuse`` and ``merge-projections``. On SmolLM2 the rotation takes the perplexity loss from +10.4% to +8.8%
    with a table in blocks of 32; the table's blocks of 64 (+9.1%) pay for the linear the
    rotation adds before the tied head and keep the file under onnxruntime-genai's int4 graph of
    the same model; the tuned scales take it to about +6% at the same size, and the table's first
    4096 rows at 8 bits (``embedding-8bit-rows``: a BPE vocabulary's most frequent tokens, 73% of
    WikiText-2's on SmolLM2) to +5.4% for 1.2 MB, still under the builder's file; the block
    reconstruction and the 512-token tuning windows to +4.4% (29.06 against 29.34 in one run;
    BENCHMARKS.md, run 10); the reconstruction's error taken token by token (a few tokens of the
    residual stream are a hundred times larger than the rest and had taken the whole loss) and
    its windows of 512 tokens to +3.8% (28.90; run 11; the build takes 26 minutes on 2 cores) at
    the same size, decoding at the builder's speed within noise.
    A vocabulary of at most 4096 tokens is then all 8-bit.
    Measured on SmolLM2 and not chosen: the table and head at 8 bits (+7.4% before rotation, but
    16% larger and 16% slower to decode); ``sequential=true`` (no gain: 29.79 against 29.77
    perplexity, 54 min); asymmetric blocks of 64 or 128 (+9.8%, +10.5% with an 8-bit table);
    with the rotation, 8-bit V projections with Q and O in blocks of 128 (no gain) and an
    asymmetric table (30.37 against 30.38); a 200-step reconstruction (it fits its windows:
    29.96 untuned, against 29.73 for 100 steps); GPTQ on Gram matrices of 512-token windows
    (30.18 against 29.95 untuned); zero points in blocks of 32 for the FFN, asymmetric blocks of
    64 for the attention's linears (``grid=``: 29.12 against 29.06).
  - Without a cache: the token table stays at 8 bits, then ``ort-fuse``. On an encoder batch
    (MiniLM 8 x 128) it makes the file 4x smaller but runs at 0.91x fp32, where ``w8a8`` runs
    2.5x faster: ``MatMulNBits`` pays where a call has few rows.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from typing import Any

from tforge.errors import PassConfigError, UnsupportedModelError

__all__ = ["DECODER_PRESETS", "ENCODER_PRESETS", "PRESETS", "has_kv_cache", "is_encoder", "preset_pipeline"]

logger = logging.getLogger(__name__)

#: every preset's pipeline, for models without a KV cache
PRESETS: dict[str, str] = {
    "w8a8": "canonicalize,calibrate,smoothquant,quantize{activations=auto},ort-layernorm",
    "w4a8": "canonicalize,calibrate,quantize-weights{method=gptq block=32 embedding-bits=8},ort-fuse",
}

#: a preset's pipeline for encoders (no attention is causal), where it differs
ENCODER_PRESETS: dict[str, str] = {
    "w8a8": "canonicalize,calibrate,smoothquant,quantize{activations=auto min-sqnr-dynamic=20},ort-layernorm",
}

#: a preset's pipeline for graphs with a KV cache, where it differs
DECODER_PRESETS: dict[str, str] = {
    "w8a8": "canonicalize,quantize-weights{bits=8 block=32 embedding-bits=8},ort-fuse,merge-projections",
    "w4a8": (
        "canonicalize,rotate-residual,calibrate,"
        "quantize-weights{method=gptq block=32 embedding-bits=4 embedding-block=64 embedding-8bit-rows=4096 "
        "reconstruct-steps=100 reconstruct-seq-len=512 tune-steps=100 tune-seq-len=512},"
        "ort-fuse,merge-projections"
    ),
}


def has_kv_cache(model: Any) -> bool:
    """Whether ``model`` (an onnx_ir model, a path or a session) is a decoder graph with a KV
    cache that generation can feed (``past_key_values``-style inputs with ``present`` outputs)."""
    from tforge.runtime import generate

    try:
        generate.cache_layout(generate.graph_io(model))
    except UnsupportedModelError:
        return False
    return True


def is_encoder(model: Any) -> bool:
    """Whether ``model`` (an onnx_ir model or the path of an ONNX file) has attention blocks and
    none of them is causal, as the block map reads them (BERT-like encoders, ViT); False for
    anything else (an ORT session, whose graph the block map cannot read)."""
    from tforge.compiler.structure import find_blocks

    model = _graph_model(model)
    if model is None:
        return False
    attentions = [b.attention for b in find_blocks(model).blocks if b.attention is not None]
    return bool(attentions) and not any(a.causal for a in attentions)


def _graph_model(model: Any) -> Any:
    """``model`` as an onnx_ir model (an ONNX path is loaded), or None when it has no graph to
    read (an ORT session)."""
    import onnx_ir as ir

    from tforge.frontends.onnx import load_onnx

    if isinstance(model, (str, os.PathLike)):
        model = load_onnx(model)
    return model if isinstance(model, ir.Model) else None


def _fit_table_block(spec: str, model: Any) -> str:
    """``spec`` with its ``embedding-block=N`` halved until it divides the token table's width
    (at least 16): a preset's table blocks of 64 would leave a 32-wide table in float."""
    from tforge.compiler.embeddings import find_embeddings

    match = re.search(r"embedding-block=(\d+)", spec)
    if match is None:
        return spec
    model = _graph_model(model)
    if model is None:
        return spec
    widths = {emb.shape[1] for emb in find_embeddings(model.graph)}
    block = int(match.group(1))
    while block > 16 and any(width % block for width in widths):
        block //= 2
    if block != int(match.group(1)):
        logger.info("preset: the token table is %s wide, so its blocks are %d", sorted(widths), block)
    return spec[: match.start(1)] + str(block) + spec[match.end(1) :]


def preset_pipeline(name: str, model: Any = None) -> str:
    """The pipeline spec of preset ``name`` for ``model``: its KV-cache pipeline when the model
    has a cache, its encoder pipeline when every attention is bidirectional, where the preset
    has one; PassConfigError naming the known presets otherwise."""
    if name not in PRESETS:
        near = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.5)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise PassConfigError(f"preset: unknown preset {name!r}; {hint}known presets: {', '.join(sorted(PRESETS))}")
    if isinstance(model, (str, os.PathLike)):
        model = _graph_model(model)  # loaded once for the questions below
    if model is not None and name in DECODER_PRESETS and has_kv_cache(model):
        logger.info("preset %s: the model has a KV cache, so the decoding pipeline", name)
        return _fit_table_block(DECODER_PRESETS[name], model)
    if model is not None and name in ENCODER_PRESETS and is_encoder(model):
        logger.info("preset %s: the model is an encoder, so the encoder pipeline", name)
        return ENCODER_PRESETS[name]
    return PRESETS[name]
