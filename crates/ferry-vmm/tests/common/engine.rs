//! For tests that run the engine in process: the identities a `ferry run` of this
//! build states for a machine type's configuration.

use ferry_migration::compat::Config;
use ferry_migration::engine::{DestinationIdentity, SourceIdentity};
use ferry_vmm::machine;

pub fn source_id(c: &Config) -> SourceIdentity {
    SourceIdentity {
        release: machine::RELEASE.into(),
        machine: c.machine().into(),
        wire_props: c.wire_properties(),
        compat_pinned: c.compat_pinned_wire_properties(),
    }
}

pub fn dest_id(c: &Config) -> DestinationIdentity {
    DestinationIdentity {
        release: machine::RELEASE.into(),
        machine: c.machine().into(),
        known_machines: machine::machine_names(),
        wire_props: c.wire_properties(),
        compat_pinned: c.compat_pinned_wire_properties(),
    }
}
