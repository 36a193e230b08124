//! The destination on a 0.2 stream with device precopy, changed: a real migration of a
//! soft guest with a precopy-capable accelerator on `ferry-0.2` (the recording of
//! `crates/ferry-vmm/tests/recording`), edited by the input, then replayed into a fresh
//! destination over a socket pair.
//!
//! Input: a mode byte (bit 0 set: the destination's host cannot precopy the
//! accelerator, so its plan says stop-copy), then edits of 6 bytes each, applied in
//! order to the list of recorded frames: `op`, frame `i`, frame `j`, offset (u16 LE),
//! `v`; `op % 6` is 0 delete frame `i`, 1 insert a copy of frame `i` before frame `j`,
//! 2 swap frames `i` and `j`, 3 xor byte `offset` of frame `i` with `v`, 4 keep only the
//! first `i` frames, 5 set byte `offset` of frame `i` to `v`. Indices and offsets wrap
//! around the frames there are.
//!
//! Checks, beyond no panic and no hang: a failed replay leaves the guest and its
//! accelerator stopped; a completed one runs a guest whose memory holds its pattern and
//! whose accelerator holds exactly what its device thread wrote (so no edit can sneak
//! a wrong byte past the digests and the device's checksum).

#![no_main]

#[path = "../../crates/ferry-vmm/tests/recording/mod.rs"]
mod recording;

use ferry_migration::engine::vm::MigratableVm;
use ferry_vmm::devices::accel::MigState;
use ferry_vmm::guest::GuestVm;
use libfuzzer_sys::fuzz_target;
use recording::{recording, replay, Frame};

fn edit(frames: &mut Vec<Frame>, e: &[u8]) {
    let n = frames.len();
    if n == 0 {
        return;
    }
    let (i, j) = (e[1] as usize % n, e[2] as usize % n);
    let offset = u16::from_le_bytes([e[3], e[4]]) as usize;
    let v = e[5];
    match e[0] % 6 {
        0 => {
            frames.remove(i);
        }
        1 => {
            let f = frames[i].clone();
            frames.insert(j, f);
        }
        2 => frames.swap(i, j),
        3 => {
            let b = &mut frames[i].bytes;
            let k = offset % b.len();
            b[k] ^= v;
        }
        4 => frames.truncate(i),
        _ => {
            let b = &mut frames[i].bytes;
            let k = offset % b.len();
            b[k] = v;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, edits)) = data.split_first() else {
        return;
    };
    let r = recording();
    let mut frames = r.frames.clone();
    for e in edits.chunks_exact(6).take(16) {
        edit(&mut frames, e);
    }
    let o = replay(&r.stream(&frames), mode & 1 == 0);
    let accel = o.vm.accels().get(0).expect("the accelerator");
    match &o.result {
        Err(_) => {
            assert!(!o.vm.is_running(), "a failed replay resumed the guest");
            assert_ne!(accel.state(), MigState::Running);
        }
        Ok(_) => {
            if o.vm.is_running() {
                let (checked, wrong) = o.vm.verify().expect("verify");
                assert!(checked > 0 && wrong == 0, "{wrong} of {checked} pages wrong");
                o.vm.pause().expect("pause");
            }
            accel.check_pattern().expect("the accelerator's memory");
        }
    }
});
