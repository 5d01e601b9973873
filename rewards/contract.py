"""The reward-function contract (TRL GRPOTrainer's) and the helpers every built-in needs.

TRL passes completions in one of two shapes: plain strings (standard datasets) or one-message
lists `[{"role": "assistant", "content": ...}]` (conversational datasets). Built-ins accept both
through `text_of`, so they work in either kind of dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Completion = str | Sequence[dict[str, Any]]
Reward = float | None

def text_of(item: Completion) -> str:
    """The text of a completion or prompt, whether a plain string or a list of chat messages.

    >>> text_of("42")
    '42'
    >>> text_of([{"role": "assistant", "content": "The answer is 42."}])
    'The answer is 42.'
    """
    if isinstance(item, str):
        return item
    return "".join(_content_text(message.get("content", "")) for message in item)


def _content_text(content: Any) -> str:
    """Message content is a string or a list of typed parts (multimodal); keep the text parts."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def is_conversational(prompt: Any) -> bool:
    """True for a chat prompt (a list of role/content messages), as TRL's `is_conversational`."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]
