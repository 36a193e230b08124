//! Property tests for every decoder the destination runs on bytes from the peer.
//!
//! For each message: an encoding decodes to the value it came from; every strict prefix
//! of it is refused; one byte more is refused where the format is length-exact; and no
//! input, random or a mutated valid encoding, makes a decoder panic. Where a decoder
//! accepts a mutated encoding, what it returns must re-encode to exactly those bytes, so
//! the format has one spelling per message and nothing the decoder ignores is lost. The
//! one exception is [`EndOfStream`], whose decoder ignores the value field of an absent
//! digest; its property pins that down instead.
//!
//! [`StreamHeader`], [`FrameHeader`], [`RamBatchHeader`], [`ChannelHeader`] and
//! [`PacketHeader`] decode from fixed-size arrays, so a short read cannot reach them; their
//! properties instead characterise exactly which of all possible arrays they accept.

use std::fmt::Debug;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::string::string_regex;
use proptest::test_runner::TestCaseError;

use super::*;
use crate::PAGE_SIZE;

const ALL_TAGS: [FrameTag; 21] = [
    FrameTag::Hello,
    FrameTag::RamBatch,
    FrameTag::PassEnd,
    FrameTag::DeviceState,
    FrameTag::VcpuState,
    FrameTag::EndOfStream,
    FrameTag::Abort,
    FrameTag::MultifdSync,
    FrameTag::DevicePrecopy,
    FrameTag::PrecopyInitDone,
    FrameTag::StateDigest,
    FrameTag::Keepalive,
    FrameTag::PopulatedExtents,
    FrameTag::Accept,
    FrameTag::Refuse,
    FrameTag::LoadFailed,
    FrameTag::Completed,
    FrameTag::ChannelsReady,
    FrameTag::DevicePlan,
    FrameTag::SwitchoverAck,
    FrameTag::KeepaliveReturn,
];

// ---------------------------------------------------------------------------------------
// Strategies

/// Packs characters into a string of at most `max` bytes.
fn fit(chars: Vec<char>, max: usize) -> String {
    let mut s = String::new();
    for c in chars {
        if s.len() + c.len_utf8() > max {
            break;
        }
        s.push(c);
    }
    s
}

/// Strings a well-behaved peer may send for a field bounded to `max` bytes: printable
/// ASCII as names usually are, ASCII exactly at the bound, and arbitrary Unicode.
fn text(max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        2 => string_regex(&format!("[ -~]{{0,{max}}}")).expect("regex"),
        1 => string_regex(&format!("[a-z]{{{max}}}")).expect("regex"),
        2 => vec(any::<char>(), 0..=max).prop_map(move |cs| fit(cs, max)),
    ]
    .boxed()
}

/// Strings longer than `max` bytes, ASCII or not.
fn overlong(max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        string_regex(&format!("[ -~]{{{},{}}}", max + 1, max + 64)).expect("regex"),
        vec(any::<char>(), max + 1..=max + 64).prop_map(String::from_iter),
    ]
    .boxed()
}

/// A list length: mostly short, sometimes anything up to the bound, sometimes the bound.
fn list_len(max: usize) -> BoxedStrategy<usize> {
    prop_oneof![4 => 0..=4usize, 1 => 0..=max, 1 => Just(max)].boxed()
}

fn ram_block() -> impl Strategy<Value = HelloRamBlock> {
    (text(MAX_NAME_LEN), any::<u64>(), any::<u64>()).prop_map(|(name, gpa, size)| HelloRamBlock {
        name,
        gpa,
        size,
    })
}

fn device() -> impl Strategy<Value = HelloDevice> {
    (text(MAX_NAME_LEN), any::<u32>(), any::<u32>()).prop_map(|(name, instance, version)| {
        HelloDevice {
            name,
            instance,
            version,
        }
    })
}

/// A hello within every bound, with list lengths drawn from the given strategies.
fn hello_with(
    props: BoxedStrategy<usize>,
    blocks: BoxedStrategy<usize>,
    devices: BoxedStrategy<usize>,
) -> impl Strategy<Value = Hello> {
    let lists = (
        props.prop_flat_map(|n| vec((text(MAX_NAME_LEN), text(MAX_VALUE_LEN)), n)),
        blocks.prop_flat_map(|n| vec(ram_block(), n)),
        devices.prop_flat_map(|n| vec(device(), n)),
        (0..=MAX_CHANNELS, any::<u8>()),
    );
    let scalars = (
        any::<u64>(),
        text(MAX_NAME_LEN),
        text(MAX_NAME_LEN),
        any::<u32>(),
        0..=Hello::FLAG_FULL_VERIFY,
        0..=MAX_VCPUS,
        text(MAX_NAME_LEN),
        any::<u32>(),
    );
    (scalars, lists).prop_map(
        |(
            (session_id, release, machine, page_size, flags, vcpu_count, vcpu_state, vcpu_version),
            (wire_props, ram_blocks, devices, (channels, compression)),
        )| Hello {
            channels,
            compression: Compression::from_code(compression),
            session_id,
            release,
            machine,
            page_size,
            flags,
            // Every other wire property marked as set by a compat table.
            compat_pinned: wire_props
                .iter()
                .step_by(2)
                .map(|(k, _)| k.clone())
                .collect(),
            wire_props,
            ram_blocks,
            vcpu_count,
            vcpu_state,
            vcpu_version,
            devices,
        },
    )
}

/// Hellos small enough to try every prefix of.
fn small_hello() -> impl Strategy<Value = Hello> {
    let short = || (0..=4usize).boxed();
    hello_with(short(), short(), short())
}

/// Hellos whose lists reach their bounds.
fn full_hello() -> impl Strategy<Value = Hello> {
    hello_with(
        list_len(MAX_PROPS),
        list_len(MAX_RAM_BLOCKS),
        list_len(MAX_DEVICES),
    )
}

/// Every cause, named or not, as a decoder would produce it.
fn refuse_cause() -> impl Strategy<Value = RefuseCause> {
    prop_oneof![
        (1..=13u16).prop_map(RefuseCause::from_code),
        any::<u16>().prop_map(RefuseCause::from_code),
    ]
}

fn end_of_stream() -> impl Strategy<Value = EndOfStream> {
    (
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(digest, full_digest, pages_sent, resume)| EndOfStream {
            digest,
            full_digest,
            pages_sent,
            resume,
        })
}

// ---------------------------------------------------------------------------------------
// Shared checks

/// Every strict prefix of `b` is refused.
fn prefixes_refused<T: Debug>(
    b: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, WireError>,
) -> Result<(), TestCaseError> {
    for n in 0..b.len() {
        let r = decode(&b[..n]);
        prop_assert!(r.is_err(), "{n}-byte prefix of {} accepted: {r:?}", b.len());
    }
    Ok(())
}

/// `b` followed by one more byte is refused as trailing.
fn trailing_refused<T: Debug>(
    b: &[u8],
    extra: u8,
    decode: impl Fn(&[u8]) -> Result<T, WireError>,
) -> Result<(), TestCaseError> {
    let mut long = b.to_vec();
    long.push(extra);
    let r = decode(&long);
    prop_assert!(
        matches!(r, Err(WireError::Trailing { trailing: 1, .. })),
        "one trailing byte: {r:?}"
    );
    Ok(())
}

/// Round trip, every prefix refused, one trailing byte refused.
fn length_exact<T: Debug + PartialEq>(
    value: &T,
    b: &[u8],
    extra: u8,
    decode: impl Fn(&[u8]) -> Result<T, WireError>,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(&decode(b)?, value);
    prefixes_refused(b, &decode)?;
    trailing_refused(b, extra, &decode)
}

/// Overwrites one byte of a valid encoding; if the decoder still accepts it, the value
/// must re-encode to exactly the mutated bytes.
fn mutation_canonical<T: Debug>(
    mut b: Vec<u8>,
    at: Index,
    byte: u8,
    decode: impl Fn(&[u8]) -> Result<T, WireError>,
    encode: impl Fn(&T) -> Vec<u8>,
) -> Result<(), TestCaseError> {
    if b.is_empty() {
        return Ok(());
    }
    let i = at.index(b.len());
    b[i] = byte;
    if let Ok(v) = decode(&b) {
        prop_assert_eq!(encode(&v), b, "accepted a second spelling: {:?}", v);
    }
    Ok(())
}

/// The longest prefix of `s` that ends on a character boundary and fits `max` bytes.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn entries_bytes(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

// ---------------------------------------------------------------------------------------
// Frame tags, stream header, frame header

#[test]
fn frame_tags_are_exactly_the_listed_ones() {
    let known: Vec<u8> = (0..=u8::MAX)
        .filter(|&v| FrameTag::from_u8(v).is_ok())
        .collect();
    let listed: Vec<u8> = ALL_TAGS.iter().map(|&t| t as u8).collect();
    assert_eq!(known, listed);
    for t in ALL_TAGS {
        assert_eq!(FrameTag::from_u8(t as u8), Ok(t));
    }
}

#[test]
fn fixed_size_messages_have_their_size_as_frame_limit() {
    assert_eq!(FrameTag::PassEnd.max_len() as usize, PassEnd::LEN);
    assert_eq!(FrameTag::EndOfStream.max_len() as usize, EndOfStream::LEN);
    assert_eq!(FrameTag::Completed.max_len() as usize, Completed::LEN);
    assert_eq!(FrameTag::MultifdSync.max_len() as usize, MultifdSync::LEN);
    assert_eq!(
        FrameTag::ChannelsReady.max_len() as usize,
        ChannelsReady::LEN
    );
    assert_eq!(FrameTag::StateDigest.max_len() as usize, StateDigest::LEN);
    assert_eq!(FrameTag::Keepalive.max_len() as usize, Keepalive::LEN);
    assert_eq!(FrameTag::KeepaliveReturn.max_len() as usize, Keepalive::LEN);
    assert_eq!(
        FrameTag::RamBatch.max_len() as usize,
        RamBatchHeader::LEN + MAX_BATCH_PAGES * (8 + PAGE_SIZE)
    );
}

#[test]
fn largest_legal_messages_fit_their_frame_limits() {
    let name = "\u{10000}".repeat(MAX_NAME_LEN / 4);
    let value = "\u{10000}".repeat(MAX_VALUE_LEN / 4);
    let reason = "\u{10000}".repeat(MAX_REASON_LEN / 4);
    assert_eq!(name.len(), MAX_NAME_LEN);
    let hello = Hello {
        channels: MAX_CHANNELS,
        compression: Compression::Zstd,
        session_id: u64::MAX,
        release: name.clone(),
        machine: name.clone(),
        page_size: u32::MAX,
        flags: Hello::FLAG_FULL_VERIFY,
        wire_props: vec![(name.clone(), value); MAX_PROPS],
        compat_pinned: vec![name.clone(); MAX_PROPS],
        ram_blocks: vec![
            HelloRamBlock {
                name: name.clone(),
                gpa: u64::MAX,
                size: u64::MAX,
            };
            MAX_RAM_BLOCKS
        ],
        vcpu_count: MAX_VCPUS,
        vcpu_state: name.clone(),
        vcpu_version: u32::MAX,
        devices: vec![
            HelloDevice {
                name: name.clone(),
                instance: u32::MAX,
                version: u32::MAX,
            };
            MAX_DEVICES
        ],
    };
    let b = hello.encode();
    assert!(b.len() <= FrameTag::Hello.max_len() as usize, "{}", b.len());
    assert_eq!(Hello::decode(&b).unwrap(), hello);

    let accept = Accept { release: name }.encode();
    assert!(accept.len() <= FrameTag::Accept.max_len() as usize);
    let refuse = Refuse {
        cause: RefuseCause::Other(u16::MAX),
        reason: reason.clone(),
    }
    .encode();
    assert!(refuse.len() <= FrameTag::Refuse.max_len() as usize);
    let text = encode_reason(&reason);
    assert!(text.len() <= FrameTag::Abort.max_len() as usize);
    assert!(text.len() <= FrameTag::LoadFailed.max_len() as usize);
}

proptest! {
    #[test]
    fn stream_header_round_trips(version in any::<u32>()) {
        let b = StreamHeader { version }.encode();
        prop_assert_eq!(StreamHeader::decode(&b)?, StreamHeader { version });
    }

    #[test]
    fn stream_header_accepts_exactly_magic_and_its_length(
        b in prop_oneof![
            any::<[u8; 16]>(),
            (any::<u32>(), any::<Index>(), any::<u8>()).prop_map(|(v, at, byte)| {
                let mut b = StreamHeader { version: v }.encode();
                b[at.index(16)] = byte;
                b
            }),
        ]
    ) {
        let ok = b[..8] == MAGIC && b[12..] == [16, 0, 0, 0];
        let r = StreamHeader::decode(&b);
        prop_assert_eq!(r.is_ok(), ok, "{:?}", r);
        if let Ok(h) = r {
            prop_assert_eq!(h.version.to_le_bytes(), [b[8], b[9], b[10], b[11]]);
            prop_assert_eq!(h.encode(), b);
        }
    }

    #[test]
    fn frame_header_round_trips_for_every_tag(
        tag in proptest::sample::select(&ALL_TAGS[..]),
        len in any::<Index>(),
    ) {
        let len = len.index(tag.max_len() as usize + 1) as u32;
        for len in [len, 0, tag.max_len()] {
            let h = FrameHeader { tag, len };
            prop_assert_eq!(FrameHeader::decode(&h.encode())?, h);
        }
    }

    #[test]
    fn frame_header_refuses_lengths_over_the_tag_limit(
        tag in proptest::sample::select(&ALL_TAGS[..]),
        over in any::<Index>(),
    ) {
        let first = tag.max_len() + 1;
        let len = first + over.index((u32::MAX - first) as usize + 1) as u32;
        for len in [len, first, u32::MAX] {
            let r = FrameHeader::decode(&FrameHeader { tag, len }.encode());
            prop_assert!(matches!(r, Err(WireError::TooLong { .. })), "{:?}", r);
        }
    }

    #[test]
    fn frame_header_accepts_exactly_known_tags_zero_reserved_and_bounded_length(
        b in prop_oneof![
            any::<[u8; 8]>(),
            (proptest::sample::select(&ALL_TAGS[..]), any::<u32>(), any::<Index>(), any::<u8>())
                .prop_map(|(tag, len, at, byte)| {
                    let mut b = FrameHeader { tag, len: len % (tag.max_len() + 1) }.encode();
                    b[at.index(8)] = byte;
                    b
                }),
        ]
    ) {
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let expect = FrameTag::from_u8(b[0])
            .ok()
            .filter(|t| b[1..4] == [0, 0, 0] && len <= t.max_len());
        let r = FrameHeader::decode(&b);
        prop_assert_eq!(r.as_ref().ok().map(|h| h.tag), expect, "{:?}", r);
        if let Ok(h) = r {
            prop_assert_eq!(h.len, len);
            prop_assert_eq!(h.encode(), b);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Hello

proptest! {
    #[test]
    fn hello_round_trips_and_is_length_exact(h in small_hello(), extra in any::<u8>()) {
        let b = h.encode();
        length_exact(&h, &b, extra, Hello::decode)?;
    }

    #[test]
    fn hello_mutations_never_yield_a_second_spelling(
        h in small_hello(),
        at in any::<Index>(),
        byte in any::<u8>(),
    ) {
        mutation_canonical(h.encode(), at, byte, Hello::decode, Hello::encode)?;
    }

    #[test]
    fn hello_refuses_unknown_flags(h in small_hello(), flags in any::<u32>()) {
        prop_assume!(flags & !Hello::FLAG_FULL_VERIFY != 0);
        let r = Hello::decode(&Hello { flags, ..h }.encode());
        prop_assert!(matches!(r, Err(WireError::BadValue { what: "hello flags", .. })), "{:?}", r);
    }

    #[test]
    fn hello_refuses_too_many_vcpus(h in small_hello(), n in MAX_VCPUS + 1..=u32::MAX) {
        let r = Hello::decode(&Hello { vcpu_count: n, ..h }.encode());
        prop_assert!(matches!(r, Err(WireError::TooLong { .. })), "{:?}", r);
    }

    #[test]
    fn hello_refuses_over_long_release_on_the_wire(len in MAX_NAME_LEN as u16 + 1..=u16::MAX) {
        let mut w = Writer::new();
        w.u64(1).u16(len).bytes(&vec![b'a'; len.into()]);
        let r = Hello::decode(&w.buf);
        prop_assert!(matches!(r, Err(WireError::TooLong { .. })), "{:?}", r);
    }

    #[test]
    fn hello_cuts_over_long_strings_and_still_decodes(
        h in small_hello(),
        release in overlong(MAX_NAME_LEN),
        key in overlong(MAX_NAME_LEN),
        value in overlong(MAX_VALUE_LEN),
    ) {
        let long = Hello {
            release: release.clone(),
            wire_props: vec![(key.clone(), value.clone())],
            ..h
        };
        let d = Hello::decode(&long.encode())?;
        prop_assert_eq!(d.release.as_str(), cut(&release, MAX_NAME_LEN));
        prop_assert_eq!(d.wire_props[0].0.as_str(), cut(&key, MAX_NAME_LEN));
        prop_assert_eq!(d.wire_props[0].1.as_str(), cut(&value, MAX_VALUE_LEN));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn hello_with_lists_up_to_their_bounds_round_trips(
        h in full_hello(),
        cuts in vec(any::<Index>(), 16),
        extra in any::<u8>(),
    ) {
        let b = h.encode();
        prop_assert!(b.len() <= FrameTag::Hello.max_len() as usize);
        prop_assert_eq!(Hello::decode(&b)?, h);
        for at in cuts {
            let n = at.index(b.len());
            prop_assert!(Hello::decode(&b[..n]).is_err(), "{}-byte prefix accepted", n);
        }
        trailing_refused(&b, extra, Hello::decode)?;
    }
}

#[test]
fn hello_refuses_lists_one_over_their_bounds() {
    let base = Hello {
        channels: 0,
        compression: Compression::None,
        session_id: 0,
        release: String::new(),
        machine: String::new(),
        page_size: 4096,
        flags: 0,
        wire_props: vec![],
        compat_pinned: vec![],
        ram_blocks: vec![],
        vcpu_count: 1,
        vcpu_state: String::new(),
        vcpu_version: 0,
        devices: vec![],
    };
    let block = HelloRamBlock {
        name: String::new(),
        gpa: 0,
        size: 0,
    };
    let dev = HelloDevice {
        name: String::new(),
        instance: 0,
        version: 0,
    };
    for (at, over) in [
        (
            Hello {
                wire_props: vec![(String::new(), String::new()); MAX_PROPS],
                ..base.clone()
            },
            Hello {
                wire_props: vec![(String::new(), String::new()); MAX_PROPS + 1],
                ..base.clone()
            },
        ),
        (
            Hello {
                ram_blocks: vec![block.clone(); MAX_RAM_BLOCKS],
                ..base.clone()
            },
            Hello {
                ram_blocks: vec![block; MAX_RAM_BLOCKS + 1],
                ..base.clone()
            },
        ),
        (
            Hello {
                devices: vec![dev.clone(); MAX_DEVICES],
                ..base.clone()
            },
            Hello {
                devices: vec![dev; MAX_DEVICES + 1],
                ..base.clone()
            },
        ),
    ] {
        assert_eq!(Hello::decode(&at.encode()).unwrap(), at);
        let r = Hello::decode(&over.encode());
        assert!(matches!(r, Err(WireError::TooLong { .. })), "{r:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Accept, Refuse, reason texts

proptest! {
    #[test]
    fn accept_round_trips_and_is_length_exact(release in text(MAX_NAME_LEN), extra in any::<u8>()) {
        let a = Accept { release };
        let b = a.encode();
        prop_assert!(b.len() <= FrameTag::Accept.max_len() as usize);
        length_exact(&a, &b, extra, Accept::decode)?;
    }

    #[test]
    fn accept_cuts_over_long_release(release in overlong(MAX_NAME_LEN)) {
        let d = Accept::decode(&Accept { release: release.clone() }.encode())?;
        prop_assert_eq!(d.release.as_str(), cut(&release, MAX_NAME_LEN));
    }

    #[test]
    fn refuse_cause_codes_round_trip(code in prop_oneof![0..=16u16, any::<u16>()]) {
        let c = RefuseCause::from_code(code);
        prop_assert_eq!(c.code(), code);
        prop_assert_eq!(matches!(c, RefuseCause::Other(_)), !(1..=14).contains(&code));
        prop_assert!(!c.to_string().is_empty());
    }

    #[test]
    fn refuse_round_trips_and_is_length_exact(
        cause in refuse_cause(),
        reason in text(MAX_REASON_LEN),
        extra in any::<u8>(),
    ) {
        let r = Refuse { cause, reason };
        let b = r.encode();
        prop_assert!(b.len() <= FrameTag::Refuse.max_len() as usize);
        length_exact(&r, &b, extra, Refuse::decode)?;
    }

    #[test]
    fn refuse_cuts_over_long_reason(cause in refuse_cause(), reason in overlong(MAX_REASON_LEN)) {
        let d = Refuse::decode(&Refuse { cause, reason: reason.clone() }.encode())?;
        prop_assert_eq!(d.cause, cause);
        prop_assert_eq!(d.reason.as_str(), cut(&reason, MAX_REASON_LEN));
    }

    #[test]
    fn refuse_and_accept_mutations_never_yield_a_second_spelling(
        cause in refuse_cause(),
        text in text(64),
        at in any::<Index>(),
        byte in any::<u8>(),
    ) {
        let r = Refuse { cause, reason: text.clone() };
        mutation_canonical(r.encode(), at, byte, Refuse::decode, Refuse::encode)?;
        let a = Accept { release: text };
        mutation_canonical(a.encode(), at, byte, Accept::decode, Accept::encode)?;
    }

    #[test]
    fn reason_round_trips_and_is_length_exact(
        reason in text(MAX_REASON_LEN),
        extra in any::<u8>(),
    ) {
        let b = encode_reason(&reason);
        prop_assert!(b.len() <= FrameTag::Abort.max_len() as usize);
        length_exact(&reason, &b, extra, |b| decode_reason(b, "abort"))?;
    }

    #[test]
    fn reason_cuts_over_long_text(reason in overlong(MAX_REASON_LEN)) {
        let d = decode_reason(&encode_reason(&reason), "load failed")?;
        prop_assert_eq!(d.as_str(), cut(&reason, MAX_REASON_LEN));
    }

    #[test]
    fn reason_refuses_invalid_utf8(mut s in text(32), at in any::<Index>()) {
        s.push('x');
        let mut b = encode_reason(&s);
        let i = 2 + at.index(b.len() - 2);
        b[i] = 0xff;
        let r = decode_reason(&b, "abort");
        prop_assert!(matches!(r, Err(WireError::BadUtf8 { .. })), "{:?}", r);
    }
}

// ---------------------------------------------------------------------------------------
// Writer::str16 cuts, never refuses

proptest! {
    #[test]
    fn str16_cuts_over_long_strings_at_a_char_boundary(
        s in prop_oneof![
            any::<String>(),
            "[ -~]{0,400}",
            vec(any::<char>(), 0..400).prop_map(String::from_iter),
        ],
        max in 0usize..=300,
    ) {
        let mut w = Writer::new();
        w.str16(&s, max);
        let mut r = Reader::new(&w.buf, "s");
        let d = r.str16(max)?;
        r.finish()?;
        prop_assert_eq!(d.as_str(), cut(&s, max));
        // Cut no more than needed: the next character would not have fitted.
        if let Some(c) = s[d.len()..].chars().next() {
            prop_assert!(d.len() + c.len_utf8() > max);
        }
    }
}

#[test]
fn str16_cuts_at_the_u16_length_limit() {
    let s = "\u{10000}".repeat(20_000);
    let mut w = Writer::new();
    w.str16(&s, usize::MAX);
    let mut r = Reader::new(&w.buf, "s");
    let d = r.str16(usize::MAX).unwrap();
    r.finish().unwrap();
    assert_eq!(d, cut(&s, u16::MAX as usize));
    assert_eq!(d.len(), 65532);
}

// ---------------------------------------------------------------------------------------
// Reader::count

proptest! {
    #[test]
    fn count_accepts_exactly_what_the_payload_can_hold(
        count in prop_oneof![0u64..64, any::<u64>()],
        max in prop_oneof![0usize..64, any::<usize>()],
        min_item_len in prop_oneof![0usize..32, any::<usize>()],
        len in 0usize..256,
    ) {
        let buf = vec![0u8; len];
        let mut r = Reader::new(&buf, "c");
        let ok = count <= max as u64 && u128::from(count) * min_item_len as u128 <= len as u128;
        let got = r.count(count, max, min_item_len);
        prop_assert_eq!(got.is_ok(), ok, "{:?}", got);
        if let Ok(n) = got {
            prop_assert_eq!(n as u64, count);
        }
    }
}

// ---------------------------------------------------------------------------------------
// RAM batches

/// What a batch's fixed part accepts: a count within the batch bound and a frame holding
/// the header, every entry and between zero and `count` whole pages.
fn batch_header_ok(count: u32, frame_len: u32) -> bool {
    let fixed = (RamBatchHeader::LEN + 8 * count as usize) as u64;
    let frame_len = u64::from(frame_len);
    count as usize <= MAX_BATCH_PAGES
        && frame_len >= fixed
        && (frame_len - fixed) % PAGE_SIZE as u64 == 0
        && (frame_len - fixed) / PAGE_SIZE as u64 <= u64::from(count)
}

/// A frame length near the one a batch of `count` entries and `pages` data pages has.
fn near_frame_len(count: u32, pages: u32, delta: i64) -> u32 {
    let exact =
        RamBatchHeader::LEN as i64 + 8 * i64::from(count) + PAGE_SIZE as i64 * i64::from(pages);
    (exact + delta).clamp(0, u32::MAX.into()) as u32
}

/// A page entry for a block of `block_pages` pages: in range, out of range, or with
/// arbitrary bits (flags this release does not know).
fn page_entry(block_pages: u64) -> BoxedStrategy<u64> {
    let in_range = (
        0..block_pages.clamp(1, RamBatchHeader::PAGE_MASK + 1),
        any::<bool>(),
    )
        .prop_map(|(p, z)| RamBatchHeader::entry(p, z));
    let out_of_range = (
        block_pages.min(RamBatchHeader::PAGE_MASK)..=RamBatchHeader::PAGE_MASK,
        any::<bool>(),
    )
        .prop_map(|(p, z)| RamBatchHeader::entry(p, z));
    prop_oneof![
        12 => in_range,
        1 => out_of_range,
        1 => any::<u64>(),
    ]
    .boxed()
}

fn block_pages() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 1..=1024u64,
        1 => Just(0u64),
        1 => any::<u64>(),
        1 => Just(RamBatchHeader::PAGE_MASK + 1),
    ]
}

/// A batch header's count and a frame length, mostly near the lengths that matter.
fn count_and_frame_len() -> impl Strategy<Value = (u32, u32)> {
    prop_oneof![4 => 0..=MAX_BATCH_PAGES as u32 + 1, 1 => any::<u32>()].prop_flat_map(|count| {
        let near = (
            0..=count.min(MAX_BATCH_PAGES as u32) + 2,
            prop_oneof![3 => Just(0i64), 1 => -2i64..=2],
        )
            .prop_map(move |(pages, delta)| near_frame_len(count, pages, delta));
        let off_page = (0..=count.min(MAX_BATCH_PAGES as u32), 1..PAGE_SIZE as i64)
            .prop_map(move |(pages, delta)| near_frame_len(count, pages, delta));
        (
            Just(count),
            prop_oneof![3 => near, 1 => off_page, 1 => any::<u32>()],
        )
    })
}

proptest! {
    #[test]
    fn ram_batch_header_accepts_exactly_whole_batches(
        block in any::<u32>(),
        (count, frame_len) in count_and_frame_len(),
    ) {
        let h = RamBatchHeader { block, count };
        let r = RamBatchHeader::decode(&h.encode(), frame_len);
        prop_assert_eq!(r.is_ok(), batch_header_ok(count, frame_len), "{:?}", r);
        if let Ok(d) = r {
            prop_assert_eq!(d, h);
        }
    }

    /// `decode_entries` accepts exactly when the bytes hold `count` entries, every entry
    /// has only known bits and an index inside the block, and the frame is header +
    /// entries + one page per non-zero entry.
    #[test]
    fn ram_batch_entries_accept_exactly_valid_batches(
        (block_pages, entries) in block_pages().prop_flat_map(|bp| {
            let valid = (0..bp.clamp(1, RamBatchHeader::PAGE_MASK + 1), any::<bool>())
                .prop_map(|(p, z)| RamBatchHeader::entry(p, z));
            let entries = prop_oneof![
                3 => vec(valid, 0..=MAX_BATCH_PAGES),
                1 => vec(page_entry(bp), 0..=MAX_BATCH_PAGES),
            ];
            (Just(bp), entries)
        }),
        len_delta in prop_oneof![
            6 => Just(0i64),
            1 => -2i64..=2,
            1 => prop_oneof![Just(-4096i64), Just(4096)],
        ],
        bytes_delta in prop_oneof![6 => Just(0i64), 1 => -9i64..=9],
        arbitrary_len in proptest::option::weighted(0.05, any::<u32>()),
    ) {
        let h = RamBatchHeader { block: 0, count: entries.len() as u32 };
        let known = |e: u64| e & !(RamBatchHeader::ZERO | RamBatchHeader::PAGE_MASK) == 0;
        let data_pages = entries.iter().filter(|&&e| e & RamBatchHeader::ZERO == 0).count();
        let exact = near_frame_len(h.count, data_pages as u32, 0);
        let frame_len =
            arbitrary_len.unwrap_or(near_frame_len(h.count, data_pages as u32, len_delta));

        let mut b = entries_bytes(&entries);
        let new_len = (b.len() as i64 + bytes_delta).max(0) as usize;
        b.resize(new_len, 0xa5);

        let ok = b.len() == 8 * entries.len()
            && entries
                .iter()
                .all(|&e| known(e) && (e & RamBatchHeader::PAGE_MASK) < block_pages)
            && frame_len == exact;
        let mut out = vec![(7, true)];
        let r = h.decode_entries(&b, frame_len, block_pages, &mut out);
        prop_assert_eq!(r.is_ok(), ok, "{:?}", r);
        if let Ok(n) = r {
            prop_assert_eq!(n, data_pages);
            let want: Vec<(u64, bool)> = entries
                .iter()
                .map(|&e| (e & RamBatchHeader::PAGE_MASK, e & RamBatchHeader::ZERO != 0))
                .collect();
            prop_assert_eq!(out, want);
        }
    }

    /// A whole batch frame, built as the source sends it, decodes back; its entries are
    /// length-exact.
    #[test]
    fn ram_batch_round_trips(
        block in any::<u32>(),
        (block_pages, pages) in (1..=1u64 << 20).prop_flat_map(|bp| {
            (Just(bp), vec((0..bp, any::<bool>()), 0..=MAX_BATCH_PAGES))
        }),
        extra in any::<u8>(),
    ) {
        let h = RamBatchHeader { block, count: pages.len() as u32 };
        let entries: Vec<u64> = pages.iter().map(|&(p, z)| RamBatchHeader::entry(p, z)).collect();
        let mut frame = h.encode().to_vec();
        frame.extend(entries_bytes(&entries));
        for (i, &(_, zero)) in pages.iter().enumerate() {
            if !zero {
                frame.extend(std::iter::repeat_n(i as u8, PAGE_SIZE));
            }
        }
        let frame_len = frame.len() as u32;
        prop_assert!(frame_len <= FrameTag::RamBatch.max_len());

        let hdr: [u8; RamBatchHeader::LEN] = frame[..RamBatchHeader::LEN].try_into().unwrap();
        let d = RamBatchHeader::decode(&hdr, frame_len)?;
        prop_assert_eq!(d, h);
        let end = RamBatchHeader::LEN + 8 * d.count as usize;
        let body = &frame[RamBatchHeader::LEN..end];
        let mut out = Vec::new();
        let n = d.decode_entries(body, frame_len, block_pages, &mut out)?;
        prop_assert_eq!(&out, &pages);
        prop_assert_eq!(end + n * PAGE_SIZE, frame.len());

        let decode = |b: &[u8]| d.decode_entries(b, frame_len, block_pages, &mut Vec::new());
        prefixes_refused(body, decode)?;
        trailing_refused(body, extra, decode)?;
        for len in [frame_len - 1, frame_len + 1] {
            prop_assert!(d.decode_entries(body, len, block_pages, &mut out).is_err());
        }
    }
}

#[test]
fn a_full_batch_of_data_pages_is_exactly_the_frame_limit() {
    let count = MAX_BATCH_PAGES as u32;
    let len = near_frame_len(count, count, 0);
    assert_eq!(len, FrameTag::RamBatch.max_len());
    let h = RamBatchHeader { block: 0, count };
    assert!(RamBatchHeader::decode(&h.encode(), len).is_ok());
    let entries: Vec<u64> = (0..u64::from(count))
        .map(|p| RamBatchHeader::entry(p, false))
        .collect();
    let mut out = Vec::new();
    assert_eq!(
        h.decode_entries(&entries_bytes(&entries), len, u64::from(count), &mut out),
        Ok(MAX_BATCH_PAGES)
    );
}

// ---------------------------------------------------------------------------------------
// Pass end, device and vCPU state, end of stream, completed

proptest! {
    #[test]
    fn pass_end_round_trips_and_is_length_exact(
        pass in any::<u32>(),
        pages in any::<u64>(),
        extra in any::<u8>(),
    ) {
        let p = PassEnd { pass, pages };
        let b = p.encode();
        prop_assert_eq!(b.len(), PassEnd::LEN);
        length_exact(&p, &b, extra, PassEnd::decode)?;
    }

    #[test]
    fn completed_round_trips_and_is_length_exact(
        resume_us in any::<u64>(),
        state_load_us in any::<u64>(),
        pages_written in any::<u64>(),
        extra in any::<u8>(),
    ) {
        let c = Completed { resume_us, state_load_us, pages_written };
        let b = c.encode();
        prop_assert_eq!(b.len(), Completed::LEN);
        length_exact(&c, &b, extra, Completed::decode)?;
    }

    #[test]
    fn end_of_stream_round_trips_and_is_length_exact(e in end_of_stream(), extra in any::<u8>()) {
        let b = e.encode();
        prop_assert_eq!(b.len(), EndOfStream::LEN);
        length_exact(&e, &b, extra, EndOfStream::decode)?;
    }

    #[test]
    fn end_of_stream_accepts_exactly_known_flags(b in any::<[u8; EndOfStream::LEN]>()) {
        let r = EndOfStream::decode(&b);
        prop_assert_eq!(r.is_ok(), b[0] & !7 == 0, "{:?}", r);
        if let Ok(e) = r {
            let field = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
            prop_assert_eq!(e.digest, (b[0] & 1 != 0).then(|| field(1)));
            prop_assert_eq!(e.full_digest, (b[0] & 2 != 0).then(|| field(9)));
            prop_assert_eq!(e.pages_sent, field(17));
            prop_assert_eq!(e.resume, b[0] & 4 != 0);
            prop_assert_eq!(EndOfStream::decode(&e.encode())?, e);
        }
    }

    #[test]
    fn fixed_messages_mutations_never_yield_a_second_spelling(
        p in (any::<u32>(), any::<u64>()).prop_map(|(pass, pages)| PassEnd { pass, pages }),
        c in (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| Completed {
            resume_us: a,
            state_load_us: b,
            pages_written: c,
        }),
        at in any::<Index>(),
        byte in any::<u8>(),
    ) {
        mutation_canonical(p.encode(), at, byte, PassEnd::decode, PassEnd::encode)?;
        mutation_canonical(c.encode(), at, byte, Completed::decode, Completed::encode)?;
    }

    /// The destination reads a device-state header in two steps, without the frame:
    /// the prefix says how much follows, bounded by the frame's length, and the parts
    /// give back the header and the state length, for every frame length.
    #[test]
    fn device_state_header_parts_agree_with_the_whole_and_bound_the_frame(
        name in text(MAX_NAME_LEN),
        instance in any::<u32>(),
        version in any::<u32>(),
        state_len in 0u32..4096,
        short in 1usize..16,
    ) {
        let h = DeviceStateHeader { name, instance, version };
        let b = h.encode(&[]);
        let frame_len = b.len() as u32 + state_len;
        let prefix: [u8; 2] = b[..2].try_into().unwrap();
        let rest_len = DeviceStateHeader::rest_len(prefix, frame_len)?;
        prop_assert_eq!(2 + rest_len, b.len());
        let (d, n) = DeviceStateHeader::decode_parts(prefix, &b[2..], frame_len)?;
        prop_assert_eq!(d, h);
        prop_assert_eq!(n, state_len);
        // A frame too short for its own header, and a rest of the wrong length.
        let too_short = (b.len().saturating_sub(short)) as u32;
        prop_assert!(DeviceStateHeader::rest_len(prefix, too_short).is_err());
        prop_assert!(DeviceStateHeader::decode_parts(prefix, &b[2..b.len() - 1], frame_len).is_err());
    }

    #[test]
    fn a_device_state_name_over_its_bound_is_refused_from_the_prefix(extra in 1u16..1000) {
        let prefix = (MAX_NAME_LEN as u16 + extra).to_le_bytes();
        let refused = matches!(
            DeviceStateHeader::rest_len(prefix, u32::MAX),
            Err(WireError::TooLong { .. })
        );
        prop_assert!(refused);
    }

    #[test]
    fn vcpu_state_header_fixed_part_decodes_and_bounds_the_frame(
        index in any::<u32>(),
        version in any::<u32>(),
        frame_len in 0u32..100_000,
    ) {
        let h = VcpuStateHeader { index, version };
        let b: [u8; VcpuStateHeader::LEN] = h.encode(&[]).try_into().unwrap();
        match VcpuStateHeader::decode_fixed(&b, frame_len) {
            Ok((d, n)) => {
                prop_assert!(frame_len as usize >= VcpuStateHeader::LEN);
                prop_assert_eq!(d, h);
                prop_assert_eq!(n as usize, frame_len as usize - VcpuStateHeader::LEN);
            }
            Err(_) => prop_assert!((frame_len as usize) < VcpuStateHeader::LEN),
        }
    }

    /// Device state is not length-exact: its state bytes run to the end of the frame. A
    /// prefix shorter than the fixed part is refused; a longer one cuts the state.
    #[test]
    fn device_state_header_round_trips_and_refuses_a_cut_header(
        name in text(MAX_NAME_LEN),
        instance in any::<u32>(),
        version in any::<u32>(),
        state in vec(any::<u8>(), 0..512),
        extra in any::<u8>(),
    ) {
        let h = DeviceStateHeader { name, instance, version };
        let b = h.encode(&state);
        let fixed = 2 + h.name.len() + 8;
        prop_assert_eq!(b.len(), fixed + state.len());
        for n in 0..=b.len() {
            match DeviceStateHeader::decode(&b[..n]) {
                Ok((d, s)) => {
                    prop_assert!(n >= fixed);
                    prop_assert_eq!(&d, &h);
                    prop_assert_eq!(s, &state[..n - fixed]);
                }
                Err(e) => prop_assert!(n < fixed, "{}-byte prefix refused: {}", n, e),
            }
        }
        let mut long = b.clone();
        long.push(extra);
        let (d, s) = DeviceStateHeader::decode(&long)?;
        prop_assert_eq!(d, h);
        prop_assert_eq!(s.last(), Some(&extra));
        prop_assert_eq!(s.len(), state.len() + 1);
    }

    #[test]
    fn device_state_header_cuts_over_long_name(
        name in overlong(MAX_NAME_LEN),
        state in vec(any::<u8>(), 0..64),
    ) {
        let h = DeviceStateHeader { name: name.clone(), instance: 3, version: 4 };
        let b = h.encode(&state);
        let (d, s) = DeviceStateHeader::decode(&b)?;
        prop_assert_eq!(d.name.as_str(), cut(&name, MAX_NAME_LEN));
        prop_assert_eq!((d.instance, d.version), (3, 4));
        prop_assert_eq!(s, &state[..]);
    }

    #[test]
    fn vcpu_state_header_round_trips_and_refuses_a_cut_header(
        index in any::<u32>(),
        version in any::<u32>(),
        state in vec(any::<u8>(), 0..512),
        extra in any::<u8>(),
    ) {
        let h = VcpuStateHeader { index, version };
        let b = h.encode(&state);
        prop_assert_eq!(b.len(), 8 + state.len());
        for n in 0..=b.len() {
            match VcpuStateHeader::decode(&b[..n]) {
                Ok((d, s)) => {
                    prop_assert!(n >= 8);
                    prop_assert_eq!(d, h);
                    prop_assert_eq!(s, &state[..n - 8]);
                }
                Err(e) => prop_assert!(n < 8, "{}-byte prefix refused: {}", n, e),
            }
        }
        let mut long = b.clone();
        long.push(extra);
        let (d, s) = VcpuStateHeader::decode(&long)?;
        prop_assert_eq!(d, h);
        prop_assert_eq!(s.len(), state.len() + 1);
    }
}

// ---------------------------------------------------------------------------------------
// Random bytes

fn array<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
    b.get(..N)?.try_into().ok()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// No decoder panics on arbitrary input, whatever the frame length and block size.
    #[test]
    fn no_decoder_panics_on_random_bytes(
        b in prop_oneof![vec(any::<u8>(), 0..64), vec(any::<u8>(), 0..2048)],
        frame_len in any::<u32>(),
        block_pages in any::<u64>(),
    ) {
        if let Some(a) = array::<16>(&b) {
            let _ = StreamHeader::decode(&a);
        }
        if let Some(a) = array::<8>(&b) {
            let _ = FrameHeader::decode(&a);
            let _ = RamBatchHeader::decode(&a, frame_len);
            // Also drive the entry decoder with a count no header check has bounded.
            let count = u32::from_le_bytes([a[4], a[5], a[6], a[7]]);
            let h = RamBatchHeader { block: 0, count };
            let _ = h.decode_entries(&b[8..], frame_len, block_pages, &mut Vec::new());
            if let Ok(h) = RamBatchHeader::decode(&a, frame_len) {
                let _ = h.decode_entries(&b[8..], frame_len, block_pages, &mut Vec::new());
            }
        }
        let _ = Hello::decode(&b);
        let _ = Accept::decode(&b);
        let _ = Refuse::decode(&b);
        let _ = decode_reason(&b, "abort");
        let _ = PassEnd::decode(&b);
        let _ = DeviceStateHeader::decode(&b);
        let _ = VcpuStateHeader::decode(&b);
        let _ = EndOfStream::decode(&b);
        let _ = Completed::decode(&b);
    }
}

// ---------------------------------------------------------------------------------------
// Data channels: channel header, packet header and offsets, multifd sync, channels ready,
// and the hello's channel count and compression
//
// [`ChannelHeader`] and [`PacketHeader`] decode from fixed-size arrays (the doorman and the
// receivers read exactly that many bytes first), so, as for the stream header, their
// properties characterise which of all possible arrays they accept. The offsets that
// follow a packet header, [`MultifdSync`] and [`ChannelsReady`] are slices: every cut of
// them is refused.

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// Any channel header the decoder must accept: every version and session, every count
/// from 1 to the bound, every index below the count.
fn channel_header() -> impl Strategy<Value = ChannelHeader> {
    (any::<u32>(), any::<u64>(), 1..=MAX_CHANNELS).prop_flat_map(|(version, session_id, count)| {
        (0..count).prop_map(move |index| ChannelHeader {
            version,
            session_id,
            index,
            count,
        })
    })
}

/// What [`ChannelHeader::decode`] accepts, judged from the bytes alone: its magic, its own
/// length, zero reserved bytes, a count from 1 to [`MAX_CHANNELS`] and an index below it.
/// The version and session are the caller's to judge.
fn channel_header_ok(b: &[u8; ChannelHeader::LEN]) -> bool {
    let (index, count) = (u16_at(b, 24), u16_at(b, 26));
    b[..8] == CHANNEL_MAGIC
        && u32_at(b, 12) as usize == ChannelHeader::LEN
        && b[28..] == [0; 4]
        && (1..=MAX_CHANNELS).contains(&count)
        && index < count
}

/// Byte offset and width of each field of a channel header after the magic.
const CHANNEL_FIELDS: [(usize, usize); 5] = [(8, 4), (12, 4), (16, 8), (24, 2), (26, 2)];

/// Values around every bound a header field has, and some anywhere.
fn edge_value() -> BoxedStrategy<u64> {
    prop_oneof![
        4 => 0..=9u64,
        2 => 14..=18u64,
        2 => 30..=34u64,
        2 => 126..=130u64,
        2 => (0..=MAX_PACKET_PAGES as u64 + 1)
            .prop_flat_map(|n| (n * PAGE_SIZE as u64).saturating_sub(1)..=n * PAGE_SIZE as u64 + 1),
        1 => Just(u64::from(u16::MAX)),
        1 => Just(u64::from(u32::MAX)),
        1 => Just(u64::MAX),
        2 => any::<u64>(),
    ]
    .boxed()
}

/// Writes the low `width` bytes of `v` at `at`.
fn put(b: &mut [u8], at: usize, width: usize, v: u64) {
    b[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
}

/// Arrays near valid channel headers: random, one byte changed, one field set to a value
/// near a bound.
fn channel_header_bytes() -> impl Strategy<Value = [u8; ChannelHeader::LEN]> {
    prop_oneof![
        1 => any::<[u8; ChannelHeader::LEN]>(),
        2 => (channel_header(), any::<Index>(), any::<u8>()).prop_map(|(h, at, byte)| {
            let mut b = h.encode();
            b[at.index(ChannelHeader::LEN)] = byte;
            b
        }),
        3 => (channel_header(), proptest::sample::select(&CHANNEL_FIELDS[..]), edge_value())
            .prop_map(|(h, (at, width), v)| {
                let mut b = h.encode();
                put(&mut b, at, width, v);
                b
            }),
        1 => (channel_header(), 28..32usize, 1..=u8::MAX).prop_map(|(h, at, byte)| {
            let mut b = h.encode();
            b[at] = byte;
            b
        }),
    ]
}

/// A valid page or sync packet header. Compressed page packets only when `zstd`.
fn packet_header(zstd: bool) -> BoxedStrategy<PacketHeader> {
    let sync =
        (1..=u64::MAX, 1..=u64::MAX, any::<bool>()).prop_map(|(packet, sync, last)| PacketHeader {
            flags: PacketHeader::SYNC | if last { PacketHeader::LAST } else { 0 },
            packet,
            sync,
            block: 0,
            normal: 0,
            zero: 0,
            data_len: 0,
        });
    let pages = (
        1..=u64::MAX,
        any::<u32>(),
        1..=MAX_PACKET_PAGES as u32,
        any::<Index>(),
        any::<Index>(),
        any::<bool>(),
    )
        .prop_map(move |(packet, block, total, split, len, compress)| {
            let normal = split.index(total as usize + 1) as u32;
            let raw = normal * PAGE_SIZE as u32;
            let compressed = zstd && compress && normal > 0;
            PacketHeader {
                flags: if compressed { PacketHeader::ZSTD } else { 0 },
                packet,
                sync: 0,
                block,
                normal,
                zero: total - normal,
                // Compressed: 1 to raw - 1 bytes.
                data_len: if compressed {
                    1 + len.index(raw as usize - 1) as u32
                } else {
                    raw
                },
            }
        });
    prop_oneof![1 => sync, 4 => pages].boxed()
}

/// A packet header's fields as the bytes hold them, unchecked.
fn packet_fields(b: &[u8; PacketHeader::LEN]) -> (u32, PacketHeader) {
    (
        u32_at(b, 0),
        PacketHeader {
            flags: u32_at(b, 4),
            packet: u64_at(b, 8),
            sync: u64_at(b, 16),
            block: u32_at(b, 24),
            normal: u32_at(b, 28),
            zero: u32_at(b, 32),
            data_len: u32_at(b, 36),
        },
    )
}

/// What [`PacketHeader::decode`] accepts, from the fields alone.
///
/// Every packet: the magic, only known flags, `ZSTD` only when negotiated, a packet
/// number from 1. A sync packet: a sync number from 1 and nothing else (no block, no
/// pages, no data, no compression). A page packet: not `LAST`, no sync number, 1 to
/// [`MAX_PACKET_PAGES`] pages, and exactly their data raw, or compressed into fewer bytes
/// than raw (and more than none, so at least one page has data).
fn packet_ok(magic: u32, h: &PacketHeader, zstd_allowed: bool) -> bool {
    let f = h.flags;
    let zstd = f & PacketHeader::ZSTD != 0;
    if magic != PACKET_MAGIC
        || f & !(PacketHeader::SYNC | PacketHeader::LAST | PacketHeader::ZSTD) != 0
        || (zstd && !zstd_allowed)
        || h.packet == 0
    {
        return false;
    }
    if f & PacketHeader::SYNC != 0 {
        return !zstd
            && h.sync != 0
            && h.block == 0
            && h.normal == 0
            && h.zero == 0
            && h.data_len == 0;
    }
    let pages = u64::from(h.normal) + u64::from(h.zero);
    let raw = u64::from(h.normal) * PAGE_SIZE as u64;
    let len = u64::from(h.data_len);
    f & PacketHeader::LAST == 0
        && h.sync == 0
        && (1..=MAX_PACKET_PAGES as u64).contains(&pages)
        && if zstd {
            len > 0 && len < raw
        } else {
            len == raw
        }
}

/// Byte offset and width of each field of a packet header after the magic.
const PACKET_FIELDS: [(usize, usize); 7] =
    [(4, 4), (8, 8), (16, 8), (24, 4), (28, 4), (32, 4), (36, 4)];

/// Arrays near valid packet headers: random, one byte changed, one or two fields set to
/// values near a bound, or any combination of flags on a valid header.
fn packet_bytes() -> impl Strategy<Value = [u8; PacketHeader::LEN]> {
    let field = || (proptest::sample::select(&PACKET_FIELDS[..]), edge_value());
    prop_oneof![
        1 => vec(any::<u8>(), PacketHeader::LEN)
            .prop_map(|v| <[u8; PacketHeader::LEN]>::try_from(v).expect("40 bytes")),
        2 => (packet_header(true), any::<Index>(), any::<u8>()).prop_map(|(h, at, byte)| {
            let mut b = h.encode();
            b[at.index(PacketHeader::LEN)] = byte;
            b
        }),
        3 => (packet_header(true), field()).prop_map(|(h, ((at, width), v))| {
            let mut b = h.encode();
            put(&mut b, at, width, v);
            b
        }),
        2 => (packet_header(true), vec(field(), 2)).prop_map(|(h, fields)| {
            let mut b = h.encode();
            for ((at, width), v) in fields {
                put(&mut b, at, width, v);
            }
            b
        }),
        1 => (packet_header(true), 0..16u32).prop_map(|(h, flags)| {
            PacketHeader { flags, ..h }.encode()
        }),
    ]
}

/// `n` distinct page indices below `block_pages`, in random order; they reach both ends
/// of the block whatever its size.
fn distinct_pages(block_pages: u64, n: usize) -> BoxedStrategy<Vec<u64>> {
    const POOL: u64 = 4096;
    let pool = block_pages.min(POOL);
    assert!(n as u64 <= pool);
    let stride = block_pages / pool;
    let all: Vec<u64> = (0..pool)
        .map(|i| {
            if i == pool - 1 {
                block_pages - 1
            } else {
                i * stride
            }
        })
        .collect();
    proptest::sample::subsequence(all, n).prop_shuffle().boxed()
}

/// A valid page packet header for a block of some size, and offsets that fit it.
fn page_packet_with_offsets() -> impl Strategy<Value = (PacketHeader, u64, Vec<u64>)> {
    packet_header(true)
        .prop_filter("page packets", |h| !h.is_sync())
        .prop_flat_map(|h| {
            let total = u64::from(h.normal + h.zero);
            let block_pages = prop_oneof![
                3 => total..=total + 8,
                2 => total..=1 << 20,
                1 => total..=u64::MAX,
                1 => Just(u64::MAX),
            ];
            (Just(h), block_pages)
        })
        .prop_flat_map(|(h, bp)| {
            let n = (h.normal + h.zero) as usize;
            (Just(h), Just(bp), distinct_pages(bp, n))
        })
}

fn decode_offsets_of(
    h: &PacketHeader,
    b: &[u8],
    block_pages: u64,
) -> Result<(Vec<u64>, Vec<u64>), WireError> {
    let (mut normal, mut zero, mut scratch) = (vec![7], vec![7], Vec::new());
    h.decode_offsets(b, block_pages, &mut normal, &mut zero, &mut scratch)?;
    Ok((normal, zero))
}

#[test]
fn channel_header_accepts_every_index_below_every_count_and_nothing_else() {
    let counts = (0..=MAX_CHANNELS + 2).chain([u16::MAX - 1, u16::MAX]);
    for count in counts {
        let indices = (0..=MAX_CHANNELS + 2).chain([u16::MAX - 1, u16::MAX]);
        for index in indices {
            let h = ChannelHeader {
                version: CHANNEL_VERSION,
                session_id: 0x0123_4567_89ab_cdef,
                index,
                count,
            };
            let r = ChannelHeader::decode(&h.encode());
            let ok = (1..=MAX_CHANNELS).contains(&count) && index < count;
            assert_eq!(r.is_ok(), ok, "index {index} of {count}: {r:?}");
            match r {
                Ok(d) => assert_eq!(d, h),
                Err(WireError::BadValue { what, .. }) => assert!(
                    what == if (1..=MAX_CHANNELS).contains(&count) {
                        "channel index"
                    } else {
                        "channel count"
                    },
                    "index {index} of {count}: {what}"
                ),
                Err(e) => panic!("index {index} of {count}: {e:?}"),
            }
        }
    }
}

#[test]
fn compression_codes_round_trip_and_only_two_are_known() {
    for c in 0..=u8::MAX {
        let m = Compression::from_code(c);
        assert_eq!(m.code(), c);
        assert_eq!(matches!(m, Compression::Other(_)), c > 1, "{c}");
        assert!(!m.name().is_empty());
    }
    assert_eq!(Compression::None.name(), "none");
    assert_eq!(Compression::Zstd.name(), "zstd");
}

#[test]
fn channels_ready_round_trips_every_count() {
    for count in 0..=u16::MAX {
        let c = ChannelsReady { count };
        let b = c.encode();
        assert_eq!(b.len(), ChannelsReady::LEN);
        assert_eq!(ChannelsReady::decode(&b), Ok(c));
    }
}

proptest! {
    #[test]
    fn channel_header_round_trips(h in channel_header()) {
        let b = h.encode();
        prop_assert_eq!(&b[..8], &CHANNEL_MAGIC);
        prop_assert_eq!(ChannelHeader::decode(&b)?, h);
    }

    #[test]
    fn channel_header_accepts_exactly_valid_arrays(b in channel_header_bytes()) {
        let r = ChannelHeader::decode(&b);
        prop_assert_eq!(r.is_ok(), channel_header_ok(&b), "{:?}", r);
        if let Ok(h) = r {
            prop_assert_eq!(h.version, u32_at(&b, 8));
            prop_assert_eq!(h.session_id, u64_at(&b, 16));
            prop_assert_eq!((h.index, h.count), (u16_at(&b, 24), u16_at(&b, 26)));
            prop_assert_eq!(h.encode(), b, "accepted a second spelling");
        }
    }

    #[test]
    fn channel_header_refuses_each_field_out_of_range(
        h in channel_header(),
        count in prop_oneof![Just(0u16), MAX_CHANNELS + 1..=u16::MAX],
        index in any::<u16>(),
        reserved in 1..=u32::MAX,
        len in any::<u32>(),
        magic in any::<[u8; 8]>(),
    ) {
        let what = |r: Result<ChannelHeader, WireError>| match r {
            Err(WireError::BadValue { what, .. }) => what,
            r => panic!("{r:?}"),
        };
        // A count of none or over the bound, whatever the index.
        let b = ChannelHeader { count, index: index.min(count.saturating_sub(1)), ..h }.encode();
        prop_assert_eq!(what(ChannelHeader::decode(&b)), "channel count");
        // An index at or past the count.
        let at_least = h.count + (index % (u16::MAX - h.count + 1));
        let b = ChannelHeader { index: at_least, ..h }.encode();
        prop_assert_eq!(what(ChannelHeader::decode(&b)), "channel index");
        // Reserved bytes.
        let mut b = h.encode();
        b[28..].copy_from_slice(&reserved.to_le_bytes());
        prop_assert_eq!(what(ChannelHeader::decode(&b)), "channel header reserved bytes");
        // Another header length.
        prop_assume!(len as usize != ChannelHeader::LEN);
        let mut b = h.encode();
        b[12..16].copy_from_slice(&len.to_le_bytes());
        prop_assert_eq!(what(ChannelHeader::decode(&b)), "channel header length");
        // Another magic, the main stream's included.
        for magic in [magic, MAGIC] {
            prop_assume!(magic != CHANNEL_MAGIC);
            let mut b = h.encode();
            b[..8].copy_from_slice(&magic);
            prop_assert_eq!(ChannelHeader::decode(&b), Err(WireError::BadMagic(magic)));
        }
    }

    #[test]
    fn packet_header_round_trips(h in packet_header(true)) {
        prop_assert_eq!(PacketHeader::decode(&h.encode(), true)?, h);
        let compressed = h.flags & PacketHeader::ZSTD != 0;
        let r = PacketHeader::decode(&h.encode(), false);
        prop_assert_eq!(r.is_ok(), !compressed, "{:?}", r);
        if compressed {
            let what = "packet flags (zstd was not negotiated)";
            let refused = matches!(r, Err(WireError::BadValue { what: w, .. }) if w == what);
            prop_assert!(refused, "{:?}", r);
        }
        prop_assert_eq!(h.offsets_len(), 8 * (h.normal + h.zero) as usize);
        prop_assert_eq!(h.is_sync(), h.flags & PacketHeader::SYNC != 0);
    }

    #[test]
    fn packet_header_accepts_exactly_valid_arrays(b in packet_bytes(), zstd in any::<bool>()) {
        let (magic, fields) = packet_fields(&b);
        let r = PacketHeader::decode(&b, zstd);
        prop_assert_eq!(r.is_ok(), packet_ok(magic, &fields, zstd), "{:?} {:?}", fields, r);
        if let Ok(h) = r {
            prop_assert_eq!(h, fields);
            prop_assert_eq!(h.encode(), b, "accepted a second spelling");
            prop_assert!(h.offsets_len() <= 8 * MAX_PACKET_PAGES);
            prop_assert!(h.data_len as usize <= MAX_PACKET_PAGES * PAGE_SIZE);
        }
    }

    #[test]
    fn packet_header_refuses_each_field_out_of_range(
        page in packet_header(true).prop_filter("page packet", |h| !h.is_sync()),
        sync in packet_header(false).prop_filter("sync packet", |h| h.is_sync()),
        unknown in (8..=u32::MAX).prop_filter("an unknown bit", |f| f & !7 != 0),
        (normal, zero) in prop_oneof![
            (0..=MAX_PACKET_PAGES as u32 + 1).prop_flat_map(|n| {
                (Just(n), MAX_PACKET_PAGES as u32 + 1 - n..=u32::MAX)
            }),
            (MAX_PACKET_PAGES as u32 + 1..=u32::MAX, any::<u32>()),
            Just((u32::MAX, u32::MAX)),
        ],
        stray in 1..=u32::MAX,
        stray64 in 1..=u64::MAX,
        field in 0..5usize,
        long in any::<Index>(),
    ) {
        let what = |h: PacketHeader, zstd: bool| match PacketHeader::decode(&h.encode(), zstd) {
            Err(WireError::BadValue { what, .. }) => what,
            Err(WireError::TooLong { what, .. }) => what,
            r => panic!("{h:?} decoded: {r:?}"),
        };
        // Flags this release does not know, on any packet.
        for h in [page, sync] {
            let h = PacketHeader { flags: h.flags | unknown, ..h };
            prop_assert_eq!(what(h, true), "packet flags");
        }
        // Compression that was not negotiated, whatever else the packet says.
        let z = PacketHeader { flags: PacketHeader::ZSTD, ..page };
        prop_assert_eq!(what(z, false), "packet flags (zstd was not negotiated)");
        // Packet number 0.
        for h in [page, sync] {
            prop_assert_eq!(what(PacketHeader { packet: 0, ..h }, true), "packet number");
        }
        // Over the page bound, counting normal and zero pages together (without overflow).
        let over = PacketHeader {
            flags: 0,
            normal,
            zero,
            data_len: normal.wrapping_mul(PAGE_SIZE as u32),
            ..page
        };
        prop_assert_eq!(what(over, true), "packet page count");
        let none = PacketHeader { flags: 0, normal: 0, zero: 0, data_len: 0, ..page };
        prop_assert_eq!(what(none, true), "packet page count");
        // Raw data that is not exactly the pages.
        let raw = page.normal * PAGE_SIZE as u32;
        let off = PacketHeader { flags: 0, data_len: raw ^ stray, ..page };
        prop_assert_eq!(what(off, true), "packet data length");
        // Compressed data not smaller than raw, or empty.
        if page.normal > 0 {
            let not_smaller = raw + long.index((u32::MAX - raw) as usize + 1) as u32;
            for data_len in [not_smaller, raw, 0] {
                let h = PacketHeader { flags: PacketHeader::ZSTD, data_len, ..page };
                prop_assert_eq!(what(h, true), "compressed packet data length");
            }
        }
        // Compressed zero pages: nothing to compress.
        let zeros = PacketHeader {
            flags: PacketHeader::ZSTD,
            normal: 0,
            zero: page.normal + page.zero,
            data_len: 1 + stray % (PAGE_SIZE as u32),
            ..page
        };
        prop_assert_eq!(what(zeros, true), "compressed packet data length");
        // A sync number on a page packet; last without sync.
        prop_assert_eq!(what(PacketHeader { sync: stray64, ..page }, true), "packet sync number");
        let last = PacketHeader { flags: page.flags | PacketHeader::LAST, ..page };
        prop_assert_eq!(what(last, true), "packet flags (last without sync)");
        // A sync packet with number 0, or with anything of a page packet.
        prop_assert_eq!(what(PacketHeader { sync: 0, ..sync }, true), "packet sync number");
        let with = match field {
            0 => PacketHeader { flags: sync.flags | PacketHeader::ZSTD, ..sync },
            1 => PacketHeader { block: stray, ..sync },
            2 => PacketHeader { normal: stray, ..sync },
            3 => PacketHeader { zero: stray, ..sync },
            _ => PacketHeader { data_len: stray, ..sync },
        };
        let expect = if field == 4 { "sync packet data length" } else { "sync packet with pages" };
        prop_assert_eq!(what(with, true), expect);
        // Another magic.
        let mut b = page.encode();
        b[..4].copy_from_slice(&(PACKET_MAGIC ^ stray).to_le_bytes());
        let r = PacketHeader::decode(&b, true);
        prop_assert!(
            matches!(r, Err(WireError::BadValue { what: "packet magic", .. })),
            "{:?}", r
        );
    }

    /// Offsets that fit the block and name each page once decode into the normal pages
    /// (first) and the zero pages; every cut and one more byte are refused.
    #[test]
    fn packet_offsets_round_trip_and_are_length_exact(
        (h, block_pages, pages) in page_packet_with_offsets(),
        extra in any::<u8>(),
    ) {
        let b = entries_bytes(&pages);
        prop_assert_eq!(b.len(), h.offsets_len());
        let (normal, zero) = decode_offsets_of(&h, &b, block_pages)?;
        prop_assert_eq!(&normal[..], &pages[..h.normal as usize]);
        prop_assert_eq!(&zero[..], &pages[h.normal as usize..]);
        prefixes_refused(&b, |b| decode_offsets_of(&h, b, block_pages))?;
        trailing_refused(&b, extra, |b| decode_offsets_of(&h, b, block_pages))?;
    }

    /// One page outside the block, or one page named twice (among the normal pages, the
    /// zero pages, or one of each), and the packet is refused.
    #[test]
    fn packet_offsets_refuse_pages_out_of_the_block_or_repeated(
        (h, block_pages, pages) in page_packet_with_offsets(),
        at in any::<Index>(),
        from in any::<Index>(),
        outside in any::<Index>(),
    ) {
        let what = |pages: &[u64]| match decode_offsets_of(&h, &entries_bytes(pages), block_pages) {
            Err(WireError::BadValue { what, .. }) => what,
            r => panic!("{pages:?} in a block of {block_pages}: {r:?}"),
        };
        let i = at.index(pages.len());
        if block_pages < u64::MAX {
            let mut out = pages.clone();
            out[i] = block_pages + outside.index((u64::MAX - block_pages) as usize) as u64;
            prop_assert_eq!(what(&out), "packet page index");
            out[i] = u64::MAX;
            prop_assert_eq!(what(&out), "packet page index");
        }
        if pages.len() > 1 {
            let j = (i + 1 + from.index(pages.len() - 1)) % pages.len();
            let mut twice = pages.clone();
            twice[i] = pages[j];
            prop_assert_eq!(what(&twice), "packet page named twice");
        }
    }

    #[test]
    fn multifd_sync_round_trips_and_is_length_exact(
        seq in 1..=u64::MAX,
        last in any::<bool>(),
        extra in any::<u8>(),
    ) {
        let s = MultifdSync { seq, last };
        let b = s.encode();
        prop_assert_eq!(b.len(), MultifdSync::LEN);
        length_exact(&s, &b, extra, MultifdSync::decode)?;
    }

    /// Nine bytes, a sync number from 1 and a last flag of 0 or 1: nothing else.
    #[test]
    fn multifd_sync_accepts_exactly_valid_payloads(
        b in prop_oneof![
            4 => any::<[u8; MultifdSync::LEN]>().prop_map(|a| a.to_vec()),
            2 => (any::<u64>(), 0..=2u8).prop_map(|(seq, last)| {
                let mut b = seq.to_le_bytes().to_vec();
                b.push(last);
                b
            }),
            1 => Just(vec![0; MultifdSync::LEN]),
            1 => vec(any::<u8>(), 0..24),
        ],
    ) {
        let ok = b.len() == MultifdSync::LEN && u64_at(&b, 0) != 0 && b[8] <= 1;
        let r = MultifdSync::decode(&b);
        prop_assert_eq!(r.is_ok(), ok, "{:?}", r);
        if let Ok(s) = r {
            prop_assert_eq!(s.encode(), b);
        }
    }

    #[test]
    fn channels_ready_is_length_exact(count in any::<u16>(), extra in any::<u8>()) {
        let c = ChannelsReady { count };
        length_exact(&c, &c.encode(), extra, ChannelsReady::decode)?;
    }

    #[test]
    fn keepalive_is_length_exact(limit_ms in any::<u32>(), extra in any::<u8>()) {
        let k = Keepalive { limit_ms };
        prop_assert_eq!(Keepalive::decode(&k.encode()), Ok(k));
        length_exact(&k, &k.encode(), extra, Keepalive::decode)?;
    }

    #[test]
    fn data_channel_mutations_never_yield_a_second_spelling(
        s in (1..=u64::MAX, any::<bool>()).prop_map(|(seq, last)| MultifdSync { seq, last }),
        c in any::<u16>().prop_map(|count| ChannelsReady { count }),
        at in any::<Index>(),
        byte in any::<u8>(),
    ) {
        mutation_canonical(s.encode(), at, byte, MultifdSync::decode, MultifdSync::encode)?;
        mutation_canonical(c.encode(), at, byte, ChannelsReady::decode, ChannelsReady::encode)?;
    }

    /// Every channel count up to the bound and every compression code travel; the methods
    /// this release does not know arrive by their code, for the destination to name.
    #[test]
    fn hello_carries_every_channel_count_and_compression_code(
        h in small_hello(),
        channels in 0..=MAX_CHANNELS,
        code in any::<u8>(),
    ) {
        let h = Hello { channels, compression: Compression::from_code(code), ..h };
        let d = Hello::decode(&h.encode())?;
        prop_assert_eq!(d.channels, channels);
        prop_assert_eq!(d.compression.code(), code);
        prop_assert_eq!(d, h);
    }

    #[test]
    fn hello_refuses_more_channels_than_the_bound(
        h in small_hello(),
        channels in MAX_CHANNELS + 1..=u16::MAX,
    ) {
        let r = Hello::decode(&Hello { channels, ..h }.encode());
        prop_assert!(
            matches!(r, Err(WireError::TooLong { what: "hello channel count", .. })),
            "{:?}", r
        );
    }

    /// A hello cut anywhere in its last three bytes (the channel count and compression,
    /// which a hello without them lacks) is refused as truncated, never read as "no
    /// channels".
    #[test]
    fn hello_without_its_channel_fields_is_refused(h in small_hello(), cut in 1..=3usize) {
        let b = h.encode();
        let r = Hello::decode(&b[..b.len() - cut]);
        prop_assert!(matches!(r, Err(WireError::Truncated { .. })), "{:?}", r);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// No data-channel decoder panics on arbitrary input, whatever the block size, and
    /// whether or not compression was negotiated; the offset decoder also sees headers no
    /// header check has bounded. What the offset decoder accepts is always exactly the
    /// header's page count, inside the block, each page once.
    #[test]
    fn no_data_channel_decoder_panics_on_random_bytes(
        b in prop_oneof![vec(any::<u8>(), 0..64), vec(any::<u8>(), 0..1200)],
        block_pages in prop_oneof![0..=256u64, any::<u64>()],
        zstd in any::<bool>(),
    ) {
        if let Some(a) = array::<{ ChannelHeader::LEN }>(&b) {
            let _ = ChannelHeader::decode(&a);
        }
        let _ = MultifdSync::decode(&b);
        let _ = ChannelsReady::decode(&b);
        let _ = Keepalive::decode(&b);
        if let Some(a) = array::<{ PacketHeader::LEN }>(&b) {
            let rest = &b[PacketHeader::LEN..];
            let (_, raw) = packet_fields(&a);
            let decoded = PacketHeader::decode(&a, zstd);
            for h in [Some(raw), decoded.ok()].into_iter().flatten() {
                if let Ok((normal, zero)) = decode_offsets_of(&h, rest, block_pages) {
                    prop_assert_eq!(normal.len(), h.normal as usize);
                    prop_assert_eq!(zero.len(), h.zero as usize);
                    prop_assert_eq!(rest.len(), h.offsets_len());
                    let mut all: Vec<u64> = normal.iter().chain(&zero).copied().collect();
                    prop_assert!(all.iter().all(|&p| p < block_pages));
                    all.sort_unstable();
                    all.dedup();
                    prop_assert_eq!(all.len(), (h.normal + h.zero) as usize);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Device precopy: the plan, device references, the state digest, the hello's offers

fn device_mode() -> impl Strategy<Value = DeviceMode> {
    prop_oneof![
        Just(DeviceMode::Precopy),
        (1..=u8::MAX).prop_map(|c| DeviceMode::StopCopy(StopCopyWhy::from_code(c))),
    ]
}

proptest! {
    #[test]
    fn device_plan_round_trips_and_is_length_exact(
        modes in proptest::collection::vec(device_mode(), 0..40),
        extra in any::<u8>(),
    ) {
        let p = DevicePlan { modes };
        let b = p.encode();
        prop_assert!(b.len() <= DevicePlan::MAX_LEN);
        length_exact(&p, &b, extra, DevicePlan::decode)?;
    }

    #[test]
    fn device_plan_accepts_exactly_known_modes_with_their_reasons(
        modes in proptest::collection::vec(device_mode(), 1..8),
        at in any::<Index>(),
        byte in any::<u8>(),
    ) {
        let p = DevicePlan { modes };
        mutation_canonical(p.encode(), at, byte, DevicePlan::decode, DevicePlan::encode)?;
        // A mode byte other than 0 and 1, and a stop-copy without a reason, are refused.
        let mut b = p.encode();
        let i = 2 + 2 * at.index(p.modes.len());
        b[i] = byte;
        b[i + 1] = 0;
        prop_assert_eq!(DevicePlan::decode(&b).is_ok(), byte == 1, "mode {}", byte);
    }

    #[test]
    fn device_plan_refuses_more_devices_than_a_hello_can_list(n in MAX_DEVICES as u16 + 1..=u16::MAX) {
        let mut b = n.to_le_bytes().to_vec();
        b.extend(std::iter::repeat_n([1u8, 0], usize::from(n)).flatten());
        prop_assert!(DevicePlan::decode(&b).is_err());
    }

    #[test]
    fn device_ref_round_trips_and_is_length_exact(
        name in text(MAX_NAME_LEN),
        instance in any::<u32>(),
        extra in any::<u8>(),
    ) {
        let r = DeviceRef { name, instance };
        let b = r.encode();
        prop_assert!(b.len() <= DeviceRef::MAX_LEN);
        length_exact(&r, &b, extra, |b| DeviceRef::decode(b, "device"))?;
    }

    #[test]
    fn state_digest_round_trips_and_is_length_exact(
        digest in any::<u64>(),
        frames in any::<u64>(),
        extra in any::<u8>(),
    ) {
        let d = StateDigest { digest, frames };
        let b = d.encode();
        prop_assert_eq!(b.len(), StateDigest::LEN);
        length_exact(&d, &b, extra, StateDigest::decode)?;
    }

    /// Precopy offers survive the hello: written as compat-pinned annotations, taken
    /// back out whole, and never mistaken for wire properties.
    #[test]
    fn precopy_offers_round_trip_through_the_hello(
        h in small_hello(),
        offers in proptest::collection::vec(
            ("[a-z][a-z0-9-]{0,20}", any::<u32>(), "[a-z][a-z0-9-]{0,20}", any::<u32>()),
            0..4,
        ),
    ) {
        let mut h = h;
        h.wire_props.retain(|(k, _)| !k.starts_with(ANNOTATION_PREFIX));
        let props = h.wire_props.clone();
        let a = Annotations {
            precopy: offers
                .iter()
                .map(|(d, i, s, v)| PrecopyOffer {
                    device: d.clone(),
                    instance: *i,
                    schema: s.clone(),
                    version: *v,
                })
                .collect(),
            ..Annotations::default()
        };
        a.apply(&mut h);
        let back = Hello::decode(&h.encode())?;
        let (rest, got) = Annotations::split(&back.wire_props);
        prop_assert_eq!(rest, props);
        prop_assert_eq!(&got.precopy, &a.precopy);
        prop_assert!(got.unknown.is_empty());
        for o in &a.precopy {
            prop_assert!(back.compat_pinned.contains(&precopy_offer_entry(&o.device, o.instance)));
        }
    }
}

#[test]
fn malformed_precopy_offers_are_unknown_annotations_not_offers() {
    for (k, v) in [
        ("x-hello.precopy/accel", "accel-precopy:1"),
        ("x-hello.precopy/accel/x", "accel-precopy:1"),
        ("x-hello.precopy//0", "accel-precopy:1"),
        ("x-hello.precopy/accel/0", "accel-precopy"),
        ("x-hello.precopy/accel/0", ":1"),
        ("x-hello.precopy/accel/0", "accel-precopy:-1"),
    ] {
        let (_, a) = Annotations::split(&[(k.to_string(), v.to_string())]);
        assert!(a.precopy.is_empty(), "{k}={v} taken as an offer");
        assert_eq!(a.unknown, [k.to_string()], "{k}={v}");
    }
}

// ---------------------------------------------------------------------------------------
// Populated extents

/// Ascending, non-overlapping, non-empty extents inside a block of `pages` pages, from
/// gaps and lengths.
fn extents_in(pages: u64) -> impl Strategy<Value = Vec<(u64, u64)>> {
    vec((0..40u64, 1..40u64), 0..50).prop_map(move |steps| {
        let mut at = 0;
        let mut out = Vec::new();
        for (gap, len) in steps {
            let first = at + gap;
            if first + len > pages {
                break;
            }
            out.push((first, len));
            at = first + len;
        }
        out
    })
}

const EXTENT_BLOCKS: [u64; 2] = [1000, 64];

proptest! {
    #[test]
    fn populated_extents_round_trip_and_are_length_exact(
        block in 0..2u16,
        e in extents_in(64),
        extra in any::<u8>(),
    ) {
        let v = PopulatedExtents { block, extents: e };
        let b = v.encode();
        prop_assert!(b.len() <= FrameTag::PopulatedExtents.max_len() as usize);
        let decode = |b: &[u8]| PopulatedExtents::decode(b, &EXTENT_BLOCKS, &[0, 0]);
        length_exact(&v, &b, extra, decode)?;
    }

    #[test]
    fn populated_extents_mutations_never_yield_a_second_spelling(
        e in extents_in(1000),
        at in any::<Index>(),
        byte in any::<u8>(),
    ) {
        let b = PopulatedExtents { block: 0, extents: e }.encode();
        mutation_canonical(
            b,
            at,
            byte,
            |b| PopulatedExtents::decode(b, &EXTENT_BLOCKS, &[0, 0]),
            PopulatedExtents::encode,
        )?;
    }

    /// Whatever the bytes, an accepted frame names a block that exists and extents that
    /// lie inside it, ascend from where the block's last frame ended and do not overlap.
    #[test]
    fn accepted_populated_extents_lie_inside_their_block(
        bytes in vec(any::<u8>(), 0..200),
        ends in (0..1000u64, 0..64u64),
    ) {
        let ends = [ends.0, ends.1];
        if let Ok(v) = PopulatedExtents::decode(&bytes, &EXTENT_BLOCKS, &ends) {
            let pages = EXTENT_BLOCKS[v.block as usize];
            let mut next = ends[v.block as usize];
            for &(first, n) in &v.extents {
                prop_assert!(n > 0 && first >= next && first + n <= pages, "{:?}", v);
                next = first + n;
            }
        }
    }
}

#[test]
fn populated_extents_that_break_a_rule_are_refused_naming_it() {
    let enc = |block: u16, e: &[(u64, u64)]| {
        PopulatedExtents {
            block,
            extents: e.to_vec(),
        }
        .encode()
    };
    let decode = |b: &[u8], ends: &[u64]| PopulatedExtents::decode(b, &EXTENT_BLOCKS, ends);
    let cases: [(Vec<u8>, [u64; 2], &str); 6] = [
        (enc(2, &[(0, 1)]), [0, 0], "RAM block index"),
        (enc(1, &[(0, 65)]), [0, 0], "past the block's end"),
        (enc(1, &[(u64::MAX, 2)]), [0, 0], "past the block's end"),
        (enc(0, &[(5, 0)]), [0, 0], "empty extent"),
        (enc(0, &[(10, 5), (12, 1)]), [0, 0], "does not ascend"),
        (enc(0, &[(3, 1)]), [4, 0], "does not ascend"),
    ];
    for (b, ends, says) in cases {
        let err = decode(&b, &ends).unwrap_err().to_string();
        assert!(err.contains(says), "{err} (wanted {says})");
    }
    // A count over the frame's limit is refused before anything is read.
    let mut b = enc(0, &[]);
    b[2..6].copy_from_slice(&(PopulatedExtents::MAX_EXTENTS as u32 + 1).to_le_bytes());
    assert!(matches!(
        decode(&b, &[0, 0]),
        Err(WireError::TooLong { .. })
    ));
    // The largest frame fits its limit.
    let full = PopulatedExtents {
        block: 0,
        extents: (0..PopulatedExtents::MAX_EXTENTS as u64)
            .map(|i| (2 * i, 1))
            .collect(),
    };
    assert_eq!(
        full.encode().len(),
        FrameTag::PopulatedExtents.max_len() as usize
    );
}
