"""User-facing errors.

Anything the user can cause (a bad flag, an unsupported model, a corrupt artifact) raises a subclass of
`LmforgeError` with a one-line message saying what was expected, what was found and where. The CLI prints
that line and exits non-zero; every other exception is a bug and keeps its traceback.
"""


class LmforgeError(Exception):
    """A problem with the user's input, reported as one line."""


class CaptureError(LmforgeError):
    """The model could not be captured into a graph."""


class ArtifactError(LmforgeError):
    """An artifact is missing, corrupt, or from an incompatible version."""


class PassError(LmforgeError):
    """A pass failed or left an invalid graph."""


class GenerationError(LmforgeError):
    """A request the runtime cannot serve (prompt too long, bad sampling options)."""
