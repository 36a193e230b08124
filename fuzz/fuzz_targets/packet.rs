//! A data channel's packet: the 40-byte header, then the page offsets checked against the
//! RAM block, as a receiver does before it touches guest memory.
//!
//! Input: `mode`, the block size, the 40-byte header, then the offset bytes.
//!
//! * mode bit 0: compression was negotiated (`ZSTD` packets allowed);
//! * bit 1: skip the header check, so the offset decoder also sees page counts no header
//!   check has bounded;
//! * bit 2: the block size is one byte (0 to 255 pages) instead of eight (any `u64`);
//! * bit 3: pass all remaining bytes as offsets instead of exactly `offsets_len` of them;
//! * bit 4: write the packet magic over the header's first four bytes;
//! * bit 5: bring the page counts into range (normal and zero pages summing to at most
//!   `MAX_PACKET_PAGES`, from the counts' low bytes) and set the data length from them:
//!   exactly the pages, or for a `ZSTD` packet fewer bytes (the length's low byte less),
//!   so the decoder's arithmetic relations hold and the offsets are reached.
//!
//! Checks, beyond no panic: the header is accepted exactly when the format allows it
//! (the rules are spelled out below, apart from the decoder's), and re-encodes to its
//! bytes; accepted offsets are exactly the header's page count, inside the block, each
//! page once, normal pages first in the order sent.

#![no_main]

use ferry_migration::wire::{PacketHeader, MAX_PACKET_PAGES, PACKET_MAGIC};
use ferry_migration::PAGE_SIZE;
use libfuzzer_sys::fuzz_target;

/// What the header decoder must accept.
fn header_ok(magic: u32, h: &PacketHeader, zstd_allowed: bool) -> bool {
    let f = h.flags;
    let zstd = f & PacketHeader::ZSTD != 0;
    if magic != PACKET_MAGIC
        || f & !(PacketHeader::SYNC | PacketHeader::LAST | PacketHeader::ZSTD) != 0
        || (zstd && !zstd_allowed)
        || h.packet == 0
    {
        return false;
    }
    if f & PacketHeader::SYNC != 0 {
        // A sync carries its number and nothing else.
        return !zstd && h.sync != 0 && (h.block, h.normal, h.zero, h.data_len) == (0, 0, 0, 0);
    }
    let pages = u64::from(h.normal) + u64::from(h.zero);
    let raw = u64::from(h.normal) * PAGE_SIZE as u64;
    let len = u64::from(h.data_len);
    f & PacketHeader::LAST == 0
        && h.sync == 0
        && (1..=MAX_PACKET_PAGES as u64).contains(&pages)
        && if zstd {
            len > 0 && len < raw
        } else {
            len == raw
        }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let zstd = mode & 1 != 0;
    let (block_pages, rest) = if mode & 4 != 0 {
        let Some((&b, rest)) = rest.split_first() else {
            return;
        };
        (u64::from(b), rest)
    } else {
        let Some((b, rest)) = rest.split_first_chunk::<8>() else {
            return;
        };
        (u64::from_le_bytes(*b), rest)
    };
    let Some((hb, rest)) = rest.split_first_chunk::<{ PacketHeader::LEN }>() else {
        return;
    };
    let mut hb = *hb;
    if mode & 16 != 0 {
        hb[..4].copy_from_slice(&PACKET_MAGIC.to_le_bytes());
    }
    if mode & 32 != 0 {
        let pages = MAX_PACKET_PAGES as u32 + 1;
        let normal = u32::from(hb[28]) % pages;
        let zero = u32::from(hb[32]) % (pages - normal);
        let raw = normal * PAGE_SIZE as u32;
        let flags = u32::from_le_bytes(hb[4..8].try_into().expect("4 bytes"));
        let data_len = if flags & PacketHeader::ZSTD != 0 {
            raw.saturating_sub(1 + u32::from(hb[36]))
        } else {
            raw
        };
        hb[28..32].copy_from_slice(&normal.to_le_bytes());
        hb[32..36].copy_from_slice(&zero.to_le_bytes());
        hb[36..40].copy_from_slice(&data_len.to_le_bytes());
    }
    let u32_at = |i: usize| u32::from_le_bytes(hb[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(hb[i..i + 8].try_into().expect("8 bytes"));
    let raw = PacketHeader {
        flags: u32_at(4),
        packet: u64_at(8),
        sync: u64_at(16),
        block: u32_at(24),
        normal: u32_at(28),
        zero: u32_at(32),
        data_len: u32_at(36),
    };

    let decoded = PacketHeader::decode(&hb, zstd);
    let ok = header_ok(u32_at(0), &raw, zstd);
    assert_eq!(decoded.is_ok(), ok, "{raw:?} (zstd {zstd}): {decoded:?}");
    let h = match decoded {
        Ok(h) => {
            assert_eq!(h, raw);
            assert_eq!(h.encode(), hb, "packet header has a second spelling");
            assert!(h.offsets_len() <= 8 * MAX_PACKET_PAGES);
            h
        }
        Err(_) if mode & 2 != 0 => raw,
        Err(_) => return,
    };
    if h.is_sync() {
        return;
    }

    let offsets = if mode & 8 != 0 {
        rest
    } else {
        let Some(o) = rest.get(..h.offsets_len()) else {
            return;
        };
        o
    };
    let (mut normal, mut zero, mut scratch) = (vec![1], vec![2], Vec::new());
    if h.decode_offsets(offsets, block_pages, &mut normal, &mut zero, &mut scratch)
        .is_err()
    {
        return;
    }
    assert_eq!(normal.len(), h.normal as usize);
    assert_eq!(zero.len(), h.zero as usize);
    assert_eq!(offsets.len(), h.offsets_len());
    for (p, b) in normal.iter().chain(&zero).zip(offsets.chunks_exact(8)) {
        assert_eq!(*p, u64::from_le_bytes(b.try_into().expect("8 bytes")));
        assert!(
            *p < block_pages,
            "page {p} outside a block of {block_pages}"
        );
    }
    let mut all: Vec<u64> = normal.iter().chain(&zero).copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), normal.len() + zero.len(), "a page named twice");
});
