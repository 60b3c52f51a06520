"""The int8 section's protocol (tools/bench.py) for the w8a8 preset against lower ``min-sqnr`` thresholds.

    python tools/bench_int8_thresholds.py minilm 80
    python tools/bench_int8_thresholds.py smollm2 20

Fewer activations quantized per token make the model faster and less accurate; this measures
both sides of that trade against ORT's own quantizers in one run (BENCHMARKS.md, int8 re-run):
lower static thresholds, a dynamic per-tensor middle tier (``min-sqnr-dynamic``), and dynamic
per tensor for everything below the static threshold (``fallback=dynamic``).
"""

import sys
from pathlib import Path

import bench_int8

from tforge.presets import PRESETS, preset_pipeline

ROOT = Path(__file__).resolve().parents[1]


def variants(model=None) -> dict[str, str]:
    base = "canonicalize,calibrate,smoothquant,"
    return {
        "tforge w8a8 preset": preset_pipeline("w8a8", model),
        "tforge auto (per token below 33 dB: the decoder pipeline)": PRESETS["w8a8"],
        "tforge auto min-sqnr-dynamic=28, ort-layernorm": base + "quantize{activations=auto min-sqnr-dynamic=28},ort-layernorm",
        "tforge auto fallback=dynamic, ort-layernorm": base + "quantize{activations=auto fallback=dynamic},ort-layernorm",
    }


if __name__ == "__main__":
    bench_int8.tforge_variants = variants
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else ["minilm"]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    print("\n".join(bench_int8.int8(names, ROOT / ".cache" / "models", bench_int8.Int8Protocol.full(runs), None)))
