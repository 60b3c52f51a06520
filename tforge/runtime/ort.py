"""ONNX Runtime as the reference interpreter: open sessions, feed them, run with values exposed.

The compiler (calibration, numerics checks), passes (data-driven choices) and frontends (export
checks) run models through this module; ``tforge.backends.ort`` is ONNX Runtime as a *target*
(timing, which kernels ran). Models larger than memory run as consecutive pieces
(:class:`PiecewiseSession`), one ORT session at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort

from tforge.errors import PreconditionError, UnsupportedModelError
from tforge.runtime import save, spill
from tforge.runtime.spill import initializer_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "PROVIDERS",
    "PiecewiseSession",
    "create_session",
    "numpy_dtype",
    "prepare_feeds",
    "run",
    "session_exposing",
    "values_by_name",
]

PROVIDERS = ["CPUExecutionProvider"]

_ORT_NUMPY_TYPES: dict[str, type] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64,
    "tensor(uint32)": np.uint32,
    "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}



def numpy_dtype(ort_type: str) -> type | None:
    """The NumPy type of an ORT type string such as ``tensor(float)``, or None."""
    return _ORT_NUMPY_TYPES.get(ort_type)


def create_session(
    model: ir.Model | str | os.PathLike,
    *,
    optimize: bool = True,
    threads: int | None = None,
    profile_prefix: str | None = None,
    spin: bool = True,
) -> ort.InferenceSession:
    """Open a CPU session; ``optimize=False`` turns all of ORT's graph rewrites off.

    ``spin=False`` stops ORT's intra-op threads from busy-waiting after a run. Use it when
    several sessions are timed round robin in one process: on 2 cores the threads a session
    leaves spinning steal the CPU from the next one (a float MatMul measured 58 ms interleaved
    with five other sessions, 11.5 ms with spinning off).

    Tests compare numerics with optimisations off so that they measure tforge's rewrites, not
    ORT's. In-memory models go to ORT as bytes; models with external data or near 2 GiB are
    saved to a temporary folder first (ORT cannot resolve external files from bytes).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3  # ORT's warnings (e.g. unused initializers) are noise here
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if not isinstance(model, ir.Model):
        return _open(str(model), options, str(model))
    label = f"model '{model.graph.name or 'main'}'"
    if model.meta.get(spill.SPILL_KEY):  # set by PassManager.run for models of >= 1 GiB
        # a model larger than memory: prepacking would copy every MatMul weight into the
        # process (the size of the model), and one session would map all of its weights
        options.add_session_config_entry("session.disable_prepacking", "1")
        return PiecewiseSession(model, options, label, budget=max(spill.threshold() // 4, 1))  # type: ignore[return-value]
    if not save.external_data_files(model) and initializer_bytes(model) <= save.PROTO_WEIGHT_LIMIT:
        return _open(ir.to_proto(model).SerializeToString(), options, label)
    with tempfile.TemporaryDirectory(prefix="tforge-ort-") as folder:
        saved = save.save_model(model, Path(folder) / "model.onnx", external_data=True)
        # ORT reads the initializers during construction; the folder can go afterwards.
        return _open(str(saved), options, label)


class _Arg:
    """What ``InferenceSession.get_inputs()/get_outputs()`` return: a name, a type, a shape."""

    def __init__(self, value: ir.Value) -> None:
        self.name = value.name
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        self.type = next(
            (k for k, v in _ORT_NUMPY_TYPES.items() if np.dtype(v) == dtype), "tensor(float)"
        )
        self.shape = [d if isinstance(d, int) else str(d) for d in (value.shape or [])]


@dataclasses.dataclass
class _Piece:
    path: Path
    inputs: list[str]
    outputs: list[str]


class PiecewiseSession:
    """Runs a model larger than memory as consecutive pieces, one ORT session at a time.

    ORT maps a model's external data private and writable and keeps it for the session's
    life: one session over an 8 GiB model holds 8 GiB of the process's address space (and of
    RLIMIT_DATA) even though the pages are file-backed. Here the topologically ordered nodes
    are cut into pieces of at most ``budget`` weight bytes; each piece is an ONNX file with its
    own copy of its weights (written once, streamed: ORT reads no external data outside a
    model's folder, links included). ``run``
    opens the pieces one after the other, passing the values that cross a cut, so at most one
    piece's weights are mapped at a time. Same ``run``/``get_inputs``/``get_outputs`` as an
    ``InferenceSession``; a session is opened per piece and per run (cheap next to the run of
    a model this size).
    """

    def __init__(
        self, model: ir.Model, options: ort.SessionOptions, label: str, budget: int
    ) -> None:
        self.options = options
        self.label = label
        self._inputs = [
            _Arg(v) for v in model.graph.inputs if v.name not in model.graph.initializers
        ]
        self._outputs = [_Arg(v) for v in model.graph.outputs]
        self._folder = tempfile.TemporaryDirectory(prefix="tforge-pieces-")
        self.pieces = self._split(model, budget)
        logger.info(
            "%s: %d pieces of at most %.2f GiB of weights, run one at a time",
            label,
            len(self.pieces),
            budget / 2**30,
        )

    def get_inputs(self) -> list[_Arg]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Arg]:
        return list(self._outputs)

    def run(self, names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        wanted = [o.name for o in self._outputs] if names is None else list(names)
        values: dict[str, np.ndarray] = dict(feeds)
        for piece in self.pieces:
            session = _open(str(piece.path), self.options, self.label)
            outs = session.run(piece.outputs, {n: values[n] for n in piece.inputs})
            del session  # unmaps this piece's weights before the next is mapped
            values.update(zip(piece.outputs, outs, strict=True))
            later = {n for p in self.pieces[self.pieces.index(piece) + 1 :] for n in p.inputs}
            for name in [n for n in values if n not in later and n not in wanted]:
                del values[name]  # activations no later piece reads
        missing = [n for n in wanted if n not in values]
        if missing:
            raise UnsupportedModelError(f"run: {self.label} has no value(s) {missing}")
        return [values[n] for n in wanted]

    def _split(self, model: ir.Model, budget: int) -> list[_Piece]:
        graph = model.graph
        nodes = list(graph)
        position = {id(n): i for i, n in enumerate(nodes)}
        for i, node in enumerate(nodes):
            for value in node.inputs:
                producer = value.producer() if value is not None else None
                if producer is not None and position.get(id(producer), -1) >= i:
                    raise PreconditionError(
                        f"{self.label}: graph is not topologically sorted; canonicalize it first"
                    )
        initializers = graph.initializers
        # cut points: a new piece when the weights read would pass the budget
        ranges: list[tuple[int, int]] = []
        start, size = 0, 0
        for i, node in enumerate(nodes):
            weight = sum(
                v.const_value.nbytes
                for v in node.inputs
                if v is not None and v.name in initializers and v.const_value is not None
            )
            if i > start and size + weight > budget:
                ranges.append((start, i))
                start, size = i, 0
            size += weight
        ranges.append((start, len(nodes)))

        proto = ir.to_proto(model)
        by_name = {t.name: t for t in proto.graph.initializer}
        infos = {
            v.name: v for v in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]
        }
        try:  # types of values that cross a cut, if the model does not carry them (cheap: no weights)
            inferred = onnx.shape_inference.infer_shapes(proto).graph.value_info
            infos = {**{v.name: v for v in inferred}, **infos}
        except Exception as error:  # noqa: BLE001 - only a fallback; the IR's own types are used first
            logger.debug("%s: shape inference for the pieces failed: %s", self.label, error)
        graph_outputs = [v.name for v in graph.outputs]
        # for each value: the index of the last piece that reads it
        last_use: dict[str, int] = {name: len(ranges) for name in graph_outputs}
        for k, (a, b) in enumerate(ranges):
            for node in nodes[a:b]:
                for v in node.inputs:
                    if v is not None and v.name not in initializers:
                        last_use[v.name] = max(last_use.get(v.name, -1), k)
        header = onnx.ModelProto()  # the model without its graph: opsets, IR version, functions
        header.CopyFrom(proto)
        header.ClearField("graph")
        pieces = []
        folder = Path(self._folder.name)
        for k, (a, b) in enumerate(ranges):
            piece_nodes = proto.graph.node[a:b]
            produced = {o for n in piece_nodes for o in n.output if o}
            read = list(dict.fromkeys(i for n in piece_nodes for i in n.input if i))
            inputs = [n for n in read if n not in produced and n not in by_name]
            outputs = [o for n in piece_nodes for o in n.output if o and last_use.get(o, -1) > k]
            if not outputs:
                continue  # nothing after it or in the outputs reads this piece: never run it
            sub = onnx.GraphProto(name=f"piece{k}")
            sub.node.extend(piece_nodes)
            with open(folder / f"piece{k}.data", "wb") as data:
                for name in read:
                    if name in by_name:
                        tensor = sub.initializer.add()
                        tensor.CopyFrom(by_name[name])
                        self._relink(tensor, graph, data, f"piece{k}.data")
            for name in inputs:
                sub.input.append(self._info(infos, graph, name))
            for name in outputs:
                sub.output.append(self._info(infos, graph, name))
            piece = onnx.ModelProto()
            piece.CopyFrom(header)
            piece.graph.CopyFrom(sub)
            path = folder / f"piece{k}.onnx"
            path.write_bytes(piece.SerializeToString())
            pieces.append(_Piece(path, inputs, outputs))
        return pieces

    @staticmethod
    def _relink(tensor: onnx.TensorProto, graph: ir.Graph, data: BinaryIO, name: str) -> None:
        """Copy an external tensor's bytes into the piece's own data file (``data``, ``name``).

        ORT only reads external data inside the model's folder, after resolving links, and
        onnx_ir refuses hard-linked data: so each piece gets a copy of its weights, streamed
        in chunks (made once per session, reused by every run).
        """
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return
        source = graph.initializers[tensor.name].const_value
        if not isinstance(source, ir.ExternalTensor):
            return
        if source.nbytes < 1 << 20:
            # small constants inline: ORT's shape inference cannot read external shape tensors
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = source.tobytes()
            return
        data.write(b"\0" * (-data.tell() % spill.ALIGN))  # aligned, so that ORT can map it
        offset = data.tell()
        with open(source.path, "rb") as src:
            src.seek(source.offset or 0)
            left = source.nbytes
            while left:
                chunk = src.read(min(left, 64 << 20))
                if not chunk:
                    raise UnsupportedModelError(
                        f"{source.path}: data of '{tensor.name}' is cut short"
                    )
                data.write(chunk)
                left -= len(chunk)
        del tensor.external_data[:]
        for key, text in (
            ("location", name),
            ("offset", str(offset)),
            ("length", str(source.nbytes)),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, text

    @staticmethod
    def _info(
        infos: Mapping[str, onnx.ValueInfoProto], graph: ir.Graph, name: str
    ) -> onnx.ValueInfoProto:
        value = next((v for n in graph for v in n.outputs if v.name == name), None)
        if value is not None and value.type is not None:
            return ir.serde.serialize_value(value)
        if name in infos and infos[name].type.HasField("tensor_type"):
            return infos[name]
        raise PreconditionError(
            f"value '{name}' has no type, so the model cannot be run in pieces; canonicalize it first"
        )


def _open(model: str | bytes, options: ort.SessionOptions, label: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, options, providers=PROVIDERS)
    except Exception as error:  # ORT raises its own pybind classes (Fail, InvalidGraph, ...)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnsupportedModelError(f"onnxruntime cannot load {label}: {first}") from error


def prepare_feeds(
    session: ort.InferenceSession, feeds: Mapping[str, object]
) -> dict[str, np.ndarray]:
    """Cast ``feeds`` to the dtypes the session declares; every input must be fed, nothing else."""
    inputs = session.get_inputs()
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in feeds]
    unknown = [n for n in feeds if n not in names]
    if missing or unknown:
        raise UnsupportedModelError(
            f"run: feeds do not match the model inputs: missing {missing}, unknown {unknown} "
            f"(inputs are {names})"
        )
    prepared = {}
    for spec in inputs:
        dtype = _ORT_NUMPY_TYPES.get(spec.type)
        array = np.asarray(feeds[spec.name])
        prepared[spec.name] = array.astype(dtype, copy=False) if dtype is not None else array
    return prepared


def run(session: ort.InferenceSession, feeds: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Run once and return the outputs by name."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, prepare_feeds(session, feeds)), strict=True))


def session_exposing(model: ir.Model, names: Sequence[str], *, optimize: bool) -> Any:
    """An ORT session of a copy of ``model`` whose outputs are the values named ``names`` (in that
    order, once each); ``model`` itself is left unchanged. A model larger than memory runs in pieces."""
    clone = model.clone()
    if model.meta.get(spill.SPILL_KEY):  # clone() leaves meta behind; create_session reads it
        clone.meta[spill.SPILL_KEY] = True
    by_name = values_by_name(clone.graph)
    clone.graph.outputs.clear()
    clone.graph.outputs.extend(by_name[n] for n in dict.fromkeys(names))
    # ORT runs every node of a graph whatever outputs are asked for: without the nodes past the
    # exposed values, a session exposing one block's inputs costs that block's depth, not the model
    common_passes.RemoveUnusedNodesPass()(clone)
    return create_session(clone, optimize=optimize)


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of ``graph``: inputs, initializers and node outputs."""
    values: dict[str, ir.Value] = {}
    for value in graph.inputs:
        if value.name:
            values[value.name] = value
    for name, value in graph.initializers.items():
        values[name] = value
    for node in graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values
