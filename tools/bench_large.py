"""Compile a large model and record wall time and peak memory (total, anonymous, file-backed RSS).

    .venv/bin/python tools/make_large_model.py /tmp/big --gib 8
    .venv/bin/python tools/bench_large.py /tmp/big [--limit-data 4G] [--passes SPEC]

Runs ``tforge compile`` in a child process (optionally under RLIMIT_DATA, i.e. ``ulimit -d``) and samples
``/proc/<pid>/status`` every 0.1 s: VmHWM (peak RSS, as /usr/bin/time reports it), and the peaks
of RssAnon (memory the process itself holds: arrays, ORT buffers) and RssFile (pages of
memory-mapped weight files, which the kernel can drop and re-read). Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PASSES = "canonicalize,calibrate,ln-migrate,smoothquant,quantize"


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "VmSize", "VmData"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _bytes(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return (
        int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="written by tools/make_large_model.py")
    parser.add_argument("--passes", default=DEFAULT_PASSES)
    parser.add_argument(
        "--limit-data", help="RLIMIT_DATA (heap, anonymous and private writable mappings), e.g. 4G"
    )
    parser.add_argument(
        "--limit-as", help="RLIMIT_AS (address space: counts every mapping), e.g. 4G"
    )
    parser.add_argument("--samples", default="2", help="calibration samples")
    args = parser.parse_args()
    out = args.folder / "out" / "model.onnx"
    cmd = [
        sys.executable,
        "-m",
        "tforge.cli",
        "compile",
        str(args.folder / "model.onnx"),
        "--passes",
        args.passes,
        "--calib-npz",
        str(args.folder / "calib.npz"),
        "--calib-samples",
        args.samples,
        "-o",
        str(out),
    ]
    # setrlimit in the child, as `ulimit -d` / `ulimit -v` do (the prlimit binary crashes here)
    limits = {}
    if args.limit_data:
        limits[resource.RLIMIT_DATA] = _bytes(args.limit_data)
    if args.limit_as:
        limits[resource.RLIMIT_AS] = _bytes(args.limit_as)

    def apply_limits() -> None:
        for which, value in limits.items():
            resource.setrlimit(which, (value, value))

    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=apply_limits,  # noqa: PLW1509 - setrlimit only, before exec
    )
    peaks: dict[str, int] = {}
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    by_stage: dict[str, int] = {}
    while proc.poll() is None:
        status = _status(proc.pid)
        for key, value in status.items():
            peaks[key] = max(peaks.get(key, 0), value)
        # the stage is the last progress line: "[2/5] calibrate ...", "saved ...", ...
        stage = next(
            (ln.split("...")[0].strip() for ln in reversed(lines) if ln.rstrip().endswith("...")),
            "load",
        )
        if any("done in" in ln and stage.split("] ")[-1].split("{")[0] in ln for ln in lines[-1:]):
            stage += " (after)"
        by_stage[stage] = max(by_stage.get(stage, 0), status.get("RssAnon", 0))
        time.sleep(0.1)
    reader.join(timeout=5)
    seconds = time.perf_counter() - started
    weights = sum(p.stat().st_size for p in args.folder.glob("model.onnx*"))
    result = {
        "exit": proc.returncode,
        "seconds": round(seconds, 1),
        "weights_gib": round(weights / 2**30, 2),
        "limits": {("data" if k == resource.RLIMIT_DATA else "as"): v for k, v in limits.items()},
        **{f"peak_{k}_gib": round(v / 2**30, 2) for k, v in sorted(peaks.items())},
        "peak_RssAnon_gib_by_stage": {k: round(v / 2**30, 2) for k, v in by_stage.items()},
        "passes": [line.strip() for line in lines if "done in" in line],
        "last_lines": [line.rstrip() for line in lines[-3:]],
    }
    print(json.dumps(result, indent=2))
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
