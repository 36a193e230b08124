#!/usr/bin/env python3
"""ferry's QMP as a third-party client sees it.

Drives `ferry run` with `qemu.qmp` (QEMU's own Python QMP library, from PyPI) and its
`qmp-shell`, the way management software written for QEMU would:

* a migration between two `ferry run` processes, the destination started with
  `--incoming defer` and given `migrate-incoming`, with capabilities and parameters set
  first (multifd over 4 channels), the events checked in order and
  `query-migrate` polled until it completes;
* capabilities and parameters ferry does not have, values out of range, and wrong
  argument types, refused with QEMU-style `GenericError` replies;
* malformed input on a raw socket, each answered with a QMP error while the connection
  and the VM stay healthy;
* `qmp-shell` running `query-status` and `query-migrate` non-interactively.

The ferry binary comes from $FERRY_BIN (default: target/debug/ferry in this checkout).
Run: python3 tests/qmp/test_qmp.py  (cargo test runs it via crates/ferry-vmm/tests/qmp_python.rs)
"""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

from qemu.qmp import EventListener, ExecuteError, QMPClient

ROOT = Path(__file__).resolve().parents[2]
FERRY = os.environ.get("FERRY_BIN", str(ROOT / "target" / "debug" / "ferry"))

# Small guests keep the test quick: 256 MiB, the workload dirtying 16 MiB per pass.
GUEST = ["--backend", "soft", "--mem", "256M", "--dirty", "16M"]


class Ferry:
    """One `ferry run` process with a QMP socket."""

    def __init__(self, tmp: Path, name: str, *extra: str):
        self.name = name
        self.sock = str(tmp / f"{name}.sock")
        self.log = open(tmp / f"{name}.log", "w+b")
        self.proc = subprocess.Popen(
            [FERRY, "run", *GUEST, "--qmp", self.sock, *extra],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise RuntimeError(f"ferry run ({name}) exited: {self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ferry run ({name}) has no QMP socket: {self.output()}")
            time.sleep(0.02)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(2)
                    s.connect(self.sock)
                    s.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n')
                    s.recv(4096)
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def connect(vm: Ferry) -> QMPClient:
    client = QMPClient(vm.name)
    await client.connect(vm.sock)
    return client


async def disconnect(client: QMPClient) -> None:
    await client.disconnect()


class Migration(unittest.IsolatedAsyncioTestCase):
    """A whole migration, driven as a QEMU management layer would."""

    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="ferry-qmp-"))
        self.src = Ferry(self.tmp, "source")
        self.dst = Ferry(self.tmp, "destination", "--incoming", "defer")

    def tearDown(self):
        for vm in (self.src, self.dst):
            vm.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    async def test_migrate_with_events(self):
        try:
            await self.migrate_with_events()
        except BaseException:
            for vm in (self.src, self.dst):
                print(f"--- {vm.name} log:\n{vm.output()}", file=sys.stderr)
            raise

    async def migrate_with_events(self):
        src = await connect(self.src)
        dst = await connect(self.dst)
        src_events = EventListener()
        dst_events = EventListener()
        src.register_listener(src_events)
        dst.register_listener(dst_events)

        # Capabilities, as QEMU reports them. multifd is on by default (2 channels);
        # set on both sides, as QEMU needs (ferry's destination follows the source).
        caps = {c["capability"]: c["state"] for c in await src.execute("query-migrate-capabilities")}
        self.assertEqual(caps["events"], True)
        self.assertEqual(caps["return-path"], True)
        self.assertEqual(caps["multifd"], True)
        for vm in (src, dst):
            await vm.execute(
                "migrate-set-capabilities",
                {"capabilities": [
                    {"capability": "events", "state": True},
                    {"capability": "return-path", "state": True},
                    {"capability": "multifd", "state": True},
                ]},
            )

        # Parameters with QEMU's names and units.
        await src.execute(
            "migrate-set-parameters",
            {"downtime-limit": 500, "max-bandwidth": 0,
             "multifd-channels": 4, "multifd-compression": "none", "multifd-zstd-level": 3},
        )
        params = await src.execute("query-migrate-parameters")
        self.assertEqual(params["downtime-limit"], 500)
        self.assertEqual(params["max-bandwidth"], 0)
        self.assertEqual(params["multifd-channels"], 4)
        self.assertEqual(params["multifd-compression"], "none")
        self.assertEqual(params["multifd-zstd-level"], 3)

        # The destination waits for migrate-incoming.
        self.assertEqual((await dst.execute("query-status"))["status"], "inmigrate")
        uri = f"unix:{self.tmp}/migration.sock"
        await dst.execute("migrate-incoming", {"uri": uri})

        polled = []

        async def poll():
            while True:
                info = await src.execute("query-migrate")
                if info:
                    polled.append(info["status"])
                if info.get("status") in ("completed", "failed", "cancelled"):
                    return info
                await asyncio.sleep(0.02)

        async def collect(listener, until):
            seen = []
            while True:
                ev = await listener.get()
                seen.append(ev)
                if until(ev):
                    return seen

        def migration_ended(ev):
            return ev["event"] == "MIGRATION" and ev["data"]["status"] in (
                "completed", "failed", "cancelled")

        await src.execute("migrate", {"uri": uri})
        info, src_seen, dst_seen = await asyncio.wait_for(
            asyncio.gather(
                poll(),
                collect(src_events, migration_ended),
                collect(dst_events, lambda ev: ev["event"] == "RESUME"),
            ),
            timeout=30,
        )

        self.assertEqual(info["status"], "completed", info)
        self.assertGreater(info["ram"]["transferred"], 0)
        # The pages went over the data channels: QEMU's figure and ferry's own.
        multifd = info["multifd"]
        self.assertEqual(multifd["channels"], 4, info)
        self.assertEqual(multifd["compression"], "none", info)
        self.assertEqual(len(multifd["per-channel"]), 4, info)
        self.assertGreater(info["ram"]["multifd-bytes"], 0, info)
        self.assertEqual(info["ram"]["multifd-bytes"], multifd["wire-bytes"], info)
        self.assertLessEqual(info["ram"]["multifd-bytes"], info["ram"]["transferred"], info)
        self.assertEqual(sum(c["bytes"] for c in multifd["per-channel"]),
                         multifd["wire-bytes"], info)
        self.assertIsInstance(info["downtime"], int)
        self.assertTrue(info["passes"], "per-pass figures")
        self.assertIn("downtime-breakdown", info)
        self.assertEqual(polled[-1], "completed")
        for s in polled:
            self.assertIn(s, ("setup", "active", "device", "completed"))

        # Source: MIGRATION setup → active → device → completed, MIGRATION_PASS for
        # each live pass while active, STOP at the switchover.
        names = [e["event"] for e in src_seen]
        statuses = [e["data"]["status"] for e in src_seen if e["event"] == "MIGRATION"]
        self.assertEqual(statuses, ["setup", "active", "device", "completed"], names)
        passes = [e["data"]["pass"] for e in src_seen if e["event"] == "MIGRATION_PASS"]
        self.assertEqual(passes, list(range(len(passes))), "passes count up from 0")
        self.assertGreaterEqual(len(passes), 1)
        self.assertEqual(names.count("STOP"), 1, names)
        self.assertNotIn("RESUME", names)

        def at(name, status=None):
            for i, e in enumerate(src_seen):
                if e["event"] == name and (status is None or e["data"]["status"] == status):
                    return i
            raise AssertionError(f"no {name} {status or ''} in {names}")

        first_pass = names.index("MIGRATION_PASS")
        last_pass = len(names) - 1 - names[::-1].index("MIGRATION_PASS")
        self.assertLess(at("MIGRATION", "active"), first_pass)
        self.assertLess(last_pass, at("MIGRATION", "device"))
        self.assertLess(at("MIGRATION", "device"), at("STOP"))
        self.assertLess(at("STOP"), at("MIGRATION", "completed"))
        for e in src_seen:
            self.assertIn("seconds", e["timestamp"])

        # Destination: its own MIGRATION events, then RESUME once the guest runs there.
        dst_names = [e["event"] for e in dst_seen]
        dst_statuses = [e["data"]["status"] for e in dst_seen if e["event"] == "MIGRATION"]
        self.assertEqual(dst_statuses[0], "setup", dst_names)
        self.assertEqual(dst_statuses[-1], "completed", dst_names)
        self.assertEqual(dst_names[-1], "RESUME")

        # The guest runs at the destination and its memory is right; the source is done.
        self.assertEqual(await dst.execute("query-status"),
                         {"status": "running", "running": True, "singlestep": False})
        before = (await dst.execute("x-ferry-guest"))["passes"][0]
        await asyncio.sleep(0.3)
        after = (await dst.execute("x-ferry-guest"))["passes"][0]
        self.assertGreater(after, before, "the guest makes progress at the destination")
        check = await dst.execute("x-ferry-verify")
        self.assertEqual(check["pages-wrong"], 0, check)
        self.assertEqual((await src.execute("query-status"))["status"], "postmigrate")

        await disconnect(src)
        await disconnect(dst)

        # qmp-shell, QEMU's interactive shell, fed from a pipe.
        out = await asyncio.to_thread(qmp_shell, self.src.sock, "query-status\nquery-migrate\n")
        replies = shell_replies(out)
        self.assertEqual(len(replies), 2, out)
        self.assertEqual(replies[0]["return"]["status"], "postmigrate")
        self.assertEqual(replies[1]["return"]["status"], "completed")
        self.assertEqual(replies[1]["return"]["ram"]["transferred"], info["ram"]["transferred"])


def qmp_shell(sock: str, commands: str) -> str:
    exe = shutil.which("qmp-shell")
    argv = [exe] if exe else [sys.executable, "-m", "qemu.qmp.qmp_shell"]
    r = subprocess.run(argv + [sock], input=commands, capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise AssertionError(f"qmp-shell exited {r.returncode}: {r.stdout}{r.stderr}")
    return r.stdout


def shell_replies(out: str) -> list:
    """The JSON replies in qmp-shell's output (each after its `(QEMU) ` prompt)."""
    replies = []
    for line in out.splitlines():
        line = line.replace("(QEMU) ", "").strip()
        if line.startswith("{"):
            replies.append(json.loads(line))
    return replies


class Refusals(unittest.IsolatedAsyncioTestCase):
    """What ferry does not have, and wrong types, get QEMU-style errors."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="ferry-qmp-"))
        cls.vm = Ferry(cls.tmp, "vm")

    @classmethod
    def tearDownClass(cls):
        cls.vm.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    async def asyncSetUp(self):
        self.qmp = await connect(self.vm)

    async def asyncTearDown(self):
        # Whatever was refused, the VM runs on and nothing changed (the tests put back
        # what they change).
        self.assertEqual((await self.qmp.execute("query-status"))["status"], "running")
        params = await self.qmp.execute("query-migrate-parameters")
        self.assertEqual(params["multifd-channels"], 2)
        self.assertEqual(params["multifd-compression"], "none")
        self.assertEqual(params["multifd-zstd-level"], 1)
        self.assertEqual(await self.multifd(), True)
        await disconnect(self.qmp)

    async def multifd(self):
        caps = await self.qmp.execute("query-migrate-capabilities")
        return {c["capability"]: c["state"] for c in caps}["multifd"]

    async def refused(self, command, arguments, *needles):
        with self.assertRaises(ExecuteError) as cm:
            await self.qmp.execute(command, arguments)
        self.assertEqual(cm.exception.error_class, "GenericError")
        desc = str(cm.exception)
        for n in needles:
            self.assertIn(n, desc)
        return desc

    @staticmethod
    def caps(*pairs):
        return {"capabilities": [{"capability": c, "state": s} for c, s in pairs]}

    async def test_capabilities(self):
        # multifd switches the data channels off and on, keeping their count.
        await self.qmp.execute("migrate-set-capabilities", self.caps(("multifd", False)))
        self.assertEqual(await self.multifd(), False)
        params = await self.qmp.execute("query-migrate-parameters")
        self.assertEqual(params["multifd-channels"], 2)
        await self.qmp.execute("migrate-set-capabilities", self.caps(("multifd", True)))
        self.assertEqual(await self.multifd(), True)

        await self.refused("migrate-set-capabilities", self.caps(("postcopy-ram", True)),
                           "'postcopy-ram'", "precopy")
        await self.refused("migrate-set-capabilities", self.caps(("events", False)),
                           "'events'", "always")
        await self.refused("migrate-set-capabilities", self.caps(("return-path", False)),
                           "'return-path'", "return path")
        desc = await self.refused("migrate-set-capabilities",
                                  self.caps(("zero-copy-send", True)),
                                  "does not accept value 'zero-copy-send'")
        for known in ("events", "return-path", "multifd"):
            self.assertIn(known, desc)
        # Nothing is applied when one entry is refused.
        await self.refused("migrate-set-capabilities",
                           self.caps(("multifd", False), ("xbzrle", True)), "'xbzrle'")
        self.assertEqual(await self.multifd(), True)

    async def test_capability_argument_types(self):
        await self.refused("migrate-set-capabilities", {"capabilities": "events"},
                           "Invalid parameter type for 'capabilities', expected: array")
        await self.refused("migrate-set-capabilities", {},
                           "Parameter 'capabilities' is missing")
        await self.refused("migrate-set-capabilities",
                           {"capabilities": [{"capability": "events", "state": "yes"}]},
                           "Invalid parameter type for 'capabilities[0].state', expected: boolean")
        await self.refused("migrate-set-capabilities",
                           {"capabilities": [{"state": True}]},
                           "Parameter 'capabilities[0].capability' is missing")

    async def test_parameters(self):
        for n in (0, 17):
            await self.refused("migrate-set-parameters", {"multifd-channels": n},
                               "Parameter 'multifd-channels' expects a value between 1 and 16")
        await self.refused("migrate-set-parameters", {"multifd-zstd-level": 20},
                           "Parameter 'multifd-zstd-level' expects a value between 1 and 19")
        await self.refused("migrate-set-parameters", {"multifd-compression": "zlib"},
                           "Parameter 'multifd-compression' does not accept value 'zlib'",
                           "none, zstd")
        await self.refused("migrate-set-parameters", {"downtime-limit": 0},
                           "Parameter 'downtime-limit' expects an integer in the range of")
        desc = await self.refused("migrate-set-parameters", {"xbzrle-cache-size": 1 << 20},
                                  "Parameter 'xbzrle-cache-size' is unexpected")
        self.assertIn("downtime-limit", desc)
        # All or nothing: a good value next to a bad one is not applied either.
        before = await self.qmp.execute("query-migrate-parameters")
        await self.refused("migrate-set-parameters",
                           {"downtime-limit": 1234, "multifd-channels": 17}, "multifd")
        self.assertEqual(await self.qmp.execute("query-migrate-parameters"), before)
        # The data channels' settings, for the next migration; then back to the defaults.
        await self.qmp.execute("migrate-set-parameters",
                               {"multifd-channels": 8, "multifd-compression": "zstd",
                                "multifd-zstd-level": 5})
        params = await self.qmp.execute("query-migrate-parameters")
        self.assertEqual((params["multifd-channels"], params["multifd-compression"],
                          params["multifd-zstd-level"]), (8, "zstd", 5))
        await self.qmp.execute("migrate-set-parameters",
                               {"multifd-channels": 2, "multifd-compression": "none",
                                "multifd-zstd-level": 1})
        await self.qmp.execute("migrate-set-parameters", {"max-bandwidth": 500 << 20})
        self.assertEqual((await self.qmp.execute("query-migrate-parameters"))["max-bandwidth"],
                         500 << 20)
        await self.qmp.execute("migrate-set-parameters", {"max-bandwidth": 0})

    async def test_parameter_argument_types(self):
        await self.refused("migrate-set-parameters", {"downtime-limit": "100"},
                           "Invalid parameter type for 'downtime-limit', expected: integer")
        await self.refused("migrate-set-parameters", {"max-bandwidth": -1},
                           "Invalid parameter type for 'max-bandwidth', expected: integer")
        await self.refused("migrate-set-parameters", {"max-bandwidth": 1.5},
                           "Invalid parameter type for 'max-bandwidth', expected: integer")
        await self.refused("migrate-set-parameters", {"multifd-compression": 0},
                           "Invalid parameter type for 'multifd-compression', expected: string")
        await self.refused("migrate-set-parameters", {"verify-full": "on"},
                           "Invalid parameter type for 'verify-full', expected: boolean")
        await self.refused("migrate", {"uri": 4444},
                           "Invalid parameter type for 'uri', expected: string")
        await self.refused("migrate-incoming", {"uri": ["tcp:127.0.0.1:0"]},
                           "Invalid parameter type for 'uri', expected: string")


class RawSocket(unittest.TestCase):
    """Malformed input, byte for byte: a QMP error each, and the VM carries on."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="ferry-qmp-"))
        cls.vm = Ferry(cls.tmp, "vm")

    @classmethod
    def tearDownClass(cls):
        cls.vm.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def open(self):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(self.vm.sock)
        f = s.makefile("rb")
        self.addCleanup(s.close)
        self.addCleanup(f.close)
        greeting = json.loads(f.readline())
        self.assertIn("QMP", greeting)
        return s, f

    def reply(self, f):
        while True:
            line = f.readline()
            self.assertTrue(line, "the server closed the connection")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def error(self, s, f, data: bytes, cls="GenericError", needle=""):
        s.sendall(data)
        r = self.reply(f)
        self.assertIn("error", r, r)
        self.assertEqual(r["error"]["class"], cls, r)
        self.assertIn(needle, r["error"]["desc"])
        return r

    def healthy(self, s, f):
        s.sendall(b'{"execute": "query-status", "id": "ok"}\n')
        r = self.reply(f)
        self.assertEqual(r.get("id"), "ok", r)
        self.assertEqual(r["return"]["status"], "running")

    def test_malformed_input(self):
        s, f = self.open()
        # A command before capabilities negotiation.
        self.error(s, f, b'{"execute": "query-status"}\n', "CommandNotFound",
                   "qmp_capabilities")
        s.sendall(b'{"execute": "qmp_capabilities"}\n')
        self.assertEqual(self.reply(f), {"return": {}})
        self.healthy(s, f)

        # Input is split into JSON texts by brackets, quotes and whitespace, so one
        # bare word is one (bad) text and gets one error.
        self.error(s, f, b'nonsense\n', needle="JSON parse error")
        self.healthy(s, f)
        self.error(s, f, b'{"execute": "query-status",, }\n', needle="JSON parse error")
        self.healthy(s, f)
        self.error(s, f, b'["execute", "query-status"]\n', needle="object")
        self.healthy(s, f)
        r = self.error(s, f, b'{"execute": "no-such-command", "id": 7}\n', "CommandNotFound",
                       "no-such-command")
        self.assertEqual(r["id"], 7)
        self.healthy(s, f)
        self.error(s, f, b'{"execute": 42}\n', needle="'execute'")
        self.healthy(s, f)
        self.error(s, f, b'{"execute": "query-status", "arguments": [1]}\n',
                   needle="'arguments'")
        self.healthy(s, f)
        self.error(s, f,
                   b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": "fast"}}\n',
                   needle="Invalid parameter type for 'downtime-limit', expected: integer")
        self.healthy(s, f)
        self.error(s, f, b'{"execute": "migrate", "arguments": {"uri": true}}\n',
                   needle="Invalid parameter type for 'uri', expected: string")
        self.healthy(s, f)
        self.error(s, f, b'{"execute": "query-status", "arguments": {"verbose": true}}\n',
                   needle="'verbose' is unexpected")
        self.healthy(s, f)

    def test_oversize_line(self):
        s, f = self.open()
        s.sendall(b'{"execute": "qmp_capabilities"}\n')
        self.assertEqual(self.reply(f), {"return": {}})
        big = b'{"execute": "query-status", "id": "' + b"x" * ((1 << 20) + 4096) + b'"}\n'
        try:
            s.sendall(big)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stops reading once it is over the limit
        r = self.reply(f)
        self.assertEqual(r["error"]["class"], "GenericError")
        self.assertIn("exceeds the limit", r["error"]["desc"])
        # The server does not buffer without bound: it closes this connection (as its
        # docs say), and the VM and its other clients are untouched. Closed with unread
        # bytes of the oversize line still queued, the socket may end in a reset rather
        # than an end of file: both mean closed.
        try:
            self.assertEqual(f.readline(), b"")
        except ConnectionResetError:
            pass
        s2, f2 = self.open()
        s2.sendall(b'{"execute": "qmp_capabilities"}\n')
        self.assertEqual(self.reply(f2), {"return": {}})
        self.healthy(s2, f2)


class Shell(unittest.TestCase):
    """qmp-shell against a VM that has not migrated."""

    def test_qmp_shell(self):
        tmp = Path(tempfile.mkdtemp(prefix="ferry-qmp-"))
        vm = Ferry(tmp, "vm")
        try:
            out = qmp_shell(vm.sock, "query-status\nquery-migrate\n")
        finally:
            vm.stop()
            shutil.rmtree(tmp, ignore_errors=True)
        self.assertIn("Connected to QEMU", out)
        replies = shell_replies(out)
        self.assertEqual(replies, [
            {"return": {"status": "running", "running": True, "singlestep": False}},
            {"return": {}},
        ], out)


if __name__ == "__main__":
    if not os.access(FERRY, os.X_OK):
        sys.exit(f"no ferry binary at {FERRY}; build it or set FERRY_BIN")
    unittest.main(verbosity=2)
