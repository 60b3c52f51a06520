"""Legalisation before Relax import: from what tforge's passes emit to what TVM's ONNX importer takes.

TVM 0.27's ``relax.frontend.onnx.from_onnx`` fails on dynamo exports with a symbolic sequence
length (its ``Range`` conversion loses the symbolic length, then Reshape/Expand fail), and it has
no path for ONNX Runtime's integer operators. So before import:

1. every input gets a static shape (``canonicalize{input-shapes=...}`` on a copy), which with
   ONNX shape inference (data propagation on) and onnxscript's constant folding removes the
   shape subgraphs;
2. tforge's int8 linears (``quantize``'s ``MatMulIntegerToFloat``) become one ``TforgeInt8Linear``
   node (domain ``tforge.tvm``) with the weight pre-packed for VNNI (see ``int8.py``), which the
   backend's own converter imports;
3. every node left must be in the standard domain and known to the importer; the ones that are
   not are named, with their node, in one ``UnsupportedModelError``.

The model given is never modified.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import onnx
import onnx_ir as ir

from tforge.compiler import registry
from tforge.errors import UnsupportedModelError

from .int8 import TFORGE_DOMAIN, lower_int8_linears

logger = logging.getLogger(__name__)

__all__ = ["TFORGE_DOMAIN", "check_importable", "legalize", "shape_text"]


def shape_text(dims: tuple[int, ...] | list[int]) -> str:
    return "x".join(str(d) for d in dims)


def legalize(
    model: ir.Model, input_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A static-shape, importable copy of ``model`` as a ModelProto, and statistics of what was done."""
    model = model.clone()
    model.meta.pop("tforge.calibration", None)
    # the registered pass, by name: the backend asks the pipeline's pass for static shapes
    canonicalize = registry.get_pass_class("canonicalize")
    result = canonicalize(
        input_shapes={name: shape_text(dims) for name, dims in input_shapes.items()}
    )(model)
    stats: dict[str, int] = {f"canonicalize: {k}": v for k, v in result.stats.items()}
    stats.update(lower_int8_linears(model))
    proto = ir.to_proto(model)
    proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    _check_static(proto)
    check_importable(proto)
    return proto, stats


def _check_static(proto: onnx.ModelProto) -> None:
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise UnsupportedModelError(
                f"tvm: input '{value.name}' still has a symbolic dimension after fixing shapes; "
                "give its shape with --input-shape NAME=DIMS"
            )


def check_importable(proto: onnx.ModelProto) -> None:
    """Raise naming every node TVM's importer (plus tforge's own converters) cannot take."""
    from tvm.relax.frontend.onnx import onnx_frontend

    known = set(onnx_frontend._get_convert_map()) | {"Constant", "If"}  # what from_onnx converts
    bad: list[str] = []
    for node in proto.graph.node:
        if node.domain == TFORGE_DOMAIN:
            continue
        if node.domain not in ("", "ai.onnx"):
            bad.append(f"{node.domain}::{node.op_type} (node '{node.name}')")
        elif node.op_type not in known:
            bad.append(f"{node.op_type} (node '{node.name}')")
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise UnsupportedModelError(
            f"tvm: {len(bad)} node(s) cannot be imported into Relax: {shown}; run the model on the "
            "ORT backend, or lower these ops with a pass first"
        )
