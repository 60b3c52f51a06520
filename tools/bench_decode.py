#!/usr/bin/env python
"""Decode benchmark of SmolLM2-135M with a KV cache (tforge issue 16's protocol).

    python tools/bench_decode.py [--quick] [--rows fp32,ort-int4,...] [--candidates LABEL=a.onnx,b.onnx]
                                 [--fp32 PATH] [--work DIR] [--threads 2] [--out table.md]

Rows (``--rows``, default all):

- ``fp32``: the fp32 cache export, TorchScript route (the layout and graph of Hugging Face's
  exporter; ``--fp32`` picks another file). Every ratio is relative to this row.
- ``fp32-dynamo``: the same model through ``torch.onnx.export(dynamo=True)``.
- ``ort-int8``: ONNX Runtime's ``quantize_dynamic`` of ``fp32``: int8 weights per channel, MatMul only.
- ``ort-int4``: ONNX Runtime's ``MatMulNBitsQuantizer`` of ``fp32``: int4 round-to-nearest,
  symmetric, block 32, accuracy_level 4 (int8 activations in the kernel).
- ``ort-int4-hqq``: ``MatMulNBitsQuantizer`` with ``HQQWeightOnlyQuantConfig`` (half-quadratic
  quantization, asymmetric with float zero points, no calibration data), block 128. Not block
  32: SmolLM2's weights come from a Q4_1 GGUF, so every block of 32 already lies on an
  asymmetric 4-bit grid with a float minimum and any such quantizer at block 32 is lossless by
  construction. K = 576 is not a multiple of 128: the last block of those rows is zero-padded
  (MatMulNBits takes ``ceil(K / 128)`` blocks). Float zero points take MatMulNBits' slow path,
  so this row is an accuracy peer, not a speed peer.
- ``ort-int4-gptq``: ``MatMulNBitsQuantizer`` with ``GPTQWeightOnlyQuantConfig`` (its defaults:
  percdamp 0.01, column batches of 128, no act-order, min-max scales, per channel), symmetric,
  block 32, accuracy_level 4 like ``ort-int4``; calibrated on 16 windows of 128 tokens of the
  first half of WikiText-2 (the benchmark evaluates on the second), each fed to the fp32 cache
  graph as a prefill from an empty cache, 8 windows a batch. Only 16: ORT's GPTQ runs the whole
  graph over every calibration feed once for each distinct MatMul input (121 in SmolLM2).
  Two faults of ORT 1.31.1's GPTQ (its vendored neural_compressor ``gptq``), measured, not
  fixed here: it carries no rounding error forward (it reads the below-diagonal part of the
  upper-triangular Cholesky factor of H^-1, which is zero), so its result does not depend on the
  calibration data at all (bit-identical with H = I): it is round-to-nearest on GPTQ's grid,
  whose scale maps the group's largest |w| to 7.5 steps; and that result is then re-quantized by
  a plain min-max quantizer, which keeps every integer but stretches the scale by 16/15 or 14/15
  (the group's largest |q - 8| is 8 or 7). So this row is ORT's GPTQ as shipped, not GPTQ.
- ``genai-fp32`` / ``genai-int4``: onnxruntime-genai's model builder (``python -m
  onnxruntime_genai.models.builder -e cpu -p fp32|int4``, int4 with block 32, accuracy_level 4),
  fed a Hugging Face folder made offline from the GGUF with transformers' ``save_pretrained``.
- any ``--candidates`` (``label=path`` or a path, labelled by its file name).

Protocol: greedy decoding from 128-token prompts (consecutive pieces of the second half of
WikiText-2), 64 new tokens, no stop at end of text; every round generates once with every model
(starting from a different one each round), one prompt per round; decode ms/token is the median
over every decode step of every round; prefill ms the median prompt forward (empty cache).
ORT sessions use 2 intra-op threads, all of ORT's graph optimisations, spinning off. Perplexity:
WikiText-2 second half, 8 windows of 512 tokens, each prefilled from an empty cache. File MB:
the .onnx file and its external data. Memory: growth of this process's RSS while the session
was opened and warmed up. "greedy = fp32": rounds whose 64 tokens equal the fp32 row's, and the
first differing position of the others.

Built variants are cached under ``--work`` (default .cache/bench_decode) and reused. ``--quick``
runs small counts (2 rounds of 8 tokens after 32-token prompts, one 128-token window) to check
the tool end to end. Progress goes to stderr, the markdown table to stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tforge import evaluate  # noqa: E402
from tforge.data import WIKITEXT  # noqa: E402
from tforge.errors import TforgeError  # noqa: E402
from tforge.frontends import hf_models  # noqa: E402
from tforge.runtime import generate  # noqa: E402

ROWS = ("fp32", "fp32-dynamo", "ort-int8", "ort-int4", "ort-int4-hqq", "ort-int4-gptq", "genai-fp32", "genai-int4")
DEFAULT_WORK = REPO / ".cache" / "bench_decode"
MODELS = REPO / ".cache" / "models"
HQQ_BLOCK = 128  # off the Q4_1 block of 32 the weights were stored in (see the docstring)
# ORT's GPTQ runs the whole graph over every calibration window once for each distinct MatMul
# input (121 here), so the build costs 121 x GPTQ_WINDOWS forwards of GPTQ_CONTEXT tokens: 16
# windows already take about 40 minutes on a busy 2-core machine
GPTQ_WINDOWS = 16
# windows per calibration feed: ORT's Hessian is the mean of x x^T over every row of every feed
# (it weights each feed by its batch), so batching changes nothing but the speed of the forwards
GPTQ_BATCH = 8
GPTQ_CONTEXT = 128


@dataclasses.dataclass(frozen=True)
class Protocol:
    prompts: int  # rounds, one prompt each
    prompt_length: int
    new_tokens: int
    ppl_windows: int
    ppl_context: int
    threads: int


FULL = Protocol(prompts=5, prompt_length=128, new_tokens=64, ppl_windows=8, ppl_context=512, threads=2)
QUICK = Protocol(prompts=2, prompt_length=32, new_tokens=8, ppl_windows=1, ppl_context=128, threads=2)


@dataclasses.dataclass
class Variant:
    label: str
    path: Path
    how: str


def _log(message: str) -> None:
    print(f"[bench_decode] {message}", file=sys.stderr, flush=True)


def _file_mb(path: Path) -> float:
    """The .onnx and the external data files it names."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    files = {path}
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add(path.parent / entry.value)
    return sum(f.stat().st_size for f in files) / 1e6


def _cached(path: Path, build: Callable[[Path], None], what: str) -> Path:
    """Build ``path`` through a temporary name unless it exists (a crashed build leaves nothing)."""
    if path.exists():
        _log(f"{what}: reusing {path}")
        return path
    _log(f"{what}: building {path} ...")
    start = time.perf_counter()
    tmp = path.with_name(f"{path.stem}.partial{path.suffix}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    tmp.unlink(missing_ok=True)
    build(tmp)
    os.replace(tmp, path)
    _log(f"{what}: built in {time.perf_counter() - start:.0f} s")
    return path


def _export(name: str) -> Path:
    path = MODELS / f"{name}.onnx"
    exporter = {"smollm2-kv": hf_models.export_smollm2_kv,
                "smollm2-kv-torchscript": hf_models.export_smollm2_kv_torchscript}[name]
    if not hf_models.is_current(path, REPO / "tools" / "export_models.py"):
        _log(f"{name}: exporting to {path} (a few minutes) ...")
        report = exporter(path)
        _log(f"{name}: max |ORT - torch| prefill {report.prefill_max_abs_diff:.3g}, decode {report.decode_max_abs_diff:.3g}")
    return path


def _ort_int8(src: Path, work: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def build(out: Path) -> None:
        quantize_dynamic(str(src), str(out), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"])

    return _cached(work / f"{src.stem}.ort-int8.onnx", build, "ort-int8")


def _ort_int4(src: Path, work: Path) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    def build(out: Path) -> None:
        # the default algorithm of MatMulNBitsQuantizer is round-to-nearest per block
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=32, is_symmetric=True,
                                         accuracy_level=4, op_types_to_quantize=("MatMul",))
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)

    return _cached(work / f"{src.stem}.ort-int4-rtn-b32.onnx", build, "ort-int4")


def _ort_int4_hqq(src: Path, work: Path) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    def build(out: Path) -> None:
        # HQQ reads its block size from the config; MatMulNBitsQuantizer's own block_size is
        # only used by the default (RTN) path, but is kept equal to avoid confusion
        config = HQQWeightOnlyQuantConfig(block_size=HQQ_BLOCK, bits=4, op_types_to_quantize=("MatMul",))
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=HQQ_BLOCK, algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)

    return _cached(work / f"{src.stem}.ort-int4-hqq-b{HQQ_BLOCK}.onnx", build, "ort-int4-hqq")


def _calibration_feeds(src: Path, count: int, context: int, batch: int) -> list[dict[str, Any]]:
    """Prefill feeds (empty cache) of ``count`` consecutive ``context``-token windows of the first
    half of WikiText-2, ``batch`` windows a feed: the half the benchmark does not evaluate on,
    tokenized line by line like tforge's own text calibration."""
    tokenizer = hf_models.smollm2_tokenizer()
    text = evaluate.text_half(evaluate.read_text(WIKITEXT), "first")
    ids = evaluate.tokenize_lines(lambda line: tokenizer(line, add_special_tokens=False)["input_ids"],
                                  text, count * context)
    windows = evaluate.token_windows(ids, context, count)
    layout = generate.cache_layout(generate.graph_io(src))  # reads the declared inputs, no session
    return [layout.prefill_feeds(windows[i:i + batch]) for i in range(0, count, batch)]


def _ort_int4_gptq(src: Path, work: Path) -> Path:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    class Windows(CalibrationDataReader):
        # ORT deep-copies the reader and iterates the copy (CalibrationDataReader.__next__
        # calls get_next until None), so the feeds are held in a plain list
        def __init__(self, feeds: list[dict[str, Any]]) -> None:
            self.feeds = feeds
            self.index = 0

        def get_next(self) -> dict[str, Any] | None:
            if self.index >= len(self.feeds):
                return None
            self.index += 1
            return self.feeds[self.index - 1]

    def build(out: Path) -> None:
        reader = Windows(_calibration_feeds(src, GPTQ_WINDOWS, GPTQ_CONTEXT, GPTQ_BATCH))
        # the group size, symmetry and accuracy level come from MatMulNBitsQuantizer's arguments;
        # the config's block_size is GPTQ's column batch (its default, 128), not the group size
        config = GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, percdamp=0.01, block_size=128,
                                           actorder=False, mse=False, perchannel=True)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=32, is_symmetric=True,
                                         accuracy_level=4, algo_config=config)
        quantizer.process()
        model = quantizer.model.model
        # the GPTQ path writes com.microsoft MatMulNBits nodes without importing that domain
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)

    return _cached(work / f"{src.stem}.ort-int4-gptq-b32-w{GPTQ_WINDOWS}.onnx", build, "ort-int4-gptq")


def _hf_folder(work: Path) -> Path:
    """SmolLM2 as a Hugging Face folder (float32 safetensors, config, tokenizer), written from
    the GGUF by transformers' save_pretrained; the model builder reads this offline."""

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        loaded = hf_models.load_smollm2_causal_lm()
        # transformers refuses to save a model loaded from GGUF (it keeps the GGUF quantizer
        # attached, though the weights are already dequantised): copy them into a plain model
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(out)
        hf_models.smollm2_tokenizer().save_pretrained(out)

    return _cached(work / "smollm2-hf", build, "hf folder")


def _genai(work: Path, precision: str) -> Path:
    folder = _hf_folder(work)

    def build(out: Path) -> None:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
                   "-p", precision, "-e", "cpu", "-c", str(work / "builder-cache")]
        if precision == "int4":
            command += ["--extra_options", "block_size=32", "accuracy_level=4"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        _log(" ".join(command))
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise SystemExit(f"bench_decode: the model builder failed ({precision}):\n{tail}")

    return _cached(work / f"genai-{precision}", build, f"genai-{precision}") / "model.onnx"


def _candidates(text: str | None) -> list[Variant]:
    out = []
    for entry in filter(None, (e.strip() for e in (text or "").split(","))):
        label, sep, path = entry.partition("=")
        if not sep:
            label, path = Path(entry).stem, entry
        p = Path(path)
        if not p.is_file():
            raise SystemExit(f"bench_decode: --candidates: {p} is not a file; give label=path.onnx")
        out.append(Variant(label, p, "given on the command line"))
    return out


def _variants(rows: list[str], fp32: Path | None, work: Path, candidates: list[Variant]) -> list[Variant]:
    reference = fp32 or _export("smollm2-kv-torchscript")
    builders: dict[str, Callable[[], Variant]] = {
        "fp32": lambda: Variant("fp32 export", reference, "TorchScript route, Hugging Face's layout" if fp32 is None else str(fp32)),
        "fp32-dynamo": lambda: Variant("fp32 export (dynamo)", _export("smollm2-kv"), "torch.onnx.export(dynamo=True)"),
        "ort-int8": lambda: Variant("ORT quantize_dynamic int8", _ort_int8(reference, work), "per-channel, MatMul only"),
        "ort-int4": lambda: Variant("ORT MatMulNBits int4 RTN", _ort_int4(reference, work), "symmetric, block 32, accuracy_level 4"),
        "ort-int4-hqq": lambda: Variant(
            "ORT MatMulNBits int4 HQQ", _ort_int4_hqq(reference, work),
            f"asymmetric, float zero points, block {HQQ_BLOCK} (block 32 would be lossless on these Q4_1 "
            "weights; K = 576 pads its last block)"),
        "ort-int4-gptq": lambda: Variant(
            "ORT MatMulNBits int4 GPTQ", _ort_int4_gptq(reference, work),
            f"symmetric, block 32, accuracy_level 4; {GPTQ_WINDOWS} windows of {GPTQ_CONTEXT} tokens of "
            "WikiText-2's first half, percdamp 0.01, no act-order, min-max scales; ORT's GPTQ ignores the "
            "Hessian (see the docstring)"),
        "genai-fp32": lambda: Variant("genai builder fp32", _genai(work, "fp32"), "onnxruntime-genai model builder"),
        "genai-int4": lambda: Variant("genai builder int4", _genai(work, "int4"), "onnxruntime-genai model builder, block 32, accuracy_level 4"),
    }
    return [builders[r]() for r in rows] + candidates


def _texts(protocol: Protocol) -> tuple[list[list[int]], Any]:
    tokenizer = hf_models.smollm2_tokenizer()
    text = evaluate.text_half(evaluate.read_text(WIKITEXT), "second")
    need = max(protocol.ppl_windows * protocol.ppl_context, protocol.prompts * protocol.prompt_length)
    ids = evaluate.tokenize_lines(lambda line: tokenizer(line, add_special_tokens=False)["input_ids"], text, need)
    windows = evaluate.token_windows(ids, protocol.ppl_context, protocol.ppl_windows)
    prompts = [ids[i * protocol.prompt_length:(i + 1) * protocol.prompt_length] for i in range(protocol.prompts)]
    return prompts, windows


def _agreement(reference: list[list[int]], tokens: list[list[int]]) -> str:
    same = sum(a == b for a, b in zip(reference, tokens, strict=True))
    diffs = [generate.first_difference(a, b) for a, b in zip(reference, tokens, strict=True) if a != b]
    text = f"{same}/{len(reference)}"
    return text + (f" (first diff at {', '.join(map(str, diffs))})" if diffs else "")


def run(protocol: Protocol, variants: list[Variant]) -> list[str]:
    prompts, windows = _texts(protocol)
    # timing first, while memory growth per session is measured on a fresh process
    _log(f"timing {len(variants)} models interleaved: {protocol.prompts} rounds of {protocol.new_tokens} tokens ...")
    timings = generate.time_side_by_side(
        [v.path for v in variants], None, protocol.new_tokens, prompts=prompts, names=[v.label for v in variants],
        runs=protocol.prompts, warmup=1, threads=protocol.threads, progress=_log,
    )
    gc.collect()
    ppl = []
    for v in variants:  # one session at a time for perplexity
        start = time.perf_counter()
        session = generate.open_session(v.path, threads=protocol.threads)
        ppl.append(evaluate.cache_perplexity(session, windows))
        del session
        gc.collect()
        _log(f"{v.label}: perplexity {ppl[-1]:.3f} ({time.perf_counter() - start:.0f} s)")
    base = timings[0]
    lines = [
        f"SmolLM2-135M-Instruct with a KV cache: greedy, {protocol.prompt_length}-token prompts from the second half of "
        f"WikiText-2, {protocol.new_tokens} new tokens, {protocol.prompts} interleaved rounds (one prompt each), "
        f"{protocol.threads} threads; decode = median ms per generated token over every step; perplexity = "
        f"{protocol.ppl_windows} windows of {protocol.ppl_context} of the second half, each prefilled from an empty cache.",
        "",
        "| variant | file MB | perplexity | vs fp32 | decode ms/token (p10-p90) | decode speedup | tokens/s | "
        "prefill ms | memory MB | greedy = fp32 | how |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, p, t in zip(variants, ppl, timings, strict=True):
        lines.append(
            f"| {v.label} | {_file_mb(v.path):.0f} | {p:.2f} | {100 * (p / ppl[0] - 1):+.1f}% | "
            f"{t.decode_ms:.1f} ({t.decode_p10_ms:.1f}-{t.decode_p90_ms:.1f}) | {base.decode_ms / t.decode_ms:.2f}x | "
            f"{t.tokens_per_s:.1f} | {t.prefill_ms:.1f} | {t.memory_mb:.0f} | "
            f"{_agreement(base.run_tokens, t.run_tokens)} | {v.how} |"
        )
    lines.append("")
    lines.append(f"peak RSS of the process: {generate.rss_mb()[1]:.0f} MB")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, to check the tool end to end")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {','.join(ROWS)}")
    parser.add_argument("--candidates", metavar="LABEL=PATH,...", help="more cache models (tforge outputs)")
    parser.add_argument("--fp32", type=Path, help="the fp32 reference (default: the TorchScript export in .cache/models)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"built variants (default {DEFAULT_WORK})")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default 2)")
    parser.add_argument("--prompts", type=int, default=None, help="rounds, one prompt each (default 5; quick 2)")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {','.join(ROWS)}")
    protocol = QUICK if args.quick else FULL
    if args.threads is not None:
        protocol = dataclasses.replace(protocol, threads=args.threads)
    if args.prompts is not None:
        protocol = dataclasses.replace(protocol, prompts=args.prompts)
    if not rows and not args.candidates:
        parser.error("nothing to measure: give --rows or --candidates")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        variants = _variants(rows, args.fp32, args.work, _candidates(args.candidates))
        lines = run(protocol, variants)
    except TforgeError as err:
        print(f"bench_decode: error: {err}", file=sys.stderr)
        return err.exit_code
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
