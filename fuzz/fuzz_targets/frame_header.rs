//! The fixed headers: the 16-byte stream header, then the input as a run of 8-byte frame
//! headers, as the destination reads them before any payload.

#![no_main]

use ferry_migration::wire::{FrameHeader, FrameTag, StreamHeader, WireError, MAGIC};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(b) = data.first_chunk::<{ StreamHeader::LEN }>() {
        let ok = b[..8] == MAGIC && b[12..] == [16, 0, 0, 0];
        match StreamHeader::decode(b) {
            Ok(h) => {
                assert!(ok);
                assert_eq!(&h.encode(), b, "stream header has a second spelling");
            }
            Err(_) => assert!(!ok, "valid stream header refused"),
        }
    }
    for b in data.chunks_exact(FrameHeader::LEN) {
        let b: &[u8; FrameHeader::LEN] = b.try_into().expect("exact chunk");
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        match FrameHeader::decode(b) {
            Ok(h) => {
                assert!(
                    h.len <= h.tag.max_len(),
                    "length over the tag limit accepted"
                );
                assert_eq!(&h.encode(), b, "frame header has a second spelling");
            }
            Err(WireError::UnknownFrame(t)) => assert!(FrameTag::from_u8(t).is_err()),
            Err(_) => {
                let tag = FrameTag::from_u8(b[0]).expect("known tag");
                assert!(
                    b[1..4] != [0, 0, 0] || len > tag.max_len(),
                    "valid header refused"
                );
            }
        }
    }
});
