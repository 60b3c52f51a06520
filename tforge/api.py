"""The Python API; the CLI is a thin layer over these functions.

>>> import tforge
>>> model = tforge.load("model.onnx")
>>> result = tforge.compile(model, passes="canonicalize", output="model.canon.onnx")
>>> result.report.passes[0].stats
>>> tforge.inspect(result.model).blocks[0].attention.num_heads
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from tforge.compiler import structure
from tforge.compiler.calibration import CalibrationData
from tforge.compiler.pass_infra import Pass, Property, model_properties
from tforge.compiler.pipeline import NumericsCheck, PassManager, Report
from tforge.errors import PassConfigError, UnsupportedModelError

PathLike = str | os.PathLike


def load(
    source: PathLike | Any,
    example_inputs: tuple | None = None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> ir.Model:
    """Load an ``.onnx`` file, a saved ``.pt2`` ExportedProgram, or an ``nn.Module`` (with inputs).

    ONNX initializers stay memory-mapped from their external data; nothing is copied until a
    pass rewrites it.
    """
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.suffix == ".pt2":
            from tforge.frontends.torch import from_torch

            return from_torch(path, input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
        from tforge.frontends.onnx import load_onnx

        return load_onnx(path)
    from tforge.frontends.torch import from_torch

    return from_torch(
        source,
        example_inputs,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
    )


@dataclasses.dataclass
class CompileResult:
    """The compiled model (in memory), where it was written (if asked), and the pass report."""

    model: ir.Model
    report: Report
    output: Path | None = None


def compile(  # noqa: A001 - mirrors the `tforge compile` command
    model: ir.Model | PathLike,
    passes: str | Sequence[str | Pass] = "canonicalize",
    *,
    output: PathLike | None = None,
    calibration: CalibrationData | Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    input_shapes: Mapping[str, str] | None = None,
    verify_each: bool = False,
    dump_dir: PathLike | None = None,
    check_numerics: NumericsCheck | bool | None = None,
    external_data: bool | None = None,
    progress: Any = None,
    strict: bool = False,
    preset: str | None = None,
) -> CompileResult:
    """Run a pipeline on a model (mutated in place) and optionally save the result atomically.

    ``preset`` (``"w8a8"``, ``"w4a8"``; see :mod:`tforge.presets`) replaces ``passes`` with the
    recommended pipeline for this model, as ``tforge compile --preset`` does; a preset whose
    pipeline reads no data on this model (w8a8 on a KV-cache decoder) ignores ``calibration``.

    ``calibration``: the data of the passes that run the model on data (``calibrate``,
    ``linear-attention``): a :class:`CalibrationData` (text file and tokenizer, or an .npz: the
    CLI's ``--calib-text/--tokenizer/--calib-npz``), or a list of input feeds (or one feed);
    ``input_shapes`` (``{"input_ids": "8x128"}``) is forwarded to ``canonicalize``.
    ``strict`` makes a model without recognised transformer blocks a ``PreconditionError``.
    """
    if not isinstance(model, ir.Model):
        model = load(model)
    if preset is not None:
        from tforge.presets import preset_pipeline

        passes = preset_pipeline(preset, model)
        if not reads_data(PassManager.parse(passes).passes):
            calibration = None
    pm = PassManager.parse(
        passes,
        verify_each=verify_each,
        dump_dir=dump_dir,
        check_numerics=NumericsCheck() if check_numerics is True else (check_numerics or None),
        progress=progress,
        strict=strict,
        calibration=calibration if isinstance(calibration, CalibrationData) else None,
    )
    if input_shapes:
        pm.passes = _with_input_shapes(pm.passes, dict(input_shapes))
    if isinstance(calibration, CalibrationData):
        _check_reads_data(pm.passes)
    elif calibration is not None:
        feeds = [calibration] if isinstance(calibration, Mapping) else list(calibration)
        model.meta["tforge.calibration_feeds"] = feeds
    report = pm.run(model)
    out_path = None
    if output is not None:
        from tforge.runtime.save import save_model

        out_path = save_model(model, output, external_data=external_data)
    return CompileResult(model=model, report=report, output=out_path)


def _with_input_shapes(passes: list[Pass], shapes: dict[str, str]) -> list[Pass]:
    from tforge.passes.canonicalize import Canonicalize

    if not any(isinstance(p, Canonicalize) for p in passes):
        raise PassConfigError(
            "input shapes are applied by 'canonicalize', which is not in the pipeline; add it first"
        )
    return [
        dataclasses.replace(p, input_shapes={**p.input_shapes, **shapes}) if isinstance(p, Canonicalize) else p
        for p in passes
    ]


def _with_calibration(
    passes: list[Pass],
    *,
    text: PathLike | None = None,
    tokenizer: PathLike | None = None,
    npz: PathLike | None = None,
    samples: int | None = None,
) -> list[Pass]:
    """Fill the data options of every ``calibrate`` pass (the CLI's --calib-* flags), so that the
    report shows them; other passes read the same data from the pipeline (``CalibrationData``)."""
    from tforge.passes.calibrate import Calibrate

    given = {"text": text, "tokenizer": tokenizer, "npz": npz, "samples": samples}
    options = {k: (v if isinstance(v, int) else os.fspath(v)) for k, v in given.items() if v is not None}
    if not options:
        return list(passes)
    _check_reads_data(passes)
    try:
        return [dataclasses.replace(p, **options) if isinstance(p, Calibrate) else p for p in passes]
    except ValueError as e:
        raise PassConfigError(f"calibrate: {e}") from None


def reads_data(passes: Sequence[Pass]) -> bool:
    """Whether a pipeline runs the model on calibration data (``calibrate``, ``linear-attention``, ...)."""
    return any(p.reads_calibration_data for p in passes)


def _check_reads_data(passes: Sequence[Pass]) -> None:
    if not reads_data(passes):
        raise PassConfigError(
            "calibration data is read by 'calibrate', which is not in the pipeline (nor any other "
            "pass that runs on data, such as 'linear-attention'); add 'calibrate' after 'canonicalize'"
        )


def inspect(model: ir.Model | PathLike, *, canonicalize: bool = True) -> structure.BlockMap:
    """The block map of a model; a non-canonical model is canonicalized on a copy first."""
    if not isinstance(model, ir.Model):
        model = load(model)
    if canonicalize and Property.CANONICAL not in model_properties(model):
        model = model.clone()
        PassManager.parse("canonicalize", progress=lambda _: None).run(model)
    return structure.block_map(model)


@dataclasses.dataclass
class BenchResult:
    """Latency of one model in a side-by-side run; ``ratio`` is relative to the first model."""

    model: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    ratio: float


def bench(
    models: Sequence[ir.Model | PathLike],
    *,
    names: Sequence[str] | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
    dims: Mapping[str, int] | None = None,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> list[BenchResult]:
    """Time models side by side in one process, interleaved, on the same feeds."""
    from tforge.backends import ort
    from tforge.compiler import verify
    from tforge.runtime import ort as ort_runtime

    if not models:
        raise PassConfigError("bench: no models given")
    loaded = [m if isinstance(m, ir.Model) else load(m) for m in models]
    if names is None:
        names = [str(m) if not isinstance(m, ir.Model) else (m.graph.name or f"model{i}") for i, m in enumerate(models)]
    if feeds is None:
        feeds = verify.make_inputs(loaded[0], dims=dict(dims or {}), rng=np.random.default_rng(0))
    first_inputs = sorted(v.name for v in loaded[0].graph.inputs)
    for name, m in zip(names[1:], loaded[1:], strict=True):
        if sorted(v.name for v in m.graph.inputs) != first_inputs:
            raise UnsupportedModelError(
                f"bench: {name} has inputs {sorted(v.name for v in m.graph.inputs)}, the first model "
                f"{first_inputs}; side-by-side timing needs the same inputs"
            )
    # spinning off: interleaved sessions would otherwise steal each other's cores
    sessions = [ort_runtime.create_session(m, optimize=True, threads=threads, spin=False) for m in loaded]
    timings = ort.time_side_by_side(sessions, feeds, warmup=warmup, runs=runs)
    base = timings[0].median_ms
    return [
        BenchResult(name, t.median_ms, t.p10_ms, t.p90_ms, t.runs, t.median_ms / base if base else float("nan"))
        for name, t in zip(names, timings, strict=True)
    ]


def symbol_values(model: ir.Model, shapes: Mapping[str, str]) -> dict[str, int]:
    """Map the symbolic dims of the named inputs to sizes: ``{"input_ids": "1x128"}`` -> ``{"batch": 1, "seq": 128}``."""
    from tforge.passes.canonicalize import parse_shape

    inputs = {v.name: v for v in model.graph.inputs}
    values: dict[str, int] = {}
    for name, text in shapes.items():
        if name not in inputs:
            raise PassConfigError(f"input shape given for {name!r}, but the model's inputs are {', '.join(inputs)}")
        dims = parse_shape(text)
        shape = inputs[name].shape
        if shape is None or len(shape) != len(dims):
            raise PassConfigError(f"input {name!r} has shape {shape}, which does not match {text}")
        for dim, size in zip(shape, dims, strict=True):
            if isinstance(dim, int) and dim != size:
                raise PassConfigError(f"input {name!r} has a fixed dimension {dim}, not {size}")
            if isinstance(dim, ir.SymbolicDim) and dim.value:
                values[dim.value] = size
    return values


@dataclasses.dataclass
class GenerateResult:
    """Text generated greedily from a prompt, with its tokens and timings."""

    text: str
    prompt_tokens: list[int]
    tokens: list[int]
    prefill_ms: float
    decode_ms_per_token: float
    stopped: str  # "length" or "eos"


def generate_text(
    model: PathLike | Any,
    prompt: str | Sequence[int],
    *,
    tokenizer: PathLike | Any | None = None,
    max_new_tokens: int = 32,
    stop_at_eos: bool = True,
    threads: int | None = None,
) -> GenerateResult:
    """Greedy generation with a KV-cache graph (a path or an ORT session; ``tforge generate``):
    the prompt is prefilled with an empty cache, then one token a step with the cache fed back.

    ``prompt`` is text (``tokenizer`` is then a folder with tokenizer.json, a tokenizer.json or
    a .gguf file, or a loaded :class:`tforge.runtime.generate.TextTokenizer`) or token ids; ``text`` is
    the continuation only (empty when no tokenizer is given).
    """
    from tforge.runtime import generate as gen

    tok = _text_tokenizer(tokenizer) if tokenizer is not None else None
    if isinstance(prompt, str):
        if tok is None:
            raise PassConfigError("generate: a text prompt needs a tokenizer; pass tokenizer=PATH")
        ids = tok.encode(prompt)
    else:
        ids = list(prompt)
    eos = tok.eos_ids if tok is not None and stop_at_eos else ()
    result = gen.greedy(model, ids, max_new_tokens, eos_ids=eos, threads=threads)
    text = _continuation(tok, ids, result.tokens) if tok is not None else ""
    return GenerateResult(text, ids, result.tokens, result.prefill_ms, result.decode_ms_per_token, result.stopped)


def _text_tokenizer(tokenizer: PathLike | Any) -> Any:
    from tforge.runtime import generate as gen

    if isinstance(tokenizer, gen.TextTokenizer):
        return tokenizer
    return gen.load_text_tokenizer(tokenizer)


def _continuation(tok: Any, prompt: Sequence[int], tokens: Sequence[int]) -> str:
    """The text the new tokens add to the prompt. Decoding them alone can lose the space that
    joins them to the prompt (SentencePiece, byte-level BPE), so the prompt's text is cut off
    the decoded whole instead."""
    whole, head = tok.decode([*prompt, *tokens]), tok.decode(prompt)
    return whole[len(head):] if whole.startswith(head) else tok.decode(tokens)


@dataclasses.dataclass
class GenerateBenchResult:
    """One model of an interleaved generation benchmark (see ``bench_generate``)."""

    model: str
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    decode_ms: float
    decode_p10_ms: float
    decode_p90_ms: float
    tokens_per_s: float
    ratio: float  # decode ms/token relative to the first model
    memory_mb: float
    peak_rss_mb: float  # of the whole process, after every model ran
    runs: int
    same_tokens: bool  # greedy tokens equal to the first model's
    first_difference: int | None  # first position where they differ
    tokens: list[int]


def bench_generate(
    models: Sequence[PathLike | Any],
    *,
    names: Sequence[str] | None = None,
    prompt: Sequence[int] | None = None,
    prompt_length: int = 128,
    new_tokens: int = 64,
    runs: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    seed: int = 0,
) -> list[GenerateBenchResult]:
    """Time greedy generation of KV-cache graphs side by side, interleaved in one process:
    prefill latency at the prompt's length, decode ms per token (median over every step of
    every run) and tokens/s, memory per model, and the greedy tokens compared with the first
    model's. Without ``prompt``, ``prompt_length`` random ids of the first model's vocabulary
    (seeded) are used; generation does not stop at end of text, so every run has
    ``new_tokens`` tokens.
    """
    from tforge.runtime import generate as gen

    if not models:
        raise PassConfigError("bench: no models given")
    if prompt is None:
        if prompt_length < 1:
            raise PassConfigError(f"bench: the prompt length must be >= 1, got {prompt_length}")
        vocab = gen.cache_layout(gen.graph_io(models[0])).vocab
        if vocab is None:
            raise UnsupportedModelError(
                f"bench: {names[0] if names else models[0]} has no static vocabulary size in its "
                "logits; give the prompt's token ids"
            )
        prompt = np.random.default_rng(seed).integers(0, vocab, size=prompt_length).tolist()
    labels = list(names) if names is not None else [str(m) for m in models]
    timings = gen.time_side_by_side(
        models, list(prompt), new_tokens, names=labels, runs=runs, warmup=warmup, threads=threads
    )
    peak = gen.rss_mb()[1]
    base, first = timings[0].decode_ms, timings[0].tokens
    return [
        GenerateBenchResult(
            model=t.name, prompt_tokens=t.prompt_tokens, new_tokens=t.new_tokens,
            prefill_ms=t.prefill_ms, decode_ms=t.decode_ms, decode_p10_ms=t.decode_p10_ms,
            decode_p90_ms=t.decode_p90_ms, tokens_per_s=t.tokens_per_s,
            ratio=t.decode_ms / base if base else float("nan"), memory_mb=t.memory_mb,
            peak_rss_mb=peak, runs=t.runs, same_tokens=t.tokens == first,
            first_difference=gen.first_difference(first, t.tokens), tokens=t.tokens,
        )
        for t in timings
    ]
