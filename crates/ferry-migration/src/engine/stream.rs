//! Frames on the main channel: every frame the engine reads goes through here, and so
//! does every frame it writes, from buffers of its own or, for a device's state, from
//! the device's ([`DeviceFrame`]). The one other writer of frames is the main lane
//! ([`super::pages::MainLane`]), whose `RamBatch` frames carry guest pages straight from
//! guest memory.

use std::io::{self, Read};

use xxhash_rust::xxh3::Xxh3;

use super::error::MigrationError;
use super::transport::{Channel, Writer};
use crate::state::StateSink;
use crate::wire::{DeviceStateHeader, FrameHeader, FrameTag, StateDigest};

/// The digest of device and vCPU state as it crosses the main channel
/// (`migration.state-digest`): xxh3-64 over the payload of every device-state,
/// precopy-record and vCPU-state frame, in stream order. The source feeds it what it
/// writes and the destination what it reads, so a byte changed anywhere between the
/// two devices makes them differ.
pub(crate) struct StateHash {
    h: Xxh3,
    frames: u64,
}

impl StateHash {
    pub(crate) fn new() -> Self {
        Self {
            h: Xxh3::new(),
            frames: 0,
        }
    }

    /// A frame starts; its payload follows through [`Self::update`].
    pub(crate) fn frame(&mut self) {
        self.frames += 1;
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.h.update(bytes);
    }

    pub(crate) fn value(&self) -> StateDigest {
        StateDigest {
            digest: self.h.digest(),
            frames: self.frames,
        }
    }
}

/// A reader that feeds what it reads into a [`StateHash`], when there is one.
pub(crate) struct Hashed<'a, R: Read> {
    pub(crate) inner: R,
    pub(crate) hash: Option<&'a mut StateHash>,
}

impl<R: Read> Read for Hashed<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = self.hash.as_deref_mut() {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// A device-state frame (or a device's precopy record) whose state the device writes
/// in pieces: the frame header and the device header go out with the first bytes, once
/// the device has said how long its state is. Small pieces are gathered up to
/// [`DeviceFrame::GATHER`] bytes; a larger one goes to the socket straight from the
/// device's memory, together with what was gathered before it, in one vectored write.
/// Every payload byte also goes into the state digest, when there is one.
pub(crate) struct DeviceFrame<'a> {
    /// The channel's write lock, held from the first byte to the last.
    w: Writer<'a>,
    tag: FrameTag,
    header: DeviceStateHeader,
    buf: Vec<u8>,
    hash: Option<&'a mut StateHash>,
    /// Payload bytes, headers included.
    payload: u64,
}

impl<'a> DeviceFrame<'a> {
    pub(crate) const GATHER: usize = 64 << 10;

    /// A frame of `tag` ([`FrameTag::DeviceState`] or [`FrameTag::DevicePrecopy`]).
    pub(crate) fn new(
        ch: &'a Channel,
        tag: FrameTag,
        header: DeviceStateHeader,
        hash: Option<&'a mut StateHash>,
    ) -> Self {
        Self {
            w: ch.lock(),
            tag,
            header,
            buf: Vec::new(),
            hash,
            payload: 0,
        }
    }

    /// The payload bytes the frame carries (0 if the device wrote nothing).
    pub(crate) fn payload_len(&self) -> u64 {
        self.payload
    }

    /// Writes what is still gathered.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.w.write_bufs(&[&self.buf])?;
            self.buf.clear();
        }
        Ok(())
    }
}

impl StateSink for DeviceFrame<'_> {
    fn begin(&mut self, len: u64) -> io::Result<()> {
        let head = self.header.encode(&[]);
        let frame_len = len + head.len() as u64;
        let max = self.tag.max_len();
        if frame_len > u64::from(max) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "device {}: a state of {len} bytes does not fit a {} frame (at most {max} bytes)",
                    self.header.name,
                    self.tag.name()
                ),
            ));
        }
        let fh = FrameHeader {
            tag: self.tag,
            len: frame_len as u32,
        }
        .encode();
        self.buf.extend_from_slice(&fh);
        self.buf.extend_from_slice(&head);
        self.payload = frame_len;
        if let Some(h) = self.hash.as_deref_mut() {
            h.frame();
            h.update(&head);
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if let Some(h) = self.hash.as_deref_mut() {
            h.update(bytes);
        }
        if self.buf.len() + bytes.len() <= Self::GATHER {
            self.buf.extend_from_slice(bytes);
            return Ok(());
        }
        self.w.write_bufs(&[&self.buf, bytes])?;
        self.buf.clear();
        Ok(())
    }
}

/// Writes one frame (header and payload) with a single system call where possible.
pub(crate) fn write_frame(
    ch: &Channel,
    tag: FrameTag,
    payload: &[u8],
    peer: &'static str,
    phase: &'static str,
) -> Result<(), MigrationError> {
    write_frame_after(ch, &[], tag, payload, peer, phase)
}

/// Writes `prefix` (the stream header, before the hello) and then one frame, together.
pub(crate) fn write_frame_after(
    ch: &Channel,
    prefix: &[u8],
    tag: FrameTag,
    payload: &[u8],
    peer: &'static str,
    phase: &'static str,
) -> Result<(), MigrationError> {
    let hdr = FrameHeader {
        tag,
        len: payload.len() as u32,
    }
    .encode();
    ch.write_bufs(&[prefix, &hdr, payload])
        .map_err(|e| MigrationError::io(peer, phase, e))
}

/// Reads and bounds the next frame header.
pub(crate) fn read_frame_header(
    ch: &mut Channel,
    peer: &'static str,
    phase: &'static str,
) -> Result<FrameHeader, MigrationError> {
    let mut b = [0u8; FrameHeader::LEN];
    ch.read_exact(&mut b)
        .map_err(|e| MigrationError::io(peer, phase, e))?;
    Ok(FrameHeader::decode(&b)?)
}

/// Reads a payload whose length the header already bounded.
pub(crate) fn read_payload(
    ch: &mut Channel,
    len: u32,
    peer: &'static str,
    phase: &'static str,
) -> Result<Vec<u8>, MigrationError> {
    let mut v = vec![0u8; len as usize];
    ch.read_exact(&mut v)
        .map_err(|e| MigrationError::io(peer, phase, e))?;
    Ok(v)
}

/// Reads exactly `buf.len()` bytes.
pub(crate) fn read_exact(
    ch: &mut Channel,
    buf: &mut [u8],
    peer: &'static str,
    phase: &'static str,
) -> Result<(), MigrationError> {
    ch.read_exact(buf)
        .map_err(|e| MigrationError::io(peer, phase, e))
}
