"""History files: the records a model is trained on, in the contract's own messages.

One JSON object per line (the file gzip-compressed when its name ends in ``.gz``), with exactly
one of ``"event"`` (a refundgate.v1 ``Event``) or ``"check"`` (a ``CheckRequest``), the message
in protobuf JSON mapping (``google.protobuf.json_format``), and optionally ``"segment"``, a free
label for reporting (the simulator writes its scenario there). A record's time is its message's
own ``occurred_at`` / ``requested_at``, required here. Specification, bad-line policy and a worked
example: model/README.md, "History format".

A line that cannot be used is a bad line: reported with its file, line number and reason, and
counted; reading stops (`TooManyBadRecords`) only when bad lines are more than ``max_bad_share``
of all lines. A record is good only if the gate itself would accept it (`gate.validation`, with
client time trusted), so a replay never meets a record the gate would refuse.
"""

from __future__ import annotations

import calendar
import functools
import gc
import gzip
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from gate.validation import ValidationError, validate_check, validate_events
from model.progress import Progress
from refundgate.v1 import refund_gate_pb2 as pb

DEFAULT_MAX_BAD_SHARE = 0.01
KEYS = ("check", "event", "segment")
_KINDS = {
    "event": (pb.Event, "occurred_at", "occurredAt"),
    "check": (pb.CheckRequest, "requested_at", "requestedAt"),
}
_PROGRESS_LINES = 4096
_WRITE_CHUNK = 4096


@dataclass(frozen=True, slots=True)
class Record:
    """One message of a history, at its own time (epoch seconds). Exactly one of ``event`` and
    ``check`` is set; ``segment`` is a free label for reporting ("" when absent)."""

    at: float
    event: pb.Event | None
    check: pb.CheckRequest | None
    segment: str = ""

    @classmethod
    def of(cls, message: pb.Event | pb.CheckRequest, segment: str = "") -> Record:
        """The record of a message, at the message's own time (which must be set)."""
        if isinstance(message, pb.Event):
            return cls(_time_of(message, "occurred_at"), message, None, segment)
        return cls(_time_of(message, "requested_at"), None, message, segment)


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that was left out, and why."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class TooManyBadRecords(ValueError):
    """More bad lines than the configured share; the message is one line naming the limit."""

    def __init__(self, bad: int, lines: int, limit: float, first: BadLine | None) -> None:
        share = bad / lines if lines else 1.0
        example = f"; first: {first}" if first is not None else ""
        super().__init__(
            f"{bad:,} of {lines:,} history lines are bad ({share:.2%}), more than the limit of "
            f"{limit:.2%} (--max-bad-share {limit:g}){example}"
        )
        self.bad, self.lines, self.limit = bad, lines, limit


@dataclass(slots=True)
class RecordSet:
    """The good records of some history files, sorted by (at, file, line), and what was read.

    ``lines`` counts the non-blank lines (blank lines are skipped, neither good nor bad);
    ``events`` counts the good events by type name (ORDER_PLACED, ORDER_DELIVERED,
    REFUND_OUTCOME); ``segments`` the good records by segment ("" for none).
    """

    records: list[Record]
    paths: list[Path]
    lines: int = 0
    bad: list[BadLine] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)
    checks: int = 0
    segments: Counter[str] = field(default_factory=Counter)
    read_s: float = 0.0

    @property
    def good(self) -> int:
        """Records kept."""
        return len(self.records)

    @property
    def bad_share(self) -> float:
        """Bad lines as a share of all lines (0 when there were none)."""
        return len(self.bad) / self.lines if self.lines else 0.0

    @property
    def first_at(self) -> float | None:
        """Time of the earliest record, or None when there is none."""
        return self.records[0].at if self.records else None

    @property
    def last_at(self) -> float | None:
        """Time of the latest record, or None when there is none."""
        return self.records[-1].at if self.records else None

    @property
    def records_per_s(self) -> float:
        """Lines read per second (parse, validation and sort included)."""
        return self.lines / self.read_s if self.read_s > 0 else 0.0

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def summary(self) -> dict[str, Any]:
        """Counts and period as a JSON-ready dict (for reports)."""
        return {
            "files": [str(p) for p in self.paths],
            "lines": self.lines,
            "good": self.good,
            "bad": len(self.bad),
            "bad_reasons": dict(Counter(_reason_kind(b.reason) for b in self.bad).most_common()),
            "events": dict(sorted(self.events.items())),
            "checks": self.checks,
            "segments": dict(sorted(self.segments.items())),
            "period": [self.first_at, self.last_at],
        }


# ---------------------------------------------------------------------------------------------
# writing


def record_line(record: Record) -> bytes:
    """One history line (without the newline), deterministic for the same record."""
    if (record.event is None) == (record.check is None):
        raise ValueError("a record holds exactly one of event and check")
    kind, message = ("event", record.event) if record.event is not None else ("check", record.check)
    assert message is not None
    _time_of(message, _KINDS[kind][1])
    body: dict[str, Any] = {kind: json_format.MessageToDict(message)}
    if record.segment:
        body["segment"] = record.segment
    return orjson.dumps(body)


def write_records(records: Iterable[Record], path: Path) -> int:
    """Write ``records`` as a history file (gzip when ``path`` ends in .gz); return how many.

    The file is written under a temporary name and renamed into place. The output depends only
    on the records: gzip headers carry no time or name. Raises ValueError for a record whose
    message has no time.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with tmp.open("wb") as raw:
            fh: gzip.GzipFile | BinaryIO = (
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if path.suffix == ".gz" else raw
            )
            try:
                chunk: list[bytes] = []
                for record in records:
                    chunk.append(record_line(record))
                    if len(chunk) == _WRITE_CHUNK:
                        fh.write(b"\n".join(chunk) + b"\n")
                        count, chunk = count + len(chunk), []
                if chunk:
                    fh.write(b"\n".join(chunk) + b"\n")
                    count += len(chunk)
            finally:
                if fh is not raw:
                    fh.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


# ---------------------------------------------------------------------------------------------
# reading


class _Bad(ValueError):
    """This line is bad; the message is the reason."""


def parse_line(line: bytes) -> Record:
    """One history line as a Record; raises ValueError whose message is the precise reason."""
    try:
        body = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise _Bad(f"invalid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise _Bad(f"not a JSON object (a JSON {type(body).__name__})")
    unknown = [k for k in body if k not in KEYS]
    if unknown:
        raise _Bad(f"unknown key {unknown[0]!r} (a line has 'event' or 'check', and optionally 'segment')")
    has_event, has_check = "event" in body, "check" in body
    if has_event == has_check:
        raise _Bad("both 'event' and 'check'" if has_event else "neither 'event' nor 'check'")
    segment = body.get("segment", "")
    if not isinstance(segment, str):
        raise _Bad("'segment' is not a string")
    kind = "event" if has_event else "check"
    cls, time_field, json_name = _KINDS[kind]
    data = body[kind]
    if not isinstance(data, dict):
        raise _Bad(f"'{kind}' is not a JSON object")
    message = _FAST[kind](data)
    if message is None:  # not the common shape: json_format decides, and says what is wrong
        try:
            message = json_format.ParseDict(data, cls())
        except json_format.ParseError as exc:
            raise _Bad(f"{kind}: {_first_line(str(exc))}") from None
    if not message.HasField(time_field):
        raise _Bad(f"missing time: {kind}.{json_name} is required in history files")
    try:
        if isinstance(message, pb.Event):
            validate_events(
                pb.RecordEventsRequest(events=[message]),
                now_s=0.0,
                allow_client_time=True,
                skew_s=0.0,
                max_events=1,
            )
        else:
            validate_check(message, now_s=0.0, allow_client_time=True, skew_s=0.0)
    except ValidationError as exc:
        fields = "; ".join(f"{v.field.removeprefix('events[0].')}: {v.description}" for v in exc.violations)
        raise _Bad(f"{kind} the gate would refuse: {fields}") from None
    at = _time_of(message, time_field)
    if isinstance(message, pb.Event):
        return Record(at, message, None, segment)
    return Record(at, None, message, segment)


def read_records(
    paths: Sequence[Path],
    *,
    max_bad_share: float = DEFAULT_MAX_BAD_SHARE,
    on_bad: Callable[[BadLine], None] | None = None,
    progress: bool = False,
) -> RecordSet:
    """Read history files into a RecordSet sorted by (at, file index, line number).

    Every bad line is kept in ``RecordSet.bad`` (and passed to ``on_bad`` as it is found).
    Raises TooManyBadRecords when bad lines are more than ``max_bad_share`` of all lines, and
    FileNotFoundError / OSError for a file that cannot be read. With ``progress`` a progress line
    with rate and ETA (over the bytes of the files) goes to stderr. The cyclic garbage collector
    is paused for the read and what exists then is frozen out of later collections (gc.freeze):
    rescanning millions of records made a 2 M-line read about 1.5x slower.
    """
    if not 0.0 <= max_bad_share <= 1.0:
        raise ValueError(f"--max-bad-share must be within 0..1, not {max_bad_share}")
    paths = [Path(p) for p in paths]
    total = sum(p.stat().st_size for p in paths)
    result = RecordSet(records=[], paths=paths)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of new long-lived objects: each collection would rescan them all
    try:
        _read_into(result, paths, total, on_bad, progress)
    finally:
        gc.freeze()  # the records live as long as the training: keep them out of later collections
        if gc_was_enabled:
            gc.enable()
    if result.bad and len(result.bad) > max_bad_share * result.lines:
        raise TooManyBadRecords(len(result.bad), result.lines, max_bad_share, result.bad[0])
    return result


def _read_into(
    result: RecordSet,
    paths: Sequence[Path],
    total: int,
    on_bad: Callable[[BadLine], None] | None,
    progress: bool,
) -> None:
    records, bad = result.records, result.bad
    events: Counter[int] = Counter()
    segments: Counter[str] = Counter()
    with Progress("reading history", total, unit="B", enabled=progress) as bar:
        for path in paths:
            with path.open("rb") as raw:
                fh: gzip.GzipFile | BinaryIO = (
                    gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
                )
                position = number = 0
                try:
                    for number, line in enumerate(fh, 1):
                        if number % _PROGRESS_LINES == 0:
                            now = raw.tell()
                            bar.update(now - position, note=f"{result.lines:,} lines, {len(bad):,} bad")
                            position = now
                        if not line.strip():
                            continue
                        result.lines += 1
                        try:
                            record = parse_line(line)
                        except _Bad as exc:
                            bad_line = BadLine(path, number, str(exc))
                            bad.append(bad_line)
                            if on_bad is not None:
                                on_bad(bad_line)
                            continue
                        records.append(record)
                        segments[record.segment] += 1
                        if record.event is not None:
                            events[record.event.type] += 1
                except (OSError, EOFError) as exc:  # a truncated or corrupt gzip stream
                    bad_line = BadLine(path, number + 1, f"unreadable ({exc})")
                    bad.append(bad_line)
                    result.lines += 1
                    if on_bad is not None:
                        on_bad(bad_line)
                bar.update(raw.tell() - position)
        records.sort(key=_at)  # stable: equal times keep file, then line order
        result.read_s = bar.elapsed_s
    result.events = Counter({pb.EventType.Name(t).removeprefix("EVENT_TYPE_"): n for t, n in events.items()})
    result.checks = len(records) - sum(events.values())
    result.segments = segments


class _FastParser:
    """The protobuf JSON mapping of one message type, for the shapes history files hold: each
    field at most once (by its JSON or its proto name), strings, integers (int64 as a decimal
    string or a number), booleans, enums by name, Timestamps as RFC 3339 in UTC ("...Z").

    Returns None for anything else, and the caller then runs ``json_format.ParseDict``, whose
    result (or error) is the reference: tests/test_records.py checks both agree. About 5x faster
    than ParseDict, which is most of the time of reading a history.
    """

    def __init__(self, cls: type[pb.Event] | type[pb.CheckRequest]) -> None:
        self.cls = cls
        self.fields: dict[str, tuple[str, Callable[[Any], Any]]] = {}
        for f in cls.DESCRIPTOR.fields:
            convert = self._converter(f)
            self.fields[f.json_name] = self.fields[f.name] = (f.name, convert)

    @staticmethod
    def _converter(f: Any) -> Callable[[Any], Any]:
        if f.type == f.TYPE_MESSAGE:
            if f.message_type.full_name != "google.protobuf.Timestamp":
                raise TypeError(f"no fast path for {f.full_name}")
            return _timestamp
        if f.type == f.TYPE_ENUM:
            values = {v.name: v.number for v in f.enum_type.values}
            return lambda v: values[v]
        if f.type == f.TYPE_STRING:
            return _exact(str)
        if f.type == f.TYPE_BOOL:
            return _exact(bool)
        if f.type in (f.TYPE_INT64, f.TYPE_INT32):
            return _integer
        raise TypeError(f"no fast path for {f.full_name}")

    def __call__(self, data: dict[str, Any]) -> pb.Event | pb.CheckRequest | None:
        kwargs: dict[str, Any] = {}
        try:
            for key, value in data.items():
                name, convert = self.fields[key]
                if name in kwargs:
                    return None
                kwargs[name] = convert(value)
            return self.cls(**kwargs)
        except (KeyError, TypeError, ValueError):
            return None


_RFC3339_UTC = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?Z")
_DIGITS = re.compile(r"-?[0-9]{1,19}")


def _timestamp(value: Any) -> Timestamp:
    m = _RFC3339_UTC.fullmatch(value)
    if m is None:
        raise ValueError("not the common timestamp shape")
    h, mi, sec = int(m[4]), int(m[5]), int(m[6])
    if h > 23 or mi > 59 or sec > 59:
        raise ValueError("not a time of day")
    seconds = _day_seconds(m[1], m[2], m[3]) + h * 3600 + mi * 60 + sec
    return Timestamp(seconds=seconds, nanos=int(m[7].ljust(9, "0")) if m[7] else 0)


@functools.lru_cache(maxsize=4096)
def _day_seconds(year: str, month: str, day: str) -> int:
    """Epoch seconds of a day's midnight UTC; ValueError for a day that does not exist."""
    return calendar.timegm(date(int(year), int(month), int(day)).timetuple())


def _integer(value: Any) -> int:
    if type(value) is int:
        return value
    if type(value) is str and _DIGITS.fullmatch(value):
        return int(value)
    raise ValueError("not the common integer shape")


def _exact(kind: type) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if type(value) is not kind:
            raise TypeError(kind.__name__)
        return value

    return convert


_FAST = {"event": _FastParser(pb.Event), "check": _FastParser(pb.CheckRequest)}


def _at(record: Record) -> float:
    return record.at


def _time_of(message: pb.Event | pb.CheckRequest, name: str) -> float:
    if not message.HasField(name):
        raise ValueError(f"{type(message).__name__}.{name} is not set: a history record needs its time")
    ts = getattr(message, name)
    return ts.seconds + ts.nanos / 1e9


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else "cannot be parsed"


def _reason_kind(reason: str) -> str:
    """The kind of a bad line's reason, without its specifics (for counting)."""
    for cut in (" (", ":"):
        if cut in reason:
            return reason.split(cut, 1)[0]
    return reason
