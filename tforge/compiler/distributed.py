"""Calibration statistics computed in shards on a Ray cluster, merged exactly.

:func:`calibrate_sharded` cuts the calibration feeds into shards of ``shard_size`` samples (the
boundaries depend on the data only, never on the number of workers), runs
:func:`~tforge.compiler.calibration.calibrate_model` on each shard in a Ray task (one ONNX
Runtime session of the model per task, piecewise for models over the memory limit as in one
process) and merges the partial statistics in shard order (:meth:`ChannelStats.merge`): min,
max, abs-max, counts and histograms come out exactly as in one process, sums, sums of squares
and Gram matrices to float rounding. The result is the same for 1, 2 or 40 workers, and the same
whatever order the shards finish in. The model travels once (Ray's object store, or a saved copy
in a folder the workers share for models too large for one message).

:func:`calibrate` is what passes call: it runs in this process, or in shards when workers or a
cluster address are given (by the pass's options or the pipeline's ``CalibrationData``, see
:func:`pipeline_cluster`), so every pass that gathers statistics places its runs the same way.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from tforge.compiler.calibration import DATA_KEY, CalibrationStats, Feed, calibrate_model
from tforge.runtime import cluster, spill

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "calibrate",
    "calibrate_shard",
    "calibration_job",
    "calibrate_sharded",
    "merge_stats",
    "model_payload",
    "payload_model",
    "pipeline_cluster",
]

#: samples per shard: small enough to spread 64 samples over several workers, large enough that
#: one session per task is cheap next to its runs
DEFAULT_SHARD_SIZE = 8


def pipeline_cluster(model: ir.Model) -> tuple[int, str]:
    """The pipeline's Ray workers and cluster address (``--workers``/``--cluster``); ``(0, "")``: none."""
    data = model.meta.get(DATA_KEY)
    if data is None:
        return 0, ""
    return data.workers or 0, data.cluster or ""


def calibrate(
    model: ir.Model,
    feeds: Iterable[Feed],
    *,
    workers: int = 0,
    address: str = "",
    values: Sequence[str] | None = None,
    gram: bool | Collection[str] = False,
    progress: Callable[[str], None] | None = None,
) -> CalibrationStats:
    """:func:`calibrate_model` in this process, or :func:`calibrate_sharded` when ``workers`` or
    ``address`` is given (one worker when only an address is): the statistics are the same."""
    if workers or address:
        return calibrate_sharded(
            model, feeds, workers=workers or 1, address=address or None, values=values, gram=gram, progress=progress
        )
    return calibrate_model(model, feeds, values, gram=gram, progress=progress)


def model_payload(model: ir.Model, shared_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What a worker needs to rebuild ``model``: its serialised bytes, or a path to a saved copy.

    Models over protobuf's limit or spilled to disk are saved with external data into
    ``shared_dir`` (a folder every worker can read; a temporary folder on a local cluster).
    """
    from tforge.runtime import save

    large = spill.initializer_bytes(model) > save.PROTO_WEIGHT_LIMIT or bool(model.meta.get(spill.SPILL_KEY))
    if not large:
        with save.inlined_external_tensors(model):
            return {"bytes": ir.to_proto(model).SerializeToString()}
    folder = Path(shared_dir) if shared_dir is not None else Path(tempfile.mkdtemp(prefix="tforge-cluster-"))
    path = save.save_model(model, folder / "model.onnx", external_data=True)
    return {"path": str(path)}


def payload_model(payload: dict[str, Any]) -> ir.Model:
    """The model a worker rebuilds from :func:`model_payload`."""
    import onnx

    if "bytes" in payload:
        return ir.from_proto(onnx.load_from_string(payload["bytes"]))
    from tforge.frontends.onnx import load_onnx

    return load_onnx(payload["path"])


def calibrate_sharded(
    model: ir.Model,
    feeds: Iterable[Feed],
    *,
    workers: int,
    address: str | None = None,
    values: Sequence[str] | None = None,
    gram: bool | Collection[str] = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    optimize: bool = True,
    progress: Callable[[str], None] | None = None,
) -> CalibrationStats:
    """:func:`calibrate_model` over shards of ``feeds`` on ``workers`` Ray workers (see the module)."""
    samples = list(feeds)  # token ids: small next to the activations each task reduces
    shards = cluster.shards_of(samples, shard_size)
    if not shards:
        return calibrate_model(model, [], values=values, gram=gram, optimize=optimize)
    job = calibration_job(model, values=values, gram=gram, optimize=optimize)
    logger.info("calibration: %d samples in %d shards on %d workers", len(samples), len(shards), workers)
    with cluster.cluster(workers, address):
        parts = cluster.map_shards(calibrate_shard, job, shards, progress=progress, what="calibration shard")
    return merge_stats(parts)


def calibration_job(
    model: ir.Model,
    *,
    values: Sequence[str] | None = None,
    gram: bool | Collection[str] = False,
    optimize: bool = True,
) -> dict[str, Any]:
    """What every calibration task receives (once, through the object store)."""
    return {
        "model": model_payload(model),
        "values": list(values) if values is not None else None,
        "gram": gram if isinstance(gram, bool) else sorted(gram),
        "optimize": optimize,
    }


def merge_stats(parts: Sequence[CalibrationStats]) -> CalibrationStats:
    """The statistics of all shards, merged in the order given (the shards' order)."""
    merged = copy.deepcopy(parts[0])  # writable: arrays from Ray's object store are read-only
    for part in parts[1:]:
        for name, st in part.stats.items():
            merged.stats[name].merge(st)
        merged.samples += part.samples
    return merged


def calibrate_shard(job: dict[str, Any], shard: list[Feed], index: int) -> CalibrationStats:
    """One Ray task: the partial statistics of one shard (runs in a worker process)."""
    del index
    model = payload_model(job["model"])
    spill.enable_if_large(model, spill.initializer_bytes(model))
    return calibrate_model(
        model, shard, values=job["values"], gram=job["gram"], optimize=job["optimize"], progress=lambda _: None
    )
