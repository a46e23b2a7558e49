"""One CLI for every job: flags generated from the job's frozen config dataclass.

`parse_config(JobConfig, argv)` reads an optional ``--config file.yaml`` (local or any
fsspec URI), then applies the command-line flags on top. Unknown YAML keys and bad values
are errors that name the file and key. Flags accept both ``--snake_case`` (FlagEmbedding's
spelling) and ``--kebab-case``. A field whose type is itself a dataclass is an option group
(`pipelines.common.encode_options.EncodeOptions`): its fields are top-level flags and YAML keys,
so every job that nests it has the same flags, defaults and checks. A class's ``ALIASES``
keep older flag spellings working (``--model_name_or_path`` = ``--model``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args, get_origin

import fsspec
import yaml

from bge_core.errors import InputError
from bge_core.storage import StorageError

C = TypeVar("C")
_RAY_RETRY_NOTE = re.compile(r"\nFailed to .* after \d+/\d+ attempts \(total backoff")
# Failures the user can act on: one line and exit 2 (anything else keeps its traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (InputError, StorageError, FileNotFoundError)


class ConfigError(InputError):
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


def _is_group(tp: Any) -> bool:
    """A nested option group (e.g. `EncodeOptions`): its fields become top-level flags."""
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def flat_fields(cls: type) -> dict[str, tuple[Any, Any]]:
    """Every setting of `cls` as flag name → (type, default), option groups expanded."""
    hints = _field_types(cls)
    out: dict[str, tuple[Any, Any]] = {}
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if _is_group(tp):
            out.update(flat_fields(tp))
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        out[field.name] = (tp, default)
    return out


def aliases(cls: type) -> dict[str, Any]:
    """Older flag spellings (`ALIASES` of `cls` and of its option groups), name → `Alias`."""
    found = dict(getattr(cls, "ALIASES", {}))
    hints = _field_types(cls)
    for field in dataclasses.fields(cls):
        if _is_group(hints[field.name]):
            found.update(aliases(hints[field.name]))
    return found


def _flag_names(name: str) -> list[str]:
    return list(dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]))


def _add_flag(parser: argparse.ArgumentParser, name: str, tp: Any, help_text: str) -> None:
    base, _ = _strip_optional(tp)
    if base is bool:
        parser.add_argument(*_flag_names(name), dest=name, nargs="?", const="true",
                            help=help_text)
    elif get_origin(base) is Literal:
        parser.add_argument(*_flag_names(name), dest=name, choices=get_args(base),
                            help=help_text)
    else:
        parser.add_argument(*_flag_names(name), dest=name, help=help_text)


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per setting of `cls` (+ aliases and ``--config``)."""
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").strip().split("\n")[0],
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,  # a prefix of a flag is an unknown flag, not a guess
    )
    parser.add_argument("--config", help="YAML file (local path or fsspec URI) of settings")
    for name, (tp, default) in flat_fields(cls).items():
        _add_flag(parser, name, tp, f"(default: {default!r})")
    for name, alias in aliases(cls).items():
        _add_flag(parser, name, alias.type, f"alias: {alias.help}")
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


def _expand_aliases(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Replace alias keys by the canonical settings they stand for (those win if both given)."""
    table = aliases(cls)
    out = {k: v for k, v in values.items() if k not in table}
    for name in [k for k in values if k in table]:
        alias = table[name]
        value = _coerce(f"{source}: {name}", alias.type, values[name])
        for key, expanded in alias.expand(value).items():
            out.setdefault(key, expanded)
    return out


def _build(cls: type[C], flat: dict[str, Any], source: str) -> C:
    """Build `cls` from coerced flat values, routing each to its option group."""
    hints = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if _is_group(tp):
            kwargs[field.name] = _build(tp, flat, source)
        elif field.name in flat:
            kwargs[field.name] = flat[field.name]
    return cls(**kwargs)


def _flatten(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Nested group mappings (as `config_to_dict` writes them) → flat keys."""
    hints = _field_types(cls)
    flat = dict(values)
    for field in dataclasses.fields(cls):
        if _is_group(hints[field.name]) and isinstance(flat.get(field.name), dict):
            flat.update(_flatten(hints[field.name], flat.pop(field.name)))
    return flat


def config_from_dict(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build the frozen config `cls` from flat (or nested) `values`; unknown keys raise.

    Keys are the flag names: option groups' fields are top-level keys, aliases allowed.
    """
    values = _expand_aliases(cls, _flatten(cls, values), source)
    fields = flat_fields(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; known: {sorted(fields)}")
    coerced = {k: _coerce(f"{source}: {k}", fields[k][0], v) for k, v in values.items()}
    try:
        return _build(cls, coerced, source)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from err


def make_config(cls: type[C], **settings: Any) -> C:
    """`cls` from settings named as the flags are (option groups flat, aliases allowed)::

        make_config(EmbedConfig, input="corpus/", model="bge-base-en-v1.5", batch_rows=512)
    """
    return config_from_dict(cls, settings, source=cls.__name__)


def parse_config(cls: type[C], argv: list[str] | None = None, description: str | None = None) -> C:
    """Parse ``--config`` YAML then CLI flags (flags win) into the frozen config `cls`."""
    namespace = vars(build_parser(cls, description).parse_args(argv))
    config_path = namespace.pop("config", None)
    values = load_yaml(config_path) if config_path else {}
    source = config_path or "command line"
    merged = {**_expand_aliases(cls, values, source), **_expand_aliases(cls, namespace, source)}
    return config_from_dict(cls, merged, source=source)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a config, for sending to Ray workers (rebuild with `config_from_dict`)."""
    return dataclasses.asdict(config)


def flat_values(config: Any) -> dict[str, Any]:
    """A config's settings by flag name (option groups expanded), e.g. to compare with YAML."""
    return _flatten(type(config), config_to_dict(config))


# For the `runtime_env` env_vars of a Ray started without a dashboard (tests, benchmarks).
# Ray Train runs a PlacementGroupCleaner beside each run: every second it asks the state API
# whether the run's controller is alive, and removes the run's placement group when the
# answer is "no such actor". A Ray without a dashboard still advertises 127.0.0.1:8265 as
# its API server, so the cleaner asks whichever other Ray on the machine holds that port;
# that one knows nothing of the run, and the live run's workers are destroyed ("Destroying
# worker since its placement group was removed"; CI lost the recipe test this way while
# another test's Ray had its dashboard up). A closed loopback port instead makes the query
# fail, which the cleaner treats as "unavailable, keep watching". A Ray with its own
# dashboard (`ray start`, the jobs' `start_ray`) advertises its real port and needs none.
NO_DASHBOARD_ENV: dict[str, str] = {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:9"}


def start_ray() -> None:
    """Connect to the cluster `RAY_ADDRESS` names, or start a local Ray; the one place jobs
    start Ray (their `run(cfg)` functions expect it started, as tests do with a fixture)."""
    import ray

    if not ray.is_initialized():
        ray.init()


def keep_task_errors() -> None:
    """Make Ray Data raise a stage's own exception (inside Ray's task wrapper), not a
    `UserCodeException` that keeps only its text, so `user_error` can tell its kind."""
    from ray.data import DataContext

    DataContext.get_current().raise_original_map_exception = True


def _is_ray_wrapper(err: BaseException) -> bool:
    """Ray's own exception types (task, actor, Data and Train wrappers carry the cause)."""
    return any(c.__module__.split(".")[0] == "ray" for c in type(err).__mro__)


def _wrapped(err: BaseException) -> list[BaseException]:
    """What a Ray wrapper carries: the task's cause, Train's per-worker or controller error."""
    found = [getattr(err, "cause", None), err.__cause__,
             getattr(err, "controller_failure", None)]
    failures = getattr(err, "worker_failures", None)  # Ray Train's WorkerGroupError
    if isinstance(failures, dict):
        found += list(failures.values())
    return [e for e in found if isinstance(e, BaseException)]


def user_error(err: BaseException,
               kinds: tuple[type[BaseException], ...] = USER_ERRORS) -> BaseException | None:
    """The user-facing error `err` is, or carries inside Ray's wrappers; None for a bug.

    Only Ray's wrappers are looked into: an internal error raised ``from`` a bad input is
    still an internal error.
    """
    pending, seen = [err], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if _is_ray_wrapper(current):
            pending += _wrapped(current)
        elif isinstance(current, kinds):
            return current
    return None


def one_line(err: BaseException) -> str:
    """`err`'s message on one line, without the retry advice Ray Data appends to it."""
    text = _RAY_RETRY_NOTE.split(str(err), maxsplit=1)[0]
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def run_main(
    prog: str,
    cls: type[C],
    job: Callable[[C], object],
    argv: list[str] | None = None,
    errors: tuple[type[Exception], ...] = (),
    uses_ray: bool = True,
    preflight: Callable[[C], object] | None = None,
) -> int:
    """A job's CLI entry: parse flags/YAML into `cls`, start Ray, run `job`, return the status.

    Bad input (`InputError`: flags, config, files, records), storage failures
    (`StorageError`, `FileNotFoundError`) and `errors`, raised here or inside a Ray task,
    actor or Train worker, print one line ``prog: error: ...`` to stderr and return 2.
    Anything else is a bug: it propagates with its traceback (exit status 1).
    Ray starts after the flags parse and `preflight(cfg)` (cheap input checks) pass, so a
    bad flag or a missing file answers at once.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = parse_config(cls, argv)
        if preflight is not None:
            preflight(cfg)
        if uses_ray:
            start_ray()
        keep_task_errors()
        job(cfg)
    except Exception as err:
        found = user_error(err, (*USER_ERRORS, *errors))
        if found is None:
            raise
        print(f"{prog}: error: {one_line(found)}", file=sys.stderr)
        return 2
    return 0
