//! The destination against a hostile or broken source, for what 0.2 adds to the
//! stream: device precopy records, the "initial data sent" marker, and the state
//! digest.
//!
//! A real migration of a soft guest with a precopy-capable accelerator on machine type
//! `ferry-0.2` (pages on the main channel) is recorded once; each test replays it, cut
//! or changed, into a fresh destination over a socket pair. Whatever it is fed, the
//! destination must fail naming the cause, never resume the guest, and leave its
//! accelerator unable to run; the recording itself must replay to a running guest.
//! `crates/ferry-migration/tests/destination_stream.rs` does the same for 0.1's frames.

mod recording;

use ferry_migration::engine::error_chain;
use ferry_migration::engine::vm::MigratableVm;
use ferry_migration::wire::{DeviceStateHeader, FrameHeader, FrameTag};
use ferry_vmm::devices::accel::MigState;
use ferry_vmm::guest::GuestVm;
use recording::{recording, replay, Outcome, ACCEL};

/// The replay fails naming `needle` (or one of `|`-separated needles), and neither the
/// guest nor its accelerator runs. (Whether the VM could be resumed by hand is the
/// VMM's to refuse: a failed incoming VM takes no `cont`.)
fn assert_refused(o: Outcome, needle: &str) {
    let e = match &o.result {
        Ok(_) => panic!("accepted a stream that should fail with {needle:?}"),
        Err(e) => error_chain(e),
    };
    assert!(
        needle.split('|').any(|n| e.contains(n)),
        "expected {needle:?}, got: {e}"
    );
    assert!(!o.vm.is_running(), "the guest runs after: {e}");
    let a = o.vm.accels().get(0).unwrap();
    assert_ne!(a.state(), MigState::Running, "{e}");
}

#[test]
fn the_recording_replays_to_a_running_guest() {
    let r = recording();
    let tags: Vec<FrameTag> = r.frames.iter().map(|f| f.tag).collect();
    for t in [
        FrameTag::DevicePrecopy,
        FrameTag::PrecopyInitDone,
        FrameTag::StateDigest,
    ] {
        assert!(tags.contains(&t), "no {} in {tags:?}", t.name());
    }
    assert_eq!(tags.last(), Some(&FrameTag::EndOfStream));
    let o = replay(&r.whole(), true);
    if let Err(e) = &o.result {
        panic!("replay failed: {}", error_chain(e));
    }
    assert!(o.vm.is_running());
    let info = o.result.unwrap();
    assert_eq!(info.state_verified.as_deref(), Some("digest"));
    assert_eq!(o.vm.accels().get(0).unwrap().state(), MigState::Running);
}

#[test]
fn every_frame_boundary_cut_fails_without_resuming() {
    let r = recording();
    // Cut after each frame from the hello on (the last one whole completes).
    for n in 1..r.frames.len() {
        let o = replay(&r.stream(&r.frames[..n]), true);
        let e = o.result.as_ref().err().map(|e| error_chain(e));
        assert!(e.is_some(), "{n} frames of {} completed", r.frames.len());
        assert!(!o.vm.is_running(), "cut after {n} frames: resumed");
    }
}

#[test]
fn a_final_state_before_the_initial_data_marker_is_refused() {
    let r = recording();
    let mut f = r.frames.clone();
    let i = r.index(FrameTag::PrecopyInitDone)[0];
    f.remove(i);
    assert_refused(
        replay(&r.stream(&f), true),
        "came before its initial precopy data was all sent",
    );
}

#[test]
fn the_initial_data_marker_twice_is_refused() {
    let r = recording();
    let mut f = r.frames.clone();
    let i = r.index(FrameTag::PrecopyInitDone)[0];
    f.insert(i, f[i].clone());
    assert_refused(replay(&r.stream(&f), true), "for the second time");
}

#[test]
fn a_precopy_record_after_the_final_state_is_refused() {
    let r = recording();
    let mut f = r.frames.clone();
    let rec = f[r.index(FrameTag::DevicePrecopy)[0]].clone();
    let last_state = *r.index(FrameTag::DeviceState).last().unwrap();
    assert_eq!(f[last_state].device(), "accel/0");
    f.insert(last_state + 1, rec);
    assert_refused(replay(&r.stream(&f), true), "after its final state");
}

#[test]
fn precopy_records_to_a_host_that_cannot_take_them_are_refused() {
    // The destination's host cannot precopy the accelerator, so its plan says
    // stop-copy; a source that sends records anyway is refused at the first one.
    let r = recording();
    assert_refused(
        replay(&r.whole(), false),
        "a precopy record of device accel instance 0, which moves as stop-copy",
    );
}

#[test]
fn a_record_outside_the_devices_memory_is_refused() {
    let r = recording();
    let mut f = r.frames.clone();
    let i = r.index(FrameTag::DevicePrecopy)[0];
    let p = f[i].payload().to_vec();
    let (h, _) = DeviceStateHeader::decode(&p).unwrap();
    let at = FrameHeader::LEN + 2 + h.name.len() + 8;
    // The record's offset field: past the end, then not chunk-aligned.
    for offset in [ACCEL, 100] {
        f[i].bytes[at..at + 8].copy_from_slice(&offset.to_le_bytes());
        assert_refused(replay(&r.stream(&f), true), "does not fit whole chunks");
    }
}

#[test]
fn a_changed_byte_of_a_precopy_record_is_caught() {
    let r = recording();
    let mut f = r.frames.clone();
    let i = r.index(FrameTag::DevicePrecopy)[0];
    let n = f[i].bytes.len();
    f[i].bytes[n - 100] ^= 1;
    // The accelerator's own checksum sees it, unless a later record rewrote the
    // chunk; the state digest sees it either way.
    assert_refused(replay(&r.stream(&f), true), "checksum|state digest differs");
}

#[test]
fn a_missing_or_wrong_state_digest_is_refused() {
    let r = recording();
    let i = r.index(FrameTag::StateDigest)[0];
    let mut f = r.frames.clone();
    f.remove(i);
    assert_refused(
        replay(&r.stream(&f), true),
        "ended without the state digest",
    );
    let mut f = r.frames.clone();
    f[i].bytes[FrameHeader::LEN] ^= 1;
    assert_refused(replay(&r.stream(&f), true), "state digest differs");
    let mut f = r.frames.clone();
    f.insert(i, f[i].clone());
    assert_refused(replay(&r.stream(&f), true), "one came already");
}

#[test]
fn a_record_longer_than_its_schema_allows_is_refused_before_it_is_read() {
    let r = recording();
    let mut f = r.frames.clone();
    let i = r.index(FrameTag::DevicePrecopy)[0];
    // Claim a frame far longer than any record, within the frame tag's bound.
    let len = 8 << 20;
    f[i].bytes[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    f[i].bytes.resize(FrameHeader::LEN + len, 0);
    assert_refused(replay(&r.stream(&f), true), "over the limit");
}
