"""A TCP proxy that holds every byte coming back from the upstream for ``delay`` seconds: a
delay line, so each response arrives one round-trip time late while throughput is not
limited (the data in flight is bounded by rate x delay). Requests pass at once.

It runs inside the benchmark's network namespace (``python -m
overlaybd_py.coldstart.delayproxy --listen IP:PORT --upstream IP:PORT --delay-ms N``), in
front of the registry, because this kernel has no netem. Per response, not per packet: TCP
handshakes and slow start are not delayed.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys

import trio

__all__ = ["main"]

CHUNK = 256 * 1024


async def _pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    try:
        while data := await src.receive_some(CHUNK):
            await dst.send_all(data)
        await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _delayed_pump(src: trio.SocketStream, dst: trio.SocketStream, delay: float) -> None:
    send, receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)

    async def reader() -> None:
        async with send:
            try:
                while data := await src.receive_some(CHUNK):
                    send.send_nowait((trio.current_time() + delay, data))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async def writer() -> None:
        async with receive:
            try:
                async for due, data in receive:
                    await trio.sleep_until(due)
                    await dst.send_all(data)
                await dst.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(writer)


async def _serve(listen: tuple[str, int], upstream: tuple[str, int], delay: float) -> None:
    async def handle(client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream(*upstream)
        except OSError:
            await client.aclose()
            return
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, server)
            nursery.start_soon(_delayed_pump, server, client, delay)

    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
    print("ready", flush=True)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handle, listeners)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m overlaybd_py.coldstart.delayproxy")
    parser.add_argument("--listen", required=True, metavar="IP:PORT")
    parser.add_argument("--upstream", required=True, metavar="IP:PORT")
    parser.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args(argv)
    trio.run(_serve, _address(args.listen), _address(args.upstream), args.delay_ms / 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
