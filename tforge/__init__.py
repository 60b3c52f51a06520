"""tforge: a compression compiler for exported transformer models.

The public API mirrors the command line: :func:`load`, :func:`compile`, :func:`inspect`,
:func:`bench`, :func:`bench_generate` (``tforge bench --generate``), :func:`generate_text`
(``tforge generate``; the generation loop itself is the module :mod:`tforge.runtime.generate`);
pipelines are run by :class:`PassManager` and described by :class:`Report`.
"""

from tforge.api import (
    BenchResult,
    CompileResult,
    GenerateBenchResult,
    GenerateResult,
    bench,
    bench_generate,
    compile,
    generate_text,
    inspect,
    load,
)
from tforge.compiler.calibration import CalibrationData
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
    "CalibrationData",
    "CompileResult",
    "GenerateBenchResult",
    "GenerateResult",
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
    "bench_generate",
    "compile",
    "generate_text",
    "inspect",
    "load",
    "register_pass",
]
