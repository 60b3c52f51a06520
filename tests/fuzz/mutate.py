"""Mutations of serialized ONNX models, for fuzzing the loader.

``mutate(seed, rng)`` returns a damaged copy of a seed model's bytes. Half of the mutations work
on bytes (flips, cuts, insertions, repeated chunks: what a bad copy or a hostile file does), half
on the parsed protobuf (a dim, a dtype, an op type, a name, an opset or an external-data entry
changed, a node or value dropped or duplicated: what a buggy exporter or an editing tool does),
so that both the parser and every check after it are reached.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh

from tests.bad_inputs import cases

#: Names of the data file the seeds with external data use; mutations point at it and around it.
DATA_FILE = "model.onnx.data"

_LOCATIONS = [
    DATA_FILE,
    "",
    "../" + DATA_FILE,
    "/etc/passwd",
    "sub/../" + DATA_FILE,
    "missing.bin",
    ".",
    "link.bin",
    "a" * 300,
    "..",
    "/",
    "model.onnx",
    "\u00e9.bin",
    "x\\..\\..\\y",
]
_OPS = [
    "MatMul",
    "Add",
    "Relu",
    "Gelu",
    "Softmax",
    "Reshape",
    "Transpose",
    "LayerNormalization",
    "Frobnicate",
    "",
    "If",
    "Loop",
    "Constant",
    "Gemm",
    "Split",
    "Concat",
    "Identity",
    "Cast",
]
_DOMAINS = ["", "ai.onnx", "com.microsoft", "com.example", "ai.onnx.ml", "pkg.unknown"]
_BIG = [0, 1, -1, 2**31, 2**40, 2**62, -(2**63), 7, 3]


def seeds(folder: Path) -> dict[str, Path]:
    """Valid seed models written into ``folder``: a transformer block (inline and with external
    data) and an MLP; a symlink ``link.bin`` points outside the folder for mutations to find."""
    block = folder / "block"
    block.mkdir()
    cases._save(cases._model(), block)
    ext = folder / "external"
    ext.mkdir()
    proto = cases._model()
    data = b""
    for tensor in proto.graph.initializer:
        if tensor.name in ("wu", "wd", "wq"):
            raw = onnx.numpy_helper.to_array(tensor).tobytes()
            offset = len(data)
            data += raw
            cases._externalize(proto, tensor.name, DATA_FILE)
            next(e for e in tensor.external_data if e.key == "offset").value = str(offset)
    (ext / DATA_FILE).write_bytes(data)
    cases._save(proto, ext)
    outside = folder / "outside.bin"
    outside.write_bytes(b"\0" * 4096)
    (ext / "link.bin").symlink_to(outside)
    mlp = folder / "mlp"
    mlp.mkdir()
    cases._save(cases._model(cases.MLP), mlp)
    return {
        "block": block / "model.onnx",
        "external": ext / "model.onnx",
        "mlp": mlp / "model.onnx",
    }


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three random mutations of ``data`` (a serialized model)."""
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5:
            data = rng.choice(_BYTE_MUTATIONS)(data, rng)
        else:
            proto = onnx.ModelProto()
            try:
                proto.ParseFromString(data)
            except Exception:  # earlier byte mutations broke it: keep damaging bytes
                data = rng.choice(_BYTE_MUTATIONS)(data, rng)
                continue
            try:
                rng.choice(_PROTO_MUTATIONS)(proto, rng)
            except (ValueError, TypeError, OverflowError):  # protobuf refused the value itself
                continue
            data = proto.SerializeToString()
    return data


# ----------------------------------------------------------------------------- bytes


def _flip(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _set_byte(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    b = bytearray(data)
    b[rng.randrange(len(b))] = rng.choice([0, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    return bytes(b)


def _cut(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def _insert(data: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(len(data) + 1)
    return data[:at] + rng.randbytes(rng.randint(1, 16)) + data[at:]


def _delete(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    at = rng.randrange(len(data))
    return data[:at] + data[at + rng.randint(1, 16) :]


def _repeat_chunk(data: bytes, rng: random.Random) -> bytes:
    if len(data) < 2:
        return data + data
    start = rng.randrange(len(data) - 1)
    end = rng.randrange(start + 1, min(len(data), start + 256) + 1)
    return data[:end] + data[start:end] * rng.randint(1, 4) + data[end:]


_BYTE_MUTATIONS: list[Callable[[bytes, random.Random], bytes]] = [
    _flip,
    _set_byte,
    _cut,
    _insert,
    _delete,
    _repeat_chunk,
]


# ----------------------------------------------------------------------------- protobuf


def _all_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    out = list(proto.graph.initializer)
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                out.append(attr.t)
    return out


def _tensor_dims(proto: onnx.ModelProto, rng: random.Random) -> None:
    tensors = _all_tensors(proto)
    if tensors:
        t = rng.choice(tensors)
        if t.dims and rng.random() < 0.8:
            t.dims[rng.randrange(len(t.dims))] = rng.choice(_BIG)
        else:
            t.dims.append(rng.choice(_BIG))


def _tensor_dtype(proto: onnx.ModelProto, rng: random.Random) -> None:
    tensors = _all_tensors(proto)
    if tensors:
        rng.choice(tensors).data_type = rng.randrange(0, 30)


def _tensor_data(proto: onnx.ModelProto, rng: random.Random) -> None:
    tensors = _all_tensors(proto)
    if not tensors:
        return
    t = rng.choice(tensors)
    choice = rng.randrange(4)
    if choice == 0:
        t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data) + 1)]
    elif choice == 1:
        t.ClearField("raw_data")
        t.float_data.extend(
            np.random.default_rng(rng.randrange(2**32)).normal(size=rng.randrange(70)).tolist()
        )
    elif choice == 2:
        t.int64_data.extend([rng.choice(_BIG) for _ in range(rng.randrange(5))])
    else:
        t.string_data.append(b"\xff\xfe")


def _tensor_external(proto: onnx.ModelProto, rng: random.Random) -> None:
    tensors = _all_tensors(proto)
    if not tensors:
        return
    t = rng.choice(tensors)
    t.data_location = rng.choice([onnx.TensorProto.EXTERNAL, onnx.TensorProto.DEFAULT])
    if rng.random() < 0.5:
        del t.external_data[:]
    for key in rng.sample(
        ["location", "offset", "length", "checksum", "basepath"], rng.randint(1, 3)
    ):
        entry = t.external_data.add()
        entry.key = key
        if key == "location":
            entry.value = rng.choice(_LOCATIONS)
        else:
            entry.value = rng.choice(
                [str(rng.choice(_BIG)), "", "abc", "1e3", str(rng.randrange(2048))]
            )


def _node_op(proto: onnx.ModelProto, rng: random.Random) -> None:
    if proto.graph.node:
        node = rng.choice(proto.graph.node)
        node.op_type = rng.choice(_OPS)
        if rng.random() < 0.3:
            node.domain = rng.choice(_DOMAINS)


def _node_edge(proto: onnx.ModelProto, rng: random.Random) -> None:
    graph = proto.graph
    if not graph.node:
        return
    names = [v.name for v in graph.input] + [t.name for t in graph.initializer]
    names += [o for n in graph.node for o in n.output] + ["", "nowhere"]
    node = rng.choice(graph.node)
    field = node.input if (rng.random() < 0.7 or not node.output) else node.output
    if field and rng.random() < 0.8:
        field[rng.randrange(len(field))] = rng.choice(names)
    else:
        field.append(rng.choice(names))


def _node_attr(proto: onnx.ModelProto, rng: random.Random) -> None:
    if not proto.graph.node:
        return
    node = rng.choice(proto.graph.node)
    name = rng.choice(["axis", "perm", "epsilon", "to", "then_branch", "value", "allowzero"])
    kind = rng.randrange(5)
    value: object
    if kind == 0:
        value = rng.choice(_BIG)
    elif kind == 1:
        value = [rng.choice(_BIG) for _ in range(rng.randrange(5))]
    elif kind == 2:
        value = rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e-5])
    elif kind == 3:
        value = oh.make_graph([], "g", [], [])
    else:
        value = "text"
    del_existing = [i for i, a in enumerate(node.attribute) if a.name == name]
    for i in reversed(del_existing):
        del node.attribute[i]
    node.attribute.append(oh.make_attribute(name, value))


def _drop_or_duplicate(proto: onnx.ModelProto, rng: random.Random) -> None:
    graph = proto.graph
    field = rng.choice([graph.node, graph.input, graph.output, graph.initializer, graph.value_info])
    if not field:
        return
    i = rng.randrange(len(field))
    if rng.random() < 0.5:
        del field[i]
    else:
        field.add().CopyFrom(field[i])


def _value_type(proto: onnx.ModelProto, rng: random.Random) -> None:
    values = list(proto.graph.input) + list(proto.graph.output)
    if not values:
        return
    v = rng.choice(values)
    tt = v.type.tensor_type
    if rng.random() < 0.3:
        tt.elem_type = rng.randrange(0, 30)
    elif tt.shape.dim and rng.random() < 0.7:
        dim = tt.shape.dim[rng.randrange(len(tt.shape.dim))]
        if rng.random() < 0.5:
            dim.dim_value = rng.choice(_BIG)
        else:
            dim.dim_param = rng.choice(["batch", "", "s" * 100])
    else:
        tt.shape.dim.add().dim_value = rng.choice(_BIG)


def _versions(proto: onnx.ModelProto, rng: random.Random) -> None:
    if rng.random() < 0.5 and proto.opset_import:
        proto.opset_import[rng.randrange(len(proto.opset_import))].version = rng.choice(
            [0, 1, 6, 7, 13, 17, 18, 20, 21, 28, 29, 99, -1]
        )
    elif rng.random() < 0.5:
        proto.ir_version = rng.choice([0, 1, 3, 7, 10, 14, 15, 99])
    else:
        entry = proto.opset_import.add()
        entry.domain, entry.version = rng.choice(_DOMAINS), rng.randint(-1, 30)


def _subgraph(proto: onnx.ModelProto, rng: random.Random) -> None:
    """Wrap a node's input in an If whose branches read outer values (scoping, nesting)."""
    graph = proto.graph
    if not graph.node:
        return
    node = rng.choice(graph.node)
    if not node.input:
        return
    inner = oh.make_node("Identity", [rng.choice([node.input[0], "nowhere"])], ["branch_out"])
    branch = oh.make_graph(
        [inner],
        "branch",
        [],
        [oh.make_tensor_value_info("branch_out", onnx.TensorProto.FLOAT, None)],
    )
    cond = oh.make_tensor("cond", onnx.TensorProto.BOOL, [], [True])
    graph.initializer.append(cond)
    graph.node.insert(
        0, oh.make_node("If", ["cond"], ["if_out"], then_branch=branch, else_branch=branch)
    )


_PROTO_MUTATIONS: list[Callable[[onnx.ModelProto, random.Random], None]] = [
    _tensor_dims,
    _tensor_dtype,
    _tensor_data,
    _tensor_external,
    _node_op,
    _node_edge,
    _node_attr,
    _drop_or_duplicate,
    _value_type,
    _versions,
    _subgraph,
]
