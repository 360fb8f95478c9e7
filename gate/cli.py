"""The user's door: ``refund-gate serve | check | blocklist``.

``serve`` takes every setting as a flag (``--budget-ms 20``) or a ``GATE_*`` variable.
``check`` sends one request and prints the response, so trying the service is one line:

    refund-gate check --account-id acct:1 --order-id ord:1 --merchant-id m:1 --amount 1999
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import grpc
from google.protobuf import json_format

from refundgate.v1 import refund_gate_pb2 as pb
from refundgate.v1 import refund_gate_pb2_grpc as pb_grpc


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    from gate.settings import settings_fields

    for f in settings_fields():
        kind: Any = type(f.default)
        if kind is bool:
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=f.metadata["doc"],
            )
        else:
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                default=None,
                type=Path if isinstance(f.default, Path) else kind,
                help=f"{f.metadata['doc']} (GATE_{f.name.upper()})",
            )


def _settings_from(args: argparse.Namespace) -> Any:
    from gate.settings import Settings, settings_fields

    return Settings.from_env(**{f.name: getattr(args, f.name) for f in settings_fields()})


def cmd_serve(args: argparse.Namespace) -> int:
    """Validate settings, load and verify the model bundle, then serve until SIGTERM."""
    import logging

    from gate.bundle import BundleError
    from gate.logs import setup_logging
    from gate.reloader import ModelWatcher
    from gate.server import serve
    from gate.settings import SettingsError

    try:
        settings = _settings_from(args)
    except SettingsError as exc:
        print(f"refund-gate: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    log = logging.getLogger("gate")
    log.info("settings", extra={"settings": settings.describe()})
    if settings.uses_dev_key:
        log.warning("ids are hashed with the public dev key; set GATE_ID_HASH_KEY in production")
    watcher = ModelWatcher.from_settings(settings)
    try:
        bundle = watcher.load_initial()
    except BundleError as exc:
        log.error("model bundle refused", extra={"reason": str(exc)})
        print(f"refund-gate: model bundle refused: {exc}", file=sys.stderr)
        return 2
    if bundle.model.fallback_reason:
        log.warning("compiled model not used", extra={"reason": bundle.model.fallback_reason})
    serve(settings, watcher)
    return 0


def _enum(enum: Any, prefix: str, value: str) -> int:
    name = value.upper()
    if not name.startswith(prefix):
        name = prefix + name
    try:
        return int(enum.Value(name))
    except ValueError:
        names = (v.name.removeprefix(prefix) for v in enum.DESCRIPTOR.values)
        raise SystemExit(f"refund-gate: unknown value {value!r}; one of {', '.join(names)}") from None


def build_check_request(args: argparse.Namespace) -> pb.CheckRequest:
    """A CheckRequest from --json (file, '-' or inline) and/or individual flags."""
    req = pb.CheckRequest()
    if args.json:
        text = (
            sys.stdin.read()
            if args.json == "-"
            else (Path(args.json).read_text() if Path(args.json).is_file() else args.json)
        )
        json_format.Parse(text, req)
    now = time.time()
    simple = {
        "refund_id": args.refund_id,
        "account_id": args.account_id,
        "order_id": args.order_id,
        "merchant_id": args.merchant_id,
        "currency": args.currency,
        "device_id": args.device_id,
        "ip": args.ip,
        "geo_city": args.city,
    }
    for key, value in simple.items():
        if value is not None:
            setattr(req, key, value)
    if args.amount is not None:
        req.amount_minor = args.amount
    if args.order_amount is not None:
        req.order_amount_minor = args.order_amount
    if args.returned is not None:
        req.item_returned = args.returned
    for field, enum, prefix, value in (
        ("reason", pb.RefundReason, "REFUND_REASON_", args.reason),
        ("item_category", pb.ItemCategory, "ITEM_CATEGORY_", args.category),
        ("delivery_status", pb.DeliveryStatus, "DELIVERY_STATUS_", args.delivery),
        ("payment_method", pb.PaymentMethod, "PAYMENT_METHOD_", args.payment),
    ):
        if value is not None:
            setattr(req, field, _enum(enum, prefix, value))
    if args.order_age_minutes is not None:
        req.order_created_at.FromNanoseconds(int((now - args.order_age_minutes * 60) * 1e9))
    if args.account_age_days is not None:
        req.account_created_at.FromNanoseconds(int((now - args.account_age_days * 86400) * 1e9))
    # Friendly defaults so the one-liner works; explicit values above always win.
    if not req.refund_id:
        req.refund_id = f"rf:{uuid.uuid4().hex[:16]}"
    if not req.currency:
        req.currency = "EUR"
    if not req.order_amount_minor and req.amount_minor:
        req.order_amount_minor = req.amount_minor
    if not req.reason:
        req.reason = pb.REFUND_REASON_DAMAGED
    if not req.item_category:
        req.item_category = pb.ITEM_CATEGORY_PHYSICAL
    if not req.payment_method:
        req.payment_method = pb.PAYMENT_METHOD_CARD
    if not req.delivery_status:
        req.delivery_status = pb.DELIVERY_STATUS_DELIVERED
    if not req.HasField("order_created_at"):
        req.order_created_at.FromNanoseconds(int((now - 3 * 86400) * 1e9))
    return req


def cmd_check(args: argparse.Namespace) -> int:
    """Send one Check and print the response (or the error with every bad field)."""
    req = build_check_request(args)
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.RefundGateStub(channel)
        try:
            resp = stub.Check(req, timeout=args.timeout_ms / 1000.0)
        except grpc.RpcError as err:
            print(json.dumps(_error_json(err), indent=2))
            return 1
    print(json_format.MessageToJson(resp, preserving_proto_field_name=True))
    return 0


def _error_json(err: grpc.RpcError) -> dict[str, Any]:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    out: dict[str, Any] = {"code": err.code().name, "message": err.details()}  # type: ignore[attr-defined]
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                out["field_violations"] = [
                    {"field": v.field, "description": v.description} for v in bad.field_violations
                ]
    return out


def cmd_blocklist(args: argparse.Namespace) -> int:
    """Add, remove, show or list blocklist entries (ids are stored hashed)."""
    from gate import blocklist

    settings = _settings_from(args)
    book = blocklist.Blocklist.from_settings(settings)
    if args.action == "list":
        for entry in book.list():
            print(json.dumps(asdict(entry)))
        return 0
    targets = [
        (kind, value)
        for kind, value in (("account", args.account), ("device", args.device), ("ip", args.ip))
        if value
    ]
    if not targets:
        print("refund-gate: give --account, --device or --ip", file=sys.stderr)
        return 2
    for kind, value in targets:
        if args.action == "add":
            book.add(
                kind, value, note=args.note or "", ttl_s=args.ttl_days * 86400 if args.ttl_days else None
            )
            print(f"blocked {kind}")
        elif args.action == "remove":
            print(f"{'unblocked' if book.remove(kind, value) else 'was not blocked'}: {kind}")
        else:
            found = book.show(kind, value)
            print(json.dumps(asdict(found) if found else None))
    return 0


def cmd_decisions(args: argparse.Namespace) -> int:
    """Print the last decisions of the decision log (JSON lines), optionally following it."""
    import redis

    settings = _settings_from(args)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    key = f"{settings.key_prefix}:decisions"
    Entries = list[tuple[bytes, dict[bytes, bytes]]]
    entries = cast(Entries, client.xrevrange(key, count=args.n))[::-1]
    for _, fields in entries:
        print(fields[b"d"].decode(), flush=True)
    last: bytes = entries[-1][0] if entries else b"$"
    while args.follow:
        streams = cast(list[tuple[bytes, Entries]], client.xread({key: last}, block=1000) or [])
        for _, items in streams:
            for entry_id, fields in items:
                print(fields[b"d"].decode(), flush=True)
                last = entry_id
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="refund-gate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_serve = sub.add_parser("serve", help="run the gRPC service")
    _add_settings_flags(p_serve)
    p_serve.set_defaults(func=cmd_serve)

    p_check = sub.add_parser("check", help="send one Check and print the response")
    p_check.add_argument("--target", default="127.0.0.1:50051")
    p_check.add_argument("--timeout-ms", type=float, default=1000.0)
    p_check.add_argument("--json", help="CheckRequest as JSON: inline, a file, or - for stdin")
    for name in (
        "refund-id",
        "account-id",
        "order-id",
        "merchant-id",
        "currency",
        "device-id",
        "ip",
        "city",
        "reason",
        "category",
        "delivery",
        "payment",
    ):
        p_check.add_argument(f"--{name}")
    p_check.add_argument("--amount", type=int, help="refund amount, minor units")
    p_check.add_argument("--order-amount", type=int, help="order amount, minor units")
    p_check.add_argument("--returned", action=argparse.BooleanOptionalAction, default=None)
    p_check.add_argument("--order-age-minutes", type=float)
    p_check.add_argument("--account-age-days", type=float)
    p_check.set_defaults(func=cmd_check)

    p_block = sub.add_parser("blocklist", help="manage the account/device/IP blocklist in Redis")
    p_block.add_argument("action", choices=("add", "remove", "show", "list"))
    p_block.add_argument("--account")
    p_block.add_argument("--device")
    p_block.add_argument("--ip")
    p_block.add_argument("--note", help="why (no personal data)")
    p_block.add_argument("--ttl-days", type=float)
    _add_settings_flags(p_block)
    p_block.set_defaults(func=cmd_blocklist)

    p_dec = sub.add_parser("decisions", help="read the decision log")
    p_dec.add_argument("action", choices=("tail",))
    p_dec.add_argument("-n", type=int, default=20, help="how many of the latest to print")
    p_dec.add_argument("--follow", "-f", action="store_true", help="keep printing new ones")
    _add_settings_flags(p_dec)
    p_dec.set_defaults(func=cmd_decisions)

    # Model owners' commands. gate.modelcli imports only the standard library at module level;
    # its command functions import LightGBM, NumPy and redis-py when they run.
    from gate.modelcli import add_model_commands

    add_model_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
