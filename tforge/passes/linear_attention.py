"""linear-attention: replace softmax attention by linear attention with a normaliser, layer by layer.

The rewrite keeps everything of a recognised attention block up to the inputs of its scores
``MatMul`` (query after rotary and scaling, ``[B, H, N, d]``; key transposed, ``[B, H, d, N]``) and
the value input of its context ``MatMul`` (``[B, H, N, d]``, after repeat-kv), and replaces
``scores -> (scale, additive mask) -> Softmax -> (NaN guard) -> context`` by

    out = phi(s q) (phi(k)^T v) / (phi(s q) . sum phi(k) + eps)

(:mod:`tforge.passes.math.linear_attention`). Head merge and the output projection stay. The
constant ``s`` is the product of the scalar ``Mul``/``Div`` between the scores and the Softmax.

- Padding: the additive mask on the scores is traced back to a ``[batch, seq]`` integer or bool
  graph input (``attention_mask``); padded keys get zero features, which removes them from sum
  and normaliser. A mask that depends on another input, or on none while the attention is not
  causal, is a skip reason.
- Causal attention never builds an ``N x N`` tensor. ``causal-impl=chunked``: the sequence is
  zero-padded (``Concat`` with an ``Expand``-ed zero block) to a multiple of ``chunk``, the
  state ``phi(k)^T v`` of each chunk is summed over earlier chunks by an exclusive ``CumSum``,
  the part inside a chunk is a ``chunk x chunk`` product under a constant lower-triangular
  mask: O(N chunk) memory.
  ``causal-impl=ort-op``: ONNX Runtime's ``com.microsoft.LinearAttention`` (recurrent, update rule
  ``linear``) with a column of ones appended to ``v``, whose output column is the normaliser.
  ``auto`` (the default) uses the chunked form; the op is used only when asked for and when the
  installed ONNX Runtime loads it (probed once), else the chunked form with a stat saying so.
- Grouped-query attention: the exports repeat K and V to every query head before the scores
  ``MatMul``; the rewrite reads the repeated K and V. KV sharing stays at the projections (K and
  V are computed once per KV head); the feature map of K is applied per query head (a fitted
  map has its own key map per query head).
- Feature maps: ``elu`` (elu+1), ``relu``, ``fitted`` (Hedgehog: per layer and head a linear map,
  then softmax over features of it and of its negation, for queries and keys separately; trained
  with torch on the query/key vectors and softmax weights of calibration data, see
  :mod:`tforge.passes.math.feature_map_fit`) emitted as ``MatMul``/``Add``/``Softmax``/``Concat``.
- Selection: with calibration data, each layer's conversion error is measured on its own (the
  relative squared error of the attention block's output, context through the output
  projection, against the softmax original, on unpadded rows of the original model's
  activations), and layers are converted smallest error first: ``layers=N``, ``fraction=F``
  (of the recognised layers) or ``budget=E`` (as long as the sum of converted layers' errors
  stays at most ``E``); ``indices=0,3`` restricts the candidates. With none of the three, every
  candidate is converted (and no data is needed for ``elu``/``relu``). The error ranks layers;
  it does not predict the end-to-end loss exactly (layers interact).
- Fitting is bounded by ``fit-steps`` and ``fit-seconds`` (per layer) and seeded; with a time
  bound the number of steps, hence the result, depends on the machine's speed and load: for a
  reproducible fit give ``fit-steps`` and a ``fit-seconds`` large enough never to stop first.

Calibration data are the pipeline's (``tforge compile --calib-text FILE --tokenizer PATH`` or
``--calib-npz FILE``, ``tforge.compile(calibration=...)``): the pass has no data options of its
own; ``capture-samples`` says how many of those samples it captures (Q, K, V and the softmax
weights of every layer, which is memory-heavy). The pass
changes the function; its ``details`` report the per-layer errors.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from tforge.compiler.attention_paths import graph_inputs_reached, score_chain
from tforge.compiler.calibration import has_pipeline_data, pipeline_feeds
from tforge.compiler.pass_infra import Pass, PassResult, Property, SiteStats, Skip
from tforge.compiler.registry import register_pass
from tforge.compiler.rewrite import GraphEditor, Scope
from tforge.compiler.structure import Attention, block_map, const_array, static_dims
from tforge.errors import PassConfigError, PreconditionError
from tforge.passes.math import linear_attention as la
from tforge.runtime.ort import session_exposing

logger = logging.getLogger(__name__)

__all__ = ["LinearAttention", "ort_has_linear_attention", "quadratic_values"]

FeatureMap = Literal["elu", "relu", "fitted"]
CausalImpl = Literal["auto", "chunked", "ort-op"]
MS_DOMAIN = "com.microsoft"
_MIN_OPSET = 13  # ReduceSum/Unsqueeze with axes inputs, CumSum, Pad with a pads input


@functools.cache
def ort_has_linear_attention() -> bool:
    """Whether the installed ONNX Runtime runs ``com.microsoft.LinearAttention`` on CPU correctly.

    Probed once with a 2-head, 3-token model checked against NumPy.
    """
    try:
        import onnx
        import onnxruntime as ort
        from onnx import helper
    except ImportError:
        return False
    heads, dim, n = 2, 3, 3
    node = helper.make_node(
        "LinearAttention", ["q", "k", "v"], ["o", "state"], domain=MS_DOMAIN,
        q_num_heads=heads, kv_num_heads=heads, update_rule="linear", scale=1.0,
    )  # fmt: skip
    io = [
        helper.make_tensor_value_info(n_, onnx.TensorProto.FLOAT, [1, n, heads * dim])
        for n_ in "qkv"
    ]
    graph = helper.make_graph([node], "probe", io, [helper.make_tensor_value_info("o", 1, None)])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)],
        ir_version=9,
    )
    rng = np.random.default_rng(0)
    q, k, v = (rng.random((1, n, heads * dim), dtype=np.float32) for _ in range(3))
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        out = session.run(None, {"q": q, "k": k, "v": v})[0]
    except Exception as error:  # ORT raises its own pybind classes
        logger.info("linear-attention: com.microsoft.LinearAttention is not usable: %s", error)
        return False
    split = lambda x: x.reshape(1, n, heads, dim).transpose(0, 2, 1, 3)  # noqa: E731
    qh, kh, vh = split(q), split(k), split(v)
    ref = (np.tril(qh @ kh.transpose(0, 1, 3, 2)) @ vh).transpose(0, 2, 1, 3).reshape(1, n, -1)
    return bool(np.allclose(out, ref, atol=1e-4))


# ----------------------------------------------------------------------------- sites


@dataclasses.dataclass(eq=False)
class _Site:
    index: int
    attn: Attention
    scale: float
    key_mask: ir.Value | None  # the [batch, seq] graph input, or None (no padding)

    @property
    def q(self) -> ir.Value:
        return self.attn.scores_matmul.inputs[0]  # type: ignore[return-value]

    @property
    def kt(self) -> ir.Value:
        return self.attn.scores_matmul.inputs[1]  # type: ignore[return-value]

    @property
    def v(self) -> ir.Value:
        return self.attn.context_matmul.inputs[1]  # type: ignore[return-value]

    @property
    def probs(self) -> ir.Value:
        return self.attn.softmax.outputs[0]


def _analyse(index: int, attn: Attention, graph: ir.Graph) -> _Site:
    for value in (
        attn.scores_matmul.inputs[0],
        attn.scores_matmul.inputs[1],
        attn.context_matmul.inputs[1],
    ):
        if value is None or value.dtype != ir.DataType.FLOAT:
            raise Skip("attention inputs are not float32", attn.scores_matmul)
        if value.shape is not None and value.shape.rank() != 4:
            raise Skip("attention inputs are not [batch, heads, seq, dim]", attn.scores_matmul)
    # the feature-map products concatenate K and V with Q per head: a K or V whose heads axis the
    # MatMuls broadcast (multi-query Falcon's single KV head) would need its own expansion first
    operands = (attn.scores_matmul.inputs[0], attn.scores_matmul.inputs[1], attn.context_matmul.inputs[1])
    heads = [dims[1] if (dims := static_dims(v)) is not None and len(dims) == 4 else None for v in operands]
    if None not in heads and heads[1:] != heads[:1] * 2:
        raise Skip(
            f"K/V have {heads[1]}/{heads[2]} head(s) broadcast against {heads[0]} query heads by the "
            "attention MatMuls (multi-query): not expanded for the linear form",
            attn.scores_matmul,
        )
    if None in heads and attn.qkv_slots is not None and attn.num_kv_heads != attn.num_heads:
        raise Skip(
            f"fused QKV cut into head slots with {attn.num_kv_heads} KV head(s) for {attn.num_heads} query heads "
            "(Falcon) and no static heads axis at the attention MatMuls: a broadcast K/V is not ruled out",
            attn.scores_matmul,
        )
    keys = graph_inputs_reached(attn.scores_matmul.inputs[1], graph, stop=[attn.k.output])
    past = [v for v in keys if v.dtype == ir.DataType.FLOAT]  # not the ids or positions
    if past:
        # the chunked form pads K and V by the query length and masks chunk i against key i:
        # both wrong once keys hold past positions (decode steps), so a cache graph keeps softmax
        raise Skip(
            f"the keys also read the KV cache input {past[0].name!r}: linear attention with a past "
            "cache is not built (compile the model exported without a cache)",
            attn.scores_matmul,
        )
    chain = score_chain(attn, graph)
    return _Site(index, attn, chain.scale, chain.key_mask)


# ----------------------------------------------------------------------------- emission


def _feature_map(
    em: Scope, x: ir.Value, kind: str, params: tuple[np.ndarray, np.ndarray] | None, role: str
) -> ir.Value:
    if kind == "elu":
        return em.op(
            "Add",
            [em.op("Elu", [x], f"{role}_elu", alpha=1.0), em.const("one", np.float32(1.0))],
            f"phi_{role}",
        )
    if kind == "relu":
        return em.op("Relu", [x], f"phi_{role}")
    assert params is not None  # fitted maps always come with parameters (checked by the caller)
    w, b = params
    u = em.op("MatMul", [x, em.const(f"{role}_w", w.astype(np.float32))], f"{role}_proj")
    u = em.op("Add", [u, em.const(f"{role}_b", b[:, None, :].astype(np.float32))], f"{role}_u")
    pos = em.op("Softmax", [u], f"{role}_softmax_pos", axis=-1)
    neg = em.op("Softmax", [em.op("Neg", [u], f"{role}_neg")], f"{role}_softmax_neg", axis=-1)
    return em.op("Concat", [pos, neg], f"phi_{role}", axis=-1)


def _emit(
    em: Scope,
    site: _Site,
    kind: str,
    params: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None,
    *,
    impl: Literal["chunked", "ort-op", "full"],
    chunk: int,
    eps: float,
) -> ir.Value:
    attn = site.attn
    q = site.q
    if site.scale != 1.0:
        q = em.op("Mul", [q, em.const("scale", np.float32(site.scale))], "q_scaled")
    k = em.op("Transpose", [site.kt], "k", perm=[0, 1, 3, 2])
    phi_q = _feature_map(em, q, kind, params[0] if params else None, "q")
    phi_k = _feature_map(em, k, kind, params[1] if params else None, "k")
    if site.key_mask is not None:
        m = em.op("Cast", [site.key_mask], "key_mask", to=ir.DataType.FLOAT)
        m = em.op("Unsqueeze", [m, em.i64("mask_axes", [1, 3])], "key_mask_4d")
        phi_k = em.op("Mul", [phi_k, m], "phi_k_masked")
    v = site.v
    eps_c = em.const("eps", np.float32(eps))
    if impl == "full":
        kv = em.op("MatMul", [em.op("Transpose", [phi_k], "phi_k_t", perm=[0, 1, 3, 2]), v], "kv")
        z = em.op("ReduceSum", [phi_k, em.i64("seq_axis", [2])], "z", keepdims=1)
        num = em.op("MatMul", [phi_q, kv], "num")
        den = em.op(
            "ReduceSum",
            [em.op("Mul", [phi_q, z], "qz"), em.i64("feat_axis", [-1])],
            "den",
            keepdims=1,
        )
        return em.op("Div", [num, em.op("Add", [den, eps_c], "den_eps")], "out")
    if impl == "ort-op":
        heads, d = attn.num_heads, attn.head_dim
        ones_shape = em.op(
            "Concat",
            [em.op("Shape", [v], "v_shape", end=3), em.i64("one_dim", [1])],
            "ones_shape",
            axis=0,
        )
        ones = em.op(
            "Expand", [em.const("ones", np.ones((1, 1, 1, 1), np.float32)), ones_shape], "ones"
        )
        v1 = em.op("Concat", [v, ones], "v_ones", axis=-1)

        def pack(x: ir.Value, role: str) -> ir.Value:
            t = em.op("Transpose", [x], f"{role}_bnhf", perm=[0, 2, 1, 3])
            return em.op(
                "Reshape", [t, em.i64(f"{role}_packed_shape", [0, 0, -1])], f"{role}_packed"
            )

        out = em.op(
            "LinearAttention", [pack(phi_q, "q"), pack(phi_k, "k"), pack(v1, "v")], "op",
            domain=MS_DOMAIN, num_outputs=2,
            q_num_heads=heads, kv_num_heads=heads, update_rule="linear", scale=1.0,
        )  # fmt: skip
        out = em.op("Reshape", [out, em.i64("unpacked_shape", [0, 0, heads, d + 1])], "op_heads")
        out = em.op("Transpose", [out], "op_bhnd", perm=[0, 2, 1, 3])
        num = em.op(
            "Slice",
            [out, em.i64("num_start", [0]), em.i64("num_end", [d]), em.i64("last", [-1])],
            "num",
        )
        den = em.op(
            "Slice",
            [out, em.i64("den_start", [d]), em.i64("den_end", [d + 1]), em.i64("last", [-1])],
            "den",
        )
        return em.op("Div", [num, em.op("Add", [den, eps_c], "den_eps")], "out")
    # chunked causal: pad the sequence to a multiple of C, split it into [n_chunks, C]
    f = _features(kind, attn.head_dim, params)
    d = attn.head_dim
    n = em.op("Shape", [phi_q], "seq_len", start=2, end=3)
    c = em.i64("chunk", [chunk])
    pad = em.op("Mod", [em.op("Sub", [c, em.op("Mod", [n, c], "n_mod")], "c_minus"), c], "pad")
    lead = em.op("Shape", [phi_q], "batch_heads", start=0, end=2)

    def chunks(x: ir.Value, width: int, role: str) -> ir.Value:
        # Concat with zeros rather than Pad: shape inference then keeps batch, heads and width
        # (a dynamic Pad loses every dim), so the graph check of quadratic_values can see them.
        shape = em.op(
            "Concat", [lead, pad, em.i64(f"{role}_width", [width])], f"{role}_pad_shape", axis=0
        )
        zeros = em.op(
            "Expand",
            [em.const("zero", np.zeros((1, 1, 1, 1), np.float32)), shape],
            f"{role}_pad_zeros",
        )
        padded = em.op("Concat", [x, zeros], f"{role}_padded", axis=2)
        return em.op(
            "Reshape",
            [padded, em.i64(f"{role}_chunk_shape", [0, 0, -1, chunk, width])],
            f"{role}_chunks",
        )

    qc, kc, vc = chunks(phi_q, f, "q"), chunks(phi_k, f, "k"), chunks(v, d, "v")
    kc_t = em.op("Transpose", [kc], "k_chunks_t", perm=[0, 1, 2, 4, 3])  # [B, H, n, F, C]
    kv = em.op("MatMul", [kc_t, vc], "chunk_kv")  # [B, H, n, F, d]
    state = em.op("CumSum", [kv, em.i64("chunk_axis", [2])], "state", exclusive=1)
    z = em.op("ReduceSum", [kc, em.i64("pos_axis", [3])], "chunk_z", keepdims=0)  # [B, H, n, F]
    z_state = em.op("CumSum", [z, em.i64("chunk_axis_z", [2])], "z_state", exclusive=1)
    z_state = em.op("Unsqueeze", [z_state, em.i64("last_axis", [-1])], "z_state_col")
    tril = em.const("tril", np.tril(np.ones((chunk, chunk), np.float32)))
    a = em.op(
        "Mul", [em.op("MatMul", [qc, kc_t], "intra_scores"), tril], "intra"
    )  # [B, H, n, C, C]
    num = em.op(
        "Add",
        [em.op("MatMul", [qc, state], "inter_num"), em.op("MatMul", [a, vc], "intra_num")],
        "num",
    )
    den = em.op(
        "Add",
        [
            em.op("MatMul", [qc, z_state], "inter_den"),
            em.op("ReduceSum", [a, em.i64("key_axis", [-1])], "intra_den", keepdims=1),
        ],
        "den",
    )
    out = em.op("Div", [num, em.op("Add", [den, eps_c], "den_eps")], "out_chunks")
    out = em.op("Reshape", [out, em.i64("out_shape", [0, 0, -1, d])], "out_padded")
    return em.op("Slice", [out, em.i64("out_start", [0]), n, em.i64("seq_axis", [2])], "out")


def _features(kind: str, head_dim: int, params: Any) -> int:
    if kind in ("elu", "relu"):
        return head_dim
    return 2 * int(params[0][0].shape[-1])


def quadratic_values(model: ir.Model, feeds: Mapping[str, np.ndarray], seq_len: int) -> list[str]:
    """Tensors with two or more dimensions of at least ``seq_len``, observed by running the graph.

    Every node output of a copy of the model is made a graph output and the copy is run once in
    ONNX Runtime (its optimisations off, so the tensors are the graph's own) on ``feeds`` whose
    sequence length is ``seq_len``; a tensor quadratic in the sequence shows up as two long
    dimensions. ONNX shape inference cannot do this on exported graphs: it loses the sequence
    dimension through their dynamic Reshapes. ``seq_len`` must exceed every width of the model
    (hidden, FFN, vocabulary if logits are produced), or those dimensions count as long too.
    Returns ``name[shape]`` strings.
    """
    from tforge.runtime.ort import create_session, prepare_feeds

    clone = model.clone()
    values = [
        out
        for node in clone.graph
        for out in node.outputs
        if out.name and not out.is_graph_output()
    ]
    clone.graph.outputs.extend(values)
    session = create_session(clone, optimize=False)
    names = [o.name for o in session.get_outputs()]
    found = []
    for name, array in zip(names, session.run(names, prepare_feeds(session, feeds)), strict=True):
        shape = np.shape(array)
        if sum(1 for d in shape if d >= seq_len) >= 2:
            found.append(f"{name}{list(shape)}")
    return found


# ----------------------------------------------------------------------------- the pass


@dataclasses.dataclass
class _Layer:
    site: _Site
    samples: list[dict[str, np.ndarray | None]] = dataclasses.field(default_factory=list)
    params: Any = None
    error: float | None = None
    fit: dict[str, float] | None = None


@register_pass("linear-attention")
@dataclasses.dataclass(frozen=True)
class LinearAttention(Pass):
    """Convert softmax attention layers to linear attention (elu+1, relu or fitted Hedgehog maps).

    ``layers=N`` / ``fraction=F`` / ``budget=E`` convert the layers with the smallest measured
    error first (needs the pipeline's calibration data); ``indices=`` restricts the candidates;
    nothing: every layer.
    ``causal-impl``: ``chunked`` (``chunk`` positions a block) or ``ort-op`` (ONNX Runtime's
    LinearAttention contrib op, falling back to chunked when unavailable).
    """

    feature_map: FeatureMap = "elu"
    layers: int | None = None
    fraction: float | None = None
    budget: float | None = None
    indices: tuple[int, ...] = ()
    chunk: int = 64
    causal_impl: CausalImpl = "auto"
    eps: float = 1e-6
    fit_seconds: float = 10.0  # per layer
    fit_steps: int = 400
    fit_lr: float = 0.05
    fit_queries: int = 32  # query rows per sequence in the fitting loss; 0 = all
    features: int = 0  # hedgehog features per half; 0 = head_dim
    seed: int = 0
    capture_samples: int = 8  # of the pipeline's calibration samples

    requires: ClassVar = frozenset({Property.CANONICAL})
    invalidates: ClassVar = frozenset({Property.CALIBRATED})
    reads_calibration_data: ClassVar = True

    def __post_init__(self) -> None:
        given = [n for n in ("layers", "fraction", "budget") if getattr(self, n) is not None]
        if len(given) > 1:
            raise PassConfigError(
                f"linear-attention: give at most one of layers=, fraction=, budget= (got {', '.join(given)})"
            )
        if self.layers is not None and self.layers < 0:
            raise PassConfigError(f"linear-attention: layers must be >= 0, got {self.layers}")
        if self.fraction is not None and not 0.0 <= self.fraction <= 1.0:
            raise PassConfigError(f"linear-attention: fraction must be in [0, 1], got {self.fraction}")
        if self.budget is not None and self.budget < 0:
            raise PassConfigError(f"linear-attention: budget must be >= 0, got {self.budget}")
        if self.chunk < 1:
            raise PassConfigError(f"linear-attention: chunk must be at least 1, got {self.chunk}")
        if self.eps <= 0:
            raise PassConfigError(f"linear-attention: eps must be positive, got {self.eps}")
        if self.capture_samples < 1:
            raise PassConfigError(f"linear-attention: capture-samples must be >= 1, got {self.capture_samples}")
        if self.fit_seconds <= 0 or min(self.fit_steps, self.features, self.fit_queries) < 0:
            raise PassConfigError("linear-attention: fit-seconds must be positive; fit-steps, fit-queries, features >= 0")

    @property
    def selects(self) -> bool:
        return self.layers is not None or self.fraction is not None or self.budget is not None

    @property
    def needs_data(self) -> bool:
        return self.selects or self.feature_map == "fitted"

    def _has_data(self, model: ir.Model) -> bool:
        return has_pipeline_data(model)

    def check(self, model: ir.Model) -> None:
        if self.needs_data and not self._has_data(model):
            why = (
                "feature-map=fitted"
                if self.feature_map == "fitted"
                else "selecting layers by error"
            )
            raise PreconditionError(
                f"linear-attention: {why} needs calibration data; add --calib-text FILE --tokenizer PATH "
                "or --calib-npz FILE to 'tforge compile', or calibration= to tforge.compile "
                "(or use indices= with feature-map=elu)"
            )
        opset = model.opset_imports.get("", 0)
        if opset < _MIN_OPSET:
            raise PreconditionError(
                f"linear-attention: the model's opset is {opset}; the rewrite needs opset {_MIN_OPSET} or later"
            )

    def run(self, model: ir.Model) -> PassResult:
        stats = SiteStats()
        layers: list[_Layer] = []
        for block in block_map(model).blocks:
            if block.attention is None:
                continue
            if self.indices and block.index not in self.indices:
                stats.skip("not in indices", block.attention.softmax, blocked=False)
                continue
            try:
                layers.append(_Layer(_analyse(block.index, block.attention, model.graph)))
            except Skip as why:
                stats.skip(why)
                logger.debug("linear-attention: block %d: skipped: %s", block.index, why)
        kind = "hedgehog" if self.feature_map == "fitted" else self.feature_map
        if layers and (self.needs_data or self._has_data(model)):
            self._measure(model, layers, kind)
        chosen = self._choose(layers, stats)
        impl = (
            self._causal_impl(stats)
            if any(layer.site.attn.causal for layer in chosen)
            else "chunked"
        )
        editor = GraphEditor(model, self.name)
        for layer in chosen:
            site = layer.site
            em = editor.scope(site.attn.context_matmul, f"l{site.index}.linattn.")
            out = _emit(
                em, site, kind, layer.params,
                impl=impl if site.attn.causal else "full", chunk=self.chunk, eps=self.eps,
            )  # fmt: skip
            old = site.attn.context_matmul.outputs[0]
            out.shape, out.type = old.shape, old.type
            editor.replace_value(old, out)
            stats["converted"] += 1
            stats[f"converted: {'causal ' + impl if site.attn.causal else 'non-causal'}"] += 1
        if impl == "ort-op" and chosen:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        if chosen:  # (Pass.__call__ then drops the calibration statistics: activations changed)
            common_passes.RemoveUnusedNodesPass()(model)
        chosen_ids = {id(layer) for layer in chosen}
        rows = []
        for layer in layers:
            row: dict[str, Any] = {
                "layer": layer.site.index,
                "causal": layer.site.attn.causal,
                "padding_mask": layer.site.key_mask.name
                if layer.site.key_mask is not None
                else None,
                "converted": id(layer) in chosen_ids,
            }
            if layer.error is not None:
                row["error"] = round(layer.error, 6)
            if layer.fit is not None:
                row["fit"] = layer.fit
            rows.append(row)
        details = {"feature_map": self.feature_map, "causal_impl": impl, "layers": rows}
        return PassResult(model, changed=bool(chosen), stats=stats, details=details)

    # ------------------------------------------------------------------ decisions

    def _causal_impl(self, stats: SiteStats) -> Literal["chunked", "ort-op"]:
        if self.causal_impl in ("auto", "chunked"):
            return "chunked"
        if ort_has_linear_attention():
            return "ort-op"
        stats["causal-impl=ort-op unavailable in this ONNX Runtime: chunked form used"] += 1
        return "chunked"

    def _choose(self, layers: list[_Layer], stats: SiteStats) -> list[_Layer]:
        if not self.selects:
            return list(layers)
        measured = [layer for layer in layers if layer.error is not None]
        for layer in layers:
            if layer.error is None:
                stats.skip("no calibration rows reached this layer", layer.site.attn.softmax)
        ranked = sorted(measured, key=lambda layer: (layer.error, layer.site.index))
        if self.layers is not None:
            count = min(self.layers, len(ranked))
        elif self.fraction is not None:
            count = min(len(ranked), int(round(self.fraction * len(layers))))
        else:
            count, total = 0, 0.0
            for layer in ranked:
                if total + layer.error > self.budget:  # type: ignore[operator]
                    break
                total += layer.error  # type: ignore[operator]
                count += 1
        for layer in ranked[count:]:
            stats.skip("larger error than the selected layers", layer.site.attn.softmax, blocked=False)
        chosen = {id(layer) for layer in ranked[:count]}
        return [layer for layer in layers if id(layer) in chosen]

    def _feeds(self, model: ir.Model) -> Iterable[Mapping[str, np.ndarray]]:
        found = pipeline_feeds(model, samples=self.capture_samples, seq_len=128)
        if found is None:  # check() ran first
            raise PreconditionError("linear-attention: no calibration data")
        return itertools.islice(found[1], self.capture_samples)  # the pipeline's count may be larger

    def _measure(self, model: ir.Model, layers: list[_Layer], kind: str) -> None:
        """Capture each layer's Q, K, V and softmax weights; fit maps; measure each layer's error."""
        _capture(model, layers, self._feeds(model))
        for layer in layers:
            if not layer.samples:
                continue
            site = layer.site
            if kind == "hedgehog":
                from tforge.passes.math.feature_map_fit import FitSample, fit_hedgehog

                fit = fit_hedgehog(
                    [FitSample(s["q"], s["k"], s["p"], s["mask"]) for s in layer.samples],  # type: ignore[arg-type]
                    causal=site.attn.causal, features=self.features or site.attn.head_dim,
                    steps=self.fit_steps, seconds=self.fit_seconds, lr=self.fit_lr,
                    queries=self.fit_queries, seed=self.seed + site.index,
                )  # fmt: skip
                layer.params = ((fit.wq, fit.bq), (fit.wk, fit.bk))
                layer.fit = {
                    "loss_start": round(fit.loss_start, 6), "loss_end": round(fit.loss_end, 6),
                    "steps": fit.steps, "seconds": round(fit.seconds, 2),
                }  # fmt: skip
            layer.error = _layer_error(layer, kind, self.eps)


def _capture(
    model: ir.Model, layers: list[_Layer], feeds: Iterable[Mapping[str, np.ndarray]]
) -> None:
    from tforge.runtime.ort import prepare_feeds

    editor = GraphEditor(model, "linear-attention")
    names: list[str] = []
    for layer in layers:
        for value in (layer.site.q, layer.site.kt, layer.site.v, layer.site.probs):
            if not value.name:
                value.name = editor.value_name("linattn.capture")
            names.append(value.name)
    unique = list(dict.fromkeys(names))
    session = session_exposing(model, unique, optimize=True)
    for feed in feeds:
        outputs = dict(zip(unique, session.run(unique, prepare_feeds(session, feed)), strict=True))
        for layer in layers:
            site = layer.site
            mask = None
            if site.key_mask is not None and site.key_mask.name in feed:
                mask = np.asarray(feed[site.key_mask.name]) != 0
            q = outputs[site.q.name] * np.float32(site.scale)  # type: ignore[index]
            k = np.swapaxes(outputs[site.kt.name], -1, -2)  # type: ignore[index]
            layer.samples.append({
                "q": q, "k": k, "v": outputs[site.v.name],  # type: ignore[index]
                "p": np.nan_to_num(outputs[site.probs.name]), "mask": mask,  # type: ignore[index]
            })  # fmt: skip


def _layer_error(layer: _Layer, kind: str, eps: float) -> float:
    """Relative squared error of the attention block's output (through the output projection)."""
    site = layer.site
    w_o = const_array(site.attn.o.weight)
    num = den = 0.0
    for s in layer.samples:
        q, k, v, p, mask = s["q"], s["k"], s["v"], s["p"], s["mask"]
        params = layer.params
        phi_q = la.apply_feature_map(kind, q, params[0] if params else None)  # type: ignore[arg-type]
        phi_k = la.apply_feature_map(kind, k, params[1] if params else None)  # type: ignore[arg-type]
        lin = la.linear_attention(phi_q, phi_k, v, causal=site.attn.causal, key_mask=mask, eps=eps)  # type: ignore[arg-type]
        ref = np.asarray(p, np.float64) @ np.asarray(v, np.float64)  # type: ignore[arg-type]
        b, h, n, d = ref.shape
        # heads merged back to [B, N, H*d], as the output projection reads them
        ref_o = ref.transpose(0, 2, 1, 3).reshape(b, n, h * d)
        lin_o = lin.transpose(0, 2, 1, 3).reshape(b, n, h * d)
        if w_o is not None and w_o.shape[0] == h * d:
            ref_o, lin_o = ref_o @ w_o, lin_o @ w_o
        rows = mask if mask is not None else np.ones((b, n), dtype=bool)
        diff = (lin_o - ref_o)[rows]
        num += float(np.sum(diff * diff))
        den += float(np.sum(ref_o[rows] ** 2))
    return num / max(den, 1e-300)
