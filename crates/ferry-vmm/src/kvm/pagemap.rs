//! Which pages of a host mapping were ever touched, from `/proc/self/pagemap`.
//!
//! A page that is neither present (bit 63) nor swapped (bit 62) has never been written
//! (or was dropped), so it reads as zero and a migration need not read it at all. Asking
//! the kernel costs 8 bytes per page of reading and no page faults, where scanning the
//! memory would fault in every page it looks at.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use ferry_migration::engine::bitmap::DirtyBitmap;
use ferry_migration::PAGE_SIZE;

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
/// Entries read per `pread`: 512 KiB of pagemap for 256 MiB of memory.
const CHUNK: usize = 64 * 1024;

/// Sets in `out` page `i` for every `PAGE_SIZE` page `i` of `[host, host + len)` that is
/// present or swapped. `host` must be page-aligned and `out` must have at least
/// `len / PAGE_SIZE` pages. The pages are not accessed.
pub fn mark_populated(host: *const u8, len: usize, out: &DirtyBitmap) -> io::Result<()> {
    let addr = host as usize;
    if addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {addr:#x}+{len:#x} is not page-aligned"),
        ));
    }
    let pages = len / PAGE_SIZE;
    if out.pages() < pages {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bitmap of {} pages for a range of {pages}", out.pages()),
        ));
    }
    let file = File::open("/proc/self/pagemap")?;
    let mut buf = vec![0u8; CHUNK.min(pages) * 8];
    let mut page = 0;
    while page < pages {
        let n = CHUNK.min(pages - page);
        let bytes = &mut buf[..n * 8];
        let offset = ((addr / PAGE_SIZE + page) * 8) as u64;
        file.read_exact_at(bytes, offset)?;
        // Build whole words so the bitmap sees one atomic OR per 64 pages.
        let mut word = 0u64;
        for (i, entry) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(entry.try_into().expect("8-byte chunk"));
            let p = page + i;
            if e & (PRESENT | SWAPPED) != 0 {
                word |= 1 << (p % 64);
            }
            if p % 64 == 63 || i == n - 1 {
                out.or_word(p / 64, word);
                word = 0;
            }
        }
        page += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_pagemap_reports_touched_pages_only() {
        let pages = 200;
        let len = pages * PAGE_SIZE;
        // SAFETY: an anonymous private mapping of `len` bytes, unmapped below.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        let host = host as *mut u8;
        // Keep THP from populating neighbours of the touched pages.
        // SAFETY: advice on the mapping made above.
        unsafe { libc::madvise(host.cast(), len, libc::MADV_NOHUGEPAGE) };
        for p in [0, 63, 64, 130, 199] {
            // SAFETY: `p * PAGE_SIZE` is inside the mapping.
            unsafe { host.add(p * PAGE_SIZE).write_volatile(1) };
        }
        let out = DirtyBitmap::new(pages);
        mark_populated(host, len, &out).unwrap();
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(host.cast(), len) };
        let set: Vec<usize> = (0..pages).filter(|&p| out.is_set(p)).collect();
        assert_eq!(set, [0, 63, 64, 130, 199]);
    }

    #[test]
    fn kvm_pagemap_rejects_unaligned_ranges() {
        let out = DirtyBitmap::new(1);
        assert!(mark_populated(4097 as *const u8, 4096, &out).is_err());
        assert!(mark_populated(4096 as *const u8, 8192, &out).is_err());
    }
}
