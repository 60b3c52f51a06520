"""TVM backend benchmark: TVM fp32/int8 against ORT fp32/int8, latency side by side, build times, accuracy.

    .venv/bin/python tools/bench_tvm.py --models minilm --runs 20 --out /tmp/tvm-bench.md
    .venv/bin/python tools/bench_tvm.py --models smollm2 --runs 5

MiniLM: batch 8 x 128 tokens; accuracy is the cosine of mean-pooled sentence embeddings against
ORT fp32 on WikiText-2 sentences (second half), calibration on the first half (as in the int8
section of tools/bench.py). SmolLM2: 1 x 512 tokens; accuracy is perplexity on 512-token windows
of the second half. All variants are timed round robin in one process (ORT with spinning off,
TVM with its own thread pool), so load on the shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import numpy as np  # noqa: E402

import tforge  # noqa: E402
from tforge import data as tforge_data  # noqa: E402
from tforge import evaluate  # noqa: E402
from tforge.backends import ort  # noqa: E402
from tforge.backends import tvm as tvm_backend  # noqa: E402
from tforge.compiler import verify  # noqa: E402
from tforge.frontends import hf_models  # noqa: E402
from tforge.runtime import ort as ort_runtime  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / ".cache" / "models"
WIKITEXT = tforge_data.WIKITEXT


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def interleaved(
    runs: dict[str, Callable[[], object]], rounds: int, warmup: int = 2
) -> dict[str, ort.Timing]:
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for offset in range(len(names)):
            name = names[(r + offset) % len(names)]
            start = time.perf_counter()
            runs[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {n: ort.Timing.from_samples(s) for n, s in samples.items()}


def _session(model, threads: int):
    return ort_runtime.create_session(model, optimize=True, threads=threads, spin=False)


def minilm(runs: int, threads: int, sentences_count: int) -> list[str]:
    tokenizer = hf_models.minilm_tokenizer()
    text = evaluate.read_text(WIKITEXT)
    calib_sentences = evaluate.sentences(evaluate.text_half(text, "first"), 64)
    calibration = [
        evaluate.encode_sentences(tokenizer, calib_sentences[i : i + 8]) for i in range(0, 64, 8)
    ]
    eval_sentences = evaluate.sentences(evaluate.text_half(text, "second"), sentences_count)
    src = MODELS / "minilm.onnx"
    pipelines = {
        "fp32": "canonicalize",
        "int8 per-token": "canonicalize,quantize{activations=dynamic-per-token}",
        "int8 static": "canonicalize,calibrate,quantize{activations=static}",
    }
    models = {}
    for name, spec in pipelines.items():
        model = tforge.load(src)
        tforge.compile(model, spec, calibration=calibration if "calibrate" in spec else None)
        models[name] = model
    feeds = verify.make_inputs(
        models["fp32"], dims={"batch": 8, "sequence": 128}, rng=np.random.default_rng(0)
    )
    feeds["attention_mask"][:] = 1
    calls: dict[str, Callable[[], object]] = {}
    embed: dict[str, Callable[[dict], np.ndarray]] = {}
    build_s: dict[str, float] = {}
    for name, model in models.items():
        session = _session(model, threads)
        calls[f"ORT {name}"] = lambda s=session: s.run(None, feeds)
        embed[f"ORT {name}"] = lambda f, s=session: s.run(None, f)[0]
    for name, model in models.items():
        start = time.perf_counter()
        art = tvm_backend.build(
            model, dims={"batch": 8}, buckets=[128], check_numerics=True, progress=_log
        )
        build_s[f"TVM {name}"] = time.perf_counter() - start
        _log(
            f"TVM {name}: build {build_s[f'TVM {name}']:.1f} s (incl. numerics check) "
            f"numerics vs ORT {art.meta['numerics']}"
        )
        if name != "fp32":
            _log(
                f"TVM {name}: vpdpbusd (VNNI) instructions in the kernels: {art.assembly().count('vpdpbusd')}"
            )
        calls[f"TVM {name}"] = lambda a=art: a.run(feeds)
        embed[f"TVM {name}"] = lambda f, a=art: a.run(f)["last_hidden_state"]
    # accuracy: batches of 8 (the TVM executables' batch); ORT fp32 is the reference
    embeddings = {
        n: evaluate.sentence_embeddings(fn, tokenizer, eval_sentences, batch_size=8)
        for n, fn in embed.items()
    }
    timings = interleaved(calls, runs)
    base = timings["ORT fp32"].median_ms
    ort_int8_best = min(
        timings["ORT int8 per-token"].median_ms, timings["ORT int8 static"].median_ms
    )
    rows = [
        f"MiniLM, batch 8 x 128 tokens, {threads} threads, median of {runs} interleaved runs (machine shared); "
        f"cosine vs ORT fp32 on {len(eval_sentences)} WikiText-2 sentences (second half); "
        "static calibration on 64 sentences (first half).",
        "",
        "| variant | latency ms (p10-p90) | vs ORT fp32 | vs fastest ORT int8 | cosine mean | cosine min | build s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in timings.items():
        a = evaluate.agreement(embeddings["ORT fp32"], embeddings[name])
        rows.append(
            f"| {name} | {t.median_ms:.1f} ({t.p10_ms:.1f}-{t.p90_ms:.1f}) | {t.median_ms / base:.2f}x | "
            f"{t.median_ms / ort_int8_best:.2f}x | {a.mean:.5f} | {a.min:.5f} | "
            f"{build_s.get(name, float('nan')):.1f} |"
        )
    return rows


def smollm2(runs: int, threads: int, windows: int) -> list[str]:
    tokenizer = hf_models.smollm2_tokenizer()
    src = MODELS / "smollm2.onnx"
    pipelines = {
        "fp32": "canonicalize",
        "int8 per-token": "canonicalize,quantize{activations=dynamic-per-token}",
    }
    models = {}
    for name, spec in pipelines.items():
        model = tforge.load(src)
        tforge.compile(model, spec)
        models[name] = model
    feeds = verify.make_inputs(
        models["fp32"], dims={"batch": 1, "sequence": 512}, rng=np.random.default_rng(0)
    )
    calls: dict[str, Callable[[], object]] = {}
    scorers: dict[str, Callable[[dict], np.ndarray]] = {}
    build_s: dict[str, float] = {}
    for name, model in models.items():
        session = _session(model, threads)
        calls[f"ORT {name}"] = lambda s=session: s.run(None, feeds)
        scorers[f"ORT {name}"] = lambda f, s=session: s.run(None, f)[0]
    for name, model in models.items():
        start = time.perf_counter()
        art = tvm_backend.build(
            model, dims={"batch": 1}, buckets=[512], check_numerics=True, progress=_log
        )
        build_s[f"TVM {name}"] = time.perf_counter() - start
        _log(f"TVM {name}: build {build_s[f'TVM {name}']:.1f} s")
        out_name = art.outputs[0]["name"]
        calls[f"TVM {name}"] = lambda a=art: a.run(feeds)
        scorers[f"TVM {name}"] = lambda f, a=art, o=out_name: a.run(f)[o]
    ppl: dict[str, float] = {}
    text = evaluate.text_half(evaluate.read_text(WIKITEXT), "second")
    ids = evaluate.tokenize_lines(
        lambda line: tokenizer(line, add_special_tokens=False)["input_ids"], text, 512 * windows
    )
    token_windows = evaluate.token_windows(ids, 512, windows)
    for name, fn in scorers.items():
        ppl[name] = evaluate.window_perplexity(fn, token_windows)
    timings = interleaved(calls, runs, warmup=1)
    base = timings["ORT fp32"].median_ms
    rows = [
        f"SmolLM2-135M, 1 x 512 tokens, {threads} threads, median of {runs} interleaved runs (machine shared).",
        "",
        "| variant | latency ms (p10-p90) | vs ORT fp32 | perplexity | build s |",
        "|---|---|---|---|---|",
    ]
    for name, t in timings.items():
        rows.append(
            f"| {name} | {t.median_ms:.1f} ({t.p10_ms:.1f}-{t.p90_ms:.1f}) | {t.median_ms / base:.2f}x | "
            f"{ppl.get(name, float('nan')):.3f} | {build_s.get(name, float('nan')):.1f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="minilm")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    lines: list[str] = []
    for name in args.models.split(","):
        section = {
            "minilm": lambda: minilm(args.runs, args.threads, args.sentences),
            "smollm2": lambda: smollm2(args.runs, args.threads, args.windows),
        }[name]
        lines += section() + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
