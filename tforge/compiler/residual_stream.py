"""The residual stream of a pre-norm decoder: every value of it, what writes it, what reads it.

In a pre-norm transformer (LLaMA, Mistral, Qwen, SmolLM) the token embedding starts a stream
of ``hidden``-wide vectors; each sub-block reads it through an RMSNorm and adds a linear's
output back into it; a last RMSNorm feeds the LM head. A rewrite that changes the basis of the
stream (``rotate-residual``: ``x -> x Q``, ``Q`` orthogonal) is exact only if it sees *every*
value of the stream and every node touching one, so the analysis is closed-world: it walks
forward from the embedding's output and accepts only

- the nodes of an RMSNorm over the last axis reading the stream (``||x Q|| = ||x||``: the norm
  commutes with the rotation once its gamma is moved into the linears it feeds),
- a residual ``Add`` of the stream and a linear's output (the writer, read by that Add only),
- a ``Mul`` by a scalar constant (Gemma's embedding scale),

and names the first node that is anything else (a LayerNorm, whose mean subtraction a
rotation does not preserve; a sandwich norm between a linear and its Add; the stream read as a
graph output). :func:`find_residual_stream` raises :class:`Skip` with that node.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from tforge.compiler.embeddings import Embedding, find_embeddings
from tforge.compiler.ops import data_uses, is_default_domain
from tforge.compiler.pass_infra import Skip
from tforge.compiler.rescale import check_norm_scalable
from tforge.compiler.structure import BlockMap, Linear, Norm, const_array, normalises_last_axis

__all__ = ["ResidualStream", "find_residual_stream"]

_MAX_VALUES = 100_000  # a walk that finds more stream values than this has lost its way


@dataclasses.dataclass(eq=False)
class ResidualStream:
    """One residual stream, from its embedding to the norm before the LM head."""

    width: int
    embedding: Embedding
    values: list[ir.Value]  # the embedding's rows and every residual sum (graph order of discovery)
    norms: list[Norm]  # the RMSNorms reading the stream before the blocks' linears
    writers: list[Linear]  # the linears whose outputs the residual Adds add in
    final_norm: Norm  # the norm whose output the LM head alone reads

    @property
    def head(self) -> Linear:
        """The LM head."""
        return self.final_norm.linears[0]


def find_residual_stream(model: ir.Model, blocks: BlockMap) -> ResidualStream:
    """The residual stream of ``model`` (see the module), or :class:`Skip` naming why not."""
    graph = model.graph
    embeddings = find_embeddings(graph)
    if len(embeddings) != 1:
        raise Skip(f"{len(embeddings)} token embeddings (Gather of a constant table by the ids): one starts a stream")
    embedding = embeddings[0]
    width = embedding.shape[1]
    norm_of_node = {id(node): norm for norm in blocks.norms for node in norm.nodes}
    linear_by_output = {id(lin.output): lin for lin in blocks.linears}

    values: list[ir.Value] = []
    norms: list[Norm] = []
    writers: list[Linear] = []
    seen: set[int] = set()
    pending = [embedding.gather.outputs[0]]
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        values.append(value)
        if len(values) > _MAX_VALUES:
            raise Skip("the residual stream walk found too many values", value)
        if value.is_graph_output():
            raise Skip("the residual stream is a graph output (hidden states): a rotation would change it", value)
        for use in data_uses(value):  # a Shape of the stream reads no values: rotation keeps it
            node = use.node
            norm = norm_of_node.get(id(node))
            if norm is not None:
                if norm.input is not value:
                    raise Skip(f"norm {norm.name} reads the residual stream inside its pattern", node)
                if norm not in norms:
                    _check_norm(norm, width)
                    norms.append(norm)
                continue
            if node.op_type == "Add" and is_default_domain(node) and len(node.inputs) == 2:
                other = node.inputs[1 - use.idx]
                if other is not None and id(other) in seen:  # the stream added to itself
                    raise Skip("an Add of two values of the residual stream", node)
                writer = linear_by_output.get(id(other)) if other is not None else None
                if writer is None:
                    raise Skip("a residual Add whose other operand is not a linear's output", node)
                if len(list(writer.output.uses())) != 1 or writer.output.is_graph_output():
                    raise Skip("a linear writing the residual stream is also read elsewhere", writer.matmul)
                if writer.out_features != width:
                    raise Skip(f"a linear writing the residual stream is {writer.out_features} wide, not {width}", writer.matmul)
                writers.append(writer)
                pending.append(node.outputs[0])
                continue
            if node.op_type == "Mul" and len(node.inputs) == 2:
                factor = const_array(node.inputs[1 - use.idx])
                if factor is not None and factor.size == 1:
                    pending.append(node.outputs[0])
                    continue
            raise Skip(f"{node.op_type} node {node.name!r} reads the residual stream", node)

    vocab = embedding.shape[0]
    # the head: the one linear to the vocabulary reading a norm alone, its output the logits (an
    # FFN as wide as the vocabulary reads its norm too, but feeds the next linear)
    heads = [
        norm for norm in norms
        if len(norm.linears) == 1 and norm.linears[0].out_features == vocab and _reaches_output(norm.linears[0].output)
    ]  # fmt: skip
    if len(heads) != 1:
        raise Skip(f"no one linear to the vocabulary ({vocab}) alone reads a norm of the residual stream (the LM head)", embedding.gather)
    norms.remove(heads[0])
    return ResidualStream(width, embedding, values, norms, writers, heads[0])


def _reaches_output(value: ir.Value, limit: int = 4) -> bool:
    """Whether ``value`` is a graph output or becomes one through a few single-reader ops."""
    for _ in range(limit):
        if value.is_graph_output():
            return True
        uses = list(value.uses())
        if len(uses) != 1 or not uses[0].node.outputs:
            return False
        value = uses[0].node.outputs[0]
    return value.is_graph_output()


def _check_norm(norm: Norm, width: int) -> None:
    """Skip unless a rotation of the stream commutes with ``norm`` once its gamma is folded away."""
    if norm.kind != "rms":
        raise Skip("a LayerNorm reads the residual stream: its mean subtraction does not commute with a rotation", norm.node)
    gamma = check_norm_scalable(norm)  # its gamma can move into the linears reading it
    if gamma.shape != (width,) or not normalises_last_axis(norm):
        raise Skip(f"a norm reading the residual stream does not normalise its {width} channels", norm.node)
    readers = {id(use.node) for use in data_uses(norm.output)}
    if readers != {id(lin.matmul) for lin in norm.linears}:
        raise Skip("a norm of the residual stream is read by something other than linears", norm.node)
    if not np.all(np.isfinite(gamma)):
        raise Skip("a norm of the residual stream has a non-finite gamma", norm.node)
