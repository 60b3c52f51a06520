"""RPTQ benchmark: per-tensor activation quantization vs RPTQ with 2, 4, 8 clusters, at A8 and A4.

Run as ``python tools/bench_rptq.py --models smollm2 minilm`` (prints the markdown tables).
Same accuracy protocol as bench.py's int8 section (``tforge.evaluate``): SmolLM2, WikiText-2
perplexity on 512-token windows of the second half; MiniLM, cosine of mean-pooled sentence
embeddings against fp32 on sentences of the second half. Calibration: windows of 128 tokens
(SmolLM2) or sentences (MiniLM) of the first half, run once through ``canonicalize,calibrate``;
every variant continues from a copy of that model and its statistics.

Rows:

- emulated (fake quantization in float, ``rptq{lowering=emulate}``): per-tensor activations
  (``clusters=1``, the same code with one cluster) and RPTQ with 2, 4, 8 clusters, at W8A8 and
  W8A4; W4A4 and W4A8 (4-bit block-wise weights, MatMulNBits' layout) for per-tensor and 4
  clusters;
- deployable W8A8 on ORT's int8 kernels (``rptq{lowering=integer}``): per-tensor (``clusters=1``)
  and RPTQ-4, next to the ``quantize{activations=static}`` per-tensor model of the int8 section,
  timed interleaved with fp32 (sessions with spinning off); the int8 kernels that ran are read
  from ORT's profiler.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import numpy as np

import tforge
from tforge import evaluate
from tforge.backends import ort
from tforge.compiler import verify
from tforge.compiler.calibration import FEEDS_KEY, STATS_KEY, text_feeds
from tforge.compiler.pipeline import PassManager, parse_pipeline
from tforge.frontends import hf_models
from tforge.runtime import save as model_save

ACCURACY = [
    ("W8A8 per-tensor (emulated)", "rptq{clusters=1 lowering=emulate}"),
    ("W8A8 RPTQ-2 (emulated)", "rptq{clusters=2 lowering=emulate}"),
    ("W8A8 RPTQ-4 (emulated)", "rptq{clusters=4 lowering=emulate}"),
    ("W8A8 RPTQ-8 (emulated)", "rptq{clusters=8 lowering=emulate}"),
    ("W8A4 per-tensor (emulated)", "rptq{clusters=1 bits=4 lowering=emulate}"),
    ("W8A4 RPTQ-2 (emulated)", "rptq{clusters=2 bits=4 lowering=emulate}"),
    ("W8A4 RPTQ-4 (emulated)", "rptq{clusters=4 bits=4 lowering=emulate}"),
    ("W8A4 RPTQ-8 (emulated)", "rptq{clusters=8 bits=4 lowering=emulate}"),
    ("W4A4 per-tensor (emulated)", "rptq{clusters=1 bits=4 weight-bits=4 lowering=emulate}"),
    ("W4A4 RPTQ-4 (emulated)", "rptq{clusters=4 bits=4 weight-bits=4 lowering=emulate}"),
    ("W4A8 per-tensor (emulated)", "rptq{clusters=1 weight-bits=4 lowering=emulate}"),
    ("W4A8 RPTQ-4 (emulated)", "rptq{clusters=4 weight-bits=4 lowering=emulate}"),
]
DEPLOYED = [
    ("int8 quantize static (per-tensor)", "quantize{activations=static}"),
    ("int8 W8A8 per-tensor (rptq clusters=1)", "rptq{clusters=1 lowering=integer}"),
    ("int8 W8A8 RPTQ-4", "rptq{clusters=4 lowering=integer}"),
    ("int8 W8A8 RPTQ-2", "rptq{clusters=2 lowering=integer}"),
]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _base(name: str, src: Path, samples: int, seq: int):
    tokenizer = hf_models.minilm_dir() if name == "minilm" else hf_models.smollm2_gguf_path()
    model = tforge.load(src)
    model.meta[FEEDS_KEY] = list(
        text_feeds(model, benchlib.WIKITEXT, tokenizer, samples=samples, seq_len=seq)
    )
    t0 = time.perf_counter()
    PassManager.parse("canonicalize,calibrate", progress=lambda _: None).run(model)
    _log(f"{name}: canonicalize,calibrate in {time.perf_counter() - t0:.0f}s")
    return model


def _variant(base, spec: str, dst: Path) -> tuple[Path, dict]:
    model = base.clone()
    model.meta[STATS_KEY] = copy.deepcopy(base.meta[STATS_KEY])
    stats: dict = {}
    t0 = time.perf_counter()
    for p in parse_pipeline(spec):
        stats = dict(p(model).stats)
    model_save.save_model(model, dst)
    _log(f"  {spec}: {time.perf_counter() - t0:.1f}s {stats}")
    return dst, stats


def smollm2(work: Path, args: argparse.Namespace) -> list[str]:
    src = benchlib.exported(args.out, "smollm2")
    tokenizer = hf_models.smollm2_tokenizer()
    text = evaluate.text_half(evaluate.read_text(benchlib.WIKITEXT), "second")
    ids = evaluate.tokenize_lines(
        lambda line: tokenizer(line, add_special_tokens=False)["input_ids"],
        text,
        512 * args.windows,
    )
    windows = evaluate.token_windows(ids, 512, args.windows)
    base = _base("smollm2", src, args.calib, 128)

    def ppl(path: Path) -> float:
        session = benchlib.timing_session(path, args.threads)
        t0 = time.perf_counter()
        value = evaluate.window_perplexity(lambda f: session.run(None, f)[0], windows)
        _log(f"  perplexity {value:.3f} ({time.perf_counter() - t0:.0f}s)")
        return value

    fp32 = work / "smollm2.fp32.onnx"
    model_save.save_model(base, fp32)
    ref = ppl(fp32)
    rows = [
        f"SmolLM2-135M-Instruct: WikiText-2 perplexity, context 512, first {args.windows} windows of the second half; "
        f"calibration {args.calib} windows of 128 tokens (first half). fp32 (canonical): {ref:.2f}.",
        "",
        "| variant | perplexity | vs fp32 | pipeline after canonicalize,calibrate |",
        "|---|---|---|---|",
        f"| fp32 | {ref:.2f} | - | - |",
    ]
    for i, (label, spec) in enumerate(_accuracy_rows(args)):
        path, _ = _variant(base, spec, work / f"smollm2.acc{i}.onnx")
        p = ppl(path)
        rows.append(f"| {label} | {p:.2f} | {100 * (p / ref - 1):+.1f}% | `{spec}` |")
        path.unlink()
        Path(str(path) + ".data").unlink(missing_ok=True)
        gc.collect()
    if not args.no_deployed:
        rows += [""] + _deployed(
            "smollm2", base, work, {"input_ids": windows[:1]}, ppl, args, ref, "perplexity"
        )
    return rows


def minilm(work: Path, args: argparse.Namespace) -> list[str]:
    src = benchlib.exported(args.out, "minilm")
    tokenizer = hf_models.minilm_tokenizer()
    sentences = evaluate.sentences(
        evaluate.text_half(evaluate.read_text(benchlib.WIKITEXT), "second"), args.sentences
    )
    base = _base("minilm", src, args.calib, 128)
    fp32 = work / "minilm.fp32.onnx"
    model_save.save_model(base, fp32)

    def embed(path: Path) -> np.ndarray:
        session = benchlib.timing_session(path, args.threads)
        return evaluate.sentence_embeddings(lambda f: session.run(None, f)[0], tokenizer, sentences)

    ref = embed(fp32)

    def cosine(path: Path) -> float:
        a = evaluate.agreement(ref, embed(path))
        _log(f"  cosine mean {a.mean:.5f} min {a.min:.5f}")
        return a.mean

    rows = [
        f"MiniLM (all-MiniLM-L6-v2): cosine of mean-pooled embeddings vs fp32 on {len(sentences)} WikiText-2 "
        f"sentences (second half); calibration {args.calib} sentences (first half).",
        "",
        "| variant | cosine mean | pipeline after canonicalize,calibrate |",
        "|---|---|---|",
    ]
    for i, (label, spec) in enumerate(_accuracy_rows(args)):
        path, _ = _variant(base, spec, work / f"minilm.acc{i}.onnx")
        rows.append(f"| {label} | {cosine(path):.4f} | `{spec}` |")
    probe = tforge.load(fp32)
    feeds = verify.make_inputs(
        probe, dims={"batch": 8, "sequence": 128}, rng=np.random.default_rng(0)
    )
    feeds["attention_mask"][:] = 1
    if not args.no_deployed:
        rows += [""] + _deployed("minilm", base, work, feeds, cosine, args, None, "cosine mean")
    return rows


def _accuracy_rows(args: argparse.Namespace) -> list[tuple[str, str]]:
    rows = [(label, spec) for label, spec in ACCURACY if not args.only_a4 or "A4" in label]
    if args.exclude:
        rows = [
            (f"{label}, {args.exclude} in float", spec[:-1] + f" exclude={args.exclude}}}")
            for label, spec in rows
        ]
    return rows


def _deployed(name, base, work, feeds, score, args, ref, metric) -> list[str]:
    fp32 = work / f"{name}.fp32.onnx"
    paths, kernels, scores = [fp32], ["-"], [ref if ref is not None else 1.0]
    for i, (label, spec) in enumerate(DEPLOYED):
        path, _ = _variant(base, spec, work / f"{name}.int{i}.onnx")
        paths.append(path)
        kernels.append(benchlib.int8_kernels(tforge.load(path), feeds))
        scores.append(score(path))
        _log(f"  {label}: kernels {kernels[-1]}")
    sessions = [benchlib.timing_session(p, args.threads) for p in paths]
    timings = ort.time_side_by_side(sessions, feeds, warmup=2, runs=args.runs)
    shape = "x".join(str(d) for d in next(iter(feeds.values())).shape)
    rows = [
        f"{name}: deployable int8 models, latency of input {shape}, median of {args.runs} interleaved runs "
        "(ORT all optimizations, spinning off; machine shared with other jobs).",
        "",
        f"| variant | {metric} | latency ms (p10-p90) | vs fp32 | vs per-tensor int8 (quantize static) | int8 kernels ORT ran | pipeline |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = [("fp32", "-")] + DEPLOYED
    for (label, spec), t, k, s in zip(labels, timings, kernels, scores, strict=True):
        rows.append(
            f"| {label} | {s:.4f} | {t.median_ms:.1f} ({t.p10_ms:.1f}-{t.p90_ms:.1f}) | "
            f"{timings[0].median_ms / t.median_ms:.2f}x | {t.median_ms / timings[1].median_ms:.2f} | {k} | `{spec}` |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", choices=("smollm2", "minilm"), default=["smollm2", "minilm"]
    )
    parser.add_argument(
        "--windows", type=int, default=8, help="SmolLM2 evaluation windows of 512 tokens"
    )
    parser.add_argument("--sentences", type=int, default=256, help="MiniLM evaluation sentences")
    parser.add_argument("--calib", type=int, default=64, help="calibration windows / sentences")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--only-a4", action="store_true", help="accuracy rows at 4-bit activations only"
    )
    parser.add_argument(
        "--exclude", default=None, help="weight-name pattern the emulated rows keep in float"
    )
    parser.add_argument(
        "--no-deployed", action="store_true", help="skip the int8 models and the timing"
    )
    parser.add_argument("--out", type=Path, default=benchlib.ROOT / ".cache" / "models")
    args = parser.parse_args(argv)
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tforge-bench-rptq-", dir=args.out) as folder:
        for name in args.models:
            rows += {"smollm2": smollm2, "minilm": minilm}[name](Path(folder), args) + [""]
            print("\n".join(rows), flush=True)
            rows = []
            gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
