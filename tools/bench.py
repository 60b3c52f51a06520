#!/usr/bin/env python3
"""Side-by-side measurements behind BENCHMARKS.md (run by hand: `make bench` or this script).

Foundation section: for each real model, the time `canonicalize` takes, node counts, and the
fp32 ONNX Runtime latency of the exported and the canonical model, timed interleaved in one
process so that the ratio is meaningful on a loaded machine. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tforge  # noqa: E402
from tforge.api import symbol_values  # noqa: E402
from tforge.backends import ort  # noqa: E402
from tforge.compiler import verify  # noqa: E402
from tforge.frontends import hf_models  # noqa: E402

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
        sessions = [ort.create_session(m, optimize=True, threads=threads) for m in (exported, canonical)]
        a, b = ort.time_side_by_side(sessions, feeds, warmup=3, runs=runs)
        shape = " ".join(f"{k}={v}" for k, v in shapes.items())
        rows.append(
            f"| {name} | {shape} | {len(exported.graph)} -> {len(canonical.graph)} | {seconds:.2f} | "
            f"{a.median_ms:.1f} (p10 {a.p10_ms:.1f}, p90 {a.p90_ms:.1f}) | "
            f"{b.median_ms:.1f} (p10 {b.p10_ms:.1f}, p90 {b.p90_ms:.1f}) | {b.median_ms / a.median_ms:.3f} |"
        )
        print(rows[-1], file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "models")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"onnxruntime {ort.ort.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"command: python tools/bench.py --models {args.models} --runs {args.runs}")
    print()
    print("\n".join(foundation(names, args.out, args.runs, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
