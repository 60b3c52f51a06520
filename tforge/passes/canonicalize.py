"""canonicalize: put an exported graph in the one form the block map and every later pass read.

- optional static input shapes (``input_ids:8x128``), applied to every input sharing a symbol;
- ``Gemm`` with a constant right operand becomes ``MatMul`` + ``Add`` so that every linear looks
  the same (GPT-2's Conv1D and ViT's classifier export as Gemm);
- a decomposed LayerNorm (ReduceMean/Sub/Pow/.../Div) is fused into ``LayerNormalization``;
  RMSNorm stays the recognised pattern ``gamma * (x * 1/sqrt(mean(x^2) + eps))`` because opsets
  below 23 have no RMSNormalization op and ONNX Runtime fuses that pattern itself;
- constant folding, common-subexpression and dead-code elimination (onnxscript's optimizer),
  reading back the shapes a graph computes from ``Shape`` at run time but fixes statically (see
  ``_ShapeReadingFolder``): the TorchScript export's head splits get their static dims and its
  ``rotate_half`` bounds become constants (SmolLM2's cache export: 3,750 -> 3,060 nodes);
- torch's SDPA export's batched transpose of K's last two axes (``Reshape`` to ``[b*h, s, d]``,
  ``Transpose``, ``Reshape`` back) becomes one ``Transpose``, which ONNX Runtime folds into the
  scores ``MatMul`` (see ``_unbatch_last_two_axes_transposes``);
- the NaN guard ``Where(IsNaN(p), 0, p)`` after an attention ``Softmax`` is dropped when the
  Softmax input is built only from matmul products and finite constants (see
  ``_drop_softmax_nan_guards``): torch's SDPA export adds it to every layer although its
  boolean mask becomes the finite ``finfo.min``, and it cost 7% of MiniLM's latency;
- a two-input ``Sum`` becomes ``Add`` (undoing ``ort-layernorm``: the block map reads residual adds);
- initializers named after the module parameter they were folded from, so dumps stay readable.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import re
from collections import Counter
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import _constant_folding
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.fusion import _layer_norm

from tforge.compiler.pass_infra import Pass, PassResult, Property, mark_provenance
from tforge.compiler.registry import register_pass
from tforge.compiler.rewrite import GraphEditor, replace_value
from tforge.compiler.shape_reading import reshape_extents, reshape_output_is, shape_elements
from tforge.compiler.structure import nan_guarded_softmax
from tforge.errors import PassConfigError

logger = logging.getLogger(__name__)

_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"
_SHAPE = re.compile(r"^\d+(x\d+)*$")
_MADE_UP = re.compile(r"^unk__\d+$")
# Only the LayerNorm rule: onnxscript's LN+bias rule would also absorb a residual Add that follows
# a bias-less LayerNorm; _fold_layernorm_bias below folds only constant 1-D biases.
_LAYER_NORM_FUSION = pattern.RewriteRuleSet([_layer_norm.LayerNormFusion.rule()])


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8x128"`` -> ``(8, 128)``."""
    if not _SHAPE.match(text):
        raise PassConfigError(f"canonicalize: input shape {text!r} is not of the form 8x128")
    return tuple(int(d) for d in text.split("x"))


@register_pass("canonicalize")
@dataclasses.dataclass(frozen=True)
class Canonicalize(Pass):
    """Fold constants, remove dead code, fuse decomposed norms, unify linears; optionally fix input shapes."""

    input_shapes: dict[str, str] = dataclasses.field(default_factory=dict)
    fold_size_limit: int = 1 << 22  # elements; larger constant subgraphs stay as ops
    # A tied LM head reads the embedding through a runtime Transpose; materialising it makes the
    # head an ordinary linear that passes can see (costs one more copy of the embedding).
    untie_weights: bool = True

    establishes: ClassVar = frozenset({Property.CANONICAL})
    invalidates: ClassVar = frozenset({Property.CALIBRATED})

    def __post_init__(self) -> None:
        for shape in self.input_shapes.values():
            parse_shape(shape)
        if self.fold_size_limit <= 0:
            raise PassConfigError(f"canonicalize: fold-size-limit must be positive, got {self.fold_size_limit}")

    def run(self, model: ir.Model) -> PassResult:
        stats: Counter[str] = Counter()
        before = _fingerprint(model)
        if self.input_shapes:
            stats["inputs made static"] = self._apply_static_shapes(model)
        stats["gemm -> matmul+add"] = _gemm_to_matmul(model)
        stats["sum -> add"] = _two_input_sum_to_add(model)
        stats["flatten around linear removed"] = _drop_flatten_around_linears(model)
        if self.untie_weights:
            stats["tied weights untied"] = _untie_transposed_weights(model)
        _optimize(model, self.fold_size_limit)
        stats["layernorm fused"] = _LAYER_NORM_FUSION.apply_to_model(model)
        stats["layernorm bias folded"] = _fold_layernorm_bias(model)
        stats["softmax NaN guard dropped"] = _drop_softmax_nan_guards(model)
        stats["last-two-axes transpose unbatched"] = _unbatch_last_two_axes_transposes(model)
        if any(stats[k] for k in ("layernorm fused", "layernorm bias folded", "softmax NaN guard dropped",
                                  "last-two-axes transpose unbatched")):  # fmt: skip
            common_passes.RemoveUnusedNodesPass()(model)
        stats["initializers renamed"] = _name_folded_initializers(model)
        common_passes.TopologicalSortPass()(model)
        stats = Counter({k: v for k, v in stats.items() if v})
        return PassResult(model, changed=_fingerprint(model) != before, stats=stats)

    def _apply_static_shapes(self, model: ir.Model) -> int:
        inputs = {v.name: v for v in model.graph.inputs}
        symbols: dict[str, int] = {}
        for name, text in self.input_shapes.items():
            if name not in inputs:
                raise PassConfigError(
                    f"canonicalize: input shape given for {name!r}, but the model's inputs are "
                    f"{', '.join(inputs)}"
                )
            dims = parse_shape(text)
            value = inputs[name]
            if value.shape is not None and len(value.shape) != len(dims):
                raise PassConfigError(
                    f"canonicalize: input {name!r} has rank {len(value.shape)} "
                    f"({value.shape}), but the shape given is {text}"
                )
            for old, new in zip(value.shape or (), dims, strict=False):
                if isinstance(old, int) and old != new:
                    raise PassConfigError(
                        f"canonicalize: input {name!r} dimension is fixed to {old}, cannot set {new}"
                    )
                if isinstance(old, ir.SymbolicDim) and old.value is not None:
                    symbols[old.value] = new
        changed = 0
        for value in model.graph.inputs:
            if value.shape is None:
                continue
            new_dims = [
                symbols.get(d.value, d) if isinstance(d, ir.SymbolicDim) and d.value else d
                for d in value.shape
            ]
            if value.name in self.input_shapes:
                new_dims = list(parse_shape(self.input_shapes[value.name]))
            if any(not isinstance(d, int) for d in new_dims):
                continue
            value.shape = ir.Shape(new_dims)
            changed += 1
        # The exporter's symbolic annotations on intermediate values are now stale: infer again.
        for node in model.graph:
            for out in node.outputs:
                if out not in model.graph.outputs:
                    out.shape = None
        for out in model.graph.outputs:
            out.shape = None
        common_passes.ShapeInferencePass()(model)
        return changed


def _fingerprint(model: ir.Model) -> tuple:
    return (
        tuple((n.op_type, tuple(id(v) for v in n.inputs)) for n in model.graph),
        tuple(model.graph.initializers),
        tuple(str(v.shape) for v in model.graph.inputs),
    )


def _optimize(model: ir.Model, size_limit: int) -> None:
    """onnxscript's ``optimizer.optimize``, with its multi-output rewrite rules run once, at the end.

    The same passes in the same order (onnxscript 0.7.2, pinned), except one thing: a rule whose
    pattern has several output nodes (SlicesSplit: two Slices of one input -> Split) rebuilds an
    op-type index of the whole graph for every candidate node, which is quadratic in the graph's
    size (the TorchScript export of SmolLM2 with a KV cache: 7,673 nodes, over 100 million node
    visits, 150 s of 160). Run after the folding loop, on the folded graph, it finds the same
    pairs at a fraction of the cost.
    """
    from onnxscript import rewriter

    rules = rewriter._DEFAULT_REWRITE_RULES
    single = [r for r in rules if getattr(r, "_target_pattern", None) is None or r._target_pattern.has_single_output_node]
    multi = [r for r in rules if r not in single]
    loop = ir.passes.PassManager(
        [
            _ShapeReadingFolder(
                shape_inference=True, input_size_limit=size_limit, output_size_limit=size_limit
            ),
            rewriter.RewritePass([_OpGuardedRule(r) for r in single]),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.RemoveUnusedFunctionsPass(),
            common_passes.RemoveUnusedOpsetsPass(),
        ],
        steps=2,
        early_stop=True,
    )
    passes = [common_passes.InlinePass(), loop]
    ir.passes.Sequential(*passes)(model)
    if multi:  # SlicesSplit only (checked below): found in linear time
        if [r.name for r in multi] != ["SlicesSplit"]:
            raise RuntimeError(f"canonicalize: unexpected multi-output rewrite rules {[r.name for r in multi]}")
        _slices_to_split(model)
    passes = [
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    ]
    ir.passes.Sequential(*passes)(model)


# ----------------------------------------------------------------------------- run-time shapes


class _ShapeReadingFolder(_constant_folding.FoldConstantsPass):
    """onnxscript's constant folder, reading the shapes a graph fixes though it computes them at run time.

    The TorchScript exporter writes every head split as ``Reshape(x, Concat(Shape(h)[0],
    Shape(h)[1], -1, head_dim))`` and every ``rotate_half`` bound as ``Shape(q)[-1] / 2``.
    ONNX's per-node shape inference (what the folder runs on each node, in graph order) does not
    read a run-time target, so the heads come out ``[?, ?, ?, ?]``, and the folder folds a
    ``Gather`` of a shape only for 1-D indices: the bounds stay ops, the head dim unknown. Two
    additions, inside the same sweep so that what one node proves reaches every later node:

    - a ``Reshape``'s output gets the dims its target proves, where its annotation does not know
      them (:func:`~tforge.compiler.shape_reading.reshape_extents`: constants, dims read with
      ``Shape`` from annotated shapes, ``0`` copies, ``-1`` solved, the dims the target copies
      from the input cancelling out, named or not); a known dim is never changed;
    - a ``Gather`` from a shape vector whose picked elements are all integers is folded to them.

    The subclass hooks two methods of the pinned onnxscript (0.7.2), as ``_optimize`` does.
    """

    def _do_inference(self, node: ir.Node) -> None:
        super()._do_inference(node)
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx") and len(node.inputs) > 1:
            extents = reshape_extents(node)
            if extents is not None:
                _refine_shape(node.outputs[0], [_as_dim(e) for e in extents])

    def process_node(self, node: ir.Node, is_function: bool) -> _constant_folding.Replacement | None:
        replacement = super().process_node(node, is_function)
        if replacement is not None or is_function or node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            return replacement
        picked = shape_elements(node.outputs[0]) if _shape_vector(node.inputs[0]) else None
        indices = _const(node.inputs[1]) if len(node.inputs) > 1 else None
        if picked is None or indices is None or not all(isinstance(e, tuple) and not e[1] for e in picked):
            return None
        array = np.array([e[0] for e in picked], np.int64).reshape(indices.shape)  # type: ignore[index]
        folded = self.new_initializer(node, array)
        if folded is None or node.graph is None:
            return None
        node.graph.register_initializer(folded)
        return _constant_folding.Replacement([folded], [])


def _shape_vector(value: ir.Value | None) -> bool:
    """An int64 vector (what ``Shape`` makes): a Gather of it along axis 0 picks elements."""
    return value is not None and value.dtype == ir.DataType.INT64 and value.shape is not None and value.shape.rank() == 1


def _as_dim(extent: tuple[int, tuple[str, ...]] | None) -> int | ir.SymbolicDim | None:
    """An extent as a dim: an integer, or one named dim alone; None for other products."""
    if extent is None:
        return None
    number, symbols = extent
    if not symbols:
        return number
    return ir.SymbolicDim(symbols[0]) if number == 1 and len(symbols) == 1 else None


def _unknown(dim: int | ir.SymbolicDim | None) -> bool:
    """No dim, an unnamed one, or a name ONNX's shape inference made up for an unknown (``unk__3``)."""
    return dim is None or (isinstance(dim, ir.SymbolicDim) and (not dim.value or _MADE_UP.match(dim.value) is not None))


def _refine_shape(value: ir.Value, dims: list[int | ir.SymbolicDim | None]) -> None:
    """Fill in ``value``'s unknown dims from ``dims`` (same rank); a known dim is never changed."""
    if value.shape is not None and value.shape.rank() != len(dims):
        return
    old = list(value.shape.dims) if value.shape is not None else [None] * len(dims)
    new = [d if _unknown(o) and not _unknown(d) else o for o, d in zip(old, dims, strict=True)]
    if any(n is not o for n, o in zip(new, old, strict=True)):
        value.shape = ir.Shape([ir.SymbolicDim(None) if d is None else d for d in new])


class _OpGuardedRule:
    """A single-output rewrite rule that is not tried on a node of another op type.

    onnxscript's rule set tries every rule on every node (46 rules x 7,600 nodes per step on
    SmolLM2's TorchScript cache export: 4 of canonicalize's 6 s), and each try builds a match
    state before it compares op types. A single-output pattern matches only at a node of its
    output op, so checking that first changes no result: same rules, same order, same nodes.
    """

    def __init__(self, rule: object) -> None:
        self._rule = rule
        target = getattr(rule, "_target_pattern", None)
        identifier = target.output_nodes[0].op_identifier() if target is not None else None
        self._op_type = identifier[1] if identifier is not None else None  # None: tried everywhere

    def __getattr__(self, name: str) -> object:
        return getattr(self._rule, name)

    def try_rewrite(self, model: ir.Model, graph: object, node: ir.Node, **kwargs: object) -> object:
        if self._op_type is not None and node.op_type != self._op_type:
            return None
        return self._rule.try_rewrite(model, graph, node, **kwargs)  # type: ignore[attr-defined]


def _slices_to_split(model: ir.Model) -> int:
    """``Slice(x, [0], [L/2], [-1])`` and ``Slice(x, [L/2], [L], [-1])`` -> ``Split(x, num_outputs=2, axis=-1)``.

    What onnxscript's SlicesSplit rule rewrites (the halves of the last axis of a known length
    ``L``; axes given as one constant, ``-1`` or ``rank - 1``; no steps input), found from each
    value's own Slice readers instead of from every pair of Slices in the graph.
    """
    graph = model.graph
    readers: dict[int, list[ir.Node]] = {}
    for node in graph:
        if node.op_type == "Slice" and node.domain in ("", "ai.onnx") and len(node.inputs) == 4 and node.inputs[0] is not None:
            readers.setdefault(id(node.inputs[0]), []).append(node)
    count = 0
    for nodes in readers.values():
        if len(nodes) < 2:
            continue
        x = nodes[0].inputs[0]
        if x is None or x.shape is None or not isinstance(x.shape[-1], int):
            continue
        length, rank = int(x.shape[-1]), len(x.shape)
        lower = upper = None
        for node in nodes:
            bounds = _last_axis_bounds(node, rank)
            if bounds == (0, length // 2) and lower is None:
                lower = node
            elif bounds == (length // 2, length) and upper is None:
                upper = node
        if lower is None or upper is None or any(o.is_graph_output() for o in (*lower.outputs, *upper.outputs)):
            continue
        split = ir.node("Split", [x], attributes={"num_outputs": 2, "axis": -1}, num_outputs=2)
        # Before the earlier of the two Slices: readers of either half may follow it.
        graph.insert_before(lower if _position(graph, lower) < _position(graph, upper) else upper, split)
        for old, new in ((lower.outputs[0], split.outputs[0]), (upper.outputs[0], split.outputs[1])):
            new.shape, new.type = old.shape, old.type
            replace_value(old, new)
        graph.remove(lower, safe=True)
        graph.remove(upper, safe=True)
        count += 1
    return count


def _last_axis_bounds(node: ir.Node, rank: int) -> tuple[int, int] | None:
    starts, ends, axes = (_const(v) for v in node.inputs[1:4])
    if starts is None or ends is None or axes is None or axes.size != 1 or starts.size != 1 or ends.size != 1:
        return None
    if int(axes.reshape(())) not in (-1, rank - 1):
        return None
    return int(starts.reshape(())), int(ends.reshape(()))


def _position(graph: ir.Graph, node: ir.Node) -> int:
    return next(i for i, n in enumerate(graph) if n is node)


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _two_input_sum_to_add(model: ir.Model) -> int:
    count = 0
    for node in list(model.graph):
        if node.op_type == "Sum" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2:
            GraphEditor(model, "canonicalize").retype(node, "Add")
            count += 1
    return count


def _gemm_to_matmul(model: ir.Model) -> int:
    """Gemm(A, B, C) with constant B, alpha=beta=1, transA=0 -> MatMul(A, B') + C."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        b = _const(node.inputs[1])
        if (
            b is None
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
            or attrs.get("transA", 0)
        ):
            continue
        weight = b.T.copy() if attrs.get("transB", 0) else b
        src = node.inputs[1]
        w_value = ir.Value(
            name=f"{src.name}_t" if attrs.get("transB", 0) else src.name + "_w",
            shape=ir.Shape(weight.shape),
            type=ir.TensorType(ir.DataType.from_numpy(weight.dtype)),
            const_value=ir.tensor(weight),
        )
        model.graph.register_initializer(w_value)
        matmul = ir.node("MatMul", [node.inputs[0], w_value], name=f"{node.name}_matmul")
        new_nodes = [matmul]
        result = matmul.outputs[0]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            add = ir.node("Add", [result, node.inputs[2]], name=f"{node.name}_bias")
            new_nodes.append(add)
            result = add.outputs[0]
        out = node.outputs[0]
        result.shape, result.type = out.shape, out.type
        for n in new_nodes:
            mark_provenance(n, "canonicalize")
        model.graph.insert_after(node, new_nodes)
        replace_value(out, result)
        model.graph.remove(node, safe=True)
        count += 1
    return count


def _untie_transposed_weights(model: ir.Model) -> int:
    """``MatMul(x, Transpose(W))`` with a 2-D initializer W -> ``MatMul(x, W_t)`` with W_t constant.

    The constant folder leaves these alone when W is large (a tied embedding of 49152 x 576);
    folding them explicitly, whatever their size, makes every linear a MatMul by a constant.
    """
    count = 0
    for node in list(model.graph):
        if node.op_type != "Transpose" or node.inputs[0] is None:
            continue
        weight = node.inputs[0]
        perm = node.attributes.get("perm")
        if (
            not weight.is_initializer()
            or weight.const_value is None
            or weight.shape is None
            or len(weight.shape) != 2
            or (perm is not None and list(perm.value) != [1, 0])
        ):
            continue
        readers = list(node.outputs[0].uses())
        if not readers or any(u.node.op_type != "MatMul" or u.idx != 1 for u in readers):
            continue
        array = np.ascontiguousarray(weight.const_value.numpy().T)
        name = f"{weight.name}_t"
        if name in model.graph.initializers:
            continue
        folded = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=weight.type,
            const_value=ir.tensor(array, name=name),
        )
        mark_provenance(folded, "canonicalize")
        model.graph.register_initializer(folded)
        node.outputs[0].replace_all_uses_with(folded)
        model.graph.remove(node, safe=True)
        count += 1
    return count


def _unbatch_last_two_axes_transposes(model: ir.Model) -> int:
    """``Reshape(x, [prod(lead), s, d]) -> Transpose([0, 2, 1]) -> Reshape([*lead, d, s])`` ->
    ``Transpose(x, [.., -1, -2])``.

    torch's export of ``scaled_dot_product_attention`` transposes K this way (the scores need
    K^T), in every layer. As one Transpose of the last two axes ONNX Runtime folds it into the
    scores MatMul (``FusedMatMul`` with ``transB``): MiniLM runs one Transpose of
    ``[b, heads, s, d]`` less per layer, about 3% of its int8 time. Applied only when the targets,
    read from the shapes they are computed from, prove both Reshapes for any run-time dims.
    """
    count = 0
    editor = GraphEditor(model, "canonicalize")
    for transpose in list(model.graph):
        perm = transpose.attributes.get("perm")
        if transpose.op_type != "Transpose" or perm is None or list(perm.value) != [0, 2, 1]:
            continue
        merge = transpose.inputs[0].producer() if transpose.inputs[0] is not None else None
        users = list(transpose.outputs[0].uses())
        if merge is None or merge.op_type != "Reshape" or len(users) != 1 or users[0].node.op_type != "Reshape":
            continue
        split, source = users[0].node, merge.inputs[0]
        rank = len(source.shape) if source is not None and source.shape is not None else 0
        if users[0].idx != 0 or rank < 3 or len(list(merge.outputs[0].uses())) != 1:
            continue
        lead = [[a] for a in range(rank - 2)]
        if not (
            reshape_output_is(merge, source, [list(range(rank - 2)), [rank - 2], [rank - 1]])
            and reshape_output_is(split, source, [*lead, [rank - 1], [rank - 2]])
        ):
            continue
        out = split.outputs[0]
        swapped = editor.op(
            "Transpose", [source], name=f"{split.name}.transposed",
            attributes={"perm": [*range(rank - 2), rank - 1, rank - 2]}, before=split,
            dtype=out.dtype, shape=None if out.shape is None else ir.Shape(list(out.shape.dims)),
        )  # fmt: skip
        replace_value(out, swapped)
        count += 1
    return count


def _drop_flatten_around_linears(model: ir.Model) -> int:
    """``Reshape(x, [-1, K]) -> MatMul(W) [-> Add(b)] -> Reshape(back)`` -> ``MatMul(x, W) [+ b]``.

    GPT-2's Conv1D (``addmm`` on a flattened input) exports this way; MatMul broadcasts over the
    leading dims, so the two Reshapes are only noise for the block map and the passes. Applied
    only when the annotated shapes prove the second Reshape restores the first one's leading dims.
    """
    count = 0
    for matmul in list(model.graph):
        if matmul.op_type != "MatMul" or _const(matmul.inputs[1]) is None:
            continue
        flatten = matmul.inputs[0].producer() if matmul.inputs[0] is not None else None
        if flatten is None or flatten.op_type != "Reshape" or len(list(flatten.outputs[0].uses())) != 1:
            continue
        source = flatten.inputs[0]
        end = matmul.outputs[0]
        users = list(end.uses())
        if len(users) == 1 and users[0].node.op_type == "Add":
            bias = _const(users[0].node.inputs[1 - users[0].idx])
            if bias is not None and bias.ndim == 1:
                end = users[0].node.outputs[0]
                users = list(end.uses())
        if len(users) != 1 or users[0].node.op_type != "Reshape" or users[0].idx != 0:
            continue
        unflatten = users[0].node
        src_shape, out_shape = source.shape if source else None, unflatten.outputs[0].shape
        if src_shape is None or out_shape is None or len(src_shape) != len(out_shape) or len(src_shape) < 2:
            continue
        leading_match = all(
            a == b and not (isinstance(a, ir.SymbolicDim) and a.value is None)
            for a, b in zip(src_shape[:-1], out_shape[:-1], strict=True)
        )
        if not leading_match:
            continue
        matmul.replace_input_with(0, source)
        for node in (matmul, end.producer()):
            node.outputs[0].shape = ir.Shape([*src_shape[:-1], out_shape[-1]])
        replace_value(unflatten.outputs[0], end)
        model.graph.remove(unflatten, safe=True)
        if not list(flatten.outputs[0].uses()):
            model.graph.remove(flatten, safe=True)
        mark_provenance(matmul, "canonicalize")
        count += 1
    return count



def _fold_layernorm_bias(model: ir.Model) -> int:
    """LayerNormalization(x, g) + b with a constant 1-D b -> LayerNormalization(x, g, b)."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "LayerNormalization" or (len(node.inputs) > 2 and node.inputs[2] is not None):
            continue
        out = node.outputs[0]
        users = list(out.uses())
        if len(users) != 1 or out in model.graph.outputs:
            continue
        add = users[0].node
        if add.op_type != "Add":
            continue
        other = add.inputs[1 - users[0].idx]
        bias = _const(other)
        gamma = node.inputs[1]
        if bias is None or bias.ndim != 1 or gamma is None or gamma.shape is None or bias.shape[0] != gamma.shape[0]:
            continue
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, other)
        replace_value(add.outputs[0], out)
        mark_provenance(node, "canonicalize")
        count += 1
    return count


# Ops through which a Softmax input stays finite when every constant it reads is finite and the
# activations are (overflow aside): products, sums, selections and pure data movement.
_FINITE_PRESERVING = frozenset(
    {"MatMul", "Add", "Sub", "Mul", "Where", "Cast", "Reshape", "Expand", "Unsqueeze",
     "Squeeze", "Slice", "Transpose", "Identity", "Concat"}
)  # fmt: skip


def _softmax_input_is_finite(value: ir.Value, limit: int = 64) -> bool:
    """Whether a Softmax input can only be non-finite through non-finite activations or overflow.

    Walks back from ``value`` until the activations a MatMul reads. Every constant on the way must
    be finite, and every op one of ``_FINITE_PRESERVING``: a ``Div`` (by zero) or a ``-inf`` mask
    stops the walk. Other activation sources (a graph input, an unlisted op) give False.
    """
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if len(seen) > limit:
            return False
        array = _const(v)
        if array is not None:
            if array.dtype.kind in "fc" and not np.isfinite(array).all():
                return False
            continue
        node = v.producer()
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _FINITE_PRESERVING:
            return False
        if node.op_type == "MatMul":
            continue  # the scores: a product of activations, finite unless they are not
        if node.op_type == "Where":
            stack.extend(i for i in node.inputs[1:] if i is not None)  # the condition is boolean
        elif node.op_type in ("Reshape", "Expand", "Slice", "Unsqueeze", "Squeeze"):
            stack.append(node.inputs[0])  # the other inputs are shapes and indices
        else:
            stack.extend(i for i in node.inputs if i is not None)
    return True


def _drop_softmax_nan_guards(model: ir.Model) -> int:
    """``Where(IsNaN(p), 0, p)`` with ``p = Softmax(s)`` -> ``p`` when ``s`` is finite by construction.

    A Softmax row is NaN only when its input holds NaN or +inf, or is -inf everywhere (a fully
    masked row with a ``-inf`` mask). torch's SDPA export guards every attention against the last
    case, but writes its boolean mask as ``Where(mask, 0, finfo.min)``: a fully masked row then
    softmaxes to a uniform row, never NaN. With every constant on the way finite, the guard can
    fire only if the scores themselves are non-finite (activations that are already inf or NaN,
    or an overflow past 3.4e38); outputs for all other inputs are unchanged bit for bit. Only
    float32 and float64 Softmaxes qualify: in float16 the mask itself sits at the edge of the range.
    """
    count = 0
    for node in list(model.graph):
        softmax = nan_guarded_softmax(node)
        if (
            softmax is None
            # float16: finfo.min + a score below -16 already overflows to -inf, so a fully
            # masked row can be all -inf and NaN; float32 needs scores beyond 1e31
            or softmax.inputs[0].dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE)
            or not _softmax_input_is_finite(softmax.inputs[0])
        ):
            continue
        replace_value(node.outputs[0], softmax.outputs[0])
        count += 1
    return count


def _name_folded_initializers(model: ir.Model) -> int:
    """Rename ``val_127`` to ``model.layers.0.self_attn.q_proj.weight_t`` when folded from one parameter."""
    renamed = 0
    taken = set(model.graph.initializers)
    for name, value in list(model.graph.initializers.items()):
        raw = value.metadata_props.get(_FOLDED_FROM)
        if not raw or not name.startswith("val_"):
            continue
        try:
            sources = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            continue
        if len(sources) != 1:
            continue
        new_name = f"{sources[0]}_t"
        if new_name in taken:
            continue
        try:
            value.name = new_name  # the initializers dict follows the value's name
        except ValueError:
            continue
        taken.discard(name)
        taken.add(new_name)
        renamed += 1
    return renamed
