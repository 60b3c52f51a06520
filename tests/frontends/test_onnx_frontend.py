"""load_onnx: every unusable file gets a one-line UnsupportedModelError naming it; external data
is refused before it is opened when it points outside the model folder, and stays lazy."""

from __future__ import annotations

import builtins
import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from tforge.errors import UnsupportedModelError
from tforge.frontends.onnx import load_onnx
from tforge.runtime.save import SOURCE_PATH_KEY

WEIGHT = np.arange(16, dtype=np.float32).reshape(4, 4)


def _model(weight: TensorProto) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _external_weight(location: str, offset: int = 0, length: int | None = None) -> TensorProto:
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 4])
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset), "length": str(length or WEIGHT.nbytes)}
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    return tensor


def write_external(folder: Path, location: str, *, data_at: Path | None = None, **kw: int) -> Path:
    """Write folder/model.onnx whose weight lives at ``location``; write the data to ``data_at``."""
    folder.mkdir(parents=True, exist_ok=True)
    if data_at is not None:
        data_at.parent.mkdir(parents=True, exist_ok=True)
        data_at.write_bytes(b"\0" * kw.get("offset", 0) + WEIGHT.tobytes())
    path = folder / "model.onnx"
    onnx.save(_model(_external_weight(location, **kw)), path)
    return path


def load_error(path: Path | str) -> str:
    with pytest.raises(UnsupportedModelError) as info:
        load_onnx(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    return message


def digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.fixture
def inline_model(tmp_path: Path) -> Path:
    path = tmp_path / "inline.onnx"
    onnx.save(_model(onnx.numpy_helper.from_array(WEIGHT, "w")), path)
    return path


def test_inline_model_loads_and_records_its_resolved_path(inline_model: Path) -> None:
    model = load_onnx(inline_model)
    assert model.graph.initializers["w"].const_value.numpy().tolist() == WEIGHT.tolist()
    assert model.meta[SOURCE_PATH_KEY] == os.path.realpath(inline_model)


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in load_error(tmp_path / "nope.onnx")


def test_directory(tmp_path: Path) -> None:
    assert "directory" in load_error(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert "empty" in load_error(tmp_path / "empty.onnx")


@pytest.mark.parametrize(
    "content", [np.random.default_rng(0).bytes(4096), b"hello, this is not a model\n"]
)
def test_not_an_onnx_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "junk.onnx").write_bytes(content)
    assert "not an ONNX model" in load_error(tmp_path / "junk.onnx")


def test_truncated_file(tmp_path: Path, inline_model: Path) -> None:
    data = inline_model.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) * 2 // 3])
    assert "truncated" in load_error(tmp_path / "cut.onnx")


def test_model_without_graph(tmp_path: Path) -> None:
    proto = onnx.ModelProto(ir_version=10, opset_import=[helper.make_opsetid("", 18)])
    (tmp_path / "nograph.onnx").write_bytes(proto.SerializeToString())
    assert "no graph" in load_error(tmp_path / "nograph.onnx")


def test_external_data_loads_lazily_and_files_stay_unchanged(tmp_path: Path) -> None:
    path = write_external(tmp_path / "m", "weights/w.bin", data_at=tmp_path / "m/weights/w.bin")
    before = digest(path, tmp_path / "m/weights/w.bin")

    model = load_onnx(path)

    tensor = model.graph.initializers["w"].const_value
    assert isinstance(tensor, ir.ExternalTensor)
    assert tensor.raw is None  # not mapped yet: loading read no weight bytes
    np.testing.assert_array_equal(tensor.numpy(), WEIGHT)
    assert tensor.raw is not None  # memory-mapped on first use
    assert digest(path, tmp_path / "m/weights/w.bin") == before


def test_external_data_survives_a_change_of_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_external(tmp_path / "m", "w.bin", data_at=tmp_path / "m/w.bin")
    monkeypatch.chdir(tmp_path / "m")
    model = load_onnx("model.onnx")
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), WEIGHT)


def test_dotdot_that_stays_inside_is_accepted(tmp_path: Path) -> None:
    path = write_external(tmp_path / "m", "sub/../w.bin", data_at=tmp_path / "m/w.bin")
    (tmp_path / "m" / "sub").mkdir()
    np.testing.assert_array_equal(
        load_onnx(path).graph.initializers["w"].const_value.numpy(), WEIGHT
    )


def test_dotdot_through_a_missing_folder_is_missing_as_the_os_sees_it(tmp_path: Path) -> None:
    path = write_external(tmp_path / "m", "sub/../w.bin", data_at=tmp_path / "m/w.bin")
    assert "missing" in load_error(path)


@pytest.fixture
def spy_open(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every file opened from Python, to prove refused data was never read."""
    opened: list[str] = []
    real_open = builtins.open

    def spying_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(file, (str, os.PathLike)):
            opened.append(os.path.realpath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spying_open)
    return opened


def test_absolute_location_is_refused_before_opening(tmp_path: Path, spy_open: list[str]) -> None:
    secret = tmp_path / "outside" / "secret.bin"
    path = write_external(tmp_path / "m", str(secret), data_at=secret)
    assert "absolute" in load_error(path)
    assert str(secret.resolve()) not in spy_open


def test_dotdot_escaping_the_folder_is_refused_before_opening(
    tmp_path: Path, spy_open: list[str]
) -> None:
    secret = tmp_path / "outside" / "secret.bin"
    path = write_external(tmp_path / "m", "../outside/secret.bin", data_at=secret)
    assert "escapes the model folder" in load_error(path)
    assert str(secret.resolve()) not in spy_open


def test_symlink_pointing_outside_is_refused_before_opening(
    tmp_path: Path, spy_open: list[str]
) -> None:
    secret = tmp_path / "outside" / "secret.bin"
    path = write_external(tmp_path / "m", "w.bin", data_at=secret)
    (tmp_path / "m" / "w.bin").symlink_to(secret)
    assert "resolves outside the model folder" in load_error(path)
    assert str(secret.resolve()) not in spy_open


def test_dotdot_after_a_symlink_is_resolved_like_open_does(
    tmp_path: Path, spy_open: list[str]
) -> None:
    # Lexically 'link/../secret.bin' is m/secret.bin, but open() follows link first and lands
    # in outside/secret.bin.
    secret = tmp_path / "outside" / "secret.bin"
    path = write_external(tmp_path / "m", "link/../secret.bin", data_at=secret)
    (tmp_path / "outside" / "dir").mkdir()
    (tmp_path / "m" / "link").symlink_to(tmp_path / "outside" / "dir")
    assert "resolves outside the model folder" in load_error(path)
    assert str(secret.resolve()) not in spy_open


def test_symlink_inside_the_folder_is_accepted(tmp_path: Path) -> None:
    path = write_external(tmp_path / "m", "link.bin", data_at=tmp_path / "m/data/w.bin")
    (tmp_path / "m" / "link.bin").symlink_to(tmp_path / "m/data/w.bin")
    np.testing.assert_array_equal(
        load_onnx(path).graph.initializers["w"].const_value.numpy(), WEIGHT
    )


def test_missing_external_file(tmp_path: Path) -> None:
    path = write_external(tmp_path / "m", "w.bin")
    assert "missing" in load_error(path)


def test_external_data_shorter_than_offset_plus_length(tmp_path: Path) -> None:
    data = tmp_path / "m" / "w.bin"
    path = write_external(tmp_path / "m", "w.bin", data_at=data, offset=8)
    data.write_bytes(data.read_bytes()[:-4])
    assert "truncated" in load_error(path)


def test_declared_length_must_match_dtype_and_shape(tmp_path: Path) -> None:
    path = write_external(tmp_path / "m", "w.bin", data_at=tmp_path / "m/w.bin", length=32)
    assert "declares 32 bytes" in load_error(path)


def test_hard_linked_external_data_is_refused(tmp_path: Path) -> None:
    path = write_external(tmp_path / "m", "w.bin", data_at=tmp_path / "m/w.bin")
    os.link(tmp_path / "m/w.bin", tmp_path / "elsewhere.bin")
    assert "hard links" in load_error(path)


def _ort_native_model(path: Path) -> Path:
    """RMSNorm as ORT writes it (SimplifiedLayerNormalization, default domain), then a residual
    add and RMSNorm fused in ORT's contrib domain, as onnxruntime-genai's builder writes them."""
    rng = np.random.default_rng(0)
    gamma = helper.make_tensor("gamma", TensorProto.FLOAT, [4], rng.standard_normal(4).astype(np.float32))
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], rng.standard_normal((4, 4)).astype(np.float32).ravel())
    nodes = [
        helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["n"], name="norm", axis=-1, epsilon=1e-6),
        helper.make_node("MatMul", ["n", "w"], ["h"], name="linear"),
        helper.make_node(
            "SkipSimplifiedLayerNormalization", ["h", "x", "gamma"], ["y"], name="skip_norm",
            domain="com.microsoft", epsilon=1e-6,
        ),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [gamma, w],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    onnx.save(model, path)
    return path


def test_a_graph_with_onnx_runtimes_own_ops_loads_and_says_what_it_could_not_read(tmp_path: Path) -> None:
    import onnxruntime as ort

    from tforge.compiler.structure import find_blocks

    path = _ort_native_model(tmp_path / "ort_native.onnx")
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # ORT runs it: so must we load it
    model = load_onnx(path)
    block_map = find_blocks(model)
    assert [n.kind for n in block_map.norms] == ["rms"]  # the default-domain op is read as a norm
    assert len(block_map.unrecognized) == 1
    assert "1 com.microsoft.SkipSimplifiedLayerNormalization node(s) (first: 'skip_norm')" in block_map.unrecognized[0]
    assert "not read as a norm" in block_map.unrecognized[0]


def test_an_op_neither_onnx_nor_onnx_runtime_defines_is_still_refused(tmp_path: Path) -> None:
    path = _ort_native_model(tmp_path / "m.onnx")
    proto = onnx.load(path)
    proto.graph.node[0].op_type = "SimplifiedLayerNormalisation"  # misspelt
    onnx.save(proto, path)
    assert "unknown operator 'SimplifiedLayerNormalisation'" in load_error(path)
