#!/usr/bin/env python3
"""The foundation and int8 sections of tools/bench.py (see its docstring for the protocol)."""

from __future__ import annotations

import dataclasses
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import MODELS, WIKITEXT, file_size_mb, int8_kernels, log, ort_quantize, timing_session  # noqa: E402,F401

import tforge  # noqa: E402
from tforge import evaluate  # noqa: E402,F401
from tforge.api import symbol_values  # noqa: E402
from tforge.backends import ort  # noqa: E402
from tforge.compiler import verify  # noqa: E402
from tforge.frontends import hf_models  # noqa: E402
from tforge.runtime import ort as ort_runtime  # noqa: E402
from tforge.runtime import save as model_save  # noqa: E402


def foundation(names: list[str], out_dir: Path, runs: int, threads: int | None) -> list[str]:
    rows = [
        "| model | shape | nodes exported -> canonical | canonicalize (s) | ORT fp32 exported (ms) | ORT fp32 canonical (ms) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        export, shapes = MODELS[name]
        path = out_dir / f"{name}.onnx"
        if not path.exists():
            print(f"exporting {name} to {path} ...", file=sys.stderr)
            export(path)
        exported = tforge.load(path)
        canonical = tforge.load(path)
        t0 = time.perf_counter()
        report = tforge.PassManager.parse("canonicalize", progress=lambda _: None).run(canonical)
        seconds = time.perf_counter() - t0
        del report
        dims = symbol_values(exported, shapes)
        feeds = verify.make_inputs(exported, dims=dims, rng=np.random.default_rng(0))
        sessions = [ort_runtime.create_session(m, optimize=True, threads=threads, spin=False) for m in (exported, canonical)]
        a, b = ort.time_side_by_side(sessions, feeds, warmup=3, runs=runs)
        shape = " ".join(f"{k}={v}" for k, v in shapes.items())
        rows.append(
            f"| {name} | {shape} | {len(exported.graph)} -> {len(canonical.graph)} | {seconds:.2f} | "
            f"{a.median_ms:.1f} (p10 {a.p10_ms:.1f}, p90 {a.p90_ms:.1f}) | "
            f"{b.median_ms:.1f} (p10 {b.p10_ms:.1f}, p90 {b.p90_ms:.1f}) | {b.median_ms / a.median_ms:.3f} |"
        )
        print(rows[-1], file=sys.stderr)
    return rows



# ----------------------------------------------------------------------------- int8 section


@dataclasses.dataclass(frozen=True)
class Int8Protocol:
    """How much of everything one int8 run measures."""

    calib_samples: int  # MiniLM sentences / SmolLM2 windows of the first half
    calib_seq: int  # SmolLM2 calibration window length
    eval_sentences: int  # MiniLM, second half
    eval_windows: int  # SmolLM2, second half
    context: int  # SmolLM2 perplexity window
    runs: int  # timed runs per variant (interleaved)

    @classmethod
    def full(cls, runs: int) -> Int8Protocol:
        return cls(calib_samples=64, calib_seq=128, eval_sentences=256, eval_windows=32, context=512, runs=runs)

    @classmethod
    def quick(cls) -> Int8Protocol:
        return cls(calib_samples=16, calib_seq=128, eval_sentences=64, eval_windows=4, context=512, runs=5)


# The rows after the two references. Each tforge pipeline starts with canonicalize,calibrate.
def tforge_variants(model=None) -> dict[str, str]:
    """Pipelines of the tforge rows; the preset row is the preset's pipeline for ``model``."""
    from tforge.presets import preset_pipeline

    return {
        "tforge quantize (static)": "canonicalize,calibrate,quantize{activations=static}",
        "tforge ln-migrate + quantize (static)": "canonicalize,calibrate,ln-migrate,quantize{activations=static}",
        "tforge smoothquant + quantize (static)": "canonicalize,calibrate,smoothquant,quantize{activations=static}",
        "tforge quantize (per-token)": "canonicalize,calibrate,quantize{activations=dynamic-per-token}",
        "tforge w8a8 preset": preset_pipeline("w8a8", model),
    }


@dataclasses.dataclass
class Variant:
    name: str
    how: str
    model: Any  # onnx_ir.Model
    path: Path
    kernels: str = ""
    size_mb: float = 0.0
    accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
    timing: Any = None


def _build_variants(name: str, src: Path, work: Path, protocol: Int8Protocol, feeds_for_kernels) -> tuple[list[Variant], list[dict]]:
    import copy

    from tforge.compiler.calibration import FEEDS_KEY, STATS_KEY, text_feeds
    from tforge.compiler.pipeline import PassManager, parse_pipeline

    tokenizer = hf_models.minilm_dir() if name == "minilm" else hf_models.smollm2_gguf_path()
    fp32 = tforge.load(src)
    calibration = list(text_feeds(fp32, WIKITEXT, tokenizer, samples=protocol.calib_samples, seq_len=protocol.calib_seq))
    variants = [Variant("ORT fp32", "exported model", fp32, src)]

    for label, feeds in (("ORT quantize_dynamic", None), ("ORT quantize_static", calibration)):
        dst = work / f"{name}.{label.split()[1]}.onnx"
        t0 = time.perf_counter()
        ort_quantize(src, dst, feeds)
        how = "per-channel s8 weights, dynamic u8 activations" if feeds is None else "QDQ, per-channel, MinMax, u8/s8"
        log(f"{name}: {label} in {time.perf_counter() - t0:.1f}s")
        variants.append(Variant(label, how + ", linears", tforge.load(dst), dst))

    # canonicalize + calibrate once, on the same calibration feeds; every tforge variant continues from a copy
    base = tforge.load(src)
    base.meta[FEEDS_KEY] = calibration
    t0 = time.perf_counter()
    PassManager.parse("canonicalize,calibrate", progress=lambda _: None).run(base)
    stats = base.meta[STATS_KEY]
    log(f"{name}: canonicalize,calibrate in {time.perf_counter() - t0:.1f}s")
    # Rows that separate the float graph work (canonicalize drops attention NaN guards,
    # ort-layernorm keeps ORT off its slow SkipLayerNormalization) from the int8 lowering's gain:
    # that fp32 model, and ORT's quantize_dynamic applied to it.
    fp32_best = base.clone()
    parse_pipeline("ort-layernorm")[0](fp32_best)
    canonical = model_save.save_model(fp32_best, work / f"{name}.canonical.onnx")
    variants.append(Variant("tforge fp32", "canonicalize,ort-layernorm", fp32_best, canonical))
    dst = work / f"{name}.canonical-dynamic.onnx"
    ort_quantize(canonical, dst, None)
    variants.append(Variant("ORT quantize_dynamic of tforge fp32", "canonicalize,ort-layernorm, then ORT quantize_dynamic", tforge.load(dst), dst))
    for label, spec in tforge_variants(fp32).items():
        prefix = "canonicalize,calibrate,"
        if not spec.startswith(prefix):
            raise SystemExit(f"bench: tforge variant {label!r} must start with {prefix!r}: {spec}")
        model = base.clone()
        model.meta[STATS_KEY] = copy.deepcopy(stats)
        t0 = time.perf_counter()
        for p in parse_pipeline(spec[len(prefix):]):
            p(model)
        dst = work / f"{name}.{label.split()[1]}-{len(variants)}.onnx"
        model_save.save_model(model, dst)
        log(f"{name}: {label} in {time.perf_counter() - t0:.1f}s")
        variants.append(Variant(label, spec, model, dst))
    for v in variants:
        v.size_mb = file_size_mb(v.path)
        v.kernels = int8_kernels(v.model, feeds_for_kernels)
    return variants, calibration


def _minilm_int8(out_dir: Path, work: Path, protocol: Int8Protocol, threads: int | None) -> list[str]:

    src = benchlib.exported(out_dir, "minilm")
    probe = tforge.load(src)
    timing_feeds = verify.make_inputs(probe, dims={"batch": 8, "sequence": 128}, rng=np.random.default_rng(0))
    timing_feeds["attention_mask"][:] = 1
    variants, _ = _build_variants("minilm", src, work, protocol, timing_feeds)
    tokenizer = hf_models.minilm_tokenizer()
    text = evaluate.read_text(WIKITEXT)
    sentences = evaluate.sentences(evaluate.text_half(text, "second"), protocol.eval_sentences)
    sessions = [timing_session(v.path, threads) for v in variants]
    embeddings = [
        evaluate.sentence_embeddings(lambda f, s=s: s.run(None, f)[0], tokenizer, sentences) for s in sessions
    ]
    for v, e in zip(variants, embeddings, strict=True):
        a = evaluate.agreement(embeddings[0], e)
        v.accuracy = {"mean": a.mean, "min": a.min}
        log(f"minilm: {v.name}: cosine mean {a.mean:.5f} min {a.min:.5f}")
    timings = ort.time_side_by_side(sessions, timing_feeds, warmup=3, runs=protocol.runs)
    base = timings[0].median_ms
    rows = [
        f"MiniLM (all-MiniLM-L6-v2): latency batch 8 x 128 tokens, median of {protocol.runs} interleaved runs; "
        f"cosine of mean-pooled embeddings vs fp32 on {len(sentences)} WikiText-2 sentences (second half); "
        f"calibration {protocol.calib_samples} sentences (first half).",
        "",
        "| variant | size (MB) | latency ms (p10-p90) | speedup | cosine mean | cosine min | int8 kernels ORT ran | pipeline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, t in zip(variants, timings, strict=True):
        rows.append(
            f"| {v.name} | {v.size_mb:.1f} | {t.median_ms:.1f} ({t.p10_ms:.1f}-{t.p90_ms:.1f}) | "
            f"{base / t.median_ms:.2f}x | {v.accuracy['mean']:.4f} | {v.accuracy['min']:.4f} | {v.kernels} | `{v.how}` |"
        )
    return rows


def _smollm2_int8(out_dir: Path, work: Path, protocol: Int8Protocol, threads: int | None) -> list[str]:

    src = benchlib.exported(out_dir, "smollm2")
    tokenizer = hf_models.smollm2_tokenizer()
    text = evaluate.text_half(evaluate.read_text(WIKITEXT), "second")
    ids = evaluate.tokenize_lines(
        lambda line: tokenizer(line, add_special_tokens=False)["input_ids"], text, protocol.context * protocol.eval_windows
    )
    windows = evaluate.token_windows(ids, protocol.context, protocol.eval_windows)
    timing_feeds = {"input_ids": windows[:1]}
    variants, _ = _build_variants("smollm2", src, work, protocol, timing_feeds)
    ppl = []
    sessions = []
    for v in variants:  # one session at a time for perplexity: SmolLM2 sessions are large
        session = timing_session(v.path, threads)
        t0 = time.perf_counter()
        ppl.append(evaluate.window_perplexity(lambda f, s=session: s.run(None, f)[0], windows))
        log(f"smollm2: {v.name}: perplexity {ppl[-1]:.3f} ({time.perf_counter() - t0:.0f}s)")
        sessions.append(session)
    timings = ort.time_side_by_side(sessions, timing_feeds, warmup=2, runs=protocol.runs)
    base_ms, base_ppl = timings[0].median_ms, ppl[0]
    rows = [
        f"SmolLM2-135M-Instruct: latency of one {protocol.context}-token forward, median of {protocol.runs} interleaved runs; "
        f"WikiText-2 perplexity, context {protocol.context}, first {len(windows)} windows of the second half; "
        f"calibration {protocol.calib_samples} windows of {protocol.calib_seq} tokens (first half).",
        "",
        "| variant | size (MB) | latency ms (p10-p90) | speedup | perplexity | vs fp32 | int8 kernels ORT ran | pipeline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, t, p in zip(variants, timings, ppl, strict=True):
        rows.append(
            f"| {v.name} | {v.size_mb:.1f} | {t.median_ms:.0f} ({t.p10_ms:.0f}-{t.p90_ms:.0f}) | "
            f"{base_ms / t.median_ms:.2f}x | {p:.2f} | {100 * (p / base_ppl - 1):+.1f}% | {v.kernels} | `{v.how}` |"
        )
    return rows


def int8(names: list[str], out_dir: Path, protocol: Int8Protocol, threads: int | None) -> list[str]:
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tforge-bench-", dir=out_dir) as folder:
        for name in names:
            section = {"minilm": _minilm_int8, "smollm2": _smollm2_int8}[name]
            rows += section(out_dir, Path(folder), protocol, threads) + [""]
            gc.collect()
    return rows
