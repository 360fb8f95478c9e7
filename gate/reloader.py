"""The live, shadow and previous model bundles, and the watcher that swaps them without a restart.

``GATE_MODEL_DIR`` is either a bundle itself (it holds manifest.json: served as is, and reloaded
if its files change) or a directory with ``current`` and, optionally, ``shadow``: symlinks
(swapped atomically, as Kubernetes volume updates do) or plain directories. The watcher polls
them; when one changes it loads and verifies the new bundle in a worker thread — checksums,
feature list, thresholds, golden vectors, and the signature when signatures are required
(GATE_BUNDLE_PUBLIC_KEY), exactly as at start-up — and only then swaps it in with
one reference assignment. A request reads the holder once, so it is scored entirely by one model.

A bad bundle (corrupt, truncated, mismatched, half-copied) is refused: the current model keeps
serving, the refusal is logged with its reason, counted, and reported by GetModelStatus. The
previously live bundle stays loaded, so pointing ``current`` back is instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gate.bundle import MANIFEST, Bundle, BundleError, load_bundle

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from gate.settings import Settings

log = logging.getLogger(__name__)

Signature = tuple[str, tuple[tuple[str, int, int, int], ...]]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A bundle the gate would not serve, and why."""

    path: str
    reason: str
    at: float


class ModelHolder:
    """The bundles in use. Each is replaced by one reference assignment; readers read once."""

    __slots__ = ("bundle", "last_refusal", "previous", "refusals", "reloads", "shadow")

    def __init__(self, bundle: Bundle | None = None) -> None:
        self.bundle = bundle
        self.shadow: Bundle | None = None
        self.previous: Bundle | None = None
        self.last_refusal: Refusal | None = None
        self.refusals = 0
        self.reloads = 0


def bundle_signature(path: Path) -> Signature | None:
    """Identity of what a bundle path holds now: its resolved directory and the size, mtime and
    inode of every file in it. Changes when a link is re-pointed or a file is rewritten."""
    try:
        real = path.resolve(strict=True)
        entries = sorted(os.scandir(real), key=lambda e: e.name)
        stats = tuple(
            (e.name, st.st_size, st.st_mtime_ns, st.st_ino)
            for e in entries
            if e.is_file()
            for st in (e.stat(),)
        )
    except OSError:
        return None
    return str(real), stats


async def _load_in_thread(path: Path, trusted_keys: Sequence[Ed25519PublicKey] | None = None) -> Bundle:
    """``load_bundle`` in a worker thread, with as little pause for the serving loop as it can.

    The loader gives the GIL up between trees (gate/treemodel.py ``yield_gil``), but a parse
    makes a few hundred thousand objects, and a collection the cyclic GC starts in the loader's
    thread holds the GIL for tens of ms over them. So the collector is paused for the load, and
    what a successful load made, long-lived like the start-up objects, is frozen out of later
    collections too (refcounting still frees a bundle once it is no longer kept). A refused
    load's leftovers (an exception's frames hold the half-built model) stay collectable.
    """
    gc.disable()
    try:
        bundle = await asyncio.to_thread(load_bundle, path, trusted_keys=trusted_keys)
    except BaseException:
        gc.enable()
        raise
    gc.freeze()
    gc.enable()
    return bundle


class ModelWatcher:
    """Polls the model directory and keeps the holder's live and shadow bundles up to date."""

    def __init__(
        self,
        model_dir: Path,
        holder: ModelHolder,
        *,
        poll_s: float = 1.0,
        on_result: Callable[[str], None] | None = None,
        trusted_keys: Sequence[Ed25519PublicKey] | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.trusted_keys = trusted_keys
        self.holder = holder
        self.poll_s = poll_s
        self.on_result = on_result
        self._seen: dict[str, Signature | None] = {}
        self._loaded: dict[Signature, Bundle] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelWatcher:
        """A watcher of ``settings.model_dir``, requiring signatures by the keys of
        ``settings.bundle_public_key`` when it is set (validated with the settings)."""
        from gate.signing import load_public_keys

        keys = load_public_keys(Path(settings.bundle_public_key)) if settings.bundle_public_key else None
        return cls(settings.model_dir, ModelHolder(), poll_s=settings.model_poll_s, trusted_keys=keys)

    def slots(self) -> dict[str, Path]:
        """Where the live (and shadow) bundle come from."""
        if (self.model_dir / MANIFEST).exists():
            return {"current": self.model_dir}
        return {"current": self.model_dir / "current", "shadow": self.model_dir / "shadow"}

    def load_initial(self) -> Bundle:
        """Load the live bundle (and shadow) synchronously at start-up; BundleError if the live
        one is invalid, because a gate without any valid model cannot decide."""
        for slot, path in self.slots().items():
            signature = bundle_signature(path)
            self._seen[slot] = signature
            if signature is None:
                if slot == "current":
                    raise BundleError(f"{path}: no model bundle there")
                continue
            try:
                bundle = load_bundle(path, trusted_keys=self.trusted_keys)
            except BundleError as exc:
                if slot == "current":
                    raise
                self._refuse(path, exc)
                continue
            self._install(slot, signature, bundle)
        assert self.holder.bundle is not None
        return self.holder.bundle

    def start(self) -> None:
        """Poll in the background until stopped."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.check()
            except Exception:  # a watcher bug must never take serving down
                log.exception("model watcher failed; will retry")

    async def check(self) -> None:
        """Look once at every slot; load, verify and swap what changed."""
        async with self._lock:
            await self._check()

    async def _check(self) -> None:
        for slot, path in self.slots().items():
            signature = bundle_signature(path)
            if signature == self._seen.get(slot):
                continue
            self._seen[slot] = signature
            if signature is None:
                if slot == "shadow" and self.holder.shadow is not None:
                    log.info("shadow model removed", extra={"version": self.holder.shadow.version})
                    self.holder.shadow = None
                elif slot == "current":
                    self._refuse(path, BundleError("current bundle disappeared; keeping the live one"))
                continue
            bundle = self._loaded.get(signature)
            if bundle is None:
                try:
                    bundle = await _load_in_thread(path, self.trusted_keys)
                except BundleError as exc:
                    self._refuse(path, exc)
                    continue
            self._install(slot, signature, bundle)

    def _install(self, slot: str, signature: Signature, bundle: Bundle) -> None:
        holder = self.holder
        if slot == "shadow":
            holder.shadow = bundle
        else:
            if holder.bundle is not None and holder.bundle is not bundle:
                holder.previous = holder.bundle
            holder.bundle = bundle  # the swap: one reference assignment
        holder.reloads += 1
        keep = {id(b) for b in (holder.bundle, holder.previous, holder.shadow) if b is not None}
        self._loaded = {s: b for s, b in self._loaded.items() if id(b) in keep}
        self._loaded[signature] = bundle
        log.info(
            "model loaded",
            extra={
                "slot": slot,
                "version": bundle.version,
                "engine": bundle.model.engine,
                "path": str(bundle.path),
            },
        )
        if self.on_result is not None:
            self.on_result("loaded")

    def _refuse(self, path: Path, exc: BundleError) -> None:
        self.holder.refusals += 1
        self.holder.last_refusal = Refusal(str(path), str(exc), time.time())
        log.error("model bundle refused", extra={"path": str(path), "reason": str(exc)})
        if self.on_result is not None:
            self.on_result("refused")

    async def close(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
