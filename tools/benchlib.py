"""Helpers shared by the benchmark scripts in tools/ (sessions, ORT's quantizers, sizes, exports).

Imported by every ``bench_*.py`` and the demo; it imports none of them, so the scripts form no
import cycle. Run a benchmark through ``tools/bench.py --section NAME``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tforge import data as tforge_data  # noqa: E402
from tforge.backends import ort  # noqa: E402
from tforge.frontends import hf_models  # noqa: E402
from tforge.runtime import ort as ort_runtime  # noqa: E402

WIKITEXT = tforge_data.WIKITEXT
MODELS = {
    # name: (exporter, shapes to time)
    "minilm": (hf_models.export_minilm, {"input_ids": "8x128", "attention_mask": "8x128"}),
    "smollm2": (hf_models.export_smollm2, {"input_ids": "1x128"}),
}
INT8_OPS = ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger", "QLinearMatMul", "MatMulNBits")


def timing_session(path: Path, threads: int | None):
    """An ORT session (all graph optimizations, CPU) with idle spinning off, for side-by-side timing.

    After a run, ORT's intra-op threads spin for a while waiting for more work; timing several
    sessions round robin on 2 cores, they steal the CPU from the next session (see
    ``ort_runtime.create_session(spin=False)``).
    """
    return ort_runtime.create_session(path, optimize=True, threads=threads, spin=False)


def log(message: str) -> None:
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


def exported(out_dir: Path, name: str) -> Path:
    path = out_dir / f"{name}.onnx"
    if not path.exists():
        log(f"exporting {name} to {path} ...")
        MODELS[name][0](path)
    return path
