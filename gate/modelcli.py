"""``refund-gate model ...``: the model owners' commands.

    validate DIR          every check the gate runs at load, with a verdict (exit 0 valid, 1 refused)
    inspect DIR           manifest, model card, metrics, files and checksums (also of a bad bundle)
    promote DIR           validate, then atomically point MODEL_DIR/current (or shadow) at DIR
    unshadow              remove MODEL_DIR/shadow
    backtest DIR          replay logged decisions through DIR and show how decisions would change
    export-decisions      write the decision log stream to a JSONL file

Importing this module is cheap (standard library only), because `gate.cli` registers these
commands on every run; LightGBM, NumPy and redis-py are imported inside the commands.
Exit codes: 0 done, 1 refused (invalid bundle, unreadable source), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from gate.bundle import Bundle

OK, REFUSED, USAGE = 0, 1, 2
SLOTS = ("current", "shadow")


class UsageError(Exception):
    """A command-line argument that cannot work (exit 2)."""


class Refused(Exception):
    """The command ran but must refuse (exit 1); the message says why."""


# ---------------------------------------------------------------------------------------------
# validate


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One load-time check: passed (True), failed (False) or not reached (None)."""

    name: str
    description: str
    ok: bool | None
    detail: str


@dataclass(slots=True)
class Verdict:
    """What `gate.bundle.load_bundle` says of a bundle, check by check."""

    path: str
    valid: bool
    version: str | None = None
    engine: str | None = None
    fallback_reason: str | None = None
    num_trees: int | None = None
    thresholds: dict[str, float] | None = None
    error: str | None = None
    checks: list[CheckResult] = field(default_factory=list)


# The checks of load_bundle, in the order it runs them, and how to recognise each one's refusal.
# A refusal that matches none of them comes from loading model.txt (ModelFormatError's many texts).
_CHECKS: tuple[tuple[str, str, str | None], ...] = (
    (
        "manifest",
        "manifest.json readable, with every required key",
        r"no manifest\.json$|manifest\.json is not valid JSON|manifest\.json must be a JSON object"
        r"|manifest\.json lacks '",
    ),
    (
        "checksums",
        "every file listed in the manifest present, with its sha256",
        r"manifest lists no checksum for|: \S+ is missing$|: checksum of \S+ is "
        r"|manifest checksum does not match",
    ),
    ("features", "feature list = the gate's feature spec", r"feature list differs from the gate's"),
    ("thresholds", "thresholds sane: 0 < hold <= reject <= 1", r"thresholds are not sane"),
    ("model", "model.txt loads (the gate's tree parser and LightGBM agree)", None),
    (
        "golden",
        "golden vectors reproduce on every engine (1e-12)",
        r"golden vectors|engine scores golden row|row has \d+ values, the model takes",
    ),
)


def validate_bundle(path: Path) -> Verdict:
    """Run `gate.bundle.load_bundle` on ``path`` and describe the outcome check by check."""
    from gate.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(path)
    except BundleError as exc:
        return _refused(path, str(exc))
    except Exception as exc:  # the gate would not serve it either, but would crash, not refuse
        return _refused(
            path,
            f"{type(exc).__name__}: {exc} (load_bundle raised this instead of "
            "BundleError: the gate would fail with a traceback)",
        )
    return _accepted(path, bundle)


def _failed_check(message: str) -> str:
    for name, _, pattern in _CHECKS:
        if pattern is not None and re.search(pattern, message):
            return name
    return "model"


def _refused(path: Path, message: str) -> Verdict:
    """Checks before the failed one passed (load_bundle runs them in order); later ones did not run."""
    failed = _failed_check(message)
    checks: list[CheckResult] = []
    for name, doc, _ in _CHECKS:
        if name == failed:
            checks.append(CheckResult(name, doc, False, message))
        elif checks and checks[-1].ok is not True:
            checks.append(CheckResult(name, doc, None, "not checked"))
        else:
            checks.append(CheckResult(name, doc, True, ""))
    manifest = _manifest_or_none(path)
    version = str(manifest["version"]) if manifest and "version" in manifest else None
    return Verdict(str(path), False, version=version, error=message, checks=checks)


def _accepted(path: Path, bundle: Bundle) -> Verdict:
    model, t = bundle.model, bundle.thresholds
    engines = ["compiled", "lightgbm"] if model.engine == "compiled" else ["lightgbm"]
    files = sorted(bundle.manifest["files"])
    golden_rows = len(json.loads((bundle.path / "golden.json").read_text())["rows"])
    details = {
        "manifest": f"version {bundle.version}, created {bundle.manifest['created_at']}",
        "checksums": f"{len(files)} files match: {', '.join(files)}",
        "features": f"{model.num_features} features, in the gate's order",
        "thresholds": f"0 < hold {t.hold:.6g} <= reject {t.reject:.6g} <= 1",
        "model": f"{model.num_trees} trees",
        "golden": f"{golden_rows} rows reproduce on {' and '.join(engines)} (1e-12)",
    }
    return Verdict(
        str(path),
        True,
        version=bundle.version,
        engine=model.engine,
        fallback_reason=_fallback_text(bundle),
        num_trees=model.num_trees,
        thresholds={"hold": t.hold, "reject": t.reject},
        checks=[CheckResult(name, doc, True, details[name]) for name, doc, _ in _CHECKS],
    )


def _fallback_text(bundle: Bundle) -> str | None:
    if bundle.model.engine == "compiled":
        return None
    return bundle.model.fallback_reason or "the bundle has no model.so"


def format_verdict(v: Verdict) -> str:
    """The verdict as text, one line per check."""
    lines = [
        f"bundle      {v.path}",
        f"verdict     {'VALID: the gate would serve it' if v.valid else 'REFUSED'}",
    ]
    if v.version is not None:
        lines.append(f"version     {v.version}")
    if v.valid:
        engine = v.engine if v.fallback_reason is None else f"{v.engine} (fallback: {v.fallback_reason})"
        assert v.thresholds is not None
        lines += [
            f"engine      {engine}",
            f"trees       {v.num_trees}",
            f"thresholds  hold >= {v.thresholds['hold']:.6g}, reject >= {v.thresholds['reject']:.6g}",
        ]
    else:
        lines.append(f"reason      {v.error}")
    lines.append("checks")
    lines += [f"  {_check_text(c)}" for c in v.checks]
    return "\n".join(lines)


def _check_text(c: CheckResult) -> str:
    if c.ok is None:
        return f"· {c.name:<11} {c.description}: not checked"
    if c.ok is False:
        return f"✗ {c.name:<11} {c.description}: FAILED (see reason)"
    return f"✓ {c.name:<11} {c.detail or c.description}"


def cmd_validate(args: argparse.Namespace) -> int:
    """Print the verdict on a bundle; exit 0 when the gate would serve it, 1 when it refuses."""
    verdict = validate_bundle(_bundle_dir(args.dir))
    print(json.dumps(asdict(verdict), indent=2) if args.json else format_verdict(verdict))
    return OK if verdict.valid else REFUSED


# ---------------------------------------------------------------------------------------------
# inspect

_SHOWN_KEYS = (
    "version",
    "created_at",
    "num_trees",
    "features",
    "thresholds",
    "checksum",
    "files",
    "model_card",
    "metrics",
)


def read_manifest(path: Path) -> dict[str, Any]:
    """The bundle's manifest.json as a dict; Refused when it is missing or not a JSON object."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise Refused(f"{path}: no manifest.json") from None
    except (OSError, ValueError) as exc:
        raise Refused(f"{path}: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise Refused(f"{path}: manifest.json is not a JSON object")
    return manifest


def _manifest_or_none(path: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(path)
    except Refused:
        return None


def inspect_lines(path: Path, manifest: Mapping[str, Any]) -> list[str]:
    """A readable summary of a bundle: header, model card, metrics, files, other manifest keys."""
    lines = _header_lines(path, manifest)
    lines += ["", "model card"] + (_card_lines(manifest.get("model_card")) or ["  (none)"])
    lines += ["", "metrics"] + (_tree_lines(manifest.get("metrics"), 2) or ["  (none)"])
    lines += ["", "files", *_file_lines(path, manifest.get("files"))]
    other = {k: v for k, v in manifest.items() if k not in _SHOWN_KEYS}
    if other:
        lines += ["", "other manifest keys", *_tree_lines(other, 2)]
    return lines


def _header_lines(path: Path, manifest: Mapping[str, Any]) -> list[str]:
    from gate.features import FEATURE_NAMES

    where = f"{path} -> {path.resolve()}" if path.is_symlink() else str(path)
    features = manifest.get("features")
    if not isinstance(features, list):
        spec = "(missing)"
    else:
        same = list(features) == list(FEATURE_NAMES)
        spec = f"{len(features)} ({'the gate spec' if same else 'DIFFERS from the gate spec'})"
    thresholds = manifest.get("thresholds")
    return [
        f"bundle      {where}",
        f"version     {manifest.get('version', '(missing)')}",
        f"created     {manifest.get('created_at', '(missing)')}",
        f"trees       {manifest.get('num_trees', '(not recorded)')}",
        f"features    {spec}",
        f"thresholds  {_thresholds_text(thresholds)}",
    ]


def _thresholds_text(thresholds: Any) -> str:
    if isinstance(thresholds, dict) and all(isinstance(v, int | float) for v in thresholds.values()):
        return ", ".join(f"{k} >= {v:.6g}" for k, v in thresholds.items())
    return "(missing)" if thresholds is None else _inline(thresholds)


def _card_lines(card: Any) -> list[str]:
    """The model card: intended use, data window and mix, targets, blind spots, then the rest."""
    if not isinstance(card, dict) or not card:
        return _tree_lines(card, 2)
    card = dict(card)
    lines: list[str] = []
    if "intended_use" in card:
        lines += textwrap.wrap(
            f"intended use: {card.pop('intended_use')}", 96, initial_indent="  ", subsequent_indent="    "
        )
    data = card.pop("data", None)
    if isinstance(data, dict):
        lines += _data_lines(dict(data))
    elif data is not None:
        lines += _tree_lines({"data": data}, 2)
    if "targets" in card:
        lines += _tree_lines({"targets": card.pop("targets")}, 2)
    spots = card.pop("known_blind_spots", None)
    if isinstance(spots, list):
        lines += ["  known blind spots:"] + [f"    - {s}" for s in spots]
    elif spots is not None:
        lines += _tree_lines({"known_blind_spots": spots}, 2)
    return lines + _tree_lines(card, 2)


def _data_lines(data: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    window = data.pop("window", None)
    if _is_window(window):
        start, end = (datetime.fromtimestamp(float(t), UTC) for t in window)
        days = (end - start).total_seconds() / 86400
        lines.append(f"  data window: {start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC ({days:.1f} days)")
    elif window is not None:
        data["window"] = window
    scenarios = data.pop("scenarios", None)
    if data:
        lines += ["  data:", *_tree_lines(data, 4)]
    if isinstance(scenarios, dict) and all(isinstance(n, int | float) for n in scenarios.values()):
        lines += ["  scenario mix:", *_mix_lines(scenarios)]
    elif scenarios is not None:
        lines += _tree_lines({"scenarios": scenarios}, 2)
    return lines


def _is_window(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(t, int | float) and not isinstance(t, bool) for t in value)
    )


def _mix_lines(mix: Mapping[str, float]) -> list[str]:
    total = sum(mix.values()) or 1
    width = max(len(k) for k in mix)
    return [
        f"    {name:<{width}}  {_number(n):>10}  {n / total:6.1%}"
        for name, n in sorted(mix.items(), key=lambda kv: -kv[1])
    ]


def _tree_lines(value: Any, indent: int) -> list[str]:
    """Nested dicts and lists as indented ``key: value`` lines (scalars and short lists inline)."""
    if value is None or value == {} or value == []:
        return []
    pad = " " * indent
    if isinstance(value, dict):
        width = max(len(str(k)) for k in value)
        lines = []
        for key, item in value.items():
            if _is_inline(item):
                lines.append(f"{pad}{str(key) + ':':<{width + 1}} {_inline(item)}")
            else:
                lines += [f"{pad}{key}:", *_tree_lines(item, indent + 2)]
        return lines
    if isinstance(value, list) and not _is_inline(value):
        return [line for item in value for line in _list_item_lines(item, indent)]
    return [f"{pad}{_inline(value)}"]


def _list_item_lines(item: Any, indent: int) -> list[str]:
    if _is_inline(item):
        return [f"{' ' * indent}- {_inline(item)}"]
    return [f"{' ' * indent}-", *_tree_lines(item, indent + 2)]


def _is_inline(value: Any) -> bool:
    if isinstance(value, list):
        return all(not isinstance(v, dict | list) for v in value) and len(value) <= 8
    if isinstance(value, dict):
        return all(not isinstance(v, dict | list) for v in value.values()) and len(value) <= 3
    return True


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_number(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_number(v) for v in value) + "]"
    return _number(value)


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or value.is_integer():
        return f"{int(value):,}"
    return f"{value:.4f}" if abs(value) >= 1e-3 else f"{value:.3g}"


def _file_lines(path: Path, files: Any) -> list[str]:
    """Each listed file with its size, recorded sha256 and whether it still matches; then the
    files in the directory the manifest does not list."""
    from gate.bundle import sha256_file

    if not isinstance(files, dict):
        return ["  (the manifest lists no files)"]
    present = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != "manifest.json")
    width = max(len(n) for n in [*files, *present, ""])
    lines = []
    for name, expected in sorted(files.items()):
        file, recorded = path / name, f"sha256 {str(expected)[:16]}…"
        if not file.is_file():
            lines.append(f"  {name:<{width}}  {'':>12}  {recorded}  ✗ missing")
            continue
        actual = sha256_file(file)
        status = "✓" if actual == expected else f"✗ differs: is {actual[:16]}…"
        lines.append(f"  {name:<{width}}  {file.stat().st_size:>10,} B  {recorded}  {status}")
    lines += [
        f"  {name:<{width}}  {(path / name).stat().st_size:>10,} B  (not in the manifest)"
        for name in present
        if name not in files
    ]
    return lines


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print a bundle's manifest, model card, metrics and files; --json prints the manifest."""
    path = _bundle_dir(args.dir)
    manifest = read_manifest(path)
    print(json.dumps(manifest, indent=2) if args.json else "\n".join(inspect_lines(path, manifest)))
    return OK


# ---------------------------------------------------------------------------------------------
# promote / unshadow


def link_target(bundle_dir: Path, model_dir: Path) -> str:
    """What the link in ``model_dir`` should hold: relative when the bundle is inside it."""
    real_bundle, real_dir = bundle_dir.resolve(), model_dir.resolve()
    if real_bundle.is_relative_to(real_dir):
        return str(real_bundle.relative_to(real_dir))
    return str(real_bundle)


def swap_link(model_dir: Path, name: str, target: str) -> str | None:
    """Atomically make ``model_dir/name`` a symlink to ``target``; return what it held before.

    The new link is made under a temporary name in ``model_dir`` and renamed over the old one
    (os.replace, atomic on POSIX): a reader sees the old bundle or the new one, never nothing.
    """
    link = model_dir / name
    previous = os.readlink(link) if link.is_symlink() else None
    if previous is None and link.exists():
        raise Refused(f"{link} is not a symlink; move it away before promoting")
    tmp = model_dir / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except OSError:
        tmp.unlink()
        raise
    _fsync_dir(model_dir)
    return previous


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cmd_promote(args: argparse.Namespace) -> int:
    """Validate DIR, then point MODEL_DIR/current (or shadow) at it; print the previous target."""
    bundle_dir = _bundle_dir(args.dir)
    model_dir = _model_dir(args.model_dir or bundle_dir.resolve().parent)
    if bundle_dir.resolve() == model_dir.resolve():
        raise UsageError(f"{bundle_dir} is the model directory itself, not a bundle inside it")
    if args.no_validate:
        print(f"not validated (--no-validate): {bundle_dir}")
    else:
        verdict = validate_bundle(bundle_dir)
        if not verdict.valid:
            raise Refused(f"not promoting {bundle_dir}: {verdict.error}; {args.slot} is unchanged")
        print(f"valid: {verdict.version}, engine {verdict.engine}")
    target = link_target(bundle_dir, model_dir)
    try:
        previous = swap_link(model_dir, args.slot, target)
    except OSError as exc:
        raise Refused(f"cannot point {model_dir / args.slot} at {target}: {exc}") from None
    print(f"{model_dir / args.slot} -> {target} (was {previous or 'absent'})")
    print(_rollback_hint(model_dir, args.slot, previous))
    return OK


def _rollback_hint(model_dir: Path, slot: str, previous: str | None) -> str:
    """The command that undoes a promotion."""
    if previous is not None:
        old = os.path.normpath(os.path.join(model_dir.resolve(), previous))
        as_shadow = " --as shadow" if slot == "shadow" else ""
        return f"rollback: refund-gate model promote {old} --model-dir {model_dir}{as_shadow}"
    if slot == "shadow":
        return f"rollback: refund-gate model unshadow --model-dir {model_dir}"
    return f"rollback: there was no {slot} before; remove {model_dir / slot} to undo"


def cmd_unshadow(args: argparse.Namespace) -> int:
    """Remove MODEL_DIR/shadow (a symlink); the gate then stops scoring a shadow model."""
    model_dir = _model_dir(args.model_dir or _default_model_dir())
    link = model_dir / "shadow"
    if not link.is_symlink():
        if link.exists():
            raise Refused(f"{link} is not a symlink; remove it by hand")
        print(f"no shadow in {model_dir}")
        return OK
    previous = os.readlink(link)
    link.unlink()
    _fsync_dir(model_dir)
    print(f"removed {link} (was -> {previous})")
    return OK


def _default_model_dir() -> Path:
    """The directory holding current/shadow, from GATE_MODEL_DIR (which may name a bundle)."""
    from gate.settings import Settings, SettingsError

    try:
        configured = Settings.from_env().model_dir
    except SettingsError as exc:
        raise UsageError(f"{exc}; give --model-dir") from None
    return configured.parent if (configured / "manifest.json").exists() else configured


# ---------------------------------------------------------------------------------------------
# backtest / export-decisions


def cmd_backtest(args: argparse.Namespace) -> int:
    """Replay logged decisions through a candidate bundle and print how decisions would change."""
    from gate.backtest import backtest, format_report
    from gate.policy import DegradedPolicy

    bundle = _load_or_refuse(_bundle_dir(args.dir))
    with _decision_source(args) as records:
        report = backtest(
            records, bundle, DegradedPolicy(args.degraded_approve_below_minor), limit=args.limit
        )
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return OK


def cmd_export(args: argparse.Namespace) -> int:
    """Write the decision log stream to a JSONL file (one DecisionRecord JSON per line)."""
    out: Path = args.out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with _decision_source(args) as records, tmp.open("w", encoding="utf-8") as fh:
            count = _write_lines(fh, islice(records, args.limit))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"exported {count:,} decisions from {args.key_prefix}:decisions to {out}")
    return OK


def _write_lines(fh: TextIO, records: Iterable[bytes | str]) -> int:
    count = 0
    for raw in records:
        text = raw.decode() if isinstance(raw, bytes) else raw
        fh.write(text.rstrip("\n") + "\n")
        count += 1
    return count


@contextmanager
def _decision_source(args: argparse.Namespace) -> Iterator[Iterator[str] | Iterator[bytes]]:
    """The raw decision records of --jsonl FILE or of the --redis-url stream; a Redis error
    while reading them refuses the command."""
    from gate.backtest import read_jsonl, read_stream

    if args.jsonl is not None:
        if not args.jsonl.is_file():
            raise UsageError(f"{args.jsonl}: no such file")
        yield read_jsonl(args.jsonl)
        return
    import redis

    try:
        client = redis.Redis.from_url(args.redis_url, socket_timeout=10, socket_connect_timeout=5)
    except ValueError as exc:
        raise UsageError(f"--redis-url: {exc}") from None
    try:
        yield read_stream(client, f"{args.key_prefix}:decisions")
    except redis.RedisError as exc:
        raise Refused(f"cannot read decisions from {args.redis_url}: {exc}") from None
    finally:
        client.close()


def _load_or_refuse(path: Path) -> Bundle:
    from gate.bundle import BundleError, load_bundle

    try:
        return load_bundle(path)
    except BundleError as exc:
        raise Refused(f"candidate refused: {exc}") from None


# ---------------------------------------------------------------------------------------------
# arguments


def _bundle_dir(path: Path) -> Path:
    if not path.is_dir():
        raise UsageError(f"{path}: not a directory")
    return path


def _model_dir(path: Path) -> Path:
    if not path.is_dir():
        raise UsageError(f"{path}: model directory does not exist")
    return path


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _run(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn UsageError / Refused into a message on stderr and exit 2 / 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except UsageError as exc:
            print(f"refund-gate model: {exc}", file=sys.stderr)
            return USAGE
        except Refused as exc:
            print(f"refund-gate model: {exc}", file=sys.stderr)
            return REFUSED

    return run


def add_model_commands(sub: Any) -> None:
    """Register ``model`` and its subcommands on the subparsers action of `gate.cli`."""
    from gate.settings import Settings

    defaults = Settings()
    model = sub.add_parser(
        "model",
        help="validate, inspect, promote and backtest model bundles",
        description="The model owners' commands. Exit codes: 0 done, 1 refused "
        "(invalid bundle, unreadable source), 2 usage error.",
    )
    msub = model.add_subparsers(dest="model_command", required=True)

    p = msub.add_parser("validate", help="run every check the gate runs at load")
    p.add_argument("dir", type=Path, help="bundle directory")
    p.add_argument("--json", action="store_true", help="machine-readable verdict")
    p.set_defaults(func=_run(cmd_validate))

    p = msub.add_parser("inspect", help="manifest, model card, metrics, files and checksums")
    p.add_argument("dir", type=Path, help="bundle directory")
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.set_defaults(func=_run(cmd_inspect))

    p = msub.add_parser("promote", help="validate, then atomically point current/shadow at DIR")
    p.add_argument("dir", type=Path, help="bundle directory")
    p.add_argument(
        "--model-dir", type=Path, help="directory of the current/shadow links (default: the parent of DIR)"
    )
    p.add_argument("--as", dest="slot", choices=SLOTS, default="current")
    p.add_argument("--no-validate", action="store_true", help="promote even an invalid bundle")
    p.set_defaults(func=_run(cmd_promote))

    p = msub.add_parser("unshadow", help="remove the shadow link")
    p.add_argument(
        "--model-dir", type=Path, help="directory of the current/shadow links (default: from GATE_MODEL_DIR)"
    )
    p.set_defaults(func=_run(cmd_unshadow))

    p = msub.add_parser("backtest", help="replay logged decisions through a candidate bundle")
    p.add_argument("dir", type=Path, help="candidate bundle directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--redis-url", help="read the decision log stream from this Redis")
    source.add_argument("--jsonl", type=Path, help="read a JSONL export instead")
    p.add_argument("--key-prefix", default=defaults.key_prefix, help="stream <prefix>:decisions")
    p.add_argument("--limit", type=_int_at_least(1), help="replay at most the N oldest decisions")
    p.add_argument(
        "--degraded-approve-below-minor",
        type=_int_at_least(0),
        default=defaults.degraded_approve_below_minor,
        help="degraded policy of the replay (default: the gate's default)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=_run(cmd_backtest))

    p = msub.add_parser("export-decisions", help="write the decision log stream to JSONL")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--key-prefix", default=defaults.key_prefix, help="stream <prefix>:decisions")
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    p.add_argument("--limit", type=_int_at_least(1), help="at most the N oldest decisions")
    p.set_defaults(func=_run(cmd_export), jsonl=None)
