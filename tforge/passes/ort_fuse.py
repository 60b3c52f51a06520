"""ort-fuse: lower a transformer to ONNX Runtime's fused CPU kernels (decoders with a KV cache, encoders).

Decoding one token at batch 1 on the CPU is bound by the number of nodes ORT runs per token, not
by arithmetic. This pass ends a pipeline (after compression and quantization) and rewrites:

- **RMSNorm** (``g * (x * 1/sqrt(mean(x^2) + eps))``, decomposed into 6-7 nodes, as the block
  map's ``Norm(kind="rms")`` records it) into ``SimplifiedLayerNormalization`` (ORT's kernel,
  registered in the default domain), option ``norms``; and the residual ``Add`` in front of one
  into ``com.microsoft.SkipSimplifiedLayerNormalization`` (its fourth output is the sum, which
  the next residual add reads), option ``skip-norms``.
- **Attention with a KV cache** (rotary on Q and K, ``Concat(past, new)`` -> present, repeat-kv
  for grouped-query attention, scores, additive mask, Softmax, context, head merge: about 45
  nodes a layer in the dynamo export, about 80 in the TorchScript one) into one
  ``com.microsoft.GroupQueryAttention`` with ``do_rotary=1``, reading the Q/K/V projections'
  outputs, the past tensors (``[batch, kv_heads, past, head_dim]``, as exported) and writing the
  present ones, option ``attention``. The head merge is proven as the encoder fusion's is
  (:func:`~tforge.compiler.attention_paths.merge_heads`), run-time ``Reshape`` targets included.
- **Attention without a KV cache** (encoders such as BERT/MiniLM and ViT; also a decoder run
  without a cache): the core between the Q/K/V values and the output projection's input (head
  split, K^T, scale, additive mask, Softmax, probs @ V, head merge: about 20 nodes a layer) into
  one ``com.microsoft.MultiHeadAttention``, option ``encoder-attention`` (off by default). The projections stay
  as they are, float ``MatMul`` + bias or int8 ``MatMulIntegerToFloat`` alike (the op reads
  their ``[batch, seq, width]`` outputs). The graph's own additive mask is the op's
  ``attention_bias`` (``Expand``-ed to ``[.., .., seq, total]`` once per graph when it broadcasts
  over queries: ORT does not broadcast those two dims), so padding (and causality, if the mask
  holds it) is exactly as before; ``scale`` is set when the graph's differs from
  ``1/sqrt(head_dim)``. No mask (ViT): ORT's CPU flash-attention path. The layout is proven by
  :func:`~tforge.compiler.attention_paths.attention_core` (which logical axes each axis holds,
  through run-time ``Reshape`` targets); anything else is a skip with its reason: rotary, repeat-kv
  (grouped-query attention), a scale applied after the mask, a NaN guard, another head layout.
  A site reads a KV cache when its scores' K operand comes from a ``Concat`` that is a graph
  output; those go to the ``attention`` fusion, the others to this one. Measured on MiniLM
  (2 cores, ORT 1.31, under load): at 8 x 128 the fused graph ran as fast as the unfused one
  within noise (float and w8a8; ORT's CPU kernel with a mask does what the unfused graph does,
  with the same GEMMs), at batch 1 2-6% faster; without a mask ORT's flash-attention path is
  about 13% faster per attention. Hence opt-in, and the presets do not turn it on.

GroupQueryAttention's extra inputs are derived once per graph from the ``attention_mask`` input
``[batch, past + sequence]``: ``total_sequence_length`` is its length and ``seqlens_k`` one less.
The rotary caches ``[max-positions, head_dim/2]`` are the graph's own cos/sin tables, evaluated
for positions ``0 .. max-positions-1`` (so any rotary scaling the exporter baked in is kept) and
checked to be the ``rotate_half`` form; ``position_ids`` is passed through.

Masks (option ``mask``):

- ``bias`` (default): the graph's additive mask (causal and padding) is given to the op as
  ``attention_bias`` and ``seqlens_k = total - 1`` for every row, so padded keys are masked
  exactly as before, left padding included; the mask's subgraph stays (once per graph).
- ``seqlens``: ``seqlens_k = sum(attention_mask) - 1`` per row and no bias: the mask subgraph
  goes away, but only right padding (or none) is handled, as in onnxruntime-genai's models.

The two exports of a cache graph differ, and both are read. Hugging Face's TorchScript export
computes the head splits' targets and the ``rotate_half`` bounds from ``Shape`` at run time
(``canonicalize`` reads them back: static heads, constant bounds), reshapes the context to its
own shape before the merge (a no-op the merge's trace proves), leaves the mask's dims
unannotated (its dim 1, added to ``[batch, heads, seq, total]`` scores, is 1 or heads wherever the
graph runs, for heads > 1), and writes the mask as ``Where(mask, 0, -inf)``, so a NaN guard
``Where(IsNaN(p), 0, p)`` follows each Softmax (``canonicalize`` drops it only for a finite mask).
A guarded site's bias is the mask clamped, ``Max(mask, float32 min)``, once per mask: in a row
with an unmasked key a clamped entry softmaxes to exactly 0, as ``-inf`` does (scores below
1e31), so those rows are as before. A row whose keys are all masked (a left-padded query) is 0
after the guard, and ORT's CPU kernel (1.31, measured) writes 0 for it too, clamped or not: the
same. The clamp is for a kernel that would compute that row as 0/0: its NaN, written to the
present cache, would make every later score reading it NaN (NaN + ``-inf`` is NaN).

Limits of the fused op, ORT's own: with a past, a step of more than one token needs batch 1; on
a first prompt (empty past) the op reads only ``position_ids[0, 0]`` and numbers the tokens on
from it, so rows whose positions are not consecutive (left padding numbered by a cumulative sum)
get other rotary angles than the unfused graph (with ``do_rotary=0``, RotaryEmbedding reads
every position). A row whose keys are all masked is 0 in ORT's kernel, which a graph with a
finite mask (the dynamo export's ``finfo.min``) computes as a uniform average of all the values:
those rows, and the cache entries later layers compute from them, differ; no valid row reads
them (their keys are masked). Positions must stay below ``max-positions``.

The block map gives the norms and, where it recognised the attention, its head counts and
whether it is causal (and, for attention without a cache, rotary, KV heads, the projections and
the output projection's input, which the traced core must match). After ``quantize`` the
projections are integer ops the block map does not read as linears, so it finds no attention;
the site is then read from the graph alone, anchored at each ``Softmax``: head counts from the
cache inputs' static shapes and the head-split ``Reshape``, causality from the mask (a
comparison of two position ranges, or ``Trilu``); without a cache, from the traced layout.
The pass invalidates ``canonical``: the block map reads neither fused op.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from tforge.compiler.attention_paths import (
    AttentionCore,
    attention_core,
    graph_inputs_reached,
    merge_heads,
    peel_scale,
    softmax_score_chain,
    squeeze_axes,
)
from tforge.compiler.ops import (
    COMPARISONS,
    DATA_INPUT_ONLY,
    MS_DOMAIN,
    is_default_domain,
    only_reader,
)
from tforge.compiler.pass_infra import Pass, PassConfigError, PassResult, Property, SiteStats, Skip
from tforge.compiler.registry import register_pass
from tforge.compiler.rewrite import GraphEditor
from tforge.compiler.structure import (
    Attention,
    BlockMap,
    Norm,
    block_map,
    const_array,
    nan_guarded_softmax,
    producers,
    static_dims,
)
from tforge.passes.math.rotary import half_caches
from tforge.runtime.ort import create_session

__all__ = ["OrtFuse"]

# Ops allowed between the present K/V (the cache Concat) and the attention MatMuls: repeat-kv
# (Unsqueeze, Expand, Reshape) and, for K, the transpose to K^T (which the dynamo export writes
# as Reshape -> Transpose -> Reshape).
_KV_LAYOUT = frozenset({"Reshape", "Transpose", "Unsqueeze", "Expand", "Squeeze", "Identity"})
_HEADS_FIRST = (0, 2, 1, 3)  # [batch, seq, heads, dim] <-> [batch, heads, seq, dim]


@register_pass("ort-fuse")
@dataclasses.dataclass(frozen=True)
class OrtFuse(Pass):
    """Fuse RMSNorms and attention into ONNX Runtime's SimplifiedLayerNormalization,
    SkipSimplifiedLayerNormalization, GroupQueryAttention (KV cache) and MultiHeadAttention kernels."""

    attention: bool = True
    encoder_attention: bool = False  # opt-in: measured no faster on MiniLM at 8 x 128 (module doc)
    norms: bool = True
    skip_norms: bool = True
    mask: Literal["bias", "seqlens"] = "bias"
    rotary: Literal["auto", "fused", "separate"] = "auto"
    max_positions: int = 8192

    invalidates: ClassVar = frozenset({Property.CANONICAL})

    def __post_init__(self) -> None:
        if self.mask not in ("bias", "seqlens"):
            raise PassConfigError(f"ort-fuse: mask must be 'bias' or 'seqlens', got {self.mask!r}")
        if self.rotary not in ("auto", "fused", "separate"):
            raise PassConfigError(f"ort-fuse: rotary must be 'auto', 'fused' or 'separate', got {self.rotary!r}")
        if self.max_positions < 1:
            raise PassConfigError(f"ort-fuse: max-positions must be >= 1, got {self.max_positions}")

    def run(self, model: ir.Model) -> PassResult:
        stats = SiteStats()
        editor = GraphEditor(model, self.name)
        found = block_map(model)  # read once, before any edit
        softmaxes = [n for n in model.graph if n.op_type == "Softmax" and is_default_domain(n)]
        reads_cache = {id(n): _reads_cache(n) for n in softmaxes}
        cached = [n for n in softmaxes if reads_cache[id(n)]]
        plain = [n for n in softmaxes if not reads_cache[id(n)]]
        if self.attention:
            _AttentionFusion(self, model, editor, found, stats).run(cached)
        if self.encoder_attention:
            _EncoderAttentionFusion(editor, found, stats).run(plain)
        else:
            for softmax in plain:
                stats.skip(Skip("attention without a KV cache left unfused (encoder-attention=false)", softmax, blocked=False))
        if self.norms or self.skip_norms:
            for norm in found.norms:
                try:
                    self._fuse_norm(editor, norm, stats)
                except Skip as skip:
                    stats.skip(skip)
        removed = _remove_dead_nodes(editor)
        changed = any(stats[k] for k in stats if not k.startswith("skipped"))
        return PassResult(model, changed=changed or removed > 0, stats=stats)

    # ------------------------------------------------------------------ norms

    def _fuse_norm(self, editor: GraphEditor, norm: Norm, stats: SiteStats) -> None:
        if norm.kind != "rms":
            raise Skip("not an RMSNorm (LayerNormalization is left to ort-layernorm)", norm.node, blocked=False)
        if len(norm.nodes) == 1:
            raise Skip("RMSNorm already one operator", norm.node, blocked=False)
        inside = {id(n) for n in norm.nodes}
        for node in norm.nodes[:-1]:
            for out in node.outputs:
                if out.is_graph_output() or any(id(u.node) not in inside for u in out.uses()):
                    raise Skip("an intermediate of the RMSNorm is read elsewhere", node)
        _check_last_axis_mean(norm)
        x = norm.input
        if x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            raise Skip("RMSNorm input is not float", norm.node)
        gamma = norm.gamma
        add = x.producer()
        if self.skip_norms and _is_residual_add(add):
            assert add is not None
            node = editor.node(
                "SkipSimplifiedLayerNormalization", [add.inputs[0], add.inputs[1], gamma],
                name=f"{norm.name}.skip_rms", outputs=[f"{norm.output.name}.fused", f"{norm.name}.mean",
                                                       f"{norm.name}.inv_std", f"{x.name}.fused"],
                attributes={"epsilon": float(norm.epsilon)}, domain=MS_DOMAIN, before=add,
            )  # fmt: skip
            _take_over(editor, norm.output, node.outputs[0])
            _take_over(editor, x, node.outputs[3])
            stats["residual add + RMSNorm -> SkipSimplifiedLayerNormalization"] += 1
            return
        if not self.norms:
            raise Skip("no residual add in front of the RMSNorm (and norms=false)", norm.node, blocked=False)
        node = editor.node(
            "SimplifiedLayerNormalization", [x, gamma], name=f"{norm.name}.rms",
            outputs=f"{norm.output.name}.fused",
            attributes={"epsilon": float(norm.epsilon), "axis": -1, "stash_type": 1}, before=norm.node,
        )  # fmt: skip
        _take_over(editor, norm.output, node.outputs[0])
        stats["RMSNorm -> SimplifiedLayerNormalization"] += 1


def _check_last_axis_mean(norm: Norm) -> None:
    mean = next((n for n in norm.nodes if n.op_type == "ReduceMean"), None)
    if mean is None:
        raise Skip("no ReduceMean in the RMSNorm", norm.node)
    keep = mean.attributes.get("keepdims")
    if keep is not None and int(keep.value) != 1:
        raise Skip("the RMSNorm's ReduceMean drops its axis", mean)
    axes_attr = mean.attributes.get("axes")
    axes = (
        np.asarray(axes_attr.value)
        if axes_attr is not None
        else const_array(mean.inputs[1]) if len(mean.inputs) > 1 else None
    )
    rank = norm.input.shape.rank() if norm.input.shape is not None else None
    if axes is None or axes.size != 1 or int(axes.ravel()[0]) not in (-1, -1 if rank is None else rank - 1):
        raise Skip("the RMSNorm does not reduce over the last axis only", mean)


def _is_residual_add(add: ir.Node | None) -> bool:
    """A two-input Add of two non-constant tensors of the same (annotated) shape."""
    if add is None or add.op_type != "Add" or not is_default_domain(add) or len(add.inputs) != 2:
        return False
    a, b = add.inputs
    if a is None or b is None or const_array(a) is not None or const_array(b) is not None:
        return False
    da, db = static_dims(a), static_dims(b)
    if a.shape is None or b.shape is None or da is None or db is None or len(da) != len(db) or len(da) < 2:
        return False
    return all(x == y for x, y in zip(a.shape.dims, b.shape.dims, strict=True))


def _take_over(editor: GraphEditor, old: ir.Value, new: ir.Value) -> None:
    """``new`` replaces ``old`` everywhere, with its dtype and shape (and its name if a graph output)."""
    new.dtype, new.shape = old.dtype, old.shape
    editor.replace_value(old, new)


# ----------------------------------------------------------------------------- attention


@dataclasses.dataclass(eq=False)
class _Site:
    q: ir.Value  # projection outputs [batch, seq, width]
    k: ir.Value
    v: ir.Value
    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value
    present_value: ir.Value
    output: ir.Value  # the merged context [batch, seq, heads * head_dim]
    anchor: ir.Node  # the head-merge node; the fused op goes before it
    num_heads: int
    kv_heads: int
    head_dim: int
    scale: float
    mask: ir.Value | None
    key_mask: ir.Value
    cos: ir.Value
    sin: ir.Value
    position_ids: ir.Value
    nan_guard: bool  # Where(IsNaN(p), 0, p) after the Softmax: the mask may hold -inf


class _SoftmaxFusion:
    """An attention fusion: every site is read (from its Softmax) before any is rewritten, so a
    rewrite never changes what a later site reads; each site that cannot be fused is a Skip."""

    def __init__(self, editor: GraphEditor, found: BlockMap, stats: SiteStats) -> None:
        self.editor, self.stats = editor, stats
        self.by_softmax: dict[int, Attention] = {
            id(b.attention.softmax): b.attention for b in found.blocks if b.attention is not None
        }

    def run(self, softmaxes: list[ir.Node]) -> None:
        sites = []
        for softmax in softmaxes:
            try:
                sites.append(self._site(softmax))
            except Skip as skip:
                self.stats.skip(skip)
        for site in sites:
            try:
                self._rewrite(site)
            except Skip as skip:
                self.stats.skip(skip)

    def _site(self, softmax: ir.Node) -> Any:
        raise NotImplementedError

    def _rewrite(self, site: Any) -> None:
        raise NotImplementedError


class _AttentionFusion(_SoftmaxFusion):
    def __init__(self, opts: OrtFuse, model: ir.Model, editor: GraphEditor, found: BlockMap, stats: SiteStats) -> None:
        super().__init__(editor, found, stats)
        self.opts, self.model = opts, model
        self.graph = model.graph
        self.caches: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}
        self.lengths: dict[int, tuple[ir.Value, ir.Value]] = {}
        self.finite: dict[int, ir.Value] = {}

    # ------------------------------------------------------------------ reading a site

    def _site(self, softmax: ir.Node) -> _Site:
        axis = softmax.attributes.get("axis")
        if axis is not None and int(axis.value) not in (-1, 3):
            raise Skip("Softmax is not over the last axis", softmax)
        chain = softmax_score_chain(softmax)
        scale, mask, scores = chain.scale, chain.mask, chain.scores
        context, nan_guard = _context_matmul(softmax)
        q_scale, q_rot = peel_scale(scores.inputs[0])
        k_scale, k_t = peel_scale(scores.inputs[1])
        scale *= q_scale * k_scale
        x_q, cos, sin = _rotary(q_rot)
        q, q_split = _heads_split(x_q, "query")
        present_key, k_repeat = _cache_concat(k_t, "key")
        present_value, v_repeat = _cache_concat(context.inputs[1], "value")
        x_k, k_cos, k_sin = _rotary(present_key.producer().inputs[1])  # type: ignore[union-attr]
        if k_cos is not cos or k_sin is not sin:
            raise Skip("Q and K are rotated with different tables", present_key.producer())
        k, k_split = _heads_split(x_k, "key")
        v, v_split = _heads_split(present_value.producer().inputs[1], "value")  # type: ignore[union-attr]
        past_key = present_key.producer().inputs[0]  # type: ignore[union-attr]
        past_value = present_value.producer().inputs[0]  # type: ignore[union-attr]
        kv_dims = static_dims(past_key)
        if kv_dims is None or len(kv_dims) != 4 or kv_dims[1] is None or kv_dims[3] is None:
            raise Skip("the past key has no static [batch, kv_heads, past, head_dim] shape", past_key)
        kv_heads, head_dim = int(kv_dims[1]), int(kv_dims[3])
        heads = _heads_of(q_split, head_dim)
        if static_dims(past_value) != kv_dims:
            raise Skip("past key and value differ in shape", past_value)
        if heads % kv_heads:
            raise Skip(f"{heads} query heads cannot share {kv_heads} KV heads", softmax)
        if heads != kv_heads and not (k_repeat and v_repeat):
            raise Skip("grouped-query attention without the Unsqueeze -> Expand -> Reshape repeat-kv", softmax)
        for split, n in ((k_split, kv_heads), (v_split, kv_heads)):
            if _heads_of(split, head_dim) != n:
                raise Skip("the key/value head split does not match the cache's KV heads", split)
        # the merge may read the sequence length off the rotated query (TorchScript), whose rows
        # are the context's: probs @ V has the rows of q_rot @ K^T
        output = merge_heads(context.outputs[0], q, heads, head_dim, rows=(q_rot,))
        anchor = output.producer()
        if anchor is None or anchor is context:
            raise Skip("the context is not merged back by a layout op", context)
        attn = self.by_softmax.get(id(softmax))
        if attn is not None:
            if (attn.num_heads, attn.num_kv_heads, attn.head_dim) != (heads, kv_heads, head_dim):
                raise Skip("the block map's head counts differ from the cache shapes", softmax)
            if not attn.causal:
                raise Skip("attention is not causal", softmax)
        elif mask is None or not _causal_mask(mask):
            raise Skip("attention (not in the block map) has no causal mask", softmax)
        key_mask = _key_mask(mask, self.graph, softmax)
        position_ids = _single_input(cos, self.graph, "the rotary tables", softmax)
        if position_ids.dtype != ir.DataType.INT64 or (position_ids.shape is not None and position_ids.shape.rank() != 2):
            raise Skip("the rotary positions are not an int64 [batch, seq] input", position_ids)
        if mask is not None:
            # added to the [batch, heads, seq, total] scores, a mask whose dim 1 is not annotated
            # (the TorchScript export's) is 1 or heads wherever the graph runs, when heads > 1
            dims = static_dims(mask)
            if dims is None or len(dims) != 4 or dims[1] not in (1, heads, *((None,) if heads > 1 else ())):
                raise Skip("the additive mask is not [batch or 1, 1 or heads, seq, total]", mask)
        if q.dtype != ir.DataType.FLOAT or past_key.dtype != ir.DataType.FLOAT:
            raise Skip("attention is not float32", softmax)
        return _Site(
            q, k, v, past_key, past_value, present_key, present_value, output, anchor,  # type: ignore[arg-type]
            heads, kv_heads, head_dim, scale, mask, key_mask, cos, sin, position_ids, nan_guard is not None,
        )  # fmt: skip

    # ------------------------------------------------------------------ rewriting

    def _rewrite(self, site: _Site) -> None:
        cos_cache, sin_cache = self._caches(site)
        seqlens, total = self._lengths(site.key_mask)
        bias = site.mask if self.opts.mask == "bias" else None
        if bias is not None and site.nan_guard:
            bias = self._finite_bias(bias)
        base = site.anchor.name or site.output.name or "attention"
        fused = self.opts.rotary == "fused" or (self.opts.rotary == "auto" and site.head_dim % 16 == 0)
        if fused and site.head_dim % 16:
            raise Skip(f"rotary=fused: ORT's GroupQueryAttention rotates only head sizes that are multiples of 16 (head_dim {site.head_dim})", site.anchor)
        q, k = site.q, site.k
        if not fused:  # ORT's RotaryEmbedding on the [batch, seq, width] projections, then GQA
            q, k = (
                self.editor.op(
                    "RotaryEmbedding", [x, site.position_ids, cos_cache, sin_cache], name=f"{base}.rotary_{role}",
                    outputs=f"{x.name}.rotary", attributes={"num_heads": heads, "interleaved": 0},
                    domain=MS_DOMAIN, before=site.anchor, dtype=x.dtype, shape=x.shape,
                )
                for x, role, heads in ((site.q, "q", site.num_heads), (site.k, "k", site.kv_heads))
            )  # fmt: skip
            self.stats["rotary -> RotaryEmbedding"] += 2
        inputs = [q, k, site.v, site.past_key, site.past_value, seqlens, total]
        if fused:
            inputs += [cos_cache, sin_cache, site.position_ids]
        elif bias is not None:
            inputs += [None, None, None]
        node = self.editor.node(
            "GroupQueryAttention",
            [*inputs, *([bias] if bias is not None else [])],
            name=f"{base}.gqa",
            outputs=[f"{site.output.name}.gqa", f"{site.present_key.name}.gqa", f"{site.present_value.name}.gqa"],
            attributes={
                "num_heads": site.num_heads, "kv_num_heads": site.kv_heads, "scale": float(site.scale),
                "do_rotary": int(fused), "rotary_interleaved": 0,
            },
            domain=MS_DOMAIN, before=site.anchor,
        )  # fmt: skip
        out, key, value = node.outputs
        _take_over(self.editor, site.output, out)
        _take_over(self.editor, site.present_key, key)
        _take_over(self.editor, site.present_value, value)
        self.stats["attention -> GroupQueryAttention"] += 1

    def _caches(self, site: _Site) -> tuple[ir.Value, ir.Value]:
        key = (id(site.cos), id(site.sin))
        if key not in self.caches:
            n = self.opts.max_positions
            positions = np.arange(n, dtype=np.int64)[None, :]
            cos_t, sin_t = _evaluate(self.model, [site.cos, site.sin], site.position_ids, positions)
            try:
                cos_t, sin_t = _tables(cos_t, n, site.head_dim), _tables(sin_t, n, site.head_dim)
                cos_c, sin_c = half_caches(cos_t, sin_t)
            except ValueError as err:
                raise Skip(f"rotary tables: {err}", site.cos) from None
            # the tables must be a function of each position alone (not of the row or its order)
            shuffled = np.random.default_rng(0).permutation(min(n, 64)).astype(np.int64)[None, :]
            cos_s, sin_s = _evaluate(self.model, [site.cos, site.sin], site.position_ids, shuffled)
            if not (
                np.allclose(_tables(cos_s, shuffled.size, site.head_dim), cos_t[shuffled[0]], atol=1e-6)
                and np.allclose(_tables(sin_s, shuffled.size, site.head_dim), sin_t[shuffled[0]], atol=1e-6)
            ):
                raise Skip("the rotary tables are not a function of the position alone", site.cos)
            self.caches[key] = (
                self.editor.initializer("rotary.cos_cache", cos_c),
                self.editor.initializer("rotary.sin_cache", sin_c),
            )
        return self.caches[key]

    def _finite_bias(self, mask: ir.Value) -> ir.Value:
        """``Max(mask, float32 min)``, once per mask: the bias of a NaN-guarded attention.

        The guard turns the NaN row of a query whose keys are all masked with ``-inf`` into zeros.
        GroupQueryAttention has no guard: a kernel computing such a row as 0/0 would write NaN to
        the present cache, and every later score reading it would be NaN (NaN plus ``-inf`` is
        NaN). With the float32 minimum, a score plus the bias rounds to that minimum (scores below
        1e31), which softmaxes to exactly 0 wherever a row has an unmasked key, as ``-inf`` does;
        a fully masked row is finite whatever the kernel does (ORT's CPU kernel writes 0, as the
        guard does).
        """
        if id(mask) not in self.finite:
            base = mask.name or "attention_mask"
            floor = self.editor.initializer(f"{base}.floor", np.array(np.finfo(np.float32).min, np.float32))
            where = {"after": mask.producer()} if mask.producer() is not None else {"before": next(iter(self.graph))}
            self.finite[id(mask)] = self.editor.op(
                "Max", [mask, floor], name=f"{base}.finite", dtype=mask.dtype, shape=mask.shape, **where,
            )  # fmt: skip
        return self.finite[id(mask)]

    def _lengths(self, key_mask: ir.Value) -> tuple[ir.Value, ir.Value]:
        """(seqlens_k [batch] int32, total_sequence_length scalar int32) from the mask input."""
        if id(key_mask) in self.lengths:
            return self.lengths[id(key_mask)]
        e = self.editor
        first = next(iter(self.graph))
        base = key_mask.name or "attention_mask"
        i32 = ir.DataType.INT32
        total_1d = e.op("Shape", [key_mask], name=f"{base}.total", attributes={"start": 1, "end": 2}, before=first)
        total_i32 = e.op("Cast", [total_1d], name=f"{base}.total_i32", attributes={"to": i32}, before=first, dtype=i32)
        total = e.op("Squeeze", [total_i32], name=f"{base}.total_sequence_length", before=first, dtype=i32, shape=[])
        one = e.initializer(f"{base}.one", np.array([1], np.int32))
        if self.opts.mask == "bias":  # every row has the whole length; the bias masks the padding
            batch = e.op("Shape", [key_mask], name=f"{base}.batch", attributes={"start": 0, "end": 1}, before=first)
            last = e.op("Sub", [total_i32, one], name=f"{base}.last", before=first, dtype=i32)
            seqlens = e.op("Expand", [last, batch], name=f"{base}.seqlens_k", before=first, dtype=i32)
        else:  # right padding: each row's own length
            axes = e.initializer(f"{base}.axes", np.array([1], np.int64))
            summed = e.op("ReduceSum", [key_mask, axes], name=f"{base}.lengths", attributes={"keepdims": 0}, before=first)
            as_i32 = e.op("Cast", [summed], name=f"{base}.lengths_i32", attributes={"to": i32}, before=first, dtype=i32)
            seqlens = e.op("Sub", [as_i32, one], name=f"{base}.seqlens_k", before=first, dtype=i32)
        self.lengths[id(key_mask)] = (seqlens, total)
        return seqlens, total


# ----------------------------------------------------------------------------- attention without a cache


class _EncoderAttentionFusion(_SoftmaxFusion):
    """Attention without a KV cache -> ``com.microsoft.MultiHeadAttention``.

    The core (head split, K^T, scale, mask add, Softmax, probs @ V, head merge) is read from the
    Softmax by :func:`~tforge.compiler.attention_paths.attention_core`, which proves the layout;
    where the block map recognised the attention, its facts must agree. The op reads the Q/K/V
    values as they are (float or int8 projections alike) and writes the merged context; the
    graph's own additive mask becomes ``attention_bias`` (expanded to ``[.., .., seq, total]``
    when it broadcasts there), so padding, and causality if the mask has it, stay exactly as
    they were.
    """

    def __init__(self, editor: GraphEditor, found: BlockMap, stats: SiteStats) -> None:
        super().__init__(editor, found, stats)
        self.opset = editor.opset
        self.biases: dict[tuple, ir.Value] = {}

    def _site(self, softmax: ir.Node) -> AttentionCore:
        attn = self.by_softmax.get(id(softmax))
        if attn is not None:  # the block map's facts first: their reasons are the clearest
            if attn.rotary:
                raise Skip("rotary embedding on Q and K: MultiHeadAttention is fused only without rotary", softmax)
            if attn.num_kv_heads != attn.num_heads:
                raise Skip(
                    f"grouped-query attention ({attn.num_heads} query heads, {attn.num_kv_heads} KV heads): "
                    "MultiHeadAttention needs as many key/value heads as query heads", softmax,
                )  # fmt: skip
        core = attention_core(softmax, self.opset)
        if attn is not None:
            if (core.num_heads, core.head_dim) != (attn.num_heads, attn.head_dim):
                raise Skip("the block map's head counts differ from the traced layout", softmax)
            if attn.fused_qkv:
                splits = {id(x.producer()) for x in (core.q, core.k, core.v)}
                split = core.q.producer()
                ok = len(splits) == 1 and split is not None and split.inputs[0] is attn.q.output
            else:
                ok = (core.q, core.k, core.v) == (attn.q.output, attn.k.output, attn.v.output)
            if not ok:
                raise Skip("the traced Q/K/V values are not the block map's projections", softmax)
            if core.output is not attn.o.input:
                raise Skip("the traced merged context is not what the output projection reads", softmax)
        for what, value in (("query", core.q), ("key", core.k), ("value", core.v), ("mask", core.mask)):
            if value is not None and value.dtype != ir.DataType.FLOAT:
                raise Skip(f"the {what} is not float32 (ORT's CPU MultiHeadAttention kernel is float32 only)", value.producer() or softmax)
        return core

    def _rewrite(self, core: AttentionCore) -> None:
        anchor = core.output.producer()
        if anchor is None:
            raise Skip("the merged context has no producer", core.softmax)
        bias = self._bias(core, anchor) if core.mask is not None else None
        attributes: dict[str, int | float] = {"num_heads": core.num_heads}
        if np.float32(core.scale) != np.float32(1.0 / np.sqrt(core.head_dim)):
            attributes["scale"] = float(core.scale)
        base = anchor.name or core.output.name or "attention"
        node = self.editor.node(
            "MultiHeadAttention",
            [core.q, core.k, core.v, *([None, None, bias] if bias is not None else [])],
            name=f"{base}.mha", outputs=f"{core.output.name}.mha", attributes=attributes,
            domain=MS_DOMAIN, before=anchor,
        )  # fmt: skip
        out = node.outputs[0]
        out.dtype = ir.DataType.FLOAT
        out.shape = ir.Shape([*core.q.shape.dims[:2], core.num_heads * core.v_head_dim])  # type: ignore[union-attr]
        if core.flat_output:  # the graph merged the heads straight to [batch * seq, width]
            width = core.num_heads * core.v_head_dim
            flat = self.editor.initializer(f"{base}.flat_shape", np.array([-1, width], np.int64))
            out = self.editor.op("Reshape", [out, flat], name=f"{base}.mha_flat", outputs=f"{core.output.name}.mha_flat", before=anchor)
        _take_over(self.editor, core.output, out)
        self.stats["attention -> MultiHeadAttention"] += 1

    def _bias(self, core: AttentionCore, anchor: ir.Node) -> ir.Value:
        """The mask as ``attention_bias``: as it is when its last two dims are already [seq, total],
        else ``Expand``-ed there (ORT does not broadcast those two); one per mask and lengths."""
        mask = core.mask
        assert mask is not None
        if core.mask_full:
            return mask
        q_seq, k_seq = (x.shape[1] if x.shape is not None else None for x in (core.q, core.k))
        named = all(isinstance(d, int) or (isinstance(d, ir.SymbolicDim) and d.value) for d in (q_seq, k_seq))
        key = (id(mask), str(q_seq), str(k_seq)) if named else (id(mask), id(core.q), id(core.k))
        if key not in self.biases:
            e = self.editor
            base = mask.name or "attention_mask"
            lead = e.op("Shape", [mask], name=f"{base}.lead", attributes={"start": 0, "end": 2}, before=anchor)
            rows = e.op("Shape", [core.q], name=f"{base}.rows", attributes={"start": 1, "end": 2}, before=anchor)
            cols = e.op("Shape", [core.k], name=f"{base}.cols", attributes={"start": 1, "end": 2}, before=anchor)
            shape = e.op("Concat", [lead, rows, cols], name=f"{base}.bias_shape", attributes={"axis": 0}, before=anchor)
            dims = list(mask.shape.dims[:2]) + [q_seq, k_seq] if mask.shape is not None else None  # type: ignore[list-item]
            self.biases[key] = e.op(
                "Expand", [mask, shape], name=f"{base}.attention_bias", before=anchor, dtype=mask.dtype, shape=dims,
            )  # fmt: skip
        return self.biases[key]


def _reads_cache(softmax: ir.Node) -> bool:
    """Whether the scores MatMul before ``softmax`` reads a KV cache: an operand leads back, through
    layout ops and scalings, to a ``Concat`` that is a graph output (the present cache)."""
    for node in producers(softmax.inputs[0], 12):  # type: ignore[arg-type]
        if node.op_type == "MatMul" and const_array(node.inputs[1]) is None:
            return any(_from_present(i) for i in node.inputs)
    return False


def _from_present(value: ir.Value | None) -> bool:
    for _ in range(16):
        node = value.producer() if value is not None else None
        if node is None or value is None:
            return False
        if node.op_type == "Concat" and value.is_graph_output():
            return True
        if node.op_type in DATA_INPUT_ONLY or node.op_type == "Transpose":
            value = node.inputs[0]
            continue
        data = [i for i in node.inputs if i is not None and const_array(i) is None]
        if node.op_type not in ("Mul", "Div", "Cast", "Identity") or len(data) != 1:
            return False
        value = data[0]
    return False


# ----------------------------------------------------------------------------- matching helpers


def _rotary(value: ir.Value | None) -> tuple[ir.Value, ir.Value, ir.Value]:
    """``x`` with its cos and sin tables if ``value = x * cos + rotate_half(x) * sin``."""
    add = value.producer() if value is not None else None
    if add is None or add.op_type != "Add" or len(add.inputs) != 2:
        raise Skip("no rotary embedding (x * cos + rotate_half(x) * sin) on Q or K", add or value)
    muls = [i.producer() if i is not None else None for i in add.inputs]
    if any(m is None or m.op_type != "Mul" or only_reader(m.outputs[0]) is None for m in muls):
        raise Skip("the rotary sum is not of two products", add)
    for plain, rotated in (muls, muls[::-1]):
        for ri in (0, 1):
            half = _rotate_half(rotated.inputs[ri])  # type: ignore[union-attr]
            if half is None:
                continue
            x = half
            sin = rotated.inputs[1 - ri]  # type: ignore[union-attr]
            if plain.inputs[0] is x:  # type: ignore[union-attr]
                return x, plain.inputs[1], sin  # type: ignore[union-attr,return-value]
            if plain.inputs[1] is x:  # type: ignore[union-attr]
                return x, plain.inputs[0], sin  # type: ignore[union-attr,return-value]
    raise Skip("the rotary products do not rotate one tensor with rotate_half", add)


def _rotate_half(value: ir.Value | None) -> ir.Value | None:
    """``x`` if ``value = Concat(-x[..., d/2:], x[..., :d/2])`` on the last axis."""
    concat = value.producer() if value is not None else None
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2 or only_reader(value) is None:
        return None
    axis = concat.attributes.get("axis")
    if axis is None or int(axis.value) not in (-1, 3):
        return None
    neg = concat.inputs[0].producer() if concat.inputs[0] is not None else None
    low = concat.inputs[1].producer() if concat.inputs[1] is not None else None
    if neg is None or neg.op_type != "Neg" or low is None or low.op_type != "Slice":
        return None
    high = neg.inputs[0].producer() if neg.inputs[0] is not None else None
    if high is None or high.op_type != "Slice" or high.inputs[0] is not low.inputs[0]:
        return None
    x = low.inputs[0]
    dims = static_dims(x)
    if x is None or not dims or dims[-1] is None or dims[-1] % 2:
        return None
    half = dims[-1] // 2
    if _slice_bounds(low, len(dims)) != (0, half) or _slice_bounds(high, len(dims)) != (half, dims[-1]):
        return None
    return x


def _slice_bounds(node: ir.Node, rank: int) -> tuple[int, int] | None:
    """(start, stop) of a Slice over the last axis with step 1, stop clamped to the axis, or None."""
    parts = [const_array(i) if i is not None else None for i in node.inputs[1:]]
    if len(parts) < 3 or any(p is None or p.size != 1 for p in parts):
        return None
    start, stop, axis = (int(p.ravel()[0]) for p in parts[:3])  # type: ignore[union-attr]
    step = int(parts[3].ravel()[0]) if len(parts) > 3 and parts[3] is not None else 1
    if axis not in (-1, rank - 1) or step != 1:
        return None
    size = static_dims(node.inputs[0])[-1]  # type: ignore[index]
    return start, min(stop, size)  # type: ignore[type-var]


def _context_matmul(softmax: ir.Node) -> tuple[ir.Node, ir.Node | None]:
    """(the probs @ V MatMul reading ``softmax``, the NaN guard ``Where(IsNaN(p), 0, p)`` between
    them or None), each value on the way read by the next op alone."""
    probs = softmax.outputs[0]
    uses = list(probs.uses())
    guard = next((u.node for u in uses if nan_guarded_softmax(u.node) is softmax), None)
    if guard is not None:
        isnan = guard.inputs[0].producer()  # type: ignore[union-attr]
        if probs.is_graph_output() or len(uses) != 2 or only_reader(isnan.outputs[0]) is not guard:  # type: ignore[union-attr]
            raise Skip("the guarded Softmax or its IsNaN is read elsewhere", softmax)
        probs = guard.outputs[0]
    context = only_reader(probs)
    if context is None or context.op_type != "MatMul" or context.inputs[0] is not probs:
        raise Skip("the Softmax is not read by exactly one probs @ V MatMul", softmax)
    return context, guard


def _heads_split(value: ir.Value | None, role: str) -> tuple[ir.Value, ir.Node]:
    """(projection output [b, s, width], the Reshape) for ``Transpose(0,2,1,3)(Reshape(proj))``."""
    transpose = value.producer() if value is not None else None
    if transpose is None or transpose.op_type != "Transpose" or _perm(transpose) != _HEADS_FIRST:
        raise Skip(f"the {role} heads are not moved to axis 1 by Transpose(0, 2, 1, 3)", transpose or value)
    reshape = transpose.inputs[0].producer() if transpose.inputs[0] is not None else None
    if reshape is None or reshape.op_type != "Reshape":
        raise Skip(f"no Reshape splits the {role} projection into heads", transpose)
    proj = reshape.inputs[0]
    dims = static_dims(proj)
    if proj is None or dims is None or len(dims) != 3:
        raise Skip(f"the {role} projection is not [batch, seq, width]", reshape)
    return proj, reshape


def _heads_of(reshape: ir.Node, head_dim: int) -> int:
    """Heads of a ``[b, s, heads, head_dim]`` split: from its output shape, or the projection width."""
    out = static_dims(reshape.outputs[0])
    if out is not None and len(out) == 4 and out[2] is not None and out[3] == head_dim:
        return int(out[2])
    width = static_dims(reshape.inputs[0])[-1]  # type: ignore[index]
    if width is None or width % head_dim:
        raise Skip("the head split's width is unknown or not a multiple of head_dim", reshape)
    return int(width) // head_dim


def _perm(node: ir.Node) -> tuple[int, ...] | None:
    perm = node.attributes.get("perm")
    return tuple(int(p) for p in perm.value) if perm is not None else None


def _cache_concat(value: ir.Value | None, role: str) -> tuple[ir.Value, bool]:
    """(present output, repeat-kv seen) walking from a scores/context operand back to the cache
    ``Concat(past input, new)``, through the layout ops of repeat-kv and K^T only."""
    seen: list[str] = []
    while value is not None:
        node = value.producer()
        if node is None:
            break
        if node.op_type == "Concat" and value.is_graph_output():
            axis = node.attributes.get("axis")
            past = node.inputs[0]
            if axis is None or int(axis.value) not in (2, -2) or len(node.inputs) != 2:
                raise Skip(f"the present {role} is not Concat(past, new) over the sequence axis", node)
            if past is None or not past.is_graph_input():
                raise Skip(f"the present {role} does not extend a past input", node)
            repeat = "Expand" in seen and "Unsqueeze" in seen
            return value, repeat
        if node.op_type not in _KV_LAYOUT or not _read_on_path(value):
            raise Skip(f"{node.op_type} between the present {role} and the attention MatMul", node)
        if node.op_type == "Transpose" and _perm(node) not in ((0, 2, 1), (0, 1, 3, 2)):
            raise Skip(f"a Transpose other than K^T on the {role} path", node)
        if node.op_type == "Unsqueeze" and squeeze_axes(node) not in ([2], [-3]):
            # repeat-kv repeats each KV head in place ([b, kv, 1, t, d] expanded, then merged):
            # another new axis would interleave the KV heads, giving query heads other keys
            raise Skip(f"the repeat-kv Unsqueeze on the {role} path does not add axis 2", node)
        seen.append(node.op_type)
        value = node.inputs[0]
    raise Skip(f"the {role} operand does not come from a present cache output", value)


def _read_on_path(value: ir.Value) -> bool:
    """One data reader; other readers only take its ``Shape`` (the dynamo export's K^T reshapes)."""
    if value.is_graph_output():
        return False
    data = [u for u in value.uses() if u.node.op_type != "Shape"]
    return len(data) == 1


def _single_input(value: ir.Value, graph: ir.Graph, what: str, at: ir.Node) -> ir.Value:
    read = graph_inputs_reached(value, graph)
    if len(read) != 1:
        names = ", ".join(v.name or "?" for v in read) or "none"
        raise Skip(f"{what} do not depend on exactly one graph input (read: {names})", at)
    return read[0]


def _key_mask(mask: ir.Value | None, graph: ir.Graph, at: ir.Node) -> ir.Value:
    if mask is None:
        raise Skip("no additive mask: the attention_mask input is needed for the cache lengths", at)
    found = _single_input(mask, graph, "the attention mask", at)
    dims = static_dims(found)
    if found.dtype not in (ir.DataType.INT64, ir.DataType.INT32) or dims is None or len(dims) != 2:
        raise Skip("the attention mask input is not an integer [batch, past + seq] tensor", found)
    return found


def _causal_mask(mask: ir.Value) -> bool:
    """The mask compares two position ranges (key index <= query index) or uses Trilu."""

    def depends_on_range(value: ir.Value | None) -> bool:
        return value is not None and any(n.op_type in ("Range", "CumSum") for n in producers(value, 30))

    for node in producers(mask, 400):
        if node.op_type == "Trilu":
            return True
        if node.op_type in COMPARISONS and all(depends_on_range(i) for i in node.inputs):
            return True
    return False


# ----------------------------------------------------------------------------- rotary tables


def _evaluate(model: ir.Model, values: list[ir.Value], feed: ir.Value, array: np.ndarray) -> list[np.ndarray]:
    """``values`` computed by ONNX Runtime from ``feed = array`` on a copy of the nodes between them."""
    order = {id(n): i for i, n in enumerate(model.graph)}
    needed: dict[int, ir.Node] = {}
    stack = list(values)
    while stack:
        node = stack.pop().producer()
        if node is None or id(node) in needed:
            continue
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            raise Skip("the rotary tables are computed with a subgraph", node)
        needed[id(node)] = node
        stack.extend(i for i in node.inputs if i is not None)
    mapping: dict[int, ir.Value] = {}
    new_feed = ir.Value(name=feed.name, type=feed.type, shape=ir.Shape([1, int(array.shape[1])]))
    mapping[id(feed)] = new_feed
    initializers: list[ir.Value] = []

    def copy(v: ir.Value | None) -> ir.Value | None:
        if v is None:
            return None
        if id(v) not in mapping:
            if v.const_value is None:
                raise Skip("the rotary tables read a graph input besides the positions", v)
            mapping[id(v)] = ir.Value(name=v.name, type=v.type, shape=v.shape, const_value=v.const_value)
            initializers.append(mapping[id(v)])
        return mapping[id(v)]

    nodes = []
    for node in sorted(needed.values(), key=lambda n: order[id(n)]):
        new = ir.Node(
            node.domain, node.op_type, [copy(i) for i in node.inputs],
            attributes=list(node.attributes.values()), num_outputs=len(node.outputs), name=node.name,
        )  # fmt: skip
        for old, out in zip(node.outputs, new.outputs, strict=True):
            out.name, out.type = old.name, old.type
            mapping[id(old)] = out
        nodes.append(new)
    graph = ir.Graph(
        [new_feed], [mapping[id(v)] for v in values], nodes=nodes, initializers=initializers,
        opset_imports=dict(model.opset_imports), name="rotary_tables",
    )  # fmt: skip
    session = create_session(ir.Model(graph, ir_version=model.ir_version), optimize=False)
    return session.run(None, {feed.name: array.astype(np.int64)})


def _tables(table: np.ndarray, n: int, head_dim: int) -> np.ndarray:
    if table.size != n * head_dim:
        raise ValueError(f"expected {n} x {head_dim} values for {n} positions, got shape {table.shape}")
    return table.reshape(n, head_dim)


# ----------------------------------------------------------------------------- clean-up


def _remove_dead_nodes(editor: GraphEditor) -> int:
    """Remove nodes whose outputs nothing reads (the replaced chains) and the constants only they read."""
    removed = 0
    consts: list[ir.Value] = []
    for node in reversed(list(editor.graph)):
        if any(out.is_graph_output() or list(out.uses()) for out in node.outputs):
            continue
        consts.extend(i for i in node.inputs if i is not None and i.is_initializer())
        editor.remove(node)
        removed += 1
    for value in consts:
        editor.drop_if_unused(value)
    return removed
