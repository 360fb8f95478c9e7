"""History files (model/records.py): round trip, gzip, bad lines, the bad-share limit, order."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import orjson
import pytest
from google.protobuf import json_format

from model.progress import Progress
from model.records import BadLine, Record, TooManyBadRecords, parse_line, read_records, write_records
from refundgate.v1 import refund_gate_pb2 as pb

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
EXAMPLE = Path(__file__).resolve().parent.parent / "model" / "examples" / "history.jsonl"


def example_lines() -> list[bytes]:
    return [line for line in EXAMPLE.read_bytes().splitlines() if line.strip()]


def write_lines(path: Path, lines: list[bytes | str]) -> Path:
    path.write_bytes(b"".join((x.encode() if isinstance(x, str) else x) + b"\n" for x in lines))
    return path


def event_at(at: int, event_id: str = "ev:1") -> pb.Event:
    ev = pb.Event(
        event_id=event_id,
        type=pb.EVENT_TYPE_ORDER_DELIVERED,
        account_id="acct:1",
        merchant_id="m:1",
        order_id="ord:1",
    )
    ev.occurred_at.FromSeconds(at)
    return ev


def test_the_example_file_is_every_kind_of_record_and_all_good() -> None:
    rs = read_records([EXAMPLE])
    assert rs.bad == [] and rs.good == rs.lines == len(example_lines())
    assert set(rs.events) == {"ORDER_PLACED", "ORDER_DELIVERED", "REFUND_OUTCOME"} and rs.checks > 0
    assert len([s for s in rs.segments if s]) >= 1 and "" in rs.segments


def test_write_then_read_gives_the_same_records(tmp_path: Path) -> None:
    original = read_records([EXAMPLE]).records
    path = tmp_path / "copy.jsonl"
    assert write_records(original, path) == len(original)
    again = read_records([path]).records
    assert again == original
    assert path.read_bytes() == EXAMPLE.read_bytes()


def test_gzip_round_trip_is_compressed_and_deterministic(tmp_path: Path) -> None:
    original = read_records([EXAMPLE]).records
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    write_records(original, a)
    write_records(original, b)
    assert a.read_bytes()[:2] == b"\x1f\x8b"
    assert a.read_bytes() == b.read_bytes()
    assert gzip.decompress(a.read_bytes()) == EXAMPLE.read_bytes()
    assert read_records([a]).records == original


def test_a_record_without_its_time_cannot_be_written(tmp_path: Path) -> None:
    ev = pb.Event(event_id="ev:1", type=pb.EVENT_TYPE_ORDER_DELIVERED)
    with pytest.raises(ValueError, match="occurred_at is not set"):
        write_records([Record(0.0, ev, None)], tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_the_time_is_the_messages_own() -> None:
    ev = event_at(T0)
    ev.occurred_at.nanos = 250_000_000
    line = orjson.dumps({"event": json_format.MessageToDict(ev)})
    assert parse_line(line).at == T0 + 0.25


_CHECK = orjson.loads(next(line for line in example_lines() if line.startswith(b'{"check"')))["check"]
_EVENT = orjson.loads(example_lines()[0])["event"]
_NO_TIME = {k: v for k, v in _CHECK.items() if k != "requestedAt"}
MALFORMED: dict[str, tuple[bytes, str]] = {
    "invalid JSON": (b'{"event": {', "invalid JSON ("),
    "not an object": (b"[1, 2]", "not a JSON object (a JSON list)"),
    "unknown key": (orjson.dumps({"event": _EVENT, "label": 1}), "unknown key 'label'"),
    "both keys": (orjson.dumps({"event": _EVENT, "check": _CHECK}), "both 'event' and 'check'"),
    "neither key": (orjson.dumps({"segment": "x"}), "neither 'event' nor 'check'"),
    "segment not a string": (orjson.dumps({"event": _EVENT, "segment": 3}), "'segment' is not a string"),
    "message not an object": (orjson.dumps({"check": "rf:1"}), "'check' is not a JSON object"),
    "unknown field": (
        orjson.dumps({"event": {**_EVENT, "colour": "red"}}),
        'event: Message type "refundgate.v1.Event" has no field named "colour"',
    ),
    "bad enum name": (
        orjson.dumps({"check": {**_CHECK, "reason": "REFUND_REASON_BORED"}}),
        "check: Failed to parse reason field: Invalid enum value REFUND_REASON_BORED for enum type "
        "refundgate.v1.RefundReason",
    ),
    "bad timestamp": (
        orjson.dumps({"event": {**_EVENT, "occurredAt": "yesterday"}}),
        "event: Failed to parse occurredAt field: Failed to parse timestamp",
    ),
    "missing time": (orjson.dumps({"check": _NO_TIME}), "missing time: check.requestedAt is required"),
    "gate refuses it": (
        orjson.dumps({"check": {**_CHECK, "amountMinor": "0"}}),
        "check the gate would refuse: amount_minor: must be greater than zero",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_line_is_reported_with_its_line_number_and_reason(case: str, tmp_path: Path) -> None:
    line, reason = MALFORMED[case]
    good = example_lines()
    path = write_lines(tmp_path / "h.jsonl", [*good[:3], line, *good[3:]])
    seen: list[BadLine] = []
    rs = read_records([path], max_bad_share=1.0, on_bad=seen.append)
    assert len(rs.bad) == 1 and seen == rs.bad
    bad = rs.bad[0]
    assert (bad.path, bad.line) == (path, 4)
    assert bad.reason.startswith(reason), bad.reason
    assert (rs.lines, rs.good) == (len(good) + 1, len(good))
    assert rs.summary()["bad"] == 1


def test_blank_lines_are_neither_good_nor_bad(tmp_path: Path) -> None:
    good = example_lines()
    path = write_lines(tmp_path / "h.jsonl", [good[0], b"", b"   ", good[1]])
    rs = read_records([path], max_bad_share=0.0)
    assert (rs.lines, rs.good, rs.bad) == (2, 2, [])


def test_a_truncated_gzip_is_a_bad_line_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl.gz"
    write_records(read_records([EXAMPLE]).records, path)
    path.write_bytes(path.read_bytes()[:-40])
    rs = read_records([path], max_bad_share=1.0)
    assert rs.bad and rs.bad[-1].reason.startswith("unreadable (")


def test_bad_lines_at_the_limit_are_tolerated(tmp_path: Path) -> None:
    good = example_lines()
    lines = [good[i % len(good)] for i in range(99)] + [b"not json"]
    rs = read_records([write_lines(tmp_path / "h.jsonl", lines)])
    assert (rs.lines, len(rs.bad), rs.bad_share) == (100, 1, 0.01)


def test_past_the_limit_the_read_stops_with_one_line_naming_the_flag(tmp_path: Path) -> None:
    good = example_lines()
    lines = [good[i % len(good)] for i in range(98)] + [b"not json", b"[]"]
    path = write_lines(tmp_path / "h.jsonl", lines)
    with pytest.raises(TooManyBadRecords) as info:
        read_records([path])
    message = str(info.value)
    assert "\n" not in message
    assert "2 of 100 history lines are bad (2.00%)" in message
    assert "limit of 1.00% (--max-bad-share 0.01)" in message
    assert f"first: {path}:99: invalid JSON" in message
    assert read_records([path], max_bad_share=0.02).good == 98


def test_a_share_outside_0_to_1_is_refused_naming_the_flag() -> None:
    with pytest.raises(ValueError, match="--max-bad-share must be within 0..1"):
        read_records([EXAMPLE], max_bad_share=1.5)


def test_records_are_sorted_by_time_then_file_then_line(tmp_path: Path) -> None:
    def line(at: int, eid: str) -> bytes:
        return orjson.dumps({"event": json_format.MessageToDict(event_at(T0 + at, eid))})

    first = write_lines(tmp_path / "1.jsonl", [line(300, "ev:a"), line(100, "ev:b"), line(200, "ev:c")])
    second = write_lines(tmp_path / "2.jsonl", [line(100, "ev:d"), line(200, "ev:e"), line(100, "ev:f")])
    rs = read_records([second, first])
    order = [r.event.event_id for r in rs.records if r.event is not None]
    assert order == ["ev:d", "ev:f", "ev:b", "ev:e", "ev:c", "ev:a"]
    assert (rs.first_at, rs.last_at) == (T0 + 100.0, T0 + 300.0)


@pytest.mark.parametrize(
    "variant",
    [
        {"occurredAt": "2026-01-05T06:06:17.5Z"},
        {"occurredAt": "2026-01-05T06:06:17.123456789Z"},
        {"occurredAt": "2026-01-05T07:06:17+01:00"},
        {"amountMinor": 12999},
        {"amount_minor": "12999"},
        {"type": 1},
        {"geoCity": None},
    ],
    ids=repr,
)
def test_the_fast_path_reads_what_json_format_reads(variant: dict[str, object]) -> None:
    data = {**_EVENT, **variant}
    if "amount_minor" in variant:
        del data["amountMinor"]
    expected = json_format.ParseDict(data, pb.Event())
    assert parse_line(orjson.dumps({"event": data})).event == expected


def test_every_example_line_parses_as_json_format_parses_it() -> None:
    for line in example_lines():
        body = orjson.loads(line)
        kind = "event" if "event" in body else "check"
        expected = json_format.ParseDict(body[kind], pb.Event() if kind == "event" else pb.CheckRequest())
        record = parse_line(line)
        assert getattr(record, kind) == expected
        assert record.segment == body.get("segment", "")


def test_progress_prints_rate_and_eta_every_interval_off_a_terminal() -> None:
    now = [0.0]
    out = io.StringIO()
    with Progress("replay", total=1000, unit="records", stream=out, every_s=10, clock=lambda: now[0]) as bar:
        now[0] = 5.0
        bar.update(100)
        assert out.getvalue() == ""
        now[0] = 10.0
        bar.update(100, note="3 bad")
        now[0] = 20.0
        bar.update(800)
    lines = out.getvalue().splitlines()
    assert lines[0] == "replay: 20% 200/1,000 records · 20 records/s · ETA 0:40 · 3 bad"
    assert lines[-1] == "replay: 100% 1,000/1,000 records · 50 records/s · in 0:20 · 3 bad"


def test_progress_without_total_shows_count_and_rate_only() -> None:
    now = [0.0]
    out = io.StringIO()
    bar = Progress("rows", stream=out, every_s=1, clock=lambda: now[0])
    now[0] = 2.0
    bar.update(50)
    bar.close()
    bar.close()
    assert out.getvalue().splitlines() == ["rows: 50 · 25/s", "rows: 50 · 25/s · in 0:02"]
