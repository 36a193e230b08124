//! The embedding example (`examples/embed.rs`) as a test: its tiny VMM migrates a running
//! guest between two threads over its own transport, and `run` checks the result page by
//! page, so the example keeps working as the engine changes.

#[path = "../examples/embed.rs"]
#[allow(dead_code)] // the example's `main`
mod embed;

use std::time::{Duration, Instant};

use ferry_migration::engine::MigrationStatus;

#[test]
fn the_embedding_example_migrates_a_running_guest() {
    let t = Instant::now();
    let s = embed::run().expect("the example's migration");
    let took = t.elapsed();

    assert_eq!(s.info.status, MigrationStatus::Completed, "{:?}", s.info);
    assert_eq!(s.info.verified.as_deref(), Some("digest"));
    assert_eq!(s.pages_differing, 0, "the destination's RAM differs");
    assert!(s.state_arrived, "the vCPU or the ticker state differs");
    assert!(s.guest_continued, "the guest did not carry on there");
    assert_eq!(s.ticker.get_bytes("name").unwrap(), b"ticker0");

    // Every page went at least once (the firmware filled them all), in passes of which the
    // last ran with the guest stopped, on the example's data channels.
    assert!(s.info.ram.normal >= 1024, "{:?}", s.info.ram);
    assert!(s.info.passes.last().is_some_and(|p| p.final_pass));
    assert_eq!(s.info.multifd.as_ref().map(|m| m.channels), Some(2));
    assert!(took < Duration::from_secs(10), "took {took:?}");
}
