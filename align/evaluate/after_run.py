"""The evaluation `align train` runs once every stage is done: the recipe's `evaluate:` section,
i.e. `align eval RUN_DIR` with the recipe's settings, written to `<output_dir>/eval/`.

Why in the pipeline and not only as a separate command: the questions a user asks of a finished
run ("did RL keep what SFT taught?", "did preference RL cost refusals?") need every stage's
checkpoint on the same prompts with the same decoding, and should not depend on remembering to
run a second command. The manifest records a hash of the settings and of every evaluated stage's
config, so rerunning a finished recipe does not evaluate again unless something changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from align.checkpoint import write_text_atomic
from align.errors import AlignError
from align.recipe.schema import Recipe


def _policy_stages(recipe: Recipe) -> list[str]:
    cfg = recipe.evaluate
    assert cfg is not None
    return cfg.stages or [s.name for s in recipe.stages if s.kind != "reward_model"]


def _judge_stage(recipe: Recipe) -> str | None:
    """The judge when it names a stage of the recipe (not a model directory)."""
    judge = recipe.evaluate.judge if recipe.evaluate else None
    return judge if judge in {s.name for s in recipe.stages} else None


def _needed_stages(recipe: Recipe) -> list[str]:
    """The stages whose checkpoints the evaluation reads: the policies and a judge stage."""
    judge = _judge_stage(recipe)
    return [*_policy_stages(recipe), *([judge] if judge else [])]


def _stage_final(stages: dict[str, dict[str, Any]], name: str) -> Path:
    entry = stages.get(name, {})
    if entry.get("status") != "done":
        raise AlignError(f"evaluate: stage {name!r} has not finished ({entry.get('status', 'not run')}); "
                         f"run `align train RECIPE --from {name}` first")
    return Path(entry["final"])


def evaluation_hash(recipe: Recipe, stages: dict[str, dict[str, Any]]) -> str:
    """Changes when the evaluate settings or any evaluated stage (or the judge stage) changes, or
    is retrained (`--only`/`--from` keep a stage's config hash but write new weights)."""
    cfg = recipe.evaluate
    assert cfg is not None
    payload = {"evaluate": cfg.model_dump(mode="json"), "seed": recipe.seed,
               "stages": {n: [stages.get(n, {}).get(k) for k in ("config_hash", "finished")]
                          for n in _needed_stages(recipe)}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def ready(recipe: Recipe, stages: dict[str, dict[str, Any]]) -> bool:
    """Every stage the evaluation needs has finished."""
    if recipe.evaluate is None:
        return False
    return all(stages.get(n, {}).get("status") == "done" for n in _needed_stages(recipe))


def run_evaluation(recipe: Recipe, stages: dict[str, dict[str, Any]], console) -> dict[str, Any]:
    """Evaluate the run's policy checkpoints side by side; returns the manifest entry (report path
    and every metric by checkpoint)."""
    from align.evaluate.checkpoints import Checkpoint
    from align.evaluate.context import EvalOptions
    from align.evaluate.report import write_report
    from align.evaluate.runner import evaluate

    cfg = recipe.evaluate
    assert cfg is not None
    checkpoints = [Checkpoint(name, _stage_final(stages, name)) for name in _policy_stages(recipe)]
    baseline = checkpoints[0]  # win rates against the first policy stage, with or without the base column
    if cfg.base_model:
        if "base" in {c.label for c in checkpoints}:
            raise AlignError("evaluate.base_model: a policy stage is already named 'base'; rename the stage "
                             "or set base_model: false")
        checkpoints.insert(0, Checkpoint("base", Path(recipe.model.path)))
    judge_stage = _judge_stage(recipe)
    judge = _stage_final(stages, judge_stage) if judge_stage else Path(cfg.judge) if cfg.judge else None
    out = Path(recipe.output_dir) / "eval"
    options = EvalOptions(out=out, engine=cfg.engine, seed=recipe.seed, limit=cfg.limit, k=tuple(cfg.k),
                          temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                          max_prompt_len=cfg.max_prompt_len, judge=judge, math_strict=cfg.math_strict, baseline=baseline,
                          prompts={suite: Path(path) for suite, path in cfg.prompts.items()})
    console.rule("evaluation: " + " vs ".join(c.label for c in checkpoints))
    results, records = evaluate(checkpoints, cfg.suites, options,
                                progress=lambda c, s: console.print(f"[bold]{c.label}[/] · {s.name}", highlight=False))
    written = write_report(results, out, records)  # the run summary prints the table
    report = Path(written["report"])
    write_text_atomic(report, report.read_text().rstrip("\n") + "\n\n" + compute_table(recipe, stages))
    values = results.to_dict()["suites"]  # NaN -> None, as in results.json
    metrics = {f"{suite}/{name}": metric for suite, names in values.items() for name, metric in names.items()}
    return {"status": "done", "report": str(written["report"]), "metrics": metrics}


def compute_table(recipe: Recipe, stages: dict[str, dict[str, Any]]) -> str:
    """Markdown: what each stage spent (samples generated, tokens trained, wall time), so branches
    that reach the same table by different routes — SFT → DPO against SFT → reward model → GRPO —
    are compared at their cost too. From each stage's summary in the manifest; – where a stage
    kind does not count that quantity."""
    rows = ["## Compute by stage", "", "| stage | kind | starts from | samples generated | tokens trained | time (s) |",
            "|---|---|---|---|---|---|"]
    for stage in recipe.stages:
        summary = stages.get(stage.name, {}).get("summary", {})
        cells = [summary.get(k) for k in ("samples", "tokens", "time_s")]
        rows.append(f"| {stage.name} | {stage.kind} | {stage.init} | " + " | ".join(
            "–" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.1f}" for v in cells) + " |")
    return "\n".join(rows) + "\n"
