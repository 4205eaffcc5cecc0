"""Exception types that the CLI maps to exit codes.

Why two types: a user error (bad input, bad option) is reported as one line and exit 1; a gate failure
(the model is valid but fails a sparsity/coverage requirement) is exit 2 so CI can tell them apart.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class OnnxSparseError(Exception):
    """A user-facing error: the message is one line that says what is wrong and, where possible, what to do."""


class GateFailure(OnnxSparseError):
    """A validation gate failed (e.g. coverage below ``--min-coverage``); exit code 2."""

    exit_code = 2
