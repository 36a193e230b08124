//! The checks, in the order the engine exercises a VM: shape, running with the log on,
//! pause, harvests, restore, state save on the source and load on the destination.

use std::any::Any;
use std::collections::HashSet;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;

use super::{checks, Failure, Options, Report, Role};
use crate::engine::bitmap::DirtyBitmap;
use crate::engine::error_chain;
use crate::engine::vm::{DeviceInfo, GuestRam, MigratableVm, RamBlock, VmError};
use crate::state::{self, DeviceState, FieldKind, FieldSchema, StateSchema, Value};
use crate::PAGE_SIZE;

/// Runs checks, collecting the names that passed and the notes they made.
#[derive(Default)]
struct Runner {
    passed: Vec<&'static str>,
    notes: Vec<String>,
}

impl Runner {
    /// Runs one check; a panic inside it is that check's failure.
    fn check<T>(
        &mut self,
        name: &'static str,
        body: impl FnOnce(&mut Vec<String>) -> Result<T, String>,
    ) -> Result<T, Failure> {
        let mut notes = Vec::new();
        let result = panic::catch_unwind(AssertUnwindSafe(|| body(&mut notes)));
        self.notes
            .extend(notes.into_iter().map(|n| format!("{name}: {n}")));
        let message = match result {
            Ok(Ok(value)) => {
                if !self.passed.contains(&name) {
                    self.passed.push(name);
                }
                return Ok(value);
            }
            Ok(Err(message)) => message,
            Err(payload) => format!("panicked: {}", panic_message(&*payload)),
        };
        Err(Failure {
            check: name,
            message,
        })
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string payload".to_string()
    }
}

fn failed(what: &str, e: &VmError) -> String {
    format!("{what} failed: {}", error_chain(e))
}

/// A VM's RAM as first seen: the handle, its blocks and their host addresses.
struct RamView {
    ram: Arc<dyn GuestRam>,
    blocks: Vec<RamBlock>,
    ptrs: Vec<usize>,
}

impl RamView {
    fn at(&self, block: usize, page: usize) -> String {
        let b = &self.blocks[block];
        format!(
            "block {} page {page} (gpa {:#x})",
            b.name,
            b.gpa + (page * PAGE_SIZE) as u64
        )
    }

    fn bitmaps(&self) -> Vec<DirtyBitmap> {
        self.blocks
            .iter()
            .map(|b| DirtyBitmap::new(b.pages()))
            .collect()
    }

    /// One harvest of every block, each into a fresh bitmap.
    fn harvest(&self, vm: &dyn MigratableVm) -> Result<Vec<DirtyBitmap>, String> {
        let out = self.bitmaps();
        for (b, bm) in out.iter().enumerate() {
            vm.dirty_log()
                .harvest(b, bm)
                .map_err(|e| failed(&format!("harvest of block {}", self.blocks[b].name), &e))?;
        }
        Ok(out)
    }

    /// The content hash of every page. Guest RAM is read with plain copies: the VM is
    /// paused whenever the suite calls this, unless it breaks `pause`'s contract.
    fn snapshot(&self) -> Vec<Vec<u64>> {
        let mut buf = vec![0u8; PAGE_SIZE];
        self.blocks
            .iter()
            .enumerate()
            .map(|(b, block)| {
                let base = self.ram.host_ptr(b);
                (0..block.pages())
                    .map(|p| {
                        // SAFETY: `GuestRam` guarantees `host_ptr(b)` starts a readable
                        // mapping of `block.size` bytes that lives as long as `self.ram`,
                        // which we hold; page `p` lies inside it, and `buf` is our own
                        // buffer of one page, so the ranges cannot overlap.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                base.add(p * PAGE_SIZE).cast_const(),
                                buf.as_mut_ptr(),
                                PAGE_SIZE,
                            )
                        };
                        xxh3_64(&buf)
                    })
                    .collect()
            })
            .collect()
    }

    /// Pages whose hash differs between two snapshots.
    fn changed(before: &[Vec<u64>], after: &[Vec<u64>]) -> Vec<(usize, usize)> {
        before
            .iter()
            .zip(after)
            .enumerate()
            .flat_map(|(b, (x, y))| {
                x.iter()
                    .zip(y)
                    .enumerate()
                    .filter(|(_, (a, c))| a != c)
                    .map(move |(p, _)| (b, p))
            })
            .collect()
    }

    fn list(&self, pages: &[(usize, usize)]) -> String {
        let shown: Vec<String> = pages.iter().take(4).map(|&(b, p)| self.at(b, p)).collect();
        let more = pages.len().saturating_sub(shown.len());
        if more > 0 {
            format!("{} and {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        }
    }
}

fn zero_page_hash() -> u64 {
    static HASH: OnceLock<u64> = OnceLock::new();
    *HASH.get_or_init(|| xxh3_64(&[0u8; PAGE_SIZE]))
}

fn set_pages(bitmaps: &[DirtyBitmap]) -> Vec<(usize, usize)> {
    bitmaps
        .iter()
        .enumerate()
        .flat_map(|(b, bm)| {
            (0..bm.words()).flat_map(move |w| {
                let bits = bm.word(w);
                (0..64)
                    .filter(move |i| bits & (1u64 << i) != 0)
                    .map(move |i| (b, w * 64 + i))
            })
        })
        .collect()
}

fn count(bitmaps: &[DirtyBitmap]) -> usize {
    bitmaps.iter().map(DirtyBitmap::count).sum()
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

pub(super) fn run(
    make: &dyn Fn(Role) -> Arc<dyn MigratableVm>,
    opts: &Options,
) -> Result<Report, Failure> {
    let started = Instant::now();
    let mut r = Runner::default();
    let src_vm = make(Role::Source);
    let dst_vm = make(Role::Incoming);
    let (src, dst) = (&*src_vm, &*dst_vm);

    r.check(checks::SCHEMAS, |_| {
        check_schemas("the source", src)?;
        check_schemas("the incoming VM", dst)
    })?;
    let sram = r.check(checks::RAM_BLOCKS, |notes| {
        check_blocks("the source", src, notes)
    })?;
    let dram = r.check(checks::RAM_BLOCKS, |notes| {
        check_blocks("the incoming VM", dst, notes)
    })?;
    r.check(checks::SHAPE, |_| check_shape(src, dst, &sram, &dram))?;
    r.check(checks::INCOMING_STOPPED, |_| {
        if dst.is_running() {
            Err(
                "the incoming VM is running as created; a destination must be created paused"
                    .into(),
            )
        } else {
            Ok(())
        }
    })?;

    // Running, with the log on, until the guest has written something.
    r.check(checks::RESUME, |notes| {
        if !src.is_running() {
            notes.push("the source was created paused; the kit resumed it".into());
            src.resume().map_err(|e| failed("resume()", &e))?;
            if !src.is_running() {
                return Err("is_running() is false after resume() returned".into());
            }
        }
        Ok(())
    })?;
    r.check(checks::DIRTY_START, |_| {
        src.dirty_log()
            .start()
            .map_err(|e| failed("dirty_log().start()", &e))
    })?;
    let first = r.check(checks::DIRTY_GUEST_WRITES, |_| {
        let acc = sram.bitmaps();
        if wait_for_writes(src, &sram, &acc, opts)? {
            Ok(acc)
        } else {
            Err(format!(
                "no harvest reported a page within {} of start(); the kit needs a guest that \
                 writes memory by itself while it runs, and a dirty log that records it",
                ms(opts.timeout)
            ))
        }
    })?;

    // Paused: nothing may change any more.
    r.check(checks::PAUSE, |_| {
        src.pause().map_err(|e| failed("pause()", &e))?;
        if src.is_running() {
            return Err("is_running() is still true after pause() returned".into());
        }
        Ok(())
    })?;
    let (snap, stray) = r.check(checks::PAUSE, |_| {
        sram.harvest(src)?;
        let before = sram.snapshot();
        thread::sleep(opts.settle);
        let after = sram.snapshot();
        let changed = RamView::changed(&before, &after);
        if !changed.is_empty() {
            return Err(format!(
                "guest RAM changed in the {} after pause() returned: {}",
                ms(opts.settle),
                sram.list(&changed)
            ));
        }
        let late = sram.harvest(src)?;
        let again = sram.harvest(src)?;
        if count(&late) > 0 && count(&again) == 0 {
            return Err(format!(
                "the dirty log reports pages written after pause() returned: {}",
                sram.list(&set_pages(&late))
            ));
        }
        Ok((after, again))
    })?;
    r.check(checks::PAUSE_TWICE, |_| {
        src.pause().map_err(|e| failed("a second pause()", &e))?;
        if src.is_running() {
            return Err("is_running() is true after a second pause()".into());
        }
        Ok(())
    })?;
    r.check(checks::DIRTY_HARVEST_CLEARS, |_| {
        if count(&stray) > 0 {
            return Err(format!(
                "two harvests in a row on the paused VM (whose RAM did not change) both \
                 reported pages: {}; a harvest must forget what it reports",
                sram.list(&set_pages(&stray))
            ));
        }
        Ok(())
    })?;
    r.check(checks::RAM_POPULATED, |_| {
        check_populated("the paused source", &sram, &snap)?;
        check_populated("the incoming VM", &dram, &dram.snapshot())
    })?;
    r.check(checks::DIRTY_RESTORE, |_| {
        for (b, bm) in sram.bitmaps().iter().enumerate() {
            src.dirty_log().restore(b, bm);
        }
        let none = sram.harvest(src)?;
        if count(&none) > 0 {
            return Err(format!(
                "after a restore of no pages the harvest reported {}",
                sram.list(&set_pages(&none))
            ));
        }
        for (b, bm) in first.iter().enumerate() {
            src.dirty_log().restore(b, bm);
        }
        let back = sram.harvest(src)?;
        let missing: Vec<_> = set_pages(&first)
            .into_iter()
            .filter(|&(b, p)| !back[b].is_set(p))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "restore() put back {} pages and the next harvest reported {} of them; \
                 missing: {}",
                count(&first),
                count(&first) - missing.len(),
                sram.list(&missing)
            ));
        }
        let again = sram.harvest(src)?;
        if count(&again) > 0 {
            return Err(format!(
                "the harvest after the one that took the restored pages reported them again: {}",
                sram.list(&set_pages(&again))
            ));
        }
        Ok(())
    })?;

    // Running again: every page that changes must be in some harvest.
    let before = sram.snapshot();
    r.check(checks::RESUME, |_| resume(src))?;
    let acc = sram.bitmaps();
    let wrote = r.check(checks::DIRTY_TRACKS_WRITES, |_| {
        wait_for_writes(src, &sram, &acc, opts)
    })?;
    if !wrote {
        // Nothing in the log: either the guest did not run, or the log missed it.
        let changed = RamView::changed(&before, &sram.snapshot());
        let (check, message) = if changed.is_empty() {
            (
                checks::RESUME,
                format!(
                    "guest RAM did not change within {} of resume(): the guest does not run",
                    ms(opts.timeout)
                ),
            )
        } else {
            (
                checks::DIRTY_TRACKS_WRITES,
                format!(
                    "after resume() {} pages changed but no harvest reported any: {}",
                    changed.len(),
                    sram.list(&changed)
                ),
            )
        };
        r.check(check, |_| Err::<(), _>(message))?;
    }
    r.check(checks::PAUSE, |_| {
        src.pause().map_err(|e| failed("pause()", &e))
    })?;
    r.check(checks::DIRTY_TRACKS_WRITES, |_| {
        for (a, h) in acc.iter().zip(sram.harvest(src)?) {
            a.or_from(&h);
        }
        let after = sram.snapshot();
        let unseen: Vec<_> = RamView::changed(&before, &after)
            .into_iter()
            .filter(|&(b, p)| !acc[b].is_set(p))
            .collect();
        if !unseen.is_empty() {
            return Err(format!(
                "{} pages changed while the log was on but no harvest reported them: {}",
                unseen.len(),
                sram.list(&unseen)
            ));
        }
        Ok(())
    })?;
    r.check(checks::DIRTY_STOP, |_| {
        src.dirty_log().stop();
        src.dirty_log()
            .start()
            .map_err(|e| failed("start() after stop() (a retried migration)", &e))?;
        sram.harvest(src)?;
        src.dirty_log().stop();
        Ok(())
    })?;

    // State: saved on the paused source, loaded into the incoming VM.
    let saved = r.check(checks::STATE_SAVE, |notes| save_all(src, notes))?;
    r.check(checks::STATE_SAVE_INTERRUPTED, |_| {
        for ((unit, schema, label), (_, _, _, bytes)) in units(src).into_iter().zip(&saved.units) {
            let Unit::Device(i) = unit else { continue };
            let mut sink = Breaks {
                left: bytes.len() / 2,
            };
            let mut w = state::StateWriter::new(schema, &mut sink);
            if src.save_device(i, &mut w).is_ok() {
                return Err(format!(
                    "{label}: save_device returned Ok although its stream broke after {} of its {} bytes",
                    bytes.len() / 2,
                    bytes.len()
                ));
            }
        }
        resume(src).map_err(|e| format!("after device saves cut by a broken stream, {e}"))?;
        src.pause().map_err(|e| failed("pause() after that resume", &e))
    })?;
    r.check(checks::STATE_LOAD, |notes| load_all(dst, &saved, notes))?;
    r.check(checks::STATE_OLDER_VERSIONS, |_| {
        for_each_state(dst, &saved, |unit, label, schema, decoded| {
            for v in schema.min_version..schema.version {
                let older = as_decoded_at(schema, decoded, v);
                unit.load(dst, schema, older).map_err(|e| {
                    failed(
                        &format!(
                            "loading {label} as a version {v} stream decodes (the fields added \
                             after version {v} zero, no subsections)"
                        ),
                        &e,
                    )
                })?;
            }
            if !decoded.subsections.is_empty() {
                let bare = DeviceState {
                    subsections: Vec::new(),
                    ..decoded.clone()
                };
                unit.load(dst, schema, bare).map_err(|e| {
                    failed(
                        &format!("loading {label} without its optional subsections"),
                        &e,
                    )
                })?;
            }
            Ok(())
        })
    })?;
    r.check(checks::STATE_REFUSES_VERSION, |notes| {
        for_each_state(dst, &saved, |unit, label, schema, decoded| {
            let bytes = state::encode(schema, decoded).map_err(|e| e.to_string())?;
            let bad = [
                schema.version.checked_add(1),
                schema.min_version.checked_sub(1),
            ];
            let mut accepted = Vec::new();
            for v in bad.into_iter().flatten() {
                if state::decode(schema, v, &bytes).is_ok() {
                    return Err(format!(
                        "{label}: bytes claiming version {v} decode, outside {}..={}",
                        schema.min_version, schema.version
                    ));
                }
                let st = DeviceState {
                    version: v,
                    ..decoded.clone()
                };
                if unit.load(dst, schema, st).is_ok() {
                    accepted.push(v.to_string());
                }
            }
            if !accepted.is_empty() {
                notes.push(format!(
                    "{label} loads states at version {} although its schema loads {}..={} \
                     (the engine decodes first, so it never passes one)",
                    accepted.join(" and "),
                    schema.min_version,
                    schema.version
                ));
            }
            Ok(())
        })
    })?;
    r.check(checks::STATE_REFUSES_FOREIGN, |_| {
        for_each_state(dst, &saved, |unit, label, schema, _| {
            if schema.fields_at(schema.version).next().is_none() {
                return Ok(());
            }
            if let Unit::Device(_) = unit {
                // A device reads bytes: give it those of another schema, unless they
                // happen to be a valid state of its own.
                let bytes =
                    state::encode(&FOREIGN, &foreign_state(&FOREIGN)).map_err(|e| e.to_string())?;
                if state::decode(schema, schema.version, &bytes).is_err()
                    && unit.load_bytes(dst, schema, schema.version, &bytes).is_ok()
                {
                    return Err(format!(
                        "{label} accepted the bytes of a state of another schema, none of {}",
                        schema.name
                    ));
                }
                // Values of the wrong kind cannot be written as its state at all.
                return Ok(());
            }
            if unit.load(dst, schema, foreign_state(schema)).is_ok() {
                return Err(format!(
                    "{label} accepted a state of another schema, without any field of {}",
                    schema.name
                ));
            }
            if unit.load(dst, schema, wrong_kinds(schema)).is_ok() {
                return Err(format!(
                    "{label} accepted a state whose fields hold the wrong kinds of value for {}",
                    schema.name
                ));
            }
            Ok(())
        })
    })?;

    // A failed migration resumes the source after saving its state.
    r.check(checks::RESUME, |_| resume(src))?;
    r.check(checks::RAM_STABLE, |_| {
        check_stable("the source", src, &sram)?;
        check_stable("the incoming VM", dst, &dram)
    })?;

    Ok(Report {
        passed: r.passed,
        notes: r.notes,
        shape: describe(src, &sram),
        elapsed: started.elapsed(),
    })
}

fn resume(vm: &dyn MigratableVm) -> Result<(), String> {
    vm.resume().map_err(|e| failed("resume()", &e))?;
    if !vm.is_running() {
        return Err("is_running() is false after resume() returned".into());
    }
    Ok(())
}

/// Harvests into `acc` until it holds a page, for at most `opts.timeout`.
fn wait_for_writes(
    vm: &dyn MigratableVm,
    ram: &RamView,
    acc: &[DirtyBitmap],
    opts: &Options,
) -> Result<bool, String> {
    let deadline = Instant::now() + opts.timeout;
    loop {
        for (a, h) in acc.iter().zip(ram.harvest(vm)?) {
            a.or_from(&h);
        }
        if count(acc) > 0 {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        thread::sleep(opts.poll);
    }
}

fn check_schemas(who: &str, vm: &dyn MigratableVm) -> Result<(), String> {
    let vs = vm.vcpu_schema();
    vs.validate()
        .map_err(|e| format!("{who}'s vCPU schema: {e}"))?;
    let mut seen = HashSet::new();
    for d in vm.devices() {
        d.schema
            .validate()
            .map_err(|e| format!("{who}'s device {}: {e}", d.name))?;
        if d.name != d.schema.name {
            return Err(format!(
                "{who}'s device {} has a schema named {}; a device is named after its schema",
                d.name, d.schema.name
            ));
        }
        if !seen.insert((d.name.clone(), d.instance)) {
            return Err(format!(
                "{who} lists device {} instance {} twice",
                d.name, d.instance
            ));
        }
    }
    Ok(())
}

fn check_blocks(
    who: &str,
    vm: &dyn MigratableVm,
    notes: &mut Vec<String>,
) -> Result<RamView, String> {
    let ram = vm.ram();
    let blocks = ram.blocks().to_vec();
    if blocks.is_empty() {
        return Err(format!("{who} has no RAM blocks"));
    }
    let mut names = HashSet::new();
    let mut ranges = Vec::new();
    let mut hosts = Vec::new();
    let mut ptrs = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        let label = format!("{who}'s block {i} ({:?})", b.name);
        if b.name.is_empty() {
            return Err(format!("{label} has an empty name"));
        }
        if !names.insert(b.name.as_str()) {
            return Err(format!("{label}: two blocks have this name"));
        }
        if b.size % PAGE_SIZE as u64 != 0 {
            return Err(format!(
                "{label} is {} bytes, not a multiple of {PAGE_SIZE}",
                b.size
            ));
        }
        if b.size == 0 {
            notes.push(format!("{label} is empty"));
        }
        if b.gpa % PAGE_SIZE as u64 != 0 {
            notes.push(format!(
                "{label} starts at gpa {:#x}, not page-aligned",
                b.gpa
            ));
        }
        let end = b.gpa.checked_add(b.size).ok_or_else(|| {
            format!(
                "{label}: gpa {:#x} + size {:#x} wraps around",
                b.gpa, b.size
            )
        })?;
        ranges.push((b.gpa, end, i));
        let p = ram.host_ptr(i);
        if p.is_null() {
            return Err(format!("{label}: host_ptr() is null"));
        }
        if p as usize % PAGE_SIZE != 0 {
            notes.push(format!("{label}: host_ptr() {p:p} is not page-aligned"));
        }
        if ram.host_ptr(i) != p {
            return Err(format!("{label}: host_ptr() changed between two calls"));
        }
        hosts.push((p as u64, p as u64 + b.size, i));
        ptrs.push(p as usize);
    }
    for (what, list) in [("guest-physical", &mut ranges), ("host", &mut hosts)] {
        list.sort_unstable();
        for w in list.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(format!(
                    "{who}'s blocks {:?} and {:?} overlap in {what} memory ({:#x}..{:#x} and \
                     {:#x}..{:#x})",
                    blocks[w[0].2].name, blocks[w[1].2].name, w[0].0, w[0].1, w[1].0, w[1].1
                ));
            }
        }
    }
    let view = RamView { ram, blocks, ptrs };
    check_stable(who, vm, &view)?;
    Ok(view)
}

/// The VM's RAM, through a new handle, is the one first seen.
fn check_stable(who: &str, vm: &dyn MigratableVm, view: &RamView) -> Result<(), String> {
    for (what, ram) in [("first", &view.ram), ("new", &vm.ram())] {
        if ram.blocks() != view.blocks.as_slice() {
            return Err(format!(
                "{who}'s blocks through the {what} ram() handle are {:?}, first seen as {:?}",
                ram.blocks(),
                view.blocks
            ));
        }
        for (i, &p) in view.ptrs.iter().enumerate() {
            if ram.host_ptr(i) as usize != p {
                return Err(format!(
                    "{who}'s block {:?}: host_ptr() through the {what} ram() handle is {:#x}, \
                     first seen as {p:#x}",
                    view.blocks[i].name,
                    ram.host_ptr(i) as usize
                ));
            }
        }
    }
    Ok(())
}

fn check_shape(
    src: &dyn MigratableVm,
    dst: &dyn MigratableVm,
    sram: &RamView,
    dram: &RamView,
) -> Result<(), String> {
    if sram.blocks != dram.blocks {
        return Err(format!(
            "the source's blocks {:?} differ from the incoming VM's {:?}",
            sram.blocks, dram.blocks
        ));
    }
    if src.vcpu_count() != dst.vcpu_count() {
        return Err(format!(
            "the source has {} vCPUs, the incoming VM {}",
            src.vcpu_count(),
            dst.vcpu_count()
        ));
    }
    if src.vcpu_schema() != dst.vcpu_schema() {
        return Err(format!(
            "vCPU schemas differ: {} v{} on the source, {} v{} on the incoming VM",
            src.vcpu_schema().name,
            src.vcpu_schema().version,
            dst.vcpu_schema().name,
            dst.vcpu_schema().version
        ));
    }
    let key = |d: &DeviceInfo| (d.name.clone(), d.instance, *d.schema, d.config.clone());
    for (who, vm) in [("the source", src), ("the incoming VM", dst)] {
        let a: Vec<_> = vm.devices().iter().map(key).collect();
        let b: Vec<_> = vm.devices().iter().map(key).collect();
        if a != b {
            return Err(format!("{who}'s devices() changed between two calls"));
        }
    }
    let (s, d) = (src.devices(), dst.devices());
    let s_keys: Vec<_> = s.iter().map(key).collect();
    let d_keys: Vec<_> = d.iter().map(key).collect();
    if s_keys != d_keys {
        let names = |v: &[DeviceInfo]| {
            v.iter()
                .map(|d| {
                    format!(
                        "{}#{} v{} {:?}",
                        d.name, d.instance, d.schema.version, d.config
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(format!(
            "devices differ: [{}] on the source, [{}] on the incoming VM",
            names(&s),
            names(&d)
        ));
    }
    Ok(())
}

fn check_populated(who: &str, view: &RamView, snap: &[Vec<u64>]) -> Result<(), String> {
    let zero = zero_page_hash();
    let mut unmarked = Vec::new();
    for (b, block) in view.blocks.iter().enumerate() {
        let bm = DirtyBitmap::new(block.pages());
        view.ram.populated(b, &bm);
        unmarked.extend(
            (0..block.pages())
                .filter(|&p| !bm.is_set(p) && snap[b][p] != zero)
                .map(|p| (b, p)),
        );
    }
    if unmarked.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{who}: {} pages hold data but populated() does not mark them: {}",
            unmarked.len(),
            view.list(&unmarked)
        ))
    }
}

/// A vCPU or a device: what one state belongs to.
#[derive(Debug, Clone, Copy)]
enum Unit {
    Vcpu(usize),
    Device(usize),
}

impl Unit {
    /// Saves the unit on a paused VM: its bytes, as the engine puts them on the wire.
    fn save(self, vm: &dyn MigratableVm, schema: &'static StateSchema) -> Result<Vec<u8>, VmError> {
        match self {
            Unit::Vcpu(i) => Ok(state::encode(schema, &vm.save_vcpu(i)?)?),
            Unit::Device(i) => state::save_to_vec(schema, |w| vm.save_device(i, w)),
        }
    }

    /// Loads `bytes`, a state at `version`, as the engine's destination does.
    fn load_bytes(
        self,
        vm: &dyn MigratableVm,
        schema: &'static StateSchema,
        version: u32,
        bytes: &[u8],
    ) -> Result<(), VmError> {
        match self {
            Unit::Vcpu(i) => vm.load_vcpu(i, state::decode(schema, version, bytes)?),
            Unit::Device(i) => {
                state::load_from_slice(schema, version, bytes, |r| vm.load_device(i, r))
            }
        }
    }

    /// Loads a state given as values. A vCPU gets it as it is; a device gets its bytes at
    /// `st.version`, since devices load from the stream (a state the codec cannot write
    /// at all does not reach one).
    fn load(
        self,
        vm: &dyn MigratableVm,
        schema: &'static StateSchema,
        st: DeviceState,
    ) -> Result<(), VmError> {
        match self {
            Unit::Vcpu(i) => vm.load_vcpu(i, st),
            Unit::Device(_) => {
                let bytes = encode_at(schema, &st, st.version)?;
                self.load_bytes(vm, schema, st.version, &bytes)
            }
        }
    }
}

/// `st` encoded as a release whose schema stopped at `version` writes it (no
/// subsections below the schema's own version).
fn encode_at(
    schema: &'static StateSchema,
    st: &DeviceState,
    version: u32,
) -> Result<Vec<u8>, state::StateError> {
    if version >= schema.version {
        return state::encode(schema, st);
    }
    let fields: Vec<FieldSchema> = schema.fields_at(version).copied().collect();
    let older: &'static StateSchema = Box::leak(Box::new(StateSchema {
        version,
        min_version: schema.min_version.min(version),
        fields: Box::leak(fields.into_boxed_slice()),
        subsections: &[],
        ..*schema
    }));
    let st = DeviceState {
        fields: st
            .fields
            .iter()
            .filter(|(n, _)| older.fields.iter().any(|f| f.name == n))
            .cloned()
            .collect(),
        subsections: Vec::new(),
        ..st.clone()
    };
    state::encode(older, &st)
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unit::Vcpu(i) => write!(f, "vCPU {i}"),
            Unit::Device(i) => write!(f, "device {i}"),
        }
    }
}

/// What the source saved: per unit, its schema and the encoded bytes.
struct Saved {
    units: Vec<(Unit, &'static StateSchema, String, Vec<u8>)>,
}

fn units(vm: &dyn MigratableVm) -> Vec<(Unit, &'static StateSchema, String)> {
    let vs = vm.vcpu_schema();
    (0..vm.vcpu_count())
        .map(|i| (Unit::Vcpu(i), vs, format!("vCPU {i} ({})", vs.name)))
        .chain(vm.devices().iter().enumerate().map(|(i, d)| {
            (
                Unit::Device(i),
                d.schema,
                format!("device {i} ({}#{})", d.name, d.instance),
            )
        }))
        .collect()
}

fn save_all(src: &dyn MigratableVm, notes: &mut Vec<String>) -> Result<Saved, String> {
    let mut out = Vec::new();
    for (unit, schema, label) in units(src) {
        let bytes = unit
            .save(src, schema)
            .map_err(|e| failed(&format!("saving {label} on the paused source"), &e))?;
        match unit.save(src, schema) {
            Ok(again) if again != bytes => notes.push(format!(
                "{label} saved twice while paused gives different states ({})",
                differing(schema, &bytes, &again)
            )),
            Ok(_) => {}
            Err(e) => return Err(failed(&format!("saving {label} a second time"), &e)),
        }
        out.push((unit, schema, label, bytes));
    }
    Ok(Saved { units: out })
}

/// The fields and subsections that differ between two encodings of one schema.
fn differing(schema: &StateSchema, a: &[u8], b: &[u8]) -> String {
    let (Ok(a), Ok(b)) = (
        state::decode(schema, schema.version, a),
        state::decode(schema, schema.version, b),
    ) else {
        return "one does not decode".into();
    };
    let mut names: Vec<String> = a
        .fields
        .iter()
        .zip(&b.fields)
        .filter(|(x, y)| x != y)
        .map(|(x, _)| x.0.clone())
        .collect();
    if a.subsections != b.subsections {
        names.push("subsections".into());
    }
    format!("fields {}", names.join(", "))
}

fn load_all(dst: &dyn MigratableVm, saved: &Saved, notes: &mut Vec<String>) -> Result<(), String> {
    let here = units(dst);
    if here.len() != saved.units.len() {
        return Err("the incoming VM has another number of vCPUs and devices".into());
    }
    for ((unit, schema, label), (_, src_schema, _, bytes)) in here.iter().zip(&saved.units) {
        state::decode(schema, src_schema.version, bytes)
            .map_err(|e| format!("decoding {label}'s saved state on the incoming VM: {e}"))?;
        unit.load_bytes(dst, schema, src_schema.version, bytes)
            .map_err(|e| failed(&format!("loading {label} into the incoming VM"), &e))?;
    }
    for ((unit, schema, label), (_, _, _, bytes)) in here.iter().zip(&saved.units) {
        match unit.save(dst, schema) {
            Ok(back) if back != *bytes => notes.push(format!(
                "{label} saved on the incoming VM after its load differs from what was loaded ({})",
                differing(schema, bytes, &back)
            )),
            Ok(_) => {}
            Err(e) => notes.push(format!(
                "{label} cannot be saved on the incoming VM after its load: {}",
                error_chain(&e)
            )),
        }
    }
    Ok(())
}

/// Calls `f` with each unit of `dst`, its label, its schema and the source's state decoded
/// for it.
fn for_each_state(
    dst: &dyn MigratableVm,
    saved: &Saved,
    mut f: impl FnMut(Unit, &str, &'static StateSchema, &DeviceState) -> Result<(), String>,
) -> Result<(), String> {
    for ((unit, schema, label), (_, src_schema, _, bytes)) in
        units(dst).into_iter().zip(&saved.units)
    {
        let decoded =
            state::decode(schema, src_schema.version, bytes).map_err(|e| e.to_string())?;
        f(unit, &label, schema, &decoded)?;
    }
    Ok(())
}

/// What [`state::decode`] gives for a stream at `version` that carried `st`'s values: the
/// fields that version has, the later ones at [`Value::zero`], and no subsections (an
/// older release may not know them).
fn as_decoded_at(schema: &StateSchema, st: &DeviceState, version: u32) -> DeviceState {
    DeviceState {
        version,
        fields: schema
            .fields
            .iter()
            .map(|f| {
                let value = match st.get(f.name) {
                    Some(v) if f.since <= version => v.clone(),
                    _ => Value::zero(f.kind),
                };
                (f.name.to_string(), value)
            })
            .collect(),
        subsections: Vec::new(),
    }
}

/// A stream that breaks after `left` bytes.
struct Breaks {
    left: usize,
}

impl state::StateSink for Breaks {
    fn begin(&mut self, _len: u64) -> std::io::Result<()> {
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.len() > self.left {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        self.left -= bytes.len();
        Ok(())
    }
}

/// The schema of [`foreign_state`].
static FOREIGN: StateSchema = StateSchema {
    name: "ferry-conformance-foreign",
    version: 1,
    min_version: 1,
    fields: &[
        FieldSchema {
            name: "ferry-conformance-foreign",
            kind: FieldKind::U64,
            since: 1,
        },
        FieldSchema {
            name: "ferry-conformance-other",
            kind: FieldKind::Bytes { max_len: 16 },
            since: 1,
        },
    ],
    subsections: &[],
};

/// A state as another schema's decode gives it: none of `schema`'s fields.
fn foreign_state(schema: &StateSchema) -> DeviceState {
    DeviceState {
        version: schema.version,
        ..DeviceState::new()
    }
    .with("ferry-conformance-foreign", Value::U64(0x5eed))
    .with("ferry-conformance-other", Value::Bytes(vec![0xa5; 3]))
}

/// `schema`'s fields, each holding a value of another kind.
fn wrong_kinds(schema: &StateSchema) -> DeviceState {
    DeviceState {
        version: schema.version,
        fields: schema
            .fields_at(schema.version)
            .map(|f| {
                let value = match f.kind {
                    FieldKind::Bytes { .. } | FieldKind::Array { .. } => Value::U64(1),
                    _ => Value::Bytes(vec![1, 2, 3]),
                };
                (f.name.to_string(), value)
            })
            .collect(),
        subsections: Vec::new(),
    }
}

fn describe(vm: &dyn MigratableVm, ram: &RamView) -> String {
    let blocks: Vec<String> = ram
        .blocks
        .iter()
        .map(|b| format!("{} {} KiB at {:#x}", b.name, b.size >> 10, b.gpa))
        .collect();
    let devices: Vec<String> = vm
        .devices()
        .iter()
        .map(|d| format!("{}#{} v{}", d.name, d.instance, d.schema.version))
        .collect();
    format!(
        "blocks [{}], {} vCPUs ({} v{}), devices [{}]",
        blocks.join(", "),
        vm.vcpu_count(),
        vm.vcpu_schema().name,
        vm.vcpu_schema().version,
        devices.join(", ")
    )
}
