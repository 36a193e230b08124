#!/usr/bin/env python3
"""Downtime of a migration with a large device, with device precopy against stop-copy,
side by side in one run, next to loopback TCP moving as many bytes.

    python3 bench/device_precopy.py [--runs 5] [--accel 256M] [--mem 1G] [--dirty 64M]
                                    [--ferry target/release/ferry] [--out FILE.json]

Each round runs, in an order that alternates from round to round:

* precopy: a KVM guest with `--accel SIZE` on both sides (both hosts can precopy it),
  machine type ferry-0.2: the device's memory moves in records while the guest runs,
  the destination acknowledges it, and the downtime carries what the device thread
  rewrote since;
* stop-copy: the same with `--accel SIZE,precopy=off` on both sides: all of the
  device's memory moves in the downtime, as a VFIO device without precopy support (and
  as release 0.1 moved it);
* loopback TCP (iperf3, one stream) for the reference: SIZE at that rate is the least
  any stop-copy of the device could cost.

The downtime limit is raised to 5 s (`-global migration.downtime-limit=5000`) on both
sides, so that stop-copy converges at all (its expected downtime is over the default
300 ms); with precopy the source switches over once the device is acknowledged and what
is left fits. The device thread rewrites 64 MiB/s all along. Nothing here asserts a
timing. Figures are medians with min-max; the markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402  (processes, references, statistics)
import migration as m  # noqa: E402  (bench/migration.py's cases)


def case(name: str, accel: str, a: argparse.Namespace) -> m.Case:
    side = ("--mem", a.mem, "--dirty", a.dirty, "--machine", "ferry-0.2", "--accel", accel,
            "-global", "migration.downtime-limit=5000")
    return m.Case(name, "kvm", side, side, live=True, dst_status="running",
                  what=f"KVM guest with a {a.accel} accelerator, {name}")


def device_figures(info: dict) -> dict:
    acc = [d for d in info.get("devices") or [] if d.get("name") == "accel"]
    d = acc[0] if acc else {}
    b = info.get("downtime-breakdown") or {}
    return {
        "mode": d.get("mode"),
        "before_switchover": d.get("precopy-bytes", 0),
        "in_downtime": d.get("final-precopy-bytes", 0) + d.get("stop-copy-bytes", 0),
        "acked_ms": d.get("acked-ms"),
        "devices_ms": b.get("devices-ms"),
    }


def fmt(s: dict | None, unit: str) -> str:
    if not s:
        return "-"
    if unit == "MiB":
        f = lambda x: f"{x / 2**20:.1f}"  # noqa: E731
    else:
        f = lambda x: f"{x:.0f}"  # noqa: E731
    return f"{f(s['median'])} ({f(s['min'])}-{f(s['max'])})"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--accel", default="256M")
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--dirty", default="64M")
    ap.add_argument("--ferry", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--iperf-seconds", type=int, default=3)
    a = ap.parse_args(argv)
    ferry = a.ferry.resolve() if a.ferry else h.build_ferry()
    iperf3 = h.ensure_iperf3()
    cases = [case("precopy", a.accel, a), case("stop-copy", f"{a.accel},precopy=off", a)]
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-precopy-"))
    rounds = []
    try:
        for rnd in range(1, a.runs + 1):
            order = cases if rnd % 2 else list(reversed(cases))
            r: dict = {"round": rnd}
            h.settle(10.0, 0.25)
            r["tcp"] = h.ref_tcp(iperf3, a.iperf_seconds, tmp)
            h.log(f"[{rnd}/{a.runs}] loopback TCP: {r['tcp']['gbs']:.2f} GB/s")
            for c in order:
                h.settle(10.0, 0.25)
                res = m.run_case(ferry, c, tmp, rnd)
                if res.get("ok"):
                    res["device"] = device_figures(res["info"])
                    res.pop("info", None)
                    mt = res["metrics"]
                    h.log(f"[{rnd}/{a.runs}] {c.name}: downtime {mt['downtime_ms']} ms "
                          f"(devices {res['device']['devices_ms']:.0f} ms), total "
                          f"{mt['total_ms']} ms, device {res['device']['mode']}")
                else:
                    h.log(f"[{rnd}/{a.runs}] {c.name} FAILED: {res.get('error')}")
                r[c.name] = res
            rounds.append(r)
    finally:
        h.reap_all()

    def col(name: str, get) -> dict | None:
        return h.stats([get(r[name]) for r in rounds if r.get(name, {}).get("ok")])

    size = m_bytes(a.accel)
    tcp = h.stats([r["tcp"]["gbs"] for r in rounds])
    rows = []
    for c in cases:
        n = c.name
        rows.append((
            n,
            fmt(col(n, lambda x: x["metrics"]["downtime_ms"]), "ms"),
            fmt(col(n, lambda x: x["device"]["devices_ms"]), "ms"),
            fmt(col(n, lambda x: x["metrics"]["total_ms"]), "ms"),
            fmt(col(n, lambda x: x["device"]["before_switchover"]), "MiB"),
            fmt(col(n, lambda x: x["device"]["in_downtime"]), "MiB"),
            fmt(col(n, lambda x: x["device"]["acked_ms"]), "ms"),
        ))
    d_pre = col("precopy", lambda x: x["metrics"]["downtime_ms"])
    d_stop = col("stop-copy", lambda x: x["metrics"]["downtime_ms"])
    out = [
        f"{a.runs} rounds, KVM, --mem {a.mem} --dirty {a.dirty} --accel {a.accel} "
        f"(device thread rewriting 64 MiB/s), machine type ferry-0.2, "
        f"downtime limit 5000 ms; medians (min-max)",
        "",
        "| device state | downtime ms | of it devices ms | total ms | device MiB before the "
        "switchover | device MiB in the downtime | acknowledged at ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {' | '.join(row)} |" for row in rows],
    ]
    if tcp:
        floor = size / (tcp["median"] * 1e9) * 1e3
        out.append(f"| reference: {a.accel} over loopback TCP at {tcp['median']:.2f} GB/s "
                   f"(one stream, same run) | {floor:.0f} | | | | | |")
    if d_pre and d_stop:
        out += ["", f"precopy downtime / stop-copy downtime (medians): "
                    f"{d_pre['median'] / d_stop['median']:.3f}"]
    print("\n".join(out))
    path = a.out or Path(tempfile.gettempdir()) / f"device-precopy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"command": " ".join(["python3", "bench/device_precopy.py", *argv]),
                                "rounds": rounds}, indent=1))
    h.log(f"results in {path}")
    return 0


def m_bytes(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
