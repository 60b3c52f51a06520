"""merge-projections: sibling linears (several linears reading one value) become one wide linear.

Decoding one token at batch 1 on the CPU is bound by the number of nodes ONNX Runtime runs per
token, not by arithmetic: each node costs a kernel launch, a thread-pool round and its own pass
over the input. A LLaMA layer reads its attention norm's output with three projections (Q, K,
V) and its FFN norm's output with two (gate, up); onnxruntime-genai's model builder writes one
packed QKV and one packed gate/up linear instead. This pass does the same on our graphs, usually
last (after ``quantize-weights`` and ``ort-fuse``), and exactly (every output equals the
unmerged graph's):

- ``com.microsoft.MatMulNBits`` siblings with the same attributes (``K``, ``bits``,
  ``block_size``, ``accuracy_level``) and the same optional inputs, all constant: their inputs are
  laid out per output column (``B [N, n_blocks, blob_bytes]``, ``scales [N, n_blocks]`` or flat
  ``[N * n_blocks]``, ``zero_points`` packed ``uint8 [N, ceil(n_blocks * bits / 8)]`` with each
  column padded on its own, or unpacked ``[N, n_blocks]`` in A's type, ``bias [N]``), so one
  wide op is their concatenation along ``N`` and ``N`` is the sum;
- float ``MatMul`` siblings with a constant 2-D weight ``[K, N_i]``, each maybe followed by a
  bias ``Add`` of a constant ``[N_i]``: the weights (and biases) concatenated on their last axis.

The wide linear is followed by a ``Split`` of its last axis into the siblings' widths, in the
siblings' graph order (query, key, value when they feed one attention op); the Split's outputs
take over the siblings' values and their names, so readers and graph outputs see the same values
under the same names. Siblings are grouped by what
can share one op (same kind, same attributes, same optional inputs); a sibling left alone is a
skip naming how it differs (``bits 8 vs 4``). Integer linears (``MatMulInteger``,
``MatMulIntegerToFloat``, ``DynamicQuantizeMatMul``, ...) read the activation through a
quantizer of their own and are not merged: a skip says so.

After ``ort-fuse``, Q, K and V feed ``com.microsoft.GroupQueryAttention`` (inputs 0, 1, 2). When
a merged Split's outputs are exactly those three inputs, in that order, and nothing else reads
them, the wide output is given to the op as its packed ``query`` (``[batch, seq, (heads + 2 *
kv_heads) * head_dim]``) and ``key``/``value`` are left empty: the Split goes too (option
``packed-qkv``). With ``do_rotary=0`` (head sizes that are not multiples of 16) Q and K pass
through ``RotaryEmbedding`` first, so the Split stays. ORT 1.31's CPU kernel gives the same
numbers packed and unpacked, with rotary and a past cache (tested).

On SmolLM2-135M (30 layers) after 4-bit ``quantize-weights`` and ``ort-fuse`` this removes 90
of 211 ``MatMulNBits`` per token (Q/K/V -> 1, gate/up -> 1) and adds 30 ``Split``s (gate/up):
402 -> 342 kernels a run, logits bit-identical. Measured with ``tools/bench_decode.py`` (2
threads, ORT 1.31, quiet machine; BENCHMARKS.md, issue 17 run 3): decode 9.5 -> 8.1 ms/token
(1.17x), the 128-token prefill 256 -> 267 ms (one wide ``MatMulNBits`` over many rows is a
little slower than its narrow parts on this CPU). The presets end with it on KV-cache graphs.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from tforge.compiler.ops import MS_DOMAIN, is_default_domain
from tforge.compiler.pass_infra import Pass, PassResult, Property, SiteStats, Skip
from tforge.compiler.registry import register_pass
from tforge.compiler.rewrite import GraphEditor
from tforge.compiler.structure import const_array

__all__ = ["MergeProjections", "concat_columns", "merged_name"]

# MatMulNBits inputs after A, each laid out per output column; g_idx (index 4) is not merged
_NBITS_B, _NBITS_SCALES, _NBITS_ZERO_POINTS, _NBITS_G_IDX, _NBITS_BIAS = 1, 2, 3, 4, 5
# Linears on integer activations: each reads the activation through its own quantizer, and
# merging them (a wide int8 weight with per-column scales) is not built.
_INT8_LINEARS = frozenset(
    {"MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "QGemm"}
)
_QUANTIZERS = frozenset({"DynamicQuantizeLinear", "QuantizeLinear"})


@register_pass("merge-projections")
@dataclasses.dataclass(frozen=True)
class MergeProjections(Pass):
    """Merge sibling linears (MatMulNBits or float MatMul reading one value) into one wide linear and a Split."""

    # feed GroupQueryAttention the merged Q/K/V as its packed query when it reads exactly them
    packed_qkv: bool = True

    # the block map reads neither a wide linear cut by a Split nor the fused ops it usually follows
    invalidates: ClassVar = frozenset({Property.CANONICAL})

    def run(self, model: ir.Model) -> PassResult:
        stats = SiteStats()
        editor = GraphEditor(model, self.name)
        groups: list[dict[str, object]] = []
        # every value is a candidate; a Split made here is one too (a linear's output read by two
        # linears directly), so the queue grows as it is read
        pending = collections.deque(
            [*model.graph.inputs, *(out for node in model.graph for out in node.outputs)]
        )
        while pending:
            value = pending.popleft()
            for siblings in self._sibling_groups(value, stats):
                merged = _merge(editor, siblings)
                pending.extend(merged.outputs)
                stats[f"{siblings[0].op} x{len(siblings)} -> 1"] += 1
                packed = self.packed_qkv and _pack_into_attention(editor, merged)
                if packed:
                    stats["merged Q/K/V -> GroupQueryAttention packed query"] += 1
                groups.append({
                    "linears": [s.node.name for s in siblings], "widths": [s.width for s in siblings],
                    "merged": merged.node.name, "packed_qkv": packed,
                })  # fmt: skip
        editor.drop_retired()
        changed = bool(groups)
        return PassResult(model, changed=changed, stats=stats, details={"groups": groups})

    def _sibling_groups(self, value: ir.Value, stats: SiteStats) -> list[list[_Sibling]]:
        """The groups of ``value``'s linear readers that can share one op; the others are skips."""
        int8 = _int8_linears(value)
        if len(int8) >= 2:
            kinds = ", ".join(sorted({n.op_type for n in int8}))
            stats.skip(Skip(
                f"integer linears ({kinds}) read one activation: merging them is not built "
                "(only MatMulNBits and float MatMul siblings are merged)", int8[0],
            ))  # fmt: skip
        candidates = [
            u.node
            for u in value.uses()
            if u.idx == 0 and (_is_nbits(u.node) or _is_float_matmul(u.node))
        ]
        if len(candidates) < 2:
            return []
        siblings: list[_Sibling] = []
        for node in candidates:
            try:
                siblings.append(_nbits_sibling(node) if _is_nbits(node) else _float_sibling(node))
            except Skip as skip:
                stats.skip(skip)
        classes: dict[tuple, list[_Sibling]] = {}
        for sibling in siblings:
            classes.setdefault(tuple(sibling.key.items()), []).append(sibling)
        groups = [group for group in classes.values() if len(group) >= 2]
        for group in classes.values():
            if len(group) == 1 and len(siblings) >= 2:
                lone = group[0]
                other = next(s for s in siblings if s is not lone)
                stats.skip(
                    Skip(
                        f"not merged with its sibling linears: {_difference(lone, other)}",
                        lone.node,
                    )
                )
        return groups


# ----------------------------------------------------------------------------- siblings


@dataclasses.dataclass(eq=False)
class _Sibling:
    """One linear reading the shared value: its nodes, constants and what must match to merge."""

    op: str  # "MatMulNBits" or "MatMul"
    node: ir.Node  # the MatMulNBits or MatMul
    bias_add: ir.Node | None  # float: the Add of a constant bias after the MatMul
    output: ir.Value  # the linear's result (after the bias)
    width: int  # N_i
    constants: dict[int, ir.Value]  # input index -> constant (float: 1 weight, 2 bias)
    key: dict[str, object]  # what every member of a merged group shares


def _is_nbits(node: ir.Node) -> bool:
    return node.domain == MS_DOMAIN and node.op_type == "MatMulNBits"


def _is_float_matmul(node: ir.Node) -> bool:
    """A MatMul with a constant right operand: a linear (a MatMul of two activations is not one)."""
    return (
        node.op_type == "MatMul"
        and is_default_domain(node)
        and len(node.inputs) == 2
        and const_array(node.inputs[1]) is not None
    )


def _nbits_sibling(node: ir.Node) -> _Sibling:
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    if "N" not in attrs or "K" not in attrs:
        raise Skip("MatMulNBits without its K and N attributes", node)
    n = int(attrs["N"])  # type: ignore[call-overload]
    if len(node.inputs) > _NBITS_G_IDX and node.inputs[_NBITS_G_IDX] is not None:
        raise Skip(
            "MatMulNBits with a g_idx input (deprecated, column-permuted blocks) is not merged",
            node,
        )
    constants: dict[int, ir.Value] = {}
    for idx in (_NBITS_B, _NBITS_SCALES, _NBITS_ZERO_POINTS, _NBITS_BIAS):
        value = node.inputs[idx] if idx < len(node.inputs) else None
        if value is None:
            continue
        array = const_array(value)
        if array is None:
            what = ("B", "scales", "zero_points", "", "bias")[idx - 1]
            raise Skip(
                f"MatMulNBits input {what} is computed, not a constant (a tied embedding's bytes?)",
                node,
            )
        if array.size % n or (idx == _NBITS_B and (array.ndim != 3 or array.shape[0] != n)):
            raise Skip(
                f"MatMulNBits input '{value.name}' is not laid out per output column (N={n})", node
            )
        constants[idx] = value
    if _NBITS_B not in constants or _NBITS_SCALES not in constants:
        raise Skip("MatMulNBits without B and scales", node)
    zero_points = constants.get(_NBITS_ZERO_POINTS)
    key: dict[str, object] = {
        "kind": "MatMulNBits",
        **{k: v for k, v in sorted(attrs.items()) if k != "N"},
        "zero_points": None if zero_points is None else str(zero_points.dtype),
        "bias": _NBITS_BIAS in constants,
        "scales dtype": str(constants[_NBITS_SCALES].dtype),
    }
    return _Sibling("MatMulNBits", node, None, node.outputs[0], n, constants, key)


def _float_sibling(node: ir.Node) -> _Sibling:
    weight = node.inputs[1]
    w = const_array(weight)
    assert weight is not None and w is not None  # _is_float_matmul
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        raise Skip(
            f"float MatMul whose weight is not a 2-D float constant (shape {list(w.shape)}, {w.dtype})",
            node,
        )
    constants = {1: weight}
    bias_add = _bias_add(node, w.shape[1])
    output = node.outputs[0] if bias_add is None else bias_add.outputs[0]
    if bias_add is not None:
        constants[2] = next(i for i in bias_add.inputs if i is not node.outputs[0])  # type: ignore[assignment]
    key: dict[str, object] = {
        "kind": "MatMul",
        "K": int(w.shape[0]),
        "weight dtype": str(w.dtype),
        "bias": bias_add is not None,
    }
    return _Sibling("MatMul", node, bias_add, output, int(w.shape[1]), constants, key)


def _bias_add(matmul: ir.Node, width: int) -> ir.Node | None:
    """The ``Add`` of a constant ``[width]`` that alone reads the MatMul's output, or None."""
    out = matmul.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None
    add = uses[0].node
    if add.op_type != "Add" or not is_default_domain(add) or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    bias = const_array(other)
    if bias is None or bias.shape != (width,):
        return None
    return add


def _int8_linears(value: ir.Value) -> list[ir.Node]:
    """Integer linears reading float ``value``: ``DynamicQuantizeMatMul`` directly, the others
    through a quantizer (so a quantized value is not counted a second time)."""
    found = []
    for use in value.uses():
        node = use.node
        if node.op_type == "DynamicQuantizeMatMul" and use.idx == 0:
            found.append(node)
        elif node.op_type in _QUANTIZERS and use.idx == 0:
            found.extend(u.node for u in node.outputs[0].uses() if u.node.op_type in _INT8_LINEARS)
    return found


def _difference(lone: _Sibling, other: _Sibling) -> str:
    """How ``lone`` differs from ``other`` in what a merge needs equal (``bits 8 vs 4``)."""
    if lone.key["kind"] != other.key["kind"]:
        return f"{lone.op} vs {other.op} (a merged group is all MatMulNBits or all float MatMul)"
    parts = [
        f"{name} {lone.key.get(name)} vs {other.key.get(name)}"
        for name in dict.fromkeys([*lone.key, *other.key])
        if lone.key.get(name) != other.key.get(name)
    ]
    return ", ".join(parts)


# ----------------------------------------------------------------------------- the rewrite


@dataclasses.dataclass(eq=False)
class _Merged:
    node: ir.Node  # the wide linear
    output: ir.Value  # its result, after the bias
    split: ir.Node
    outputs: list[ir.Value]  # the Split's outputs, one per sibling in order
    widths: list[int]  # the siblings' widths, in that order


def _merge(editor: GraphEditor, siblings: list[_Sibling]) -> _Merged:
    order = {id(n): i for i, n in enumerate(editor.graph)}
    siblings = _attention_order(siblings) or sorted(siblings, key=lambda s: order[id(s.node)])
    first = min(siblings, key=lambda s: order[id(s.node)]).node
    x = first.inputs[0]
    assert x is not None
    widths = [s.width for s in siblings]
    name = merged_name([s.node.name or s.output.name or "linear" for s in siblings])
    out_name = merged_name([s.output.name or "linear" for s in siblings])
    lead = list(x.shape.dims[:-1]) if x.shape is not None else None
    out_shape = [*lead, sum(widths)] if lead is not None else None
    dtype = siblings[0].output.dtype

    def concatenated(idx: int, axis: int) -> ir.Value:
        values = [s.constants[idx] for s in siblings]
        array = concat_columns([const_array(v) for v in values], widths, axis)  # type: ignore[misc]
        return editor.initializer(merged_name([v.name or "const" for v in values]), array)

    if siblings[0].op == "MatMulNBits":
        inputs: list[ir.Value | None] = [x] + [None] * max(siblings[0].constants)
        for idx in siblings[0].constants:
            inputs[idx] = concatenated(idx, 0)
        attributes = {k: a.value for k, a in first.attributes.items()}
        attributes["N"] = sum(widths)
        node = editor.node(
            "MatMulNBits", inputs, domain=MS_DOMAIN, name=name, outputs=out_name, attributes=attributes,
            before=first, dtype=dtype, shape=out_shape,
        )  # fmt: skip
        output = node.outputs[0]
    else:
        weight = concatenated(1, 1)
        node = editor.node(
            "MatMul",
            [x, weight],
            name=name,
            outputs=out_name,
            before=first,
            dtype=dtype,
            shape=out_shape,
        )
        output = node.outputs[0]
        if 2 in siblings[0].constants:
            bias = concatenated(2, 0)
            output = editor.op(
                "Add", [output, bias], name=f"{name}.bias", outputs=f"{out_name}.biased", before=first,
                dtype=dtype, shape=out_shape,
            )  # fmt: skip
    split = _split(editor, output, widths, [s.output for s in siblings], name, first)
    for sibling, new in zip(siblings, split.outputs, strict=True):
        _take_over(editor, sibling, new)
    return _Merged(node, output, split, list(split.outputs), widths)


def _split(
    editor: GraphEditor,
    value: ir.Value,
    widths: list[int],
    olds: list[ir.Value],
    name: str,
    before: ir.Node,
) -> ir.Node:
    """``Split`` of ``value``'s last axis into ``widths`` (sizes as an input from opset 13, else an attribute)."""
    inputs: list[ir.Value | None] = [value]
    attributes: dict[str, object] = {"axis": -1}
    if editor.opset >= 13:
        inputs.append(editor.initializer(f"{name}.split_sizes", np.array(widths, np.int64)))
    else:
        attributes["split"] = widths
    node = editor.node(
        "Split", inputs, name=f"{name}.split", outputs=[f"{old.name or name}.split" for old in olds],
        attributes=attributes, before=before,
    )  # fmt: skip
    for out, old in zip(node.outputs, olds, strict=True):
        if old.dtype is not None:  # (an unannotated value stays unannotated)
            out.dtype = old.dtype
        out.shape = old.shape
    return node


def _take_over(editor: GraphEditor, sibling: _Sibling, new: ir.Value) -> None:
    """``new`` replaces the sibling's output; the sibling's nodes and constants go, and ``new``
    takes the old value's name so that dumps, statistics and graph outputs read the same."""
    old = sibling.output
    name, was_output = old.name, old.is_graph_output()
    editor.replace_value(old, new)  # a graph output passes its name on here
    for node in (sibling.bias_add, sibling.node):
        if node is not None:
            editor.remove(node)
    for value in sibling.constants.values():
        editor.retire(value)
    if not was_output and name:
        new.name = name  # the old value is detached now: its name is free for the new one


def _attention_order(siblings: list[_Sibling]) -> list[_Sibling] | None:
    """The siblings as query, key, value when their outputs are exactly one GroupQueryAttention's
    inputs 0, 1, 2 (the packed-QKV order), else None."""
    found = _gqa_reading([sibling.output for sibling in siblings])
    if found is None or sorted(found[1]) != [0, 1, 2]:
        return None
    by_slot = dict(zip(found[1], siblings, strict=True))
    return [by_slot[0], by_slot[1], by_slot[2]]


def _gqa_reading(values: Sequence[ir.Value]) -> tuple[ir.Node, list[int]] | None:
    """The GroupQueryAttention that reads each of three values once, and nothing else reads
    them (none a graph output), with the input slot each goes to; else None."""
    if len(values) != 3:
        return None
    slots: list[int] = []
    reader: ir.Node | None = None
    for value in values:
        uses = list(value.uses())
        if value.is_graph_output() or len(uses) != 1 or not _is_gqa(uses[0].node):
            return None
        if reader is not None and uses[0].node is not reader:
            return None
        reader = uses[0].node
        slots.append(uses[0].idx)
    assert reader is not None
    return reader, slots


def _is_gqa(node: ir.Node) -> bool:
    return node.domain == MS_DOMAIN and node.op_type == "GroupQueryAttention"


def _pack_into_attention(editor: GraphEditor, merged: _Merged) -> bool:
    """Feed the wide output to GroupQueryAttention as its packed query, if the Split's outputs are
    exactly its query, key and value and read by nothing else; drop the Split then."""
    found = _gqa_reading(merged.outputs)
    if found is None or found[1] != [0, 1, 2]:
        return False
    gqa = found[0]
    heads, kv_heads = (
        int(gqa.attributes[a].value) if a in gqa.attributes else None
        for a in ("num_heads", "kv_num_heads")
    )
    if heads is None or kv_heads is None:
        return False
    q_width, k_width, v_width = merged.widths
    # the kernel reads the packed width as (heads + 2 * kv_heads) * head_dim
    if q_width % heads or k_width != v_width or k_width * heads != q_width * kv_heads:
        return False
    gqa.replace_input_with(0, merged.output)
    gqa.replace_input_with(1, None)
    gqa.replace_input_with(2, None)
    editor.mark(gqa)
    editor.remove(merged.split)
    return True


# ----------------------------------------------------------------------------- pure helpers


def concat_columns(arrays: Sequence[np.ndarray], widths: Sequence[int], axis: int) -> np.ndarray:
    """The arrays of several linears as one linear's: concatenated along their output-column axis.

    ``axis=1``: float weights ``[K, N_i]``. ``axis=0``: per-column tensors whose leading axis is
    ``N_i`` or which are flat in column order (``MatMulNBits``' B, scales, zero points, biases):
    each is read as ``[N_i, rest]``, and the result has the first array's rank.
    """
    if axis == 1:
        return np.concatenate([np.asarray(a) for a in arrays], axis=1)
    rows = [np.asarray(a).reshape(n, -1) for a, n in zip(arrays, widths, strict=True)]
    if len({r.shape[1] for r in rows}) != 1 or len({r.dtype for r in rows}) != 1:
        raise ValueError(
            f"concat_columns: per-column sizes or dtypes differ: {[(r.shape, r.dtype) for r in rows]}"
        )
    stacked = np.concatenate(rows, axis=0)
    first = np.asarray(arrays[0])
    return stacked.reshape(sum(widths), *first.shape[1:]) if first.ndim > 1 else stacked.reshape(-1)


def merged_name(names: Sequence[str]) -> str:
    """One name for several: their common start and end around the parts that differ, joined by
    ``_`` (``a.q_proj.w``, ``a.k_proj.w`` -> ``a.q_k_proj.w``); cuts fall on ``.``, ``/`` or ``_``."""
    names = list(names)
    if len(set(names)) == 1:
        return f"{names[0]}.merged"
    separators = "./_"
    start = _common_prefix(names)
    start = start[: max(start.rfind(c) for c in separators) + 1]
    end = _common_prefix([n[::-1] for n in names])[::-1]
    cut = [end.find(c) for c in separators if c in end]
    end = end[min(cut) :] if cut else ""
    if len(start) + len(end) > min(len(n) for n in names):
        end = ""
    middles = [n[len(start) : len(n) - len(end)] for n in names]
    return start + "_".join(m for m in middles if m) + end


def _common_prefix(names: Sequence[str]) -> str:
    first, last = min(names), max(names)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[:i]
