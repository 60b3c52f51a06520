"""Pruning section of tools/bench.py (``--section prune``): accuracy and latency of pruned models.

For each real model, in one run: ``canonicalize`` and ``calibrate{gram=true}`` once (statistics
shared by every variant), then ``prune-heads`` and ``prune-ffn`` at 10%, 25% and 50% with four
ways of choosing and repairing:

- ``magnitude``: weight norms, no compensation (the usual baseline);
- ``activation``: expected output energy from the calibration statistics, no compensation;
- ``activation + comp``: the same, then the mean of the removed channels folded into the next
  bias and the next projection refitted by least squares on the Gram matrix;
- ``obs + comp``: greedy Optimal-Brain-Surgeon selection on the Gram matrix (the loss after the
  refit), then the same compensation.

Accuracy uses the int8 section's protocol and helpers (bench.py, tforge.evaluate): MiniLM, cosine
of mean-pooled embeddings against fp32 on WikiText-2 sentences of the second half; SmolLM2,
WikiText-2 perplexity on 512-token windows of the second half. Calibration reads the first half
(more samples than the int8 section: the Gram matrices of 1536-wide FFN inputs need more tokens).
Latency: one pruned model per (kind, ratio), plus the combined and the quantized rows, each timed
against the unpruned fp32 model (after `canonicalize`) in its own interleaved pair (benchlib.timing_session, bench's shapes);
the table gives the ratio of medians and, in parentheses, of 10th percentiles, which a loaded
machine disturbs less.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import onnx_ir as ir

import tforge
from tforge import evaluate
from tforge.backends import ort
from tforge.compiler import verify
from tforge.compiler.calibration import FEEDS_KEY, STATS_KEY, text_feeds
from tforge.compiler.pipeline import PassManager, parse_pipeline
from tforge.compiler.structure import find_blocks
from tforge.frontends import hf_models
from tforge.runtime import save as model_save

RATIOS = (0.1, 0.25, 0.5)
METHODS = {
    "magnitude": "importance=magnitude compensate=false",
    "activation": "importance=activation compensate=false",
    "activation + comp": "importance=activation",
    "obs + comp": "importance=obs",
}
DEFAULT_METHOD = "activation + comp"  # the passes' defaults


@dataclasses.dataclass(frozen=True)
class PruneProtocol:
    calib_sentences: int  # MiniLM, first half
    calib_windows: int  # SmolLM2, first half
    calib_seq: int
    eval_sentences: int
    eval_windows: int
    context: int
    runs: int
    ratios: tuple[float, ...] = RATIOS
    methods: tuple[str, ...] = tuple(METHODS)

    @classmethod
    def full(cls, runs: int) -> PruneProtocol:
        return cls(
            calib_sentences=768, calib_windows=128, calib_seq=128, eval_sentences=256, eval_windows=32,
            context=512, runs=runs,
        )

    @classmethod
    def quick(cls) -> PruneProtocol:
        return cls(
            calib_sentences=64, calib_windows=16, calib_seq=128, eval_sentences=64, eval_windows=4, context=512, runs=5,
            ratios=(0.25,), methods=("magnitude", DEFAULT_METHOD),
        )


@dataclasses.dataclass
class Row:
    label: str
    spec: str
    path: Path
    kept: str = ""
    params: int = 0
    seconds: float = 0.0
    accuracy: float | tuple[float, float] | None = None
    unchanged: bool = False  # the ratio rounds to nothing to remove: the fp32 model itself
    latency: tuple[float, float] | None = None  # (median, p10) ratio to fp32 of this shape's timed pair


def _log(message: str) -> None:
    benchlib.log(message)


def _kept(model) -> str:
    blocks = find_blocks(model).blocks
    heads = [b.attention.num_heads for b in blocks if b.attention is not None]
    kv = [b.attention.num_kv_heads for b in blocks if b.attention is not None]
    ffn = [b.ffn.intermediate_size for b in blocks if b.ffn is not None]

    def summary(values: list[int]) -> str:
        return str(values[0]) if len(set(values)) == 1 else f"{min(values)}-{max(values)}"

    heads_text = summary(heads) + (f" ({summary(kv)} KV)" if kv != heads else "")
    return f"{heads_text} heads, {summary(ffn)} FFN"


def _params(model) -> int:
    return sum(
        int(v.const_value.size)
        for v in model.graph.initializers.values()
        if v.const_value is not None and v.dtype == ir.DataType.FLOAT and list(v.uses())
    )


def _variants(protocol: PruneProtocol) -> list[tuple[str, str]]:
    out = []
    for kind, pass_name in (("heads", "prune-heads"), ("FFN", "prune-ffn")):
        for ratio in protocol.ratios:
            for method in protocol.methods:
                out.append((f"{kind} {ratio:.0%} {method}", f"{pass_name}{{ratio={ratio} {METHODS[method]}}}"))
    return out


def _build(name: str, src: Path, work: Path, protocol: PruneProtocol) -> tuple[Any, list[Row]]:
    tokenizer = hf_models.minilm_dir() if name == "minilm" else hf_models.smollm2_gguf_path()
    base = tforge.load(src)
    samples = protocol.calib_sentences if name == "minilm" else protocol.calib_windows
    calibration = list(text_feeds(base, benchlib.WIKITEXT, tokenizer, samples=samples, seq_len=protocol.calib_seq))
    base.meta[FEEDS_KEY] = calibration
    t0 = time.perf_counter()
    calibrate = f"calibrate{{gram=true samples={len(calibration)}}}"
    PassManager.parse(f"canonicalize,{calibrate}", progress=lambda _: None).run(base)
    stats = base.meta[STATS_KEY]
    _log(f"{name}: canonicalize,{calibrate} in {time.perf_counter() - t0:.1f}s")
    rows: list[Row] = []
    for label, spec in _variants(protocol):
        model = base.clone()
        model.meta[STATS_KEY] = copy.deepcopy(stats)
        rows.append(_run(name, label, spec, model, work, len(rows)))
    # composed: heads then FFN (re-calibrated in between: the statistics describe the graph they
    # were taken on), then int8
    method = METHODS[DEFAULT_METHOD]
    combined = f"prune-heads{{ratio=0.25 {method}}},{calibrate},prune-ffn{{ratio=0.25 {method}}}"
    model = base.clone()
    model.meta[STATS_KEY] = copy.deepcopy(stats)
    model.meta[FEEDS_KEY] = calibration
    label = "heads 25% + FFN 25% " + DEFAULT_METHOD
    rows.append(_run(name, label, combined, model, work, len(rows)))
    # the same pruned model, then int8 (its time includes the pruning above)
    rows.append(_run(name, label + " + int8", combined + ",quantize", model, work, len(rows), skip=combined))
    rows[-1].seconds += rows[-2].seconds
    return base, rows


def _unpruned(base: Any, name: str, work: Path) -> Path:
    """The canonical model before pruning, saved: the latency reference, so that a ratio is
    pruning's alone and not also what canonicalize removed (e.g. attention NaN guards)."""
    return model_save.save_model(base.clone(), work / f"{name}.unpruned.onnx")


def _run(name: str, label: str, spec: str, model, work: Path, index: int, skip: str = "") -> Row:
    """Run ``spec`` on ``model`` (all but its prefix ``skip``, already applied) and save it."""
    spec_to_run = spec[len(skip) :].lstrip(",") if skip and spec.startswith(skip) else spec
    t0 = time.perf_counter()
    kept, params, changed = "", 0, bool(skip)
    for p in parse_pipeline(spec_to_run):
        if p.name == "quantize":  # the block map and the float count describe the pruned model
            kept, params = _kept(model), _params(model)
        changed |= p(model).changed and p.name.startswith("prune-")
    seconds = time.perf_counter() - t0
    if not kept:
        kept, params = _kept(model), _params(model)
    path = model_save.save_model(model, work / f"{name}.prune-{index}.onnx")
    row = Row(label, spec, path, kept + ("" if changed else " (nothing pruned)"), params, seconds, unchanged=not changed)
    _log(f"{name}: {label}: {row.kept} in {seconds:.1f}s")
    return row


def _timed_rows(rows: list[Row]) -> list[Row]:
    """One row per shape: the default method of every (kind, ratio), and the composed rows."""
    return [r for r in rows if r.label.endswith(DEFAULT_METHOD) or "+ int8" in r.label or "heads 25% + FFN" in r.label]


def _latency(src: Path, rows: list[Row], feeds: dict, protocol: PruneProtocol, threads: int | None) -> Any:
    """Each timed variant against the unpruned canonical model ``src``, in pairs (interleaved, ``runs`` each).

    On a shared 2-core machine, timing eight models round robin spreads the other jobs' load
    unevenly over them; a pair sees the same load on both sides. Returns the base timing of the
    first pair; every row gets its pair's ratio of medians (and of 10th percentiles).
    """
    base_session = benchlib.timing_session(src, threads)
    first = None
    for r in _timed_rows(rows):
        ratio = (1.0, 1.0)  # nothing pruned: the fp32 model itself
        if not r.unchanged:
            session = benchlib.timing_session(r.path, threads)
            load = os.getloadavg()[0]
            base, variant = ort.time_side_by_side([base_session, session], feeds, warmup=2, runs=protocol.runs)
            first = first or base
            ratio = (variant.median_ms / base.median_ms, variant.p10_ms / base.p10_ms)
            _log(f"latency {r.label}: {variant.median_ms:.0f} / {base.median_ms:.0f} ms = {ratio[0]:.3f} "
                 f"(p10 {ratio[1]:.3f}, load {load:.1f})")
            del session
            gc.collect()
        for other in rows:
            if _shape_key(other.label) == _shape_key(r.label):
                other.latency = ratio
    return first


def _shape_key(label: str) -> str:
    for method in METHODS:
        if label.endswith(" " + method):
            return label[: -len(method) - 1]
    return label


def _table(rows: list[Row], base_timing, base_params: int, accuracy_header: str, fmt) -> list[str]:
    out = [
        f"| variant | kept per layer | params (M) | latency ratio median (p10) | {accuracy_header} | prune time (s) | pipeline |",
        "|---|---|---|---|---|---|---|",
        f"| fp32 (canonical, unpruned) | - | {base_params / 1e6:.2f} | 1 ({base_timing.median_ms:.0f} ms, p10 {base_timing.p10_ms:.0f}) | {fmt(None)} | - | - |",
    ]
    for r in rows:
        ratio = f"{r.latency[0]:.3f} ({r.latency[1]:.3f})" if r.latency is not None else "-"
        out.append(
            f"| {r.label} | {r.kept} | {r.params / 1e6:.2f} | {ratio} | {fmt(r.accuracy)} | {r.seconds:.1f} | `{r.spec}` |"
        )
    return out


def _minilm(out_dir: Path, work: Path, protocol: PruneProtocol, threads: int | None) -> list[str]:
    src = benchlib.exported(out_dir, "minilm")
    base, rows = _build("minilm", src, work, protocol)
    tokenizer = hf_models.minilm_tokenizer()
    sentences = evaluate.sentences(evaluate.text_half(evaluate.read_text(benchlib.WIKITEXT), "second"), protocol.eval_sentences)
    reference_session = benchlib.timing_session(src, threads)
    reference = evaluate.sentence_embeddings(lambda f: reference_session.run(None, f)[0], tokenizer, sentences)
    for r in rows:
        if r.unchanged:
            r.accuracy = (1.0, 1.0)
            continue
        session = benchlib.timing_session(r.path, threads)
        a = evaluate.agreement(reference, evaluate.sentence_embeddings(lambda f, s=session: s.run(None, f)[0], tokenizer, sentences))
        r.accuracy = (a.mean, a.min)
        _log(f"minilm: {r.label}: cosine mean {a.mean:.4f} min {a.min:.4f}")
    feeds = verify.make_inputs(base, dims={"batch": 8, "sequence": 128}, rng=np.random.default_rng(0))
    feeds["attention_mask"][:] = 1
    base_timing = _latency(_unpruned(base, "minilm", work), rows, feeds, protocol, threads)

    def fmt(acc) -> str:
        return "1.0000 / 1.0000" if acc is None else f"{acc[0]:.4f} / {acc[1]:.4f}"

    head = [
        f"MiniLM (all-MiniLM-L6-v2, 12 heads, FFN 1536): latency batch 8 x 128 tokens, {protocol.runs} "
        f"runs interleaved with the fp32 model, one pair per shape (the other methods of a row group have the same shape); cosine of "
        f"mean-pooled embeddings vs fp32 on {len(sentences)} WikiText-2 sentences (second half); calibration "
        f"{protocol.calib_sentences} sentences (first half).",
        "",
    ]
    return head + _table(rows, base_timing, _params(base), "cosine mean / min", fmt)


def _smollm2(out_dir: Path, work: Path, protocol: PruneProtocol, threads: int | None) -> list[str]:
    src = benchlib.exported(out_dir, "smollm2")
    base, rows = _build("smollm2", src, work, protocol)
    tokenizer = hf_models.smollm2_tokenizer()
    text = evaluate.text_half(evaluate.read_text(benchlib.WIKITEXT), "second")
    ids = evaluate.tokenize_lines(
        lambda line: tokenizer(line, add_special_tokens=False)["input_ids"], text, protocol.context * protocol.eval_windows
    )
    windows = evaluate.token_windows(ids, protocol.context, protocol.eval_windows)
    reference = benchlib.timing_session(src, threads)
    base_ppl = evaluate.window_perplexity(lambda f, s=reference: s.run(None, f)[0], windows)
    del reference
    _log(f"smollm2: fp32 perplexity {base_ppl:.3f}")
    for r in rows:
        if r.unchanged:
            r.accuracy = base_ppl
            continue
        session = benchlib.timing_session(r.path, threads)
        t0 = time.perf_counter()
        r.accuracy = evaluate.window_perplexity(lambda f, s=session: s.run(None, f)[0], windows)
        _log(f"smollm2: {r.label}: perplexity {r.accuracy:.3f} ({time.perf_counter() - t0:.0f}s)")
        del session
        gc.collect()
    base_timing = _latency(_unpruned(base, "smollm2", work), rows, {"input_ids": windows[:1]}, protocol, threads)

    def fmt(acc) -> str:
        value = base_ppl if acc is None else acc
        return f"{value:.2f} ({100 * (value / base_ppl - 1):+.1f}%)"

    head = [
        f"SmolLM2-135M (9 heads on 3 KV heads, FFN 1536): latency of one {protocol.context}-token forward, "
        f"{protocol.runs} runs interleaved with the fp32 model, one pair per shape; WikiText-2 perplexity, context {protocol.context}, "
        f"first {len(windows)} windows of the second half; calibration {protocol.calib_windows} windows of "
        f"{protocol.calib_seq} tokens (first half). Head ratios round to valid grouped-query sizes "
        "(0, 1, 2, 3, 4, 6 or 9 heads), so 10% keeps all 9, 25% keeps 6 and 50% keeps 4.",
        "",
    ]
    return head + _table(rows, base_timing, _params(base), "perplexity (vs fp32)", fmt)


def prune(names: list[str], out_dir: Path, protocol: PruneProtocol, threads: int | None) -> list[str]:
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tforge-bench-prune-", dir=out_dir) as folder:
        for name in names:
            section = {"minilm": _minilm, "smollm2": _smollm2}[name]
            rows += section(out_dir, Path(folder), protocol, threads) + [""]
            gc.collect()
    return rows
