"""align: SFT → GRPO reasoning → GRPO preference, the way DeepSeek-V2 was aligned."""

__version__ = "0.1.0"
