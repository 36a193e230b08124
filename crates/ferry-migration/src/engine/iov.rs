//! Vectored socket I/O straight between guest memory and the kernel.
//!
//! Pages are never copied through a buffer of ours: the source gathers a batch's header
//! and its pages into one `writev`, the destination scatters a batch's pages into guest
//! memory with one `readv`. Guest memory is only ever handed to the kernel as raw
//! pointers, so no Rust reference aliases memory a vCPU may be writing.

use std::io;
use std::os::fd::RawFd;

/// Most iovecs passed to one call (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Told of every call's outcome: `Some(n)` when it moved `n` bytes, `None` when the
/// socket's timeout expired with nothing moved (`EAGAIN`). Its `Err` ends the transfer
/// (bytes already moved stay accounted for); `Ok` goes on.
pub type Stall<'a> = &'a mut dyn FnMut(Option<usize>) -> io::Result<()>;

/// Writes every byte described by `iov`, advancing through partial writes.
///
/// # Safety
///
/// Every `iov` entry must describe memory readable for its length for the whole call.
pub unsafe fn writev_all(fd: RawFd, iov: &mut [libc::iovec], stall: Stall) -> io::Result<()> {
    // SAFETY: `writev` only reads the iovecs' memory, which the caller vouches for.
    unsafe { transfer_all(fd, iov, libc::writev, io::ErrorKind::WriteZero, stall) }
}

/// Fills every byte described by `iov`, advancing through partial reads. A peer that
/// closes first yields `UnexpectedEof`.
///
/// # Safety
///
/// Every `iov` entry must describe memory writable for its length for the whole call,
/// that no Rust reference points into.
pub unsafe fn readv_all(fd: RawFd, iov: &mut [libc::iovec], stall: Stall) -> io::Result<()> {
    // SAFETY: `readv` writes the iovecs' memory, which the caller vouches for.
    unsafe { transfer_all(fd, iov, libc::readv, io::ErrorKind::UnexpectedEof, stall) }
}

type VectoredCall =
    unsafe extern "C" fn(libc::c_int, *const libc::iovec, libc::c_int) -> libc::ssize_t;

/// Repeats `call` (`readv` or `writev`) until every iovec is done; a call that moves
/// nothing means the peer is gone, reported as `at_zero`, and one that times out asks
/// `stall` whether to go on.
///
/// # Safety
///
/// As for the public wrappers: the iovecs describe memory valid for `call`.
unsafe fn transfer_all(
    fd: RawFd,
    iov: &mut [libc::iovec],
    call: VectoredCall,
    at_zero: io::ErrorKind,
    stall: Stall,
) -> io::Result<()> {
    let mut start = 0;
    while start < iov.len() {
        let n = iov.len().min(start + IOV_MAX) - start;
        // SAFETY: the caller guarantees the iovecs describe valid memory; `n` entries
        // starting at `start` are within the slice.
        let r = unsafe { call(fd, iov.as_ptr().add(start), n as libc::c_int) };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    stall(None)?;
                    continue;
                }
                _ => return Err(e),
            }
        }
        if r == 0 {
            return Err(at_zero.into());
        }
        stall(Some(r as usize))?;
        start = advance(iov, start, r as usize);
    }
    Ok(())
}

/// Consumes `done` bytes from `iov[start..]`, returning the first entry not finished.
fn advance(iov: &mut [libc::iovec], mut start: usize, mut done: usize) -> usize {
    while done > 0 {
        let e = &mut iov[start];
        if done >= e.iov_len {
            done -= e.iov_len;
            e.iov_len = 0;
            start += 1;
        } else {
            // The pointer stays within the entry's original range.
            e.iov_base = e.iov_base.cast::<u8>().wrapping_add(done).cast();
            e.iov_len -= done;
            done = 0;
        }
    }
    while start < iov.len() && iov[start].iov_len == 0 {
        start += 1;
    }
    start
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn scatter_gather_round_trip_through_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let src: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![(i % 251) as u8; 1 + (i as usize % 700)])
            .collect();
        let mut dst: Vec<Vec<u8>> = src.iter().map(|v| vec![0; v.len()]).collect();
        let mut riov: Vec<libc::iovec> = dst
            .iter_mut()
            .map(|v| libc::iovec {
                iov_base: v.as_mut_ptr().cast(),
                iov_len: v.len(),
            })
            .collect();
        let w = std::thread::spawn(move || {
            let mut wiov: Vec<libc::iovec> = src
                .iter()
                .map(|v| libc::iovec {
                    iov_base: v.as_ptr() as *mut _,
                    iov_len: v.len(),
                })
                .collect();
            // SAFETY: `src` outlives the call and is only read.
            unsafe { writev_all(a.as_raw_fd(), &mut wiov, &mut |_| Ok(())) }.unwrap();
        });
        // SAFETY: `dst` is owned here and not otherwise referenced during the call.
        unsafe { readv_all(b.as_raw_fd(), &mut riov, &mut |_| Ok(())) }.unwrap();
        w.join().unwrap();
        for (i, v) in dst.iter().enumerate() {
            assert!(v.iter().all(|&x| x == (i % 251) as u8), "entry {i}");
        }
    }
}
