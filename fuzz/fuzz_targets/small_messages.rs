//! Every other payload: the first byte picks the frame kind, the rest is its payload.

#![no_main]

use ferry_migration::wire::{
    decode_reason, encode_reason, Accept, Completed, DeviceStateHeader, EndOfStream, PassEnd,
    Refuse, VcpuStateHeader, MAX_NAME_LEN, MAX_REASON_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, b)) = data.split_first() else {
        return;
    };
    match kind % 9 {
        0 => {
            if let Ok(a) = Accept::decode(b) {
                assert!(a.release.len() <= MAX_NAME_LEN);
                assert_eq!(a.encode(), b);
            }
        }
        1 => {
            if let Ok(r) = Refuse::decode(b) {
                assert!(r.reason.len() <= MAX_REASON_LEN);
                assert_eq!(r.encode(), b);
            }
        }
        2 | 3 => {
            let what = if kind % 9 == 2 {
                "abort"
            } else {
                "load failed"
            };
            if let Ok(s) = decode_reason(b, what) {
                assert!(s.len() <= MAX_REASON_LEN);
                assert_eq!(encode_reason(&s), b);
            }
        }
        4 => {
            if let Ok(p) = PassEnd::decode(b) {
                assert_eq!(p.encode(), b);
            }
        }
        5 => {
            if let Ok((h, state)) = DeviceStateHeader::decode(b) {
                assert!(h.name.len() <= MAX_NAME_LEN);
                assert_eq!(h.encode(state), b);
            }
        }
        6 => {
            if let Ok((h, state)) = VcpuStateHeader::decode(b) {
                assert_eq!(h.encode(state), b);
            }
        }
        7 => {
            if let Ok(e) = EndOfStream::decode(b) {
                // The value of an absent digest is not carried; everything else is.
                let again = e.encode();
                assert_eq!(EndOfStream::decode(&again).ok(), Some(e));
                assert_eq!(again[0], b[0]);
                assert_eq!(again[17..], b[17..]);
                if e.digest.is_some() {
                    assert_eq!(again[1..9], b[1..9]);
                }
                if e.full_digest.is_some() {
                    assert_eq!(again[9..17], b[9..17]);
                }
            }
        }
        _ => {
            if let Ok(c) = Completed::decode(b) {
                assert_eq!(c.encode(), b);
            }
        }
    }
});
