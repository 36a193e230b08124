//! Tests of the compat model on a small registry that mirrors the worked example of the module
//! documentation: three machine types, one property changed in two releases. Value parsing and
//! `-global` text are tested next to their code, in `value.rs` and `global.rs`.

use super::*;

const ZERO_PAGE_WORDS: &[&str] = &["none", "legacy", "multifd"];

static MIGRATION: DriverDef = DriverDef {
    name: "migration",
    doc: "the migration pseudo-device",
    props: &[
        PropDef {
            name: "multifd-flush-after-each-section",
            kind: PropKind::Bool,
            default: "off",
            wire: true,
            doc: "sync multifd channels after every section instead of once per pass",
        },
        PropDef {
            name: "zero-page-detection",
            kind: PropKind::Enum(ZERO_PAGE_WORDS),
            default: "multifd",
            wire: true,
            doc: "where zero pages are found",
        },
        PropDef {
            name: "max-bandwidth",
            kind: PropKind::Size {
                min: 0,
                max: 1 << 40,
            },
            default: "128M",
            wire: false,
            doc: "bytes per second",
        },
        PropDef {
            name: "multifd-channels",
            kind: PropKind::U64 { min: 1, max: 64 },
            default: "4",
            wire: false,
            doc: "number of multifd channels",
        },
    ],
};

static VIRTIO_BLK: DriverDef = DriverDef {
    name: "virtio-blk",
    doc: "a virtio block device",
    props: &[
        PropDef {
            name: "num-queues",
            kind: PropKind::U64 { min: 1, max: 16 },
            default: "4",
            wire: true,
            doc: "number of request queues",
        },
        PropDef {
            name: "discard",
            kind: PropKind::Bool,
            default: "on",
            wire: true,
            doc: "offer the discard feature",
        },
    ],
};

static FERRY_1_2: MachineDef = MachineDef {
    name: "ferry-1.2",
    release: "1.2",
    doc: "newest",
    compat: &[],
};

static FERRY_1_1: MachineDef = MachineDef {
    name: "ferry-1.1",
    release: "1.1",
    doc: "what 1.2 changed",
    compat: &[
        CompatEntry {
            driver: "virtio-blk",
            property: "num-queues",
            value: "2",
        },
        CompatEntry {
            driver: "virtio-blk",
            property: "discard",
            value: "off",
        },
    ],
};

static FERRY_1_0: MachineDef = MachineDef {
    name: "ferry-1.0",
    release: "1.0",
    doc: "what 1.1 changed",
    compat: &[
        CompatEntry {
            driver: "virtio-blk",
            property: "num-queues",
            value: "1",
        },
        CompatEntry {
            driver: "migration",
            property: "multifd-flush-after-each-section",
            value: "on",
        },
        CompatEntry {
            driver: "migration",
            property: "zero-page-detection",
            value: "legacy",
        },
    ],
};

fn registry() -> Registry {
    Registry::new(
        vec![&MIGRATION, &VIRTIO_BLK],
        vec![&FERRY_1_2, &FERRY_1_1, &FERRY_1_0],
    )
}

fn compat(machine: &str) -> Origin {
    Origin::Compat {
        machine: machine.to_string(),
    }
}

fn globals(texts: &[&str]) -> Vec<Global> {
    texts
        .iter()
        .map(|text| text.parse().expect("test global is well formed"))
        .collect()
}

/// Asserts that `text` mentions every one of `needles`.
#[track_caller]
fn assert_mentions(text: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            text.contains(needle),
            "{text:?} does not mention {needle:?}"
        );
    }
}

// ---- the model ----

#[test]
fn the_test_registry_is_valid() {
    assert_eq!(registry().validate(), Ok(()));
}

#[test]
fn newest_machine_type_has_the_defaults() {
    let config = registry().configure("ferry-1.2", &[]).unwrap();
    assert_eq!(config.machine(), "ferry-1.2");
    assert_eq!(config.u64("virtio-blk", "num-queues"), Ok(4));
    assert_eq!(config.bool("virtio-blk", "discard"), Ok(true));
    assert_eq!(
        config.bool("migration", "multifd-flush-after-each-section"),
        Ok(false)
    );
    assert_eq!(
        config.enum_str("migration", "zero-page-detection"),
        Ok("multifd")
    );
    assert_eq!(config.u64("migration", "max-bandwidth"), Ok(128 << 20));
    for (_, _, _, origin) in config.iter() {
        assert_eq!(origin, &Origin::Default);
    }
}

#[test]
fn middle_machine_type_applies_its_own_table_only() {
    let config = registry().configure("ferry-1.1", &[]).unwrap();
    assert_eq!(config.u64("virtio-blk", "num-queues"), Ok(2));
    assert_eq!(
        config.origin("virtio-blk", "num-queues"),
        Ok(&compat("ferry-1.1"))
    );
    assert_eq!(config.bool("virtio-blk", "discard"), Ok(false));
    assert_eq!(
        config.bool("migration", "multifd-flush-after-each-section"),
        Ok(false)
    );
    assert_eq!(
        config.origin("migration", "multifd-flush-after-each-section"),
        Ok(&Origin::Default)
    );
}

#[test]
fn older_table_wins_and_newer_tables_are_inherited() {
    let config = registry().configure("ferry-1.0", &[]).unwrap();
    // Changed in 1.1 and again in 1.2: ferry-1.0's entry is applied after ferry-1.1's.
    assert_eq!(config.u64("virtio-blk", "num-queues"), Ok(1));
    assert_eq!(
        config.origin("virtio-blk", "num-queues"),
        Ok(&compat("ferry-1.0"))
    );
    // Only in ferry-1.1's table, yet it holds for ferry-1.0 too.
    assert_eq!(config.bool("virtio-blk", "discard"), Ok(false));
    assert_eq!(
        config.origin("virtio-blk", "discard"),
        Ok(&compat("ferry-1.1"))
    );
    assert_eq!(
        config.bool("migration", "multifd-flush-after-each-section"),
        Ok(true)
    );
    assert_eq!(
        config.enum_str("migration", "zero-page-detection"),
        Ok("legacy")
    );
    assert_eq!(
        config.origin("migration", "max-bandwidth"),
        Ok(&Origin::Default)
    );
}

#[test]
fn global_overrides_a_compat_entry() {
    let config = registry()
        .configure("ferry-1.0", &globals(&["virtio-blk.num-queues=8"]))
        .unwrap();
    assert_eq!(config.u64("virtio-blk", "num-queues"), Ok(8));
    assert_eq!(
        config.origin("virtio-blk", "num-queues"),
        Ok(&Origin::Global)
    );
    // Untouched entries keep their compat origin.
    assert_eq!(
        config.origin("virtio-blk", "discard"),
        Ok(&compat("ferry-1.1"))
    );
}

#[test]
fn global_accepts_every_text_form_and_the_last_one_wins() {
    let config = registry()
        .configure(
            "ferry",
            &globals(&[
                "migration.multifd-flush-after-each-section=yes",
                "migration.max-bandwidth=1G",
                "migration.max-bandwidth=512KiB",
                "virtio-blk.discard=false",
            ]),
        )
        .unwrap();
    assert_eq!(
        config.bool("migration", "multifd-flush-after-each-section"),
        Ok(true)
    );
    assert_eq!(config.u64("migration", "max-bandwidth"), Ok(512 << 10));
    assert_eq!(config.bool("virtio-blk", "discard"), Ok(false));
}

#[test]
fn alias_names_the_newest_machine_type() {
    let registry = registry();
    assert_eq!(registry.resolve_machine("ferry"), Ok(&FERRY_1_2));
    assert_eq!(registry.resolve_machine("ferry-1.0"), Ok(&FERRY_1_0));
    let config = registry.configure("ferry", &[]).unwrap();
    assert_eq!(config.machine(), "ferry-1.2");
    assert_eq!(config, registry.configure("ferry-1.2", &[]).unwrap());
}

#[test]
fn iteration_is_sorted_by_driver_then_property() {
    let config = registry().configure("ferry-1.0", &[]).unwrap();
    let keys: Vec<(&str, &str)> = config.iter().map(|(d, p, _, _)| (d, p)).collect();
    assert_eq!(
        keys,
        [
            ("migration", "max-bandwidth"),
            ("migration", "multifd-channels"),
            ("migration", "multifd-flush-after-each-section"),
            ("migration", "zero-page-detection"),
            ("virtio-blk", "discard"),
            ("virtio-blk", "num-queues"),
        ]
    );
    let text = config.to_string();
    assert_mentions(
        &text,
        &[
            "machine type ferry-1.0",
            "virtio-blk.num-queues=1 (compat table of ferry-1.0)",
            "migration.max-bandwidth=134217728 (default)",
        ],
    );
}

#[test]
fn get_and_value_agree() {
    let config = registry().configure("ferry-1.0", &[]).unwrap();
    assert_eq!(
        config.get("virtio-blk", "num-queues"),
        Some(&PropValue::U64(1))
    );
    assert_eq!(config.get("virtio-blk", "nope"), None);
    assert_eq!(config.get("nope", "num-queues"), None);
    assert_eq!(
        config.value("migration", "zero-page-detection"),
        Ok(&PropValue::Enum("legacy".to_string()))
    );
}

// ---- wire properties ----

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(p, v)| (p.to_string(), v.to_string()))
        .collect()
}

#[test]
fn wire_properties_are_the_wire_ones_sorted_in_canonical_text() {
    let config = registry()
        .configure("ferry-1.0", &globals(&["virtio-blk.discard=yes"]))
        .unwrap();
    assert_eq!(
        config.wire_properties(),
        pairs(&[
            ("migration.multifd-flush-after-each-section", "on"),
            ("migration.zero-page-detection", "legacy"),
            ("virtio-blk.discard", "on"),
            ("virtio-blk.num-queues", "1"),
        ])
    );
}

#[test]
fn same_machine_type_has_no_wire_mismatch() {
    let config = registry().configure("ferry-1.1", &[]).unwrap();
    let peer = registry().configure("ferry-1.1", &[]).unwrap();
    assert_eq!(config.wire_mismatches(&peer.wire_properties()), []);
    assert_eq!(config.check_wire(&peer.wire_properties()), Ok(()));
}

#[test]
fn wire_mismatches_report_differences_and_missing_properties() {
    let local = pairs(&[("a.x", "on"), ("a.y", "1"), ("b.z", "legacy")]);
    // Unsorted on purpose: the peer's order must not matter.
    let peer = pairs(&[("c.new", "off"), ("a.y", "2"), ("a.x", "on")]);
    assert_eq!(
        wire_mismatches(&local, &peer),
        [
            WireMismatch {
                property: "a.y".into(),
                local: Some("1".into()),
                peer: Some("2".into()),
            },
            WireMismatch {
                property: "b.z".into(),
                local: Some("legacy".into()),
                peer: None,
            },
            WireMismatch {
                property: "c.new".into(),
                local: None,
                peer: Some("off".into()),
            },
        ]
    );
    assert_eq!(wire_mismatches(&[], &[]), []);
}

#[test]
fn a_contradiction_inside_one_list_is_not_hidden() {
    let local = pairs(&[("a.x", "on")]);
    let peer = pairs(&[("a.x", "on"), ("a.x", "off")]);
    assert_eq!(
        wire_mismatches(&local, &peer),
        [WireMismatch {
            property: "a.x".into(),
            local: Some("on".into()),
            peer: Some("off".into()),
        }]
    );
}

#[test]
fn check_wire_names_every_mismatch() {
    let new = registry().configure("ferry-1.2", &[]).unwrap();
    let old = registry().configure("ferry-1.0", &[]).unwrap();
    let err = new.check_wire(&old.wire_properties()).unwrap_err();
    let CompatError::WireMismatch { mismatches } = &err else {
        panic!("expected a wire mismatch, got {err:?}");
    };
    assert_eq!(mismatches.len(), 4);
    assert_mentions(
        &err.to_string(),
        &[
            "virtio-blk.num-queues: local 4, peer 1",
            "migration.multifd-flush-after-each-section: local off, peer on",
            "migration.zero-page-detection: local multifd, peer legacy",
            "virtio-blk.discard: local on, peer off",
        ],
    );
    let missing = WireMismatch {
        property: "a.b".into(),
        local: None,
        peer: Some("on".into()),
    };
    assert_eq!(missing.to_string(), "a.b: local (absent), peer on");
}

// ---- error messages ----

#[test]
fn unknown_machine_type_lists_the_machine_types() {
    let err = registry().configure("ferry-0.9", &[]).unwrap_err();
    assert!(matches!(err, CompatError::UnknownMachine { .. }));
    assert_mentions(
        &err.to_string(),
        &[
            "\"ferry-0.9\"",
            "ferry (alias of ferry-1.2)",
            "ferry-1.2",
            "ferry-1.1",
            "ferry-1.0",
        ],
    );
    let empty = Registry::new(vec![&MIGRATION], vec![]);
    let err = empty.resolve_machine("ferry").unwrap_err();
    assert_mentions(&err.to_string(), &["\"ferry\"", "(none)"]);
}

#[test]
fn unknown_driver_lists_the_drivers() {
    let err = registry()
        .configure("ferry", &globals(&["virtio-bkl.num-queues=2"]))
        .unwrap_err();
    assert!(matches!(err, CompatError::UnknownDriver { .. }));
    assert_mentions(
        &err.to_string(),
        &["\"virtio-bkl\"", "migration", "virtio-blk"],
    );

    let config = registry().configure("ferry", &[]).unwrap();
    let err = config.bool("virtio-net", "x").unwrap_err();
    assert_mentions(
        &err.to_string(),
        &["\"virtio-net\"", "migration", "virtio-blk"],
    );
}

#[test]
fn unknown_property_lists_the_drivers_properties() {
    let err = registry()
        .configure("ferry", &globals(&["virtio-blk.queues=2"]))
        .unwrap_err();
    assert!(matches!(err, CompatError::UnknownProperty { .. }));
    assert_mentions(
        &err.to_string(),
        &["virtio-blk", "\"queues\"", "num-queues", "discard"],
    );

    let config = registry().configure("ferry", &[]).unwrap();
    let err = config.origin("migration", "multifd").unwrap_err();
    assert_mentions(
        &err.to_string(),
        &[
            "migration",
            "\"multifd\"",
            "max-bandwidth",
            "multifd-channels",
            "multifd-flush-after-each-section",
            "zero-page-detection",
        ],
    );
}

#[track_caller]
fn global_error(text: &str) -> String {
    let err = registry()
        .configure("ferry", &globals(&[text]))
        .unwrap_err();
    assert!(
        matches!(err, CompatError::InvalidValue { .. }),
        "{text}: {err:?}"
    );
    err.to_string()
}

#[test]
fn invalid_bool_lists_the_words() {
    let message = global_error("virtio-blk.discard=enabled");
    assert_mentions(
        &message,
        &[
            "\"enabled\"",
            "virtio-blk.discard",
            "on",
            "off",
            "true",
            "false",
            "yes",
            "no",
        ],
    );
}

#[test]
fn invalid_enum_lists_the_words() {
    let message = global_error("migration.zero-page-detection=Legacy");
    assert_mentions(
        &message,
        &[
            "\"Legacy\"",
            "migration.zero-page-detection",
            "one of: none, legacy, multifd",
        ],
    );
}

#[test]
fn invalid_integer_gives_the_range() {
    for bad in [
        "17",
        "0",
        "-1",
        "4k",
        "0x4",
        " 4",
        "99999999999999999999999",
    ] {
        let message = global_error(&format!("virtio-blk.num-queues={bad}"));
        assert_mentions(
            &message,
            &[&format!("{bad:?}"), "virtio-blk.num-queues", "from 1 to 16"],
        );
    }
    assert_mentions(&global_error("virtio-blk.num-queues=17"), &["out of range"]);
    assert_mentions(
        &global_error("virtio-blk.num-queues=99999999999999999999999"),
        &["too large for 64 bits"],
    );
}

#[test]
fn invalid_size_gives_the_range_and_suffixes() {
    let message = global_error("migration.max-bandwidth=2T");
    assert_mentions(
        &message,
        &[
            "\"2T\"",
            "migration.max-bandwidth",
            "out of range",
            "from 0 to 1099511627776 (1T) bytes",
            "KiB",
        ],
    );
    assert_mentions(
        &global_error("migration.max-bandwidth=64MB"),
        &["unknown size suffix", "\"64MB\""],
    );
    assert_mentions(
        &global_error("migration.max-bandwidth=1.5G"),
        &["fractions are not accepted"],
    );
}

#[test]
fn reading_a_property_as_the_wrong_type_is_an_error() {
    let config = registry().configure("ferry", &[]).unwrap();
    let err = config.bool("virtio-blk", "num-queues").unwrap_err();
    assert!(matches!(err, CompatError::WrongKind { .. }));
    assert_mentions(
        &err.to_string(),
        &["virtio-blk.num-queues", "a bool", "from 1 to 16"],
    );
    assert!(config.u64("virtio-blk", "discard").is_err());
    assert!(config.enum_str("migration", "max-bandwidth").is_err());
}

#[test]
fn bad_compat_entry_refuses_configure_naming_the_table() {
    static BROKEN: MachineDef = MachineDef {
        name: "ferry-1.0",
        release: "1.0",
        doc: "",
        compat: &[CompatEntry {
            driver: "virtio-blk",
            property: "num-queues",
            value: "lots",
        }],
    };
    let registry = Registry::new(vec![&VIRTIO_BLK], vec![&FERRY_1_1, &BROKEN]);
    // Machine types newer than the broken table are unaffected.
    assert!(registry.configure("ferry-1.1", &[]).is_ok());
    let err = registry.configure("ferry-1.0", &[]).unwrap_err();
    assert!(matches!(err, CompatError::InvalidRegistry { .. }));
    assert_mentions(
        &err.to_string(),
        &[
            "compat table of ferry-1.0",
            "\"lots\"",
            "virtio-blk.num-queues",
        ],
    );
}

// ---- the self-check ----

#[track_caller]
fn problems(registry: &Registry) -> Vec<RegistryProblem> {
    match registry.validate() {
        Err(CompatError::InvalidRegistry { problems }) => problems,
        other => panic!("expected registry problems, got {other:?}"),
    }
}

#[test]
fn validate_rejects_bad_machine_types() {
    static NOT_EMPTY: MachineDef = MachineDef {
        name: "ferry-2.0",
        release: "2.0",
        doc: "",
        compat: &[CompatEntry {
            driver: "virtio-blk",
            property: "discard",
            value: "off",
        }],
    };
    static BAD_NAME: MachineDef = MachineDef {
        name: "pc-1.0",
        release: "1.0",
        doc: "",
        compat: &[],
    };
    static LEADING_ZERO: MachineDef = MachineDef {
        name: "ferry-1.01",
        release: "1.01",
        doc: "",
        compat: &[],
    };
    let registry = Registry::new(
        vec![&VIRTIO_BLK],
        vec![
            &NOT_EMPTY,
            &FERRY_1_0,
            &FERRY_1_1,
            &FERRY_1_0,
            &BAD_NAME,
            &LEADING_ZERO,
        ],
    );
    let found = problems(&registry);
    assert_eq!(
        found,
        [
            RegistryProblem::NewestTableNotEmpty {
                machine: "ferry-2.0".into(),
                entries: 1
            },
            RegistryProblem::NotNewestFirst {
                older: "ferry-1.0".into(),
                newer: "ferry-1.1".into()
            },
            RegistryProblem::DuplicateMachine {
                name: "ferry-1.0".into()
            },
            RegistryProblem::BadMachineName {
                name: "pc-1.0".into()
            },
            RegistryProblem::BadMachineName {
                name: "ferry-1.01".into()
            },
            // FERRY_1_0's table names a `migration` driver this registry lacks (twice, as it is
            // listed twice); that is checked too.
            RegistryProblem::BadCompatEntry {
                machine: "ferry-1.0".into(),
                problem: Box::new(CompatError::UnknownDriver {
                    driver: "migration".into(),
                    known: vec!["virtio-blk".into()],
                }),
            },
            RegistryProblem::BadCompatEntry {
                machine: "ferry-1.0".into(),
                problem: Box::new(CompatError::UnknownDriver {
                    driver: "migration".into(),
                    known: vec!["virtio-blk".into()],
                }),
            },
            RegistryProblem::BadCompatEntry {
                machine: "ferry-1.0".into(),
                problem: Box::new(CompatError::UnknownDriver {
                    driver: "migration".into(),
                    known: vec!["virtio-blk".into()],
                }),
            },
            RegistryProblem::BadCompatEntry {
                machine: "ferry-1.0".into(),
                problem: Box::new(CompatError::UnknownDriver {
                    driver: "migration".into(),
                    known: vec!["virtio-blk".into()],
                }),
            },
        ]
    );
    assert_eq!(
        problems(&Registry::new(vec![], vec![])),
        [RegistryProblem::NoMachines]
    );
}

#[test]
fn validate_rejects_bad_drivers() {
    static BROKEN: DriverDef = DriverDef {
        name: "broken",
        doc: "",
        props: &[
            PropDef {
                name: "range",
                kind: PropKind::U64 { min: 5, max: 1 },
                default: "3",
                wire: false,
                doc: "",
            },
            PropDef {
                name: "range",
                kind: PropKind::Bool,
                default: "on",
                wire: false,
                doc: "",
            },
            PropDef {
                name: "words",
                kind: PropKind::Enum(&["a", "", "a"]),
                default: "b",
                wire: false,
                doc: "",
            },
            PropDef {
                name: "a=b",
                kind: PropKind::Size { min: 0, max: 10 },
                default: "1K",
                wire: false,
                doc: "",
            },
        ],
    };
    static DOTTED: DriverDef = DriverDef {
        name: "virtio.blk",
        doc: "",
        props: &[],
    };
    let registry = Registry::new(vec![&BROKEN, &DOTTED, &BROKEN], vec![&FERRY_1_2]);
    let found = problems(&registry);
    let text = registry.validate().unwrap_err().to_string();
    assert_mentions(
        &text,
        &[
            "broken.range has an empty range: min 5 is above max 1",
            "broken.range is defined twice",
            "broken.words has an empty or repeated enum word \"\"",
            "broken.words has an empty or repeated enum word \"a\"",
            "default \"b\" of broken.words is invalid",
            "property name \"a=b\" of driver broken",
            "default \"1K\" of broken.a=b is invalid: out of range",
            "driver name \"virtio.blk\"",
            "driver broken is defined twice",
        ],
    );
    assert!(found.contains(&RegistryProblem::BadDefault {
        driver: "broken".into(),
        property: "range".into(),
        value: "3".into(),
        problem: ValueProblem::OutOfRange,
        kind: PropKind::U64 { min: 5, max: 1 },
    }));
}

#[test]
fn validate_rejects_bad_compat_entries() {
    static OLD: MachineDef = MachineDef {
        name: "ferry-1.1",
        release: "1.1",
        doc: "",
        compat: &[
            CompatEntry {
                driver: "virtio-blk",
                property: "num-queues",
                value: "2",
            },
            CompatEntry {
                driver: "virtio-blk",
                property: "num-queues",
                value: "3",
            },
            CompatEntry {
                driver: "virtio-blk",
                property: "queues",
                value: "3",
            },
            CompatEntry {
                driver: "virtio-blk",
                property: "discard",
                value: "maybe",
            },
        ],
    };
    let registry = Registry::new(vec![&VIRTIO_BLK], vec![&FERRY_1_2, &OLD]);
    let text = registry.validate().unwrap_err().to_string();
    assert_mentions(
        &text,
        &[
            "compat table of ferry-1.1 sets virtio-blk.num-queues more than once",
            "compat table of ferry-1.1: driver virtio-blk has no property \"queues\"",
            "compat table of ferry-1.1: invalid value \"maybe\" for virtio-blk.discard",
        ],
    );
}

#[test]
fn machine_names() {
    assert_eq!(parse_machine_name("ferry-1.2"), Some((1, 2)));
    assert_eq!(parse_machine_name("ferry-0.0"), Some((0, 0)));
    assert_eq!(parse_machine_name("ferry-10.12"), Some((10, 12)));
    for bad in [
        "ferry",
        "ferry-1",
        "ferry-1.",
        "ferry-.1",
        "ferry-01.2",
        "ferry-1.2.3",
        "ferry-1.-2",
        "ferry-a.b",
        "ferry1.2",
        "ferry-99999999999.0",
    ] {
        assert_eq!(parse_machine_name(bad), None, "{bad}");
    }
}
