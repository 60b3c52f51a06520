"""Relax import and the build pipeline: legalized ONNX -> a TVM VM executable for the host CPU.

The pipeline is TVM's default CPU pipeline with three changes, all for speed without tuning:
GELU and Erf are legalized with a rational erf approximation (``topi.fast_erf``; plain ``erf``
compiles to scalar ``erff`` calls, 3x slower than the matmul it follows); a tuning database, when
given, is applied first; and every PrimFunc the database does not cover is scheduled by
tforge's own rules (``schedules.py``) instead of being left as a naive loop nest.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import onnx

from tforge.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

# Bump when the lowering or the schedules change: tuning records are keyed on the exact TIR, so
# a changed lowering must not silently reuse (and miss) an old database.
PIPELINE_VERSION = "1"


def import_tvm() -> Any:
    """Import TVM with its thread pool sized to the machine (TVM halves the core count on x86)."""
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        import tvm
    except ImportError as error:
        raise UnsupportedModelError(
            "tvm: the TVM backend needs apache-tvm; install tforge's tvm extra "
            "(pip install 'tforge[tvm]', which pins apache-tvm==0.27.0.post1 and apache-tvm-ffi==0.1.14.post1)"
        ) from error
    return tvm


def host_target(threads: int | None = None) -> Any:
    """An LLVM target for this CPU (``-mcpu=native`` is rejected with the wheel's triple)."""
    tvm = import_tvm()
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": cpu, "num-cores": threads or os.cpu_count() or 1}
    )


def import_onnx(proto: onnx.ModelProto) -> Any:
    """Relax IRModule of a legalized model; weights become constants inside the module."""
    import_tvm()
    from tvm.relax.frontend.onnx import from_onnx

    from . import int8

    with int8.converters():
        try:
            return from_onnx(proto, keep_params_in_input=False)
        except Exception as error:  # the importer raises bare TVMError/ValueError with no node name
            first = (str(error).strip().splitlines() or [type(error).__name__])[-1]
            raise UnsupportedModelError(f"tvm: Relax import failed: {first}") from error


def _fast_gelu(bb: Any, call: Any) -> Any:
    from tvm import topi

    def gelu(x: Any) -> Any:
        half = topi.multiply(x, 0.5)
        return topi.add(
            half, topi.multiply(half, topi.fast_erf(topi.multiply(x, 0.7071067811865476)))
        )

    return bb.call_te(gelu, call.args[0], primfunc_name_hint="gelu")


def _default(bb: Any, call: Any) -> Any:
    """TVM's own legalization of ``call`` (for dtypes the fast versions do not cover)."""
    from tvm import ir

    return ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)


def _fast_erf(bb: Any, call: Any) -> Any:
    from tvm import topi

    if call.args[0].ty.dtype != "float32":
        return _default(bb, call)
    return bb.call_te(topi.fast_erf, call.args[0], primfunc_name_hint="erf")


def _fast_softmax(bb: Any, call: Any) -> Any:
    """Softmax with a polynomial exp: plain ``exp`` compiles to scalar ``expf`` calls, which made
    the attention softmax the slowest kernel of MiniLM (34 ms of a layer's ~80 ms at 1 thread)."""
    from tvm import topi

    x = call.args[0]
    if x.ty.dtype != "float32":
        return _default(bb, call)
    axis = int(call.attrs.axis)

    def softmax(data: Any) -> Any:
        top = topi.max(data, axis=axis, keepdims=True)
        e = topi.fast_exp(topi.subtract(data, top))
        return topi.divide(e, topi.sum(e, axis=axis, keepdims=True))

    return bb.call_te(softmax, x, primfunc_name_hint="softmax")


FAST_LEGALIZE = {
    "relax.nn.gelu": _fast_gelu,
    "relax.erf": _fast_erf,
    "relax.nn.softmax": _fast_softmax,
}


def lower(mod: Any, target: Any, database_dir: Path | None = None) -> Any:
    """Legalize, fuse and schedule ``mod`` (database records first, tforge's rules for the rest)."""
    tvm = import_tvm()
    from tvm import relax

    from .schedules import schedule_pass

    with target:  # MetaScheduleApplyDatabase reads the target when constructed
        passes = [
            relax.transform.DecomposeOpsForInference(),
            relax.transform.LegalizeOps(FAST_LEGALIZE),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
        if database_dir is not None:
            passes.append(relax.transform.MetaScheduleApplyDatabase(str(database_dir)))
        passes.append(schedule_pass())
        return tvm.ir.transform.Sequential(passes)(mod)


def build_executable(mod: Any, target: Any) -> Any:
    import_tvm()
    from tvm import relax

    start = time.perf_counter()
    executable = relax.build(mod, target=target)
    logger.debug("tvm: relax.build took %.1f s", time.perf_counter() - start)
    return executable


def unscheduled(mod: Any) -> list[str]:
    """PrimFuncs no rule and no record scheduled (they run as naive loop nests)."""
    tvm = import_tvm()
    return [
        gv.name_hint
        for gv, func in mod.functions_items()
        if isinstance(func, tvm.tirx.PrimFunc) and not func.attrs.get("tirx.is_scheduled")
    ]
