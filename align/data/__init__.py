"""Conversation and prompt data: schema, validation, synthetic generators, tokenisation."""
