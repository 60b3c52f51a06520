"""quantize-weights: linears to 4- or 8-bit block-wise weights on ONNX Runtime's ``MatMulNBits``.

Each linear's weight ``W [K, N]`` is cut along ``K`` into blocks of ``block`` rows per output
column; a block has one float scale (and, asymmetric, one zero point), its weights become
``bits``-bit codes (:mod:`tforge.passes.math.block_quant`, bit-exact with ORT's kernels). The
linear is lowered to ``com.microsoft.MatMulNBits`` (the bias folded into its bias input), or,
``format=qdq``, to a standard ``DequantizeLinear`` with ``block_size`` (opset 21) feeding the
float ``MatMul``, for runtimes without the contrib op. ``accuracy-level=4`` makes ORT quantize
the activations to int8 inside the kernel (int8 x int4 dot products): the fast CPU path.
``grid=NAME:BLOCK:sym|asym,...`` gives the linears whose weight name matches (as ``exclude``
does) another block and symmetry than ``block`` and ``symmetric``: zero points where a role's
weights are skewed, larger blocks where a role is robust, within one file's size.

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
one copy. With ``method=gptq`` the table's codes are GPTQ's on the head's input statistics (the
head's ``K`` is the table's hidden axis, its blocks are the table's): the tied head is the
most sensitive tensor of a small LM (SmolLM2-135M at 4 bits: +14.8% perplexity by RTN, +2.5%
by GPTQ, every other linear float), while the gathered rows only shift the residual stream.
With ``sequential=true`` the table is packed before the first round (the rounds' statistics
see the quantized embedding), so its codes come from the head's statistics on the float model,
which ``calibrate`` collects for it (``gram_wanted``). Otherwise (no statistics, RTN, AWQ) the
table is rounded to nearest. ``embedding-symmetric`` sets its grid apart
from the linears'. ``embedding-8bit-rows=N`` stores the table's first ``N`` rows at 8 bits and
the rest at ``embedding-bits``, each row once: a BPE vocabulary numbers its tokens roughly by
frequency (SmolLM2: ids below 4096 are 73% of WikiText-2's tokens), and the head's error on the
likely next tokens is what the KL of the next-token distribution weighs. The gather reads each id
from its part (two ``GatherBlockQuantized`` and a ``Where``), the tied head is one
``MatMulNBits`` per part, concatenated; on SmolLM2 4096 rows cost 1.2 MB. Every linear left in float is counted with the reason; ``details`` give each layer's
bits and its relative output error ``E||x (W - W_q)||^2 / E||x W||^2`` when the input's second
moment is known (else the relative Frobenius error). ``calibrate`` collects the second moments
for ``method=gptq`` and ``awq`` by itself (``gram_wanted``).

``sequential=true`` (``method=gptq``) quantizes block after block, as GPTQ's reference
implementation does: before block ``k``'s linears are quantized, the Gram matrices of their
inputs are gathered by running the pipeline's calibration data (``pipeline_feeds``, read again
each round) through the model as it is then, blocks ``1..k-1`` already ``MatMulNBits`` in ONNX
Runtime, so their rounding errors reach the statistics GPTQ compensates against. One round per
block (linears outside the blocks form rounds of their own, in graph order); each round exposes
only that block's linear inputs, so memory holds one block's Grams, and its session holds only
the nodes up to them (a round costs its block's depth, half the model on average). A KV-cache
graph's windows are prefilled with an empty cache, without the decode steps ``calibrate`` adds
(their presents would have to be computed by every later block). It costs one calibration run
per block, which is why it is off by default; with the pipeline's ``--workers``/``--cluster``
(``CalibrationData.workers``/``cluster``) each round runs in shards on Ray workers, merged
exactly as ``calibrate{workers=N}`` does, and needs the pipeline's calibration data
(``--calib-text``/``--calib-npz``/``calibration=``): without it the pass refuses to run.

``tune-steps=N`` then tunes every block scale (``MatMulNBits``' and ``GatherBlockQuantized``'s;
a tied head shares its table's) end to end, the codes kept: ``N`` Adam steps on ``log(scale)``
(``tune-lr``, cosine-annealed), each on 512 tokens of the pipeline's calibration text (4 windows
of 128 tokens, or ``tune-seq-len`` tokens a window, each prefilled from an empty cache), minimising the KL divergence of the quantized model's
next-token distribution from the float model's (:mod:`tforge.compiler.scale_tuning`; both run in
PyTorch through :mod:`tforge.runtime.torch_exec`, the float model snapshotted before the first
edit). GPTQ's objective is each linear's own output error; the tuning sees how the errors of all
of them add up at the logits. Sixteen windows are held out and measure the KL before and after
(``details["tuning"]``); if it got worse the quantizer's scales stay. The file's size and its
kernels do not change. It needs PyTorch and the pipeline's data, like ``sequential``.

``reconstruct-steps=N`` runs before the tuning, block by block, on pre-norm decoders whose blocks
chain (each block's input is the previous block's output; otherwise ``details["reconstruction"]``
says why it did not run): every ``MatMulNBits`` weight of the block becomes a latent weight,
starting at GPTQ's values, rounded to its grid straight through, and trained with its scales for
``N`` Adam steps (``reconstruct-lr`` in grid steps, cosine-annealed; 2 windows of 128 tokens a
step, or one of ``reconstruct-seq-len`` tokens from 256 on, out of up to 128) so that the
block's output on the quantized model's own input matches the float block's output on the float
input, each token's error relative to its own norm (:mod:`tforge.compiler.block_reconstruction`). A block whose
held-out error rose keeps GPTQ's codes. Codes may move by more than one step; the packing and the
file size stay.

Mixed precision: ``budget-mb`` (10^6 bytes of the quantized linears' packed weights, scales and
zero points; a linear kept in float counts its float32 weight) or ``avg-bits`` (the mean code
width per weight, float counted as 32 bits, scales and zero points not counted) chooses each
linear's width among 4, 8 and float (:mod:`tforge.passes.math.bit_allocation`, exact under the
budget). A linear's sensitivity at a width is its relative output error
``E||x (W - W_q)||^2 / E||x W||^2`` (relative Frobenius error without a Gram matrix), unweighted:
the noise-to-signal ratio a linear adds, which the exact rescalings other passes fold between
layers (AWQ, SmoothQuant, ln-migrate) leave unchanged, where an absolute output energy would
move with them. ``details`` list every linear's width, its sensitivity and bytes at each
candidate; linears left in float count as "kept in float by the bit budget".
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import time
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from tforge.compiler import block_reconstruction, distributed, scale_tuning
from tforge.compiler.attention_paths import value_columns
from tforge.compiler.calibration import (
    DATA_KEY,
    DEFAULT_SAMPLES,
    GRAM_TOKENS_PER_CHANNEL,
    MAX_AUTO_SAMPLES,
    CalibrationStats,
    attached_stats,
    feed_tokens,
    has_pipeline_data,
    pipeline_feeds,
    until_enough,
)
from tforge.compiler.embeddings import Embedding, find_embeddings, tied_head
from tforge.compiler.ffn_paths import check_rescalable_up_down
from tforge.compiler.pass_infra import Pass, PassResult, Property, SiteStats, Skip
from tforge.compiler.registry import register_pass
from tforge.compiler.rescale import check_norm_scalable, scale_norm_output, scale_stats
from tforge.compiler.rewrite import GraphEditor, current_weight
from tforge.compiler.structure import FFN, Attention, BlockMap, Linear, block_map, const_array
from tforge.errors import PassConfigError, PreconditionError, UnsupportedModelError
from tforge.passes.math import awq, bit_allocation, gptq, smoothing
from tforge.passes.math import block_quant as bq
from tforge.runtime.torch_exec import TorchGraph

logger = logging.getLogger(__name__)

__all__ = ["QuantizeWeights"]

_MS = "com.microsoft"
_QDQ_OPSET = 21
#: the widths a bit budget chooses among; 32: the linear stays float32
_BUDGET_BITS = (4, 8, 32)
_MB = 1e6
# sequential rounds read the pipeline's data as ``calibrate`` does when its samples are unset: at
# least 64 samples, more until the round's widest Gram rests on 16 tokens a channel (<= 1024)
_ROUND_SEQ_LEN = 128  # tokens a sequential round's text windows hold, unless the pipeline says
_TUNE_TOKENS = 512  # tokens a tuning step reads: 4 windows of 128, 1 of 512 (tune-seq-len)
_TUNE_HELD_OUT = 16  # windows measured before and after tuning, never trained on
_RECONSTRUCT_WINDOWS = 128  # training windows of the block reconstruction (beside the held-out ones)
_RECONSTRUCT_TOKENS = 256  # tokens a reconstruction step reads: 2 windows of 128, 1 of 256 or 512
_RECONSTRUCT_SCALE_LR = 2e-3  # Adam's step on log(scale) in the reconstruction, cosine-annealed


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
    # per-linear grids: NAME:BLOCK:sym|asym entries; the first whose NAME is (a substring of) a
    # linear's weight name sets its block and symmetry, the others keep block= and symmetric=
    grid: tuple[str, ...] = ()
    embedding_bits: int = 4  # the token embedding (and a tied LM head's storage); 0: float
    # the embedding's block along the hidden axis (0: block); the hidden size must be a multiple
    # (SmolLM2's 576 is not one of 128, so block=128 wants embedding-block=64 or 32)
    embedding_block: int = 0
    # the embedding's grid: symmetric or with zero points (None: as ``symmetric``)
    embedding_symmetric: bool | None = None
    # the table's first rows (and a tied head's first outputs) at 8 bits, the rest at
    # embedding-bits: a BPE vocabulary numbers its most frequent tokens first (0: none)
    embedding_8bit_rows: int = 0
    damp: float = 0.01  # gptq: added to H's diagonal, relative to its mean
    act_order: bool = True  # gptq: rows by decreasing E[x_k^2], on the natural blocks' fixed grids
    clip_search: bool = True  # gptq, awq: per block, the range shrink with the least weighted error
    alpha_grid: tuple[float, ...] = awq.DEFAULT_ALPHAS  # awq: exponents of s = rms(x)^alpha tried
    # a tied LM head reads the embedding's packed bytes (one copy in the file, embedding-bits
    # wide; GPTQ's codes with method=gptq) instead of its own copy quantized like the other linears
    tie: bool = True
    # gptq: each block's Gram matrices gathered on the model with the blocks before it quantized
    # (one calibration run per block on the pipeline's data)
    sequential: bool = False
    # Adam steps tuning every block scale end to end against the float model on the pipeline's
    # calibration text, the codes kept (compiler/scale_tuning.py; needs PyTorch); 0: no tuning
    tune_steps: int = 0
    tune_lr: float = 5e-4  # Adam's step on log(scale), cosine-annealed to 0 over tune-steps
    # tokens a tuning window holds (prefilled from an empty cache), unless the pipeline's data sets
    # its own length; a step reads 512 // tune-seq-len windows
    tune_seq_len: int = 128
    # Adam steps training each decoder block's codes and scales (a latent weight rounded straight
    # through), block by block, to reproduce the float block's output from the quantized model's
    # input to it; before tune-steps (compiler/block_reconstruction.py; needs PyTorch); 0: none
    reconstruct_steps: int = 0
    reconstruct_lr: float = 0.02  # Adam's step on the latent weights, in grid steps, cosine-annealed
    # tokens a reconstruction window holds, unless the pipeline's data sets its own length; a step
    # reads max(1, 256 // reconstruct-seq-len) windows, out of up to 128 (fewer if the text ends)
    reconstruct_seq_len: int = 128
    # mixed precision (exclusive): 4, 8 or float per linear, least total relative output error
    budget_mb: float | None = None  # 10^6 bytes of the quantized linears' weights, scales, zero points
    avg_bits: float | None = None  # mean code width per weight (float: 32; scales not counted)

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
        if self.embedding_block:
            try:
                bq.check_config("quantize-weights: embedding-block", self.embedding_bits or 4, self.embedding_block)
            except ValueError as error:
                raise PassConfigError(str(error)) from None
        if self.embedding_8bit_rows < 0:
            raise PassConfigError(f"quantize-weights: embedding-8bit-rows must be >= 0, got {self.embedding_8bit_rows}")
        if self.embedding_8bit_rows and self.format == "qdq" and self.tie:
            raise PassConfigError(
                "quantize-weights: embedding-8bit-rows with a tied head needs format=nbits (the head reads "
                "the table's two parts through MatMulNBits); set tie=false or drop embedding-8bit-rows"
            )
        if self.embedding_8bit_rows and self.embedding_bits not in (2, 4):
            raise PassConfigError(
                "quantize-weights: embedding-8bit-rows keeps some rows at 8 bits beside the others' "
                f"embedding-bits, which is {self.embedding_bits}; set embedding-bits=4 (or 2), or drop it"
            )
        _ = self._grid_rules  # each entry read now, so a malformed one fails before any work
        if any(not pattern for pattern in self.exclude):
            raise PassConfigError("quantize-weights: exclude holds an empty name, which would match every linear")
        if not self.damp > 0:
            raise PassConfigError(f"quantize-weights: damp must be > 0, got {self.damp}")
        if not self.alpha_grid or not all(0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise PassConfigError(f"quantize-weights: alpha-grid must be values in [0, 1], got {self.alpha_grid}")
        if self.sequential and self.method != "gptq":
            raise PassConfigError(
                f"quantize-weights: sequential=true applies to method=gptq (got method={self.method}); "
                "it gathers each block's Gram matrices on the partially quantized model"
            )
        if self.tune_steps < 0:
            raise PassConfigError(f"quantize-weights: tune-steps must be >= 0, got {self.tune_steps}")
        if not (self.tune_lr > 0 and math.isfinite(self.tune_lr)):
            raise PassConfigError(f"quantize-weights: tune-lr must be a positive number, got {self.tune_lr}")
        if not 2 <= self.tune_seq_len <= _TUNE_TOKENS:
            raise PassConfigError(f"quantize-weights: tune-seq-len must be in [2, {_TUNE_TOKENS}], got {self.tune_seq_len}")
        if self.tune_steps and self.format != "nbits":
            raise PassConfigError("quantize-weights: tune-steps tunes MatMulNBits scales; it needs format=nbits")
        if self.reconstruct_steps < 0:
            raise PassConfigError(f"quantize-weights: reconstruct-steps must be >= 0, got {self.reconstruct_steps}")
        if not (self.reconstruct_lr > 0 and math.isfinite(self.reconstruct_lr)):
            raise PassConfigError(f"quantize-weights: reconstruct-lr must be a positive number, got {self.reconstruct_lr}")
        if not 2 <= self.reconstruct_seq_len <= _TUNE_TOKENS:
            raise PassConfigError(
                f"quantize-weights: reconstruct-seq-len must be in [2, {_TUNE_TOKENS}], got {self.reconstruct_seq_len}"
            )
        if self.reconstruct_steps and self.tune_steps and self.reconstruct_seq_len != self.tune_seq_len:
            # each stage holds out its first 16 windows: of different lengths, the tuning's held-out
            # text would be text the reconstruction trained on (BENCHMARKS.md, run 11)
            raise PassConfigError(
                f"quantize-weights: reconstruct-seq-len={self.reconstruct_seq_len} and tune-seq-len={self.tune_seq_len} "
                "differ, so one stage's held-out windows would be the other's training text; give both the same value"
            )
        if self.reconstruct_steps and self.format != "nbits":
            raise PassConfigError(
                "quantize-weights: reconstruct-steps trains MatMulNBits codes and scales; it needs format=nbits"
            )
        if self.budget_mb is not None and self.avg_bits is not None:
            raise PassConfigError("quantize-weights: give budget-mb or avg-bits, not both")
        if self.budget_mb is not None and not (self.budget_mb > 0 and math.isfinite(self.budget_mb)):
            raise PassConfigError(f"quantize-weights: budget-mb must be a positive number, got {self.budget_mb}")
        if self.avg_bits is not None and not 4 <= self.avg_bits <= 32:
            raise PassConfigError(
                f"quantize-weights: avg-bits must be in [4, 32] (each linear gets 4, 8 or 32 bits), got {self.avg_bits}"
            )
        if self._budgeted:
            if self.bits != 4:
                raise PassConfigError(
                    "quantize-weights: with budget-mb or avg-bits each linear gets 4, 8 or float bits; drop bits="
                )
            if self.sequential:
                raise PassConfigError(
                    "quantize-weights: sequential=true and a bit budget cannot be combined yet (the budget "
                    "needs every linear's sensitivity before the first block is quantized)"
                )

    def _grid_rule(self, entry: str) -> tuple[str, int, bool]:
        """One ``grid`` entry as (name pattern, block, symmetric), or a PassConfigError saying what is wrong."""
        parts = entry.split(":")
        if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or parts[2] not in ("sym", "asym"):
            raise PassConfigError(
                f"quantize-weights: grid entry {entry!r} is not NAME:BLOCK:sym|asym (for example v_proj:32:asym)"
            )
        try:
            bq.check_config(f"quantize-weights: grid entry {entry!r}", self.bits, int(parts[1]))
        except ValueError as error:
            raise PassConfigError(str(error)) from None
        return parts[0], int(parts[1]), parts[2] == "sym"

    @functools.cached_property
    def _grid_rules(self) -> list[tuple[str, int, bool]]:
        return [self._grid_rule(entry) for entry in self.grid]

    def _grid(self, lin: Linear) -> tuple[int, bool]:
        """The block and symmetry of ``lin``'s grid: its first matching ``grid`` entry's, else the pass's."""
        for pattern, block, symmetric in self._grid_rules:
            if pattern == lin.name or pattern in lin.name:
                return block, symmetric
        return self.block, self.symmetric

    @property
    def _budgeted(self) -> bool:
        return self.budget_mb is not None or self.avg_bits is not None

    @property
    def reads_calibration_data(self) -> bool:  # type: ignore[override]
        """``sequential=true``, ``tune-steps`` and ``reconstruct-steps`` run the pipeline's calibration
        data themselves."""
        return self.sequential or self.tune_steps > 0 or self.reconstruct_steps > 0

    def check(self, model: ir.Model) -> None:
        if self.format == "qdq":
            opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
            if opset < _QDQ_OPSET:
                raise PassConfigError(
                    f"quantize-weights: format=qdq needs opset {_QDQ_OPSET} (DequantizeLinear with "
                    f"block_size), the model imports {opset}; use format=nbits"
                )
        if self.sequential and not has_pipeline_data(model):
            raise PreconditionError(
                "quantize-weights: sequential=true re-runs calibration before each block on the "
                "partially quantized model and needs the pipeline's calibration data: add --calib-text "
                "FILE --tokenizer PATH or --calib-npz FILE to 'tforge compile', or pass calibration= to "
                "tforge.compile (a calibrate{npz=...} pass's own data cannot be read again); or set "
                "sequential=false"
            )
        trained = [(option, what) for option, steps, what in (
            ("tune-steps", self.tune_steps, "tunes the scales"),
            ("reconstruct-steps", self.reconstruct_steps, "trains each block's codes and scales"),
        ) if steps]  # fmt: skip
        for option, what in trained:
            if not has_pipeline_data(model):
                raise PreconditionError(
                    f"quantize-weights: {option} {what} on the pipeline's calibration text and "
                    "needs it: add --calib-text FILE --tokenizer PATH or --calib-npz FILE to 'tforge compile', "
                    f"or pass calibration= to tforge.compile; or set {option}=0"
                )
            try:
                import torch  # noqa: F401
            except ImportError:
                raise PreconditionError(
                    f"quantize-weights: {option} runs the model in PyTorch, which is not installed: "
                    f"pip install 'tforge[torch]', or set {option}=0 (for --preset w4a8: the pipeline it "
                    f"prints, given to --passes with {option}=0)"
                ) from None

    def gram_wanted(self, model: ir.Model) -> set[str]:
        """The inputs of the linears GPTQ or AWQ will quantize: both read E[x x^T].

        RTN asks for none: a [C, C] matrix per input only to report errors would cost more
        memory than it is worth on a large model (its errors are then relative Frobenius ones,
        unless ``calibrate{gram=true}`` collected them anyway).
        """
        if self.sequential:  # gathers its own, block by block; the tied table is packed first
            if self.method != "gptq":
                return set()
            pairs = self._tied_pairs(find_embeddings(model.graph), list(block_map(model).linears))
            return {head.input.name for _, head in pairs if head.input.name}
        if self.method == "rtn" and not self._budgeted:
            return set()  # a budget measures on them
        return {lin.input.name for lin in block_map(model).linears if lin.input.name and not self._excluded(lin)}

    def _tied_pairs(self, embeddings: list[Embedding], linears: list[Linear]) -> list[tuple[Embedding, Linear]]:
        """Each embedding whose quantized bytes an LM head will read, with that head."""
        if not (self.tie and self.embedding_bits):
            return []
        pairs = ((emb, tied_head(emb, linears)) for emb in embeddings)
        return [(emb, head) for emb, head in pairs if head is not None]

    def run(self, model: ir.Model) -> PassResult:
        stats = SiteStats()
        details: dict[str, Any] = {"layers": []}
        editor = GraphEditor(model, self.name)
        blocks = block_map(model)
        calibration = attached_stats(model)
        embeddings = find_embeddings(model.graph) if self.embedding_bits else []
        pairs = self._tied_pairs(embeddings, list(blocks.linears))
        heads = {id(head.matmul): emb for emb, head in pairs}  # matmul node id -> the embedding it is tied to
        head_of = {id(emb): head for emb, head in pairs}  # (only its input is read: AWQ leaves a tied head alone)
        if self._budgeted:  # before any edit: a budget no choice meets leaves the model as it was
            self._check_budget(blocks.linears, set(heads))
        teacher = self._teacher(model, details) if self.tune_steps else None  # the float model, before any edit
        spans = self._float_blocks(model, blocks, details) if self.reconstruct_steps else None  # before any edit too
        if self.method == "awq":
            details["awq_sites"] = self._awq_fold(editor, blocks, set(heads), stats)
            blocks = block_map(model)  # the same linears; their weights were rescaled
            calibration = attached_stats(model)
        linears = list(blocks.linears)
        packed_tables: dict[int, _Packed] = {}
        for emb in embeddings:
            packed = self._embedding(editor, emb, head_of.get(id(emb)), calibration, stats)
            if packed is not None:
                packed_tables[id(emb)] = packed
        shared = {key: packed_tables[id(emb)] for key, emb in heads.items() if id(emb) in packed_tables}
        if self.sequential:
            self._run_sequential(editor, blocks, linears, shared, stats, details)
        elif self._budgeted:
            self._run_budget(editor, linears, calibration, shared, stats, details)
        else:
            for lin in linears:
                tied = shared.get(id(lin.matmul))
                try:
                    self._check(lin)
                    q, error = self._quantize(lin, calibration, tied, self.bits)
                except Skip as skip:
                    stats.skip(skip)
                    continue
                self._lower_and_record(editor, lin, q, error, tied, stats, details)
        editor.drop_retired()
        changed = stats["quantized"] > 0 or stats["embedding quantized"] > 0
        if spans is not None and stats["quantized"] > 0:
            self._reconstruct(model, spans, stats, details)
        if teacher is not None and changed:
            self._tune(model, teacher, stats, details)
        return PassResult(model, changed=changed, stats=stats, details=details)

    # ------------------------------------------------------------------ scale tuning

    def _teacher(self, model: ir.Model, details: dict[str, Any]) -> tuple[TorchGraph, str] | None:
        """The float model in PyTorch (its first output) and the loss to tune against, or None
        (said in ``details["tuning"]``) when a node has no PyTorch translation."""
        output = model.graph.outputs[0]
        try:
            teacher = TorchGraph(model.graph, [output.name or ""])
        except UnsupportedModelError as error:
            _skip_stage(details, "tuning", str(error))
            return None
        vocab = {int(emb.table.shape[0]) for emb in find_embeddings(model.graph) if emb.table.shape is not None}
        last = output.shape[-1] if output.shape is not None and output.shape.rank() else None
        # next-token logits (the last axis is a vocabulary): match distributions; else the values
        return teacher, "kl" if isinstance(last, int) and last in vocab else "mse"

    def _float_blocks(self, model: ir.Model, blocks: BlockMap, details: dict[str, Any]) -> _FloatBlocks | None:
        """The float model's decoder blocks in PyTorch, each run from its input, or None (said in
        ``details["reconstruction"]``) when the blocks do not form one pre-norm residual chain."""

        def skipped(reason: str) -> None:
            _skip_stage(details, "reconstruction", reason)

        spans: list[_FloatSpan] = []
        for block in blocks.blocks:
            if block.norm_placement != "pre" or block.attention_norm is None or len(block.residual_adds) != 2:
                skipped(f"block {block.index} is not a pre-norm block with two residual adds ({block.norm_placement})")
                return None
            start, first_add = block.attention_norm.input.name or "", block.residual_adds[0]
            inputs = [v.name if v is not None else None for v in first_add.inputs]
            if start not in inputs or not first_add.name:
                skipped(f"block {block.index}: its first residual add does not read the block's input {start!r}")
                return None
            if spans and spans[-1].output != start:
                skipped(f"block {block.index} reads {start!r}, not block {block.index - 1}'s output {spans[-1].output!r}")
                return None
            end = block.residual_adds[1].outputs[0].name or ""
            spans.append(_FloatSpan(block.index, start, end, first_add.name, inputs.index(start)))
        if not spans:
            skipped("the block map found no decoder blocks")
            return None
        try:
            entry = TorchGraph(model.graph, [spans[0].input])
            teachers = [TorchGraph(model.graph, [span.output], given=[span.input]) for span in spans]
        except UnsupportedModelError as error:
            skipped(str(error))
            return None
        return _FloatBlocks(entry, spans, teachers)

    def _reconstruct(self, model: ir.Model, found: _FloatBlocks, stats: SiteStats, details: dict[str, Any]) -> None:
        nodes = {node.name: node for node in model.graph if node.name}
        spans = []
        for span, teacher in zip(found.spans, found.teachers, strict=True):
            add = nodes.get(span.first_add)
            start = add.inputs[span.input_index] if add is not None and len(add.inputs) > span.input_index else None
            if start is None or not start.name:
                _skip_stage(details, "reconstruction", f"block {span.index}'s residual add {span.first_add!r} was rewritten")
                return
            spans.append(block_reconstruction.BlockSpan(f"block {span.index}", teacher, start.name, span.output, span.input))
        found_windows = self._training_windows(model, _TUNE_HELD_OUT + _RECONSTRUCT_WINDOWS, self.reconstruct_seq_len,
                                               "reconstruct-steps", "the reconstruction", "reconstruction", details)  # fmt: skip
        if found_windows is None:
            return
        source, windows = found_windows
        batch = max(1, _RECONSTRUCT_TOKENS // self.reconstruct_seq_len)
        results, written = block_reconstruction.reconstruct_blocks(
            found.entry, spans, model.graph, windows, steps=self.reconstruct_steps, lr=self.reconstruct_lr,
            scale_lr=_RECONSTRUCT_SCALE_LR, batch=batch, held_out=_TUNE_HELD_OUT,
        )  # fmt: skip
        initializers = model.graph.initializers
        for weight in written:
            node = nodes[weight.node]
            bits, block = node.attributes["bits"].as_int(), node.attributes["block_size"].as_int()
            packed = bq.pack_bits(weight.codes.reshape(weight.codes.shape[0], -1, block), bits)
            initializers[weight.packed].const_value = ir.Tensor(packed, name=weight.packed)
            shape = initializers[weight.scales].const_value.shape.numpy()
            initializers[weight.scales].const_value = ir.Tensor(weight.scale_values.reshape(shape), name=weight.scales)
        details["reconstruction"] = {
            "data": source, "windows": len(windows), "window_tokens": feed_tokens(windows[-1]), "batch": batch,
            "blocks": [dataclasses.asdict(r) for r in results],
        }  # fmt: skip
        kept = sum(r.kept for r in results)
        if kept:
            stats["blocks reconstructed"] = kept
        if len(results) > kept:
            stats["blocks kept GPTQ's codes: reconstruction raised the held-out error"] = len(results) - kept

    @staticmethod
    def _training_windows(
        model: ir.Model, count: int, seq_len: int, option: str, who: str, key: str, details: dict[str, Any]
    ) -> tuple[str, list[dict[str, np.ndarray]]] | None:
        """Up to ``count`` windows of the pipeline's calibration data (``seq_len``-token prefills),
        or None (said in ``details[key]``) when there are not more than the held-out ones."""
        found = pipeline_feeds(model, samples=count, seq_len=seq_len, decode_steps=0)
        if found is None:  # check() ran first
            raise PreconditionError(f"quantize-weights: {option} needs the pipeline's calibration data")
        source, feeds = found
        windows = list(itertools.islice(feeds, count))
        if len(windows) <= _TUNE_HELD_OUT:
            _skip_stage(details, key, f"{source} gives {len(windows)} windows; {who} holds {_TUNE_HELD_OUT} out and needs more")
            return None
        return source, windows

    def _tune(self, model: ir.Model, teacher: tuple[TorchGraph, str], stats: SiteStats, details: dict[str, Any]) -> None:
        graph, loss = teacher
        batch = max(1, _TUNE_TOKENS // self.tune_seq_len)
        count = min(_TUNE_HELD_OUT + self.tune_steps * batch, MAX_AUTO_SAMPLES)  # fewer: read again
        found = self._training_windows(model, count, self.tune_seq_len, "tune-steps", "tuning", "tuning", details)
        if found is None:
            return
        source, windows = found
        result = scale_tuning.tune_scales(
            graph, model, windows, steps=self.tune_steps, lr=self.tune_lr, batch=batch,
            held_out=_TUNE_HELD_OUT, loss=loss,
        )  # fmt: skip
        details["tuning"] = {"data": source, "window_tokens": feed_tokens(windows[-1]), "batch": batch, **dataclasses.asdict(result)}
        if result.kept:
            stats["scales tuned"] = result.scales
        else:
            stats["scales kept: tuning raised the held-out loss"] = result.scales

    # ------------------------------------------------------------------ decisions

    def _excluded(self, lin: Linear) -> bool:
        return any(pattern == lin.name or pattern in lin.name for pattern in self.exclude)

    def _check(self, lin: Linear) -> None:
        if self._excluded(lin):
            raise Skip("excluded", lin.matmul, blocked=False)
        if lin.weight.dtype != ir.DataType.FLOAT or lin.input.dtype not in (ir.DataType.FLOAT, None):
            raise Skip("weight or input is not float32", lin.matmul)

    def _lower_and_record(
        self, editor: GraphEditor, lin: Linear, q: bq.BlockQuantized, error: float, tied: _Packed | None,
        stats: SiteStats, details: dict[str, Any], extra: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self._lower(editor, lin, q, tied)
        stats["quantized"] += 1
        method = self.method if tied is None else f"{tied.method} (tied to the embedding)"
        stats[f"quantized: {q.bits}-bit {method}"] += 1
        details["layers"].append(
            {
                "linear": lin.name,
                "shape": [lin.in_features, lin.out_features],
                "bits": q.bits,
                "method": method,
                "relative_output_error": error,
                "bytes": self._packed_bytes(q) if tied is None else 0,
                **({"rows_8bit": tied.parts[1].start} if tied is not None and len(tied.parts) > 1 else {}),
                **(extra or {}),
            }
        )

    def _packed_bytes(self, q: bq.BlockQuantized) -> int:
        """Bytes of the weight's initializers as this pass writes them (codes, scales, zero points)."""
        size = bq.dequantize_linear_bytes if self.format == "qdq" else bq.matmul_nbits_bytes
        return size(q.k, q.n, q.bits, q.block, q.zero_points is None)

    def _quantize(
        self, lin: Linear, calibration: Any, tied: _Packed | None, bits: int
    ) -> tuple[bq.BlockQuantized, float]:
        w = np.asarray(const_array(current_weight(lin)), np.float32)
        gram = _gram(lin, calibration, w.shape[0])
        block, symmetric = self._grid(lin)
        if tied is not None:
            q = tied.parts[-1].q  # (the record reads its bits; the error is the whole head's)
        elif self.method == "rtn":
            q = bq.quantize_rtn(w, bits, block, symmetric)
        elif self.method == "gptq":
            if gram is None:
                raise Skip("method=gptq needs E[x x^T] of the input (run calibrate before it)", lin.matmul)
            q = gptq.gptq_quantize(
                w, gram, bits, block, symmetric, damp=self.damp,
                act_order=self.act_order, clips=gptq.DEFAULT_CLIPS if self.clip_search else None,
            ).q  # fmt: skip
        else:  # awq: the scales were folded before; RTN on the rescaled weight, clipped
            q = awq.quantize_clipped(
                w, gram, bits, block, symmetric, gptq.DEFAULT_CLIPS if self.clip_search else None
            )
        w_hat = tied.dequantized() if tied is not None else bq.dequantize(q)
        if gram is not None:
            energy = bq.output_error(w, np.zeros_like(w), gram)
            error = bq.output_error(w, w_hat, gram) / energy if energy > 0 else 0.0
        else:
            norm = float(np.linalg.norm(w))
            error = float(np.linalg.norm(w - w_hat) ** 2 / norm**2) if norm > 0 else 0.0
        return q, error

    # ------------------------------------------------------------------ sequential gptq

    def _run_sequential(
        self, editor: GraphEditor, blocks: BlockMap, linears: list[Linear], shared: dict[int, _Packed],
        stats: SiteStats, details: dict[str, Any],
    ) -> None:  # fmt: skip
        model = editor.model
        rounds = _rounds(model, blocks, linears)
        details["sequential_rounds"] = []
        with self._round_cluster(model):
            self._rounds(editor, rounds, shared, stats, details)
        stats["sequential calibration runs"] = len(details["sequential_rounds"])

    @staticmethod
    def _round_cluster(model: ir.Model) -> contextlib.AbstractContextManager[Any]:
        """One Ray cluster for every round when the pipeline calibrates on workers (started once)."""
        workers, address = distributed.pipeline_cluster(model)
        if not (workers or address):
            return contextlib.nullcontext()
        from tforge.runtime import cluster

        return cluster.cluster(workers or 1, address or None)

    def _rounds(
        self, editor: GraphEditor, rounds: list[tuple[str, list[Linear]]], shared: dict[int, _Packed],
        stats: SiteStats, details: dict[str, Any],
    ) -> None:  # fmt: skip
        model = editor.model
        for k, (label, group) in enumerate(rounds, start=1):
            todo: list[Linear] = []
            for lin in group:
                try:
                    self._check(lin)
                except Skip as skip:
                    stats.skip(skip)
                    continue
                todo.append(lin)
            names = list(dict.fromkeys(lin.input.name for lin in todo if lin.input.name))
            if not names:
                logger.info("quantize-weights: block %d/%d (%s): nothing to quantize", k, len(rounds), label)
                continue
            editor.drop_retired()  # the session of this round carries no float weight replaced before
            started = time.perf_counter()
            calibration = self._round_statistics(model, names)
            logger.info(
                "quantize-weights: block %d/%d (%s): Gram matrices of %d inputs from %d samples on the model "
                "with the blocks before it quantized (%.2fs)", k, len(rounds), label, len(names),
                calibration.samples, time.perf_counter() - started,
            )  # fmt: skip
            details["sequential_rounds"].append(
                {"round": k, "block": label, "linears": [lin.name for lin in todo], "samples": calibration.samples}
            )
            for lin in todo:
                tied = shared.get(id(lin.matmul))
                try:
                    q, error = self._quantize(lin, calibration, tied, self.bits)
                except Skip as skip:
                    stats.skip(skip)
                    continue
                self._lower_and_record(editor, lin, q, error, tied, stats, details, {"round": k})
            del calibration  # one block's Gram matrices at a time

    def _round_statistics(self, model: ir.Model, names: list[str]) -> CalibrationStats:
        """Statistics with Gram matrices of ``names`` on the model as it is now (the pipeline's data)."""
        data = model.meta.get(DATA_KEY)
        explicit = data is not None and not data.empty and data.samples is not None
        found = pipeline_feeds(
            model, samples=DEFAULT_SAMPLES if explicit else MAX_AUTO_SAMPLES, seq_len=_ROUND_SEQ_LEN,
            decode_steps=0,  # prefills only: no present fed back, so the session ends at this block
        )
        if found is None:  # check() ran first
            raise PreconditionError("quantize-weights: sequential=true needs the pipeline's calibration data")
        _, feeds = found
        if not explicit:
            widest = max((_last_dim(model, name) for name in names), default=0)
            feeds = until_enough(feeds, DEFAULT_SAMPLES, GRAM_TOKENS_PER_CHANNEL * widest, MAX_AUTO_SAMPLES)
        workers, address = distributed.pipeline_cluster(model)  # on workers: shards, merged exactly
        return distributed.calibrate(
            model, feeds, workers=workers, address=address, values=names, gram=set(names),
            progress=lambda message: logger.debug("%s", message),
        )  # fmt: skip

    # ------------------------------------------------------------------ bit budget

    def _budget(self, params: list[int]) -> tuple[float, str]:
        """The budget in the allocation's cost (bytes, or bits x weights) and how it was given."""
        if self.budget_mb is not None:
            return self.budget_mb * _MB, f"budget-mb={self.budget_mb:g}"
        assert self.avg_bits is not None
        return self.avg_bits * sum(params), f"avg-bits={self.avg_bits:g}"

    def _check_budget(self, linears: list[Linear], heads: set[int]) -> None:
        """Refuse a budget below every candidate linear at 4 bits (sizes from the shapes alone)."""
        candidates = []
        for lin in linears:
            try:
                self._check(lin)
            except Skip:
                continue
            if id(lin.matmul) not in heads:
                candidates.append(lin)
        params = [lin.in_features * lin.out_features for lin in candidates]
        size = bq.dequantize_linear_bytes if self.format == "qdq" else bq.matmul_nbits_bytes
        least = [size(lin.in_features, lin.out_features, 4, *self._grid(lin)) for lin in candidates]
        budget, what = self._budget(params)
        need = sum(least) if self.budget_mb is not None else 4 * sum(params)
        if need > budget:
            raise PassConfigError(
                f"quantize-weights: {what} is below what {len(candidates)} linears take at 4 bits "
                f"({sum(least) / _MB:.6g} MB, avg-bits 4)"
            )

    def _run_budget(
        self, editor: GraphEditor, linears: list[Linear], calibration: Any, shared: dict[int, _Packed],
        stats: SiteStats, details: dict[str, Any],
    ) -> None:  # fmt: skip
        measured: list[tuple[Linear, dict[int, tuple[bq.BlockQuantized, float]]]] = []
        for lin in linears:
            tied = shared.get(id(lin.matmul))
            try:
                self._check(lin)
                if tied is not None:  # stored once with the embedding: not the budget's to choose
                    q, error = self._quantize(lin, calibration, tied, self.bits)
                    self._lower_and_record(editor, lin, q, error, tied, stats, details)
                    continue
                measured.append((lin, {b: self._quantize(lin, calibration, None, b) for b in _BUDGET_BITS[:-1]}))
            except Skip as skip:
                stats.skip(skip)
        params = [lin.in_features * lin.out_features for lin, _ in measured]
        errors = [[found[4][1], found[8][1], 0.0] for _, found in measured]
        nbytes = [[self._packed_bytes(found[4][0]), self._packed_bytes(found[8][0]), 4 * p]
                  for (_, found), p in zip(measured, params, strict=True)]  # fmt: skip
        costs = nbytes if self.budget_mb is not None else [[b * p for b in _BUDGET_BITS] for p in params]
        budget, what = self._budget(params)
        try:
            found_allocation = bit_allocation.allocate(errors, costs, budget)
        except ValueError:
            least = sum(row[0] for row in nbytes) / _MB
            raise PassConfigError(
                f"quantize-weights: {what} is below what {len(measured)} linears take at 4 bits "
                f"({least:.6g} MB, avg-bits 4)"
            ) from None
        chosen_bytes = 0
        for (lin, found), choice, sizes, errs in zip(measured, found_allocation.choice, nbytes, errors, strict=True):
            bits = _BUDGET_BITS[choice]
            chosen_bytes += sizes[choice]
            extra = {
                "sensitivity": {str(b): e for b, e in zip(_BUDGET_BITS, errs, strict=True)},
                "bytes_at": {str(b): n for b, n in zip(_BUDGET_BITS, sizes, strict=True)},
            }
            if bits == 32:
                stats.skip(Skip("kept in float by the bit budget", lin.matmul, blocked=False))
                details["layers"].append({
                    "linear": lin.name, "shape": [lin.in_features, lin.out_features], "bits": 32,
                    "method": "float", "relative_output_error": 0.0, "bytes": sizes[choice], **extra,
                })  # fmt: skip
                continue
            q, error = found[bits]
            self._lower_and_record(editor, lin, q, error, None, stats, details, extra)
        total_params = sum(params)
        details["bit_budget"] = {
            "budget_bytes": self.budget_mb * _MB if self.budget_mb is not None else None,
            "budget_avg_bits": self.avg_bits,
            "bytes": chosen_bytes,
            "avg_bits": (sum(_BUDGET_BITS[c] * p for c, p in zip(found_allocation.choice, params, strict=True))
                         / total_params) if total_params else 0.0,  # fmt: skip
            "total_sensitivity": found_allocation.error,
            "linears_by_bits": {str(b): found_allocation.choice.count(i) for i, b in enumerate(_BUDGET_BITS)},
        }

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
                start, _ = _awq_check(value_columns, attention)
                groups = smoothing.kv_channel_groups(attention.num_heads, attention.num_kv_heads, attention.head_dim)
            if ffn is not None:
                _awq_check(check_rescalable_up_down, ffn, blocks)
            name = readers[0].input.name
            calibration = attached_stats(model)
            st = calibration.get(name or "") if calibration is not None else None
            if st is None or st.gram is None or not st.count:
                raise Skip("awq: needs E[x x^T] of the input (run calibrate before it)", node)
            if st.channels != readers[0].in_features:
                raise Skip("awq: calibration stats are stale (channel count differs)", node)
            weights = [np.asarray(const_array(current_weight(lin)), np.float64) for lin in readers]
            found = awq.search_scale(
                weights, st.second_moment, np.sqrt(st.mean_sq), self.bits, *self._grid(readers[0]),
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
        if tied is not None:
            out = self._lower_tied(editor, lin, tied, bias, old)
        else:
            t = bq.pack_matmul_nbits(q)
            b = editor.initializer(f"{name}.q{q.bits}", t.B)
            scales = editor.initializer(f"{name}.scales", t.scales)
            zero_points = editor.initializer(f"{name}.zero_points", t.zero_points) if t.zero_points is not None else None
            out = self._nbits(editor, lin, [b, scales, zero_points], bias, t.attributes(self.accuracy_level), "", old)
        editor.retire(current_weight(lin))
        editor.replace_value(old, out)
        if lin.bias_add is not None:
            editor.remove(lin.bias_add)
        editor.remove(lin.matmul)

    def _nbits(
        self, editor: GraphEditor, lin: Linear, weights: list[ir.Value | None], bias: ir.Value | None,
        attributes: dict[str, Any], suffix: str, old: ir.Value, shape: Any = None,
    ) -> ir.Value:  # fmt: skip
        """A ``MatMulNBits`` of the linear's input by ``weights`` (codes, scales, zero points)."""
        inputs: list[ir.Value | None] = [lin.input, *weights]
        if bias is not None:
            inputs += [None, bias]  # g_idx absent, then the bias
        while inputs[-1] is None:
            inputs.pop()
        return editor.op(
            "MatMulNBits", inputs, domain=_MS, name=f"{lin.matmul.name or lin.name}.nbits{suffix}",
            outputs=f"{old.name or lin.name}.nbits{suffix}", attributes=attributes,
            before=lin.matmul, dtype=ir.DataType.FLOAT, shape=old.shape if shape is None else shape,
        )  # fmt: skip

    def _lower_tied(
        self, editor: GraphEditor, lin: Linear, tied: _Packed, bias: ir.Value | None, old: ir.Value
    ) -> ir.Value:
        """The head as the embedding's packed bytes seen as MatMulNBits' ``[N, blocks, bytes]``:
        one MatMulNBits per part of the table, their outputs concatenated in row order."""
        outs = []
        split = len(tied.parts) > 1
        for part in tied.parts:
            t = bq.pack_matmul_nbits(part.q)
            suffix = f".rows{part.start}-{part.start + part.q.n}" if split else ""
            shape = editor.initializer(f"{lin.name}{suffix}.nbits_shape", np.array(t.B.shape, np.int64))
            b = editor.op("Reshape", [part.data, shape], name=f"{lin.name}{suffix}.tied_weight", before=lin.matmul,
                          dtype=ir.DataType.UINT8, shape=list(t.B.shape))  # fmt: skip
            rows_shape = None
            if split and old.shape is not None and old.shape.rank():
                rows_shape = [*old.shape[:-1], part.q.n]
            outs.append(self._nbits(
                editor, lin, [b, part.scales, part.zero_points], None if split else bias,
                t.attributes(self.accuracy_level), suffix, old, rows_shape,
            ))  # fmt: skip
        if not split:
            return outs[0]
        joined = editor.op(
            "Concat", outs, name=f"{lin.matmul.name or lin.name}.nbits_rows", attributes={"axis": -1},
            before=lin.matmul, dtype=ir.DataType.FLOAT, shape=old.shape if bias is None else None,
        )  # fmt: skip
        if bias is None:
            return joined
        return editor.op("Add", [joined, bias], name=f"{lin.matmul.name or lin.name}.nbits_bias", before=lin.matmul,
                         dtype=ir.DataType.FLOAT, shape=old.shape)  # fmt: skip

    def _embedding(
        self, editor: GraphEditor, emb: Embedding, head: Linear | None, calibration: Any, stats: SiteStats
    ) -> _Packed | None:
        table = np.asarray(const_array(emb.table), np.float32)
        vocab, hidden = table.shape
        block = self.embedding_block or self.block
        if hidden % block:
            option = "embedding-block" if self.embedding_block else "block"
            stats.skip(
                f"embedding width {hidden} is not a multiple of {option} {block} (set embedding-block to a divisor)",
                emb.gather,
            )
            return None
        symmetric = self.symmetric if self.embedding_symmetric is None else self.embedding_symmetric
        gram = _gram(head, calibration, hidden) if head is not None and self.method == "gptq" else None
        method = "gptq" if gram is not None else "rtn"
        wide = min(self.embedding_8bit_rows, vocab)
        # rows [start, stop) of the table at these bits; 8-bit rows first
        spans = [span for span in ((0, wide, 8), (wide, vocab, self.embedding_bits)) if span[1] > span[0]]
        name = emb.table.name or "embedding"
        parts: list[_TablePart] = []
        for start, stop, bits in spans:
            rows = table[start:stop].T  # [hidden, rows]: the tied head's [K, N]
            if gram is not None:  # the tied head's output error is what the table's codes cost most
                q = gptq.gptq_quantize(
                    rows, gram, bits, block, symmetric, damp=self.damp, act_order=self.act_order,
                    clips=gptq.DEFAULT_CLIPS if self.clip_search else None,
                ).q  # fmt: skip
            else:
                q = bq.quantize_rtn(rows, bits, block, symmetric)
            t = bq.pack_gather_block_quantized(q, "uint8")
            suffix = f".rows{start}-{stop}" if len(spans) > 1 else ""
            parts.append(_TablePart(
                start=start, q=q, data=editor.initializer(f"{name}{suffix}.q{bits}", t.data),
                scales=editor.initializer(f"{name}{suffix}.scales", t.scales),
                zero_points=editor.initializer(f"{name}{suffix}.zero_points", t.zero_points) if t.zero_points is not None else None,
                attributes=t.attributes(),
            ))  # fmt: skip
        old = emb.gather.outputs[0]
        base = emb.gather.name or name
        if len(parts) == 1:
            out = self._gather_part(editor, parts[0], emb.ids, f"{base}.quantized", emb.gather, old)
        else:
            out = self._gather_split(editor, parts, emb.ids, vocab, base, emb.gather, old)
        editor.retire(emb.table)
        editor.replace_value(old, out)
        editor.remove(emb.gather)
        stats["embedding quantized"] += 1
        if wide:
            stats[f"embedding rows at 8 bits: the first {wide} of {vocab}"] += 1
        return _Packed(parts, method)

    @staticmethod
    def _gather_part(
        editor: GraphEditor, part: _TablePart, ids: ir.Value, name: str, before: ir.Node, old: ir.Value
    ) -> ir.Value:
        inputs = [part.data, ids, part.scales] + ([part.zero_points] if part.zero_points is not None else [])
        return editor.op(
            "GatherBlockQuantized", inputs, domain=_MS, name=name, outputs=f"{old.name or name}.{name.rsplit('.', 1)[-1]}",
            attributes=part.attributes, before=before, dtype=ir.DataType.FLOAT, shape=old.shape,
        )  # fmt: skip

    def _gather_split(
        self, editor: GraphEditor, parts: list[_TablePart], ids: ir.Value, vocab: int, base: str,
        before: ir.Node, old: ir.Value,
    ) -> ir.Value:  # fmt: skip
        """Rows of a table stored in two parts (8-bit rows first): each id gathers from both,
        the one its row lies in by a ``Where``. Negative ids count from the end as ``Gather``'s do;
        an id out of range still fails in its part's gather."""
        first, rest = parts
        dtype = ids.dtype or ir.DataType.INT64
        np_type = dtype.numpy()

        def const(suffix: str, value: int) -> ir.Value:
            return editor.initializer(f"{base}.{suffix}", np.array(value, np_type))

        def op(kind: str, inputs: list[ir.Value], suffix: str, out_type: ir.DataType = dtype) -> ir.Value:
            return editor.op(kind, inputs, name=f"{base}.{suffix}", before=before, dtype=out_type, shape=ids.shape)

        zero = const("zero", 0)
        negative = op("Less", [ids, zero], "negative", ir.DataType.BOOL)
        index = op("Where", [negative, op("Add", [ids, const("vocab", vocab)], "from_end"), ids], "row")
        split = const("split", rest.start)
        in_first = op("Less", [index, split], "in_8bit_rows", ir.DataType.BOOL)
        first_ids = op("Where", [in_first, index, zero], "8bit_row")
        rest_ids = op("Where", [in_first, zero, op("Sub", [index, split], "past_split")], "low_bits_row")
        gathered = [
            self._gather_part(editor, part, part_ids, f"{base}.quantized_{tag}", before, old)
            for part, part_ids, tag in ((first, first_ids, "8bit"), (rest, rest_ids, "low_bits"))
        ]
        axes = editor.initializer(f"{base}.last_axis", np.array([-1], np.int64))
        mask = editor.op("Unsqueeze", [in_first, axes], name=f"{base}.row_mask", before=before, dtype=ir.DataType.BOOL)
        return editor.op(
            "Where", [mask, *gathered], name=f"{base}.quantized", outputs=f"{old.name or base}.quantized",
            before=before, dtype=ir.DataType.FLOAT, shape=old.shape,
        )  # fmt: skip


def _skip_stage(details: dict[str, Any], stage: str, reason: str) -> None:
    """Say in ``details[stage]`` and in the log that a stage after the quantizer (``tuning``,
    ``reconstruction``) did not run, and why; the quantized model stands as it is."""
    details[stage] = {"skipped": reason}
    logger.warning("quantize-weights: %s skipped: %s", stage, reason)


def _awq_check(check: Any, *args: Any) -> Any:
    """``check(*args)``, its :class:`Skip` said as AWQ's: not blocked, since the site's linears are
    still quantized (by RTN with the clipping search), only without a moved scale."""
    try:
        return check(*args)
    except Skip as why:
        raise Skip(f"awq: {why.reason}", why.at, blocked=False) from None


@dataclasses.dataclass(frozen=True)
class _TablePart:
    """Rows ``[start, start + q.n)`` of an embedding table, packed for ``GatherBlockQuantized``."""

    start: int
    q: bq.BlockQuantized  # the rows transposed, quantized: [K = hidden, N = rows]
    data: ir.Value
    scales: ir.Value
    zero_points: ir.Value | None
    attributes: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class _Packed:
    """An embedding's packed table (one part, or 8-bit rows then the rest), which a tied LM head
    reads as its MatMulNBits weights (one per part, their outputs concatenated)."""

    parts: list[_TablePart]
    method: str  # how the codes were chosen: rtn, or gptq on the tied head's input statistics

    def dequantized(self) -> np.ndarray:
        """The head's weight ``[K, N]`` as the packed codes give it."""
        return np.concatenate([bq.dequantize(part.q) for part in self.parts], axis=1)


# ----------------------------------------------------------------------------- sequential rounds


def _rounds(model: ir.Model, blocks: BlockMap, linears: list[Linear]) -> list[tuple[str, list[Linear]]]:
    """The linears in rounds: one per block, those outside the blocks grouped between them, in graph order."""
    position = {id(node): i for i, node in enumerate(model.graph)}
    wanted = {id(lin.matmul): lin for lin in linears}
    items: list[tuple[int, str | None, list[Linear]]] = []
    seen: set[int] = set()
    for block in blocks.blocks:
        members: list[Linear] = []
        a, f = block.attention, block.ffn
        parts = [*((a.q, a.k, a.v, a.o) if a is not None else ()), *((f.up, f.gate, f.down) if f is not None else ())]
        for part in parts:
            if part is not None and id(part.matmul) in wanted and id(part.matmul) not in seen:
                seen.add(id(part.matmul))
                members.append(wanted[id(part.matmul)])
        if members:
            items.append((min(position[id(lin.matmul)] for lin in members), f"layer {block.index}", members))
    items += [(position[id(lin.matmul)], None, [lin]) for lin in linears if id(lin.matmul) not in seen]
    items.sort(key=lambda item: item[0])
    rounds: list[tuple[str, list[Linear]]] = []
    outside = "linears outside the blocks"
    for _, label, members in items:
        if label is None and rounds and rounds[-1][0] == outside:
            rounds[-1][1].extend(members)
        else:
            rounds.append((label or outside, list(members)))
    return rounds


def _gram(lin: Linear, calibration: Any, width: int) -> np.ndarray | None:
    """``E[x x^T]`` of the linear's input, if the statistics hold it at this width."""
    st = calibration.get(lin.input.name or "") if calibration is not None else None
    gram = st.second_moment if st is not None and st.gram is not None and st.count else None
    if gram is not None and gram.shape != (width, width):
        return None  # stale statistics of another width: measured as if there were none
    return gram


def _last_dim(model: ir.Model, name: str) -> int:
    for value in [*model.graph.inputs, *(out for node in model.graph for out in node.outputs)]:
        if value.name == name and value.shape is not None and value.shape.rank():
            last = value.shape[-1]
            return last if isinstance(last, int) else 0
    return 0


# ----------------------------------------------------------------------------- structure checks


@dataclasses.dataclass(frozen=True)
class _FloatSpan:
    """One decoder block of the float graph: its input and output values, and where its first
    residual add reads the input (found again by name once the linears are rewritten)."""

    index: int
    input: str
    output: str
    first_add: str
    input_index: int


@dataclasses.dataclass(frozen=True)
class _FloatBlocks:
    entry: TorchGraph  # the first block's input, from the graph inputs
    spans: list[_FloatSpan]
    teachers: list[TorchGraph]  # each block's output from its input, snapshotted before any edit
