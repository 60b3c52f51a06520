#!/usr/bin/env python3
"""`make demo`: compress a real model to int8 with the w8a8 preset and compare it with fp32 and ORT.

    python tools/demo.py [--model minilm|smollm2] [--out DIR]

Runs `tforge compile MODEL --preset w8a8 --calib-text TEXT --tokenizer TOK -o OUT` (printed, so
it can be re-run by hand), quantizes the same model with ONNX Runtime's own `quantize_dynamic`
(per-channel) and prints, for fp32, ORT and tforge: file size, latency side by side, accuracy on
held-out text, and the int8 kernels ORT ran. Calibration reads the first half of TEXT and the
accuracy the second half. TEXT is the WikiText-2 test split that ships with tforge
(tforge/data/, CC BY-SA).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import benchlib  # noqa: E402  (tools/bench.py: sessions, ORT quantizers, kernel summary)

import tforge  # noqa: E402
from tforge import data as tforge_data  # noqa: E402
from tforge import evaluate  # noqa: E402
from tforge.backends import ort  # noqa: E402
from tforge.cli import main as tforge_main  # noqa: E402
from tforge.frontends import hf_models  # noqa: E402

EXPORTERS = {"minilm": hf_models.export_minilm, "smollm2": hf_models.export_smollm2}


def _say(message: str = "") -> None:
    print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(EXPORTERS), default="minilm")
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".cache" / "models")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "demo")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    name = args.model
    text = tforge_data.WIKITEXT
    _say(f"text: WikiText-2 test ({text}); calibration from its first half, accuracy on its second half")

    src = args.models_dir / f"{name}.onnx"
    if not hf_models.is_current(src):
        _say(f"exporting {name} to {src} ...")
        EXPORTERS[name](src)
    args.out.mkdir(parents=True, exist_ok=True)
    tforge_out = args.out / f"{name}.w8a8.onnx"
    ort_out = args.out / f"{name}.ort-dynamic.onnx"
    tokenizer_path = hf_models.minilm_dir() if name == "minilm" else hf_models.smollm2_gguf_path()

    command = ["-q", "compile", str(src), "--preset", "w8a8", "--calib-text", str(text),
               "--tokenizer", str(tokenizer_path), "-o", str(tforge_out)]
    _say(f"\n$ tforge {' '.join(command)}")
    t0 = time.perf_counter()
    code = tforge_main(command)
    if code != 0:
        return code
    _say(f"compiled in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    benchlib.ort_quantize(src, ort_out, None)
    _say(f"ORT quantize_dynamic (per-channel, linears) in {time.perf_counter() - t0:.1f}s\n")

    variants = {"fp32 (ORT)": src, "ORT quantize_dynamic": ort_out, "tforge --preset w8a8": tforge_out}
    sessions = {label: benchlib.timing_session(path, None) for label, path in variants.items()}
    if name == "minilm":
        rows, accuracy_header = _minilm(text, sessions)
        feeds = verify_feeds(tforge.load(src), {"batch": 8, "sequence": 128})
        shape = "batch 8 x 128 tokens"
    else:
        rows, accuracy_header, feeds = _smollm2(text, sessions)
        shape = f"1 x {feeds['input_ids'].shape[1]} tokens"
    timings = ort.time_side_by_side(list(sessions.values()), feeds, warmup=2, runs=args.runs)
    base = timings[0].median_ms
    _say(f"| {name} | size (MB) | latency {shape} (ms) | speedup | {accuracy_header} | int8 kernels ORT ran |")
    _say("|---|---|---|---|---|---|")
    for (label, path), timing in zip(variants.items(), timings, strict=True):
        kernels = benchlib.int8_kernels(tforge.load(path), feeds)
        _say(
            f"| {label} | {benchlib.file_size_mb(path):.1f} | {timing.median_ms:.0f} | "
            f"{base / timing.median_ms:.2f}x | {rows[label]} | {kernels} |"
        )
    return 0


def verify_feeds(model, dims: dict[str, int]) -> dict[str, np.ndarray]:
    from tforge.compiler import verify

    feeds = verify.make_inputs(model, dims=dims, rng=np.random.default_rng(0))
    if "attention_mask" in feeds:
        feeds["attention_mask"][:] = 1
    return feeds


def _minilm(text: Path, sessions: dict) -> tuple[dict[str, str], str]:
    tokenizer = hf_models.minilm_tokenizer()
    second = evaluate.text_half(evaluate.read_text(text), "second")
    sentences = evaluate.sentences(second, None)[:128]
    embeddings = {
        label: evaluate.sentence_embeddings(lambda f, s=s: s.run(None, f)[0], tokenizer, sentences)
        for label, s in sessions.items()
    }
    reference = embeddings["fp32 (ORT)"]
    rows = {}
    for label, e in embeddings.items():
        a = evaluate.agreement(reference, e)
        rows[label] = f"{a.mean:.4f} / {a.min:.4f}"
    return rows, f"cosine vs fp32, mean / min ({len(sentences)} sentences)"


def _smollm2(text: Path, sessions: dict) -> tuple[dict[str, str], str, dict]:
    tokenizer = hf_models.smollm2_tokenizer()
    second = evaluate.text_half(evaluate.read_text(text), "second")
    context, count = 512, 4
    ids = evaluate.tokenize_lines(lambda line: tokenizer(line, add_special_tokens=False)["input_ids"], second, context * count)
    count = min(count, len(ids) // context)
    windows = evaluate.token_windows(ids, context, count)
    rows = {}
    for label, session in sessions.items():
        ppl = evaluate.window_perplexity(lambda f, s=session: s.run(None, f)[0], windows)
        rows[label] = f"{ppl:.2f}"
    return rows, f"perplexity ({count} windows of {context})", {"input_ids": windows[:1]}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
