"""`align eval` (being written)."""

from align.errors import AlignError


def eval_command() -> None:
    """Evaluate checkpoints (work in progress)."""
    raise AlignError("align eval is not available yet")
