"""The bad-input corpus, generated from code: each case writes one hostile or broken model.

``CASES`` maps a case name to ``(writer, expected)``: ``writer(folder) -> Path`` writes the model
(and any data or link files it needs) into an empty ``folder`` and returns the model's path;
``expected`` is a fragment of the one-line message ``tforge compile`` must print on stderr
(exit 1, nothing written). Nothing here is a hand-edited binary: every byte comes from
``onnx.helper`` / ``onnx.parser`` or a seeded generator, so the corpus is reproducible with
``tools/make_bad_inputs.py DIR``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx.parser

from tests.models import tiny

Writer = Callable[[Path], Path]

# A one-block pre-norm transformer (LayerNorm, 2-head attention, GELU FFN), hidden size 8: a
# model tforge accepts, from which each case breaks exactly one thing.
BLOCK = tiny.GELU_BLOCK.replace("VALUE_SOURCE", "MatMul (h, wv)")

MLP = """
<ir_version: 10, opset_import: ["" : 20]>
mlp (float[2, 8] x) => (float[2, 4] y)
<float[8, 16] w1, float[16, 4] w2>
{
    h = MatMul (x, w1)
    a = Relu (h)
    y = MatMul (a, w2)
}
"""

_SHAPES = {
    "g": (8,),
    "b": (8,),
    "wq": (8, 8),
    "wk": (8, 8),
    "wv": (8, 8),
    "wo": (8, 8),
    "bo": (8,),
    "g2": (8,),
    "b2": (8,),
    "wu": (8, 16),
    "wd": (16, 8),
    "w1": (8, 16),
    "w2": (16, 4),
}


def _model(text: str = BLOCK) -> onnx.ModelProto:
    """Parse ``text`` and give every declared initializer a seeded value."""
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(text)
    declared = {n for node in proto.graph.node for n in node.input}
    for name, shape in _SHAPES.items():
        if name in declared:
            proto.graph.initializer.append(
                onh.from_array(rng.normal(size=shape).astype(np.float32), name)
            )
    if "heads" in declared:
        proto.graph.initializer.append(onh.from_array(np.array([1, 4, 2, 4], np.int64), "heads"))
        proto.graph.initializer.append(onh.from_array(np.array([1, 4, 8], np.int64), "merged"))
    onnx.checker.check_model(proto)  # the base is valid; each case breaks one thing
    return proto


def _save(proto: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    path = folder / name
    path.write_bytes(proto.SerializeToString())
    return path


def _initializer(proto: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in proto.graph.initializer if t.name == name)


def _externalize(
    proto: onnx.ModelProto,
    name: str,
    location: str,
    data: bytes | None = None,
    data_path: Path | None = None,
) -> None:
    """Move initializer ``name`` to external data at ``location`` (writing ``data_path``)."""
    tensor = _initializer(proto, name)
    raw = onh.to_array(tensor).tobytes()
    if data_path is not None:
        data_path.write_bytes(raw if data is None else data)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


# ----------------------------------------------------------------------------- writers


def empty(folder: Path) -> Path:
    path = folder / "model.onnx"
    path.write_bytes(b"")
    return path


def random_bytes(folder: Path) -> Path:
    path = folder / "model.onnx"
    # 0xff... starts with an invalid protobuf tag, whatever the rest of the seeded bytes are
    path.write_bytes(b"\xff" + np.random.default_rng(1).bytes(4095))
    return path


def text_file(folder: Path) -> Path:
    path = folder / "model.onnx"
    path.write_text("this is not a model\n")
    return path


def truncated(folder: Path) -> Path:
    data = _model().SerializeToString()
    path = folder / "model.onnx"
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def no_graph(folder: Path) -> Path:
    proto = _model()
    proto.ClearField("graph")
    return _save(proto, folder)


def graph_cycle(folder: Path) -> Path:
    proto = _model(MLP)
    # h = MatMul(x, w1) becomes h = MatMul(y, w1): y depends on h, h on y
    proto.graph.node[0].input[0] = "y"
    return _save(proto, folder)


def undefined_input(folder: Path) -> Path:
    proto = _model(MLP)
    proto.graph.node[1].input[0] = "nowhere"
    return _save(proto, folder)


def unknown_domain(folder: Path) -> Path:
    proto = _model(MLP)
    proto.opset_import.append(oh.make_opsetid("com.example.evil", 1))
    node = proto.graph.node[1]
    node.op_type, node.domain = "Frobnicate", "com.example.evil"
    return _save(proto, folder)


def undeclared_domain(folder: Path) -> Path:
    proto = _model(MLP)
    node = proto.graph.node[1]
    node.op_type, node.domain = "FastGelu", "com.microsoft"  # domain not in opset_import
    return _save(proto, folder)


def unknown_op(folder: Path) -> Path:
    proto = _model(MLP)
    proto.graph.node[1].op_type = "Frobnicate"
    return _save(proto, folder)


def opset_too_new(folder: Path) -> Path:
    proto = _model(MLP)
    proto.opset_import[0].version = 99
    return _save(proto, folder)


def opset_too_old(folder: Path) -> Path:
    proto = _model(MLP)
    proto.opset_import[0].version = 5
    return _save(proto, folder)


def ir_version_too_new(folder: Path) -> Path:
    proto = _model(MLP)
    proto.ir_version = 99
    return _save(proto, folder)


def raw_data_size_mismatch(folder: Path) -> Path:
    proto = _model(MLP)
    tensor = _initializer(proto, "w1")
    tensor.raw_data = tensor.raw_data[:100]  # [8, 16] float32 needs 512 bytes
    return _save(proto, folder)


def float_data_size_mismatch(folder: Path) -> Path:
    proto = _model(MLP)
    tensor = _initializer(proto, "w2")
    tensor.ClearField("raw_data")
    tensor.float_data.extend([1.0] * 10)  # [16, 4] needs 64 values
    return _save(proto, folder)


def external_missing(folder: Path) -> Path:
    proto = _model()
    _externalize(proto, "wu", "weights.bin")  # the file is never written
    return _save(proto, folder)


def external_short(folder: Path) -> Path:
    proto = _model()
    _externalize(proto, "wu", "weights.bin", data=b"\0" * 100, data_path=folder / "weights.bin")
    return _save(proto, folder)


def external_length_mismatch(folder: Path) -> Path:
    proto = _model()
    _externalize(proto, "wu", "weights.bin", data_path=folder / "weights.bin")
    next(e for e in _initializer(proto, "wu").external_data if e.key == "length").value = "12"
    return _save(proto, folder)


def external_dotdot(folder: Path) -> Path:
    inner = folder / "model"
    inner.mkdir()
    proto = _model()
    _externalize(proto, "wu", "../secret.bin", data_path=folder / "secret.bin")
    return _save(proto, inner)


def external_absolute(folder: Path) -> Path:
    proto = _model()
    target = folder / "abs.bin"
    _externalize(proto, "wu", str(target.resolve()), data_path=target)
    return _save(proto, folder)


def external_symlink(folder: Path) -> Path:
    inner, outside = folder / "model", folder / "outside"
    inner.mkdir()
    outside.mkdir()
    proto = _model()
    _externalize(proto, "wu", "weights.bin", data_path=outside / "weights.bin")
    os.symlink(outside / "weights.bin", inner / "weights.bin")
    return _save(proto, inner)


def external_dir_symlink(folder: Path) -> Path:
    inner, outside = folder / "model", folder / "outside"
    inner.mkdir()
    outside.mkdir()
    proto = _model()
    _externalize(proto, "wu", "data/weights.bin", data_path=outside / "weights.bin")
    os.symlink(outside, inner / "data")
    return _save(proto, inner)


def absurd_input_shape(folder: Path) -> Path:
    proto = _model(MLP)
    shape = proto.graph.input[0].type.tensor_type.shape
    shape.dim[0].dim_value = 10**12  # [1e12, 8] float32: 32 TB
    return _save(proto, folder)


def absurd_initializer_shape(folder: Path) -> Path:
    proto = _model(MLP)
    tensor = _initializer(proto, "w1")
    tensor.ClearField("raw_data")
    del tensor.dims[:]
    tensor.dims.extend([2**40, 2**30])  # no data at all: the dims alone claim 4 ZB
    return _save(proto, folder)


def negative_dim(folder: Path) -> Path:
    proto = _model(MLP)
    tensor = _initializer(proto, "w1")
    del tensor.dims[:]
    tensor.dims.extend([-8, -16])
    return _save(proto, folder)


def duplicate_node_output(folder: Path) -> Path:
    proto = _model(MLP)
    proto.graph.node[1].output[0] = "h"  # Relu writes h, which MatMul already defines
    proto.graph.node[2].input[0] = "h"
    return _save(proto, folder)


def duplicate_initializer(folder: Path) -> Path:
    proto = _model(MLP)
    twin = onnx.TensorProto()
    twin.CopyFrom(_initializer(proto, "w2"))
    proto.graph.initializer.append(twin)
    return _save(proto, folder)


def duplicate_input(folder: Path) -> Path:
    proto = _model(MLP)
    twin = onnx.ValueInfoProto()
    twin.CopyFrom(proto.graph.input[0])
    proto.graph.input.append(twin)
    return _save(proto, folder)


def no_transformer_blocks(folder: Path) -> Path:
    """Valid, but no transformer in it: refused only with ``--strict`` (see the tests)."""
    return _save(_model(MLP), folder)


#: name -> (writer, fragment of the expected one-line error)
CASES: dict[str, tuple[Writer, str]] = {
    "empty": (empty, "file is empty"),
    "random_bytes": (random_bytes, "not an ONNX model"),
    "text_file": (text_file, "not an ONNX model"),
    "truncated": (truncated, "file is truncated"),
    "no_graph": (no_graph, "has no graph"),
    "graph_cycle": (graph_cycle, "cycle"),
    "undefined_input": (undefined_input, "'nowhere', which nothing defines"),
    "unknown_domain": (unknown_domain, "domain 'com.example.evil'"),
    "undeclared_domain": (undeclared_domain, "'com.microsoft', which the model does not import"),
    "unknown_op": (unknown_op, "unknown operator 'Frobnicate'"),
    "opset_too_new": (opset_too_new, "opset 99"),
    "opset_too_old": (opset_too_old, "opset 5"),
    "ir_version_too_new": (ir_version_too_new, "IR version 99"),
    "raw_data_size_mismatch": (raw_data_size_mismatch, "holds 100 bytes"),
    "float_data_size_mismatch": (float_data_size_mismatch, "holds 10 values"),
    "external_missing": (external_missing, "is missing"),
    "external_short": (external_short, "the data file is truncated"),
    "external_length_mismatch": (external_length_mismatch, "declares 12 bytes"),
    "external_dotdot": (external_dotdot, "escapes the model folder"),
    "external_absolute": (external_absolute, "is an absolute path"),
    "external_symlink": (external_symlink, "resolves outside the model folder"),
    "external_dir_symlink": (external_dir_symlink, "resolves outside the model folder"),
    "absurd_input_shape": (absurd_input_shape, "would need"),
    "absurd_initializer_shape": (absurd_initializer_shape, "would need"),
    "negative_dim": (negative_dim, "negative dimension"),
    "duplicate_node_output": (duplicate_node_output, "'h' is defined twice"),
    "duplicate_initializer": (duplicate_initializer, "'w2' is defined twice"),
    "duplicate_input": (duplicate_input, "'x' is defined twice"),
}

#: Valid models that are refused only under ``--strict``.
STRICT_CASES: dict[str, tuple[Writer, str]] = {
    "no_transformer_blocks": (no_transformer_blocks, "no transformer blocks"),
}


def write_all(folder: Path) -> dict[str, Path]:
    """Write every case into its own sub-folder of ``folder``; name -> model path."""
    paths = {}
    for name, (writer, _) in {**CASES, **STRICT_CASES}.items():
        sub = folder / name
        sub.mkdir(parents=True, exist_ok=False)
        paths[name] = writer(sub)
    return paths
