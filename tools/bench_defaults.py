#!/usr/bin/env python3
"""What each pass gives with its defaults on the real MiniLM: the numbers tests/test_defaults.py's floors rest on.

    python tools/bench_defaults.py [--sentences 64] [--passes 'prune-ffn{ratio=0.25};svd{ratio=0.25}']

For each pass: ``canonicalize,calibrate,<pass>`` through ``tforge.compile`` with the command
line's data (WikiText-2 first half and MiniLM's tokenizer), as a user who knows no option would
run it; calibrate collects exactly the statistics the pass asks for. Prints the cosine of
mean-pooled sentence embeddings against the exported model on ``--sentences`` sentences of the
second half (mean and min), the pass's changed/skipped counts and the compile time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

import tforge  # noqa: E402
from tforge import evaluate  # noqa: E402
from tforge.compiler.calibration import CalibrationData  # noqa: E402
from tforge.frontends import hf_models  # noqa: E402
from tforge.runtime import ort as ort_runtime  # noqa: E402

DEFAULT_PASSES = (
    "ln-migrate;smoothquant;quantize;rptq;prune-ffn{ratio=0.25};prune-heads{ratio=0.25};"
    "svd{ratio=0.25};kronecker{ratio=0.1};linear-attention{layers=1}"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--passes", default=DEFAULT_PASSES, help="';'-separated pass specs")
    parser.add_argument("--out", type=Path, default=benchlib.ROOT / ".cache" / "models")
    args = parser.parse_args(argv)

    source = benchlib.exported(args.out, "minilm")
    tokenizer = hf_models.minilm_tokenizer()
    text = evaluate.text_half(evaluate.read_text(benchlib.WIKITEXT), "second")
    sentences = evaluate.sentences(text, args.sentences)
    reference_session = ort_runtime.create_session(tforge.load(source))
    reference = evaluate.sentence_embeddings(lambda f: reference_session.run(None, f)[0], tokenizer, sentences)
    data = CalibrationData(text=str(benchlib.WIKITEXT), tokenizer=str(hf_models.minilm_dir()))

    print(f"MiniLM, {args.sentences} sentences of the second half of WikiText-2; calibration from the first half")
    print("| pipeline | cosine mean | cosine min | pass stats | compile s |")
    print("|---|---|---|---|---|")
    for spec in [s.strip() for s in args.passes.split(";") if s.strip()]:
        start = time.perf_counter()
        result = tforge.compile(source, f"canonicalize,calibrate,{spec}", calibration=data)
        seconds = time.perf_counter() - start
        session = ort_runtime.create_session(result.model)
        got = evaluate.sentence_embeddings(lambda f, s=session: s.run(None, f)[0], tokenizer, sentences)
        agreement = evaluate.agreement(reference, got)
        stats = result.report.passes[-1].stats
        shown = ", ".join(f"{k}={v}" for k, v in sorted(stats.items()))
        print(f"| `canonicalize,calibrate,{spec}` | {agreement.mean:.4f} | {agreement.min:.4f} | {shown} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
