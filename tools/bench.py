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
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import MODELS, ROOT, ort  # noqa: E402


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
    import bench_int8

    if args.section == "foundation":
        runs = args.runs or 30
        print(f"command: python tools/bench.py --models {args.models} --runs {runs}")
        print()
        print("\n".join(bench_int8.foundation(names, args.out, runs, args.threads)))
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
    protocol = bench_int8.Int8Protocol.quick() if args.quick else bench_int8.Int8Protocol.full(args.runs or 20)
    if args.runs:
        protocol = dataclasses.replace(protocol, runs=args.runs)
    print(f"command: python tools/bench.py --section int8 --models {args.models}"
          f"{' --quick' if args.quick else ''}{f' --runs {args.runs}' if args.runs else ''}"
          f"{f' --threads {args.threads}' if args.threads else ''}")
    print()
    print("\n".join(bench_int8.int8(names, args.out, protocol, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
