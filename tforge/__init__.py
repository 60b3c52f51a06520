"""tforge: a compression compiler for exported transformer models.

The public API mirrors the command line: :func:`load`, :func:`compile`, :func:`inspect`,
:func:`bench`; pipelines are run by :class:`PassManager` and described by :class:`Report`.
"""

from tforge.api import BenchResult, CompileResult, bench, compile, inspect, load
from tforge.compiler.pass_infra import Pass, PassResult, Property
from tforge.compiler.pipeline import NumericsCheck, PassManager, Report
from tforge.compiler.registry import all_passes, register_pass
from tforge.errors import (
    PassConfigError,
    PassError,
    PreconditionError,
    TforgeError,
    UnsupportedModelError,
    VerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "BenchResult",
    "CompileResult",
    "NumericsCheck",
    "Pass",
    "PassConfigError",
    "PassError",
    "PassManager",
    "PassResult",
    "PreconditionError",
    "Property",
    "Report",
    "TforgeError",
    "UnsupportedModelError",
    "VerificationError",
    "all_passes",
    "bench",
    "compile",
    "inspect",
    "load",
    "register_pass",
]
