"""
A TCP relay that holds what it carries for a while: added delay on a link
for kernels without netem (sch_netem not built, as on the 2-vCPU benchmark
machine).

    python -m bench.delayrelay LISTEN_PORT HOST PORT DELAY_FILE

Each accepted connection is relayed to HOST:PORT; every chunk read on
either side is written to the other DELAY ms after it was read, DELAY
(one way, milliseconds, a float) being read from DELAY_FILE every 0.2 s, so
a running benchmark changes it in place. TCP_NODELAY on both sockets, and at
most 32 MB held per direction (then it stops reading).

Unlike netem this adds the delay to what the tunnel carries, not to the
legs' own TCP: the gateways' connection sees a short round trip on either
side of the relay. For flows inside the tunnel the round trip grows by
2 × DELAY, which is what this benchmark is after.
"""

import asyncio
import collections
import socket
import sys
import time

CHUNK = 256 * 1024
HOLD_LIMIT = 32 * 1024 * 1024


class Delay:
    def __init__(self, path):
        self.path, self.seconds = path, 0.0

    async def watch(self):
        while True:
            try:
                with open(self.path) as f:
                    self.seconds = float(f.read().strip() or 0) / 1000
            except (OSError, ValueError):
                pass
            await asyncio.sleep(0.2)


async def pump(reader, writer, delay):
    held = collections.deque()
    size = 0
    more = asyncio.Event()
    room = asyncio.Event()
    room.set()
    done = False

    async def read():
        nonlocal size, done
        try:
            while True:
                await room.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                held.append((time.monotonic() + delay.seconds, data))
                size += len(data)
                if size > HOLD_LIMIT:
                    room.clear()
                more.set()
        except (ConnectionError, OSError):
            pass
        done = True
        more.set()

    task = asyncio.ensure_future(read())
    try:
        while True:
            if not held:
                if done:
                    break
                more.clear()
                await more.wait()
                continue
            due, data = held[0]
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            held.popleft()
            size -= len(data)
            writer.write(data)
            if size <= HOLD_LIMIT:
                room.set()
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        task.cancel()


async def serve(port, host, targetPort, delay):
    async def handle(reader, writer):
        try:
            upReader, upWriter = await asyncio.open_connection(host, targetPort)
        except OSError:
            writer.close()
            return
        for w in (writer, upWriter):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(pump(reader, upWriter, delay), pump(upReader, writer, delay))
        for w in (writer, upWriter):
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=128)
    asyncio.ensure_future(delay.watch())
    async with server:
        await server.serve_forever()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4:
        raise SystemExit(__doc__)
    port, host, targetPort, path = int(argv[0]), argv[1], int(argv[2]), argv[3]
    asyncio.run(serve(port, host, targetPort, Delay(path)))


if __name__ == "__main__":
    main()
