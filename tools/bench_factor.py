"""Factorization section of tools/bench.py (``--section factor``): low-rank and Kronecker linears.

For each real model, in one run: ``canonicalize`` and ``calibrate{gram=true}`` once (statistics
shared by every variant; the factorization passes only read them), then at 10%, 25% and 40% of
the parameters of the transformer blocks' linears removed:

- ``svd plain``: truncated SVD of each weight; ranks chosen by the global budget on the output
  error measured with the calibration second moment;
- ``svd activation``: activation-aware (whitened) SVD, the same budget;
- ``kronecker plain`` / ``kronecker activation``: sums of Kronecker products (Van Loan-Pitsianis;
  activation: whitened by the nearest Kronecker product to E[x x^T]), the same budget, at most
  the dense layer's multiply-adds per layer (``max-macs=1``).

Then factorization composed with int8 (``quantize{activations=dynamic-per-token}``) at 25%
(activation-aware SVD), with the rank-r intermediate quantized (its own per-token scales) or
kept in float (``exclude=.svd_b``), next to int8 alone.

Accuracy uses the int8 section's protocol and helpers (bench.py, tforge.evaluate): MiniLM, cosine
of mean-pooled embeddings against fp32 on WikiText-2 sentences of the second half; SmolLM2,
WikiText-2 perplexity on 512-token windows of the second half. Calibration reads the first half.
Latency: each ratio's variants are timed interleaved with the canonical fp32 model in one
process (benchlib.timing_session, bench's shapes); the ratio is against that fp32 timing.
"""

from __future__ import annotations

import dataclasses
import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import onnx_ir as ir

import tforge
from tforge import evaluate
from tforge.backends import ort
from tforge.compiler import verify
from tforge.compiler.calibration import FEEDS_KEY, STATS_KEY, text_feeds
from tforge.compiler.pipeline import PassManager, parse_pipeline
from tforge.frontends import hf_models
from tforge.runtime import save as model_save

RATIOS = (0.1, 0.25, 0.4)
# The int8 setting composed with factorization: per-token activations need no calibration of
# the new rank-r intermediates.
QUANTIZE = "quantize{activations=dynamic-per-token}"
_WEIGHT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8, ir.DataType.UINT8}
)


@dataclasses.dataclass(frozen=True)
class FactorProtocol:
    calib_samples: int  # MiniLM sentences / SmolLM2 windows, first half
    calib_seq: int
    eval_sentences: int
    eval_windows: int
    context: int
    runs: int
    ratios: tuple[float, ...] = RATIOS

    @classmethod
    def full(cls, runs: int) -> FactorProtocol:
        return cls(calib_samples=128, calib_seq=128, eval_sentences=256, eval_windows=16, context=512, runs=runs)

    @classmethod
    def quick(cls) -> FactorProtocol:
        return cls(calib_samples=8, calib_seq=128, eval_sentences=32, eval_windows=2, context=256, runs=3, ratios=(0.25,))


def variants(ratio: float) -> dict[str, str]:
    """The factorizations compared at one ratio (after canonicalize,calibrate{gram=true})."""
    r = f"{ratio:g}"
    return {
        f"svd plain {ratio:.0%}": f"svd{{ratio={r}}}",
        f"svd activation {ratio:.0%}": f"svd{{ratio={r} method=activation}}",
        f"kronecker plain {ratio:.0%}": f"kronecker{{ratio={r}}}",
        f"kronecker activation {ratio:.0%}": f"kronecker{{ratio={r} method=activation}}",
    }


def quantized_variants() -> dict[str, str]:
    svd = "svd{ratio=0.25 method=activation}"
    return {
        "int8 alone": QUANTIZE,
        "svd activation 25% + int8, intermediate int8": f"{svd},{QUANTIZE}",
        "svd activation 25% + int8, intermediate float": f"{svd},{QUANTIZE[:-1]} exclude=.svd_b}}",
    }


@dataclasses.dataclass
class Row:
    label: str
    spec: str
    path: Path | None
    seconds: float = 0.0
    reduction: float = 0.0  # of the parameters of the linears in scope (transformer blocks)
    macs: float = 1.0  # their multiply-adds per token, relative to dense
    params: int = 0  # weight elements of the whole model
    layers: int = 0  # weights factorised
    accuracy: float = float("nan")
    latency: Any = None
    fp32_latency: Any = None  # fp32 timed interleaved with this row
    ratio: float = float("nan")


def params(model) -> int:
    """Elements of the model's float and 8-bit initializers that some node reads (the weights)."""
    return sum(
        int(v.const_value.size)
        for v in model.graph.initializers.values()
        if v.const_value is not None and v.dtype in _WEIGHT_TYPES and list(v.uses())
    )


def _build(name: str, label: str, spec: str, base, stats, work: Path, index: int) -> Row:
    model = base.clone()
    model.meta[STATS_KEY] = stats  # read only: no pass here rescales statistics
    row = Row(label, spec, None)
    t0 = time.perf_counter()
    for p in parse_pipeline(spec):
        result = p(model)
        if p.name in ("svd", "kronecker"):
            details = result.details
            total = details["linear_params"]
            layers = details["layers"]
            before = sum(x["params_before"] for x in layers)
            macs = sum(x["params_before"] * x.get("macs_ratio", x["params_after"] / x["params_before"]) for x in layers)
            row.reduction, row.layers = details["reduction"], len(layers)
            row.macs = (total - before + macs) / total if total else 1.0
    row.seconds = time.perf_counter() - t0
    row.params = params(model)
    row.path = model_save.save_model(model, work / f"{name}.factor-{index}.onnx")
    benchlib.log(f"{name}: {label}: {spec} in {row.seconds:.1f}s, linear parameters -{row.reduction:.1%}, "
               f"linear MACs x{row.macs:.2f}, {row.layers} weights factorised")
    return row


def _model(name: str, out_dir: Path, work: Path, protocol: FactorProtocol, threads: int | None) -> list[str]:
    src = benchlib.exported(out_dir, name)
    tokenizer_path = hf_models.minilm_dir() if name == "minilm" else hf_models.smollm2_gguf_path()
    base = tforge.load(src)
    base.meta[FEEDS_KEY] = list(
        text_feeds(base, benchlib.WIKITEXT, tokenizer_path, samples=protocol.calib_samples, seq_len=protocol.calib_seq)
    )
    t0 = time.perf_counter()
    PassManager.parse("canonicalize,calibrate{gram=true}", progress=lambda _: None).run(base)
    stats = base.meta.pop(STATS_KEY)
    del base.meta[FEEDS_KEY]
    benchlib.log(f"{name}: canonicalize,calibrate{{gram=true}} in {time.perf_counter() - t0:.1f}s")
    fp32 = Row("fp32 (canonical)", "canonicalize", model_save.save_model(base, work / f"{name}.factor-fp32.onnx"), params=params(base))

    text = evaluate.text_half(evaluate.read_text(benchlib.WIKITEXT), "second")
    score: Callable[[Any], float]
    if name == "minilm":
        tokenizer = hf_models.minilm_tokenizer()
        sentences = evaluate.sentences(text, protocol.eval_sentences)
        feeds = verify.make_inputs(base, dims={"batch": 8, "sequence": 128}, rng=np.random.default_rng(0))
        feeds["attention_mask"][:] = 1
        reference: np.ndarray | None = None  # fp32's embeddings, from the first call

        def score(session) -> float:
            nonlocal reference
            emb = evaluate.sentence_embeddings(lambda f: session.run(None, f)[0], tokenizer, sentences)
            if reference is None:
                reference = emb
            return evaluate.agreement(reference, emb).mean
    else:
        tok = hf_models.smollm2_tokenizer()
        ids = evaluate.tokenize_lines(
            lambda line: tok(line, add_special_tokens=False)["input_ids"], text, protocol.context * protocol.eval_windows
        )
        windows = evaluate.token_windows(ids, protocol.context, protocol.eval_windows)
        feeds = {"input_ids": windows[:1]}

        def score(session) -> float:
            return evaluate.window_perplexity(lambda f: session.run(None, f)[0], windows)

    fp32_session = benchlib.timing_session(fp32.path, threads)
    fp32.accuracy = score(fp32_session)
    benchlib.log(f"{name}: fp32 accuracy {fp32.accuracy:.4f}")
    groups = [list(variants(ratio).items()) for ratio in protocol.ratios] + [list(quantized_variants().items())]
    rows: list[Row] = []
    for group in groups:
        built = [_build(name, label, spec, base, stats, work, len(rows) + i) for i, (label, spec) in enumerate(group)]
        sessions = []
        for row in built:
            sessions.append(benchlib.timing_session(row.path, threads))
            row.accuracy = score(sessions[-1])
            benchlib.log(f"{name}: {row.label}: accuracy {row.accuracy:.4f}")
        timings = ort.time_side_by_side([fp32_session, *sessions], feeds, warmup=3, runs=protocol.runs)
        for row, timing in zip(built, timings[1:], strict=True):
            row.latency, row.fp32_latency = timing, timings[0]
            row.ratio = timing.median_ms / timings[0].median_ms
        del sessions
        gc.collect()
        rows += built
    return _table(name, fp32, rows, protocol)


def _table(name: str, fp32: Row, rows: list[Row], protocol: FactorProtocol) -> list[str]:
    if name == "minilm":
        head = (f"MiniLM (all-MiniLM-L6-v2; 36 linears in 6 blocks, 10.6 M parameters): latency of batch 8 x 128 tokens; "
                f"cosine of mean-pooled embeddings vs fp32 on {protocol.eval_sentences} WikiText-2 sentences (second half)")
        metric = "cosine vs fp32"
    else:
        head = (f"SmolLM2-135M-Instruct (210 linears in 30 blocks, 106.2 M parameters; the untied lm_head is not in "
                f"scope): latency of one {protocol.context}-token forward; WikiText-2 perplexity, context "
                f"{protocol.context}, first {protocol.eval_windows} windows of the second half")
        metric = "perplexity"
    out = [
        f"{head}. Calibration: {protocol.calib_samples} samples of the first half, with Gram matrices. Latency: median "
        f"of {protocol.runs} runs; the variants of one ratio (and the int8 rows) are timed interleaved with the fp32 "
        f"model, whose median in that group is shown after the variant's; ratio = variant / fp32.",
        "",
        f"| variant | block linear params removed | their MACs vs dense | model weights (M) | {metric} | latency ms: variant / fp32 | latency ratio | weights factorised | pass time (s) | passes after canonicalize,calibrate{{gram=true}} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in [fp32, *rows]:
        t, f = row.latency, row.fp32_latency
        latency = f"{t.median_ms:.0f} / {f.median_ms:.0f}" if t is not None and f is not None else "-"
        ratio = "1.00" if row is fp32 else f"{row.ratio:.2f}"
        if name == "minilm":
            accuracy = f"{row.accuracy:.4f}"
        else:
            accuracy = f"{row.accuracy:.2f}" + ("" if row is fp32 else f" ({row.accuracy / fp32.accuracy - 1:+.0%})")
        out.append(
            f"| {row.label} | {row.reduction:.1%} | {row.macs:.2f} | {row.params / 1e6:.1f} | {accuracy} | {latency} | "
            f"{ratio} | {row.layers} | {row.seconds:.1f} | `{row.spec}` |"
        )
    return out


def factor(names: list[str], out_dir: Path, protocol: FactorProtocol, threads: int | None) -> list[str]:
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tforge-bench-factor-", dir=out_dir) as folder:
        for name in names:
            rows += _model(name, out_dir, Path(folder), protocol, threads) + [""]
            gc.collect()
    return rows
