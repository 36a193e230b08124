//! The page pipeline: one on each side, whichever lane the pages travel on.
//!
//! A *lane* is where pages go: the main connection (`RamBatch` frames, when the
//! migration has no data channels) or one of the data channels (multifd packets, see
//! [`super::multifd`]). Only a lane's encoding differs; everything else about a page
//! exists once, here:
//!
//! * source: [`Picker`] takes pages from the dirty bitmap in batches of up to
//!   [`BATCH_PAGES`]; [`Classifier`] tells zero pages from data pages and updates the
//!   digest, once per page sent; [`MainLane`] encodes a batch as a `RamBatch` frame (the
//!   data lane's encoder is the multifd sender, which calls the same classifier);
//! * destination: [`Lander`] puts a decoded batch into guest memory (data by `readv`
//!   straight from the socket, or from a decompression buffer), applies zero pages only
//!   where the page may hold data, marks what it wrote and updates the digest;
//! * both: [`record`] moves the RAM statistics a user reads.
//!
//! Guest memory itself is read and written only through [`super::memory`].

use std::io;
use std::sync::Arc;

use super::bitmap::{DirtyBitmap, GROUP_WORDS};
use super::digest::{zero_page_hash, PageDigest};
use super::error::MigrationError;
use super::memory::GuestMemory;
use super::multifd::ChannelCounters;
use super::stats::MigrationMonitor;
use super::transport::Channel;
use crate::wire::{FrameHeader, FrameTag, RamBatchHeader, MAX_BATCH_PAGES, MAX_PACKET_PAGES};
use crate::PAGE_SIZE;

/// Pages in one batch, on either lane: a `RamBatch` frame and a multifd packet hold the
/// same number, so a batch never needs splitting when it changes lane.
pub(crate) const BATCH_PAGES: usize = MAX_BATCH_PAGES;
const _: () = assert!(MAX_BATCH_PAGES == MAX_PACKET_PAGES);

/// Takes pages from a block's pending bitmap in batches, clearing the bits it takes.
/// A group of words is taken whole (see [`DirtyBitmap::take_group`]) and its bits handed
/// out across batches; groups the bitmap's summary shows empty are never looked at, so a
/// pass over a bitmap with nothing pending costs nothing in proportion to RAM.
pub(crate) struct Picker {
    /// The next group to look for.
    group: usize,
    /// The words of the group taken last.
    words: [u64; GROUP_WORDS],
    /// Index in the bitmap of `words[0]`.
    base: usize,
    /// The first of `words` not yet handed out.
    next: usize,
}

impl Default for Picker {
    fn default() -> Self {
        Self {
            group: 0,
            words: [0; GROUP_WORDS],
            base: 0,
            next: GROUP_WORDS,
        }
    }
}

impl Picker {
    /// Fills `out` (cleared first) with up to `max` pending pages in ascending order;
    /// false when nothing was left.
    pub fn next(&mut self, bm: &DirtyBitmap, out: &mut Vec<u64>, max: usize) -> bool {
        out.clear();
        while out.len() < max {
            if self.next == GROUP_WORDS {
                let Some(g) = bm.next_marked_group(self.group) else {
                    break;
                };
                self.group = g + 1;
                if bm.take_group(g, &mut self.words) {
                    self.base = g * GROUP_WORDS;
                    self.next = 0;
                }
                continue;
            }
            let bits = &mut self.words[self.next];
            if *bits == 0 {
                self.next += 1;
                continue;
            }
            let bit = bits.trailing_zeros() as usize;
            *bits &= *bits - 1;
            out.push(((self.base + self.next) * 64 + bit) as u64);
        }
        !out.is_empty()
    }
}

/// A batch of pages of one block, classified.
#[derive(Default)]
pub(crate) struct Batch {
    pub block: usize,
    /// Every page in the order picked, with whether it is zero.
    pub entries: Vec<(u64, bool)>,
    /// The data pages, in the same order.
    pub normal: Vec<u64>,
    /// The zero pages, in the same order.
    pub zero: Vec<u64>,
}

impl Batch {
    fn clear(&mut self, block: usize) {
        self.block = block;
        self.entries.clear();
        self.normal.clear();
        self.zero.clear();
    }
}

/// The one place a page is examined when it is sent: zero or data before, and its
/// digest term. The multifd senders and the main lane each own one.
///
/// A data page's term is taken right after the page was written to the stream, not
/// before: the source's one read of a page from memory is then the kernel's copy into
/// the socket, and the hash finds the page in cache (a batch is 512 KiB); hashed first,
/// the hash paid for the read from memory at a third of its in-cache speed. Which copy
/// of the bytes the term describes does not change: a page the guest writes between the
/// send and the hash was written after its dirty bit was harvested, so it is dirty again
/// and its next copy (at the latest the final pass's, with the guest stopped) replaces
/// both its data and its term, exactly as for a write between hash and send.
pub(crate) struct Classifier {
    mem: Arc<GuestMemory>,
    digest: Option<Arc<PageDigest>>,
}

impl Classifier {
    pub fn new(mem: Arc<GuestMemory>, digest: Option<Arc<PageDigest>>) -> Self {
        Self { mem, digest }
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// Sorts `pages` of `block` into zero and data pages, and records the zero pages'
    /// digest terms; the data pages' terms follow with [`Classifier::sent`].
    pub fn classify(&mut self, block: usize, pages: &[u64], out: &mut Batch) {
        out.clear(block);
        for &p in pages {
            let zero = self.mem.is_zero(block, p);
            out.entries.push((p, zero));
            if zero {
                out.zero.push(p);
            } else {
                out.normal.push(p);
            }
        }
        if let Some(d) = &self.digest {
            let zero = zero_page_hash();
            d.update_all(block, out.zero.iter().map(|&p| (p as usize, zero)));
        }
    }

    /// Records the digest terms of a batch's data pages, once they were written.
    pub fn sent(&self, batch: &Batch) {
        if let Some(d) = &self.digest {
            let b = batch.block;
            d.update_all(
                b,
                batch
                    .normal
                    .iter()
                    .map(|&p| (p as usize, self.mem.hash_page(b, p))),
            );
        }
    }
}

/// The main connection as a lane: a batch becomes one `RamBatch` frame (frame header,
/// batch header, an entry per page, then the data pages), written with one `writev`
/// straight from guest memory.
pub(crate) struct MainLane {
    classifier: Classifier,
    batch: Batch,
    head: Vec<u8>,
    out: PageWriter,
}

// SAFETY: the iovecs point into guest memory kept alive by the classifier's
// `GuestMemory`; they are rebuilt for every frame and never outlive it.
unsafe impl Send for MainLane {}

impl MainLane {
    pub fn new(classifier: Classifier) -> Self {
        Self {
            classifier,
            batch: Batch::default(),
            head: Vec::with_capacity(FrameHeader::LEN + RamBatchHeader::LEN + BATCH_PAGES * 8),
            out: PageWriter::default(),
        }
    }

    /// Sends `pages` of `block` as one frame; returns what went on the wire.
    pub fn send(
        &mut self,
        ch: &Channel,
        block: usize,
        pages: &[u64],
    ) -> Result<ChannelCounters, MigrationError> {
        self.classifier.classify(block, pages, &mut self.batch);
        let b = &self.batch;
        let len = RamBatchHeader::LEN + b.entries.len() * 8 + b.normal.len() * PAGE_SIZE;
        self.head.clear();
        self.head.extend_from_slice(
            &FrameHeader {
                tag: FrameTag::RamBatch,
                len: len as u32,
            }
            .encode(),
        );
        self.head.extend_from_slice(
            &RamBatchHeader {
                block: block as u32,
                count: b.entries.len() as u32,
            }
            .encode(),
        );
        for &(p, zero) in &b.entries {
            self.head
                .extend_from_slice(&RamBatchHeader::entry(p, zero).to_le_bytes());
        }
        self.out
            .send(ch, self.classifier.memory(), &self.head, block, &b.normal)
            .map_err(|e| MigrationError::io("destination", "RAM transfer", e))?;
        self.classifier.sent(b);
        Ok(ChannelCounters {
            packets: 1,
            pages: b.entries.len() as u64,
            zero: b.zero.len() as u64,
            bytes: (FrameHeader::LEN + len) as u64,
            raw_bytes: (b.normal.len() * PAGE_SIZE) as u64,
        })
    }
}

/// Writes a head (a buffer of ours) followed by whole guest pages: the one way pages
/// leave guest memory, for both lanes. On a plain socket one `writev` gathers them
/// straight from guest memory; on any other stream they are copied into a buffer
/// first (see [`super::transport::MigrationStream::raw_fd`]).
#[derive(Default)]
pub(crate) struct PageWriter {
    iov: Vec<libc::iovec>,
    staged: Vec<u8>,
}

// SAFETY: the iovecs point into guest memory only during `send`, which rebuilds them
// each time.
unsafe impl Send for PageWriter {}

impl PageWriter {
    pub fn send(
        &mut self,
        ch: &Channel,
        mem: &GuestMemory,
        head: &[u8],
        block: usize,
        pages: &[u64],
    ) -> io::Result<()> {
        let Some(fd) = ch.raw_fd() else {
            self.staged.resize(pages.len() * PAGE_SIZE, 0);
            for (k, &p) in pages.iter().enumerate() {
                mem.copy_page(
                    block,
                    p,
                    &mut self.staged[k * PAGE_SIZE..(k + 1) * PAGE_SIZE],
                );
            }
            return ch.write_bufs(&[head, &self.staged]);
        };
        self.iov.clear();
        self.iov.push(libc::iovec {
            iov_base: head.as_ptr() as *mut _,
            iov_len: head.len(),
        });
        for &p in pages {
            mem.push_iov(&mut self.iov, 1, block, p);
        }
        // SAFETY: the first iovec is `head`; the others are whole guest pages inside
        // mapped blocks (GuestMemory checked the indices), which stay mapped while the
        // VM lives. The kernel only reads them.
        unsafe { ch.lock().writev_all(fd, &mut self.iov) }
    }
}

/// The one place the destination puts pages into guest memory.
pub(crate) struct Lander {
    mem: Arc<GuestMemory>,
    /// Pages that may hold non-zero bytes: populated before the migration, or written
    /// by it. Shared by every lane's lander.
    written: Arc<Vec<DirtyBitmap>>,
    digest: Option<Arc<PageDigest>>,
    iov: Vec<libc::iovec>,
}

// SAFETY: as for `MainLane`: the iovecs are rebuilt for every batch.
unsafe impl Send for Lander {}

impl Lander {
    pub fn new(
        mem: Arc<GuestMemory>,
        written: Arc<Vec<DirtyBitmap>>,
        digest: Option<Arc<PageDigest>>,
    ) -> Self {
        Self {
            mem,
            written,
            digest,
            iov: Vec::with_capacity(BATCH_PAGES),
        }
    }

    /// Reads the data of `normal` pages of `block`, back to back on `ch`, straight into
    /// guest memory. The indices must have been checked against the block.
    pub fn read_data(
        &mut self,
        ch: &Channel,
        block: usize,
        normal: &[u64],
    ) -> Result<(), MigrationError> {
        let io = |e| MigrationError::io("source", "RAM transfer", e);
        let Some(fd) = ch.raw_fd() else {
            // The stream hands out its own buffers (TLS plaintext): each byte is copied
            // once, from there into its page.
            let (mem, mut k, mut at) = (&self.mem, 0, 0);
            return ch
                .read_into_full(normal.len() * PAGE_SIZE, &mut |mut b: &[u8]| {
                    while !b.is_empty() {
                        let n = b.len().min(PAGE_SIZE - at);
                        mem.store_part(block, normal[k], at, &b[..n]);
                        b = &b[n..];
                        at += n;
                        if at == PAGE_SIZE {
                            (k, at) = (k + 1, 0);
                        }
                    }
                })
                .map_err(io);
        };
        self.iov.clear();
        for &p in normal {
            self.mem.push_iov(&mut self.iov, 0, block, p);
        }
        // SAFETY: every iovec covers whole pages inside the block's mapping; the guest
        // is not running, no Rust reference points into guest memory, and no other lane
        // writes these pages in this round (a page is sent once per round).
        unsafe { ch.readv_all(fd, &mut self.iov) }.map_err(io)
    }

    /// Copies the data of `normal` pages from `data` (decompressed, back to back).
    pub fn store_data(&mut self, block: usize, normal: &[u64], data: &[u8]) {
        for (k, &p) in normal.iter().enumerate() {
            self.mem
                .store_page(block, p, &data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]);
        }
    }

    /// Once a batch's data is in: marks the data pages written, zeroes each zero page
    /// that holds data (fresh memory stays untouched), and updates the digest.
    /// Returns the pages written to guest memory.
    pub fn settle(&mut self, block: usize, normal: &[u64], zero: &[u64]) -> u64 {
        let written = &self.written[block];
        for &p in normal {
            written.set(p as usize);
        }
        let mut zeroed = 0;
        for &p in zero {
            // A page that may hold data is read before it is written: memory populated
            // ahead (`--prealloc`) is zero already, and reading it costs far less than
            // rewriting it, which left the receivers behind the source.
            if written.is_set(p as usize) && !self.mem.is_zero(block, p) {
                self.mem.zero_page(block, p);
                zeroed += 1;
            }
        }
        if let Some(d) = &self.digest {
            let data = normal
                .iter()
                .map(|&p| (p as usize, self.mem.hash_page(block, p)));
            let zero_hash = zero_page_hash();
            d.update_all(
                block,
                data.chain(zero.iter().map(|&p| (p as usize, zero_hash))),
            );
        }
        normal.len() as u64 + zeroed
    }
}

/// Which side counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Source,
    Destination,
}

/// Moves the RAM statistics for pages sent or received on a lane: the one place they
/// move. `on_channels`: the pages travelled on data channels.
pub(crate) fn record(
    monitor: &MigrationMonitor,
    d: &ChannelCounters,
    on_channels: bool,
    side: Side,
) {
    let normal = d.pages - d.zero;
    monitor.update(|i| {
        i.ram.transferred += d.bytes;
        if on_channels {
            i.ram.multifd_bytes += d.bytes;
        }
        i.ram.duplicate += d.zero;
        i.ram.normal += normal;
        i.ram.normal_bytes += normal * PAGE_SIZE as u64;
        if side == Side::Source {
            i.ram.remaining = i.ram.remaining.saturating_sub(normal * PAGE_SIZE as u64);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_picker_hands_out_every_page_once_in_batches_and_clears_them() {
        let bm = DirtyBitmap::new(1000);
        let want: Vec<u64> = (0..1000).filter(|p| p % 3 != 1 || *p > 900).collect();
        for &p in &want {
            bm.set(p as usize);
        }
        let mut pick = Picker::default();
        let mut got = Vec::new();
        let mut batch = Vec::new();
        while pick.next(&bm, &mut batch, 128) {
            assert!(batch.len() <= 128);
            got.extend_from_slice(&batch);
        }
        assert_eq!(got, want);
        assert_eq!(bm.count(), 0);
        assert!(!pick.next(&bm, &mut batch, 128));
    }

    #[test]
    fn the_picker_skips_empty_groups_and_leaves_late_pages_for_the_next_pass() {
        use crate::engine::bitmap::GROUP_PAGES;
        let bm = DirtyBitmap::new(1 << 28);
        let far = [3, 7 * GROUP_PAGES + 1, (1 << 28) - 1];
        for p in far {
            bm.set(p);
        }
        let mut pick = Picker::default();
        let mut batch = Vec::new();
        assert!(pick.next(&bm, &mut batch, 2));
        assert_eq!(batch, [far[0] as u64, far[1] as u64]);
        // Its group is behind the picker now: this pass does not see it, the next does.
        bm.set(far[1] + 1);
        assert!(pick.next(&bm, &mut batch, 2));
        assert_eq!(batch, [far[2] as u64]);
        assert!(!pick.next(&bm, &mut batch, 2));
        assert_eq!(bm.count(), 1);
        let mut pick = Picker::default();
        assert!(pick.next(&bm, &mut batch, 2));
        assert_eq!(batch, [far[1] as u64 + 1]);
    }

    #[test]
    fn a_zero_page_zeroes_a_page_that_holds_data_and_leaves_zero_ones_unwritten() {
        use crate::engine::memory::test_ram;
        let mem = Arc::new(GuestMemory::new(test_ram(4)));
        let written = Arc::new(vec![DirtyBitmap::new(4)]);
        let mut page = vec![0u8; PAGE_SIZE];
        page[100] = 9;
        mem.store_page(0, 0, &page);
        // Pages 0 and 1 may hold data (page 1 does not), pages 2 and 3 are fresh.
        written[0].set(0);
        written[0].set(1);
        let mut lander = Lander::new(Arc::clone(&mem), Arc::clone(&written), None);
        let rewritten = lander.settle(0, &[], &[0, 1, 2]);
        assert!(mem.is_zero(0, 0), "a zero page left the old data in place");
        assert_eq!(rewritten, 1, "only the page that held data is written");
    }
}
