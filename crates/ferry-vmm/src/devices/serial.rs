//! The serial console: what the guest prints, byte by byte, on COM1.
//!
//! Only as much of a 16550 UART as a guest that prints needs: a byte written to the
//! transmit register (`COM1 + 0`) is output at once, and the line status register
//! (`COM1 + 5`) always reads "transmitter empty", so a guest that polls it before each
//! byte never waits. Writes to the other registers are dropped and reads return 0; there
//! are no interrupts, no FIFO and no receive side. A model of those registers would add
//! them as version 2 fields whose zero value is the UART's reset value.
//!
//! The device keeps the last [`TAIL_LEN`] bytes of output and a count of every byte ever
//! written, and both migrate (schema [`SERIAL_SCHEMA`]). Each complete line also goes to
//! the VMM's log at debug level (`FERRY_LOG=ferry_vmm::devices::serial=debug`). A line
//! the guest was halfway through when it migrated is finished on the destination: the
//! partial line is the end of the tail, so it needs no field of its own.
//!
//! The guest's vCPUs take no lock around a line, so lines of two vCPUs that print at the
//! same moment interleave, as they would on a real UART.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use ferry_migration::state::{DeviceState, FieldKind, FieldSchema, StateError, StateSchema, Value};
use thiserror::Error;

use super::PortIoDevice;

/// The first port of COM1, where the KVM guest prints.
pub const COM1: u16 = 0x3f8;
/// Ports a 16550 decodes.
pub const PORTS: u16 = 8;
/// Bytes of output kept and migrated.
pub const TAIL_LEN: usize = 4096;
/// A line longer than this goes to the log in pieces.
const MAX_LOG_LINE: usize = 512;

/// Transmit holding register (with DLAB clear, which this model does not track).
const THR: u16 = 0;
/// Line status register.
const LSR: u16 = 5;
/// Transmit holding register empty, transmitter empty.
const LSR_IDLE: u8 = 0x60;

/// The console's migratable state.
pub static SERIAL_SCHEMA: StateSchema = StateSchema {
    name: "serial",
    version: 1,
    min_version: 1,
    fields: &[
        // Every byte the guest ever wrote, on this host and the ones before it.
        FieldSchema {
            name: "bytes-written",
            kind: FieldKind::U64,
            since: 1,
        },
        // The last bytes written, oldest first.
        FieldSchema {
            name: "tail",
            kind: FieldKind::Bytes {
                max_len: TAIL_LEN as u32,
            },
            since: 1,
        },
    ],
    subsections: &[],
};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SerialError {
    #[error("serial: reading its state")]
    State(#[source] StateError),
    #[error("serial: a tail of {tail} bytes, but only {written} bytes were ever written")]
    TailLongerThanOutput { tail: usize, written: u64 },
}

#[derive(Debug, Default)]
struct Output {
    written: u64,
    tail: VecDeque<u8>,
    /// The line being assembled for the log.
    line: Vec<u8>,
}

impl Output {
    fn push(&mut self, byte: u8) {
        self.written += 1;
        if self.tail.len() == TAIL_LEN {
            self.tail.pop_front();
        }
        self.tail.push_back(byte);
        if byte == b'\n' {
            self.log_line();
        } else {
            self.line.push(byte);
            if self.line.len() >= MAX_LOG_LINE {
                self.log_line();
            }
        }
    }

    fn log_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        tracing::debug!(line = %text.trim_end_matches('\r'), "guest console");
        self.line.clear();
    }
}

/// The serial console (see the module docs).
#[derive(Debug, Default)]
pub struct Serial {
    out: Mutex<Output>,
}

impl Serial {
    pub fn new() -> Self {
        Self::default()
    }

    fn output(&self) -> std::sync::MutexGuard<'_, Output> {
        // Nothing can leave `Output` inconsistent mid-update: it holds no invariant a
        // panic could break halfway.
        self.out.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes the guest has written, ever.
    pub fn bytes_written(&self) -> u64 {
        self.output().written
    }

    /// The last bytes of output, oldest first.
    pub fn tail(&self) -> Vec<u8> {
        self.output().tail.iter().copied().collect()
    }

    /// [`Serial::tail`] as text; bytes that are not UTF-8 show as U+FFFD.
    pub fn tail_text(&self) -> String {
        String::from_utf8_lossy(&self.tail()).into_owned()
    }

    /// The state to migrate. Call it while no vCPU runs, so no byte is half-counted.
    pub fn save(&self) -> DeviceState {
        let out = self.output();
        DeviceState {
            version: SERIAL_SCHEMA.version,
            ..DeviceState::new()
        }
        .with("bytes-written", Value::U64(out.written))
        .with(
            "tail",
            Value::Bytes(out.tail.iter().copied().collect::<Vec<u8>>()),
        )
    }

    /// Replaces the output with a migrated one. Nothing changes if the state is refused.
    pub fn load(&self, state: &DeviceState) -> Result<(), SerialError> {
        let written = state.get_u64("bytes-written").map_err(SerialError::State)?;
        let tail = state.get_bytes("tail").map_err(SerialError::State)?;
        // The codec holds the tail to its max_len; a longer one from elsewhere is cut.
        let tail = &tail[tail.len().saturating_sub(TAIL_LEN)..];
        if tail.len() as u64 > written {
            return Err(SerialError::TailLongerThanOutput {
                tail: tail.len(),
                written,
            });
        }
        let partial = match tail.iter().rposition(|&b| b == b'\n') {
            Some(nl) => &tail[nl + 1..],
            None => tail,
        };
        let partial = &partial[partial.len().saturating_sub(MAX_LOG_LINE - 1)..];
        *self.output() = Output {
            written,
            tail: tail.iter().copied().collect(),
            line: partial.to_vec(),
        };
        Ok(())
    }
}

impl PortIoDevice for Serial {
    fn ports(&self) -> Range<u16> {
        COM1..COM1 + PORTS
    }

    fn write(&self, offset: u16, data: &[u8]) {
        if offset == THR {
            let mut out = self.output();
            for &b in data {
                out.push(b);
            }
        }
    }

    fn read(&self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        if offset == LSR {
            if let Some(b) = data.first_mut() {
                *b = LSR_IDLE;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_migration::state::{decode, encode};

    fn print(s: &Serial, text: &str) {
        for b in text.bytes() {
            s.write(THR, &[b]);
        }
    }

    #[test]
    fn serial_keeps_the_last_4_kib_and_counts_every_byte() {
        let s = Serial::new();
        print(&s, "vcpu0 pass 1024\n");
        assert_eq!(s.tail_text(), "vcpu0 pass 1024\n");
        let line = "0123456789abcdef".repeat(16); // 256 bytes
        for _ in 0..20 {
            print(&s, &line);
        }
        assert_eq!(s.bytes_written(), 16 + 20 * 256);
        let tail = s.tail();
        assert_eq!(tail.len(), TAIL_LEN);
        assert_eq!(&tail[..], line.repeat(16).as_bytes());
    }

    #[test]
    fn serial_registers_other_than_thr_do_not_print() {
        let s = Serial::new();
        s.write(3, &[0x80]);
        s.write(1, b"x");
        let mut lsr = [0u8; 1];
        s.read(LSR, &mut lsr);
        assert_eq!(lsr, [LSR_IDLE]);
        let mut other = [9u8; 1];
        s.read(THR, &mut other);
        assert_eq!(other, [0]);
        assert_eq!(s.bytes_written(), 0);
    }

    #[test]
    fn serial_state_round_trips_through_the_codec() {
        let s = Serial::new();
        print(&s, "vcpu0 pass 1024\nvcpu0 pa");
        let bytes = encode(&SERIAL_SCHEMA, &s.save()).unwrap();
        let loaded = decode(&SERIAL_SCHEMA, 1, &bytes).unwrap();
        let d = Serial::new();
        d.load(&loaded).unwrap();
        assert_eq!(d.tail(), s.tail());
        assert_eq!(d.bytes_written(), s.bytes_written());
        // The half-printed line carries on where it stopped.
        assert_eq!(d.output().line, b"vcpu0 pa");
        print(&d, "ss 2048\n");
        assert!(d.tail_text().ends_with("vcpu0 pass 2048\n"));
        assert!(d.output().line.is_empty());
    }

    #[test]
    fn serial_refuses_a_tail_longer_than_its_output() {
        let st = DeviceState::new()
            .with("bytes-written", Value::U64(2))
            .with("tail", Value::Bytes(b"abc".to_vec()));
        let s = Serial::new();
        print(&s, "kept");
        assert_eq!(
            s.load(&st),
            Err(SerialError::TailLongerThanOutput {
                tail: 3,
                written: 2
            })
        );
        assert_eq!(s.tail_text(), "kept");
        let missing = DeviceState::new().with("bytes-written", Value::U64(2));
        assert!(matches!(s.load(&missing), Err(SerialError::State(_))));
    }
}
