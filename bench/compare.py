#!/usr/bin/env python3
"""ferry and QEMU side by side: the same guest workload, the same machine, the same run.

    python3 bench/compare.py [--runs 3] [--cases a,b] [--channels 1,2,4] [--markdown]

For every case and channel count, each round migrates a ferry guest (two `ferry run`
processes and `ferry migrate`) and a QEMU guest (two `qemu-system-x86_64` processes driven
over QMP), one right after the other, in an order that alternates between rounds so that
whatever else the machine is doing hits both. Each round also measures the machine's limits:
loopback TCP with iperf3 over 1 and N streams (512 KiB writes, with the socket's own CPU per
GiB at each end), a verified transfer alone over 1 and N streams (bench/floor: 1 GiB from
memory into memory, every page hashed at both ends, nothing else: the least a migration with
ferry's digest can cost here), and memcpy into touched and never-touched memory. Figures are
medians over the rounds; ratios are ferry / QEMU of those medians, and each goal's row also
gives the spread of the ratios of single rounds (ferry and QEMU back to back), which on a
noisy host can straddle a goal that the ratio of medians seems to meet or miss.

The QEMU guest is bench/guest/guest.S, built here with gcc and ld into a multiboot image:
it reaches long mode at CPL 3 and runs ferry's workload (increment byte 0 of every 4 KiB page
of a range each pass), so on a host whose KVM emulates CPL-0 code both guests run natively.

QEMU is 10.0 or newer by default: the qemu-system-x86_64 on PATH if it is, or else Debian's
qemu-system-x86 installed with apt-get (on Debian 12 from bookworm-backports, which the
driver adds to apt's sources if they lack it; iperf3 and gcc are installed too when
missing). `--qemu PATH` measures any other QEMU instead (Debian 12's own 7.2, say), as a
second reference; the results name the version used. Before measuring, the driver starts
QEMU briefly with `-cpu host`: on hosts where that dies setting an MSR (QEMU 10.0 aborts on
MSR 0x10a, IA32_ARCH_CAPABILITIES, on PVM hosts) it uses `-cpu host,-arch-capabilities`,
and says so in its log and in the results (`--qemu-cpu` overrides the probe).

Results: JSON (--out, default bench/out/compare-<time>.json), an SVG plot of the ratios next
to it, and markdown tables with --markdown (or later from the JSON with --from-json).

Child processes are handled by bench/harness.py: each in its own session with a
parent-death signal, killed by process group on normal exit, exception, Ctrl-C, SIGTERM or
SIGHUP. Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import math
import mmap
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402  (processes, QMP, /proc, references, QEMU, formatting)
from harness import BenchError, CpuWindow, Qmp, log, reap, spawn  # noqa: E402

REPO = h.REPO
SCHEMA = "ferry-bench-compare/1"
GiB = h.GiB
MiB = h.MiB

# Timeouts, seconds.
T_GUEST = 180.0      # boot (firmware runs emulated here), fill, first pass
T_CONNECT = 60.0
GUEST_WINDOW_S = 1.0  # the guest's pass rate is measured over this long before migrating
POLL_S = 0.01


# --------------------------------------------------------------------------------------------
# Memory temperature
# --------------------------------------------------------------------------------------------
#
# A destination's time goes mostly into first touches of fresh memory, and what a first touch
# costs depends on how recently the memory was freed: on a host that is itself a VM which
# hands free memory back to its hypervisor (free page reporting), a page freed less than a
# second ago is zeroed and reused in place (~6 GB/s here), one freed ten seconds ago has to
# come back from the hypervisor (~0.4 GB/s). The kernel reports free memory a slice at a
# time, so the more was freed the longer it stays warm: measured here, 1 GiB freed is mostly
# cold after 1-8 s, 4 GiB freed is still warm after 5 s, half-warm after 10 s and cold after
# 20 s. The system measured right after the other would get the other's freed memory
# cheaply, so every migration first waits COOL_BASE_S + --cool seconds per GiB the driver
# freed (at most COOL_MAX_S) since each free.

COOL_BASE_S = 2.0
COOL_MAX_S = 30.0
# (when, bytes): what the driver gave back, and when. The run starts as if 2 GiB had just
# been freed (a build, an earlier run).
_frees: list[tuple[float, int]] = [(time.monotonic(), 2 * (1 << 30))]


def freed_memory(nbytes: int) -> None:
    """Notes that the driver (a process it ran, a buffer it unmapped) gave memory back."""
    _frees.append((time.monotonic(), nbytes))


def held_bytes(*procs) -> int:
    """Peak RSS of the live processes among `procs`: what they will free when they end."""
    return sum(h.peak_rss(p.pid) or 0 for p in procs if p is not None and p.poll() is None)


def cool_down(per_gib: float) -> float:
    """Waits until the memory freed lately is back with the hypervisor; returns the wait."""
    if per_gib <= 0:
        return 0.0
    until = max(t + min(COOL_MAX_S, COOL_BASE_S + per_gib * n / (1 << 30)) for t, n in _frees)
    now = time.monotonic()
    del _frees[:-1]  # the latest alone can still matter after this wait
    if until > now:
        time.sleep(until - now)
    return round(max(until - now, 0.0), 2)


def ref_cold_copy(size: int, cool: float) -> dict:
    """memcpy of `size` bytes into memory never touched, advised to use huge pages like both
    systems' guest RAM, once the memory freed lately is cold: the first-touch bound a
    destination meets."""
    src = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    sv = (ctypes.c_char * size).from_buffer(src)
    try:
        ctypes.memset(ctypes.addressof(sv), 0x5A, size)
        waited = cool_down(cool)
        dst = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        dst.madvise(mmap.MADV_HUGEPAGE)
        dv = (ctypes.c_char * size).from_buffer(dst)
        try:
            t = time.perf_counter()
            ctypes.memmove(ctypes.addressof(dv), ctypes.addressof(sv), size)
            gbs = size / (time.perf_counter() - t) / 1e9
        finally:
            del dv
            dst.close()
    finally:
        del sv
        src.close()
        freed_memory(2 * size)
    return {"size": size, "cold_thp_gbs": gbs, "cool_wait_s": waited}


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    mem: int
    dirty: int
    fill: int
    # The source is paused before migrating (after its fill, for QEMU whose guest fills).
    paused: bool
    # The guest runs the dirtying loop while it migrates.
    live: bool
    downtime_limit_ms: int
    what: str
    # ferry's backend: the cases without a running workload use the soft backend (as
    # they did before the KVM backend had --fill and --dirty 0, so that figures stay
    # comparable). No guest code runs in them, so what is measured is the same: moving
    # the memory.
    ferry_backend: str = "kvm"


CASES: dict[str, Case] = {c.name: c for c in [
    Case("paused-4g", 4 * GiB, 0, 1 * GiB, paused=True, live=False, downtime_limit_ms=300,
         what="a paused 4 GiB guest holding 1 GiB of non-zero pseudo-random data",
         ferry_backend="soft"),
    Case("idle-8g", 8 * GiB, 0, 0, paused=False, live=False, downtime_limit_ms=300,
         what="an idle 8 GiB guest that never touched its memory", ferry_backend="soft"),
    Case("live-1g", 1 * GiB, 100 * MiB, 0, paused=False, live=True, downtime_limit_ms=300,
         what="a running 1 GiB guest dirtying 100 MiB (one byte per page) each pass"),
    Case("live-4g-300ms", 4 * GiB, 1 * GiB, 0, paused=False, live=True, downtime_limit_ms=300,
         what="a running 4 GiB guest dirtying 1 GiB each pass, downtime limit 300 ms"),
    Case("live-4g-10ms", 4 * GiB, 1 * GiB, 0, paused=False, live=True, downtime_limit_ms=10,
         what="the same with a downtime limit of 10 ms"),
]}

DEFAULT_CHANNELS = (1, 2, 4)

# Targets, for every channel count: (case, metric, ratio ferry/QEMU at most, in words).
TARGETS = [
    ("paused-4g", "total_ms", 0.4, "total time ≤ 0.4x QEMU's"),
    ("idle-8g", "total_ms", 0.15, "total time ≤ 0.15x QEMU's"),
    ("live-4g-300ms", "total_ms", 0.6, "total time ≤ 0.6x QEMU's, downtime ≤ 300 ms"),
    ("live-4g-10ms", "total_ms", 0.6, "total time ≤ 0.6x QEMU's, downtime ≤ 10 ms"),
    ("live-1g", "downtime_ms", 1.0, "downtime ≤ QEMU's"),
]

# The goals of "QEMU 10.0 as the reference, and half the CPU per GiB moved", for every
# channel count: CPU per GiB moved at most CPU_PER_GIB s and at most CPU_OF_QEMU of
# QEMU's on each side (every case that moves data), every live case's total at most
# LIVE_TOTAL of QEMU's with ferry's downtime within the case's limit, and the paused
# case's throughput at least PAUSED_OF_TCP of loopback TCP with as many streams. Each
# CPU row names the bare socket's own cost per GiB in the same run (iperf3's sender or
# receiver): the part of a migration's CPU that is the kernel's, whatever the engine does.
# It is iperf3's figure, not a hard floor: a sender that writes larger batches, or fewer
# of them, can pay a little less. The rows also name bench/floor's verified transfer, the
# socket plus the copies from and into memory and the hashes: no migration that checks
# its pages as ferry's digest does can cost less than that on the host.
CPU_PER_GIB = 0.2
CPU_OF_QEMU = 0.5
LIVE_TOTAL = 0.5
PAUSED_OF_TCP = 0.95


def variant_name(case: str, channels: int) -> str:
    return f"{case}/{channels}ch"



# --------------------------------------------------------------------------------------------
# Tools: install what is missing, build the guest image
# --------------------------------------------------------------------------------------------


def ferry_channel_args(channels: int, supported: bool) -> list[str]:
    """`ferry run` arguments for a channel count, the same on both sides.

    One channel means what QEMU does without multifd: every page on the main connection
    (`multifd-channels=0`); N > 1 means N multifd channels beside it, as QEMU's multifd.
    A ferry without the property moves everything on its one connection whatever N is.
    """
    if not supported:
        return []
    return ["--global", f"migration.multifd-channels={0 if channels == 1 else channels}"]


# --------------------------------------------------------------------------------------------
# One migration of one system
# --------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    ferry: Path
    qemu: str
    image: Path
    qemu_cpu: str
    ferry_channels: bool
    tmp: Path
    migrate_timeout: float
    cool: float
    # Both destinations fault in their RAM before the migration (ferry --prealloc, QEMU
    # -mem-prealloc), so the host's slow first touch is outside what is measured.
    prealloc: bool = False
    # `--global` settings for both ferry processes (--ferry-global), for A/B runs.
    ferry_globals: tuple = ()


@dataclass
class Run:
    system: str
    variant: str
    case: str
    channels: int
    round: int
    ok: bool = False
    metrics: dict = field(default_factory=dict)
    guest: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    error: str | None = None
    detail: dict = field(default_factory=dict)


def _finish(proc, q, who, warnings):
    h.quit_and_wait(q, proc, who, warnings)


def guest_window(count, running: bool = True) -> dict:
    """Waits for a finished pass, then measures the pass rate over GUEST_WINDOW_S.

    `count()` returns the passes so far (or None before the loop started)."""
    end = time.monotonic() + T_GUEST
    while True:
        n = count()
        if n is not None and n >= 1:
            break
        if time.monotonic() > end:
            raise BenchError(f"the source guest finished no pass within {T_GUEST:.0f} s")
        time.sleep(0.02)
    t0, n0 = time.monotonic(), n
    time.sleep(GUEST_WINDOW_S)
    t1, n1 = time.monotonic(), count()
    return {"passes_before": n1, "passes_per_s": round((n1 - n0) / (t1 - t0))}


def run_ferry(ctx: Ctx, case: Case, channels: int, rnd: int) -> Run:
    v = variant_name(case.name, channels)
    r = Run("ferry", v, case.name, channels, rnd)
    d = ctx.tmp / f"ferry-{case.name}-{channels}-{rnd}"
    d.mkdir()
    chan = ferry_channel_args(channels, ctx.ferry_channels)
    r.detail["channel_args"] = chan
    common = ["run", "--backend", case.ferry_backend, "--mem", h.size_arg(case.mem),
              "--dirty", h.size_arg(case.dirty), *chan]
    for g in ctx.ferry_globals:
        common += ["--global", g]
    src_cmd = [str(ctx.ferry), *common, "--qmp", str(d / "src.sock")]
    if case.fill:
        src_cmd += ["--fill", h.size_arg(case.fill)]
    if case.paused:
        src_cmd += ["-S"]
    dst_cmd = [str(ctx.ferry), *common, "--incoming", "tcp:127.0.0.1:0",
               "--qmp", str(d / "dst.sock")]
    if ctx.prealloc:
        dst_cmd += ["--prealloc"]
    r.detail["commands"] = [" ".join(src_cmd), " ".join(dst_cmd)]
    src = dst = mig = None
    qs = qd = None
    interrupted = False
    try:
        with open(d / "dst.out", "wb") as o, open(d / "dst.err", "wb") as e:
            dst = spawn(dst_cmd, stdin=subprocess.DEVNULL, stdout=o, stderr=e)
        uri = h.wait_uri(d / "dst.out", dst, d / "dst.err")
        with open(d / "src.out", "wb") as o, open(d / "src.err", "wb") as e:
            src = spawn(src_cmd, stdin=subprocess.DEVNULL, stdout=o, stderr=e)
        qs = Qmp.connect(d / "src.sock", src, "ferry source", d / "src.err", deadline=T_CONNECT)
        qd = Qmp.connect(d / "dst.sock", dst, "ferry destination", d / "dst.err",
                         deadline=T_CONNECT)
        if case.live:
            def count():
                rep = qs.execute("x-ferry-guest")
                p = [int(x) for x in rep.get("passes", [])]
                return min(p) if p and rep.get("running") else None
            r.guest = guest_window(count)

        r.detail["cool_wait_s"] = cool_down(ctx.cool)
        cs, cd = CpuWindow(src.pid), CpuWindow(dst.pid)
        mig_cmd = [str(ctx.ferry), "migrate", "--qmp", str(d / "src.sock"), uri, "--json",
                   "--downtime-limit", str(case.downtime_limit_ms)]
        r.detail["commands"].append(" ".join(mig_cmd))
        with open(d / "migrate.out", "wb") as o, open(d / "migrate.err", "wb") as e:
            mig = spawn(mig_cmd, stdin=subprocess.DEVNULL, stdout=o, stderr=e)
        end = time.monotonic() + ctx.migrate_timeout
        while mig.poll() is None:
            if time.monotonic() > end:
                try:
                    qs.execute("migrate_cancel")
                except BenchError:
                    pass
                raise BenchError(f"no convergence: still migrating after "
                                 f"{ctx.migrate_timeout:.0f} s (cancelled)")
            cs.sample()
            cd.sample()
            time.sleep(POLL_S)
        cpu_s, cpu_d = cs.close(), cd.close()
        reap(mig)
        info = None
        for line in reversed((d / "migrate.out").read_text(errors="replace").splitlines()):
            if line.strip().startswith("{"):
                try:
                    info = json.loads(line)
                    break
                except json.JSONDecodeError:
                    continue
        if info is None:
            raise BenchError(f"ferry migrate (exit {mig.returncode}) printed no JSON: "
                             f"{h.tail(d / 'migrate.err')}")
        r.detail["info"] = info
        if info.get("status") != "completed" or mig.returncode != 0:
            raise BenchError(f"migration {info.get('status')} (exit {mig.returncode}): "
                             f"{info.get('error-desc') or h.tail(d / 'migrate.err')}")
        gap = h.stop_resume_ms(qs, qd) if not case.paused else None
        span = h.start_to_done_ms(qs, qd)
        st = qd.execute("query-status").get("status")
        want = "paused" if case.paused else "running"
        if st != want:
            r.warnings.append(f"destination is {st!r}, expected {want!r}")
        if case.live:
            # The destination guest goes on from where the source stopped.
            before = (qd.execute("x-ferry-guest").get("passes") or [0])
            time.sleep(0.3)
            after = (qd.execute("x-ferry-guest").get("passes") or [0])
            if not (min(after) > min(before)):
                r.warnings.append(f"destination guest made no progress ({before} -> {after})")
        total = info.get("total-time")
        transferred = (info.get("ram") or {}).get("transferred")
        r.metrics = {
            "total_ms": span if span is not None else total,
            "total_reported_ms": total,
            # The same definition for both systems: the source's STOP event to the
            # destination's RESUME event. ferry's own figure (pause to the destination's
            # report that it resumed) is within a few ms of it.
            "downtime_ms": gap,
            "downtime_reported_ms": info.get("downtime"),
            "stop_resume_ms": gap,
            "setup_ms": info.get("setup-time"),
            "transferred_bytes": transferred,
            "gbs": h.gb_per_s(transferred, span or total),
            "passes": len(info.get("passes") or []),
            "cpu_src_s": cpu_s["mig_s"],
            "cpu_dst_s": cpu_d["mig_s"],
            "cpu_src_all_s": cpu_s["all_s"],
            "cpu_dst_all_s": cpu_d["all_s"],
            "cpu_src_vcpu_s": cpu_s["vcpu_s"],
            "cpu_dst_vcpu_s": cpu_d["vcpu_s"],
            "rss_src_peak": h.peak_rss(src.pid),
            "rss_dst_peak": h.peak_rss(dst.pid),
            "thp_dst_bytes": h.anon_huge_bytes(dst.pid),
        }
        r.ok = True
    except BenchError as e:
        r.error = str(e)
    except (OSError, ValueError, KeyError, TypeError, socket.timeout) as e:
        r.error = f"{type(e).__name__}: {e}"
    except BaseException:
        interrupted = True
        raise
    finally:
        held = held_bytes(src, dst)
        try:
            reap(mig)
            if not interrupted:
                _finish(src, qs, "ferry source", r.warnings)
                _finish(dst, qd, "ferry destination", r.warnings)
        finally:
            reap(src)
            reap(dst)
            freed_memory(held)
        if not r.ok:
            r.detail["src_stderr"] = h.tail(d / "src.err")
            r.detail["dst_stderr"] = h.tail(d / "dst.err")
    return r


def qemu_cmd(ctx: Ctx, case: Case, serial: Path, qmp: Path, incoming: bool) -> list[str]:
    return h.qemu_guest_cmd(ctx.qemu, ctx.qemu_cpu, ctx.image, case.mem, serial, qmp,
                            name=f"ferry-bench-{'dst' if incoming else 'src'}",
                            dirty=case.dirty, fill=case.fill, incoming=incoming,
                            prealloc=ctx.prealloc)


def qemu_set_channels(q: Qmp, channels: int) -> None:
    """One channel: QEMU's default single stream. N > 1: multifd with N channels. MIGRATION
    events on, for the destination's completion time."""
    q.execute("migrate-set-capabilities",
              {"capabilities": [{"capability": "multifd", "state": channels > 1},
                                {"capability": "events", "state": True}]})
    if channels > 1:
        q.execute("migrate-set-parameters", {"multifd-channels": channels})


def run_qemu(ctx: Ctx, case: Case, channels: int, rnd: int) -> Run:
    v = variant_name(case.name, channels)
    r = Run("qemu", v, case.name, channels, rnd)
    d = ctx.tmp / f"qemu-{case.name}-{channels}-{rnd}"
    d.mkdir()
    src_cmd = qemu_cmd(ctx, case, d / "src.serial", d / "src.qmp", False)
    dst_cmd = qemu_cmd(ctx, case, d / "dst.serial", d / "dst.qmp", True)
    r.detail["commands"] = [" ".join(src_cmd), " ".join(dst_cmd)]
    src = dst = None
    qs = qd = None
    interrupted = False
    serial = h.SerialLog(d / "src.serial")
    try:
        with open(d / "dst.err", "wb") as e:
            dst = spawn(dst_cmd, stdin=subprocess.DEVNULL, stdout=e, stderr=subprocess.STDOUT)
        with open(d / "src.err", "wb") as e:
            src = spawn(src_cmd, stdin=subprocess.DEVNULL, stdout=e, stderr=subprocess.STDOUT)
        qs = Qmp.connect(d / "src.qmp", src, "QEMU source", d / "src.err", deadline=T_CONNECT)
        qd = Qmp.connect(d / "dst.qmp", dst, "QEMU destination", d / "dst.err",
                         deadline=T_CONNECT)
        r.detail["qemu_version"] = qs.greeting.get("version", {}).get("qemu")

        # Wait for the guest to be where the case wants it.
        want = b"loop\n" if case.live else b"idle\n"
        h.wait_serial(serial, src, want, T_GUEST, d / "src.err")
        if case.live:
            def count():
                serial.poll()
                return serial.passes
            r.guest = guest_window(count)
        if case.paused:
            qs.execute("stop")

        for q in (qs, qd):
            qemu_set_channels(q, channels)
        # No bandwidth cap (QEMU's default is 128 MiB/s; ferry has none), the case's
        # downtime limit.
        qs.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40,
                                              "downtime-limit": case.downtime_limit_ms})
        port = h.qemu_listen(qd)

        r.detail["cool_wait_s"] = cool_down(ctx.cool)
        cs, cd = CpuWindow(src.pid), CpuWindow(dst.pid)
        qs.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})

        def sample(dst_only: bool) -> None:
            if not dst_only:
                cs.sample()
            cd.sample()

        info = h.qemu_wait_migration(qs, qd, ctx.migrate_timeout, sample, poll=POLL_S)
        cpu_s, cpu_d = cs.close(), cd.close()
        r.detail["info"] = info
        gap = h.stop_resume_ms(qs, qd) if not case.paused else None
        span = h.start_to_done_ms(qs, qd)
        st = qd.execute("query-status").get("status")
        want_st = "paused" if case.paused else "running"
        if st != want_st:
            r.warnings.append(f"destination is {st!r}, expected {want_st!r}")
        if case.live:
            dserial = h.SerialLog(d / "dst.serial")
            dserial.poll()
            n0 = dserial.offset
            time.sleep(0.3)
            dserial.poll()
            if dserial.offset <= n0:
                r.warnings.append("destination guest printed no pass in 0.3 s after resuming")
        ram = info.get("ram") or {}
        total = info.get("total-time")
        transferred = ram.get("transferred")
        r.metrics = {
            # QEMU's own figures stop when the source has sent everything; the comparable
            # ones end when the destination has loaded it all (total) and its guest runs
            # again (downtime).
            "total_ms": span if span is not None else total,
            "total_reported_ms": total,
            "downtime_ms": gap,
            "downtime_reported_ms": info.get("downtime"),
            "stop_resume_ms": gap,
            "setup_ms": info.get("setup-time"),
            "transferred_bytes": transferred,
            "gbs": h.gb_per_s(transferred, span or total),
            "passes": ram.get("dirty-sync-count"),
            "cpu_src_s": cpu_s["mig_s"],
            "cpu_dst_s": cpu_d["mig_s"],
            "cpu_src_all_s": cpu_s["all_s"],
            "cpu_dst_all_s": cpu_d["all_s"],
            "cpu_src_vcpu_s": cpu_s["vcpu_s"],
            "cpu_dst_vcpu_s": cpu_d["vcpu_s"],
            "rss_src_peak": h.peak_rss(src.pid),
            "rss_dst_peak": h.peak_rss(dst.pid),
            "thp_dst_bytes": h.anon_huge_bytes(dst.pid),
            "mbps_last": ram.get("mbps"),
        }
        r.ok = True
    except BenchError as e:
        r.error = str(e)
    except (OSError, ValueError, KeyError, TypeError, socket.timeout) as e:
        r.error = f"{type(e).__name__}: {e}"
    except BaseException:
        interrupted = True
        raise
    finally:
        held = held_bytes(src, dst)
        try:
            if not interrupted:
                _finish(src, qs, "QEMU source", r.warnings)
                _finish(dst, qd, "QEMU destination", r.warnings)
        finally:
            reap(src)
            reap(dst)
            freed_memory(held)
        if not r.ok:
            r.detail["src_stderr"] = h.tail(d / "src.err")
            r.detail["dst_stderr"] = h.tail(d / "dst.err")
            serial.poll()
            r.detail["src_serial"] = serial.text[-300:].decode(errors="replace")
    return r


# --------------------------------------------------------------------------------------------
# Summary, ratios, markdown, plot
# --------------------------------------------------------------------------------------------

METRICS = ["total_ms", "total_reported_ms", "downtime_ms", "downtime_reported_ms", "stop_resume_ms", "setup_ms",
           "transferred_bytes", "gbs", "passes", "cpu_src_s", "cpu_dst_s", "cpu_src_all_s",
           "cpu_dst_all_s", "cpu_src_vcpu_s", "cpu_dst_vcpu_s", "rss_src_peak", "rss_dst_peak"]
RATIO_METRICS = ["total_ms", "total_reported_ms", "downtime_ms", "transferred_bytes", "gbs", "cpu_src_s",
                 "cpu_dst_s"]


def summarise(results: dict) -> dict:
    out: dict = {"variants": {}, "references": {}}
    runs = [r for rnd in results["rounds"] for r in rnd["runs"]]
    for v in results["variants"]:
        entry: dict = {}
        for system in ("ferry", "qemu"):
            mine = [r for r in runs if r["variant"] == v and r["system"] == system]
            ok = [r for r in mine if r["ok"]]
            s = {"runs": len(mine), "ok": len(ok)}
            for k in METRICS:
                s[k] = h.stats([r["metrics"].get(k) for r in ok])
            s["passes_per_s"] = h.stats([r["guest"].get("passes_per_s") for r in mine
                                          if r.get("guest")])
            s["errors"] = sorted({(r.get("error") or "")[:200] for r in mine if not r["ok"]})
            entry[system] = s
        ratios = {}
        for k in RATIO_METRICS:
            f, q = entry["ferry"].get(k), entry["qemu"].get(k)
            if f and q and q["median"]:
                ratios[k] = f["median"] / q["median"]
            else:
                ratios[k] = None
        entry["ratio"] = ratios
        entry["paired"] = paired_ratios(results, v)
        out["variants"][v] = entry
    refs = out["references"]
    rounds = results["rounds"]
    for key in ("tcp1", "tcpn"):
        refs[f"{key}_gbs"] = h.stats([r[key].get("gbs") for r in rounds if r.get(key)])
        for side in ("sender", "receiver"):
            refs[f"{key}_cpu_{side}_s_per_gib"] = h.stats(
                [tcp_cpu_per_gib(r[key], side) for r in rounds if r.get(key)])
    for key in ("floor1", "floorn"):
        refs[f"{key}_gbs"] = h.stats([r[key].get("gbs") for r in rounds if r.get(key)])
        for side in ("sender", "receiver"):
            refs[f"{key}_cpu_{side}_s_per_gib"] = h.stats(
                [r[key].get(f"cpu_{side}_s_per_gib") for r in rounds if r.get(key)])
    for k in ("touched_gbs", "fresh_gbs", "fresh_thp_gbs", "cold_thp_gbs"):
        refs[f"memcpy_{k}"] = h.stats([r["memcpy"].get(k) for r in rounds if r.get("memcpy")])
    out["other_cores"] = h.stats([r.get("other_cores") for r in runs])
    out["targets"] = check_targets(results, out)
    return out


def paired_ratios(results: dict, v: str) -> dict:
    """Per metric, the ferry/QEMU ratio of each round where both completed: the two run
    back to back, so a round's ratio sees one state of a noisy machine, where a ratio of
    medians may pair ferry's quiet minute with QEMU's busy one."""
    out = {}
    for k in RATIO_METRICS:
        per_round = []
        for rnd in results["rounds"]:
            mine = {r["system"]: r for r in rnd["runs"] if r["variant"] == v and r["ok"]}
            f = mine.get("ferry", {}).get("metrics", {}).get(k)
            q = mine.get("qemu", {}).get("metrics", {}).get(k)
            if f is not None and q:
                per_round.append(f / q)
        out[k] = h.stats(per_round)
    return out


def tcp_cpu_per_gib(r: dict, side: str) -> float | None:
    """A loopback TCP reference's CPU per GiB at `side`; results written before the harness
    computed it have the percentage it comes from."""
    if f"cpu_{side}_s_per_gib" in r:
        return r[f"cpu_{side}_s_per_gib"]
    pct, n = r.get(f"cpu_{side}_pct"), r.get("bytes")
    if pct is None or not n or not r.get("seconds"):
        return None
    return pct / 100 * r["seconds"] / (n / 2**30)


def check_targets(results: dict, summary: dict) -> list[dict]:
    rows = []
    for case, metric, limit, what in TARGETS:
        for ch in results["args"]["channels"]:
            v = variant_name(case, ch)
            e = summary["variants"].get(v)
            if e is None:
                continue
            ratio = e["ratio"].get(metric)
            met = ratio is not None and ratio <= limit
            note = ""
            limit_ms = CASES[case].downtime_limit_ms
            if case.startswith("live-4g"):
                dt = e["ferry"].get("downtime_ms")
                if dt is None:
                    met = False
                elif dt["max"] > limit_ms:
                    met = False
                    note = f"ferry's downtime reached {dt['max']:.0f} ms"
            if ratio is None:
                f_ok, q_ok = e["ferry"]["ok"], e["qemu"]["ok"]
                note = (note + "; " if note else "") + (
                    "no ratio: " + ", ".join(
                        f"{s} completed {n}/{e[s]['runs']}" for s, n in
                        (("ferry", f_ok), ("qemu", q_ok))))
            rows.append({"variant": v, "metric": metric, "limit": limit, "ratio": ratio,
                         "met": met, "what": what, "note": note})
    return rows + check_cpu_goals(results, summary)


def _median(s: dict | None) -> float | None:
    return s["median"] if s else None


def check_cpu_goals(results: dict, summary: dict) -> list[dict]:
    """The rows of the CPU, live-total and throughput goals (see CPU_PER_GIB)."""
    rows = []
    refs = summary["references"]
    a = results["args"]

    def ref_key(kind: str, ch: int) -> str | None:
        # The reference of `kind` ("tcp" or "floor") measured with as many streams.
        n = "1" if ch == 1 else "n" if ch == a.get("tcp_streams") else None
        return kind + n if n else None

    def floor_of(ch: int, what: str) -> float | None:
        # bench/floor with as many streams: the least a verified transfer costs here.
        key = ref_key("floor", ch)
        return _median(refs.get(f"{key}_{what}")) if key else None

    def spread(e: dict, metric: str, limit: float) -> str:
        p = (e.get("paired") or {}).get(metric)
        if not p or p["n"] < 2:
            return ""
        note = f"per round {p['min']:.2f}–{p['max']:.2f}, median {p['median']:.2f}"
        if p["min"] <= limit < p["max"]:
            note += f"; its {p['n']} rounds straddle the goal"
        return note

    def row(v, what, value, kind, met, note=""):
        rows.append({"variant": v, "metric": what, "limit": None, "ratio": value,
                     "kind": kind, "met": met, "what": what, "note": note})

    for v, e in summary["variants"].items():
        name, ch = v.split("/")
        case, ch = CASES[name], int(ch[:-2])
        f, q = e["ferry"], e["qemu"]
        ref = ref_key("tcp", ch)
        moved = _median(f.get("transferred_bytes"))
        if case.fill or case.dirty:
            for side, floor_key, who in (("src", "sender", "sender"),
                                         ("dst", "receiver", "receiver")):
                cpu = _median(f.get(f"cpu_{side}_s"))
                floor = _median(refs.get(f"{ref}_cpu_{floor_key}_s_per_gib")) if ref else None
                per_gib = cpu / (moved / 2**30) if cpu is not None and moved else None
                verified = floor_of(ch, f"cpu_{floor_key}_s_per_gib")
                note = "; ".join(x for x in (
                    f"loopback TCP's {who} alone: {floor:.2f} s/GiB" if floor is not None
                    else "",
                    f"a verified transfer alone: {verified:.2f}" if verified is not None
                    else "") if x)
                row(v, f"CPU {side} per GiB moved ≤ {CPU_PER_GIB} s", per_gib, "s",
                    per_gib is not None and per_gib <= CPU_PER_GIB, note)
                ratio = e["ratio"].get(f"cpu_{side}_s")
                qcpu = _median(q.get(f"cpu_{side}_s"))
                qmoved = _median(q.get("transferred_bytes"))
                met = ratio is not None and ratio <= CPU_OF_QEMU
                note = ""
                if qcpu is not None and qmoved:
                    half = CPU_OF_QEMU * qcpu / (qmoved / 2**30)
                    note = f"{CPU_OF_QEMU}x QEMU's is {half:.2f} s/GiB"
                    if not met and floor is not None and half < floor:
                        note += f", below loopback TCP's {who} alone ({floor:.2f})"
                    elif not met and verified is not None and half < verified:
                        note += f", below a verified transfer's {who} alone ({verified:.2f})"
                extra = spread(e, f"cpu_{side}_s", CPU_OF_QEMU)
                note = "; ".join(x for x in (note, extra) if x)
                row(v, f"CPU {side} ≤ {CPU_OF_QEMU}x QEMU's", ratio, "ratio", met, note)
        if case.live:
            ratio = e["ratio"].get("total_ms")
            dt = f.get("downtime_ms")
            within = dt is not None and dt["max"] <= case.downtime_limit_ms
            notes = ["" if within else "ferry's downtime over the limit or not measured",
                     spread(e, "total_ms", LIVE_TOTAL)]
            # The bytes ferry moved at a verified transfer's pace, with no guest running
            # beside it: a bound below any total this case can reach here.
            fgbs, qms = floor_of(ch, "gbs"), _median(q.get("total_ms"))
            if fgbs and moved and qms:
                ms = moved / fgbs / 1e6
                notes.append(f"its bytes at a verified transfer's pace alone: {ms:.0f} ms = "
                             f"{ms / qms:.2f} of QEMU's")
            row(v, f"total ≤ {LIVE_TOTAL}x QEMU's, downtime ≤ {case.downtime_limit_ms} ms",
                ratio, "ratio", ratio is not None and ratio <= LIVE_TOTAL and within,
                "; ".join(x for x in notes if x))
        if case.paused and ref:
            tcp = _median(refs.get(f"{ref}_gbs"))
            gbs = _median(f.get("gbs"))
            share = gbs / tcp if gbs is not None and tcp else None
            fgbs = floor_of(ch, "gbs")
            row(v, f"GB/s ≥ {PAUSED_OF_TCP}x loopback TCP, {ch} stream(s)", share, "ratio",
                share is not None and share >= PAUSED_OF_TCP,
                f"a verified transfer alone: {fgbs / tcp:.2f} of TCP" if fgbs and tcp else "")
    return rows


def fmt(x, kind: str) -> str:
    return "–" if x is None else h.fmt_num(x, kind)


def cell(s: dict | None, kind: str) -> str:
    return h.cell(s, kind) if kind != "ratio" else fmt(s, kind)


def render_markdown(results: dict) -> str:
    summary = summarise(results)
    mi = results["machine"]
    out = []
    out.append(f"ferry `{mi.get('git_describe')}`"
               f"{' (uncommitted changes)' if mi.get('git_dirty') else ''}, "
               f"{mi.get('qemu_version')}, {results['started']}, {results['args']['runs']} "
               f"run(s), medians with (min–max); whole run {results.get('elapsed_s', 0):.0f} s.")
    probe = mi.get("qemu_cpu_probe")
    if probe:
        # Runs before the probe existed recorded only the -cpu given.
        out.append("")
        out.append(f"QEMU `{mi.get('qemu')}` with `-cpu {mi.get('qemu_cpu')}` "
                   f"({probe.get('how')}).")
    load = summary.get("other_cores")
    if load:
        out.append("")
        out.append(f"Other work on the machine during the migrations (busy CPU not this "
                   f"driver's): median {load['median']:.2f} cores, max {load['max']:.2f}, of "
                   f"{mi.get('nproc')}.")
    if not mi.get("ferry_channels"):
        out.append("")
        out.append("This ferry has no `migration.multifd-channels`: every ferry migration used "
                   "its single connection, whatever the channel count of the row.")
    out.append("")
    out.append("| case | ch | total ms ferry | total ms QEMU | ratio | downtime ms ferry "
               "| downtime ms QEMU | ratio | QEMU's own downtime ms |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v, e in summary["variants"].items():
        case, ch = v.split("/")
        f, q, r = e["ferry"], e["qemu"], e["ratio"]
        out.append("| " + " | ".join([
            case, ch[:-2],
            sys_cell(f, "total_ms", "ms"), sys_cell(q, "total_ms", "ms"),
            fmt(r["total_ms"], "ratio"),
            sys_cell(f, "downtime_ms", "ms"), sys_cell(q, "downtime_ms", "ms"),
            fmt(r["downtime_ms"], "ratio"),
            sys_cell(q, "downtime_reported_ms", "ms"),
        ]) + " |")
    out.append("")
    out.append("| case | ch | transferred ferry | transferred QEMU | GB/s ferry | GB/s QEMU "
               "| ratio | CPU src s ferry | CPU src s QEMU | ratio | CPU dst s ferry "
               "| CPU dst s QEMU | ratio |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v, e in summary["variants"].items():
        case, ch = v.split("/")
        f, q, r = e["ferry"], e["qemu"], e["ratio"]
        out.append("| " + " | ".join([
            case, ch[:-2],
            sys_cell(f, "transferred_bytes", "bytes"), sys_cell(q, "transferred_bytes", "bytes"),
            sys_cell(f, "gbs", "gbs"), sys_cell(q, "gbs", "gbs"), fmt(r["gbs"], "ratio"),
            sys_cell(f, "cpu_src_s", "s"), sys_cell(q, "cpu_src_s", "s"),
            fmt(r["cpu_src_s"], "ratio"),
            sys_cell(f, "cpu_dst_s", "s"), sys_cell(q, "cpu_dst_s", "s"),
            fmt(r["cpu_dst_s"], "ratio"),
        ]) + " |")
    out.append("")
    out.append("| case | target | ferry/QEMU, or the figure | met |")
    out.append("|---|---|---:|---|")
    for t in summary["targets"]:
        out.append(f"| {t['variant']} | {t['what']} | {fmt(t['ratio'], t.get('kind', 'ratio'))} | "
                   f"{'yes' if t['met'] else 'no'}"
                   f"{' (' + t['note'] + ')' if t['note'] else ''} |")
    live = [(v, e) for v, e in summary["variants"].items() if CASES[v.split('/')[0]].live]
    if live:
        out.append("")
        out.append("| live case | guest passes/s before migrating, ferry | QEMU | passes "
                   "ferry | passes QEMU |")
        out.append("|---|---:|---:|---:|---:|")
        for v, e in live:
            out.append("| " + " | ".join([
                v, sys_cell(e["ferry"], "passes_per_s", "int"),
                sys_cell(e["qemu"], "passes_per_s", "int"),
                sys_cell(e["ferry"], "passes", "int"), sys_cell(e["qemu"], "passes", "int"),
            ]) + " |")
    refs = summary["references"]
    a = results["args"]
    out.append("")
    out.append("| machine's limits, same run | GB/s |")
    out.append("|---|---:|")
    ln = next((r["tcp1"].get("length") for r in results["rounds"] if r.get("tcp1")), None)
    dash_l = f" -l {ln}" if ln else ""
    out.append(f"| loopback TCP, 1 stream (iperf3 -P 1 -t {a['iperf_seconds']}{dash_l}) | "
               f"{h.cell(refs.get('tcp1_gbs'), 'gbs')} |")
    out.append(f"| loopback TCP, {a['tcp_streams']} streams (iperf3 -P {a['tcp_streams']}"
               f"{dash_l}) | "
               f"{h.cell(refs.get('tcpn_gbs'), 'gbs')} |")
    out.append("")
    out.append("| loopback TCP's own CPU per GiB, same run | sender s/GiB | receiver s/GiB |")
    out.append("|---|---:|---:|")
    for key, n in (("tcp1", 1), ("tcpn", a["tcp_streams"])):
        out.append(f"| {n} stream(s) | {h.cell(refs.get(f'{key}_cpu_sender_s_per_gib'), 's')} | "
                   f"{h.cell(refs.get(f'{key}_cpu_receiver_s_per_gib'), 's')} |")
    if refs.get("floor1_gbs") or refs.get("floorn_gbs"):
        out.append("")
        out.append("| a verified transfer alone (bench/floor verify: 1 GiB memory to memory, "
                   "every page hashed at both ends), same run | GB/s | sender s/GiB "
                   "| receiver s/GiB |")
        out.append("|---|---:|---:|---:|")
        for key, n in (("floor1", 1), ("floorn", a["tcp_streams"])):
            out.append(f"| {n} stream(s) | {h.cell(refs.get(f'{key}_gbs'), 'gbs')} | "
                       f"{h.cell(refs.get(f'{key}_cpu_sender_s_per_gib'), 's')} | "
                       f"{h.cell(refs.get(f'{key}_cpu_receiver_s_per_gib'), 's')} |")
    out.append("")
    out.append("| memcpy, same run | GB/s |")
    out.append("|---|---:|")
    out.append(f"| memcpy {a['memcpy_mib']} MiB into touched memory | "
               f"{h.cell(refs.get('memcpy_touched_gbs'), 'gbs')} |")
    out.append(f"| memcpy {a['memcpy_mib']} MiB into never-touched memory (4 KiB pages) | "
               f"{h.cell(refs.get('memcpy_fresh_gbs'), 'gbs')} |")
    out.append(f"| memcpy {a['memcpy_mib']} MiB into never-touched memory, MADV_HUGEPAGE | "
               f"{h.cell(refs.get('memcpy_fresh_thp_gbs'), 'gbs')} |")
    out.append(f"| memcpy {a.get('cold_mib', '?')} MiB into never-touched memory, MADV_HUGEPAGE, "
               f"after the cooling wait (cold) | "
               f"{h.cell(refs.get('memcpy_cold_thp_gbs'), 'gbs')} |")
    notes = []
    if results.get("interrupted"):
        notes.append("the run was interrupted; figures cover what finished")
    for rnd in results["rounds"]:
        for r in rnd["runs"]:
            if not r["ok"]:
                why = " ".join((r.get("error") or "unknown").split())
                notes.append(f"run {rnd['round']}, {r['system']} {r['variant']} failed: "
                             f"{why[:300]}")
            for w in r.get("warnings", []):
                notes.append(f"run {rnd['round']}, {r['system']} {r['variant']}: {w}")
    if notes:
        out.append("")
        out.extend(f"- {n}" for n in notes)
    return "\n".join(out) + "\n"


def sys_cell(s: dict, key: str, kind: str) -> str:
    if not s.get("ok") and key != "passes_per_s":
        return "failed" if s.get("runs") else "–"
    return h.cell(s.get(key), kind)


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_svg(results: dict) -> str:
    """Horizontal bars of ferry/QEMU per variant, total time and downtime, log scale."""
    summary = summarise(results)
    rows = list(summary["variants"].items())
    panels = [("total_ms", "total time, ferry / QEMU"), ("downtime_ms", "downtime, ferry / QEMU")]
    limits = {}
    for case, metric, limit, _ in TARGETS:
        limits[(case, metric)] = limit
    lo, hi = -3.0, 1.0  # log10 range: 0.001x .. 10x
    label_w, panel_w, gap, row_h, top = 150, 330, 60, 18, 58
    width = label_w + 2 * panel_w + gap + 20
    height = top + row_h * len(rows) + 40
    mi = results["machine"]

    def x_of(panel: int, ratio: float) -> float:
        l10 = min(max(math.log10(ratio), lo), hi)
        return label_w + panel * (panel_w + gap) + (l10 - lo) / (hi - lo) * panel_w

    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'font-family="sans-serif" font-size="11">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="10" y="16" font-size="13" font-weight="bold">ferry / QEMU, medians of '
         f'{len(results["rounds"])} run(s), same machine, same run (lower is better for '
         f'ferry){" — preliminary: fewer than 3 runs" if len(results["rounds"]) < 3 else ""}'
         f'</text>',
         f'<text x="10" y="31" fill="#555">ferry {_esc(str(mi.get("git_commit"))[:12])}'
         f'{" (uncommitted changes)" if mi.get("git_dirty") else ""} · '
         f'{_esc(str(mi.get("qemu_version")).split("(")[0].strip())} · '
         f'{_esc(results["started"])} · {mi.get("nproc")} CPUs</text>']
    for p, (metric, title) in enumerate(panels):
        x0 = label_w + p * (panel_w + gap)
        s.append(f'<text x="{x0}" y="{top - 12}" font-weight="bold">{title}</text>')
        for k in range(int(lo), int(hi) + 1):
            x = x_of(p, 10.0 ** k)
            s.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" '
                     f'y2="{top + row_h * len(rows)}" stroke="{"#000" if k == 0 else "#ddd"}"/>')
            s.append(f'<text x="{x:.1f}" y="{top + row_h * len(rows) + 14}" '
                     f'text-anchor="middle" fill="#555">{10.0 ** k:g}x</text>')
        for i, (v, e) in enumerate(rows):
            y = top + i * row_h
            ratio = e["ratio"].get(metric)
            case = v.split("/")[0]
            if ratio is None or ratio <= 0:
                why = ("guest paused" if metric == "downtime_ms" and CASES[case].paused
                       else "no ratio")
                s.append(f'<text x="{x_of(p, 1.0) - 4:.1f}" y="{y + 12}" fill="#a00" '
                         f'text-anchor="end">{why}</text>')
            else:
                x1 = x_of(p, 1.0)
                x2 = x_of(p, ratio)
                colour = "#2a7" if ratio <= 1 else "#d54"
                s.append(f'<rect x="{min(x1, x2):.1f}" y="{y + 3}" width="{abs(x2 - x1):.1f}" '
                         f'height="{row_h - 6}" fill="{colour}"/>')
                # Right of the bar's far end, or of the 1x line: clear of the target ticks.
                tx = max(x1, x2) + 4
                s.append(f'<text x="{tx:.1f}" y="{y + 12}">{fmt(ratio, "ratio")}</text>')
            lim = limits.get((case, metric))
            if lim is not None:
                xl = x_of(p, lim)
                s.append(f'<line x1="{xl:.1f}" y1="{y + 1}" x2="{xl:.1f}" y2="{y + row_h - 1}" '
                         f'stroke="#00c" stroke-width="2"/>')
            if p == 0:
                s.append(f'<text x="{label_w - 8}" y="{y + 12}" text-anchor="end">'
                         f'{_esc(v)}</text>')
    load = summary.get("other_cores")
    s.append(f'<text x="10" y="{height - 8}" fill="#555">blue tick: the target for that case; '
             f'green: ferry lower, red: ferry higher; other work on the machine during the '
             f'migrations: median {load["median"]:.2f} cores (max {load["max"]:.2f})</text>'
             if load else
             f'<text x="10" y="{height - 8}" fill="#555">blue tick: the target for that case; '
             f'green: ferry lower, red: ferry higher</text>')
    s.append("</svg>")
    return "\n".join(s) + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="ferry and QEMU migrations side by side, with the machine's limits.",
        epilog="cases: " + "; ".join(f"{c.name}: {c.what}" for c in CASES.values()),
    )
    ap.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated (default all)")
    ap.add_argument("--channels", default=",".join(map(str, DEFAULT_CHANNELS)),
                    help="channel counts, comma-separated (default %(default)s)")
    ap.add_argument("--out", type=Path,
                    help="JSON results (default bench/out/compare-<time>.json); the plot goes "
                         "beside it with .svg")
    ap.add_argument("--plot", type=Path, help="SVG plot path (default: --out with .svg)")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables to stdout")
    ap.add_argument("--no-build", action="store_true", help="use the existing release ferry")
    ap.add_argument("--ferry", type=Path, help="ferry binary (implies --no-build)")
    ap.add_argument("--qemu", metavar="PATH",
                    help="qemu-system-x86_64 binary to compare with, whatever its version "
                         "(default: QEMU 10.0 or newer: the one on PATH, or else installed "
                         "with apt-get, on Debian 12 from bookworm-backports)")
    ap.add_argument("--qemu-cpu", metavar="CPU",
                    help="QEMU -cpu (default: host, or host,-arch-capabilities where QEMU "
                         "dies on an MSR with host, as QEMU 10.0 does on PVM hosts; probed "
                         "at the start)")
    ap.add_argument("--prealloc", action="store_true",
                    help="both destinations fault in their RAM before the migration "
                         "(ferry --prealloc, QEMU -mem-prealloc): measures the transfer, "
                         "not the host's first touch of fresh memory")
    ap.add_argument("--ferry-global", action="append", default=[], metavar="DRIVER.PROP=VALUE",
                    help="a --global for both ferry processes, e.g. "
                         "migration.x-ferry-populate-ahead=off (repeatable)")
    ap.add_argument("--migrate-timeout", type=float, default=120.0, metavar="S",
                    help="cancel a migration still running after S seconds and count it as "
                         "not converging (default 120)")
    ap.add_argument("--iperf-seconds", type=int, default=5, help="iperf3 -t (default 5)")
    ap.add_argument("--tcp-streams", type=int, default=0, metavar="N",
                    help="iperf3 -P for the N-stream reference (default: the largest "
                         "channel count)")
    ap.add_argument("--memcpy-mib", type=int, default=512, help="memcpy size, MiB")
    ap.add_argument("--memcpy-reps", type=int, default=3, help="memcpy repetitions per round")
    ap.add_argument("--cool", type=float, default=5.0, metavar="S",
                    help="before each migration wait 2 s + S s per GiB the driver freed "
                         "(at most 30 s) since each free, so that neither system inherits the "
                         "other's recently freed memory (default 5; 0 disables; see "
                         "BENCHMARKS.md)")
    ap.add_argument("--cold-mib", type=int, default=1024,
                    help="size of the cold first-touch memcpy reference, MiB (default 1024)")
    ap.add_argument("--settle", type=float, default=10.0, metavar="S",
                    help="wait up to S seconds for other work to quieten before each "
                         "measurement (default 10; 0 disables)")
    ap.add_argument("--settle-below", type=float, default=0.25, metavar="CORES")
    ap.add_argument("--keep-tmp", action="store_true", help="keep every process's output")
    ap.add_argument("--from-json", type=Path, metavar="FILE",
                    help="measure nothing: print the markdown (and write the plot with "
                         "--plot) of an earlier results file")
    a = ap.parse_args(argv)
    if a.from_json is None:
        a.case_list = [c.strip() for c in a.cases.split(",") if c.strip()]
        unknown = [c for c in a.case_list if c not in CASES]
        if unknown or not a.case_list:
            ap.error(f"unknown case(s) {', '.join(unknown) or '(none)'}; known: "
                     f"{', '.join(CASES)}")
        try:
            a.channel_list = [int(c) for c in a.channels.split(",") if c.strip()]
        except ValueError:
            ap.error("--channels takes numbers, like 1,2,4")
        if not a.channel_list or any(c < 1 for c in a.channel_list):
            ap.error("--channels: each count must be at least 1")
        if a.runs < 1:
            ap.error("--runs must be at least 1")
        if a.tcp_streams <= 0:
            a.tcp_streams = max(max(a.channel_list), 2)
    return a


def machine_info(ctx: Ctx, iperf3: str) -> dict:
    info = h.machine_info(ctx.ferry, iperf3)
    info["qemu"] = ctx.qemu
    info["qemu_version"] = h.first_line([ctx.qemu, "--version"])
    info["qemu_cpu"] = ctx.qemu_cpu
    info["ferry_channels"] = ctx.ferry_channels
    info["gcc"] = h.first_line(["gcc", "--version"])
    info["ld"] = h.first_line(["ld", "--version"])
    return info


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if a.from_json:
        results = json.loads(a.from_json.read_text())
        print(render_markdown(results), end="")
        if a.plot:
            a.plot.write_text(render_svg(results))
            log(f"wrote {a.plot}")
        return 0

    h.guard_children()

    started = _dt.datetime.now().astimezone()
    out = a.out or REPO / "bench" / "out" / f"compare-{started:%Y%m%d-%H%M%S}.json"
    plot = a.plot or out.with_suffix(".svg")
    ferry = h.pick_ferry(a.ferry, a.no_build)
    qemu = h.ensure_qemu(a.qemu)
    iperf3 = h.ensure_iperf3()
    floor = h.build_floor()
    h.ensure_gcc()
    tmp = Path(tempfile.mkdtemp(prefix="ferry-compare-"))
    image = h.build_guest(tmp)
    cpu = h.qemu_cpu_for_host(qemu, tmp, a.qemu_cpu)
    log(f"QEMU: {h.first_line([qemu, '--version'])}, -cpu {cpu['cpu']} ({cpu['how']})")
    ctx = Ctx(ferry=ferry, qemu=qemu, image=image, qemu_cpu=cpu["cpu"],
              ferry_channels=h.ferry_knows_channels(ferry), tmp=tmp,
              migrate_timeout=a.migrate_timeout, cool=a.cool, prealloc=a.prealloc,
              ferry_globals=tuple(a.ferry_global))
    if ctx.ferry_channels:
        log("ferry knows migration.multifd-channels: 1 channel = 0 (pages on the main "
            "connection), N = N multifd channels")
    else:
        log(f"note: {ferry} has no migration.multifd-channels property (see `ferry machines "
            f"ferry`); every ferry migration uses its one connection, whatever the channel "
            f"count of the case")
    machine = machine_info(ctx, iperf3)
    machine["qemu_cpu_probe"] = cpu
    if not machine["kvm_usable"]:
        log("warning: /dev/kvm is not usable; QEMU and ferry's KVM cases will fail")
    if machine["loadavg"] and float(machine["loadavg"][0]) > 0.5:
        log(f"warning: load average {machine['loadavg'][0]} on {machine['nproc']} CPUs before "
            f"starting: other work will show in the figures")

    variants = [variant_name(c, ch) for c in a.case_list for ch in a.channel_list]
    results: dict = {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(["python3", "bench/compare.py", *argv]),
        "args": {"runs": a.runs, "cases": a.case_list, "channels": a.channel_list,
                 "iperf_seconds": a.iperf_seconds, "tcp_streams": a.tcp_streams,
                 "memcpy_mib": a.memcpy_mib, "memcpy_reps": a.memcpy_reps,
                 "settle": a.settle, "settle_below": a.settle_below,
                 "migrate_timeout": a.migrate_timeout, "qemu_cpu": ctx.qemu_cpu,
                 "qemu_cpu_given": a.qemu_cpu, "qemu": a.qemu,
                 "prealloc": a.prealloc, "ferry_globals": a.ferry_global,
                 "cool": a.cool, "cold_mib": a.cold_mib},
        "cases": {c: vars(CASES[c]) for c in a.case_list},
        "machine": machine,
        "variants": variants,
        "rounds": [],
    }
    t_start = time.monotonic()
    failed = 0
    try:
        for rnd in range(1, a.runs + 1):
            rr: dict = {"round": rnd, "runs": []}
            results["rounds"].append(rr)
            tag = f"[run {rnd}/{a.runs}]"
            # The machine's limits around the cases: TCP first, memcpy last (it frees much
            # memory, and the cooling after it overlaps the next round's TCP).
            items: list = [(c, ch) for c in a.case_list for ch in a.channel_list]
            floors = ["floor1", "floorn"] if floor else []
            plan: list = ["tcp1", "tcpn", *floors, *items, "memcpy"]
            for k, item in enumerate(plan):
                quiet = h.settle(a.settle, a.settle_below) if a.settle > 0 else {}
                window = h.OtherLoad()
                if item in ("tcp1", "tcpn", "floor1", "floorn"):
                    n = 1 if item.endswith("1") else a.tcp_streams
                    if item.startswith("tcp"):
                        what = f"loopback TCP, {n} stream(s)"

                        def measure(n=n):
                            # 512 KiB writes and reads: a batch of ferry's pages.
                            r = h.ref_tcp(iperf3, a.iperf_seconds, tmp, streams=n,
                                          length="512K")
                            return r, f"{r['gbs']:.2f} GB/s"
                    else:
                        what = f"verified transfer alone, {n} stream(s)"

                        def measure(n=n):
                            r = h.ref_floor(floor, n)
                            return r, (f"{r['gbs']:.2f} GB/s, sender "
                                       f"{r['cpu_sender_s_per_gib']:.2f} receiver "
                                       f"{r['cpu_receiver_s_per_gib']:.2f} CPU s/GiB")
                    rr[item], bad = h.reference(tag, what, measure, quiet, window)
                    failed += bad
                    continue
                if item == "memcpy":
                    try:
                        r = h.ref_memcpy(a.memcpy_mib << 20, a.memcpy_reps)
                        freed_memory(3 * (a.memcpy_mib << 20))
                        r.update(ref_cold_copy(a.cold_mib << 20, a.cool))
                        log(f"{tag} memcpy: touched {r['touched_gbs']:.2f}, never-touched "
                            f"{r['fresh_gbs']:.2f}, never-touched+THP {r['fresh_thp_gbs']:.2f}, "
                            f"never-touched+THP cold {r['cold_thp_gbs']:.2f} GB/s")
                    except (OSError, ValueError) as e:
                        freed_memory(3 * (a.memcpy_mib << 20))
                        r = {"error": f"{type(e).__name__}: {e}"}
                        failed += 1
                        log(f"{tag} memcpy FAILED: {r['error']}")
                    r.update(quiet)
                    r["other_cores"] = window.cores()
                    rr["memcpy"] = r
                    continue
                case, ch = CASES[item[0]], item[1]
                # Alternate which system goes first, so neither always follows the other.
                order = ["ferry", "qemu"] if (rnd + k) % 2 else ["qemu", "ferry"]
                for i, system in enumerate(order):
                    if i:
                        quiet = h.settle(a.settle, a.settle_below) if a.settle > 0 else {}
                        window = h.OtherLoad()
                    fn = run_ferry if system == "ferry" else run_qemu
                    run = fn(ctx, case, ch, rnd)
                    d = vars(run)
                    d.update(quiet)
                    d["other_cores"] = window.cores()
                    rr["runs"].append(d)
                    label = f"{tag} {system:5} {run.variant}"
                    if run.ok:
                        m = run.metrics
                        rate = (f", guest {run.guest['passes_per_s']:.0f} passes/s"
                                if run.guest else "")
                        dt = m["downtime_ms"]
                        log(f"{label}: total {m['total_ms']:.0f} ms "
                            f"(reported {m['total_reported_ms']}), downtime "
                            f"{'–' if dt is None else f'{dt:.0f}'} ms "
                            f"(reported {m['downtime_reported_ms']}), "
                            f"{h.fmt_num(m['transferred_bytes'] or 0, 'bytes')}, "
                            f"CPU src {m['cpu_src_s']:.2f} s dst {m['cpu_dst_s']:.2f} s{rate}"
                            + "".join(f"; warning: {w}" for w in run.warnings)
                            + (f"; other load {d['other_cores']:.2f} cores"
                               if d["other_cores"] >= 0.25 else ""))
                    else:
                        failed += 1
                        log(f"{label} FAILED: {run.error}")
                h.write_json(out, results)
    except KeyboardInterrupt as e:
        results["interrupted"] = str(e) or "Ctrl-C"
        log(f"interrupted ({results['interrupted']}); stopping children, writing what was "
            f"measured")
    finally:
        h.reap_all()
        results["elapsed_s"] = round(time.monotonic() - t_start, 1)
        results["summary"] = summarise(results)
        h.write_json(out, results)
        try:
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot.write_text(render_svg(results))
        except OSError as e:
            log(f"could not write the plot {plot}: {e}")
        if a.keep_tmp:
            log(f"process logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out} and {plot} ({results['elapsed_s']:.0f} s of measuring)")
    if a.markdown:
        print(render_markdown(results), end="")
    if results.get("interrupted"):
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    h.run_main(main)
