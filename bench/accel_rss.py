#!/usr/bin/env python3
"""Peak memory of both sides of a KVM migration with an accelerator, next to what the
processes held before the migration began (measured in the same run).

Each round starts a source (`ferry run --accel SIZE`) and a destination, lets the guest
run, reads each process's VmRSS just before `ferry migrate`, migrates, then reads VmHWM
(peak RSS) of both. The goal for streamed device state is peak = before + a few MiB on
the source, and guest RAM + device memory + a few MiB on the destination.

    python3 bench/accel_rss.py [--ferry target/release/ferry] [--mem 1G] [--dirty 16M]
                               [--accel 256M] [--downtime-limit 3000] [--runs 3]
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def mib(kib):
    return kib / 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(path, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


def qmp(path, command):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        f = s.makefile("rw")
        f.readline()
        for cmd in ({"execute": "qmp_capabilities"}, {"execute": command}):
            f.write(json.dumps(cmd) + "\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
        return reply


def one_round(args, tmp, n):
    src_q, dst_q = f"{tmp}/src{n}.sock", f"{tmp}/dst{n}.sock"
    uri = f"tcp:127.0.0.1:{free_port()}"
    common = ["--backend", "kvm", "--mem", args.mem, "--accel", args.accel]
    procs = []
    try:
        src = subprocess.Popen(
            [args.ferry, "run", "--qmp", src_q, "--dirty", args.dirty, *common],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(src)
        dst = subprocess.Popen(
            [args.ferry, "run", "--qmp", dst_q, "--incoming", uri, *common],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(dst)
        wait_for(src_q, src)
        wait_for(dst_q, dst)
        # Long enough for the device thread to touch all of its memory (64 MiB/s).
        time.sleep(args.settle)
        before = (status_kib(src.pid, "VmRSS"), status_kib(dst.pid, "VmRSS"))
        out = subprocess.run(
            [args.ferry, "migrate", "--qmp", src_q, "--json",
             "--downtime-limit", str(args.downtime_limit), uri],
            capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"migrate failed: {out.stderr.strip()}")
        updates = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        final = updates[-1]
        # What the source expected, at the last pass before it stopped the guest.
        expected = [p["expected-downtime-ms"] for p in final.get("passes", [])
                    if not p.get("final-pass")]
        time.sleep(0.5)
        peak = (status_kib(src.pid, "VmHWM"), status_kib(dst.pid, "VmHWM"))
        return {
            "before_mib": [mib(b) for b in before],
            "peak_mib": [mib(p) for p in peak],
            "status": final.get("status"),
            "downtime_ms": final.get("downtime"),
            "expected_downtime_ms": round(expected[-1]) if expected else None,
        }
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ferry", default="target/release/ferry")
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--dirty", default="16M")
    ap.add_argument("--accel", default="256M")
    ap.add_argument("--downtime-limit", type=int, default=3000)
    ap.add_argument("--baseline", help="another ferry binary, measured in the same run, "
                    "its rounds interleaved with --ferry's")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--settle", type=float, default=6.0,
                    help="seconds the guest and the device run before the migration")
    args = ap.parse_args()
    builds = [("this build", args.ferry)]
    if args.baseline:
        builds.append(("baseline", args.baseline))
    rounds = {label: [] for label, _ in builds}
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.runs):
            for label, binary in builds:
                r = one_round(argparse.Namespace(**{**vars(args), "ferry": binary}), tmp, n)
                rounds[label].append(r)
                print(f"{label} round {n}: {json.dumps(r)}", file=sys.stderr)
    med = statistics.median
    print(f"accelerator {args.accel}, guest RAM {args.mem} ({args.dirty} dirtied), "
          f"downtime limit {args.downtime_limit} ms, {args.runs} rounds, medians:")
    print()
    print("| build | side | RSS before the migration | peak RSS | peak - before |")
    print("|---|---|---:|---:|---:|")
    for label, _ in builds:
        for i, side in enumerate(["source", "destination"]):
            b = med([r["before_mib"][i] for r in rounds[label]])
            p = med([r["peak_mib"][i] for r in rounds[label]])
            print(f"| {label} | {side} | {b:.0f} MiB | {p:.0f} MiB | {p - b:.0f} MiB |")
    print()
    print("| build | expected downtime before the switchover | downtime | status |")
    print("|---|---:|---:|---|")
    for label, _ in builds:
        rs = rounds[label]
        exp = [r["expected_downtime_ms"] for r in rs if r["expected_downtime_ms"] is not None]
        down = [r["downtime_ms"] for r in rs if r["downtime_ms"] is not None]
        print(f"| {label} | {med(exp) if exp else '-'} ms | {med(down) if down else '-'} ms "
              f"| {', '.join(str(r['status']) for r in rs)} |")

if __name__ == "__main__":
    main()
