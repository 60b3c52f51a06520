"""rotate-residual: turn a decoder's residual stream by an orthogonal matrix, folded into the weights.

With ``Q`` orthogonal (``Q Q^T = I``), the stream ``x`` becomes ``x Q`` everywhere (QuaRot's
R1, Ashkboos et al. 2024). Nothing changes in float:

- the token table ``E`` becomes ``E Q`` (its rows start the stream);
- a linear writing the stream (attention out, FFN down) gets ``W Q`` and its bias ``b Q``;
- an RMSNorm reading the stream commutes with ``Q`` (``||x Q|| = ||x||``) once its gamma is
  moved into the linears it feeds: those get ``Q^T diag(gamma) W`` and gamma becomes ones;
- the LM head: untied, it is such a reader; tied to the table (one copy in the file, which
  ``quantize-weights`` keeps), it reads ``E Q`` transposed, and the final norm's gamma goes into
  one new ``[hidden, hidden]`` linear before it, ``M = Q^T diag(gamma) Q``:
  ``(x/rms) diag(gamma) E^T = (x Q/rms) M (E Q)^T``. The KV cache holds the same keys and values.

What it is for: 4-bit weights. The rows of ``Q^T W`` mix every input channel, so the few
channels with large weights or large activations, which a block of 32 on a 4-bit grid holds
badly, are spread evenly; GPTQ then loses less. On SmolLM2-135M with a KV cache, the decoder
``w4a8`` pipeline (GPTQ, symmetric blocks of 32, every linear and the tied table at 4 bits)
measured perplexity 30.28 with the rotation against 30.75 without (fp32: 27.84; +8.8% against
+10.4%). Round to nearest without GPTQ gets *worse* (SmolLM2's linears alone, in a PyTorch
experiment: +22% -> +74%): the weights lose the block grids they came with. Run it before
``calibrate`` (it changes what the statistics would be) and ``quantize-weights{method=gptq}``.

The rotation is a random-sign Hadamard matrix where :mod:`tforge.passes.math.rotation` builds
one of the width (576, 768, 896, 960, powers of two...), else a random orthogonal matrix; the
report says which. The stream must be closed (:mod:`tforge.compiler.residual_stream`): a model
with LayerNorm, sandwich norms or the hidden states as an output is skipped with the node that
stops it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from tforge.compiler.embeddings import tied_head
from tforge.compiler.pass_infra import Pass, PassResult, Property, SiteStats, Skip
from tforge.compiler.registry import register_pass
from tforge.compiler.residual_stream import ResidualStream, find_residual_stream
from tforge.compiler.rewrite import GraphEditor, bias_input, constant_array, current_weight
from tforge.compiler.structure import Linear, Norm, block_map
from tforge.errors import PassConfigError
from tforge.passes.math import rotation

logger = logging.getLogger(__name__)

__all__ = ["RotateResidual"]


@register_pass("rotate-residual")
@dataclasses.dataclass(frozen=True)
class RotateResidual(Pass):
    """Rotate the residual stream by an orthogonal Q folded into the weights (exact in float)."""

    kind: Literal["hadamard", "random"] = "hadamard"  # hadamard: random signs; random: Haar orthogonal
    seed: int = 0

    requires: ClassVar = frozenset({Property.CANONICAL})
    invalidates: ClassVar = frozenset({Property.CALIBRATED})  # every statistic of the stream turns

    def __post_init__(self) -> None:
        if self.kind not in ("hadamard", "random"):
            raise PassConfigError(f"rotate-residual: kind must be hadamard or random, got {self.kind!r}")

    def run(self, model: ir.Model) -> PassResult:
        stats = SiteStats()
        try:
            stream = find_residual_stream(model, block_map(model))
        except Skip as skip:
            stats.skip(skip)
            logger.info("rotate-residual: skipped: %s (at %s)", skip.reason, skip.at)
            return PassResult(model, changed=False, stats=stats)
        q, what = rotation.rotation(stream.width, self.kind, self.seed)
        editor = GraphEditor(model, self.name)
        details = _rotate(editor, stream, q)
        details["rotation"] = what
        stats["residual stream rotated"] += 1
        stats["linears writing the stream"] += len(stream.writers)
        stats["norms folded"] += len(stream.norms) + 1
        return PassResult(model, changed=True, stats=stats, details=details)


def _rotate(editor: GraphEditor, stream: ResidualStream, q: np.ndarray) -> dict[str, Any]:
    """Fold ``q`` into every weight of ``stream`` (see the module); returns what was done."""
    embedding, head, final = stream.embedding, stream.head, stream.final_norm
    tied = tied_head(embedding, [head]) is not None
    table = (constant_array(embedding.table).astype(np.float64) @ q).astype(np.float32)
    editor.set_constant(embedding.table, [(embedding.gather, 0)], table)
    for lin in stream.writers:
        editor.set_weight(lin, constant_array(current_weight(lin)).astype(np.float64) @ q)
        where = bias_input(lin)
        if where is not None and where[0].inputs[where[1]] is not None:
            node, idx = where
            bias = node.inputs[idx]
            editor.set_constant(bias, [(node, idx)], constant_array(bias).astype(np.float64) @ q)  # type: ignore[arg-type]
    for norm in stream.norms:
        gamma = _gamma_to_ones(editor, norm)
        for lin in norm.linears:
            w = constant_array(current_weight(lin)).astype(np.float64)
            editor.set_weight(lin, q.T @ (gamma[:, None] * w))
    gamma = _gamma_to_ones(editor, final)
    inserted = False
    if tied:
        # the head keeps reading the table's bytes, so the final gamma gets a linear of its own
        editor.set_weight(head, table.T)
        if not np.all(gamma == 1.0):
            _insert_before(editor, head, (q.T * gamma[None, :]) @ q)
            inserted = True
    else:
        w = constant_array(current_weight(head)).astype(np.float64)
        editor.set_weight(head, q.T @ (gamma[:, None] * w))
    return {
        "width": stream.width,
        "stream_values": len(stream.values),
        "writers": [lin.name for lin in stream.writers],
        "norms": [norm.name for norm in [*stream.norms, final]],
        "tied_head": tied,
        "final_gamma_linear": inserted,
    }


def _gamma_to_ones(editor: GraphEditor, norm: Norm) -> np.ndarray:
    """The norm's gamma (float64), which it no longer applies."""
    gamma = constant_array(norm.gamma).astype(np.float64)
    idx = next(i for i, v in enumerate(norm.node.inputs) if v is norm.gamma)
    editor.set_constant(norm.gamma, [(norm.node, idx)], np.ones_like(gamma))
    return gamma


def _insert_before(editor: GraphEditor, head: Linear, matrix: np.ndarray) -> None:
    """A new linear ``x @ matrix`` between the head and its input."""
    source = head.input
    dtype = source.dtype.numpy() if source.dtype is not None else np.dtype(np.float32)
    weight = editor.initializer("rotate_residual.final_gamma", matrix.astype(dtype))
    node = editor.node(
        "MatMul", [source, weight], name="rotate_residual/final_gamma", outputs="rotate_residual.final_gamma_out",
        before=head.matmul, dtype=source.dtype, shape=source.shape,
    )  # fmt: skip
    head.matmul.replace_input_with(0, node.outputs[0])
