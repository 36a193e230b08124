"""What every bench/ driver shares: child processes, QMP, /proc, references, statistics,
formatting, packages, QEMU and its guest image, and results files.

    import harness as h

Child processes (`spawn`, `run_tracked`, `reap`, `reap_all`, `guard_children`): each child
runs in its own session (so Ctrl-C on the terminal reaches the driver, not the child) with a
parent-death signal (so a SIGKILLed driver leaves nothing behind), and is killed by process
group on the way out: normal exit, exception, Ctrl-C, SIGTERM or SIGHUP.

QMP (`Qmp`) over a unix socket, with the helpers that time a migration from both sides' events
(`start_to_done_ms`, `stop_resume_ms`). /proc (`cpu_seconds`, `peak_rss`, `thread_cpu`,
`CpuWindow`, `Threads`, `OtherLoad`, `settle`): CPU seconds and memory of a process, and how
busy the rest of the machine is. References measured in the same run (`ref_tcp`: loopback TCP
with iperf3; `ref_memcpy`). Statistics and formatting (`stats`, `fmt_num`, `cell`,
`md_table`, `size_arg`, `parse_size`). Packages (`apt_install`, `ensure_iperf3`, `ensure_gcc`,
`ensure_qemu`: QEMU 10.0 or newer, from Debian's bookworm-backports where the host's own is
older). QEMU's side (`qemu_cpu_for_host`, `build_guest`, `qemu_guest_cmd`, `SerialLog`,
`qemu_listen`, `qemu_wait_migration`). Results (`write_json`, `machine_info`).

Only the Python 3.11 standard library is used. Units: GB = 1e9 bytes, GiB = 2^30 bytes.
Nothing here asserts a timing (DESIGN.md section 6).
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import mmap
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = REPO / "bench" / "guest"
URI_PREFIX = "listening for an incoming migration on "
CLK_TCK = os.sysconf("SC_CLK_TCK")
GiB = 1 << 30
MiB = 1 << 20

# Timeouts, seconds (defaults; the drivers may pass their own).
T_URI = 60.0      # a destination to print the address it listens on
T_QMP = 120.0     # a process's QMP socket to accept
T_GUEST = 60.0    # a ferry guest to run a full pass
T_QUIT = 20.0     # a process to exit after `quit`
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
    # takes whatever it spawns too. The death signal covers the driver being SIGKILLed.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def spawn(cmd: list[str], **kw) -> subprocess.Popen:
    """subprocess.Popen in a session of its own, with a parent-death signal, registered so
    that `reap_all` ends it."""
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
        # someone else: never signal it again. Nothing the drivers start outlives them.
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


def on_signal(signum, _frame):
    """SIGTERM and SIGHUP as Ctrl-C: the drivers' `finally` blocks reap and write results."""
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


_on_signal = on_signal


def run_main(main) -> None:
    """A driver's entry: exits with `main(argv)`'s code, or 130 (every child killed) on a
    Ctrl-C that comes before the driver's own handling (building, installing)."""
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        reap_all()
        sys.exit(130)


def guard_children(sigint: bool = True) -> None:
    """Every child is killed on the way out: at exit, and SIGTERM or SIGHUP raise
    KeyboardInterrupt as Ctrl-C does. With `sigint`, Ctrl-C works even when the driver was
    started from a shell that ignores SIGINT for background jobs."""
    atexit.register(reap_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if sigint:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def quit_and_wait(q: "Qmp | None", proc: subprocess.Popen | None, who: str,
                  warnings: list[str], timeout: float | None = None) -> None:
    """`quit` over QMP, then waits for the process (killing it after `timeout`); what went
    wrong goes into `warnings`."""
    if proc is None:
        return
    timeout = T_QUIT if timeout is None else timeout
    if q is not None:
        q.quit()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        warnings.append(f"{who} did not exit within {timeout:.0f} s of quit; killed")
    finally:
        reap(proc)
    if proc.returncode not in (0, None, -signal.SIGTERM, -signal.SIGKILL):
        warnings.append(f"{who} exited with status {proc.returncode}")


# --------------------------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------------------------


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process in seconds, all its threads, not its children."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    # comm may hold spaces and parentheses: fields start after the last ')'.
    rest = s[s.rindex(")") + 2:].split()
    return int(rest[11]) / CLK_TCK, int(rest[12]) / CLK_TCK


_cpu_split = cpu_split


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, seconds."""
    u, s = cpu_split(pid)
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


def anon_huge_bytes(pid: int) -> int | None:
    """AnonHugePages of a process: how much of its memory transparent huge pages back."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """{tid: (name, utime + stime seconds)} of a process's live threads."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                s = f.read()
        except OSError:
            continue
        name = s[s.index("(") + 1:s.rindex(")")]
        rest = s[s.rindex(")") + 2:].split()
        out[int(t)] = (name, (int(rest[11]) + int(rest[12])) / CLK_TCK)
    return out


VCPU_THREAD = re.compile(r"^(CPU \d+/KVM|vcpu\d+|soft-vcpu\d+)$")


class CpuWindow:
    """CPU seconds of one process over a window, and how much of it its vCPU threads used
    (QEMU's, named with debug-threads=on, and ferry's).

    vCPU threads may end inside the window (ferry's source hands its vCPUs back at the
    switchover), so they are sampled while the window is open and their last reading counts.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.start = cpu_seconds(pid)
        self.first = {t: c for t, (n, c) in thread_cpu(pid).items() if VCPU_THREAD.match(n)}
        self.last = dict(self.first)

    def sample(self) -> None:
        for t, (n, c) in thread_cpu(self.pid).items():
            if VCPU_THREAD.match(n):
                self.first.setdefault(t, 0.0)
                self.last[t] = c

    def close(self) -> dict:
        self.sample()
        total = cpu_seconds(self.pid) - self.start
        vcpu = sum(self.last[t] - self.first[t] for t in self.last)
        return {"all_s": round(total, 3), "vcpu_s": round(vcpu, 3),
                "mig_s": round(max(total - vcpu, 0.0), 3)}


_NUMBERED = re.compile(r"-?\d+$")


def thread_kind(name: str) -> str:
    """ferry-send-3 -> ferry-send: the threads of one kind are summed."""
    return _NUMBERED.sub("", name) or name


class Threads:
    """CPU of each thread of a process over a window; threads that end inside it count with
    their last sample (so up to one sampling period of their time may be missing from the
    split, never from the process total, which comes from /proc/PID/stat)."""

    def __init__(self, pid: int):
        self.pid = pid
        now = thread_cpu(pid)
        self.first = {t: c for t, (_n, c) in now.items()}
        self.last = dict(self.first)
        self.names = {t: n for t, (n, _c) in now.items()}

    def sample(self) -> None:
        for t, (n, c) in thread_cpu(self.pid).items():
            self.first.setdefault(t, 0.0)
            self.names[t] = n
            self.last[t] = c

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t, c in self.last.items():
            k = thread_kind(self.names.get(t, "?"))
            out[k] = out.get(k, 0.0) + c - self.first[t]
        return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0}


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
    """CPU seconds of this driver and every child it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """How busy the machine was with work that is not this benchmark's, during a window.

    Busy CPU time of the whole machine minus that of the driver and its (reaped) children,
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def event_time(ev: dict) -> float | None:
    ts = ev.get("timestamp") or {}
    if "seconds" not in ts:
        return None
    return ts["seconds"] + ts.get("microseconds", 0) / 1e6


def last_event(q: Qmp, name: str) -> dict | None:
    for ev in reversed(q.events):
        if ev.get("event") == name:
            return ev
    return None


def wait_event(q: Qmp, name: str, timeout: float) -> dict | None:
    """Polls with a cheap command until `name` is among the events received."""
    end = time.monotonic() + timeout
    while True:
        ev = last_event(q, name)
        if ev is not None or time.monotonic() > end:
            return ev
        q.execute("query-status")
        time.sleep(0.02)


def dst_completed(qd: Qmp) -> bool:
    """Whether the destination has sent its MIGRATION completed event (polls once)."""
    if any(ev.get("event") == "MIGRATION" and (ev.get("data") or {}).get("status") == "completed"
           for ev in qd.events):
        return True
    qd.execute("query-status")
    return False


def start_to_done_ms(qs: Qmp, qd: Qmp) -> float | None:
    """The whole migration as both systems can be measured alike: from the source's
    MIGRATION setup event to the destination's MIGRATION completed event (or its RESUME,
    if later)."""
    for q in (qs, qd):
        q.execute("query-status")  # collects the events sent so far
    start = next((ev for ev in qs.events if ev.get("event") == "MIGRATION"
                  and (ev.get("data") or {}).get("status") == "setup"), None)
    done = next((ev for ev in reversed(qd.events) if ev.get("event") == "MIGRATION"
                 and (ev.get("data") or {}).get("status") == "completed"), None)
    if start is None or done is None:
        return None
    ends = [event_time(done)]
    resume = last_event(qd, "RESUME")
    if resume is not None:
        ends.append(event_time(resume))
    a = event_time(start)
    if a is None or None in ends:
        return None
    return round((max(ends) - a) * 1e3, 2)


T_RESUME = 10.0


def stop_resume_ms(qs: Qmp, qd: Qmp) -> float | None:
    """The guest's own view of the downtime: source STOP to destination RESUME, from the
    timestamps both processes put on their QMP events (one host, one clock)."""
    stop = wait_event(qs, "STOP", T_RESUME)
    resume = wait_event(qd, "RESUME", T_RESUME)
    if stop is None or resume is None:
        return None
    a, b = event_time(stop), event_time(resume)
    if a is None or b is None:
        return None
    return round((b - a) * 1e3, 2)


# --------------------------------------------------------------------------------------------
# ferry
# --------------------------------------------------------------------------------------------


def wait_uri(path: Path, proc: subprocess.Popen, err_path: Path,
             timeout: float | None = None) -> str:
    """The address a `ferry run --incoming tcp:...:0` destination printed on stdout (in
    the file `path`)."""
    timeout = T_URI if timeout is None else timeout
    end = time.monotonic() + timeout
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
    raise BenchError(f"destination printed no '{URI_PREFIX.strip()}' line in {timeout:.0f} s")


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


def last_json(text: str) -> dict | None:
    """The last line of `text` that is a JSON object (`ferry migrate --json`'s result)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


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


def pick_ferry(given: Path | None, no_build: bool) -> Path:
    """--ferry PATH, else the existing release build with --no-build, else a fresh build."""
    if given:
        ferry = given.resolve()
    elif no_build:
        ferry = default_ferry()
    else:
        ferry = build_ferry()
    if not os.access(ferry, os.X_OK):
        raise SystemExit(f"no ferry binary at {ferry}; build it or pass --ferry")
    return ferry


def ferry_knows_channels(ferry: Path) -> bool:
    """Whether this ferry has the `migration.multifd-channels` property."""
    try:
        p = subprocess.run([str(ferry), "machines", "ferry"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "migration.multifd-channels" in p.stdout


def first_line(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = p.stdout.strip().splitlines()
    return out[0] if p.returncode == 0 and out else None


def machine_info(ferry: Path, iperf3: str | None) -> dict:
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
        "iperf3_version": first_line([iperf3, "--version"]) if iperf3 else None,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------
# References: loopback TCP, memcpy
# --------------------------------------------------------------------------------------------


def reference(tag: str, what: str, measure, quiet: dict,
              window: "OtherLoad") -> tuple[dict, bool]:
    """One reference measurement of a round (loopback TCP, the verified-transfer floor):
    `measure()` returns its figures and the line to log. Returns the figures, or the error
    when it raised BenchError, with the settling figures and the other load of `window`,
    and whether it failed. Logged either way."""
    try:
        r, line = measure()
        log(f"{tag} {what}: {line}")
        failed = False
    except BenchError as e:
        r = {"error": str(e)}
        failed = True
        log(f"{tag} {what} FAILED: {e}")
    r.update(quiet)
    r["other_cores"] = window.cores()
    return r, failed


FLOOR_DIR = REPO / "bench" / "floor"


def build_floor() -> Path | None:
    """bench/floor, built (a no-op when it is fresh); None, said, when it cannot be."""
    p = subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=FLOOR_DIR,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    exe = FLOOR_DIR / "target" / "release" / "floor"
    if p.returncode != 0 or not os.access(exe, os.X_OK):
        log(f"warning: could not build bench/floor (exit {p.returncode}): "
            f"{p.stderr.strip()[-300:]}; no verified-transfer floor in this run")
        return None
    return exe


def ref_floor(floor: Path, streams: int, size: str = "1G") -> dict:
    """The least a verified page transfer costs here (bench/floor's `verify` mode): `size`
    from populated memory into populated memory over loopback TCP with `streams`
    connections, 512 KiB per write and read, every page hashed at both ends. What a
    migration costs above it is the migration's own."""
    r = run_tracked([str(floor), "--json", "--rounds", "1", "--modes", "verify",
                     "--streams", str(streams), "--size", size], timeout=120,
                    stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise BenchError(f"bench/floor exit {r.returncode}: {r.stderr.strip()[-300:]}")
    try:
        m = json.loads(r.stdout)["medians"][0]
    except (json.JSONDecodeError, KeyError, IndexError):
        raise BenchError(f"bench/floor printed no result: {r.stdout.strip()[:300]}")
    return {"streams": streams, "gbs": m["gbs"],
            "cpu_sender_s_per_gib": m["send_cpu_s_per_gib"],
            "cpu_receiver_s_per_gib": m["recv_cpu_s_per_gib"]}


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

            def per_gib(pct, side: dict) -> float | None:
                # iperf3's CPU figure is user+system time over the test's wall time, of
                # the whole process; times the seconds and over the GiB it moved, it is
                # the bare socket's cost per GiB: the kernel's share of any migration's
                # CPU on this host, to read a migration's own figure against.
                if pct is None or not side.get("bytes"):
                    return None
                return pct / 100 * side["seconds"] / (side["bytes"] / 2**30)

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
                "cpu_sender_s_per_gib": per_gib(cpu.get("host_total"), sent),
                "cpu_receiver_s_per_gib": per_gib(cpu.get("remote_total"), recv),
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
# Statistics and formatting
# --------------------------------------------------------------------------------------------


def stats(values: list) -> dict | None:
    """{"median", "min", "max", "n"} of the values that are not None; None if there are
    none."""
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def median(values: list) -> float | None:
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def gb_per_s(nbytes: int | None, ms: float | None) -> float | None:
    return nbytes / (ms / 1e3) / 1e9 if nbytes and ms else None


def fmt_num(x: float, kind: str) -> str:
    """One number: ms, gbs (GB/s), s, int, pct (a fraction as per cent), bytes, ratio."""
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
    if kind == "ratio":
        return f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"
    if kind == "bytes":
        if x >= 1 << 30:
            return f"{x / (1 << 30):.2f} GiB"
        if x >= 1 << 20:
            return f"{x / (1 << 20):.1f} MiB"
        return f"{x / 1024:.1f} KiB"
    return str(x)


def cell(s: dict | None, kind: str, dash: str = "–") -> str:
    """A `stats` result as "median (min–max)"; the median alone when there is one value or
    the range rounds to it. `dash` joins min and max."""
    if not s:
        return "–"
    med = fmt_num(s["median"], kind)
    lo, hi = fmt_num(s["min"], kind), fmt_num(s["max"], kind)
    if s["n"] == 1 or lo == hi:
        return med
    return f"{med} ({lo}{dash}{hi})"


def md_row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_table(head: list[str], rows: list[list], align: str | None = None) -> list[str]:
    """A markdown table as lines. `align` has one letter per column, l or r (right-aligned,
    for figures); without it no column is aligned."""
    seps = ["---" if align is None or a == "l" else "---:" for a in (align or "l" * len(head))]
    return [md_row(head), "|" + "|".join(seps) + "|", *(md_row(r) for r in rows)]


def size_arg(n: int) -> str:
    """Bytes as ferry and the guest take a size: 4G, 100M, 64K, or plain bytes."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def parse_size(s: str) -> int:
    """512M, 1G, 64K or bytes; an argparse type."""
    m = re.fullmatch(r"(\d+)([KMG]?)", s.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (like 512M or 1G)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


# --------------------------------------------------------------------------------------------
# Packages
# --------------------------------------------------------------------------------------------


def _sudo() -> list[str]:
    return [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else [])


def apt_install(packages: list[str], why: str, release: str | None = None) -> None:
    """apt-get update, then apt-get install of `packages` (from the suite `release` with
    -t, if given); SystemExit saying what to install by hand if either fails."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    target = ["-t", release] if release else []
    log(f"{why}; installing {' '.join(packages)} with apt-get"
        + (f" from {release}" if release else ""))
    for cmd in (_sudo() + ["apt-get", "update", "-q"],
                _sudo() + ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                           *target, *packages]):
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            raise SystemExit(f"`{' '.join(cmd)}` failed; install {' '.join(packages)} and rerun")


def ensure_iperf3() -> str:
    exe = shutil.which("iperf3")
    if exe:
        return exe
    apt_install(["iperf3"], "iperf3 not found")
    exe = shutil.which("iperf3")
    if not exe:
        raise SystemExit("iperf3 still not on PATH after apt-get install")
    return exe


def ensure_gcc() -> None:
    missing = [t for t in ("gcc", "ld") if not shutil.which(t)]
    if missing:
        apt_install(["gcc", "binutils"], f"{' and '.join(missing)} not found (the QEMU guest "
                                         f"image is built from bench/guest/guest.S)")


def os_release() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            k, sep, v = line.partition("=")
            if sep:
                out[k.strip()] = v.strip().strip('"')
    except OSError:
        pass
    return out


# --------------------------------------------------------------------------------------------
# QEMU: version 10.0 or newer, a -cpu that works here, the guest image, a migration
# --------------------------------------------------------------------------------------------

QEMU_WANT = (10, 0)
QEMU_PACKAGE = "qemu-system-x86"
BACKPORTS = "bookworm-backports"
APT_SOURCES = Path("/etc/apt")


def qemu_version(exe: str | None) -> tuple[tuple[int, ...] | None, str | None]:
    """((major, minor, micro), the --version line) of a QEMU binary; (None, line) if the
    line names no version."""
    if not exe:
        return None, None
    line = first_line([exe, "--version"])
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", line or "")
    if not m:
        return None, line
    return tuple(int(g or 0) for g in m.groups()), line


def _apt_source_lines() -> list[tuple[Path, str]]:
    """(file, line) of every apt source file's lines, comments left out; files apt does not
    read (other suffixes) are skipped."""
    files = [APT_SOURCES / "sources.list"]
    d = APT_SOURCES / "sources.list.d"
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    out = []
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.append((f, line))
    return out


def has_apt_suite(suite: str) -> bool:
    """Whether apt's sources name `suite` (a one-line `deb` entry or a deb822 `Suites:`)."""
    for f, line in _apt_source_lines():
        words = line.split()
        if f.suffix == ".sources":
            if line.lower().startswith("suites:") and suite in words[1:]:
                return True
        elif words and words[0] == "deb" and suite in words:
            return True
    return False


def debian_mirror() -> str:
    """The Debian mirror this host's sources use for bookworm (deb.debian.org if none)."""
    uris: list[str] = []
    block: dict[str, str] = {}
    for f, line in _apt_source_lines():
        words = line.split()
        if f.suffix == ".sources":
            k, _, v = line.partition(":")
            block[k.strip().lower()] = v.strip()
            if "uris" in block and "suites" in block:
                if "bookworm" in block["suites"].split():
                    uris += block["uris"].split()
                block = {}
        elif words and words[0] == "deb":
            rest = [w for w in words[1:] if not w.startswith("[") and not w.endswith("]")]
            if len(rest) >= 2 and rest[1] == "bookworm":
                uris.append(rest[0])
    for u in uris:
        if "debian" in u and "security" not in u:
            return u.rstrip("/")
    return "http://deb.debian.org/debian"


def add_backports() -> Path | None:
    """Adds Debian's bookworm-backports suite to apt's sources, unless they name it already.
    Returns the file written, or None."""
    if has_apt_suite(BACKPORTS):
        return None
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    signed = f"[signed-by={keyring}] " if keyring.exists() else ""
    line = f"deb {signed}{debian_mirror()} {BACKPORTS} main\n"
    path = APT_SOURCES / "sources.list.d" / f"{BACKPORTS}.list"
    log(f"adding Debian's {BACKPORTS} to apt's sources: {path}: {line.strip()}")
    if os.geteuid() == 0:
        path.write_text(line)
    else:
        p = subprocess.run(_sudo() + ["tee", str(path)], input=line, text=True,
                           stdout=subprocess.DEVNULL)
        if p.returncode != 0:
            raise SystemExit(f"could not write {path}; add `{line.strip()}` to apt's sources "
                             f"and rerun")
    return path


def _version_text(v: tuple[int, ...] | None) -> str:
    return ".".join(map(str, v)) if v else "of unknown version"


def ensure_qemu(path: str | None = None) -> str:
    """The qemu-system-x86_64 to measure: `path` as given, whatever its version (another
    QEMU as a reference), else the one on PATH if it is 10.0 or newer. Otherwise it is
    installed: on Debian 12 from bookworm-backports (added to apt's sources if absent),
    elsewhere from the distribution, with a warning if that is still older than 10.0."""
    if path:
        exe = shutil.which(path) or path
        if not os.access(exe, os.X_OK):
            raise SystemExit(f"--qemu {path}: not an executable")
        v, line = qemu_version(exe)
        log(f"QEMU as given: {exe} ({line or 'no --version'})")
        return exe
    exe = shutil.which("qemu-system-x86_64")
    v, line = qemu_version(exe)
    if exe and v and v[:2] >= QEMU_WANT:
        return exe
    # An older one on PATH may shadow one installed earlier (by this function, in /usr/bin).
    usr = "/usr/bin/qemu-system-x86_64"
    if exe and exe != usr and os.access(usr, os.X_OK):
        uv, uline = qemu_version(usr)
        if uv and uv[:2] >= QEMU_WANT:
            log(f"{exe} is QEMU {_version_text(v)}; using {usr}: {uline}")
            return usr
    want = ".".join(map(str, QEMU_WANT))
    why = ("qemu-system-x86_64 not found" if not exe else
           f"{exe} is QEMU {_version_text(v)}, older than {want}")
    osr = os_release()
    if osr.get("ID") == "debian" and osr.get("VERSION_CODENAME") == "bookworm":
        add_backports()
        apt_install([QEMU_PACKAGE], why, release=BACKPORTS)
    elif exe:
        log(f"warning: {why}, and this is not Debian 12 (whose bookworm-backports has "
            f"{want}): measuring it; pass --qemu PATH for another")
        return exe
    else:
        apt_install([QEMU_PACKAGE], why)
    # apt puts it in /usr/bin, which an older one elsewhere on PATH may shadow.
    for cand in ("/usr/bin/qemu-system-x86_64", shutil.which("qemu-system-x86_64")):
        if cand and os.access(cand, os.X_OK):
            exe = cand
            break
    else:
        raise SystemExit("qemu-system-x86_64 still not on PATH after apt-get install")
    v, line = qemu_version(exe)
    if not v or v[:2] < QEMU_WANT:
        log(f"warning: after installing, {exe} is QEMU {_version_text(v)}, not {want} or "
            f"newer: measuring it")
    else:
        log(f"using {exe}: {line}")
    return exe


# What QEMU prints when KVM refuses an MSR it sets (and then aborts on the assertion):
# `-cpu host` on PVM hosts, whose KVM lists IA32_ARCH_CAPABILITIES (0x10a) and refuses it.
_MSR_REFUSED = re.compile(r"failed to set MSR|kvm_buf_set_msrs|MSR 0x[0-9a-f]+", re.I)
CPU_FALLBACK = "host,-arch-capabilities"


def probe_qemu_cpu(qemu: str, cpu: str, tmp: Path, seconds: float = 1.0) -> dict:
    """Starts QEMU with `-cpu cpu` on a small guest with nothing to boot, frozen (-S), waits
    for its QMP (KVM has every vCPU register and MSR by then), lets it run `seconds` and
    stops it. {"cpu", "ok", "error"}."""
    d = tmp / f"cpu-probe-{len(list(tmp.glob('cpu-probe-*')))}"
    d.mkdir(parents=True)
    cmd = [qemu, "-machine", "pc", "-accel", "kvm", "-cpu", cpu, "-m", "64", "-smp", "1",
           "-nodefaults", "-no-user-config", "-display", "none", "-S",
           "-qmp", f"unix:{d / 'qmp'},server=on,wait=off"]
    out: dict = {"cpu": cpu, "ok": False, "error": None}
    p = q = None
    try:
        with open(d / "err", "wb") as e:
            p = spawn(cmd, stdin=subprocess.DEVNULL, stdout=e, stderr=subprocess.STDOUT)
        q = Qmp.connect(d / "qmp", p, f"QEMU -cpu {cpu}", d / "err", deadline=30.0)
        q.execute("cont")
        time.sleep(seconds)
        q.execute("query-status")
        out["ok"] = True
    except (BenchError, OSError, socket.timeout) as e:
        if p is not None:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        text = tail(d / "err", 5)
        status = p.returncode if p is not None else None
        out["error"] = (f"exited with status {status}: {text}" if status is not None
                        else f"{e} {text}").strip()
        out["msr"] = bool(_MSR_REFUSED.search(text)) or status == -signal.SIGABRT
    finally:
        if q is not None:
            q.quit()
        reap(p, grace=2.0)
    return out


def qemu_cpu_for_host(qemu: str, tmp: Path, given: str | None = None) -> dict:
    """The -cpu to give QEMU here: `given` as it is, else `host`, unless QEMU with `host`
    dies on an MSR that KVM refuses (QEMU 10.0 on PVM hosts aborts setting MSR 0x10a),
    in which case `host,-arch-capabilities`. {"cpu", "how", "probes"}; says so in the log."""
    if given:
        return {"cpu": given, "how": "given (--qemu-cpu)", "probes": []}
    first = probe_qemu_cpu(qemu, "host", tmp)
    if first["ok"]:
        return {"cpu": "host", "how": "probed: -cpu host works", "probes": [first]}
    if first.get("msr"):
        second = probe_qemu_cpu(qemu, CPU_FALLBACK, tmp)
        if second["ok"]:
            msg = " ".join(first["error"].split())[:300]
            log(f"QEMU with -cpu host dies on this host ({msg}); using -cpu {CPU_FALLBACK}")
            return {"cpu": CPU_FALLBACK,
                    "how": f"probed: -cpu host dies setting an MSR here; {CPU_FALLBACK} works",
                    "probes": [first, second]}
        log(f"warning: QEMU dies with -cpu host ({first['error']}) and with -cpu "
            f"{CPU_FALLBACK} ({second['error']}); using host, its runs will fail")
        return {"cpu": "host", "how": "probed: neither works", "probes": [first, second]}
    log(f"warning: QEMU with -cpu host did not start: {first['error']}; its runs will "
        f"fail too")
    return {"cpu": "host", "how": "probed: QEMU did not start", "probes": [first]}


def build_guest(out_dir: Path) -> Path:
    """Assembles and links bench/guest/guest.S into a 32-bit multiboot ELF."""
    obj = out_dir / "guest.o"
    elf = out_dir / "guest.elf"
    cmd = ["gcc", "-m32", "-c", str(GUEST_DIR / "guest.S"), "-o", str(obj)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        raise SystemExit(f"building the guest: `{' '.join(cmd)}` failed:\n{p.stdout}")
    link = ["ld", "-m", "elf_i386", "-n", "-T", str(GUEST_DIR / "guest.ld"), str(obj),
            "-o", str(elf)]
    # binutils 2.39+ warns about the image's one read-write-execute segment; older ones do
    # not know the option.
    p = subprocess.run(link[:1] + ["--no-warn-rwx-segments"] + link[1:],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        p = subprocess.run(link, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        raise SystemExit(f"linking the guest: `{' '.join(link)}` failed:\n{p.stdout}")
    data = elf.read_bytes()
    at = data.find((0x1BADB002).to_bytes(4, "little"))
    if at < 0 or at >= 8192 or at % 4:
        raise SystemExit(f"{elf}: no multiboot header in the first 8 KiB (found at {at})")
    return elf


def qemu_guest_cmd(qemu: str, cpu: str, image: Path, mem: int, serial: Path, qmp: Path, *,
                   name: str, dirty: int = 0, fill: int = 0, incoming: bool = False,
                   prealloc: bool = False, extra: list[str] | None = None) -> list[str]:
    """QEMU running bench/guest/guest.S: one vCPU, `mem` bytes, its serial port to a file,
    QMP on a unix socket; `incoming` waits for `migrate-incoming` (and `prealloc` faults in
    its RAM first). `extra` goes before the kernel (e.g. -object)."""
    # debug-threads names the vCPU threads ("CPU 0/KVM"), so their CPU can be told apart.
    cmd = [qemu, "-name", f"{name},debug-threads=on",
           "-machine", "pc", "-accel", "kvm", "-cpu", cpu,
           "-m", str(mem // MiB), "-smp", "1",
           "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
           "-serial", f"file:{serial}",
           "-qmp", f"unix:{qmp},server=on,wait=off",
           *(extra or []),
           "-kernel", str(image), "-append", f"dirty={dirty} fill={fill}"]
    if incoming:
        cmd += ["-incoming", "defer"]
        if prealloc:
            cmd += ["-mem-prealloc"]
    return cmd


class SerialLog:
    """Counts the QEMU guest's pass markers ('.') in its serial output file."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.text = b""
        self.passes = 0

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        self.offset += len(chunk)
        if b"loop\n" in self.text:
            self.passes += chunk.count(b".")
        else:
            self.text += chunk
            if b"loop\n" in self.text:
                self.passes = self.text.split(b"loop\n", 1)[1].count(b".")
        if len(self.text) > 4096:
            self.text = self.text[-4096:]

    def has(self, marker: bytes) -> bool:
        return marker in self.text


def wait_serial(serial: SerialLog, proc: subprocess.Popen, want: bytes, timeout: float,
                err_path: Path) -> None:
    """Waits for the QEMU guest to print `want` (b"idle\\n", b"loop\\n"); BenchError if it
    faults, reports an error, or QEMU exits first."""
    end = time.monotonic() + timeout
    while True:
        serial.poll()
        if serial.has(want):
            return
        for bad in (b"!fault", b"error:"):
            if serial.has(bad):
                raise BenchError(f"QEMU guest: {serial.text.decode(errors='replace')}")
        if proc.poll() is not None:
            raise BenchError(f"QEMU source exited with status {proc.returncode}: "
                             f"{tail(err_path)}")
        if time.monotonic() > end:
            raise BenchError(f"QEMU guest did not reach {want!r} within {timeout:.0f} s; "
                             f"serial: {serial.text[-300:]!r}")
        time.sleep(0.02)


def qemu_listen(qd: Qmp) -> int:
    """`migrate-incoming` on a free loopback port (another on a clash); returns the port
    once the destination listens."""
    port = 0
    for _attempt in range(5):
        port = free_port()
        try:
            qd.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        except BenchError as e:
            if "Address already in use" in str(e) or "Failed to bind" in str(e):
                continue
            raise
        break
    end = time.monotonic() + 10
    while not tcp_listening(port):
        if time.monotonic() > end:
            raise BenchError(f"QEMU destination did not listen on port {port}")
        time.sleep(0.01)
    return port


def qemu_wait_migration(qs: Qmp, qd: Qmp, timeout: float, sample=None,
                        poll: float = 0.01) -> dict:
    """After `migrate`: waits for the source to complete (cancelling after `timeout`) and
    for the destination to have loaded everything; the source's final query-migrate.
    `sample(dst_only)` is called while waiting (CPU windows)."""
    end = time.monotonic() + timeout
    while True:
        info = qs.execute("query-migrate")
        st = info.get("status")
        if st == "completed":
            # QEMU sets the status before it fills in the figures: ask again until they
            # are there.
            for _ in range(100):
                if info.get("total-time"):
                    break
                time.sleep(poll)
                info = qs.execute("query-migrate")
            break
        if st in ("failed", "cancelled"):
            raise BenchError(f"QEMU migration {st}: {info.get('error-desc')}")
        if time.monotonic() > end:
            qs.execute("migrate_cancel")
            raise BenchError(f"no convergence: still migrating after {timeout:.0f} s "
                             f"(cancelled)")
        if sample:
            sample(False)
        time.sleep(poll)
    # The source is done when it has sent everything; the destination may still be
    # loading (multifd channels drain after the main stream ends).
    end = time.monotonic() + T_RESUME
    while not dst_completed(qd):
        if time.monotonic() > end:
            raise BenchError(f"QEMU destination did not complete within {T_RESUME:.0f} s "
                             f"of the source")
        if sample:
            sample(True)
        time.sleep(poll)
    return info


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def write_json(path: Path, results: dict) -> None:
    """Writes `results` whole or not at all (a temporary file renamed over `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)
