"""Latency of the pruned shapes the pruning targets name, against the unpruned fp32 model.

Run by hand on a quiet machine: `python tools/bench_prune_latency.py [RUNS]`. The shape of a
pruned model does not depend on how channels are chosen, so `importance=magnitude` builds it
without calibration; accuracy is `tools/bench.py --section prune`'s job. Each pruned model is
timed interleaved with the unpruned model after the same `canonicalize` (so that the ratio is
pruning's alone), both also with `ort-layernorm` at the end, and with the exported model (ORT
spinning off); ratios of medians are printed.
"""
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

import tforge
from tforge.backends import ort
from tforge.compiler import verify
from tforge.compiler.pipeline import PassManager
from tforge.runtime import save as model_save

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / ".cache" / "models"  # tools/export_models.py writes them here
cases = [
    ("minilm", "FFN 25%", "canonicalize,prune-ffn{ratio=0.25 importance=magnitude}"),
    ("minilm", "heads 25% + FFN 25%", "canonicalize,prune-heads{ratio=0.25 importance=magnitude},prune-ffn{ratio=0.25 importance=magnitude}"),
    ("smollm2", "heads 25% + FFN 25%", "canonicalize,prune-heads{ratio=0.25 importance=magnitude},prune-ffn{ratio=0.25 importance=magnitude}"),
]


def build(src: Path, spec: str, dst: Path) -> tuple[Path, bool]:
    """The model ``spec`` makes of ``src``, saved at ``dst``, and whether the last pass changed it."""
    model = tforge.load(src)
    report = PassManager.parse(spec, progress=lambda _: None).run(model)
    return model_save.save_model(model, dst), report.passes[-1].changed


def main(runs: int) -> int:
    with tempfile.TemporaryDirectory(dir=MODELS) as work:
        for name, label, spec in cases:
            src = MODELS / f"{name}.onnx"
            # each pruned model is timed as pipelines end for ORT (ort-layernorm) and without that step,
            # each against the unpruned canonical model treated alike, so that a ratio is pruning's alone
            paths = {
                "exported": src,
                "unpruned": build(src, "canonicalize", Path(work) / f"{name}-unpruned.onnx")[0],
                "pruned": build(src, spec, Path(work) / f"{name}-{len(label)}.onnx")[0],
            }
            unpruned_ln, changed = build(src, "canonicalize,ort-layernorm", Path(work) / f"{name}-unpruned-ortln.onnx")
            if changed:  # pre-norm RMSNorm models (SmolLM2) have no LayerNormalization: nothing to time twice
                paths["unpruned, ort-layernorm"] = unpruned_ln
                paths["pruned, ort-layernorm"] = build(src, spec + ",ort-layernorm", Path(work) / f"{name}-{len(label)}-ortln.onnx")[0]
            if name == "minilm":
                feeds = verify.make_inputs(tforge.load(src), dims={"batch": 8, "sequence": 128}, rng=np.random.default_rng(0))
                feeds["attention_mask"][:] = 1
            else:
                feeds = {"input_ids": np.random.default_rng(0).integers(0, 49152, size=(1, 512)).astype(np.int64)}
            sessions = [benchlib.timing_session(p, None) for p in paths.values()]
            t = dict(zip(paths, ort.time_side_by_side(sessions, feeds, warmup=3, runs=runs), strict=True))
            print(f"{name} {label} (load {os.getloadavg()[0]:.1f}), median ms: "
                  + ", ".join(f"{k} {v.median_ms:.1f}" for k, v in t.items()), flush=True)
            for suffix in ("", ", ort-layernorm") if changed else ("",):
                a, b = t["pruned" + suffix], t["unpruned" + suffix]
                print(f"  pruned / unpruned{suffix or ' (canonical)'}: {a.median_ms / b.median_ms:.3f} "
                      f"(p10 {a.p10_ms / b.p10_ms:.3f}); / exported {a.median_ms / t['exported'].median_ms:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50))
