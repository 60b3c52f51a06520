#!/usr/bin/env python3
"""`make demo`: compress a real model to int8 with the w8a8 preset and compare it with fp32 and ORT.

    python tools/demo.py [--model minilm|smollm2] [--out DIR]

Runs `tforge compile MODEL --preset w8a8 --calib-text TEXT --tokenizer TOK -o OUT` (printed, so
it can be re-run by hand) and quantizes the same model with ONNX Runtime's own quantizers.

- minilm (an encoder, batch 8 x 128): fp32, ORT `quantize_dynamic` (per-channel) and tforge side
  by side: file size, latency, cosine of sentence embeddings with fp32, and the int8 kernels ORT ran.
- smollm2 (SmolLM2-135M exported with a KV cache, as LLMs are deployed): fp32, ORT
  `quantize_dynamic`, ORT's 4-bit `MatMulNBitsQuantizer` and tforge: file size, perplexity,
  decode ms per token and tokens/s generating token by token (interleaved), and the sentence
  each one generates from the same prompt.

Calibration reads the first half of TEXT and the accuracy the second half. TEXT is the
WikiText-2 test split that ships with tforge (tforge/data/, CC BY-SA).
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

# the file each demo model is exported to, and how (SmolLM2 with a KV cache, TorchScript route: fast)
EXPORTS = {
    "minilm": ("minilm", hf_models.export_minilm),
    "smollm2": ("smollm2-kv-torchscript", hf_models.export_smollm2_kv_torchscript),
}
PROMPT = "The history of the city"


def _say(message: str = "") -> None:
    print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(EXPORTS), default="minilm")
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".cache" / "models")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "demo")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    name = args.model
    text = tforge_data.WIKITEXT
    _say(f"text: WikiText-2 test ({text}); calibration from its first half, accuracy on its second half")

    stem, exporter = EXPORTS[name]
    src = args.models_dir / f"{stem}.onnx"
    if not hf_models.is_current(src):
        _say(f"exporting {name} to {src} ...")
        exporter(src)
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
    if name == "smollm2":
        return _smollm2_decode(src, tforge_out, ort_out, args.out, text, args.runs)
    t0 = time.perf_counter()
    benchlib.ort_quantize(src, ort_out, None)
    _say(f"ORT quantize_dynamic (per-channel, linears) in {time.perf_counter() - t0:.1f}s\n")

    variants = {"fp32 (ORT)": src, "ORT quantize_dynamic": ort_out, "tforge --preset w8a8": tforge_out}
    sessions = {label: benchlib.timing_session(path, None) for label, path in variants.items()}
    rows, accuracy_header = _minilm(text, sessions)
    feeds = verify_feeds(tforge.load(src), {"batch": 8, "sequence": 128})
    shape = "batch 8 x 128 tokens"
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


def _smollm2_decode(src: Path, tforge_out: Path, ort_out: Path, out: Path, text: Path, runs: int) -> int:
    """The cache model as it is used: perplexity, generation speed and text, fp32 beside ORT and tforge."""
    from tforge.runtime import generate

    t0 = time.perf_counter()
    benchlib.ort_quantize(src, ort_out, None)
    ort_int4 = out / "smollm2.ort-int4.onnx"
    _ort_int4(src, ort_int4)
    _say(f"ORT quantize_dynamic (int8) and MatMulNBitsQuantizer (int4, block 32, accuracy level 4) in "
         f"{time.perf_counter() - t0:.1f}s\n")  # fmt: skip
    variants = {"fp32 (ORT)": src, "ORT quantize_dynamic int8": ort_out, "ORT MatMulNBits int4": ort_int4,
                "tforge --preset w8a8": tforge_out}  # fmt: skip
    tokenizer = hf_models.smollm2_tokenizer()
    second = evaluate.text_half(evaluate.read_text(text), "second")
    context, count = 512, 4
    ids = evaluate.tokenize_lines(lambda line: tokenizer(line, add_special_tokens=False)["input_ids"], second, context * count)
    windows = evaluate.token_windows(ids, context, min(count, len(ids) // context))
    _say(f"perplexity on {len(windows)} windows of {context} tokens, each prefilled from an empty cache ...")
    ppl = {}
    for label, path in variants.items():
        session = generate.open_session(path, threads=2)
        ppl[label] = evaluate.cache_perplexity(session, windows)
        del session
    prompt = ids[:64]
    _say(f"generating 32 tokens after a 64-token prompt, {runs} interleaved runs, 2 threads ...")
    timed = tforge.bench_generate(list(variants.values()), names=list(variants), prompt=prompt, new_tokens=32,
                                  runs=runs, threads=2)  # fmt: skip
    base_ppl = ppl["fp32 (ORT)"]
    _say("| smollm2 with a KV cache | size (MB) | perplexity | vs fp32 | decode ms/token | tokens/s | decode speedup |")
    _say("|---|---|---|---|---|---|---|")
    for (label, path), t in zip(variants.items(), timed, strict=True):
        _say(f"| {label} | {benchlib.file_size_mb(path):.1f} | {ppl[label]:.2f} | {100 * (ppl[label] / base_ppl - 1):+.1f}% | "
             f"{t.decode_ms:.1f} | {t.tokens_per_s:.1f} | {1 / t.ratio:.2f}x |")  # fmt: skip
    _say(f"\ngreedy continuations of {PROMPT!r}:")
    for label, path in variants.items():
        result = tforge.generate_text(path, PROMPT, tokenizer=hf_models.smollm2_gguf_path(), max_new_tokens=24, threads=2)
        _say(f"  {label:28s} {result.text.strip()!r}")
    return 0


def _ort_int4(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # ORT's default 4-bit algorithm: round to nearest, symmetric blocks of 32, int8 activations
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=32, is_symmetric=True,
                                     accuracy_level=4, op_types_to_quantize=("MatMul",))  # fmt: skip
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
