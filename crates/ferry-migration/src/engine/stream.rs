//! Frames on the main channel: every frame the engine reads goes through here, and so
//! does every frame it writes from buffers of its own. The one other writer of frames is
//! the main lane ([`super::pages::MainLane`]), whose `RamBatch` frames carry guest pages
//! straight from guest memory.

use std::io::Read;

use super::error::MigrationError;
use super::transport::Channel;
use crate::wire::{FrameHeader, FrameTag};

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
