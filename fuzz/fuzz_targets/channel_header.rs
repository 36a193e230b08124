//! The header that opens a data channel, as the destination's doorman reads it: the input
//! as a run of 32-byte arrays, each decoded on its own.
//!
//! Checks, beyond no panic: an array is accepted exactly when it has the channel magic, its
//! own length, zero reserved bytes, a count from 1 to `MAX_CHANNELS` and an index below the
//! count; what is accepted holds the array's fields and re-encodes to the same bytes.

#![no_main]

use ferry_migration::wire::{ChannelHeader, WireError, CHANNEL_MAGIC, MAX_CHANNELS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for b in data.chunks_exact(ChannelHeader::LEN) {
        let b: &[u8; ChannelHeader::LEN] = b.try_into().expect("exact chunk");
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let (index, count) = (u16_at(24), u16_at(26));
        let ok = b[..8] == CHANNEL_MAGIC
            && b[12..16] == (ChannelHeader::LEN as u32).to_le_bytes()
            && b[28..] == [0; 4]
            && (1..=MAX_CHANNELS).contains(&count)
            && index < count;
        match ChannelHeader::decode(b) {
            Ok(h) => {
                assert!(ok, "accepted {h:?}");
                assert!(h.count >= 1 && h.count <= MAX_CHANNELS && h.index < h.count);
                assert_eq!(&h.encode(), b, "channel header has a second spelling");
            }
            Err(WireError::BadMagic(m)) => assert!(m != CHANNEL_MAGIC && m[..] == b[..8]),
            Err(e) => assert!(!ok, "valid channel header refused: {e}"),
        }
    }
});
