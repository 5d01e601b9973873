"""Loading a recipe: YAML → overrides → strict validation → file checks, with errors a user can act on.

Every error names the file, the YAML line, the dotted path (`stages[1].rollout.engin`) and the fix:
a "did you mean" for unknown keys, the value and the expected type for wrong types.
"""

from __future__ import annotations

import difflib
import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from align.recipe.schema import Recipe
from align.errors import AlignError


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_files: bool = True) -> Recipe:
    """Read, override (`a.b=c`), validate and check a recipe file."""
    path = Path(path)
    data, text = read_yaml_mapping(path, "recipe", "a YAML mapping with `model:` and `stages:` keys")
    for item in overrides or []:
        apply_override(data, item)
    recipe = validate(Recipe, data, path, text, "recipe")
    if check_files:
        check_recipe_files(recipe, path)
    return recipe


def read_yaml_mapping(path: Path, what: str, shape: str) -> tuple[dict, str]:
    """`yaml.safe_load` a file that must hold a mapping; errors name the file and line."""
    if not path.is_file():
        raise AlignError(f"{what} file not found: {path} (check the path)")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise AlignError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise AlignError(f"{path}: a {what} is {shape}")
    return data, text


def validate(model: type[BaseModel], data: dict, path: Path, text: str, what: str):
    """`model.model_validate(data)`, with every problem reported by file, line and key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise AlignError(format_validation_error(exc, path, text, model, what)) from None


# ----------------------------------------------------------------------------------- overrides


def apply_override(data: dict, item: str) -> None:
    """Set `stages.0.lr=1e-5` (or `stages.sft.lr=...` by stage name) in the raw recipe dict.

    The value is parsed as YAML, so numbers, booleans, lists and mappings work as in the file.
    """
    if "=" not in item:
        raise AlignError(f"--set {item!r}: expected KEY=VALUE, e.g. --set stages.0.lr=1e-5")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            idx = _list_index(node, part, where)
            if last:
                node[idx] = _parse_value(item, raw)
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = _parse_value(item, raw)
            else:
                node = node.setdefault(part, {})
        else:
            raise AlignError(f"--set {item!r}: {where!r} is inside a value that is not a mapping or list")


def _parse_value(item: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise AlignError(f"--set {item!r}: the value is not valid YAML ({getattr(exc, 'problem', exc)}); "
                         "quote it, e.g. --set 'key=\"text\"'") from None


def _list_index(node: list, part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        idx = int(part)
        if -len(node) <= idx < len(node):
            return idx
        raise AlignError(f"--set: {where}: index {idx} out of range (the list has {len(node)} items)")
    names = [x.get("name") for x in node if isinstance(x, dict)]
    if part in names:
        return names.index(part)
    raise AlignError(f"--set: {where}: no item named {part!r}; use an index or one of {names}")


# ------------------------------------------------------------------------------ error messages


def format_validation_error(exc: ValidationError, path: Path, text: str,
                            model: type[BaseModel] = Recipe, what: str = "recipe") -> str:
    lines = [f"{path}: the {what} has {exc.error_count()} problem(s):"]
    root = _compose(text)
    for err in exc.errors():
        clean, parents = _walk(model, tuple(err["loc"]))
        dotted = _dotted(clean)
        line = _line_of(root, clean)
        where = f"{path}:{line}" if line else str(path)
        lines.append(f"  {where}: {dotted or '<top level>'}: {_describe(err, parents)}")
    return "\n".join(lines)


def _describe(err: dict, parents: list[type[BaseModel]]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        valid = sorted({f for p in parents for f in p.model_fields})
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
        return f"unknown key {key!r}; {hint}"
    if kind == "missing":
        return "required key is missing"
    if kind.startswith("value_error"):
        return msg.removeprefix("Value error, ")
    got = err.get("input")
    if isinstance(got, (dict, list)):
        return f"{msg} (got a {type(got).__name__})"
    return f"{msg} (got {got!r}, a {type(got).__name__})"


def _candidates(tp: Any) -> list[Any]:
    """Flatten Annotated/Optional/Union into the concrete types a value may have."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _candidates(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [t for a in get_args(tp) for t in _candidates(a) if t is not type(None)]
    return [tp]


def _walk(root: type[BaseModel], loc: tuple) -> tuple[list, list[type[BaseModel]]]:
    """Follow a pydantic error location through the schema: drop discriminator tags and
    validator labels from the path and return the models that own the last key."""
    current: list[Any] = [root]
    clean: list = []
    parents: list[type[BaseModel]] = [root]
    for part in loc:
        if isinstance(part, str) and part.startswith("function-"):
            continue
        models = [t for t in current if isinstance(t, type) and issubclass(t, BaseModel)]
        if isinstance(part, int):
            clean.append(part)
            current = [e for t in current if get_origin(t) is list for e in _candidates(get_args(t)[0])]
            continue
        owners = [m for m in models if part in m.model_fields]
        tagged = [m for m in models if "kind" in m.model_fields
                  and part in get_args(m.model_fields["kind"].annotation)]
        if owners:
            parents = owners
            clean.append(part)
            current = [c for m in owners for c in _candidates(m.model_fields[part].annotation)]
        elif tagged and len(models) > 1:
            current = tagged
        else:
            parents = models or parents
            clean.append(part)
            current = []
    return clean, parents


def _dotted(parts: list) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _compose(text: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None


def _line_of(node: yaml.Node | None, parts: list) -> int | None:
    """1-based line of the deepest YAML node on `parts` (values set by --set have none)."""
    line = None
    for part in parts:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


# ---------------------------------------------------------------------------------- file checks


def check_recipe_files(recipe: Recipe, recipe_path: Path) -> None:
    """Every input path must exist, unless the recipe itself produces it (synth, tiny model)."""
    produced = {str(Path(s.out)) for s in recipe.synth}
    missing: list[str] = []
    if recipe.model.tiny is None and not Path(recipe.model.path).exists():
        missing.append(f"model.path: {recipe.model.path} does not exist "
                       "(point it at a Hugging Face model directory, or add `tiny: {size: tiny}` to build one)")
    for i, stage in enumerate(recipe.stages):
        ptx = getattr(stage, "ptx", None)
        sources = [(field, getattr(stage, field, []) or []) for field in ("data", "eval_data", "prompts", "eval_prompts")]
        for field, srcs in sources + ([("ptx.data", ptx.data)] if ptx is not None else []):
            for j, src in enumerate(srcs):
                if str(Path(src.path)) not in produced and not Path(src.path).exists():
                    missing.append(f"stages[{i}].{field}[{j}].path: {src.path} does not exist "
                                   "(generate it with `align data synth` or list it under `synth:`)")
    if missing:
        raise AlignError(f"{recipe_path}: missing file(s):\n  " + "\n  ".join(missing))
