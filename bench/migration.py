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

Only the Python 3.11 standard library is used. Processes, QMP, the references and the
formatting are bench/harness.py's: every child runs in its own session (so Ctrl-C reaches
this script, not them) with a parent-death signal, and is killed by process group on the way
out: normal exit, exception, Ctrl-C, SIGTERM or SIGHUP. Units: GB = 1e9 bytes,
GiB = 2^30 bytes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402  (processes, QMP, /proc, references, formatting)
from harness import (BenchError, OtherLoad, Qmp, cell, cpu_seconds, cpu_split,  # noqa: E402
                     fmt_num, last_json, loadavg, log, peak_rss, quit_and_wait, reap,
                     reap_all, run_tracked, settle, spawn, stats, tail, wait_guest_ran,
                     wait_uri)

REPO = h.REPO
SCHEMA = "ferry-bench-migration/1"


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

# Timeouts, seconds (the others are the harness's).
T_MIGRATE = 300.0


# --------------------------------------------------------------------------------------------
# A ferry case
# --------------------------------------------------------------------------------------------


def ferry_cmd(ferry: Path, case: Case, side_args: tuple[str, ...], sock: Path,
              incoming: bool) -> list[str]:
    cmd = [str(ferry), "run", "--backend", case.backend, *side_args]
    if incoming:
        cmd += ["--incoming", "tcp:127.0.0.1:0"]
    return cmd + ["--qmp", str(sock)]



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
        sys0_dst = cpu_split(dst.pid)[1]
        t_mig = time.monotonic()
        r = run_tracked([str(ferry), "migrate", "--qmp", str(d / "src.sock"), uri, "--json"],
                        timeout=T_MIGRATE, stdin=subprocess.DEVNULL)
        res["migrate_wall_s"] = round(time.monotonic() - t_mig, 3)
        cpu1 = (cpu_seconds(src.pid), cpu_seconds(dst.pid))
        sys1_dst = cpu_split(dst.pid)[1]
        info = last_json(r.stdout)
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
        cpu_after = [cpu_split(p.pid) for p in (src, dst)]
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
# Summary and markdown
# --------------------------------------------------------------------------------------------

METRICS = ["total_ms", "downtime_ms", "setup_ms", "transferred_bytes", "pass0_gbs", "overall_gbs",
           "passes", "cpu_src_s", "cpu_dst_s", "cpu_src_mig_s", "cpu_dst_mig_s",
           "rss_src_peak", "rss_dst_peak", "pass0_to_tcp"]




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


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if a.from_json:
        print(render_markdown(json.loads(a.from_json.read_text())), end="")
        return 0

    h.guard_children(sigint=False)

    started = _dt.datetime.now().astimezone()
    out = a.out or REPO / "bench" / "out" / f"migration-{started:%Y%m%d-%H%M%S}.json"
    ferry = h.pick_ferry(a.ferry, a.no_build)
    iperf3 = h.ensure_iperf3()
    machine = h.machine_info(ferry, iperf3)
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
                        r = h.ref_tcp(iperf3, a.iperf_seconds, tmp)
                        log(f"{tag} loopback TCP 1 stream: {r['gbs']:.2f} GB/s")
                    except BenchError as e:
                        r = {"error": str(e)}
                        failed += 1
                        log(f"{tag} loopback TCP FAILED: {e}")
                    round_res["tcp"] = r
                elif item == "memcpy":
                    try:
                        r = h.ref_memcpy(a.memcpy_mib << 20, a.memcpy_reps)
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
        h.write_json(out, results)
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
    h.run_main(main)
