//! Every other payload: the first byte picks the frame kind, the rest is its payload.

#![no_main]

use ferry_migration::wire::{
    decode_reason, encode_reason, Accept, Annotations, Completed, DevicePlan, DeviceRef,
    DeviceStateHeader, EndOfStream, PassEnd, PopulatedExtents, Refuse, StateDigest,
    VcpuStateHeader, MAX_DEVICES, MAX_NAME_LEN, MAX_REASON_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, b)) = data.split_first() else {
        return;
    };
    match kind % 14 {
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
            let what = if kind % 14 == 2 {
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
        8 => {
            if let Ok(c) = Completed::decode(b) {
                assert_eq!(c.encode(), b);
            }
        }
        9 => {
            if let Ok(p) = DevicePlan::decode(b) {
                assert!(p.modes.len() <= MAX_DEVICES);
                assert_eq!(p.encode(), b);
            }
        }
        10 => {
            if let Ok(r) = DeviceRef::decode(b, "switchover acknowledgement") {
                assert!(r.name.len() <= MAX_NAME_LEN);
                assert_eq!(r.encode(), b);
            }
        }
        11 => {
            if let Ok(d) = StateDigest::decode(b) {
                assert_eq!(d.encode(), b);
            }
        }
        12 => {
            // Blocks of 1000 and 64 pages, the second's earlier frames ending at page 7.
            let (pages, ends) = ([1000, 64], [0, 7]);
            if let Ok(p) = PopulatedExtents::decode(b, &pages, &ends) {
                let block = usize::from(p.block);
                let mut next = ends[block];
                for &(first, n) in &p.extents {
                    assert!(n > 0 && first >= next && first + n <= pages[block]);
                    next = first + n;
                }
                assert_eq!(p.encode(), b);
            }
        }
        _ => {
            // Hello annotations, one `name=value` per line: whatever is taken as an
            // offer or a configuration item writes back to the same entry.
            let text = String::from_utf8_lossy(b);
            let props: Vec<(String, String)> = text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (format!("x-hello.{k}"), v.to_string()))
                .collect();
            let (rest, a) = Annotations::split(&props);
            assert!(rest.is_empty());
            let mut h = ferry_migration::wire::Hello {
                session_id: 0,
                release: String::new(),
                machine: String::new(),
                page_size: 4096,
                flags: 0,
                wire_props: Vec::new(),
                compat_pinned: Vec::new(),
                ram_blocks: Vec::new(),
                vcpu_count: 0,
                vcpu_state: String::new(),
                vcpu_version: 0,
                devices: Vec::new(),
                channels: 0,
                compression: ferry_migration::wire::Compression::None,
            };
            a.apply(&mut h);
            let (_, again) = Annotations::split(&h.wire_props);
            assert_eq!(again.precopy, a.precopy);
            assert_eq!(again.device_config, a.device_config);
            assert_eq!(again.switchover_commit, a.switchover_commit);
        }
    }
});
