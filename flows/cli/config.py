"""``hierloc run --config``: the PipelineConfig from a JSON file and command-line overrides,
with one-line errors (an unknown key names the keys allowed where it stands)."""

from __future__ import annotations

import json
from pathlib import Path


class ConfigError(ValueError):
    """A --config file that is not valid JSON, or holds unknown keys or bad values."""


def _model_at(model, loc: tuple) -> type | None:
    """The pydantic model class at the nested field path ``loc`` of ``model``."""
    from pydantic import BaseModel

    for name in loc:
        field = getattr(model, "model_fields", {}).get(name)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _describe(model, err: dict) -> str:
    loc = tuple(str(p) for p in err.get("loc", ()))
    where = "at the top level" if len(loc) <= 1 else f"in '{'.'.join(loc[:-1])}'"
    if err.get("type") == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent is not None else "?"
        return f"unknown key '{loc[-1] if loc else ''}' {where}; allowed there: {allowed}"
    got = repr(err.get("input"))
    return f"'{'.'.join(loc)}': {err.get('msg')} (got {got if len(got) <= 80 else got[:77] + '...'})"


def load_config(path: Path | None, overrides: dict):
    """PipelineConfig from a JSON file and command-line overrides; ConfigError with one line
    per problem (an unknown key names the keys allowed where it stands)."""
    from pydantic import ValidationError

    from flows.params import PipelineConfig

    data: dict = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of settings, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(f"{path or 'config'}: {_describe(PipelineConfig, e)}" for e in exc.errors()))


def load_config_or_exit(path: Path | None, overrides: dict):
    """load_config, or one ``error:`` line per problem on stderr and exit code 2 (no traceback)."""
    from flows.cli.common import fail

    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        fail(str(exc))
