//! Frames on the main channel: every frame the engine reads goes through here, and so
//! does every frame it writes, from buffers of its own or, for a device's state, from
//! the device's ([`DeviceFrame`]). The one other writer of frames is the main lane
//! ([`super::pages::MainLane`]), whose `RamBatch` frames carry guest pages straight from
//! guest memory.

use std::io::{self, Read};

use super::error::MigrationError;
use super::transport::Channel;
use crate::state::StateSink;
use crate::wire::{DeviceStateHeader, FrameHeader, FrameTag, MAX_DEVICE_STATE_LEN};

/// A device-state frame whose state the device writes in pieces: the frame header and
/// the device header go out with the first bytes, once the device has said how long its
/// state is. Small pieces are gathered up to [`DeviceFrame::GATHER`] bytes; a larger one
/// goes to the socket straight from the device's memory, together with what was
/// gathered before it, in one vectored write.
pub(crate) struct DeviceFrame<'a> {
    ch: &'a Channel,
    header: DeviceStateHeader,
    buf: Vec<u8>,
}

impl<'a> DeviceFrame<'a> {
    pub(crate) const GATHER: usize = 64 << 10;

    pub(crate) fn new(ch: &'a Channel, header: DeviceStateHeader) -> Self {
        Self {
            ch,
            header,
            buf: Vec::new(),
        }
    }

    /// Writes what is still gathered.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.ch.write_bufs(&[&self.buf])?;
            self.buf.clear();
        }
        Ok(())
    }
}

impl StateSink for DeviceFrame<'_> {
    fn begin(&mut self, len: u64) -> io::Result<()> {
        let head = self.header.encode(&[]);
        let frame_len = len + head.len() as u64;
        if frame_len > u64::from(MAX_DEVICE_STATE_LEN) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "device {}: a state of {len} bytes does not fit a device-state frame (at most {MAX_DEVICE_STATE_LEN} bytes)",
                    self.header.name
                ),
            ));
        }
        let fh = FrameHeader {
            tag: FrameTag::DeviceState,
            len: frame_len as u32,
        }
        .encode();
        self.buf.extend_from_slice(&fh);
        self.buf.extend_from_slice(&head);
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.buf.len() + bytes.len() <= Self::GATHER {
            self.buf.extend_from_slice(bytes);
            return Ok(());
        }
        self.ch.write_bufs(&[&self.buf, bytes])?;
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
