#!/usr/bin/env python3
"""TLS: ferry and QEMU 10.0, each in plaintext and over TLS, next to loopback TCP, in one run.

    python3 bench/tls.py [--runs 3] [--channels 1,4] [--mem 4G] [--fill 1G] [--markdown]

Each round, for each channel count N: loopback TCP with `iperf3 -P N -l 512K` (512 KiB
writes, as ferry's), then four migrations of a paused guest of --mem with --fill of
pseudo-random, incompressible data (the rest zero pages, sent as flags), over
tcp:127.0.0.1 on this machine, in an order that is reversed every other round:

- ferry, plaintext and TLS: a soft guest (`ferry run --fill`) migrates from one `ferry run`
  to another with `ferry migrate --channels N`; for TLS both sides get the credentials of
  `ferry tls-creds` (TLS 1.3, mutual authentication);
- QEMU, plaintext and TLS: bench/guest/guest.S (as bench/compare.py builds and runs it)
  fills the same amount of its RAM with incompressible data and is stopped; it migrates
  between two `qemu-system-x86_64` processes with the multifd capability and N channels.
  For TLS both sides get `-object tls-creds-x509,id=tls0,dir=DIR,endpoint=server|client,
  verify-peer=on` on the same credentials directory (ferry writes QEMU's layout) and
  `migrate-set-parameters tls-creds=tls0`; the source checks the destination's certificate
  for --tls-hostname (localhost, a name the certificate carries).

Both destinations start with their RAM faulted in (ferry --prealloc, QEMU -mem-prealloc), so
that the host's first touch of fresh memory is not what is measured. QEMU is 10.0 or newer
unless --qemu names another, with the -cpu that works on this host (see bench/compare.py).

Per migration: the throughput of page data (bytes of pages with data / total time: ferry's
total-time; for QEMU, its source's MIGRATION setup event to its destination's MIGRATION
completed event, as bench/compare.py measures it, because QEMU's own total-time ends before
the destination has loaded everything) and CPU seconds of both processes (from
/proc/PID/stat, just before the migration starts to just after it ends) per GiB of page data.
Figures are medians over the rounds with (min-max). Nothing here asserts a timing.

Results: JSON under bench/results/ (--out); --markdown prints a table, --from-json FILE
prints it again from a results file (also those from before QEMU was measured). Processes
are handled by bench/harness.py (each in its own session, killed by group on exit). Only the
Python 3.11 standard library is used. Units: GB = 1e9 bytes, GiB = 2^30 bytes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402  (processes, QMP, /proc, references, QEMU)
from harness import BenchError, Qmp, log, reap, spawn  # noqa: E402

REPO = h.REPO
SCHEMA = "ferry-bench-tls/2"
GiB = h.GiB
TLS_ID = "tls0"

# Timeouts, seconds.
T_START = 120.0      # a process up: RAM filled or faulted in, QMP answering
T_GUEST = 180.0      # QEMU's guest to boot (firmware runs emulated on PVM hosts) and fill
T_MIGRATE = 600.0


def wait_socket(path: Path, p: subprocess.Popen, log_path: Path) -> None:
    Qmp.connect(path, p, path.stem, log_path, deadline=T_START).close()


def migrate_ferry(ferry: Path, tmp: Path, n: int, tls: bool, mem: int, fill: int,
                  creds: Path) -> dict:
    d = Path(tempfile.mkdtemp(dir=tmp, prefix="ferry-"))
    extra = ["--tls-creds", str(creds)] if tls else []
    src = dst = None
    try:
        with open(d / "dst.out", "wb") as o, open(d / "dst.log", "wb") as e:
            dst = spawn([str(ferry), "run", "--backend", "soft", "--mem", str(mem),
                         "--prealloc", "--incoming", "tcp:127.0.0.1:0",
                         "--qmp", str(d / "dst.sock"), *extra],
                        stdin=subprocess.DEVNULL, stdout=o, stderr=e)
        with open(d / "src.log", "wb") as e:
            src = spawn([str(ferry), "run", "--backend", "soft", "--mem", str(mem),
                         "--dirty", "0", "--fill", str(fill), "-S",
                         "--qmp", str(d / "src.sock"), *extra],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=e)
        uri = h.wait_uri(d / "dst.out", dst, d / "dst.log", timeout=T_START)
        wait_socket(d / "dst.sock", dst, d / "dst.log")
        wait_socket(d / "src.sock", src, d / "src.log")
        time.sleep(1.0)
        c0 = h.cpu_seconds(src.pid) + h.cpu_seconds(dst.pid)
        load0 = os.getloadavg()[0]
        t0 = time.time()
        out = h.run_tracked(
            [str(ferry), "migrate", "--qmp", str(d / "src.sock"), uri, "--channels", str(n),
             "--json"], timeout=T_MIGRATE, stdin=subprocess.DEVNULL)
        wall = time.time() - t0
        c1 = h.cpu_seconds(src.pid) + h.cpu_seconds(dst.pid)
        info = h.last_json(out.stdout) or {}
        if out.returncode != 0 or info.get("status") != "completed":
            raise BenchError(f"migration failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
        ram = info["ram"]
        data = ram["normal-bytes"]
        secs = info["total-time"] / 1e3
        return {
            "system": "ferry", "channels": n, "tls": tls, "total_s": secs, "wall_s": wall,
            "data_bytes": data, "wire_bytes": ram["transferred"],
            "gbps": data / secs / 1e9, "cpu_s": c1 - c0,
            "cpu_per_gib": (c1 - c0) / (data / GiB), "verified": info.get("verified"),
            # The machine's 1-minute load before and after: other work skews the figures.
            "load": [load0, os.getloadavg()[0]],
        }
    finally:
        reap(src)
        reap(dst)


class QemuSide:
    """What a QEMU migration needs besides the channel count and TLS."""

    def __init__(self, qemu: str, cpu: str, image: Path, tls_hostname: str):
        self.qemu, self.cpu, self.image, self.tls_hostname = qemu, cpu, image, tls_hostname


def migrate_qemu(q: QemuSide, tmp: Path, n: int, tls: bool, mem: int, fill: int,
                 creds: Path) -> dict:
    d = Path(tempfile.mkdtemp(dir=tmp, prefix="qemu-"))

    def tls_object(endpoint: str) -> list[str]:
        if not tls:
            return []
        return ["-object", f"tls-creds-x509,id={TLS_ID},dir={creds},endpoint={endpoint},"
                           f"verify-peer=on"]

    src_cmd = h.qemu_guest_cmd(q.qemu, q.cpu, q.image, mem, d / "src.serial", d / "src.qmp",
                               name="ferry-bench-tls-src", fill=fill,
                               extra=tls_object("client"))
    dst_cmd = h.qemu_guest_cmd(q.qemu, q.cpu, q.image, mem, d / "dst.serial", d / "dst.qmp",
                               name="ferry-bench-tls-dst", fill=fill, incoming=True,
                               prealloc=True, extra=tls_object("server"))
    src = dst = qs = qd = None
    warnings: list[str] = []
    try:
        with open(d / "dst.err", "wb") as e:
            dst = spawn(dst_cmd, stdin=subprocess.DEVNULL, stdout=e, stderr=subprocess.STDOUT)
        with open(d / "src.err", "wb") as e:
            src = spawn(src_cmd, stdin=subprocess.DEVNULL, stdout=e, stderr=subprocess.STDOUT)
        qs = Qmp.connect(d / "src.qmp", src, "QEMU source", d / "src.err", deadline=T_START)
        qd = Qmp.connect(d / "dst.qmp", dst, "QEMU destination", d / "dst.err",
                         deadline=T_START)
        h.wait_serial(h.SerialLog(d / "src.serial"), src, b"idle\n", T_GUEST, d / "src.err")
        qs.execute("stop")
        for side in (qs, qd):
            side.execute("migrate-set-capabilities",
                         {"capabilities": [{"capability": "multifd", "state": True},
                                           {"capability": "events", "state": True}]})
            params: dict = {"multifd-channels": n}
            if tls:
                params["tls-creds"] = TLS_ID
            side.execute("migrate-set-parameters", params)
        # No bandwidth cap (QEMU's default is 128 MiB/s; ferry has none).
        src_params: dict = {"max-bandwidth": 1 << 40}
        if tls:
            src_params["tls-hostname"] = q.tls_hostname
        qs.execute("migrate-set-parameters", src_params)
        port = h.qemu_listen(qd)
        time.sleep(1.0)
        c0 = h.cpu_seconds(src.pid) + h.cpu_seconds(dst.pid)
        load0 = os.getloadavg()[0]
        t0 = time.time()
        qs.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = h.qemu_wait_migration(qs, qd, T_MIGRATE)
        wall = time.time() - t0
        c1 = h.cpu_seconds(src.pid) + h.cpu_seconds(dst.pid)
        span = h.start_to_done_ms(qs, qd)
        st = qd.execute("query-status").get("status")
        if st != "paused":
            warnings.append(f"destination is {st!r}, expected 'paused'")
        ram = info.get("ram") or {}
        data = ram["normal-bytes"]
        secs = (span if span is not None else info["total-time"]) / 1e3
        params = qs.execute("query-migrate-parameters")
        return {
            "system": "qemu", "channels": n, "tls": tls, "total_s": secs, "wall_s": wall,
            "total_reported_s": info.get("total-time", 0) / 1e3,
            "data_bytes": data, "wire_bytes": ram.get("transferred"),
            "gbps": data / secs / 1e9, "cpu_s": c1 - c0,
            "cpu_per_gib": (c1 - c0) / (data / GiB),
            "verified": None,  # QEMU's guest memory cannot be checked like ferry's
            "load": [load0, os.getloadavg()[0]],
            "multifd_channels": params.get("multifd-channels"),
            "tls_creds": params.get("tls-creds"),
            "tls_hostname": params.get("tls-hostname"),
            "warnings": warnings,
        }
    except BenchError as e:
        raise BenchError(f"{e}\nsource: {h.tail(d / 'src.err', 5)}\n"
                         f"destination: {h.tail(d / 'dst.err', 5)}") from None
    finally:
        try:
            h.quit_and_wait(qs, src, "QEMU source", warnings, timeout=10)
            h.quit_and_wait(qd, dst, "QEMU destination", warnings, timeout=10)
        finally:
            reap(src)
            reap(dst)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def med(xs: list[float]) -> str:
    if not xs:
        return "–"
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def ratio(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return "–"
    return f"{statistics.median(a) / statistics.median(b):.2f}"


def render_markdown(res: dict) -> str:
    rows = [m for m in res["migrations"] if m.get("ok", True)]
    chans = res.get("channels") or sorted({m["channels"] for m in res["migrations"]})
    tcp = {int(k): v for k, v in res["tcp_gbps"].items()}

    def pick(system: str, n: int, tls: bool, key: str) -> list[float]:
        return [m[key] for m in rows if m.get("system", "ferry") == system
                and m["channels"] == n and m["tls"] == tls]

    md: list[str] = []
    with_qemu = any(m.get("system") == "qemu" for m in res["migrations"]) or res.get("qemu")
    if not with_qemu:
        # As the driver printed it before QEMU was measured.
        md += ["| channels | loopback TCP GB/s | ferry plaintext GB/s | ferry TLS GB/s "
               "| TLS / plaintext | plaintext CPU s/GiB | TLS CPU s/GiB |",
               "|---|---|---|---|---|---|---|"]
        for n in chans:
            md.append(h.md_row([
                n, med(tcp.get(n, [])), med(pick("ferry", n, False, "gbps")),
                med(pick("ferry", n, True, "gbps")),
                ratio(pick("ferry", n, True, "gbps"), pick("ferry", n, False, "gbps")),
                med(pick("ferry", n, False, "cpu_per_gib")),
                med(pick("ferry", n, True, "cpu_per_gib"))]))
    else:
        q = res.get("qemu") or {}
        md.append(f"ferry `{res.get('git_describe')}`, {q.get('version')} with "
                  f"`-cpu {q.get('cpu')}`; paused guests of {h.size_arg(res['mem'])} with "
                  f"{h.size_arg(res['fill'])} of incompressible data; {res['runs']} run(s), "
                  f"medians (min-max). Throughput: page data / total time. CPU: both "
                  f"processes, seconds per GiB of page data.")
        md.append("")
        md += h.md_table(
            ["channels", "loopback TCP GB/s", "ferry plaintext GB/s", "ferry TLS GB/s",
             "QEMU plaintext GB/s", "QEMU TLS GB/s", "ferry TLS / QEMU TLS",
             "ferry TLS / ferry plaintext", "ferry plaintext CPU s/GiB", "ferry TLS CPU s/GiB",
             "QEMU plaintext CPU s/GiB", "QEMU TLS CPU s/GiB"],
            [[n, med(tcp.get(n, [])),
              med(pick("ferry", n, False, "gbps")), med(pick("ferry", n, True, "gbps")),
              med(pick("qemu", n, False, "gbps")), med(pick("qemu", n, True, "gbps")),
              ratio(pick("ferry", n, True, "gbps"), pick("qemu", n, True, "gbps")),
              ratio(pick("ferry", n, True, "gbps"), pick("ferry", n, False, "gbps")),
              med(pick("ferry", n, False, "cpu_per_gib")),
              med(pick("ferry", n, True, "cpu_per_gib")),
              med(pick("qemu", n, False, "cpu_per_gib")),
              med(pick("qemu", n, True, "cpu_per_gib"))] for n in chans])
    loads = [m["load"][0] for m in rows if m.get("load")]
    if loads:
        md.append(f"\n1-minute load average before each migration: {med(loads)}")
    failed = [m for m in res["migrations"] if not m.get("ok", True)]
    notes = [f"- round {m.get('round')}, {m.get('system', 'ferry')} {m['channels']} "
             f"channel(s) {'TLS' if m['tls'] else 'plaintext'} failed: "
             f"{' '.join(str(m.get('error')).split())[:300]}" for m in failed]
    notes += [f"- round {m.get('round')}, {m.get('system', 'ferry')} {m['channels']} "
              f"channel(s) {'TLS' if m['tls'] else 'plaintext'}: {w}"
              for m in rows for w in m.get("warnings", [])]
    if notes:
        md += [""] + notes
    return "\n".join(md)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ferry", default=str(REPO / "target/release/ferry"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--channels", default="1,4")
    ap.add_argument("--mem", default="4G", type=h.parse_size,
                    help="guest RAM of both systems (default 4G)")
    ap.add_argument("--fill", default="1G", type=h.parse_size,
                    help="incompressible data in it (default 1G)")
    ap.add_argument("--systems", default="ferry,qemu",
                    help="ferry, qemu or both (default ferry,qemu)")
    ap.add_argument("--qemu", metavar="PATH",
                    help="qemu-system-x86_64 to compare with, whatever its version (default: "
                         "QEMU 10.0 or newer, installed as bench/compare.py does)")
    ap.add_argument("--qemu-cpu", metavar="CPU",
                    help="QEMU -cpu (default: probed as bench/compare.py does)")
    ap.add_argument("--tls-hostname", default="localhost",
                    help="the name QEMU's source checks in the destination's certificate "
                         "(default localhost; `ferry tls-creds` makes it valid for localhost "
                         "and 127.0.0.1)")
    ap.add_argument("--iperf-seconds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench/results"),
                    help="directory for tls-<time>.json (default bench/results)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--keep-tmp", action="store_true", help="keep every process's output")
    ap.add_argument("--from-json", type=Path, metavar="FILE",
                    help="measure nothing: print the markdown of an earlier results file")
    a = ap.parse_args(argv)
    if a.from_json:
        print(render_markdown(json.loads(a.from_json.read_text())))
        return 0
    systems = [s for s in a.systems.split(",") if s]
    if not systems or any(s not in ("ferry", "qemu") for s in systems):
        ap.error("--systems takes ferry, qemu or ferry,qemu")
    h.guard_children()
    ferry = Path(a.ferry)
    mem, fill = a.mem, a.fill
    chans = [int(x) for x in a.channels.split(",")]
    iperf3 = h.ensure_iperf3()
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-tls-"))
    creds = tmp / "creds"
    subprocess.run([str(ferry), "tls-creds", str(creds)], check=True,
                   capture_output=True)
    qside = None
    qinfo: dict = {}
    if "qemu" in systems:
        qemu = h.ensure_qemu(a.qemu)
        h.ensure_gcc()
        image = h.build_guest(tmp)
        cpu = h.qemu_cpu_for_host(qemu, tmp, a.qemu_cpu)
        qside = QemuSide(qemu, cpu["cpu"], image, a.tls_hostname)
        qinfo = {"path": qemu, "version": h.first_line([qemu, "--version"]),
                 "cpu": cpu["cpu"], "cpu_probe": cpu, "tls_hostname": a.tls_hostname}
        log(f"QEMU: {qinfo['version']}, -cpu {cpu['cpu']} ({cpu['how']})")
    rows: list[dict] = []
    tcp: dict[int, list[float]] = {n: [] for n in chans}
    plan = [(s, tls) for s in systems for tls in (False, True)]
    failed = 0
    try:
        for r in range(a.runs):
            for n in chans:
                t = h.ref_tcp(iperf3, a.iperf_seconds, tmp, streams=n, length="512K")
                tcp[n].append(t["gbs"])
                log(f"round {r} ch {n}: loopback TCP {t['gbs']:.2f} GB/s")
                for system, tls in (plan if r % 2 == 0 else list(reversed(plan))):
                    what = f"round {r} ch {n} {system} {'tls' if tls else 'plain'}"
                    try:
                        if system == "ferry":
                            m = migrate_ferry(ferry, tmp, n, tls, mem, fill, creds)
                        else:
                            m = migrate_qemu(qside, tmp, n, tls, mem, fill, creds)
                    except (BenchError, OSError, KeyError, ValueError, socket.timeout) as e:
                        failed += 1
                        m = {"system": system, "channels": n, "tls": tls, "ok": False,
                             "error": f"{type(e).__name__}: {e}"}
                        log(f"{what} FAILED: {m['error']}")
                    else:
                        log(f"{what}: {m['gbps']:.2f} GB/s, {m['cpu_per_gib']:.2f} CPU s/GiB "
                            f"({m['verified'] or 'not verifiable'}), load {m['load'][0]:.1f}"
                            + "".join(f"; warning: {w}" for w in m.get("warnings", [])))
                    m["round"] = r
                    rows.append(m)
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
        failed += 1
    finally:
        h.reap_all()
        if a.keep_tmp:
            log(f"process logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res = {"schema": SCHEMA, "when": _dt.datetime.now().isoformat(),
           "ferry": str(ferry), "ferry_version": h.first_line([str(ferry), "--version"]),
           "git_describe": h.first_line(["git", "log", "-1", "--format=%h %s"], REPO),
           "mem": mem, "fill": fill, "runs": a.runs, "channels": chans, "systems": systems,
           "qemu": qinfo or None, "tcp_gbps": tcp, "migrations": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"tls-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    f.write_text(json.dumps(res, indent=1))
    log(f"results in {f}")
    if a.markdown:
        print(render_markdown(res))
    return 1 if failed else 0


if __name__ == "__main__":
    h.run_main(main)
