"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero."""


class PipelineError(RuntimeError):
    """A problem the user can fix: the message says what is wrong and what to do."""
