"""Spill rewritten weights to a scratch file, so compiling a model larger than memory streams.

A loaded model's weights are memory-mapped (onnx_ir ``ExternalTensor``): the kernel pages them
in and drops them again, so reading them costs no memory of the process's own. A pass that
rewrites a weight (ln-migrate, smoothquant, quantize) makes a new NumPy array; kept in memory,
those arrays add up to the size of the model. When spilling is on, ``tensor(model, array,
name)`` instead appends the array to ``<scratch>/spill.bin`` and returns an ``ExternalTensor``
memory-mapped from it: the peak is one tensor being rewritten, whatever the model's size.

Spilling turns on in ``PassManager.run`` for models whose initializers exceed
``SPILL_THRESHOLD`` bytes (``TFORGE_SPILL_BYTES`` overrides it; 0 spills always). The scratch
folder (``TFORGE_SCRATCH`` or the system temp folder) belongs to the model: it is removed when
the model is garbage-collected or the process exits, including on SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np
import onnx_ir as ir

__all__ = ["SPILL_KEY", "SPILL_THRESHOLD", "enable_if_large", "initializer_bytes", "tensor", "threshold"]

logger = logging.getLogger(__name__)

SPILL_KEY = "tforge.spill"
SPILL_THRESHOLD = 1 << 30
#: tensors smaller than this stay in memory (norm parameters, biases, scales)
MIN_SPILL_BYTES = 1 << 20
ALIGN = 1 << 16  # offsets aligned for mmap, as ORT and onnx_ir want them

_SCRATCH: dict[int, _Scratch] = {}


class _Scratch:
    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory(
            prefix="tforge-spill-", dir=os.environ.get("TFORGE_SCRATCH")
        )
        self.path = Path(self.dir.name) / "spill.bin"
        self.file = open(self.path, "wb")  # noqa: SIM115 - lives as long as the model
        self.offset = 0

    def append(self, array: np.ndarray) -> tuple[int, int]:
        pad = -self.offset % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        self.file.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        self.file.flush()  # readers map the file from disk
        self.offset += array.nbytes
        return start, array.nbytes

    def close(self) -> None:
        self.file.close()
        self.dir.cleanup()


def initializer_bytes(model: ir.Model) -> int:
    """Total bytes of the initializers of every graph (no tensor is read to count them)."""
    return sum(
        v.const_value.nbytes
        for graph in model.graphs()
        for v in graph.initializers.values()
        if v.const_value is not None
    )


def threshold() -> int:
    """Weight bytes from which a model counts as large (``TFORGE_SPILL_BYTES`` overrides)."""
    return int(os.environ.get("TFORGE_SPILL_BYTES", SPILL_THRESHOLD))


def enable_if_large(model: ir.Model, weight_bytes: int) -> bool:
    """Turn spilling on for ``model`` if its weights exceed the threshold; return whether on."""
    if weight_bytes < threshold():
        return bool(model.meta.get(SPILL_KEY))
    if not model.meta.get(SPILL_KEY):
        logger.info(
            "weights are %.1f GiB: rewritten weights are spilled to a scratch file",
            weight_bytes / 2**30,
        )
        model.meta[SPILL_KEY] = True
    return True


def tensor(model: ir.Model, array: np.ndarray, name: str) -> ir.TensorProtocol:
    """``ir.tensor(array, name=name)``, or the same bytes spilled and memory-mapped when on."""
    if not model.meta.get(SPILL_KEY) or array.nbytes < MIN_SPILL_BYTES or array.dtype == object:
        return ir.tensor(array, name=name)
    scratch = _SCRATCH.get(id(model))
    if scratch is None:
        scratch = _SCRATCH[id(model)] = _Scratch()
        weakref.finalize(model, _release, id(model))
    offset, length = scratch.append(array)
    return ir.ExternalTensor(
        scratch.path.name,
        offset=offset,
        length=length,
        dtype=ir.DataType.from_numpy(array.dtype),
        shape=ir.Shape(array.shape),
        name=name,
        base_dir=scratch.dir.name,
    )


def _release(key: int) -> None:
    scratch = _SCRATCH.pop(key, None)
    if scratch is not None:
        scratch.close()
