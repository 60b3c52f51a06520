"""rptq: reorder activation channels into clusters of similar range, quantize each cluster on its own (RPTQ).

RPTQ (Yuan et al., 2023): the channels of an activation have very different ranges, so one
scale per tensor wastes the grid on the narrow ones. The channels of each linear input are
clustered by their calibrated ``(min, max)`` (k-means, :mod:`tforge.passes.math.clustering`),
reordered so that each cluster is contiguous, and each cluster gets its own asymmetric scale and
zero point.

Reordering (exact in float). For an activation ``x`` read by linears ``W``,
``x @ W == x[..., p] @ W[p, :]`` for any permutation ``p``. Where ``x[..., p]`` can be produced
for free, it is:

- FFN up -> down: the intermediate is elementwise in up's (and gate's) output columns, so
  permuting those columns (and biases) permutes the intermediate; down's rows follow. Free.
- attention V -> O: O reads the merged context, which is per channel a mix of V's channels of
  the same head (softmax weights do not depend on V), so V's output columns may be permuted
  *inside each head*; O's rows of every query head follow the permutation of the KV head it
  reads (grouped-query attention: the query heads of a group share one permutation). Free, but
  head boundaries stay, so a cluster spanning several heads is not contiguous: the lowering
  then gathers its channels (``runtime gathers`` in the stats).
- every other linear input, in particular norm outputs (the residual-stream width): a
  permutation there cannot be folded into the norm alone, because the norm's input is the
  residual stream, which every block reads and writes. Folding it would mean permuting the whole
  stream (embeddings, every residual writer and reader, final norm, LM head) with one
  permutation shared by all norms. This pass instead inserts one ``Gather`` on the linears'
  input (after the norm, so post-norm residual readers are untouched), with one permutation per
  activation, and permutes the readers' rows; it is counted as ``runtime gather: ...`` in the
  stats. Where the clusters are already contiguous no Gather is inserted.

Q and K are not permuted: this pass quantizes linear inputs only, not the Q @ K^T product, so a
Q/K permutation would buy nothing.

Lowering (``lowering=``):

- ``integer`` (W8A8): ONNX Runtime has no kernel with one activation scale per variable-size
  channel group, so each linear becomes a sum over clusters of ``MatMulIntegerToFloat``: the
  input is split by cluster (``Slice`` for a contiguous cluster, else ``Gather``), each part
  quantized to uint8 with its cluster's static scale and zero point (shared by the linears
  reading the same input), times the matching rows of the int8 weight (symmetric, one scale per
  output column), and the partial products summed (``Sum``). With ``clusters=1`` this is the
  per-tensor static int8 lowering.
- ``emulate``: fake quantization in float (``Div, Round, Add, Clip, Sub, Mul`` with a per-channel
  scale vector holding each channel's cluster scale), weights replaced by their dequantized
  values; any ``bits`` (activation) and ``weight-bits`` 8 or 4 (4: block-wise uint4, 32 rows per
  block, the layout of ORT's ``MatMulNBits``). For accuracy studies (A4, W4A4).
- ``none``: only the reordering (exact; used to prove it).

W4A8 on integer kernels is not offered: ORT's 4-bit kernel (``MatMulNBits``) quantizes its float
input itself (dynamically, per block, with ``accuracy_level=4``), so it cannot take RPTQ's static
per-cluster activation scales.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from tforge.compiler.attention_paths import value_columns
from tforge.compiler.calibration import CalibrationStats, ChannelStats, require_stats
from tforge.compiler.ffn_paths import ffn_intermediate
from tforge.compiler.pass_infra import Pass, PassResult, Property, SiteStats, Skip
from tforge.compiler.registry import register_pass
from tforge.compiler.rewrite import GraphEditor, current_weight
from tforge.compiler.structure import FFN, Attention, BlockMap, Linear, block_map, const_array
from tforge.errors import PassConfigError
from tforge.passes.math import clustering
from tforge.passes.math.int8 import quantize_weight
from tforge.passes.math.smoothing import kv_channel_groups

logger = logging.getLogger(__name__)

__all__ = ["Rptq", "permuted_stats"]

_MS = "com.microsoft"
_CALIBRATE_FIRST = "run 'calibrate' right before 'rptq'"


@dataclasses.dataclass
class _Site:
    """One activation read by linears: its cluster label per channel, in the graph's current order."""

    kind: str  # "up->down", "v->o" or "input"
    value: ir.Value
    labels: np.ndarray
    count: int
    gather: bool = False  # a runtime Gather was inserted to reorder it
    perm: np.ndarray | None = None  # the permutation applied (new channel i = old channel perm[i])


@register_pass("rptq")
@dataclasses.dataclass(frozen=True)
class Rptq(Pass):
    """Cluster each linear input's channels by range, reorder them, quantize per cluster (RPTQ)."""

    clusters: int = 4
    bits: int = 8  # activations
    weight_bits: int = 8
    lowering: Literal["integer", "emulate", "none"] = "integer"
    seed: int = 0
    block: int = 32  # rows per block of 4-bit weights
    layout: Literal["split", "codes"] = "split"  # integer lowering: see _integer
    # weight names, or substrings of them, to keep in float (their inputs are still reordered)
    exclude: tuple[str, ...] = ()

    requires: ClassVar = frozenset({Property.CANONICAL, Property.CALIBRATED})
    # Declared per class, so also with lowering=none, which only reorders.
    establishes: ClassVar = frozenset({Property.QUANTIZED})

    @property  # type: ignore[override]
    def invalidates(self) -> frozenset[Property]:  # type: ignore[override]
        """Reordering permutes the attached statistics with the channels; quantizing makes them stale."""
        return frozenset() if self.lowering == "none" else frozenset({Property.CALIBRATED})

    def __post_init__(self) -> None:
        if not 1 <= self.clusters <= 64:
            raise PassConfigError(f"rptq: clusters must be in 1..64, got {self.clusters}")
        if self.lowering not in ("integer", "emulate", "none"):
            raise PassConfigError(
                f"rptq: lowering must be integer, emulate or none, got {self.lowering!r}"
            )
        if not 2 <= self.bits <= 8:
            raise PassConfigError(f"rptq: bits (activations) must be in 2..8, got {self.bits}")
        if self.weight_bits not in (4, 8):
            raise PassConfigError(f"rptq: weight-bits must be 8 or 4, got {self.weight_bits}")
        if self.layout not in ("split", "codes"):
            raise PassConfigError(f"rptq: layout must be split or codes, got {self.layout!r}")
        if any(not pattern for pattern in self.exclude):
            raise PassConfigError(
                "rptq: exclude holds an empty name, which would match every linear"
            )
        if self.block < 1:
            raise PassConfigError(f"rptq: block must be >= 1, got {self.block}")
        if self.lowering == "integer" and (self.bits != 8 or self.weight_bits != 8):
            raise PassConfigError(
                "rptq: lowering=integer runs ORT's u8 x s8 kernels, so it needs bits=8 weight-bits=8; "
                "ORT's 4-bit MatMulNBits quantizes its input itself and cannot take per-cluster "
                "activation scales: use lowering=emulate for A4 / W4"
            )

    def check(self, model: ir.Model) -> None:
        require_stats(model, "rptq:", _CALIBRATE_FIRST)

    def run(self, model: ir.Model) -> PassResult:
        calib = require_stats(model, "rptq:", _CALIBRATE_FIRST)
        stats = SiteStats()
        editor = GraphEditor(model, self.name)
        blocks = block_map(model)
        sites: dict[int, _Site] = {}

        for block in blocks.blocks:
            if block.ffn is not None:
                self._reorder_up_down(block.ffn, blocks, calib, editor, stats, sites)
            if block.attention is not None:
                self._reorder_v_o(block.attention, calib, editor, stats, sites)
        # Every other linear input: one Gather (when the clusters are not contiguous already).
        readers: dict[int, list[Linear]] = {}
        for lin in blocks.linears:
            readers.setdefault(id(lin.input), []).append(lin)
        for linears in readers.values():
            x = linears[0].input
            if id(x) in sites:
                continue
            self._reorder_input(x, linears, calib, editor, stats, sites)

        details: dict[str, Any] = {"sites": []}
        for site in sites.values():
            segs = clustering.segments(site.labels)
            details["sites"].append(
                {
                    "kind": site.kind,
                    "activation": site.value.name,
                    "channels": int(site.labels.shape[0]),
                    "clusters": site.count,
                    "segments": len(segs),
                    "gather": site.gather,
                    "labels": site.labels.tolist(),
                    "permutation": site.perm.tolist() if site.perm is not None else None,
                }
            )
        if self.lowering != "none":
            self._lower(model, editor, calib, sites, stats)
        changed = any(k.startswith(("reordered", "quantized")) for k in stats)
        return PassResult(model, changed=changed, stats=stats, details=details)

    # ------------------------------------------------------------------ clustering

    def _cluster(self, st: ChannelStats) -> clustering.ChannelClusters:
        return clustering.cluster_channels(st.min, st.max, self.clusters, seed=self.seed)

    @staticmethod
    def _stats_for(calib: CalibrationStats, value: ir.Value, channels: int, kind: str) -> ChannelStats:
        st = calib.get(value.name or "")
        if st is None or st.count == 0:
            raise Skip(f"{kind}: no calibration stats", value)
        if st.channels != channels:
            raise Skip(f"{kind}: calibration stats are stale (channel count differs)", value)
        return st

    # ------------------------------------------------------------------ reordering

    def _reorder_up_down(
        self,
        ffn: FFN,
        blocks: BlockMap,
        calib: CalibrationStats,
        editor: GraphEditor,
        stats: SiteStats,
        sites: dict[int, _Site],
    ) -> None:
        x = ffn.down.input
        try:
            _check_up_down(ffn, blocks)
            st = self._stats_for(calib, x, ffn.down.in_features, "up->down")
        except Skip as skip:
            stats.skip(skip)
            return
        found = self._cluster(st)
        perm = clustering.contiguous_permutation(found.labels)

        def permute() -> None:
            for lin in (ffn.up, ffn.gate):
                if lin is not None:
                    editor.permute_columns(lin, perm)
            editor.permute_rows([ffn.down], perm)

        _commit_free_reordering("up->down", "free", x, st, found, perm, permute, calib, stats, sites)

    def _reorder_v_o(
        self,
        attn: Attention,
        calib: CalibrationStats,
        editor: GraphEditor,
        stats: SiteStats,
        sites: dict[int, _Site],
    ) -> None:
        x = attn.o.input
        hd, heads, kv_heads = attn.head_dim, attn.num_heads, attn.num_kv_heads
        try:
            start, _width = value_columns(attn)
            if any(id(lin.input) == id(x) for lin in [attn.q, attn.k, attn.v]):
                raise Skip("v->o: the output projection reads a projection input", attn.o.matmul)
            st = self._stats_for(calib, x, attn.o.in_features, "v->o")
        except Skip as skip:
            stats.skip(skip)
            return
        found = self._cluster(st)
        # One permutation per KV head, shared by its query heads: each channel's key is the
        # cluster of its range merged over the group's query heads (the nearest centre).
        group = heads // kv_heads
        lo = st.min.reshape(kv_heads, group, hd).min(axis=1).reshape(-1)
        hi = st.max.reshape(kv_heads, group, hd).max(axis=1).reshape(-1)
        keys = _nearest_centre(lo, hi, found.centres)
        v_perm = clustering.within_blocks_permutation(keys, hd)  # over V's kv_heads * hd columns
        # O's input channel c reads V channel g[c]; it moves within its head as g[c] does
        g = kv_channel_groups(heads, kv_heads, hd)
        o_perm = (np.arange(heads * hd) - g + v_perm[g]).astype(np.int64)

        def permute() -> None:
            editor.permute_columns(attn.v, v_perm, start)
            editor.permute_rows([attn.o], o_perm)

        _commit_free_reordering("v->o", "free, inside heads", x, st, found, o_perm, permute, calib, stats, sites)

    def _reorder_input(
        self,
        x: ir.Value,
        linears: list[Linear],
        calib: CalibrationStats,
        editor: GraphEditor,
        stats: SiteStats,
        sites: dict[int, _Site],
    ) -> None:
        channels = linears[0].in_features
        try:
            st = self._stats_for(calib, x, channels, "input")
        except Skip as skip:
            stats.skip(skip)
            return
        found = self._cluster(st)
        perm = clustering.contiguous_permutation(found.labels)
        if np.array_equal(perm, np.arange(channels)) or self.clusters == 1:
            sites[id(x)] = _Site("input", x, found.labels, found.count)
            stats["already contiguous: input"] += 1
            return
        base = x.name or "x"
        indices = editor.initializer(f"{base}.rptq_perm", perm)
        editor.place_after(x)
        gather = editor.node(
            "Gather", [x, indices], attributes={"axis": -1},
            name=f"{base}.rptq_reorder", outputs=f"{base}.rptq",
        )  # fmt: skip
        out = gather.outputs[0]
        out.shape, out.type = x.shape, x.type
        for lin in linears:
            lin.matmul.replace_input_with(0, out)
        editor.permute_rows(linears, perm)
        calib.stats[out.name] = permuted_stats(st, perm)
        sites[id(out)] = _Site(
            "input", out, found.labels[perm], found.count, gather=True, perm=perm
        )
        stats["reordered: input (runtime gather)"] += 1

    # ------------------------------------------------------------------ lowering

    def _lower(
        self,
        model: ir.Model,
        editor: GraphEditor,
        calib: CalibrationStats,
        sites: dict[int, _Site],
        stats: SiteStats,
    ) -> None:
        order = {id(n): i for i, n in enumerate(model.graph)}
        readers: dict[int, list[Linear]] = {}
        for lin in block_map(model).linears:
            if any(pattern in lin.name for pattern in self.exclude):
                stats.skip("excluded", lin.matmul, blocked=False)
            elif id(lin.input) in sites:
                readers.setdefault(id(lin.input), []).append(lin)
            else:
                stats.skip("linear input has no calibration stats", lin.matmul)
        for key, linears in readers.items():
            site = sites[key]
            st = calib.stats[site.value.name or ""]
            lo, hi = clustering.cluster_ranges(st.min, st.max, site.labels, site.count)
            scale, zero = clustering.uint_qparams(lo, hi, self.bits)
            first = min(linears, key=lambda lin: order.get(id(lin.matmul), 0))
            if self.lowering == "emulate":
                _emulate(editor, site, scale, zero, self.bits, linears, first.matmul)
                for lin in linears:
                    w = const_array(current_weight(lin))
                    editor.set_constant(
                        current_weight(lin),
                        [(lin.matmul, 1)],
                        clustering.fake_quantize_weight(w, self.weight_bits, self.block),  # type: ignore[arg-type]
                    )
                stats["quantized (emulated)"] += len(linears)
            else:
                gathers = _integer(editor, site, scale, zero, linears, first.matmul, self.layout)
                stats["quantized (int8 kernels)"] += len(linears)
                if gathers:
                    stats[
                        "runtime gather: cluster spans heads (v->o)"
                        if site.kind == "v->o"
                        else "runtime gather: non-contiguous cluster"
                    ] += gathers
        editor.drop_retired()  # the float weights (and biases) the lowering replaced


# ----------------------------------------------------------------------------- plumbing


def _commit_free_reordering(
    kind: str,
    how: str,
    x: ir.Value,
    st: ChannelStats,
    found: clustering.ChannelClusters,
    perm: np.ndarray,
    permute: Callable[[], None],
    calib: CalibrationStats,
    stats: SiteStats,
    sites: dict[int, _Site],
) -> None:
    """Reorder activation ``x`` by ``perm`` through its producer's and reader's weights (``permute``)
    unless ``perm`` is the identity, keep its statistics in the new order, and record the site."""
    if np.array_equal(perm, np.arange(perm.shape[0])):
        stats[f"already contiguous: {kind}"] += 1
    else:
        permute()
        calib.stats[x.name or ""] = permuted_stats(st, perm)
        stats[f"reordered: {kind} ({how})"] += 1
    sites[id(x)] = _Site(kind, x, found.labels[perm], found.count, perm=perm)


def permuted_stats(st: ChannelStats, perm: np.ndarray) -> ChannelStats:
    """The statistics of ``x[..., perm]`` (exact: the histogram of ``|x|`` does not change)."""
    return ChannelStats(
        absmax=st.absmax[perm],
        min=st.min[perm],
        max=st.max[perm],
        sum_sq=st.sum_sq[perm],
        count=st.count,
        tensor_hist=st.tensor_hist.copy(),
        hist_range=st.hist_range,
        sum=st.sum[perm] if st.sum is not None else None,
        gram=st.gram[np.ix_(perm, perm)] if st.gram is not None else None,
    )


def _nearest_centre(lo: np.ndarray, hi: np.ndarray, centres: np.ndarray) -> np.ndarray:
    pts = np.stack([np.where(np.isfinite(lo), lo, 0.0), np.where(np.isfinite(hi), hi, 0.0)], axis=1)
    return np.argmin(((pts[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)


def _weight(lin: Linear) -> np.ndarray:
    w = const_array(current_weight(lin))
    if w is None:  # the block map lists constant weights only
        raise ValueError(f"rptq: weight of '{lin.name}' is not a constant")
    return np.asarray(w)


def _check_up_down(ffn: FFN, blocks: BlockMap) -> None:
    """Skip unless permuting up's (and gate's) columns permutes down's input: a channel-wise,
    private intermediate without per-channel constants (those would have to be permuted too)."""
    try:
        path = ffn_intermediate(ffn, blocks)
    except Skip as why:
        raise Skip(f"up->down: {why.reason}", why.at) from None
    if path.channel_constants:
        node, _ = path.channel_constants[0]
        raise Skip(f"up->down: {node.op_type} on the intermediate reads a per-channel constant", node)


def _emulate(
    editor: GraphEditor,
    site: _Site,
    scale: np.ndarray,
    zero: np.ndarray,
    bits: int,
    linears: list[Linear],
    before: ir.Node,
) -> None:
    """``x' = (clip(round(x / s) + z, 0, 2^b - 1) - z) * s`` with each channel's cluster ``s, z``."""
    x = site.value
    base = x.name or "x"
    s = editor.initializer(f"{base}.rptq_scale", scale[site.labels].astype(np.float32))
    z = editor.initializer(f"{base}.rptq_zero", zero[site.labels].astype(np.float32))
    lo = editor.initializer(f"{base}.rptq_qmin", np.array(0.0, np.float32))
    hi = editor.initializer(f"{base}.rptq_qmax", np.array(2**bits - 1, np.float32))
    like = {"before": before, "dtype": ir.DataType.FLOAT, "shape": x.shape}
    v = editor.op("Div", [x, s], name=f"{base}.rptq_div", **like)
    v = editor.op("Round", [v], name=f"{base}.rptq_round", **like)
    v = editor.op("Add", [v, z], name=f"{base}.rptq_shift", **like)
    v = editor.op("Clip", [v, lo, hi], name=f"{base}.rptq_clip", **like)
    v = editor.op("Sub", [v, z], name=f"{base}.rptq_unshift", **like)
    v = editor.op("Mul", [v, s], name=f"{base}.rptq_fq", **like)
    for lin in linears:
        lin.matmul.replace_input_with(0, v)


def _integer(
    editor: GraphEditor,
    site: _Site,
    scale: np.ndarray,
    zero: np.ndarray,
    linears: list[Linear],
    before: ir.Node,
    layout: str = "split",
) -> int:
    """Sum over clusters of MatMulIntegerToFloat; returns the number of Gathers it needed.

    ``layout="split"``: the float input split by cluster, one per-tensor ``QuantizeLinear`` per
    part. ``"codes"``: one per-channel ``QuantizeLinear`` (each channel with its cluster's scale
    and zero point) over the whole input, then the uint8 codes split by cluster; it writes less
    data but measured 3x slower on MiniLM (ORT 1.31's per-axis QuantizeLinear over the last axis
    is slow: with one cluster it alone made the model 4.9x slower than per-tensor). A third
    layout was measured and dropped: the parts' codes concatenated into one matmul per linear
    whose weight rows carry the cluster scales (``s[:, None] * W``, then int8 per column) and
    whose bias the zero points. No per-cluster matmuls and no Sum, yet on MiniLM it was only 1.2x
    faster than ``split`` (1.74x per-tensor's latency, the Slices/Gathers remain) and less
    accurate than per-tensor (relative output error 0.159 vs 0.128; ``split``: 0.043), because
    one int8 grid per weight column then covers rows of very different scale.
    """
    x = site.value
    base = x.name or "x"
    parts: list[tuple[np.ndarray, ir.Value, ir.Value, ir.Value]] = []
    gathers = 0
    codes = None
    if layout == "codes":
        s_all = editor.initializer(f"{base}.rptq_scale", scale[site.labels].astype(np.float32))
        z_all = editor.initializer(f"{base}.rptq_zero", zero[site.labels].astype(np.uint8))
        codes = editor.op(
            "QuantizeLinear", [x, s_all, z_all], name=f"{base}.rptq_q", before=before,
            shape=x.shape, dtype=ir.DataType.UINT8, attributes={"axis": -1},
        )  # fmt: skip
    slice_axis: ir.Value | None = None  # one [-1] for every Slice of this site
    for c in range(site.count):
        idx = np.flatnonzero(site.labels == c).astype(np.int64)
        if idx.size == 0:
            continue
        source = codes if codes is not None else x
        dtype = ir.DataType.UINT8 if codes is not None else ir.DataType.FLOAT
        if idx.size == site.labels.shape[0]:
            chunk = source
        elif idx[-1] - idx[0] + 1 == idx.size:
            if slice_axis is None:
                slice_axis = editor.initializer(f"{base}.rptq_axis", np.array([-1], np.int64))
            start = editor.initializer(f"{base}.rptq_c{c}_start", np.array([idx[0]], np.int64))
            stop = editor.initializer(f"{base}.rptq_c{c}_stop", np.array([idx[-1] + 1], np.int64))
            chunk = editor.op(
                "Slice", [source, start, stop, slice_axis], name=f"{base}.rptq_c{c}",
                before=before, dtype=dtype,
            )  # fmt: skip
        else:
            indices = editor.initializer(f"{base}.rptq_c{c}_idx", idx)
            chunk = editor.op(
                "Gather", [source, indices], name=f"{base}.rptq_c{c}", before=before,
                attributes={"axis": -1}, dtype=dtype,
            )  # fmt: skip
            gathers += 1
        s = editor.initializer(f"{base}.rptq_c{c}_scale", np.array(scale[c], np.float32))
        z = editor.initializer(f"{base}.rptq_c{c}_zero", np.array(zero[c], np.uint8))
        q = (
            chunk
            if codes is not None
            else editor.op(
                "QuantizeLinear", [chunk, s, z], name=f"{base}.rptq_c{c}_q", before=before,
                dtype=ir.DataType.UINT8,
            )
        )
        parts.append((idx, q, s, z))
    for lin in linears:
        name = lin.name
        bias = [lin.bias] if lin.bias is not None else []
        wq, ws = quantize_weight(_weight(lin))
        w_scale = editor.initializer(f"{name}.rptq_scale", ws)
        w_zero = editor.initializer(f"{name}.rptq_zero", np.zeros(ws.shape, np.int8))
        outs = []
        for i, (idx, q, s, z) in enumerate(parts):
            w = editor.initializer(f"{name}.rptq_int8_c{i}", np.ascontiguousarray(wq[idx]))
            outs.append(
                editor.op(
                    "MatMulIntegerToFloat", [q, w, s, w_scale, z, w_zero, *(bias if i == 0 else [])],
                    name=f"{name}.rptq_mm{i}", before=lin.matmul, domain=_MS, dtype=ir.DataType.FLOAT,
                )  # fmt: skip
            )
        result = (
            outs[0]
            if len(outs) == 1
            else editor.op("Sum", outs, name=f"{name}.rptq_sum", before=lin.matmul, dtype=ir.DataType.FLOAT)
        )
        end = lin.bias_add if (lin.bias_add is not None and bias) else lin.matmul
        old = end.outputs[0]
        result.shape = old.shape
        editor.replace_value(old, result)
        editor.retire(current_weight(lin))
        if lin.bias_add is not None and bias:
            editor.retire(lin.bias)  # type: ignore[arg-type]
            editor.remove(lin.bias_add)
        editor.remove(lin.matmul)
    return gathers
