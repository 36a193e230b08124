#!/usr/bin/env python3
"""A TCP relay that delays what it forwards: the network delay the kernel here cannot
add (it has no sch_netem), for ferry's network-fault tests (tests/netns_faults.rs).

    relay.py --listen HOST:PORT --to HOST:PORT [--delay MS] [--jitter MS]
             [--slow INDEX:MS]... [--seed N]

Every connection accepted on --listen gets its own connection to --to, and each
direction of it is forwarded chunk by chunk: a chunk read at time t is written at
t + delay + extra + a random 0..jitter, but never before the chunk read ahead of it on
the same connection (TCP delivers a stream in order, so a relay can only reorder across
connections). `--slow INDEX:MS` adds MS to every chunk of the INDEX-th accepted
connection (0 is the first), in both directions: with ferry, connection 0 is the main
channel and 1.. are the data channels, so `--slow 1:200` keeps one data channel 200 ms
behind the others and the main channel, and what it carries lands after what later
passes sent on the others.

Each direction buffers at most QUEUE_CHUNKS chunks, so a full buffer stops the relay
reading and TCP's flow control reaches the sender, as on a real path.

Prints `relay listening on HOST:PORT` once bound. Exits when its stdin closes (the test
that started it is gone) or on SIGTERM/SIGKILL.
"""

import argparse
import queue
import random
import socket
import sys
import threading
import time

CHUNK = 64 * 1024
QUEUE_CHUNKS = 64


def addr(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


def close(sock):
    try:
        sock.close()
    except OSError:
        pass


class Pipe:
    """One direction of one connection: read from `src`, write to `dst` late."""

    def __init__(self, src, dst, delay, jitter, rng, on_end):
        self.src, self.dst = src, dst
        self.delay, self.jitter = delay, jitter
        self.rng = rng
        self.q = queue.Queue(QUEUE_CHUNKS)
        self.on_end = on_end

    def start(self):
        threading.Thread(target=self.read, daemon=True).start()
        threading.Thread(target=self.write, daemon=True).start()

    def read(self):
        last = 0.0
        try:
            while True:
                data = self.src.recv(CHUNK)
                if not data:
                    break
                due = time.monotonic() + self.delay + self.rng.uniform(0, self.jitter)
                last = max(last, due)
                self.q.put((last, data))
        except OSError:
            pass
        self.q.put((last, None))

    def write(self):
        try:
            while True:
                due, data = self.q.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if data is None:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(data)
        except OSError:
            self.on_end()


def serve(conn, index, args, rng):
    extra = args.slow.get(index, 0)
    delay = (args.delay + extra) / 1000.0
    jitter = args.jitter / 1000.0
    try:
        up = socket.create_connection(args.to, timeout=10)
        up.settimeout(None)
    except OSError:
        close(conn)
        return
    for s in (conn, up):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def end():
        close(conn)
        close(up)

    seed = rng.random()
    Pipe(conn, up, delay, jitter, random.Random(seed), end).start()
    Pipe(up, conn, delay, jitter, random.Random(seed + 1), end).start()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", type=addr, required=True)
    p.add_argument("--to", type=addr, required=True)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--jitter", type=float, default=0.0)
    p.add_argument("--slow", action="append", default=[])
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    args.slow = {int(i): float(ms) for i, ms in (s.split(":") for s in args.slow)}
    rng = random.Random(args.seed)

    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(args.listen)
    ls.listen(64)
    host, port = ls.getsockname()
    print(f"relay listening on {host}:{port}", flush=True)

    def accept():
        index = 0
        while True:
            conn, _ = ls.accept()
            serve(conn, index, args, rng)
            index += 1

    threading.Thread(target=accept, daemon=True).start()
    # The test holds our stdin: EOF means it is gone, and so should we be.
    sys.stdin.buffer.read()


if __name__ == "__main__":
    main()
