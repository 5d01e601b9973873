"""What a read does with a row that has defects: use it repaired, skip it, or stop (`on_defect`).

Every defect kind a read reports is listed in `DEFECT_KINDS`. Three have a repair that is
unambiguous, i.e. that invents no text and leaves no choice to make (`REPAIRS`):
- `empty_turn`: a turn whose text is empty or blank is dropped (it says nothing to learn from);
- `leading_assistant`: assistant turns before the first user turn are dropped (they answer no
  prompt; keeping them would train the model to speak first, inventing a prompt is not a repair);
- `consecutive_same_role`: two turns of the same role in a row are merged into one, joined by a
  blank line (a user who sent two messages, a reply split by the scraper); the order is kept.
Repairs run in that order, so a conversation left without a user+assistant exchange afterwards is
then `empty_conversation` or `no_assistant_turn`. The other kinds (unknown roles, broken JSON, a
file cut off mid-record, wrong types) leave no single right fix: they are skipped or fail.

A `Policy` has a default action and optional per-kind ones; `repair` on a kind without a repair
means `skip`. A row's outcome is the strictest action among its defects: fail > skip > repair.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field

POLICIES = ("repair", "skip", "fail")
KEPT = ("ok", "repair")  # the outcomes whose row is used
REPAIRS = {"empty_turn": "dropped the empty turn",
           "leading_assistant": "dropped the assistant turn(s) before the first user turn",
           "consecutive_same_role": "merged the same-role turns, joined by a blank line"}
DEFECT_KINDS = {
    "bad_json": "a line (or JSON array record) that is not valid JSON",
    "truncated_record": "the file ends inside a record: it was cut off",
    "not_an_object": "a row that is not a JSON object",
    "missing_field": "a column the format needs is absent",
    "wrong_type": "a column or turn field of the wrong type",
    "missing_role": "a turn without a role",
    "unknown_role": "a role the role map does not know (extend it with `roles:`)",
    "empty_messages": "a prompt or response message list that is empty",
    "empty_content": "a prompt or response text that is empty",
    "empty_turn": "a conversation turn with empty text",
    "empty_conversation": "a conversation with no turns (or only empty ones)",
    "leading_assistant": "a conversation whose first non-system turn is the assistant's",
    "consecutive_same_role": "two turns of the same role in a row",
    "no_assistant_turn": "a conversation with no assistant turn: nothing to train on",
    "prompt_not_ending_in_user": "a GRPO prompt that does not end with a user turn",
    "identical_pair": "a preference pair whose chosen and rejected are the same",
}


@dataclass(frozen=True)
class Policy:
    """The action for each defect kind: `per_kind` where set, else `default`."""

    default: str = "repair"
    per_kind: Mapping[str, str] = field(default_factory=dict)

    def action(self, kind: str) -> str:
        wanted = self.per_kind.get(kind, self.default)
        return "skip" if wanted == "repair" and kind not in REPAIRS else wanted

    def outcome(self, kinds: list[str]) -> str:
        """"ok" for a clean row, else the strictest action among its defects' kinds."""
        if not kinds:
            return "ok"
        actions = {self.action(kind) for kind in kinds}
        return next(a for a in ("fail", "skip", "repair") if a in actions)

    def as_dict(self) -> dict[str, str]:
        return {"default": self.default, **dict(sorted(self.per_kind.items()))}


def parse_policy(value: str | Mapping[str, str]) -> Policy:
    """A policy from `repair | skip | fail` or a mapping {kind: action, default: action}.

    Raises ValueError naming the bad key or value and the choices, so the recipe loader and the
    CLI both report it where the user wrote it.
    """
    spec = {"default": value} if isinstance(value, str) else dict(value)
    for kind, action in spec.items():
        if kind != "default" and kind not in DEFECT_KINDS:
            close = difflib.get_close_matches(str(kind), list(DEFECT_KINDS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"on_defect: unknown defect kind {kind!r}; {hint}(kinds: {', '.join(DEFECT_KINDS)})")
        if action not in POLICIES:
            raise ValueError(f"on_defect: {kind}: {action!r} is not one of {', '.join(POLICIES)}")
        if kind != "default" and action == "repair" and kind not in REPAIRS:
            raise ValueError(f"on_defect: {kind} has no unambiguous repair; use skip or fail "
                             f"(repairable: {', '.join(REPAIRS)})")
    default = spec.pop("default", "repair")
    return Policy(default, spec)
