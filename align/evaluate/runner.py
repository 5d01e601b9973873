"""Evaluate checkpoints on suites: checkpoint by checkpoint (one model loaded at a time), every
suite on each, into one `Results`."""

from __future__ import annotations

from collections.abc import Sequence

from align.evaluate.checkpoints import Checkpoint
from align.evaluate.context import EvalContext, EvalOptions
from align.evaluate.results import Results
from align.evaluate.suites import Suite, build_suite


def evaluate(checkpoints: Sequence[Checkpoint], suite_names: Sequence[str], options: EvalOptions,
             progress=None) -> tuple[Results, list[dict]]:
    """Run every suite on every checkpoint; returns the results and every scored completion
    (checkpoint, suite, prompt, completion, rewards). Suites are built (and their inputs checked) first, so
    a bad flag or file fails before any model loads."""
    if options.baseline is None:
        options.baseline = checkpoints[0]
    suites: list[Suite] = [build_suite(name, options) for name in suite_names]
    ctx = EvalContext(options)
    results = Results(list(checkpoints), meta=_meta(options, ctx, suites))
    try:
        for ckpt in checkpoints:
            for suite in suites:
                if progress is not None:
                    progress(ckpt, suite)
                ctx.suite = suite.name
                results.add(suite.name, ckpt.label, suite.run(ckpt, ctx), suite.lower_is_better)
            ctx.close()
    finally:
        ctx.close()
    return results, ctx.records


def _meta(options: EvalOptions, ctx: EvalContext, suites: list[Suite]) -> dict:
    """The settings that determine the numbers (for the report; no paths under --out, no times)."""
    return {"engine": ctx.engine_kind, "seed": options.seed, "limit": options.limit, "k": list(options.k),
            "samples": options.n_samples, "temperature": options.temperature,
            "max_new_tokens": options.max_new_tokens, "max_prompt_len": options.max_prompt_len,
            "baseline": options.baseline.label if options.baseline else None,
            "judge": str(options.judge) if options.judge else None,
            "data": {s.name: _source(s, options) for s in suites}}


def _source(suite: Suite, options: EvalOptions) -> str:
    source = getattr(suite, "source", None)
    if source is None:
        return "-"
    try:
        return f"held-out synthetic ({source.relative_to(options.out)})"
    except ValueError:
        return str(source)
