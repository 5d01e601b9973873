"""Synthetic data: deterministic by seed, valid against the schema, and right by recomputation."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from align.data.formats import ConversationFormat, Converter
from align.data.io import write_jsonl
from align.data.schema import VALIDATORS
from align.data.synth import corpus, generate
from align.errors import AlignError

FORMS = [("math", "conversations"), ("math", "prompts"), ("chat", "conversations"),
         ("chat", "prompts"), ("preference", "preferences")]


@pytest.mark.parametrize(("kind", "form"), FORMS)
def test_every_row_is_valid(kind, form):
    if form == "conversations":  # canonical rows: no defect, not even a repairable one, and read as written
        convert = Converter(ConversationFormat(format="messages"))
        rows = list(generate(kind, 3000, seed=1, form=form))
        assert [convert(row) for row in rows] == [(row, []) for row in rows]
        return
    validate = VALIDATORS[form]
    bad = [(i, d) for i, row in enumerate(generate(kind, 3000, seed=1, form=form)) if (d := validate(row))]
    assert bad == []


@pytest.mark.parametrize(("kind", "form"), FORMS)
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, kind, form):
    paths = [tmp_path / f"{i}.jsonl" for i in range(3)]
    for path, seed in zip(paths, (7, 7, 8)):
        write_jsonl(generate(kind, 500, seed=seed, form=form), path)
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b
    assert a != c


# Each template's answer, recomputed from the question text alone.
_EXPRESSION = re.compile(r"^(?:What is|Compute|Calculate) ([\d +*-]+)[?.]$")
_WORD_PROBLEMS = [
    (re.compile(r"has (\d+) \w+ and buys (\d+) more"), lambda a, b: a + b),
    (re.compile(r"has (\d+) \w+ and gives (\d+) to"), lambda a, b: a - b),
    (re.compile(r"has (\d+) bags with (\d+) \w+ in each"), lambda a, b: a * b),
    (re.compile(r"has (\d+) \w+, buys (\d+) more, then gives (\d+) to"), lambda a, b, c: a + b - c),
    (re.compile(r"buys (\d+) packs of (\d+) \w+ and loses (\d+)"), lambda a, b, c: a * b - c),
]


def _solve(question: str) -> int:
    if m := _EXPRESSION.match(question):
        return eval(m.group(1))  # the regex admits only digits, spaces and + - *
    solved = [fn(*map(int, m.groups())) for pattern, fn in _WORD_PROBLEMS if (m := pattern.search(question))]
    assert len(solved) == 1, question
    return solved[0]


def test_math_answers_are_correct_and_formatted():
    rows = list(generate("math", 3000, seed=3))
    difficulties = Counter(row["difficulty"] for row in rows)
    assert set(difficulties) == {"easy", "medium", "hard"}
    for row in rows:
        question, reply = (m["content"] for m in row["messages"])
        answer = _solve(question)
        assert answer >= 0 and row["answer"] == str(answer)
        assert reply.endswith(f" The answer is {answer}.")
        for a, op, b, result in re.findall(r"(\d+) ([+*-]) (\d+) = (\d+)\.", reply):  # the worked line
            assert eval(f"{a} {op} {b}") == int(result)
        assert row["category"] == "math"


def test_math_prompt_form_matches_conversation_form():
    convs = generate("math", 200, seed=5, form="conversations")
    prompts = generate("math", 200, seed=5, form="prompts")
    for conv, prompt in zip(convs, prompts):
        assert prompt["prompt"] == conv["messages"][:1]
        assert (prompt["answer"], prompt["difficulty"]) == (conv["answer"], conv["difficulty"])


def test_worked_share_changes_only_how_answers_are_written():
    worked = list(generate("math", 2000, seed=6))
    mixed = list(generate("math", 2000, seed=6, worked_share=0.3))
    terse = 0
    for full, row in zip(worked, mixed):
        assert row["messages"][0] == full["messages"][0] and row["answer"] == full["answer"]  # same problems
        reply = row["messages"][-1]["content"]
        if reply != full["messages"][-1]["content"]:
            assert reply == f"The answer is {row['answer']}."  # the final sentence alone
            terse += 1
    assert 0.65 < terse / len(mixed) < 0.75
    assert list(generate("math", 50, seed=6, worked_share=0.3)) == mixed[:50]  # deterministic in the seed
    assert all(r["messages"][-1]["content"].startswith("The answer is")
               for r in generate("math", 100, seed=6, worked_share=0.0))
    assert list(generate("math", 100, seed=6, form="prompts", worked_share=0.3)) == \
        list(generate("math", 100, seed=6, form="prompts"))


def test_chat_categories_refusals_and_shapes():
    rows = list(generate("chat", 5000, seed=2, safety_share=0.2))
    categories = Counter(row["category"] for row in rows)
    assert 0.17 < categories["safety"] / len(rows) < 0.23
    for row in rows:
        reply = row["messages"][-1]["content"]
        assert reply.startswith(("I can't", "I'm sorry, but I can't")) == (row["category"] == "safety")
    assert any(row["messages"][0]["role"] == "system" for row in rows)
    assert any(sum(m["role"] == "user" for m in row["messages"]) > 1 for row in rows)
    assert all(row["category"] == "helpfulness" for row in generate("chat", 300, seed=2, safety_share=0.0))


def test_preference_pairs_prefer_help_and_refusal():
    rows = list(generate("preference", 3000, seed=4))
    for row in rows:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected
        if row["category"] == "safety":
            assert chosen.startswith(("I can't", "I'm sorry")) and rejected.startswith("Sure, here is how")
            assert "[details omitted]" in rejected
    assert {row["category"] for row in rows} == {"safety", "helpfulness"}


def test_corpus_is_deterministic_and_covers_every_kind():
    texts = list(corpus(600, seed=0))
    assert texts == list(corpus(600, seed=0)) != list(corpus(600, seed=1))
    joined = "\n".join(texts)
    assert "The answer is" in joined and "can't help" in joined and "[details omitted]" in joined


def test_bad_arguments_are_user_errors():
    with pytest.raises(AlignError, match="choose one of math, chat, preference"):
        next(generate("code", 1))
    with pytest.raises(AlignError, match="has no form 'prompts'"):
        next(generate("preference", 1, form="prompts"))
    with pytest.raises(AlignError, match="worked_share must be between 0 and 1"):
        next(generate("math", 1, worked_share=1.5))
