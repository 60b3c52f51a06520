#!/usr/bin/env python3
"""Side-by-side measurements behind BENCHMARKS.md (run by hand: `make bench` or this script).

Foundation section (``--section foundation``, the default): for each real model, the time
`canonicalize` takes, node counts, and the fp32 ONNX Runtime latency of the exported and the
canonical model, timed interleaved in one process so that the ratio is meaningful on a loaded
machine. Prints a Markdown table.

Int8 section (``--section int8``): for each real model, in one run, on the same inputs and the
same calibration data: ORT fp32; ORT's own ``quantize_dynamic`` and ``quantize_static`` (QDQ,
per-channel, MinMax, u8 activations / s8 weights, on the linears); tforge's ``quantize`` with
static per-tensor activations alone, after ``ln-migrate``, after ``smoothquant``; ``quantize``
with per-token activations (no calibration); and the ``w8a8`` preset. Two more rows separate
the float graph work from int8: ``canonicalize,ort-layernorm`` in float, and ORT's
``quantize_dynamic`` applied to that float model. MiniLM: latency of batch
8 x 128 tokens, cosine of mean-pooled sentence embeddings against fp32 on WikiText-2 sentences
of the second half; SmolLM2: latency of one 512-token forward, WikiText-2 perplexity on 512-token
windows of the second half. Calibration: sentences (MiniLM) or 128-token windows (SmolLM2) of
the first half, run once through ``calibrate`` and shared by the tforge variants, and given to
ORT's ``quantize_static`` through a CalibrationDataReader. Every variant's file size and the
int8 kernels ORT ran (from its profiler) are listed. ``--quick`` shrinks every count.

Pruning section (``--section prune``): tools/bench_prune.py (prune-heads and prune-ffn at 10, 25
and 50%, four importance/compensation methods, same accuracy protocol and helpers as int8).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tforge  # noqa: E402
from tforge import data as tforge_data  # noqa: E402
from tforge.api import symbol_values  # noqa: E402
from tforge.backends import ort  # noqa: E402
from tforge.compiler import verify  # noqa: E402
from tforge.frontends import hf_models  # noqa: E402
from tforge.runtime import ort as ort_runtime  # noqa: E402
from tforge.runtime import save as model_save  # noqa: E402

MODELS = {
    # name: (exporter, shapes to time)
    "minilm": (hf_models.export_minilm, {"input_ids": "8x128", "attention_mask": "8x128"}),
    "smollm2": (hf_models.export_smollm2, {"input_ids": "1x128"}),
}


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

WIKITEXT = tforge_data.WIKITEXT
INT8_OPS = ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger", "QLinearMatMul", "MatMulNBits")


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
def tforge_variants() -> dict[str, str]:
    from tforge.presets import PRESETS

    return {
        "tforge quantize (static)": "canonicalize,calibrate,quantize{activations=static}",
        "tforge ln-migrate + quantize (static)": "canonicalize,calibrate,ln-migrate,quantize{activations=static}",
        "tforge smoothquant + quantize (static)": "canonicalize,calibrate,smoothquant,quantize{activations=static}",
        "tforge quantize (per-token)": "canonicalize,calibrate,quantize{activations=dynamic-per-token}",
        "tforge w8a8 preset": PRESETS["w8a8"],
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


def timing_session(path: Path, threads: int | None):
    """An ORT session (all graph optimizations, CPU) with idle spinning off, for side-by-side timing.

    After a run, ORT's intra-op threads spin for a while waiting for more work; timing several
    sessions round robin on 2 cores, they steal the CPU from the next session (see
    ``ort_runtime.create_session(spin=False)``).
    """
    return ort_runtime.create_session(path, optimize=True, threads=threads, spin=False)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def int8_kernels(model, feeds) -> str:
    ran = ort.kernels_run(model, feeds)
    counts: dict[str, int] = {}
    for (op, _provider), n in sorted(ran.items()):
        if op in INT8_OPS:
            counts[op] = counts.get(op, 0) + n
    return ", ".join(f"{op} x{n}" for op, n in counts.items()) or "none (float)"


def file_size_mb(path: Path) -> float:
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 2**20


def linear_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes whose right operand is an initializer: the linears."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def ort_quantize(src: Path, dst: Path, calibration: list[dict] | None) -> None:
    """ORT's own quantize_dynamic (calibration None) or quantize_static, on the linears only."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    linears = linear_matmuls(src)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT's quantizer logs a pre-processing hint at WARNING on the root logger
    try:
        if calibration is None:
            quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8, nodes_to_quantize=linears)
            return
        _ort_static(src, dst, calibration, linears)
    finally:
        root.setLevel(level)


def _ort_static(src: Path, dst: Path, calibration: list[dict], linears: list[str]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(calibration)

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    quantize_static(
        src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax, nodes_to_quantize=linears,
    )


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
        _log(f"{name}: {label} in {time.perf_counter() - t0:.1f}s")
        variants.append(Variant(label, how + ", linears", tforge.load(dst), dst))

    # canonicalize + calibrate once, on the same calibration feeds; every tforge variant continues from a copy
    base = tforge.load(src)
    base.meta[FEEDS_KEY] = calibration
    t0 = time.perf_counter()
    PassManager.parse("canonicalize,calibrate", progress=lambda _: None).run(base)
    stats = base.meta[STATS_KEY]
    _log(f"{name}: canonicalize,calibrate in {time.perf_counter() - t0:.1f}s")
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
    for label, spec in tforge_variants().items():
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
        _log(f"{name}: {label} in {time.perf_counter() - t0:.1f}s")
        variants.append(Variant(label, spec, model, dst))
    for v in variants:
        v.size_mb = file_size_mb(v.path)
        v.kernels = int8_kernels(v.model, feeds_for_kernels)
    return variants, calibration


def _minilm_int8(out_dir: Path, work: Path, protocol: Int8Protocol, threads: int | None) -> list[str]:
    from tforge import evaluate

    src = _exported(out_dir, "minilm")
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
        _log(f"minilm: {v.name}: cosine mean {a.mean:.5f} min {a.min:.5f}")
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
    from tforge import evaluate

    src = _exported(out_dir, "smollm2")
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
        _log(f"smollm2: {v.name}: perplexity {ppl[-1]:.3f} ({time.perf_counter() - t0:.0f}s)")
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


def _exported(out_dir: Path, name: str) -> Path:
    path = out_dir / f"{name}.onnx"
    if not path.exists():
        _log(f"exporting {name} to {path} ...")
        MODELS[name][0](path)
    return path


def int8(names: list[str], out_dir: Path, protocol: Int8Protocol, threads: int | None) -> list[str]:
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tforge-bench-", dir=out_dir) as folder:
        for name in names:
            section = {"minilm": _minilm_int8, "smollm2": _smollm2_int8}[name]
            rows += section(out_dir, Path(folder), protocol, threads) + [""]
            gc.collect()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=("foundation", "int8", "prune", "factor", "rptq", "linattn"), default="foundation")
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "models")
    parser.add_argument("--runs", type=int, default=None, help="timed runs (default: 30 foundation, 20 int8)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="int8: fewer sentences, windows, samples and runs")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"onnxruntime {ort.ort.__version__}, {time.strftime('%Y-%m-%d')}")
    if args.section == "foundation":
        runs = args.runs or 30
        print(f"command: python tools/bench.py --models {args.models} --runs {runs}")
        print()
        print("\n".join(foundation(names, args.out, runs, args.threads)))
        return 0
    if args.section == "prune":  # pruning (issue 4): tools/bench_prune.py
        import bench_prune

        prune_protocol = bench_prune.PruneProtocol.quick() if args.quick else bench_prune.PruneProtocol.full(args.runs or 20)
        if args.runs:
            prune_protocol = dataclasses.replace(prune_protocol, runs=args.runs)
        print(f"command: python tools/bench.py --section prune --models {args.models}"
              f"{' --quick' if args.quick else ''}{f' --runs {args.runs}' if args.runs else ''}")
        print()
        print("\n".join(bench_prune.prune(names, args.out, prune_protocol, args.threads)))
        return 0
    if args.section == "factor":  # low-rank and Kronecker factorization (issue 5): tools/bench_factor.py
        import bench_factor

        factor_protocol = bench_factor.FactorProtocol.quick() if args.quick else bench_factor.FactorProtocol.full(args.runs or 20)
        if args.runs:
            factor_protocol = dataclasses.replace(factor_protocol, runs=args.runs)
        print(f"command: python tools/bench.py --section factor --models {args.models}"
              f"{' --quick' if args.quick else ''}{f' --runs {args.runs}' if args.runs else ''}")
        print()
        print("\n".join(bench_factor.factor(names, args.out, factor_protocol, args.threads)))
        return 0
    if args.section == "rptq":  # RPTQ clusters vs per-tensor, A8 / A4 (issue 6): tools/bench_rptq.py
        import bench_rptq

        return bench_rptq.main(
            ["--models", *names, "--out", str(args.out), "--runs", str(args.runs or 10)]
            + (["--windows", "2", "--sentences", "64", "--calib", "16"] if args.quick else [])
            + (["--threads", str(args.threads)] if args.threads else [])
        )
    if args.section == "linattn":  # linear attention (issue 7): tools/bench_linattn.py
        import bench_linattn

        return bench_linattn.main(
            ["--section", "all"]
            + (["--quick"] if args.quick else [])
            + (["--threads", str(args.threads)] if args.threads else [])
        )
    protocol = Int8Protocol.quick() if args.quick else Int8Protocol.full(args.runs or 20)
    if args.runs:
        protocol = dataclasses.replace(protocol, runs=args.runs)
    print(f"command: python tools/bench.py --section int8 --models {args.models}"
          f"{' --quick' if args.quick else ''}{f' --runs {args.runs}' if args.runs else ''}"
          f"{f' --threads {args.threads}' if args.threads else ''}")
    print()
    print("\n".join(int8(names, args.out, protocol, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
