"""Greedy generation with a KV-cache graph in ONNX Runtime (NumPy and onnxruntime only).

A cache graph is any decoder whose inputs include its own past keys and values and whose outputs
include the present ones, as Hugging Face's exporter, tforge's exporter and onnxruntime-genai's
model builder write them::

    inputs   input_ids [batch, sequence] (int), attention_mask [batch, past + sequence] (optional),
             position_ids [batch, sequence] (optional), past_*  [batch, kv_heads, past, head_dim]
    outputs  logits [batch, sequence, vocab], present_* [batch, kv_heads, past + sequence, head_dim]

:func:`cache_layout` reads that layout from the graph's inputs and outputs (which inputs are the
cache, which axis is the past length, the static head counts, the dtypes, which present output
feeds which past input), so nothing here depends on a particular model's names.
:func:`greedy` prefills the prompt with an empty cache (past length 0), then decodes one token a
step feeding ``present`` back as the past; :func:`greedy_recompute` runs the whole sequence again
every step without a cache, the reference the cached loop must equal. :func:`time_side_by_side`
times several models' generation interleaved in one process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from tforge.errors import PassConfigError, UnsupportedModelError

__all__ = [
    "CacheLayout",
    "Generation",
    "GenerationTiming",
    "TextTokenizer",
    "cache_layout",
    "first_difference",
    "greedy",
    "graph_io",
    "greedy_recompute",
    "load_text_tokenizer",
    "open_session",
    "rss_mb",
    "time_side_by_side",
]

logger = logging.getLogger(__name__)

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
# Names exporters give the cache: past_key_values.N.key (HF, tforge), past.N.key, past_key.N, ...
_PAST_PREFIX = re.compile(r"^(past_key_values|past)[._]?", re.IGNORECASE)
_PRESENT_PREFIX = re.compile(r"^(present_key_values|present)[._]?", re.IGNORECASE)


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class CacheTensor:
    """One past input and the present output that replaces it after a step."""

    past: str
    present: str
    heads: int
    head_dim: int
    past_axis: int  # the axis that grows by one per decoded token
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """How to feed a cache graph, read from its inputs and outputs."""

    input_ids: str
    ids_dtype: np.dtype
    attention_mask: str | None
    mask_dtype: np.dtype | None
    position_ids: str | None
    positions_dtype: np.dtype | None
    logits: str
    cache: tuple[CacheTensor, ...]
    vocab: int | None

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        """Past tensors of length 0, the state before the prompt."""
        return {c.past: np.zeros(_shape_with_past(c, batch, 0), c.dtype) for c in self.cache}

    def step_feeds(self, ids: np.ndarray, past_length: int) -> dict[str, np.ndarray]:
        """``input_ids`` [batch, n] and, if the graph has them, the mask over past + n tokens and
        the positions ``past_length .. past_length + n - 1``; the cache tensors are not included."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"step_feeds: expected input ids [batch, sequence], got shape {ids.shape}")
        batch, n = ids.shape
        feeds = {self.input_ids: ids.astype(self.ids_dtype)}
        if self.attention_mask is not None:
            feeds[self.attention_mask] = np.ones((batch, past_length + n), self.mask_dtype)
        if self.position_ids is not None:
            positions = np.arange(past_length, past_length + n, dtype=self.positions_dtype)
            feeds[self.position_ids] = np.tile(positions, (batch, 1))
        return feeds

    def prefill_feeds(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Feeds for running ``ids`` [batch, sequence] from an empty cache."""
        ids = np.asarray(ids)
        return {**self.step_feeds(ids, 0), **self.empty_cache(ids.shape[0])}


def _shape_with_past(c: CacheTensor, batch: int, past: int) -> list[int]:
    shape = [batch, c.heads, c.head_dim]
    shape.insert(c.past_axis, past)  # batch stays first; past goes where the graph has it
    return shape


def cache_layout(session: Any, *, dims: Mapping[str, int] | None = None) -> CacheLayout:
    """The cache layout of an ``onnxruntime.InferenceSession`` (see the module docstring).

    Head counts and head sizes are read from the cache inputs' static dims. A symbolic one
    (onnxruntime-genai's builder writes ``kv_cache_dim`` for the head size) takes its value
    from ``dims`` (by dim name, or by role: ``num_key_value_heads``, ``head_size``), else from the
    ``genai_config.json`` beside the model file.

    Raises ``UnsupportedModelError`` naming the input or output that does not fit: a graph
    with no cache inputs, a cache size that cannot be known, a past input with no matching
    present output, or an input that generation cannot fill.
    """
    where = getattr(session, "_model_path", None) or "model"
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if "input_ids" not in inputs:
        raise UnsupportedModelError(
            f"{where}: no input named input_ids (inputs: {', '.join(inputs)}); generation feeds token ids there"
        )
    ids_info = inputs["input_ids"]

    past_names = [n for n, i in inputs.items() if n not in _TOKEN_INPUTS and len(i.shape or ()) == 4]
    if not past_names:
        raise UnsupportedModelError(
            f"{where}: no KV-cache inputs (rank-4 float inputs besides input_ids, attention_mask, "
            f"position_ids; the inputs are {', '.join(inputs)}); export the decoder with its past "
            "key/values (tools/export_models.py --models smollm2-kv)"
        )
    others = [n for n in inputs if n not in _TOKEN_INPUTS and n not in past_names]
    if others:
        raise UnsupportedModelError(
            f"{where}: input(s) {', '.join(others)} are neither token inputs nor KV-cache tensors; "
            "generation can fill only input_ids, attention_mask, position_ids and the cache"
        )
    present_names = [
        n for n, o in outputs.items() if len(o.shape or ()) == 4 and n != "logits"
    ]
    pairs = _pair_cache(where, past_names, present_names)
    sizes = {**_sizes_beside(where), **dict(dims or {})}
    cache = []
    for past, present in pairs:
        info = inputs[past]
        dtype = _dtype(where, past, info.type)
        if dtype not in (np.float32, np.float16, np.float64):
            raise UnsupportedModelError(f"{where}: cache input {past} is {info.type}, expected a float tensor")
        shape, grown = list(info.shape), list(outputs[present].shape or ())
        # [batch, heads, past, head_dim]: the past axis is the one that grows from input to output
        # (its dim differs); without names that say so, the only symbolic axis after the batch
        axis = _past_axis(shape, grown)
        if axis is None:
            raise UnsupportedModelError(
                f"{where}: cache input {past} has shape {shape} and its output {present} {grown}; expected "
                "[batch, kv_heads, past, head_dim] with one past axis that grows"
            )
        static = []
        for a in (a for a in range(1, 4) if a != axis):
            size = next((d for d in (shape[a], grown[a] if len(grown) == 4 else None) if isinstance(d, int)), None)
            if size is None:  # symbolic on both sides
                size = sizes.get(shape[a], sizes.get(_ROLE.get(a, "")))
            if not isinstance(size, int):
                raise UnsupportedModelError(
                    f"{where}: cache input {past} has a symbolic size {shape[a]!r} on axis {a}; give it "
                    f"(dims={{{shape[a]!r}: N}}), or keep the genai_config.json its builder wrote beside the model"
                )
            static.append(size)
        heads, head_dim = static
        cache.append(CacheTensor(past, present, int(heads), int(head_dim), axis, np.dtype(dtype)))

    logits = "logits" if "logits" in outputs else next(
        (n for n in outputs if n not in present_names), None
    )
    if logits is None:
        raise UnsupportedModelError(f"{where}: no logits output (outputs: {', '.join(outputs)})")
    vocab = outputs[logits].shape[-1] if outputs[logits].shape else None
    mask = inputs.get("attention_mask")
    positions = inputs.get("position_ids")
    return CacheLayout(
        input_ids="input_ids",
        ids_dtype=np.dtype(_dtype(where, "input_ids", ids_info.type)),
        attention_mask=mask.name if mask is not None else None,
        mask_dtype=np.dtype(_dtype(where, mask.name, mask.type)) if mask is not None else None,
        position_ids=positions.name if positions is not None else None,
        positions_dtype=np.dtype(_dtype(where, positions.name, positions.type)) if positions is not None else None,
        logits=logits,
        cache=tuple(cache),
        vocab=vocab if isinstance(vocab, int) else None,
    )


_TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")
_ROLE = {1: "num_key_value_heads", 3: "head_size"}  # keys of genai_config.json, by axis


def _past_axis(shape: list[Any], grown: list[Any]) -> int | None:
    if len(grown) == 4:
        differs = [
            a for a in range(1, 4)
            if not isinstance(shape[a], int) and not isinstance(grown[a], int) and shape[a] != grown[a]
        ]
        if len(differs) == 1:
            return differs[0]
    dynamic = [a for a in range(1, 4) if not isinstance(shape[a], int)]
    return dynamic[0] if len(dynamic) == 1 else None


def _sizes_beside(where: str) -> dict[str, int]:
    """Cache sizes from a ``genai_config.json`` next to the model file (as the builder ships it)."""
    import json

    config = Path(where).parent / "genai_config.json"
    if where == "model" or not config.is_file():
        return {}
    try:
        decoder = json.loads(config.read_text())["model"]["decoder"]
        return {k: int(decoder[k]) for k in _ROLE.values() if k in decoder}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _dtype(where: str, name: str, ort_type: str) -> type:
    if ort_type not in _ORT_DTYPES:
        raise UnsupportedModelError(f"{where}: input {name} is {ort_type}, which generation does not feed")
    return _ORT_DTYPES[ort_type]


def _pair_cache(where: str, past: list[str], present: list[str]) -> list[tuple[str, str]]:
    """Match each past input to its present output: by the name after the past/present prefix
    (``past_key_values.3.key`` <-> ``present.3.key``), or in order when the names do not say."""
    by_suffix = {_PRESENT_PREFIX.sub("", n): n for n in present}
    matched = [(p, by_suffix.get(_PAST_PREFIX.sub("", p))) for p in past]
    if all(m is not None for _, m in matched) and len({m for _, m in matched}) == len(past):
        return [(p, m) for p, m in matched if m is not None]
    if len(past) == len(present):
        logger.info("%s: cache names do not match by suffix; pairing past and present in order", where)
        return list(zip(past, present, strict=True))
    raise UnsupportedModelError(
        f"{where}: {len(past)} cache inputs but {len(present)} rank-4 outputs, and the names do not "
        f"pair up (first input {past[0]}); the graph must return one present tensor per past input"
    )


# ----------------------------------------------------------------------------- sessions


def graph_io(model: Any) -> Any:
    """What :func:`cache_layout` reads: an ORT session as it is, else the declared inputs and
    outputs of an ``onnx_ir`` model or of the ONNX file ``model`` (parsed with ``onnx``, external
    weights left unread), with no session opened."""
    if hasattr(model, "get_inputs"):
        return model
    if isinstance(model, ir.Model):
        graph = model.graph
        source = model.meta.get("tforge.source_path")
        return _DeclaredIO(
            [_ir_arg(v) for v in graph.inputs if v.name not in graph.initializers],
            [_ir_arg(v) for v in graph.outputs],
            str(source) if source else None,
        )
    import onnx

    if not Path(model).is_file():
        raise UnsupportedModelError(f"{model}: no such model file; pass an .onnx file")

    proto = onnx.load(os.fspath(model), load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    return _DeclaredIO(
        [_proto_arg(v) for v in proto.graph.input if v.name not in initializers],
        [_proto_arg(v) for v in proto.graph.output],
        os.fspath(model),
    )


@dataclasses.dataclass(frozen=True)
class _Arg:
    """One input or output as an ORT session describes it: name, type string, dims (int, name or None)."""

    name: str
    type: str
    shape: list[int | str | None]


_PROTO_TYPES = {1: "tensor(float)", 10: "tensor(float16)", 11: "tensor(double)", 7: "tensor(int64)", 6: "tensor(int32)"}


def _proto_arg(value: Any) -> _Arg:
    tensor = value.type.tensor_type
    return _Arg(
        value.name,
        _PROTO_TYPES.get(tensor.elem_type, f"tensor(elem_type {tensor.elem_type})"),
        [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim],
    )


def _ir_arg(value: ir.Value) -> _Arg:
    dtype = f"tensor({value.dtype.name.lower()})" if value.dtype is not None else "tensor(undefined)"
    return _Arg(value.name or "", dtype, [d if isinstance(d, int) else d.value for d in (value.shape or ())])


class _DeclaredIO:
    """The part of an ORT session's interface ``cache_layout`` uses, over declared inputs and outputs."""

    def __init__(self, inputs: list[_Arg], outputs: list[_Arg], path: str | None) -> None:
        self._model_path = path  # as on an ORT session: where messages and genai_config.json lookups point
        self._inputs = inputs
        self._outputs = outputs

    def get_inputs(self) -> list[_Arg]:
        return self._inputs

    def get_outputs(self) -> list[_Arg]:
        return self._outputs


def open_session(model: Any, *, threads: int | None = None, optimize: bool = True) -> Any:
    """A CPU session on ``model`` (a path, ONNX bytes or an ``onnx_ir.Model``); an existing
    ``onnxruntime.InferenceSession`` is returned as it is. Spinning is off so that sessions
    timed in turn do not steal each other's cores."""
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    if isinstance(model, str | os.PathLike) and not Path(model).is_file():
        raise UnsupportedModelError(f"{model}: no such model file; pass an .onnx file")
    from tforge.runtime.ort import create_session

    return create_session(model, optimize=optimize, threads=threads, spin=False)


# ----------------------------------------------------------------------------- generation


@dataclasses.dataclass
class Generation:
    """The result of one greedy generation.

    ``tokens`` are the new tokens only. The first comes from the prefill's last logits; each
    later one from one decode step, so ``decode_ms`` has one entry per token after the first.
    ``logits`` (when kept) holds the last-position logits that chose each token.
    """

    prompt: list[int]
    tokens: list[int]
    prefill_ms: float
    decode_ms: list[float]
    stopped: str  # "length" or "eos"
    logits: list[np.ndarray] | None = None

    @property
    def decode_ms_per_token(self) -> float:
        return float(np.median(self.decode_ms)) if self.decode_ms else float("nan")


def greedy(
    model: Any,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int] = (),
    keep_logits: bool = False,
    threads: int | None = None,
    layout: CacheLayout | None = None,
) -> Generation:
    """Greedy generation with the cache: prefill ``prompt`` with an empty past, then one token a
    step with ``present`` fed back as the past (ORT values stay in ORT between steps).

    Stops after ``max_new_tokens`` tokens or at a token in ``eos_ids`` (which is kept).
    """
    session = open_session(model, threads=threads)
    layout = layout or cache_layout(session)
    ids = _check_prompt(prompt, max_new_tokens, layout)
    binding = session.io_binding()

    def bind_tokens(feeds: Mapping[str, np.ndarray]) -> None:
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)

    for c in layout.cache:
        binding.bind_output(c.present, "cpu")
    binding.bind_output(layout.logits, "cpu")

    bind_tokens(layout.prefill_feeds(ids[None, :]))
    start = time.perf_counter()
    session.run_with_iobinding(binding)
    prefill_ms = (time.perf_counter() - start) * 1e3

    tokens: list[int] = []
    kept: list[np.ndarray] = []
    decode_ms: list[float] = []
    past = len(ids)
    stopped = "length"
    while True:
        values = dict(zip([*[c.present for c in layout.cache], layout.logits], binding.get_outputs(), strict=True))
        last = values[layout.logits].numpy()[0, -1]
        token = int(np.argmax(last))
        tokens.append(token)
        if keep_logits:
            kept.append(last.astype(np.float32, copy=True))
        if token in eos_ids:
            stopped = "eos"
            break
        if len(tokens) == max_new_tokens:
            break
        binding.clear_binding_inputs()
        bind_tokens(layout.step_feeds(np.array([[token]]), past))
        for c in layout.cache:
            binding.bind_ortvalue_input(c.past, values[c.present])
        binding.clear_binding_outputs()
        for c in layout.cache:
            binding.bind_output(c.present, "cpu")
        binding.bind_output(layout.logits, "cpu")
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        decode_ms.append((time.perf_counter() - start) * 1e3)
        past += 1
    return Generation(ids.tolist(), tokens, prefill_ms, decode_ms, stopped, kept if keep_logits else None)


def greedy_recompute(
    model: Any,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    eos_ids: Sequence[int] = (),
    threads: int | None = None,
) -> Generation:
    """Greedy generation without a cache: every step runs the whole sequence so far (a cache
    graph gets an empty past each time; a graph without cache inputs just its token inputs).
    The reference :func:`greedy` must equal; ``logits`` are always kept."""
    session = open_session(model, threads=threads)
    names = [i.name for i in session.get_inputs()]
    try:
        layout: CacheLayout | None = cache_layout(session)
    except UnsupportedModelError:
        if not set(names) <= set(_TOKEN_INPUTS) or "input_ids" not in names:
            raise
        layout = None
    ids = _check_prompt(prompt, max_new_tokens, layout)
    logits_name = layout.logits if layout else session.get_outputs()[0].name
    sequence = ids.tolist()
    tokens: list[int] = []
    kept: list[np.ndarray] = []
    times: list[float] = []
    stopped = "length"
    while True:
        row = np.array([sequence], np.int64)
        if layout is not None:
            feeds = layout.prefill_feeds(row)
        else:
            feeds = {"input_ids": row}
            if "attention_mask" in names:
                feeds["attention_mask"] = np.ones_like(row)
            if "position_ids" in names:
                feeds["position_ids"] = np.arange(row.shape[1], dtype=np.int64)[None]
        start = time.perf_counter()
        (logits,) = session.run([logits_name], feeds)
        times.append((time.perf_counter() - start) * 1e3)
        last = logits[0, -1]
        token = int(np.argmax(last))
        tokens.append(token)
        kept.append(last.astype(np.float32, copy=True))
        sequence.append(token)
        if token in eos_ids:
            stopped = "eos"
            break
        if len(tokens) == max_new_tokens:
            break
    return Generation(ids.tolist(), tokens, times[0], times[1:], stopped, kept)


def _check_prompt(prompt: Sequence[int], max_new_tokens: int, layout: CacheLayout | None) -> np.ndarray:
    ids = np.asarray(list(prompt), dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise PassConfigError("generate: the prompt is empty; give at least one token")
    if max_new_tokens < 1:
        raise PassConfigError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = layout.vocab if layout is not None else None
    if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
        raise PassConfigError(
            f"generate: prompt token {int(ids.max() if ids.max() >= vocab else ids.min())} is outside "
            f"the model's vocabulary of {vocab}; use the model's own tokenizer"
        )
    return ids


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where two token lists differ (a shorter list differs where it ends),
    or None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ----------------------------------------------------------------------------- timing


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB, from /proc/self/status (Linux);
    the peak from ``getrusage`` elsewhere, where the current value is not available (nan)."""
    status = Path("/proc/self/status")
    if status.is_file():
        fields = dict(
            line.split(":", 1) for line in status.read_text().splitlines() if ":" in line
        )
        if "VmRSS" in fields and "VmHWM" in fields:
            return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float("nan"), peak / 1024 / (1024 if os.uname().sysname == "Darwin" else 1)


@dataclasses.dataclass
class GenerationTiming:
    """One model in an interleaved generation benchmark.

    ``prefill_ms``: median over runs of the prompt's forward (empty cache). ``decode_ms``: median
    over every decode step of every run (one new token each). ``memory_mb``: growth of the
    process's resident memory from before this model's session was opened to after its warm-up
    generation (weights, prepacked kernels, arena, cache). ``tokens`` are the greedy tokens.
    """

    name: str
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    decode_ms: float
    decode_p10_ms: float
    decode_p90_ms: float
    tokens_per_s: float
    memory_mb: float
    runs: int
    tokens: list[int]  # of the first round
    run_tokens: list[list[int]] = dataclasses.field(default_factory=list)  # of every round


def time_side_by_side(
    models: Sequence[Any],
    prompt: Sequence[int] | None,
    new_tokens: int,
    *,
    prompts: Sequence[Sequence[int]] | None = None,
    names: Sequence[str] | None = None,
    runs: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[GenerationTiming]:
    """Generate ``new_tokens`` greedily (no stop at end of text) from ``prompt`` with every
    model, round robin: each round runs every model once, starting from a different one, so
    load on the machine hits them alike. With ``prompts`` (instead of ``prompt``) round ``r``
    uses ``prompts[r % len(prompts)]`` for every model. Sessions are opened one after another
    with their memory measured; at least one warm-up generation per model precedes the rounds."""
    if (prompt is None) == (prompts is None):
        raise PassConfigError("generate bench: give either one prompt or a list of prompts")
    rounds = [list(prompt)] if prompt is not None else [list(p) for p in prompts or ()]
    if not rounds or any(len(p) != len(rounds[0]) for p in rounds):
        raise PassConfigError("generate bench: the prompts must be non-empty and of one length")
    if runs < 1 or warmup < 0:
        raise PassConfigError(f"generate bench: need runs >= 1 and warmup >= 0, got {runs} and {warmup}")
    if not models:
        raise PassConfigError("generate bench: no models given")
    names = list(names) if names is not None else [str(m) for m in models]
    if len(names) != len(models):
        raise PassConfigError(f"generate bench: {len(names)} names for {len(models)} models")
    sessions, layouts, memory = [], [], []
    for name, model in zip(names, models, strict=True):
        before, _ = rss_mb()
        session = open_session(model, threads=threads)
        layout = cache_layout(session)
        for _ in range(max(warmup, 1)):
            greedy(session, rounds[0], new_tokens, layout=layout)
        sessions.append(session)
        layouts.append(layout)
        memory.append(rss_mb()[0] - before)
        if progress:
            progress(f"{name}: session open, {memory[-1]:.0f} MB")
    prefill: list[list[float]] = [[] for _ in models]
    decode: list[list[float]] = [[] for _ in models]
    outputs: list[list[list[int]]] = [[] for _ in models]
    for round_ in range(runs):
        for offset in range(len(models)):
            i = (round_ + offset) % len(models)
            result = greedy(sessions[i], rounds[round_ % len(rounds)], new_tokens, layout=layouts[i])
            prefill[i].append(result.prefill_ms)
            decode[i].extend(result.decode_ms)
            outputs[i].append(result.tokens)
        if progress:
            progress(f"round {round_ + 1}/{runs} done")
    out = []
    for i, name in enumerate(names):
        steps = np.array(decode[i]) if decode[i] else np.array([float("nan")])
        median = float(np.median(steps))
        out.append(
            GenerationTiming(
                name=name,
                prompt_tokens=len(rounds[0]),
                new_tokens=len(outputs[i][0]),
                prefill_ms=float(np.median(prefill[i])),
                decode_ms=median,
                decode_p10_ms=float(np.percentile(steps, 10)),
                decode_p90_ms=float(np.percentile(steps, 90)),
                tokens_per_s=1e3 / median if median > 0 else float("nan"),
                memory_mb=memory[i],
                runs=runs,
                tokens=outputs[i][0],
                run_tokens=outputs[i],
            )
        )
    return out


# ----------------------------------------------------------------------------- text


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """Encode a prompt and decode generated ids, with the ids that end a text."""

    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    eos_ids: tuple[int, ...]
    label: str


def load_text_tokenizer(path: str | os.PathLike[str]) -> TextTokenizer:
    """A tokenizer for generation from the inputs ``calibrate`` accepts: a folder with
    ``tokenizer.json``, a ``tokenizer.json`` file, or a ``.gguf`` file (read by transformers).

    Prompts are encoded with the tokenizer's special tokens, as a user's prompt would be.
    """
    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise PassConfigError(f"generate: tokenizer file '{p}' does not exist; pass an existing .gguf file")
        return _gguf_text_tokenizer(p)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file() or file.name != "tokenizer.json":
        raise PassConfigError(
            f"generate: no tokenizer.json at '{p}'; pass a folder containing tokenizer.json, "
            "the tokenizer.json file itself, or a .gguf file"
        )
    import tokenizers

    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust library raises a plain Exception on malformed files
        raise PassConfigError(f"generate: cannot read tokenizer '{file}': {e}") from None
    tok.no_padding()
    tok.no_truncation()
    eos = _eos_from_folder(file.parent, tok)
    return TextTokenizer(
        encode=lambda text: tok.encode(text, add_special_tokens=True).ids,
        decode=lambda ids: tok.decode(list(ids), skip_special_tokens=True),
        eos_ids=eos,
        label=str(file),
    )


def _eos_from_folder(folder: Path, tok: Any) -> tuple[int, ...]:
    """End-of-text ids: from config.json / generation_config.json beside the tokenizer when
    they exist, else the usual end tokens the vocabulary has."""
    import json

    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        f = folder / name
        if f.is_file():
            try:
                value = json.loads(f.read_text()).get("eos_token_id")
            except (OSError, ValueError):
                continue
            ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    if not ids:
        for token in ("</s>", "<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<eos>"):
            found = tok.token_to_id(token)
            if found is not None:
                ids.append(found)
    return tuple(dict.fromkeys(int(i) for i in ids))


def _gguf_text_tokenizer(path: Path) -> TextTokenizer:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of waiting
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers raises many kinds for a file it cannot read
        raise PassConfigError(f"generate: cannot read a tokenizer from '{path}': {type(e).__name__}: {e}") from None
    eos = () if tok.eos_token_id is None else (int(tok.eos_token_id),)
    return TextTokenizer(
        encode=lambda text: list(tok.encode(text, add_special_tokens=True)),
        decode=lambda ids: tok.decode(list(ids), skip_special_tokens=True),
        eos_ids=eos,
        label=str(path),
    )
