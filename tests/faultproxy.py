"""A small TCP fault proxy for tests: sits between the gate and Redis and misbehaves on demand.

Modes (switch at any time from the test thread):
- ``pass``: forward both ways;
- ``latency``: hold every chunk for ``latency_s`` before forwarding (order kept);
- ``blackhole``: accept and hold everything, forward nothing (a partition: TCP keeps the bytes,
  which flow again when the mode goes back to ``pass``);
- ``reset``: abort every connection with a TCP RST, and reset new ones at once.

It runs its own event loop in a thread, so it keeps working while the test blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any


class FaultProxy:
    """A proxy from 127.0.0.1:<port> to 127.0.0.1:<upstream_port>."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.mode = "pass"
        self.latency_s = 0.0
        self.record = False  # keep every byte sent upstream in ``recorded``
        self.recorded = bytearray()
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> FaultProxy:
        """Start listening; returns once the port is known."""
        self._thread.start()
        self._run(self._start())
        return self

    async def _start(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def set_mode(self, mode: str, latency_s: float = 0.0) -> None:
        """Switch behaviour; ``reset`` also aborts every open connection now."""
        if mode not in ("pass", "latency", "blackhole", "reset"):
            raise ValueError(mode)
        self._run(self._set_mode(mode, latency_s))

    async def _set_mode(self, mode: str, latency_s: float) -> None:
        self.mode, self.latency_s = mode, latency_s
        if mode == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode == "reset":
            for writer in list(self._writers):
                _reset(writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            _reset(writer)
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pump(reader, up_writer, upstream=True),
            self._pump(up_reader, writer),
            return_exceptions=True,
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            with contextlib.suppress(Exception):
                w.close()

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool = False
    ) -> None:
        try:
            while data := await src.read(65536):
                if upstream and self.record:
                    self.recorded += data
                await self._flowing.wait()
                if self.mode == "latency":
                    await asyncio.sleep(self.latency_s)
                if dst.is_closing():
                    return
                dst.write(data)
                await dst.drain()
        finally:
            with contextlib.suppress(Exception):
                dst.close()

    def stop(self) -> None:
        """Close everything and stop the thread."""

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                _reset(writer)

        self._run(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN, as a crashed peer or a middlebox would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
