"""``tforge compile | inspect | passes | bench | generate``.

Exit codes: 0 success; 1 user error (one line on stderr, traceback with -v); 2 usage;
70 internal error (also writes ``tforge-crash.json`` with the pipeline and traceback).
Requested output goes to stdout; logs and progress go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tforge.errors import (
    EXIT_INTERNAL,
    EXIT_OK,
    PassConfigError,
    TforgeError,
    UnsupportedModelError,
)
from tforge.presets import PRESETS, preset_pipeline

logger = logging.getLogger("tforge")

_EPILOG = """examples:
  tforge compile model.onnx --passes canonicalize -o model.canon.onnx --report report.json
  tforge compile model.onnx --passes canonicalize --input-shape input_ids=8x128 --dump-dir build/ir
  tforge compile model.onnx --preset w8a8 --calib-text text.txt --tokenizer TOKENIZER_DIR -o model.int8.onnx
  tforge inspect model.onnx --json
  tforge bench model.onnx model.canon.onnx --input-shape input_ids=1x128
  tforge bench --generate kv.onnx kv.int8.onnx --prompt-length 128 --new-tokens 64 --threads 2
  tforge generate kv.onnx --tokenizer model.gguf --prompt "The history of" --max-new-tokens 32
  tforge passes
"""


def _input_shape(text: str) -> tuple[str, str]:
    name, sep, shape = text.partition("=")
    if not sep or not name or not shape:
        raise argparse.ArgumentTypeError(f"expected NAME=DIMS like input_ids=8x128, got {text!r}")
    return name, shape


def _numerics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in ("atol", "min-cosine"):
            raise argparse.ArgumentTypeError(f"expected atol=X and/or min-cosine=Y, got {part!r}")
        try:
            out[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key} must be a number, got {value!r}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tforge",
        description="A compression compiler for exported transformer models (ONNX in, ONNX Runtime out).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging; -v shows tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress or summary on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser("compile", help="run a pass pipeline on a model and save the result")
    c.add_argument("input", help="an .onnx file (with its external data beside it) or a .pt2 ExportedProgram")
    pipeline = c.add_mutually_exclusive_group(required=True)
    pipeline.add_argument("--passes", metavar="SPEC", help="e.g. 'canonicalize,smoothquant{alpha=0.5}'")
    pipeline.add_argument("--preset", choices=sorted(PRESETS), help="a recommended pipeline (see tforge/presets.py): "
                          "w8a8: int8 weights and activations; w4a8: 4-bit GPTQ weights, int8 activations; both "
                          "need --calib-text and --tokenizer, except w8a8 on a KV-cache decoder (8-bit MatMulNBits)")
    c.add_argument("-o", "--output", help="where to write the compiled .onnx (atomically); omit for a dry run")
    c.add_argument("--report", metavar="FILE", help="write the pass report as JSON")
    c.add_argument("--input-shape", action="append", type=_input_shape, default=[], metavar="NAME=DIMS",
                   help="fix an input's shape for canonicalize, e.g. input_ids=8x128 (repeatable)")
    c.add_argument("--calib-text", metavar="FILE", help="calibrate on the first half of this text file (needs --tokenizer)")
    c.add_argument("--tokenizer", metavar="PATH", help="tokenizer for --calib-text: a folder with tokenizer.json or a .gguf file")
    c.add_argument("--calib-npz", metavar="FILE", help="calibrate on the arrays of this .npz (named after the inputs)")
    c.add_argument("--calib-samples", type=int, metavar="N", help="number of calibration samples (default: calibrate's)")
    c.add_argument("--workers", type=int, metavar="N",
                   help="calibrate (and sequential GPTQ rounds) in shards on N Ray workers (a local cluster unless --cluster; needs tforge[ray])")
    c.add_argument("--cluster", metavar="ADDRESS", help="calibrate on a running Ray cluster, e.g. ray://HOST:10001")
    c.add_argument("--verify-each", action="store_true", help="verify the graph structure after every pass")
    c.add_argument("--check-numerics", nargs="?", const="", type=_numerics, metavar="atol=X,min-cosine=Y",
                   help="compare outputs with the input model on generated inputs; fail beyond the limits")
    c.add_argument("--print-ir-after", action="append", default=[], metavar="PASS", help="print the IR after PASS")
    c.add_argument("--print-ir-after-change", action="store_true", help="print the IR after every pass that changed it")
    c.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass")
    c.add_argument("--dump-dir", metavar="DIR", help="write DIR/NNN-<pass>.ir after every pass")
    c.add_argument("--pass-statistics", action="store_true", help="print each pass's statistics to stdout")
    c.add_argument("--explain", action="store_true",
                   help="print every site each pass skipped, with the node and the reason, to stdout")
    c.add_argument("--strict", action="store_true",
                   help="fail when no transformer blocks (or an unrecognised part) are found, instead of skipping")
    c.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto",
                   help="store weights in OUTPUT.data (auto: only above 2 GB)")
    c.add_argument("--backend", choices=("ort", "tvm"), default="ort",
                   help="ort: write an .onnx; tvm: build for this CPU with TVM and write an artifact folder "
                        "(needs --input-shape for every input, or --buckets); compared with ORT on every build")
    c.add_argument("--buckets", type=lambda t: [int(x) for x in t.split(",")], metavar="LENGTHS",
                   help="tvm: sequence-length buckets, e.g. 64,128 (one executable each; other dynamic dims 1)")
    c.add_argument("--tune-trials", type=int, default=0, metavar="N",
                   help="tvm: MetaSchedule trials (0: tforge's schedule rules only; a cached database is reused)")
    c.add_argument("--tvm-cache", metavar="DIR", help="tvm: tuning database folder (default ~/.cache/tforge/tvm-tuning)")

    i = sub.add_parser("inspect", help="show a model's transformer blocks (the block map)")
    i.add_argument("input")
    i.add_argument("--json", action="store_true", help="print the block map as JSON")
    i.add_argument("--ir", action="store_true", help="print the IR as text")
    i.add_argument("--tensors", choices=("digest", "shape"), default="digest", help="how --ir prints tensors")
    i.add_argument("--raw", action="store_true", help="do not canonicalize (in memory) before inspecting")

    sub.add_parser("passes", help="list the available passes and their options")

    b = sub.add_parser("bench", help="time models side by side in ONNX Runtime (ratios to the first)")
    b.add_argument("inputs", nargs="+", metavar="MODEL")
    b.add_argument("--input-shape", action="append", type=_input_shape, default=[], metavar="NAME=DIMS",
                   help="shape of a generated input, e.g. input_ids=1x128 (default: batch 2, other dims 16)")
    b.add_argument("--generate", action="store_true",
                   help="KV-cache models: time greedy generation (prefill, decode ms/token, tokens/s, memory) "
                        "and compare the tokens with the first model's")
    b.add_argument("--prompt-length", type=int, default=128, metavar="N",
                   help="--generate: prompt tokens (random ids, or the start of --prompt-text's second half)")
    b.add_argument("--new-tokens", type=int, default=64, metavar="N", help="--generate: tokens generated per run")
    b.add_argument("--tokenizer", metavar="PATH",
                   help="--generate: tokenizer (folder with tokenizer.json, or .gguf) for a text prompt")
    b.add_argument("--prompt-text", metavar="FILE",
                   help="--generate: the prompt is the first --prompt-length tokens of this file's second half "
                        "(needs --tokenizer; default with --tokenizer: the WikiText-2 test split tforge ships)")
    b.add_argument("--runs", type=int, default=None, help="timed runs (default 20; with --generate 3 generations)")
    b.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 3; with --generate 1)")
    b.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's choice)")
    b.add_argument("--json", action="store_true")

    g = sub.add_parser("generate", help="generate text greedily with a KV-cache model")
    g.add_argument("input", metavar="MODEL", help="an .onnx decoder with past/present KV-cache tensors")
    g.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="a folder with tokenizer.json, a tokenizer.json file, or a .gguf file")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    g.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's choice)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
        return int(e.code or 0)
    _configure_logging(args.verbose, args.quiet)
    previous = _handle_sigterm()
    try:
        return _COMMANDS[args.command](args)
    except _Terminated:
        # raised inside the compile, so every `finally` (staging folders of save_model) ran
        print("tforge: terminated (SIGTERM); no output was written", file=sys.stderr)
        return 143
    except TforgeError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"tforge: error: {e}", file=sys.stderr)
        if e.exit_code == EXIT_INTERNAL:
            _write_crash_report(args, e)
        return e.exit_code
    except KeyboardInterrupt:
        print("tforge: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in tforge
        traceback.print_exc()
        print(f"tforge: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        _write_crash_report(args, e)
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that cleanup runs as for Ctrl-C (KeyboardInterrupt)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _handle_sigterm() -> Any:
    """Route SIGTERM through ``_Terminated``; returns the previous handler (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (main() may run many times
    in one process, e.g. under test capture, and a handler bound to an old stream would fail)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(verbose: int, quiet: bool) -> None:
    """Progress and logs of tforge on stderr; third-party libraries only from -vv on."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    # The command line owns its verbosity: a level set on tforge's logger by code that ran
    # before main() (an embedding program, a test) must not hide the progress it asked for.
    logging.getLogger("tforge").setLevel(logging.NOTSET)
    for noisy in ("onnxscript", "onnx_ir", "torch", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)


def _write_crash_report(args: argparse.Namespace, error: BaseException) -> None:
    report = {
        "command": args.command,
        "argv": sys.argv,
        "pipeline": getattr(args, "passes", None),
        "input": getattr(args, "input", None),
        "error": f"{type(error).__name__}: {error}",
        "traceback": traceback.format_exception(error),
        "replay": (
            f"tforge compile {args.input} --passes '{args.passes}'" if args.command == "compile" else None
        ),
    }
    path = Path("tforge-crash.json")
    try:
        _write_text_atomic(path, json.dumps(report, indent=2))
        print(f"tforge: crash report written to {path}; please attach it to a bug report", file=sys.stderr)
    except OSError:
        pass


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        # mkstemp creates the file 0600; give the report the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _drop_unread_calibration(args: argparse.Namespace) -> None:
    """A preset whose pipeline for this model reads no data ignores the calibration flags (with a
    note) instead of failing: the same command line serves models with and without a cache."""
    given = [flag for flag, value in (("--calib-text", args.calib_text), ("--tokenizer", args.tokenizer),
                                      ("--calib-npz", args.calib_npz), ("--calib-samples", args.calib_samples),
                                      ("--workers", args.workers), ("--cluster", args.cluster))
             if value is not None]  # fmt: skip
    if given:
        logger.info("preset %s reads no calibration data on this model: %s not used", args.preset, ", ".join(given))
    args.calib_text = args.tokenizer = args.calib_npz = args.calib_samples = args.workers = args.cluster = None


def _cmd_compile(args: argparse.Namespace) -> int:
    import tforge
    from tforge.compiler.pipeline import NumericsCheck

    numerics = None
    if args.check_numerics is not None:
        numerics = NumericsCheck(
            atol=args.check_numerics.get("atol"), min_cosine=args.check_numerics.get("min-cosine")
        )
    if args.passes is not None:
        # Parse the pipeline and check the output before loading: a typo should not cost a model load.
        tforge.PassManager.parse(args.passes)
    if args.output is not None and Path(args.output).resolve() == Path(args.input).resolve():
        raise UnsupportedModelError(
            f"{args.output}: the output would overwrite the input model; choose another output path"
        )
    if args.output is None:
        logger.info("no -o/--output given: dry run, nothing will be written")
    model = tforge.load(args.input)
    from tforge.compiler.pipeline import PassManager

    if args.preset is not None:  # a preset's pipeline can depend on the model (a KV cache)
        args.passes = preset_pipeline(args.preset, model)
        logger.info("preset %s: %s", args.preset, args.passes)
        from tforge.api import reads_data

        if not reads_data(PassManager.parse(args.passes).passes):
            _drop_unread_calibration(args)
    data = None
    if any(v is not None for v in (args.calib_text, args.tokenizer, args.calib_npz, args.workers, args.cluster)):
        from tforge.compiler.calibration import CalibrationData

        data = CalibrationData(
            text=args.calib_text, tokenizer=args.tokenizer, npz=args.calib_npz, samples=args.calib_samples,
            workers=args.workers, cluster=args.cluster,
        )  # fmt: skip
    pm = PassManager.parse(
        args.passes,
        calibration=data,
        verify_each=args.verify_each,
        dump_dir=args.dump_dir,
        print_ir_after=args.print_ir_after,
        print_ir_after_change=args.print_ir_after_change,
        print_ir_after_all=args.print_ir_after_all,
        check_numerics=numerics,
        strict=args.strict,
    )
    if args.input_shape:
        from tforge.api import _with_input_shapes

        pm.passes = _with_input_shapes(pm.passes, dict(args.input_shape))
    calibration = {"text": args.calib_text, "tokenizer": args.tokenizer, "npz": args.calib_npz,
                   "samples": args.calib_samples}
    if any(v is not None for v in calibration.values()):
        from tforge.api import _with_calibration

        pm.passes = _with_calibration(pm.passes, **calibration)
    report = pm.run(model)
    if args.backend == "tvm":
        _build_tvm(args, model)
    elif args.output is not None:
        from tforge.runtime.save import save_model

        external = {"auto": None, "yes": True, "no": False}[args.external_data]
        save_model(model, args.output, external_data=external)  # logs where it wrote
    if args.report:
        _write_text_atomic(Path(args.report), report.to_json() + "\n")
    if not args.quiet:
        print(report.summary(), file=sys.stderr)
    if args.pass_statistics:
        for record in report.passes:
            print(f"{record.spec}:")
            for key, value in sorted(record.stats.items()):
                print(f"  {value:>8}  {key}")
    if args.explain:
        print(report.explain())
    return EXIT_OK


def _build_tvm(args: argparse.Namespace, model: Any) -> None:
    """``--backend tvm``: build (checking numerics against ORT) and write the artifact folder."""
    from tforge.api import symbol_values
    from tforge.backends import tvm as tvm_backend
    from tforge.passes.canonicalize import parse_shape

    shapes = {name: parse_shape(text) for name, text in args.input_shape} if not args.buckets else None
    if args.buckets:
        symbol_values(model, dict(args.input_shape))  # validates names; bucketed builds use defaults
    artifact = tvm_backend.build(
        model, shapes=shapes, buckets=args.buckets, tune_trials=args.tune_trials, cache_dir=args.tvm_cache,
        progress=lambda message: logger.info("%s", message),
    )
    if args.output is not None:
        artifact.save(args.output)


def _cmd_inspect(args: argparse.Namespace) -> int:
    import tforge
    from tforge.compiler import printer, structure
    from tforge.compiler.pass_infra import Property, model_properties
    from tforge.compiler.pipeline import PassManager

    model = tforge.load(args.input)
    if not args.raw and Property.CANONICAL not in model_properties(model):
        PassManager.parse("canonicalize", progress=lambda _: None).run(model)
    if args.ir:
        print(printer.print_ir(model, tensors=args.tensors))
        return EXIT_OK
    block_map = structure.block_map(model)
    info: dict[str, Any] = {
        "model": str(args.input),
        "inputs": {v.name: str(v.shape) for v in model.graph.inputs},
        "outputs": {v.name: str(v.shape) for v in model.graph.outputs},
        "nodes": len(model.graph),
        "parameters": int(sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)),
        **block_map.describe(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(_format_inspect(info))
    return EXIT_OK


def _format_inspect(info: dict[str, Any]) -> str:
    lines = [
        f"{info['model']}: {info['nodes']} nodes, {info['parameters']:,} parameters",
        f"  inputs:  {', '.join(f'{k} {v}' for k, v in info['inputs'].items())}",
        f"  outputs: {', '.join(f'{k} {v}' for k, v in info['outputs'].items())}",
        f"  {info['num_blocks']} transformer blocks",
    ]
    for b in info["blocks"]:
        a, f = b["attention"], b["ffn"]
        parts = [f"  [{b['index']:>2}] {b.get('norm_placement') or ('pre' if b['pre_norm'] else 'post')}-norm"]
        norm = b["attention_norm"] or b["ffn_norm"] or b.get("attention_post_norm") or b.get("ffn_post_norm")
        if norm:
            parts.append(f"{norm['kind']}norm")
        if a:
            kind = "fused-qkv " if a["fused_qkv"] else ""
            parts.append(
                f"attention {kind}heads={a['num_heads']} kv_heads={a['num_kv_heads']} head_dim={a['head_dim']}"
                f"{' causal' if a['causal'] else ''}"
                f"{' window=' + str(a['sliding_window']) if a.get('sliding_window') else ''}{' rotary' if a['rotary'] else ''}"
                f"{' qk-norm(' + a['qk_norm'] + ')' if a.get('qk_norm') else ''}"
            )
        if f:
            parts.append(f"ffn {'gated ' if f['gated'] else ''}{f['activation']} intermediate={f['intermediate_size']}")
        lines.append("  ".join(parts))
    if info["other_linears"]:
        lines.append(f"  linears outside blocks: {', '.join(info['other_linears'])}")
    for message in info["unrecognized"]:
        lines.append(f"  unrecognized: {message}")
    return "\n".join(lines)


def _cmd_passes(args: argparse.Namespace) -> int:
    from tforge.compiler import registry

    for name, cls in registry.all_passes().items():
        print(f"{name}: {cls.summary}")
        req = ", ".join(sorted(str(p) for p in cls.requires))
        est = ", ".join(sorted(str(p) for p in cls.establishes))
        if req or est:
            print(f"    requires: {req or '-'}; establishes: {est or '-'}")
        for key, tp, default in registry.option_fields(cls):
            print(f"    {key}={registry.describe_type(tp)}  (default: {default!r})")
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    import tforge
    from tforge.api import symbol_values

    if args.generate:
        return _bench_generate(args)
    if args.tokenizer or args.prompt_text:
        raise PassConfigError("bench: --tokenizer and --prompt-text are for --generate; add --generate")
    args.runs = 20 if args.runs is None else args.runs
    args.warmup = 3 if args.warmup is None else args.warmup
    if args.runs < 1 or args.warmup < 0:
        raise PassConfigError("bench: --runs must be >= 1 and --warmup >= 0")
    models = [tforge.load(path) for path in args.inputs]
    dims = symbol_values(models[0], dict(args.input_shape)) if args.input_shape else {}
    results = tforge.bench(models, names=args.inputs, dims=dims, runs=args.runs, warmup=args.warmup, threads=args.threads)
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
        return EXIT_OK
    width = max(len(r.model) for r in results)
    print(f"{'model':<{width}}  {'median ms':>10}  {'p10':>8}  {'p90':>8}  {'ratio':>6}")
    for r in results:
        print(f"{r.model:<{width}}  {r.median_ms:10.3f}  {r.p10_ms:8.3f}  {r.p90_ms:8.3f}  {r.ratio:6.3f}")
    return EXIT_OK


def _bench_generate(args: argparse.Namespace) -> int:
    import tforge

    if args.input_shape:
        raise PassConfigError("bench --generate: the shapes come from --prompt-length; drop --input-shape")
    runs = 3 if args.runs is None else args.runs
    warmup = 1 if args.warmup is None else args.warmup
    if runs < 1 or warmup < 0 or args.new_tokens < 1 or args.prompt_length < 1:
        raise PassConfigError("bench --generate: need --runs >= 1, --warmup >= 0, --new-tokens >= 1, --prompt-length >= 1")
    prompt = None
    if args.prompt_text and not args.tokenizer:
        raise PassConfigError("bench --generate: --prompt-text needs --tokenizer to turn it into tokens")
    if args.tokenizer:
        prompt = _text_prompt(args.tokenizer, args.prompt_text, args.prompt_length)
    results = tforge.bench_generate(
        args.inputs, names=args.inputs, prompt=prompt, prompt_length=args.prompt_length,
        new_tokens=args.new_tokens, runs=runs, warmup=warmup, threads=args.threads,
    )
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
        return EXIT_OK
    width = max(len(r.model) for r in results)
    print(f"{'model':<{width}}  {'prefill ms':>10}  {'decode ms/tok':>13}  {'p10-p90':>13}  {'tok/s':>7}  "
          f"{'ratio':>6}  {'memory MB':>9}  tokens vs first")
    for r in results:
        same = "same" if r.same_tokens else f"differ from position {r.first_difference}"
        print(f"{r.model:<{width}}  {r.prefill_ms:10.2f}  {r.decode_ms:13.2f}  "
              f"{f'{r.decode_p10_ms:.2f}-{r.decode_p90_ms:.2f}':>13}  {r.tokens_per_s:7.1f}  {r.ratio:6.3f}  "
              f"{r.memory_mb:9.0f}  {same}")
    first = results[0]
    print(f"prompt {first.prompt_tokens} tokens, {first.new_tokens} new tokens, {first.runs} interleaved runs; "
          f"decode = median over every step; peak RSS of the process {first.peak_rss_mb:.0f} MB")
    return EXIT_OK


def _text_prompt(tokenizer: str, text_path: str | None, length: int) -> list[int]:
    """The first ``length`` tokens of the second half of a text (default: WikiText-2's test split)."""
    from tforge import evaluate
    from tforge.data import WIKITEXT
    from tforge.runtime import generate as gen

    tok = gen.load_text_tokenizer(tokenizer)
    text = evaluate.text_half(evaluate.read_text(text_path or WIKITEXT), "second")
    ids = evaluate.tokenize_lines(tok.encode, text, length)
    if len(ids) < length:
        raise PassConfigError(f"bench --generate: {text_path or WIKITEXT} gives only {len(ids)} tokens, {length} asked")
    return ids[:length]


def _cmd_generate(args: argparse.Namespace) -> int:
    import tforge

    if args.max_new_tokens < 1:
        raise PassConfigError(f"generate: --max-new-tokens must be >= 1, got {args.max_new_tokens}")
    result = tforge.generate_text(
        args.input, args.prompt, tokenizer=args.tokenizer, max_new_tokens=args.max_new_tokens,
        stop_at_eos=not args.ignore_eos, threads=args.threads,
    )
    print(result.text)
    logger.info(
        "%d prompt tokens, %d new tokens (stopped at %s); prefill %.1f ms, decode %.2f ms/token",
        len(result.prompt_tokens), len(result.tokens), "end of text" if result.stopped == "eos" else "the limit",
        result.prefill_ms, result.decode_ms_per_token,
    )
    return EXIT_OK


_COMMANDS = {
    "compile": _cmd_compile,
    "inspect": _cmd_inspect,
    "passes": _cmd_passes,
    "bench": _cmd_bench,
    "generate": _cmd_generate,
}


if __name__ == "__main__":
    sys.exit(main())
