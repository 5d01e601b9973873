"""The `align` command. Thin: parses arguments, then calls library functions.

Heavy imports (torch, transformers, vllm) happen inside commands so `align --help` is instant.
Sub-command groups live next to the code they drive (align.data.cli, rewards.cli, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from align.errors import AlignError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Align language models: SFT, reward models, two-stage GRPO, evaluation.")


def _register_subapps() -> None:
    from align.data.cli import app as data_app
    from align.evaluate.cli import eval_command
    from align.models.cli import app as model_app
    from align.recipe.cli import app as recipe_app
    from rewards.cli import app as rewards_app
    from rollout.cli import app as rollout_app

    app.add_typer(recipe_app, name="recipe", help="Validate and print recipes.")
    app.add_typer(data_app, name="data", help="Check and synthesise conversation data.")
    app.add_typer(model_app, name="model", help="Build tiny offline models.")
    app.add_typer(rewards_app, name="rewards", help="List and try reward functions.")
    app.add_typer(rollout_app, name="rollout", help="Serve rollout workers.")
    app.command("eval")(eval_command)


_register_subapps()


@app.command("train")
def train(recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
          set_: list[str] = typer.Option([], "--set", help="Override a key: --set stages.0.lr=1e-5"),
          only: str | None = typer.Option(None, "--only", help="Run just this stage."),
          start: str | None = typer.Option(None, "--from", help="Rerun from this stage on."),
          dry_run: bool = typer.Option(False, "--dry-run",
                                       help="Resolve and print steps, tokens and memory; load no weights.")) -> None:
    """Run a recipe's stages in order; rerunning resumes where it stopped."""
    from align.recipe.load import load_recipe

    resolved = load_recipe(recipe, set_, check_files=not dry_run)
    if dry_run:
        from align.recipe.dry_run import print_plan

        print_plan(resolved)
        return
    from align.pipeline import run_pipeline

    run_pipeline(resolved, only=only, start=start)


def main() -> None:
    """Console entry point: AlignError becomes a one-paragraph message and exit code 2."""
    try:
        app()
    except AlignError as exc:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
