"""Conversation rows in the formats users have, normalised to ``messages`` and repaired.

Formats (a data source's `format:`; `auto` fixes it per file from the first row that shows one):
- ``messages``: ``{"messages": [{"role", "content"}, ...]}`` (OpenAI, TRL, most HF chat sets);
- ``sharegpt``: ``{"conversations": [{"from", "value"}, ...], "system"?: str}`` (ShareGPT, Vicuna,
  OpenHermes, LLaMA-Factory). Turns may also be ``{"role", "content"}``; a ``system`` column
  becomes a leading system turn;
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?}`` becomes system?, the
  ``history`` [prompt, answer] pairs, user = instruction and input joined by a blank line,
  assistant = output.
The consumed columns are replaced by ``messages``; every other column (``id``, ``category``...)
is kept, so `align data convert` writes rows any tool reading ``messages`` takes.

Role names go through a role map, case-insensitively: `DEFAULT_ROLES` (the canonical roles plus
the aliases real dumps use: human, gpt, chatgpt, bot, model, prompter...) extended by the
source's `roles:`. A role outside the map is an `unknown_role` defect, never a guess.

`Converter` returns the normalised row (repaired where `align.data.policy.REPAIRS` allows) and
every defect found, each naming the field (``conversations[3]``); the read's `Policy` decides
what happens to the row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from align.data.policy import Policy, parse_policy
from align.data.schema import (ROLE_ALIASES, ROLES, Defect, missing_field, not_an_object, role_defect, suggest_role,
                               text_defect, type_name)

FORMATS = ("messages", "sharegpt", "alpaca")
DEFAULT_ROLES = {**{r: r for r in ROLES}, **ROLE_ALIASES}
_COLUMNS = {"messages": ("messages",), "sharegpt": ("conversations", "system"),
            "alpaca": ("instruction", "input", "output", "system", "history")}
Turn = tuple[int | str, str, str]  # (index in the turn list, or the column it came from; role; text)


def detect_format(row: object) -> str | None:
    """The format a row's columns show, or None."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return None


def role_map(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """`DEFAULT_ROLES` extended (or overridden) by `extra`; raises ValueError on a bad target."""
    roles = dict(DEFAULT_ROLES)
    for name, role in (extra or {}).items():
        if role not in ROLES:
            raise ValueError(f"roles: {name!r} maps to {role!r}; map every name to one of {', '.join(ROLES)}")
        roles[str(name).strip().lower()] = role
    return roles


@dataclass(frozen=True)
class ConversationFormat:
    """How a conversation source is read: its format, role map and defect policy."""

    format: str = "auto"
    roles: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ROLES))
    policy: Policy = Policy()

    def fingerprint(self) -> dict:
        """What the normalised rows depend on (for cache keys)."""
        return {"format": self.format, "roles": dict(sorted(self.roles.items())), "policy": self.policy.as_dict()}


def conversation_format(format: str = "auto", roles: Mapping[str, str] | None = None,
                        on_defect: str | Mapping[str, str] = "repair") -> ConversationFormat:
    """A validated `ConversationFormat` (ValueError names the bad value and the choices)."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format: {format!r} is not one of auto, {', '.join(FORMATS)}")
    return ConversationFormat(format, role_map(roles), parse_policy(on_defect))


def _list_turns(row: dict, column: str, roles: Mapping[str, str]) -> tuple[list[Turn], list[Defect]]:
    turns = row.get(column)
    if turns is None:
        return [], [missing_field(row, column, f"this file's rows were read as "
                                               f"{'ShareGPT' if column == 'conversations' else column}; "
                                               "set `format:` if that is wrong")]
    if not isinstance(turns, list):
        return [], [Defect("wrong_type", f"'{column}' must be a list of turns, got {type_name(turns)}")]
    role_key, text_key = ("from", "value") if column == "conversations" else ("role", "content")
    out: list[Turn] = []
    defects: list[Defect] = []
    for i, turn in enumerate(turns):
        if type(turn) is dict:  # the common case first: the format's own keys, a role the map knows
            role, text = turn.get(role_key), turn.get(text_key)
            if type(role) is str and type(text) is str:
                mapped = roles.get(role) or roles.get(role.strip().lower())
                if mapped is not None:
                    out.append((i, mapped, text))
                    continue
        parsed, found = _other_turn(turn, f"{column}[{i}]", roles, role_key)
        out += [(i, *parsed)] if parsed else []
        defects += found
    return out, defects


def _other_turn(turn: object, where: str, roles: Mapping[str, str],
                usual: str) -> tuple[tuple[str, str] | None, list[Defect]]:
    """(role, text) of a turn off the fast path: keyed the other way (role/content in ShareGPT,
    from/value in messages), or with defects (naming the format's `usual` role key if neither is set)."""
    if not isinstance(turn, dict):
        return None, [Defect("wrong_type", f"{where} must be an object with 'role' and 'content' (or 'from' "
                                           f"and 'value'), got {type_name(turn)}")]
    role_key = next((k for k in ("from", "role") if turn.get(k) is not None), usual)
    text_key = next((k for k in ("value", "content") if turn.get(k) is not None), "value" if role_key == "from"
                    else "content")
    mapped, bad_role = _map_role(turn.get(role_key), where, role_key, roles)
    bad_text = text_defect(turn.get(text_key), where, text_key)
    defects = [d for d in (bad_role, bad_text) if d is not None]
    return (None if defects else (mapped, turn[text_key])), defects


def _map_role(role: object, where: str, key: str, roles: Mapping[str, str]) -> tuple[str | None, Defect | None]:
    if defect := role_defect(role, where, key):
        return None, defect
    mapped = roles.get(role.strip().lower())
    if mapped is not None:
        return mapped, None
    guess = suggest_role(role)
    hint = f"did you mean '{guess}'? " if guess else ""
    return None, Defect("unknown_role", f"{where}.{key} '{role}' is not a known role; {hint}map it on the data "
                                        f"source with `roles: {{{role}: user | assistant | system}}` "
                                        f"(or --role {role}=ROLE)")


def _messages_turns(row: dict, roles: Mapping[str, str]) -> tuple[list[Turn], list[Defect]]:
    return _list_turns(row, "messages", roles)


def _sharegpt_turns(row: dict, roles: Mapping[str, str]) -> tuple[list[Turn], list[Defect]]:
    turns, defects = _list_turns(row, "conversations", roles)
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        defects.append(Defect("wrong_type", f"'system' must be a string, got {type_name(system)}"))
    elif system and system.strip() and not (turns and turns[0][1] == "system"):
        turns.insert(0, ("system", "system", system))
    return turns, defects


def _alpaca_turns(row: dict, roles: Mapping[str, str]) -> tuple[list[Turn], list[Defect]]:
    defects = [missing_field(row, col, "an Alpaca row needs 'instruction' and 'output'")
               for col in ("instruction", "output") if row.get(col) is None]
    for col in ("instruction", "input", "output", "system"):
        if row.get(col) is not None and not isinstance(row[col], str):
            defects.append(Defect("wrong_type", f"'{col}' must be a string, got {type_name(row[col])}"))
    history = row.get("history") or []
    pairs_ok = isinstance(history, list) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in history)
    if not pairs_ok:
        defects.append(Defect("wrong_type", "'history' must be a list of [prompt, answer] string pairs"))
    if defects:
        return [], defects
    turns: list[Turn] = [("system", "system", row["system"])] if (row.get("system") or "").strip() else []
    for i, (prompt, answer) in enumerate(history):
        turns += [(f"history[{i}][0]", "user", prompt), (f"history[{i}][1]", "assistant", answer)]
    prompt = "\n\n".join(part for part in (row["instruction"], row.get("input")) if part and part.strip())
    return turns + [("instruction", "user", prompt), ("output", "assistant", row["output"])], []


_TURNS = {"messages": _messages_turns, "sharegpt": _sharegpt_turns, "alpaca": _alpaca_turns}


def structure(turns: list[Turn], column: str) -> tuple[list[dict] | None, list[Defect]]:
    """Messages from well-typed turns, with the `REPAIRS` applied in order, and the defects found;
    None when no trainable conversation is left."""
    previous, user_seen, assistant_seen = None, False, False
    for _, role, text in turns:  # the common case first: nothing to repair
        if role == previous or not text or text.isspace() or (role == "assistant" and not user_seen):
            break
        previous, user_seen, assistant_seen = role, user_seen or role == "user", assistant_seen or role == "assistant"
    else:
        if assistant_seen:
            return [{"role": role, "content": text} for _, role, text in turns], []
    return _repair(turns, column)


def _where(column: str, origin: int | str) -> str:
    return f"{column}[{origin}]" if isinstance(origin, int) else origin


def _repair(turns: list[Turn], column: str) -> tuple[list[dict] | None, list[Defect]]:
    defects = [Defect("empty_turn", f"{_where(column, at)} ({role} turn) is empty") for at, role, text in turns
               if not text.strip()]
    kept = [t for t in turns if t[2].strip()]
    if not kept:
        what = "has no turns" if not turns else "has only empty turns"
        return None, defects + [Defect("empty_conversation", f"the conversation {what}")]
    start = next((i for i, t in enumerate(kept) if t[1] != "system"), len(kept))
    end = next((i for i in range(start, len(kept)) if kept[i][1] != "assistant"), len(kept))
    if end > start:
        defects.append(Defect("leading_assistant", f"{_where(column, kept[start][0])} is an assistant turn before "
                                                   f"any user turn ({end - start} such turn(s)): it answers nothing"))
        kept = kept[:start] + kept[end:]
    messages: list[dict] = []
    origin: list[int | str] = []
    for at, role, text in kept:
        if messages and messages[-1]["role"] == role:
            defects.append(Defect("consecutive_same_role", f"{_where(column, origin[-1])} and {_where(column, at)} "
                                                           f"are both '{role}' turns"))
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": role, "content": text})
            origin.append(at)
    if not any(m["role"] == "assistant" for m in messages):
        return None, defects + [Defect("no_assistant_turn", "the conversation has no assistant turn: "
                                                            "nothing to train on")]
    return messages, defects


class Converter:
    """One file's rows → (``messages`` row or None, defects). With format `auto`, the first row
    whose columns show a format fixes it for the rest of the file."""

    def __init__(self, spec: ConversationFormat):
        self.spec = spec
        self.format = None if spec.format == "auto" else spec.format

    def __call__(self, row: object) -> tuple[dict | None, list[Defect]]:
        if not isinstance(row, dict):
            return None, [not_an_object(row)]
        if self.format is None:
            self.format = detect_format(row)
            if self.format is None:
                columns = ", ".join(map(str, row)) or "none"
                return None, [Defect("missing_field", f"no conversation columns (columns: {columns}); expected "
                                                      "'messages', 'conversations' (ShareGPT) or 'instruction' "
                                                      "+ 'output' (Alpaca), or set `format:`")]
        turns, defects = _TURNS[self.format](row, self.spec.roles)
        if defects:
            return None, defects
        messages, defects = structure(turns, _COLUMNS[self.format][0])
        if messages is None:
            return None, defects
        rest = {k: v for k, v in row.items() if k not in _COLUMNS[self.format]}
        return {"messages": messages, **rest}, defects


class ConversationReader:
    """A `Converter` per file (formats are detected per file), remembering each file's format."""

    def __init__(self, spec: ConversationFormat):
        self.spec = spec
        self._converters: dict[Path, Converter] = {}

    def __call__(self, file: Path) -> Converter:
        self._converters[file] = Converter(self.spec)
        return self._converters[file]

    @property
    def formats(self) -> dict[str, str | None]:
        """file → the format it was read in (None: no row showed one)."""
        return {str(f): c.format for f, c in self._converters.items()}
