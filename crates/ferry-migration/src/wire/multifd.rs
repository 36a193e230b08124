//! Data channels (multifd): the channel header and the page packet.
//!
//! A data channel is its own connection to the destination's listening address. It
//! opens with a [`ChannelHeader`] that says what it is (its own magic, not the main
//! stream's), which migration it belongs to (the hello's session id) and which channel
//! it is. The destination binds it by that header alone and refuses anything else:
//! a wrong session, an index out of range or already taken, a bad magic or version.
//!
//! After the header the channel carries only packets, source to destination; nothing
//! ever travels back on a data channel (answers go on the main channel's return path).
//!
//! ```text
//!  PacketHeader (40 bytes)
//!  offsets: (normal + zero) × u64 page index within the block, normal pages first
//!  data:    the normal pages back to back (normal × 4 KiB), or one zstd frame of them
//! ```
//!
//! A packet holds up to [`MAX_PACKET_PAGES`] pages of one RAM block (512 KiB of data,
//! the size QEMU settled on). Every field is checked before anything is read or
//! allocated: the counts, the data length against the page count, the flags against
//! what was negotiated. A compressed packet must be smaller than its pages, so a
//! source that cannot compress a packet sends it raw: the bound of a packet never
//! depends on the compressor.
//!
//! Sync packets ([`PacketHeader::SYNC`]) carry no pages, only the sync sequence number;
//! the barrier they take part in is described in [`crate::wire`].

use super::codec::{Reader, WireError};
use crate::PAGE_SIZE;

/// First bytes of a data channel.
pub const CHANNEL_MAGIC: [u8; 8] = *b"FERRYMFD";
/// The data-channel layout this release speaks (header and packets).
pub const CHANNEL_VERSION: u32 = 1;
/// Most data channels one migration may open.
pub const MAX_CHANNELS: u16 = 16;
/// Most pages in one packet (512 KiB of data).
pub const MAX_PACKET_PAGES: usize = 128;
/// Marks the start of every packet, to catch a channel that lost its framing.
pub const PACKET_MAGIC: u32 = u32::from_le_bytes(*b"FPKT");

/// How page data is compressed on the data channels, as the hello states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Zstd,
    /// A method this release does not know (sent by a newer peer); refused by name.
    Other(u8),
}

impl Compression {
    pub fn code(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Zstd => 1,
            Self::Other(c) => c,
        }
    }

    pub fn from_code(c: u8) -> Self {
        match c {
            0 => Self::None,
            1 => Self::Zstd,
            c => Self::Other(c),
        }
    }

    pub fn name(self) -> String {
        match self {
            Self::None => "none".into(),
            Self::Zstd => "zstd".into(),
            Self::Other(c) => format!("method {c}"),
        }
    }
}

/// The 32 bytes that open a data channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelHeader {
    pub version: u32,
    /// The session id of the migration's hello.
    pub session_id: u64,
    /// This channel's index, `0..count`.
    pub index: u16,
    /// How many data channels the migration opens.
    pub count: u16,
}

impl ChannelHeader {
    pub const LEN: usize = 32;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&CHANNEL_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&(Self::LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.session_id.to_le_bytes());
        b[24..26].copy_from_slice(&self.index.to_le_bytes());
        b[26..28].copy_from_slice(&self.count.to_le_bytes());
        b
    }

    /// Checks the magic, the length, the reserved bytes and the index against the
    /// count; the version and session are returned for the caller to judge.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, WireError> {
        let mut r = Reader::new(b, "channel header");
        let magic: [u8; 8] = r.bytes(8)?.try_into().expect("8 bytes");
        if magic != CHANNEL_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = r.u32()?;
        let len = r.u32()?;
        if len as usize != Self::LEN {
            return Err(WireError::BadValue {
                what: "channel header length",
                value: len.into(),
            });
        }
        let session_id = r.u64()?;
        let index = r.u16()?;
        let count = r.u16()?;
        let reserved = r.u32()?;
        if reserved != 0 {
            return Err(WireError::BadValue {
                what: "channel header reserved bytes",
                value: reserved.into(),
            });
        }
        if count == 0 || count > MAX_CHANNELS {
            return Err(WireError::BadValue {
                what: "channel count",
                value: count.into(),
            });
        }
        if index >= count {
            return Err(WireError::BadValue {
                what: "channel index",
                value: index.into(),
            });
        }
        Ok(Self {
            version,
            session_id,
            index,
            count,
        })
    }
}

/// The fixed part of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketHeader {
    /// [`Self::SYNC`], [`Self::LAST`], [`Self::ZSTD`].
    pub flags: u32,
    /// Numbers the packets of a migration across all channels, from 1; each channel's
    /// packets arrive in increasing order.
    pub packet: u64,
    /// For a sync packet, the sync's sequence number (from 1); 0 otherwise.
    pub sync: u64,
    pub block: u32,
    /// Pages with data.
    pub normal: u32,
    /// Pages that are all zeros (no data).
    pub zero: u32,
    /// Bytes of page data after the offsets.
    pub data_len: u32,
}

impl PacketHeader {
    pub const LEN: usize = 40;
    /// A sync point: no pages; see the barrier in [`crate::wire`].
    pub const SYNC: u32 = 1;
    /// The channel's last packet (a sync); nothing follows on the channel.
    pub const LAST: u32 = 2;
    /// The data is one zstd frame that decompresses to exactly `normal` pages.
    pub const ZSTD: u32 = 4;
    const KNOWN: u32 = Self::SYNC | Self::LAST | Self::ZSTD;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..4].copy_from_slice(&PACKET_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.packet.to_le_bytes());
        b[16..24].copy_from_slice(&self.sync.to_le_bytes());
        b[24..28].copy_from_slice(&self.block.to_le_bytes());
        b[28..32].copy_from_slice(&self.normal.to_le_bytes());
        b[32..36].copy_from_slice(&self.zero.to_le_bytes());
        b[36..40].copy_from_slice(&self.data_len.to_le_bytes());
        b
    }

    /// Decodes and checks everything the header alone can tell: magic, flags, counts,
    /// the data length against the page count, and that `ZSTD` appears only when
    /// `zstd_allowed` (the negotiated compression).
    pub fn decode(b: &[u8; Self::LEN], zstd_allowed: bool) -> Result<Self, WireError> {
        let mut r = Reader::new(b, "packet header");
        let magic = r.u32()?;
        if magic != PACKET_MAGIC {
            return Err(WireError::BadValue {
                what: "packet magic",
                value: magic.into(),
            });
        }
        let h = Self {
            flags: r.u32()?,
            packet: r.u64()?,
            sync: r.u64()?,
            block: r.u32()?,
            normal: r.u32()?,
            zero: r.u32()?,
            data_len: r.u32()?,
        };
        let bad = |what, value: u64| Err(WireError::BadValue { what, value });
        if h.flags & !Self::KNOWN != 0 {
            return bad("packet flags", h.flags.into());
        }
        if h.flags & Self::ZSTD != 0 && !zstd_allowed {
            return bad("packet flags (zstd was not negotiated)", h.flags.into());
        }
        if h.packet == 0 {
            return bad("packet number", 0);
        }
        if h.flags & Self::SYNC != 0 {
            if h.sync == 0 {
                return bad("packet sync number", 0);
            }
            if h.flags & Self::ZSTD != 0 || h.block != 0 || h.normal != 0 || h.zero != 0 {
                return bad("sync packet with pages", h.flags.into());
            }
            if h.data_len != 0 {
                return bad("sync packet data length", h.data_len.into());
            }
            return Ok(h);
        }
        if h.flags & Self::LAST != 0 {
            return bad("packet flags (last without sync)", h.flags.into());
        }
        if h.sync != 0 {
            return bad("packet sync number", h.sync);
        }
        let pages = u64::from(h.normal) + u64::from(h.zero);
        if pages == 0 || pages > MAX_PACKET_PAGES as u64 {
            return Err(WireError::TooLong {
                what: "packet page count",
                len: pages,
                max: MAX_PACKET_PAGES as u64,
            });
        }
        let raw = u64::from(h.normal) * PAGE_SIZE as u64;
        let len = u64::from(h.data_len);
        if h.flags & Self::ZSTD != 0 {
            // Compressed data that is not smaller than the pages would have gone raw.
            if h.normal == 0 || len == 0 || len >= raw {
                return bad("compressed packet data length", len);
            }
        } else if len != raw {
            return bad("packet data length", len);
        }
        Ok(h)
    }

    /// Bytes of offsets after the header.
    pub fn offsets_len(&self) -> usize {
        (self.normal as usize + self.zero as usize) * 8
    }

    /// True for a sync packet.
    pub fn is_sync(&self) -> bool {
        self.flags & Self::SYNC != 0
    }

    /// Decodes the offsets into `normal` and `zero` page indices, checking each against
    /// `block_pages` and refusing a page named twice in the packet (whose last word
    /// would otherwise depend on the order pages are applied in).
    ///
    /// Safe on any header, including one [`Self::decode`] did not check: the page count
    /// is summed without overflow and bounded by the bytes at hand.
    pub fn decode_offsets(
        &self,
        b: &[u8],
        block_pages: u64,
        normal: &mut Vec<u64>,
        zero: &mut Vec<u64>,
        scratch: &mut Vec<u64>,
    ) -> Result<(), WireError> {
        normal.clear();
        zero.clear();
        let mut r = Reader::new(b, "packet offsets");
        for i in 0..u64::from(self.normal) + u64::from(self.zero) {
            let page = r.u64()?;
            if page >= block_pages {
                return Err(WireError::BadValue {
                    what: "packet page index",
                    value: page,
                });
            }
            if i < u64::from(self.normal) {
                normal.push(page);
            } else {
                zero.push(page);
            }
        }
        r.finish()?;
        scratch.clear();
        scratch.extend_from_slice(normal);
        scratch.extend_from_slice(zero);
        scratch.sort_unstable();
        if let Some(w) = scratch.windows(2).find(|w| w[0] == w[1]) {
            return Err(WireError::BadValue {
                what: "packet page named twice",
                value: w[0],
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(normal: u32, zero: u32) -> PacketHeader {
        PacketHeader {
            flags: 0,
            packet: 7,
            sync: 0,
            block: 1,
            normal,
            zero,
            data_len: normal * PAGE_SIZE as u32,
        }
    }

    #[test]
    fn channel_header_round_trips_and_checks_its_fields() {
        let h = ChannelHeader {
            version: CHANNEL_VERSION,
            session_id: 0xdead_beef_0102_0304,
            index: 3,
            count: 4,
        };
        let b = h.encode();
        assert_eq!(&b[..8], b"FERRYMFD");
        assert_eq!(ChannelHeader::decode(&b).unwrap(), h);
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(
            ChannelHeader::decode(&bad),
            Err(WireError::BadMagic(_))
        ));
        let mut bad = b;
        bad[12] = 33;
        assert!(ChannelHeader::decode(&bad).is_err(), "length");
        let mut bad = b;
        bad[31] = 1;
        assert!(ChannelHeader::decode(&bad).is_err(), "reserved");
        let over = ChannelHeader { index: 4, ..h }.encode();
        assert!(ChannelHeader::decode(&over).is_err(), "index out of range");
        let many = ChannelHeader {
            index: 0,
            count: MAX_CHANNELS + 1,
            ..h
        }
        .encode();
        assert!(
            ChannelHeader::decode(&many).is_err(),
            "count over the limit"
        );
        let none = ChannelHeader {
            index: 0,
            count: 0,
            ..h
        }
        .encode();
        assert!(ChannelHeader::decode(&none).is_err(), "no channels");
    }

    #[test]
    fn packet_header_round_trips() {
        for h in [
            pages(3, 2),
            pages(0, 128),
            pages(128, 0),
            PacketHeader {
                flags: PacketHeader::ZSTD,
                data_len: 100,
                ..pages(2, 0)
            },
            PacketHeader {
                flags: PacketHeader::SYNC | PacketHeader::LAST,
                packet: 9,
                sync: 4,
                block: 0,
                normal: 0,
                zero: 0,
                data_len: 0,
            },
        ] {
            assert_eq!(PacketHeader::decode(&h.encode(), true).unwrap(), h);
        }
    }

    #[test]
    fn packet_header_refuses_what_cannot_be() {
        let cases = [
            ("no pages", pages(0, 0)),
            ("too many pages", pages(100, 29)),
            (
                "short data",
                PacketHeader {
                    data_len: 4095,
                    ..pages(1, 0)
                },
            ),
            (
                "long data",
                PacketHeader {
                    data_len: 8193,
                    ..pages(2, 0)
                },
            ),
            (
                "unknown flag",
                PacketHeader {
                    flags: 8,
                    ..pages(1, 0)
                },
            ),
            (
                "packet 0",
                PacketHeader {
                    packet: 0,
                    ..pages(1, 0)
                },
            ),
            (
                "sync number on pages",
                PacketHeader {
                    sync: 1,
                    ..pages(1, 0)
                },
            ),
            (
                "last without sync",
                PacketHeader {
                    flags: PacketHeader::LAST,
                    ..pages(1, 0)
                },
            ),
            (
                "sync with pages",
                PacketHeader {
                    flags: PacketHeader::SYNC,
                    sync: 1,
                    ..pages(1, 0)
                },
            ),
            (
                "sync without number",
                PacketHeader {
                    flags: PacketHeader::SYNC,
                    block: 0,
                    ..pages(0, 0)
                },
            ),
            (
                "compressed not smaller",
                PacketHeader {
                    flags: PacketHeader::ZSTD,
                    data_len: 8192,
                    ..pages(2, 0)
                },
            ),
            (
                "compressed zero pages only",
                PacketHeader {
                    flags: PacketHeader::ZSTD,
                    data_len: 0,
                    ..pages(0, 3)
                },
            ),
        ];
        for (what, h) in cases {
            assert!(PacketHeader::decode(&h.encode(), true).is_err(), "{what}");
        }
        let mut b = pages(1, 0).encode();
        b[0] ^= 1;
        assert!(PacketHeader::decode(&b, true).is_err(), "magic");
        let z = PacketHeader {
            flags: PacketHeader::ZSTD,
            data_len: 10,
            ..pages(1, 0)
        };
        assert!(
            PacketHeader::decode(&z.encode(), false).is_err(),
            "zstd not negotiated"
        );
    }

    #[test]
    fn offsets_are_checked_against_the_block_and_each_other() {
        let h = pages(2, 1);
        let enc = |v: &[u64]| v.iter().flat_map(|p| p.to_le_bytes()).collect::<Vec<u8>>();
        let (mut n, mut z, mut s) = (Vec::new(), Vec::new(), Vec::new());
        h.decode_offsets(&enc(&[5, 9, 2]), 10, &mut n, &mut z, &mut s)
            .unwrap();
        assert_eq!((n.as_slice(), z.as_slice()), (&[5u64, 9][..], &[2u64][..]));
        assert!(h
            .decode_offsets(&enc(&[5, 10, 2]), 10, &mut n, &mut z, &mut s)
            .is_err());
        assert!(h
            .decode_offsets(&enc(&[5, 9, 5]), 10, &mut n, &mut z, &mut s)
            .is_err());
        assert!(h
            .decode_offsets(&enc(&[5, 9]), 10, &mut n, &mut z, &mut s)
            .is_err());
        assert_eq!(h.offsets_len(), 24);
    }

    #[test]
    fn offsets_of_an_unchecked_header_with_counts_summing_past_u32_are_refused() {
        // Found by the property tests: the page count used to be summed in u32.
        let (mut n, mut z, mut s) = (Vec::new(), Vec::new(), Vec::new());
        for (normal, zero) in [(u32::MAX, 1), (1, u32::MAX), (u32::MAX, u32::MAX)] {
            let h = PacketHeader {
                normal,
                zero,
                ..pages(1, 0)
            };
            let r = h.decode_offsets(&[0u8; 64], 1 << 20, &mut n, &mut z, &mut s);
            assert!(
                matches!(r, Err(WireError::Truncated { .. })),
                "{normal}+{zero}: {r:?}"
            );
        }
    }
}
