//! Seals and opens 1 GiB in 16 KiB records (TLS's largest) with AES-128-GCM, the cipher
//! ferry's TLS negotiates, from ring and from aws-lc-rs (the two crypto providers of
//! rustls), and prints the CPU seconds per GiB of each, three rounds alternating: the
//! floor under what TLS adds to a migration at each end, before any copy.

use std::time::Instant;

const RECORD: usize = 16 * 1024;
const TOTAL: usize = 1 << 30;

/// This thread's user+system CPU seconds.
fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/thread-self/stat").expect("/proc/thread-self/stat");
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// The same measurement for either library: their AEAD APIs have one shape.
macro_rules! measure {
    ($lib:ident) => {{
        use $lib::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
        let nonce = |i: usize| {
            let mut n = [0u8; 12];
            n[..8].copy_from_slice(&(i as u64).to_le_bytes());
            Nonce::assume_unique_for_key(n)
        };
        let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7; 16]).unwrap());
        let mut buf = vec![0x5a; RECORD];
        let (t, c) = (Instant::now(), cpu());
        for i in 0..TOTAL / RECORD {
            let _tag = key
                .seal_in_place_separate_tag(nonce(i), Aad::empty(), &mut buf)
                .unwrap();
        }
        let (seal_wall, seal_cpu) = (t.elapsed().as_secs_f64(), cpu() - c);

        // One sealed record, opened again and again (each open is in place, so the
        // record is put back first: a 16 KiB copy per record, in cache).
        let mut sealed = vec![0x5a; RECORD];
        let tag = key
            .seal_in_place_separate_tag(nonce(0), Aad::empty(), &mut sealed)
            .unwrap();
        sealed.extend_from_slice(tag.as_ref());
        let mut rec = sealed.clone();
        let (t, c) = (Instant::now(), cpu());
        for _ in 0..TOTAL / RECORD {
            rec.copy_from_slice(&sealed);
            key.open_in_place(nonce(0), Aad::empty(), &mut rec).unwrap();
        }
        let (open_wall, open_cpu) = (t.elapsed().as_secs_f64(), cpu() - c);
        println!(
            "{:<10} AES-128-GCM, 16 KiB records, 1 GiB: seal {seal_cpu:.3} CPU s ({:.1} GB/s), \
             open {open_cpu:.3} CPU s ({:.1} GB/s, with a copy per record)",
            stringify!($lib),
            TOTAL as f64 / seal_wall / 1e9,
            TOTAL as f64 / open_wall / 1e9
        );
    }};
}

fn main() {
    for _ in 0..3 {
        measure!(ring);
        measure!(aws_lc_rs);
    }
}
