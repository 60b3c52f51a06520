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

import functools
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
from tforge.runtime.save import SOURCE_PATH_KEY

__all__ = ["MAX_DECLARED_BYTES", "MIN_OPSET", "SOURCE_PATH_KEY", "load_onnx"]

logger = logging.getLogger(__name__)

#: Oldest default-domain opset accepted: ONNX Runtime runs nothing older, and tforge's passes
#: are written against the operator semantics from opset 7 on.
MIN_OPSET = 7
#: A tensor whose declared shape needs more than this many bytes (1 TiB) is refused: no model
#: of this decade needs one, and allocating it (a generated input, a folded constant) would
#: take the machine down rather than fail.
MAX_DECLARED_BYTES = 2**40

# Operator domains that ONNX or ONNX Runtime implement; any other domain must be a function
# defined in the model itself.
_KNOWN_DOMAINS = frozenset(
    {
        "",
        "ai.onnx",
        "ai.onnx.ml",
        "ai.onnx.preview.training",
        "ai.onnx.training",
        "com.microsoft",
        "com.microsoft.nchwc",
        "com.microsoft.experimental",
        "com.ms.internal.nhwc",
    }
)

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
    try:
        _check_versions(proto, where)
        _check_tensors(proto, where)
        _check_graph(
            proto.graph,
            where,
            outer=frozenset(),
            opsets=_opsets(proto),
            functions=_functions(proto),
        )
        _check_with_onnx_checker(proto, where)
        _check_external_data(proto, where, base_dir)
    except UnicodeDecodeError as err:
        # ONNX is proto2: names are not UTF-8 checked on parse, only when Python reads them
        raise UnsupportedModelError(
            f"{where}: a name or string in the model is not valid UTF-8 ({err.reason} at byte "
            f"{err.start} of {err.object[:40]!r}); re-export the model"
        ) from None

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


def _opsets(proto: onnx.ModelProto) -> dict[str, int]:
    return {("" if o.domain == "ai.onnx" else o.domain): o.version for o in proto.opset_import}


def _functions(proto: onnx.ModelProto) -> frozenset[tuple[str, str]]:
    return frozenset((f.domain, f.name) for f in proto.functions)


def _check_versions(proto: onnx.ModelProto, where: str) -> None:
    """Refuse IR versions and default-domain opsets outside what onnx and ORT here implement."""
    if proto.ir_version > onnx.IR_VERSION:
        raise UnsupportedModelError(
            f"{where}: IR version {proto.ir_version} is newer than the {onnx.IR_VERSION} this onnx "
            f"{onnx.__version__} reads; re-export with an older ir_version"
        )
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain not in ("", "ai.onnx"):
            continue
        if opset.version > newest:
            raise UnsupportedModelError(
                f"{where}: opset {opset.version} of the default ONNX domain is newer than the "
                f"{newest} onnx {onnx.__version__} knows; re-export with opset {newest} or lower"
            )
        if opset.version < MIN_OPSET:
            raise UnsupportedModelError(
                f"{where}: opset {opset.version} of the default ONNX domain is older than the "
                f"{MIN_OPSET} tforge and ONNX Runtime support; convert it with "
                "onnx.version_converter.convert_version(model, 17)"
            )


def _check_with_onnx_checker(proto: onnx.ModelProto, where: str) -> None:
    """What is left to ONNX's own checker: operator arity, attribute types, tensor fields.

    The checker runs on a skeleton whose large initializers are stubbed as external data (it
    serialises its argument, and the weights would double the memory of loading), so its
    cost does not grow with the weights.
    """
    skeleton = onnx.ModelProto()
    graph = proto.graph
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(skeleton, field, getattr(proto, field))
    skeleton.opset_import.extend(proto.opset_import)
    skeleton.functions.extend(proto.functions)
    sg = skeleton.graph
    sg.name = graph.name
    sg.node.extend(graph.node)
    ort_only = _ort_default_domain_ops()
    for node in sg.node:
        if node.domain in ("", "ai.onnx") and node.op_type in ort_only and not _has_schema(node.op_type):
            # ONNX's checker knows no schema for ORT's default-domain ops (their arity was
            # checked against ORT's schema already): check the rest of the node as a custom op
            node.domain = _ORT_DEFAULT_STANDIN
    if any(node.domain == _ORT_DEFAULT_STANDIN for node in sg.node):
        skeleton.opset_import.add(domain=_ORT_DEFAULT_STANDIN, version=1)
    sg.input.extend(graph.input)
    sg.output.extend(graph.output)
    sg.value_info.extend(graph.value_info)
    sg.sparse_initializer.extend(graph.sparse_initializer)
    for tensor in graph.initializer:
        if _is_external(tensor) or len(tensor.raw_data) > 4096:
            # same name, type and rank, zero elements: nothing for the checker to copy (without
            # shape inference it does not compare initializer shapes with their uses)
            stub = sg.initializer.add()
            stub.name, stub.data_type = tensor.name, tensor.data_type
            stub.dims.extend([0, *tensor.dims[1:]])  # a scalar becomes [0]: rank is not checked
        else:
            sg.initializer.append(tensor)
    try:
        onnx.checker.check_model(skeleton)
    except (onnx.checker.ValidationError, ValueError, TypeError, RuntimeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        first = lines[0] if lines else type(err).__name__
        context = next((line for line in lines if line.startswith("==> Context")), "")
        raise UnsupportedModelError(
            f"{where}: ONNX checker: {first[:300]}{' (' + context[:200] + ')' if context else ''}; "
            "re-export the model"
        ) from None


def _check_tensors(proto: onnx.ModelProto, where: str) -> None:
    """Refuse tensors whose dims are negative or absurd, or whose inline data has another size.

    Declared shapes of graph inputs, outputs and value_info are checked too: a pass or a
    numerics check may allocate them.
    """
    for tensor in _all_tensors(proto):
        dims = list(tensor.dims)
        what = f"tensor '{tensor.name}'"
        _check_dtype(tensor, what, where)
        _check_dims(dims, tensor.data_type, what, where)
        if _is_external(tensor):
            continue  # sizes checked against the data file in _check_external_data
        count = math.prod(dims)
        if tensor.HasField("raw_data") or tensor.raw_data:
            expected = _nbytes(tensor)
            held = len(tensor.raw_data)
            if expected is not None and held != expected:
                raise UnsupportedModelError(
                    f"{where}: {what} holds {held} bytes of raw data but its dtype and shape "
                    f"{dims} need {expected}; re-export the model"
                )
            continue
        field, per_value = _typed_field(tensor.data_type)
        if field is None:
            continue
        held = len(getattr(tensor, field))
        needed = math.ceil(count / per_value)
        if held != needed:
            raise UnsupportedModelError(
                f"{where}: {what} holds {held} values in {field} but its shape {dims} needs "
                f"{needed}; re-export the model"
            )
    for graph in _all_graphs(proto.graph):
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
                continue
            dims = [d.dim_value for d in info.type.tensor_type.shape.dim if d.HasField("dim_value")]
            _check_dims(dims, info.type.tensor_type.elem_type, f"value '{info.name}'", where)


def _check_dtype(tensor: onnx.TensorProto, what: str, where: str) -> None:
    """Refuse data types ONNX does not define, and strings stored as raw bytes."""
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError:
        dtype = ir.DataType.UNDEFINED
    if dtype == ir.DataType.UNDEFINED:
        raise UnsupportedModelError(
            f"{where}: {what} has data type {tensor.data_type}, which ONNX does not define; "
            "re-export the model"
        )
    if dtype == ir.DataType.STRING and (tensor.raw_data or _is_external(tensor)):
        raise UnsupportedModelError(
            f"{where}: {what} is a string tensor stored as raw bytes; ONNX keeps strings in "
            "string_data, re-export the model"
        )


def _check_dims(dims: list[int], data_type: int, what: str, where: str) -> None:
    if any(d < 0 for d in dims):
        raise UnsupportedModelError(
            f"{where}: {what} has a negative dimension in its shape {dims}; re-export the model"
        )
    try:
        bits = ir.DataType(data_type).bitwidth
    except (ValueError, TypeError):
        bits = 8  # strings and unknown types: count one byte an element, a lower bound
    needed = math.prod(dims) * bits // 8
    if needed > MAX_DECLARED_BYTES:
        raise UnsupportedModelError(
            f"{where}: {what} declares shape {dims}, which would need {needed / 2**40:.3g} TiB; "
            "fix the shape or make its dimensions symbolic"
        )


def _typed_field(data_type: int) -> tuple[str | None, float]:
    """The TensorProto field holding values of ``data_type`` and elements per stored value."""
    try:
        field = onnx.helper.tensor_dtype_to_field(data_type)
    except (KeyError, ValueError, TypeError):
        return None, 1
    if data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        return field, 0.5  # real and imaginary parts are two stored values
    try:
        bits = ir.DataType(data_type).bitwidth
    except (ValueError, TypeError):
        return field, 1
    return field, (2 if bits == 4 else 1)  # 4-bit types pack two elements in one int32


def _check_graph(
    graph: onnx.GraphProto,
    where: str,
    *,
    outer: frozenset[str],
    opsets: dict[str, int],
    functions: frozenset[tuple[str, str]],
) -> None:
    """Refuse duplicate definitions, reads of undefined values, cycles and unknown operators.

    ``outer`` holds the names a subgraph may read from the graphs enclosing it.
    """
    label = f"graph '{graph.name}'" if graph.name else "the graph"
    defined: dict[str, str] = {}

    def define(name: str, what: str) -> None:
        if not name:
            return
        if name in defined:
            raise UnsupportedModelError(
                f"{where}: value '{name}' is defined twice in {label} (as {defined[name]} and as "
                f"{what}); every value must have exactly one definition, re-export the model"
            )
        defined[name] = what

    for info in graph.input:
        define(info.name, "a graph input")
    inputs = set(defined)
    for tensor in graph.initializer:
        if tensor.name in inputs:
            inputs.discard(
                tensor.name
            )  # an input's default value (IR < 4), not a second definition
            continue
        define(tensor.name, "an initializer")
    for sparse in graph.sparse_initializer:
        define(sparse.values.name, "a sparse initializer")
    for index, node in enumerate(graph.node):
        for name in node.output:
            define(name, f"an output of {_node_label(node, index)}")

    visible = outer | defined.keys()
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
    for index, node in enumerate(graph.node):
        _check_operator(node, index, where, opsets, functions)
        for name in node.input:
            if name and name not in visible:
                raise UnsupportedModelError(
                    f"{where}: {_node_label(node, index)} in {label} reads '{name}', which nothing "
                    "defines (no input, initializer or node output has that name); re-export the model"
                )
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _check_graph(sub, where, outer=visible, opsets=opsets, functions=functions)
    for output in graph.output:
        if output.name not in visible:
            raise UnsupportedModelError(
                f"{where}: output '{output.name}' of {label} is never computed; re-export the model"
            )
    _check_acyclic(graph, producer, where, label)


def _check_acyclic(
    graph: onnx.GraphProto, producer: dict[str, int], where: str, label: str
) -> None:
    """Kahn's algorithm over the node dependencies; what is left over lies on or after a cycle."""
    nodes = graph.node
    waiting = [0] * len(nodes)
    readers: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for name in dict.fromkeys(n for n in node.input if n in producer):
            waiting[i] += 1
            readers[producer[name]].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for reader in readers[i]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                ready.append(reader)
    if done < len(nodes):
        stuck = next(i for i, count in enumerate(waiting) if count > 0)
        raise UnsupportedModelError(
            f"{where}: {label} has a cycle: {_node_label(nodes[stuck], stuck)} depends on its own "
            f"output ({len(nodes) - done} nodes on or after the cycle); re-export the model"
        )


def _check_operator(
    node: onnx.NodeProto,
    index: int,
    where: str,
    opsets: dict[str, int],
    functions: frozenset[tuple[str, str]],
) -> None:
    domain = "" if node.domain == "ai.onnx" else node.domain
    if (node.domain, node.op_type) in functions:
        return
    if domain not in opsets:
        raise UnsupportedModelError(
            f"{where}: {_node_label(node, index)} uses domain '{domain or 'ai.onnx'}', which the "
            "model does not import (no opset_import entry); re-export the model"
        )
    if domain not in _KNOWN_DOMAINS:
        raise UnsupportedModelError(
            f"{where}: {_node_label(node, index)} uses domain '{domain}', which neither ONNX nor "
            "ONNX Runtime implements and the model defines no function for; "
            "replace the custom operator before compiling"
        )
    if domain == "":
        version = opsets[""]
        if not _has_schema(node.op_type):
            if node.op_type in _ort_default_domain_ops():
                return  # ONNX Runtime's own op in the default domain (SimplifiedLayerNormalization)
            raise UnsupportedModelError(
                f"{where}: {_node_label(node, index)} is an unknown operator '{node.op_type}' in "
                "the default ONNX domain (neither ONNX nor the installed ONNX Runtime defines it); "
                "check the exporter or register a custom domain"
            )
        try:
            onnx.defs.get_schema(node.op_type, version, "")
        except onnx.defs.SchemaError:
            since = onnx.defs.get_schema(node.op_type, "").since_version
            raise UnsupportedModelError(
                f"{where}: {_node_label(node, index)}: '{node.op_type}' does not exist in opset "
                f"{version} (it was added in opset {since}); re-export with opset {since} or later"
            ) from None


_ORT_DEFAULT_STANDIN = "tforge.ort_default_domain"


@functools.cache
def _ort_default_domain_ops() -> frozenset[str]:
    """Operators the installed ONNX Runtime registers in the default domain beyond ONNX's own.

    ORT implements a few of its fused ops there (SimplifiedLayerNormalization, which
    onnxruntime-genai's model builder writes), so a graph ORT runs must load.
    """
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
    except ImportError:
        return frozenset()
    schemas = getattr(ort_state, "get_all_operator_schema", None)
    if schemas is None:
        return frozenset()
    return frozenset(s.name for s in schemas() if s.domain in ("", "ai.onnx"))


def _has_schema(op_type: str) -> bool:
    try:
        return onnx.defs.has(op_type, "")
    except (TypeError, ValueError):  # names onnx's C++ side cannot take (e.g. lone surrogates)
        return False


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return (
        f"node '{node.name}' ({node.op_type})" if node.name else f"node #{index} ({node.op_type})"
    )


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_graphs(attr.g)
            for sub in attr.graphs:
                yield from _all_graphs(sub)


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
        if "\0" in loc:
            raise UnsupportedModelError(
                f"{where}: external data location {loc!r} of initializer '{name}' contains a NUL "
                "byte, which no file name can; re-export the model"
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
    if not all(isinstance(x, str) for kv in entries.items() for x in kv):
        # ONNX is proto2, so string fields are not UTF-8 checked on parse; protobuf hands
        # invalid UTF-8 back as bytes, which no path can be built from.
        raise UnsupportedModelError(
            f"{where}: initializer '{tensor.name!s}' has external data entries that are not valid "
            "UTF-8; re-export the model"
        )
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
