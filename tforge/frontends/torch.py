"""Export a PyTorch model (``nn.Module``, ``ExportedProgram`` or saved ``.pt2``) to onnx_ir.

The only exporter is ``torch.onnx.export(dynamo=True, optimize=True)``: it goes through
``torch.export``, so the graph tforge sees is the one every modern PyTorch user gets, and it
returns an ``onnx_ir.Model`` directly, with no round trip through protobuf. torch is imported
inside the function so that ``import tforge`` works on machines without it.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from tforge.errors import UnsupportedModelError
from tforge.runtime.save import SOURCE_PATH_KEY

if TYPE_CHECKING:
    import torch

__all__ = ["from_torch"]

logger = logging.getLogger(__name__)


def from_torch(
    source: torch.nn.Module | torch.export.ExportedProgram | str | os.PathLike[str],
    example_inputs: tuple[Any, ...] | None = None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int | None = None,
) -> ir.Model:
    """Export ``source`` with the dynamo ONNX exporter, or raise ``UnsupportedModelError``.

    ``dynamic_axes`` uses the familiar ``{"input_ids": {0: "batch", 1: "sequence"}}`` form and
    becomes one ``torch.export.Dim`` per name, so axes sharing a name are constrained equal (the
    batch of ``input_ids`` and ``attention_mask``) and the ONNX inputs carry those names as
    symbolic dims. An ExportedProgram already fixed its dynamic dims in ``torch.export``, so
    ``dynamic_axes`` is refused for it rather than silently ignored. A ``forward(a, *rest)``
    takes any number of trailing tensors (name them with ``input_names``), such as a KV cache.
    """
    import torch

    source_path: str | None = None
    if isinstance(source, (str, os.PathLike)):
        source_path = os.fspath(source)
        source = _load_pt2(source_path)
    where = source_path or type(source).__name__

    if isinstance(source, torch.export.ExportedProgram):
        if dynamic_axes:
            raise UnsupportedModelError(
                f"{where}: dynamic_axes cannot change an ExportedProgram, whose dynamic dims were "
                "fixed by torch.export; pass dynamic_shapes to torch.export.export instead"
            )
        if example_inputs is not None:
            logger.warning("%s: example_inputs are ignored for an ExportedProgram", where)
        args: tuple[Any, ...] = ()
        dynamic_shapes = None
    elif isinstance(source, torch.nn.Module):
        if example_inputs is None:
            raise UnsupportedModelError(
                f"{where}: exporting an nn.Module needs example_inputs, a tuple of tensors for "
                "forward(); pass e.g. (input_ids,)"
            )
        args = (
            tuple(example_inputs)
            if isinstance(example_inputs, (tuple, list))
            else (example_inputs,)
        )
        names = (
            list(input_names) if input_names is not None else _forward_arg_names(source, len(args))
        )
        dynamic_shapes = _dynamic_shapes(where, args, names, dynamic_axes) if dynamic_axes else None
        varargs_at = _varargs_position(source)
        if dynamic_shapes is not None and varargs_at is not None and len(args) > varargs_at:
            # torch.export wants the shapes of forward(*args) as one nested tuple
            dynamic_shapes = (*dynamic_shapes[:varargs_at], tuple(dynamic_shapes[varargs_at:]))
    else:
        raise UnsupportedModelError(
            f"{where}: cannot export a {type(source).__name__}; pass an nn.Module, a "
            "torch.export.ExportedProgram or the path of a .pt2 file"
        )

    # Export in eval mode (dropout off, batch-norm statistics frozen) without leaving the
    # caller's module switched.
    was_training = isinstance(source, torch.nn.Module) and source.training
    if was_training:
        logger.info("%s: module is in training mode; exporting it in eval mode", where)
        source.eval()
    try:
        with warnings.catch_warnings():
            # Axes sharing a Dim (the batch of every input) are one symbol; torch warns per reuse.
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
            program = torch.onnx.export(
                source,
                args,
                input_names=list(input_names) if input_names is not None else None,
                output_names=list(output_names) if output_names is not None else None,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    except Exception as err:
        raise UnsupportedModelError(
            f"{where}: torch.onnx.export failed: {_first_line(err)}; fix the model or its "
            "inputs so that torch.export.export succeeds"
        ) from err
    finally:
        if was_training:
            source.train()
    if program is None:  # only the legacy TorchScript path returns None
        raise UnsupportedModelError(f"{where}: torch.onnx.export returned no program")

    model = program.model
    _drop_exporter_debug_metadata(model)
    if source_path is not None:
        model.meta[SOURCE_PATH_KEY] = os.path.realpath(source_path)
    logger.debug(
        "exported %s: %d nodes, inputs %s",
        where,
        len(model.graph),
        [(v.name, str(v.shape)) for v in model.graph.inputs],
    )
    return model


#: the dynamo exporter's debug records on nodes and values: Python stack traces with the exporting
#: machine's file paths, FX node text, module scopes, the export signature of each input (0.3 MB of
#: SmolLM2's 0.5 MB graph, carried into every file compiled from it); nothing in tforge or ONNX
#: Runtime reads them
_EXPORTER_DEBUG_PREFIXES = ("pkg.torch.", "namespace")


def _drop_exporter_debug_metadata(model: ir.Model) -> None:
    graph = model.graph
    nodes = list(ir.traversal.RecursiveGraphIterator(graph))
    values = [*graph.inputs, *graph.outputs, *graph.initializers.values(), *(o for n in nodes for o in n.outputs)]
    for props in [*(node.metadata_props for node in nodes), *(value.metadata_props for value in values)]:
        for key in [k for k in props if k.startswith(_EXPORTER_DEBUG_PREFIXES)]:
            del props[key]


def _load_pt2(path: str) -> torch.export.ExportedProgram:
    """Load a program saved by ``torch.export.save``, with a clear error for a bad file."""
    import torch

    if not os.path.exists(path):
        raise UnsupportedModelError(f"{path}: no such file; check the path to the .pt2 program")
    if os.path.isdir(path):
        raise UnsupportedModelError(
            f"{path}: is a directory; pass the .pt2 file saved by torch.export.save"
        )
    try:
        return torch.export.load(path)
    except Exception as err:
        raise UnsupportedModelError(
            f"{path}: not a loadable ExportedProgram ({_first_line(err)}); save it with "
            "torch.export.save"
        ) from err


def _forward_arg_names(module: torch.nn.Module, count: int) -> list[str]:
    """Names of the first ``count`` positional parameters of ``forward``; they key dynamic_axes."""
    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return params[:count] + [f"input_{i}" for i in range(len(params), count)]


def _varargs_position(module: torch.nn.Module) -> int | None:
    """Index of ``forward``'s ``*args`` among its positional parameters, or None without one."""
    positional = 0
    for p in inspect.signature(module.forward).parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            return positional
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
    return None


def _dynamic_shapes(
    where: str,
    args: tuple[Any, ...],
    names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
) -> tuple[dict[int, Any] | None, ...]:
    """Turn ``{input: {axis: dim_name}}`` into a dynamic_shapes tuple aligned with ``args``."""
    import torch

    unknown = [name for name in dynamic_axes if name not in names[: len(args)]]
    if unknown:
        raise UnsupportedModelError(
            f"{where}: dynamic_axes names input {unknown[0]!r}, which is not one of the inputs "
            f"{list(names[: len(args)])}; use those names or pass input_names"
        )
    dims: dict[str, Any] = {}
    shapes: list[dict[int, Any] | None] = []
    for name, arg in zip(names, args, strict=False):
        axes = dynamic_axes.get(name)
        if not axes:
            shapes.append(None)
            continue
        rank = arg.dim() if isinstance(arg, torch.Tensor) else None
        spec: dict[int, Any] = {}
        for axis, dim_name in axes.items():
            if rank is None or not -rank <= axis < rank:
                raise UnsupportedModelError(
                    f"{where}: dynamic_axes[{name!r}] names axis {axis}, but the example input "
                    f"has rank {rank}; use an axis of the example tensor"
                )
            if not str(dim_name).isidentifier():
                raise UnsupportedModelError(
                    f"{where}: dynamic dim name {dim_name!r} of input {name!r} is not an "
                    "identifier; use names like 'batch' or 'sequence'"
                )
            spec[axis % rank] = dims.setdefault(dim_name, torch.export.Dim(dim_name))
        shapes.append(spec)
    return tuple(shapes)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(err: BaseException) -> str:
    """The first informative line of an exporter error.

    torch.onnx wraps the real cause in a multi-line banner ("Failed to export ... Next steps:")
    followed by an "## Exception summary" section; the line after that heading names the
    actual problem, so it is preferred over the banner.
    """
    lines = [_ANSI.sub("", line).strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line]
    if "## Exception summary" in lines:
        rest = lines[lines.index("## Exception summary") + 1 :]
        if rest:
            return re.sub(r"^<class '([\w.]+)'>", r"\1", rest[0])
    return lines[0].lstrip("#").strip() if lines else type(err).__name__
