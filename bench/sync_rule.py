#!/usr/bin/env python3
"""The two multifd sync rules side by side in one run: a sync after every section (0.1's
rule, `migration.multifd-flush-after-each-section=on`, machine type ferry-0.1's value)
against one sync per pass over memory (ferry-0.2's default), next to loopback TCP with
as many streams as data channels.

    python3 bench/sync_rule.py [--runs 3] [--channels 4] [--cases paused-16g,live-4g]
                               [--ferry target/release/ferry] [--out FILE.json]

Cases, each with both rules, in an order that alternates from round to round:

* paused-16g: a stopped soft guest of 16 GiB with 4 GiB of incompressible data: one
  long pass of two seconds or more, so twenty-odd sections under 0.1's rule. The
  destination receives into never-touched memory, whose first-touch faults on this
  host make the figures noisy;
* paused-8g-prealloc: the same 4 GiB in 8 GiB, the destination pre-faulted
  (`--prealloc`), which takes the first-touch noise out (16 GiB pre-faulted beside the
  source would not fit a 24 GiB host);
* live-4g: a running KVM guest of 4 GiB rewriting 1 GiB per pass.

Both sides get the rule with `-global`, the data channels with
`-global migration.multifd-channels=N`. Reported per rule: the syncs the source made,
total time, pass 0's throughput and the downtime. Nothing here asserts a timing; medians
with min-max, markdown to stdout.
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

BASES = {
    "paused-16g": ("soft", ("--mem", "16G", "--dirty", "0", "--fill", "4G", "-S"),
                   ("--mem", "16G", "--dirty", "0"), False, "paused"),
    "paused-8g-prealloc": ("soft", ("--mem", "8G", "--dirty", "0", "--fill", "4G", "-S"),
                           ("--mem", "8G", "--dirty", "0", "--prealloc"), False, "paused"),
    "live-4g": ("kvm", ("--mem", "4G", "--dirty", "1G"), ("--mem", "4G", "--dirty", "1G"),
                True, "running"),
}


def case(base: str, per_section: bool, channels: int) -> m.Case:
    backend, src, dst, live, st = BASES[base]
    g = ("-global", f"migration.multifd-flush-after-each-section={'on' if per_section else 'off'}",
         "-global", f"migration.multifd-channels={channels}")
    rule = "per-section" if per_section else "per-pass"
    return m.Case(f"{base}-{rule}", backend, src + g, dst + g, live=live, dst_status=st)


def fmt(s: dict | None, kind: str) -> str:
    if not s:
        return "-"
    f = {"ms": lambda x: f"{x:.0f}", "gbs": lambda x: f"{x:.2f}", "n": lambda x: f"{x:.0f}"}[kind]
    return f"{f(s['median'])} ({f(s['min'])}-{f(s['max'])})"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--cases", default=",".join(BASES))
    ap.add_argument("--ferry", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--iperf-seconds", type=int, default=3)
    a = ap.parse_args(argv)
    ferry = a.ferry.resolve() if a.ferry else h.build_ferry()
    iperf3 = h.ensure_iperf3()
    bases = a.cases.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-sync-"))
    rounds = []
    try:
        for rnd in range(1, a.runs + 1):
            r: dict = {"round": rnd}
            h.settle(10.0, 0.25)
            r["tcp"] = h.ref_tcp(iperf3, a.iperf_seconds, tmp, streams=a.channels)
            h.log(f"[{rnd}/{a.runs}] loopback TCP, {a.channels} streams: {r['tcp']['gbs']:.2f} GB/s")
            for b in bases:
                rules = [True, False] if rnd % 2 else [False, True]
                for per_section in rules:
                    c = case(b, per_section, a.channels)
                    h.settle(10.0, 0.25)
                    res = m.run_case(ferry, c, tmp, rnd)
                    if res.get("ok"):
                        res["syncs"] = (res["info"].get("multifd") or {}).get("syncs")
                        res.pop("info", None)
                        mt = res["metrics"]
                        h.log(f"[{rnd}/{a.runs}] {c.name}: {res['syncs']} syncs, total "
                              f"{mt['total_ms']} ms, pass 0 {mt['pass0_gbs'] or 0:.2f} GB/s, "
                              f"downtime {mt['downtime_ms']} ms")
                    else:
                        h.log(f"[{rnd}/{a.runs}] {c.name} FAILED: {res.get('error')}")
                    r[c.name] = res
            rounds.append(r)
    finally:
        h.reap_all()

    def col(name: str, get) -> dict | None:
        return h.stats([get(r[name]) for r in rounds if r.get(name, {}).get("ok")])

    tcp = h.stats([r["tcp"]["gbs"] for r in rounds])
    out = [
        f"{a.runs} rounds, {a.channels} data channels; medians (min-max); loopback TCP with "
        f"{a.channels} streams in the same run: {fmt(tcp, 'gbs')} GB/s",
        "",
        "| case | sync rule | syncs | total ms | pass 0 GB/s | downtime ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for b in bases:
        for rule in ("per-section", "per-pass"):
            n = f"{b}-{rule}"
            out.append(
                f"| {b} | {rule} | {fmt(col(n, lambda x: x['syncs']), 'n')} | "
                f"{fmt(col(n, lambda x: x['metrics']['total_ms']), 'ms')} | "
                f"{fmt(col(n, lambda x: x['metrics']['pass0_gbs']), 'gbs')} | "
                f"{fmt(col(n, lambda x: x['metrics']['downtime_ms']), 'ms')} |")
        ps = col(f"{b}-per-section", lambda x: x["metrics"]["total_ms"])
        pp = col(f"{b}-per-pass", lambda x: x["metrics"]["total_ms"])
        if ps and pp:
            out.append(f"| {b} | per-pass / per-section total time | | "
                       f"{pp['median'] / ps['median']:.3f} | | |")
    print("\n".join(out))
    path = a.out or Path(tempfile.gettempdir()) / f"sync-rule-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"command": " ".join(["python3", "bench/sync_rule.py", *argv]),
                                "rounds": rounds}, indent=1))
    h.log(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
