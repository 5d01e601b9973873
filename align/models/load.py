"""Loading models and tokenizers safely from local directories.

`trust_remote_code` is off unless the recipe sets it; weights load from safetensors only, unless
`allow_pickle_weights` is set, and then transformers loads them with `weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path

from align.errors import AlignError

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "auto": "auto"}


def check_weights(path: str | Path, allow_pickle: bool = False) -> None:
    """Refuse a directory whose weights are only pickles (they can execute code on load)."""
    path = Path(path)
    if not path.is_dir():
        raise AlignError(f"model directory not found: {path} (no hub access at run time: "
                         "download the model first and point `model.path` at the directory)")
    has_safe = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))
    if not has_safe and has_pickle and not allow_pickle:
        raise AlignError(f"{path} holds only pickle weights (.bin/.pt), which can run code when "
                         "loaded. Convert them to safetensors, or set `model.allow_pickle_weights: "
                         "true` to load them with torch's weights_only loader.")
    if not has_safe and not has_pickle:
        raise AlignError(f"{path} has no model weights (*.safetensors)")


def _dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, DTYPES[name])


def load_pretrained(auto_class, path: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
                    allow_pickle: bool = False, **kwargs):
    """`auto_class.from_pretrained` with align's safety rules (weights checked, no remote code)."""
    check_weights(path, allow_pickle)
    return auto_class.from_pretrained(
        path, dtype=_dtype(dtype), trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True, **kwargs)


def load_causal_lm(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
                   allow_pickle: bool = False, **kwargs):
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, path, dtype, trust_remote_code, allow_pickle, **kwargs)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise AlignError(f"{path}: the tokenizer has no chat template; conversations need one "
                         "(set `chat_template` in tokenizer_config.json)")
    return tok
