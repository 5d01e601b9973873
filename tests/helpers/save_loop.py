"""Child processes for the checkpoint tests: save checkpoints of a small model until killed, or
under a file-size limit. Run through a multiprocessing forkserver (fork from a clean process:
forking the pytest process itself can inherit a lock held by one of its threads)."""

from __future__ import annotations

import resource
import signal
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM  # imported here, so the forkserver preloads it

from align.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from align.errors import AlignError

KEEP = 2


def small_model(vocab: int = 256, hidden: int = 32, layers: int = 2, tied: bool = False):
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tied)
    return Qwen2ForCausalLM(config)


def stepped_optimizer(model) -> torch.optim.Optimizer:
    """AdamW after one step, so its state holds exp_avg/exp_avg_sq tensors to save."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    return opt


def save_marked(stage_dir: Path, step: int, model, opt, keep_last: int = KEEP) -> Path:
    """Save checkpoint-<step> with every weight set to `step`, so a load can tell which step it got."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    return save_checkpoint(stage_dir, step, model=model, tokenizer=None, optimizer=opt, scheduler=None,
                           state={"marker": step}, keep_last=keep_last)


def save_forever(stage_dir: Path, ready) -> None:
    """Continue from `latest` and save checkpoint after checkpoint until killed."""
    torch.set_num_threads(1)
    model = small_model()
    opt = stepped_optimizer(model)
    found = latest_checkpoint(stage_dir)
    step = load_checkpoint(found, optimizer=opt)["step"] if found else 0
    ready.set()
    while True:
        step += 1
        save_marked(stage_dir, step, model, opt)


def save_under_fsize_limit(stage_dir: Path, limit: int, conn) -> None:
    """Save step 1, then try step 2 under RLIMIT_FSIZE; send back (exception type, message)."""
    torch.set_num_threads(1)
    model = small_model()
    opt = stepped_optimizer(model)
    save_marked(stage_dir, 1, model, opt)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        save_marked(stage_dir, 2, model, opt)
        conn.send(("saved", ""))
    except AlignError as exc:
        conn.send(("AlignError", str(exc)))
    except BaseException as exc:  # reported to the test, which fails on it
        conn.send((type(exc).__name__, str(exc)))
