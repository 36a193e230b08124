//! Which pages of a mapping were ever touched, without touching them.
//!
//! `/proc/self/pagemap` holds one 64-bit entry per virtual page: bit 63 is set when the
//! page is in RAM and bit 62 when it is swapped out. A page with neither was never
//! written (or was discarded) and reads as zero, so the source need not read it and the
//! destination need not write it. Reading the entries costs about 8 bytes per 4 KiB page
//! of kernel work, far less than touching the page.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use ferry_migration::engine::bitmap::DirtyBitmap;
use ferry_migration::PAGE_SIZE;

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
/// Entries read per system call.
const CHUNK: usize = 1 << 16;

/// Sets in `out` the bit of every page of `[host, host + len)` that is present or
/// swapped. `host` must be page aligned.
pub fn mark_populated(host: *const u8, len: usize, out: &DirtyBitmap) -> io::Result<()> {
    let f = File::open("/proc/self/pagemap")?;
    let first = host as usize / PAGE_SIZE;
    let pages = len / PAGE_SIZE;
    let mut buf = vec![0u8; CHUNK * 8];
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(CHUNK);
        let bytes = &mut buf[..n * 8];
        f.read_exact_at(bytes, ((first + done) * 8) as u64)?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
            if e & (PRESENT | SWAPPED) != 0 {
                out.set(done + i);
            }
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_touched_pages_are_populated() {
        let pages = 64;
        let len = pages * PAGE_SIZE;
        // SAFETY: a fresh anonymous private mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let p = p.cast::<u8>();
        // SAFETY: offsets inside the mapping.
        unsafe {
            p.add(3 * PAGE_SIZE).write_volatile(1);
            p.add(40 * PAGE_SIZE + 5).write_volatile(1);
        }
        let out = DirtyBitmap::new(pages);
        mark_populated(p, len, &out).unwrap();
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(p.cast(), len) };
        assert!(out.is_set(3) && out.is_set(40));
        assert_eq!(out.count(), 2);
    }
}
