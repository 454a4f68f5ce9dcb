"""Configuration machinery: Hydra composes ``config/``, pydantic decides.

Entry points convert the composed DictConfig to plain data and validate it with
``extra="forbid"`` models (``training.config`` holds the run's schema; every component's schema
lives beside the component). ``validate_model`` raises ``ConfigError`` whose message names the
dotted path, what is wrong and, for unknown keys, the close matches and the allowed ones;
``validate_named`` picks a schema from a registry by the section's ``name``. Entry points pass
their command line through ``lenient_overrides`` first, so that ``lrr=1`` gets the same answer
as ``+lrr=1`` instead of Hydra's "Could not override".
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

from pydantic import BaseModel, ValidationError

from utils.registry import Registry
from utils.schema import ConfigError

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "compose",
    "lenient_overrides",
    "validate_model",
    "validate_named",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"

M = TypeVar("M", bound=BaseModel)


# ----------------------------------------------------------------------------------------------
# Validation with readable errors
# ----------------------------------------------------------------------------------------------
def _unwrap(annotation: Any) -> Any:
    """Strip Optional/Annotated/SerializeAsAny down to the class or container type."""
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    return annotation


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the last element of ``loc``."""
    current: Any = model
    for part in loc[:-1]:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) in (list, tuple) and isinstance(part, int):
            current = get_args(current)[0]
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def format_validation_error(
    error: ValidationError, model: type[BaseModel], prefix: str = ""
) -> str:
    """One line per problem: ``<dotted.path>: <what is wrong>``; for a typo, the allowed keys
    and the close matches among them (``lrr: unknown key; allowed keys here: ...; did you mean
    lr?``)."""
    lines = []
    for err in error.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in (*([prefix] if prefix else []), *loc)) or "config"
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc)
            fields = sorted(owner.model_fields) if owner else []
            line = f"{path}: unknown key; allowed keys here: {', '.join(fields) or '?'}"
            close = difflib.get_close_matches(str(loc[-1]), fields, n=3)
            lines.append(line + (f"; did you mean {' or '.join(close)}?" if close else ""))
        elif err["type"] == "missing":
            lines.append(f"{path}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            got = "" if isinstance(value, dict | BaseModel) else f" (got {value!r})"
            lines.append(f"{path}: {msg}{got}")
    return "; ".join(lines)


def validate_model(model: type[M], data: Any, prefix: str = "") -> M:
    """``model.model_validate(data)`` raising ``ConfigError`` with readable paths."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model, prefix)) from None


def validate_named(registry: Registry[type[M]], data: Any, path: str) -> M:
    """Validate ``data`` (a mapping with a ``name``) with the schema registered under that
    name; the name becomes canonical (aliases resolved)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'name' key (got {data!r})")
    if "name" not in data:
        raise ConfigError(f"{path}.name: required key is missing; choose one of: "
                          f"{', '.join(registry.names())}")  # fmt: skip
    try:
        canonical = registry.canonical(str(data["name"]))
    except ValueError as e:
        raise ConfigError(f"{path}.name: {e}") from None
    return validate_model(registry.get(canonical), {**data, "name": canonical}, prefix=path)


# Hydra options whose value is the next argument (``-cn NAME``, ``-sc install=bash``).
_VALUE_FLAGS = frozenset(
    {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-c", "--cfg",
     "-p", "--package", "-sc", "--shell-completion", "-i", "--info", "--experimental-rerun"}
)  # fmt: skip


def lenient_overrides(args: Sequence[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    """Hydra command-line arguments with every plain ``key=value`` override made ``++key=value``.

    Hydra refuses to override a key the composed config lacks ("Could not override 'lrr'",
    several lines, exit 1) before the entry point can say anything; ``++`` sets the key whether
    or not it exists, which for existing keys is exactly a plain override, so the unknown key
    reaches the validation and gets its one line, as ``+lrr=1`` does. Left as they are: options
    and their values, ``+``/``++``/``~`` overrides, config-group choices (``arch=trm``: a folder
    of ``config_dir``), package overrides (``key@pkg=...``) and ``hydra.*``. Call it on
    ``sys.argv[1:]`` before the ``@hydra.main`` function runs.
    """
    out: list[str] = []
    takes_value = False
    for arg in args:
        key = arg.split("=", 1)[0]
        plain = "=" in arg and not takes_value and not arg.startswith(("-", "+", "~"))
        takes_value = arg in _VALUE_FLAGS
        if (
            plain
            and key
            and "@" not in key
            and "/" not in key
            and key.split(".")[0] != "hydra"
            and not (config_dir / key).is_dir()
        ):
            arg = f"++{arg}"
        out.append(arg)
    return out


def compose(config_name: str = "cfg_pretrain", overrides: list[str] | None = None) -> Any:
    """Compose ``config/<config_name>.yaml`` with Hydra's compose API (tests, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides or [])
