"""Latency of the pruned shapes the pruning targets name, against the unpruned fp32 model.

Run by hand on a quiet machine: `python tools/bench_prune_latency.py [RUNS]`. The shape of a
pruned model does not depend on how channels are chosen, so `importance=magnitude` builds it
without calibration; accuracy is `tools/bench.py --section prune`'s job. Each pruned model is
timed interleaved with the unpruned model after the same `canonicalize` (so that the ratio is
pruning's alone) and with the exported model (ORT spinning off); ratios of medians are printed.
"""
import os
import sys
import tempfile
from pathlib import Path

import bench
import numpy as np

import tforge
from tforge.backends import ort
from tforge.compiler import verify
from tforge.compiler.pipeline import PassManager

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / ".cache" / "models"  # tools/export_models.py writes them here
runs = int(sys.argv[1]) if len(sys.argv) > 1 else 50
cases = [
    ("minilm", "FFN 25%", "canonicalize,prune-ffn{ratio=0.25 importance=magnitude}"),
    ("minilm", "heads 25% + FFN 25%", "canonicalize,prune-heads{ratio=0.25 importance=magnitude},prune-ffn{ratio=0.25 importance=magnitude}"),
    ("smollm2", "heads 25% + FFN 25%", "canonicalize,prune-heads{ratio=0.25 importance=magnitude},prune-ffn{ratio=0.25 importance=magnitude}"),
]
with tempfile.TemporaryDirectory(dir=MODELS) as work:
    for name, label, spec in cases:
        src = MODELS / f"{name}.onnx"
        model = tforge.load(src)
        PassManager.parse(spec, progress=lambda _: None).run(model)
        dst = ort.save_model(model, Path(work) / f"{name}-{len(label)}.onnx")
        if name == "minilm":
            feeds = verify.make_inputs(model, dims={"batch": 8, "sequence": 128}, rng=np.random.default_rng(0))
            feeds["attention_mask"][:] = 1
        else:
            feeds = {"input_ids": np.random.default_rng(0).integers(0, 49152, size=(1, 512)).astype(np.int64)}
        canonical = tforge.load(src)
        PassManager.parse("canonicalize", progress=lambda _: None).run(canonical)
        reference = ort.save_model(canonical, Path(work) / f"{name}-canonical.onnx")
        sessions = [bench.timing_session(p, None) for p in (src, reference, dst)]
        exported, unpruned, pruned = ort.time_side_by_side(sessions, feeds, warmup=3, runs=runs)
        print(f"{name} {label}: {pruned.median_ms:.1f} / {unpruned.median_ms:.1f} ms = "
              f"{pruned.median_ms / unpruned.median_ms:.3f} of the unpruned canonical model "
              f"(p10 {pruned.p10_ms / unpruned.p10_ms:.3f}); {pruned.median_ms / exported.median_ms:.3f} "
              f"of the exported one ({exported.median_ms:.1f} ms), load {os.getloadavg()[0]:.1f}", flush=True)
