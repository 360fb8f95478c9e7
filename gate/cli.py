"""The user's door: ``refund-gate serve | check | blocklist | decisions | model``.

``serve`` takes every setting as a flag (``--budget-ms 20``) or a ``GATE_*`` variable.
``check`` sends one request and prints the response, so trying the service is one line:

    refund-gate check --account-id acct:1 --order-id ord:1 --merchant-id m:1 --amount 1999

An expected failure (bad input or settings, Redis unreachable, an error answer) is one line on
stderr and an exit status from EXIT_STATUS, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
from google.protobuf import json_format

from refundgate.v1 import refund_gate_pb2 as pb
from refundgate.v1 import refund_gate_pb2_grpc as pb_grpc

OK, FAILED, USAGE, INTERRUPTED, BROKEN_PIPE = 0, 1, 2, 130, 141
EXIT_STATUS = f"""exit status:
  {OK}    done
  {FAILED}    failed: an error answer from the gate (printed as JSON), Redis unreachable,
       a model bundle refused by a model command
  {USAGE}    usage, input or settings error, or `serve` cannot start (bad bundle, port in use)
  {INTERRUPTED}  interrupted (Ctrl-C)
  {BROKEN_PIPE}  the reader of the output went away (e.g. `| head`): one line on stderr"""

# Settings a command other than serve reads: only these become its flags.
REDIS_SETTINGS = ("redis_url", "key_prefix")
BLOCKLIST_SETTINGS = (*REDIS_SETTINGS, "id_hash_key")

# check's enum flags: flag -> (request field, enum, value prefix)
ENUM_FLAGS: dict[str, tuple[str, Any, str]] = {
    "reason": ("reason", pb.RefundReason, "REFUND_REASON_"),
    "category": ("item_category", pb.ItemCategory, "ITEM_CATEGORY_"),
    "delivery": ("delivery_status", pb.DeliveryStatus, "DELIVERY_STATUS_"),
    "payment": ("payment_method", pb.PaymentMethod, "PAYMENT_METHOD_"),
}


class Failed(Exception):
    """An expected failure of a command: its message is printed as one line, exit FAILED."""

    status = FAILED


class BadInput(Failed):
    """Input the command cannot use (e.g. malformed --json): one line, exit USAGE."""

    status = USAGE


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout; on a wide terminal, each flag and its help on one line."""

    def __init__(self, prog: str) -> None:
        columns = shutil.get_terminal_size().columns
        super().__init__(prog, max_help_position=min(80, columns - 100) if columns >= 130 else 24)


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


@functools.cache
def _defaults() -> dict[str, Any]:
    """Default settings as the start-up log shows them (secrets masked)."""
    from gate.settings import Settings

    return Settings().describe()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_settings_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """Flags for settings ``names`` (all of them, grouped as in gate.settings.GROUPS, if None)."""
    from gate.settings import GROUPS, settings_fields

    by_name = {f.name: f for f in settings_fields()}
    if names is not None:
        summaries = {name: text for _, (_, group) in GROUPS.items() for name, text in group.items()}
        for name in names:
            _add_setting(parser, by_name[name], summaries[name])
        return
    grouped = set()
    for title, (about, summaries) in GROUPS.items():
        group = parser.add_argument_group(f"{title} settings", about)
        for name, summary in summaries.items():
            _add_setting(group, by_name[name], summary)
            grouped.add(name)
    rest = [f for f in settings_fields() if f.name not in grouped]
    if rest:
        group = parser.add_argument_group("other settings")
        for f in rest:
            _add_setting(group, f, f.metadata["doc"])


def _add_setting(parser: Any, f: Any, text: str) -> None:
    env = f"GATE_{f.name.upper()}"
    if isinstance(f.default, bool):
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            default=None,
            action=argparse.BooleanOptionalAction,
            help=f"{text}; default {'on' if f.default else 'off'} [{env}]",
        )
        return
    default: Any = _defaults()[f.name]
    if isinstance(f.default, Path) and f.default.is_relative_to(Path.cwd()):
        default = f.default.relative_to(Path.cwd())
    parser.add_argument(
        _flag(f.name),
        dest=f.name,
        default=None,
        metavar=_metavar(f.name, f.default),
        type=Path if isinstance(f.default, Path) else type(f.default),
        help=f"{text}; default {default if default != '' else '(empty)'} [{env}]",
    )


def _metavar(name: str, default: Any) -> str:
    for suffix, metavar in (
        ("_ms", "MS"),
        ("_s", "S"),
        ("_bytes", "BYTES"),
        ("listen", "HOST:PORT"),
        ("_url", "URL"),
    ):
        if name.endswith(suffix):
            return metavar
    if isinstance(default, Path):
        return "DIR"
    return "N" if isinstance(default, int) else "VALUE"


def _settings_from(args: argparse.Namespace) -> Any:
    from gate.settings import Settings, settings_fields

    return Settings.from_env(**{f.name: getattr(args, f.name, None) for f in settings_fields()})


def cmd_serve(args: argparse.Namespace) -> int:
    """Validate settings, load and verify the model bundle, then serve until SIGTERM."""
    import logging

    from gate.bundle import BundleError
    from gate.logs import setup_logging
    from gate.reloader import ModelWatcher
    from gate.server import serve

    settings = _settings_from(args)
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
        return USAGE
    if bundle.model.fallback_reason:
        log.warning("compiled model not used", extra={"reason": bundle.model.fallback_reason})
    serve(settings, watcher)  # an expected start-up failure: one line, exit 2 (gate/server.py)
    return OK


def _enum_names(enum: Any, prefix: str) -> list[str]:
    """The values a user may give for an enum flag: names without prefix and UNSPECIFIED."""
    return [v.name.removeprefix(prefix) for v in enum.DESCRIPTOR.values if v.number != 0]


def build_check_request(args: argparse.Namespace) -> pb.CheckRequest:
    """A CheckRequest from --json (file, '-' or inline) and/or individual flags."""
    req = pb.CheckRequest()
    if args.json:
        text = (
            sys.stdin.read()
            if args.json == "-"
            else (Path(args.json).read_text() if Path(args.json).is_file() else args.json)
        )
        try:
            json_format.Parse(text, req)
        except json_format.ParseError as exc:
            raise BadInput(f"--json is not a valid CheckRequest: {' '.join(str(exc).split())}") from None
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
    for flag, (field, enum, prefix) in ENUM_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(req, field, enum.Value(prefix + value))
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
            error = _error_json(err)
            print(json.dumps(error, indent=2))
            raise Failed(f"Check answered {error['code']}: {error['message']}") from None
    print(json_format.MessageToJson(resp, preserving_proto_field_name=True))
    return OK


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
    with _redis_errors(settings):
        return _blocklist(args, blocklist.Blocklist.from_settings(settings))


def _blocklist(args: argparse.Namespace, book: Any) -> int:
    if args.action == "list":
        for entry in book.list():
            print(json.dumps(asdict(entry)))
        return OK
    targets = [
        (kind, value)
        for kind, value in (("account", args.account), ("device", args.device), ("ip", args.ip))
        if value
    ]
    if not targets:
        print(f"refund-gate blocklist {args.action}: give --account, --device or --ip", file=sys.stderr)
        return USAGE
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
    return OK


def cmd_decisions(args: argparse.Namespace) -> int:
    """Print the last decisions of the decision log (JSON lines), optionally following it."""
    import redis

    settings = _settings_from(args)
    with _redis_errors(settings):
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        return _tail(client, f"{settings.key_prefix}:decisions", args.n, args.follow)


def _tail(client: Any, key: str, n: int, follow: bool) -> int:
    Entries = list[tuple[bytes, dict[bytes, bytes]]]
    entries = cast(Entries, client.xrevrange(key, count=n))[::-1]
    for _, fields in entries:
        print(fields[b"d"].decode(), flush=True)
    last: bytes = entries[-1][0] if entries else b"$"
    while follow:
        streams = cast(list[tuple[bytes, Entries]], client.xread({key: last}, block=1000) or [])
        for _, items in streams:
            for entry_id, fields in items:
                print(fields[b"d"].decode(), flush=True)
                last = entry_id
    return OK


@contextmanager
def _redis_errors(settings: Any) -> Iterator[None]:
    """A Redis failure (down, refused, timed out, wrong password) as one line, exit FAILED."""
    import redis

    try:
        yield
    except redis.RedisError as exc:
        raise Failed(f"Redis at {settings.describe()['redis_url']}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = Parser(
        prog="refund-gate",
        description="refund-gate decides refunds over gRPC (APPROVE, HOLD_FOR_REVIEW, REJECT); "
        "these commands serve it, call it and run it.",
        epilog=EXIT_STATUS,
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    p_serve = sub.add_parser(
        "serve",
        help="run the gRPC service",
        description="Serve RefundGate until SIGTERM. Every setting is a flag or a GATE_* variable "
        "(the flag wins); they are validated before anything starts.",
        epilog=EXIT_STATUS,
        formatter_class=HelpFormatter,
    )
    _add_settings_flags(p_serve)
    p_serve.set_defaults(func=cmd_serve)

    p_check = sub.add_parser(
        "check",
        help="send one Check and print the response",
        description="Send one Check and print the response as JSON; an error answer is printed "
        "as JSON too (code, message, field_violations) and exits 1. Unset fields get friendly "
        "defaults, so the one-liner works.",
        epilog=EXIT_STATUS,
        formatter_class=HelpFormatter,
    )
    p_check.add_argument("--target", default="127.0.0.1:50051", help="host:port of the gate")
    p_check.add_argument("--timeout-ms", type=float, default=1000.0, metavar="MS", help="the call's deadline")
    p_check.add_argument("--json", help="CheckRequest as JSON: inline, a file, or - for stdin")
    for name, what in (
        ("refund-id", "idempotency key; default: a random one"),
        ("account-id", "the customer's account"),
        ("order-id", "the order refunded"),
        ("merchant-id", "the merchant"),
        ("currency", "ISO 4217 code; default EUR"),
        ("device-id", "the customer's device"),
        ("ip", "the customer's IP address"),
        ("city", "geo city of the request"),
    ):
        p_check.add_argument(f"--{name}", help=what)
    for flag, (_field, enum, prefix) in ENUM_FLAGS.items():
        names = _enum_names(enum, prefix)
        p_check.add_argument(
            f"--{flag}",
            type=str.upper,
            choices=names,
            metavar=flag.upper(),
            help=f"one of {', '.join(names)} (any case)",
        )
    p_check.add_argument("--amount", type=int, help="refund amount, minor units")
    p_check.add_argument("--order-amount", type=int, help="order amount, minor units; default: the amount")
    p_check.add_argument(
        "--returned", action=argparse.BooleanOptionalAction, default=None, help="item returned"
    )
    p_check.add_argument("--order-age-minutes", type=float, help="default: 3 days")
    p_check.add_argument("--account-age-days", type=float)
    p_check.set_defaults(func=cmd_check)

    p_block = sub.add_parser(
        "blocklist",
        help="manage the account/device/IP blocklist in Redis",
        description="Add, remove, show or list blocklist entries; ids are stored hashed with "
        "GATE_ID_HASH_KEY, so use the gate's key.",
        epilog=EXIT_STATUS,
        formatter_class=HelpFormatter,
    )
    p_block.add_argument("action", choices=("add", "remove", "show", "list"))
    p_block.add_argument("--account")
    p_block.add_argument("--device")
    p_block.add_argument("--ip")
    p_block.add_argument("--note", help="why (no personal data)")
    p_block.add_argument("--ttl-days", type=float, help="expire the entry after this many days")
    _add_settings_flags(p_block, BLOCKLIST_SETTINGS)
    p_block.set_defaults(func=cmd_blocklist)

    p_dec = sub.add_parser(
        "decisions",
        help="read the decision log",
        description="Print the latest decisions of the decision log stream as JSON lines.",
        epilog=EXIT_STATUS,
        formatter_class=HelpFormatter,
    )
    p_dec.add_argument("action", choices=("tail",))
    p_dec.add_argument("-n", type=int, default=20, help="how many of the latest to print")
    p_dec.add_argument("--follow", "-f", action="store_true", help="keep printing new ones")
    _add_settings_flags(p_dec, REDIS_SETTINGS)
    p_dec.set_defaults(func=cmd_decisions)

    # Model owners' commands. gate.modelcli imports only the standard library at module level;
    # its command functions import LightGBM, NumPy and redis-py when they run.
    from gate.modelcli import add_model_commands

    add_model_commands(sub)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit status. Expected failures are one line on stderr."""
    from gate.settings import SettingsError

    try:
        args = build_parser().parse_args(argv)
        try:
            status = int(args.func(args))
        finally:
            sys.stdout.flush()  # a closed pipe shows here at the latest, not at exit
        return status
    except SettingsError as exc:
        print(f"refund-gate: {exc}", file=sys.stderr)
        return USAGE
    except Failed as exc:
        print(f"refund-gate: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:
        # Python would complain again flushing stdout at exit: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        print("refund-gate: the output's reader went away (broken pipe); stopped", file=sys.stderr)
        return BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
