#!/usr/bin/env python
"""Export the real pretrained models on this machine to ONNX, once.

    python tools/export_models.py [--out DIR] [--models minilm,smollm2,smollm2-kv] [--force]

Writes DIR/<name>.onnx (default DIR: .cache/models under the repository), checks each against
PyTorch on a real sentence and prints the export time and error to stderr. The models:
minilm and smollm2 (one forward, no cache); smollm2-kv and smollm2-kv-torchscript (SmolLM2 with
a KV cache in Hugging Face's layout, through the dynamo exporter or the TorchScript one, checked
on a prefill with an empty cache and on one decode step fed the returned cache).
An export newer than this script and than the code that produces it is reused unless --force.
The logic lives in tforge.frontends.hf_models, so tests use the very same exports.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tforge.errors import TforgeError  # noqa: E402
from tforge.frontends import hf_models  # noqa: E402

EXPORTERS: dict[str, Callable[[Path], hf_models.ExportReport | hf_models.CacheExportReport]] = {
    "minilm": hf_models.export_minilm,
    "smollm2": hf_models.export_smollm2,
    "smollm2-kv": hf_models.export_smollm2_kv,
    "smollm2-kv-torchscript": hf_models.export_smollm2_kv_torchscript,
}
DEFAULT_MODELS = "minilm,smollm2"
DEFAULT_OUT = REPO / ".cache" / "models"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--models", default=DEFAULT_MODELS,
        help=f"comma-separated, from {','.join(EXPORTERS)} (default {DEFAULT_MODELS})",
    )
    parser.add_argument(
        "--force", action="store_true", help="re-export even if the output is up to date"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown or not names:
        parser.error(
            f"--models: unknown {unknown or 'empty list'}; choose from {','.join(EXPORTERS)}"
        )

    for name in names:
        out = args.out / f"{name}.onnx"
        if not args.force and hf_models.is_current(out, __file__):
            print(f"{name}: {out} is up to date (use --force to re-export)", file=sys.stderr)
            continue
        print(f"{name}: exporting to {out} ...", file=sys.stderr, flush=True)
        try:
            report = EXPORTERS[name](out)
        except TforgeError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
        if isinstance(report, hf_models.CacheExportReport):
            error = (
                f"max |ORT - torch| = {report.prefill_max_abs_diff:.3g} on a {report.tokens}-token "
                f"prefill, {report.decode_max_abs_diff:.3g} on the decode step after it"
            )
        else:
            error = f"max |ORT - torch| = {report.max_abs_diff:.3g} on a {report.tokens}-token sentence"
        size = sum(p.stat().st_size for p in out.parent.glob(f"{out.name}*"))
        print(f"{name}: wrote {out} ({size / 1e6:.0f} MB) in {report.seconds:.1f} s; {error}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
