"""Large fuzzing budgets, run by hand; the test suite runs small ones.

    .venv/bin/python tools/fuzz.py mutate --cases 10000 [--compile] [--seed 1]
    .venv/bin/python tools/fuzz.py graphs --cases 300 [--heads-from 1] [--seed 1]

``mutate``: damaged serialized models (tests/fuzz/mutate.py) through the loader; any exception
that is not a tforge error is a crash. With ``--compile`` every model the loader accepts also
goes through ``canonicalize`` (an internal PassError counts as a crash: exit 70).
``graphs``: random transformer graphs (tests/fuzz/graphs.py); each case checks the block map,
one equivalence-preserving pipeline and one lossy pipeline (tests/fuzz/properties.py), cycling
through the pipelines. Prints a JSON summary (counts, distinct failures with a reproducer).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import random
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fuzz import properties  # noqa: E402
from tests.fuzz.graphs import TransformerSpec  # noqa: E402
from tests.fuzz.mutate import mutate, seeds  # noqa: E402
from tforge.compiler.pipeline import PassManager  # noqa: E402
from tforge.errors import PassError, TforgeError  # noqa: E402
from tforge.frontends.onnx import load_onnx  # noqa: E402


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    last = frames[-1] if frames else None
    return f"{Path(last.filename).name}:{last.lineno}" if last else "?"


def run_mutate(cases: int, seed: int, compile_: bool, keep: Path | None) -> dict:
    rng = random.Random(seed)
    counts: collections.Counter[str] = collections.Counter()
    crashes: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tforge-fuzz-") as tmp:
        models = seeds(Path(tmp))
        names = sorted(models)
        seed_bytes = {name: models[name].read_bytes() for name in names}
        for i in range(cases):
            name = rng.choice(names)
            data = mutate(seed_bytes[name], rng)
            path = models[name].parent / "fuzz.onnx"
            path.write_bytes(data)
            stage = "load"
            try:
                model = load_onnx(path)
                counts["loaded"] += 1
                if compile_:
                    stage = "compile"
                    PassManager.parse("canonicalize", progress=lambda _: None).run(model)
                    counts["compiled"] += 1
            except Exception as e:  # noqa: BLE001 - what the fuzzer looks for
                if isinstance(e, TforgeError) and not isinstance(e, PassError):
                    counts["refused" if stage == "load" else "refused by a pass"] += 1
                    continue
                # a PassError wraps a pass's own crash: report where the cause was raised
                cause = (e.__cause__ or e) if isinstance(e, PassError) else e
                key = f"{stage}: {type(cause).__name__} at {_where(cause)}"
                counts[f"crash ({stage})"] += 1
                crashes.setdefault(key, {"count": 0, "example": str(e)[:300], "case": i})[
                    "count"
                ] += 1
                if keep:
                    (keep / f"crash-{i}.onnx").write_bytes(data)
    return {
        "mode": "mutate",
        "cases": cases,
        "seed": seed,
        "counts": dict(counts),
        "crashes": crashes,
    }


def random_spec(rng: random.Random, heads_from: int) -> TransformerSpec:
    """The same distribution as the hypothesis strategy in tests/fuzz/graphs.py."""
    heads = rng.randint(heads_from, 4)
    post_norm = rng.random() < 0.5
    return TransformerSpec(
        heads=heads,
        kv_heads=rng.choice([k for k in range(1, heads + 1) if heads % k == 0]),
        head_dim=rng.choice([2, 4, 8]),
        intermediate=rng.choice([4, 8, 12, 16, 32]),
        layers=rng.randint(1, 2),
        seq=rng.randint(1, 6),
        norm="layer" if post_norm else rng.choice(["layer", "rms"]),
        activation=rng.choice(["gelu", "relu", "swiglu", "tanh-gelu"]),
        linear_bias=rng.random() < 0.5,
        norm_bias=rng.random() < 0.5,
        post_norm=post_norm,
        final_norm=rng.random() < 0.5,
    )


def run_graphs(cases: int, seed: int, heads_from: int) -> dict:
    rng = random.Random(seed)
    counts: collections.Counter[str] = collections.Counter()
    failures: dict[str, dict] = {}
    checks = [
        ("block-map", None, properties.check_block_map),
        *[("equivalent", p, properties.check_equivalent) for p in properties.EQUIVALENT],
        *[("valid", p, properties.check_valid) for p in properties.LOSSY],
    ]
    for i in range(cases):
        spec = random_spec(rng, heads_from)
        weights = rng.randrange(2**16)
        # every case: the block map, then one equivalence and one validity check, in rotation
        chosen = [
            checks[0],
            checks[1 + i % len(properties.EQUIVALENT)],
            checks[1 + len(properties.EQUIVALENT) + i % len(properties.LOSSY)],
        ]
        for kind, pipeline, check in chosen:
            args = (spec, weights) if pipeline is None else (spec, weights, pipeline)
            try:
                check(*args)
                counts[f"{kind}: ok"] += 1
            except Exception as e:  # noqa: BLE001 - recorded, with a reproducer
                counts[f"{kind}: failed"] += 1
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                key = f"{kind} {pipeline or ''}: {type(e).__name__}: {first[:80]}"
                entry = failures.setdefault(
                    key, {"count": 0, "message": first, "reproduce": repr(spec), "seed": weights}
                )
                entry["count"] += 1
    return {
        "mode": "graphs",
        "cases": cases,
        "seed": seed,
        "counts": dict(counts),
        "failures": failures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("mutate")
    m.add_argument("--cases", type=int, default=10_000)
    m.add_argument("--seed", type=int, default=1)
    m.add_argument("--compile", action="store_true", help="also run canonicalize on what loads")
    m.add_argument("--keep", type=Path, help="write crashing inputs into this folder")
    g = sub.add_parser("graphs")
    g.add_argument("--cases", type=int, default=300)
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--heads-from", type=int, default=2, help="1 includes single-head attention")
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    started = time.perf_counter()
    if args.mode == "mutate":
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
        summary = run_mutate(args.cases, args.seed, args.compile, args.keep)
    else:
        summary = run_graphs(args.cases, args.seed, args.heads_from)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
