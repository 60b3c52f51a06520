"""tforge's own TIR schedule rules for x86 CPUs: what the TVM backend runs when nothing is tuned.

TVM's default CPU pipeline leaves matmuls unscheduled (a naive triple loop, ~100x slower than
ONNX Runtime), and the shipped ``dlight`` CPU rules cover only GEMV and row reductions. These
rules fill the gap; every fused PrimFunc goes through them in order and the first that applies
wins:

1. ``Matmul``: one reduction block (``C[.., i, j] += A[.., i, k] * B[.., k, j]`` in any operand
   layout) plus elementwise blocks around it (bias, GELU, residual add). The output is tiled into
   ``ti x tj`` register blocks (``tj`` a multiple of the vector width), accumulated in a local
   buffer that LLVM keeps in registers, the epilogue computed right after each tile while it is
   in cache, and the tile loop parallel.
2. dlight's ``cpu.Reduction`` (LayerNorm, softmax: per-row parallel, vectorised injective parts).
3. ``Injective``: every block elementwise or gather-like: one parallel loop over the fused
   spatial axes, the innermost vectorised.
4. ``Fallback``: anything else (a lone reduction, a mixed function): each root block's outer
   spatial loops fused and parallel. Never fast, never wrong, never naive-serial.

Tile sizes are divisors of the (static) extents: a tile that does not divide its loop needs a
predicate, and predicated tails are where wrong results hid (see the tests at odd lengths).
Every rule returns ``None`` instead of raising when a schedule primitive refuses the function,
so the next rule gets it.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target import Target

logger = logging.getLogger(__name__)

__all__ = ["Fallback", "Injective", "Matmul", "default_rules", "schedule_pass"]

# 32 zmm registers: an 8 x 32 float32 accumulator tile is 16 of them, leaving room for the
# broadcast A values and the B vectors.
_TILE_I = 8
_TILE_J = 32
_VECTOR = 16  # float32 lanes of a 512-bit vector
_PARALLEL_GRAIN = 64  # elementwise: at least this many vectors per parallel task


def _extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _divisor_at_most(n: int, limit: int, prefer_multiple_of: int = 1) -> int:
    """The largest divisor of ``n`` that is at most ``limit``, preferring multiples of ``prefer_multiple_of``."""
    divisors = [d for d in range(1, min(n, limit) + 1) if n % d == 0]
    preferred = [d for d in divisors if d % prefer_multiple_of == 0]
    return (preferred or divisors)[-1]


class _Rule(dlight.ScheduleRule):
    """A rule that never raises: a refused primitive means 'not mine', and the next rule runs."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        try:
            return self._apply(func, target)
        except Exception as error:  # TVM raises ScheduleError and TVMError subclasses alike
            logger.debug(
                "%s declined %s: %s",
                type(self).__name__,
                func.attrs,
                (str(error).splitlines() or [type(error).__name__])[0],
            )
            return None

    def _apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        raise NotImplementedError


class Matmul(_Rule):
    """Register-tiled, vectorised, parallel matmul with its elementwise prologue/epilogue fused."""

    def _apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        reductions = [b for b in infos if not b.is_injective()]
        if len(reductions) != 1:
            return None
        red = reductions[0]
        kinds = red.dom_kind()
        # matmul-like: spatial axes then exactly one reduction axis, at least i and j spatial
        if kinds.count("R") != 1 or not kinds.endswith("R") or len(kinds) < 3:
            return None
        if len(sch.get(red.block_rv).reads) != 2:
            return None
        red_index = infos.index(red)
        # Elementwise producers (a dequantize, a cast) go into the product, consumers are
        # chained into the last one, which is computed per tile.
        for info in infos[:red_index]:
            sch.compute_inline(info.block_rv)
        epilogue = infos[red_index + 1 :]
        for info in epilogue[:-1]:
            sch.compute_inline(info.block_rv)
        block = red.block_rv
        loops = sch.get_loops(block)
        *batch, i, j, k = loops
        ei, ej, ek = (_extent(sch, loop) for loop in (i, j, k))
        if ei is None or ej is None or ek is None:
            return None  # symbolic shapes: legalize fixes them first
        ti = _divisor_at_most(ei, _TILE_I)
        tj = _divisor_at_most(ej, _TILE_J, prefer_multiple_of=_VECTOR)
        i0, i1 = sch.split(i, [None, ti])
        j0, j1 = sch.split(j, [None, tj])
        sch.reorder(*batch, i0, j0, k, i1, j1)
        outer = sch.fuse(*batch, i0, j0)
        sch.parallel(outer)
        if epilogue:
            # The product goes straight from registers into the epilogue: its buffer is local
            # and, once the epilogue sits under the tile loop, compacted to one tile.
            last = epilogue[-1].block_rv
            sch.set_scope(block, 0, "local")
            sch.reverse_compute_at(last, outer, preserve_unit_loops=True)
            tail = last
        else:
            tail = sch.cache_write(block, 0, "local")
            sch.reverse_compute_at(tail, outer, preserve_unit_loops=True)
        # vectorize while the block still has its init (a decomposed update is no reduction block)
        sch.unroll(i1)
        sch.vectorize(j1)
        init = sch.decompose_reduction(block, k)
        for b in (init, tail):
            self._vectorize_tile(sch, b)
        return sch

    @staticmethod
    def _vectorize_tile(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> None:
        loops = sch.get_loops(block)
        if len(loops) < 2:
            return
        inner = loops[-1]
        if (_extent(sch, inner) or 0) > 1:
            sch.vectorize(inner)


class Injective(_Rule):
    """Elementwise, broadcast, transpose, gather: fused spatial loops, parallel and vectorised."""

    def _apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or not infos or not all(b.is_injective() for b in infos):
            return None
        for info in infos[:-1]:
            sch.compute_inline(info.block_rv)
        last = infos[-1].block_rv
        loops = sch.get_loops(last)
        if not loops:
            return sch
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        total = _extent(sch, fused)
        if total is None:
            return None
        vec = _divisor_at_most(total, _VECTOR)
        if vec > 1:
            outer, inner = sch.split(fused, [None, vec])
            sch.vectorize(inner)
        else:
            outer = fused
        chunks = total // vec
        if chunks >= 2 * _PARALLEL_GRAIN:
            grain = _divisor_at_most(chunks, _PARALLEL_GRAIN)
            par, _ = sch.split(outer, [None, grain])
            sch.parallel(par)
        return sch


class Fallback(_Rule):
    """Any other function: each root block's leading spatial loops fused and parallel."""

    def _apply(self, func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        for info in infos:
            kinds = info.dom_kind()
            lead = len(kinds) - len(kinds.lstrip("S"))
            if lead == 0:
                continue
            loops = sch.get_loops(info.block_rv)[:lead]
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            sch.parallel(fused)
        return sch


def default_rules() -> list[dlight.ScheduleRule]:
    return [Matmul(), dlight.cpu.Reduction(), Injective(), Fallback()]


def schedule_pass():
    """The module pass that schedules every PrimFunc not already scheduled (e.g. by a tuning database)."""
    return dlight.ApplyDefaultSchedule(*default_rules())
