"""GRPO: advantages, losses, batch type and trainer."""
