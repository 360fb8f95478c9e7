"""Signed model bundles: an Ed25519 signature over manifest.json, which lists every file's sha256.

A bundle ships native code (model.so) that the gate loads, so whoever can write the model
directory could run code in the gate. With ``GATE_BUNDLE_PUBLIC_KEY`` set, the gate serves only
bundles whose ``signature.json`` is a valid signature, by one of the trusted keys, of the exact
bytes of their manifest.json; the manifest's checksums then vouch for every file, checked
before anything is loaded (gate/bundle.py).

    signature.json  {"algorithm": "ed25519", "key_id": "ed25519:<16 hex>", "signer": "<name>",
                     "manifest_sha256": "<hex>", "signature": "<base64, 64 bytes>"}

``key_id`` is the start of the sha256 of the raw public key: it names the key in messages and
lets a public-key file hold several trusted keys (rotation). Keys are PEM files, the same as
``openssl genpkey -algorithm ed25519`` writes (PKCS#8 private key; its public half by
``openssl pkey -pubout``). The signature proves who signed the manifest, not that the model is
good: validation still runs every other check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE = "signature.json"
ALGORITHM = "ed25519"
_PEM_BLOCK = b"-----BEGIN PUBLIC KEY-----"


class SignatureError(ValueError):
    """A bundle's signature is missing, unreadable, by an untrusted key, or does not match."""


class KeyFileError(ValueError):
    """A key file cannot be read or holds no Ed25519 key; the message names the file."""


@dataclass(frozen=True, slots=True)
class SignatureInfo:
    """What a bundle's signature.json claims (not yet verified)."""

    key_id: str
    signer: str
    manifest_sha256: str
    signature: bytes

    def describe(self) -> str:
        """'ed25519:ab12… (model-owners@shop)'."""
        return f"{self.key_id} ({self.signer})" if self.signer else self.key_id


def key_id(key: Ed25519PublicKey) -> str:
    """A short, stable name of a public key: ``ed25519:`` and 16 hex of its raw bytes' sha256."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"{ALGORITHM}:{hashlib.sha256(raw).hexdigest()[:16]}"


def generate_key() -> Ed25519PrivateKey:
    """A new signing key."""
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (what ``openssl genpkey -algorithm ed25519`` writes)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: Ed25519PublicKey) -> bytes:
    """The public key as SubjectPublicKeyInfo PEM (what ``openssl pkey -pubout`` writes)."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file (unencrypted PKCS#8). KeyFileError otherwise."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key ({exc.strerror or exc})") from None
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_keys(path: Path) -> tuple[Ed25519PublicKey, ...]:
    """The trusted keys of a PEM file holding one or more Ed25519 public keys (one per block,
    several during a key rotation). KeyFileError when it cannot be read or holds none."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the public key ({exc.strerror or exc})") from None
    blocks = [_PEM_BLOCK + b for b in data.split(_PEM_BLOCK)[1:]]
    if not blocks:
        raise KeyFileError(f"{path}: no PEM public key in it (-----BEGIN PUBLIC KEY-----)")
    keys = []
    for i, block in enumerate(blocks, 1):
        try:
            key = serialization.load_pem_public_key(block)
        except ValueError as exc:
            raise KeyFileError(f"{path}: public key {i} is not valid PEM ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{path}: public key {i} is not an Ed25519 key ({type(key).__name__})")
        keys.append(key)
    return tuple(keys)


def read_signature(bundle: Path) -> SignatureInfo | None:
    """The bundle's signature.json, or None when it has none. SignatureError when unreadable."""
    try:
        body = json.loads((bundle / SIGNATURE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SignatureError(f"{SIGNATURE} is not valid JSON ({exc})") from None
    try:
        if body["algorithm"] != ALGORITHM:
            raise SignatureError(f"{SIGNATURE}: algorithm {body['algorithm']!r}, expected {ALGORITHM!r}")
        return SignatureInfo(
            key_id=str(body["key_id"]),
            signer=str(body.get("signer") or ""),
            manifest_sha256=str(body["manifest_sha256"]),
            signature=base64.b64decode(body["signature"], validate=True),
        )
    except (KeyError, TypeError, binascii.Error) as exc:
        raise SignatureError(f"{SIGNATURE} is malformed ({type(exc).__name__}: {exc})") from None


def verify_manifest(manifest: bytes, info: SignatureInfo | None, trusted: Sequence[Ed25519PublicKey]) -> str:
    """Check that ``info`` signs the bytes ``manifest`` by one of the ``trusted`` keys; return
    the signer's description. SignatureError naming what is wrong otherwise."""
    if info is None:
        raise SignatureError(f"not signed (no {SIGNATURE}), and GATE_BUNDLE_PUBLIC_KEY requires a signature")
    by_id = {key_id(k): k for k in trusted}
    key = by_id.get(info.key_id)
    if key is None:
        raise SignatureError(
            f"signed by {info.describe()}, not by a trusted key ({', '.join(by_id)}; GATE_BUNDLE_PUBLIC_KEY)"
        )
    try:
        key.verify(info.signature, manifest)
    except InvalidSignature:
        raise SignatureError(
            f"signature by {info.key_id} does not match manifest.json (changed after signing, or forged)"
        ) from None
    return info.describe()


def sign_bundle(bundle: Path, key: Ed25519PrivateKey, *, signer: str = "") -> SignatureInfo:
    """Sign the bundle's manifest.json; write signature.json (atomically) and return it."""
    manifest = (bundle / "manifest.json").read_bytes()
    info = SignatureInfo(
        key_id=key_id(key.public_key()),
        signer=signer,
        manifest_sha256=hashlib.sha256(manifest).hexdigest(),
        signature=key.sign(manifest),
    )
    body: dict[str, Any] = {
        "algorithm": ALGORITHM,
        "key_id": info.key_id,
        "signer": info.signer,
        "manifest_sha256": info.manifest_sha256,
        "signature": base64.b64encode(info.signature).decode(),
    }
    tmp = bundle / f".{SIGNATURE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        os.replace(tmp, bundle / SIGNATURE)
    finally:
        tmp.unlink(missing_ok=True)
    return info
