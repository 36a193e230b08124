//! The least a verified page transfer costs on this host.
//!
//! A migration's pass 0 moves guest pages from the source's memory into the
//! destination's, and with ferry's digest each end hashes every page it moves. This
//! program does exactly that and nothing more, over loopback TCP with 1 or N streams,
//! and prints the CPU seconds per GiB each end spent, so that ferry's figures can be
//! read against the host's own: what ferry costs above `verify` is ferry's, what
//! `verify` costs is the host's.
//!
//! Three modes, measured alternating in one run:
//!
//! - `socket`: the sender writes one 512 KiB buffer again and again and the receiver
//!   reads into one (what iperf3 does): the socket alone.
//! - `place`: from a populated source memory into a populated destination memory, as
//!   large as the data, 512 KiB per write and per read (ferry's batch): the socket plus
//!   the copies from and into memory that is not in cache.
//! - `verify`: `place` with each page hashed (XXH3-64, ferry's digest hash) at both
//!   ends, the sender right after its write (as ferry does), the receiver right after
//!   each batch is in; the receiver's sum of the hashes must equal the sender's.
//!
//! Each measurement runs the receiver as a child process, so that each side's CPU is its
//! own process's (`getrusage`): on loopback the receive path's softirq work lands on the
//! sender's CPU, as it does in a migration between two `ferry` processes on one host.
//!
//! Usage: `cargo run --release -- [--size 1G] [--streams 1,4] [--rounds 5]
//! [--modes socket,place,verify] [--json]`

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Instant;

const PAGE: usize = 4096;
const BATCH: usize = 512 * 1024;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Socket,
    Place,
    Verify,
}

impl Mode {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "socket" => Ok(Self::Socket),
            "place" => Ok(Self::Place),
            "verify" => Ok(Self::Verify),
            _ => Err(format!("unknown mode {s:?} (socket, place or verify)")),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::Socket => "socket",
            Self::Place => "place",
            Self::Verify => "verify",
        }
    }
}

/// This process's user+system CPU seconds.
fn cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Anonymous memory as ferry maps guest RAM: huge pages advised, every page populated.
struct Memory {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping lives as long as the value; threads touch disjoint ranges.
unsafe impl Sync for Memory {}

impl Memory {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh private anonymous mapping; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "mmap of {len} bytes failed");
        // SAFETY: the range just mapped.
        unsafe {
            libc::madvise(ptr, len, libc::MADV_HUGEPAGE);
            if libc::madvise(ptr, len, libc::MADV_POPULATE_WRITE) != 0 {
                std::ptr::write_bytes(ptr.cast::<u8>(), 0, len);
            }
        }
        Self {
            ptr: ptr.cast(),
            len,
        }
    }

    /// Bytes `[at, at + n)`.
    fn range(&self, at: usize, n: usize) -> *mut u8 {
        assert!(at + n <= self.len);
        // SAFETY: inside the mapping (checked).
        unsafe { self.ptr.add(at) }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Sum of the XXH3-64 hashes of the pages at `p`, `n` bytes.
fn hash_pages(p: *const u8, n: usize) -> u64 {
    // SAFETY: the caller's range is inside a live mapping.
    let bytes = unsafe { std::slice::from_raw_parts(p, n) };
    bytes.chunks_exact(PAGE).fold(0u64, |s, page| {
        s.wrapping_add(xxhash_rust::xxh3::xxh3_64(page))
    })
}

/// Stream `i` of `n` carries bytes `[start, end)` of `size`, in whole batches.
fn share(size: usize, n: usize, i: usize) -> (usize, usize) {
    let batches = size / BATCH;
    let (lo, hi) = (batches * i / n, batches * (i + 1) / n);
    (lo * BATCH, hi * BATCH)
}

fn receiver(mode: Mode, size: usize, streams: usize) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let mem = (mode != Mode::Socket).then(|| Memory::new(size));
    println!("{}", listener.local_addr().unwrap().port());
    std::io::stdout().flush().unwrap();
    let conns: Vec<TcpStream> = (0..streams)
        .map(|_| listener.accept().expect("accept").0)
        .collect();
    let c0 = cpu();
    let sums: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                let mem = mem.as_ref();
                s.spawn(move || {
                    let (start, end) = share(size, streams, i);
                    let mut own = vec![0u8; BATCH];
                    let mut sum = 0u64;
                    for at in (start..end).step_by(BATCH) {
                        let p = match mem {
                            Some(m) => m.range(at, BATCH),
                            None => own.as_mut_ptr(),
                        };
                        // SAFETY: this thread's own batch of the mapping or its buffer.
                        let buf = unsafe { std::slice::from_raw_parts_mut(p, BATCH) };
                        c.read_exact(buf).expect("read");
                        if mode == Mode::Verify {
                            sum = sum.wrapping_add(hash_pages(p, BATCH));
                        }
                    }
                    sum
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let sum = sums.iter().fold(0u64, |a, &b| a.wrapping_add(b));
    println!("{} {sum}", cpu() - c0);
}

struct Measured {
    mode: Mode,
    streams: usize,
    gbs: f64,
    send_cpu: f64,
    recv_cpu: f64,
}

fn measure(src: &Memory, mode: Mode, size: usize, streams: usize) -> Result<Measured, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["recv", mode.name(), &size.to_string(), &streams.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the receiver: {e}"))?;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).map_err(|e| e.to_string())?;
    let port: u16 = line
        .trim()
        .parse()
        .map_err(|_| format!("receiver said {line:?}"))?;
    let conns: Vec<TcpStream> = (0..streams)
        .map(|_| TcpStream::connect(("127.0.0.1", port)))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("connect: {e}"))?;
    let (t, c0) = (Instant::now(), cpu());
    let sums: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                s.spawn(move || {
                    let (start, end) = share(size, streams, i);
                    let own = vec![0x5au8; BATCH];
                    let mut sum = 0u64;
                    for at in (start..end).step_by(BATCH) {
                        let p = match mode {
                            Mode::Socket => own.as_ptr(),
                            _ => src.range(at, BATCH),
                        };
                        // SAFETY: this thread's own batch of the mapping or its buffer.
                        c.write_all(unsafe { std::slice::from_raw_parts(p, BATCH) })
                            .expect("write");
                        if mode == Mode::Verify {
                            sum = sum.wrapping_add(hash_pages(p, BATCH));
                        }
                    }
                    sum
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let send_cpu = cpu() - c0;
    line.clear();
    out.read_line(&mut line).map_err(|e| e.to_string())?;
    let wall = t.elapsed().as_secs_f64();
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("receiver {status}"));
    }
    let mut f = line.split_whitespace();
    let recv_cpu: f64 = f
        .next()
        .and_then(|x| x.parse().ok())
        .ok_or("receiver's CPU")?;
    let recv_sum: u64 = f
        .next()
        .and_then(|x| x.parse().ok())
        .ok_or("receiver's sum")?;
    let sum = sums.iter().fold(0u64, |a, &b| a.wrapping_add(b));
    if mode == Mode::Verify && recv_sum != sum {
        return Err(format!(
            "hashes differ: sent {sum:016x}, received {recv_sum:016x}"
        ));
    }
    let gib = size as f64 / (1u64 << 30) as f64;
    Ok(Measured {
        mode,
        streams,
        gbs: size as f64 / wall / 1e9,
        send_cpu: send_cpu / gib,
        recv_cpu: recv_cpu / gib,
    })
}

fn parse_size(s: &str) -> Result<usize, String> {
    let (n, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let v: usize = n.parse().map_err(|_| format!("bad size {s:?}"))?;
    Ok(v * mul)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: floor [--size 1G] [--streams 1,4] [--rounds 5] [--modes socket,place,verify] \
         [--json]"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("recv") {
        let mode = Mode::parse(&args[1]).unwrap();
        receiver(mode, args[2].parse().unwrap(), args[3].parse().unwrap());
        return;
    }
    let (mut size, mut streams, mut rounds, mut json) = (1usize << 30, vec![1, 4], 5, false);
    let mut modes = vec![Mode::Socket, Mode::Place, Mode::Verify];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_else(|| usage());
        let r: Result<(), String> = (|| {
            match a.as_str() {
                "--size" => size = parse_size(&val())?,
                "--streams" => {
                    streams = val()
                        .split(',')
                        .map(|s| s.parse().map_err(|_| format!("bad stream count {s:?}")))
                        .collect::<Result<_, _>>()?
                }
                "--rounds" => rounds = val().parse().map_err(|_| "bad --rounds".to_string())?,
                "--modes" => {
                    modes = val()
                        .split(',')
                        .map(Mode::parse)
                        .collect::<Result<_, _>>()?
                }
                "--json" => json = true,
                "-h" | "--help" => usage(),
                _ => return Err(format!("unknown argument {a:?}")),
            }
            Ok(())
        })();
        if let Err(e) = r {
            eprintln!("floor: {e}");
            usage();
        }
    }
    if size < BATCH || streams.iter().any(|&n| n == 0 || n > size / BATCH) || rounds == 0 {
        eprintln!("floor: the size must hold a 512 KiB batch per stream, and rounds be ≥ 1");
        std::process::exit(2);
    }
    size -= size % BATCH;

    // The source's data: every page different, none zero, written once before.
    let src = Memory::new(size);
    for (i, w) in (0..size / 8).zip(0u64..) {
        // SAFETY: inside the mapping, 8-byte aligned.
        unsafe {
            src.ptr
                .cast::<u64>()
                .add(i)
                .write(w.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        };
    }

    let mut all: Vec<Measured> = Vec::new();
    for r in 0..rounds {
        for &n in &streams {
            for &m in &modes {
                match measure(&src, m, size, n) {
                    Ok(x) => {
                        eprintln!(
                            "round {}/{rounds} {:<6} {n} stream(s): {:.2} GB/s, send {:.3} \
                             recv {:.3} CPU s/GiB",
                            r + 1,
                            m.name(),
                            x.gbs,
                            x.send_cpu,
                            x.recv_cpu
                        );
                        all.push(x);
                    }
                    Err(e) => {
                        eprintln!("floor: {} with {n} stream(s): {e}", m.name());
                        std::process::exit(1);
                    }
                }
            }
        }
    }

    let mut rows = Vec::new();
    for &n in &streams {
        for &m in &modes {
            let mine: Vec<&Measured> = all
                .iter()
                .filter(|x| x.mode == m && x.streams == n)
                .collect();
            let med = |f: fn(&Measured) -> f64| median(mine.iter().map(|x| f(x)).collect());
            rows.push((
                m,
                n,
                med(|x| x.gbs),
                med(|x| x.send_cpu),
                med(|x| x.recv_cpu),
            ));
        }
    }
    if json {
        let items: Vec<String> = rows
            .iter()
            .map(|(m, n, g, s, r)| {
                format!(
                    "{{\"mode\":\"{}\",\"streams\":{n},\"gbs\":{g:.3},\
                     \"send_cpu_s_per_gib\":{s:.4},\"recv_cpu_s_per_gib\":{r:.4}}}",
                    m.name()
                )
            })
            .collect();
        println!(
            "{{\"size\":{size},\"rounds\":{rounds},\"medians\":[{}]}}",
            items.join(",")
        );
    } else {
        println!(
            "medians of {rounds} rounds, {} MiB per transfer:",
            size >> 20
        );
        println!("| mode | streams | GB/s | send CPU s/GiB | receive CPU s/GiB |");
        println!("|---|---:|---:|---:|---:|");
        for (m, n, g, s, r) in rows {
            println!("| {} | {n} | {g:.2} | {s:.3} | {r:.3} |", m.name());
        }
    }
}
