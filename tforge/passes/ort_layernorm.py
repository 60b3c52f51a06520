"""ort-layernorm: keep ONNX Runtime on its fast LayerNormalization kernel after a residual add.

ORT's graph optimizer fuses ``Add -> LayerNormalization`` (the residual add in front of a
post-norm LayerNorm, as in BERT) into its ``SkipLayerNormalization`` contrib operator. On the
CPU provider of onnxruntime 1.31 that fused kernel ran 4-5x slower than the two operators it
replaces: 1.1-1.9 ms against 0.27-0.39 ms for one [8, 128, 384] sum and norm, with one or two
threads. In MiniLM's twelve residual norms it was 9% of the fp32 latency at batch 8 x 128 and
more of the int8 latency. ORT matches the op type ``Add`` only, so this pass writes each such
residual add as ``Sum``, the same elementwise sum of two inputs, bit for bit, which ORT leaves
alone. An ``Add`` of a constant (a bias) is not a residual add and stays.

The rewrite targets ORT's CPU provider and belongs at the end of a pipeline: the block map reads
residual adds as ``Add``, so the pass invalidates ``canonical`` and a later pass that needs the
block map is rejected until ``canonicalize`` has turned the ``Sum`` back into an ``Add``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import onnx_ir as ir

from tforge.compiler.pass_infra import Pass, PassResult, Property, SiteStats, Skip
from tforge.compiler.registry import register_pass
from tforge.compiler.rewrite import GraphEditor
from tforge.compiler.structure import const_array

__all__ = ["OrtLayerNorm"]


@register_pass("ort-layernorm")
@dataclasses.dataclass(frozen=True)
class OrtLayerNorm(Pass):
    """Write residual Adds in front of a LayerNormalization as Sum, so ORT keeps its faster unfused kernels."""

    invalidates: ClassVar = frozenset({Property.CANONICAL})

    def run(self, model: ir.Model) -> PassResult:
        stats = SiteStats()
        editor = GraphEditor(model, self.name)
        for node in list(model.graph):
            if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            add = node.inputs[0].producer() if node.inputs[0] is not None else None
            if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
                continue
            try:
                _check_residual(add)
            except Skip as skip:
                stats.skip(skip)
                continue
            editor.retype(add, "Sum")
            stats["residual add written as Sum"] += 1
        return PassResult(model, changed=stats["residual add written as Sum"] > 0, stats=stats)


def _check_residual(add: ir.Node) -> None:
    """Skip unless ``add`` is a residual add that ORT would fuse into SkipLayerNormalization."""
    if any(v is None or const_array(v) is not None for v in add.inputs):
        raise Skip("the add reads a constant (a bias, not a residual)", add)
    out = add.outputs[0]
    if out.is_graph_output() or len(list(out.uses())) != 1:
        raise Skip("the sum is read by more than the LayerNormalization (ORT does not fuse it)", add)
