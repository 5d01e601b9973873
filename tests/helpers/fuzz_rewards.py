"""A reward function whose output the fuzz tests script: `OUTPUT` is returned (or raised) as is."""

from __future__ import annotations

OUTPUT: object = None


def scripted(prompts, completions, **kwargs):
    if isinstance(OUTPUT, BaseException):
        raise OUTPUT
    return OUTPUT


def not_a_number(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)
