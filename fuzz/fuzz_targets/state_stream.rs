//! Reads arbitrary bytes as a streamed device state, field by field and its large bytes
//! field in chunks, the way a device with memory of its own loads from the migration
//! stream. The first byte picks the version, the second the chunk size; the rest is the
//! state.
//!
//! Beyond "no panic": the streamed reader takes exactly what `decode` takes, with the
//! same values, and refuses what it refuses.

#![no_main]

use ferry_migration::state::{
    decode, load_from_slice, DeviceState, FieldKind, FieldSchema, StateError, StateSchema, Value,
};
use libfuzzer_sys::fuzz_target;

static DEVICE: StateSchema = StateSchema {
    name: "dev",
    version: 3,
    min_version: 1,
    fields: &[
        FieldSchema {
            name: "size",
            kind: FieldKind::U64,
            since: 1,
        },
        FieldSchema {
            name: "on",
            kind: FieldKind::Bool,
            since: 2,
        },
        FieldSchema {
            name: "memory",
            kind: FieldKind::Bytes { max_len: 1 << 20 },
            since: 1,
        },
        FieldSchema {
            name: "regs",
            kind: FieldKind::Array { len: 6 },
            since: 1,
        },
        FieldSchema {
            name: "note",
            kind: FieldKind::Bytes { max_len: 16 },
            since: 3,
        },
        FieldSchema {
            name: "checksum",
            kind: FieldKind::U64,
            since: 1,
        },
    ],
    subsections: &[],
};

fn streamed(version: u32, chunk: usize, bytes: &[u8]) -> Result<DeviceState, StateError> {
    let mut fields = Vec::new();
    load_from_slice(&DEVICE, version, bytes, |r| {
        for f in DEVICE.fields {
            let value = if f.name == "memory" {
                let mut b = vec![0u8; r.open_bytes(f.name)? as usize];
                for piece in b.chunks_mut(chunk) {
                    r.chunk(piece)?;
                }
                Value::Bytes(b)
            } else {
                r.field(f.name)?
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

fuzz_target!(|data: &[u8]| {
    let [first, second, bytes @ ..] = data else {
        return;
    };
    let version = u32::from(*first) % (DEVICE.version + 2);
    let chunk = usize::from(*second).max(1);
    match (decode(&DEVICE, version, bytes), streamed(version, chunk, bytes)) {
        (Ok(d), Ok(s)) => assert_eq!(d, s),
        (Err(_), Err(_)) => {}
        (d, s) => panic!("decode {d:?} but streamed {s:?}"),
    }
});
