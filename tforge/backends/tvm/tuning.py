"""Optional MetaSchedule tuning, paid once: a trial budget, an in-process builder, a database on disk.

The database lives under ``<cache>/<key>/`` where the key hashes the TVM and tvm-ffi versions,
the target, tforge's pipeline version and the legalized model (records are keyed on the exact
TIR, so a changed lowering must not look up an old database and silently miss every record).
A build applies the database first (``MetaScheduleApplyDatabase``) and tforge's own rules
schedule every kernel it misses (``compile.lower``).

The builder compiles candidates in this process: MetaSchedule's default ``LocalBuilder`` starts
worker processes that each re-import ``tvm.s_tir.tensor_intrin`` (25-50 s here), which makes
small budgets time out. The runner is MetaSchedule's local runner.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

logger = logging.getLogger(__name__)

__all__ = ["database_dir", "default_cache_dir", "has_database", "tune"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("TFORGE_CACHE", Path.home() / ".cache" / "tforge")) / "tvm-tuning"


def database_dir(cache_dir: str | os.PathLike | None, target: Any, proto: onnx.ModelProto) -> Path:
    from . import compile as tc

    tvm = tc.import_tvm()
    from . import _ffi_version

    digest = hashlib.sha256()
    for part in (tvm.__version__, _ffi_version(), str(target), tc.PIPELINE_VERSION):
        digest.update(part.encode() + b"\0")
    digest.update(proto.SerializeToString(deterministic=True))
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return (
        folder
        / f"tvm{tvm.__version__}-ffi{_ffi_version()}-p{tc.PIPELINE_VERSION}-{digest.hexdigest()[:16]}"
    )


def has_database(folder: Path) -> bool:
    return (folder / "database_tuning_record.json").is_file() and (
        folder / "database_workload.json"
    ).is_file()


def _in_process_builder() -> Any:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            import tvm
            from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

            results = []
            for item in build_inputs:
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(item.mod)
                    lib = tvm.compile(mod, target=item.target)
                    path = os.path.join(tempfile.mkdtemp(prefix="tforge-ms-"), "candidate.so")
                    lib.export_library(path)
                    results.append(BuilderResult(path, None))
                except Exception as error:  # a candidate that does not build is a failed trial
                    results.append(BuilderResult(None, f"{type(error).__name__}: {error}"))
            return results

    return InProcessBuilder()


def tune(
    mod: Any,
    target: Any,
    folder: Path,
    trials: int,
    *,
    progress: Callable[[str], None] | None = None,
) -> float:
    """Tune the kernels of ``mod`` for ``trials`` trials in total into ``folder``; returns seconds spent."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from . import compile as tc

    say = progress or (lambda message: logger.info("%s", message))
    folder.mkdir(parents=True, exist_ok=True)
    with target:
        fused = tc.import_tvm().ir.transform.Sequential(
            [
                relax.transform.DecomposeOpsForInference(),
                relax.transform.LegalizeOps(tc.FAST_LEGALIZE),  # exactly as compile.lower
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
            ]
        )(mod)
    say(f"tvm: tuning {trials} trials into {folder}")
    start = time.perf_counter()
    ms.relax_integration.tune_relax(
        mod=fused,
        params={},
        target=target,
        work_dir=str(folder),
        max_trials_global=trials,
        num_trials_per_iter=min(16, trials),
        builder=_in_process_builder(),
        runner=ms.runner.LocalRunner(),
    )
    seconds = time.perf_counter() - start
    say(f"tvm: tuned in {seconds:.0f} s")
    return seconds
