"""Exact per-channel rescalings of activations, folded into the producer and the readers.

Dividing channel ``j`` of an activation by ``s_j`` and multiplying the matching rows of the
linears that read it changes nothing in float. ``ln-migrate`` (Outlier Suppression) and
``smoothquant`` fold such scales into norms; AWQ-style weight quantization does the same. The
graph side lives here, once: the checks that a norm can absorb a scale, the rewrite of the
norm, its linear readers and its other readers, and the matching update of the attached
calibration statistics (``x / s`` has the statistics of ``x`` rescaled, so a calibrated model
stays calibrated).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from tforge.compiler.calibration import attached_stats
from tforge.compiler.ops import data_uses
from tforge.compiler.pass_infra import Skip
from tforge.compiler.rewrite import GraphEditor, constant_array
from tforge.compiler.structure import Norm, const_array

logger = logging.getLogger(__name__)

__all__ = ["NormScaling", "check_norm_scalable", "scale_norm_output", "scale_stats"]


def check_norm_scalable(norm: Norm) -> np.ndarray:
    """Gamma (float64) when channel scaling can be folded into this norm and its readers; else Skip."""
    if norm.normalizes is not None:
        # QK-norm: its output goes to the attention scores; a scale has no linear to fold into
        raise Skip(f"QK-norm of the {norm.normalizes} projection: no linear reads it", norm.node, blocked=False)
    if norm.follows is not None:
        # x + norm(o(...)) (Gemma 2/3 sandwich, OLMo 2): its reader is the residual add, so a
        # scale has no linear to fold into; the stream it writes is read through the next norm
        raise Skip(
            f"output norm of the {norm.follows} before its residual add: no linear reads it",
            norm.node,
            blocked=False,
        )
    if not norm.linears:
        raise Skip("no linear reads the norm output", norm.node)
    if norm.output.is_graph_output():
        raise Skip("norm output is a graph output", norm.node)
    gamma = const_array(norm.gamma)
    if gamma is None or gamma.ndim != 1 or not np.issubdtype(gamma.dtype, np.floating):
        raise Skip("gamma is not a 1-D float constant", norm.node)
    if any(lin.in_features != gamma.shape[0] for lin in norm.linears):
        raise Skip("a reading linear's width differs from the norm's channels", norm.node)
    if norm.beta is not None:
        beta = const_array(norm.beta)
        if beta is None or beta.shape != gamma.shape:
            raise Skip("beta is not a constant of gamma's shape", norm.node)
    return gamma.astype(np.float64)


@dataclasses.dataclass(frozen=True)
class NormScaling:
    """What :func:`scale_norm_output` did for the norm's non-linear readers."""

    folded: int  # Mul-by-constant readers whose constant absorbed the scale
    reapplied: int  # readers switched to a new Mul(norm_out, scale)


def scale_norm_output(editor: GraphEditor, norm: Norm, scale: np.ndarray) -> NormScaling:
    """Divide the norm's output channel ``j`` by ``scale[j]`` and compensate in every reader.

    gamma and beta are divided by ``scale``; linear readers get their weight rows multiplied by
    it; other readers get it back. Call :func:`check_norm_scalable` first.
    """
    pass_name = editor.pass_name
    scale = np.asarray(scale, np.float64)
    node = norm.node
    gamma_idx = next(i for i, v in enumerate(node.inputs) if v is norm.gamma)
    editor.set_constant(norm.gamma, [(node, gamma_idx)], constant_array(norm.gamma) / scale)
    if norm.beta is not None:
        beta_idx = next(i for i, v in enumerate(node.inputs) if v is norm.beta)
        editor.set_constant(norm.beta, [(node, beta_idx)], constant_array(norm.beta) / scale)
    editor.scale_rows(norm.linears, scale)

    linear_reads = {id(lin.matmul) for lin in norm.linears}
    others = [  # a Shape reader sees no values: the rescaling does not concern it
        (use.node, use.idx)
        for use in data_uses(norm.output)
        if not (id(use.node) in linear_reads and use.idx == 0)
    ]
    folded = 0
    rest: list[tuple[ir.Node, int]] = []
    for reader, idx in others:
        if _fold_into_mul(editor, reader, idx, scale, norm.output):
            folded += 1
        else:
            rest.append((reader, idx))
    if rest:
        dtype = norm.output.dtype.numpy() if norm.output.dtype is not None else np.float32
        factor = editor.initializer(
            f"{norm.gamma.name or 'norm'}.{pass_name}.reapply", scale.astype(dtype)
        )
        mul = editor.node(
            "Mul",
            [norm.output, factor],
            name=f"{node.name or 'norm'}.{pass_name}.reapply",
            outputs=f"{norm.output.name or 'norm_out'}.{pass_name}",
            after=node,
        )
        out = mul.outputs[0]
        out.shape, out.type = norm.output.shape, norm.output.type
        for reader, idx in rest:
            reader.replace_input_with(idx, out)
    return NormScaling(folded=folded, reapplied=len(rest))


def _fold_into_mul(
    editor: GraphEditor, reader: ir.Node, idx: int, scale: np.ndarray, value: ir.Value
) -> bool:
    """``Mul(y, c)`` with a scalar or ``[C]`` constant ``c`` reading ``y / s``: ``c -> c * s``."""
    if reader.op_type != "Mul" or reader.domain not in ("", "ai.onnx") or len(reader.inputs) != 2:
        return False
    other = reader.inputs[1 - idx]
    c = const_array(other)
    if other is None or c is None or other is value:
        return False
    if c.size != 1 and c.shape != scale.shape:
        return False
    if c.size == 1 and (value.shape is None or value.shape.rank() < 1):
        return False  # a scalar would become [C]: only safe when y is known to have channels
    editor.set_constant(other, [(reader, 1 - idx)], c.reshape(-1).astype(np.float64) * scale)
    return True


def scale_stats(model: ir.Model, value_name: str | None, factor: np.ndarray) -> bool:
    """Update attached calibration stats of ``value_name`` to those of ``x * factor``.

    Returns False when there is nothing to update. Stats of another width are stale: they are
    dropped (a later pass then reports them missing) rather than mis-scaled.
    """
    stats = attached_stats(model)
    if stats is None or value_name is None or value_name not in stats:
        return False
    current = stats.stats[value_name]
    if current.channels != factor.shape[0]:
        logger.warning(
            "calibration stats of '%s' have %d channels, expected %d; dropping them",
            value_name, current.channels, factor.shape[0],
        )
        del stats.stats[value_name]
        return False
    stats.stats[value_name] = current.scaled(factor)
    return True
