"""Fuzzed recipes, data rows and reward outputs: the only failure a user can see is AlignError.

The recipe fuzzers also mix in inputs that must load (the valid recipe with optional keys left out,
with a YAML comment appended, with sound overrides) and check a minimum share of loaded recipes, so
they would fail if load_recipe refused everything.

Example counts (kept small enough for the whole file to run in well under a minute):
recipes 300 dicts + 300 YAML texts + 300 mutations + 200 overrides, data rows 300 files per mode,
reward outputs 400.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from align.errors import AlignError

ROOT = Path(__file__).resolve().parents[1]
VALID = yaml.safe_load((ROOT / "recipes" / "tests" / "grpo_tiny.yaml").read_text())
# Shares of fuzzed recipes that must load. Measured (hypothesis 6.170, derandomized): dicts 177/300,
# YAML text 144/300, mutations 71/300, overrides 106/200; each floor is about half of that.
FLOOR_DICTS, FLOOR_TEXT, FLOOR_MUTATIONS, FLOOR_OVERRIDES = 0.3, 0.25, 0.12, 0.25


def fuzz(n: int):
    """Seeded (derandomized) so a failure reproduces; no deadline (the machine is shared)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
keys = st.one_of(st.sampled_from(["name", "model", "stages", "kind", "path", "lr", "seed", "rewards", "synth",
                                  "output_dir", "tiny", "sampling", "prompts", "data", "max_steps"]),
                 st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(keys, inner, max_size=5)),
                           max_leaves=25)


def _load(tmp_path: Path, text: str, overrides: list[str] | None = None) -> bool:
    """True when the recipe loads, False when it is refused with AlignError (anything else fails)."""
    from align.recipe.load import load_recipe

    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_recipe(path, overrides, check_files=False)
    except AlignError:
        return False
    return True


def fuzz_loading(tmp_path_factory, n: int, cases, floor: float) -> None:
    """Load `n` recipes drawn from `cases` ((YAML text, overrides, must_load) triples): each may be
    refused, but only with AlignError, and one marked must_load must load. A fuzzer that only sees
    refusals proves nothing (it would pass if load_recipe refused everything), so the unmutated
    recipe must load and at least `floor` of the drawn recipes must too."""
    accepted: list[bool] = []

    @fuzz(n)
    @given(case=cases)
    def load(case):
        text, overrides, must_load = case
        accepted.append(_load(tmp_path_factory.mktemp("r"), text, overrides))
        assert accepted[-1] or not must_load, case

    load()
    assert _load(tmp_path_factory.mktemp("valid"), VALID_TEXT), "the unmutated recipe must load"
    assert len(accepted) >= n // 2, f"only {len(accepted)} examples ran"
    share = sum(accepted) / len(accepted)
    assert share >= floor, f"{sum(accepted)} of {len(accepted)} fuzzed recipes loaded ({share:.0%} < {floor:.0%})"


VALID_TEXT = yaml.safe_dump(VALID)
# keys the recipe may leave out (the schema has a default for each)
OPTIONAL = [("name",), ("output_dir",), ("seed",), ("synth",), ("stages", 0, "eval_prompts"), ("stages", 0, "beta"),
            ("stages", 0, "sampling"), ("stages", 0, "save_steps"), ("stages", 0, "max_steps"),
            ("stages", 0, "rewards", 1, "weight"), ("model", "tiny")]


def _variant(drop: list[tuple], name: str) -> dict:
    """VALID without some optional keys and with any text as its name: a recipe that must load."""
    data = copy.deepcopy(VALID)
    for path in drop:
        node = data
        for part in path[:-1]:
            node = node[part]
        node.pop(path[-1], None)
    data["name"] = name
    return data


def refused_or_not(values):
    """Cases from a strategy of YAML documents that may or may not be recipes."""
    return values.map(lambda data: (yaml.safe_dump(data), None, False))


valid_dicts = st.builds(_variant, st.lists(st.sampled_from(OPTIONAL), unique=True), st.text(max_size=20))
valid_overrides = st.lists(st.one_of(
    st.floats(1e-7, 1.0).map(lambda x: f"stages.rl.lr={x:.3e}"),
    st.integers(2, 64).map(lambda n: f"stages.0.group_size={n}"),
    st.integers(-10**6, 10**6).map(lambda n: f"seed={n}"),
    st.floats(0.05, 2.0).map(lambda t: f"stages.rl.sampling.temperature={t}"),
    st.sampled_from(["grpo", "bnpo", "dr_grpo", "dapo"]).map(lambda v: f"stages.rl.loss_type={v}")), max_size=3)
# printable, no line breaks: a YAML comment of such text never changes the recipe
comment = st.text(st.characters(categories=("L", "N", "P", "S", "Zs")), max_size=40)


def test_random_recipe_dicts(tmp_path_factory):
    fuzz_loading(tmp_path_factory, 300, st.one_of(
        refused_or_not(json_values), valid_dicts.map(lambda data: (yaml.safe_dump(data), None, True))), FLOOR_DICTS)


def test_random_yaml_text(tmp_path_factory):
    text = st.text(alphabet=st.one_of(st.sampled_from(list("abcdekmst:-[]{}!&*|>'\"#%@`,.0123456789 \n\t")),
                                      st.characters(exclude_categories=("Cs",))), max_size=200)
    fuzz_loading(tmp_path_factory, 300, st.one_of(
        text.map(lambda t: (t, None, False)), comment.map(lambda c: (f"{VALID_TEXT}# {c}\n", None, True))), FLOOR_TEXT)


def _paths(node, prefix=()):
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        yield from _paths(v, (*prefix, k))


PATHS = [p for p in _paths(VALID) if p]


def _mutated(path: tuple, value, delete: bool) -> dict:
    data = copy.deepcopy(VALID)
    node = data
    for part in path[:-1]:
        node = node[part]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


def test_mutations_of_a_valid_recipe(tmp_path_factory):
    mutations = st.builds(_mutated, st.sampled_from(PATHS), json_values, st.booleans())
    fuzz_loading(tmp_path_factory, 300, refused_or_not(mutations), FLOOR_MUTATIONS)


def test_random_overrides(tmp_path_factory):
    overrides = st.lists(st.text(max_size=30) | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
        [".".join(map(str, p)) for p in PATHS] + ["stages.9.lr", "stages.rl.lr", "x.y.z", "stages.-1"]),
        st.text(max_size=15)), max_size=3)
    fuzz_loading(tmp_path_factory, 200, st.one_of(
        overrides.map(lambda o: (VALID_TEXT, o, False)), valid_overrides.map(lambda o: (VALID_TEXT, o, True))),
        FLOOR_OVERRIDES)


lines = st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=40).map(
    lambda b: b.replace(b"\n", b" ")),
    st.sampled_from([b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
                     b'{"prompt": "2+2?", "answer": "4"}', b'{"prompt": "p", "chosen": "a", "rejected": "b"}',
                     b'{"messages": [{"role": "usr", "content": 3}]}', b"[", b"\xff\xfe"]))


@fuzz(600)
@given(rows=st.lists(lines, max_size=12), kind=st.sampled_from(["conversations", "prompts", "preferences"]),
       mode=st.sampled_from(["skip", "fail"]))
def test_random_data_rows(tmp_path_factory, rows, kind, mode):
    from align.data.io import ReadStats, read_rows

    path = tmp_path_factory.mktemp("d") / "rows.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    stats = ReadStats()
    try:
        good = list(read_rows(path, kind, on_error=mode, stats=stats))
    except AlignError:
        assert mode == "fail" and stats.bad > 0
        return
    assert all(isinstance(row, dict) for row in good)
    assert len(good) == stats.good and (mode == "skip" or stats.bad == 0)


outputs = st.one_of(
    st.lists(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30),
                       st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2)), max_size=8),
    st.none(), st.text(max_size=10), st.integers(), st.floats(), st.binary(max_size=4),
    st.dictionaries(st.text(max_size=3), st.floats(), max_size=4),
    st.sampled_from([ValueError("bad"), RuntimeError("boom"), ZeroDivisionError(), KeyError("k"),
                     RecursionError(), MemoryError()]))


@fuzz(400)
@given(output=outputs, n=st.integers(1, 6), normalize=st.sampled_from(["none", "batch", "running"]))
def test_random_reward_outputs(output, n, normalize):
    import helpers.fuzz_rewards as scripted
    from rewards.config import RewardSpec
    from rewards.reward_set import RewardSet

    scripted.OUTPUT = output
    suite = RewardSet([RewardSpec(name="helpers.fuzz_rewards:scripted", fallback=0.25, normalize=normalize),
                         RewardSpec(name="format")])
    try:
        scored = suite(["q"] * n, ["<answer>1</answer>"] * n)
    except AlignError:
        return
    assert len(scored.total) == n
    assert all(v is None or math.isfinite(v) for v in scored.total)
    values = scored.components["scripted"]
    assert len(values) == n and all(v is None or math.isfinite(v) for v in values)
    failed = scored.metrics["rewards/scripted/failures"]
    assert (failed == 0) == (scored.errors.get("scripted") is None)
