#!/usr/bin/env python3
"""Soak: one running guest migrated back and forth many times, with faults injected.

    python3 bench/soak.py [--hops 100] [--seed 1] [--fail-share 0.2] [--accel auto|kvm|soft]
                          [--mem 256M] [--dirty 32M] [--liveness-ms 2000] [--ferry PATH] [--json]

One guest (KVM when /dev/kvm is usable, else the soft backend, saying so) starts on side A
and moves A -> B -> A -> ... for --hops hops. A ferry process migrates a guest away once, so
each hop starts a fresh `ferry run --incoming` on the other side, migrates to it, checks it and
quits the old source: two `ferry run` processes at a time, one guest throughout. Every
`ferry run` gets `-global migration.liveness-timeout=` --liveness-ms (2000 by default; 0
leaves the machine type's 5000), so that a silent peer fails a migration in seconds.

Each hop takes its way of moving from a seeded shuffle of every combination of transport
(loopback tcp, unix socket), data channels (0 = pages on the main connection, 2, 4, 16) and
zstd (only with data channels), so every combination comes up every 14 hops. After every hop:

- `ferry migrate --json` exits 0 with `completed`, the destination's memory digest verified
  (and the full-memory hash: every VM runs with `migration.verify-full=on` unless
  --no-verify-full) and the device/vCPU state digest, on both sides' `query-migrate`; the
  data channels and compression are the ones asked for;
- the source is `postmigrate` and its guest stopped where it was; the destination is
  `running`, its guest's pass counters start at or beyond the source's last (the same guest,
  not a new one) and keep going (two rounds of progress); `x-ferry-verify` finds every page
  the guest dirties holding its pass value;
- exactly one process runs the guest.

In round(--fail-share x --hops) hops (chosen by the seeded RNG), the first attempt gets a
fault, the kinds taken in turn from --faults:

- `dst-kill`: the destination is SIGKILLed mid-migration;
- `link-reset`: the attempt goes through a relay (this script with --relay, a child process
  forwarding every connection, main and data channels, to the destination); the relay is
  SIGKILLed mid-migration, so both ends see their connections closed or reset;
- `link-blackhole`: the attempt goes through a relay, which is SIGSTOPped mid-migration, so
  the connections stay open (the relay's kernel still takes and acknowledges what fits in
  its buffers) and nothing moves: a silent peer. The source must notice within the
  liveness timeout and --notice-slack seconds (3), and its error (from `ferry migrate` and
  from its `query-migrate`) must say that the destination went silent or that the kernel
  dropped the connection. One still going after --blackhole-timeout seconds (15) is
  cancelled (`migrate_cancel`), and the hop goes on as after any failure.

Whatever the fault, no error may say "for 0 s" (how an older timeout message got the
wait wrong). A fault noticed late, not at all, or with such a message does not stop the
soak (the guest is safe; the rest still measures something) but is listed at the end
and makes the exit status 1.

A faulted attempt runs with a bandwidth cap (--fault-bandwidth, 10M; with zstd, which
shrinks the guest's counter pages about 90-fold, --fault-bandwidth-zstd, 32K) and a
downtime limit of 1 ms, so that it is still in its first pass when the fault lands, a
seeded 0-500 ms after RAM starts moving (that pass takes 1.6 s or more for a 128M guest).
Should the migration complete first all the same, the fault counts as missed and the hop is
checked like any other. (ferry's bandwidth throttle, which once slept off what it had sent
without looking at the connections, now watches for a destination that hung up or went
silent; the time each fault took to notice is in the summary, per kind.) After the fault:
`ferry migrate` must report `failed` within 60 s; the source must be `running` with its
guest making progress and intact (`x-ferry-verify`); the destination, if still alive, must
not be running a guest. Then the hop is retried, each time to a fresh destination with no
cap, up to --max-retries times. A failure nobody injected is retried the same way but
counted as unplanned, and makes the exit status 1.

Any broken promise (a guest lost, stopped or run twice, a wrong page, a digest not verified,
a hop that does not succeed within its retries, a wait that times out) stops the soak with
a message naming the hop and what was seen, and exit status 1; 130 if interrupted. Every
wait has a time limit. Children run in their own sessions with a parent-death signal and are
killed by process group on any way out (bench/harness.py).

Output: a line per hop on stderr (hop, direction, transport, channels, zstd, outcome, time,
downtime), then a summary: on stdout, or with --json one JSON object on stdout instead.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as m  # noqa: E402  (processes, QMP, statistics)
from harness import BenchError, Qmp, log, stats  # noqa: E402

SCHEMA = "ferry-soak/1"
RELAY_PREFIX = "relay listening on "
CHANNELS = (0, 2, 4, 16)
FAULT_KINDS = ("dst-kill", "link-reset", "link-blackhole")

# Timeouts, seconds.
T_START = 30.0         # a VM up: URI printed, QMP answering
T_MIGRATE = 120.0      # a clean `ferry migrate`
T_FAULT_MOVING = 20.0  # a faulted attempt to get under way
T_FAILED = 60.0        # `ferry migrate` to report a reset, killed or silent peer
DEFAULT_LIVENESS_MS = 5000  # migration.liveness-timeout on ferry-0.3, when not set
# What a source may say about a blackholed link: the engine's liveness limit, or the
# kernel's TCP_USER_TIMEOUT under it.
SILENT_WORDS = ("went silent", "the kernel dropped the connection")
# How an older timeout message got its wait wrong; no error may say it.
WRONG_WAIT = "for 0 s"
T_PROGRESS = 15.0      # a guest to show progress
T_STATE = 10.0         # a VM to reach the state it should be in
T_QUIT = 15.0


class Violation(Exception):
    """A promise ferry broke: the soak stops here."""


# --------------------------------------------------------------------------------------------
# The relay: a child process that forwards connections, to be killed or stopped
# --------------------------------------------------------------------------------------------


def _addr(uri: str):
    kind, _, rest = uri.partition(":")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        return socket.AF_INET, (host, int(port))
    if kind == "unix":
        return socket.AF_UNIX, rest
    raise SystemExit(f"relay: unsupported URI {uri!r} (tcp:HOST:PORT or unix:PATH)")


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            b = src.recv(1 << 18)
            if not b:
                break
            dst.sendall(b)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def relay_main(listen: str, target: str) -> int:
    """Accepts on `listen`, and forwards each connection both ways to a new connection to
    `target`, until killed."""
    fam, addr = _addr(listen)
    srv = socket.socket(fam, socket.SOCK_STREAM)
    if fam == socket.AF_INET:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(addr)
    srv.listen(64)
    if fam == socket.AF_INET:
        host, port = srv.getsockname()
        bound = f"tcp:{host}:{port}"
    else:
        bound = f"unix:{addr}"
    print(RELAY_PREFIX + bound, flush=True)
    tfam, taddr = _addr(target)
    while True:
        c, _ = srv.accept()
        u = socket.socket(tfam, socket.SOCK_STREAM)
        try:
            u.connect(taddr)
        except OSError:
            c.close()
            u.close()
            continue
        for a, b in ((c, u), (u, c)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()


# --------------------------------------------------------------------------------------------
# VMs
# --------------------------------------------------------------------------------------------


@dataclass
class Vm:
    name: str
    proc: subprocess.Popen
    qmp_path: Path
    out: Path
    err: Path
    qmp: Qmp | None = None

    def connect(self) -> Qmp:
        if self.qmp is None:
            self.qmp = Qmp.connect(self.qmp_path, self.proc, self.name, self.err,
                                   deadline=T_START, timeout=30.0)
        return self.qmp

    def alive(self) -> bool:
        return self.proc.poll() is None

    def logs(self) -> str:
        return f"--- {self.name} stderr (tail) ---\n{m.tail(self.err, 20)}\n--- end ---"

    def close(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None


@dataclass
class Soak:
    ferry: Path
    backend: str
    vm_args: list[str]
    tmp: Path
    n_started: int = 0
    vms: list[Vm] = field(default_factory=list)

    def start_vm(self, name: str, incoming: str | None) -> Vm:
        self.n_started += 1
        base = self.tmp / f"{self.n_started:04d}-{name}"
        cmd = [str(self.ferry), "run", "--backend", self.backend, *self.vm_args]
        if incoming:
            cmd += ["--incoming", incoming]
        cmd += ["--qmp", str(base) + ".qmp"]
        out, err = Path(str(base) + ".out"), Path(str(base) + ".err")
        with open(out, "wb") as o, open(err, "wb") as e:
            p = m.spawn(cmd, stdin=subprocess.DEVNULL, stdout=o, stderr=e)
        vm = Vm(name, p, Path(str(base) + ".qmp"), out, err)
        self.vms.append(vm)
        return vm

    def stop_vm(self, vm: Vm, kill: bool = False) -> int | None:
        """Quits (or kills) `vm` and waits for it; its exit status."""
        if not kill and vm.alive():
            try:
                vm.connect().quit()
            except (BenchError, OSError):
                pass
            try:
                vm.proc.wait(timeout=T_QUIT)
            except subprocess.TimeoutExpired:
                pass
        vm.close()
        m.reap(vm.proc, grace=1.0)
        if vm in self.vms:
            self.vms.remove(vm)
        return vm.proc.returncode


def state(vm: Vm) -> str:
    return vm.connect().execute("query-status").get("status", "?")


def passes(vm: Vm) -> list[int]:
    return [int(p) for p in vm.connect().execute("x-ferry-guest").get("passes", [])]


def wait_state(vm: Vm, want: str, who: str, timeout: float = T_STATE) -> None:
    end = time.monotonic() + timeout
    while True:
        st = state(vm)
        if st == want:
            return
        if time.monotonic() > end:
            raise Violation(f"{who} is {st!r}, expected {want!r} (waited {timeout:.0f} s)\n"
                            f"{vm.logs()}")
        time.sleep(0.02)


def wait_beyond(vm: Vm, then: list[int], who: str) -> list[int]:
    """Waits until every vCPU's pass counter is beyond `then`."""
    end = time.monotonic() + T_PROGRESS
    while True:
        now = passes(vm)
        if len(now) == len(then) and all(a > b for a, b in zip(now, then)):
            return now
        if time.monotonic() > end:
            raise Violation(f"{who}'s guest made no progress in {T_PROGRESS:.0f} s: passes "
                            f"{now}, want beyond {then}\n{vm.logs()}")
        time.sleep(0.02)


def check_intact(vm: Vm, who: str) -> dict:
    """x-ferry-verify: every page the guest dirties holds its pass value."""
    end = time.monotonic() + T_STATE
    while True:
        try:
            v = vm.connect().execute("x-ferry-verify")
            break
        except BenchError as e:
            # A destination answers `inmigrate` until its side has wound down.
            if "inmigrate" in str(e) and time.monotonic() < end:
                time.sleep(0.02)
                continue
            raise Violation(f"x-ferry-verify on {who}: {e}\n{vm.logs()}")
    if not v.get("pages-checked"):
        raise Violation(f"x-ferry-verify on {who} checked no pages: {v}")
    if v.get("pages-wrong") != 0:
        raise Violation(f"{who}'s guest memory is wrong: x-ferry-verify says {v}\n{vm.logs()}")
    return v


def wait_uri(vm: Vm, prefix: str) -> str:
    end = time.monotonic() + T_START
    while True:
        try:
            for line in vm.out.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
        except FileNotFoundError:
            pass
        if not vm.alive():
            raise BenchError(f"{vm.name} exited with status {vm.proc.returncode} before "
                             f"printing '{prefix.strip()}':\n{vm.logs()}")
        if time.monotonic() > end:
            raise BenchError(f"{vm.name} printed no '{prefix.strip()}' line in {T_START:.0f} s")
        time.sleep(0.01)


# --------------------------------------------------------------------------------------------
# A hop
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    transport: str   # "tcp" or "unix"
    channels: int    # 0: pages on the main connection
    zstd: bool

    def label(self) -> str:
        ch = "main" if self.channels == 0 else f"{self.channels}ch"
        return f"{self.transport:<4} {ch:>4} {'zstd' if self.zstd else 'none'}"


def all_routes() -> list[Route]:
    return [Route(t, c, z) for t in ("tcp", "unix") for c in CHANNELS
            for z in ((False, True) if c else (False,))]


def migrate_cmd(ferry: Path, src: Vm, uri: str, route: Route, bandwidth: str,
                downtime_limit: int) -> list[str]:
    # Every setting explicit: a failed attempt leaves its parameters on the source.
    cmd = [str(ferry), "migrate", "--qmp", str(src.qmp_path), uri, "--json",
           "--channels", str(route.channels), "--max-bandwidth", bandwidth,
           "--downtime-limit", str(downtime_limit)]
    if route.channels:
        cmd += ["--compression", "zstd" if route.zstd else "none"]
    return cmd


class Hop:
    """One hop: attempts until the guest is on the other side, verified."""

    def __init__(self, soak: Soak, a: argparse.Namespace, n: int, src: Vm, side: str,
                 route: Route, fault: str | None, last_passes: list[int]):
        self.soak, self.a, self.n, self.src, self.side = soak, a, n, src, side
        self.route, self.fault, self.last_passes = route, fault, last_passes
        self.attempts: list[dict] = []
        self.tmp = soak.tmp

    def incoming_uri(self, k: int) -> str:
        if self.route.transport == "tcp":
            return "tcp:127.0.0.1:0"
        return f"unix:{self.tmp}/h{self.n:03d}-{k}.mig"

    def run(self) -> tuple[Vm, dict]:
        t0 = time.monotonic()
        for k in range(1, self.a.max_retries + 2):
            fault = self.fault if k == 1 else None
            att: dict = {"attempt": k, "fault": fault}
            self.attempts.append(att)
            ta = time.monotonic()
            dst = self.soak.start_vm(f"{self.side}-h{self.n}-a{k}", self.incoming_uri(k))
            try:
                done = self.attempt(dst, k, fault, att)
            finally:
                att["wall_s"] = round(time.monotonic() - ta, 3)
            if done:
                return dst, {"wall_s": round(time.monotonic() - t0, 3)}
        why = "; ".join(a.get("error", a.get("outcome", "?")) for a in self.attempts)
        raise Violation(f"hop {self.n}: no attempt succeeded in {self.a.max_retries + 1} "
                        f"({why})")

    def attempt(self, dst: Vm, k: int, fault: str | None, att: dict) -> bool:
        """One migration to `dst`. True once the guest is there and verified; False after a
        failure the source survived (the caller retries)."""
        uri = wait_uri(dst, m.URI_PREFIX)
        dq = dst.connect()
        st = dq.execute("query-status").get("status")
        if st != "inmigrate":
            raise Violation(f"fresh destination {dst.name} is {st!r}, not 'inmigrate'")
        relay = None
        target = uri
        if fault in ("link-reset", "link-blackhole"):
            listen = ("tcp:127.0.0.1:0" if self.route.transport == "tcp"
                      else f"unix:{self.tmp}/h{self.n:03d}-{k}.relay")
            relay, target = self.start_relay(listen, uri)
        # A faulted attempt must not finish before the fault: a bandwidth cap and a
        # downtime limit it cannot meet keep it iterating (zstd shrinks a pass to a few
        # KiB, which a cap alone would let through in milliseconds).
        if fault:
            bandwidth = self.a.fault_bandwidth_zstd if self.route.zstd else self.a.fault_bandwidth
            limit_ms = 1
        else:
            bandwidth, limit_ms = "0", self.a.downtime_limit
        src_before = passes(self.src)
        before = self.src.connect().execute("query-migrate").get("session")
        cmd = migrate_cmd(self.soak.ferry, self.src, target, self.route, bandwidth, limit_ms)
        out_path = self.tmp / f"h{self.n:03d}-{k}.migrate.out"
        err_path = self.tmp / f"h{self.n:03d}-{k}.migrate.err"
        with open(out_path, "wb") as o, open(err_path, "wb") as e:
            mig = m.spawn(cmd, stdin=subprocess.DEVNULL, stdout=o, stderr=e)
        try:
            injected_at = None
            if fault:
                injected_at = self.inject(fault, dst, relay, att, before)
            limit = T_FAILED if fault else T_MIGRATE
            if fault == "link-blackhole" and injected_at is not None:
                try:
                    mig.wait(timeout=self.a.blackhole_timeout)
                except subprocess.TimeoutExpired:
                    # Not noticed: a broken promise, but one the soak can go on from.
                    att["not_noticed_in_s"] = round(time.monotonic() - injected_at, 3)
                    att["cancelled_by_soak"] = True
                    self.src.connect().execute("migrate_cancel")
            try:
                mig.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                raise Violation(
                    f"hop {self.n} attempt {k}: `ferry migrate` still running {limit:.0f} s "
                    f"after {'the fault' if fault else 'it started'} ({fault or 'no fault'})"
                    f"\n{m.tail(err_path)}\n{self.src.logs()}\n{dst.logs()}")
            if injected_at is not None and not att.get("cancelled_by_soak"):
                att["noticed_after_s"] = round(time.monotonic() - injected_at, 3)
        finally:
            m.reap(mig, grace=1.0)
            if relay is not None:
                # SIGKILL reaches a stopped process too.
                try:
                    os.killpg(relay.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                m.reap(relay, grace=0.5)
        info = m.last_json(out_path.read_text(errors="replace")) or {}
        status = info.get("status")
        att["exit"] = mig.returncode
        att["status"] = status
        if status == "completed" and mig.returncode == 0:
            if fault:
                att["fault_missed"] = True
            self.check_success(dst, info, src_before, att)
            return True
        att["error"] = (info.get("error-desc") or m.tail(err_path, 3) or f"status {status}")
        att["outcome"] = "failed"
        if status not in ("failed", "cancelled"):
            raise Violation(f"hop {self.n} attempt {k}: `ferry migrate` exited {mig.returncode} "
                            f"with status {status!r} ({att['error']})\n{self.src.logs()}")
        self.check_survived(dst, att)
        self.check_error_text(fault, att)
        return False

    def check_error_text(self, fault: str | None, att: dict) -> None:
        """After a failed attempt: the errors tell the truth about the fault, and a silent
        link was noticed within the liveness limit and the slack. What breaks these is
        recorded in att["broken"] (the soak goes on, and fails at the end): the guest is
        safe either way, and the rest of the run still measures something."""
        broken: list[str] = []
        texts = [t for t in (att.get("error"), att.get("source_error")) if t]
        for t in dict.fromkeys(texts):
            if WRONG_WAIT in t:
                broken.append(f"the error says {WRONG_WAIT!r}: {t}")
        if fault == "link-blackhole" and not (att.get("fault_missed") or
                                              att.get("fault_note")):
            bound = self.a.liveness_s + self.a.notice_slack
            took = att.get("noticed_after_s")
            if att.get("cancelled_by_soak"):
                broken.append(f"the source had not noticed the silent link after "
                              f"{att['not_noticed_in_s']:.1f} s (the soak cancelled the "
                              f"migration); want within {bound:.1f} s")
            else:
                if took is None or took > bound:
                    broken.append(f"the source noticed the silent link after {took} s, want "
                                  f"within {bound:.1f} s (liveness {self.a.liveness_s:.1f} s "
                                  f"+ {self.a.notice_slack:.1f} s)")
                for t in dict.fromkeys(texts):
                    if not any(w in t for w in SILENT_WORDS):
                        broken.append(f"the error does not say the destination went silent "
                                      f"or the kernel dropped the connection: {t}")
        if broken:
            att["broken"] = broken
            for b in broken:
                log(f"soak: hop {self.n} attempt {att['attempt']} ({fault or 'no fault'}): "
                    f"BROKEN: {b}")

    def start_relay(self, listen: str, target: str) -> tuple[subprocess.Popen, str]:
        out = self.tmp / f"relay-h{self.n:03d}.out"
        with open(out, "wb") as o:
            p = m.spawn([sys.executable, str(Path(__file__).resolve()), "--relay", listen,
                         target], stdin=subprocess.DEVNULL, stdout=o,
                        stderr=subprocess.STDOUT)
        vm = Vm("relay", p, out, out, out)
        return p, wait_uri(vm, RELAY_PREFIX)

    def inject(self, fault: str, dst: Vm, relay: subprocess.Popen | None, att: dict,
               before: str | None) -> float:
        """Waits until this migration (not the one `before` names: a VM that arrived by
        migration reports that one until it starts its own) is moving RAM, waits a further
        seeded 0-500 ms, then strikes."""
        sq = self.src.connect()
        delay = random.Random(self.a.seed * 100003 + self.n).uniform(0.0, 0.5)
        end = time.monotonic() + T_FAULT_MOVING
        moving_since = None
        while True:
            q = sq.execute("query-migrate")
            ours = q.get("session") not in (None, before)
            moved = (q.get("ram") or {}).get("transferred", 0)
            if ours and q.get("status") in ("completed", "failed", "cancelled"):
                att["fault_note"] = f"migration {q.get('status')} before the fault could land"
                return time.monotonic()
            if ours and q.get("status") == "active" and moved > 0 and moving_since is None:
                moving_since = time.monotonic()
            if moving_since is not None and time.monotonic() - moving_since >= delay:
                break
            if time.monotonic() > end:
                raise Violation(f"hop {self.n}: the faulted migration moved no RAM in "
                                f"{T_FAULT_MOVING:.0f} s: {json.dumps(q)[:400]}")
            time.sleep(0.005)
        att["strike_after_ms"] = round(delay * 1e3)
        att["moved_at_fault"] = moved
        att["passes_at_fault"] = len(q.get("passes") or [])
        if fault == "dst-kill":
            dst.proc.send_signal(signal.SIGKILL)
        elif fault == "link-reset":
            os.killpg(relay.pid, signal.SIGKILL)
        elif fault == "link-blackhole":
            os.killpg(relay.pid, signal.SIGSTOP)
        return time.monotonic()

    def check_survived(self, dst: Vm, att: dict) -> None:
        """After a failed attempt: the guest is still at the source, running and intact;
        the destination runs nothing."""
        who = f"source after hop {self.n} attempt {att['attempt']} failed"
        wait_state(self.src, "running", who)
        now = passes(self.src)
        wait_beyond(self.src, wait_beyond(self.src, now, who), who)
        att["source_verify"] = check_intact(self.src, who)
        q = self.src.connect().execute("query-migrate")
        if q.get("status") not in ("failed", "cancelled"):
            raise Violation(f"{who}: query-migrate says {q.get('status')!r}")
        if q.get("error-desc"):
            att["source_error"] = q["error-desc"]
        if dst.alive():
            try:
                st = state(dst)
            except (BenchError, OSError):
                st = None  # on its way out
            att["destination_after"] = st
            if st == "running":
                raise Violation(f"hop {self.n}: the guest runs on both sides: the source "
                                f"survived the failure and destination {dst.name} is running"
                                f"\n{dst.logs()}")
        else:
            att["destination_after"] = f"exited {dst.proc.returncode}"
        self.soak.stop_vm(dst, kill=True)

    def check_success(self, dst: Vm, info: dict, src_before: list[int], att: dict) -> None:
        n = self.n
        ctx = f"hop {n} ({self.route.label()})"
        verified = (info.get("verified") or "").split("+")
        want = ["digest", "full"] if self.a.verify_full else ["digest"]
        if any(w not in verified for w in want):
            raise Violation(f"{ctx}: completed with verified={info.get('verified')!r}, "
                            f"want {'+'.join(want)}")
        if info.get("state-verified") != "digest":
            raise Violation(f"{ctx}: device/vCPU state-verified={info.get('state-verified')!r}")
        mf = info.get("multifd")
        if self.route.channels == 0:
            if mf:
                raise Violation(f"{ctx}: asked for the main channel, got data channels: {mf}")
        else:
            comp = "zstd" if self.route.zstd else "none"
            if not mf or mf.get("channels") != self.route.channels \
                    or mf.get("compression") != comp:
                raise Violation(f"{ctx}: asked for {self.route.channels} channels, {comp}; "
                                f"got {mf and {k: mf.get(k) for k in ('channels', 'compression')}}")
        # The source let go of the guest.
        wait_state(self.src, "postmigrate", f"source after {ctx}")
        src_final = passes(self.src)
        # The destination runs the same guest, on from where it stopped, and keeps going.
        wait_state(dst, "running", f"destination after {ctx}")
        d_first = passes(dst)
        if len(d_first) != len(src_final) or any(a < b for a, b in zip(d_first, src_final)):
            raise Violation(f"{ctx}: the destination's guest is at passes {d_first}, behind the "
                            f"source's last {src_final}: not the guest that left")
        if any(a < b for a, b in zip(src_final, self.last_passes)):
            raise Violation(f"{ctx}: the guest went back: passes {src_final} after "
                            f"{self.last_passes} on an earlier hop")
        beyond = wait_beyond(dst, src_final, f"destination after {ctx}")
        wait_beyond(dst, beyond, f"destination after {ctx}")
        att["verify"] = check_intact(dst, f"destination after {ctx}")
        dq = dst.connect().execute("query-migrate")
        dv = (dq.get("verified") or "").split("+")
        if dq.get("status") != "completed" or any(w not in dv for w in want):
            raise Violation(f"{ctx}: the destination's query-migrate says status "
                            f"{dq.get('status')!r}, verified {dq.get('verified')!r}")
        if passes(self.src) != src_final:
            raise Violation(f"{ctx}: the source's guest ran after it migrated away")
        att["outcome"] = "completed"
        att["downtime_ms"] = info.get("downtime")
        att["total_ms"] = info.get("total-time")
        att["transferred"] = (info.get("ram") or {}).get("transferred")
        att["passes_src_final"] = src_final
        att["passes_src_before"] = src_before
        # Each RAM pass as [pages, zero pages, dirty after, ms]: what a surprising
        # attempt (one that ends before its fault, say) moved and when.
        att["ram_passes"] = [[p.get("pages"), p.get("zero-pages"), p.get("dirty-after"),
                              round(p.get("duration-ms") or 0, 1)]
                             for p in info.get("passes") or []]


# --------------------------------------------------------------------------------------------
# Plan, run, summary
# --------------------------------------------------------------------------------------------


def plan(a: argparse.Namespace) -> list[tuple[Route, str | None]]:
    rng = random.Random(a.seed)
    routes: list[Route] = []
    while len(routes) < a.hops:
        batch = all_routes()
        rng.shuffle(batch)
        routes += batch
    n_faults = min(a.hops, round(a.fail_share * a.hops))
    faulted = sorted(rng.sample(range(a.hops), n_faults))
    kinds = list(a.fault_kinds)
    rng.shuffle(kinds)
    faults: list[str | None] = [None] * a.hops
    for i, h in enumerate(faulted):
        faults[h] = kinds[i % len(kinds)]
    return list(zip(routes[: a.hops], faults))


def summarise(hops: list[dict], elapsed: float) -> dict:
    injected: dict[str, int] = {}
    recovered: dict[str, int] = {}
    missed = 0
    unplanned = 0
    for h in hops:
        for att in h["attempts"]:
            if att.get("fault"):
                injected[att["fault"]] = injected.get(att["fault"], 0) + 1
                if att.get("fault_missed"):
                    missed += 1
                elif h.get("ok"):
                    recovered[att["fault"]] = recovered.get(att["fault"], 0) + 1
            elif att.get("outcome") == "failed":
                unplanned += 1
    ok = [h for h in hops if h.get("ok")]
    broken = [f"hop {h['hop']} attempt {a['attempt']} ({a.get('fault') or 'no fault'}, "
              f"{h['route']}): {b}"
              for h in hops for a in h["attempts"] for b in a.get("broken", [])]
    faulted = [a for h in hops for a in h["attempts"]
               if a.get("fault") and not a.get("fault_missed")]
    noticed = [a.get("noticed_after_s") for a in faulted]
    noticed_by_kind = {k: stats([a.get("noticed_after_s") for a in faulted
                                 if a["fault"] == k]) for k in sorted(injected)}
    return {
        "hops": len(hops),
        "hops_ok": len(ok),
        "faults_injected": sum(injected.values()),
        "faults_by_kind": injected,
        "faults_recovered": sum(recovered.values()),
        "recovered_by_kind": recovered,
        "faults_missed": missed,
        "unplanned_failures": unplanned,
        "attempts": sum(len(h["attempts"]) for h in hops),
        "hop_s": stats([h.get("wall_s") for h in ok]),
        "clean_hop_s": stats([h.get("wall_s") for h in ok if not h.get("fault")]),
        "faulted_hop_s": stats([h.get("wall_s") for h in ok if h.get("fault")]),
        "downtime_ms": stats([h.get("downtime_ms") for h in ok]),
        "migrate_total_ms": stats([h.get("total_ms") for h in ok]),
        "fault_noticed_s": stats(noticed),
        "fault_noticed_s_by_kind": noticed_by_kind,
        "not_noticed": sum(1 for a in faulted if a.get("cancelled_by_soak")),
        "broken_promises": broken,
        "pages_checked": sum(a.get("verify", {}).get("pages-checked", 0)
                             for h in hops for a in h["attempts"])
        + sum(a.get("source_verify", {}).get("pages-checked", 0)
              for h in hops for a in h["attempts"]),
        "total_s": round(elapsed, 1),
    }


def fmt_stats(s: dict | None, unit: str, scale: float = 1.0, digits: int = 2) -> str:
    if not s:
        return "-"
    f = lambda x: f"{x * scale:.{digits}f}"  # noqa: E731
    return f"median {f(s['median'])} {unit}, min {f(s['min'])}, max {f(s['max'])} (n={s['n']})"


def summary_text(res: dict) -> str:
    s = res["summary"]
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["faults_by_kind"].items())) or "none"
    rec = ", ".join(f"{k} {v}" for k, v in sorted(s["recovered_by_kind"].items())) or "none"
    lines = [
        f"soak {'passed' if res['ok'] else 'FAILED'}: {res['backend']} guest, "
        f"{res['args']['mem']} (dirty {res['args']['dirty']}), seed {res['args']['seed']}, "
        f"fail share {res['args']['fail_share']}",
        f"  hops:            {s['hops_ok']} of {s['hops']} completed and verified "
        f"({s['attempts']} attempts)",
        f"  faults injected: {s['faults_injected']} ({kinds})",
        f"  recovered:       {s['faults_recovered']} ({rec}); missed (migration done first): "
        f"{s['faults_missed']}; unplanned failures: {s['unplanned_failures']}",
        f"  time per hop:    {fmt_stats(s['hop_s'], 's')}",
        f"    clean hops:    {fmt_stats(s['clean_hop_s'], 's')}",
        f"    faulted hops:  {fmt_stats(s['faulted_hop_s'], 's')}",
        f"  downtime:        {fmt_stats(s['downtime_ms'], 'ms', digits=0)}",
        f"  migrate total:   {fmt_stats(s['migrate_total_ms'], 'ms', digits=0)}",
        f"  fault noticed:   {fmt_stats(s['fault_noticed_s'], 's')} after it struck",
        *(f"    {k + ':':<14} {fmt_stats(v, 's')}"
          for k, v in sorted(s.get("fault_noticed_s_by_kind", {}).items())),
        f"  pages verified:  {s['pages_checked']} (x-ferry-verify, both sides)",
        f"  total:           {s['total_s']} s",
    ]
    if s.get("not_noticed"):
        lines.append(f"  not noticed:     {s['not_noticed']} silent link(s), cancelled by "
                     f"the soak")
    for b in s.get("broken_promises", []):
        lines.append(f"  BROKEN: {b}")
    if res.get("violation"):
        lines.append(f"  VIOLATION: {res['violation']}")
    if res.get("interrupted"):
        lines.append(f"  interrupted: {res['interrupted']}")
    return "\n".join(lines)


def hop_line(h: dict, total: int) -> str:
    fault = h.get("fault")
    if h.get("ok"):
        tries = len(h["attempts"])
        if fault:
            first = h["attempts"][0]
            if first.get("fault_missed"):
                outcome = f"ok, {fault} missed (done first)"
            elif first.get("cancelled_by_soak"):
                outcome = (f"ok after {fault} (NOT noticed in {first['not_noticed_in_s']:.0f} "
                           f"s: cancelled)")
            else:
                outcome = (f"ok after {fault} (noticed {first.get('noticed_after_s', 0):.2f} s, "
                           f"{tries - 1} retr{'y' if tries == 2 else 'ies'})")
        else:
            outcome = "ok" if tries == 1 else f"ok after {tries - 1} unplanned failure(s)"
    else:
        outcome = "FAILED"
    dt = h.get("downtime_ms")
    return (f"hop {h['hop']:>3}/{total} {h['direction']}  {h['route']}  {outcome:<44} "
            f"{h.get('wall_s', 0):6.2f} s  downtime {dt if dt is not None else '-':>4} ms")


def run(a: argparse.Namespace, res: dict, tmp: Path) -> None:
    soak = Soak(a.ferry, a.backend, a.vm_args, tmp)
    hops: list[dict] = res["hops"]
    t0 = time.monotonic()
    side = "A"
    src = soak.start_vm(f"{side}-h0", None)
    sq = src.connect()
    if sq.execute("query-status").get("status") != "running":
        raise Violation(f"the first VM is not running\n{src.logs()}")
    res["warmup"] = m.wait_guest_ran(sq)
    last_passes = passes(src)
    for i, (route, fault) in enumerate(plan(a), start=1):
        other = "B" if side == "A" else "A"
        h: dict = {"hop": i, "direction": f"{side}->{other}", "route": route.label(),
                   "transport": route.transport, "channels": route.channels,
                   "zstd": route.zstd, "fault": fault, "ok": False}
        hops.append(h)
        hop = Hop(soak, a, i, src, other, route, fault, last_passes)
        h["attempts"] = hop.attempts
        try:
            dst, r = hop.run()
        except Violation as e:
            h["error"] = str(e).splitlines()[0]
            raise
        h.update(r)
        good = hop.attempts[-1]
        h["ok"] = True
        h["downtime_ms"] = good.get("downtime_ms")
        h["total_ms"] = good.get("total_ms")
        last_passes = good["passes_src_final"]
        # The old source goes; exactly one process runs the guest.
        code = soak.stop_vm(src)
        if code != 0:
            raise Violation(f"hop {i}: the old source exited with status {code} on quit")
        running = [v.name for v in soak.vms if v.alive() and state(v) == "running"]
        if running != [dst.name]:
            raise Violation(f"hop {i}: processes running a guest: {running}, want [{dst.name}]")
        log(hop_line(h, a.hops))
        src, side = dst, other
        res["summary"] = summarise(hops, time.monotonic() - t0)
    res["final_passes"] = passes(src)
    soak.stop_vm(src)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--hops", type=int, default=100, help="migrations (default 100)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the plan (default 1)")
    ap.add_argument("--fail-share", type=float, default=0.2,
                    help="share of hops whose first attempt gets a fault (default 0.2)")
    ap.add_argument("--faults", default=",".join(FAULT_KINDS),
                    help=f"fault kinds, in turn (default {','.join(FAULT_KINDS)})")
    ap.add_argument("--blackhole", action="store_true",
                    help="does nothing: link-blackhole is among the default fault kinds now "
                         "(kept so that older command lines still run)")
    ap.add_argument("--liveness-ms", type=int, default=2000, metavar="MS",
                    help="-global migration.liveness-timeout=MS on every `ferry run` "
                         f"(default 2000; 0 leaves the machine type's {DEFAULT_LIVENESS_MS})")
    ap.add_argument("--notice-slack", type=float, default=3.0, metavar="S",
                    help="a blackholed link must fail the migration within the liveness "
                         "timeout and this many seconds (default 3)")
    ap.add_argument("--blackhole-timeout", type=float, default=15.0, metavar="S",
                    help="after this many seconds of a blackholed link not noticed, cancel "
                         "the migration (migrate_cancel) and count it as a broken promise "
                         "(default 15)")
    ap.add_argument("--accel", "--backend", dest="accel", choices=("auto", "kvm", "soft"),
                    default="auto", help="ferry run --backend: kvm, soft, or auto (kvm when "
                                         "/dev/kvm is usable, else soft)")
    ap.add_argument("--mem", default="256M", help="guest RAM (default 256M)")
    ap.add_argument("--dirty", help="bytes the guest dirties per pass (default mem/8)")
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--no-verify-full", dest="verify_full", action="store_false",
                    help="leave migration.verify-full off (the incremental digest still runs)")
    ap.add_argument("--fault-bandwidth", default="10M",
                    help="bandwidth cap of a faulted attempt, so the fault lands mid-pass "
                         "(default 10M)")
    ap.add_argument("--fault-bandwidth-zstd", default="32K",
                    help="the same for zstd attempts, whose pages shrink a hundredfold "
                         "(default 32K)")
    ap.add_argument("--downtime-limit", type=int, default=300, metavar="MS",
                    help="downtime limit of the clean attempts (default 300)")
    ap.add_argument("--max-retries", type=int, default=3,
                    help="attempts after a failed one, per hop (default 3)")
    ap.add_argument("--ferry", type=Path, help="ferry binary (default: build the release one)")
    ap.add_argument("--no-build", action="store_true",
                    help="use the existing release binary under the target directory")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (every hop and the summary) on stdout")
    ap.add_argument("--out", type=Path, help="also write the JSON to FILE")
    ap.add_argument("--keep-tmp", action="store_true", help="keep every process's logs")
    a = ap.parse_args(argv)
    if a.hops < 1:
        ap.error("--hops must be at least 1")
    if not 0.0 <= a.fail_share <= 1.0:
        ap.error("--fail-share must be between 0 and 1")
    kinds = [k.strip() for k in a.faults.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FAULT_KINDS]
    if bad:
        ap.error(f"unknown fault kind(s) {bad}; known: {', '.join(FAULT_KINDS)}")
    if a.liveness_ms != 0 and not 500 <= a.liveness_ms <= 600_000:
        ap.error("--liveness-ms must be 0 or 500-600000 (migration.liveness-timeout's range)")
    a.liveness_s = (a.liveness_ms or DEFAULT_LIVENESS_MS) / 1e3
    if not kinds and a.fail_share > 0:
        ap.error("--fail-share > 0 needs at least one fault kind")
    a.fault_kinds = kinds
    if a.dirty is None:
        a.dirty = f"{max(m_bytes(a.mem) // 8, 1 << 20) >> 10}K"
    return a


def m_bytes(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper()
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--relay"]:
        if len(argv) != 3:
            raise SystemExit("usage: soak.py --relay LISTEN_URI TARGET_URI")
        return relay_main(argv[1], argv[2])
    a = parse_args(argv)
    atexit.register(m.reap_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, m._on_signal)

    if a.accel == "auto":
        if os.access("/dev/kvm", os.R_OK | os.W_OK):
            a.backend = "kvm"
        else:
            a.backend = "soft"
            log("soak: /dev/kvm is not usable here; falling back to --backend soft")
    else:
        a.backend = a.accel
    if a.ferry:
        a.ferry = a.ferry.resolve()
    elif a.no_build:
        a.ferry = m.default_ferry()
    else:
        a.ferry = m.build_ferry()
    if not os.access(a.ferry, os.X_OK):
        raise SystemExit(f"no ferry binary at {a.ferry}; build it or pass --ferry")
    a.vm_args = ["--mem", a.mem, "--dirty", a.dirty, "--vcpus", str(a.vcpus)]
    if a.verify_full:
        a.vm_args += ["-global", "migration.verify-full=on"]
    if a.liveness_ms:
        a.vm_args += ["-global", f"migration.liveness-timeout={a.liveness_ms}"]

    started = _dt.datetime.now().astimezone()
    res: dict = {
        "schema": SCHEMA,
        "command": " ".join(["python3", "bench/soak.py", *argv]),
        "started": started.isoformat(timespec="seconds"),
        "backend": a.backend,
        "ferry": str(a.ferry),
        "ferry_version": m.first_line([str(a.ferry), "--version"]),
        "git_commit": m.first_line(["git", "rev-parse", "HEAD"], m.REPO),
        "args": {"hops": a.hops, "blackhole_timeout_s": a.blackhole_timeout, "seed": a.seed, "fail_share": a.fail_share,
                 "faults": a.fault_kinds, "mem": a.mem, "dirty": a.dirty, "vcpus": a.vcpus,
                 "verify_full": a.verify_full, "fault_bandwidth": a.fault_bandwidth,
                 "fault_bandwidth_zstd": a.fault_bandwidth_zstd,
                 "max_retries": a.max_retries, "downtime_limit": a.downtime_limit,
                 "liveness_ms": a.liveness_ms, "notice_slack_s": a.notice_slack},
        "ok": False,
        "hops": [],
    }
    log(f"soak: {a.hops} hops of a {a.backend} guest ({a.mem}, dirty {a.dirty}), seed "
        f"{a.seed}, faults {','.join(a.fault_kinds)} in {a.fail_share:.0%} of hops, "
        f"liveness {a.liveness_s:g} s, {a.ferry}")
    tmp = Path(tempfile.mkdtemp(prefix="ferry-soak-"))
    t0 = time.monotonic()
    code = 1
    try:
        run(a, res, tmp)
        s = summarise(res["hops"], time.monotonic() - t0)
        res["ok"] = (s["hops_ok"] == a.hops and s["unplanned_failures"] == 0
                     and not s["broken_promises"])
        if s["unplanned_failures"]:
            res["violation"] = (f"{s['unplanned_failures']} migration(s) failed with no fault "
                                f"injected (recovered by retrying)")
        elif s["broken_promises"]:
            res["violation"] = (f"{len(s['broken_promises'])} promise(s) about noticing "
                                f"faults broken: {s['broken_promises'][0]}")
        code = 0 if res["ok"] else 1
    except Violation as e:
        res["violation"] = str(e)
        log(f"soak: VIOLATION: {e}")
    except BenchError as e:
        res["violation"] = f"could not run: {e}"
        log(f"soak: ERROR: {e}")
    except KeyboardInterrupt as e:
        res["interrupted"] = str(e) or "Ctrl-C"
        log(f"soak: interrupted ({res['interrupted']}); stopping every child")
        code = 130
    finally:
        m.reap_all()
        res["summary"] = summarise(res["hops"], time.monotonic() - t0)
        if a.keep_tmp or res.get("violation"):
            log(f"soak: process logs in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    if a.json:
        print(json.dumps(res))
        log(summary_text(res))
    else:
        print(summary_text(res))
    return code


if __name__ == "__main__":
    m.run_main(main)
