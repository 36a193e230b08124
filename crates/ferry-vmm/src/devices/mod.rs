//! Device models of the reference VMM, with versioned migratable state.
//!
//! | device | state schema | what it stands for |
//! |---|---|---|
//! | [`serial::Serial`] | `serial` v1 | the console the KVM guest prints to with `out` on COM1 |
//! | [`accel::Accel`] | `accel` v1 | a VFIO-style device: device-side memory that a device thread changes while it runs, migrated by the VFIO migration v2 state machine |
//!
//! Device models know nothing of KVM: the KVM backend owns them, routes port I/O exits to
//! them through an [`IoBus`], and calls their save and load from its
//! [`MigratableVm`](ferry_migration::engine::vm::MigratableVm) implementation.

use std::ops::Range;
use std::sync::Arc;

pub mod accel;
pub mod serial;

/// A device that answers port I/O.
pub trait PortIoDevice: Send + Sync {
    /// The ports it decodes.
    fn ports(&self) -> Range<u16>;

    /// The guest wrote `data` to the port at `offset` from the start of [`Self::ports`].
    fn write(&self, offset: u16, data: &[u8]);

    /// The guest reads `data.len()` bytes from the port at `offset`.
    fn read(&self, offset: u16, data: &mut [u8]);
}

/// Routes port I/O to the devices that decode it.
#[derive(Default, Clone)]
pub struct IoBus {
    devices: Vec<Arc<dyn PortIoDevice>>,
}

impl std::fmt::Debug for IoBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|d| d.ports()))
            .finish()
    }
}

impl IoBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device`. Its ports must not overlap those of a device already on the bus.
    pub fn with(mut self, device: Arc<dyn PortIoDevice>) -> Self {
        let new = device.ports();
        assert!(
            self.devices
                .iter()
                .all(|d| d.ports().end <= new.start || new.end <= d.ports().start),
            "port range {new:#x?} overlaps a device already on the bus"
        );
        self.devices.push(device);
        self
    }

    fn find(&self, port: u16) -> Option<&Arc<dyn PortIoDevice>> {
        self.devices.iter().find(|d| d.ports().contains(&port))
    }

    /// Whether a device decodes `port`.
    pub fn claims(&self, port: u16) -> bool {
        self.find(port).is_some()
    }

    /// A guest `out`; returns false when no device decodes `port`.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some(d) => {
                d.write(port - d.ports().start, data);
                true
            }
            None => false,
        }
    }

    /// A guest `in`; returns false when no device decodes `port`.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some(d) => {
                d.read(port - d.ports().start, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Probe(Range<u16>, Mutex<Vec<(u16, u8)>>);

    impl PortIoDevice for Probe {
        fn ports(&self) -> Range<u16> {
            self.0.clone()
        }
        fn write(&self, offset: u16, data: &[u8]) {
            self.1.lock().unwrap().push((offset, data[0]));
        }
        fn read(&self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
    }

    #[test]
    fn io_bus_routes_by_port_and_refuses_unclaimed_ports() {
        let a = Arc::new(Probe(0x3f8..0x400, Mutex::default()));
        let b = Arc::new(Probe(0x60..0x61, Mutex::default()));
        let bus = IoBus::new().with(a.clone()).with(b.clone());
        assert!(bus.write(0x3fb, &[7]));
        assert!(bus.write(0x60, &[9]));
        assert!(!bus.write(0x400, &[1]));
        assert!(!bus.claims(0x3f7));
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert_eq!(*a.1.lock().unwrap(), [(3, 7)]);
        assert_eq!(*b.1.lock().unwrap(), [(0, 9)]);
    }

    #[test]
    #[should_panic(expected = "overlaps")]
    fn io_bus_refuses_overlapping_devices() {
        let _ = IoBus::new()
            .with(Arc::new(Probe(0x3f8..0x400, Mutex::default())))
            .with(Arc::new(Probe(0x3ff..0x401, Mutex::default())));
    }
}
