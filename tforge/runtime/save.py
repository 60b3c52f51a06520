"""Writing a model to disk: atomically, never over its own source or the weights it maps.

Saving is where models get destroyed: an interrupted write leaves half a file, and writing over
the external data a loaded model still memory-maps corrupts the weights being written. So
``save_model`` stages everything in a temporary folder beside the output, renames into place
only when complete, and refuses outputs that alias the model's own source files. It lives in the
runtime layer because every layer writes models: the frontends (exports), ONNX Runtime sessions
of models with external data, the CLI and the backends.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import onnx_ir as ir

from tforge.errors import UnsupportedModelError
from tforge.runtime import spill
from tforge.runtime.spill import initializer_bytes

logger = logging.getLogger(__name__)

__all__ = ["PROTO_WEIGHT_LIMIT", "SOURCE_PATH_KEY", "external_data_files", "inlined_external_tensors", "save_model"]

#: Model metadata (``model.meta``): the file a model was loaded from, which saving never overwrites.
SOURCE_PATH_KEY = "tforge.source_path"
# A ModelProto cannot exceed 2 GiB; keep room for the graph itself next to the weights.
PROTO_WEIGHT_LIMIT = 2**31 - 128 * 2**20


def external_data_files(model: ir.Model) -> list[Path]:
    """Resolved paths of the files the model's ExternalTensors read (memory-map) from."""
    paths: dict[Path, None] = {}
    for graph in model.graphs():
        tensors = [v.const_value for v in graph.initializers.values()]
        for node in graph:
            for attr in node.attributes.values():
                if not attr.is_ref() and attr.type == ir.AttributeType.TENSOR:
                    tensors.append(attr.value)
        for tensor in tensors:
            if isinstance(tensor, ir.ExternalTensor):
                paths[Path(os.path.realpath(tensor.path))] = None
    return list(paths)


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    size_threshold: int = 1024,
) -> Path:
    """Write ``model`` to ``path`` atomically and return the path; the model is left unchanged.

    With external data (forced, or automatic once the weights approach protobuf's 2 GiB limit)
    tensors above ``size_threshold`` bytes go to ``<file name>.data`` beside the output.
    Both files are written into a temporary folder next to the output and renamed into place,
    so a failure leaves nothing new at ``path``.
    """
    path = Path(path)
    data_name = f"{path.name}.data"
    weight_bytes = initializer_bytes(model)
    if external_data is None:
        # a model whose rewritten weights were spilled (compiler/spill.py) is too large to
        # inline: the single-file path would read every weight into memory at once
        external_data = weight_bytes > PROTO_WEIGHT_LIMIT or bool(model.meta.get(spill.SPILL_KEY))
    elif not external_data and weight_bytes > PROTO_WEIGHT_LIMIT:
        raise UnsupportedModelError(
            f"save: {weight_bytes / 2**30:.1f} GiB of weights do not fit in one ONNX file "
            "(protobuf's limit is 2 GiB); save with external_data=True"
        )
    targets = [path, path.with_name(data_name)] if external_data else [path]
    _refuse_aliasing(model, targets)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        staged = staging / path.name
        if external_data:
            # onnx_ir streams ExternalTensors file to file and restores the model's tensors.
            ir.save(model, staged, external_data=data_name, size_threshold_bytes=size_threshold)
        else:
            with inlined_external_tensors(model):
                ir.save(model, staged)
        staged_data = staging / data_name
        placed_data = staged_data.exists() and staged_data.stat().st_size > 0  # else unused
        if placed_data:
            os.replace(staged_data, path.with_name(data_name))
        try:
            os.replace(staged, path)
        except BaseException:
            if placed_data:  # data without its model is useless and misleading
                path.with_name(data_name).unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("saved %s%s", path, f" (+ {data_name})" if external_data else "")
    return path


def _refuse_aliasing(model: ir.Model, targets: Sequence[Path]) -> None:
    """Refuse outputs that are the model's source file or a file its tensors read from."""
    protected: list[tuple[Path, str]] = []
    source = model.meta.get(SOURCE_PATH_KEY)
    if source:
        protected.append((Path(os.path.realpath(source)), "the model's source file"))
    protected += [(p, "external data the model reads") for p in external_data_files(model)]
    for target in targets:
        real = Path(os.path.realpath(target))
        for other, what in protected:
            if real == other or (
                real.exists() and other.exists() and os.path.samefile(real, other)
            ):
                raise UnsupportedModelError(
                    f"save: refusing to write '{target}': it is {what} ('{other}'); "
                    "choose another output path"
                )


@contextmanager
def inlined_external_tensors(model: ir.Model) -> Iterator[None]:
    """Temporarily hold ExternalTensors in memory so a single-file save embeds them.

    Serialised as-is they would keep a location relative to their old folder, which is wrong
    next to the new file.
    """
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if isinstance(tensor, ir.ExternalTensor):
                    swapped.append((value, tensor))
                    value.const_value = ir.Tensor(
                        tensor.numpy(),
                        dtype=tensor.dtype,
                        name=tensor.name,
                        metadata_props=dict(tensor.metadata_props),
                    )
        yield
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
