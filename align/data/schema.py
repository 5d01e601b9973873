"""What a valid row is, for the three kinds of dataset align reads.

- conversations (SFT): ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  with at least one assistant turn, or ShareGPT / Alpaca rows: `align.data.formats` reads those
  and checks the turns (it reuses the content and role checks here);
- prompts (GRPO): ``{"prompt": str | messages ending in a user turn, ...extra columns}``; the extra
  columns (``answer``, ``tests``, ``category``...) reach reward functions as keyword arguments;
- preferences (reward models): ``{"prompt": ..., "chosen": ..., "rejected": ...}``, each a string or
  a message list, as TRL's RewardTrainer takes them.

Validators are pure functions ``row -> list[Defect]`` that report *every* defect of a row, so one
`align data check` run lists all that needs fixing. A defect's `kind` is a stable name used to count
bad rows; its `message` names the field (``messages[2].role``) and, where possible, the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
# Role names other formats and real dumps use (ShareGPT, OpenAssistant, Gemini, Bing/Bard scrapes):
# conversation formats map them (`align.data.formats.DEFAULT_ROLES`); prompts get them as suggestions.
ROLE_ALIASES = {"human": "user", "prompter": "user", "gpt": "assistant", "chatgpt": "assistant",
                "bot": "assistant", "model": "assistant", "ai": "assistant", "chatbot": "assistant",
                "bard": "assistant", "bing": "assistant", "sys": "system"}


@dataclass(frozen=True)
class Defect:
    """One problem in one row: `kind` for counting, `message` for the person fixing it."""

    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


Validator = Callable[[object], list[Defect]]


def type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def suggest_role(role: str) -> str | None:
    """The valid role a misspelt or foreign role most likely meant, or None."""
    lowered = role.strip().lower()
    if lowered in ROLES:
        return lowered
    if lowered in ROLE_ALIASES:
        return ROLE_ALIASES[lowered]
    close = difflib.get_close_matches(lowered, ROLES, n=1, cutoff=0.5)
    return close[0] if close else None


def text_defect(text: object, where: str, key: str = "content") -> Defect | None:
    """The type defect of a turn's text `where.key` (absent, or not a string), or None."""
    if text is None:
        return Defect("missing_field", f"{where} has no '{key}'")
    if not isinstance(text, str):
        hint = "; join the text parts into one string" if isinstance(text, list) else ""
        return Defect("wrong_type", f"{where}.{key} must be a string, got {type_name(text)}{hint}")
    return None


def role_defect(role: object, where: str, key: str = "role") -> Defect | None:
    """The defect of a turn's role `where.key` that no role map can fix (absent, not a string)."""
    if role is None:
        return Defect("missing_role", f"{where} has no '{key}'; set one of {', '.join(ROLES)}")
    if not isinstance(role, str):
        return Defect("wrong_type", f"{where}.{key} must be a string, got {type_name(role)}")
    return None


def _check_content(content: object, where: str) -> list[Defect]:
    if defect := text_defect(content, where):
        return [defect]
    if not content.strip():
        return [Defect("empty_content", f"{where}.content is empty")]
    return []


def _check_role(role: object, where: str) -> list[Defect]:
    if defect := role_defect(role, where):
        return [defect]
    if role in ROLES:
        return []
    guess = suggest_role(role)
    hint = f"did you mean '{guess}'? " if guess else ""
    return [Defect("unknown_role", f"{where}.role '{role}' is not a valid role; {hint}"
                                   f"(valid: {', '.join(ROLES)})")]


def turn_objects(turns: list, field: str, keys: str, defects: list[Defect]) -> Iterator[tuple[str, dict]]:
    """(where, turn) for each turn of `field` that is an object; a defect in `defects` for each
    that is not (an object with `keys`)."""
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if isinstance(turn, dict):
            yield where, turn
        else:
            defects.append(Defect("wrong_type", f"{where} must be an object with {keys}, got {type_name(turn)}"))


def check_messages(messages: object, field: str) -> list[Defect]:
    """Defects of a message list stored under `field` (structure, roles, contents)."""
    if not isinstance(messages, list):
        return [Defect("wrong_type", f"'{field}' must be a list of {{role, content}} objects, "
                                     f"got {type_name(messages)}")]
    if not messages:
        return [Defect("empty_messages", f"'{field}' is an empty list")]
    defects: list[Defect] = []
    for where, message in turn_objects(messages, field, "'role' and 'content'", defects):
        defects += _check_role(message.get("role"), where)
        defects += _check_content(message.get("content"), where)
    return defects


def missing_field(row: dict, field: str, hint: str) -> Defect:
    close = difflib.get_close_matches(field, [str(k) for k in row], n=1, cutoff=0.6)
    rename = f"; rename '{close[0]}' to '{field}'?" if close else ""
    columns = ", ".join(map(str, row)) or "none"
    return Defect("missing_field", f"no '{field}' field (columns: {columns}); {hint}{rename}")


def not_an_object(row: object) -> Defect:
    return Defect("not_an_object", f"row must be a JSON object, got {type_name(row)}")


def _needs_assistant(messages: list[dict], field: str) -> list[Defect]:
    """For an otherwise valid message list (a misspelt role would make this check noise)."""
    if any(m["role"] == "assistant" for m in messages):
        return []
    return [Defect("no_assistant_turn", f"'{field}' has no assistant turn: nothing to train on")]


def _check_prompt(prompt: object) -> list[Defect]:
    if isinstance(prompt, str):
        return _check_content(prompt, "prompt")
    defects = check_messages(prompt, "prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        last = prompt[-1].get("role")
        if last in ("system", "assistant"):
            defects.append(Defect("prompt_not_ending_in_user",
                                  f"prompt ends with a '{last}' turn; it must end with a user turn "
                                  "for the model to answer"))
    return defects


def validate_prompt(row: object) -> list[Defect]:
    """Defects of a GRPO prompt row; extra columns are the reward functions' business."""
    if not isinstance(row, dict):
        return [not_an_object(row)]
    if row.get("prompt") is None:
        return [missing_field(row, "prompt", "a prompt row needs 'prompt': a string or a message list")]
    return _check_prompt(row["prompt"])


def _check_response(response: object, field: str) -> list[Defect]:
    if isinstance(response, str):
        return _check_content(response, field)
    return check_messages(response, field) or _needs_assistant(response, field)


def validate_preference(row: object) -> list[Defect]:
    """Defects of a preference pair: a valid prompt plus two different valid responses."""
    if not isinstance(row, dict):
        return [not_an_object(row)]
    defects = []
    for field in ("prompt", "chosen", "rejected"):
        if row.get(field) is None:
            defects.append(missing_field(row, field, "a preference row needs 'prompt', 'chosen', 'rejected'"))
    if defects:
        return defects
    defects = _check_prompt(row["prompt"]) + _check_response(row["chosen"], "chosen") \
        + _check_response(row["rejected"], "rejected")
    if not defects and row["chosen"] == row["rejected"]:
        defects.append(Defect("identical_pair", "'chosen' and 'rejected' are identical: the pair "
                                                "teaches nothing"))
    return defects


# Conversations are read by `align.data.formats` (several formats, repairs); these kinds are not.
VALIDATORS: dict[str, Validator] = {"prompts": validate_prompt, "preferences": validate_preference}
KINDS = ("conversations", *VALIDATORS)


def detect_kind(row: object) -> str | None:
    """Guess the dataset kind from one row's columns, or None if it shows no known column."""
    if not isinstance(row, dict):
        return None
    if "messages" in row or "conversations" in row:
        return "conversations"  # messages or ShareGPT rows
    if "chosen" in row or "rejected" in row:
        return "preferences"
    if "prompt" in row:
        return "prompts"
    if "instruction" in row and "output" in row:
        return "conversations"  # Alpaca rows
    return None
