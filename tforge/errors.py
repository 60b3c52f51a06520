"""The three kinds of error tforge raises, and the exit code each maps to.

- The user's input is unusable: ``UnsupportedModelError`` (exit 1).
- The pipeline or its options are wrong: ``PassConfigError`` / ``PreconditionError`` (exit 1).
- tforge itself produced something wrong: ``PassError`` / ``VerificationError`` (exit 70).

Messages say where, what, what was observed and what to do, on one line, e.g.
``model.onnx: external data 'w.bin' of initializer 'fc.w' resolves outside the model folder;
move the file next to the model``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70


class TforgeError(Exception):
    """Base class of every error tforge raises on purpose."""

    exit_code = EXIT_USER_ERROR


class UnsupportedModelError(TforgeError):
    """The input model (file, graph or weights) cannot be used; the user has to change it."""


class PassConfigError(TforgeError, ValueError):
    """A pipeline spec or a pass option is malformed or out of range.

    Every pass raises it from ``__post_init__`` for a bad option, whether the pass was built by
    the pipeline parser or directly from Python, with the pass's name first in the message.
    """


class PreconditionError(TforgeError):
    """A pass cannot run on this model or at this point in the pipeline."""


class PassError(TforgeError):
    """A pass failed or produced an invalid model: a bug in tforge, not in the input."""

    exit_code = EXIT_INTERNAL


class VerificationError(PassError):
    """A model failed structural or numeric verification after a pass."""


class NumericsCheckError(TforgeError):
    """The compiled model's outputs differ from the input model's beyond the limits the user set."""
