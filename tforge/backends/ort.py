"""ONNX Runtime as a target: time sessions side by side and see which kernels ran.

``kernels_run`` reads ORT's profiler because only it says which kernel ORT actually ran (an int8
graph that ORT silently runs in float is the failure it exists to catch). Sessions, feeds and
saving live in the runtime layer (``tforge.runtime.ort``, ``tforge.runtime.save``), which every
layer may use; this module is for what only a deployment target needs.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from tforge.runtime.ort import create_session, prepare_feeds, run

__all__ = ["Timing", "kernels_run", "time_session", "time_side_by_side"]


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock latency of one session over ``runs`` timed runs, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> Timing:
        p10, median, p90 = np.percentile(np.asarray(samples_ms, dtype=np.float64), [10, 50, 90])
        return cls(float(median), float(p10), float(p90), len(samples_ms))


def time_session(
    session: ort.InferenceSession, feeds: Mapping[str, object], *, warmup: int = 3, runs: int = 20
) -> Timing:
    """Latency of one session (after ``warmup`` untimed runs)."""
    return time_side_by_side([session], feeds, warmup=warmup, runs=runs)[0]


def time_side_by_side(
    sessions: Sequence[ort.InferenceSession],
    feeds: Mapping[str, object],
    *,
    warmup: int = 3,
    runs: int = 20,
) -> list[Timing]:
    """Time several sessions round robin, so load on the machine hits all of them alike.

    The starting session rotates every round so that none always runs first (after an idle
    gap, with cold caches).
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"time: need runs >= 1 and warmup >= 0, got runs={runs} warmup={warmup}")
    prepared = [prepare_feeds(s, feeds) for s in sessions]
    for _ in range(warmup):
        for session, session_feeds in zip(sessions, prepared, strict=True):
            session.run(None, session_feeds)
    samples: list[list[float]] = [[] for _ in sessions]
    for round_ in range(runs):
        for offset in range(len(sessions)):
            i = (round_ + offset) % len(sessions)
            start = time.perf_counter()
            sessions[i].run(None, prepared[i])
            samples[i].append((time.perf_counter() - start) * 1e3)
    return [Timing.from_samples(s) for s in samples]


def kernels_run(
    model_or_path: ir.Model | str | os.PathLike,
    feeds: Mapping[str, object],
    *,
    optimize: bool = True,
) -> collections.Counter[tuple[str, str]]:
    """Count ``(op_type, execution provider)`` of the kernels ORT ran in one inference.

    Read from ORT's profiler, which records what ran after ORT's own fusions: the only proof
    that a quantized graph really used int8 kernels.
    """
    with tempfile.TemporaryDirectory(prefix="tforge-profile-") as folder:
        session = create_session(
            model_or_path, optimize=optimize, profile_prefix=os.path.join(folder, "ort")
        )
        run(session, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    if isinstance(events, dict):  # chrome trace object form
        events = events.get("traceEvents", [])
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or name.endswith(("_fence_before", "_fence_after")):
            continue
        args = event.get("args", {})
        if "op_name" in args:
            counts[(args["op_name"], args.get("provider", "?"))] += 1
    return counts
