"""Models larger than memory: spilled weights, pieced ORT sessions, and a compile under a limit.

Fast tests force the large-model paths on a small model (``TFORGE_SPILL_BYTES``); the slow
one compiles a generated 1 GiB LLaMA-shaped model under RLIMIT_DATA of 0.9 GiB
(``tools/bench_large.py`` runs the 8 GiB version by hand).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import tforge
from tests.fuzz.graphs import TransformerSpec, build
from tforge.runtime import ort as ort_runtime
from tforge.runtime import save as model_save

REPO = Path(__file__).resolve().parent.parent
SPEC = TransformerSpec(
    heads=4,
    kv_heads=2,
    head_dim=8,
    intermediate=64,
    layers=3,
    norm="rms",
    activation="swiglu",
    linear_bias=False,
)


def _feeds(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [
        {"x": rng.normal(size=(1, SPEC.seq, SPEC.hidden)).astype(np.float32)} for _ in range(count)
    ]


def test_pieced_session_matches_one_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.onnx"
    tforge_model = ir.serde.deserialize_model(build(SPEC, 0))
    model_save.save_model(tforge_model, path, external_data=True, size_threshold=0)
    model = tforge.load(path)
    whole = ort_runtime.create_session(model, optimize=False)
    monkeypatch.setenv("TFORGE_SPILL_BYTES", str(4 * 4096))  # pieces of at most 4 KiB of weights
    model.meta["tforge.spill"] = True  # what PassManager.run sets on a large model
    pieced = ort_runtime.create_session(model, optimize=False)
    assert isinstance(pieced, ort_runtime.PiecewiseSession) and len(pieced.pieces) > 3
    feed = _feeds(1)[0]
    np.testing.assert_allclose(
        pieced.run(None, feed)[0], whole.run(None, feed)[0], rtol=1e-5, atol=1e-6
    )
    assert [i.name for i in pieced.get_inputs()] == ["x"] and pieced.get_inputs()[
        0
    ].type == "tensor(float)"


def test_spilled_compile_equals_in_memory_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    passes = "canonicalize,calibrate,ln-migrate,smoothquant,quantize"
    results = {}
    for spilled in (False, True):
        if spilled:
            monkeypatch.setenv("TFORGE_SPILL_BYTES", "0")
            monkeypatch.setattr("tforge.runtime.spill.MIN_SPILL_BYTES", 256)
        model = ir.serde.deserialize_model(build(SPEC, 0))
        tforge.compile(model, passes, calibration=_feeds(3))
        big = [
            v.const_value for v in model.graph.initializers.values() if v.const_value.nbytes >= 256
        ]
        assert all(isinstance(t, ir.ExternalTensor) for t in big) == spilled
        monkeypatch.delenv("TFORGE_SPILL_BYTES", raising=False)
        session = ort_runtime.create_session(model, optimize=False)
        results[spilled] = session.run(None, _feeds(4)[3])[0]
    np.testing.assert_array_equal(results[True], results[False])


@pytest.mark.slow
def test_one_gib_model_compiles_under_a_smaller_data_limit(tmp_path: Path) -> None:
    folder = tmp_path / "big"
    made = subprocess.run(
        [
            sys.executable,
            "tools/make_large_model.py",
            str(folder),
            "--gib",
            "1",
            "--hidden",
            "1024",
            "--heads",
            "16",
            "--kv-heads",
            "4",
            "--vocab",
            "8000",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert json.loads(made.stdout.splitlines()[-1])["weights_bytes"] > 2**30
    bench = subprocess.run(
        [sys.executable, "tools/bench_large.py", str(folder), "--limit-data", "0.9G"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    result = json.loads(bench.stdout)
    assert bench.returncode == 0 and result["exit"] == 0, bench.stdout[-2000:]
    assert result["peak_VmData_gib"] < 0.9 and result["peak_RssAnon_gib"] < 0.6
    out = ir.load(folder / "out" / "model.onnx")
    assert sum(n.op_type in ("MatMulIntegerToFloat", "MatMulInteger") for n in out.graph) > 0
