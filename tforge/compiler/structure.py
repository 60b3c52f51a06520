"""The transformer block map: where the norms, attention blocks and FFNs of a graph are.

Found once, from the dataflow of a canonical graph (never from node names), and consumed by
every pass. The anchors are the ops every transformer has:

- a *linear* is ``MatMul(x, W)`` with a constant 2-D ``W``, optionally followed by ``Add(b)``;
- a *norm* is ``LayerNormalization`` or the RMSNorm pattern ``g * (x * 1/sqrt(mean(x^2) + eps))``;
- an *attention* is found from its ``Softmax``: the scores ``MatMul`` before it leads back to the
  query and key linears, the ``MatMul`` after it to the value linear and on to the output linear;
- an *FFN* is a linear whose input is reached from one (up) or two (up, gate) linears through
  elementwise ops only.

Head counts come from the ``Reshape`` that splits a projection's width into heads, read from the
annotated shapes or, failing that, from the constant parts of its target shape. Whatever cannot
be recognised is reported in :attr:`BlockMap.unrecognized` with the node where recognition stopped.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Literal, TypeVar

import numpy as np
import onnx_ir as ir

from tforge.compiler.ops import data_uses
from tforge.compiler.shape_reading import (
    Element,
    const_array,
    elements_at_ones,
    reshape_extents,
    shape_elements,
    static_dims,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: ``model.meta`` key of the cached block map: (graph fingerprint, BlockMap).
BLOCK_MAP_KEY = "tforge.block_map"

# Ops that only move data between layouts; a path through them keeps "which linear it came from".
_LAYOUT_OPS = frozenset(
    {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Tile", "Flatten", "Identity", "Cast"}
)
# Ops whose first input carries the data and whose other inputs are indices or shapes.
_DATA_INPUT_ONLY = frozenset(
    {"Reshape", "Unsqueeze", "Squeeze", "Expand", "Tile", "Slice", "Split", "Gather", "Pad", "Flatten"}
)
_ELEMENTWISE = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Neg", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu",
        "Elu", "LeakyRelu", "HardSigmoid", "HardSwish", "Softplus", "Exp", "Cast", "Identity",
        "Clip", "Where", "Min", "Max", "Abs", "Reciprocal", "Silu", "Mish", "QuickGelu",
    }
)
_ACTIVATIONS = {
    "Gelu": "gelu", "Erf": "gelu", "Tanh": "gelu_tanh", "Sigmoid": "silu", "Relu": "relu",
    "Elu": "elu", "HardSwish": "hardswish", "Softplus": "softplus", "Silu": "silu",
    "Mish": "mish", "QuickGelu": "quick_gelu", "LeakyRelu": "leaky_relu",
}
_COMPARISONS = frozenset({"Less", "LessOrEqual", "Greater", "GreaterOrEqual"})
_MAX_WALK = 400  # nodes visited by one backward walk before giving up


# ----------------------------------------------------------------------------- the map


@dataclasses.dataclass(eq=False)
class Linear:
    """``output = input @ weight (+ bias)`` with constant ``weight`` of shape [in, out]."""

    matmul: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    bias_add: ir.Node | None

    @property
    def input(self) -> ir.Value:
        return self.matmul.inputs[0]  # type: ignore[return-value]

    @property
    def output(self) -> ir.Value:
        return (self.bias_add or self.matmul).outputs[0]

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[0])  # type: ignore[index]

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])  # type: ignore[index]

    @property
    def name(self) -> str:
        return self.weight.name or self.matmul.name or "?"

    def describe(self) -> dict:
        return {
            "name": self.name,
            "node": self.matmul.name,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }


@dataclasses.dataclass(eq=False)
class Norm:
    """A LayerNorm or RMSNorm and what reads its output.

    For ``kind="rms"`` the graph holds the decomposed pattern; :attr:`node` is the final
    ``Mul`` by gamma and :attr:`nodes` lists the whole pattern.
    """

    kind: Literal["layer", "rms"]
    node: ir.Node
    input: ir.Value
    gamma: ir.Value
    beta: ir.Value | None
    epsilon: float
    nodes: list[ir.Node]
    linears: list[Linear] = dataclasses.field(default_factory=list)
    other_consumers: list[ir.Node] = dataclasses.field(default_factory=list)
    #: Set for a QK-norm: the attention projection ("query" or "key") whose output this norm
    #: normalises before the scores (per head, or over the projection's width); None otherwise.
    normalizes: Literal["query", "key"] | None = None
    #: Set for a sub-block's output norm (Gemma 2/3 "sandwich", OLMo 2): the sub-block
    #: ("attention" or "ffn") whose output projection this norm reads, before the residual add
    #: that is its only reader; None otherwise.
    follows: Literal["attention", "ffn"] | None = None

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]

    @property
    def channels(self) -> int | None:
        """The size of the normalised axis (gamma's length), if gamma is a 1-D constant."""
        g = const_array(self.gamma)
        return int(g.shape[0]) if g is not None and g.ndim == 1 else None

    @property
    def name(self) -> str:
        return self.node.name or self.gamma.name or "?"

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The norm of ``x`` over its last axis, in float64 (for constants folded through it)."""
        x = np.asarray(x, np.float64)
        gamma = np.asarray(const_array(self.gamma), np.float64)
        if self.kind == "rms":
            return gamma * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.epsilon)
        centered = x - x.mean(axis=-1, keepdims=True)
        out = gamma * centered / np.sqrt(np.mean(centered * centered, axis=-1, keepdims=True) + self.epsilon)
        beta = const_array(self.beta)
        return out + np.asarray(beta, np.float64) if beta is not None else out

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "node": self.node.name,
            "gamma": self.gamma.name,
            "beta": self.beta.name if self.beta is not None else None,
            "epsilon": self.epsilon,
            "linears": [lin.name for lin in self.linears],
            "other_consumers": [n.name for n in self.other_consumers],
            "normalizes": self.normalizes,
            "follows": self.follows,
        }


@dataclasses.dataclass(eq=False)
class Attention:
    """A multi-head (or grouped-query) attention block.

    ``q``, ``k``, ``v`` are separate linears, or all three are the same fused linear ``qkv``
    whose output is split (``qkv_split`` gives the widths of the three parts).
    ``shape_nodes`` are the Reshape/Expand/Split/Slice nodes on the paths between the
    projections and the output linear: the constants that encode the head count or the width.
    ``q_norm`` / ``k_norm`` are the norms between the query / key projection and the scores
    (QK-norm: Qwen3, Gemma3 and OLMo2 normalise Q and K before rotary): over each head's
    ``head_dim`` channels (``qk_norm_axis == "head_dim"``, gamma shared by every head) or over the
    projection's whole width before the head split (``"width"``, OLMo2). A scale folded into the
    columns of Q or K would be undone by such a norm.
    """

    q: Linear
    k: Linear
    v: Linear
    o: Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    softmax: ir.Node
    scores_matmul: ir.Node
    context_matmul: ir.Node
    causal: bool
    rotary: bool
    shape_nodes: list[ir.Node]
    qkv_split: tuple[int, int, int] | None = None
    q_norm: Norm | None = None
    k_norm: Norm | None = None
    #: A fused QKV output laid out per head, ``[heads, 3, head_dim]`` (GPT-NeoX): reshaped into
    #: heads first, then split into Q, K and V inside each head. ``qkv_split`` then gives the three
    #: total widths, not contiguous column ranges of the fused weight.
    qkv_per_head: bool = False
    #: keys a query attends to when the mask also limits how far back it looks (Gemma 2's local
    #: layers: ``q - window < k <= q``), read from the mask's comparison; None: no such limit found
    sliding_window: int | None = None
    #: A fused QKV output reshaped into head-sized slots (``[..., slots, head_dim]``, or
    #: ``[..., groups, slots, head_dim]``) of which Q, K and V each select some (Falcon: multi-query
    #: ``[heads + 2, head_dim]``, one K and one V slot; the new decoder architecture per KV group
    #: ``[kv_heads, heads / kv_heads + 2, head_dim]``): the slot of each query head, in head order,
    #: then of each KV head for K and for V. Slot ``s`` is columns ``s * head_dim`` to
    #: ``(s + 1) * head_dim`` of the fused linear; ``qkv_split`` gives the three total widths.
    qkv_slots: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None

    @property
    def fused_qkv(self) -> bool:
        return self.q is self.k

    @property
    def qk_norm(self) -> bool:
        return self.q_norm is not None or self.k_norm is not None

    @property
    def qk_norm_axis(self) -> Literal["head_dim", "width"] | None:
        """What the QK-norms normalise over: each head (``head_dim``) or the projection's width."""
        norm = self.q_norm or self.k_norm
        if norm is None:
            return None
        return "head_dim" if norm.channels == self.head_dim else "width"

    @property
    def qkv(self) -> Linear | None:
        return self.q if self.fused_qkv else None

    @property
    def qkv_layout(self) -> Literal["contiguous", "per_head", "head_slots"] | None:
        """How Q, K and V lie in a fused QKV output: three contiguous parts of its last axis,
        per head (``[heads, 3, head_dim]``), or head slots selected after a reshape; None unfused."""
        if not self.fused_qkv:
            return None
        if self.qkv_per_head:
            return "per_head"
        return "head_slots" if self.qkv_slots is not None else "contiguous"

    def describe(self) -> dict:
        return {
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "fused_qkv": self.fused_qkv,
            "qkv_split": list(self.qkv_split) if self.qkv_split else None,
            "qkv_layout": self.qkv_layout,
            "qkv_slots": [list(x) for x in self.qkv_slots] if self.qkv_slots else None,
            "q": self.q.name,
            "k": self.k.name,
            "v": self.v.name,
            "o": self.o.name,
            "causal": self.causal,
            "sliding_window": self.sliding_window,
            "rotary": self.rotary,
            "qk_norm": self.qk_norm_axis,
            "q_norm": self.q_norm.name if self.q_norm else None,
            "k_norm": self.k_norm.name if self.k_norm else None,
            "softmax": self.softmax.name,
            "shape_nodes": [n.name for n in self.shape_nodes],
        }


@dataclasses.dataclass(eq=False)
class FFN:
    """``down(act(up(x)) [* gate...])``; with a gate, ``act`` applies to the gate branch."""

    up: Linear
    gate: Linear | None
    down: Linear
    activation: str
    #: Gate and up fused into one linear (``gate is up``) whose output is cut in two halves by a
    #: Split or two Slices (Phi-3's gate_up_proj): the first column of the gate half and of the
    #: up half. None for separate linears.
    gate_up_halves: tuple[int, int] | None = None

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def fused_gate_up(self) -> bool:
        return self.gate_up_halves is not None

    @property
    def intermediate_size(self) -> int:
        return self.up.out_features // 2 if self.fused_gate_up else self.up.out_features

    def describe(self) -> dict:
        return {
            "gated": self.gated,
            "fused_gate_up": list(self.gate_up_halves) if self.gate_up_halves else None,
            "intermediate_size": self.intermediate_size,
            "activation": self.activation,
            "up": self.up.name,
            "gate": self.gate.name if self.gate else None,
            "down": self.down.name,
        }


NormPlacement = Literal["pre", "post", "sandwich", "output", "none"]


@dataclasses.dataclass(eq=False)
class Block:
    """One transformer layer: attention and FFN with the norms that feed or follow them.

    Pre-norm: ``x + attn(norm1(x))``, then ``h + ffn(norm2(h))``; the norms are those feeding
    attention and FFN. Post-norm (BERT): ``norm1(x + attn(x))``, ``norm2(h + ffn(h))``; the
    norms are those after each residual add. A sub-block may also normalise its own output
    before the residual add, ``x + norm(attn(...))``: ``attention_post_norm`` / ``ffn_post_norm``
    (Gemma 2/3 have them beside the pre-norms, "sandwich"; OLMo 2 has only them, and its
    ``attention_norm`` / ``ffn_norm`` are None). The residual stream is then never normalised,
    so ``pre_norm`` is True. ``residual_adds`` holds the adds found directly after the output
    projection or through such a norm.
    """

    index: int
    attention: Attention | None
    ffn: FFN | None
    attention_norm: Norm | None
    ffn_norm: Norm | None
    residual_adds: list[ir.Node]
    pre_norm: bool
    attention_post_norm: Norm | None = None
    ffn_post_norm: Norm | None = None

    @property
    def norm_placement(self) -> NormPlacement:
        """Where the block's norms sit: ``pre`` (``x + f(norm(x))``), ``post`` (BERT,
        ``norm(x + f(x))``), ``sandwich`` (``x + norm(f(norm(x)))``, Gemma 2/3), ``output``
        (``x + norm(f(x))``, OLMo 2), or ``none``."""
        if not self.pre_norm:
            return "post"
        pre = self.attention_norm is not None or self.ffn_norm is not None
        after = self.attention_post_norm is not None or self.ffn_post_norm is not None
        if after:
            return "sandwich" if pre else "output"
        return "pre" if pre else "none"

    def describe(self) -> dict:
        return {
            "index": self.index,
            "pre_norm": self.pre_norm,
            "norm_placement": self.norm_placement,
            "attention_norm": self.attention_norm.describe() if self.attention_norm else None,
            "attention": self.attention.describe() if self.attention else None,
            "attention_post_norm": self.attention_post_norm.describe() if self.attention_post_norm else None,
            "ffn_norm": self.ffn_norm.describe() if self.ffn_norm else None,
            "ffn": self.ffn.describe() if self.ffn else None,
            "ffn_post_norm": self.ffn_post_norm.describe() if self.ffn_post_norm else None,
            "residual_adds": [n.name for n in self.residual_adds],
        }


@dataclasses.dataclass
class BlockMap:
    """Everything :func:`find_blocks` recognised in one state of a graph.

    Analyses that derive more facts from the map (head layouts, FFN intermediates) keep them in
    :meth:`derived`, so that they too are computed once per state of the graph.
    """

    blocks: list[Block]
    norms: list[Norm]
    linears: list[Linear]
    unrecognized: list[str]
    _derived: dict[object, object] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def derived(self, key: object, compute: Callable[[], T]) -> T:
        """``compute()``, evaluated once for this map and ``key``, then remembered."""
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]  # type: ignore[return-value]

    def describe(self) -> dict:
        in_blocks = {
            id(lin)
            for b in self.blocks
            for lin in _block_linears(b)
        }
        return {
            "num_blocks": len(self.blocks),
            "blocks": [b.describe() for b in self.blocks],
            "norms": [n.describe() for n in self.norms],
            "other_linears": [lin.name for lin in self.linears if id(lin) not in in_blocks],
            "unrecognized": list(self.unrecognized),
        }

    def linear_for(self, matmul: ir.Node) -> Linear | None:
        for lin in self.linears:
            if lin.matmul is matmul:
                return lin
        return None


def _block_linears(block: Block) -> Iterator[Linear]:
    if block.attention:
        a = block.attention
        yield from {id(x): x for x in (a.q, a.k, a.v, a.o)}.values()
    if block.ffn:
        f = block.ffn
        yield from (x for x in (f.up, f.gate, f.down) if x is not None)


# ----------------------------------------------------------------------------- helpers


def nan_guarded_softmax(node: ir.Node) -> ir.Node | None:
    """The Softmax guarded by ``node`` if it is ``Where(IsNaN(p), 0, p)`` on that Softmax's output ``p``.

    torch's SDPA export writes this guard after every attention Softmax: it turns the NaN row of a
    fully ``-inf``-masked query into zeros. Any other ``Where`` (another fill value, another
    condition) returns None.
    """
    if node.op_type != "Where" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 3:
        return None
    cond, fill, probs = node.inputs
    isnan = cond.producer() if cond is not None else None
    softmax = probs.producer() if probs is not None else None
    zero = const_array(fill)
    if (
        isnan is None
        or isnan.op_type != "IsNaN"
        or isnan.inputs[0] is not probs
        or softmax is None
        or softmax.op_type != "Softmax"
        or zero is None
        or zero.size != 1
        or zero.reshape(()) != 0
    ):
        return None
    return softmax


def scalar(value: ir.Value | None) -> float | None:
    """The value of a one-element constant, or None."""
    arr = const_array(value)
    if arr is None or arr.size != 1:
        return None
    return float(arr.reshape(()))


def reshape_target(node: ir.Node) -> list[int | None] | None:
    """Target dims of a Reshape: its integer elements (``-1`` and ``0`` as written), None where
    they are computed at run time from dims not known statically."""
    target = shape_elements(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if target is None else [_integer(e) for e in target]


def _integer(element: Element) -> int | None:
    if isinstance(element, tuple):
        return None if element[1] else element[0]
    return element


def _reshape_dims(node: ir.Node) -> list[list[int | None]]:
    """What a Reshape's output dims are known to be: its annotated dims, its target, and the dims
    its target proves (:func:`~tforge.compiler.shape_reading.reshape_extents`: TorchScript's
    ``view(b, s, heads, -1)`` on ``[?, ?, 192]`` has a last dim of 48, which shape inference may
    not have recorded), those that are known."""
    proven = reshape_extents(node)
    found = [static_dims(node.outputs[0]), reshape_target(node), proven and [_integer(e) for e in proven]]
    return [dims for dims in found if dims]


def _node_label(node: ir.Node | None) -> str:
    if node is None:
        return "graph input"
    return f"{node.op_type} '{node.name}'"


# ----------------------------------------------------------------------------- finding linears & norms


def find_linears(graph: ir.Graph) -> list[Linear]:
    linears = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        weight = node.inputs[1]
        if weight is None or const_array(weight) is None or weight.shape is None or len(weight.shape) != 2:
            continue
        bias, bias_add = None, None
        users = list(node.outputs[0].uses())
        if len(users) == 1 and users[0].node.op_type == "Add" and node.outputs[0] not in graph.outputs:
            add = users[0].node
            other = add.inputs[1 - users[0].idx]
            arr = const_array(other)
            if arr is not None and arr.ndim == 1 and arr.shape[0] == weight.shape[1]:
                bias, bias_add = other, add
        linears.append(Linear(node, weight, bias, bias_add))
    return linears


def _match_rms(mul: ir.Node) -> Norm | None:
    """``gamma * (x * 1/sqrt(mean(x^2) + eps))`` (or ``x / sqrt(...)``), any operand order."""
    if mul.op_type != "Mul":
        return None
    for gi in (0, 1):
        gamma = mul.inputs[gi]
        g = const_array(gamma)
        if g is None or g.ndim != 1:
            continue
        normed = mul.inputs[1 - gi]
        inner = normed.producer() if normed is not None else None
        if inner is None or inner.op_type not in ("Mul", "Div"):
            continue
        for xi in ((0, 1) if inner.op_type == "Mul" else (0,)):
            x, scale = inner.inputs[xi], inner.inputs[1 - xi]
            chain = _rms_scale_chain(scale, x, reciprocal=inner.op_type == "Mul")
            if chain is None:
                continue
            nodes, eps = chain
            return Norm("rms", mul, x, gamma, None, eps, [*nodes, inner, mul])  # type: ignore[arg-type]
    return None


def _rms_scale_chain(scale: ir.Value | None, x: ir.Value | None, *, reciprocal: bool):
    """Match 1/sqrt(mean(x^2)+eps) (reciprocal=True) or sqrt(mean(x^2)+eps)."""
    node = scale.producer() if scale is not None else None
    nodes = []
    if reciprocal:
        if node is None:
            return None
        if node.op_type == "Reciprocal":
            nodes.append(node)
            node = node.inputs[0].producer()
        elif node.op_type == "Div" and scalar(node.inputs[0]) == 1.0:
            nodes.append(node)
            node = node.inputs[1].producer()
        else:
            return None
    if node is None or node.op_type != "Sqrt":
        return None
    nodes.append(node)
    add = node.inputs[0].producer()
    if add is None or add.op_type != "Add":
        return None
    eps = scalar(add.inputs[1]) if scalar(add.inputs[1]) is not None else scalar(add.inputs[0])
    mean = next((i.producer() for i in add.inputs if i is not None and i.producer() is not None), None)
    if eps is None or mean is None or mean.op_type != "ReduceMean":
        return None
    square = mean.inputs[0].producer()
    if square is None:
        return None
    if square.op_type == "Pow" and scalar(square.inputs[1]) == 2.0 and square.inputs[0] is x or square.op_type == "Mul" and square.inputs[0] is x and square.inputs[1] is x:
        pass
    else:
        return None
    return [square, mean, add, *reversed(nodes)], eps


def find_norms(graph: ir.Graph) -> list[Norm]:
    norms = []
    for node in graph:
        if node.op_type == "LayerNormalization":
            gamma = node.inputs[1]
            beta = node.inputs[2] if len(node.inputs) > 2 else None
            if const_array(gamma) is None or (beta is not None and const_array(beta) is None):
                continue
            eps_attr = node.attributes.get("epsilon")
            eps = float(eps_attr.value) if eps_attr is not None else 1e-5
            norms.append(Norm("layer", node, node.inputs[0], gamma, beta, eps, [node]))  # type: ignore[arg-type]
        elif node.op_type in ("RMSNormalization", "SimplifiedLayerNormalization"):
            gamma = node.inputs[1]
            if const_array(gamma) is None:
                continue
            eps_attr = node.attributes.get("epsilon")
            eps = float(eps_attr.value) if eps_attr is not None else 1e-5
            norms.append(Norm("rms", node, node.inputs[0], gamma, None, eps, [node]))  # type: ignore[arg-type]
        else:
            rms = _match_rms(node)
            if rms is not None:
                norms.append(rms)
    return norms


def _attach_consumers(norms: list[Norm], linears_by_input: dict[int, list[Linear]]) -> None:
    for norm in norms:
        for use in norm.output.uses():
            node = use.node
            lin = next((lin for lin in linears_by_input.get(id(norm.output), []) if lin.matmul is node), None)
            if lin is not None:
                norm.linears.append(lin)
            else:
                norm.other_consumers.append(node)


# ----------------------------------------------------------------------------- attention


class _Walk:
    """Backward walk from a value through data-movement and elementwise ops to the linears it came from."""

    def __init__(self, linear_by_output: dict[int, Linear], norm_by_output: dict[int, Norm]) -> None:
        self.linear_by_output = linear_by_output
        self.norm_by_output = norm_by_output
        self.visited: list[ir.Node] = []  # every node the last walk went through
        self.norms_passed: list[Norm] = []  # the projection norms the last walk went through

    def sources(
        self, start: ir.Value, *, through_projection_norms: bool = False
    ) -> tuple[list[Linear], list[ir.Node], str | None]:
        """Linears reached, nodes on the shortest path to the first one, and why it stopped if none.

        A norm output ends the walk (a norm starts a sub-block), except, with
        ``through_projection_norms``, a norm that normalises one linear's output on its way to
        the scores (:func:`projection_norm_source`: the QK-norm of Qwen3, Gemma3, OLMo2): the
        walk goes on from the norm's input, the norm is listed in :attr:`norms_passed` and its
        last node stands for it on the path.
        """
        queue: deque[ir.Value] = deque([start])
        parent: dict[int, ir.Node | None] = {id(start): None}
        found: list[Linear] = []
        first_path: list[ir.Node] = []
        stop_reason = None
        visited = 0
        self.visited = []
        self.norms_passed = []
        while queue:
            value = queue.popleft()
            lin = self.linear_by_output.get(id(value))
            if lin is not None:
                if all(lin is not f for f in found):
                    found.append(lin)
                    if len(found) == 1:
                        first_path = self._path(value, parent)
                continue
            norm = self.norm_by_output.get(id(value))
            if norm is not None:
                if (
                    through_projection_norms
                    and id(norm.input) not in parent
                    and projection_norm_source(norm, self.linear_by_output) is not None
                ):
                    self.norms_passed.append(norm)
                    parent[id(norm.input)] = norm.node
                    queue.append(norm.input)
                    continue
                stop_reason = stop_reason or f"reached a norm output '{value.name}' before any linear"
                continue
            node = value.producer()
            if node is None or value.const_value is not None:
                continue
            visited += 1
            self.visited.append(node)
            if visited > _MAX_WALK:
                stop_reason = f"gave up after {_MAX_WALK} nodes at {_node_label(node)}"
                break
            if node.op_type in ("MatMul", "Softmax", "Gemm", "Conv"):
                stop_reason = stop_reason or f"reached {_node_label(node)} before any linear"
                continue
            if node.op_type == "Shape" or node.op_type == "Range":
                continue
            inputs = node.inputs[:1] if node.op_type in _DATA_INPUT_ONLY else node.inputs
            if node.op_type == "Where":
                inputs = node.inputs[1:]
            for inp in inputs:
                if inp is None or id(inp) in parent or const_array(inp) is not None:
                    continue
                parent[id(inp)] = node
                queue.append(inp)
        return found, first_path, stop_reason

    @staticmethod
    def _path(value: ir.Value, parent: dict[int, ir.Node | None]) -> list[ir.Node]:
        """Nodes from ``value`` (a linear output) forward to the walk's start, via parent links
        (from the output the walk came through: the key's or value's part of a fused Split)."""
        path = []
        node = parent.get(id(value))
        while node is not None:
            path.append(node)
            node = next((parent[id(out)] for out in node.outputs if id(out) in parent), None)
        return path


def projection_norm_source(norm: Norm, linear_by_output: dict[int, Linear]) -> Linear | None:
    """The linear whose output ``norm`` normalises, if it is a projection norm (QK-norm).

    Such a norm reads, through layout ops only (the head split, a transpose), the output of one
    linear; normalises the last axis alone (``LayerNormalization(axis=-1)``, or the RMSNorm
    pattern with ``ReduceMean`` over ``-1``), whose extent divides the linear's width; and no
    linear reads it. A block's pre-norm is read by linears; a post-norm (BERT) reads a residual
    add, not a linear: neither is one.
    """
    if norm.linears or norm.output.is_graph_output():
        return None
    channels = norm.channels
    if channels is None or not normalises_last_axis(norm):
        return None
    dims = static_dims(norm.input)
    if dims is not None and dims and dims[-1] is not None and dims[-1] != channels:
        return None
    value: ir.Value | None = norm.input
    for _ in range(8):
        if value is None:
            return None
        lin = linear_by_output.get(id(value))
        if lin is not None:
            return lin if lin.out_features % channels == 0 else None
        node = value.producer()
        if node is None or node.op_type not in _LAYOUT_OPS - {"Expand", "Tile"}:
            return None
        value = node.inputs[0]
    return None


def normalises_last_axis(norm: Norm) -> bool:
    rank = norm.input.shape.rank() if norm.input.shape is not None else None
    if norm.kind == "layer" or len(norm.nodes) == 1:
        axis = norm.node.attributes.get("axis")
        a = int(axis.value) if axis is not None else -1
        return a == -1 or (rank is not None and a == rank - 1)
    mean = next((n for n in norm.nodes if n.op_type == "ReduceMean"), None)
    if mean is None:
        return False
    keep = mean.attributes.get("keepdims")
    if keep is not None and int(keep.value) == 0:
        return False
    axes_value = mean.inputs[1] if len(mean.inputs) > 1 else None
    axes = const_array(axes_value) if axes_value is not None else None
    if axes is None and "axes" in mean.attributes:
        axes = np.asarray(mean.attributes["axes"].value)
    if axes is None or axes.size != 1:
        return False
    a = int(axes.reshape(()))
    return a == -1 or (rank is not None and a == rank - 1)


def _skip_forward(value: ir.Value, ops: Iterable[str]) -> ir.Value:
    """Follow chains of the given ops forward, each value read (as data) by one node only.

    ``Shape`` readers do not count: TorchScript exports compute a Reshape's target from the
    shape of the very value being reshaped.
    """
    ops = set(ops)
    while True:
        if value.is_graph_output():
            return value
        users = data_uses(value)
        if len(users) != 1 or users[0].node.op_type not in ops:
            return value
        value = users[0].node.outputs[0]


def _scores_matmul(softmax: ir.Node) -> ir.Node | None:
    """The Q @ K^T MatMul feeding a Softmax through scaling / masking ops."""
    queue = deque([softmax.inputs[0]])
    seen = 0
    while queue and seen < 32:
        value = queue.popleft()
        node = value.producer() if value is not None else None
        if node is None:
            continue
        seen += 1
        if node.op_type == "MatMul" and const_array(node.inputs[1]) is None:
            return node
        if node.op_type in ("Add", "Mul", "Div", "Sub", "Where", "Cast", "Identity", "Reshape", "Max", "Min", "Clip", "Tanh"):
            queue.extend(i for i in node.inputs if i is not None and const_array(i) is None)
    return None


def _context_matmul(softmax: ir.Node) -> ir.Node | None:
    """The probs @ V MatMul fed by a Softmax, through NaN guards, casts, dropout or reshapes."""
    frontier = [softmax.outputs[0]]
    for _ in range(8):
        nxt = []
        for value in frontier:
            for use in value.uses():
                node = use.node
                if node.op_type == "MatMul" and use.idx == 0:
                    return node
                if node.op_type in ("Where", "Cast", "Dropout", "Identity", "Reshape", "Mul", "Div"):
                    nxt.append(node.outputs[0])
        frontier = nxt
    return None


def _head_split(path: list[ir.Node], width: int) -> tuple[int, int] | None:
    """(heads, head_dim) from the first Reshape on the path that splits ``width`` into heads."""
    for node in path:
        if node.op_type != "Reshape":
            continue
        for cand in _reshape_dims(node):
            if len(cand) < 3:
                continue
            last = cand[-1]
            if last is None or last <= 0 or width % last != 0:
                continue
            if last == width and cand[-2] != 1:  # one head only when the split says so
                continue
            return width // last, last
    return None


def _per_head_qkv(
    lin: Linear, paths: tuple[list[ir.Node], list[ir.Node], list[ir.Node]], ends: tuple[ir.Value, ir.Value, ir.Value]
) -> tuple[int, int] | None | str:
    """(heads, head_dim) when a fused QKV output is reshaped to ``[..., heads, 3 * head_dim]``
    and then cut in three equal parts of its last axis inside each head, by a Split or by three
    Slices (GPT-NeoX; TorchScript writes its ``chunk(3)`` as Slices); None when the paths do not
    cut a Reshape's heads that way; why not, when they do but unevenly.

    The paths (query, key, value) run from the fused linear's output forward to the scores and
    the context (``ends``, the values the MatMuls read), so the Reshape comes before the cut on
    the query's. A Split whose outputs are not query, key and value in that order (CodeGen's
    query, value, key) is left to :func:`_head_slot_qkv`.
    """
    q_path = paths[0]
    cut_at = next((i for i, n in enumerate(q_path) if n.op_type in ("Split", "Slice")), None)
    if cut_at is None:
        return None
    cut = q_path[cut_at]
    if cut.op_type == "Slice":
        widths = _three_slices_of(cut.inputs[0], paths)
    else:
        widths = _split_widths([cut])
        rank = cut.inputs[0].shape.rank() if cut.inputs[0] is not None and cut.inputs[0].shape is not None else None
        axis_attr = cut.attributes.get("axis")
        axis = int(axis_attr.value) if axis_attr is not None else 0
        if axis != -1 and (rank is None or axis != rank - 1):
            return None
    if widths is None or len(widths) != 3:
        return None
    if cut.op_type == "Split" and [_output_read(cut, p, e) for p, e in zip(paths, ends, strict=True)] != [0, 1, 2]:
        return None  # another order inside each head (CodeGen: query, value, key): read as head slots
    per_head = sum(widths)
    if per_head >= lin.out_features or lin.out_features % per_head:
        return None
    heads = lin.out_features // per_head
    for node in q_path[cut_at + 1 :]:  # the query part must already be one head's columns
        if node.op_type not in ("Reshape", "Transpose", "Identity"):
            break
        if node.op_type == "Reshape":
            again = [cand[-1] for cand in _reshape_dims(node) if cand and cand[-1] not in (-1, 0, None)]
            if again and again[0] != widths[0]:
                return None  # groups of several heads, each part reshaped again into heads: head slots
            break
    for node in q_path[:cut_at]:
        if node.op_type != "Reshape":
            continue
        for cand in _reshape_dims(node):
            if len(cand) >= 3 and cand[-1] == per_head and cand[-2] in (heads, -1, 0, None):
                if len(set(widths)) != 1:
                    return (
                        f"fused QKV linear '{lin.name}' is split per head into unequal parts {widths} "
                        "(a grouped-query per-head layout is not read)"
                    )
                return heads, widths[0]
    return None


def _output_read(node: ir.Node, path: list[ir.Node], end: ir.Value) -> int | None:
    """Which output of ``node`` the path (ending at ``end``) goes on from; None if not on it."""
    at = next((i for i, n in enumerate(path) if n is node), None)
    if at is None:
        return None
    if at + 1 == len(path):
        return next((j for j, out in enumerate(node.outputs) if out is end), None)
    later = path[at + 1]
    return next((j for j, out in enumerate(node.outputs) if out in later.inputs), None)


def _three_slices_of(data: ir.Value | None, paths: tuple[list[ir.Node], ...]) -> list[int] | None:
    """Widths of the query, key and value parts when the first Slice on each path cuts ``data``'s
    last axis (of annotated size) and the three cover it in that order."""
    dims = static_dims(data)
    if data is None or not dims or dims[-1] is None:
        return None
    slices = [next((n for n in path if n.op_type == "Slice"), None) for path in paths]
    if any(s is None or s.inputs[0] is not data for s in slices):
        return None
    return _covering_widths([slice_bounds(s, dims[-1]) for s in slices if s is not None], dims[-1])


# Ops that only select or rearrange elements: a fused QKV output's columns can be followed
# through them by evaluating them on the column indices themselves (see _columns_on_path).
_INDEX_OPS = frozenset(
    {"Reshape", "Transpose", "Slice", "Gather", "GatherND", "Split", "Squeeze", "Unsqueeze",
     "Expand", "Identity", "Flatten"}
)  # fmt: skip


def _columns_on_path(
    lin: Linear, path: list[ir.Node], end: ir.Value, qkv_cut: ir.Node | None = None
) -> np.ndarray | None:
    """Which columns of ``lin``'s output each element of the value on ``path`` holds, evaluated
    on the column indices with every run-time dim (batch, sequence) taken as 1, or, in a
    fixed-shape export, at the static dims its Reshape targets are written for (axes that only
    copy the columns, batch and sequence, are then collapsed to 1 at the end).

    The walk follows the path from the linear while its ops only select or rearrange elements,
    and stops before the first other op, or before one that would move or resize the last axis
    once it has been cut below the linear's width (the head_dim axis: a transpose to K^T, the
    halves of rotary). Two exceptions: ``qkv_cut``, the Split or Slice that cuts Q, K and V apart
    (CodeGen cuts them inside each of its groups, ``[..., groups, 3 * width]``), and a Reshape
    that splits such a part into heads, the heads merged into the groups' axis at once or by
    the next Reshape (CodeGen's groups of several heads). None when a step cannot be evaluated
    from constants.
    """
    if not path or path[0].inputs[0] is not lin.output:
        return None
    rank = lin.output.shape.rank() if lin.output.shape is not None else 2
    lead = [1] * (rank - 1)
    dims = static_dims(lin.output)
    if dims is not None and None not in dims and int(np.prod(dims)) <= _STATIC_COLUMNS_LIMIT:
        lead = [int(d) for d in dims[:-1]]  # a static export's targets hold these dims
    cols = np.broadcast_to(
        np.arange(lin.out_features, dtype=np.int64), [*lead, lin.out_features]
    ).copy()
    merging = False  # the last step cut the last axis in two, and this one must merge the cut-off part
    for i, node in enumerate(path):
        if node.op_type not in _INDEX_OPS or not node.inputs or node.inputs[0] is None:
            break
        later = path[i + 1] if i + 1 < len(path) else None
        out = next(
            (o for o in node.outputs if (later is not None and o in later.inputs) or (later is None and o is end)),
            None,
        )
        if out is None:
            return None
        new = _evaluate_index_op(node, cols, out)
        if new is None:
            return None
        if merging:
            merging = False
            if not (node.op_type == "Reshape" and _merges_heads(cols.shape[:-3], cols.shape[-3:], new.shape)):
                return None  # the cut-off part stays an axis of its own: not one split into heads
        elif cols.shape[-1] < lin.out_features and new.shape[-1] != cols.shape[-1] and node is not qkv_cut:
            if node.op_type != "Reshape" or not 0 < new.shape[-1] < cols.shape[-1]:
                break
            # a part cut inside a group of heads split into them (CodeGen: [..., groups, width]
            # to [..., groups * heads, head_dim], or to [..., groups, heads, head_dim] and merged)
            if new.shape[:-1] == (*cols.shape[:-1], cols.shape[-1] // new.shape[-1]):
                merging = True
            elif not _merges_heads(cols.shape[:-2], (*cols.shape[-2:-1], cols.shape[-1] // new.shape[-1], new.shape[-1]), new.shape):
                break
        if node.op_type == "Transpose" and cols.shape[-1] < lin.out_features:
            perm = node.attributes.get("perm")
            if perm is None or int(perm.value[-1]) != cols.ndim - 1:
                break
        cols = new
    if merging:
        return None
    return _without_copied_axes(cols)


def _merges_heads(lead: tuple[int, ...], split: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether ``shape`` is ``[*lead, groups * heads, head_dim]`` for ``split = (groups, heads,
    head_dim)``: a group's heads merged into the axis of the groups."""
    groups, heads, head_dim = split
    return shape == (*lead, groups * heads, head_dim) and head_dim * heads * groups > 0


#: elements of a fixed-shape linear output evaluated on its column indices (larger: read at 1s)
_STATIC_COLUMNS_LIMIT = 1 << 20


def _without_copied_axes(cols: np.ndarray) -> np.ndarray:
    """``cols`` with every axis but the last along which all entries are equal (batch, sequence:
    copies of the same columns) cut to its first entry, so a fixed-shape export reads like a
    dynamic one evaluated at 1s."""
    for axis in range(cols.ndim - 1):
        if cols.shape[axis] > 1 and np.all(cols == cols.take([0], axis=axis)):
            cols = cols.take([0], axis=axis)
    return cols


def _evaluate_index_op(node: ir.Node, data: np.ndarray, out: ir.Value) -> np.ndarray | None:
    """``node`` applied to ``data`` (its first input) for its output ``out``; None if some
    operand is not a constant or the shapes do not agree. Run-time dims count as 1 (see
    :func:`_evaluated_shape`); the ops other than Reshape, Expand, Flatten and Split are
    :func:`_numpy_op` on the constant operands."""
    op = node.op_type
    try:
        if op in ("Reshape", "Expand"):
            shape = _evaluated_shape(node, data, out)
            if shape is None:
                return None
            return data.reshape(shape) if op == "Reshape" else np.broadcast_to(data, shape)
        if op == "Flatten":
            axis_attr = node.attributes.get("axis")
            axis = int(axis_attr.value) if axis_attr is not None else 1
            axis = axis + data.ndim if axis < 0 else axis
            return data.reshape(int(np.prod(data.shape[:axis])), -1)
        if op == "Split":
            axis_attr = node.attributes.get("axis")
            axis = int(axis_attr.value) if axis_attr is not None else 0
            sizes_arr = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
            if sizes_arr is None and "split" in node.attributes:
                sizes_arr = np.asarray(node.attributes["split"].value)
            n = len(node.outputs)
            sizes = [int(x) for x in sizes_arr.ravel()] if sizes_arr is not None else [data.shape[axis] // n] * n
            bounds = np.cumsum(sizes)[:-1]
            return np.split(data, bounds, axis=axis)[list(node.outputs).index(out)]
    except (ValueError, IndexError, TypeError):
        return None
    operands = [const_array(inp) if inp is not None else None for inp in node.inputs[1:]]
    if any(a is None for a, inp in zip(operands, node.inputs[1:], strict=True) if inp is not None):
        return None  # an operand computed at run time
    return _numpy_op(node, [data, *operands])


def _evaluated_shape(node: ir.Node, data: np.ndarray, out: ir.Value) -> list[int] | None:
    """The target shape of a Reshape or Expand with run-time dims taken as 1: from the output's
    annotated dims, else the target's (:func:`_target_at_ones`; a Reshape's ``0`` copies the
    input's dim and one ``-1`` takes what is left)."""
    dims = static_dims(out)
    target = _target_at_ones(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    rank = len(dims) if dims is not None else len(target) if target is not None else None
    if rank is None:
        return None
    shape: list[int | None] = []
    for i in range(rank):
        known = dims[i] if dims is not None and i < len(dims) else None
        wanted = target[i] if target is not None and i < len(target) else None
        if known is not None:
            shape.append(known)
        elif node.op_type == "Reshape" and wanted == 0 and i < data.ndim:
            shape.append(data.shape[i])
        elif wanted is not None and wanted > 0:
            shape.append(wanted)
        elif node.op_type == "Reshape" and wanted == -1:
            shape.append(None)
        else:
            shape.append(1)
    if shape.count(None) > 1:
        return None
    if None in shape:
        rest = int(np.prod([x for x in shape if x is not None]))
        if rest == 0 or data.size % rest:
            return None
        shape[shape.index(None)] = data.size // rest
    return [int(x) for x in shape]  # type: ignore[arg-type]


def _target_at_ones(target: ir.Value) -> list[int | None] | None:
    """A shape computed at run time, with every run-time dim taken as 1: evaluated in NumPy
    (:func:`_runtime_shape`), else element by element where the shape arithmetic is read
    (:func:`~tforge.compiler.shape_reading.elements_at_ones`: Bloom's dynamo export merges the
    heads into the batch, ``reshape(batch * heads, q_len, head_dim)``, read as 4 heads), None
    elsewhere."""
    computed = _runtime_shape(target)
    if computed is not None:
        return [int(x) for x in computed.ravel()]
    return elements_at_ones(target)


def _runtime_shape(value: ir.Value) -> np.ndarray | None:
    """A shape computed at run time from other tensors' shapes, in NumPy with every run-time dim
    taken as 1: each ``Shape`` it reads gives its tensor's annotated dims (None as 1).

    TorchScript computes ``k.expand(b, s, kv_heads, group, head_dim)`` (Falcon's repeat-KV) from
    the query's shape, through ``Where(Equal(shape, -1), 1, shape)``: the output's annotation
    loses the repeat, and only this evaluation reads it. None when some op or shape is not known.
    """
    env: dict[int, np.ndarray | None] = {}
    queue, seen = deque([value]), 0
    while queue and seen < _MASK_EVAL_NODES:
        node = queue.popleft().producer()
        if node is None or id(node.outputs[0]) in env:
            continue
        seen += 1
        if node.op_type != "Shape":
            queue.extend(i for i in node.inputs if i is not None and const_array(i) is None)
            continue
        dims = static_dims(node.inputs[0])
        if dims is None:
            return None
        start, end = node.attributes.get("start"), node.attributes.get("end")
        ones = np.array([1 if d is None else d for d in dims], dtype=np.int64)
        env[id(node.outputs[0])] = ones[
            int(start.value) if start is not None else 0 : int(end.value) if end is not None else len(dims)
        ]
    return _evaluate_mask(value, env)


def _head_slot_qkv(
    lin: Linear, paths: tuple[list[ir.Node], list[ir.Node], list[ir.Node]], ends: tuple[ir.Value, ir.Value, ir.Value]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int] | None | str:
    """(query slots, key slots, value slots, head_dim) when Q, K and V each select whole
    head-sized slots of a fused QKV output reshaped to ``[..., (groups,) slots, head_dim]``
    (Falcon); None when the paths do not read it that way; why not, when they do but the slots
    do not make a grouped-query attention.

    Each path's columns are evaluated on the column indices (:func:`_columns_on_path`); every
    ``head_dim`` run of them must be one whole slot. Repeated key or value slots (repeat-KV by
    Expand) must repeat each KV head for its group of consecutive query heads.
    """
    per_role: list[list[int]] = []
    head_dim = None
    cuts = _qkv_cuts(paths, ends)
    for path, end, cut in zip(paths, ends, cuts, strict=True):
        cols = _columns_on_path(lin, path, end, cut)
        if cols is None or cols.ndim < 2:
            return None
        d = int(cols.shape[-1])
        if d >= lin.out_features or lin.out_features % d or (head_dim is not None and d != head_dim):
            return None
        head_dim = d
        rows = cols.reshape(-1, d)
        if np.any(rows[:, 0] % d) or np.any(rows - rows[:, :1] != np.arange(d)):
            return None
        per_role.append([int(r) // d for r in rows[:, 0]])
    assert head_dim is not None
    query, key, value = _without_batch_copies(*per_role)
    heads = len(query)
    if len(set(query)) != heads:
        return f"fused QKV linear '{lin.name}': a query slot is read by two query heads"
    kv: list[tuple[int, ...]] = []
    for role, slots in (("key", key), ("value", value)):
        unique = tuple(dict.fromkeys(slots))
        repeated = len(slots) != len(unique)  # repeated to every query head of its group
        if repeated and (
            len(slots) != heads or heads % len(unique) or slots != [unique[h // (heads // len(unique))] for h in range(heads)]
        ):
            return (
                f"fused QKV linear '{lin.name}': the {role} slots {slots} are not repeated "
                "for consecutive groups of query heads"
            )
        kv.append(unique)
    k_slots, v_slots = kv
    everything = [*query, *k_slots, *v_slots]
    if len(k_slots) != len(v_slots) or heads % len(k_slots):
        return (
            f"fused QKV linear '{lin.name}': {heads} query head slots, {len(k_slots)} key and "
            f"{len(v_slots)} value slots do not make a grouped-query attention"
        )
    if sorted(everything) != list(range(lin.out_features // head_dim)):
        return f"fused QKV linear '{lin.name}': the query, key and value slots do not cover its output once each"
    return tuple(query), k_slots, v_slots, head_dim


def _without_batch_copies(query: list[int], key: list[int], value: list[int]) -> tuple[list[int], list[int], list[int]]:
    """The slots each head reads, with the copies of a fixed batch cut off where the export merged
    the batch with the heads into one axis (Bloom at a fixed shape: ``[batch * heads, s, d]``,
    the query slots ``q0 q1 q2 q3 q0 q1 q2 q3`` for batch 2). Distinct query heads never share a
    slot, so a query list that is ``f`` copies of its distinct slots in one order is the batch;
    a key or value list as long (merged with the batch the same way) must be ``f`` copies too
    and is cut the same way; a shorter one had its batch on an axis of its own, already cut.
    Unchanged otherwise."""
    distinct = len(dict.fromkeys(query))
    copies = len(query) // distinct if distinct else 0
    if copies < 2 or len(query) != copies * distinct or query != query[:distinct] * copies:
        return query, key, value
    cut = []
    for slots in (key, value):
        if len(slots) == len(query):
            if slots != slots[:distinct] * copies:
                return query, key, value
            slots = slots[:distinct]
        cut.append(slots)
    return query[:distinct], cut[0], cut[1]


def _qkv_cuts(paths: tuple[list[ir.Node], ...], ends: tuple[ir.Value, ...]) -> list[ir.Node | None]:
    """The node on each of the query, key and value paths that cuts them apart: one Split all
    three read different outputs of, or three Slices of one value; Nones when there is none."""
    split = next((n for n in paths[0] if n.op_type == "Split"), None)
    if split is not None:
        read = [_output_read(split, path, end) for path, end in zip(paths, ends, strict=True)]
        if None not in read and len(set(read)) == 3:
            return [split] * 3
    slices = [next((n for n in path if n.op_type == "Slice"), None) for path in paths]
    data = {id(s.inputs[0]) for s in slices if s is not None}
    if None not in slices and len(data) == 1 and len(set(map(id, slices))) == 3:
        return slices
    return [None] * 3


def _split_widths(path: list[ir.Node]) -> list[int] | None:
    for node in path:
        if node.op_type == "Split":
            arr = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if arr is not None:
                return [int(x) for x in arr.ravel()]
            widths = [static_dims(o) for o in node.outputs]
            if all(w and w[-1] for w in widths):
                return [int(w[-1]) for w in widths]  # type: ignore[index]
    return None


def slice_bounds(node: ir.Node, width: int) -> tuple[int, int] | None:
    """(start, end) of a ``Slice`` of the last axis, ``width`` long, with constant bounds and step 1.

    Bounds are clamped to the axis (``end`` may be INT64_MAX, "to the end"); None for any other
    Slice (another axis, a step, bounds computed at run time).
    """
    if node.op_type != "Slice" or len(node.inputs) < 3:
        return None
    parts = [const_array(v) if v is not None else None for v in node.inputs[1:5]]
    starts, ends = parts[0], parts[1]
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    rank = node.inputs[0].shape.rank() if node.inputs[0] is not None and node.inputs[0].shape is not None else None
    if len(parts) > 2 and node.inputs[3] is not None:
        axes = parts[2]
        if axes is None or axes.size != 1:
            return None
        axis = int(axes.reshape(()))
        if axis != -1 and (rank is None or axis != rank - 1):
            return None
    elif rank != 1:
        return None
    step = parts[3] if len(parts) > 3 and node.inputs[4] is not None else np.ones(1)
    if step is None or step.size != 1 or int(step.reshape(())) != 1:
        return None

    def clamp(x: int) -> int:
        x = x + width if x < 0 else x
        return min(max(x, 0), width)

    return clamp(int(starts.reshape(()))), clamp(int(ends.reshape(())))


def _slice_widths(lin: Linear, *paths: list[ir.Node]) -> list[int] | None:
    """Widths of Q, K and V when each path leaves the fused linear by one Slice of its last axis
    and the three slices cover it in that order (Phi-3's qkv_proj)."""
    bounds = []
    for path in paths:
        first = path[0] if path else None
        if first is None or first.inputs[0] is not lin.output:
            return None
        bounds.append(slice_bounds(first, lin.out_features))
    return _covering_widths(bounds, lin.out_features)


def _covering_widths(bounds: list[tuple[int, int] | None], width: int) -> list[int] | None:
    """Widths of three (start, end) parts of an axis ``width`` long when they cover it, each part
    non-empty, in order; None for anything else."""
    if len(bounds) != 3 or any(b is None for b in bounds):
        return None
    (q0, q1), (k0, k1), (v0, v1) = bounds  # type: ignore[misc]
    if q0 != 0 or k0 != q1 or v0 != k1 or v1 != width or not q0 < q1 < k1 < v1:
        return None
    return [q1 - q0, k1 - k0, v1 - v0]


def _depends_on(value: ir.Value, predicate, limit: int = 200) -> bool:
    queue, seen = deque([value]), set()
    while queue and len(seen) < limit:
        v = queue.popleft()
        node = v.producer() if v is not None else None
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if predicate(node):
            return True
        queue.extend(i for i in node.inputs if i is not None)
    return False


def _is_causal(scores: ir.Node, softmax: ir.Node) -> bool:
    """A causal mask compares two position ranges (query index >= key index) or uses Trilu."""

    def causal_op(node: ir.Node) -> bool:
        if node.op_type == "Trilu":
            return True
        if node.op_type in _COMPARISONS:
            return all(i is not None and _depends_on(i, _is_position_range, limit=30) for i in node.inputs)
        return False

    return any(_depends_on(m, causal_op, limit=400) for m in _mask_operands(scores, softmax))


def _is_position_range(node: ir.Node) -> bool:
    return node.op_type in ("Range", "CumSum")


def _sliding_window(scores: ir.Node, softmax: ir.Node) -> int | None:
    """The window ``w`` of a mask that also compares a key position with ``query position - w``
    (``k > q - w``, as ``transformers`` writes a sliding window): ``Sub(positions, w)`` or
    ``Add(positions, -w)`` with a positive scalar constant ``w`` beside a position range."""
    found: list[int] = []

    def window_op(node: ir.Node) -> bool:
        if node.op_type not in _COMPARISONS:
            return False
        for side in node.inputs:
            shifted = side.producer() if side is not None else None
            if shifted is None or shifted.op_type not in ("Sub", "Add") or len(shifted.inputs) != 2:
                continue
            offset = scalar(shifted.inputs[1])
            base = shifted.inputs[0]
            if offset is None or base is None or not _depends_on(base, _is_position_range, limit=30):
                continue
            window = offset if shifted.op_type == "Sub" else -offset
            others = [i for i in node.inputs if i is not side]
            if window > 0 and float(window).is_integer() and all(
                i is not None and _depends_on(i, _is_position_range, limit=30) for i in others
            ):
                found.append(int(window))
                return True
        return False

    for mask in _mask_operands(scores, softmax):
        if _depends_on(mask, window_op, limit=400):
            return found[-1]
    return None


def _mask_operands(scores: ir.Node, softmax: ir.Node) -> list[ir.Value]:
    """The non-constant operands added to the scores between their MatMul and the Softmax."""
    return [value for value, _ in _mask_operands_with_polarity(scores, softmax) if const_array(value) is None]


# A mask entry at or below this blocks its key: exporters write -inf, finfo(float32).min, or
# -10000 (older BERT exports); an ALiBi or relative-position bias stays far above it.
_MASKED_BELOW = -1e4
_MASK_EVAL_NODES = 64  # nodes evaluated to read one static mask
_MASK_EVAL_ELEMENTS = 1 << 24  # largest tensor evaluated on the way


def _static_mask_pattern(scores: ir.Node, softmax: ir.Node) -> tuple[bool, int | None]:
    """(causal, window) read from the values of a mask that fixed-shape exports fold into
    constants: which keys each query may not attend to, evaluated for an unpadded input (every
    graph input the mask is built from, the padding mask, set to ones).

    Causal: every key after the query is blocked, and the query's own position is not. Window
    ``w``: each query attends to the contiguous keys ``q - w < k <= q``, and some query is cut
    by it (at a fixed sequence length shorter than the window nothing shows it). Offsets by a
    longer key axis (keys ``Sk - Sq`` ahead, a static past) count from the last key. (False,
    None) when the mask cannot be evaluated or is neither.
    """
    dims = static_dims(scores.outputs[0])
    if dims is None or len(dims) < 2 or dims[-1] is None or dims[-2] is None:
        return False, None
    sq, sk = dims[-2], dims[-1]
    if sq < 2 or sk < sq:
        return False, None
    blocked: np.ndarray | None = None
    env: dict[int, np.ndarray | None] = {}
    for operand, keep_when_true in _mask_operands_with_polarity(scores, softmax):
        values = _evaluate_mask(operand, env)
        if values is None or values.ndim < 2 or values.shape[-1] not in (1, sk) or values.shape[-2] not in (1, sq):
            return False, None
        if values.dtype == np.bool_:
            if keep_when_true is None:
                return False, None
            cut = ~values if keep_when_true else values
        else:
            cut = values <= _MASKED_BELOW
        cut = np.broadcast_to(cut, cut.shape[:-2] + (sq, sk))
        cut = cut.reshape(-1, sq, sk).any(axis=0)  # blocked in any batch row or head
        blocked = cut if blocked is None else blocked | cut
    if blocked is None:
        return False, None
    offset = sk - sq
    last = np.arange(sq)[:, None] + offset  # each query's own key position
    keys = np.arange(sk)[None, :]
    if not (np.all(blocked[keys > last]) and not np.any(blocked[np.arange(sq), last[:, 0]])):
        return False, None
    window: int | None = None
    for q in range(sq):
        allowed = np.flatnonzero(~blocked[q])
        own = q + offset
        if allowed.size != allowed[-1] - allowed[0] + 1:
            return True, None  # keys skipped inside the row: not a window
        if allowed[0] > 0:
            w = own - int(allowed[0]) + 1
            if window is not None and w != window:
                return True, None
            window = w
    if window is not None and any(q + offset + 1 > window for q in range(sq) if not blocked[q, 0]):
        return True, None
    return True, window


def _mask_operands_with_polarity(scores: ir.Node, softmax: ir.Node) -> list[tuple[ir.Value, bool | None]]:
    """Every operand, constant or not, combined with the scores between their MatMul and the
    Softmax that is not a scalar (the scale, a soft cap): the additive masks, and the boolean
    condition of a ``Where`` that picks between the scores and a fill (True keeps the scores when
    they are its second input). The bool is None for an operand of any other op."""
    between = deque([softmax.inputs[0]])
    found: list[tuple[ir.Value, bool | None]] = []
    seen = set()
    while between:
        value = between.popleft()
        node = value.producer() if value is not None else None
        if node is None or node is scores or id(node) in seen:
            continue
        seen.add(id(node))
        for index, inp in enumerate(node.inputs):
            if inp is None:
                continue
            if const_array(inp) is None and _depends_on(inp, lambda n: n is scores, limit=16):
                between.append(inp)
                continue
            dims = static_dims(inp)
            if const_array(inp) is not None and (dims is None or len(dims) < 2 or all(d == 1 for d in dims[-2:])):
                continue  # a scale, a cap, a fill value
            keep = None
            if node.op_type == "Where" and index == 0:
                keep = node.inputs[1] is not None and _depends_on(node.inputs[1], lambda n: n is scores, limit=16)
            found.append((inp, keep))
    return found


def _evaluate_mask(value: ir.Value, env: dict[int, np.ndarray | None], budget: list[int] | None = None) -> np.ndarray | None:
    """``value`` computed in NumPy from constants, with graph inputs of static shape set to ones;
    None if it needs anything else (an op not handled here, a dynamic shape, too many nodes)."""
    budget = budget if budget is not None else [_MASK_EVAL_NODES]
    if id(value) in env:
        return env[id(value)]
    arr = const_array(value)
    if arr is None:
        node = value.producer()
        if node is None:
            dims = static_dims(value)
            if not value.is_graph_input() or dims is None or None in dims or value.dtype is None:
                arr = None
            else:
                arr = np.ones(dims, dtype=value.dtype.numpy())  # type: ignore[arg-type]
        elif budget[0] <= 0:
            arr = None
        else:
            budget[0] -= 1
            inputs = []
            for inp in node.inputs:
                if inp is None:
                    inputs.append(None)
                    continue
                got = _evaluate_mask(inp, env, budget)
                if got is None:
                    env[id(value)] = None
                    return None
                inputs.append(got)
            arr = _numpy_op(node, inputs)
            if arr is not None and arr.size > _MASK_EVAL_ELEMENTS:
                arr = None
    env[id(value)] = arr
    return arr


_NUMPY_BINARY = {
    "And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor, "Add": np.add,
    "Sub": np.subtract, "Mul": np.multiply, "Min": np.minimum, "Max": np.maximum, "Equal": np.equal,
    "Less": np.less, "LessOrEqual": np.less_equal, "Greater": np.greater,
    "GreaterOrEqual": np.greater_equal,
}  # fmt: skip


def _numpy_op(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray | None:
    """One op computed in NumPy on its evaluated inputs (None: an absent optional input), for a
    mask's computation (:func:`_evaluate_mask`) and the selections :func:`_evaluate_index_op`
    traces; None for an op not handled here or operands it cannot take."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None

    def attr(name: str, default: object = None) -> object:
        a = node.attributes.get(name)
        return a.value if a is not None else default

    try:
        x = inputs[0] if inputs else None
        if op in _NUMPY_BINARY and len(inputs) == 2 and x is not None and inputs[1] is not None:
            return np.asarray(_NUMPY_BINARY[op](x, inputs[1]))
        if x is None:
            return None
        if op == "Where" and len(inputs) == 3 and inputs[1] is not None and inputs[2] is not None:
            return np.where(x, inputs[1], inputs[2])
        if op == "Not":
            return np.logical_not(x)
        if op == "Neg":
            return -x
        if op in ("Identity",):
            return x
        if op == "Cast":
            return x.astype(ir.DataType(int(attr("to"))).numpy())  # type: ignore[arg-type]
        if op == "Concat" and all(i is not None for i in inputs):
            return np.concatenate(inputs, axis=int(attr("axis", 0)))  # type: ignore[arg-type]
        if op == "ConstantOfShape":
            fill = node.attributes.get("value")
            fill_value = fill.value.numpy().reshape(()) if fill is not None else np.float32(0)
            return np.full(tuple(int(d) for d in x), fill_value)
        if op == "Transpose":
            perm = attr("perm")
            return np.transpose(x, [int(p) for p in perm] if perm is not None else None)  # type: ignore[union-attr]
        if op == "Expand" and inputs[1] is not None:
            shape = np.broadcast_shapes(x.shape, tuple(int(d) for d in inputs[1]))
            return np.broadcast_to(x, shape)
        if op == "Reshape" and inputs[1] is not None:
            target = [int(d) for d in inputs[1]]
            target = [x.shape[i] if d == 0 and not attr("allowzero", 0) else d for i, d in enumerate(target)]
            return x.reshape(target)
        if op in ("Unsqueeze", "Squeeze"):
            axes = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attr("axes")
            if axes is None:
                return np.squeeze(x) if op == "Squeeze" else None
            axes = [int(a) for a in np.asarray(axes).ravel()]
            if op == "Squeeze":
                return np.squeeze(x, axis=tuple(axes))
            rank = x.ndim + len(axes)
            return np.expand_dims(x, tuple(a + rank if a < 0 else a for a in axes))
        if op == "Slice":
            starts, ends = inputs[1], inputs[2]
            axes = inputs[3] if len(inputs) > 3 and inputs[3] is not None else np.arange(len(starts))  # type: ignore[arg-type]
            steps = inputs[4] if len(inputs) > 4 and inputs[4] is not None else np.ones(len(axes), np.int64)
            index: list[slice] = [slice(None)] * x.ndim
            for a, b, e, st in zip(axes, starts, ends, steps, strict=True):  # type: ignore[arg-type]
                index[int(a)] = slice(int(b), int(e), int(st))
            return x[tuple(index)]
        if op == "Gather" and inputs[1] is not None:
            return np.take(x, inputs[1].astype(np.int64), axis=int(attr("axis", 0)))  # type: ignore[arg-type]
        if op == "GatherND" and inputs[1] is not None and int(attr("batch_dims", 0)) == 0:  # type: ignore[arg-type]
            idx = inputs[1].astype(np.int64)
            return x[tuple(idx[..., j] for j in range(idx.shape[-1]))]
    except (ValueError, IndexError, TypeError, KeyError):
        return None
    return None


def _find_attention(
    softmax: ir.Node, walk: _Walk, linears_by_input: dict[int, list[Linear]]
) -> Attention | str:
    where = _node_label(softmax)
    scores = _scores_matmul(softmax)
    if scores is None:
        return f"{where}: no Q @ K^T MatMul found before it"
    context = _context_matmul(softmax)
    if context is None:
        return f"{where}: no probs @ V MatMul found after it"
    q_lins, q_path, q_why = walk.sources(scores.inputs[0], through_projection_norms=True)
    q_norms = list(walk.norms_passed)
    # Rotary embedding: rotate_half negates one half of each head (Neg), or a fused op.
    rotary = any(n.op_type in ("Neg", "RotaryEmbedding") for n in walk.visited)
    k_lins, k_path, k_why = walk.sources(scores.inputs[1], through_projection_norms=True)
    k_norms = list(walk.norms_passed)
    v_lins, v_path, v_why = walk.sources(context.inputs[1])
    for role, lins, why, node in (
        ("query", q_lins, q_why, scores),
        ("key", k_lins, k_why, scores),
        ("value", v_lins, v_why, context),
    ):
        if len(lins) != 1:
            found = ", ".join(lin.name for lin in lins) or "none"
            return (
                f"{where}: the {role} input of {_node_label(node)} does not come from exactly one "
                f"linear (found: {found}){'; ' + why if why and not lins else ''}"
            )
    q, k, v = q_lins[0], k_lins[0], v_lins[0]
    # The output projection: the linear reading the context after it is merged back from heads.
    merged = _skip_forward(context.outputs[0], _LAYOUT_OPS)
    o = next((lin for lin in linears_by_input.get(id(merged), [])), None)
    if o is None:
        users = ", ".join(_node_label(u.node) for u in data_uses(merged)) or "nothing"
        return f"{where}: no output linear reads the attention context (it feeds {users})"
    fused = q is k
    qkv_split = None
    per_head = None
    slots: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None
    if fused:
        if v is not q:
            return f"{where}: query and key come from fused linear '{q.name}' but value from '{v.name}'"
        ends = (scores.inputs[0], scores.inputs[1], context.inputs[1])
        per_head = _per_head_qkv(q, (q_path, k_path, v_path), ends)
        if isinstance(per_head, str):
            return f"{where}: {per_head}"
        widths = _split_widths(q_path) or _split_widths(k_path) or _slice_widths(q, q_path, k_path, v_path)
        if per_head is not None:
            heads, head_dim = per_head
            widths = [heads * head_dim] * 3
        elif widths is None or sum(widths) != q.out_features:
            # head slots (Falcon), or parts cut inside groups of the output and reshaped into
            # heads (CodeGen's [..., 4, 3 * width / 4] cut in query, value, key): read by
            # replaying the index ops on the column numbers
            found = _head_slot_qkv(q, (q_path, k_path, v_path), ends)
            if isinstance(found, str):
                return f"{where}: {found}"
            if found is not None:
                q_slots, k_slots, v_slots, head_dim = found
                slots = (q_slots, k_slots, v_slots)
                widths = [len(q_slots) * head_dim, len(k_slots) * head_dim, len(v_slots) * head_dim]
        if widths is None or len(widths) != 3:
            return (
                f"{where}: fused QKV linear '{q.name}' is not split into three parts by a Split "
                f"or by three Slices of its last axis (query, key, value in that order)"
            )
        if sum(widths) != q.out_features:
            # A Split of a reshaped output (CodeGen's [..., groups, 3 * width] cut per group)
            # whose reshape was not read: its widths are not the linear's, and a map built on
            # them would be wrong.
            return (
                f"{where}: fused QKV linear '{q.name}' ({q.out_features} wide) is cut into parts "
                f"{widths} that do not cover its output"
            )
        qkv_split = (widths[0], widths[1], widths[2])
        q_width, k_width = widths[0], widths[1]
    else:
        q_width, k_width = q.out_features, k.out_features
    q_heads = per_head or _head_split(q_path, q_width)
    if slots is not None:
        q_heads = (len(slots[0]), q_width // len(slots[0]))
    if q_heads is None:
        return f"{where}: no Reshape splits the query projection '{q.name}' ({q_width} wide) into heads"
    num_heads, head_dim = q_heads
    if k_width % head_dim:
        return f"{where}: key width {k_width} is not a multiple of head_dim {head_dim}"
    num_kv_heads = k_width // head_dim
    if num_heads % num_kv_heads:
        return f"{where}: {num_heads} query heads cannot share {num_kv_heads} KV heads evenly"
    norms: dict[str, Norm | None] = {}
    for role, passed, lin, width in (("query", q_norms, q, q_width), ("key", k_norms, k, k_width)):
        found_norm = _qk_norm(role, passed, lin, width, head_dim, walk)
        if isinstance(found_norm, str):
            return f"{where}: {found_norm}"
        norms[role] = found_norm
    shape_ops = {"Reshape", "Expand", "Split", "Slice", "Tile", "Concat"}
    shape_nodes: dict[int, ir.Node] = {}
    for node in [*q_path, *k_path, *v_path]:
        if node.op_type in shape_ops:
            shape_nodes[id(node)] = node
    value = context.outputs[0]
    while value is not merged:
        node = data_uses(value)[0].node
        if node.op_type in shape_ops:
            shape_nodes[id(node)] = node
        value = node.outputs[0]
    causal, window = _is_causal(scores, softmax), _sliding_window(scores, softmax)
    if not causal:  # a fixed-shape export folds its mask into constants: read their values
        causal, window = _static_mask_pattern(scores, softmax)
    return Attention(
        q=q, k=k, v=v, o=o,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        softmax=softmax, scores_matmul=scores, context_matmul=context,
        causal=causal, rotary=rotary, sliding_window=window,
        shape_nodes=list(shape_nodes.values()), qkv_split=qkv_split,
        q_norm=norms["query"], k_norm=norms["key"], qkv_per_head=per_head is not None, qkv_slots=slots,
    )


def _qk_norm(
    role: Literal["query", "key"], passed: list[Norm], lin: Linear, width: int, head_dim: int, walk: _Walk
) -> Norm | None | str:
    """The one QK-norm the walk to the ``role`` projection went through (None if none), or why not.

    It must normalise that projection's output, over each head (``head_dim`` channels) or over
    the projection's part of the width (``width`` channels, before the head split).
    """
    if not passed:
        return None
    if len(passed) > 1:
        names = ", ".join(f"'{n.name}'" for n in passed)
        return f"the {role} passes through {len(passed)} norms ({names}) on its way to the scores"
    norm = passed[0]
    if projection_norm_source(norm, walk.linear_by_output) is not lin:
        return f"the {role} norm '{norm.name}' does not normalise the {role} projection '{lin.name}'"
    if norm.channels not in (head_dim, width):
        return (
            f"the {role} norm '{norm.name}' normalises {norm.channels} channels, neither head_dim "
            f"{head_dim} nor the {role} width {width}"
        )
    if norm.channels == width and lin.out_features != width:
        return f"the {role} norm '{norm.name}' normalises the {role} part of a fused projection"
    return norm


# ----------------------------------------------------------------------------- FFN


def _find_ffn(down: Linear, walk: _Walk) -> FFN | None:
    """``down``'s input reached through elementwise ops from one or two linears sharing an input."""
    queue = deque([down.input])
    seen: set[int] = set()
    reached: list[Linear] = []
    activations: list[str] = []
    activation_inputs: list[ir.Value] = []
    halves: dict[int, tuple[Linear, int, int]] = {}  # value -> (fused linear, start, end)
    gate_of: dict[int, bool] = {}
    steps = 0
    while queue and steps < 64:
        value = queue.popleft()
        lin = walk.linear_by_output.get(id(value))
        if lin is not None:
            if all(lin is not r for r in reached):
                reached.append(lin)
            continue
        part = _linear_part(value, walk.linear_by_output)
        if part is not None:
            halves[id(value)] = part
            continue
        node = value.producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        steps += 1
        if node.op_type in ("Reshape", "Flatten", "Identity"):
            # Conv1D-style exports (GPT-2) flatten to 2-D around each linear
            queue.append(node.inputs[0])  # type: ignore[arg-type]
            continue
        if node.op_type not in _ELEMENTWISE:
            return None
        if node.op_type in _ACTIVATIONS:
            activations.append(_activation_name(node))
            activation_inputs.append(node.inputs[0])  # type: ignore[arg-type]
            # which linear does the activation sit on: that one is the gate (or the only up)
            src, _, _ = walk.sources(node.inputs[0])
            for s in src:
                gate_of[id(s)] = True
        queue.extend(i for i in node.inputs if i is not None and const_array(i) is None)
    if not activations:
        return None
    activation = activations[0]
    if activation == "gelu_tanh" and "Pow" not in {n.op_type for n in producers(down.input, 40)}:
        activation = "tanh"
    if halves:
        return _fused_gate_up(down, reached, halves, activation_inputs, activation)
    if not 1 <= len(reached) <= 2:
        return None
    if len(reached) == 1:
        return FFN(up=reached[0], gate=None, down=down, activation=activation)
    a, b = reached
    if a.input is not b.input or a.out_features != b.out_features:
        return None
    gate, up = (a, b) if gate_of.get(id(a)) and not gate_of.get(id(b)) else (b, a)
    if not gate_of.get(id(gate)):
        return None
    return FFN(up=up, gate=gate, down=down, activation=activation)


def _linear_part(value: ir.Value, linear_by_output: dict[int, Linear]) -> tuple[Linear, int, int] | None:
    """(linear, start, end) when ``value`` is a contiguous part of a linear's output along its
    last axis: an output of a Split of that axis, or a Slice of it with constant bounds."""
    node = value.producer()
    if node is None or node.op_type not in ("Split", "Slice") or node.inputs[0] is None:
        return None
    lin = linear_by_output.get(id(node.inputs[0]))
    if lin is None:
        return None
    width = lin.out_features
    if node.op_type == "Slice":
        bounds = slice_bounds(node, width)
        return (lin, *bounds) if bounds is not None and bounds[0] < bounds[1] else None
    rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
    axis_attr = node.attributes.get("axis")
    axis = int(axis_attr.value) if axis_attr is not None else 0
    if axis != -1 and (rank is None or axis != rank - 1):
        return None
    widths = _split_widths([node])
    if widths is None and width % len(node.outputs) == 0:
        widths = [width // len(node.outputs)] * len(node.outputs)
    if widths is None or sum(widths) != width:
        return None
    index = next(i for i, out in enumerate(node.outputs) if out is value)
    start = sum(widths[:index])
    return lin, start, start + widths[index]


def _fused_gate_up(
    down: Linear,
    reached: list[Linear],
    halves: dict[int, tuple[Linear, int, int]],
    activation_inputs: list[ir.Value],
    activation: str,
) -> FFN | None:
    """``down(act(gate) * up)`` where gate and up are the two halves of one linear's output."""
    parts = {(id(lin), a, b): (lin, a, b) for lin, a, b in halves.values()}
    if reached or len(parts) != 2:
        return None
    (lin, a0, a1), (lin2, b0, b1) = sorted(parts.values(), key=lambda part: part[1])
    half = lin.out_features // 2
    if lin2 is not lin or (a0, a1, b0, b1) != (0, half, half, lin.out_features) or down.in_features != half:
        return None
    # the gate is the half the activation reads (through elementwise ops)
    under: set[int] = set()
    for value in activation_inputs:
        under |= _values_reached(value, set(halves))
    gate_starts = {halves[v][1] for v in under}
    if len(gate_starts) != 1:
        return None
    gate_start = gate_starts.pop()
    up_start = half if gate_start == 0 else 0
    return FFN(up=lin, gate=lin, down=down, activation=activation, gate_up_halves=(gate_start, up_start))


def _values_reached(value: ir.Value, targets: set[int], limit: int = 32) -> set[int]:
    """The ids of ``targets`` that ``value`` is computed from through elementwise ops."""
    found: set[int] = set()
    queue, seen = deque([value]), 0
    while queue and seen < limit:
        v = queue.popleft()
        seen += 1
        if id(v) in targets:
            found.add(id(v))
            continue
        node = v.producer()
        if node is None or node.op_type not in _ELEMENTWISE:
            continue
        queue.extend(i for i in node.inputs if i is not None and const_array(i) is None)
    return found


def _activation_name(node: ir.Node) -> str:
    approximate = node.attributes.get("approximate")
    if node.op_type == "Gelu" and approximate is not None and approximate.value == "tanh":
        return "gelu_tanh"
    return _ACTIVATIONS[node.op_type]


def producers(value: ir.Value, limit: int) -> list[ir.Node]:
    """The nodes ``value`` is computed from, nearest first (breadth first), at most ``limit``."""
    out, queue, seen = [], deque([value]), set()
    while queue and len(out) < limit:
        v = queue.popleft()
        node = v.producer() if v is not None else None
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        out.append(node)
        queue.extend(i for i in node.inputs if i is not None)
    return out


# ----------------------------------------------------------------------------- blocks


def block_map(model: ir.Model) -> BlockMap:
    """The block map of ``model`` as it is now: built by :func:`find_blocks` once per state.

    The map is cached in ``model.meta`` until the graph changes. The graph editor and the pass
    manager drop it when they change the graph; as a second guard the cache is keyed by a
    fingerprint of the graph's wiring (nodes, the values they read, the constants' tensors), so
    an edit made by hand between two calls is seen too.
    """
    fingerprint = _fingerprint(model.graph)
    cached = model.meta.get(BLOCK_MAP_KEY)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    found = find_blocks(model)
    model.meta[BLOCK_MAP_KEY] = (fingerprint, found)
    return found


def forget_block_map(model: ir.Model) -> None:
    """Drop the cached block map of ``model`` (its graph is about to change or has changed)."""
    model.meta.pop(BLOCK_MAP_KEY, None)


def _fingerprint(graph: ir.Graph) -> int:
    wiring = tuple(
        (id(node), node.op_type, tuple(id(v) for v in node.inputs), tuple(id(v) for v in node.outputs))
        for node in graph
    )
    constants = tuple((name, id(v.const_value)) for name, v in graph.initializers.items())
    ends = (tuple(id(v) for v in graph.inputs), tuple(id(v) for v in graph.outputs))
    return hash((wiring, constants, ends))


def find_blocks(model: ir.Model | ir.Graph) -> BlockMap:
    """Build the block map of a (canonical) model. Passes use :func:`block_map` (cached)."""
    graph = model.graph if isinstance(model, ir.Model) else model
    order = {id(node): i for i, node in enumerate(graph)}
    linears = find_linears(graph)
    norms = find_norms(graph)
    linears_by_input: dict[int, list[Linear]] = {}
    for lin in linears:
        linears_by_input.setdefault(id(lin.input), []).append(lin)
    _attach_consumers(norms, linears_by_input)
    walk = _Walk({id(lin.output): lin for lin in linears}, {id(n.output): n for n in norms})

    unrecognized: list[str] = []
    attentions: list[Attention] = []
    for node in graph:
        if node.op_type != "Softmax":
            continue
        found = _find_attention(node, walk, linears_by_input)
        if isinstance(found, str):
            unrecognized.append(found)
        else:
            attentions.append(found)

    for attn in attentions:
        if attn.q_norm is not None:
            attn.q_norm.normalizes = "query"
        if attn.k_norm is not None:
            attn.k_norm.normalizes = "key"
    attention_linears = {id(lin) for a in attentions for lin in (a.q, a.k, a.v, a.o)}
    ffns: list[FFN] = []
    for lin in linears:
        if id(lin) in attention_linears:
            continue
        ffn = _find_ffn(lin, walk)
        if ffn is not None and not ({id(ffn.up), id(ffn.gate)} & attention_linears):
            ffns.append(ffn)

    norm_by_output = {id(n.output): n for n in norms}
    blocks = _assemble_blocks(attentions, ffns, norm_by_output, order, unrecognized)
    for block in blocks:
        if block.attention_post_norm is not None:
            block.attention_post_norm.follows = "attention"
        if block.ffn_post_norm is not None:
            block.ffn_post_norm.follows = "ffn"
    unrecognized.extend(_runtime_fused_ops(graph))
    return BlockMap(blocks=blocks, norms=norms, linears=linears, unrecognized=unrecognized)


# What ONNX Runtime's own fused ops in an input graph hide from the block map, by op type. A graph
# written by onnxruntime-genai's builder, by ORT's optimizer or by tforge's own lowering passes holds them.
_FUSED_OP_EFFECT = {
    "GroupQueryAttention": "attention fused into one op (heads, rotary and cache inside it); not read as an attention, so attention passes skip it",
    "MultiHeadAttention": "attention fused into one op; not read as an attention, so attention passes skip it",
    "Attention": "attention with its QKV projection fused into one op; not read as an attention, so attention passes skip it",
    "RotaryEmbedding": "rotary embedding fused into one op",
    "SkipSimplifiedLayerNormalization": "residual add and RMSNorm fused into one op; not read as a norm, so passes that rescale norms skip it",
    "SkipLayerNormalization": "residual add and LayerNorm fused into one op; not read as a norm, so passes that rescale norms skip it",
    "MatMulNBits": "linear with packed n-bit weights; not read as a linear, so weight passes skip it",
    "GatherBlockQuantized": "embedding with packed block-quantized weights",
    "DynamicQuantizeMatMul": "int8 linear fused into one op; not read as a linear",
}


def _runtime_fused_ops(graph: ir.Graph) -> list[str]:
    """One line per ONNX Runtime fused op type in the graph: how many, the first, and what tforge cannot see."""
    found: dict[str, list[ir.Node]] = {}
    for node in graph:
        if node.domain == "com.microsoft":
            found.setdefault(node.op_type, []).append(node)
    lines = []
    for op_type, nodes in found.items():
        effect = _FUSED_OP_EFFECT.get(op_type, "an ONNX Runtime contrib op tforge does not read")
        lines.append(
            f"{len(nodes)} com.microsoft.{op_type} node(s) (first: {nodes[0].name!r}): {effect}"
        )
    return lines


def _assemble_blocks(
    attentions: list[Attention],
    ffns: list[FFN],
    norm_by_output: dict[int, Norm],
    order: dict[int, int],
    unrecognized: list[str],
) -> list[Block]:
    norm_by_input: dict[int, Norm] = {}
    for norm in norm_by_output.values():
        norm_by_input.setdefault(id(norm.input), norm)
    events: list[tuple[int, Attention | FFN]] = [(order[id(a.softmax)], a) for a in attentions]
    events += [(order[id(f.down.matmul)], f) for f in ffns]
    events.sort(key=lambda e: e[0])
    blocks: list[Block] = []
    pending: Attention | None = None
    for _, item in events:
        if isinstance(item, Attention):
            if pending is not None:  # two attentions in a row (e.g. cross-attention): own block
                blocks.append(_make_block(len(blocks), pending, None, norm_by_output, norm_by_input))
            pending = item
        else:
            blocks.append(_make_block(len(blocks), pending, item, norm_by_output, norm_by_input))
            pending = None
    if pending is not None:
        blocks.append(_make_block(len(blocks), pending, None, norm_by_output, norm_by_input))
    return blocks


def _residual_after(output: ir.Value) -> tuple[ir.Node | None, ir.Value | None]:
    """The Add that adds a sub-block's output to the residual stream, and the stream operand."""
    value = output
    for _ in range(4):
        users = list(value.uses())
        if len(users) != 1:
            return None, None
        node = users[0].node
        if node.op_type == "Add" and const_array(node.inputs[1 - users[0].idx]) is None:
            return node, node.inputs[1 - users[0].idx]
        if node.op_type not in ("Reshape", "Mul", "Dropout", "Identity", "Cast"):
            return None, None
        value = node.outputs[0]
    return None, None


def _norm_of(value: ir.Value | None, norm_by_output: dict[int, Norm]) -> Norm | None:
    """The norm producing ``value``, looking through flattening Reshapes (GPT-2's Conv1D)."""
    while value is not None:
        norm = norm_by_output.get(id(value))
        if norm is not None:
            return norm
        node = value.producer()
        if node is None or node.op_type not in ("Reshape", "Identity", "Cast"):
            return None
        value = node.inputs[0]
    return None


def _norm_after(add: ir.Node | None, norm_by_output: dict[int, Norm]) -> Norm | None:
    if add is None:
        return None
    return next((norm for norm in norm_by_output.values() if norm.input is add.outputs[0]), None)


def _output_norm(
    output: ir.Value, norm_by_input: dict[int, Norm]
) -> tuple[Norm, ir.Node, ir.Value | None] | None:
    """A norm of a sub-block's output before its residual add, with that add and the stream.

    ``x + norm(o(...))``: Gemma 2/3 ("sandwich", beside the pre-norms) and OLMo 2 (instead of
    them). ``output`` (through single-reader Reshape/Identity/Cast/Dropout hops) must be read by
    the nodes of one norm only, and that norm's output by one residual Add; otherwise None.
    """
    value = output
    norm = None
    for _ in range(4):
        norm = norm_by_input.get(id(value))
        if norm is not None:
            break
        users = data_uses(value)
        if value.is_graph_output() or len(users) != 1:
            return None
        if users[0].node.op_type not in ("Reshape", "Identity", "Cast", "Dropout"):
            return None
        value = users[0].node.outputs[0]
    if norm is None or value.is_graph_output():
        return None
    members = {id(node) for node in norm.nodes}
    if any(id(use.node) not in members for use in data_uses(value)):
        return None
    add, stream = _residual_after(norm.output)
    if add is None or norm.output.is_graph_output():
        return None
    return norm, add, stream


def _make_block(
    index: int,
    attention: Attention | None,
    ffn: FFN | None,
    norm_by_output: dict[int, Norm],
    norm_by_input: dict[int, Norm],
) -> Block:
    adds: list[ir.Node] = []
    attn_add = ffn_add = None
    attn_stream = ffn_stream = None
    attn_post = ffn_post = None
    if attention is not None:
        attn_add, attn_stream = _residual_after(attention.o.output)
        if attn_add is None and (found := _output_norm(attention.o.output, norm_by_input)) is not None:
            attn_post, attn_add, attn_stream = found
    if ffn is not None:
        ffn_add, ffn_stream = _residual_after(ffn.down.output)
        if ffn_add is None and (found := _output_norm(ffn.down.output, norm_by_input)) is not None:
            ffn_post, ffn_add, ffn_stream = found
    # parallel attention and FFN (GPT-NeoX, Phi) may share one residual add
    adds = list({id(a): a for a in (attn_add, ffn_add) if a is not None}.values())
    # Post-norm: the residual stream entering the add is itself a norm output (BERT).
    stream = attn_stream if attention is not None else ffn_stream
    post_norm = stream is not None and _norm_of(stream, norm_by_output) is not None and (
        _norm_after(attn_add or ffn_add, norm_by_output) is not None
    )
    if post_norm:
        attention_norm = _norm_after(attn_add, norm_by_output) if attention else None
        ffn_norm = _norm_after(ffn_add, norm_by_output) if ffn else None
    else:
        attention_norm = _norm_of(attention.q.input, norm_by_output) if attention else None
        ffn_norm = _norm_of(ffn.up.input, norm_by_output) if ffn else None
    return Block(
        index=index,
        attention=attention,
        ffn=ffn,
        attention_norm=attention_norm,
        ffn_norm=ffn_norm,
        residual_adds=adds,
        pre_norm=not post_norm,
        attention_post_norm=attn_post,
        ffn_post_norm=ffn_post,
    )
