#!/usr/bin/env python3
"""Migration benchmarks for ferry, side by side with references taken in the same run.

    python3 bench/migration.py [--runs 3] [--cases a,b,...] [--out FILE.json] [--markdown]

Each run (round) measures, in this order: single-stream loopback TCP with iperf3, the first
ferry case, memcpy into touched and never-touched memory, then the remaining ferry cases. The
references sit between the cases so that a machine busy with something else shows up in them
too. Figures are medians over the rounds with min-max.

A ferry case is two `ferry run` processes on this machine (a destination listening on
tcp:127.0.0.1:0, then a source), `ferry migrate --json` between them, and `quit` to both over
QMP. Nothing here asserts a timing: this prints figures (DESIGN.md section 6).

Only the Python 3.11 standard library is used. Every child runs in its own session (so Ctrl-C
reaches this script, not them) with a parent-death signal, and is killed by process group on
the way out: normal exit, exception, Ctrl-C, SIGTERM or SIGHUP. Units: GB = 1e9 bytes,
GiB = 2^30 bytes.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import datetime as _dt
import json
import mmap
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCHEMA = "ferry-bench-migration/1"
URI_PREFIX = "listening for an incoming migration on "
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    backend: str
    src: tuple[str, ...]
    dst: tuple[str, ...]
    # Wait for the source guest to have run before migrating.
    live: bool
    # What the destination's query-status should say afterwards.
    dst_status: str
    # Whether pass-0 throughput is compared with single-stream loopback TCP.
    tcp_ratio: bool = False
    what: str = ""


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case(
            "paused-4g",
            "soft",
            ("--mem", "4G", "--dirty", "0", "--fill", "1G", "-S"),
            ("--mem", "4G", "--dirty", "0"),
            live=False,
            dst_status="paused",
            tcp_ratio=True,
            what="stopped guest, 1 GiB of incompressible data in 4 GiB: raw send/receive speed",
        ),
        Case(
            "idle-8g",
            "soft",
            ("--mem", "8G", "--dirty", "0"),
            ("--mem", "8G", "--dirty", "0"),
            live=False,
            dst_status="running",
            what="8 GiB never touched: fixed costs and the cost of untouched memory",
        ),
        Case(
            "kvm-live-1g",
            "kvm",
            ("--mem", "1G", "--dirty", "100M"),
            ("--mem", "1G", "--dirty", "100M"),
            live=True,
            dst_status="running",
            what="running KVM guest dirtying 100 MiB per pass: iteration and convergence",
        ),
        Case(
            "kvm-live-1g-2vcpu",
            "kvm",
            ("--mem", "1G", "--vcpus", "2", "--dirty", "50M"),
            ("--mem", "1G", "--vcpus", "2", "--dirty", "50M"),
            live=True,
            dst_status="running",
            what="as kvm-live-1g with 2 vCPUs (2 x 50 MiB) on a 2-core host: CPU contention",
        ),
        Case(
            "kvm-live-4g",
            "kvm",
            ("--mem", "4G", "--dirty", "1G"),
            ("--mem", "4G", "--dirty", "1G"),
            live=True,
            dst_status="running",
            what="running KVM guest dirtying 1 GiB per pass: a large working set",
        ),
    ]
}

# Timeouts, seconds.
T_URI = 60.0
T_QMP = 120.0
T_GUEST = 60.0
T_MIGRATE = 300.0
T_QUIT = 20.0
GUEST_RUN_S = 1.0


class BenchError(Exception):
    """A measurement that could not be taken; the message says why."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Child processes: never leave one behind
# --------------------------------------------------------------------------------------------

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
_LIVE: list[subprocess.Popen] = []


def _child_setup(parent: int) -> None:
    # Runs in the child between fork and exec. start_new_session already made it a session
    # (and process group) leader, so Ctrl-C on the terminal does not reach it and killpg()
    # takes whatever it spawns too. The death signal covers this script being SIGKILLed.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def spawn(cmd: list[str], **kw) -> subprocess.Popen:
    parent = os.getpid()
    p = subprocess.Popen(
        cmd,
        start_new_session=True,
        preexec_fn=lambda: _child_setup(parent),
        **kw,
    )
    _LIVE.append(p)
    return p


def reap(p: subprocess.Popen | None, grace: float = 3.0) -> None:
    """Ends `p` and its process group: SIGTERM, then SIGKILL after `grace` seconds."""
    if p is None:
        return
    try:
        if p.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Once the leader has been waited for, its pid (and so the group id) may belong to
        # someone else: never signal it again. Nothing ferry or iperf3 starts outlives them.
    finally:
        if p in _LIVE:
            _LIVE.remove(p)


def reap_all() -> None:
    for p in list(_LIVE):
        reap(p, grace=1.0)


def run_tracked(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run, but the child is in the registry and killed by group on timeout."""
    p = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        reap(p, grace=1.0)
        raise BenchError(f"{Path(cmd[0]).name} {cmd[1] if len(cmd) > 1 else ''} "
                         f"did not finish within {timeout:.0f} s")
    finally:
        reap(p)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


# --------------------------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------------------------


def _cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process in seconds, all its threads, not its children."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    # comm may hold spaces and parentheses: fields start after the last ')'.
    rest = s[s.rindex(")") + 2:].split()
    return int(rest[11]) / CLK_TCK, int(rest[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, seconds."""
    u, s = _cpu_split(pid)
    return round(u + s, 3)


def peak_rss(pid: int) -> int | None:
    """VmHWM of a process, bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_busy_s() -> float:
    """CPU seconds all CPUs spent busy since boot (user, nice, system, irq, softirq; guest
    time is inside user)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK


def own_cpu_s() -> float:
    """CPU seconds of this script and every child it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """How busy the machine was with work that is not this benchmark's, during a window.

    Busy CPU time of the whole machine minus that of this script and its (reaped) children,
    divided by the window's length: the average number of cores something else used. Every
    child must have been waited for before `cores()` is called.
    """

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = host_busy_s()
        self.own0 = own_cpu_s()

    def cores(self) -> float:
        wall = max(time.monotonic() - self.t0, 1e-3)
        other = (host_busy_s() - self.busy0) - (own_cpu_s() - self.own0)
        return round(max(other, 0.0) / wall, 3)


def settle(max_wait: float, threshold: float, sample: float = 0.5) -> dict:
    """Waits up to `max_wait` seconds for a `sample`-long stretch in which other work used
    less than `threshold` cores."""
    t0 = time.monotonic()
    while True:
        w = OtherLoad()
        time.sleep(sample)
        c = w.cores()
        waited = time.monotonic() - t0
        if c < threshold or waited >= max_wait:
            return {"settle_waited_s": round(waited, 2), "other_cores_at_start": c}


def tcp_listening(port: int) -> bool:
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            continue
    return False


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------------------------
# QMP
# --------------------------------------------------------------------------------------------


class Qmp:
    """A QMP client over a unix socket: greeting, qmp_capabilities, then commands.

    Replies and events are JSON texts, one per line ending in CRLF. Events that arrive while
    waiting for a reply are kept in `events` and skipped.
    """

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock = sock
        self.timeout = timeout
        self.buf = bytearray()
        self.next_id = 0
        self.events: list[dict] = []
        sock.settimeout(timeout)
        greeting = self._read()
        if greeting is None or "QMP" not in greeting:
            raise BenchError(f"no QMP greeting, got {greeting!r}")
        self.greeting = greeting["QMP"]
        self.execute("qmp_capabilities")

    @classmethod
    def connect(cls, path: Path, proc: subprocess.Popen, who: str, log_path: Path,
                deadline: float = T_QMP, timeout: float = 30.0) -> "Qmp":
        """Connects once `path` accepts, failing early if `proc` exits first."""
        end = time.monotonic() + deadline
        last: Exception | None = None
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise BenchError(f"{who} exited with status {proc.returncode} before its QMP "
                                 f"socket was up:\n{tail(log_path)}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                last = e
                time.sleep(0.02)
                continue
            return cls(s, timeout)
        raise BenchError(f"{who}: QMP socket {path} not up after {deadline:.0f} s ({last})")

    def _read(self) -> dict | None:
        """One JSON text, or None at end of stream."""
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl]).strip()
                del self.buf[: nl + 1]
                if not line:
                    continue
                return json.loads(line)
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk

    def execute(self, command: str, arguments: dict | None = None):
        self.next_id += 1
        req: dict = {"execute": command, "id": self.next_id}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\r\n")
        while True:
            msg = self._read()
            if msg is None:
                raise BenchError(f"QMP connection closed while waiting for {command!r}")
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id", self.next_id) != self.next_id:
                continue
            if "error" in msg:
                err = msg["error"]
                raise BenchError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")
            if "return" in msg:
                return msg["return"]

    def quit(self) -> None:
        """Sends `quit`. The process may exit before the reply is written: EOF counts too."""
        try:
            self.execute("quit")
        except (BenchError, ConnectionError, socket.timeout, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ref_tcp(iperf3: str, seconds: int, tmp: Path, streams: int = 1,
            length: str | None = None) -> dict:
    """Loopback TCP with iperf3 over `streams` parallel connections (-P), receiver's figure
    summed over them. `length` is iperf3's -l, the size of each write and read (iperf3's
    default for TCP is 128 KiB)."""
    last_err = ""
    for _attempt in range(3):
        port = free_port()
        err_path = tmp / f"iperf3-server-{port}.log"
        with open(err_path, "wb") as errf:
            server = spawn([iperf3, "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf)
        try:
            end = time.monotonic() + 10
            while not tcp_listening(port):
                if server.poll() is not None or time.monotonic() > end:
                    break
                time.sleep(0.02)
            if not tcp_listening(port):
                last_err = f"iperf3 server did not listen on port {port}: {tail(err_path)}"
                continue
            r = run_tracked([iperf3, "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds),
                             "-P", str(streams), *(["-l", length] if length else []),
                             "-J"],
                            timeout=seconds + 30, stdin=subprocess.DEVNULL)
            try:
                j = json.loads(r.stdout)
            except json.JSONDecodeError:
                raise BenchError(f"iperf3 client printed no JSON (exit {r.returncode}): "
                                 f"{r.stderr.strip() or r.stdout.strip()[:300]}")
            if "error" in j:
                raise BenchError(f"iperf3: {j['error']}")
            recv = j["end"]["sum_received"]
            sent = j["end"]["sum_sent"]
            cpu = j["end"].get("cpu_utilization_percent", {})
            return {
                "streams": streams,
                "length": length,
                "gbs": recv["bits_per_second"] / 8 / 1e9,
                "sent_gbs": sent["bits_per_second"] / 8 / 1e9,
                "bytes": recv["bytes"],
                "seconds": recv["seconds"],
                "retransmits": sent.get("retransmits"),
                "cpu_sender_pct": cpu.get("host_total"),
                "cpu_receiver_pct": cpu.get("remote_total"),
            }
        finally:
            reap(server, grace=1.0)
    raise BenchError(last_err)


def _buffer(size: int, hugepage: bool = False) -> tuple[mmap.mmap, object, int]:
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hugepage:
        m.madvise(mmap.MADV_HUGEPAGE)
    else:
        # Whatever the THP setting, measure 4 KiB first-touch faults, as a plain mmap'd
        # guest RAM gets them under THP=madvise (this machine's setting).
        m.madvise(mmap.MADV_NOHUGEPAGE)
    view = (ctypes.c_char * size).from_buffer(m)
    return m, view, ctypes.addressof(view)


def ref_memcpy(size: int, reps: int) -> dict:
    """memcpy (glibc memmove through ctypes) of `size` bytes, GB/s, median of `reps`.

    touched: into a buffer written beforehand (page faults out of the picture);
    fresh: into a new anonymous mapping each time (the copy takes every first-touch fault);
    fresh_thp: the same with MADV_HUGEPAGE.
    """
    out: dict = {"size": size, "reps": reps}
    src, src_v, src_a = _buffer(size)
    dst, dst_v, dst_a = _buffer(size)
    try:
        ctypes.memset(src_a, 0x5A, size)
        ctypes.memset(dst_a, 0x01, size)
        ctypes.memmove(dst_a, src_a, size)  # warm up
        samples = []
        for _ in range(reps):
            t = time.perf_counter()
            ctypes.memmove(dst_a, src_a, size)
            samples.append(size / (time.perf_counter() - t) / 1e9)
        out["touched_gbs"] = statistics.median(samples)
        out["touched_samples"] = samples
        del dst_v
        dst.close()
        for key, huge in (("fresh", False), ("fresh_thp", True)):
            samples = []
            for _ in range(reps):
                m, v, a = _buffer(size, hugepage=huge)
                try:
                    t = time.perf_counter()
                    ctypes.memmove(a, src_a, size)
                    samples.append(size / (time.perf_counter() - t) / 1e9)
                finally:
                    del v
                    m.close()
            out[f"{key}_gbs"] = statistics.median(samples)
            out[f"{key}_samples"] = samples
    finally:
        del src_v
        src.close()
        if not dst.closed:
            dst.close()
    return out


# --------------------------------------------------------------------------------------------
# A ferry case
# --------------------------------------------------------------------------------------------


def wait_uri(path: Path, proc: subprocess.Popen, err_path: Path) -> str:
    end = time.monotonic() + T_URI
    while time.monotonic() < end:
        try:
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(URI_PREFIX):
                    return line[len(URI_PREFIX):].strip()
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            raise BenchError(f"destination exited with status {proc.returncode} before "
                             f"listening:\n{tail(err_path)}")
        time.sleep(0.02)
    raise BenchError(f"destination printed no '{URI_PREFIX.strip()}' line in {T_URI:.0f} s")


def wait_guest_ran(q: Qmp) -> dict:
    """Polls x-ferry-guest until the guest has run GUEST_RUN_S seconds and every vCPU has
    finished at least one pass of its workload (so its working set is in memory)."""
    start = time.monotonic()
    running_since = None
    first: list[int] | None = None
    while True:
        now = time.monotonic()
        rep = q.execute("x-ferry-guest")
        passes = [int(p) for p in rep.get("passes", [])]
        if rep.get("running") and running_since is None:
            running_since = now
            first = passes
        if (running_since is not None and now - running_since >= GUEST_RUN_S
                and passes and min(passes) >= 1):
            return {
                "waited_s": round(now - start, 3),
                "guest_passes": passes,
                "guest_passes_in_window": [b - a for a, b in zip(first or passes, passes)],
            }
        if now - start > T_GUEST:
            raise BenchError(f"source guest did not run a full pass within {T_GUEST:.0f} s "
                             f"(passes {passes}, running {rep.get('running')})")
        time.sleep(0.05)


def ferry_cmd(ferry: Path, case: Case, side_args: tuple[str, ...], sock: Path,
              incoming: bool) -> list[str]:
    cmd = [str(ferry), "run", "--backend", case.backend, *side_args]
    if incoming:
        cmd += ["--incoming", "tcp:127.0.0.1:0"]
    return cmd + ["--qmp", str(sock)]


def quit_and_wait(q: Qmp | None, proc: subprocess.Popen | None, who: str,
                  warnings: list[str]) -> None:
    if proc is None:
        return
    if q is not None:
        q.quit()
    try:
        proc.wait(timeout=T_QUIT)
    except subprocess.TimeoutExpired:
        warnings.append(f"{who} did not exit within {T_QUIT:.0f} s of quit; killed")
    finally:
        reap(proc)
    if proc.returncode not in (0, None, -signal.SIGTERM, -signal.SIGKILL):
        warnings.append(f"{who} exited with status {proc.returncode}")


def run_case(ferry: Path, case: Case, tmp: Path, round_no: int) -> dict:
    d = tmp / f"{case.name}-{round_no}"
    d.mkdir()
    res: dict = {"case": case.name, "round": round_no, "ok": False,
                 "loadavg_before": loadavg(), "warnings": []}
    warnings: list[str] = res["warnings"]
    src = dst = None
    qs = qd = None
    interrupted = False
    t0 = time.monotonic()
    try:
        with open(d / "dst.out", "wb") as o, open(d / "dst.err", "wb") as e:
            dst = spawn(ferry_cmd(ferry, case, case.dst, d / "dst.sock", True),
                        stdin=subprocess.DEVNULL, stdout=o, stderr=e)
        uri = wait_uri(d / "dst.out", dst, d / "dst.err")
        res["uri"] = uri
        with open(d / "src.out", "wb") as o, open(d / "src.err", "wb") as e:
            src = spawn(ferry_cmd(ferry, case, case.src, d / "src.sock", False),
                        stdin=subprocess.DEVNULL, stdout=o, stderr=e)
        qs = Qmp.connect(d / "src.sock", src, "source", d / "src.err")
        qd = Qmp.connect(d / "dst.sock", dst, "destination", d / "dst.err")
        res["startup_s"] = round(time.monotonic() - t0, 3)
        if case.live:
            res.update(wait_guest_ran(qs))

        cpu0 = (cpu_seconds(src.pid), cpu_seconds(dst.pid))
        sys0_dst = _cpu_split(dst.pid)[1]
        t_mig = time.monotonic()
        r = run_tracked([str(ferry), "migrate", "--qmp", str(d / "src.sock"), uri, "--json"],
                        timeout=T_MIGRATE, stdin=subprocess.DEVNULL)
        res["migrate_wall_s"] = round(time.monotonic() - t_mig, 3)
        cpu1 = (cpu_seconds(src.pid), cpu_seconds(dst.pid))
        sys1_dst = _cpu_split(dst.pid)[1]
        info = None
        for line in reversed(r.stdout.splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    info = json.loads(line)
                    break
                except json.JSONDecodeError:
                    continue
        if info is None:
            raise BenchError(f"ferry migrate (exit {r.returncode}) printed no JSON: "
                             f"{r.stderr.strip()[-800:]}")
        res["info"] = info
        if info.get("status") != "completed" or r.returncode != 0:
            raise BenchError(f"migration {info.get('status')} (exit {r.returncode}): "
                             f"{info.get('error-desc') or r.stderr.strip()[-800:]}")

        st = qd.execute("query-status").get("status")
        res["dst_status"] = st
        if st != case.dst_status:
            warnings.append(f"destination is {st!r}, expected {case.dst_status!r}")

        passes = info.get("passes") or []
        total_ms = info.get("total-time")
        transferred = (info.get("ram") or {}).get("transferred")
        p0 = passes[0] if passes else {}
        cpu_after = [_cpu_split(p.pid) for p in (src, dst)]
        m = {
            "total_ms": total_ms,
            "downtime_ms": info.get("downtime"),
            "setup_ms": info.get("setup-time"),
            "transferred_bytes": transferred,
            "pass0_bytes": p0.get("bytes"),
            # A rate of nothing sent says nothing: left out rather than shown as 0.
            "pass0_gbs": ((p0.get("throughput-bytes-per-sec") or 0) / 1e9
                          if p0.get("bytes") else None),
            "overall_gbs": (transferred / (total_ms / 1e3) / 1e9
                            if transferred and total_ms else None),
            "passes": len(passes),
            # The brief's figure: all the process's CPU up to now (start-up, fill, guest).
            "cpu_src_s": cpu_seconds(src.pid),
            "cpu_dst_s": cpu_seconds(dst.pid),
            # Only the migration's window (the guest's vCPU threads included on the source).
            "cpu_src_mig_s": round(cpu1[0] - cpu0[0], 3),
            "cpu_dst_mig_s": round(cpu1[1] - cpu0[1], 3),
            # Kernel share of the destination's migration CPU (page faults, socket reads).
            "cpu_dst_mig_sys_s": round(sys1_dst - sys0_dst, 3),
            "cpu_src_user_s": cpu_after[0][0],
            "cpu_src_sys_s": cpu_after[0][1],
            "cpu_dst_user_s": cpu_after[1][0],
            "cpu_dst_sys_s": cpu_after[1][1],
            "rss_src_peak": peak_rss(src.pid),
            "rss_dst_peak": peak_rss(dst.pid),
        }
        res["metrics"] = m
        res["ok"] = True
    except BenchError as e:
        res["error"] = str(e)
    except (OSError, ValueError, KeyError, TypeError, socket.timeout) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    except BaseException:
        interrupted = True
        raise
    finally:
        try:
            if not interrupted:
                quit_and_wait(qs, src, "source", warnings)
                quit_and_wait(qd, dst, "destination", warnings)
        finally:
            reap(src)
            reap(dst)
        if not res["ok"]:
            res["src_stderr"] = tail(d / "src.err")
            res["dst_stderr"] = tail(d / "dst.err")
        res["wall_s"] = round(time.monotonic() - t0, 3)
    return res


# --------------------------------------------------------------------------------------------
# Set-up: build, tools, machine
# --------------------------------------------------------------------------------------------


def build_ferry() -> Path:
    log("building: cargo build --release -p ferry-vmm")
    t = time.monotonic()
    p = subprocess.run(
        ["cargo", "build", "--release", "-p", "ferry-vmm",
         "--message-format=json-render-diagnostics"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    if p.returncode != 0:
        raise SystemExit(f"cargo build failed (exit {p.returncode})")
    exe = None
    for line in p.stdout.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (msg.get("reason") == "compiler-artifact" and msg.get("executable")
                and msg.get("target", {}).get("name") == "ferry"):
            exe = Path(msg["executable"])
    if exe is None:
        raise SystemExit("cargo build did not report a `ferry` executable")
    log(f"built {exe} in {time.monotonic() - t:.1f} s")
    return exe


def default_ferry() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    if not target.is_absolute():
        target = REPO / target
    return target / "release" / "ferry"


def ensure_iperf3() -> str:
    exe = shutil.which("iperf3")
    if exe:
        return exe
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else [])
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log("iperf3 not found; installing it with apt-get")
    for cmd in (sudo + ["apt-get", "update"], sudo + ["apt-get", "install", "-y", "iperf3"]):
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            raise SystemExit(f"`{' '.join(cmd)}` failed; install iperf3 and rerun")
    exe = shutil.which("iperf3")
    if not exe:
        raise SystemExit("iperf3 still not on PATH after apt-get install")
    return exe


def first_line(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = p.stdout.strip().splitlines()
    return out[0] if p.returncode == 0 and out else None


def machine_info(ferry: Path, iperf3: str) -> dict:
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = None
    kvm_modules = sorted(m for m in ("kvm_pvm", "kvm_intel", "kvm_amd")
                         if Path("/sys/module", m).exists())
    dirty = first_line(["git", "status", "--porcelain", "--untracked-files=no"], REPO)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "mem_total_bytes": meminfo("MemTotal"),
        "mem_available_bytes": meminfo("MemAvailable"),
        "kernel": platform.release(),
        "cpu_model": cpu_model,
        "kvm_modules": kvm_modules,
        "kvm_usable": os.access("/dev/kvm", os.R_OK | os.W_OK),
        "thp": thp,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "git_commit": first_line(["git", "rev-parse", "HEAD"], REPO),
        "git_describe": first_line(["git", "log", "-1", "--format=%h %s"], REPO),
        "git_dirty": bool(dirty),
        "ferry": str(ferry),
        "ferry_version": first_line([str(ferry), "--version"]),
        "iperf3_version": first_line([iperf3, "--version"]),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------
# Summary and markdown
# --------------------------------------------------------------------------------------------

METRICS = ["total_ms", "downtime_ms", "setup_ms", "transferred_bytes", "pass0_gbs", "overall_gbs",
           "passes", "cpu_src_s", "cpu_dst_s", "cpu_src_mig_s", "cpu_dst_mig_s",
           "rss_src_peak", "rss_dst_peak", "pass0_to_tcp"]


def stats(values: list) -> dict | None:
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def summarise(results: dict) -> dict:
    summary: dict = {"cases": {}, "references": {}}
    rounds = results["rounds"]
    for name in results["cases"]:
        runs = [c for r in rounds for c in r["cases"] if c["case"] == name]
        ok = [c for c in runs if c.get("ok")]
        s = {"runs": len(runs), "ok": len(ok)}
        for k in METRICS:
            s[k] = stats([c["metrics"].get(k) for c in ok])
        s["other_cores"] = stats([c.get("other_cores") for c in runs])
        summary["cases"][name] = s
    refs = summary["references"]
    refs["tcp_gbs"] = stats([r["tcp"].get("gbs") for r in rounds if r.get("tcp")])
    refs["tcp_other_cores"] = stats([r["tcp"].get("other_cores") for r in rounds if r.get("tcp")])
    for k in ("touched_gbs", "fresh_gbs", "fresh_thp_gbs"):
        refs[f"memcpy_{k}"] = stats([r["memcpy"].get(k) for r in rounds if r.get("memcpy")])
    refs["memcpy_other_cores"] = stats([r["memcpy"].get("other_cores")
                                        for r in rounds if r.get("memcpy")])
    return summary


def fmt_num(x: float, kind: str) -> str:
    if kind == "ms":
        return f"{x:.0f}"
    if kind == "gbs":
        return f"{x:.2f}"
    if kind == "s":
        return f"{x:.2f}"
    if kind == "int":
        return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"
    if kind == "pct":
        return f"{100 * x:.0f}%"
    if kind == "bytes":
        if x >= 1 << 30:
            return f"{x / (1 << 30):.2f} GiB"
        if x >= 1 << 20:
            return f"{x / (1 << 20):.1f} MiB"
        return f"{x / 1024:.1f} KiB"
    return str(x)


def cell(s: dict | None, kind: str) -> str:
    if not s:
        return "–"
    med = fmt_num(s["median"], kind)
    lo, hi = fmt_num(s["min"], kind), fmt_num(s["max"], kind)
    if s["n"] == 1 or lo == hi:
        return med
    return f"{med} ({lo}–{hi})"


def render_markdown(results: dict) -> str:
    # Recomputed, so that an older results file renders with the current rules.
    summary = summarise(results)
    mi = results["machine"]
    out = []
    runs = results["args"]["runs"]
    out.append(f"ferry `{mi.get('git_describe')}`{' (uncommitted changes)' if mi.get('git_dirty') else ''}, "
               f"{results['started']}, {runs} run(s), medians with (min–max); "
               f"whole run {results.get('elapsed_s', 0):.0f} s.")
    out.append("")
    out.append("| case | total ms | downtime ms | transferred | pass 0 GB/s | overall GB/s | passes "
               "| CPU src s | CPU dst s | pass 0 / TCP 1 stream |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in summary["cases"].items():
        label = name if s["ok"] == s["runs"] else f"{name} ({s['ok']}/{s['runs']} ok)"
        if not s["ok"]:
            out.append(f"| {label} | " + " | ".join(["failed"] + ["–"] * 8) + " |")
            continue
        out.append("| " + " | ".join([
            label,
            cell(s["total_ms"], "ms"),
            cell(s["downtime_ms"], "ms"),
            cell(s["transferred_bytes"], "bytes"),
            cell(s["pass0_gbs"], "gbs"),
            cell(s["overall_gbs"], "gbs"),
            cell(s["passes"], "int"),
            cell(s["cpu_src_s"], "s"),
            cell(s["cpu_dst_s"], "s"),
            cell(s["pass0_to_tcp"], "pct"),
        ]) + " |")
    out.append("")
    refs = summary["references"]
    mib = results["args"]["memcpy_mib"]
    out.append("| reference, same run | GB/s | other load, cores |")
    out.append("|---|---:|---:|")
    for label, key, load in [
        (f"loopback TCP, 1 stream (iperf3 -t {results['args']['iperf_seconds']})",
         "tcp_gbs", "tcp_other_cores"),
        (f"memcpy {mib} MiB into touched memory", "memcpy_touched_gbs", "memcpy_other_cores"),
        (f"memcpy {mib} MiB into never-touched memory (4 KiB pages)", "memcpy_fresh_gbs",
         "memcpy_other_cores"),
        (f"memcpy {mib} MiB into never-touched memory, MADV_HUGEPAGE",
         "memcpy_fresh_thp_gbs", "memcpy_other_cores"),
    ]:
        out.append(f"| {label} | {cell(refs.get(key), 'gbs')} | {cell(refs.get(load), 's')} |")
    if any(s["ok"] for s in summary["cases"].values()):
        out.append("")
        out.append("| case | CPU src s, migration only | CPU dst s, migration only | setup ms "
                   "| src peak RSS | dst peak RSS | other load, cores |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
    for name, s in summary["cases"].items():
        if not s["ok"]:
            continue
        out.append("| " + " | ".join([
            name,
            cell(s["cpu_src_mig_s"], "s"),
            cell(s["cpu_dst_mig_s"], "s"),
            cell(s["setup_ms"], "ms"),
            cell(s["rss_src_peak"], "bytes"),
            cell(s["rss_dst_peak"], "bytes"),
            cell(s.get("other_cores"), "s"),
        ]) + " |")
    failures = [(r["round"], c) for r in results["rounds"] for c in r["cases"]
                if not c.get("ok")]
    notes = [(r["round"], c["case"], w) for r in results["rounds"] for c in r["cases"]
             for w in c.get("warnings", [])]
    if failures or notes or results.get("interrupted"):
        out.append("")
    if results.get("interrupted"):
        out.append("- the run was interrupted; figures cover the rounds that finished")
    for rnd, c in failures:
        why = " ".join((c.get("error") or "unknown").split())
        out.append(f"- run {rnd}, {c['case']} failed: {why[:300]}")
    for rnd, name, w in notes:
        out.append(f"- run {rnd}, {name}: {w}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="ferry migration benchmarks with same-run references (iperf3, memcpy).",
        epilog="cases: " + "; ".join(f"{c.name}: {c.what}" for c in CASES.values()),
    )
    ap.add_argument("--runs", type=int, default=3, help="rounds of every case (default 3)")
    ap.add_argument("--cases", default=",".join(CASES),
                    help="comma-separated cases (default all: %(default)s)")
    ap.add_argument("--out", type=Path,
                    help="JSON results file (default bench/out/migration-<time>.json)")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables to stdout")
    ap.add_argument("--no-build", action="store_true",
                    help="skip cargo build; use the existing release binary")
    ap.add_argument("--ferry", type=Path, help="ferry binary to use (implies --no-build)")
    ap.add_argument("--iperf-seconds", type=int, default=5, help="iperf3 -t (default 5)")
    ap.add_argument("--memcpy-mib", type=int, default=512,
                    help="memcpy reference buffer size, MiB (default 512)")
    ap.add_argument("--memcpy-reps", type=int, default=3,
                    help="memcpy repetitions per run, median taken (default 3)")
    ap.add_argument("--settle", type=float, default=10.0, metavar="S",
                    help="before each measurement wait up to S seconds for other work on the "
                         "machine to quieten (default 10; 0 disables)")
    ap.add_argument("--settle-below", type=float, default=0.25, metavar="CORES",
                    help="what counts as quiet: other work using fewer cores than this "
                         "(default 0.25)")
    ap.add_argument("--keep-tmp", action="store_true",
                    help="keep the temporary directory with every process's output")
    ap.add_argument("--from-json", type=Path, metavar="FILE",
                    help="measure nothing: print the markdown of an earlier results file")
    a = ap.parse_args(argv)
    if a.from_json is None:
        a.case_list = [c.strip() for c in a.cases.split(",") if c.strip()]
        unknown = [c for c in a.case_list if c not in CASES]
        if unknown or not a.case_list:
            ap.error(f"unknown case(s) {', '.join(unknown) or '(none given)'}; "
                     f"known: {', '.join(CASES)}")
        if a.runs < 1:
            ap.error("--runs must be at least 1")
    return a


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if a.from_json:
        print(render_markdown(json.loads(a.from_json.read_text())), end="")
        return 0

    atexit.register(reap_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    started = _dt.datetime.now().astimezone()
    out = a.out or REPO / "bench" / "out" / f"migration-{started:%Y%m%d-%H%M%S}.json"
    if a.ferry:
        ferry = a.ferry.resolve()
    elif a.no_build:
        ferry = default_ferry()
    else:
        ferry = build_ferry()
    if not os.access(ferry, os.X_OK):
        raise SystemExit(f"no ferry binary at {ferry}; build it or pass --ferry")
    iperf3 = ensure_iperf3()
    machine = machine_info(ferry, iperf3)
    if any(CASES[c].backend == "kvm" for c in a.case_list) and not machine["kvm_usable"]:
        log("warning: /dev/kvm is not usable; the kvm cases will fail")
    if machine["loadavg"] and float(machine["loadavg"][0]) > 0.5:
        log(f"warning: load average {machine['loadavg'][0]} on {machine['nproc']} CPUs before "
            f"starting: other work will show in the figures (and in the references)")

    results: dict = {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(["python3", "bench/migration.py", *argv]),
        "args": {"runs": a.runs, "cases": a.case_list, "iperf_seconds": a.iperf_seconds,
                 "memcpy_mib": a.memcpy_mib, "memcpy_reps": a.memcpy_reps,
                 "settle": a.settle, "settle_below": a.settle_below},
        "machine": machine,
        "cases": a.case_list,
        "rounds": [],
    }
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    t_start = time.monotonic()
    failed = 0
    try:
        for rnd in range(1, a.runs + 1):
            round_res: dict = {"round": rnd, "cases": []}
            results["rounds"].append(round_res)
            # References go between the cases: TCP first, then the first case (which is
            # compared with it), then memcpy, then the rest.
            plan = ["tcp", *a.case_list[:1], "memcpy", *a.case_list[1:]]
            for item in plan:
                t = time.monotonic()
                quiet = settle(a.settle, a.settle_below) if a.settle > 0 else {}
                window = OtherLoad()
                tag = f"[run {rnd}/{a.runs}]"
                if item == "tcp":
                    try:
                        r = ref_tcp(iperf3, a.iperf_seconds, tmp)
                        log(f"{tag} loopback TCP 1 stream: {r['gbs']:.2f} GB/s")
                    except BenchError as e:
                        r = {"error": str(e)}
                        failed += 1
                        log(f"{tag} loopback TCP FAILED: {e}")
                    round_res["tcp"] = r
                elif item == "memcpy":
                    try:
                        r = ref_memcpy(a.memcpy_mib << 20, a.memcpy_reps)
                        log(f"{tag} memcpy: touched {r['touched_gbs']:.2f}, "
                            f"never-touched {r['fresh_gbs']:.2f}, "
                            f"never-touched+THP {r['fresh_thp_gbs']:.2f} GB/s")
                    except (OSError, ValueError) as e:
                        r = {"error": f"{type(e).__name__}: {e}"}
                        failed += 1
                        log(f"{tag} memcpy FAILED: {r['error']}")
                    round_res["memcpy"] = r
                else:
                    r = run_case(ferry, CASES[item], tmp, rnd)
                    tcp = round_res.get("tcp", {}).get("gbs")
                    if r.get("ok"):
                        m = r["metrics"]
                        m["pass0_to_tcp"] = (m["pass0_gbs"] / tcp
                                             if CASES[item].tcp_ratio and tcp and m["pass0_gbs"]
                                             else None)
                        ratio = (f" ({100 * m['pass0_to_tcp']:.0f}% of TCP)"
                                 if m["pass0_to_tcp"] is not None else "")
                        p0 = f"{m['pass0_gbs']:.2f} GB/s" if m["pass0_gbs"] is not None else "-"
                        log(f"{tag} {item}: total {m['total_ms']} ms, downtime "
                            f"{m['downtime_ms']} ms, {fmt_num(m['transferred_bytes'] or 0, 'bytes')}, "
                            f"pass 0 {p0}{ratio}, {m['passes']} passes, "
                            f"CPU src {m['cpu_src_s']:.2f} s dst {m['cpu_dst_s']:.2f} s"
                            + "".join(f"; warning: {w}" for w in r["warnings"]))
                    else:
                        failed += 1
                        log(f"{tag} {item} FAILED: {r.get('error')}")
                    round_res["cases"].append(r)
                r.update(quiet)
                r["other_cores"] = window.cores()
                if r["other_cores"] >= 0.25:
                    log(f"{tag} note: other work used {r['other_cores']:.2f} cores "
                        f"on average during {item}")
                round_res.setdefault("wall_s", {})[item] = round(time.monotonic() - t, 3)
    except KeyboardInterrupt as e:
        results["interrupted"] = str(e) or "Ctrl-C"
        log(f"interrupted ({results['interrupted']}); stopping children, writing what was measured")
    finally:
        reap_all()
        results["elapsed_s"] = round(time.monotonic() - t_start, 1)
        results["summary"] = summarise(results)
        write_json(out, results)
        if a.keep_tmp:
            log(f"process logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out} ({results['elapsed_s']:.0f} s of measuring)")
    if a.markdown:
        print(render_markdown(results), end="")
    if results.get("interrupted"):
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        # Interrupted before measuring began (building, installing iperf3).
        reap_all()
        sys.exit(130)
