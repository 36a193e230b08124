use proptest::prelude::*;

use super::*;

// A UART as three releases saw it: v1 had the registers, v2 added the scratch register and
// the receive buffer, v3 the FIFO trigger level. The FIFO contents travel in a subsection
// only when the FIFO is enabled, and the modem-status extension only when its property is on.
const UART_FIELDS: &[FieldSchema] = &[
    FieldSchema {
        name: "ier",
        kind: FieldKind::U8,
        since: 1,
    },
    FieldSchema {
        name: "lcr",
        kind: FieldKind::U8,
        since: 1,
    },
    FieldSchema {
        name: "divisor",
        kind: FieldKind::U16,
        since: 1,
    },
    FieldSchema {
        name: "scr",
        kind: FieldKind::U8,
        since: 2,
    },
    FieldSchema {
        name: "rx",
        kind: FieldKind::Bytes { max_len: 16 },
        since: 2,
    },
    FieldSchema {
        name: "thre_pending",
        kind: FieldKind::Bool,
        since: 1,
    },
    FieldSchema {
        name: "fifo_trigger",
        kind: FieldKind::U32,
        since: 3,
    },
];

const UART_FIFO: &[FieldSchema] = &[
    FieldSchema {
        name: "level",
        kind: FieldKind::U8,
        since: 1,
    },
    FieldSchema {
        name: "data",
        kind: FieldKind::Array { len: 16 },
        since: 1,
    },
    FieldSchema {
        name: "timeout_ns",
        kind: FieldKind::U64,
        since: 2,
    },
];

const UART_MSR: &[FieldSchema] = &[FieldSchema {
    name: "msr",
    kind: FieldKind::U8,
    since: 1,
}];

const UART_SUBSECTIONS: &[SubsectionSchema] = &[
    SubsectionSchema {
        name: "uart/fifo",
        version: 2,
        fields: UART_FIFO,
        needed_when: "the guest enabled the FIFO (fcr bit 0)",
    },
    SubsectionSchema {
        name: "uart/msr",
        version: 1,
        fields: UART_MSR,
        needed_when: "property uart.x-msr=on",
    },
];

static UART: StateSchema = StateSchema {
    name: "uart",
    version: 3,
    min_version: 1,
    fields: UART_FIELDS,
    subsections: UART_SUBSECTIONS,
};

/// The same device as the release that wrote version 1 knew it.
static UART_V1: StateSchema = StateSchema {
    name: "uart",
    version: 1,
    min_version: 1,
    fields: &[
        FieldSchema {
            name: "ier",
            kind: FieldKind::U8,
            since: 1,
        },
        FieldSchema {
            name: "lcr",
            kind: FieldKind::U8,
            since: 1,
        },
        FieldSchema {
            name: "divisor",
            kind: FieldKind::U16,
            since: 1,
        },
        FieldSchema {
            name: "thre_pending",
            kind: FieldKind::Bool,
            since: 1,
        },
    ],
    subsections: &[SubsectionSchema {
        name: "uart/fifo",
        version: 1,
        fields: &[
            FieldSchema {
                name: "level",
                kind: FieldKind::U8,
                since: 1,
            },
            FieldSchema {
                name: "data",
                kind: FieldKind::Array { len: 16 },
                since: 1,
            },
        ],
        needed_when: "the guest enabled the FIFO (fcr bit 0)",
    }],
};

static DEMO: StateSchema = StateSchema {
    name: "demo",
    version: 2,
    min_version: 1,
    fields: &[
        FieldSchema {
            name: "a",
            kind: FieldKind::U16,
            since: 1,
        },
        FieldSchema {
            name: "b",
            kind: FieldKind::Bool,
            since: 1,
        },
        FieldSchema {
            name: "c",
            kind: FieldKind::Bytes { max_len: 8 },
            since: 2,
        },
    ],
    subsections: &[SubsectionSchema {
        name: "demo/x",
        version: 1,
        fields: &[FieldSchema {
            name: "x",
            kind: FieldKind::U32,
            since: 1,
        }],
        needed_when: "always in tests",
    }],
};

static EMPTY: StateSchema = StateSchema {
    name: "empty",
    version: 1,
    min_version: 1,
    fields: &[],
    subsections: &[],
};

static VCPU: StateSchema = StateSchema {
    name: "vcpu",
    version: 1,
    min_version: 1,
    fields: &[
        FieldSchema {
            name: "regs",
            kind: FieldKind::Array { len: 144 },
            since: 1,
        },
        FieldSchema {
            name: "sregs",
            kind: FieldKind::Array { len: 312 },
            since: 1,
        },
        FieldSchema {
            name: "msrs",
            kind: FieldKind::Bytes { max_len: 4096 },
            since: 1,
        },
        FieldSchema {
            name: "tsc",
            kind: FieldKind::U64,
            since: 1,
        },
    ],
    subsections: &[SubsectionSchema {
        name: "vcpu/xsave",
        version: 1,
        fields: &[FieldSchema {
            name: "area",
            kind: FieldKind::Array { len: 4096 },
            since: 1,
        }],
        needed_when: "the host supports XSAVE",
    }],
};

fn uart_state() -> DeviceState {
    DeviceState::new()
        .with("ier", Value::U8(0x0f))
        .with("lcr", Value::U8(0x03))
        .with("divisor", Value::U16(12))
        .with("scr", Value::U8(0x5a))
        .with("rx", Value::Bytes(b"hello".to_vec()))
        .with("thre_pending", Value::Bool(true))
        .with("fifo_trigger", Value::U32(8))
}

fn fifo() -> SubsectionState {
    SubsectionState::new("uart/fifo")
        .with("level", Value::U8(3))
        .with("data", Value::Bytes((0..16).collect()))
        .with("timeout_ns", Value::U64(4_000_000))
}

fn demo_state() -> DeviceState {
    DeviceState::new()
        .with("a", Value::U16(0x1234))
        .with("b", Value::Bool(true))
        .with("c", Value::Bytes(vec![0xaa, 0xbb]))
        .with_subsection(SubsectionState::new("demo/x").with("x", Value::U32(7)))
}

fn demo_bytes() -> Vec<u8> {
    let mut b = vec![
        0x34, 0x12, 0x01, 0x02, 0x00, 0x00, 0x00, 0xaa, 0xbb, 0x01, 0x06,
    ];
    b.extend_from_slice(b"demo/x");
    b.extend_from_slice(&[1, 0, 0, 0, 4, 0, 0, 0, 7, 0, 0, 0]);
    b
}

/// Sets `state.version` to what `decode` reports, for comparing round trips.
fn at(version: u32, mut state: DeviceState) -> DeviceState {
    state.version = version;
    state
}

fn field_error(e: StateError) -> (String, String, String) {
    match e {
        StateError::Field {
            device,
            field,
            reason,
        } => (device, field, reason),
        other => panic!("expected a field error, got {other:?}"),
    }
}

fn malformed_reason(e: StateError) -> String {
    match e {
        StateError::Malformed { device, reason } => {
            assert_eq!(device, "demo");
            reason
        }
        other => panic!("expected a malformed error, got {other:?}"),
    }
}

// ---- round trips -------------------------------------------------------------------------

#[test]
fn state_demo_encodes_to_the_documented_bytes() {
    let bytes = encode(&DEMO, &demo_state()).unwrap();
    assert_eq!(bytes, demo_bytes());
    assert_eq!(decode(&DEMO, 2, &bytes).unwrap(), at(2, demo_state()));
}

#[test]
fn state_round_trips_without_subsections() {
    let bytes = encode(&UART, &uart_state()).unwrap();
    assert_eq!(decode(&UART, 3, &bytes).unwrap(), at(3, uart_state()));
}

#[test]
fn state_round_trips_with_subsections_in_schema_order() {
    let msr = SubsectionState::new("uart/msr").with("msr", Value::U8(0xb0));
    // Given out of order: the encoding and the decoded state follow the schema.
    let given = uart_state()
        .with_subsection(msr.clone())
        .with_subsection(fifo());
    let bytes = encode(&UART, &given).unwrap();
    let decoded = decode(&UART, 3, &bytes).unwrap();
    assert_eq!(
        decoded,
        at(3, uart_state().with_subsection(fifo()).with_subsection(msr))
    );
    assert_eq!(
        decoded
            .subsection("uart/fifo")
            .unwrap()
            .get_u8("level")
            .unwrap(),
        3
    );
    assert!(decoded.subsection("uart/none").is_none());
}

#[test]
fn state_round_trips_empty_and_large_schemas() {
    let bytes = encode(&EMPTY, &DeviceState::new()).unwrap();
    assert_eq!(bytes, [0]);
    assert_eq!(
        decode(&EMPTY, 1, &bytes).unwrap(),
        at(1, DeviceState::new())
    );

    let vcpu = DeviceState::new()
        .with("regs", Value::Bytes(vec![1; 144]))
        .with("sregs", Value::Bytes(vec![2; 312]))
        .with("msrs", Value::Bytes(vec![3; 4096]))
        .with("tsc", Value::U64(u64::MAX))
        .with_subsection(
            SubsectionState::new("vcpu/xsave").with("area", Value::Bytes(vec![4; 4096])),
        );
    let bytes = encode(&VCPU, &vcpu).unwrap();
    assert_eq!(bytes.len() as u64, VCPU.max_encoded_len());
    assert_eq!(decode(&VCPU, 1, &bytes).unwrap(), at(1, vcpu));
}

#[test]
fn state_field_order_in_the_state_does_not_change_the_bytes() {
    let mut reversed = uart_state();
    reversed.fields.reverse();
    assert_eq!(
        encode(&UART, &reversed).unwrap(),
        encode(&UART, &uart_state()).unwrap()
    );
}

// ---- older versions ----------------------------------------------------------------------

#[test]
fn state_decoding_an_older_version_fills_new_fields_with_zeros() {
    let old = DeviceState::new()
        .with("ier", Value::U8(1))
        .with("lcr", Value::U8(2))
        .with("divisor", Value::U16(3))
        .with("thre_pending", Value::Bool(true))
        .with_subsection(
            SubsectionState::new("uart/fifo")
                .with("level", Value::U8(4))
                .with("data", Value::Bytes(vec![9; 16])),
        );
    let bytes = encode(&UART_V1, &old).unwrap();
    let loaded = decode(&UART, 1, &bytes).unwrap();
    assert_eq!(loaded.version, 1);
    assert_eq!(loaded.get_u8("ier").unwrap(), 1);
    assert_eq!(loaded.get_u16("divisor").unwrap(), 3);
    assert!(loaded.get_bool("thre_pending").unwrap());
    // Added by versions 2 and 3: present, zero, in schema order.
    assert_eq!(loaded.get_u8("scr").unwrap(), 0);
    assert_eq!(loaded.get_bytes("rx").unwrap(), b"");
    assert_eq!(loaded.get_u32("fifo_trigger").unwrap(), 0);
    let names: Vec<_> = loaded.fields.iter().map(|(n, _)| n.as_str()).collect();
    let schema_names: Vec<_> = UART.fields.iter().map(|f| f.name).collect();
    assert_eq!(names, schema_names);
    // The subsection came at its version 1: its version-2 field is zero.
    let fifo = loaded.subsection("uart/fifo").unwrap();
    assert_eq!(fifo.get_bytes("data").unwrap(), [9; 16]);
    assert_eq!(fifo.get_u64("timeout_ns").unwrap(), 0);
}

#[test]
fn state_version_two_stream_carries_exactly_the_version_two_fields() {
    // What a release at version 2 writes: no fifo_trigger.
    let mut v2 = vec![1, 2, 3, 0, 0x5a, 2, 0, 0, 0, b'h', b'i', 1];
    v2.push(0);
    let loaded = decode(&UART, 2, &v2).unwrap();
    assert_eq!(loaded.get_bytes("rx").unwrap(), b"hi");
    assert_eq!(loaded.get_u8("scr").unwrap(), 0x5a);
    assert_eq!(loaded.get_u32("fifo_trigger").unwrap(), 0);
    // The same bytes read as version 3 run out while reading fifo_trigger.
    let (_, field, _) = field_error(decode(&UART, 3, &v2).unwrap_err());
    assert_eq!(field, "fifo_trigger");
}

#[test]
fn state_zero_array_has_its_length() {
    assert_eq!(
        Value::zero(FieldKind::Array { len: 5 }),
        Value::Bytes(vec![0; 5])
    );
    assert_eq!(
        Value::zero(FieldKind::Bytes { max_len: 5 }),
        Value::Bytes(vec![])
    );
    assert_eq!(Value::zero(FieldKind::Bool), Value::Bool(false));
}

// ---- version checks ----------------------------------------------------------------------

#[test]
fn state_rejects_a_newer_version() {
    let bytes = encode(&UART, &uart_state()).unwrap();
    let e = decode(&UART, 4, &bytes).unwrap_err();
    assert_eq!(
        e,
        StateError::TooNew {
            device: "uart".into(),
            version: 4,
            max: 3
        }
    );
    assert_eq!(
        e.to_string(),
        "device uart: state version 4 is newer than this release can load (at most 3)"
    );
    assert!(matches!(
        decode(&UART, u32::MAX, &bytes),
        Err(StateError::TooNew { .. })
    ));
}

#[test]
fn state_rejects_an_older_version_than_the_minimum() {
    let schema = StateSchema {
        min_version: 2,
        ..UART
    };
    let e = decode(&schema, 1, &[]).unwrap_err();
    assert_eq!(
        e,
        StateError::TooOld {
            device: "uart".into(),
            version: 1,
            min: 2
        }
    );
    assert!(e.to_string().contains("device uart"));
}

// ---- encode rejections -------------------------------------------------------------------

#[test]
fn state_encode_rejects_a_missing_field() {
    let mut state = uart_state();
    state.fields.retain(|(n, _)| n != "scr");
    let (device, field, reason) = field_error(encode(&UART, &state).unwrap_err());
    assert_eq!((device.as_str(), field.as_str()), ("uart", "scr"));
    assert!(reason.contains("missing"), "{reason}");
}

#[test]
fn state_encode_rejects_a_field_given_twice() {
    let state = uart_state().with("ier", Value::U8(0));
    let (_, field, reason) = field_error(encode(&UART, &state).unwrap_err());
    assert_eq!(field, "ier");
    assert!(reason.contains("more than once"), "{reason}");
}

#[test]
fn state_encode_rejects_an_unknown_field() {
    let state = uart_state().with("mcr", Value::U8(0));
    let (_, field, reason) = field_error(encode(&UART, &state).unwrap_err());
    assert_eq!(field, "mcr");
    assert!(reason.contains("not a field of version 3"), "{reason}");
}

#[test]
fn state_encode_rejects_the_wrong_kind() {
    let mut state = uart_state();
    state.fields[2].1 = Value::U32(12);
    let e = encode(&UART, &state).unwrap_err();
    assert_eq!(
        e.to_string(),
        "device uart: field divisor: holds u32, the schema says u16"
    );
    let mut state = uart_state();
    state.fields[0].1 = Value::Bytes(vec![1]);
    assert_eq!(field_error(encode(&UART, &state).unwrap_err()).1, "ier");
}

#[test]
fn state_encode_rejects_bytes_over_max_len_and_arrays_of_the_wrong_length() {
    let mut state = uart_state();
    state.fields[4].1 = Value::Bytes(vec![0; 17]);
    let (_, field, reason) = field_error(encode(&UART, &state).unwrap_err());
    assert_eq!(field, "rx");
    assert!(reason.contains("17 bytes"), "{reason}");

    for len in [15, 17, 0] {
        let sub = SubsectionState::new("uart/fifo")
            .with("level", Value::U8(0))
            .with("data", Value::Bytes(vec![0; len]))
            .with("timeout_ns", Value::U64(0));
        let (_, field, reason) =
            field_error(encode(&UART, &uart_state().with_subsection(sub)).unwrap_err());
        assert_eq!(field, "uart/fifo/data");
        assert!(reason.contains("exactly 16"), "{reason}");
    }
}

#[test]
fn state_encode_rejects_unknown_duplicate_and_incomplete_subsections() {
    let e = encode(
        &UART,
        &uart_state().with_subsection(SubsectionState::new("uart/dma")),
    )
    .unwrap_err();
    assert_eq!(
        e,
        StateError::UnknownSubsection {
            device: "uart".into(),
            subsection: "uart/dma".into()
        }
    );

    let e = encode(
        &UART,
        &uart_state().with_subsection(fifo()).with_subsection(fifo()),
    )
    .unwrap_err();
    assert_eq!(
        e,
        StateError::DuplicateSubsection {
            device: "uart".into(),
            subsection: "uart/fifo".into()
        }
    );

    let mut partial = fifo();
    partial.fields.pop();
    let (_, field, _) =
        field_error(encode(&UART, &uart_state().with_subsection(partial)).unwrap_err());
    assert_eq!(field, "uart/fifo/timeout_ns");

    let extra = fifo().with("msr", Value::U8(1));
    let (_, field, _) =
        field_error(encode(&UART, &uart_state().with_subsection(extra)).unwrap_err());
    assert_eq!(field, "uart/fifo/msr");
}

// ---- decode rejections -------------------------------------------------------------------

#[test]
fn state_decode_rejects_a_bool_that_is_not_0_or_1() {
    let mut bytes = demo_bytes();
    bytes[2] = 2;
    let (device, field, reason) = field_error(decode(&DEMO, 2, &bytes).unwrap_err());
    assert_eq!((device.as_str(), field.as_str()), ("demo", "b"));
    assert!(reason.contains("offset 2"), "{reason}");
}

#[test]
fn state_decode_rejects_bytes_longer_than_max_len() {
    let mut bytes = demo_bytes();
    bytes[3] = 9;
    let (_, field, reason) = field_error(decode(&DEMO, 2, &bytes).unwrap_err());
    assert_eq!(field, "c");
    assert!(
        reason.contains("length 9 at offset 3 is above its maximum of 8"),
        "{reason}"
    );
}

#[test]
fn state_decode_checks_a_length_against_what_remains_before_allocating() {
    static BIG: StateSchema = StateSchema {
        name: "big",
        version: 1,
        min_version: 1,
        fields: &[FieldSchema {
            name: "blob",
            kind: FieldKind::Bytes { max_len: u32::MAX },
            since: 1,
        }],
        subsections: &[],
    };
    // Claims 4 GiB - 1, holds 3 bytes: refused without reserving the claimed size.
    let bytes = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    let (device, field, reason) = field_error(decode(&BIG, 1, &bytes).unwrap_err());
    assert_eq!((device.as_str(), field.as_str()), ("big", "blob"));
    assert!(reason.contains("3 remain"), "{reason}");
    assert_eq!(BIG.max_encoded_len(), 4 + u64::from(u32::MAX) + 1);
}

#[test]
fn state_decode_rejects_a_short_array() {
    let state = DeviceState::new()
        .with("regs", Value::Bytes(vec![0; 144]))
        .with("sregs", Value::Bytes(vec![0; 312]))
        .with("msrs", Value::Bytes(vec![]))
        .with("tsc", Value::U64(0));
    let bytes = encode(&VCPU, &state).unwrap();
    let (_, field, _) = field_error(decode(&VCPU, 1, &bytes[..200]).unwrap_err());
    assert_eq!(field, "sregs");
}

#[test]
fn state_decode_rejects_an_unknown_subsection() {
    let mut bytes = demo_bytes();
    // The name "demo/x" sits at offsets 11..17.
    bytes[16] = b'y';
    let e = decode(&DEMO, 2, &bytes).unwrap_err();
    assert_eq!(
        e,
        StateError::UnknownSubsection {
            device: "demo".into(),
            subsection: "demo/y".into()
        }
    );
    assert_eq!(e.to_string(), "device demo: unknown subsection \"demo/y\"");
}

#[test]
fn state_decode_rejects_a_subsection_newer_than_known() {
    let mut bytes = demo_bytes();
    let version_at = bytes.len() - 12;
    bytes[version_at] = 2;
    let e = decode(&DEMO, 2, &bytes).unwrap_err();
    assert_eq!(
        e,
        StateError::SubsectionTooNew {
            device: "demo".into(),
            subsection: "demo/x".into(),
            version: 2,
            max: 1
        }
    );
    assert!(e
        .to_string()
        .contains("device demo: subsection \"demo/x\" version 2"));
}

#[test]
fn state_decode_rejects_a_duplicate_subsection() {
    let mut bytes = demo_bytes();
    let sub = bytes[10..].to_vec();
    bytes[9] = 2;
    bytes.extend_from_slice(&sub);
    let e = decode(&DEMO, 2, &bytes).unwrap_err();
    assert_eq!(
        e,
        StateError::DuplicateSubsection {
            device: "demo".into(),
            subsection: "demo/x".into()
        }
    );
}

#[test]
fn state_decode_rejects_a_subsection_name_that_is_not_utf8() {
    let mut bytes = demo_bytes();
    bytes[11] = 0xff;
    let reason = malformed_reason(decode(&DEMO, 2, &bytes).unwrap_err());
    assert!(reason.contains("offset 11 is not UTF-8"), "{reason}");
}

#[test]
fn state_decode_rejects_a_payload_length_past_the_end() {
    let mut bytes = demo_bytes();
    let len_at = bytes.len() - 8;
    bytes[len_at..len_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let reason = malformed_reason(decode(&DEMO, 2, &bytes).unwrap_err());
    assert!(
        reason.contains("claims 4294967295 payload bytes at offset 25, only 4 remain"),
        "{reason}"
    );
}

#[test]
fn state_decode_rejects_bytes_left_in_a_subsection_payload() {
    let mut bytes = demo_bytes();
    let len_at = bytes.len() - 8;
    bytes[len_at] = 5;
    bytes.push(0);
    let reason = malformed_reason(decode(&DEMO, 2, &bytes).unwrap_err());
    assert!(
        reason.contains("\"demo/x\": 1 bytes left after its fields at offset 29"),
        "{reason}"
    );
}

#[test]
fn state_decode_rejects_a_subsection_payload_too_short_for_its_fields() {
    let mut bytes = demo_bytes();
    let len_at = bytes.len() - 8;
    bytes[len_at] = 3;
    bytes.pop();
    // The field runs into the payload's end even though the buffer had more before.
    let (_, field, reason) = field_error(decode(&DEMO, 2, &bytes).unwrap_err());
    assert_eq!(field, "demo/x/x");
    assert!(reason.contains("offset 25"), "{reason}");
    bytes.push(0);
    assert!(decode(&DEMO, 2, &bytes).is_err());
}

#[test]
fn state_decode_rejects_trailing_bytes() {
    let mut bytes = demo_bytes();
    let end = bytes.len();
    bytes.extend_from_slice(&[0, 0]);
    let e = decode(&DEMO, 2, &bytes).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("device demo: malformed state: 2 trailing bytes at offset {end}")
    );
}

#[test]
fn state_decode_rejects_a_missing_subsection_count() {
    let reason = malformed_reason(decode(&DEMO, 2, &demo_bytes()[..9]).unwrap_err());
    assert!(
        reason.contains("truncated at offset 9: the subsection count"),
        "{reason}"
    );
}

#[test]
fn state_decode_rejects_every_truncation_of_a_valid_encoding() {
    for (schema, state) in [
        (&DEMO, demo_state()),
        (&UART, uart_state().with_subsection(fifo())),
        (&EMPTY, DeviceState::new()),
    ] {
        let bytes = encode(schema, &state).unwrap();
        for len in 0..bytes.len() {
            assert!(
                decode(schema, schema.version, &bytes[..len]).is_err(),
                "{} at {len}",
                schema.name
            );
        }
    }
}

#[test]
fn state_tolerates_a_missing_optional_subsection() {
    let bytes = encode(&UART, &uart_state()).unwrap();
    assert!(decode(&UART, 3, &bytes).unwrap().subsections.is_empty());
}

// ---- schema ------------------------------------------------------------------------------

#[test]
fn state_max_encoded_len_is_exact_for_a_full_state() {
    // a 2 + b 1 + c (4 + 8) + count 1 + subsection (1 + 6 + 4 + 4 + 4).
    assert_eq!(DEMO.max_encoded_len(), 16 + 19);
    let full = demo_state();
    let mut c8 = full.clone();
    c8.fields[2].1 = Value::Bytes(vec![0; 8]);
    assert_eq!(
        encode(&DEMO, &c8).unwrap().len() as u64,
        DEMO.max_encoded_len()
    );
    assert!((encode(&DEMO, &full).unwrap().len() as u64) < DEMO.max_encoded_len());
    assert_eq!(EMPTY.max_encoded_len(), 1);
}

#[test]
fn state_schemas_in_these_tests_are_valid() {
    for schema in [&UART, &UART_V1, &DEMO, &EMPTY, &VCPU] {
        schema.validate().unwrap();
    }
}

#[test]
fn state_rejects_inconsistent_schemas() {
    fn reason(schema: StateSchema) -> String {
        let leaked: &'static StateSchema = Box::leak(Box::new(schema));
        let e = leaked.validate().unwrap_err();
        // encode and decode refuse it the same way.
        assert_eq!(encode(leaked, &DeviceState::new()).unwrap_err(), e);
        assert_eq!(decode(leaked, leaked.version, &[0]).unwrap_err(), e);
        match e {
            StateError::Schema { reason, .. } => reason,
            other => panic!("expected a schema error, got {other:?}"),
        }
    }
    const F: FieldSchema = FieldSchema {
        name: "f",
        kind: FieldKind::U8,
        since: 1,
    };
    const SUB: SubsectionSchema = SubsectionSchema {
        name: "s",
        version: 1,
        fields: &[],
        needed_when: "",
    };
    let base = StateSchema {
        name: "d",
        version: 2,
        min_version: 1,
        fields: &[],
        subsections: &[],
    };

    assert!(reason(StateSchema {
        min_version: 3,
        ..base
    })
    .contains("min_version 3"));
    assert!(reason(StateSchema {
        fields: &[F, F],
        ..base
    })
    .contains("field f twice"));
    assert!(reason(StateSchema {
        fields: &[FieldSchema { since: 3, ..F }],
        ..base
    })
    .contains("since version 3"));
    assert!(reason(StateSchema {
        subsections: &[SUB, SUB],
        ..base
    })
    .contains("declared twice"));
    assert!(reason(StateSchema {
        subsections: &[SubsectionSchema { name: "", ..SUB }],
        ..base
    })
    .contains("1 to 255 bytes"));
    let long: &'static str = "n".repeat(256).leak();
    let subs: &'static [SubsectionSchema] = vec![SubsectionSchema { name: long, ..SUB }].leak();
    assert!(reason(StateSchema {
        subsections: subs,
        ..base
    })
    .contains("1 to 255 bytes"));
    let subs: &'static [SubsectionSchema] = (0..256)
        .map(|i| SubsectionSchema {
            name: format!("s{i}").leak(),
            ..SUB
        })
        .collect::<Vec<_>>()
        .leak();
    assert!(reason(StateSchema {
        subsections: subs,
        ..base
    })
    .contains("256 subsections"));
    let huge = SubsectionSchema {
        fields: &[FieldSchema {
            kind: FieldKind::Bytes { max_len: u32::MAX },
            ..F
        }],
        ..SUB
    };
    let subs: &'static [SubsectionSchema] = vec![huge].leak();
    assert!(reason(StateSchema {
        subsections: subs,
        ..base
    })
    .contains("u32 length"));
    let sub_field_too_new = SubsectionSchema {
        fields: &[FieldSchema { since: 2, ..F }],
        ..SUB
    };
    let subs: &'static [SubsectionSchema] = vec![sub_field_too_new].leak();
    assert!(reason(StateSchema {
        subsections: subs,
        ..base
    })
    .contains("subsection \"s\""));
}

// ---- getters -----------------------------------------------------------------------------

#[test]
fn state_typed_getters_return_values_and_name_the_field_on_error() {
    let state = uart_state().with_subsection(fifo());
    assert_eq!(state.get_u8("ier").unwrap(), 0x0f);
    assert_eq!(state.get_u16("divisor").unwrap(), 12);
    assert_eq!(state.get_u32("fifo_trigger").unwrap(), 8);
    assert!(state.get_bool("thre_pending").unwrap());
    assert_eq!(state.get_bytes("rx").unwrap(), b"hello");
    assert_eq!(
        state
            .subsection("uart/fifo")
            .unwrap()
            .get_u64("timeout_ns")
            .unwrap(),
        4_000_000
    );

    let e = state.get_u16("ier").unwrap_err();
    assert_eq!(
        e,
        StateError::WrongKind {
            field: "ier".into(),
            expected: "u16",
            found: "u8"
        }
    );
    assert_eq!(e.to_string(), "field ier holds u8, not u16");
    assert_eq!(
        state.get_u64("nope").unwrap_err().to_string(),
        "no field nope in the state"
    );
    assert!(matches!(
        state.get_bytes("scr"),
        Err(StateError::WrongKind { .. })
    ));
    assert!(matches!(
        state.get_bool("ier"),
        Err(StateError::WrongKind { .. })
    ));
    assert!(matches!(
        state.get_u32("ier"),
        Err(StateError::WrongKind { .. })
    ));
    assert!(matches!(
        state.get_u8("rx"),
        Err(StateError::WrongKind { .. })
    ));
    let e = state
        .subsection("uart/fifo")
        .unwrap()
        .get_u8("data")
        .unwrap_err();
    assert_eq!(e.to_string(), "field uart/fifo/data holds bytes, not u8");
}

// ---- properties --------------------------------------------------------------------------

fn leak_fields(fields: Vec<FieldSchema>) -> &'static [FieldSchema] {
    fields.leak()
}

fn kind_strategy() -> impl Strategy<Value = FieldKind> {
    prop_oneof![
        Just(FieldKind::U8),
        Just(FieldKind::U16),
        Just(FieldKind::U32),
        Just(FieldKind::U64),
        Just(FieldKind::Bool),
        (0u32..24).prop_map(|max_len| FieldKind::Bytes { max_len }),
        (0u32..24).prop_map(|len| FieldKind::Array { len }),
    ]
}

fn fields_strategy(version: u32) -> impl Strategy<Value = &'static [FieldSchema]> {
    prop::collection::vec((kind_strategy(), 0..=version), 0..8).prop_map(|fields| {
        leak_fields(
            fields
                .into_iter()
                .enumerate()
                .map(|(i, (kind, since))| FieldSchema {
                    name: format!("f{i}").leak(),
                    kind,
                    since,
                })
                .collect(),
        )
    })
}

fn subsection_strategy() -> impl Strategy<Value = (u32, &'static [FieldSchema])> {
    (0u32..4).prop_flat_map(|version| (Just(version), fields_strategy(version)))
}

fn schema_strategy() -> impl Strategy<Value = &'static StateSchema> {
    (0u32..5)
        .prop_flat_map(|version| {
            (
                Just(version),
                0..=version,
                fields_strategy(version),
                prop::collection::vec(subsection_strategy(), 0..4),
            )
        })
        .prop_map(|(version, min_version, fields, subs)| {
            let subsections: Vec<SubsectionSchema> = subs
                .into_iter()
                .enumerate()
                .map(|(i, (version, fields))| SubsectionSchema {
                    name: format!("dev/s{i}").leak(),
                    version,
                    fields,
                    needed_when: "random",
                })
                .collect();
            &*Box::leak(Box::new(StateSchema {
                name: "dev",
                version,
                min_version,
                fields,
                subsections: subsections.leak(),
            }))
        })
}

fn value_strategy(kind: FieldKind) -> BoxedStrategy<Value> {
    match kind {
        FieldKind::U8 => any::<u8>().prop_map(Value::U8).boxed(),
        FieldKind::U16 => any::<u16>().prop_map(Value::U16).boxed(),
        FieldKind::U32 => any::<u32>().prop_map(Value::U32).boxed(),
        FieldKind::U64 => any::<u64>().prop_map(Value::U64).boxed(),
        FieldKind::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
        FieldKind::Bytes { max_len } => prop::collection::vec(any::<u8>(), 0..=max_len as usize)
            .prop_map(Value::Bytes)
            .boxed(),
        FieldKind::Array { len } => prop::collection::vec(any::<u8>(), len as usize)
            .prop_map(Value::Bytes)
            .boxed(),
    }
}

fn values_strategy(
    fields: &'static [FieldSchema],
    version: u32,
) -> BoxedStrategy<Vec<(String, Value)>> {
    fields
        .iter()
        .filter(|f| f.since <= version)
        .map(|f| {
            value_strategy(f.kind)
                .prop_map(move |v| (f.name.to_string(), v))
                .boxed()
        })
        .collect::<Vec<_>>()
        .boxed()
}

/// A schema and a state that conforms to it, in schema order, at the schema's version.
fn schema_and_state() -> impl Strategy<Value = (&'static StateSchema, DeviceState)> {
    schema_strategy().prop_flat_map(|schema| {
        let subsections: Vec<_> = schema
            .subsections
            .iter()
            .map(|s| {
                prop::option::of(
                    values_strategy(s.fields, s.version).prop_map(move |fields| SubsectionState {
                        name: s.name.into(),
                        fields,
                    }),
                )
            })
            .collect();
        (
            Just(schema),
            values_strategy(schema.fields, schema.version),
            subsections,
        )
            .prop_map(|(schema, fields, subsections)| {
                (
                    schema,
                    DeviceState {
                        version: schema.version,
                        fields,
                        subsections: subsections.into_iter().flatten().collect(),
                    },
                )
            })
    })
}

proptest! {
    #[test]
    fn state_prop_round_trips((schema, state) in schema_and_state()) {
        let bytes = encode(schema, &state).unwrap();
        prop_assert!(bytes.len() as u64 <= schema.max_encoded_len());
        prop_assert_eq!(decode(schema, schema.version, &bytes).unwrap(), state);
    }

    #[test]
    fn state_prop_older_release_streams_load_with_zeros(
        (schema, state) in schema_and_state(),
        pick in any::<prop::sample::Index>(),
    ) {
        // The release that wrote `old` knew only the fields up to it.
        let old = schema.min_version + pick.index((schema.version - schema.min_version + 1) as usize) as u32;
        let old_schema: &'static StateSchema = Box::leak(Box::new(StateSchema {
            version: old,
            min_version: schema.min_version,
            fields: leak_fields(schema.fields_at(old).copied().collect()),
            ..*schema
        }));
        let mut old_state = state.clone();
        old_state.fields.retain(|(name, _)| {
            schema.fields.iter().any(|f| f.name == name && f.since <= old)
        });
        let bytes = encode(old_schema, &old_state).unwrap();
        let loaded = decode(schema, old, &bytes).unwrap();
        prop_assert_eq!(loaded.version, old);
        prop_assert_eq!(loaded.fields.len(), schema.fields.len());
        for (field, (name, value)) in schema.fields.iter().zip(&loaded.fields) {
            prop_assert_eq!(field.name, name.as_str());
            if field.since <= old {
                prop_assert_eq!(Some(value), state.get(name));
            } else {
                prop_assert_eq!(value, &Value::zero(field.kind));
            }
        }
        prop_assert_eq!(&loaded.subsections, &state.subsections);
    }

    #[test]
    fn state_prop_every_truncation_errors((schema, state) in schema_and_state()) {
        let bytes = encode(schema, &state).unwrap();
        for len in 0..bytes.len() {
            prop_assert!(decode(schema, schema.version, &bytes[..len]).is_err());
        }
    }

    #[test]
    fn state_prop_random_bytes_never_panic(
        version in 0u32..6,
        bytes in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let _ = decode(&UART, version, &bytes);
        let _ = decode(&DEMO, version, &bytes);
        let _ = decode(&VCPU, version, &bytes);
    }

    #[test]
    fn state_prop_mutated_encodings_never_panic(
        (schema, state) in schema_and_state(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        version in 0u32..6,
    ) {
        let mut bytes = encode(schema, &state).unwrap();
        if !bytes.is_empty() {
            for (at, byte) in flips {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
        }
        if let Ok(mut decoded) = decode(schema, version, &bytes) {
            // Whatever loads is a valid state of the schema, and at the schema's version
            // re-encodes to the same bytes (once subsections are put in schema order).
            let again = encode(schema, &decoded).unwrap();
            if version == schema.version {
                let order = |s: &SubsectionState| schema.subsections.iter().position(|x| x.name == s.name);
                let in_order = decoded.subsections.windows(2).all(|w| order(&w[0]) < order(&w[1]));
                if in_order {
                    prop_assert_eq!(again, bytes);
                } else {
                    decoded.subsections.sort_by_key(order);
                    prop_assert_eq!(decode(schema, version, &again).unwrap(), decoded);
                }
            }
        }
    }
}

/// `schema` without subsections, and `state` without any: what streams.
fn streamable(
    schema: &'static StateSchema,
    state: &DeviceState,
) -> (&'static StateSchema, DeviceState) {
    let schema: &'static StateSchema = Box::leak(Box::new(StateSchema {
        subsections: &[],
        ..*schema
    }));
    let state = DeviceState {
        subsections: Vec::new(),
        ..state.clone()
    };
    (schema, state)
}

/// Writes `state` field by field, its `Bytes` fields in chunks of `chunk` bytes.
fn stream_out(
    schema: &'static StateSchema,
    state: &DeviceState,
    chunk: usize,
) -> Result<Vec<u8>, StateError> {
    save_to_vec(schema, |w| {
        let lens: Vec<(&str, u64)> = schema
            .fields_at(schema.version)
            .filter(|f| matches!(f.kind, FieldKind::Bytes { .. }))
            .map(|f| (f.name, state.get_bytes(f.name).unwrap().len() as u64))
            .collect();
        w.begin(&lens)?;
        for f in schema.fields_at(schema.version) {
            match (f.kind, state.get(f.name).unwrap()) {
                (FieldKind::Bytes { .. }, Value::Bytes(b)) => {
                    w.open_bytes(f.name)?;
                    for piece in b.chunks(chunk) {
                        w.chunk(piece)?;
                    }
                }
                (_, v) => w.field(f.name, v)?,
            }
        }
        w.finish()
    })
}

/// Reads a state field by field, `Bytes` fields in chunks of `chunk` bytes.
fn stream_in(
    schema: &'static StateSchema,
    version: u32,
    bytes: &[u8],
    chunk: usize,
) -> Result<DeviceState, StateError> {
    let mut fields = Vec::new();
    load_from_slice(schema, version, bytes, |r| {
        for f in schema.fields {
            let value = match f.kind {
                FieldKind::Bytes { .. } => {
                    let mut b = vec![0u8; r.open_bytes(f.name)? as usize];
                    for piece in b.chunks_mut(chunk) {
                        r.chunk(piece)?;
                    }
                    Value::Bytes(b)
                }
                _ => r.field(f.name)?,
            };
            fields.push((f.name.to_string(), value));
        }
        r.finish()
    })?;
    Ok(DeviceState {
        version,
        fields,
        subsections: Vec::new(),
    })
}

proptest! {
    #[test]
    fn state_prop_streamed_state_is_the_encoded_state(
        (schema, state) in schema_and_state(),
        chunk in 1usize..48,
    ) {
        let (schema, state) = streamable(schema, &state);
        let whole = encode(schema, &state).unwrap();
        prop_assert_eq!(&stream_out(schema, &state, chunk).unwrap(), &whole);
        prop_assert_eq!(stream_in(schema, schema.version, &whole, chunk).unwrap(), state.clone());
        // Whole through the writer and the reader too.
        let via = save_to_vec(schema, |w| w.write_state(&state)).unwrap();
        prop_assert_eq!(&via, &whole);
        let mut got = None;
        load_from_slice(schema, schema.version, &whole, |r| {
            got = Some(r.read_state()?);
            Ok::<_, StateError>(())
        }).unwrap();
        prop_assert_eq!(got.unwrap(), state);
    }

    #[test]
    fn state_prop_streamed_reader_takes_and_refuses_what_decode_does(
        (schema, state) in schema_and_state(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
        version in 0u32..6,
        chunk in 1usize..48,
    ) {
        let (schema, state) = streamable(schema, &state);
        let mut bytes = encode(schema, &state).unwrap();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        for b in [&bytes[..], &bytes[..cut.index(bytes.len())]] {
            match (decode(schema, version, b), stream_in(schema, version, b, chunk)) {
                (Ok(d), Ok(s)) => prop_assert_eq!(d, s),
                (Err(_), Err(_)) => {}
                (d, s) => prop_assert!(false, "decode {:?} but streamed {:?}", d, s),
            }
        }
    }
}

#[test]
fn state_stream_refuses_misuse_by_name() {
    let (schema, state) = streamable(&DEMO, &demo_state());
    let e = save_to_vec(schema, |w| w.begin(&[])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "device demo: field c: no length given for it"
    );
    let e = save_to_vec(schema, |w| w.begin(&[("c", 9)])).unwrap_err();
    assert!(e.to_string().contains("more than its maximum of 8"), "{e}");
    // A schema with subsections streams only whole.
    let e = save_to_vec(&DEMO, |w| w.begin(&[("c", 2)])).unwrap_err();
    assert!(e.to_string().contains("cannot stream"), "{e}");
    // Out of order, after a begin with every length.
    let lens: Vec<(&str, u64)> = schema
        .fields_at(schema.version)
        .filter(|f| matches!(f.kind, FieldKind::Bytes { .. }))
        .map(|f| (f.name, state.get_bytes(f.name).unwrap().len() as u64))
        .collect();
    let fields: Vec<_> = schema.fields_at(schema.version).collect();
    let e = save_to_vec(schema, |w| {
        w.begin(&lens)?;
        w.field(fields[1].name, state.get(fields[1].name).unwrap())
    })
    .unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("the next field is {}", fields[0].name)),
        "{e}"
    );
    // Returning before the end is refused.
    let e = save_to_vec(schema, |w| w.begin(&lens)).unwrap_err();
    assert!(
        e.to_string().contains("before the whole state was written"),
        "{e}"
    );
    let whole = encode(schema, &state).unwrap();
    let e = load_from_slice(schema, schema.version, &whole, |r| {
        r.field(fields[0].name).map(|_| ())
    })
    .unwrap_err();
    assert!(
        e.to_string().contains("before the whole state was read"),
        "{e}"
    );
    // One byte too many is refused at the end.
    let mut long = whole.clone();
    long.push(0);
    let e = stream_in(schema, schema.version, &long, 7).unwrap_err();
    assert!(e.to_string().contains("trailing"), "{e}");
}
