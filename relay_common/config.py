"""Typed TOML configuration shared by both daemons.

Each daemon describes its configuration as frozen dataclasses; `load_config`
maps a TOML document onto them and validates it, so that every mistake is
reported with the file, the dotted key and what is wrong ("router.toml:
dicom.listen_port: expected an integer, got 'abc'"). Unknown keys are errors:
a misspelt key silently ignored is how a hospital ends up sharing the wrong
archive.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from relay_common.syslog_tls import parse_collector

T = TypeVar("T")


class InvalidValue(ValueError):
    """Raised by a schema's __post_init__ to say which of its keys is wrong.

    A check that finds several wrong keys raises the first with the others in `also`
    (`InvalidValue.all(found)`), so that check-config reports them all.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        self.also: list[InvalidValue] = []
        super().__init__(f"{key}: {problem}")

    @staticmethod
    def all(found: list[InvalidValue]) -> None:
        """Raise the problems `found` (if any) as one InvalidValue."""
        if found:
            found[0].also = found[1:]
            raise found[0]


class ConfigError(Exception):
    """A configuration problem, phrased for the person who edits the file.

    `problems` lists every problem found (check-config reports them all at once); this
    error's own source, key and problem are the first one's.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        self.problems: list[ConfigError] = [self]
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + problem)

    @classmethod
    def several(cls, problems: list[ConfigError]) -> ConfigError:
        """One error carrying all `problems` (in file order); its text has one line per problem."""
        if len(problems) == 1:
            return problems[0]
        first = problems[0]
        error = cls(first.source, first.key, first.problem)
        error.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in problems)
        error.args = (f"{first.source}: {len(problems)} problems:\n{lines}",)
        return error


class _Failed:
    """Stands for a value that could not be built (its problems are already recorded)."""


FAILED: Any = _Failed()


@dataclasses.dataclass(frozen=True)
class AuditSection:
    """[audit], the same on both daemons."""

    enabled: bool = True
    # JSON-lines audit trail (mode 0600); relative paths are relative to the config file.
    file: Path = Path("audit.jsonl")
    # Optional RFC 5424 copy of the JSON lines to a syslog collector: "udp://HOST:PORT".
    syslog: str = ""
    # DICOM audit messages (PS3.15 A.5) over RFC 5425 syslog/TLS: "tls://HOST:6514" ("" = none).
    collector: str = ""
    # CA that signed the collector's certificate (default: the system's trust store); optional
    # client certificate and key for collectors that require mutual TLS.
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # TLS name to verify when the collector's host is an IP address or differs from its certificate.
    server_name: str = ""
    # While the collector is unreachable messages wait here (0600 files) and are sent in order later;
    # beyond queue_limit_bytes new messages are dropped and counted.
    spool_dir: Path = Path("audit-spool")
    queue_limit_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        found = []
        if self.syslog:
            try:
                # "HOST:PORT" without a scheme was accepted before the check existed: still UDP.
                scheme_ok = self.syslog.startswith("udp://") or "://" not in self.syslog
                host, port = parse_host_port(self.syslog.removeprefix("udp://"), default_host="")
                if not scheme_ok or not host or not port:
                    raise ValueError
            except ValueError:
                found.append(InvalidValue("syslog", f'expected "udp://HOST:PORT", got {self.syslog!r}'))
        if self.collector:
            try:
                parse_collector(self.collector)
            except ValueError as exc:
                found.append(InvalidValue("collector", str(exc)))
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            found.append(InvalidValue(missing, "cert_file and key_file go together"))
        if self.queue_limit_bytes < 0:
            found.append(
                InvalidValue("queue_limit_bytes", "must be 0 (no spool: drop while the collector is down) or more")
            )
        InvalidValue.all(found)


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    """[logging], the same on both daemons."""

    level: typing.Literal["debug", "info", "warning", "error"] = "info"
    format: typing.Literal["auto", "json", "text"] = "auto"


@dataclasses.dataclass(frozen=True)
class MetricsSection:
    """[metrics]; each daemon subclasses it for its own default port."""

    # HOST:PORT of the Prometheus endpoint (http://HOST:PORT/metrics); "" disables it.
    listen: str = ""

    def __post_init__(self) -> None:
        if self.listen:
            try:
                parse_host_port(self.listen)
            except ValueError as exc:
                raise InvalidValue("listen", f'{exc} (or "" to disable metrics)') from None


def load_config(path: str | Path, schema: type[T]) -> T:
    """Read `path` (TOML) into an instance of the dataclass `schema`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read the file: {exc.strerror}") from exc
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(path), "", f"not valid TOML: {exc}") from exc
    return parse_config(document, schema, source=str(path), base_dir=path.parent)


def parse_config(
    document: dict[str, Any], schema: type[T], *, source: str = "<config>", base_dir: Path | None = None
) -> T:
    """Validate an already-parsed mapping against `schema` (see load_config).

    Every problem is collected, not just the first: a ConfigError whose `problems` lists
    them all. (Within one table, the checks of its __post_init__ stop at their first
    problem; checks spanning a table run only when all its keys were valid.)
    """
    problems: list[ConfigError] = []
    instance = _build(schema, document, source, "", base_dir or Path.cwd(), problems)
    if problems:
        raise ConfigError.several(problems)
    return instance


# Durations end in _s, _ms or _h; none of them may be negative (0 means "off" where it is allowed).
_DURATION_SUFFIXES = ("_s", "_ms", "_h")


def _build(cls: type[T], value: Any, source: str, key: str, base_dir: Path, problems: list[ConfigError]) -> T:
    if not isinstance(value, dict):
        problems.append(ConfigError(source, key or "(top level)", f"expected a table, got {_describe(value)}"))
        return FAILED
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    failed = False
    for name in value:
        if name not in fields:
            known = ", ".join(sorted(fields))
            problems.append(ConfigError(source, _join(key, name), f"unknown key (known keys here: {known})"))
            failed = True
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        dotted = _join(key, name)
        if name in value:
            try:
                kwargs[name] = _convert(hints[name], value[name], source, dotted, base_dir, field, problems)
            except ConfigError as exc:
                problems.append(exc)
                kwargs[name] = FAILED
            if kwargs[name] is not FAILED and name.endswith(_DURATION_SUFFIXES):
                if isinstance(kwargs[name], int | float) and kwargs[name] < 0:
                    problems.append(ConfigError(source, dotted, f"must not be negative, got {kwargs[name]!r}"))
                    kwargs[name] = FAILED
        elif dataclasses.is_dataclass(hints[name]):
            # A missing section is validated like an empty one, so errors name the section.
            kwargs[name] = _build(hints[name], {}, source, dotted, base_dir, problems)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            problems.append(ConfigError(source, dotted, "required key is missing"))
            failed = True
        elif isinstance(field.default, Path) and not field.default.is_absolute():
            kwargs[name] = base_dir / field.default  # default paths are relative to the file, like set ones
        if _contains_failed(kwargs.get(name)):
            failed = True
    if failed:
        # Still run the table's own checks on its other keys, with defaults for the failed ones.
        defaults = {name: _default(field) for name, field in fields.items() if _contains_failed(kwargs.get(name))}
        if all(v is not dataclasses.MISSING for v in defaults.values()) and not any(
            n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            for n, f in fields.items()
        ):
            try:
                cls(**{**kwargs, **defaults})
            except InvalidValue as exc:
                for one in [exc, *exc.also]:
                    if one.key not in defaults:
                        problems.append(ConfigError(source, _join(key, one.key), one.problem))
            except (ValueError, TypeError):
                pass  # a check across keys, one of which is already wrong: reported once that is fixed
        return FAILED
    try:
        instance = cls(**kwargs)
    except InvalidValue as exc:
        for one in [exc, *exc.also]:
            problems.append(ConfigError(source, _join(key, one.key), one.problem))
        return FAILED
    except ValueError as exc:  # __post_init__ checks that span several keys
        problems.append(ConfigError(source, key or "(top level)", str(exc)))
        return FAILED
    return instance


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        try:
            return field.default_factory()
        except ValueError:  # a section whose defaults alone are not valid (the bridge's [server])
            return dataclasses.MISSING
    return dataclasses.MISSING


def _contains_failed(value: Any) -> bool:
    return value is FAILED or (isinstance(value, list | tuple) and any(v is FAILED for v in value))


def _convert(
    hint: Any,
    value: Any,
    source: str,
    key: str,
    base_dir: Path,
    field: dataclasses.Field[Any] | None,
    problems: list[ConfigError],
) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if set(options) == {Path, str}:  # a file path or a URL (the bridge's database): URLs stay strings
            is_url = isinstance(value, str) and "://" in value
            return _convert(str if is_url else Path, value, source, key, base_dir, field, problems)
        if len(options) != 1:
            raise TypeError(f"unsupported union in schema at {key}")
        return _convert(options[0], value, source, key, base_dir, field, problems)
    if origin in (list, tuple):
        (item,) = get_args(hint)[:1]
        if not isinstance(value, list):
            raise ConfigError(source, key, f"expected a list, got {_describe(value)}")
        items = []
        for i, v in enumerate(value):
            try:
                items.append(_convert(item, v, source, f"{key}[{i}]", base_dir, None, problems))
            except ConfigError as exc:
                problems.append(exc)
                items.append(FAILED)
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(source, key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, key, base_dir, problems)  # type: ignore[arg-type]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(source, key, f"expected a number, got {_describe(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {_describe(value)}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(source, key, f"expected a file path, got {_describe(value)}")
        if "\0" in value:
            raise ConfigError(source, key, "a file path cannot contain a NUL character")
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (base_dir / p)
    raise TypeError(f"unsupported type {hint!r} in schema at {key}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(value: Any) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    return f"{kind} ({value!r})" if not isinstance(value, dict | list) else kind


def parse_host_port(text: str, *, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """Parse "host:port", "[v6]:port" or ":port" into (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT with a port from 0 to 65535, got {text!r}")
    host = host.strip("[]") or default_host
    return host, int(port)


def secret_from(value: str | None, file: Path | None, env: str, *, what: str) -> str:
    """Resolve a secret: environment variable `env` first, then the file, then the value."""
    from_env = os.environ.get(env)
    if from_env:
        return from_env
    if file is not None:
        try:
            return file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read {what} file {file}: {exc.strerror}") from exc
    if value:
        return value
    raise ValueError(f"no {what}: set it in the file, in a file named by the *_file key, or in ${env}")
