"""What lies on an attention block's paths, beyond what the block map records.

- :func:`value_columns`: the columns of V inside the value linear's output, when the way from
  the value projection to ``probs @ V`` only moves data and nothing else reads it, so scaling or
  permuting V's channels reaches the context and nothing else (smoothquant, rptq).
- :func:`score_chain`: how the scores become probabilities: the constant scale, the additive
  mask and the ``[batch, seq]`` padding-mask input it comes from (linear attention, and the
  attention fusions for ONNX Runtime).
- :func:`softmax_score_chain` and :func:`peel_scale`: the same read from the ``Softmax`` alone,
  for graphs whose projections the block map does not read as linears (after ``quantize``).
- :func:`merge_heads`: the same proof for the head merge alone, from a context whose heads come
  from elsewhere (a KV cache, rotary: the ONNX Runtime ``GroupQueryAttention`` fusion).
- :func:`shape_elements` and :func:`reshape_extents`: shape vectors computed at run time from
  ``Shape``, read back as extents (from :mod:`tforge.compiler.shape_reading`, kept importable here).
- :func:`attention_core`: the whole core between the Q/K/V ``[batch, seq, width]`` values and
  the merged ``[batch, seq, heads * head_dim]`` context, read from the ``Softmax`` alone, with
  the head split, K^T and head merge *proven* by tracing which logical axes (batch, sequence,
  heads, head_dim) every axis holds through ``Reshape``/``Transpose``, shapes computed at run
  time from ``Shape`` included (the ONNX Runtime ``MultiHeadAttention`` fusion).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from tforge.compiler.ops import LAYOUT, data_uses, is_default_domain, only_reader
from tforge.compiler.pass_infra import Skip
from tforge.compiler.shape_reading import (
    ONE,
    Size,
    annotated,
    div,
    mul,
    reshape_extents,
    shape_elements,
)
from tforge.compiler.structure import (
    Attention,
    const_array,
    nan_guarded_softmax,
    producers,
    scalar,
    slice_bounds,
)

__all__ = [
    "AttentionCore",
    "ScoreChain",
    "SoftmaxScores",
    "attention_core",
    "graph_inputs_reached",
    "merge_heads",
    "peel_scale",
    "reshape_extents",
    "shape_elements",
    "score_chain",
    "softmax_score_chain",
    "squeeze_axes",
    "value_columns",
]

# Between the V projection and probs @ V: layout ops only (a Cast would change what is scaled).
_VALUE_PATH = LAYOUT - {"Cast"}


def value_columns(attn: Attention) -> tuple[int, int]:
    """(first column, width) of V inside the value linear's output, or :class:`Skip` saying why V -> O is unsafe.

    Walks from the probs @ V MatMul back to the value linear through data-movement ops only,
    each value read by nothing else. With a fused QKV linear the walk ends at the Split, whose
    output index gives V's columns. V must be ``num_kv_heads * head_dim`` wide and O read
    ``num_heads * head_dim``.
    """
    if attn.qkv_slots is not None:
        # V's slots are selected from a reshape that Q and K read too (Falcon): nothing here proves
        # that the Q and K selections leave V's columns alone
        raise Skip("v->o: fused QKV cut into head slots (Falcon, CodeGen): V's columns are not proven private", attn.v.matmul)
    start, width = _walk_to_value_columns(attn)
    if width != attn.num_kv_heads * attn.head_dim or attn.o.in_features != attn.num_heads * attn.head_dim:
        raise Skip("v->o: head layout does not match the widths", attn.o.matmul)
    return start, width


def _walk_to_value_columns(attn: Attention) -> tuple[int, int]:
    v = attn.v
    value = attn.context_matmul.inputs[1]
    at = attn.context_matmul
    for _ in range(32):
        if value is None:
            break
        if only_reader(value) is None:
            raise Skip("v->o: the value projection's output is also read elsewhere", value.producer() or at)
        if value is v.output:
            if attn.fused_qkv:
                break
            return 0, v.out_features
        node = value.producer()
        if node is None:
            break
        if node.op_type == "Split" and attn.fused_qkv and node.inputs[0] is v.output:
            widths = _split_widths(node)
            if widths is None or only_reader(v.output) is None:
                break
            index = next(i for i, out in enumerate(node.outputs) if out is value)
            return int(sum(widths[:index])), int(widths[index])
        if node.op_type == "Slice" and attn.fused_qkv and node.inputs[0] is v.output:
            return _sliced_value_columns(v.output, node, v.out_features)
        if node.op_type not in _VALUE_PATH:
            raise Skip(f"v->o: {node.op_type} between the value projection and probs @ V", node)
        if node.op_type == "Tile" and attn.num_heads != attn.num_kv_heads:
            raise Skip("v->o: KV heads repeated by Tile (query-head order unknown)", node)
        value = node.inputs[0]
    raise Skip("v->o: the path to the value projection was not followed", at)


def _sliced_value_columns(fused: ir.Value, value_slice: ir.Node, width: int) -> tuple[int, int]:
    """V's columns when a fused QKV output is cut by Slices of its last axis (Phi-3): every reader
    of the fused output must be such a Slice, none of the others overlapping V's columns."""
    bounds = slice_bounds(value_slice, width)
    if bounds is None or fused.is_graph_output():
        raise Skip("v->o: the Slice of the fused QKV output has no constant bounds on its last axis", value_slice)
    start, end = bounds
    for use in fused.uses():
        if use.node is value_slice:
            continue
        other = slice_bounds(use.node, width) if use.idx == 0 else None
        if other is None or (other[0] < end and start < other[1]):
            raise Skip("v->o: the value columns of the fused QKV output are also read elsewhere", use.node)
    return start, end - start


def _split_widths(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        if arr is not None:
            return [int(x) for x in arr.ravel()]
    widths = []
    for out in node.outputs:
        if out.shape is None or out.shape.rank() == 0 or not isinstance(out.shape[-1], int):
            return None
        widths.append(int(out.shape[-1]))
    return widths


# ----------------------------------------------------------------------------- scores


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreChain:
    """``Softmax(scale * (Q @ K^T) + mask)``, read off the graph."""

    scale: float  # product of the scalar Mul/Div between the scores MatMul and the Softmax
    mask: ir.Value | None  # the additive mask's operand, if any
    key_mask: ir.Value | None  # the [batch, seq] graph input the mask is computed from, if one
    nan_guard: ir.Node | None  # Where(IsNaN(p), 0, p) between Softmax and context, if any


def score_chain(attn: Attention, graph: ir.Graph) -> ScoreChain:
    """How the attention's scores become its probabilities, or :class:`Skip` saying what is in the way.

    The chain from the scores ``MatMul`` to the ``Softmax`` may hold scalar ``Mul``/``Div``
    (the scale), one additive mask and casts, each read only by the chain. The mask is traced
    back to the graph inputs whose values it reads: one ``[batch, seq]`` integer or bool input
    is the key padding mask; a mask reading no input is a constant (allowed for causal
    attention only, whose mask it is).
    """
    at = attn.softmax
    axis = attn.softmax.attributes.get("axis")
    if axis is not None and axis.value not in (-1, 3):
        raise Skip("Softmax is not over the last axis", at)
    if attn.softmax.outputs[0].is_graph_output():
        raise Skip("the attention weights are a graph output", at)
    scale, mask_value = 1.0, None
    value = attn.softmax.inputs[0]
    scores_out = attn.scores_matmul.outputs[0]
    while value is not scores_out:
        node = value.producer() if value is not None else None
        if node is None:
            raise Skip("the Softmax input does not come from the scores MatMul", at)
        if len(list(value.uses())) != 1:
            raise Skip("the scores are read by more than the Softmax chain", node)
        data = [i for i in node.inputs if i is not None and const_array(i) is None]
        consts = [
            const_array(i) for i in node.inputs if i is not None and const_array(i) is not None
        ]
        if (
            node.op_type in ("Mul", "Div")
            and len(data) == 1
            and len(consts) == 1
            and consts[0].size == 1
        ):
            c = float(consts[0].reshape(()))
            if node.op_type == "Div" and node.inputs[1] is data[0]:
                raise Skip("scores divide a constant", node)
            scale *= c if node.op_type == "Mul" else 1.0 / c
            value = data[0]
        elif node.op_type == "Add" and len(data) == 2 and mask_value is None:
            on_path = [i is scores_out or _reaches(i, scores_out) for i in data]
            if sum(on_path) != 1:
                raise Skip("the additive mask depends on the scores", node)
            value, mask_value = (data[0], data[1]) if on_path[0] else (data[1], data[0])
        elif node.op_type in ("Cast", "Identity") and len(data) == 1:
            value = data[0]
        else:
            raise Skip(f"{node.op_type} between the scores and the Softmax is not supported", node)
    if len(list(scores_out.uses())) != 1:
        raise Skip("the scores are read by more than the Softmax chain", attn.scores_matmul)
    guard = None
    probs_in = attn.context_matmul.inputs[0]
    if probs_in is not attn.softmax.outputs[0]:
        guard = probs_in.producer() if probs_in is not None else None
        if guard is None or nan_guarded_softmax(guard) is not attn.softmax:
            raise Skip("ops between the Softmax and the context MatMul are not supported", attn.context_matmul)
    key_mask = None
    if mask_value is not None:
        inputs = graph_inputs_reached(mask_value, graph)
        candidates = [
            v for v in inputs
            if v.shape is not None and v.shape.rank() == 2
            and v.dtype in (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL)
        ]  # fmt: skip
        if len(inputs) == 1 and len(candidates) == 1:
            key_mask = candidates[0]
        elif inputs:
            raise Skip("the attention mask is not traced to one [batch, seq] mask input", mask_value.producer() or at)
        elif not attn.causal:
            raise Skip("a constant mask on non-causal attention", at)
    return ScoreChain(scale, mask_value, key_mask, guard)


def _reaches(value: ir.Value, target: ir.Value, limit: int = 64) -> bool:
    stack, seen = [value], 0
    while stack and seen < limit:
        v = stack.pop()
        if v is target:
            return True
        node = v.producer()
        seen += 1
        if node is not None:
            stack.extend(i for i in node.inputs if i is not None)
    return False


def graph_inputs_reached(value: ir.Value, graph: ir.Graph, *, stop: Iterable[ir.Value] = ()) -> list[ir.Value]:
    """Graph inputs whose *values* (not only shapes) ``value`` depends on, not looking past ``stop``."""
    graph_inputs = {id(v) for v in graph.inputs}
    found: dict[int, ir.Value] = {}
    stack, seen = [value], {id(v) for v in stop}
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if id(v) in graph_inputs:
            found[id(v)] = v
            continue
        node = v.producer()
        if node is None or node.op_type in ("Shape", "Size"):
            continue  # only the shape is read: no data dependence
        stack.extend(i for i in node.inputs if i is not None)
    return list(found.values())


# ----------------------------------------------------------------------------- read from the Softmax alone


@dataclasses.dataclass(frozen=True, eq=False)
class SoftmaxScores:
    """``Softmax(...)`` of ``scale * (Q @ K^T) + mask`` read back from the Softmax, without the block map."""

    scale: float  # product of every scalar Mul/Div between the scores MatMul and the Softmax
    mask: ir.Value | None  # the additive mask's operand, if any
    scores: ir.Node  # the Q @ K^T MatMul
    #: the part of ``scale`` applied after the mask was added, which therefore scales the mask too
    #: (1.0 when the scale comes first, as every exporter writes it, or when there is no mask)
    mask_scale: float = 1.0


def softmax_score_chain(softmax: ir.Node) -> SoftmaxScores:
    """The scores chain of ``softmax``, each value on it read by the chain only, or :class:`Skip`.

    Between the ``Softmax`` and the ``Q @ K^T`` MatMul (both operands computed) there may be
    scalar constant ``Mul``/``Div`` (the scale), one ``Add`` of a mask that does not depend on
    the scores (computed, or a constant), and ``Cast``/``Identity``.
    """
    scale, mask, mask_scale = 1.0, None, 1.0
    value = softmax.inputs[0]
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None or only_reader(value) is None:
            break
        data = [i for i in node.inputs if i is not None and const_array(i) is None]
        if node.op_type == "MatMul" and len(data) == 2:
            return SoftmaxScores(scale, mask, node, mask_scale if mask is not None else 1.0)
        if node.op_type in ("Mul", "Div") and len(data) == 1 and len(node.inputs) == 2:
            c = scalar(node.inputs[1] if node.inputs[0] is data[0] else node.inputs[0])
            if c is None or (node.op_type == "Div" and node.inputs[1] is data[0]):
                break
            scale *= c if node.op_type == "Mul" else 1.0 / c
            value = data[0]
        elif node.op_type == "Add" and len(data) == 2 and mask is None:
            on_path = [_reaches_matmul(d) for d in data]
            if sum(on_path) != 1:
                break
            value, mask = (data[0], data[1]) if on_path[0] else (data[1], data[0])
            mask_scale = scale  # what was peeled so far comes after the add
        elif node.op_type == "Add" and len(data) == 1 and len(node.inputs) == 2 and mask is None:
            # a constant mask (static-shape exports fold SDPA's mask into one)
            value = data[0]
            mask = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
            mask_scale = scale
        elif node.op_type in ("Cast", "Identity") and len(data) == 1:
            value = data[0]
        else:
            break
    raise Skip("the Softmax input is not scale * (Q @ K^T) + mask", softmax)


def _reaches_matmul(value: ir.Value) -> bool:
    """Whether ``value`` is a non-constant MatMul's output, through scalar scalings only."""
    for _ in range(4):
        node = value.producer()
        if node is None:
            return False
        if node.op_type == "MatMul":
            return const_array(node.inputs[1]) is None
        if node.op_type not in ("Mul", "Div", "Cast", "Identity"):
            return False
        data = [i for i in node.inputs if i is not None and const_array(i) is None]
        if len(data) != 1:
            return False
        value = data[0]
    return False


def peel_scale(value: ir.Value | None) -> tuple[float, ir.Value]:
    """Scalar constant ``Mul``/``Div`` read only on the way (SDPA's sqrt(scale) on Q and on K):
    (their product, the value before them)."""
    scale = 1.0
    while value is not None:
        node = value.producer()
        if node is None or node.op_type not in ("Mul", "Div") or only_reader(value) is None:
            break
        data, other = node.inputs[0], node.inputs[1]
        c = scalar(other)
        if c is None and node.op_type == "Mul":
            data, other = other, data
            c = scalar(other)
        if c is None or data is None or const_array(data) is not None:
            break
        scale *= c if node.op_type == "Mul" else 1.0 / c
        value = data
    if value is None:
        raise Skip("a scores operand is missing")
    return scale, value


# ----------------------------------------------------------------------------- the attention core


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionCore:
    """Everything between the Q/K/V values and the merged context of one attention, traced.

    ``q``, ``k``, ``v`` are ``[batch, seq, width]`` values (projection outputs, bias included, or
    the parts of a fused QKV projection) whose last axis is split head-major into
    ``num_heads x head_dim``; ``output`` is ``[batch, seq, num_heads * v_head_dim]``, head-major,
    equal to ``softmax(scale * Q K^T + mask) V`` per head (``[batch * seq, ..]`` when
    ``flat_output``: some exports merge the heads straight to 2-D). ``mask`` is additive, unscaled, of
    rank 4 and broadcastable to ``[batch, heads, seq, total]``; ``mask_full`` says its last two
    dims are known to be ``[seq, total]`` already (no broadcast needed there).
    """

    softmax: ir.Node
    scores_matmul: ir.Node
    context_matmul: ir.Node
    q: ir.Value
    k: ir.Value
    v: ir.Value
    output: ir.Value
    num_heads: int
    head_dim: int
    v_head_dim: int
    scale: float
    mask: ir.Value | None
    mask_full: bool
    flat_output: bool = False  # ``output`` is ``[batch * seq, width]`` (merged straight to 2-D)


#: Ops that only regroup or reorder axes, which the trace follows.
_REGROUP = frozenset({"Reshape", "Transpose", "Identity", "Unsqueeze", "Squeeze"})


@dataclasses.dataclass(frozen=True)
class _Atom:
    """A logical axis: ``<tensor>.b`` (batch), ``.s`` (sequence), ``.w`` (width) of a ``[b, s, w]``
    start value; splitting an atom gives ``<role>0`` (outer part) and ``<role>1`` (inner part)."""

    role: str
    size: Size


_Layout = tuple[tuple[_Atom, ...], ...]  # per axis, the atoms it holds, outermost first


def _axis_size(axis: tuple[_Atom, ...]) -> Size:
    size = ONE
    for atom in axis:
        size = mul(size, atom.size)
    return size


def _roles(layout: _Layout) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(a.role for a in axis) for axis in layout)


class _Tracer:
    """Which atoms every axis of the values on the core's paths holds, op by op."""

    def __init__(self) -> None:
        self.layouts: dict[int, _Layout] = {}
        self._fresh = 0

    def start(self, value: ir.Value, tensor: str, what: str) -> _Layout:
        dims = annotated(value)
        if dims is None or len(dims) != 3:
            raise Skip(f"the {what} is not a [batch, seq, width] value", value.producer() or value)
        if dims[2] is None or dims[2][1]:
            raise Skip(f"the {what}'s width is not a known integer", value.producer() or value)
        atoms = []
        for role, size in zip(("b", "s", "w"), dims, strict=True):
            if size is None:  # unnamed dim: a symbol of its own, equal to nothing else
                self._fresh += 1
                size = (1, (f"?{tensor}{self._fresh}",))
            atoms.append(() if size == ONE else (_Atom(f"{tensor}.{role}", size),))
        layout = tuple(atoms)
        self.layouts[id(value)] = layout
        return layout

    def dims(self, value: ir.Value) -> list[Size | None] | None:
        if id(value) in self.layouts:
            return [_axis_size(axis) for axis in self.layouts[id(value)]]
        return annotated(value)

    def step(self, node: ir.Node, layout: _Layout, what: str) -> _Layout:
        """The layout of ``node``'s output from that of its data input, or :class:`Skip`."""
        op = node.op_type
        if op in ("Identity", "Mul", "Div"):  # scalar scalings keep the layout
            return layout
        if op == "Transpose":
            perm_attr = node.attributes.get("perm")
            perm = list(perm_attr.value) if perm_attr is not None else list(range(len(layout)))[::-1]
            if sorted(perm) != list(range(len(layout))):
                raise Skip(f"Transpose '{node.name}' on the {what} path does not permute its {len(layout)} axes", node)
            return tuple(layout[p] for p in perm)
        if op in ("Unsqueeze", "Squeeze"):
            axes = squeeze_axes(node)
            if op == "Unsqueeze":
                if axes is None:
                    raise Skip(f"Unsqueeze '{node.name}' on the {what} path has no constant axes", node)
                rank = len(layout) + len(axes)
                out = list(layout)
                for a in sorted(a + rank if a < 0 else a for a in axes):
                    out.insert(a, ())
                return tuple(out)
            if axes is None:  # every axis that is 1 at run time: a batch of one too
                raise Skip(f"Squeeze '{node.name}' on the {what} path has no constant axes", node)
            drop = {a + len(layout) if a < 0 else a for a in axes}
            if any(layout[a] for a in drop if 0 <= a < len(layout)):
                raise Skip(f"Squeeze '{node.name}' on the {what} path removes an axis not known to be 1", node)
            return tuple(axis for i, axis in enumerate(layout) if i not in drop)
        if op == "Reshape":
            return self._reshape(node, layout, what)
        raise Skip(f"{op} '{node.name}' on the {what} path", node)

    def _reshape(self, node: ir.Node, layout: _Layout, what: str) -> _Layout:
        why = f"Reshape '{node.name}' on the {what} path: its target shape was not traced to whole or split axes"
        # the target's elements, dims read off the traced values by their atoms
        elems = shape_elements(node.inputs[1] if len(node.inputs) > 1 else None, self.dims)
        if elems is None:
            raise Skip(why, node)
        allowzero = node.attributes.get("allowzero")
        written = annotated(node.outputs[0])
        if written is not None and len(written) != len(elems):
            written = None
        targets: list[Size | None] = []
        for i, e in enumerate(elems):
            if e == 0 and not (allowzero is not None and int(allowzero.value)):
                if i >= len(layout):
                    raise Skip(why, node)
                e = _axis_size(layout[i])
            if isinstance(e, int):  # -1 (the rest, inferred below), or a literal 0 dim
                if e == 0:
                    raise Skip(f"Reshape '{node.name}' on the {what} path makes an empty tensor", node)
                targets.append(None)
                continue
            if e is None and written is not None and written[i] is not None:
                e = written[i]  # computed at run time from something not traced: trust the annotation
            targets.append(e)
        out = _regroup([a for axis in layout for a in axis], targets)
        if out is None:
            raise Skip(why, node)
        return out


def squeeze_axes(node: ir.Node) -> list[int] | None:
    """The constant axes of a ``Squeeze``/``Unsqueeze`` (input, or attribute below opset 13); None
    when they are computed at run time or absent."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        return None if arr is None else [int(x) for x in np.asarray(arr).ravel()]
    attr = node.attributes.get("axes")
    return [int(a) for a in attr.value] if attr is not None else None


def _regroup(atoms: list[_Atom], targets: list[Size | None]) -> _Layout | None:
    """Row-major regrouping of ``atoms`` into axes of the ``targets`` extents (at most one None:
    the rest), splitting an integer atom where a target takes part of it; None if impossible."""
    unknown = [i for i, t in enumerate(targets) if t is None]
    if len(unknown) > 1:
        return None
    rest = list(atoms)
    cut = unknown[0] if unknown else len(targets)
    front = _take(rest, targets[:cut], from_back=False)
    if front is None:
        return None
    if not unknown:
        return tuple(front) if not rest else None
    back = _take(rest, targets[cut + 1 :][::-1], from_back=True)
    if back is None:
        return None
    return (*front, tuple(rest), *back[::-1])


def _take(atoms: list[_Atom], targets: list[Size | None], *, from_back: bool) -> list[tuple[_Atom, ...]] | None:
    """Consume ``atoms`` (in place) into one axis per target, from the front or the back."""
    out = []
    for target in targets:
        assert target is not None
        group: list[_Atom] = []
        have = ONE
        while have != target:
            need = div(target, have)
            if need is None or not atoms:
                return None
            atom = atoms[-1] if from_back else atoms[0]
            if div(need, atom.size) is not None:
                group.append(atom)
                atoms.pop(-1 if from_back else 0)
                have = mul(have, atom.size)
            elif not atom.size[1] and not need[1] and atom.size[0] % need[0] == 0:
                part = _Atom(atom.role + ("1" if from_back else "0"), need)
                other = _Atom(atom.role + ("0" if from_back else "1"), (atom.size[0] // need[0], ()))
                group.append(part)
                atoms[-1 if from_back else 0] = other
                have = target
            else:
                return None
        out.append(tuple(group[::-1] if from_back else group))
    return out


def _operand_path(value: ir.Value | None, what: str) -> tuple[ir.Value, list[ir.Node], float]:
    """(start value, the layout ops from it to ``value`` in order, product of scalar scalings on
    the way) walking back from a MatMul operand through regrouping ops and scalar Mul/Div."""
    if value is None:
        raise Skip(f"the {what} operand is missing")
    chain: list[ir.Node] = []
    scale = 1.0
    for _ in range(24):
        node = value.producer()
        if node is None or not is_default_domain(node):
            break
        if node.op_type in _REGROUP and node.inputs[0] is not None:
            chain.append(node)
            value = node.inputs[0]
            continue
        if node.op_type in ("Mul", "Div") and len(node.inputs) == 2:
            places = (1,) if node.op_type == "Div" else (1, 0)
            found = next((i for i in places if scalar(node.inputs[i]) is not None), None)
            data = node.inputs[1 - found] if found is not None else None
            if data is not None and const_array(data) is None:
                c = scalar(node.inputs[found])  # type: ignore[index]
                if c == 0:
                    raise Skip(f"the {what} is scaled by 0", node)
                scale *= c if node.op_type == "Mul" else 1.0 / c  # type: ignore[operator]
                chain.append(node)
                value = data
                continue
        break
    chain.reverse()
    return value, chain, scale


def _why_not_a_start(value: ir.Value, what: str) -> str:
    """Why the walk back from a MatMul operand stopped at ``value`` instead of a [b, s, w] value."""
    node = value.producer()
    seen = producers(value, 24)
    ops = {n.op_type for n in seen}
    if "RotaryEmbedding" in ops or ("Neg" in ops and "Concat" in ops and node is not None and node.op_type == "Add"):
        return f"rotary embedding on the {what}: MultiHeadAttention is fused only without rotary"
    if any(n.op_type == "Concat" and any(o.is_graph_output() for o in n.outputs) for n in seen[:8]):
        return f"the {what} is read from a KV cache"
    if node is not None and node.op_type == "Expand":
        return f"repeat-kv (Expand) on the {what}: MultiHeadAttention needs as many key/value heads as query heads"
    label = f"{node.op_type} '{node.name}'" if node is not None else "a graph input"
    rank = value.shape.rank() if value.shape is not None else "unknown"
    return f"the {what} path starts at {label} (rank {rank}), not at a [batch, seq, width] value"


def _flat(layout_part: tuple[tuple[_Atom, ...], ...]) -> list[str]:
    return [a.role for axis in layout_part for a in axis]


def _unprefixed(layout_part: tuple[tuple[_Atom, ...], ...]) -> list[tuple[str, ...]]:
    return [tuple(a.role.split(".", 1)[1] for a in axis) for axis in layout_part]


def attention_core(softmax: ir.Node, opset: int = 18) -> AttentionCore:
    """The attention core around ``softmax``, its layout proven, or :class:`Skip` saying why not.

    Walks back from the scores and context MatMuls through ``Reshape``/``Transpose``/``Identity``/
    ``(Un)Squeeze`` and scalar ``Mul``/``Div`` to the values Q, K and V come from, which must be
    ``[batch, seq, width]``; then traces forward which logical axes every axis holds: Q must reach
    the scores MatMul as ``[.., heads, seq, head_dim]``, K as ``[.., heads, head_dim, total]``
    (K^T), V as ``[.., heads, total, v_head_dim]``, the batch and heads axes grouped alike, and the
    context must be merged back to ``[batch, seq, heads * v_head_dim]`` (head-major) by layout ops
    alone. Reshape targets computed at run time (``Shape``, ``Slice``, ``Gather``, ``Concat``) are
    followed; the annotated dims of values off the paths (e.g. the mask input) are trusted.
    """
    axis = softmax.attributes.get("axis")
    if (axis is None and opset < 13) or (axis is not None and int(axis.value) not in (-1, 3)):
        raise Skip("Softmax is not over the last axis", softmax)
    chain = softmax_score_chain(softmax)
    if chain.mask is not None and abs(chain.mask_scale - 1.0) > 1e-12:
        raise Skip("the scores are scaled after the mask is added (the scale multiplies the mask too)", softmax)
    probs = softmax.outputs[0]
    readers = data_uses(probs)
    context = readers[0].node if len(readers) == 1 and readers[0].idx == 0 else None
    if probs.is_graph_output() or context is None or context.op_type != "MatMul":
        guard = next((u.node for u in readers if nan_guarded_softmax(u.node) is softmax), None)
        if guard is not None:
            raise Skip("a NaN guard Where(IsNaN(p), 0, p) follows the Softmax (canonicalize drops it where it cannot fire)", guard)
        raise Skip("the Softmax is not read by exactly one probs @ V MatMul", softmax)
    scores = chain.scores
    tracer = _Tracer()
    traced: dict[str, tuple[ir.Value, _Layout]] = {}
    scale = chain.scale
    for tensor, what, operand in (
        ("q", "query", scores.inputs[0]),
        ("k", "key", scores.inputs[1]),
        ("v", "value", context.inputs[1]),
    ):
        start, path, factor = _operand_path(operand, what)
        if tensor != "v":
            scale *= factor
        elif factor != 1.0:
            raise Skip("the value is scaled on its way to probs @ V", path[0] if path else context)
        if start.shape is None or start.shape.rank() != 3:
            raise Skip(_why_not_a_start(start, what), start.producer() or context)
        layout = tracer.start(start, tensor, what)
        for node in path:
            layout = tracer.step(node, layout, what)
            tracer.layouts[id(node.outputs[0])] = layout
        traced[tensor] = (start, layout)

    (q, lq), (k, lk), (v, lv) = traced["q"], traced["k"], traced["v"]
    if min(len(lq), len(lk), len(lv)) < 3 or not len(lq) == len(lk) == len(lv):
        raise Skip("the query, key and value reach the MatMuls with different or too few axes", scores)
    present = {a.role: a.size for layout in (lq, lk, lv) for axis in layout for a in axis}
    for tensor, layout, what in (("q", lq, "query"), ("k", lk, "key (transposed)"), ("v", lv, "value")):
        batch_roles = ([f"{tensor}.b"] if f"{tensor}.b" in present else []) + [f"{tensor}.w0"]
        seq = (f"{tensor}.s",) if f"{tensor}.s" in present else ()
        dim = (f"{tensor}.w1",)
        want_rows = (dim, seq) if tensor == "k" else (seq, dim)
        if _flat(layout[:-2]) != batch_roles or _roles(layout[-2:]) != want_rows:
            order = "heads, head_dim, total" if tensor == "k" else "heads, seq, head_dim"
            raise Skip(
                f"the {what} does not reach its MatMul as [batch, {order}] split head-major from its width",
                scores if tensor != "v" else context,
            )
    if not _unprefixed(lq[:-2]) == _unprefixed(lk[:-2]) == _unprefixed(lv[:-2]):
        raise Skip("the batch and heads axes of query, key and value are grouped differently", scores)
    heads = present["q.w0"][0]
    if present["k.w0"][0] != heads or present["v.w0"][0] != heads:
        raise Skip("query, key and value have different head counts (grouped-query attention?)", scores)
    head_dim, v_head_dim = present["q.w1"][0], present["v.w1"][0]
    if present["k.w1"][0] != head_dim:
        raise Skip("query and key heads differ in size", scores)
    if not present.get("q.b") == present.get("k.b") == present.get("v.b"):
        raise Skip("query, key and value differ in batch size", scores)
    if present.get("k.s") != present.get("v.s"):
        raise Skip("key and value differ in sequence length", scores)
    if abs(scale) < 1e-30 or not np.isfinite(scale):
        raise Skip(f"the attention scale {scale} is not usable", scores)

    # the context [.., heads, seq, v_head_dim], merged back by layout ops to [batch, seq, width]
    # or, as Conv1D-style exports (GPT-2) write it, straight to [batch * seq, width]
    layout: _Layout = (*lq[:-2], lq[-2], lv[-1])
    rows = [f"q.{r}" for r in ("b", "s") if f"q.{r}" in present]
    merged = (*(((r,) if r in rows else ()) for r in ("q.b", "q.s")), ("q.w0", "v.w1"))
    flattened = (tuple(rows), ("q.w0", "v.w1"))
    value = context.outputs[0]
    for _ in range(12):
        if _roles(layout) in (merged, flattened):
            break
        uses = data_uses(value)
        node = uses[0].node if len(uses) == 1 else None
        if value.is_graph_output() or node is None or not is_default_domain(node) or node.op_type not in _REGROUP:
            raise Skip("the context heads are not merged back to [batch, seq, heads * head_dim] by layout ops", node or context)
        layout = tracer.step(node, layout, "context")
        value = node.outputs[0]
        tracer.layouts[id(value)] = layout
    else:
        raise Skip("the context heads are not merged back to [batch, seq, heads * head_dim] by layout ops", context)

    mask, mask_full = chain.mask, False
    zeros = const_array(mask) if mask is not None else None
    if zeros is not None and not np.any(zeros):
        mask = None  # a constant mask of zeros adds nothing
    if mask is not None:
        mask_full = _check_mask(mask, lq, present, heads, scores)
    return AttentionCore(
        softmax=softmax, scores_matmul=scores, context_matmul=context, q=q, k=k, v=v, output=value,
        num_heads=int(heads), head_dim=int(head_dim), v_head_dim=int(v_head_dim), scale=float(scale),
        mask=mask, mask_full=mask_full, flat_output=_roles(layout) == flattened,
    )  # fmt: skip


def _check_mask(mask: ir.Value, lq: _Layout, present: dict[str, Size], heads: int, at: ir.Node) -> bool:
    """Whether the rank-4 additive mask is already [.., .., seq, total]; Skip if it is not a mask
    of the scores' shape [batch, heads, seq, total] (dims 1 or equal, fewer axes none)."""
    if len(lq) != 4:
        raise Skip("a mask on attention whose scores are not [batch, heads, seq, total]", at)
    dims = annotated(mask)
    if dims is None or len(dims) != 4:
        raise Skip("the additive mask is not of rank 4 ([batch or 1, heads or 1, seq or 1, total])", mask.producer() or at)
    batch = present.get("q.b", ONE)
    if _axis_size(lq[0]) != batch or _axis_size(lq[1]) != (heads, ()):
        raise Skip("the scores' leading axes are not [batch, heads]", at)
    want = [batch, (heads, ()), present.get("q.s", ONE), present.get("k.s", ONE)]
    for i, (got, full) in enumerate(zip(dims, want, strict=True)):
        if got is not None and got not in (ONE, full):
            raise Skip(f"the additive mask's dim {i} is neither 1 nor the scores'", mask.producer() or at)
    return dims[2] == want[2] and dims[3] == want[3]


def merge_heads(context: ir.Value, q: ir.Value, heads: int, head_dim: int, rows: Iterable[ir.Value] = ()) -> ir.Value:
    """The value ``context`` is merged into by layout ops alone, or :class:`Skip` saying why not.

    ``context`` is ``[batch, heads, seq, head_dim]``, its batch and sequence those of ``q``, the
    ``[batch, seq, heads * head_dim]`` query projection; the merged value must be ``[batch, seq,
    heads * head_dim]``, head-major. Proven as :func:`attention_core` proves its merge, by tracing
    which logical axes each axis holds through ``Reshape``/``Transpose``/``(Un)Squeeze``, targets
    computed at run time included. A target may read dims off ``context`` and off the values in
    ``rows``, which the caller vouches have the context's dims (the rotated query heads, whose
    ``Shape`` the TorchScript export reads the sequence length from).
    """
    tracer = _Tracer()
    atoms = {a.role: a for axis in tracer.start(q, "q", "query") for a in axis}
    if _axis_size(tuple(atoms[r] for r in ("q.w",) if r in atoms)) != (heads * head_dim, ()):
        raise Skip(f"the query projection is not {heads} x {head_dim} wide", q.producer() or context.producer())
    parts = {"q.w0": (heads, ()), "q.w1": (head_dim, ())}
    atoms.update({role: _Atom(role, size) for role, size in parts.items() if size != ONE})
    axes = [tuple(atoms[r] for r in roles if r in atoms) for roles in (("q.b",), ("q.w0",), ("q.s",), ("q.w1",))]
    layout: _Layout = tuple(axes)
    for value in (context, *rows):
        tracer.layouts[id(value)] = layout
    want = _roles((axes[0], axes[2], axes[1] + axes[3]))
    value = context
    for _ in range(12):
        if _roles(layout) == want:
            return value
        uses = data_uses(value)
        node = uses[0].node if len(uses) == 1 and uses[0].idx == 0 else None
        if value.is_graph_output() or node is None or not is_default_domain(node) or node.op_type not in _REGROUP:
            break
        layout = tracer.step(node, layout, "context")
        value = node.outputs[0]
        tracer.layouts[id(value)] = layout
    raise Skip("the context heads are not merged back to [batch, seq, heads * head_dim] by layout ops", context.producer())
