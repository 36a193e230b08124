//! Populate-ahead: the destination faults guest memory in before the pages land.
//!
//! A destination whose memory was never touched pays the kernel's first touch (a fault,
//! a fresh zeroed page) for every page that lands, on the thread that receives it; on
//! some hosts that runs at a fraction of the link's rate (BENCHMARKS.md, "Cold
//! destinations"). With `migration.x-ferry-populate-ahead` on, the source sends where
//! its memory is populated ([`PopulatedExtents`](crate::wire::PopulatedExtents))
//! before pass 0, and the destination hands those extents to one thread that faults
//! them in through [`GuestRam::prepare`], in the order the pages will come, while the
//! receivers write what arrives. A page the receiver reaches first is simply present
//! when the populating thread gets there, and the other way round; neither changes
//! what the other wrote.
//!
//! The cost: the destination ends up with the source's populated memory, zero pages
//! included, where without it a page that arrives as zero is never touched. Only
//! memory the source holds is faulted in, so an idle guest still costs nothing.
//!
//! Bounds: the thread works in steps of [`STEP_PAGES`] and looks at its stop flag
//! between them, so it ends within one step of the migration (it is joined before the
//! destination reports its outcome). An error from `prepare` (an old kernel without
//! `MADV_POPULATE_WRITE`, memory that cannot be populated) ends the populating for the
//! migration; the pages are then faulted in as they land, as without the property.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::vm::GuestRam;
use crate::PAGE_SIZE;

/// Pages faulted in per call: 2 MiB, a few milliseconds at the slowest first-touch rate
/// measured here (0.3 GB/s).
pub const STEP_PAGES: u64 = 512;

/// The populating thread of one incoming migration.
pub struct Populator {
    tx: Option<mpsc::Sender<(usize, u64, u64)>>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    announced: u64,
    thread: Option<JoinHandle<()>>,
}

impl Populator {
    pub fn start(ram: Arc<dyn GuestRam>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<(usize, u64, u64)>();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (stop2, done2) = (Arc::clone(&stop), Arc::clone(&done));
        let thread = std::thread::Builder::new()
            .name("ferry-populate".into())
            .spawn(move || {
                while let Ok((block, first, pages)) = rx.recv() {
                    let end = first + pages;
                    let mut p = first;
                    while p < end {
                        if stop2.load(Ordering::Relaxed) {
                            return;
                        }
                        let n = STEP_PAGES.min(end - p);
                        if let Err(e) = ram.prepare(block, p as usize, n as usize) {
                            tracing::info!(
                                error = %e,
                                "populate-ahead stops: pages are faulted in as they land"
                            );
                            return;
                        }
                        done2.fetch_add(n, Ordering::Relaxed);
                        p += n;
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            stop,
            done,
            announced: 0,
            thread: Some(thread),
        })
    }

    /// Queues extents of `block` (`(first page, pages)`, checked to lie inside it).
    pub fn add(&mut self, block: usize, extents: &[(u64, u64)]) {
        for &(first, pages) in extents {
            self.announced += pages;
            if let Some(tx) = &self.tx {
                // A send fails only once the thread has stopped, which ends the
                // populating for the migration: nothing to do.
                let _ = tx.send((block, first, pages));
            }
        }
    }

    /// Bytes announced and bytes faulted in so far.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.announced * PAGE_SIZE as u64,
            self.done.load(Ordering::Relaxed) * PAGE_SIZE as u64,
        )
    }

    /// Stops the thread within one step and waits for it.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Populator {
    fn drop(&mut self) {
        self.stop();
    }
}
