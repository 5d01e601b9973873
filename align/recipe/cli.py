"""`align recipe ...` commands."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)

SET_HELP = "Override a recipe key, e.g. --set stages.0.lr=1e-5 or --set stages.sft.epochs=2 (repeatable)."


@app.command("check")
def check(recipe: Path = typer.Argument(..., help="Recipe YAML."),
          set_: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Validate a recipe and print it fully resolved (every default filled in)."""
    import yaml
    from rich.console import Console
    from rich.syntax import Syntax

    from align.recipe.load import load_recipe

    resolved = load_recipe(recipe, set_)
    console = Console()
    console.print(Syntax(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False), "yaml"))
    console.print(f"[green]ok[/]: {recipe} — {len(resolved.stages)} stage(s): "
                  + " → ".join(f"{s.name} ({s.kind})" for s in resolved.stages))
