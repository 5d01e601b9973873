"""`align recipe ...` commands: `check` (validate, print resolved or explained) and `keys` (the schema).

Both read the documentation from the schema itself (each field's `description=` in
`align/recipe/schema.py`, `rewards/config.py`, `rollout/config.py`), so it is written once. Key paths are
printed the way `--set` takes them: `stages.rl.sampling.temperature`, list items by index or, for
stages, by name; `keys` writes `*` where a recipe has an index or a stage name.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from align.errors import AlignError

app = typer.Typer(no_args_is_help=True)

SET_HELP = "Override a recipe key, e.g. --set stages.0.lr=1e-5 or --set stages.sft.epochs=2 (repeatable)."
EVERY_KIND = "every kind"


@dataclass
class KeyDoc:
    """One line of schema documentation: where the key is, what it holds, what it does."""

    path: str
    field: FieldInfo
    section: str  # heading the key is listed under
    value: Any = PydanticUndefined  # a recipe's value (JSON form), for --explain

    @property
    def default(self) -> Any:
        if self.field.is_required():
            return PydanticUndefined
        return to_jsonable_python(self.field.get_default(call_default_factory=True))


# ------------------------------------------------------------------------------ schema walk


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _sections(annotation: Any) -> tuple[list[type[BaseModel]], bool]:
    """The models a field may hold (through Optional, unions and discriminated unions) and whether
    it holds a list of them; ([], False) for a plain value."""
    from align.recipe.load import _candidates

    models: list[type[BaseModel]] = []
    for tp in _candidates(annotation):
        if get_origin(tp) is list:
            inner = [t for t in _candidates(get_args(tp)[0]) if _is_model(t)]
            if inner:
                return inner, True
        elif _is_model(tp):
            models.append(tp)
    return models, False


def _kind(model: type[BaseModel]) -> str:
    return get_args(model.model_fields["kind"].annotation)[0]


def _same(a: FieldInfo, b: FieldInfo) -> bool:
    return a.annotation == b.annotation and a.description == b.description and a.default == b.default


def schema_keys(model: type[BaseModel], prefix: str = "", section: str = "recipe") -> Iterator[KeyDoc]:
    """Every key of `model`, sections first and their keys after them. A list of several kinds
    (the stages) lists the keys all kinds share once, then each kind's own."""
    for name, field in model.model_fields.items():
        path = prefix + name
        yield KeyDoc(path, field, section)
        models, many = _sections(field.annotation)
        inner = f"{path}.*." if many else f"{path}."
        if len(models) == 1:
            yield from schema_keys(models[0], inner, section)
        elif models:
            first = models[0].model_fields
            shared = {n for n, f in first.items()
                      if all(n in m.model_fields and _same(m.model_fields[n], f) for m in models)}
            for key in schema_keys(models[0], inner, f"{path}: {EVERY_KIND}"):
                if key.path[len(inner):].split(".")[0] in shared:
                    yield key
            for m in models:
                for key in schema_keys(m, inner, f"{path}: kind {_kind(m)}"):
                    if key.path[len(inner):].split(".")[0] not in shared:
                        yield key


def recipe_keys(obj: BaseModel, dumped: dict, prefix: str = "", section: str = "recipe") -> Iterator[KeyDoc]:
    """Every key of a resolved recipe with its value (`dumped` is `obj.model_dump(mode="json")`);
    stages are named by their name, other list items by index."""
    for name, field in type(obj).model_fields.items():
        value, path = getattr(obj, name), prefix + name
        if isinstance(value, BaseModel):
            yield KeyDoc(path, field, section)
            yield from recipe_keys(value, dumped[name], f"{path}.", section)
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            yield KeyDoc(path, field, section)
            for i, item in enumerate(value):
                label = item.name if name == "stages" else i
                inner = f"{path}.{label}"
                yield from recipe_keys(item, dumped[name][i], f"{inner}.",
                                       f"{inner} ({item.kind})" if name == "stages" else section)
        else:
            yield KeyDoc(path, field, section, dumped[name])


# ------------------------------------------------------------------------------ printing


def _show(value: Any) -> str:
    import json

    return value if isinstance(value, str) and value else json.dumps(value, ensure_ascii=False)


def _type_text(annotation: Any) -> str:
    """`float`, `grpo | bnpo`, `list[str] | null`, `section`: the shape of a value, briefly."""
    from align.recipe.load import _candidates

    parts = []
    for tp in _candidates(annotation):
        if get_origin(tp) is Literal:
            parts += [str(a) for a in get_args(tp)]
        elif get_origin(tp) is list:
            models, _ = _sections(tp)
            parts.append("list of sections" if models else f"list[{_type_text(get_args(tp)[0])}]")
        elif get_origin(tp) is dict:
            parts.append("mapping")
        elif _is_model(tp):
            parts.append("section")
        else:
            parts.append("url" if getattr(tp, "__name__", "") == "HttpUrl" else getattr(tp, "__name__", str(tp)))
    if _nullable(annotation):
        parts.append("null")
    return " | ".join(dict.fromkeys(parts))


def _nullable(tp: Any) -> bool:
    if get_origin(tp) is Annotated:
        return _nullable(get_args(tp)[0])
    return get_origin(tp) in (Union, types.UnionType) and any(a is type(None) or _nullable(a) for a in get_args(tp))


def _bounds(field: FieldInfo) -> str:
    marks = []
    for meta in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            if getattr(meta, attr, None) is not None:
                marks.append(f"{sign} {getattr(meta, attr)}")
        if getattr(meta, "min_length", None):
            marks.append("non-empty")
    return f" ({', '.join(marks)})" if marks else ""


def _default_text(key: KeyDoc) -> str:
    default = key.default
    if default is PydanticUndefined:
        return ", required"
    if isinstance(default, dict) and _sections(key.field.annotation)[0]:
        return ""  # a section's defaults are its keys', listed under it
    return f" = {_show(default)}"


def print_keys(keys: list[KeyDoc], explain: bool) -> None:
    """Each key on one line (path, then its value or its type and default), its description wrapped
    under it, indented; a heading wherever the section changes."""
    from rich.console import Console
    from rich.padding import Padding
    from rich.text import Text

    console, section, described = Console(), None, set()
    for key in keys:
        if key.section != section:
            section, described = key.section, set()
            console.print()
            console.rule(Text(section, style="bold"), align="left")
        head = Text(key.path, style="bold cyan")
        if explain and key.value is not PydanticUndefined:
            head.append(f" = {_show(key.value)}")
            if key.default is not PydanticUndefined and key.value != key.default:
                head.append(f"  (default {_show(key.default)})", style="yellow")
        elif not explain:
            head.append(f": {_type_text(key.field.annotation)}{_bounds(key.field)}{_default_text(key)}",
                        style="green")
        console.print(head)
        if id(key.field) not in described:  # list items of one section: described at the first only
            described.add(id(key.field))
            console.print(Padding(Text(key.field.description or "(undocumented)"), (0, 0, 0, 4), expand=False))


# ------------------------------------------------------------------------------ commands


@app.command("check")
def check(recipe: Path = typer.Argument(..., help="Recipe YAML."),
          set_: list[str] = typer.Option([], "--set", help=SET_HELP),
          explain: bool = typer.Option(False, "--explain",
                                       help="Print every key with its value and what it does.")) -> None:
    """Validate a recipe and print it fully resolved (every default filled in)."""
    import yaml
    from rich.console import Console
    from rich.syntax import Syntax

    from align.recipe.load import load_recipe

    resolved = load_recipe(recipe, set_)
    console = Console()
    if explain:
        print_keys(list(recipe_keys(resolved, resolved.model_dump(mode="json"))), explain=True)
    else:
        console.print(Syntax(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False), "yaml"))
    console.print(f"[green]ok[/]: {recipe} — {len(resolved.stages)} stage(s): "
                  + " → ".join(f"{s.name} ({s.kind})" for s in resolved.stages))


@app.command("keys")
def keys(match: str = typer.Argument("", help="Only keys whose path contains this text, e.g. epsilon."),
         kind: str | None = typer.Option(None, "--kind", help="Only the keys of one stage kind: sft, "
                                                               "reward_model or grpo.")) -> None:
    """Print every recipe key with its type, default and what it does (no recipe needed)."""
    from align.recipe.schema import Recipe

    found = list(schema_keys(Recipe))
    if kind is not None:
        kinds = sorted({k.section.rsplit(" ", 1)[-1] for k in found if " kind " in k.section})
        if kind not in kinds:
            raise AlignError(f"--kind {kind!r}: choose one of {', '.join(kinds)}")
        found = [k for k in found if k.section.endswith((f"kind {kind}", EVERY_KIND))]
    found = [k for k in found if match.lower() in k.path.lower()]
    if not found:
        raise AlignError(f"no recipe key contains {match!r}; run `align recipe keys` for all of them")
    print_keys(found, explain=False)
