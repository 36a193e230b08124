#!/usr/bin/env python3
"""TLS: ferry plaintext against ferry over TLS, next to loopback TCP, in one run.

    python3 bench/tls.py [--runs 3] [--channels 1,4] [--mem 4G] [--fill 1G] [--markdown]

Each round, for each channel count N: loopback TCP with `iperf3 -P N -l 512K` (512 KiB
writes, as ferry's), then a paused soft guest of --mem with --fill of pseudo-random,
incompressible data (the rest zero pages, sent as flags) migrates from one `ferry run` to
another on this machine over tcp:127.0.0.1, once in plaintext and once with TLS
(`ferry tls-creds` credentials on both sides, mutual authentication); which goes first
alternates between rounds. The destination starts with --prealloc so that the host's first
touch of fresh memory is not what is measured.

Per migration: the throughput of page data (bytes of pages with data / total time) and
CPU seconds of both `ferry run` processes (from /proc/PID/stat, just before `ferry migrate`
starts to just after it returns) per GiB of page data. Figures are medians over the rounds
with (min-max). Nothing here asserts a timing.

Results: JSON under bench/results/ (--out); --markdown prints a table. Processes are handled
by bench/migration.py's machinery (each in its own session, killed by group on exit). Only
the Python 3.11 standard library is used. Units: GB = 1e9 bytes, GiB = 2^30 bytes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import migration as mb  # noqa: E402
from migration import log, reap, spawn  # noqa: E402

REPO = mb.REPO
GiB = 1 << 30
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)


def wait_socket(path: Path, p: subprocess.Popen, log_path: Path) -> None:
    mb.Qmp.connect(path, p, path.stem, log_path, deadline=120.0).close()


def iperf(n: int, secs: int = 3) -> float:
    """Loopback TCP with n streams, GB/s."""
    srv = spawn(["iperf3", "-s", "-1", "-p", "5299"], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        out = subprocess.run(
            ["iperf3", "-c", "127.0.0.1", "-p", "5299", "-P", str(n), "-l", "512K",
             "-t", str(secs), "-J"], capture_output=True, text=True, timeout=60)
        j = json.loads(out.stdout)
        return j["end"]["sum_received"]["bits_per_second"] / 8 / 1e9
    finally:
        reap(srv)


def migrate_once(ferry: Path, tmp: Path, n: int, tls: bool, mem: int, fill: int,
                 creds: Path) -> dict:
    d = Path(tempfile.mkdtemp(dir=tmp))
    extra = ["--tls-creds", str(creds)] if tls else []
    dst = spawn([str(ferry), "run", "--backend", "soft", "--mem", str(mem), "--prealloc",
                 "--incoming", "tcp:127.0.0.1:0", "--qmp", str(d / "dst.sock"), *extra],
                stdout=subprocess.PIPE, stderr=open(d / "dst.log", "w"), text=True)
    src = spawn([str(ferry), "run", "--backend", "soft", "--mem", str(mem), "--dirty", "0",
                 "--fill", str(fill), "-S", "--qmp", str(d / "src.sock"), *extra],
                stdout=subprocess.DEVNULL, stderr=open(d / "src.log", "w"))
    try:
        uri = None
        for line in dst.stdout:
            if line.startswith("listening for an incoming migration on "):
                uri = line.split(" on ", 1)[1].strip()
                break
        if uri is None:
            raise mb.BenchError("the destination printed no address")
        wait_socket(d / "dst.sock", dst, d / "dst.log")
        wait_socket(d / "src.sock", src, d / "src.log")
        time.sleep(1.0)
        c0 = cpu_seconds(src.pid) + cpu_seconds(dst.pid)
        load0 = os.getloadavg()[0]
        t0 = time.time()
        out = subprocess.run(
            [str(ferry), "migrate", "--qmp", str(d / "src.sock"), uri, "--channels", str(n),
             "--json"], capture_output=True, text=True, timeout=600)
        wall = time.time() - t0
        c1 = cpu_seconds(src.pid) + cpu_seconds(dst.pid)
        lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
        info = json.loads(lines[-1]) if lines else {}
        if out.returncode != 0 or info.get("status") != "completed":
            raise mb.BenchError(f"migration failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
        ram = info["ram"]
        data = ram["normal-bytes"]
        secs = info["total-time"] / 1e3
        return {
            "channels": n, "tls": tls, "total_s": secs, "wall_s": wall,
            "data_bytes": data, "wire_bytes": ram["transferred"],
            "gbps": data / secs / 1e9, "cpu_s": c1 - c0,
            "cpu_per_gib": (c1 - c0) / (data / GiB), "verified": info.get("verified"),
            # The machine's 1-minute load before and after: other work skews the figures.
            "load": [load0, os.getloadavg()[0]],
        }
    finally:
        reap(src)
        reap(dst)


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ferry", default=str(REPO / "target/release/ferry"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--channels", default="1,4")
    ap.add_argument("--mem", default="4G")
    ap.add_argument("--fill", default="1G")
    ap.add_argument("--out", default=str(REPO / "bench/results"))
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    ferry = Path(a.ferry)
    mem, fill = parse_size(a.mem), parse_size(a.fill)
    chans = [int(x) for x in a.channels.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-tls-"))
    creds = tmp / "creds"
    subprocess.run([str(ferry), "tls-creds", str(creds)], check=True,
                   capture_output=True)
    rows: list[dict] = []
    tcp: dict[int, list[float]] = {n: [] for n in chans}
    for r in range(a.runs):
        for n in chans:
            tcp[n].append(iperf(n))
            order = [False, True] if r % 2 == 0 else [True, False]
            for tls in order:
                m = migrate_once(ferry, tmp, n, tls, mem, fill, creds)
                m["round"] = r
                rows.append(m)
                log(f"round {r} ch {n} {'tls' if tls else 'plain'}: {m['gbps']:.2f} GB/s, "
                    f"{m['cpu_per_gib']:.2f} CPU s/GiB ({m['verified']}), "
                    f"load {m['load'][0]:.1f}")
    res = {"schema": "ferry-bench-tls/1", "when": _dt.datetime.now().isoformat(),
           "ferry": str(ferry), "mem": mem, "fill": fill, "runs": a.runs,
           "tcp_gbps": tcp, "migrations": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"tls-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    f.write_text(json.dumps(res, indent=1))
    log(f"results in {f}")
    md = ["| channels | loopback TCP GB/s | ferry plaintext GB/s | ferry TLS GB/s | TLS / plaintext "
          "| plaintext CPU s/GiB | TLS CPU s/GiB |", "|---|---|---|---|---|---|---|"]
    for n in chans:
        p = [m for m in rows if m["channels"] == n and not m["tls"]]
        t = [m for m in rows if m["channels"] == n and m["tls"]]
        ratio = statistics.median([m["gbps"] for m in t]) / statistics.median(
            [m["gbps"] for m in p])
        md.append(f"| {n} | {med(tcp[n])} | {med([m['gbps'] for m in p])} | "
                  f"{med([m['gbps'] for m in t])} | {ratio:.2f} | "
                  f"{med([m['cpu_per_gib'] for m in p])} | {med([m['cpu_per_gib'] for m in t])} |")
    loads = [m["load"][0] for m in rows]
    md.append(f"\n1-minute load average before each migration: {med(loads)}")
    if a.markdown:
        print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
