"""quantize-weights: linears to 4- or 8-bit block-wise weights on ONNX Runtime's ``MatMulNBits``.

Each linear's weight ``W [K, N]`` is cut along ``K`` into blocks of ``block`` rows per output
column; a block has one float scale (and, asymmetric, one zero point), its weights become
``bits``-bit codes (:mod:`tforge.passes.math.block_quant`, bit-exact with ORT's kernels). The
linear is lowered to ``com.microsoft.MatMulNBits`` (the bias folded into its bias input), or,
``format=qdq``, to a standard ``DequantizeLinear`` with ``block_size`` (opset 21) feeding the
float ``MatMul``, for runtimes without the contrib op. ``accuracy-level=4`` makes ORT quantize
the activations to int8 inside the kernel (int8 x int4 dot products): the fast CPU path.

How the codes are chosen (``method``):

- ``rtn``: round to nearest on ORT's own scales, the baseline;
- ``gptq``: column by column, each rounding error compensated on the columns not yet quantized
  through the inverse Hessian of the layer's input, ``H = E[x x^T]`` (which ``calibrate`` collects
  for this pass by itself); damping ``damp``, activation order, a clipping search per block;
- ``awq``: a per-input-channel scale ``s = rms(x)^alpha`` (``alpha`` searched on a grid for the
  least output error computed from ``E[x x^T]``, :mod:`tforge.passes.math.awq`) moved exactly
  into the producer of the activation, ``x W = (x / s) (s W)``, before rounding, where the
  producer allows it (a norm, through :mod:`tforge.compiler.rescale`; V -> O and FFN up -> down,
  by scaling V's or up's columns), then round to nearest with the clipping search
  (``clip-search``); elsewhere RTN with the clipping search only. The attached statistics are
  rescaled with the activations, so the errors in ``details`` are measured on ``x / s``.

The token embedding (``Gather`` of a constant table by the token ids) becomes
``com.microsoft.GatherBlockQuantized`` with ``embedding-bits`` (0: kept in float); an LM head
tied to it (its weight is the table transposed) reads the same packed bytes, so the file holds
one copy. Every linear left in float is counted with the reason; ``details`` give each layer's
bits and its relative output error ``E||x (W - W_q)||^2 / E||x W||^2`` when the input's second
moment is known (else the relative Frobenius error). ``calibrate`` collects the second moments
for ``method=gptq`` and ``awq`` by itself (``gram_wanted``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from tforge.compiler.attention_paths import value_columns
from tforge.compiler.calibration import attached_stats
from tforge.compiler.embeddings import Embedding, find_embeddings, tied_head
from tforge.compiler.ffn_paths import check_rescalable_up_down
from tforge.compiler.pass_infra import Pass, PassResult, Property, SiteStats, Skip
from tforge.compiler.registry import register_pass
from tforge.compiler.rescale import check_norm_scalable, scale_norm_output, scale_stats
from tforge.compiler.rewrite import GraphEditor, current_weight
from tforge.compiler.structure import FFN, Attention, BlockMap, Linear, block_map, const_array
from tforge.errors import PassConfigError
from tforge.passes.math import awq, gptq, smoothing
from tforge.passes.math import block_quant as bq

logger = logging.getLogger(__name__)

__all__ = ["QuantizeWeights"]

_MS = "com.microsoft"
_QDQ_OPSET = 21


@register_pass("quantize-weights")
@dataclasses.dataclass(frozen=True)
class QuantizeWeights(Pass):
    """Block-wise 4/8-bit weights (RTN, GPTQ or AWQ) on MatMulNBits; embeddings on GatherBlockQuantized."""

    bits: int = 4
    block: int = 32
    symmetric: bool = True
    method: Literal["rtn", "gptq", "awq"] = "rtn"
    accuracy_level: int = 4  # MatMulNBits: 0 float activations ... 4 int8 activations
    format: Literal["nbits", "qdq"] = "nbits"
    exclude: tuple[str, ...] = ()  # weight names, or substrings of them, to keep in float
    embedding_bits: int = 4  # the token embedding (and a tied LM head's storage); 0: float
    damp: float = 0.01  # gptq: added to H's diagonal, relative to its mean
    act_order: bool = True  # gptq: rows by decreasing E[x_k^2], on the natural blocks' fixed grids
    clip_search: bool = True  # gptq, awq: per block, the range shrink with the least weighted error
    alpha_grid: tuple[float, ...] = awq.DEFAULT_ALPHAS  # awq: exponents of s = rms(x)^alpha tried
    # a tied LM head reads the embedding's 4-bit bytes (one copy in the file; RTN) instead of
    # its own GPTQ-quantized copy
    tie: bool = True

    requires: ClassVar = frozenset({Property.CANONICAL})
    establishes: ClassVar = frozenset({Property.QUANTIZED})
    invalidates: ClassVar = frozenset({Property.CALIBRATED})

    def __post_init__(self) -> None:
        try:
            bq.check_config("quantize-weights", self.bits, self.block)
        except ValueError as error:
            raise PassConfigError(str(error)) from None
        if self.method not in ("rtn", "gptq", "awq"):
            raise PassConfigError(f"quantize-weights: method must be rtn, gptq or awq, got {self.method!r}")
        if self.format not in ("nbits", "qdq"):
            raise PassConfigError(f"quantize-weights: format must be nbits or qdq, got {self.format!r}")
        if self.format == "qdq" and self.bits not in (4, 8):
            raise PassConfigError("quantize-weights: format=qdq has 4- and 8-bit types only (opset 21)")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise PassConfigError(f"quantize-weights: accuracy-level must be 0..4, got {self.accuracy_level}")
        if self.embedding_bits not in (0, 2, 4, 8):
            raise PassConfigError(f"quantize-weights: embedding-bits must be 0, 2, 4 or 8, got {self.embedding_bits}")
        if any(not pattern for pattern in self.exclude):
            raise PassConfigError("quantize-weights: exclude holds an empty name, which would match every linear")
        if not self.damp > 0:
            raise PassConfigError(f"quantize-weights: damp must be > 0, got {self.damp}")
        if not self.alpha_grid or not all(0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise PassConfigError(f"quantize-weights: alpha-grid must be values in [0, 1], got {self.alpha_grid}")

    def check(self, model: ir.Model) -> None:
        if self.format == "qdq":
            opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
            if opset < _QDQ_OPSET:
                raise PassConfigError(
                    f"quantize-weights: format=qdq needs opset {_QDQ_OPSET} (DequantizeLinear with "
                    f"block_size), the model imports {opset}; use format=nbits"
                )

    def gram_wanted(self, model: ir.Model) -> set[str]:
        """The inputs of the linears GPTQ or AWQ will quantize: both read E[x x^T].

        RTN asks for none: a [C, C] matrix per input only to report errors would cost more
        memory than it is worth on a large model (its errors are then relative Frobenius ones,
        unless ``calibrate{gram=true}`` collected them anyway).
        """
        if self.method == "rtn":
            return set()
        return {lin.input.name for lin in block_map(model).linears if lin.input.name and not self._excluded(lin)}

    def run(self, model: ir.Model) -> PassResult:
        stats = SiteStats()
        details: dict[str, Any] = {"layers": []}
        editor = GraphEditor(model, self.name)
        blocks = block_map(model)
        calibration = attached_stats(model)
        embeddings = find_embeddings(model.graph) if self.embedding_bits else []
        heads: dict[int, Embedding] = {}  # matmul node id -> the embedding its weight is tied to
        if self.tie and self.embedding_bits == self.bits:
            for emb in embeddings:
                head = tied_head(emb, list(blocks.linears))
                if head is not None:
                    heads[id(head.matmul)] = emb
        if self.method == "awq":
            details["awq_sites"] = self._awq_fold(editor, blocks, set(heads), stats)
            blocks = block_map(model)  # the same linears; their weights were rescaled
            calibration = attached_stats(model)
        linears = list(blocks.linears)
        packed_tables: dict[int, _Packed] = {}
        for emb in embeddings:
            packed = self._embedding(editor, emb, stats)
            if packed is not None:
                packed_tables[id(emb)] = packed
        shared = {key: packed_tables[id(emb)] for key, emb in heads.items() if id(emb) in packed_tables}
        for lin in linears:
            tied = shared.get(id(lin.matmul))
            try:
                self._check(lin)
                q, error = self._quantize(lin, calibration, tied)
            except Skip as skip:
                stats.skip(skip)
                continue
            self._lower(editor, lin, q, tied)
            stats["quantized"] += 1
            stats[f"quantized: {self.bits}-bit {self.method}"] += 1
            details["layers"].append(
                {
                    "linear": lin.name,
                    "shape": [lin.in_features, lin.out_features],
                    "bits": self.bits,
                    "method": self.method if tied is None else "rtn (tied to the embedding)",
                    "relative_output_error": error,
                    "bytes": q.nbytes() if tied is None else 0,
                }
            )
        editor.drop_retired()
        changed = stats["quantized"] > 0 or stats["embedding quantized"] > 0
        return PassResult(model, changed=changed, stats=stats, details=details)

    # ------------------------------------------------------------------ decisions

    def _excluded(self, lin: Linear) -> bool:
        return any(pattern == lin.name or pattern in lin.name for pattern in self.exclude)

    def _check(self, lin: Linear) -> None:
        if self._excluded(lin):
            raise Skip("excluded", lin.matmul, blocked=False)
        if lin.weight.dtype != ir.DataType.FLOAT or lin.input.dtype not in (ir.DataType.FLOAT, None):
            raise Skip("weight or input is not float32", lin.matmul)

    def _quantize(
        self, lin: Linear, calibration: Any, tied: _Packed | None
    ) -> tuple[bq.BlockQuantized, float]:
        w = np.asarray(const_array(current_weight(lin)), np.float32)
        st = calibration.get(lin.input.name or "") if calibration is not None else None
        gram = st.second_moment if st is not None and st.gram is not None and st.count else None
        if gram is not None and gram.shape != (w.shape[0], w.shape[0]):
            gram = None  # stale statistics of another width: measured as if there were none
        if tied is not None:
            q = tied.q
        elif self.method == "rtn":
            q = bq.quantize_rtn(w, self.bits, self.block, self.symmetric)
        elif self.method == "gptq":
            if gram is None:
                raise Skip("method=gptq needs E[x x^T] of the input (run calibrate before it)", lin.matmul)
            q = gptq.gptq_quantize(
                w, gram, self.bits, self.block, self.symmetric, damp=self.damp,
                act_order=self.act_order, clips=gptq.DEFAULT_CLIPS if self.clip_search else None,
            ).q  # fmt: skip
        else:  # awq: the scales were folded before; RTN on the rescaled weight, clipped
            q = awq.quantize_clipped(
                w, gram, self.bits, self.block, self.symmetric, gptq.DEFAULT_CLIPS if self.clip_search else None
            )
        w_hat = bq.dequantize(q)
        if gram is not None:
            energy = bq.output_error(w, np.zeros_like(w), gram)
            error = bq.output_error(w, w_hat, gram) / energy if energy > 0 else 0.0
        else:
            norm = float(np.linalg.norm(w))
            error = float(np.linalg.norm(w - w_hat) ** 2 / norm**2) if norm > 0 else 0.0
        return q, error

    # ------------------------------------------------------------------ awq

    def _awq_fold(self, editor: GraphEditor, blocks: BlockMap, heads: set[int], stats: SiteStats) -> list[dict[str, Any]]:
        """Search and fold AWQ's scales at every site whose producer can absorb them exactly.

        Column sites (V -> O, up -> down) first, as smoothquant does: V's and up's columns are
        then final when the scale of the norm that feeds them is searched on their weights.
        """
        rows: list[dict[str, Any]] = []
        for block in blocks.blocks:
            if block.attention is not None:
                self._awq_site(editor, "v->o", block.attention.o.matmul, [block.attention.o], heads, stats, rows,
                               attention=block.attention)  # fmt: skip
            if block.ffn is not None:
                self._awq_site(editor, "up->down", block.ffn.down.matmul, [block.ffn.down], heads, stats, rows,
                               ffn=block.ffn, blocks=blocks)  # fmt: skip
        for norm in blocks.norms:
            try:
                check_norm_scalable(norm)
            except Skip as skip:
                stats.skip(Skip(f"awq: {skip.reason}", skip.at, blocked=False))
                continue
            self._awq_site(editor, "norm", norm.node, list(norm.linears), heads, stats, rows, norm=norm)
        return rows

    def _awq_site(
        self, editor: GraphEditor, kind: str, node: ir.Node, readers: list[Linear], heads: set[int],
        stats: SiteStats, rows: list[dict[str, Any]], *, attention: Attention | None = None,
        ffn: FFN | None = None, blocks: BlockMap | None = None, norm: Any = None,
    ) -> None:  # fmt: skip
        model = editor.model
        try:
            if any(id(lin.matmul) in heads for lin in readers):
                raise Skip("awq: a reader is the LM head tied to the embedding", node, blocked=False)
            if any(lin.weight.dtype != ir.DataType.FLOAT for lin in readers):
                raise Skip("awq: a reader's weight is not float32", node)
            groups = start = None
            if attention is not None:
                start, _ = value_columns(attention)
                groups = smoothing.kv_channel_groups(attention.num_heads, attention.num_kv_heads, attention.head_dim)
            if ffn is not None:
                try:
                    check_rescalable_up_down(ffn, blocks)
                except Skip as why:  # the linears are still quantized, by RTN with clipping
                    raise Skip(f"awq: {why.reason}", why.at, blocked=False) from None
            name = readers[0].input.name
            calibration = attached_stats(model)
            st = calibration.get(name or "") if calibration is not None else None
            if st is None or st.gram is None or not st.count:
                raise Skip("awq: needs E[x x^T] of the input (run calibrate before it)", node)
            if st.channels != readers[0].in_features:
                raise Skip("awq: calibration stats are stale (channel count differs)", node)
            weights = [np.asarray(const_array(current_weight(lin)), np.float64) for lin in readers]
            found = awq.search_scale(
                weights, st.second_moment, np.sqrt(st.mean_sq), self.bits, self.block, self.symmetric,
                alphas=self.alpha_grid, groups=groups,
            )  # fmt: skip
            if found.alpha == 0:
                raise Skip("awq: no scale lowers the output error", node, blocked=False)
        except Skip as skip:
            stats.skip(skip)
            return
        scale = found.scale
        if attention is not None:
            v_scale = np.empty(int(groups.max()) + 1, np.float64)  # type: ignore[union-attr]
            v_scale[groups] = scale  # members of a group carry the same scale
            editor.scale_columns(attention.v, v_scale, start or 0)
            editor.scale_rows(readers, scale)
        elif ffn is not None:
            editor.scale_columns(ffn.up, scale)
            editor.scale_rows(readers, scale)
        else:
            scale_norm_output(editor, norm, scale)
        scale_stats(model, name, 1.0 / scale)
        stats[f"awq scaled: {kind}"] += 1
        rows.append({
            "site": kind, "activation": name, "alpha": found.alpha,
            "linears": [lin.name for lin in readers],
            "rtn_output_error": found.rtn_error, "awq_output_error": found.error,
        })  # fmt: skip

    # ------------------------------------------------------------------ rewrites

    def _lower(self, editor: GraphEditor, lin: Linear, q: bq.BlockQuantized, tied: _Packed | None) -> None:
        name = lin.name
        end = lin.bias_add if lin.bias_add is not None else lin.matmul
        old = end.outputs[0]
        bias = lin.bias if lin.bias_add is not None else None
        if self.format == "qdq":
            t = bq.pack_dequantize_linear(q)
            inputs = [editor.initializer(f"{name}.q{q.bits}", t.x), editor.initializer(f"{name}.scales", t.x_scale)]
            if t.x_zero_point is not None:
                inputs.append(editor.initializer(f"{name}.zero_points", t.x_zero_point))
            w = editor.op(
                "DequantizeLinear", inputs, name=f"{name}.dequantize", before=lin.matmul,
                attributes=t.attributes(), dtype=ir.DataType.FLOAT, shape=[q.k, q.n],
            )  # fmt: skip
            editor.retire(current_weight(lin))
            lin.matmul.replace_input_with(1, w)
            editor.mark(lin.matmul)
            return
        t = bq.pack_matmul_nbits(q)
        if tied is not None:  # the embedding's packed bytes, seen as MatMulNBits' [N, blocks, bytes]
            shape = editor.initializer(f"{name}.nbits_shape", np.array(t.B.shape, np.int64))
            b = editor.op("Reshape", [tied.data, shape], name=f"{name}.tied_weight", before=lin.matmul,
                          dtype=ir.DataType.UINT8, shape=list(t.B.shape))  # fmt: skip
            scales, zero_points = tied.scales, tied.zero_points
        else:
            b = editor.initializer(f"{name}.q{q.bits}", t.B)
            scales = editor.initializer(f"{name}.scales", t.scales)
            zero_points = editor.initializer(f"{name}.zero_points", t.zero_points) if t.zero_points is not None else None
        inputs: list[ir.Value | None] = [lin.input, b, scales, zero_points]
        if bias is not None:
            inputs += [None, bias]  # g_idx absent, then the bias
        while inputs[-1] is None:
            inputs.pop()
        node = editor.node(
            "MatMulNBits", inputs, domain=_MS, name=f"{lin.matmul.name or name}.nbits",
            outputs=f"{old.name or name}.nbits", attributes=t.attributes(self.accuracy_level),
            before=lin.matmul, dtype=ir.DataType.FLOAT, shape=old.shape,
        )  # fmt: skip
        editor.retire(current_weight(lin))
        editor.replace_value(old, node.outputs[0])
        if lin.bias_add is not None:
            editor.remove(lin.bias_add)
        editor.remove(lin.matmul)

    def _embedding(self, editor: GraphEditor, emb: Embedding, stats: SiteStats) -> _Packed | None:
        table = np.asarray(const_array(emb.table), np.float32)
        vocab, hidden = table.shape
        bits = self.embedding_bits
        if hidden % self.block:
            stats.skip(f"embedding width {hidden} is not a multiple of block {self.block}", emb.gather)
            return None
        q = bq.quantize_rtn(table.T, bits, self.block, self.symmetric)
        t = bq.pack_gather_block_quantized(q, "uint8")
        name = emb.table.name or "embedding"
        data = editor.initializer(f"{name}.q{bits}", t.data)
        scales = editor.initializer(f"{name}.scales", t.scales)
        zero_points = editor.initializer(f"{name}.zero_points", t.zero_points) if t.zero_points is not None else None
        old = emb.gather.outputs[0]
        node = editor.node(
            "GatherBlockQuantized", [data, emb.ids, scales, zero_points] if zero_points is not None else [data, emb.ids, scales],
            domain=_MS, name=f"{emb.gather.name or name}.quantized", outputs=f"{old.name or name}.quantized",
            attributes=t.attributes(), before=emb.gather, dtype=ir.DataType.FLOAT, shape=old.shape,
        )  # fmt: skip
        editor.retire(emb.table)
        editor.replace_value(old, node.outputs[0])
        editor.remove(emb.gather)
        stats["embedding quantized"] += 1
        return _Packed(q, data, scales, zero_points)


@dataclasses.dataclass(frozen=True)
class _Packed:
    """An embedding's packed table, which a tied LM head reads as its MatMulNBits weight."""

    q: bq.BlockQuantized  # the table transposed, quantized: [K = hidden, N = vocab]
    data: ir.Value
    scales: ir.Value
    zero_points: ir.Value | None


# ----------------------------------------------------------------------------- structure checks
