"""Find a reward function by name: built-ins, `package.module:function`, `path/to/file.py:function`.

Parametrised rewards are classes or factories called with the recipe's `kwargs` (TRL's pattern:
`trl.rewards:get_soft_overlong_punishment` with `kwargs: {max_completion_len: 512, soft_punish_cache: 64}`
works as is). A plain function is used as it is; a class is instantiated even without kwargs.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from align.errors import AlignError
from rewards.config import RewardSpec

# name -> "module:attribute", imported on first use so `align rewards list` stays fast.
BUILTINS: dict[str, str] = {
    "math_accuracy": "rewards.accuracy:MathAccuracy",
    "math_steps": "rewards.steps:MathSteps",
    "format": "rewards.rules:Format",
    "length": "rewards.rules:Length",
    "repetition": "rewards.rules:Repetition",
    "rules": "rewards.rules:Rules",
    "code_tests": "rewards.code:CodeTests",
}


def builtin_docs() -> dict[str, str]:
    """Built-in name -> first line of its docstring (for `align rewards list`)."""
    return {name: (inspect.getdoc(_import(path, name)) or "").splitlines()[0] for name, path in BUILTINS.items()}


def resolve(name: str, kwargs: dict[str, Any] | None = None, base_dir: Path | None = None) -> Callable[..., Any]:
    """The reward callable for `name`, its factory applied to `kwargs`.

    `base_dir` anchors relative file paths (the recipe's directory); default: the working directory.
    """
    kwargs = kwargs or {}
    if name in BUILTINS:
        return _instantiate(_import(BUILTINS[name], name), kwargs, name)
    if ":" not in name:
        hint = difflib.get_close_matches(name, BUILTINS, n=1)
        raise AlignError(f"unknown reward `{name}`"
                         + (f"; did you mean `{hint[0]}`?" if hint else "")
                         + f" Built-ins: {', '.join(BUILTINS)}. Your own function: `package.module:function` "
                         "or `path/to/file.py:function`.")
    obj = _import(name, name, base_dir)
    if kwargs or inspect.isclass(obj):
        return _instantiate(obj, kwargs, name)
    if not callable(obj):
        raise AlignError(f"reward `{name}` is a {type(obj).__name__}, not a function")
    return obj


def build(spec: RewardSpec, base_dir: Path | None = None) -> Callable[..., Any]:
    """The callable a recipe's reward entry describes (a function, or a reward-model scorer)."""
    if spec.model is not None:
        from rewards.model import RewardModelScorer

        path = Path(spec.model)
        return RewardModelScorer(path if path.is_absolute() or base_dir is None else base_dir / path, **spec.kwargs)
    return resolve(spec.name, spec.kwargs, base_dir)


def _instantiate(factory: Any, kwargs: dict[str, Any], name: str) -> Callable[..., Any]:
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise AlignError(f"reward `{name}`: bad kwargs {sorted(kwargs)} ({exc}); it takes "
                         f"{_params(factory)}") from None
    except ValueError:  # no signature (builtins): let the call report
        pass
    return factory(**kwargs)


def _params(factory: Any) -> str:
    try:
        return str(inspect.signature(factory))
    except (TypeError, ValueError):
        return "(unknown signature)"


def _import(target: str, name: str, base_dir: Path | None = None) -> Any:
    location, _, attribute = target.rpartition(":")
    if not location or not attribute:
        raise AlignError(f"reward `{name}`: write `package.module:function` or `path/to/file.py:function`")
    module = _load_file(location, name, base_dir) if location.endswith(".py") or "/" in location else None
    if module is None:
        try:
            module = importlib.import_module(location)
        except ImportError as exc:
            raise AlignError(f"reward `{name}`: cannot import module `{location}` ({exc})") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise AlignError(f"reward `{name}`: `{location}` has no attribute `{attribute}`") from None


def _load_file(location: str, name: str, base_dir: Path | None) -> Any:
    path = Path(location)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise AlignError(f"reward `{name}`: file {path} does not exist")
    # A stable module name per file, registered in sys.modules so functions there stay picklable.
    module_name = "align_user_reward_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise AlignError(f"reward `{name}`: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module
