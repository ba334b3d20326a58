"""Reading a report file defensively: a regular file of bounded size, strict UTF-8 JSON, checked against the
published schema (precision/schemas/report-v<N>.schema.json). Every refusal is a one-line ReportError naming the
file; nothing in a file, however built, gets a traceback, a hang or an unbounded read out of the reader.

``load_report`` (precision/report.py) turns the checked data into a Report.
"""

from __future__ import annotations

import codecs
import functools
import itertools
import json
import math
import os
import stat
from pathlib import Path

from ._terminal import clip, safe_text
from .errors import ReportError

__all__ = ["read_report_data", "MAX_REPORT_BYTES", "MAX_INT_DIGITS", "MAX_DEPTH", "schema"]

# A report of the default matrix is ~100 KB; one with every step recorded for thousands of runs is tens of MB.
# The cap leaves room above those and still parses in memory; a larger file is refused before it is read (by its
# size) or while it is read (a /proc-style file reports size 0 and can be any length).
MAX_REPORT_BYTES = 256 * 1024 * 1024
# The smallest limit Python can be configured to for int <-> str conversion (sys.int_info.str_digits_check_threshold
# = 640): below it, every integer accepted here also prints, whatever PYTHONINTMAXSTRDIGITS says. A report's
# integers are steps and seeds (at most 19 digits).
MAX_INT_DIGITS = 640
# A report nests 6 levels (report > results > result > spec > optimizer > betas); the free-form environment gets
# room to grow. The bound keeps later recursive code (reprs in messages, deepcopy, re-saving) away from Python's
# recursion limit; the parser itself stops at that limit (RecursionError, caught below) before this check runs.
MAX_DEPTH = 64
_RANKED_ERRORS = 1000  # schema errors ranked for the one reported: plenty, and bounded when every item is wrong
_MESSAGE_CHARS = 200

_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)  # a FIFO opens at once instead of waiting for a writer
               | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class _Refused(ValueError):
    """Raised from the JSON parser's hooks: a token this reader does not take (NaN, 1e999, a 5000-digit int)."""


def _name(path: Path) -> str:
    return f"report {str(path)!r}"  # repr escapes control characters in the path itself


def _limit() -> str:
    return f"{MAX_REPORT_BYTES >> 20} MiB" if MAX_REPORT_BYTES >= 1 << 20 else f"{MAX_REPORT_BYTES} bytes"


def _check_regular(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((what for test, what in _KINDS if test(mode)), "not a regular file")
    raise ReportError(f"{_name(path)} is {kind}, not a report file")


def _read_capped(path: Path) -> bytes:
    """The file's bytes. Only a regular file is opened (a device can have side effects on open; a FIFO would
    block), and the opened descriptor is checked again, so a file swapped in between stat and open is refused too.
    At most MAX_REPORT_BYTES + 1 bytes are read, whatever size the file claims."""
    def refuse(exc: Exception):
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
            return ReportError(f"{_name(path)} does not exist")
        # ValueError: a NUL byte in the path
        return ReportError(f"{_name(path)} cannot be opened: {safe_text(getattr(exc, 'strerror', None) or exc)}")

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as exc:
        raise refuse(exc) from None
    _check_regular(path, mode)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (OSError, ValueError) as exc:
        raise refuse(exc) from None
    try:
        info = os.fstat(fd)
        _check_regular(path, info.st_mode)
        if info.st_size > MAX_REPORT_BYTES:
            raise ReportError(f"{_name(path)} is {info.st_size} bytes, more than the {_limit()} a report may have")
        chunks, total = [], 0
        while total <= MAX_REPORT_BYTES:
            chunk = os.read(fd, min(1 << 20, MAX_REPORT_BYTES + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > MAX_REPORT_BYTES:
            raise ReportError(f"{_name(path)} is more than the {_limit()} a report may have")
        return b"".join(chunks)
    except OSError as exc:
        raise ReportError(f"{_name(path)} cannot be read: {safe_text(exc.strerror or exc)}") from None
    finally:
        os.close(fd)


def _refuse_constant(token: str):
    raise _Refused(f"{token} is not valid JSON (a report stores a value that is not finite as null)")


def _parse_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise _Refused(f"the number {clip(token, 40, middle=True)} is beyond the float range")
    return value


def _parse_int(token: str) -> int:
    digits = len(token) - token.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {digits} digits (at most {MAX_INT_DIGITS} are read)")
    return int(token)


def _parse(path: Path, raw: bytes):
    if raw.startswith(codecs.BOM_UTF8):  # some editors write one; it is not part of the JSON
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReportError(f"{_name(path)} is not readable JSON: not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                          f"offset {exc.start}: {exc.reason})") from None
    if not text.strip():
        raise ReportError(f"{_name(path)} is not readable JSON: the file is empty")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_parse_float, parse_int=_parse_int)
    except _Refused as exc:
        why = str(exc)
    except json.JSONDecodeError as exc:  # "Expecting value: line 1 column 1 (char 0)": no file text in it
        why = str(exc)
    except RecursionError:
        why = "nested too deeply"
    except ValueError as exc:  # anything else the parser refuses
        why = clip(safe_text(exc), _MESSAGE_CHARS)
    raise ReportError(f"{_name(path)} is not readable JSON: {why}")


def _depth(data) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion; stops counting past MAX_DEPTH."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest if isinstance(data, (dict, list)) else 0


def _is_int(checker, instance) -> bool:
    # JSON Schema counts 1.0 as an integer; the table formats integers with "d", which a float fails.
    return isinstance(instance, int) and not isinstance(instance, bool)


@functools.cache
def schema(version: int) -> dict:
    """The published JSON Schema of report version ``version``, loaded once from the package data."""
    from importlib import resources
    text = resources.files("precision").joinpath("schemas", f"report-v{version}.schema.json").read_text("utf-8")
    return json.loads(text)


_ANNOTATIONS = frozenset({"description", "title"})


def _inline_refs(node, defs: dict):
    """The schema with each {"$ref": "#/$defs/x"} replaced by x itself: the same constraints, validated about twice
    as fast (jsonschema resolves a $ref on every use). The report schema has no cycles, so this terminates."""
    if isinstance(node, list):
        return [_inline_refs(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _inline_refs(v, defs) for k, v in node.items() if k not in ("$ref", "$defs")}
    if "$ref" not in node:
        return out
    target = _inline_refs(defs[node["$ref"].removeprefix("#/$defs/")], defs)
    # Beside a $ref, only annotations merge; other keywords must hold as well, so they apply through allOf.
    return target | out if set(out) <= _ANNOTATIONS else out | {"allOf": [target]}


@functools.cache
def _validator(version: int):
    import jsonschema  # here: only reading a report needs it, and importing it costs ~0.1 s
    base = jsonschema.Draft202012Validator
    strict = jsonschema.validators.extend(base, type_checker=base.TYPE_CHECKER.redefine("integer", _is_int))
    published = schema(version)
    return strict(_inline_refs(published, published.get("$defs", {})))


def _json_path(parts) -> str:
    """results[3].spec.policy_name: where a schema error is, in the notation people type."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{clip(json.dumps(part), 40, middle=True)}]"  # json.dumps escapes control characters
    return out or "top level"


def _validate(path: Path, data: dict, version: int) -> None:
    from jsonschema.exceptions import best_match
    errors = _validator(version).iter_errors(data)
    first = next(errors, None)
    if first is None:
        return
    error = best_match(itertools.chain([first], itertools.islice(errors, _RANKED_ERRORS)))
    message = clip(safe_text(error.message), _MESSAGE_CHARS, middle=True)  # the end says what is wrong
    raise ReportError(f"{_name(path)}: {_json_path(error.absolute_path)}: {message}")


def read_report_data(path: str | os.PathLike, versions: tuple[int, ...]) -> dict:
    """The JSON object of the report at ``path``, of one of the schema ``versions`` and checked against that
    version's schema; else ReportError. The caller upgrades an older version's data."""
    path = Path(path)
    data = _parse(path, _read_capped(path))
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise ReportError(f"{_name(path)} is not a precision report: its JSON is {kind}, not an object")
    if _depth(data) > MAX_DEPTH:
        raise ReportError(f"{_name(path)} is nested more than {MAX_DEPTH} levels deep; a report has about 6")
    if "schema_version" not in data:
        raise ReportError(f"{_name(path)} has no schema_version; is it a precision report?")
    found = data["schema_version"]
    if type(found) is not int or found not in versions:  # type(): True == 1, but true is no version
        known = " and ".join(map(str, versions))
        newer = " (written by a newer precision: upgrade precision to read it)" if (
            type(found) is int and found > max(versions)) else ""
        raise ReportError(f"{_name(path)} has schema version {clip(safe_text(repr(found)), 40, middle=True)}; this "
                          f"precision reads versions {known}{newer}")
    _validate(path, data, found)
    # A report holds one result per spec id (compare and --resume match by it); a schema cannot say "unique by key".
    seen: dict[str, int] = {}
    for i, result in enumerate(data["results"]):
        rid = result["spec"]["id"]
        if rid in seen:
            raise ReportError(f"{_name(path)}: results[{i}] repeats the spec id of results[{seen[rid]}] "
                              f"({clip(safe_text(rid), 80, middle=True)}); a report holds one result per id")
        seen[rid] = i
    return data
