//! Bounded little-endian reading and writing of message payloads.

use thiserror::Error;

/// Why bytes from the peer were not accepted.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("{what}: truncated at byte {offset} (needed {needed} more)")]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: usize,
    },
    #[error("{what}: {len} is over the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{what}: not valid UTF-8")]
    BadUtf8 { what: &'static str },
    #[error("{what}: {trailing} unexpected bytes after the end")]
    Trailing { what: &'static str, trailing: usize },
    #[error("{what}: invalid value {value}")]
    BadValue { what: &'static str, value: u64 },
    #[error("not a ferry migration stream (magic {0:02x?})")]
    BadMagic([u8; 8]),
    #[error("unknown frame type 0x{0:02x}")]
    UnknownFrame(u8),
    #[error("frame type 0x{tag:02x} is not allowed here (expected {expected})")]
    UnexpectedFrame { tag: u8, expected: &'static str },
}

/// Reads fields from an untrusted payload; every read is bounds-checked.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// `what` names the message in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.remaining() < n {
            return Err(WireError::Truncated {
                what: self.what,
                offset: self.pos,
                needed: n - self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::BadValue {
                what: self.what,
                value: v.into(),
            }),
        }
    }

    /// A u16-length-prefixed UTF-8 string of at most `max` bytes.
    pub fn str16(&mut self, max: usize) -> Result<String, WireError> {
        let len = self.u16()? as usize;
        if len > max {
            return Err(WireError::TooLong {
                what: self.what,
                len: len as u64,
                max: max as u64,
            });
        }
        let b = self.bytes(len)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| WireError::BadUtf8 { what: self.what })
    }

    /// A count field, refused when over `max` or when `count * min_item_len` cannot fit
    /// in what remains (so a lying count never sizes an allocation).
    pub fn count(
        &mut self,
        count: u64,
        max: usize,
        min_item_len: usize,
    ) -> Result<usize, WireError> {
        if count > max as u64 {
            return Err(WireError::TooLong {
                what: self.what,
                len: count,
                max: max as u64,
            });
        }
        let count = count as usize;
        if count.saturating_mul(min_item_len) > self.remaining() {
            return Err(WireError::Truncated {
                what: self.what,
                offset: self.pos,
                needed: count.saturating_mul(min_item_len) - self.remaining(),
            });
        }
        Ok(count)
    }

    /// Fails unless every byte was consumed.
    pub fn finish(self) -> Result<(), WireError> {
        if self.remaining() != 0 {
            return Err(WireError::Trailing {
                what: self.what,
                trailing: self.remaining(),
            });
        }
        Ok(())
    }
}

/// Appends little-endian fields to a buffer.
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(v.into())
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    /// Writes a u16-length-prefixed string. The caller guarantees the bound it documents;
    /// longer strings are cut at a character boundary so the frame stays decodable.
    pub fn str16(&mut self, s: &str, max: usize) -> &mut Self {
        let mut end = s.len().min(max).min(u16::MAX as usize);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16);
        self.bytes(&s.as_bytes()[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_refuses_short_input_with_offset() {
        let mut r = Reader::new(&[1, 2, 3], "test");
        assert_eq!(r.u16().unwrap(), 0x0201);
        assert_eq!(
            r.u32(),
            Err(WireError::Truncated {
                what: "test",
                offset: 2,
                needed: 3
            })
        );
    }

    #[test]
    fn str16_checks_bound_before_reading() {
        let mut w = Writer::new();
        w.u16(300);
        let mut r = Reader::new(&w.buf, "s");
        assert!(matches!(
            r.str16(100),
            Err(WireError::TooLong { len: 300, .. })
        ));
    }

    #[test]
    fn writer_cuts_long_strings_on_char_boundaries() {
        let s = "é".repeat(10);
        let mut w = Writer::new();
        w.str16(&s, 5);
        let mut r = Reader::new(&w.buf, "s");
        assert_eq!(r.str16(5).unwrap(), "éé");
    }

    #[test]
    fn count_refuses_counts_the_payload_cannot_hold() {
        let mut r = Reader::new(&[0u8; 16], "c");
        assert!(r.count(3, 10, 8).is_err());
        assert_eq!(r.count(2, 10, 8).unwrap(), 2);
        assert!(r.count(11, 10, 0).is_err());
    }

    #[test]
    fn count_refuses_without_overflow_when_count_times_item_len_overflows() {
        let mut r = Reader::new(&[0u8; 4], "c");
        assert!(matches!(
            r.count(2, 2, usize::MAX / 2 + 1),
            Err(WireError::Truncated { .. })
        ));
        assert!(matches!(
            r.count(u64::MAX, usize::MAX, 2),
            Err(WireError::Truncated { .. })
        ));
    }
}
