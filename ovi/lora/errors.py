"""The one error type of the LoRA package."""

from __future__ import annotations

from ..loading import CheckpointError


class LoraError(CheckpointError):
    """A LoRA file that cannot be used on this model; the message names the file, what is wrong and the
    likely cause. A ``CheckpointError`` (so a ``ValueError``), like every other unusable file."""
