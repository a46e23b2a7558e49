"""One CLI for every job: flags generated from the job's frozen config dataclass.

`parse_config(JobConfig, argv)` reads an optional ``--config file.yaml`` (local or any
fsspec URI), then applies the command-line flags on top. Unknown YAML keys and bad values
are errors that name the file and key. Flags accept both ``--snake_case`` (FlagEmbedding's
spelling) and ``--kebab-case``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args, get_origin

import fsspec
import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A bad config file or flag; the message names the file, key or flag."""


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check/convert one value (from YAML or argparse) against the field type."""
    base, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    if get_origin(base) is Literal:
        if value not in get_args(base):
            raise ConfigError(f"{name}: {value!r} is not one of {list(get_args(base))}")
        return value
    try:
        if base is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise ConfigError(f"{name}: cannot read {value!r} as {base.__name__}") from err
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the dataclass `cls` (+ ``--config``)."""
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").strip().split("\n")[0],
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file (local path or fsspec URI) of settings")
    hints = _field_types(cls)
    for field in dataclasses.fields(cls):
        names = list(dict.fromkeys([f"--{field.name}", f"--{field.name.replace('_', '-')}"]))
        base, _ = _strip_optional(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = f"(default: {default!r})"
        if base is bool:
            parser.add_argument(*names, dest=field.name, nargs="?", const="true", help=help_text)
        elif get_origin(base) is Literal:
            parser.add_argument(*names, dest=field.name, choices=get_args(base), help=help_text)
        else:
            parser.add_argument(*names, dest=field.name, help=help_text)
    return parser


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML mapping from a local path or fsspec URI."""
    try:
        with fsspec.open(path, "r") as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return data


def config_from_dict(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build the frozen config `cls` from `values`; unknown keys and bad types raise."""
    hints = _field_types(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; known: {sorted(hints)}")
    coerced = {k: _coerce(f"{source}: {k}", hints[k], v) for k, v in values.items()}
    try:
        return cls(**coerced)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from err


def parse_config(cls: type[C], argv: list[str] | None = None, description: str | None = None) -> C:
    """Parse ``--config`` YAML then CLI flags (flags win) into the frozen config `cls`."""
    namespace = vars(build_parser(cls, description).parse_args(argv))
    config_path = namespace.pop("config", None)
    values = load_yaml(config_path) if config_path else {}
    source = config_path or "command line"
    return config_from_dict(cls, {**values, **namespace}, source=source)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a config, for sending to Ray workers (rebuild with `config_from_dict`)."""
    return dataclasses.asdict(config)


def start_ray() -> None:
    """Connect to the cluster `RAY_ADDRESS` names, or start a local Ray; the one place jobs
    start Ray (their `run(cfg)` functions expect it started, as tests do with a fixture)."""
    import ray

    if not ray.is_initialized():
        ray.init()


def run_main(
    prog: str,
    cls: type[C],
    job: Callable[[C], object],
    argv: list[str] | None = None,
    errors: tuple[type[Exception], ...] = (),
    uses_ray: bool = True,
) -> int:
    """A job's CLI entry: parse flags/YAML into `cls`, start Ray, run `job`, return the status.

    Bad flags, config or input (`ConfigError`, `ValueError`, `FileNotFoundError` and
    `errors`) print one line ``prog: error: ...`` to stderr and return 2, without a trace.
    Ray starts after the flags parse, so a bad flag answers at once.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = parse_config(cls, argv)
        if uses_ray:
            start_ray()
        job(cfg)
    except (ConfigError, ValueError, FileNotFoundError, *errors) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
