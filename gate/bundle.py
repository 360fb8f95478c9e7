"""Model bundles: a directory with model.txt, manifest.json, golden vectors and, optionally, the
model compiled to a shared object. Loading verifies everything before anything is served.

    manifest.json   version, created_at, features (ordered), thresholds, checksum (sha256 of
                    model.txt), files {name: sha256}, metrics, model card
    model.txt       LightGBM text model: the portable reference
    model.so        optional: the same trees compiled when the bundle was built (fast path)
    golden.json     rows (NaN as null, infinities as "inf"/"-inf") and their expected scores
    signature.json  optional: Ed25519 signature of manifest.json (gate/signing.py), required
                    when the gate is given trusted public keys (GATE_BUNDLE_PUBLIC_KEY)

A bundle is refused, with a message saying exactly why, when its signature is missing or wrong
while signatures are required (checked before any file the manifest lists is read), a checksum
differs, its feature list is not the gate's, its thresholds are not sane, or any engine fails to
reproduce the golden scores.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gate.features import FEATURE_NAMES
from gate.policy import REASON_GROUPS, Thresholds
from gate.scoring import Model, ModelFormatError, load_model
from gate.signing import SignatureError, read_signature, verify_manifest
from gate.treemodel import yield_gil

MANIFEST = "manifest.json"
MODEL_TXT = "model.txt"
MODEL_SO = "model.so"
GOLDEN = "golden.json"
GOLDEN_TOLERANCE = 1e-12


class BundleError(ValueError):
    """The bundle cannot be served; the message says which check failed."""


@dataclass(frozen=True, slots=True)
class Bundle:
    """A verified model bundle, ready to serve."""

    path: Path
    version: str
    model: Model
    thresholds: Thresholds
    manifest: dict[str, Any]
    loaded_at: float
    explain: Callable[[np.ndarray], np.ndarray]
    """Per reason code (gate.policy.REASON_CODES), how much the features of that code pushed
    the score up, from the leaves a row reached (``model.last_leaves()``)."""
    signer: str | None = None
    """The verified signer (gate/signing.py), when signatures were required; else None."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode_row(row: Sequence[float]) -> list[float | str | None]:
    """JSON-safe row: NaN as null, infinities as strings."""
    return [None if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else v for v in row]


def decode_row(row: Sequence[float | str | None]) -> list[float]:
    """Inverse of encode_row."""
    return [math.nan if v is None else float(v) for v in row]


def load_bundle(
    path: Path,
    *,
    feature_names: Sequence[str] = FEATURE_NAMES,
    trusted_keys: Sequence[Ed25519PublicKey] | None = None,
) -> Bundle:
    """Load and verify the bundle at ``path`` (a directory or a symlink to one).

    With ``trusted_keys`` (GATE_BUNDLE_PUBLIC_KEY) the manifest must be signed by one of them.
    Raises BundleError naming the first failed check.
    """
    path = path.resolve()
    try:
        raw_manifest = (path / MANIFEST).read_bytes()
        manifest = json.loads(raw_manifest)
    except FileNotFoundError:
        raise BundleError(f"{path}: no {MANIFEST}") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: {MANIFEST} must be a JSON object")
    for key in ("version", "features", "thresholds", "checksum", "files", "created_at"):
        if key not in manifest:
            raise BundleError(f"{path}: {MANIFEST} lacks '{key}'")
    version = str(manifest["version"])
    signer = None
    if trusted_keys is not None:
        try:
            signer = verify_manifest(raw_manifest, read_signature(path), trusted_keys)
        except SignatureError as exc:
            raise BundleError(f"{version}: {exc}") from None

    files: dict[str, str] = manifest["files"]
    for name in (MODEL_TXT, GOLDEN):
        if name not in files:
            raise BundleError(f"{version}: manifest lists no checksum for {name}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{version}: {name} is missing")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(
                f"{version}: checksum of {name} is {actual[:12]}…, manifest says "
                f"{str(expected)[:12]}… (corrupt or half-copied bundle)"
            )
    if manifest["checksum"] != files[MODEL_TXT]:
        raise BundleError(f"{version}: manifest checksum does not match model.txt's")

    features = list(manifest["features"])
    if features != list(feature_names):
        raise BundleError(
            f"{version}: feature list differs from the gate's: {_first_difference(features, feature_names)}"
        )
    try:
        thresholds = Thresholds(
            float(manifest["thresholds"]["hold"]), float(manifest["thresholds"]["reject"])
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{version}: thresholds are not sane ({exc})") from None

    compiled = path / MODEL_SO if MODEL_SO in files else None
    try:
        model = load_model(path / MODEL_TXT, compiled, feature_names=feature_names)
    except ModelFormatError as exc:
        raise BundleError(f"{version}: {exc}") from None
    engines = [model]
    if model.engine != "lightgbm":  # the portable fallback must be right too
        engines.append(model.portable())
    _verify_golden(version, path / GOLDEN, engines)
    return Bundle(
        path,
        version,
        model,
        thresholds,
        manifest,
        time.time(),
        model.grouped_contributions(REASON_GROUPS),
        signer,
    )


def _verify_golden(version: str, golden_path: Path, engines: Sequence[Model]) -> None:
    try:
        golden = json.loads(golden_path.read_text())
        rows = [decode_row(r) for r in golden["rows"]]
        expected = [float(s) for s in golden["scores"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{version}: golden vectors unreadable ({exc})") from None
    if not rows or len(rows) != len(expected):
        raise BundleError(f"{version}: golden vectors are empty or do not match their scores")
    for model in engines:
        for i, (row, want) in enumerate(zip(rows, expected, strict=True)):
            if i % 16 == 0:
                yield_gil()
            try:
                got = model.score(row)
            except (ValueError, TypeError) as exc:
                raise BundleError(f"{version}: golden row {i} cannot be scored ({exc})") from None
            if not abs(got - want) <= GOLDEN_TOLERANCE:
                raise BundleError(
                    f"{version}: the {model.engine} engine scores golden row {i} "
                    f"as {got!r}, expected {want!r}"
                )


def _first_difference(got: Sequence[str], want: Sequence[str]) -> str:
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f"position {i} is '{a}', expected '{b}'"
    return f"{len(got)} features, expected {len(want)}"
