#!/usr/bin/env python3
"""Calibration in shards on a local Ray cluster: wall time and memory per worker, 1 and 2 workers.

    python tools/bench_cluster.py [--models minilm,smollm2] [--samples 64] [--workers 1,2]

For each model: the single-process calibration (``calibrate_model``, the statistics every
default pipeline collects plus the Gram matrices svd/prune ask for), then the same samples in
shards of 8 on a local Ray cluster with each worker count. Prints wall time, the statistics'
agreement with the single-process run (max relative difference of the sums; min/max must be
equal), each shard's task time and the peak RSS of the worker processes, and what one shard
moves over the network (the payload once, then per shard: feeds in, statistics out).
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

import tforge  # noqa: E402
from tforge.compiler.calibration import calibrate_model, text_feeds  # noqa: E402
from tforge.compiler.distributed import calibrate_shard, calibration_job, merge_stats  # noqa: E402
from tforge.compiler.pipeline import PassManager  # noqa: E402
from tforge.frontends import hf_models  # noqa: E402
from tforge.runtime import cluster  # noqa: E402


def _measured_shard(job: dict, shard: list, index: int) -> tuple:
    """A calibration shard that also reports its own time and its worker's peak RSS."""
    t0 = time.perf_counter()
    stats = calibrate_shard(job, shard, index)
    return stats, time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-30)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--out", type=Path, default=benchlib.ROOT / ".cache" / "models")
    args = parser.parse_args(argv)
    import ray

    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; samples {args.samples}, shards of 8")
    print("| model | run | wall s | shards | shard task s (median) | worker peak RSS MB (max) | sums max rel. diff | min/max equal |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = tforge.load(benchlib.exported(args.out, name))
        PassManager.parse("canonicalize", progress=lambda _: None).run(model)
        tokenizer = hf_models.minilm_dir() if name == "minilm" else hf_models.smollm2_gguf_path()
        feeds = list(text_feeds(model, benchlib.WIKITEXT, tokenizer, samples=args.samples, seq_len=128))
        t0 = time.perf_counter()
        single = calibrate_model(model, feeds, gram=True, progress=lambda _: None)
        wall = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        print(f"| {name} | one process | {wall:.1f} | - | - | {rss:.0f} (driver) | 0 | yes |", flush=True)
        job = calibration_job(model, gram=True)
        shards = cluster.shards_of(feeds, 8)
        sizes = (len(pickle.dumps(job)), np.median([len(pickle.dumps(s)) for s in shards]))
        for workers in (int(w) for w in args.workers.split(",")):
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(benchlib.ROOT), str(Path(__file__).parent)])}})
            try:
                t0 = time.perf_counter()
                parts = cluster.map_shards(_measured_shard, job, shards, progress=lambda _: None)
                wall = time.perf_counter() - t0
            finally:
                ray.shutdown()
            merged = merge_stats([p[0] for p in parts])
            rel = max(_max_rel(single.stats[n].sum_sq, merged.stats[n].sum_sq) for n in single.stats)
            exact = all(
                np.array_equal(single.stats[n].min, merged.stats[n].min) and np.array_equal(single.stats[n].max, merged.stats[n].max)
                for n in single.stats
            )
            print(f"| {name} | {workers} worker(s) | {wall:.1f} | {len(shards)} | {np.median([p[1] for p in parts]):.1f} | "
                  f"{max(p[2] for p in parts):.0f} | {rel:.1e} | {'yes' if exact else 'NO'} |", flush=True)
        stats_bytes = len(pickle.dumps(single))
        print(f"\n{name}: payload (model, once per cluster) {sizes[0] / 2**20:.1f} MB; per shard: feeds in "
              f"{sizes[1] / 2**10:.1f} KB, statistics out {stats_bytes / 2**20:.1f} MB\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
