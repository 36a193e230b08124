#!/usr/bin/env python3
"""Convergence under pressure: ferry and QEMU with a guest that outruns a 100 Mbit/s link.

    sudo python3 bench/converge.py [--rounds 3] [--cases none,auto-converge,dirty-limit-1]
                                   [--systems ferry,qemu] [--timeout 60] [--markdown]

The figures issue 15 asks for ("Figures to report"), side by side in one run. Two network
namespaces joined by a veth pair, both ends capped at 100 Mbit/s with `tc tbf` (as
crates/ferry-vmm/tests/common/netns.rs does), the source in one, the destination in the
other. The guest is a 1 GiB VM whose one vCPU rewrites 100 MiB (one byte per 4 KiB page)
at 25600 pages/s, about 100 MiB/s, eight times what the link carries, so no pass ever
shrinks the dirty set:

- ferry: `ferry run --backend kvm --mem 1G --dirty 100M --dirty-rate 25600` (soft when
  /dev/kvm is not usable), migrated with `ferry migrate --json --baseline 2 --dest-qmp`;
- QEMU: bench/guest/guest.S (built and run as bench/compare.py does), told the same rate
  ("dirty=100M rate=25600 tsc=HZ": it paces itself with rdtsc, 64 pages at a time, as
  ferry's guest reports every 64 pages to its VMM), migrated over QMP.

Cases, for both systems: `none` (no throttle: ferry cancels at its `x-ferry-timeout`, set
to --timeout; QEMU has no timeout, so the driver cancels it at the same time),
`auto-converge` (QEMU's defaults: initial 20 %, increment 10 %, max 99 %), `dirty-limit-N`
(the dirty-limit capability with `vcpu-dirty-limit` N MB/s; QEMU's default is 1; QEMU needs
the KVM dirty ring for it, so that case runs QEMU with `-accel kvm,dirty-ring-size=4096`).

Per run: converged or not, total time (the source's MIGRATION setup event to the
destination's MIGRATION completed event, as compare.py measures both), downtime (source
STOP to destination RESUME), passes (dirty syncs), the guest's pass rate before and during
the migration and its share, and for ferry whether memory verified (`x-ferry-verify` at the
destination, or at the source after a cancel; QEMU's guest cannot be checked that way, so
its row says whether the destination guest went on running). Medians over the rounds.

Needs root (namespaces, tc). Everything it makes is removed on any exit: processes by
process group (bench/harness.py), then the namespaces. Standard library only.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402  (processes, QMP, the QEMU guest, events, timings)
from harness import BenchError, Qmp, log, median, reap, spawn  # noqa: E402

REPO = h.REPO
SCHEMA = "ferry-bench-converge/1"
MiB = 1 << 20

MEM = "1G"
DIRTY = "100M"
RATE = 25600            # pages/s: 100 MiB/s
LINK_MBIT = 100
BASELINE_S = 2
T_BOOT = 120.0
T_QUIT = 20.0
POLL_S = 0.05

SRC_ADDR = "10.231.7.1"
DST_ADDR = "10.231.7.2"
PORT = 4444


# --------------------------------------------------------------------------------------------
# The link: two namespaces, a veth pair, tbf on both ends
# --------------------------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=30)
    if check and p.returncode != 0:
        raise BenchError(f"`ip {' '.join(args)}` failed: {p.stderr.strip()}")
    return p


class Link:
    def __init__(self, mbit: int):
        pid = os.getpid()
        self.src_ns, self.dst_ns = f"fcb{pid}s", f"fcb{pid}d"
        self.src_if, self.dst_if = f"cbs{pid}", f"cbd{pid}"
        self.made: list[str] = []
        try:
            for ns in (self.src_ns, self.dst_ns):
                _ip("netns", "add", ns)
                self.made.append(ns)
            _ip("link", "add", self.src_if, "netns", self.src_ns, "type", "veth", "peer",
                "name", self.dst_if, "netns", self.dst_ns)
            # A burst of 10 ms at the rate (a 1000 Hz clock must be able to refill it), as
            # the netns tests have it.
            burst = f"{max(mbit * 10, 32)}kbit"
            for ns, ifname, addr in ((self.src_ns, self.src_if, SRC_ADDR),
                                     (self.dst_ns, self.dst_if, DST_ADDR)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", ifname, "up")
                _ip("netns", "exec", ns, "tc", "qdisc", "add", "dev", ifname, "root", "tbf",
                    "rate", f"{mbit}mbit", "burst", burst, "latency", "400ms")
            self.tc = _ip("netns", "exec", self.src_ns, "tc", "qdisc", "show", "dev",
                          self.src_if).stdout.strip()
        except BaseException:
            self.remove()
            raise

    def exec(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.src_ns if side == "src" else self.dst_ns]

    def remove(self) -> None:
        for ns in self.made:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for p in pids:
                try:
                    os.kill(int(p), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
        self.made = []


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    auto_converge: bool = False
    dirty_limit: int | None = None  # MB/s


def case_of(name: str) -> Case:
    if name == "none":
        return Case(name, "no throttle")
    if name == "auto-converge":
        return Case(name, "auto-converge (QEMU defaults 20/+10, max 99)", auto_converge=True)
    m = re.fullmatch(r"dirty-limit-(\d+)", name)
    if m:
        return Case(name, f"dirty-limit {m.group(1)} MB/s", dirty_limit=int(m.group(1)))
    raise SystemExit(f"unknown case {name!r} (none, auto-converge, dirty-limit-N)")


@dataclass
class Run:
    system: str
    case: str
    round: int
    converged: bool = False
    status: str | None = None
    total_ms: float | None = None
    total_reported_ms: float | None = None
    downtime_ms: float | None = None
    downtime_reported_ms: float | None = None
    passes: int | None = None
    rate_before: float | None = None
    rate_during: float | None = None
    share_during: float | None = None
    verified: str | None = None
    throttle_peak: int | None = None
    why: str | None = None
    error: str | None = None
    detail: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def tsc_hz(tmp: Path) -> int:
    """The host's TSC frequency, measured against CLOCK_MONOTONIC over 0.5 s (the QEMU
    guest paces itself with rdtsc; KVM gives a guest the host's TSC rate)."""
    src = tmp / "tsc.c"
    src.write_text(r"""
#include <stdio.h>
#include <time.h>
#include <x86intrin.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
                          return t.tv_sec + t.tv_nsec / 1e9; }
int main(void) {
    double a = now(); unsigned long long x = __rdtsc();
    struct timespec d = {0, 500000000}; nanosleep(&d, 0);
    double b = now(); unsigned long long y = __rdtsc();
    printf("%.0f\n", (y - x) / (b - a));
    return 0;
}
""")
    exe = tmp / "tsc"
    subprocess.run(["gcc", "-O2", str(src), "-o", str(exe)], check=True, timeout=60)
    return int(subprocess.run([str(exe)], stdout=subprocess.PIPE, text=True, check=True,
                              timeout=10).stdout.strip())


def kvm_works() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
        return True
    except OSError:
        return False


def wait_dst_listening(link: Link, port: int, proc, who: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = subprocess.run(link.exec("dst") + ["ss", "-Hltn", f"sport = :{port}"],
                             stdout=subprocess.PIPE, text=True, timeout=10).stdout
        if out.strip():
            return
        if proc.poll() is not None:
            raise BenchError(f"{who} exited ({proc.returncode}) before listening")
        time.sleep(0.05)
    raise BenchError(f"{who} did not listen on {DST_ADDR}:{port} within {timeout:.0f} s")


def finish(q, proc, who, warnings):
    try:
        h.quit_and_wait(q, proc, who, warnings)
    finally:
        reap(proc)


# --------------------------------------------------------------------------------------------
# ferry
# --------------------------------------------------------------------------------------------


def run_ferry(ctx, case: Case, rnd: int) -> Run:
    r = Run("ferry", case.name, rnd)
    d = ctx.tmp / f"ferry-{case.name}-{rnd}"
    d.mkdir()
    props = ["-global", f"migration.x-ferry-timeout={ctx.timeout}"]
    if case.auto_converge:
        props += ["-global", "migration.auto-converge=on"]
    if case.dirty_limit is not None:
        props += ["-global", "migration.dirty-limit=on",
                  "-global", f"migration.vcpu-dirty-limit={case.dirty_limit}"]
    base = [str(ctx.ferry), "run", "--backend", ctx.backend, "--mem", MEM, "--dirty", DIRTY]
    dst_cmd = ctx.link.exec("dst") + base + ["--incoming", f"tcp:{DST_ADDR}:{PORT}",
                                              "--qmp", str(d / "dst.sock")]
    src_cmd = ctx.link.exec("src") + base + ["--dirty-rate", str(RATE), *props,
                                              "--qmp", str(d / "src.sock")]
    mig_cmd = [str(ctx.ferry), "migrate", "--qmp", str(d / "src.sock"),
               f"tcp:{DST_ADDR}:{PORT}", "--json", "--baseline", str(BASELINE_S),
               "--dest-qmp", str(d / "dst.sock")]
    r.detail["commands"] = [" ".join(c) for c in (dst_cmd, src_cmd, mig_cmd)]
    src = dst = mig = None
    qs = qd = None
    warnings: list[str] = []
    try:
        with open(d / "dst.out", "wb") as o, open(d / "dst.err", "wb") as e:
            dst = spawn(dst_cmd, stdin=subprocess.DEVNULL, stdout=o, stderr=e)
        with open(d / "src.out", "wb") as o, open(d / "src.err", "wb") as e:
            src = spawn(src_cmd, stdin=subprocess.DEVNULL, stdout=o, stderr=e)
        qs = Qmp.connect(d / "src.sock", src, "ferry source", d / "src.err", deadline=60)
        qd = Qmp.connect(d / "dst.sock", dst, "ferry destination", d / "dst.err", deadline=60)
        wait_dst_listening(ctx.link, PORT, dst, "ferry destination")
        h.wait_guest_ran(qs)
        with open(d / "migrate.out", "wb") as o, open(d / "migrate.err", "wb") as e:
            mig = spawn(mig_cmd, stdin=subprocess.DEVNULL, stdout=o, stderr=e)
        end = time.monotonic() + ctx.timeout + BASELINE_S + 60
        while mig.poll() is None:
            if time.monotonic() > end:
                try:
                    qs.execute("migrate_cancel")
                except BenchError:
                    pass
                raise BenchError(f"ferry migrate still running {end:.0f} s in (cancelled)")
            time.sleep(POLL_S)
        objs = []
        for line in (d / "migrate.out").read_text(errors="replace").splitlines():
            if line.strip().startswith("{"):
                try:
                    objs.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        if not objs:
            raise BenchError(f"ferry migrate (exit {mig.returncode}) printed no JSON: "
                             f"{h.tail(d / 'migrate.err')}")
        info = objs[-1]
        r.detail["final"] = info
        r.status = info.get("status")
        r.converged = r.status == "completed" and mig.returncode == 0
        whys = [(o.get("convergence") or {}).get("why") for o in objs]
        whys = [w for w in whys if w]
        r.why = whys[-1] if whys else None
        r.error = info.get("error-desc") if not r.converged else None
        r.total_reported_ms = info.get("total-time")
        r.downtime_reported_ms = info.get("downtime")
        passes = info.get("passes") or []
        r.passes = len(passes) or (info.get("ram") or {}).get("dirty-sync-count")
        peaks = [p.get("cpu-throttle-percent") for p in passes if p.get("cpu-throttle-percent")]
        r.throttle_peak = max(peaks) if peaks else None
        r.detail["dirty_limited_passes"] = sum(1 for p in passes if p.get("dirty-limited"))
        r.detail["dirty-limit-throttle-time-per-round"] = info.get(
            "dirty-limit-throttle-time-per-round")
        gp = info.get("guest-progress") or {}
        r.detail["guest-progress"] = {k: v for k, v in gp.items() if k != "samples"}
        r.rate_before, r.rate_during = gp.get("before"), gp.get("during")
        # ferry reports the share in per cent.
        if gp.get("during-share") is not None:
            r.share_during = gp["during-share"] / 100
        if r.converged:
            r.total_ms = h.start_to_done_ms(qs, qd) or r.total_reported_ms
            r.downtime_ms = h.stop_resume_ms(qs, qd) or r.downtime_reported_ms
            r.verified = verify(qd, "destination")
        else:
            st = qs.execute("query-status").get("status")
            r.detail["source_status_after"] = st
            r.verified = f"source {st}, " + verify(qs, "source")
    except BenchError as e:
        r.error = str(e)
        r.detail["src_stderr"] = h.tail(d / "src.err")
        r.detail["dst_stderr"] = h.tail(d / "dst.err")
        r.detail["migrate_stderr"] = h.tail(d / "migrate.err")
    finally:
        reap(mig)
        finish(qs, src, "ferry source", warnings)
        finish(qd, dst, "ferry destination", warnings)
        r.detail["warnings"] = warnings
    return r


def verify(q: Qmp, where: str) -> str:
    try:
        rep = q.execute("x-ferry-verify")
    except BenchError as e:
        return f"verify failed: {e}"
    checked, wrong = rep.get("pages-checked"), rep.get("pages-wrong")
    if checked and wrong == 0:
        return f"verified ({checked} pages)"
    return f"NOT verified at the {where}: {checked} pages checked, {wrong} wrong"


# --------------------------------------------------------------------------------------------
# QEMU
# --------------------------------------------------------------------------------------------


class Dots:
    """The QEMU guest's passes ('.' after "loop\\n" on its serial file), with the time each
    was seen (polled), so a rate can be taken between two passes."""

    def __init__(self, path: Path):
        self.s = h.SerialLog(path)
        self.seen: list[tuple[float, int]] = []

    def poll(self) -> int:
        self.s.poll()
        now = time.monotonic()
        if not self.seen or self.seen[-1][1] != self.s.passes:
            self.seen.append((now, self.s.passes))
        return self.s.passes

    def rate(self, t0: float, t1: float) -> float | None:
        """Passes per second between the first and the last pass seen in [t0, t1]."""
        pts = [(t, n) for t, n in self.seen if t0 <= t <= t1]
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return None
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


def qemu_cmd(ctx, case: Case, d: Path, side: str) -> list[str]:
    accel = "kvm,dirty-ring-size=4096" if case.dirty_limit is not None else "kvm"
    cmd = ctx.link.exec(side) + [
        ctx.qemu, "-name", f"converge-{side},debug-threads=on", "-machine", "pc",
        "-accel", accel, "-cpu", ctx.qemu_cpu, "-m", "1024", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"file:{d / (side + '.serial')}",
        "-qmp", f"unix:{d / (side + '.qmp')},server=on,wait=off",
        "-kernel", str(ctx.image),
        "-append", f"dirty={DIRTY} rate={RATE} tsc={ctx.tsc_hz}"]
    if side == "dst":
        cmd += ["-incoming", "defer"]
    return cmd


def run_qemu(ctx, case: Case, rnd: int) -> Run:
    r = Run("qemu", case.name, rnd)
    d = ctx.tmp / f"qemu-{case.name}-{rnd}"
    d.mkdir()
    src_cmd, dst_cmd = qemu_cmd(ctx, case, d, "src"), qemu_cmd(ctx, case, d, "dst")
    r.detail["commands"] = [" ".join(dst_cmd), " ".join(src_cmd)]
    src = dst = qs = qd = None
    warnings: list[str] = []
    dots = Dots(d / "src.serial")
    try:
        with open(d / "dst.err", "wb") as e:
            dst = spawn(dst_cmd, stdin=subprocess.DEVNULL, stdout=e, stderr=subprocess.STDOUT)
        with open(d / "src.err", "wb") as e:
            src = spawn(src_cmd, stdin=subprocess.DEVNULL, stdout=e, stderr=subprocess.STDOUT)
        qs = Qmp.connect(d / "src.qmp", src, "QEMU source", d / "src.err", deadline=60)
        qd = Qmp.connect(d / "dst.qmp", dst, "QEMU destination", d / "dst.err", deadline=60)
        r.detail["qemu_version"] = qs.greeting.get("version", {}).get("qemu")
        end = time.monotonic() + T_BOOT
        while dots.poll() < 2:
            if dots.s.has(b"error:") or dots.s.has(b"!fault"):
                raise BenchError(f"QEMU guest: {dots.s.text.decode(errors='replace')}")
            if src.poll() is not None:
                raise BenchError(f"QEMU source exited ({src.returncode}): "
                                 f"{h.tail(d / 'src.err')}")
            if time.monotonic() > end:
                raise BenchError(f"QEMU guest made no 2 passes in {T_BOOT:.0f} s")
            time.sleep(0.01)
        caps = [{"capability": "events", "state": True}]
        if case.auto_converge:
            caps.append({"capability": "auto-converge", "state": True})
        if case.dirty_limit is not None:
            caps.append({"capability": "dirty-limit", "state": True})
        for q in (qs, qd):
            q.execute("migrate-set-capabilities", {"capabilities": [caps[0]]})
        qs.execute("migrate-set-capabilities", {"capabilities": caps})
        params: dict = {"max-bandwidth": 1 << 40}  # no cap: the link is the limit
        if ctx.qemu_switchover_bw:
            params["avail-switchover-bandwidth"] = ctx.qemu_switchover_bw
        if case.dirty_limit is not None:
            params["vcpu-dirty-limit"] = case.dirty_limit
        qs.execute("migrate-set-parameters", params)
        r.detail["parameters"] = qs.execute("query-migrate-parameters")
        qd.execute("migrate-incoming", {"uri": f"tcp:{DST_ADDR}:{PORT}"})
        wait_dst_listening(ctx.link, PORT, dst, "QEMU destination")
        # Baseline: the guest's pass rate over BASELINE_S (+ a pass on each side).
        t0 = time.monotonic()
        while time.monotonic() - t0 < BASELINE_S + 1.2:
            dots.poll()
            time.sleep(0.01)
        tb = time.monotonic()
        r.rate_before = dots.rate(t0, tb)
        n_start, t_start = dots.poll(), time.monotonic()
        qs.execute("migrate", {"uri": f"tcp:{DST_ADDR}:{PORT}"})
        end = t_start + ctx.timeout
        peak = 0
        info = {}
        while True:
            dots.poll()
            info = qs.execute("query-migrate")
            st = info.get("status")
            peak = max(peak, info.get("cpu-throttle-percentage") or 0)
            if st == "completed":
                for _ in range(100):
                    if info.get("total-time"):
                        break
                    time.sleep(0.01)
                    info = qs.execute("query-migrate")
                break
            if st in ("failed", "cancelled"):
                break
            if time.monotonic() > end:
                r.detail["at_timeout"] = info
                qs.execute("migrate_cancel")
                cend = time.monotonic() + 30
                while qs.execute("query-migrate").get("status") not in ("cancelled", "failed"):
                    if time.monotonic() > cend:
                        break
                    time.sleep(0.05)
                info = qs.execute("query-migrate")
                break
            time.sleep(POLL_S)
        t_end = time.monotonic()
        n_end = dots.poll()
        r.detail["final"] = info
        r.status = info.get("status")
        r.converged = r.status == "completed"
        r.throttle_peak = peak or None
        ram = info.get("ram") or {}
        r.passes = ram.get("dirty-sync-count") or (r.detail.get("at_timeout") or {}).get(
            "ram", {}).get("dirty-sync-count")
        r.total_reported_ms = info.get("total-time")
        r.downtime_reported_ms = info.get("downtime")
        if r.converged:
            cend = time.monotonic() + 10
            while not h.dst_completed(qd) and time.monotonic() < cend:
                time.sleep(0.02)
            r.total_ms = h.start_to_done_ms(qs, qd) or r.total_reported_ms
            r.downtime_ms = h.stop_resume_ms(qs, qd) or r.downtime_reported_ms
            ds = h.SerialLog(d / "dst.serial")
            ds.poll()
            o0 = ds.offset
            time.sleep(1.5)
            ds.poll()
            r.verified = ("not checkable; destination guest runs on"
                          if ds.offset > o0 else "destination guest printed no pass in 1.5 s")
        else:
            ai = r.detail.get("at_timeout") or info
            r.error = (info.get("error-desc") or
                       f"no convergence in {ctx.timeout} s (the driver cancelled it; "
                       f"expected-downtime {ai.get('expected-downtime')} ms, remaining "
                       f"{(ai.get('ram') or {}).get('remaining')} B)")
            st = qs.execute("query-status").get("status")
            r.verified = f"source {st}"
        ran_s = (t_end - t_start) - (r.downtime_ms or 0) / 1e3
        if ran_s > 0:
            r.rate_during = (n_end - n_start) / ran_s
        if r.rate_before and r.rate_during is not None:
            r.share_during = r.rate_during / r.rate_before
        r.detail["passes_during"] = n_end - n_start
    except BenchError as e:
        r.error = str(e)
        r.detail["src_stderr"] = h.tail(d / "src.err")
        r.detail["dst_stderr"] = h.tail(d / "dst.err")
    finally:
        finish(qs, src, "QEMU source", warnings)
        finish(qd, dst, "QEMU destination", warnings)
        r.detail["warnings"] = warnings
    return r


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def fmt_s(ms):
    return "–" if ms is None else f"{ms / 1e3:.1f} s"


def fmt_ms(ms):
    return "–" if ms is None else f"{ms:.0f} ms"


def fmt_pct(x):
    return "–" if x is None else f"{100 * x:.0f} %"


def summarise(runs: list[Run], systems, cases) -> list[dict]:
    rows = []
    for c in cases:
        for s in systems:
            mine = [r for r in runs if r.system == s and r.case == c]
            if not mine:
                continue
            conv = sum(r.converged for r in mine)
            ok = [r for r in mine if r.converged] or mine
            rows.append({
                "case": c, "system": s, "runs": len(mine), "converged": conv,
                "total_ms": median([r.total_ms if r.converged else None for r in ok]),
                "downtime_ms": median([r.downtime_ms for r in ok]),
                "passes": median([r.passes for r in ok]),
                "rate_before": median([r.rate_before for r in mine]),
                "rate_during": median([r.rate_during for r in mine]),
                "share_during": median([r.share_during for r in mine]),
                "throttle_peak": median([r.throttle_peak for r in mine]),
                "verified": sorted({r.verified or "–" for r in mine}),
                "errors": sorted({(r.error or "")[:300] for r in mine if r.error}),
            })
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| case | system | converged | time to converge | downtime | passes "
           "| guest rate before → during | during, % of before | memory |",
           "|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        rb, rd = x["rate_before"], x["rate_during"]
        rates = "–" if rb is None else f"{rb:.2f} → {'–' if rd is None else f'{rd:.2f}'}/s"
        passes = "–" if x["passes"] is None else f"{x['passes']:.0f}"
        out.append(
            f"| {x['case']} | {x['system']} | {x['converged']}/{x['runs']} "
            f"| {fmt_s(x['total_ms'])} | {fmt_ms(x['downtime_ms'])} | {passes} | {rates} "
            f"| {fmt_pct(x['share_during'])} | {'; '.join(x['verified'])} |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    ferry: Path
    backend: str
    qemu: str | None
    qemu_cpu: str | None
    image: Path | None
    tsc_hz: int
    link: Link
    tmp: Path
    timeout: int
    qemu_switchover_bw: int = 0


def main(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default="none,auto-converge,dirty-limit-1,dirty-limit-5")
    ap.add_argument("--systems", default="ferry,qemu")
    ap.add_argument("--timeout", type=int, default=60,
                    help="seconds: ferry's x-ferry-timeout, and when the driver cancels QEMU")
    ap.add_argument("--ferry", type=Path, default=h.default_ferry())
    ap.add_argument("--qemu", default=None, metavar="PATH",
                    help="qemu-system-x86_64 to use, whatever its version (default: QEMU 10.0 "
                         "or newer, installed as bench/compare.py does if missing)")
    ap.add_argument("--qemu-cpu", default=None, metavar="CPU",
                    help="QEMU -cpu (default: host, or host,-arch-capabilities where `host` "
                         "dies on an MSR, as on PVM hosts (MSR 0x10a); probed at the start)")
    ap.add_argument("--qemu-switchover-bw", type=int, default=0, metavar="BYTES_PER_S",
                    help="QEMU's avail-switchover-bandwidth (0: QEMU's default, its own "
                         "estimate of the bandwidth)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    cases = [case_of(c) for c in a.cases.split(",") if c]
    systems = [s for s in a.systems.split(",") if s]

    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        print("skipped: needs root and iproute2 (ip, tc) for the namespaces and the link")
        return 0
    if "ferry" in systems and not a.ferry.exists():
        raise SystemExit(f"{a.ferry} not found: cargo build --release -p ferry-vmm")
    backend = "kvm" if kvm_works() else "soft"
    qemu = image = None
    tmp = Path(tempfile.mkdtemp(prefix="ferry-converge-"))
    hz = 0
    cpu: dict = {"cpu": a.qemu_cpu, "how": "unused", "probes": []}
    if "qemu" in systems:
        if backend != "kvm":
            log("/dev/kvm not usable: QEMU rows skipped")
            systems.remove("qemu")
        else:
            qemu = h.ensure_qemu(a.qemu)
            h.ensure_gcc()
            image = h.build_guest(tmp)
            hz = tsc_hz(tmp)
            cpu = h.qemu_cpu_for_host(qemu, tmp, a.qemu_cpu)
            log(f"QEMU: {h.first_line([qemu, '--version'])}, -cpu {cpu['cpu']} "
                f"({cpu['how']})")
    try:
        link = Link(LINK_MBIT)
    except BenchError as e:
        print(f"skipped: could not make the namespaces and the link: {e}")
        return 0
    atexit.register(link.remove)
    h.guard_children(sigint=False)
    ctx = Ctx(a.ferry, backend, qemu, cpu["cpu"], image, hz, link, tmp, a.timeout,
              a.qemu_switchover_bw)
    started = _dt.datetime.now()
    machine = {
        "nproc": os.cpu_count(), "kernel": os.uname().release,
        "kvm_modules": sorted(m for m in ("kvm_pvm", "kvm_intel", "kvm_amd")
                              if Path("/sys/module", m).exists()),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "git_commit": h.first_line(["git", "rev-parse", "HEAD"], REPO),
        "ferry_backend": backend,
        "qemu_version": h.first_line([qemu, "--version"]) if qemu else None,
        "qemu_cpu": cpu["cpu"], "qemu_cpu_probe": cpu,
        "tsc_hz": hz or None, "link": link.tc,
    }
    log(f"link: {link.tc}; ferry backend {backend}; TSC {hz / 1e9:.3f} GHz")
    runs: list[Run] = []
    try:
        for rnd in range(a.rounds):
            order = systems if rnd % 2 == 0 else list(reversed(systems))
            for c in cases:
                for s in order:
                    log(f"round {rnd + 1}/{a.rounds}: {s} {c.name} ...")
                    r = (run_ferry if s == "ferry" else run_qemu)(ctx, c, rnd)
                    runs.append(r)
                    log(f"  {'converged' if r.converged else 'NOT converged'}"
                        f" total {fmt_s(r.total_ms)} downtime {fmt_ms(r.downtime_ms)}"
                        f" passes {r.passes} share {fmt_pct(r.share_during)}"
                        f" throttle {r.throttle_peak} memory {r.verified}"
                        + (f"\n  error: {r.error}" if r.error else "")
                        + (f"\n  why: {r.why}" if r.why else ""))
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
    finally:
        h.reap_all()
        link.remove()
    rows = summarise(runs, systems, [c.name for c in cases])
    results = {
        "schema": SCHEMA, "started": started.isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "args": {"rounds": a.rounds, "cases": [c.name for c in cases], "systems": systems,
                 "timeout_s": a.timeout, "mem": MEM, "dirty": DIRTY, "rate_pages_s": RATE,
                 "link_mbit": LINK_MBIT, "baseline_s": BASELINE_S,
                 "qemu_avail_switchover_bandwidth": a.qemu_switchover_bw},
        "machine": machine, "summary": rows,
        "runs": [r.__dict__ for r in runs],
    }
    out = a.out or REPO / "bench" / "results" / f"converge-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    log(f"results: {out}")
    md = markdown(rows)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
