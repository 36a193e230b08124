#!/usr/bin/env python3
"""Multifd: ferry's data channels against loopback TCP with as many streams, in one run.

    python3 bench/multifd.py [--runs 3] [--channels 0,1,2,4] [--mem 1G] [--markdown]

Each round goes through the channel counts N (0 = every page on the main connection, no data
channel). For each N it first measures loopback TCP with `iperf3 -P max(N, 1)` (iperf3's
default 128 KiB writes) and with `-l 512K` (--iperf-len: the size of ferry's writes), then
migrates a paused soft guest of --mem bytes from one `ferry run` to another on this machine:

- incompressible: the source filled with --fill (pseudo-random, non-zero pages);
- zero-heavy: the source started with --prealloc and nothing written, so that every page is
  populated but zero (read, found zero, sent as a flag);

each with the digest on and off (`migration.digest`, set on both sides: an xxh3 hash of every
page on both ends), and at --zstd-channels (2) both kinds again with
`migration.multifd-compression=zstd`. The destination always starts with --prealloc, so that
what is measured is moving pages, not the host's first touch of fresh memory (BENCHMARKS.md).
Which variant of a channel count goes first alternates between rounds.

Per migration: pass 0 throughput, as page data (pages x 4 KiB / duration) and on the wire,
and its ratio to each TCP figure of the same stream count from the same round; total time;
CPU seconds of each `ferry run` process over the migration (from /proc/PID/stat, just before
`ferry migrate` starts to just after it returns) per GiB of guest RAM moved, and the same
split by thread (sampled every 50 ms); the other work on the machine in that window. Figures
are medians over the rounds with (min-max). Nothing here asserts a timing.

After the rounds (unless --no-perf), two more migrations of the largest channel count with
incompressible pages, digest on and off, run with `perf record -g` attached to both
processes; the report's top symbols per thread kind go into the results. perf comes from
Debian's linux-perf (installed with apt-get if missing); where it cannot record, the results
say why. Those migrations are not in the figures: perf costs CPU.

Results: JSON and markdown under bench/results/ (--out); --markdown prints the markdown too,
--from-json FILE prints it again from a results file.

With --baseline PATH, a second (older) ferry is measured in the same run: in every round, for
every variant, the baseline and the candidate (--ferry, or the fresh release build) migrate
back to back, each after the same settling wait, and which of the two goes first alternates
between rounds. The iperf3 references are still taken once per round. The results then hold
both sets of figures and, per variant, candidate / baseline for throughput and CPU per GiB:
the ratio of the medians and the range of the per-round ratios of the back-to-back pairs.
--label and --baseline-label name the two (default "candidate" and "baseline"); the results
also record each binary's path, `--version`, SHA-256 and, if it lies inside a git checkout,
that checkout's HEAD. Without --baseline nothing changes. Profiles are of the candidate only.

Processes are handled by bench/harness.py: each child in its own session with a
parent-death signal, killed by process group on normal exit, exception, Ctrl-C, SIGTERM or
SIGHUP. Only the Python 3.11
standard library is used. Units: GB = 1e9 bytes, GiB = 2^30 bytes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402  (processes, QMP, /proc, references, formatting)
from harness import (BenchError, Qmp, Threads, log, parse_size, reap, spawn,  # noqa: E402
                     thread_kind)

REPO = h.REPO
SCHEMA = "ferry-bench-multifd/1"
GiB = 1 << 30
PAGE = 4096

DEFAULT_CHANNELS = (0, 1, 2, 4)
SAMPLE_S = 0.05      # per-thread CPU sampling period during a migration
T_MIGRATE = 300.0
T_PERF_ATTACH = 1.0  # perf record has no "attached" signal: give it this long
PERF_FREQ = 999


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    data: str          # "random" (incompressible) or "zero" (populated, all zero)
    channels: int      # 0 = pages on the main connection
    digest: bool
    compression: str = "none"

    @property
    def name(self) -> str:
        tail = f"digest-{'on' if self.digest else 'off'}"
        if self.compression != "none":
            tail += f"/{self.compression}"
        return f"{self.data}/{self.channels}ch/{tail}"

    @property
    def streams(self) -> int:
        """iperf3 -P of the reference: one stream for the main connection alone."""
        return max(self.channels, 1)


DATA_LABEL = {"random": "incompressible", "zero": "zero-heavy"}


def variants_for(channels: int, zstd_channels: int) -> list[Variant]:
    out = [Variant(data, channels, digest)
           for data in ("random", "zero") for digest in (True, False)]
    if channels == zstd_channels:
        out += [Variant(data, channels, True, "zstd") for data in ("random", "zero")]
    return out


# `--machine`: the machine type both sides run (None: each binary's newest).
MACHINE: str | None = None


def ferry_cmds(ferry: Path, v: Variant, mem: int, d: Path) -> tuple[list[str], list[str]]:
    """(source, destination) `ferry run` command lines."""
    size = h.size_arg(mem)
    digest = ["--global", f"migration.digest={'on' if v.digest else 'off'}"]
    common = [str(ferry), "run", "--backend", "soft", "--mem", size, "--dirty", "0",
              *(["--machine", MACHINE] if MACHINE else [])]
    src = [*common, "--paused", *digest,
           "--global", f"migration.multifd-channels={v.channels}",
           "--global", f"migration.multifd-compression={v.compression}",
           *(["--fill", size] if v.data == "random" else ["--prealloc"]),
           "--qmp", str(d / "src.sock")]
    dst = [*common, "--prealloc", *digest, "--incoming", "tcp:127.0.0.1:0",
           "--qmp", str(d / "dst.sock")]
    return src, dst


# --------------------------------------------------------------------------------------------
# The binaries (--baseline)
# --------------------------------------------------------------------------------------------

# Roles, as the results name them: the labels (--label, --baseline-label) are only for show.
CANDIDATE, BASELINE = "candidate", "baseline"


def _git(cwd: Path, *args: str) -> str | None:
    # --no-optional-locks: a status here must not refresh (write) that checkout's index.
    return h.first_line(["git", "--no-optional-locks", "-C", str(cwd), *args])


def describe_binary(given: Path, label: str) -> dict:
    """What identifies one ferry binary in the results: the path as given, and its version,
    size, time and SHA-256; if it lies inside a git checkout, that checkout's HEAD (what it
    was most likely built from; the file itself may be older)."""
    exe = given.resolve()
    digest = hashlib.sha256()
    with open(exe, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    st = exe.stat()
    out: dict = {
        "label": label,
        "path": str(given),
        "resolved": str(exe),
        "version": h.first_line([str(exe), "--version"]),
        "size": st.st_size,
        "mtime": _dt.datetime.fromtimestamp(st.st_mtime).astimezone().isoformat(
            timespec="seconds"),
        "sha256": digest.hexdigest(),
        "git": None,
    }
    top = _git(exe.parent, "rev-parse", "--show-toplevel")
    if top:
        dirty = _git(Path(top), "status", "--porcelain", "--untracked-files=no")
        out["git"] = {
            "checkout": top,
            "commit": _git(Path(top), "rev-parse", "HEAD"),
            "describe": _git(Path(top), "log", "-1", "--format=%h %s"),
            "dirty": bool(dirty),
        }
    return out


def binary_line(b: dict) -> str:
    """One markdown line about a binary of results["binaries"]."""
    where = f"{b['label']}: `{b['path']}`"
    if b.get("resolved") and b["resolved"] != b["path"]:
        where += f" (`{b['resolved']}`)"
    facts = [b.get("version") or "no --version"]
    g = b.get("git")
    if g:
        facts.append(f"in the checkout `{g['checkout']}` at `{g['describe']}`"
                     + (" (uncommitted changes)" if g.get("dirty") else ""))
    facts.append(f"sha256 {b['sha256'][:12]}, modified {b['mtime']}")
    return f"- {where}: " + "; ".join(facts)


# --------------------------------------------------------------------------------------------
# perf
# --------------------------------------------------------------------------------------------


def ensure_perf() -> tuple[str | None, str | None]:
    """(perf binary, None), or (None, why not)."""
    exe = shutil.which("perf")
    if not exe:
        try:
            h.apt_install(["linux-perf"], "perf not found")
        except SystemExit as e:
            return None, str(e)
        exe = shutil.which("perf")
        if not exe:
            return None, "perf is not on PATH after installing linux-perf"
    # perf exists; can it sample here? (A VM without a PMU still has cpu-clock.)
    probe = Path(tempfile.mkdtemp(prefix="ferry-perf-probe-"))
    try:
        r = subprocess.run([exe, "record", "-q", "-o", str(probe / "p.data"), "--", "true"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=30)
        if r.returncode != 0:
            return None, f"`perf record` does not work here: {r.stdout.strip()[-300:]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"`perf record` does not work here: {e}"
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return exe, None


_REPORT_LINE = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.+?)\s*$")


def perf_summary(perf: str, data: Path, top: int) -> dict:
    """Self time by (thread kind, symbol) and by thread kind, from `perf report`."""
    r = subprocess.run([perf, "report", "-i", str(data), "--stdio", "--no-children",
                        "--sort", "comm,sym", "-g", "none", "--percent-limit", "0.2"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    if r.returncode != 0:
        raise BenchError(f"perf report: {r.stderr.strip()[-300:]}")
    samples = None
    m = re.search(r"^# Samples: (\d+)", r.stdout, re.M)
    if m:
        samples = int(m.group(1))
    syms: dict[tuple[str, str, str], float] = {}
    kinds: dict[str, float] = {}
    for line in r.stdout.splitlines():
        m = _REPORT_LINE.match(line)
        if not m:
            continue
        pct, comm, space, sym = float(m.group(1)), thread_kind(m.group(2)), m.group(3), m.group(4)
        key = (comm, "kernel" if space == "k" else "user", sym)
        syms[key] = syms.get(key, 0.0) + pct
        kinds[comm] = kinds.get(comm, 0.0) + pct
    rows = sorted(syms.items(), key=lambda kv: -kv[1])[:top]
    return {
        "samples": samples,
        "top": [{"thread": c, "space": s, "symbol": y, "pct": round(p, 2)}
                for (c, s, y), p in rows],
        "by_thread": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
    }


# --------------------------------------------------------------------------------------------
# One migration
# --------------------------------------------------------------------------------------------


def metrics_of(info: dict, cpu_src: float, cpu_dst: float) -> dict:
    passes = info.get("passes") or []
    p0 = passes[0] if passes else {}
    dur_s = (p0.get("duration-ms") or 0) / 1e3
    moved = sum(p.get("pages", 0) for p in passes) * PAGE
    mfd = info.get("multifd") or {}
    gib = moved / GiB if moved else None
    return {
        "pass0_pages": p0.get("pages"),
        "pass0_zero_pages": p0.get("zero-pages"),
        "pass0_bytes": p0.get("bytes"),
        "pass0_ms": p0.get("duration-ms"),
        # Page data: what the guest's memory amounts to, zero pages at 4 KiB each.
        "pass0_gbs": p0.get("pages", 0) * PAGE / dur_s / 1e9 if dur_s and p0.get("pages") else None,
        # On the wire: headers, flags and (compressed) data, all connections.
        "pass0_wire_gbs": p0.get("bytes", 0) / dur_s / 1e9 if dur_s and p0.get("bytes") else None,
        "total_ms": info.get("total-time"),
        "downtime_ms": info.get("downtime"),
        "setup_ms": info.get("setup-time"),
        "passes": len(passes),
        "moved_bytes": moved,
        "transferred_bytes": (info.get("ram") or {}).get("transferred"),
        "raw_bytes": mfd.get("raw-bytes"),
        "wire_bytes": mfd.get("wire-bytes"),
        "per_channel_pages": [c.get("pages") for c in mfd.get("per-channel") or []],
        "syncs": mfd.get("syncs"),
        "cpu_src_s": round(cpu_src, 3),
        "cpu_dst_s": round(cpu_dst, 3),
        "cpu_src_s_per_gib": round(cpu_src / gib, 3) if gib else None,
        "cpu_dst_s_per_gib": round(cpu_dst / gib, 3) if gib else None,
        "verified": info.get("verified"),
    }


def run_variant(ferry: Path, v: Variant, mem: int, tmp: Path, tag: str,
                perf: str | None = None) -> dict:
    slug = v.name.replace("/", "-")
    d = tmp / f"{slug}-{tag}"
    d.mkdir()
    res: dict = {"variant": v.name, "ok": False, "warnings": [],
                 "loadavg_before": h.loadavg()}
    warnings: list[str] = res["warnings"]
    src_cmd, dst_cmd = ferry_cmds(ferry, v, mem, d)
    res["commands"] = [" ".join(src_cmd), " ".join(dst_cmd)]
    src = dst = mig = None
    qs = qd = None
    perfs: list = []
    interrupted = False
    t0 = time.monotonic()
    try:
        # Both start at once: filling or pre-faulting takes seconds and is not measured.
        with open(d / "dst.out", "wb") as o, open(d / "dst.err", "wb") as e:
            dst = spawn(dst_cmd, stdin=subprocess.DEVNULL, stdout=o, stderr=e)
        with open(d / "src.out", "wb") as o, open(d / "src.err", "wb") as e:
            src = spawn(src_cmd, stdin=subprocess.DEVNULL, stdout=o, stderr=e)
        # The destination prints its address once its RAM is faulted in; the source serves
        # QMP once its RAM is filled or faulted in.
        uri = h.wait_uri(d / "dst.out", dst, d / "dst.err")
        qs = Qmp.connect(d / "src.sock", src, "source", d / "src.err", deadline=h.T_QMP)
        qd = Qmp.connect(d / "dst.sock", dst, "destination", d / "dst.err", deadline=h.T_QMP)
        res["startup_s"] = round(time.monotonic() - t0, 3)
        st = qs.execute("query-status").get("status")
        if st != "paused":
            warnings.append(f"source is {st!r} before migrating, expected 'paused'")

        if perf:
            for who, p in (("src", src), ("dst", dst)):
                with open(d / f"perf-{who}.err", "wb") as e:
                    perfs.append((who, spawn(
                        [perf, "record", "-q", "-g", "-F", str(PERF_FREQ), "-p", str(p.pid),
                         "-o", str(d / f"perf-{who}.data")],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=e)))
            time.sleep(T_PERF_ATTACH)

        busy0, own0 = h.host_busy_s(), h.own_cpu_s()
        c0 = (h.cpu_seconds(src.pid), h.cpu_seconds(dst.pid))
        ts, td = Threads(src.pid), Threads(dst.pid)
        t_mig = time.monotonic()
        mig_cmd = [str(ferry), "migrate", "--qmp", str(d / "src.sock"), uri, "--json"]
        res["commands"].append(" ".join(mig_cmd))
        with open(d / "migrate.out", "wb") as o, open(d / "migrate.err", "wb") as e:
            mig = spawn(mig_cmd, stdin=subprocess.DEVNULL, stdout=o, stderr=e)
        end = t_mig + T_MIGRATE
        while mig.poll() is None:
            if time.monotonic() > end:
                raise BenchError(f"ferry migrate still running after {T_MIGRATE:.0f} s")
            ts.sample()
            td.sample()
            time.sleep(SAMPLE_S)
        ts.sample()
        td.sample()
        c1 = (h.cpu_seconds(src.pid), h.cpu_seconds(dst.pid))
        wall = time.monotonic() - t_mig
        reap(mig)  # waited for: its CPU is in own_cpu_s from here on
        other = ((h.host_busy_s() - busy0) - (h.own_cpu_s() - own0)
                 - (c1[0] - c0[0]) - (c1[1] - c0[1]))
        res["migrate_wall_s"] = round(wall, 3)
        res["other_cores"] = round(max(other, 0.0) / max(wall, 1e-3), 3)
        res["threads_src_s"] = ts.by_kind()
        res["threads_dst_s"] = td.by_kind()

        info = h.last_json((d / "migrate.out").read_text(errors="replace"))
        if info is None:
            raise BenchError(f"ferry migrate (exit {mig.returncode}) printed no JSON: "
                             f"{h.tail(d / 'migrate.err')}")
        res["info"] = info
        if info.get("status") != "completed" or mig.returncode != 0:
            raise BenchError(f"migration {info.get('status')} (exit {mig.returncode}): "
                             f"{info.get('error-desc') or h.tail(d / 'migrate.err')}")
        st = qd.execute("query-status").get("status")
        if st != "paused":
            warnings.append(f"destination is {st!r} after migrating, expected 'paused'")
        m = metrics_of(info, c1[0] - c0[0], c1[1] - c0[1])
        if m["moved_bytes"] != mem:
            warnings.append(f"moved {m['moved_bytes']} bytes of {mem}")
        want = "digest" if v.digest else "none"
        if (m["verified"] or "none") != want:
            warnings.append(f"verified {m['verified']!r}, expected {want!r}")
        res["metrics"] = m
        if perfs:
            res["profile"] = {}
            for who, p in perfs:
                try:
                    os.kill(p.pid, signal.SIGINT)
                    p.wait(timeout=60)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
                reap(p)
                try:
                    res["profile"][who] = perf_summary(perf, d / f"perf-{who}.data", top=15)
                except (BenchError, OSError, subprocess.TimeoutExpired) as e:
                    res["profile"][who] = {"error": f"{e} {h.tail(d / f'perf-{who}.err', 5)}"}
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
            for _who, p in perfs:
                reap(p, grace=5.0)
            reap(mig)
            if not interrupted:
                h.quit_and_wait(qs, src, "source", warnings)
                h.quit_and_wait(qd, dst, "destination", warnings)
        finally:
            reap(src)
            reap(dst)
        if not res["ok"]:
            res["src_stderr"] = h.tail(d / "src.err")
            res["dst_stderr"] = h.tail(d / "dst.err")
        res["wall_s"] = round(time.monotonic() - t0, 3)
    return res


# --------------------------------------------------------------------------------------------
# Summary and markdown
# --------------------------------------------------------------------------------------------

METRICS = ["pass0_gbs", "pass0_wire_gbs", "to_tcp", "to_tcp_len", "total_ms", "downtime_ms",
           "pass0_ms", "transferred_bytes", "cpu_src_s", "cpu_dst_s", "cpu_src_s_per_gib",
           "cpu_dst_s_per_gib"]


# Compared between the baseline and the candidate (--baseline), candidate / baseline.
VERSUS = ["pass0_gbs", "pass0_wire_gbs", "total_ms", "cpu_src_s_per_gib", "cpu_dst_s_per_gib"]


def binary_of(r: dict) -> str:
    """The role of the binary a run used: without --baseline every run is the candidate's."""
    return r.get("binary", CANDIDATE)


def summarise_variants(results: dict, runs: list[dict]) -> dict:
    out: dict = {}
    for name in results["variants"]:
        mine = [r for r in runs if r["variant"] == name]
        ok = [r for r in mine if r.get("ok")]
        s: dict = {"runs": len(mine), "ok": len(ok)}
        for k in METRICS:
            s[k] = h.stats([r["metrics"].get(k) for r in ok])
        s["other_cores"] = h.stats([r.get("other_cores") for r in mine])
        for side in ("src", "dst"):
            kinds = sorted({k for r in ok for k in r.get(f"threads_{side}_s", {})})
            per = {}
            for k in kinds:
                vals = [r[f"threads_{side}_s"].get(k, 0.0) / (r["metrics"]["moved_bytes"] / GiB)
                        for r in ok if r["metrics"].get("moved_bytes")]
                st = h.stats(vals)
                if st and st["median"] >= 0.005:
                    per[k] = st
            s[f"threads_{side}_s_per_gib"] = dict(
                sorted(per.items(), key=lambda kv: -kv[1]["median"]))
        out[name] = s
    return out


def versus(results: dict, cand: dict, base: dict) -> dict:
    """Per variant and VERSUS metric, candidate / baseline: the ratio of the medians, and the
    stats of the ratios of the pairs that ran back to back in one round (both ok)."""
    out: dict = {}
    for name in results["variants"]:
        c, b = cand.get(name) or {}, base.get(name) or {}
        per: dict = {}
        for k in VERSUS:
            cm, bm = (c.get(k) or {}).get("median"), (b.get(k) or {}).get("median")
            pairs = []
            for rnd in results["rounds"]:
                got = {binary_of(r): r for r in rnd["runs"]
                       if r["variant"] == name and r.get("ok")}
                if CANDIDATE in got and BASELINE in got:
                    x = got[CANDIDATE]["metrics"].get(k)
                    y = got[BASELINE]["metrics"].get(k)
                    if x is not None and y:
                        pairs.append(x / y)
            per[k] = {"ratio_of_medians": cm / bm if cm is not None and bm else None,
                      "paired": h.stats(pairs)}
        out[name] = per
    return out


def summarise(results: dict) -> dict:
    runs = [r for rnd in results["rounds"] for r in rnd["runs"]]
    out: dict = {"variants": summarise_variants(
        results, [r for r in runs if binary_of(r) == CANDIDATE]), "tcp": {}, "tcp_len": {}}
    for key in ("tcp", "tcp_len"):
        for ch in results["args"]["channels"]:
            refs = [r for rnd in results["rounds"] if (r := rnd.get(key, {}).get(str(ch)))]
            if not refs:
                continue
            out[key][str(ch)] = {
                "streams": max(ch, 1),
                "length": next((r.get("length") for r in refs if r.get("length")), None),
                "gbs": h.stats([r.get("gbs") for r in refs]),
                "cpu_snd_s_per_gib": h.stats([tcp_cpu_per_gib(r, "cpu_sender_pct")
                                               for r in refs]),
                "cpu_rcv_s_per_gib": h.stats([tcp_cpu_per_gib(r, "cpu_receiver_pct")
                                               for r in refs]),
                "other_cores": h.stats([r.get("other_cores") for r in refs]),
            }
    out["other_cores"] = h.stats([r.get("other_cores") for r in runs])
    if results.get("binaries"):
        # "variants" stays the candidate's (the binary measured without --baseline).
        base = summarise_variants(results, [r for r in runs if binary_of(r) == BASELINE])
        out["baseline"] = {"variants": base}
        out["versus"] = versus(results, out["variants"], base)
    return out


def tcp_cpu_per_gib(r: dict, key: str) -> float | None:
    """CPU seconds per GiB received of one iperf3 end, from its own utilisation figure (per
    cent of one CPU over the test)."""
    if r.get(key) is None or not r.get("bytes") or not r.get("seconds"):
        return None
    return r[key] / 100 * r["seconds"] / (r["bytes"] / GiB)


def ch_label(ch: int) -> str:
    return "0 (main connection)" if ch == 0 else str(ch)


def row_order(name: str) -> tuple:
    """Incompressible rows first, then zero-heavy; by channels; digest on, off; zstd last."""
    data, ch, *rest = name.split("/")
    return (data != "random", len(rest) > 1, int(ch[:-2]), rest[0] != "digest-on")


def threads_cell(per: dict, limit: int = 3) -> str:
    parts = [f"{k} {v['median']:.2f}" for k, v in list(per.items())[:limit]]
    return ", ".join(parts) or "–"


def split_name(name: str) -> tuple[str, int, str, str]:
    """random/2ch/digest-on/zstd -> ("random", 2, "on", "zstd")."""
    data, ch, *rest = name.split("/")
    return data, int(ch[:-2]), rest[0].split("-")[1], rest[1] if len(rest) > 1 else "none"


def ok_cell(s: dict | None, key: str, kind: str) -> str:
    """A median (min–max) cell of one binary's variant summary, saying if some runs failed."""
    if not s or not s["ok"]:
        return "failed" if s and s["runs"] else "not run"
    label_ok = "" if s["ok"] == s["runs"] else f" ({s['ok']}/{s['runs']} ok)"
    return h.cell(s.get(key), kind) + label_ok


def ratio_cell(v: dict | None) -> str:
    """candidate / baseline: the ratio of the medians [range of the per-round pair ratios]."""
    if not v or v.get("ratio_of_medians") is None:
        return "–"
    text = f"{v['ratio_of_medians']:.2f}"
    p = v.get("paired")
    if p and p["n"] > 1:
        lo, hi = f"{p['min']:.2f}", f"{p['max']:.2f}"
        if lo != hi:
            text += f" [{lo}–{hi}]"
    return text


def render_markdown(results: dict) -> str:
    summary = summarise(results)
    mi = results["machine"]
    a = results["args"]
    out = []
    bins = results.get("binaries")  # only with --baseline
    out.append(f"{'checkout' if bins else 'ferry'} `{mi.get('git_describe')}`"
               f"{' (uncommitted changes)' if mi.get('git_dirty') else ''}, "
               f"{results['started']}, {a['runs']} run(s), medians with (min–max); whole run "
               f"{results.get('elapsed_s', 0):.0f} s; guest {h.size_arg(a['mem'])}, soft "
               f"backend, paused; destination `--prealloc`.")
    out.append("")
    if bins:
        odd = (" (an odd number of rounds: the baseline went first once more often)"
               if a["runs"] % 2 else "")
        out.append("Two ferry binaries, back to back for every case in every round, each after "
                   "the same settling wait; the baseline first in odd rounds, the candidate in "
                   f"even ones{odd}:")
        out.append("")
        out.extend(binary_line(bins[role]) for role in (BASELINE, CANDIDATE))
        out.append("")
    la = mi.get("loadavg") or ["?"]
    load = summary.get("other_cores")
    out.append(f"Load average before starting: {' '.join(la)} on {mi.get('nproc')} CPUs. "
               + (f"Other work during the migrations (busy CPU not this driver's nor its "
                  f"children's): median {load['median']:.2f} cores, max {load['max']:.2f}."
                  if load else ""))
    out.append("")
    names = sorted(summary["variants"], key=row_order)
    # (label, per-variant summary) of each binary, baseline first; one, unlabelled, without.
    sides = ([(bins[BASELINE]["label"], summary["baseline"]["variants"]),
              (bins[CANDIDATE]["label"], summary["variants"])] if bins
             else [(None, summary["variants"])])
    if bins:
        bl, cl = bins[BASELINE]["label"], bins[CANDIDATE]["label"]
        out.append(f"{cl} against {bl}: medians with (min–max) of each, and {cl} / {bl} as the "
                   f"ratio of the medians with, in brackets, the range of the per-round ratios "
                   f"of the back-to-back pairs (above 1: faster in GB/s, costlier in CPU).")
        out.append("")
        out.append("| memory | data channels | digest | compression "
                   + "".join(f"| {what}, {bl} | {what}, {cl} | {cl} / {bl} "
                             for what in ("pass 0 GB/s", "CPU src s/GiB", "CPU dst s/GiB"))
                   + "|")
        out.append("|---|---|---|---|" + "---:|" * 9)
        vs = summary["versus"]
        for name in names:
            data, chn, digest, comp = split_name(name)
            row = [DATA_LABEL.get(data, data), ch_label(chn), digest, comp]
            for k, kind in (("pass0_gbs", "gbs"), ("cpu_src_s_per_gib", "s"),
                            ("cpu_dst_s_per_gib", "s")):
                for _label, var in sides:
                    row.append(ok_cell(var.get(name), k, kind))
                row.append(ratio_cell(vs.get(name, {}).get(k)))
            out.append("| " + " | ".join(row) + " |")
        out.append("")
        out.append("Each binary in full:")
        out.append("")
    length = a.get("iperf_len") or None
    out.append(("| ferry " if bins else "")
               + "| memory | data channels | iperf3 streams | digest | compression | pass 0 GB/s "
               "| wire GB/s | pass 0 / TCP | "
               + (f"pass 0 / TCP, {length} writes | " if length else "")
               + "total ms | CPU src s/GiB | CPU dst s/GiB |")
    out.append(("|---" if bins else "")
               + "|---|---|---:|---|---|---:|---:|---:|" + ("---:|" if length else "")
               + "---:|---:|---:|")
    for name in names:
        data, chn, digest, comp = split_name(name)
        head = [DATA_LABEL.get(data, data), ch_label(chn), str(max(chn, 1)), digest, comp]
        for label, var in sides:
            s = var[name]
            first = [label] if label is not None else []
            if not s["ok"]:
                what = "failed" if s["runs"] else "not run"
                out.append("| " + " | ".join(first + head + [what]
                                             + ["–"] * (6 if length else 5)) + " |")
                continue
            label_ok = "" if s["ok"] == s["runs"] else f" ({s['ok']}/{s['runs']} ok)"
            out.append("| " + " | ".join(first + head + [
                h.cell(s["pass0_gbs"], "gbs") + label_ok,
                h.cell(s["pass0_wire_gbs"], "gbs"),
                h.cell(s["to_tcp"], "pct"),
                *([h.cell(s["to_tcp_len"], "pct")] if length else []),
                h.cell(s["total_ms"], "ms"),
                h.cell(s["cpu_src_s_per_gib"], "s"),
                h.cell(s["cpu_dst_s_per_gib"], "s"),
            ]) + " |")
    out.append("")
    out.append("CPU by thread kind, seconds per GiB moved (medians; the three largest per side):")
    out.append("")
    out.append(("| ferry " if bins else "") + "| case | source | destination | other load, cores |")
    out.append(("|---" if bins else "") + "|---|---|---|---:|")
    for name in names:
        for label, var in sides:
            s = var[name]
            if not s["ok"]:
                continue
            out.append(("" if label is None else f"| {label} ")
                       + f"| {name} | {threads_cell(s['threads_src_s_per_gib'])} | "
                       f"{threads_cell(s['threads_dst_s_per_gib'])} | "
                       f"{h.cell(s['other_cores'], 's')} |")
    out.append("")
    out.append("| loopback TCP, same run | GB/s | CPU sender s/GiB | CPU receiver s/GiB "
               "| other load, cores |")
    out.append("|---|---:|---:|---:|---:|")
    for key in ("tcp", "tcp_len"):
        for ch, t in summary[key].items():
            flags = f"-P {t['streams']}" + (f" -l {t['length']}" if t.get("length") else "")
            out.append(f"| iperf3 {flags} -t {a['iperf_seconds']}, for "
                       f"{ch_label(int(ch))} data channels | {h.cell(t['gbs'], 'gbs')} | "
                       f"{h.cell(t.get('cpu_snd_s_per_gib'), 's')} | "
                       f"{h.cell(t.get('cpu_rcv_s_per_gib'), 's')} | "
                       f"{h.cell(t['other_cores'], 's')} |")
    prof = results.get("profile")
    if prof is not None:
        out.append("")
        if prof.get("error"):
            out.append(f"Profile: not taken: {prof['error']}")
        for r in prof.get("runs", []):
            by = f" with {bins[CANDIDATE]['label']}" if bins else ""
            out.append(f"Profile of `{r['variant']}`{by} (`perf record -g -F {PERF_FREQ}` on "
                       f"each process during the migration, self time; not one of the measured "
                       f"runs):"
                       + (f" pass 0 {r['metrics']['pass0_gbs']:.2f} GB/s under perf, CPU src "
                          f"{r['metrics']['cpu_src_s']:.2f} s, dst "
                          f"{r['metrics']['cpu_dst_s']:.2f} s."
                          if r.get("ok") else f" failed: {r.get('error')}"))
            for side in ("src", "dst"):
                p = (r.get("profile") or {}).get(side)
                if not p:
                    continue
                out.append("")
                if p.get("error"):
                    out.append(f"- {side}: {p['error']}")
                    continue
                who = "source" if side == "src" else "destination"
                threads = ", ".join(f"{k} {v:.0f}%" for k, v in p["by_thread"].items()
                                    if v >= 1)
                out.append(f"{who}, {p.get('samples')} samples; by thread: {threads}")
                out.append("")
                out.append("| % | thread | | symbol |")
                out.append("|---:|---|---|---|")
                for row in p["top"][:12]:
                    sym = row["symbol"].replace("|", "\\|")
                    if len(sym) > 90:
                        sym = sym[:87] + "..."
                    out.append(f"| {row['pct']:.1f} | {row['thread']} | {row['space']} "
                               f"| `{sym}` |")
            out.append("")
    def run_name(r: dict) -> str:
        return f"{bins[binary_of(r)]['label']} {r['variant']}" if bins else r["variant"]

    failures = [(rnd["round"], r) for rnd in results["rounds"] for r in rnd["runs"]
                if not r.get("ok")]
    notes = [(rnd["round"], run_name(r), w) for rnd in results["rounds"] for r in rnd["runs"]
             for w in r.get("warnings", [])]
    if failures or notes or results.get("interrupted"):
        out.append("")
    if results.get("interrupted"):
        out.append("- the run was interrupted; figures cover what finished")
    for rnd, r in failures:
        why = " ".join((r.get("error") or "unknown").split())
        out.append(f"- run {rnd}, {run_name(r)} failed: {why[:300]}")
    for rnd, name, w in notes:
        out.append(f"- run {rnd}, {name}: {w}")
    return "\n".join(out).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="ferry's multifd channels against loopback TCP with as many streams.")
    ap.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--channels", default=",".join(map(str, DEFAULT_CHANNELS)),
                    help="data channel counts, comma-separated; 0 = pages on the main "
                         "connection (default %(default)s)")
    ap.add_argument("--mem", default="1G", type=parse_size,
                    help="guest RAM, moved whole in every migration (default 1G)")
    ap.add_argument("--zstd-channels", type=int, default=2, metavar="N",
                    help="channel count with the zstd variants too (default 2; -1 for none)")
    ap.add_argument("--out", type=Path,
                    help="JSON results (default bench/results/multifd-<time>.json); the "
                         "markdown goes beside it with .md")
    ap.add_argument("--markdown", action="store_true", help="print the markdown to stdout")
    ap.add_argument("--no-build", action="store_true", help="use the existing release ferry")
    ap.add_argument("--ferry", type=Path, help="ferry binary (implies --no-build)")
    ap.add_argument("--baseline", type=Path, metavar="PATH",
                    help="a second ferry binary (an older build) measured in the same run, "
                         "back to back with --ferry (or the fresh build) for every case, "
                         "which goes first alternating between rounds; reports both and "
                         "candidate / baseline")
    ap.add_argument("--label", metavar="NAME",
                    help="with --baseline: the name of --ferry (or the build) in the results "
                         "(default candidate)")
    ap.add_argument("--baseline-label", metavar="NAME",
                    help="with --baseline: the name of the baseline (default baseline)")
    ap.add_argument("--machine", metavar="NAME",
                    help="machine type of both sides (default: each binary's newest); with "
                         "--baseline, one both binaries know, to compare like with like")
    ap.add_argument("--iperf-seconds", type=int, default=5, help="iperf3 -t (default 5)")
    ap.add_argument("--iperf-len", default="512K", metavar="SIZE",
                    help="also measure loopback TCP with iperf3 -l SIZE, the size of ferry's "
                         "writes (a packet of 128 pages); '' to skip (default %(default)s)")
    ap.add_argument("--no-perf", action="store_true",
                    help="skip the profile of the largest channel count after the rounds")
    ap.add_argument("--settle", type=float, default=10.0, metavar="S",
                    help="wait up to S seconds for other work to quieten before each "
                         "measurement (default 10; 0 disables)")
    ap.add_argument("--settle-below", type=float, default=0.25, metavar="CORES")
    ap.add_argument("--keep-tmp", action="store_true", help="keep every process's output")
    ap.add_argument("--from-json", type=Path, metavar="FILE",
                    help="measure nothing: print the markdown of an earlier results file")
    a = ap.parse_args(argv)
    if a.from_json is None:
        try:
            a.channel_list = [int(c) for c in a.channels.split(",") if c.strip()]
        except ValueError:
            ap.error("--channels takes numbers, like 0,1,2,4")
        if not a.channel_list or any(not 0 <= c <= 16 for c in a.channel_list):
            ap.error("--channels: each count must be 0..16")
        if a.runs < 1:
            ap.error("--runs must be at least 1")
        if a.baseline is None and (a.label is not None or a.baseline_label is not None):
            ap.error("--label and --baseline-label name the binaries of --baseline")
        if a.baseline is not None:
            a.label = CANDIDATE if a.label is None else a.label.strip()
            a.baseline_label = BASELINE if a.baseline_label is None else a.baseline_label.strip()
            if not a.label or not a.baseline_label or a.label == a.baseline_label:
                ap.error("--label and --baseline-label must be two different, non-empty names")
            if "|" in a.label + a.baseline_label:
                ap.error("--label and --baseline-label cannot contain '|' (markdown tables)")
    return a


def log_run(tag: str, r: dict) -> None:
    if not r.get("ok"):
        log(f"{tag} {r['variant']} FAILED: {r.get('error')}")
        return
    m = r["metrics"]
    ratio = f" ({100 * m['to_tcp']:.0f}% of TCP)" if m.get("to_tcp") is not None else ""
    p0 = f"{m['pass0_gbs']:.2f}" if m["pass0_gbs"] is not None else "-"
    wire = f"{m['pass0_wire_gbs']:.2f}" if m["pass0_wire_gbs"] is not None else "-"
    log(f"{tag} {r['variant']}: pass 0 {p0} GB/s{ratio}, wire {wire} GB/s, total "
        f"{m['total_ms']} ms, CPU/GiB src {m['cpu_src_s_per_gib']:.2f} s dst "
        f"{m['cpu_dst_s_per_gib']:.2f} s"
        + (f"; other load {r['other_cores']:.2f} cores" if r.get("other_cores", 0) >= 0.25
           else "")
        + "".join(f"; warning: {w}" for w in r["warnings"]))


def main(argv: list[str]) -> int:
    global MACHINE
    a = parse_args(argv)
    if a.from_json:
        print(render_markdown(json.loads(a.from_json.read_text())), end="")
        return 0
    MACHINE = a.machine

    h.guard_children()

    started = _dt.datetime.now().astimezone()
    out = a.out or REPO / "bench" / "results" / f"multifd-{started:%Y%m%d-%H%M%S}.json"
    md_path = out.with_suffix(".md")
    ferry = h.pick_ferry(a.ferry, a.no_build)
    if not h.ferry_knows_channels(ferry):
        raise SystemExit(f"{ferry} has no migration.multifd-channels property (see `ferry "
                         f"machines ferry`): nothing to measure here")
    baseline = a.baseline.resolve() if a.baseline else None
    if baseline is not None:
        if not os.access(baseline, os.X_OK):
            raise SystemExit(f"--baseline: no ferry binary at {baseline}")
        if not h.ferry_knows_channels(baseline):
            raise SystemExit(f"--baseline {baseline} has no migration.multifd-channels "
                             f"property (see `ferry machines ferry`): nothing to compare")
    iperf3 = h.ensure_iperf3()
    perf, perf_why = (None, "--no-perf") if a.no_perf else ensure_perf()
    # Filling or faulting in --mem at the host's slowest first touch (~0.2 GB/s when busy).
    gib = max(a.mem / GiB, 1.0)
    h.T_URI = max(h.T_URI, 30.0 + 20.0 * gib)
    h.T_QMP = max(h.T_QMP, 30.0 + 20.0 * gib)

    machine = h.machine_info(ferry, iperf3)
    machine["perf"] = h.first_line([perf, "--version"]) if perf else None
    if machine["loadavg"] and float(machine["loadavg"][0]) > 0.5:
        log(f"warning: load average {machine['loadavg'][0]} on {machine['nproc']} CPUs before "
            f"starting: other work will show in the figures")

    groups = {ch: variants_for(ch, a.zstd_channels) for ch in a.channel_list}
    labels = {CANDIDATE: a.label, BASELINE: a.baseline_label}
    results: dict = {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(["python3", "bench/multifd.py", *argv]),
        "args": {"runs": a.runs, "channels": a.channel_list, "mem": a.mem,
                 "zstd_channels": a.zstd_channels, "iperf_seconds": a.iperf_seconds,
                 "iperf_len": a.iperf_len,
                 "settle": a.settle, "settle_below": a.settle_below, "perf": perf is not None,
                 **({"baseline": str(a.baseline), "label": a.label,
                     "baseline_label": a.baseline_label} if baseline is not None else {})},
        "machine": machine,
        **({"binaries": {
            BASELINE: describe_binary(a.baseline, a.baseline_label),
            # The path as given, or the build's own.
            CANDIDATE: describe_binary(a.ferry or ferry, a.label),
        }} if baseline is not None else {}),
        "variants": [v.name for ch in a.channel_list for v in groups[ch]],
        "variant_defs": {v.name: asdict(v) for ch in a.channel_list for v in groups[ch]},
        "rounds": [],
    }
    for role in (BASELINE, CANDIDATE) if baseline is not None else ():
        b = results["binaries"][role]
        log(f"{b['label']}: {b['path']} ({b['version']}, sha256 {b['sha256'][:12]}"
            + (f", checkout {b['git']['checkout']} at {b['git']['describe']}" if b["git"] else "")
            + ")")
    tmp = Path(tempfile.mkdtemp(prefix="ferry-multifd-"))
    t_start = time.monotonic()
    failed = 0

    def quiet() -> dict:
        return h.settle(a.settle, a.settle_below) if a.settle > 0 else {}

    try:
        for rnd in range(1, a.runs + 1):
            rr: dict = {"round": rnd, "tcp": {}, "tcp_len": {}, "runs": []}
            results["rounds"].append(rr)
            tag = f"[run {rnd}/{a.runs}]"
            for ch in a.channel_list:
                streams = max(ch, 1)
                # iperf3's defaults first (the reference the issue names), then, if asked,
                # the same with ferry's write size.
                for key, length in (("tcp", None), ("tcp_len", a.iperf_len)):
                    if key == "tcp_len" and not length:
                        continue
                    what = f"loopback TCP, {streams} stream(s)" + (
                        f", {length} writes" if length else "")
                    q = quiet()
                    window = h.OtherLoad()

                    def measure(streams=streams, length=length):
                        t = h.ref_tcp(iperf3, a.iperf_seconds, tmp, streams=streams,
                                      length=length)
                        return t, f"{t['gbs']:.2f} GB/s"
                    rr[key][str(ch)], bad = h.reference(tag, what, measure, q, window)
                    failed += bad
                tcp_gbs = rr["tcp"][str(ch)].get("gbs")
                tcp_len_gbs = rr["tcp_len"].get(str(ch), {}).get("gbs")
                # Alternate the order between rounds: nothing always runs first.
                vs = groups[ch] if rnd % 2 else list(reversed(groups[ch]))
                # With --baseline, both binaries back to back for each variant, the baseline
                # first in odd rounds and the candidate first in even ones.
                pair = ([(BASELINE, baseline), (CANDIDATE, ferry)] if rnd % 2
                        else [(CANDIDATE, ferry), (BASELINE, baseline)])
                plan = []
                for v in vs:
                    if baseline is None:
                        plan.append((v, None, ferry, f"r{rnd}", tag, True))
                        continue
                    for i, (role, exe) in enumerate(pair):
                        plan.append((v, role, exe, f"r{rnd}-{role}", f"{tag} {labels[role]}",
                                     i == 0))
                for v, role, exe, dtag, ltag, first in plan:
                    q = quiet()
                    r = run_variant(exe, v, a.mem, tmp, dtag)
                    r.update(q)
                    r["round"] = rnd
                    if role is not None:
                        r["binary"] = role
                        r["pair_first"] = first
                    if r.get("ok"):
                        m = r["metrics"]
                        m["tcp_gbs"] = tcp_gbs
                        m["to_tcp"] = (m["pass0_gbs"] / tcp_gbs
                                       if tcp_gbs and m["pass0_gbs"] else None)
                        m["tcp_len_gbs"] = tcp_len_gbs
                        m["to_tcp_len"] = (m["pass0_gbs"] / tcp_len_gbs
                                           if tcp_len_gbs and m["pass0_gbs"] else None)
                    else:
                        failed += 1
                    rr["runs"].append(r)
                    log_run(ltag, r)
                h.write_json(out, results)
        if perf:
            top = max(a.channel_list)
            prof: dict = {"runs": []}
            results["profile"] = prof
            for digest in (True, False):
                v = Variant("random", top, digest)
                q = quiet()
                r = run_variant(ferry, v, a.mem, tmp, "perf", perf=perf)
                r.update(q)
                if baseline is not None:
                    r["binary"] = CANDIDATE
                prof["runs"].append(r)
                log_run("[profile]" + (f" {a.label}" if baseline is not None else ""), r)
        elif not a.no_perf:
            results["profile"] = {"error": perf_why}
    except KeyboardInterrupt as e:
        results["interrupted"] = str(e) or "Ctrl-C"
        log(f"interrupted ({results['interrupted']}); stopping children, writing what was "
            f"measured")
    finally:
        h.reap_all()
        results["elapsed_s"] = round(time.monotonic() - t_start, 1)
        try:
            # What was measured is written first, so that a fault in the summary loses none.
            h.write_json(out, results)
            results["summary"] = summarise(results)
            h.write_json(out, results)
            md = render_markdown(results)
            md_path.write_text(md)
        finally:
            if a.keep_tmp:
                log(f"process logs kept in {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out} and {md_path} ({results['elapsed_s']:.0f} s of measuring)")
    if a.markdown:
        print(md, end="")
    if results.get("interrupted"):
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    h.run_main(main)
