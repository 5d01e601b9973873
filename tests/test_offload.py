"""Offload/reload on a real nano Qwen2 with a real AdamW, on CPU: the storage really moves out and
back, nothing changes bitwise, training with offload around every step equals training without,
and the timeline counts exactly the bytes it moved."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from align.offload import Offloader

STEPS, BATCH, SEQ = 3, 2, 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from align.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("nano"), size="nano", corpus_texts=2000)


@pytest.fixture(scope="module")
def batches(model_dir):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def fresh(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def backward(model, ids) -> None:
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes: equality of these is bitwise equality (-0.0 != 0.0, NaN == NaN)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


def snapshot(model, opt) -> dict[str, torch.Tensor]:
    """Raw bytes of every parameter, gradient and optimizer-state tensor, keyed by name."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = bits(p)
        if p.grad is not None:
            out[f"{name}.grad"] = bits(p.grad)
        for k, v in opt.state.get(p, {}).items():
            out[f"{name}.{k}"] = bits(v)
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def device_tensors(model, opt) -> list[torch.Tensor]:
    params = list(model.parameters())  # deduplicated: tied embeddings count once
    return ([p.data for p in params] + [p.grad for p in params if p.grad is not None]
            + [v for p in params for v in opt.state.get(p, {}).values() if torch.is_tensor(v)])


@pytest.fixture
def trained(model_dir, batches):
    """A model after one AdamW step, with fresh gradients of a second batch: all three kinds exist."""
    model, opt = fresh(model_dir)
    backward(model, batches[0])
    opt.step()
    opt.zero_grad()
    backward(model, batches[1])
    return model, opt


def test_roundtrip_is_bitwise_and_keeps_objects(trained):
    model, opt = trained
    before = snapshot(model, opt)
    assert {k.rsplit(".", 1)[-1] for k in before} >= {"grad", "exp_avg", "exp_avg_sq", "step"}
    params, state_keys = list(model.parameters()), list(opt.state)
    off = Offloader(model, opt)
    off.offload()
    off.reload()
    assert_same(snapshot(model, opt), before)
    # the same Parameter objects, still the ones the optimizer steps
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], params))
    assert list(opt.state) == state_keys
    assert not off.is_offloaded


def test_offloaded_storage_is_released(trained, batches):
    model, opt = trained
    originals = [weakref.ref(t.untyped_storage()) for t in device_tensors(model, opt)]
    assert all(r() is not None for r in originals)
    off = Offloader(model, opt)
    off.offload()
    gc.collect()
    assert all(r() is None for r in originals), "an original device storage is still alive"
    for p in model.parameters():
        assert p.numel() == 0 and p.untyped_storage().nbytes() == 0
        assert p.device == off.device and p.grad is None
        assert all(v.numel() == 0 for v in opt.state[p].values())
    assert off.is_offloaded and off.offload() is None  # a second offload moves nothing
    with pytest.raises(RuntimeError):  # using the model while offloaded fails loudly
        model(input_ids=batches[0])
    off.reload()
    assert off.reload() is None
    backward(model, batches[2])  # usable again


def test_timeline_counts_every_byte(trained):
    model, opt = trained
    expected = sum(t.nbytes for t in device_tensors(model, opt))
    off = Offloader(model, opt)
    with off.offloaded():
        pass
    assert [e.phase for e in off.timeline] == ["offload", "reload"]
    assert [e.bytes_moved for e in off.timeline] == [expected, expected]
    assert all(e.seconds >= 0 and e.device_mem_before > 0 and e.device_mem_after > 0 for e in off.timeline)
    metrics = off.step_metrics()
    assert set(metrics) == {"offload/seconds", "offload/bytes", "reload/seconds", "reload/bytes",
                            "offload/device_mem_freed"}
    assert metrics["offload/bytes"] == metrics["reload/bytes"] == expected
    first = off.timeline[0]
    assert metrics["offload/device_mem_freed"] == first.device_mem_before - first.device_mem_after
    assert off.step_metrics() == {}  # already reported
    assert off.timeline[0].as_dict()["phase"] == "offload"


def test_offload_reloads_when_generation_raises(trained):
    model, opt = trained
    before = snapshot(model, opt)
    off = Offloader(model, opt)
    with pytest.raises(ValueError), off.offloaded():
        raise ValueError("engine died")
    assert not off.is_offloaded
    assert_same(snapshot(model, opt), before)


def train(model_dir, batches, offload: bool) -> dict[str, torch.Tensor]:
    """STEPS AdamW steps; with `offload`, a round trip where generation would run (start of the step,
    optimizer state resident) and one between backward and step (gradients resident)."""
    from accelerate import Accelerator

    model, opt = fresh(model_dir)
    model, opt = Accelerator(cpu=True).prepare(model, opt)  # wrapped optimizer, as the trainer has
    off = Offloader(model, opt)
    for ids in batches:
        if offload:
            with off.offloaded():
                pass
        backward(model, ids)
        if offload:
            off.offload()
            off.reload()
        opt.step()
        opt.zero_grad()
    assert len(off.timeline) == (4 * STEPS if offload else 0)
    return snapshot(model, opt.optimizer)


def test_training_with_offload_matches_without(model_dir, batches):
    plain, offloaded = train(model_dir, batches, False), train(model_dir, batches, True)
    initial = snapshot(*fresh(model_dir))
    assert any(not torch.equal(plain[k], initial[k]) for k in initial)  # training did move the weights
    assert_same(offloaded, plain)
