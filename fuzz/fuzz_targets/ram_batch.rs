//! RAM batches, the bulk of the stream: the fixed part checked against the frame length,
//! then the page entries checked against the block and the frame, as the destination
//! does before it writes guest memory.
//!
//! Input: `mode`, block size in pages (u64), frame length (u32), the 8-byte batch header,
//! then the entry bytes. Mode bit 0 derives the frame length from the header (whole pages
//! plus a small error) instead of taking it raw, so valid batches are easy to reach; bit 1
//! passes all remaining bytes as entries instead of exactly `count` of them; bit 2 skips
//! the header check, so the entry decoder also sees counts no header check has bounded.

#![no_main]

use ferry_migration::wire::{RamBatchHeader, MAX_BATCH_PAGES};
use ferry_migration::PAGE_SIZE;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((bp, rest)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let Some((fl, rest)) = rest.split_first_chunk::<4>() else {
        return;
    };
    let Some((hdr, rest)) = rest.split_first_chunk::<{ RamBatchHeader::LEN }>() else {
        return;
    };
    let block_pages = u64::from_le_bytes(*bp);
    let raw = RamBatchHeader {
        block: u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]),
        count: u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]),
    };
    let frame_len = if mode & 1 != 0 {
        // Whole pages (fl[0] of them) plus a signed error of fl[1].
        let exact = RamBatchHeader::LEN as i64
            + 8 * i64::from(raw.count)
            + PAGE_SIZE as i64 * i64::from(fl[0]);
        (exact + i64::from(fl[1] as i8)).clamp(0, u32::MAX.into()) as u32
    } else {
        u32::from_le_bytes(*fl)
    };
    let fixed = RamBatchHeader::LEN as u64 + 8 * u64::from(raw.count);

    let h = if mode & 4 != 0 {
        raw
    } else {
        let Ok(h) = RamBatchHeader::decode(hdr, frame_len) else {
            return;
        };
        assert_eq!(h, raw);
        assert!(h.count as usize <= MAX_BATCH_PAGES);
        let data = u64::from(frame_len) - fixed;
        assert!(data % PAGE_SIZE as u64 == 0 && data / PAGE_SIZE as u64 <= u64::from(h.count));
        h
    };

    let entries = if mode & 2 != 0 {
        rest
    } else {
        let Some(e) = rest.get(..8 * h.count as usize) else {
            return;
        };
        e
    };
    let mut out = Vec::new();
    let Ok(data_pages) = h.decode_entries(entries, frame_len, block_pages, &mut out) else {
        return;
    };
    assert_eq!(out.len(), h.count as usize);
    assert_eq!(entries.len(), 8 * out.len());
    assert_eq!(data_pages, out.iter().filter(|(_, zero)| !zero).count());
    assert_eq!(
        u64::from(frame_len),
        fixed + (data_pages * PAGE_SIZE) as u64
    );
    for (&(page, zero), e) in out.iter().zip(entries.chunks_exact(8)) {
        assert!(
            page < block_pages,
            "page {page} outside a block of {block_pages}"
        );
        let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
        assert_eq!(
            RamBatchHeader::entry(page, zero),
            e,
            "entry has a second spelling"
        );
    }
});
