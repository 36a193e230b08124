//! Decodes arbitrary bytes as the state of a fixed device, the way a destination decodes a
//! device-state section from the stream. The first byte picks the version (modulo a range
//! that covers too old, every loadable version and too new); the rest is the state.
//!
//! Beyond "no panic", whatever decodes must be a state the schema accepts: it re-encodes,
//! within `max_encoded_len`, and at the schema's version decodes back to itself.

#![no_main]

use ferry_migration::state::{
    decode, encode, FieldKind, FieldSchema, StateSchema, SubsectionSchema,
};
use libfuzzer_sys::fuzz_target;

static UART: StateSchema = StateSchema {
    name: "uart",
    version: 3,
    min_version: 1,
    fields: &[
        FieldSchema {
            name: "ier",
            kind: FieldKind::U8,
            since: 1,
        },
        FieldSchema {
            name: "divisor",
            kind: FieldKind::U16,
            since: 1,
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
        FieldSchema {
            name: "id",
            kind: FieldKind::Array { len: 4 },
            since: 1,
        },
        FieldSchema {
            name: "tsc",
            kind: FieldKind::U64,
            since: 2,
        },
    ],
    subsections: &[
        SubsectionSchema {
            name: "uart/fifo",
            version: 2,
            fields: &[
                FieldSchema {
                    name: "level",
                    kind: FieldKind::U8,
                    since: 1,
                },
                FieldSchema {
                    name: "data",
                    kind: FieldKind::Array { len: 8 },
                    since: 1,
                },
                FieldSchema {
                    name: "timeout_ns",
                    kind: FieldKind::U64,
                    since: 2,
                },
            ],
            needed_when: "the guest enabled the FIFO",
        },
        SubsectionSchema {
            name: "uart/msr",
            version: 1,
            fields: &[
                FieldSchema {
                    name: "msr",
                    kind: FieldKind::U8,
                    since: 1,
                },
                FieldSchema {
                    name: "extra",
                    kind: FieldKind::Bytes { max_len: 4 },
                    since: 1,
                },
            ],
            needed_when: "property uart.x-msr=on",
        },
    ],
};

fuzz_target!(|data: &[u8]| {
    let Some((&first, bytes)) = data.split_first() else {
        return;
    };
    let version = u32::from(first) % (UART.version + 2);
    let Ok(mut state) = decode(&UART, version, bytes) else {
        return;
    };
    // Zero-filled fields make any loaded state complete at the schema's own version.
    let again = encode(&UART, &state).expect("a decoded state re-encodes");
    assert!(again.len() as u64 <= UART.max_encoded_len());
    if version == UART.version {
        state
            .subsections
            .sort_by_key(|s| UART.subsections.iter().position(|x| x.name == s.name));
        assert_eq!(
            decode(&UART, version, &again).expect("a re-encoding decodes"),
            state
        );
    }
});
