#!/usr/bin/env python3
"""Idle guests of growing size: what a migration costs when there is nothing to send.

    python3 bench/idle_scale.py [--ferry PATH] [--baseline PATH] [--sizes 8G,64G,256G,1T]
                                [--runs 3] [--out FILE.json] [--markdown]
    python3 bench/idle_scale.py --data-share 0.5 --sizes 1G,2G,4G,8G [--channels 4]

An idle soft guest (`ferry run --backend soft --mem SIZE --dirty 0`) never touches its
memory, so a migration has nothing to send but its device and vCPU state: whatever it costs
grows with the bookkeeping the engine and the VMM keep per page of RAM. For each size, each
round migrates one such guest from one `ferry run` to another on this machine
(tcp:127.0.0.1) with `ferry migrate --json` and records the migration's total time (the
source's `total-time`), and the peak RSS (VmHWM) of both `ferry run` processes once the
migration has completed. With `--baseline`, another binary (for example the previous main)
is measured in the same run, its migrations interleaved with this build's, so that both
columns see the same machine. Before each migration the script waits (up to --settle
seconds) for other work on the machine to quieten, as bench/migration.py does, and records
how many cores other work used during it.

With `--data-share F` the guests are not idle but paused (`-S`) with F of their RAM filled
with incompressible data (`--fill`), the destination pre-faulted (`--prealloc`), so the
table shows what moving data costs as RAM grows: the total time and both processes' CPU
seconds per GiB of data (the rest of RAM is never touched and should cost nothing).
`--channels N` sets `migration.multifd-channels` on the source (the destination follows).

Figures are medians over the rounds with (min-max). Nothing here asserts a timing. Processes
are handled by bench/migration.py's machinery (each in its own session, killed by group on
the way out). Only the Python 3.11 standard library is used. Units: MiB = 2^20 bytes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402  (processes, /proc, settling, formatting)
import migration as mb  # noqa: E402  (Case and run_case: one ferry migration)
from harness import log  # noqa: E402

SCHEMA = "ferry-bench-idle-scale/1"
MiB = 1 << 20


def data_bytes(size: str, share: float) -> int:
    """Bytes of --fill for a guest of `size` with `share` of it data, in whole MiB."""
    return int(h.parse_size(size) * share) // MiB * MiB


def case(size: str, share: float = 0.0, channels: int | None = None) -> mb.Case:
    side = ("--mem", size, "--dirty", "0")
    chans = () if channels is None else ("--global", f"migration.multifd-channels={channels}")
    if share <= 0:
        return mb.Case(f"idle-{size.lower()}", "soft", side + chans, side, live=False,
                       dst_status="running", what=f"{size} never touched")
    fill = f"{data_bytes(size, share) // MiB}M"
    return mb.Case(f"data-{size.lower()}", "soft", side + ("--fill", fill, "-S") + chans,
                   side + ("--prealloc",), live=False, dst_status="paused",
                   what=f"{size} paused, {fill} of data")


def one(ferry: Path, size: str, tmp: Path, rnd: int, label: str, settle: float,
        settle_below: float, share: float = 0.0, channels: int | None = None) -> dict:
    d = tmp / label.replace(" ", "-")
    d.mkdir(exist_ok=True)
    quiet = mb.settle(settle, settle_below) if settle > 0 else {}
    window = h.OtherLoad()
    r = mb.run_case(ferry, case(size, share, channels), d, rnd)
    out = {"size": size, "round": rnd, "build": label, "ok": r.get("ok", False),
           "error": r.get("error"), "warnings": r.get("warnings", []),
           "other_cores": window.cores(), **quiet}
    if r.get("ok"):
        m = r["metrics"]
        out.update({k: m.get(k) for k in ("total_ms", "setup_ms", "downtime_ms",
                                           "rss_src_peak", "rss_dst_peak",
                                           "cpu_src_mig_s", "cpu_dst_mig_s")})
        out["migrate_wall_s"] = r.get("migrate_wall_s")
        if share > 0:
            gib = data_bytes(size, share) / (1 << 30)
            out["data_gib"] = gib
            for k, v in (("ms_per_gib", out.get("total_ms")),
                         ("cpu_src_per_gib", out.get("cpu_src_mig_s")),
                         ("cpu_dst_per_gib", out.get("cpu_dst_mig_s"))):
                out[k] = v / gib if v is not None else None
    return out


def med(rows: list[dict], key: str) -> dict | None:
    return mb.stats([r.get(key) for r in rows if r.get("ok")])


def cell(s: dict | None, kind: str) -> str:
    if not s:
        return "–"
    if kind == "mib":
        f = (lambda x: f"{x / MiB:.1f}")
    elif kind == "s":
        f = (lambda x: f"{x:.2f}")
    else:
        f = (lambda x: f"{x:.0f}")
    lo, hi, m = f(s["min"]), f(s["max"]), f(s["median"])
    return m if lo == hi else f"{m} ({lo}–{hi})"


def render(results: dict) -> str:
    builds = results["builds"]
    rows = results["rows"]
    out = [f"{results['runs']} round(s), medians with (min–max), {results['started']}; "
           f"`{results['command']}`", ""]
    data = results.get("data_share", 0) > 0
    if data:
        out[0:0] = [f"Paused guests with {results['data_share']:.0%} of RAM as incompressible "
                    f"data, channels: {results.get('channels') or 'the default'}.", ""]
    head = ["guest RAM"]
    for label in builds:
        if data:
            head += [f"{label}: total ms", f"{label}: ms per GiB of data",
                     f"{label}: src CPU s/GiB", f"{label}: dst CPU s/GiB"]
        else:
            head += [f"{label}: total ms", f"{label}: src peak RSS MiB",
                     f"{label}: dst peak RSS MiB"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|---|" + "---:|" * (len(head) - 1))
    for size in results["sizes"]:
        line = [size]
        for label in builds:
            rs = [r for r in rows if r["size"] == size and r["build"] == label]
            if data:
                line += [cell(med(rs, "total_ms"), "ms"), cell(med(rs, "ms_per_gib"), "ms"),
                         cell(med(rs, "cpu_src_per_gib"), "s"),
                         cell(med(rs, "cpu_dst_per_gib"), "s")]
            else:
                line += [cell(med(rs, "total_ms"), "ms"), cell(med(rs, "rss_src_peak"), "mib"),
                         cell(med(rs, "rss_dst_peak"), "mib")]
        out.append("| " + " | ".join(line) + " |")
    busy = max((r.get("other_cores") or 0 for r in rows), default=0)
    out.append("")
    out.append(f"Other work on the machine used up to {busy:.2f} cores during a migration.")
    bad = [r for r in rows if not r["ok"]]
    if bad:
        out.append("")
    for r in bad:
        why = " ".join((r.get("error") or "unknown").split())
        out.append(f"- {r['build']}, {r['size']}, round {r['round']} failed: {why[:300]}")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ferry", type=Path, default=h.default_ferry(),
                    help="the build to measure (default: the release binary of CARGO_TARGET_DIR)")
    ap.add_argument("--baseline", type=Path,
                    help="another ferry binary, measured in the same run")
    ap.add_argument("--sizes", default="8G,64G,256G,1T", help="guest RAM sizes (default %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--data-share", type=float, default=0.0, metavar="F",
                    help="paused guests with F (0 to 1) of RAM as data instead of idle ones")
    ap.add_argument("--channels", type=int, default=None,
                    help="migration.multifd-channels of the source (default: ferry's)")
    ap.add_argument("--settle", type=float, default=10.0, metavar="S",
                    help="before each migration wait up to S seconds for other work on the "
                         "machine to quieten (default 10; 0 disables)")
    ap.add_argument("--settle-below", type=float, default=0.25, metavar="CORES",
                    help="what counts as quiet: other work using fewer cores than this "
                         "(default 0.25)")
    ap.add_argument("--out", type=Path,
                    help="JSON results file (default bench/out/idle-scale-<time>.json)")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table to stdout")
    ap.add_argument("--from-json", type=Path, metavar="FILE",
                    help="measure nothing: print the table of an earlier results file")
    a = ap.parse_args(argv)
    if a.from_json:
        print(render(json.loads(a.from_json.read_text())), end="")
        return 0
    builds = {"this build": a.ferry.resolve()}
    if a.baseline:
        builds["baseline"] = a.baseline.resolve()
    for label, exe in builds.items():
        if not exe.is_file():
            raise SystemExit(f"no ferry binary at {exe} ({label})")
    sizes = [s.strip().upper() for s in a.sizes.split(",") if s.strip()]

    h.guard_children(sigint=False)
    started = _dt.datetime.now().astimezone()
    out = a.out or h.REPO / "bench" / "out" / f"idle-scale-{started:%Y%m%d-%H%M%S}.json"
    results = {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(["python3", "bench/idle_scale.py", *argv]),
        "builds": {label: {"path": str(exe), "version": h.first_line([str(exe), "--version"])}
                   for label, exe in builds.items()},
        "git_commit": h.first_line(["git", "rev-parse", "HEAD"], h.REPO),
        "sizes": sizes,
        "runs": a.runs,
        "data_share": a.data_share,
        "channels": a.channels,
        "rows": [],
    }
    tmp = Path(tempfile.mkdtemp(prefix="ferry-idle-scale-"))
    failed = 0
    try:
        for rnd in range(1, a.runs + 1):
            for size in sizes:
                # Alternate which build goes first, so neither always finds a cold machine.
                order = list(builds.items())
                if rnd % 2 == 0:
                    order.reverse()
                for label, exe in order:
                    r = one(exe, size, tmp, rnd, label, a.settle, a.settle_below,
                            a.data_share, a.channels)
                    results["rows"].append(r)
                    if r["ok"]:
                        log(f"[run {rnd}/{a.runs}] {label} {size}: total {r['total_ms']} ms, "
                            f"peak RSS src {r['rss_src_peak'] / MiB:.1f} MiB, "
                            f"dst {r['rss_dst_peak'] / MiB:.1f} MiB")
                    else:
                        failed += 1
                        log(f"[run {rnd}/{a.runs}] {label} {size} FAILED: {r['error']}")
    except KeyboardInterrupt as e:
        results["interrupted"] = str(e) or "Ctrl-C"
    finally:
        h.reap_all()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out}")
    if a.markdown:
        print(render(results), end="")
    if results.get("interrupted"):
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    h.run_main(main)
