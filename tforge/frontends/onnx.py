"""Load an ``.onnx`` file (and its external data, safely) into an ``onnx_ir.Model``.

A model file comes from outside, so everything it says about other files is checked before
anything is opened: an external-data ``location`` may not be absolute, may not climb out of the
model's folder with ``..``, and may not reach outside it through a symlink (a model would
otherwise make us read ``/etc/shadow`` or ``~/.ssh`` and hand the bytes to a pass). Sizes are
checked with ``stat`` so that a short data file fails here, with a message, instead of deep in
a pass as a NumPy buffer error. Initializers stay lazy: onnx_ir memory-maps external data on
first use, so loading a multi-gigabyte model costs only the protobuf.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx_ir import external_data as ir_external_data
from onnx_ir import serde as ir_serde

from tforge.errors import UnsupportedModelError

__all__ = ["SOURCE_PATH_KEY", "load_onnx"]

logger = logging.getLogger(__name__)

#: ``model.meta`` key holding the resolved path of the file a model was loaded from.
SOURCE_PATH_KEY = "tforge.source_path"

# Top-level ModelProto fields and their protobuf wire types (0 = varint, 2 = length-delimited),
# used only to explain why a file failed to parse.
_MODEL_FIELDS: dict[int, tuple[str, int]] = {
    1: ("ir_version", 0),
    2: ("producer_name", 2),
    3: ("producer_version", 2),
    4: ("domain", 2),
    5: ("model_version", 0),
    6: ("doc_string", 2),
    7: ("graph", 2),
    8: ("opset_import", 2),
    14: ("metadata_props", 2),
    20: ("training_info", 2),
    25: ("functions", 2),
    26: ("configuration", 2),
}


def load_onnx(path: str | os.PathLike[str]) -> ir.Model:
    """Read an ONNX model file without modifying it, or raise ``UnsupportedModelError``.

    External data is validated (containment, existence, size) before any data file is opened,
    then left to onnx_ir, which memory-maps it lazily. ``model.meta["tforge.source_path"]``
    records the resolved input path so that a backend can refuse to overwrite it.
    """
    where = os.fspath(path)
    if not os.path.lexists(where):
        raise UnsupportedModelError(f"{where}: no such file; check the path to the .onnx model")
    if os.path.isdir(where):
        raise UnsupportedModelError(f"{where}: is a directory; pass the .onnx file inside it")
    if not os.path.exists(where):
        raise UnsupportedModelError(f"{where}: is a broken symlink; point it at an .onnx file")
    try:
        with open(where, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UnsupportedModelError(
            f"{where}: cannot be read ({err.strerror}); check its permissions"
        ) from None
    if not data:
        raise UnsupportedModelError(f"{where}: file is empty (0 bytes); re-export the model")

    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise UnsupportedModelError(f"{where}: {_explain_parse_failure(data)}") from err
    if not proto.HasField("graph"):
        if proto.ir_version == 0 and not proto.opset_import:
            raise UnsupportedModelError(
                f"{where}: not an ONNX model (the bytes carry no ONNX model fields); "
                "pass a file written by onnx.save or torch.onnx.export"
            )
        raise UnsupportedModelError(
            f"{where}: ONNX model has no graph (ir_version {proto.ir_version}, "
            f"{len(proto.opset_import)} opset imports); re-export the model with its graph"
        )
    del data

    base_dir = os.path.dirname(os.path.abspath(where))
    _check_external_data(proto, where, base_dir)

    try:
        model = ir_serde.deserialize_model(proto)
    except Exception as err:  # onnx_ir raises plain exceptions on malformed protos
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsupportedModelError(
            f"{where}: malformed ONNX model ({first}); check it with onnx.checker.check_model"
        ) from err
    # An absolute base dir keeps external tensors valid if the process later changes its
    # working directory, and makes onnx_ir re-run its own containment check on first access.
    ir_external_data.set_base_dir(model.graph, base_dir)
    model.meta[SOURCE_PATH_KEY] = os.path.realpath(where)
    logger.debug("loaded %s: %d nodes, opsets %s", where, len(model.graph), model.opset_imports)
    return model


def _explain_parse_failure(data: bytes) -> str:
    """Say whether unparsable bytes look like a cut-off ONNX file or like something else.

    Walks the top-level ModelProto fields: a field running past the end of the file means the
    file was truncated; a tag that ModelProto does not have means it was never ONNX.
    """
    pos, size = 0, len(data)
    while pos < size:
        start = pos
        tag, pos = _read_varint(data, pos)
        if tag is None:
            return _truncated(start, size, "a field tag")
        field, wire = _MODEL_FIELDS.get(tag >> 3, ("", -1))
        if wire != tag & 7:
            return (
                f"not an ONNX model (byte {start} starts no ModelProto field); "
                "pass a file written by onnx.save or torch.onnx.export"
            )
        value, pos = _read_varint(data, pos)
        if value is None:
            return _truncated(start, size, f"field '{field}'")
        if wire == 2:
            if pos + value > size:
                return _truncated(start, size, f"field '{field}' ({value} bytes at offset {pos})")
            pos += value
    return "ONNX protobuf is corrupt inside a nested message; re-export the model"


def _truncated(start: int, size: int, what: str) -> str:
    return (
        f"file is truncated: {what} starting at byte {start} runs past the end of the "
        f"{size}-byte file; re-copy or re-export the model"
    )


def _read_varint(data: bytes, pos: int) -> tuple[int | None, int]:
    """Decode a protobuf varint at ``pos``; ``None`` if the data ends inside it."""
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None, pos


@dataclass(frozen=True)
class _ExternalRef:
    tensor: onnx.TensorProto
    location: str
    offset: int
    length: int | None


def _check_external_data(proto: onnx.ModelProto, where: str, base_dir: str) -> None:
    """Refuse every external reference that escapes ``base_dir``, is missing or is too short.

    All locations are checked as strings and with ``realpath`` before any data file is stat'ed
    or opened, so a hostile model learns nothing about files outside its folder.
    """
    refs = [_external_ref(t, where) for t in _all_tensors(proto) if _is_external(t)]
    if not refs:
        return
    base_real = os.path.realpath(base_dir)
    resolved: list[tuple[_ExternalRef, str]] = []
    for ref in refs:
        name, loc = ref.tensor.name, ref.location
        if not loc:
            raise UnsupportedModelError(
                f"{where}: initializer '{name}' is external but names no data file; re-export the model"
            )
        if os.path.isabs(loc) or os.path.splitdrive(loc)[0]:
            raise UnsupportedModelError(
                f"{where}: external data '{loc}' of initializer '{name}' is an absolute path; "
                "the ONNX spec requires a path relative to the model, re-save with a relative location"
            )
        joined = os.path.join(base_dir, loc)
        if not _inside(os.path.normpath(joined), base_dir):
            raise UnsupportedModelError(
                f"{where}: external data '{loc}' of initializer '{name}' escapes the model folder "
                f"{base_dir} with '..'; move the file next to the model and fix the location"
            )
        # realpath of the joined (not normalised) path resolves each symlink before the '..'
        # after it, as open() does: 'link/../x' with link -> /elsewhere/d is /elsewhere/x.
        real = os.path.realpath(joined)
        if not _inside(real, base_real):
            raise UnsupportedModelError(
                f"{where}: external data '{loc}' of initializer '{name}' resolves outside the "
                f"model folder (to {real}); copy the file next to the model instead of linking it"
            )
        resolved.append((ref, joined))

    sizes: dict[str, os.stat_result] = {}
    for ref, joined in resolved:
        name, loc = ref.tensor.name, ref.location
        if joined not in sizes:
            try:
                # stat the path onnx_ir will open, so that OS path semantics decide existence
                sizes[joined] = os.stat(joined)
            except OSError as err:
                raise UnsupportedModelError(
                    f"{where}: external data file '{loc}' of initializer '{name}' is missing "
                    f"({err.strerror}; looked in {base_dir}); copy it next to the model"
                ) from None
            if not stat.S_ISREG(sizes[joined].st_mode):
                raise UnsupportedModelError(
                    f"{where}: external data '{loc}' of initializer '{name}' is not a regular file"
                )
            if sizes[joined].st_nlink > 1:
                # onnx_ir refuses hard-linked data on first access (a hard link can bring a
                # file from outside the folder in); say so now rather than in the middle of a pass.
                raise UnsupportedModelError(
                    f"{where}: external data file '{loc}' has {sizes[joined].st_nlink} hard links, "
                    "which onnx_ir refuses to map; replace it by a plain copy"
                )
        expected = _nbytes(ref.tensor)
        length = ref.length if ref.length is not None else expected
        if expected is not None and length != expected:
            raise UnsupportedModelError(
                f"{where}: initializer '{name}' declares {length} bytes of external data but its "
                f"dtype and shape need {expected}; re-export the model"
            )
        file_size = sizes[joined].st_size
        if length is not None and ref.offset + length > file_size:
            raise UnsupportedModelError(
                f"{where}: external data '{loc}' is {file_size} bytes but initializer '{name}' "
                f"needs bytes {ref.offset}..{ref.offset + length}; the data file is truncated, "
                "re-copy it"
            )


def _external_ref(tensor: onnx.TensorProto, where: str) -> _ExternalRef:
    entries = {e.key: e.value for e in tensor.external_data}
    try:
        offset = int(entries.get("offset", "0") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        raise UnsupportedModelError(
            f"{where}: initializer '{tensor.name}' has a non-integer external data offset or "
            "length; re-export the model"
        ) from None
    if offset < 0 or (length is not None and length < 0):
        raise UnsupportedModelError(
            f"{where}: initializer '{tensor.name}' has a negative external data offset or length; "
            "re-export the model"
        )
    return _ExternalRef(tensor, entries.get("location", ""), offset, length)


def _inside(path: str, folder: str) -> bool:
    folder = os.path.normcase(folder)
    path = os.path.normcase(path)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's dtype and shape need, or ``None`` for types without a fixed width."""
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except (ValueError, TypeError):
        return None
    return math.ceil(math.prod(tensor.dims) * bits / 8)


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in the model: initializers and tensor attributes, in all subgraphs."""
    yield from _graph_tensors(proto.graph)
    for function in proto.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
        for sparse in attr.sparse_tensors:
            yield from (sparse.values, sparse.indices)
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)
