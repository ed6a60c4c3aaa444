"""Errors a user can cause, reported as one line by the CLI (exit 2, no traceback)."""

from __future__ import annotations


class LblError(Exception):
    """A problem with the user's input: missing file, bad CSV, incompatible artifact, bad option.

    The message names the thing and says how to fix it; the CLI prints it as ``error: <message>``.
    """


class IncompatibleArtifact(LblError):
    """An artifact of the wrong kind, embedding size, backbone or a truncated file."""
