"""Linear attention benchmark: latency against sequence length, and accuracy of hybrid models.

Sections (``--section``):

- ``latency``: a randomly initialised LLaMA (hidden 256, 4 layers, 4 heads on 2 KV heads, FFN 512,
  16384 positions) exported with dynamic batch and sequence, against the same model with every
  layer converted (``linear-attention``, elu+1, causal chunked form with chunk 64, and the
  ``com.microsoft.LinearAttention`` op). Batch 1 at 128, 512, 2048, 4096 and 8192 tokens, the
  three sessions timed interleaved (``time_side_by_side``, ORT optimisations on, spinning off).
  The crossover is the shortest length at which the converted model's median is lower. The
  converted graph is also run once with every intermediate exposed at 601 tokens
  (``quadratic_values``) to show no tensor has two sequence-long dimensions.
- ``minilm``: cosine of mean-pooled embeddings against the original on WikiText-2 sentences of
  the second half, for 1 layer, 25%, 50% and 100% of the 6 layers converted, elu+1 vs fitted
  (Hedgehog) maps; calibration sentences of the first half.
- ``smollm2``: WikiText-2 perplexity (second half, 512-token windows) for 1, 25%, 50% and 100% of
  the 30 layers, elu+1 vs fitted; calibration windows of the first half.

Usage: ``python tools/bench_linattn.py --section all --out /tmp/linattn.md [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import numpy as np

import tforge
from tforge import evaluate
from tforge.backends import ort
from tforge.compiler.calibration import FEEDS_KEY, text_feeds
from tforge.compiler.pipeline import PassManager
from tforge.frontends import hf_models
from tforge.passes.linear_attention import LinearAttention, quadratic_values
from tforge.runtime import ort as ort_runtime
from tforge.runtime import save as model_save

LENGTHS = (128, 512, 2048, 4096, 8192)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _long_llama(path: Path) -> Path:
    import torch
    import transformers

    from tforge.frontends.torch import from_torch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=512, max_position_embeddings=16384,
    )  # fmt: skip
    inner = transformers.LlamaModel(config).eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = inner

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, use_cache=False).last_hidden_state

    ids = torch.randint(0, 1000, (1, 16))
    model = from_torch(
        Hidden(), (ids,), input_names=["input_ids"], output_names=["hidden"],
        dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}},
    )  # fmt: skip
    PassManager.parse("canonicalize", progress=lambda _: None).run(model)
    return model_save.save_model(model, path)


def latency(
    work: Path, runs_scale: float, threads: int | None, lengths: tuple[int, ...]
) -> list[str]:
    src = _long_llama(work / "llama-long.onnx")
    variants = {}
    for label, impl in (
        ("linear, chunked (C=64)", "chunked"),
        ("linear, ORT LinearAttention op", "ort-op"),
    ):
        model = tforge.load(src)
        result = LinearAttention(causal_impl=impl, chunk=64)(model)
        _log(f"latency: {label}: {dict(result.stats)}")
        variants[label] = model_save.save_model(model, work / f"llama-long.{impl}.onnx")
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 1000, (1, 601))}
    quad_src = quadratic_values(tforge.load(src), feeds, 601)
    quad = {label: quadratic_values(tforge.load(p), feeds, 601) for label, p in variants.items()}
    _log(
        f"quadratic tensors at 601 tokens: original {len(quad_src)}, "
        + ", ".join(f"{k}: {len(v)}" for k, v in quad.items())
    )
    base = benchlib.timing_session(src, threads)
    sessions = {label: benchlib.timing_session(p, threads) for label, p in variants.items()}
    rows = []
    for n in lengths:
        runs = max(
            3, int(round(runs_scale * {128: 20, 512: 10, 2048: 5, 4096: 3, 8192: 3}.get(n, 3)))
        )
        feed = {"input_ids": np.random.default_rng(n).integers(0, 1000, (1, n))}
        load = os.getloadavg()[0]
        try:
            timings = ort.time_side_by_side([base, *sessions.values()], feed, warmup=1, runs=runs)
        except Exception as error:  # out of memory at the longest lengths
            _log(f"latency {n}: failed: {error}")
            rows.append(f"| {n} | failed: {str(error).splitlines()[0][:80]} | | | |")
            continue
        b = timings[0]
        cells = [
            f"{t.median_ms:.1f} ms ({t.median_ms / b.median_ms:.2f}x, p10 {t.p10_ms / b.p10_ms:.2f}x)"
            for t in timings[1:]
        ]
        rows.append(
            f"| {n} | {b.median_ms:.1f} ms | {' | '.join(cells)} | {runs} (load {load:.1f}) |"
        )
        _log(rows[-1])
        gc.collect()
    head = [
        "Random-init LLaMA (hidden 256, 4 layers, 4 heads on 2 KV heads, head_dim 64, FFN 512), batch 1, "
        "ORT CPU, all graph optimisations, 2 cores shared with other jobs; interleaved runs, median (ratio to softmax "
        "median, ratio of 10th percentiles).",
        f"Tensors with two dimensions >= 601 when run at 601 tokens: original {len(quad_src)}, "
        + ", ".join(f"{k}: {len(v)}" for k, v in quad.items())
        + ".",
        "",
        "| tokens | softmax (original) | " + " | ".join(variants) + " | runs |",
        "|---|---|" + "---|" * len(variants) + "---|",
    ]
    return head + rows


def _variants(num_layers: int) -> list[tuple[str, dict]]:
    counts = {
        "1 layer": 1,
        "25%": max(1, round(0.25 * num_layers)),
        "50%": round(0.5 * num_layers),
        "100%": num_layers,
    }
    return [(f"{label} ({n}/{num_layers})", {"layers": n}) for label, n in counts.items()]


def _convert(
    base, calibration, feature_map: str, layers: int, fit_seconds: float, fit_queries: int = 32
):
    model = base.clone()
    model.meta[FEEDS_KEY] = calibration
    t0 = time.perf_counter()
    result = LinearAttention(
        feature_map=feature_map, layers=layers, capture_samples=len(calibration), fit_seconds=fit_seconds,
        fit_queries=fit_queries,
    )(model)  # fmt: skip
    converted = [row["layer"] for row in result.details["layers"] if row["converted"]]
    errors = {row["layer"]: row.get("error") for row in result.details["layers"]}
    return model, converted, errors, time.perf_counter() - t0


def minilm(work: Path, quick: bool, fit_seconds: float) -> list[str]:
    src = benchlib.exported(work, "minilm")
    base = tforge.load(src)
    PassManager.parse("canonicalize", progress=lambda _: None).run(base)
    calibration = list(
        text_feeds(
            base, benchlib.WIKITEXT, hf_models.minilm_dir(), samples=16 if quick else 32, seq_len=128
        )
    )
    tokenizer = hf_models.minilm_tokenizer()
    sentences = evaluate.sentences(
        evaluate.text_half(evaluate.read_text(benchlib.WIKITEXT), "second"), 64 if quick else 256
    )
    ref_session = ort_runtime.create_session(base, optimize=True)
    reference = evaluate.sentence_embeddings(
        lambda f: ref_session.run(None, f)[0], tokenizer, sentences
    )
    rows = []
    for label, opts in _variants(6):
        cells = []
        for fmap in ("elu", "fitted"):
            model, converted, errors, seconds = _convert(
                base, calibration, fmap, opts["layers"], fit_seconds
            )
            session = ort_runtime.create_session(model, optimize=True)
            a = evaluate.agreement(
                reference,
                evaluate.sentence_embeddings(
                    lambda f, s=session: s.run(None, f)[0], tokenizer, sentences
                ),
            )
            cells.append(f"{a.mean:.4f} / {a.min:.4f}")
            _log(
                f"minilm {label} {fmap}: layers {converted}, cosine {a.mean:.4f} / {a.min:.4f}, {seconds:.0f}s; errors {errors}"
            )
            cells.append(str(converted))
        rows.append(f"| {label} | {cells[0]} | {cells[2]} | {cells[1]} | {cells[3]} |")
    return [
        f"MiniLM (6 layers, 12 heads): cosine of mean-pooled embeddings vs the original on {len(sentences)} WikiText-2 "
        f"sentences (second half), mean / min; calibration {len(calibration)} sentences (first half); fitted maps "
        f"trained {fit_seconds:.0f} s per layer at most. Layers converted smallest measured error first.",
        "",
        "| converted | elu+1 | fitted (Hedgehog) | layers (elu) | layers (fitted) |",
        "|---|---|---|---|---|",
        *rows,
    ]


def smollm2(work: Path, quick: bool, fit_seconds: float) -> list[str]:
    src = benchlib.exported(work, "smollm2")
    base = tforge.load(src)
    PassManager.parse("canonicalize", progress=lambda _: None).run(base)
    calibration = list(
        text_feeds(base, benchlib.WIKITEXT, hf_models.smollm2_gguf_path(), samples=8, seq_len=128)
    )
    tokenizer = hf_models.smollm2_tokenizer()
    context, count = 512, (2 if quick else 4)
    text = evaluate.text_half(evaluate.read_text(benchlib.WIKITEXT), "second")
    ids = evaluate.tokenize_lines(
        lambda line: tokenizer(line, add_special_tokens=False)["input_ids"], text, context * count
    )
    windows = evaluate.token_windows(ids, context, count)
    ref = ort_runtime.create_session(base, optimize=True)
    base_ppl = evaluate.window_perplexity(lambda f, s=ref: s.run(None, f)[0], windows)
    del ref
    _log(f"smollm2: original perplexity {base_ppl:.3f}")
    rows = []
    for label, opts in _variants(30):
        cells = []
        for fmap in ("elu", "fitted"):
            model, converted, _errors, seconds = _convert(
                base, calibration, fmap, opts["layers"], fit_seconds, fit_queries=16
            )
            session = ort_runtime.create_session(model, optimize=True)
            ppl = evaluate.window_perplexity(lambda f, s=session: s.run(None, f)[0], windows)
            cells.append(f"{ppl:.2f}")
            cells.append(str(converted))
            _log(
                f"smollm2 {label} {fmap}: layers {converted}, perplexity {ppl:.3f}, {seconds:.0f}s"
            )
            del session, model
            gc.collect()
        rows.append(f"| {label} | {cells[0]} | {cells[2]} | {cells[1]} | {cells[3]} |")
    return [
        f"SmolLM2-135M (30 layers, 9 heads on 3 KV heads): WikiText-2 perplexity, context {context}, first {len(windows)} "
        f"windows of the second half (original: {base_ppl:.2f}); calibration {len(calibration)} windows of 128 tokens "
        f"(first half); fitted maps trained {fit_seconds:.0f} s per layer at most.",
        "",
        "| converted | elu+1 | fitted (Hedgehog) | layers (elu) | layers (fitted) |",
        "|---|---|---|---|---|",
        *rows,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("latency", "minilm", "smollm2", "all"), default="all")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--fit-seconds", type=float, default=None, help="per layer (default: MiniLM 15, SmolLM2 6)"
    )
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    args = parser.parse_args(argv)
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tforge-bench-linattn-") as tmp:
        work = Path(tmp)
        if args.section in ("latency", "all"):
            lengths = tuple(int(x) for x in args.lengths.split(","))
            lines += [
                "### Latency against sequence length",
                "",
                *latency(work, 0.5 if args.quick else 1.0, args.threads, lengths),
                "",
            ]
        if args.section in ("minilm", "all"):
            lines += [
                "### MiniLM",
                "",
                *minilm(benchlib.ROOT / ".cache" / "models", args.quick, args.fit_seconds or 15.0),
                "",
            ]
        if args.section in ("smollm2", "all"):
            lines += [
                "### SmolLM2",
                "",
                *smollm2(benchlib.ROOT / ".cache" / "models", args.quick, args.fit_seconds or 6.0),
                "",
            ]
    text = "\n".join(lines)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
