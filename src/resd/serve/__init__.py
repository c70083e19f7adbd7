"""`resd serve`: an OpenAI-compatible chat server that records every completion and the
feedback users post about it, so that a learner can train on deployment traffic.

    store     the database (SQLAlchemy): model versions, interactions, feedback, learner state
    engine    the served model, its atomic swap, and the batching generation worker
    app       the FastAPI application: /v1/chat/completions, /v1/feedback, /health, the page
    command   the `resd serve` sub-command

Nothing here is imported by `import resd`: the web and database packages are an extra
(`pip install 'resd[serve]'`), and each module that needs them says so when they are missing.
"""

from __future__ import annotations

SERVE_EXTRA_HINT = "pip install 'resd[serve]'"


def missing_extra(package: str, exc: ImportError) -> ImportError:
    """The error to raise when an optional serving package is absent: it names the extra."""
    error = ImportError(f"resd serve needs {package}; install it with: {SERVE_EXTRA_HINT}")
    error.__cause__ = exc
    return error
