"""Reading datasets: every defect kind with its location, skip/fail policies, all file formats.
ShareGPT / Alpaca rows, repairs and truncated files: tests/test_data_formats.py."""

from __future__ import annotations

import json

import pytest

from align.data.formats import conversation_format
from align.data.io import (ReadStats, read_conversations, read_preferences, read_prompts, read_rows, write_jsonl,
                           write_parquet)
from align.errors import AlignError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _write_lines(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


# (defect kind, a conversation line that has it, words its message must contain)
CONVERSATION_DEFECTS = [
    ("bad_json", '{"messages": [', "invalid JSON"),
    ("not_an_object", '["user", "hi"]', "must be a JSON object, got list"),
    ("missing_field", '{"conversations": []}', "no 'messages' field"),
    ("wrong_type", '{"messages": "hi"}', "'messages' must be a list"),
    ("empty_conversation", '{"messages": []}', "the conversation has no turns"),
    ("wrong_type", '{"messages": ["hi"]}', "messages[0] must be an object"),
    ("missing_role", '{"messages": [{"content": "hi"}]}', "messages[0] has no 'role'"),
    ("unknown_role", '{"messages": [{"role": "user", "content": "a"}, {"role": "asistant", "content": "b"}]}',
     "did you mean 'assistant'?"),
    ("unknown_role", '{"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "messages[0].role 'tool' is not a known role; map it on the data source with `roles: {tool:"),
    ("wrong_type", '{"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "b"}]}',
     "messages[0].content must be a string, got int"),
    ("wrong_type", '{"messages": [{"role": "user", "content": [{"type": "text"}]}]}', "join the text parts"),
    ("missing_field", '{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}',
     "messages[0] has no 'content'"),
    # dropped (repair), which leaves an assistant turn first, dropped too: nothing left to train on
    ("empty_turn", '{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}]}',
     "messages[0] (user turn) is empty"),
    ("no_assistant_turn", '{"messages": [{"role": "user", "content": "a"}]}', "no assistant turn"),
]


@pytest.mark.parametrize(("kind", "line", "words"), CONVERSATION_DEFECTS)
def test_each_conversation_defect_names_its_line(tmp_path, kind, line, words):
    # line 1 good, line 2 blank (ignored but counted), line 3 the defect, line 4 good
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD), "", line, json.dumps(GOOD)])
    stats = ReadStats()
    rows = list(read_conversations(path, stats=stats))
    assert rows == [GOOD, GOOD]
    assert (stats.good, stats.bad, stats.defect_counts[kind]) == (2, 1, 1)
    assert stats.examples[0].startswith(f"{path}:3: ")
    assert words in stats.examples[0]


def test_json_array_in_a_jsonl_file_gets_a_hint(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", ["[", json.dumps(GOOD) + ",", "]"])
    stats = ReadStats()
    assert list(read_conversations(path, stats=stats)) == []
    assert stats.examples[0] == f"{path}:1: the file is one JSON document spread over lines; name it .json " \
                                "if it is a JSON array, or write JSON Lines (one object per line)"
    assert list(read_conversations(path.rename(tmp_path / "d.json"))) == [GOOD]


def test_skip_counts_bad_rows_per_kind(tmp_path):
    lines = [json.dumps(GOOD)] * 3 + ['{"messages": [{"role": "user", "content": "a"}]}'] * 2 + ["{oops"]
    stats = ReadStats()
    assert len(list(read_conversations(_write_lines(tmp_path / "d.jsonl", lines), stats=stats))) == 3
    assert stats.as_dict()["defects"] == {"no_assistant_turn": 2, "bad_json": 1}
    assert (stats.good, stats.bad) == (3, 3)


def test_fail_policy_stops_and_lists_defects_with_lines(tmp_path):
    lines = [json.dumps(GOOD), json.dumps(GOOD), "{oops", json.dumps(GOOD),
             '{"messages": [{"role": "bot", "content": "a"}]}', '{"messages": []}']
    path = _write_lines(tmp_path / "d.jsonl", lines)
    seen = []
    with pytest.raises(AlignError) as err:
        for row in read_conversations(path, conversation_format(on_defect="fail")):
            seen.append(row)
    assert seen == [GOOD, GOOD]  # nothing after the first bad row reaches the trainer
    message = str(err.value)
    assert "3 bad conversation row(s)" in message
    for where in (f"{path}:3:", f"{path}:5:", f"{path}:6:"):  # 5: 'bot' is an assistant turn, first
        assert where in message
    assert "on_defect: skip" in message


def test_unknown_policy_and_missing_file_are_user_errors(tmp_path):
    with pytest.raises(AlignError, match="on_error must be one of skip, fail"):
        list(read_rows(tmp_path, "conversations", on_error="ignore"))
    with pytest.raises(AlignError, match="no such file"):
        list(read_conversations(tmp_path / "missing.jsonl"))


PROMPT_DEFECTS = [
    ("missing_field", {"question": "2+2?"}, "no 'prompt' field"),
    ("empty_content", {"prompt": ""}, "prompt.content is empty"),
    ("wrong_type", {"prompt": 3}, "'prompt' must be a list"),
    ("prompt_not_ending_in_user",
     {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "must end with a user"),
    ("unknown_role", {"prompt": [{"role": "usr", "content": "a"}]}, "did you mean 'user'?"),
]


@pytest.mark.parametrize(("kind", "row", "words"), PROMPT_DEFECTS)
def test_prompt_defects(tmp_path, kind, row, words):
    good = {"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4"}
    path = tmp_path / "p.jsonl"
    write_jsonl([good, {"prompt": "plain text is fine", "answer": "1"}, row], path)
    stats = ReadStats()
    assert [r["answer"] for r in read_prompts(path, stats=stats)] == ["4", "1"]
    assert stats.defect_counts == {kind: 1}
    assert stats.examples[0].startswith(f"{path}:3: ") and words in stats.examples[0]


PREFERENCE_DEFECTS = [
    ("missing_field", {"prompt": "q", "chosen": "a"}, "no 'rejected' field"),
    ("identical_pair", {"prompt": "q", "chosen": "a", "rejected": "a"}, "identical"),
    ("no_assistant_turn", {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "'chosen' has no assistant turn"),
    ("empty_content", {"prompt": "q", "chosen": "a", "rejected": " "}, "rejected.content is empty"),
]


@pytest.mark.parametrize(("kind", "row", "words"), PREFERENCE_DEFECTS)
def test_preference_defects(tmp_path, kind, row, words):
    good = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    path = tmp_path / "p.jsonl"
    write_jsonl([good, row], path)
    stats = ReadStats()
    assert list(read_preferences(path, stats=stats)) == [good]
    assert stats.defect_counts == {kind: 1}
    assert stats.examples[0].startswith(f"{path}:2: ") and words in stats.examples[0]


def _parquet_like_rows():
    """Rows with one schema (as Arrow needs) where rows 1 and 3 are bad."""
    def conv(user_role, text):
        return {"messages": [{"role": user_role, "content": text}, {"role": "assistant", "content": "ok"}],
                "category": "safety"}
    return [conv("user", "a"), conv("narrator", "b"), conv("user", "c"), conv("user", "")]


def test_parquet_reader_reports_row_indices(tmp_path):
    path = tmp_path / "d.parquet"
    assert write_parquet(_parquet_like_rows(), path, batch_size=2) == 4  # two row groups
    stats = ReadStats()
    rows = list(read_conversations(path, stats=stats))
    assert [r["messages"][0]["content"] for r in rows] == ["a", "c"]
    assert rows[0]["category"] == "safety"
    assert sorted({e.split(":")[0] for e in stats.examples}) == [f"{path} row 1", f"{path} row 3"]


def test_datasets_directory_reader(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(_parquet_like_rows()).save_to_disk(str(tmp_path / "ds"))
    stats = ReadStats()
    rows = list(read_conversations(tmp_path / "ds", stats=stats))
    assert [r["messages"][0]["content"] for r in rows] == ["a", "c"]
    assert stats.examples[0].startswith(f"{tmp_path / 'ds'} row 1: messages[0].role 'narrator'")

    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(AlignError, match="DatasetDict with splits \\['train'\\]"):
        list(read_conversations(tmp_path / "dd"))
    assert list(read_conversations(tmp_path / "dd" / "train")) == rows


def test_directory_of_files_and_gzip(tmp_path):
    write_jsonl([GOOD], tmp_path / "dir" / "a.jsonl.gz")
    write_parquet([GOOD, GOOD], tmp_path / "dir" / "b.parquet")
    (tmp_path / "dir" / "notes.txt").write_text("ignored")
    assert len(list(read_conversations(tmp_path / "dir"))) == 3
