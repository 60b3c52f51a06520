"""Sharded work over a Ray cluster: the data-heavy steps, where one machine runs out of time.

Everything tforge computes from data is a sum or a maximum over samples (per-channel min, max,
sums, sums of squares, histograms, Gram matrices, log-likelihood sums), so shards merge exactly.
:func:`map_shards` runs one function over a list of shards on a Ray cluster and returns the
results **in shard order**, whatever the number of workers and whatever order the tasks finish
in; the caller merges them in that order. Shard boundaries are the caller's, never the number of
workers', so the merged result does not depend on the worker count.

- The payload every task needs (the model) goes into Ray's object store once (:func:`ray.put`),
  and each task receives a reference to it, not a copy per task. A model too large to serialise
  in one message (``shared_path=True``, models over protobuf's 2 GiB or spilled to disk) reaches
  the workers as a path instead: the caller saves it once to a folder every node can read.
- A worker that dies (a crashed or killed process) is retried by Ray (``retries`` times); each
  shard's result is taken exactly once, from the attempt that succeeded, so nothing is counted
  twice. An exception raised by the function itself is not retried: it is a bug or bad input,
  and is raised on the driver with the shard it came from.
- Progress is reported per finished shard.

Ray is an optional dependency (``pip install 'tforge[ray]'``); it is imported only here. Without
an address, a local cluster is started (``workers`` CPUs) and shut down afterwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from tforge.errors import PassConfigError, PassError, TforgeError

logger = logging.getLogger(__name__)

__all__ = ["cluster", "map_shards", "require_ray", "shards_of"]

S = TypeVar("S")
R = TypeVar("R")

_INSTALL = "install the extra: pip install 'tforge[ray]' (Ray 2.60)"


def require_ray(what: str) -> Any:
    """The ``ray`` module, or a one-line PassConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise PassConfigError(f"{what} runs on a Ray cluster, but Ray is not installed; {_INSTALL}") from None
    return ray


@contextmanager
def cluster(workers: int, address: str | None = None) -> Iterator[Any]:
    """A connection to a Ray cluster for the duration of the block.

    ``address`` (``ray://HOST:PORT`` or ``auto``) connects to a running cluster and leaves it
    running; without one, a local cluster with ``workers`` CPUs is started and stopped at the end.
    An already initialised Ray (a test's, or a caller's) is used as it is.
    """
    if workers < 1:
        raise PassConfigError(f"cluster: workers must be at least 1, got {workers}")
    ray = require_ray("workers=")
    if ray.is_initialized():
        yield ray
        return
    started = time.perf_counter()
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    logger.info("ray: %s cluster ready in %.1fs", address or f"local {workers}-CPU", time.perf_counter() - started)
    try:
        yield ray
    finally:
        ray.shutdown()


def shards_of(items: Sequence[S], shard_size: int) -> list[list[S]]:
    """``items`` cut into consecutive shards of ``shard_size`` (the last one may be shorter)."""
    if shard_size < 1:
        raise PassConfigError(f"cluster: shard size must be at least 1, got {shard_size}")
    return [list(items[i : i + shard_size]) for i in range(0, len(items), shard_size)]


def map_shards(
    fn: Callable[[Any, S, int], R],
    payload: Any,
    shards: Sequence[S],
    *,
    retries: int = 3,
    progress: Callable[[str], None] | None = None,
    what: str = "shard",
) -> list[R]:
    """``[fn(payload, shard, index) for each shard]`` on the Ray cluster, in shard order.

    Call inside :func:`cluster`. ``fn`` must be importable by the workers (a module-level
    function of tforge), ``payload`` and shards picklable.
    """
    ray = require_ray("workers=")
    report = progress or (lambda message: logger.info("%s", message))
    payload_ref = ray.put(payload)  # once: every task gets the reference
    task = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=False)(_call)
    pending = {task.remote(fn, payload_ref, shard, i): i for i, shard in enumerate(shards)}
    results: dict[int, R] = {}
    started = time.perf_counter()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            index = pending.pop(ref)
            try:
                results[index] = ray.get(ref)
            except ray.exceptions.RayTaskError as error:
                cause = getattr(error, "cause", None)
                if isinstance(cause, TforgeError):  # bad input: the same one-line error, with the shard
                    raise type(cause)(f"{what} {index}: {cause}") from None
                raise PassError(f"{what} {index} failed on the cluster: {cause or error}") from error
            report(
                f"{what} {index + 1}/{len(shards)} done ({len(results)} of {len(shards)}, "
                f"{time.perf_counter() - started:.1f}s)"
            )
    return [results[i] for i in range(len(shards))]


def _call(fn: Callable[[Any, Any, int], Any], payload: Any, shard: Any, index: int) -> Any:
    return fn(payload, shard, index)
