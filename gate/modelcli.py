"""``refund-gate model ...``: the model owners' commands.

    validate DIR          every check the gate runs at load, with a verdict (exit 0 valid, 1 refused)
    inspect DIR           manifest, model card, signature, metrics, files and checksums (also of a bad bundle)
    promote DIR           validate (copy DIR into MODEL_DIR if it is outside), then atomically point
                          MODEL_DIR/current (or shadow) at it, relatively
    unshadow              remove MODEL_DIR/shadow
    status                the running gate's models (admin GetModelStatus)
    sign DIR --key KEY    sign DIR's manifest with an Ed25519 key (gate/signing.py)
    keygen --out KEY      make an Ed25519 key pair for signing bundles
    train ...             train a bundle (model.train, with the same arguments)
    backtest DIR          replay logged decisions through DIR and show how decisions would change
    export-decisions      write the decision log stream, outcomes joined, to a JSONL file

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

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
    signature: str | None = None
    """Who signed it, and whether that was verified (gate/signing.py), or why it is unsigned."""


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
        "signature",
        "signed by a trusted key (required when GATE_BUNDLE_PUBLIC_KEY is set)",
        r"not signed \(no signature\.json\)|not by a trusted key|does not match manifest\.json"
        r"|signature\.json is ",
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


def validate_bundle(path: Path, trusted_keys: Sequence[Ed25519PublicKey] | None = None) -> Verdict:
    """Run `gate.bundle.load_bundle` on ``path`` (with the gate's trusted keys, if any) and
    describe the outcome check by check."""
    from gate.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(path, trusted_keys=trusted_keys)
    except BundleError as exc:
        verdict = _refused(path, str(exc))
    except Exception as exc:  # the gate would not serve it either, but would crash, not refuse
        verdict = _refused(
            path,
            f"{type(exc).__name__}: {exc} (load_bundle raised this instead of "
            "BundleError: the gate would fail with a traceback)",
        )
    else:
        verdict = _accepted(path, bundle)
    verdict.signature = signature_text(path, trusted_keys)
    return verdict


def signature_text(path: Path, trusted_keys: Sequence[Ed25519PublicKey] | None) -> str:
    """The bundle's signature in words: verified signer, claimed signer, or unsigned."""
    import hashlib

    from gate.signing import SignatureError, read_signature, verify_manifest

    try:
        info = read_signature(path)
        manifest = (path / "manifest.json").read_bytes()
    except (SignatureError, OSError) as exc:
        return f"unreadable: {exc}"
    if info is None:
        suffix = (
            "" if trusted_keys is not None else " (the gate accepts it only without GATE_BUNDLE_PUBLIC_KEY)"
        )
        return "unsigned" + suffix
    if trusted_keys is not None:
        try:
            return f"signed by {verify_manifest(manifest, info, trusted_keys)}, verified"
        except SignatureError as exc:
            return f"REFUSED: {exc}"
    changed = hashlib.sha256(manifest).hexdigest() != info.manifest_sha256
    return (
        f"signed by {info.describe()}, not verified (no public key: --public-key or "
        f"GATE_BUNDLE_PUBLIC_KEY)" + ("; manifest.json CHANGED since it was signed" if changed else "")
    )


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
        "signature": f"signed by {bundle.signer}" if bundle.signer else "not required (no trusted key)",
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
    if v.signature is not None:
        lines.append(f"signature   {v.signature}")
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
    verdict = validate_bundle(_bundle_dir(args.dir), _trusted_keys(args))
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
    "report",
)
REPORT_COPY = "report"
"""Where `promote` puts the report of a bundle it copies into the model directory."""


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


def _manifest_bytes(path: Path) -> bytes | None:
    try:
        return (path / "manifest.json").read_bytes()
    except OSError:
        return None


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
        f"signature   {signature_text(path, None)}",
        f"report      {report_text(path, manifest)}",
    ]


def find_report(path: Path, manifest: Mapping[str, Any]) -> Path | None:
    """The bundle's evaluation report: the manifest's ``report`` (relative to the bundle), else
    the copy `promote` made inside the bundle; None when neither exists."""
    recorded = manifest.get("report")
    if not isinstance(recorded, str) or not recorded:
        return None
    candidates = [path / recorded, path / REPORT_COPY / Path(recorded).name]
    return next((c for c in candidates if c.is_file()), None)


def report_text(path: Path, manifest: Mapping[str, Any]) -> str:
    """Where the report is, or a warning when the manifest's path is broken."""
    recorded = manifest.get("report")
    if recorded is None:
        return "(none recorded)"
    found = find_report(path, manifest)
    if found is None:
        return f"WARNING: broken path: {recorded} does not exist (from {path})"
    if found == path / str(recorded):
        return f"{recorded} -> {found.resolve()}"
    return f"{found.relative_to(path)} (copied by promote; the manifest's {recorded} does not resolve here)"


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
        f"  {name:<{width}}  {(path / name).stat().st_size:>10,} B  "
        + ("(the signature of manifest.json)" if name == "signature.json" else "(not in the manifest)")
        for name in present
        if name not in files
    ]
    return lines


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print a bundle's manifest, model card, metrics and files; --json prints the manifest."""
    path = _bundle_dir(args.dir)
    manifest = read_manifest(path)
    print(json.dumps(manifest, indent=2) if args.json else "\n".join(inspect_lines(path, manifest)))
    if "report" in manifest and find_report(path, manifest) is None:
        print(
            f"refund-gate model inspect: warning: report path is broken: {manifest['report']}",
            file=sys.stderr,
        )
    return OK


# ---------------------------------------------------------------------------------------------
# promote / unshadow


def link_target(bundle_dir: Path, model_dir: Path) -> str:
    """What the link in ``model_dir`` holds: the bundle's path relative to ``model_dir`` (a
    bundle outside it is copied in first, `copy_into`)."""
    return os.path.relpath(bundle_dir.resolve(), model_dir.resolve())


def is_inside(bundle_dir: Path, model_dir: Path) -> bool:
    """True when ``bundle_dir`` (resolved) lies inside ``model_dir`` (resolved)."""
    return bundle_dir.resolve().is_relative_to(model_dir.resolve())


def copy_into(bundle_dir: Path, model_dir: Path) -> tuple[Path, bool]:
    """Copy a bundle from outside ``model_dir`` into ``model_dir/<its name>``, with its report
    (into ``report/`` inside the copy when the manifest's relative path would not resolve from
    there); return (the copy, whether it was made now).

    The copy is made under a temporary name and renamed into place, so the gate never sees half
    a bundle. An existing directory of that name is reused only when it holds the same manifest
    and files; otherwise the promotion is refused.
    """
    import shutil

    dest = model_dir / bundle_dir.resolve().name
    if dest.exists() or dest.is_symlink():
        if _manifest_bytes(dest) != _manifest_bytes(bundle_dir):
            raise Refused(f"{dest} exists and differs from {bundle_dir}; rename one of them")
        return dest, False
    tmp = model_dir / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        shutil.copytree(bundle_dir, tmp, symlinks=False)
        manifest = _manifest_or_none(bundle_dir) or {}
        report = find_report(bundle_dir, manifest)
        if report is not None and not (dest / str(manifest["report"])).resolve().is_file():
            shutil.copytree(report.parent, tmp / REPORT_COPY, dirs_exist_ok=True)
        os.rename(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Refused(f"cannot copy {bundle_dir} into {model_dir}: {exc}") from None
    _fsync_dir(model_dir)
    return dest, True


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
    """Validate DIR as the gate would (its trusted keys included); copy it into the model
    directory when it is outside; point MODEL_DIR/current (or shadow) at it, relatively; print
    the previous target and how to roll back."""
    bundle_dir = _bundle_dir(args.dir)
    model_dir = _model_dir(args.model_dir or bundle_dir.resolve().parent)
    if bundle_dir.resolve() == model_dir.resolve():
        raise UsageError(f"{bundle_dir} is the model directory itself, not a bundle inside it")
    keys = _trusted_keys(args)
    if args.no_validate:
        print(f"not validated (--no-validate): {bundle_dir}")
    else:
        _valid_or_refuse(bundle_dir, keys, args.slot)
    if not is_inside(bundle_dir, model_dir):
        bundle_dir, made = copy_into(bundle_dir, model_dir)
        print(f"{'copied into' if made else 'already in'} {model_dir}: {bundle_dir.name}")
        if not args.no_validate:
            _valid_or_refuse(bundle_dir, keys, args.slot)  # what the gate will load: the copy
    target = link_target(bundle_dir, model_dir)
    try:
        previous = swap_link(model_dir, args.slot, target)
    except OSError as exc:
        raise Refused(f"cannot point {model_dir / args.slot} at {target}: {exc}") from None
    print(f"{model_dir / args.slot} -> {target} (was {previous or 'absent'})")
    print(_rollback_hint(model_dir, args.slot, previous, keys))
    return OK


def _valid_or_refuse(bundle_dir: Path, keys: Sequence[Ed25519PublicKey] | None, slot: str) -> None:
    verdict = validate_bundle(bundle_dir, keys)
    if not verdict.valid:
        raise Refused(f"not promoting {bundle_dir}: {verdict.error}; {slot} is unchanged")
    print(f"valid: {verdict.version}, engine {verdict.engine}, {verdict.signature}")


def _rollback_hint(
    model_dir: Path, slot: str, previous: str | None, keys: Sequence[Ed25519PublicKey] | None
) -> str:
    """The command that undoes a promotion; never one that names a bundle the gate refuses."""
    if previous is not None:
        old = Path(os.path.normpath(os.path.join(model_dir.resolve(), previous)))
        verdict = validate_bundle(old, keys) if old.is_dir() else None
        if verdict is None or not verdict.valid:
            why = verdict.error if verdict is not None else "it no longer exists"
            return (
                f"rollback: no safe target: what {slot} pointed at before would be refused by the "
                f"gate ({why}); promote a bundle that validates"
            )
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
# status


def cmd_status(args: argparse.Namespace) -> int:
    """Ask a running gate for its models (admin GetModelStatus); readable, or --json."""
    import grpc
    from google.protobuf import json_format

    from refundgate.v1 import admin_pb2, admin_pb2_grpc

    target, token = _admin_target(args.target)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(target) as channel:
        try:
            status = admin_pb2_grpc.GateAdminStub(channel).GetModelStatus(
                admin_pb2.GetModelStatusRequest(), timeout=args.timeout_s, metadata=metadata
            )
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "error"
            raise Refused(f"cannot get the model status from {target} ({code}); is a gate there?") from None
    if args.json:
        body = json_format.MessageToDict(status, preserving_proto_field_name=True)
        print(json.dumps({"target": target, **body}, indent=2))
    else:
        print("\n".join(status_lines(target, status)))
    return OK


def status_lines(target: str, status: Any) -> list[str]:
    """A GetModelStatus reply as text: live, shadow, previous, reloads, the last refusal."""
    lines = [f"gate        {target}"]
    for name in ("live", "shadow", "previous"):
        if not status.HasField(name):
            lines.append(f"{name:<12}(none)")
            continue
        info = getattr(status, name)
        loaded = _when(info.loaded_at)
        lines += [
            f"{name:<12}{info.version}  ({info.engine}, {info.num_trees} trees, hold >= "
            f"{info.hold_threshold:.6g}, reject >= {info.reject_threshold:.6g})",
            f"{'':<12}loaded {loaded}",
        ]
    lines.append(f"loads       {status.reloads:,} loaded, {status.refusals:,} refused")
    if status.HasField("last_refusal"):
        r = status.last_refusal
        lines += [f"last refusal {_when(r.at)}: {r.slot}", f"{'':<12}{r.reason}"]
    return lines


def _when(ts: Any) -> str:
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _admin_target(target: str | None) -> tuple[str, str]:
    """GateAdmin's address (``--target``, else GATE_ADMIN_LISTEN) and its token (GATE_ADMIN_TOKEN)."""
    from gate.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise UsageError(f"{exc}; give --target") from None
    where = target or settings.admin_listen
    if not where:
        raise UsageError("GateAdmin has no listener (GATE_ADMIN_LISTEN is empty); give --target")
    return where, settings.admin_token


# ---------------------------------------------------------------------------------------------
# sign / keygen


def cmd_sign(args: argparse.Namespace) -> int:
    """Sign DIR's manifest.json with the Ed25519 private key in --key (writes signature.json)."""
    from gate.signing import KeyFileError, load_private_key, sign_bundle

    bundle_dir = _bundle_dir(args.dir)
    read_manifest(bundle_dir)
    try:
        key = load_private_key(args.key)
    except KeyFileError as exc:
        raise UsageError(f"--key: {exc}") from None
    verdict = validate_bundle(bundle_dir)  # never sign what the gate would refuse anyway
    if not verdict.valid:
        raise Refused(f"not signing {bundle_dir}: {verdict.error}")
    info = sign_bundle(bundle_dir, key, signer=args.signer)
    print(f"signed {bundle_dir} ({verdict.version}) as {info.describe()}: {bundle_dir / 'signature.json'}")
    return OK


def cmd_keygen(args: argparse.Namespace) -> int:
    """Write a new Ed25519 private key (mode 0600) to --out and its public key to --out.pub."""
    from gate.signing import generate_key, key_id, private_pem, public_pem

    private: Path = args.out
    public = private.with_name(private.name + ".pub")
    for path in (private, public):
        if path.exists():
            raise Refused(f"{path} exists; not overwriting a key")
    key = generate_key()
    try:
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private_pem(key))
        public.write_bytes(public_pem(key.public_key()))
    except OSError as exc:
        raise Refused(f"cannot write the key: {exc}") from None
    print(f"private key {private} (keep it secret: it signs bundles the gate will run)")
    print(f"public key  {public} (give it to the gate: GATE_BUNDLE_PUBLIC_KEY={public})")
    print(f"key id      {key_id(key.public_key())}")
    return OK


def _trusted_keys(args: argparse.Namespace) -> Sequence[Ed25519PublicKey] | None:
    """The keys the gate would require: --public-key, else GATE_BUNDLE_PUBLIC_KEY, else none."""
    from gate.signing import KeyFileError, load_public_keys

    path = args.public_key
    if path is None:
        from gate.settings import Settings, SettingsError

        try:
            configured = Settings.from_env().bundle_public_key
        except SettingsError as exc:
            raise UsageError(f"{exc}; give --public-key") from None
        path = Path(configured) if configured else None
    if path is None:
        return None
    try:
        return load_public_keys(path)
    except KeyFileError as exc:
        raise UsageError(f"--public-key: {exc}") from None


# ---------------------------------------------------------------------------------------------
# train


def cmd_train(args: argparse.Namespace) -> int:
    """Delegate to `model.train.main` with the arguments as given."""
    import importlib

    try:  # imported by name: model/ is the repository's, not part of the installed gate package
        train_main = importlib.import_module("model.train").main
    except ImportError as exc:
        raise Refused(
            f"model training needs the repository's model/ package ({exc}); run it from a checkout"
        ) from None
    train_main(args.train_args)
    return OK


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
    """Write the decision log to a JSONL file: one decision per line, features by name, the
    outcomes RecordEvents recorded for its refund joined (gate/decisionread.py)."""
    import redis

    from gate.decisionread import joined_records

    out: Path = args.out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    count = with_outcomes = 0
    client = _redis_client(args.redis_url)
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for body in islice(joined_records(client, args.key_prefix), args.limit):
                fh.write(json.dumps(body, separators=(",", ":")) + "\n")
                count += 1
                with_outcomes += bool(body.get("outcomes"))
        os.replace(tmp, out)
    except redis.RedisError as exc:
        raise Refused(f"cannot read decisions from {args.redis_url}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
        client.close()
    print(
        f"exported {count:,} decisions ({with_outcomes:,} with outcomes) from "
        f"{args.key_prefix}:decisions and {args.key_prefix}:outcomes to {out}"
    )
    return OK


def _redis_client(url: str) -> Any:
    import redis

    try:
        return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    except ValueError as exc:
        raise UsageError(f"--redis-url: {exc}") from None


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

    client = _redis_client(args.redis_url)
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

    public_key_help = (
        "PEM file of the trusted public key(s) (default: GATE_BUNDLE_PUBLIC_KEY; none: unsigned ok)"
    )
    p = msub.add_parser("validate", help="run every check the gate runs at load")
    p.add_argument("dir", type=Path, help="bundle directory")
    p.add_argument("--json", action="store_true", help="machine-readable verdict")
    p.add_argument("--public-key", type=Path, help=public_key_help)
    p.set_defaults(func=_run(cmd_validate))

    p = msub.add_parser("inspect", help="manifest, model card, signature, metrics, files and checksums")
    p.add_argument("dir", type=Path, help="bundle directory")
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.set_defaults(func=_run(cmd_inspect))

    p = msub.add_parser(
        "promote", help="validate, copy into the model directory if outside, point current/shadow at it"
    )
    p.add_argument("dir", type=Path, help="bundle directory")
    p.add_argument(
        "--model-dir", type=Path, help="directory of the current/shadow links (default: the parent of DIR)"
    )
    p.add_argument("--as", dest="slot", choices=SLOTS, default="current")
    p.add_argument("--public-key", type=Path, help=public_key_help)
    p.add_argument("--no-validate", action="store_true", help="promote even an invalid bundle")
    p.set_defaults(func=_run(cmd_promote))

    p = msub.add_parser("status", help="the running gate's live, shadow and previous models")
    p.add_argument(
        "--target",
        help="host:port of GateAdmin's listener (default: GATE_ADMIN_LISTEN; token: GATE_ADMIN_TOKEN)",
    )
    p.add_argument("--timeout-s", type=float, default=5.0, help="give up after this long")
    p.add_argument("--json", action="store_true", help="machine-readable status")
    p.set_defaults(func=_run(cmd_status))

    p = msub.add_parser("sign", help="sign a bundle's manifest with an Ed25519 key")
    p.add_argument("dir", type=Path, help="bundle directory")
    p.add_argument("--key", type=Path, required=True, help="PEM private key (refund-gate model keygen)")
    p.add_argument("--signer", default="", help="who signs, shown by validate/inspect (e.g. a team)")
    p.set_defaults(func=_run(cmd_sign))

    p = msub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles")
    p.add_argument("--out", type=Path, required=True, help="private key file; the public key goes to OUT.pub")
    p.set_defaults(func=_run(cmd_keygen))

    # Every argument, options included, is model.train's: this parser has no options of its own
    # (an option prefix no argument uses), so even --help reaches model.train.
    p = msub.add_parser(
        "train",
        help="train a bundle (python -m model.train, same arguments)",
        add_help=False,
        prefix_chars="\x00",
    )
    p.add_argument("train_args", nargs="*", help="arguments of model.train (see --help)")
    p.set_defaults(func=_run(cmd_train))

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

    p = msub.add_parser(
        "export-decisions", help="write the decision log to JSONL: features by name, outcomes joined"
    )
    p.add_argument("--redis-url", required=True)
    p.add_argument("--key-prefix", default=defaults.key_prefix, help="stream <prefix>:decisions")
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    p.add_argument("--limit", type=_int_at_least(1), help="at most the N oldest decisions")
    p.set_defaults(func=_run(cmd_export), jsonl=None)
