//! This build against every release of ferry: what keeps a VM on a shipped machine type
//! migratable between any release and the current one.
//!
//! `compat/releases.toml` records each release (its version, newest machine type, the
//! commit it was cut from, its date) and `compat/ferry-X.Y.Z.json`, the golden
//! `ferry dump-vmstate` written when it was cut (see RELEASING.md). The tests here:
//!
//! * check the record: it parses, versions go up, every entry names its machine type and
//!   golden dump as the release rules say, every golden dump exists, reads as a dump of
//!   that release, and every `compat/ferry-*.json` is recorded;
//! * dump this build with `ferry dump-vmstate`, as a person would, and run
//!   `ferry compat-check GOLDEN CURRENT` for every recorded release. Each finding is a
//!   change that breaks migration on a shipped machine type, and fails the test with the
//!   checker's own lines, unless `compat/accepted-breaks.toml` lists it as a one-way step
//!   taken on purpose (a version step of a state or subsection, or a raised
//!   `min_version`); an accepted break that matches no finding fails too. With no release
//!   recorded yet this build is checked against itself, which must give no finding;
//! * check this build's version: never below a recorded release, and when equal to one,
//!   the build must dump exactly that release's golden dump (a change after the cut opens
//!   the next version first), and the newest machine type is `ferry-X.Y` of the version;
//! * show that the check is not vacuous: a release is recorded in a scratch copy of the
//!   repository from this build's own dump, and then a field of a device state is removed
//!   without a version step, or a property default changed without a compat entry, in
//!   memory; `ferry compat-check` must name each, and the record's check must fail on it.
//!   The same default change with its machine type and compat entry must pass, and a
//!   version step passes only while it is accepted.
//!
//! `cargo test --workspace` is what CI runs, so this file is the release check in CI; it
//! needs no network and no git.
//!
//! # Why the `toml` crate
//!
//! The record is TOML so that it can carry comments on its format, be appended to by a
//! script and be read by people in review, as `Cargo.toml` is. Reading it here needs a TOML
//! parser, and the `toml` crate is the well-kept one: it comes from the toml-rs project,
//! whose crates Cargo itself reads `Cargo.toml` with. It is a dev-dependency only, so the
//! `ferry` binary does not carry it; its parser crates (`toml_parser`, `toml_datetime`,
//! `winnow`) were already in `Cargo.lock`, so it added three small crates, all with the
//! workspace's `rust-version` 1.85. A hand-written reader of a TOML subset would be less
//! code to download but one more parser to get wrong, on a file whose mistakes should
//! fail loudly.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{ferry, Output, TestDir};
use ferry_migration::compat::check::{check, Finding};
use ferry_migration::compat::schema::{
    dump, CompatEntryDump, MachineDump, PropKindDump, VmStateDump,
};
use ferry_vmm::machine;
use serde::Deserialize;
use serde_json::Value;

/// Long enough for a debug `ferry` to dump or compare on a loaded machine.
const QUICK: Duration = Duration::from_secs(60);

/// Exit status of `ferry compat-check` when it found breaking changes.
const BREAKS_FOUND: i32 = 1;

/// `compat/releases.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    #[serde(default)]
    release: Vec<Release>,
}

/// One `[[release]]` of the record.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Release {
    version: String,
    machine: String,
    commit: String,
    date: toml::value::Datetime,
    dump: String,
}

/// `compat/accepted-breaks.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AcceptedFile {
    #[serde(default, rename = "break")]
    breaks: Vec<Accepted>,
}

/// One `[[break]]`: a finding against one release that is let through.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Accepted {
    release: String,
    kind: String,
    device: String,
    #[serde(default)]
    subsection: Option<String>,
    version: u32,
    why: String,
}

/// The finding kinds that can be accepted, each a one-way step the device state rules
/// allow, with the finding's field that `version` must equal. Every other kind has a
/// compatible fix.
const ACCEPTABLE: &[(&str, &str)] = &[
    ("old-cannot-load-new", "new_version"),
    ("subsection-version-raised", "new_version"),
    ("new-cannot-load-old", "new_min_version"),
];

impl Accepted {
    /// Whether `finding` (an object of `ferry compat-check --json`) is this break.
    fn matches(&self, finding: &Value) -> bool {
        let Some((_, field)) = ACCEPTABLE.iter().find(|(kind, _)| *kind == self.kind) else {
            return false;
        };
        finding["kind"] == self.kind.as_str()
            && finding["device"] == self.device.as_str()
            && finding.get("subsection").and_then(Value::as_str) == self.subsection.as_deref()
            && finding[*field] == self.version
    }
}

/// The repository's top directory.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository's top directory")
}

/// Reads `compat/releases.toml` under `root`.
fn read_record(root: &Path) -> Vec<Release> {
    let path = root.join("compat/releases.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let record: Record =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{} does not parse:\n{e}", path.display()));
    record.release
}

/// Reads `compat/accepted-breaks.toml` under `root`.
fn read_accepted(root: &Path) -> Vec<Accepted> {
    let path = root.join("compat/accepted-breaks.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let file: AcceptedFile =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{} does not parse:\n{e}", path.display()));
    file.breaks
}

/// Everything wrong with the accepted breaks, one line each.
fn accepted_problems(accepted: &[Accepted], releases: &[Release]) -> Vec<String> {
    let mut problems = Vec::new();
    for a in accepted {
        let at = format!("accepted {} of {} against {}", a.kind, a.device, a.release);
        if !ACCEPTABLE.iter().any(|(kind, _)| *kind == a.kind) {
            let kinds: Vec<&str> = ACCEPTABLE.iter().map(|(kind, _)| *kind).collect();
            problems.push(format!(
                "{at}: only {} can be accepted; fix the change instead (RELEASING.md)",
                kinds.join(", ")
            ));
        }
        if (a.kind == "subsection-version-raised") != a.subsection.is_some() {
            problems.push(format!(
                "{at}: subsection is named for kind subsection-version-raised, and only then"
            ));
        }
        if !releases.iter().any(|r| r.version == a.release) {
            problems.push(format!("{at}: release {} is not recorded", a.release));
        }
        if a.why.trim().is_empty() {
            problems.push(format!("{at}: why is empty"));
        }
    }
    problems
}

/// `X.Y.Z` as numbers; `None` for anything else (a release has no pre-release suffix).
fn version(text: &str) -> Option<(u64, u64, u64)> {
    let parts: Vec<&str> = text.split('.').collect();
    let number = |s: &str| -> Option<u64> {
        let canonical = !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        if canonical {
            s.parse().ok()
        } else {
            None
        }
    };
    match parts[..] {
        [x, y, z] => Some((number(x)?, number(y)?, number(z)?)),
        _ => None,
    }
}

/// The newest machine type of release `X.Y.Z`.
fn machine_of((x, y, _): (u64, u64, u64)) -> String {
    format!("ferry-{x}.{y}")
}

/// Everything wrong with the record under `root`, one line each.
fn record_problems(root: &Path, releases: &[Release]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut previous: Option<(u64, u64, u64)> = None;
    for r in releases {
        let at = format!("release {}", r.version);
        let Some(v) = version(&r.version) else {
            problems.push(format!("{at}: version is not X.Y.Z"));
            continue;
        };
        if let Some(p) = previous.filter(|p| v <= *p) {
            problems.push(format!(
                "{at}: not after {}.{}.{}; releases are recorded oldest first, once each",
                p.0, p.1, p.2
            ));
        }
        previous = Some(v);
        if r.machine != machine_of(v) {
            problems.push(format!(
                "{at}: machine is {:?}, but release {} ships {} as its newest machine type",
                r.machine,
                r.version,
                machine_of(v)
            ));
        }
        if r.commit.len() != 40
            || !r
                .commit
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            problems.push(format!(
                "{at}: commit {:?} is not a full lowercase hash",
                r.commit
            ));
        }
        if r.date.date.is_none() || r.date.time.is_some() || r.date.offset.is_some() {
            problems.push(format!("{at}: date {} is not a plain date", r.date));
        }
        let expected = format!("compat/ferry-{}.json", r.version);
        if r.dump != expected {
            problems.push(format!("{at}: dump is {:?}, not {expected:?}", r.dump));
        }
        let path = root.join(&r.dump);
        let golden = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) => {
                problems.push(format!("{at}: cannot read its golden dump {}: {e}", r.dump));
                continue;
            }
        };
        match VmStateDump::from_json(&golden) {
            Err(e) => problems.push(format!("{at}: golden dump {} is not a dump: {e}", r.dump)),
            Ok(d) => {
                if d.release != r.version {
                    problems.push(format!(
                        "{at}: golden dump {} is of release {}",
                        r.dump, d.release
                    ));
                }
                let newest = d.machines.first().map(|m| m.name.as_str());
                if newest != Some(r.machine.as_str()) {
                    problems.push(format!(
                        "{at}: the newest machine type of golden dump {} is {newest:?}, not {}",
                        r.dump, r.machine
                    ));
                }
            }
        }
    }
    // A golden dump nobody recorded is a cut left half done.
    let recorded: Vec<&str> = releases.iter().map(|r| r.dump.as_str()).collect();
    let dir = root.join("compat");
    for entry in std::fs::read_dir(&dir).expect("the compat directory") {
        let name = entry.expect("a directory entry").file_name();
        let name = name.to_string_lossy();
        let path = format!("compat/{name}");
        if name.starts_with("ferry-")
            && name.ends_with(".json")
            && !recorded.contains(&path.as_str())
        {
            problems.push(format!(
                "{path} is not recorded in compat/releases.toml; golden dumps are written by compat/cut-release"
            ));
        }
    }
    problems
}

/// `ferry compat-check [--json] OLD NEW`.
fn compat_check(old: &Path, new: &Path, json: bool) -> Output {
    let json = if json { &["--json"][..] } else { &[] };
    ferry(
        &[
            &["compat-check"][..],
            json,
            &[
                old.to_str().expect("a UTF-8 path"),
                new.to_str().expect("a UTF-8 path"),
            ],
        ]
        .concat(),
        QUICK,
    )
}

/// `ferry dump-vmstate` of this build, written under `dir`. Checks that the binary dumps
/// exactly what the library does, so that the in-memory edits below start from the same
/// dump the release check compares.
fn dump_current(dir: &TestDir) -> (PathBuf, VmStateDump) {
    let path = dir.join("current.json");
    let out = ferry(
        &["dump-vmstate", path.to_str().expect("a UTF-8 path")],
        QUICK,
    );
    assert!(out.status.success(), "{out}");
    let text = std::fs::read_to_string(&path).expect("the dump ferry wrote");
    let library = dump(
        machine::RELEASE,
        &machine::registry(),
        &machine::state_schemas(),
    )
    .expect("this release dumps");
    assert_eq!(
        text,
        library.to_json(),
        "`ferry dump-vmstate` and the library dump differ"
    );
    (path, library)
}

/// Runs `ferry compat-check` of every recorded release's golden dump under `root` against
/// `current`. One failure per release with findings that are not accepted, listing the
/// checker's lines, and one per accepted break that matches no finding.
fn check_releases(
    root: &Path,
    releases: &[Release],
    accepted: &[Accepted],
    current: &Path,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut used = vec![false; accepted.len()];
    for r in releases {
        let run = compat_check(&root.join(&r.dump), current, true);
        let report: Option<Value> = match run.status.code() {
            Some(0) | Some(BREAKS_FOUND) => serde_json::from_str(&run.stdout).ok(),
            _ => None,
        };
        let Some(report) = report else {
            failures.push(format!(
                "release {}: ferry compat-check could not compare:\n{run}",
                r.version
            ));
            continue;
        };
        let mut broken = Vec::new();
        for finding in report["findings"].as_array().into_iter().flatten() {
            let by = accepted
                .iter()
                .position(|a| a.release == r.version && a.matches(finding));
            match by {
                Some(i) => used[i] = true,
                None => broken.push(finding["message"].as_str().unwrap_or("?").to_string()),
            }
        }
        if !broken.is_empty() {
            failures.push(format!(
                "this build breaks migration with release {} (cut from {} on {}); every change \
                 to the wire, a device state or what the guest sees needs a version step, a \
                 subsection, a compat entry or a negotiated capability (RELEASING.md says which \
                 for each finding):\n{}",
                r.version,
                r.commit,
                r.date,
                broken.join("\n")
            ));
        }
    }
    for (a, used) in accepted.iter().zip(used) {
        if !used {
            failures.push(format!(
                "accepted break {} of {} (version {}) against release {} matches no finding: \
                 remove it from compat/accepted-breaks.toml",
                a.kind, a.device, a.version, a.release
            ));
        }
    }
    failures
}

#[test]
fn the_record_of_releases_is_valid() {
    let root = repo();
    let releases = read_record(&root);
    let problems = record_problems(&root, &releases);
    assert!(
        problems.is_empty(),
        "compat/releases.toml:\n{}",
        problems.join("\n")
    );
    let problems = accepted_problems(&read_accepted(&root), &releases);
    assert!(
        problems.is_empty(),
        "compat/accepted-breaks.toml:\n{}",
        problems.join("\n")
    );
}

#[test]
fn this_build_migrates_with_every_recorded_release() {
    let root = repo();
    let releases = read_record(&root);
    let dir = TestDir::new("releases");
    let (current, _) = dump_current(&dir);

    // Always: the build against itself, through the same command.
    let own = compat_check(&current, &current, false);
    assert!(
        own.status.success(),
        "this build is not compatible with itself:\n{}",
        own
    );
    if releases.is_empty() {
        println!("no release recorded yet: checked this build against itself only");
    }

    let failures = check_releases(&root, &releases, &read_accepted(&root), &current);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn this_builds_version_follows_the_recorded_releases() {
    let root = repo();
    let releases = read_record(&root);
    let this = version(machine::RELEASE)
        .unwrap_or_else(|| panic!("this build's version {} is not X.Y.Z", machine::RELEASE));

    let newest = machine::MACHINES[0].name;
    assert_eq!(
        newest,
        machine_of(this),
        "version {} ships {} as its newest machine type (RELEASING.md: opening a version)",
        machine::RELEASE,
        machine_of(this)
    );

    let Some(last) = releases.last() else {
        return;
    };
    let last_version = version(&last.version).expect("checked with the record");
    assert!(
        this >= last_version,
        "this build's version {} is below the last release {}",
        machine::RELEASE,
        last.version
    );
    if this == last_version {
        // The commit that records the release still builds it; anything else must open
        // the next version first, so that no two builds of one version differ.
        let golden =
            std::fs::read_to_string(root.join(&last.dump)).expect("checked with the record");
        let current = dump(
            machine::RELEASE,
            &machine::registry(),
            &machine::state_schemas(),
        )
        .expect("this release dumps")
        .to_json();
        let differing: Vec<String> = golden
            .lines()
            .zip(current.lines())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(10)
            .map(|(i, (a, b))| format!("line {}: {a:?} became {b:?}", i + 1))
            .collect();
        assert!(
            golden == current,
            "this build says it is release {v}, which was cut from {c}, but it no longer \
             dumps {d}: open the next version (RELEASING.md) before changing what a dump \
             shows\n{}",
            differing.join("\n"),
            v = last.version,
            c = last.commit,
            d = last.dump
        );
    }
}

// ---- the check is not vacuous ----

/// A scratch repository whose record holds one release, cut from this build: its golden
/// dump is this build's dump, as `compat/cut-release` would write it.
struct ScratchRepo {
    dir: TestDir,
    releases: Vec<Release>,
}

impl ScratchRepo {
    fn new(test: &str, released: &VmStateDump) -> Self {
        let dir = TestDir::new(test);
        std::fs::create_dir_all(dir.join("compat")).expect("create compat/");
        let v = &released.release;
        let dump_path = format!("compat/ferry-{v}.json");
        std::fs::write(dir.join(&dump_path), released.to_json()).expect("write the golden dump");
        let record = format!(
            "[[release]]\nversion = \"{v}\"\nmachine = \"{m}\"\ncommit = \"{c}\"\ndate = 2026-01-31\ndump = \"{dump_path}\"\n",
            m = released.machines[0].name,
            c = "0123456789abcdef0123456789abcdef01234567",
        );
        std::fs::write(dir.join("compat/releases.toml"), record).expect("write the record");
        let releases = read_record(dir.path());
        let problems = record_problems(dir.path(), &releases);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        Self { dir, releases }
    }

    /// Writes `changed` as the next build's dump and `accepted` as its accepted breaks,
    /// and runs the release check on them.
    fn check(&self, changed: &VmStateDump, accepted: &str) -> (String, Vec<String>) {
        let path = self.dir.join("changed.json");
        std::fs::write(&path, changed.to_json()).expect("write the changed dump");
        std::fs::write(self.dir.join("compat/accepted-breaks.toml"), accepted)
            .expect("write the accepted breaks");
        let accepted = read_accepted(self.dir.path());
        let problems = accepted_problems(&accepted, &self.releases);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        let failures = check_releases(self.dir.path(), &self.releases, &accepted, &path);
        (path.display().to_string(), failures)
    }
}

/// This build's dump, as a release and as the starting point of a change.
fn released() -> VmStateDump {
    dump(
        machine::RELEASE,
        &machine::registry(),
        &machine::state_schemas(),
    )
    .expect("this release dumps")
}

#[test]
fn a_field_removed_without_a_version_step_is_caught() {
    let release = released();
    let repo = ScratchRepo::new("field-removed", &release);

    // The last field of the first device state that has one, gone at the same version.
    let mut changed = release.clone();
    let device = changed
        .devices
        .iter_mut()
        .find(|d| !d.fields.is_empty())
        .expect("a device state with fields");
    let field = device.fields.pop().expect("a field");
    device.max_encoded_size -= field.max_encoded_size;
    let (device, field) = (device.name.clone(), field.name);
    VmStateDump::from_json(&changed.to_json()).expect("the edited dump is still a valid dump");

    let findings = check(&release, &changed);
    assert!(
        findings.iter().any(|f| matches!(f,
            Finding::FieldRemoved { device: d, subsection: None, field: n, .. }
                if *d == device && *n == field)),
        "removing {device}.{field} is not a FieldRemoved finding: {findings:?}"
    );

    let (path, failures) = repo.check(&changed, "");
    let text = failures.join("\n");
    assert_eq!(failures.len(), 1, "{path}: {text}");
    assert!(
        text.contains(&format!(
            "device state {device}: field {field} (since version"
        )) && text.contains("without a version step"),
        "{text}"
    );
}

/// Another valid value of a property of kind `kind` than `default`.
fn other_value(kind: &PropKindDump, default: &str) -> Option<String> {
    match kind {
        PropKindDump::Bool => Some(if default == "on" { "off" } else { "on" }.to_string()),
        PropKindDump::U64 { min, max } | PropKindDump::Size { min, max } => {
            let d: u64 = default.parse().ok()?;
            [*min, *max]
                .into_iter()
                .find(|v| *v != d)
                .map(|v| v.to_string())
        }
        PropKindDump::Enum { words } => words.iter().find(|w| *w != default).cloned(),
    }
}

/// This build's dump with the default of its first wire property (or any property, when
/// none is on the wire) changed, and nothing else: (dump, driver, property, old default).
fn default_changed(release: &VmStateDump) -> (VmStateDump, String, String, String) {
    let mut changed = release.clone();
    let mut props: Vec<(usize, usize)> = Vec::new();
    for (d, driver) in changed.drivers.iter().enumerate() {
        for (p, _) in driver.properties.iter().enumerate() {
            props.push((d, p));
        }
    }
    props.sort_by_key(|&(d, p)| !changed.drivers[d].properties[p].wire);
    let (d, p, new_default) = props
        .into_iter()
        .find_map(|(d, p)| {
            let prop = &changed.drivers[d].properties[p];
            other_value(&prop.kind, &prop.default).map(|v| (d, p, v))
        })
        .expect("a property with another valid value");
    let driver = changed.drivers[d].name.clone();
    let prop = &mut changed.drivers[d].properties[p];
    let property = prop.name.clone();
    let old_default = std::mem::replace(&mut prop.default, new_default);
    (changed, driver, property, old_default)
}

#[test]
fn a_default_changed_without_a_compat_entry_is_caught() {
    let release = released();
    let repo = ScratchRepo::new("default-changed", &release);
    let (changed, driver, property, old_default) = default_changed(&release);
    let machine = release.machines[0].name.clone();
    VmStateDump::from_json(&changed.to_json()).expect("the edited dump is still a valid dump");

    let findings = check(&release, &changed);
    assert!(
        findings.iter().any(|f| matches!(f,
            Finding::ValueChanged { machine: m, driver: d, property: p, old_value, default_changed_to: Some(_), .. }
                if *m == machine && *d == driver && *p == property && *old_value == old_default)),
        "changing the default of {driver}.{property} is not a ValueChanged finding: {findings:?}"
    );

    let (path, failures) = repo.check(&changed, "");
    let text = failures.join("\n");
    assert_eq!(failures.len(), 1, "{path}: {text}");
    assert!(
        text.contains(&format!(
            "machine type {machine}: {driver}.{property} is {old_default} under OLD"
        )) && text.contains(&format!(
            "no compat entry sets {driver}.{property}={old_default} for {machine}"
        )),
        "{text}"
    );
}

#[test]
fn a_default_changed_with_its_machine_type_and_compat_entry_passes() {
    let release = released();
    let repo = ScratchRepo::new("default-pinned", &release);
    let (mut changed, driver, property, old_default) = default_changed(&release);

    // What RELEASING.md asks for: the next version's machine type first, and the entry
    // restoring the old value in the table of the released one.
    let (x, y, _) = version(&release.release).expect("this build's version is X.Y.Z");
    let next = format!("ferry-{x}.{}", y + 1);
    changed.release = format!("{x}.{}.0", y + 1);
    changed.machines[0].compat.push(CompatEntryDump {
        driver,
        property,
        value: old_default,
    });
    changed.machines.insert(
        0,
        MachineDump {
            name: next,
            release: format!("{x}.{}", y + 1),
            doc: "the next release".to_string(),
            compat: Vec::new(),
        },
    );
    VmStateDump::from_json(&changed.to_json()).expect("the edited dump is still a valid dump");

    assert_eq!(check(&release, &changed), vec![]);
    let (path, failures) = repo.check(&changed, "");
    assert!(failures.is_empty(), "{path}: {}", failures.join("\n"));
}

#[test]
fn a_version_step_passes_only_while_it_is_accepted() {
    let release = released();
    let repo = ScratchRepo::new("version-step", &release);

    // State rule 2: a new field at a new version. The release loads the old version only.
    let mut changed = release.clone();
    let device = &mut changed.devices[0];
    device.version += 1;
    device.max_encoded_size += 4;
    device.fields.push(
        serde_json::from_value(serde_json::json!({
            "name": "extra", "kind": {"type": "u32"}, "since": device.version,
            "encoded_size": 4, "max_encoded_size": 4
        }))
        .expect("a field"),
    );
    let (name, stepped) = (device.name.clone(), device.version);
    VmStateDump::from_json(&changed.to_json()).expect("the edited dump is still a valid dump");
    let findings = check(&release, &changed);
    assert!(
        matches!(&findings[..], [Finding::OldCannotLoadNew { device, new_version, .. }]
            if *device == name && *new_version == stepped),
        "{findings:?}"
    );

    let (path, failures) = repo.check(&changed, "");
    let text = failures.join("\n");
    assert_eq!(failures.len(), 1, "{path}: {text}");
    assert!(
        text.contains(&format!(
            "device state {name}: NEW writes version {stepped}"
        )),
        "{text}"
    );

    let accepted = format!(
        "[[break]]\nrelease = \"{}\"\nkind = \"old-cannot-load-new\"\ndevice = \"{name}\"\n\
         version = {stepped}\nwhy = \"a test\"\n",
        release.release
    );
    let (path, failures) = repo.check(&changed, &accepted);
    assert!(failures.is_empty(), "{path}: {}", failures.join("\n"));

    // Accepting a break that is not there fails: it would let a later one through.
    let (path, failures) = repo.check(&release, &accepted);
    let text = failures.join("\n");
    assert_eq!(failures.len(), 1, "{path}: {text}");
    assert!(text.contains("matches no finding"), "{text}");

    // A finding with a compatible fix cannot be accepted.
    let field_removed: AcceptedFile =
        toml::from_str(&accepted.replace("old-cannot-load-new", "field-removed")).expect("parses");
    let problems = accepted_problems(&field_removed.breaks, &repo.releases);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("only old-cannot-load-new")),
        "{problems:?}"
    );
}
