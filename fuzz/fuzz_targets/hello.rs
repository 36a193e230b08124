//! The hello, the largest structure the destination decodes before it has agreed to
//! anything.

#![no_main]

use ferry_migration::wire::{
    Hello, MAX_DEVICES, MAX_NAME_LEN, MAX_PROPS, MAX_RAM_BLOCKS, MAX_VALUE_LEN, MAX_VCPUS,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = Hello::decode(data) else {
        return;
    };
    assert!(h.wire_props.len() <= MAX_PROPS);
    assert!(h.ram_blocks.len() <= MAX_RAM_BLOCKS);
    assert!(h.devices.len() <= MAX_DEVICES);
    assert!(h.vcpu_count <= MAX_VCPUS);
    assert!(h.flags & !Hello::FLAG_FULL_VERIFY == 0);
    let names = [&h.release, &h.machine, &h.vcpu_state]
        .into_iter()
        .chain(h.wire_props.iter().map(|(k, _)| k))
        .chain(h.ram_blocks.iter().map(|b| &b.name))
        .chain(h.devices.iter().map(|d| &d.name));
    for n in names {
        assert!(n.len() <= MAX_NAME_LEN);
    }
    for (_, v) in &h.wire_props {
        assert!(v.len() <= MAX_VALUE_LEN);
    }
    assert_eq!(h.encode(), data, "hello has a second spelling");
});
