"""TOML access with key paths: a `Table` knows its path (``listeners[1].upstream``), rejects
unknown keys (suggesting the closest known one) and reads typed values, raising ConfigError
with the path of the offending key."""
from __future__ import annotations

import difflib
import json
import math
import re
from typing import Any

from ..errors import ConfigError, ConfigErrors

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")
MISSING = object()


def key_path(path: str, key: str) -> str:
    part = key if NAME_RE.match(key) and "." not in key else json.dumps(key)
    return f"{path}.{part}" if path else part


def describe(value: Any) -> str:
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string",
             list: "array", dict: "table"}
    kind = kinds.get(type(value), type(value).__name__)
    if isinstance(value, (dict, list)):
        return kind
    text = json.dumps(value) if isinstance(value, (str, bool, int, float)) else repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


def quoted(allowed) -> str:
    return ", ".join(f'"{a}"' for a in allowed)


def raise_all(errors: list[ConfigError]) -> None:
    """Raise what *errors* holds: nothing, the one error itself, or ConfigErrors listing
    every error once (ConfigErrors inside are flattened), in the order found."""
    flat: list[ConfigError] = []
    seen: set[tuple[str, str]] = set()
    for err in errors:
        for one in (err.errors if isinstance(err, ConfigErrors) else [err]):
            if (one.path, one.message) not in seen:
                seen.add((one.path, one.message))
                flat.append(one)
    if len(flat) == 1:
        raise flat[0]
    if flat:
        raise ConfigErrors(flat)


class Collector:
    """Gathers the ConfigErrors of independent parts (sections, listeners, rules) so that a
    file's errors are reported at once rather than the first only."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def attempt(self, fn, *args, **kwargs) -> Any:
        """fn(*args, **kwargs), or None after recording its ConfigError."""
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            self.errors.append(exc)
            return None

    def value(self, fn, *args, fallback: Any = None, **kwargs) -> Any:
        """fn(*args, **kwargs), or *fallback* after recording its ConfigError: one key read
        on its own, so that a wrong value does not hide the errors of the keys after it."""
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            self.errors.append(exc)
            return fallback

    def raise_all(self) -> None:
        raise_all(self.errors)


class Table:
    """One TOML table with its key path; rejects unknown keys on construction (every one of
    them, in one error)."""

    def __init__(self, data: Any, path: str, allowed: tuple[str, ...], what: str = "a table",
                 errors: Collector | None = None):
        """With *errors*, unknown keys are recorded there (and left unread) instead of
        raised, so that the table's other keys are still checked."""
        if not isinstance(data, dict):
            raise ConfigError(path, f"expected {what}, got {describe(data)}")
        unknown = []
        for k in data:
            if k not in allowed:
                hint = difflib.get_close_matches(k, allowed, n=1)
                extra = f'; did you mean "{hint[0]}"?' if hint else \
                    f" (known keys: {', '.join(allowed)})"
                unknown.append(ConfigError(key_path(path, k), f'unknown key "{k}"{extra}'))
        if errors is not None:
            errors.errors.extend(unknown)
        else:
            raise_all(unknown)
        self.data = data
        self.path = path
        self.index: int | None = None       # its place in an array of tables (tables())

    def p(self, key: str) -> str:
        return key_path(self.path, key)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = MISSING) -> Any:
        if key not in self.data:
            if default is MISSING:
                raise ConfigError(self.p(key), "is required")
            return default
        return self.data[key]

    def str(self, key: str, default: Any = MISSING, *, choices=None,
            empty_ok: bool = False) -> Any:
        if key not in self.data:
            return self.raw(key, default)
        value = self.data[key]
        if not isinstance(value, str):
            raise ConfigError(self.p(key), f"expected a string, got {describe(value)}")
        if choices is not None and value not in choices:
            raise ConfigError(self.p(key),
                              f'must be one of {quoted(choices)} (got "{value}")')
        if not value and not empty_ok:
            raise ConfigError(self.p(key), "must not be empty")
        return value

    def choice(self, key: str, kind, default: Any = MISSING, *, choices=None) -> Any:
        """A word among *choices* (by default every member of the enum *kind*, in its order)
        as the member of *kind*; *default* when the key is absent (None stays None)."""
        value = self.str(key, default, choices=tuple(kind) if choices is None else choices)
        return None if value is None else kind(value)

    def bool(self, key: str, default: Any = MISSING) -> Any:
        if key not in self.data:
            return self.raw(key, default)
        value = self.data[key]
        if not isinstance(value, bool):
            raise ConfigError(self.p(key), f"expected true or false, got {describe(value)}")
        return value

    def int(self, key: str, default: Any = MISSING, *, minimum: int | None = None,
            maximum: int | None = None) -> Any:
        if key not in self.data:
            return self.raw(key, default)
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.p(key), f"expected an integer, got {describe(value)}")
        if minimum is not None and value < minimum:
            raise ConfigError(self.p(key), f"must be at least {minimum} (got {value})")
        if maximum is not None and value > maximum:
            raise ConfigError(self.p(key), f"must be at most {maximum} (got {value})")
        return value

    def seconds(self, key: str, default: Any = MISSING, *, zero_ok: bool = False) -> Any:
        if key not in self.data:
            return self.raw(key, default)
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ConfigError(self.p(key),
                              f"expected a number of seconds, got {describe(value)}")
        if value < 0 or (value == 0 and not zero_ok):
            raise ConfigError(self.p(key), f"must be a positive number of seconds (got {value})")
        return float(value)

    def str_list(self, key: str, default: Any = MISSING) -> Any:
        if key not in self.data:
            return self.raw(key, default)
        value = self.data[key]
        if not isinstance(value, list):
            raise ConfigError(self.p(key), f"expected an array of strings, got {describe(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{self.p(key)}[{i}]",
                                  f"expected a string, got {describe(item)}")
        return value

    def table(self, key: str, allowed: tuple[str, ...],
              errors: Collector | None = None) -> Table | None:
        if key not in self.data:
            return None
        return Table(self.data[key], self.p(key), allowed, errors=errors)

    def tables(self, key: str, allowed: tuple[str, ...],
               errors: Collector | None = None, *, read_on: bool = False) -> list[Table]:
        """The array of tables *key*; with *errors*, a table that cannot be built (unknown
        keys) is recorded there and left out, so the others are still checked — or, with
        *read_on* (a listener: its other keys have errors of their own to report), kept
        with its unknown keys recorded."""
        if key not in self.data:
            return []
        value = self.data[key]
        if not isinstance(value, list):
            raise ConfigError(self.p(key),
                              f"expected an array of tables ([[{self.p(key)}]]), "
                              f"got {describe(value)}")
        out = []
        for i, item in enumerate(value):
            if errors is None:
                table = Table(item, f"{self.p(key)}[{i}]", allowed)
            else:
                table = errors.attempt(Table, item, f"{self.p(key)}[{i}]", allowed,
                                       errors=errors if read_on else None)
                if table is None:
                    continue
            table.index = i
            out.append(table)
        return out
