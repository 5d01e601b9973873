"""ShareGPT and Alpaca files with every defect real dumps have: each located and counted, repaired,
skipped or failing by policy, through the reader, `align data check`, `align data convert` and the
SFT data loader (real nano tokenizer)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from align.data import io
from align.data.cli import app
from align.data.formats import conversation_format
from align.data.io import ReadStats, read_conversations, write_jsonl
from align.data.policy import DEFECT_KINDS, REPAIRS, parse_policy
from align.errors import AlignError
from sft_helpers import nano_model, tokenizer  # noqa: F401  (fixtures)

runner = CliRunner()


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": who, "value": text} for who, text in pairs]


# line -> a ShareGPT row (or raw text); the last line is cut off mid-record, with no newline.
SHAREGPT = {
    1: {"id": "ok", "conversations": _turns(("human", "What is 2 + 2?"), ("gpt", "4"))},
    2: {"id": "role-content", "system": "Be brief.",
        "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    3: {"id": "variants", "conversations": _turns(("system", "S"), ("Human", "q"), ("chatgpt", "a"), ("user", "q2"),
                                                  ("bot", "a2"), ("human", "q3"), ("model", "a3"))},
    4: {"id": "empty", "conversations": []},
    5: {"id": "empty-turn", "conversations": _turns(("human", "q"), ("gpt", "  "), ("human", "q2"), ("gpt", "a2"))},
    6: {"id": "leading", "conversations": _turns(("gpt", "How can I help?"), ("human", "q"), ("gpt", "a"))},
    7: {"id": "same-role", "conversations": _turns(("human", "q"), ("gpt", "part 1"), ("gpt", "part 2"))},
    8: {"id": "unknown-role", "conversations": _turns(("human", "weather?"), ("function_call", '{"city": "Oslo"}'),
                                                      ("gpt", "Sunny."))},
    9: '{"id": "broken", "conversations": [{"from": "human", "value": "q"}} oops',
    10: '{"id": "cut", "conversations": [{"from": "human", "va',
}
# What the kept rows read as (messages), by line.
SHAREGPT_KEPT = {
    1: [("user", "What is 2 + 2?"), ("assistant", "4")],
    2: [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")],
    3: [("system", "S"), ("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2"), ("user", "q3"),
        ("assistant", "a3")],
    5: [("user", "q\n\nq2"), ("assistant", "a2")],  # empty turn dropped, then the two user turns merged
    6: [("user", "q"), ("assistant", "a")],
    7: [("user", "q"), ("assistant", "part 1\n\npart 2")],
}
SHAREGPT_DEFECTS = {"empty_conversation": [4], "empty_turn": [5], "consecutive_same_role": [5, 7],
                    "leading_assistant": [6], "unknown_role": [8], "bad_json": [9], "truncated_record": [10]}

# record -> an Alpaca row; the file is one JSON array, cut off inside record 5.
ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "category": "math"},
    {"instruction": "And now?", "input": "", "output": "9", "system": "You add numbers.",
     "history": [["Add 1 and 1.", "2"], ["Add 2 and 2.", ""]]},
    {"instruction": "Say something.", "input": "", "output": ""},
    {"instruction": " ", "input": "", "output": "an answer to nothing"},
    {"instruction": "No answer column.", "input": ""},
]
ALPACA_KEPT = {
    0: [("user", "Add the numbers.\n\n2 and 3"), ("assistant", "5")],
    1: [("system", "You add numbers."), ("user", "Add 1 and 1."), ("assistant", "2"),
        ("user", "Add 2 and 2.\n\nAnd now?"), ("assistant", "9")],
}
ALPACA_DEFECTS = {"empty_turn": [1, 2, 3], "consecutive_same_role": [1], "no_assistant_turn": [2, 3],
                  "leading_assistant": [3], "missing_field": [4], "truncated_record": [5]}


def _messages(pairs) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


@pytest.fixture()
def sharegpt(tmp_path) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in SHAREGPT.values()]
    path = tmp_path / "sharegpt.jsonl"
    path.write_text("\n".join(lines))  # no newline after the last line: cut off
    return path


@pytest.fixture()
def alpaca(tmp_path) -> Path:
    text = json.dumps(ALPACA + [{"instruction": "Cut here.", "input": "", "output": "never written"}], indent=2)
    path = tmp_path / "alpaca.json"
    path.write_text(text[: text.rindex("never")])
    return path


def _locations(path: Path, defects: dict[str, list[int]], unit: str | None) -> dict[str, list[str]]:
    where = (lambda i: f"{path}:{i}") if unit is None else (lambda i: f"{path} {unit} {i}")
    return {kind: [where(i) for i in positions] for kind, positions in defects.items()}


def _assert_stats(stats: dict, path: Path, defects: dict[str, list[int]], unit: str | None, good: int,
                  repaired: int, bad: int) -> None:
    assert (stats["good"], stats["repaired"], stats["bad"]) == (good, repaired, bad)
    assert stats["defects"] == {kind: len(positions) for kind, positions in defects.items()}
    assert stats["locations"] == _locations(path, defects, unit)
    assert set(stats["defects"]) <= set(DEFECT_KINDS)


def test_sharegpt_every_defect_located_counted_and_repaired(sharegpt):
    stats = ReadStats()
    rows = list(read_conversations(sharegpt, stats=stats))
    assert [r["messages"] for r in rows] == [_messages(m) for m in SHAREGPT_KEPT.values()]
    assert [r["id"] for r in rows] == [SHAREGPT[i]["id"] for i in SHAREGPT_KEPT]  # other columns are kept
    _assert_stats(stats.as_dict(), sharegpt, SHAREGPT_DEFECTS, None, good=6, repaired=3, bad=4)
    text = "\n".join(stats.examples)
    for words in (f"{sharegpt}:4: the conversation has no turns",
                  f"{sharegpt}:5: conversations[1] (assistant turn) is empty (repaired: dropped the empty turn)",
                  f"{sharegpt}:5: conversations[0] and conversations[2] are both 'user' turns (repaired:",
                  f"{sharegpt}:6: conversations[0] is an assistant turn before any user turn",
                  f"{sharegpt}:7: conversations[1] and conversations[2] are both 'assistant' turns",
                  f"{sharegpt}:8: conversations[1].from 'function_call' is not a known role",
                  f"{sharegpt}:9: invalid JSON", f"{sharegpt}:10: the last line is not complete JSON"):
        assert words in text


def test_alpaca_json_array_every_defect_located_by_record(alpaca):
    stats = ReadStats()
    rows = list(read_conversations(alpaca, stats=stats))
    assert [r["messages"] for r in rows] == [_messages(m) for m in ALPACA_KEPT.values()]
    assert rows[0]["category"] == "math" and "instruction" not in rows[0]
    _assert_stats(stats.as_dict(), alpaca, ALPACA_DEFECTS, "record", good=2, repaired=1, bad=4)
    cut = next(e for e in stats.examples if "truncated" in e or "cut off" in e)
    text = alpaca.read_text()
    start = text[: text.rindex("\n  {") + 1].count("\n") + 1  # the line record 5 starts on
    assert cut.startswith(f"{alpaca} record 5: the record starting at line {start} is cut off")
    assert f"{alpaca} record 4: no 'output' field" in "\n".join(stats.examples)


def test_policies_skip_fail_and_per_kind(sharegpt):
    skip = ReadStats()
    assert len(list(read_conversations(sharegpt, conversation_format(on_defect="skip"), skip))) == 3
    assert (skip.good, skip.repaired, skip.bad) == (3, 0, 7)
    seen = []
    policy = {"default": "repair", "consecutive_same_role": "fail"}
    with pytest.raises(AlignError) as err:
        for row in read_conversations(sharegpt, conversation_format(on_defect=policy)):
            seen.append(row["id"])
    assert seen == ["ok", "role-content", "variants"]  # line 4 is skipped, line 5 stops the read
    message = str(err.value)
    assert "2 bad conversation row(s)" in message and f"{sharegpt}:5: " in message and f"{sharegpt}:7: " in message
    only_merge = conversation_format(on_defect={"default": "skip", "consecutive_same_role": "repair"})
    assert [r["id"] for r in read_conversations(sharegpt, only_merge)] == ["ok", "role-content", "variants",
                                                                           "same-role"]


def test_role_map_extends_the_defaults(sharegpt):
    fmt = conversation_format(roles={"Function_Call": "assistant"})
    rows = {r["id"]: r["messages"] for r in read_conversations(sharegpt, fmt)}
    assert rows["unknown-role"] == _messages([("user", "weather?"), ("assistant", '{"city": "Oslo"}\n\nSunny.')])
    with pytest.raises(ValueError, match="roles: 'tool' maps to 'function'"):
        conversation_format(roles={"tool": "function"})


def test_policy_values_are_checked():
    assert parse_policy("skip").action("empty_turn") == "skip"
    assert parse_policy("repair").action("unknown_role") == "skip"  # no repair for it: skipped
    assert parse_policy({"unknown_role": "fail"}).outcome(["empty_turn", "unknown_role"]) == "fail"
    with pytest.raises(ValueError, match="did you mean 'empty_turn'"):
        parse_policy({"empty_turns": "skip"})
    with pytest.raises(ValueError, match="unknown_role has no unambiguous repair"):
        parse_policy({"unknown_role": "repair"})
    with pytest.raises(ValueError, match="'ignore' is not one of repair, skip, fail"):
        parse_policy("ignore")
    assert set(REPAIRS) <= set(DEFECT_KINDS)


def test_explicit_format_and_detection_per_file(tmp_path, sharegpt, alpaca):
    stats = ReadStats()
    assert list(read_conversations(sharegpt, conversation_format("alpaca"), stats)) == []
    assert stats.examples[0].startswith(f"{sharegpt}:1: no 'instruction' field (columns: id, conversations)")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    sharegpt.rename(mixed / "a.jsonl")
    alpaca.rename(mixed / "b.json")
    assert len(list(read_conversations(mixed))) == 6 + 2


def test_sharegpt_in_parquet_and_a_datasets_directory(tmp_path):
    from datasets import Dataset

    rows = [{**SHAREGPT[i], "system": ""} for i in (1, 5, 6, 8)]  # one Arrow schema: a system column each
    io.write_parquet(rows, tmp_path / "s.parquet", batch_size=2)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for path in (tmp_path / "s.parquet", tmp_path / "ds"):
        stats = ReadStats()
        kept = list(read_conversations(path, stats=stats))
        assert [r["messages"] for r in kept] == [_messages(SHAREGPT_KEPT[i]) for i in (1, 5, 6)]
        assert stats.locations == {"empty_turn": [f"{path} row 1"], "consecutive_same_role": [f"{path} row 1"],
                                   "leading_assistant": [f"{path} row 2"], "unknown_role": [f"{path} row 3"]}


def test_json_array_reading_across_chunks_and_broken_arrays(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_CHUNK", 7)  # records, strings and numbers all straddle chunk ends
    rows = [{"messages": _messages([("user", f"q{i} " * 3), ("assistant", str(10 ** i))])} for i in range(30)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows, indent=1))
    assert list(read_conversations(path)) == rows
    for text, kind, words in (
            ('[{"messages": []},\n {"x": 1} {"y": 2}]', "bad_json", "expected ',' or ']' after record 1, got '{' "
                                                                   "at line 2"),
            ('[{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},\n',
             "truncated_record", "the file ends at line 2 before the array's closing ']'"),
            ('[{"a": 1},\n {"b": tru},\n {"c": 3}]', "bad_json", "invalid JSON in the record starting at line 2")):
        path.write_text(text)
        stats = ReadStats()
        list(read_conversations(path, stats=stats))
        assert stats.defect_counts[kind] == 1 and words in "\n".join(stats.examples)


def test_cut_gzip_stream_is_a_truncated_record(tmp_path):
    path = tmp_path / "s.jsonl.gz"
    write_jsonl([SHAREGPT[1]] * 2000, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    stats = ReadStats()
    kept = list(read_conversations(path, stats=stats))
    assert len(kept) == stats.good > 0 and stats.defect_counts == {"truncated_record": 1}
    assert stats.locations["truncated_record"] == [f"{path}:{len(kept) + 1}"]


def test_check_cli_reports_counts_and_locations(sharegpt, alpaca):
    result = runner.invoke(app, ["check", str(sharegpt), "--json"])
    assert result.exit_code == 1  # rows are dropped
    report = json.loads(result.output)
    assert report["kind"] == "conversations" and report["formats"] == {str(sharegpt): "sharegpt"}
    _assert_stats(report["rows"], sharegpt, SHAREGPT_DEFECTS, None, good=6, repaired=3, bad=4)
    assert report["roles"] == {"user": 8, "assistant": 8, "system": 2}  # of the kept (repaired) rows

    table = runner.invoke(app, ["check", str(alpaca)], terminal_width=300)
    assert table.exit_code == 1 and "(conversations, alpaca format)" in table.output
    assert f"truncated_record (1): {alpaca} record 5" in table.output
    assert f"empty_turn (3): {alpaca} record 1, {alpaca} record 2, {alpaca} record 3" in table.output

    mapped = json.loads(runner.invoke(app, ["check", str(sharegpt), "--json", "--role", "function_call=assistant",
                                            "--on-defect", "skip", "--on-defect", "bad_json=fail"]).output)
    assert (mapped["rows"]["good"], mapped["rows"]["bad"]) == (3, 7) and "unknown_role" not in mapped["rows"]["defects"]
    bad = runner.invoke(app, ["check", str(sharegpt), "--on-defect", "unknown_role=repair"])
    assert bad.exit_code == 2 and "no unambiguous repair" in bad.output


def test_convert_cli_writes_clean_messages_rows(tmp_path, sharegpt, alpaca):
    out = tmp_path / "clean.jsonl"
    result = runner.invoke(app, ["convert", str(sharegpt), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["written"] == 6 and summary["defects"]["truncated_record"] == 1
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"] for r in written] == [_messages(m) for m in SHAREGPT_KEPT.values()]
    check = json.loads(runner.invoke(app, ["check", str(out), "--json"]).output)
    assert check["formats"] == {str(out): "messages"} and check["rows"]["defects"] == {}

    parquet = tmp_path / "alpaca.parquet"
    table = runner.invoke(app, ["convert", str(alpaca), "--out", str(parquet), "--format", "alpaca"], terminal_width=300)
    assert table.exit_code == 0 and f"wrote 2 conversations to {parquet}" in table.output
    assert f"missing_field (1): {alpaca} record 4" in table.output
    assert [r["messages"] for r in read_conversations(parquet)] == [_messages(m) for m in ALPACA_KEPT.values()]

    failed = runner.invoke(app, ["convert", str(sharegpt), "--out", str(tmp_path / "f.jsonl"), "--on-defect", "fail"])
    assert isinstance(failed.exception, AlignError) and f"{sharegpt}:4: " in str(failed.exception)
    assert not (tmp_path / "f.jsonl").exists() and not list(tmp_path.glob(".partial-*"))


def _assistant_text(tok, row) -> str:
    return tok.decode([t for t, m in zip(row["input_ids"], row["assistant_mask"]) if m])


def test_sft_loads_sharegpt_and_alpaca_sources(tmp_path, sharegpt, alpaca, tokenizer):
    from align.recipe.load import load_recipe
    from align.sft import load_sources

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {{path: {tmp_path}/model}}
stages:
  - name: sft
    kind: sft
    max_seq_len: 256
    data:
      - {{path: {sharegpt}, format: sharegpt, roles: {{function_call: assistant}}, on_defect: {{unknown_role: fail}}}}
      - {{path: {alpaca}}}
""")
    stage = load_recipe(recipe, check_files=False).stages[0]
    # The SFT loader reads each source with its own settings: the role map keeps line 8, whose two
    # assistant turns (the mapped function_call and the answer) are merged.
    full, sizes, stats = load_sources(stage.data, tokenizer, stage, tmp_path / "cache")
    assert sizes == [7, 2] and len(full) == 9
    read = stats[str(sharegpt)]["read"]
    assert (read["good"], read["repaired"], read["bad"]) == (7, 4, 3)
    assert read["locations"]["truncated_record"] == [f"{sharegpt}:10"]
    assert stats[str(alpaca)]["read"]["locations"]["missing_field"] == [f"{alpaca} record 4"]
    kept = {**SHAREGPT_KEPT, 8: [("user", "weather?"), ("assistant", '{"city": "Oslo"}\n\nSunny.')]}
    for row, conv in zip(full, [*(kept[k] for k in sorted(kept)), *ALPACA_KEPT.values()], strict=True):
        assert _assistant_text(tokenizer, row) == "".join(c + "<|im_end|>" for r, c in conv if r == "assistant")

    # With the source's own settings: the role map keeps line 8 (merged), the policy key is honoured.
    from align.data.cache import tokenized_source

    source = stage.data[0]
    kw = dict(max_seq_len=256, overlong="truncate", assistant_only=True, cache_root=tmp_path / "cache")
    ds, st = tokenized_source(source.path, tokenizer, fmt=source.conversation_format(), **kw)
    assert len(ds) == 7 and st["read"]["repaired"] == 4 and st["cached"]  # same settings as the loader: cache hit
    strict = source.model_copy(update={"on_defect": {"consecutive_same_role": "fail"}})
    with pytest.raises(AlignError, match=f"{sharegpt}:5: "):
        tokenized_source(source.path, tokenizer, fmt=strict.conversation_format(), **kw)


def test_recipe_rejects_bad_format_keys(tmp_path):
    from align.recipe.load import load_recipe

    recipe = tmp_path / "r.yaml"
    for source, words in (("{path: d.jsonl, format: vicuna}", "format"),
                          ("{path: d.jsonl, on_defect: {unknown_role: repair}}", "no unambiguous repair"),
                          ("{path: d.jsonl, roles: {tool: function}}", "roles")):
        recipe.write_text(f"model: {{path: m}}\nstages:\n  - {{name: sft, kind: sft, data: [{source}]}}\n")
        with pytest.raises(AlignError, match=words):
            load_recipe(recipe, check_files=False)


def test_gzip_json_array(tmp_path):
    path = tmp_path / "a.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(ALPACA[:2], f)
    assert len(list(read_conversations(path))) == 2
