//! Frames on a channel: the only place the engine reads or writes frame headers.

use std::io::Read;
use std::os::fd::AsRawFd;

use super::error::MigrationError;
use super::iov::writev_all;
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
    let hdr = FrameHeader {
        tag,
        len: payload.len() as u32,
    }
    .encode();
    let mut iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut _,
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: payload.as_ptr() as *mut _,
            iov_len: payload.len(),
        },
    ];
    // SAFETY: both iovecs describe live buffers owned by this frame for the whole call.
    unsafe { writev_all(ch.as_raw_fd(), &mut iov) }.map_err(|e| MigrationError::io(peer, phase, e))
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
