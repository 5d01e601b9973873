"""The `align` command. Thin: parses arguments, then calls library functions.

Heavy imports (torch, transformers, vllm) happen inside commands so `align --help` is instant.
Sub-command groups live next to the code they drive (align.data.cli, rewards.cli, ...).
"""

from __future__ import annotations

import sys

import typer

from align.errors import AlignError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Align language models: SFT, reward models, two-stage GRPO, evaluation.")


def _register_subapps() -> None:
    from align.data.cli import app as data_app
    from align.models.cli import app as model_app
    from align.recipe_cli import app as recipe_app
    from rewards.cli import app as rewards_app
    from rollout.cli import app as rollout_app

    app.add_typer(recipe_app, name="recipe", help="Validate and print recipes.")
    app.add_typer(data_app, name="data", help="Check and synthesise conversation data.")
    app.add_typer(model_app, name="model", help="Build tiny offline models.")
    app.add_typer(rewards_app, name="rewards", help="List and try reward functions.")
    app.add_typer(rollout_app, name="rollout", help="Serve rollout workers.")


_register_subapps()


def main() -> None:
    """Console entry point: AlignError becomes a one-paragraph message and exit code 2."""
    try:
        app()
    except AlignError as exc:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
