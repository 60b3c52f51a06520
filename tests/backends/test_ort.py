"""The ONNX Runtime backend: safe saving, sessions, timing and which kernels ran."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from tforge import testing
from tforge.backends import ort as ort_backend
from tforge.errors import UnsupportedModelError
from tforge.runtime import ort as ort_runtime
from tforge.runtime import save as model_save

MLP = """
<ir_version: 10, opset_import: ["" : 18]>
mlp (float[B, 8] x) => (float[B, 4] y)
<float[8, 4] w, float[4] b>
{
    h = MatMul (x, w)
    y = Add (h, b)
}
"""

MATMUL = """
<ir_version: 10, opset_import: ["" : 18]>
linear (float[B, 64] x) => (float[B, 64] y)
<float[64, 64] w>
{
    y = MatMul (x, w)
}
"""


def mlp(rng: np.random.Generator) -> ir.Model:
    return testing.model_from_onnx_text(MLP, w=rng.normal(size=(8, 4)), b=rng.normal(size=4))


def feeds(rng: np.random.Generator, width: int = 8) -> dict[str, np.ndarray]:
    return {"x": rng.normal(size=(2, width)).astype(np.float32)}


def test_save_inline_round_trips(rng: np.random.Generator, tmp_path: Path) -> None:
    model = mlp(rng)

    path = model_save.save_model(model, tmp_path / "m.onnx")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    np.testing.assert_array_equal(
        ir.load(path).graph.initializers["w"].const_value.numpy(),
        model.graph.initializers["w"].const_value.numpy(),
    )


def test_failed_save_leaves_nothing_behind(
    rng: np.random.Generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_serializer(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ir.serde, "serialize_model", broken_serializer)

    with pytest.raises(RuntimeError, match="disk on fire"):
        model_save.save_model(mlp(rng), tmp_path / "m.onnx", external_data=True, size_threshold=0)

    assert list(tmp_path.iterdir()) == []


def test_external_data_is_written_beside_the_output_and_reloads(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    model = mlp(rng)
    x = feeds(rng)

    path = model_save.save_model(
        model, tmp_path / "out" / "m.onnx", external_data=True, size_threshold=64
    )

    assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    loaded = ir.load(path)
    w = loaded.graph.initializers["w"].const_value
    assert isinstance(w, ir.ExternalTensor) and w.location == "m.onnx.data"
    assert not isinstance(loaded.graph.initializers["b"].const_value, ir.ExternalTensor)  # 16 B
    # The in-memory model is unchanged by the save.
    assert not isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)
    expected = ort_runtime.run(ort_runtime.create_session(model), x)["y"]
    np.testing.assert_array_equal(
        ort_runtime.run(ort_runtime.create_session(path), x)["y"], expected
    )
    np.testing.assert_array_equal(
        ort_runtime.run(ort_runtime.create_session(loaded), x)["y"], expected
    )


def test_large_models_get_external_data_automatically(
    rng: np.random.Generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = mlp(rng)
    monkeypatch.setattr(model_save, "PROTO_WEIGHT_LIMIT", 100)  # w is 128 bytes

    path = model_save.save_model(model, tmp_path / "m.onnx", size_threshold=64)
    session = ort_runtime.create_session(model)  # goes through a temporary folder

    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    x = feeds(rng)
    np.testing.assert_array_equal(
        ort_runtime.run(session, x)["y"],
        ort_runtime.run(ort_runtime.create_session(path), x)["y"],
    )


def test_saving_a_model_with_external_data_inline_embeds_it(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    source = model_save.save_model(
        mlp(rng), tmp_path / "a" / "m.onnx", external_data=True, size_threshold=0
    )
    loaded = ir.load(source)

    copy = model_save.save_model(loaded, tmp_path / "b" / "m.onnx", external_data=False)
    (tmp_path / "a" / "m.onnx.data").unlink()  # the copy must not depend on the source's data

    assert sorted(p.name for p in copy.parent.iterdir()) == ["m.onnx"]
    assert isinstance(loaded.graph.initializers["w"].const_value, ir.ExternalTensor)
    x = feeds(rng)
    assert ort_runtime.run(ort_runtime.create_session(copy), x)["y"].shape == (2, 4)


def test_refuses_to_overwrite_the_source_or_its_external_data(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    source = model_save.save_model(
        mlp(rng), tmp_path / "m.onnx", external_data=True, size_threshold=0
    )
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = ir.load(source)
    model.meta[model_save.SOURCE_PATH_KEY] = str(source)

    with pytest.raises(UnsupportedModelError, match="the model's source file"):
        model_save.save_model(model, tmp_path / "sub" / ".." / "m.onnx")
    with pytest.raises(UnsupportedModelError, match="external data the model reads"):
        model_save.save_model(model, tmp_path / "m.onnx.data")
    plain = ir.load(source)  # loaded without the frontend's note of its source path
    with pytest.raises(UnsupportedModelError, match="external data the model reads"):
        model_save.save_model(plain, source, external_data=True)  # m.onnx.data is mapped

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_session_options_and_load_errors(rng: np.random.Generator) -> None:
    model = mlp(rng)
    session = ort_runtime.create_session(model, optimize=False, threads=1)
    assert session.get_providers() == ["CPUExecutionProvider"]

    broken = mlp(rng)
    broken.graph.node(0).op_type = "Frobnicate"
    with pytest.raises(
        UnsupportedModelError, match=r"onnxruntime cannot load model 'mlp': .*Frobnicate"
    ):
        ort_runtime.create_session(broken)


def test_run_casts_feeds_and_checks_their_names(rng: np.random.Generator) -> None:
    session = ort_runtime.create_session(mlp(rng))

    outputs = ort_runtime.run(session, {"x": rng.normal(size=(3, 8))})  # float64 in

    assert list(outputs) == ["y"] and outputs["y"].shape == (3, 4)
    with pytest.raises(UnsupportedModelError, match=r"missing \['x'\], unknown \['z'\]"):
        ort_runtime.run(session, {"z": np.zeros((3, 8))})


def test_timing_returns_sane_numbers(rng: np.random.Generator) -> None:
    a = ort_runtime.create_session(mlp(rng))
    b = ort_runtime.create_session(mlp(rng), optimize=False)

    timing = ort_backend.time_session(a, feeds(rng), warmup=1, runs=7)
    side_by_side = ort_backend.time_side_by_side([a, b], feeds(rng), warmup=1, runs=5)

    assert timing.runs == 7 and 0 < timing.p10_ms <= timing.median_ms <= timing.p90_ms < 1000
    assert [t.runs for t in side_by_side] == [5, 5]
    assert all(t.median_ms > 0 for t in side_by_side)
    with pytest.raises(ValueError, match="runs >= 1"):
        ort_backend.time_session(a, feeds(rng), runs=0)


def test_kernels_run_counts_each_node_once(rng: np.random.Generator, tmp_path: Path) -> None:
    model = testing.model_from_onnx_text(MATMUL, w=rng.normal(size=(64, 64)))

    kernels = ort_backend.kernels_run(model, feeds(rng, 64), optimize=False)

    assert kernels == {("MatMul", "CPUExecutionProvider"): 1}


def test_kernels_run_shows_int8_kernels_of_a_dynamically_quantized_model(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = testing.model_from_onnx_text(MATMUL, w=rng.normal(size=(64, 64)))
    float_path = model_save.save_model(model, tmp_path / "float.onnx")
    int8_path = tmp_path / "int8.onnx"
    quantize_dynamic(float_path, int8_path, weight_type=QuantType.QInt8)

    float_kernels = ort_backend.kernels_run(float_path, feeds(rng, 64))
    int8_kernels = ort_backend.kernels_run(int8_path, feeds(rng, 64), optimize=True)

    int8_ops = {op for op, _ in int8_kernels} & {"MatMulInteger", "DynamicQuantizeMatMul"}
    assert int8_ops, f"no int8 kernel ran: {dict(int8_kernels)}"
    unfused = ort_backend.kernels_run(int8_path, feeds(rng, 64), optimize=False)
    assert unfused[("MatMulInteger", "CPUExecutionProvider")] == 1
    assert not {op for op, _ in float_kernels} & {"MatMulInteger", "DynamicQuantizeMatMul"}
    assert list(tmp_path.iterdir()) and not list(tmp_path.glob("*.json"))
