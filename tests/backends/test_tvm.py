"""The TVM backend: tiny models and the zoo through TVM (no tuning), numerics against ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("tvm")

import tforge  # noqa: E402
from tforge import testing  # noqa: E402
from tforge.backends import tvm as tvm_backend  # noqa: E402
from tforge.backends.tvm import int8  # noqa: E402
from tforge.errors import UnsupportedModelError  # noqa: E402
from tforge.runtime import ort as ort_runtime  # noqa: E402
from tforge.runtime import save as model_save  # noqa: E402

# A linear, exact GELU (Erf), LayerNorm and a residual: the fused kernels the rules must schedule.
FFN = """
<ir_version: 10, opset_import: ["" : 18]>
ffn (float[B, S, 32] x) => (float[B, S, 32] y)
<float[32, 64] w1, float[64] b1, float[64, 32] w2, float[32] g, float[32] beta>
{
    h = MatMul (x, w1)
    hb = Add (h, b1)
    c = Constant <value = float {0.70710678}> ()
    s = Mul (hb, c)
    e = Erf (s)
    one = Constant <value = float {1.0}> ()
    e1 = Add (e, one)
    half = Constant <value = float {0.5}> ()
    g1 = Mul (hb, e1)
    act = Mul (g1, half)
    o = MatMul (act, w2)
    r = Add (o, x)
    y = LayerNormalization <axis = -1> (r, g, beta)
}
"""


def ffn(rng: np.random.Generator) -> ir.Model:
    return testing.model_from_onnx_text(
        FFN,
        w1=rng.normal(size=(32, 64)) * 0.2,
        b1=rng.normal(size=64),
        w2=rng.normal(size=(64, 32)) * 0.2,
        g=rng.uniform(0.5, 2, 32),
        beta=rng.normal(size=32),
    )


def test_static_build_matches_ort(rng: np.random.Generator) -> None:
    model = ffn(rng)

    art = tvm_backend.build(model, shapes={"x": (2, 24, 32)})

    assert art.buckets[0].stats["kernels unscheduled"] == 0
    record = art.meta["numerics"][0]
    assert record["outputs"]["y"]["rel"] < 1e-4
    feeds = {"x": rng.normal(size=(2, 24, 32)).astype(np.float32)}
    expected = ort_runtime.run(ort_runtime.create_session(model, optimize=False), feeds)["y"]
    np.testing.assert_allclose(art.run(feeds)["y"], expected, rtol=1e-4, atol=1e-4)


def test_buckets_pad_and_cut_odd_lengths(rng: np.random.Generator, tmp_path: Path) -> None:
    model = ffn(rng)
    art = tvm_backend.build(model, dims={"B": 2}, buckets=[8, 32], bucket_dim="S")
    assert [b.dims for b in art.buckets] == [{"B": 2, "S": 8}, {"B": 2, "S": 32}]
    # compared with ORT at each bucket length and at an odd length 3 shorter
    assert [r["shapes"]["x"][1] for r in art.meta["numerics"]] == [8, 5, 32, 29]

    loaded = tvm_backend.load(art.save(tmp_path / "ffn.tvm"))

    session = ort_runtime.create_session(model, optimize=False)
    for length in (1, 5, 17, 32):
        feeds = {"x": rng.normal(size=(2, length, 32)).astype(np.float32)}
        got = loaded.run(feeds)["y"]
        assert got.shape == (2, length, 32)
        np.testing.assert_allclose(got, ort_runtime.run(session, feeds)["y"], rtol=1e-4, atol=1e-4)
    with pytest.raises(UnsupportedModelError, match="no bucket"):
        loaded.run({"x": np.zeros((2, 33, 32), np.float32)})
    with pytest.raises(UnsupportedModelError, match="no bucket"):
        loaded.run({"x": np.zeros((3, 8, 32), np.float32)})


def test_unsupported_op_is_named(rng: np.random.Generator) -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 18, "com.microsoft" : 1]>
    g (float[2, 8] x) => (float[2, 8] y)
    {
        y = com.microsoft.FastGelu (x)
    }
    """
    model = testing.model_from_onnx_text(text)
    with pytest.raises(UnsupportedModelError, match=r"com.microsoft::FastGelu \(node"):
        tvm_backend.build(model, shapes={"x": (2, 8)})


def test_pack_weight_round_trips(rng: np.random.Generator) -> None:
    q = rng.integers(-127, 128, size=(64, 48)).astype(np.int8)
    packed = int8.pack_weight(q)
    assert packed.shape == (3, 16, 16, 4)
    assert packed[1, 2, 3, 1] == q[4 * 2 + 1, 16 * 1 + 3]
    np.testing.assert_array_equal(int8.unpack_weight(packed), q)


@pytest.mark.parametrize("activations", ["dynamic-per-token", "static"])
def test_int8_linears_run_on_vnni_and_match_ort(rng: np.random.Generator, activations: str) -> None:
    model = ffn(rng)
    calibration = [{"x": rng.normal(size=(2, 16, 32)).astype(np.float32)} for _ in range(4)]
    passes = (
        "canonicalize,calibrate,quantize{activations=static}"
        if activations == "static"
        else "canonicalize,quantize"
    )
    tforge.compile(model, passes, calibration=calibration if activations == "static" else None)
    assert any(n.op_type == "MatMulIntegerToFloat" for n in model.graph)

    art = tvm_backend.build(model, dims={"B": 2}, buckets=[16], bucket_dim="S")

    assert art.buckets[0].stats["int8 linears to VNNI"] == 2
    assert art.assembly().count("vpdpbusd") >= 2
    # same integer arithmetic as ORT: on this small graph no code flips, so even the float tolerance holds
    assert max(r["outputs"]["y"]["rel"] for r in art.meta["numerics"]) < 1e-4


def test_vnni_kernel_is_exact_and_uses_vpdpbusd(rng: np.random.Generator) -> None:
    from tforge.backends.tvm import compile as tc

    tvm = tc.import_tvm()
    m, n, k = 24, 64, 96
    func = int8.packed_matmul_func(m, n, k).with_attr("global_symbol", "main")
    lib = tvm.compile(func, target=tc.host_target())
    assert "vpdpbusd" in lib.mod.inspect_source("asm")
    x = rng.integers(0, 256, size=(m, k)).astype(np.uint8)
    w = rng.integers(-127, 128, size=(k, n)).astype(np.int8)
    out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(int8.pack_weight(w)), out)
    np.testing.assert_array_equal(out.numpy(), x.astype(np.int32) @ w.astype(np.int32))


@pytest.mark.parametrize("zoo_name", ["bert"])
def test_zoo_builds_and_matches_ort(zoo_name: str, zoo_model: Callable[[str], Path]) -> None:
    model = tforge.load(zoo_model(zoo_name))
    art = tvm_backend.build(model, dims={"batch": 2}, buckets=[16])
    assert art.meta["numerics"]  # the build compared itself with ORT, full and odd length
    assert all(b.stats["kernels unscheduled"] == 0 for b in art.buckets)


@pytest.mark.slow
# qwen2 left out to keep the suite under 15 minutes: it is llama with biased Q/K/V projections,
# and gpt2's linears carry biases
@pytest.mark.parametrize("zoo_name", ["gpt2", "llama", "vit"])
def test_zoo_builds_and_matches_ort_slow(zoo_name: str, zoo_model: Callable[[str], Path]) -> None:
    model = tforge.load(zoo_model(zoo_name))
    if zoo_name == "vit":
        art = tvm_backend.build(model, shapes={"pixel_values": (2, 3, 32, 32)})
    else:
        art = tvm_backend.build(model, dims={"batch": 2}, buckets=[16])
    assert art.meta["numerics"]


def test_cli_compile_backend_tvm(rng: np.random.Generator, tmp_path: Path) -> None:
    from tforge.cli import main

    source = model_save.save_model(ffn(rng), tmp_path / "ffn.onnx")
    out = tmp_path / "ffn.tvm"

    code = main(
        [
            "-q",
            "compile",
            str(source),
            "--passes",
            "canonicalize",
            "--backend",
            "tvm",
            "--buckets",
            "16",
            "-o",
            str(out),
        ]
    )

    assert code == 0
    art = tvm_backend.load(out)
    assert [b.dims["S"] for b in art.buckets] == [16]
    feeds = {"x": rng.normal(size=(1, 11, 32)).astype(np.float32)}
    expected = ort_runtime.run(ort_runtime.create_session(source, optimize=False), feeds)["y"]
    np.testing.assert_allclose(art.run(feeds)["y"], expected, rtol=1e-4, atol=1e-4)


@pytest.fixture
def fast_tensor_intrin_import(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tuning imports ``tvm.s_tir.tensor_intrin``, whose 496 TVMScript ``prim_func``s each call
    ``inspect.stack()``. For a frame of a file that is no module's (the frozen importlib frames of
    the import itself, ``<frozen runpy>`` under ``python -m pytest``, ``<string>``),
    ``inspect.getmodule`` finds nothing and caches nothing, so it rescans all of ``sys.modules``
    every time: 28 s alone, 90-140 s late in the suite, with torch and transformers loaded. Mapping
    those names to no module gives it the same answer (None) without the scan; what the import
    builds is unchanged."""
    import inspect
    import sys

    names = {
        "<frozen importlib._bootstrap>",
        "<frozen importlib._bootstrap_external>",
        "<string>",
        "<ast>",
    }
    frame = sys._getframe()
    while frame is not None:  # whatever started pytest: <frozen runpy>, <string>
        if frame.f_code.co_filename.startswith("<"):
            names.add(frame.f_code.co_filename)
        frame = frame.f_back
    for name in names:
        if name not in inspect.modulesbyfile:
            monkeypatch.setitem(inspect.modulesbyfile, name, "<no module>")


@pytest.mark.slow
@pytest.mark.usefixtures("fast_tensor_intrin_import")
def test_tuning_database_round_trip(rng: np.random.Generator, tmp_path: Path) -> None:
    """Tune with a tiny budget, then rebuild from the database alone (no trials), same numerics."""
    from tforge.backends.tvm import tuning

    model = ffn(rng)
    tuned = tvm_backend.build(model, shapes={"x": (2, 16, 32)}, tune_trials=2, cache_dir=tmp_path)
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 1 and tuning.has_database(folders[0])
    assert folders[0].name.startswith(f"tvm{tuned.meta['tvm_version']}-ffi")
    records = (folders[0] / "database_tuning_record.json").read_text().splitlines()
    assert records

    rebuilt = tvm_backend.build(model, shapes={"x": (2, 16, 32)}, cache_dir=tmp_path)

    assert rebuilt.buckets[0].build_seconds < tuned.buckets[0].build_seconds
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [
        folders[0].name
    ]  # same key, reused
    feeds = {"x": rng.normal(size=(2, 16, 32)).astype(np.float32)}
    np.testing.assert_allclose(rebuilt.run(feeds)["y"], tuned.run(feeds)["y"], rtol=1e-5, atol=1e-5)
