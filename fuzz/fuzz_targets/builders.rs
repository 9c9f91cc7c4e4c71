//! Arbitrary sizes, offsets, ranges, thread counts and flag bits into the
//! kvm-gmem builders and their up-front validation:
//! `GuestMemfd::builder(..).flags(..).create`, `MemoryRegion2::builder(..)
//! .build`, `GuestMemfd::punch_hole`/`allocate`, and `Populate::run`.
//!
//! `/dev/kvm` is opened once, with one VM and two guest_memfds made at
//! start-up (16 pages without MMAP, so no population strategy can write to
//! it; 16 pages with MMAP|INIT_SHARED where the VM offers it, so valid
//! populations really copy, 64 KiB at most). Without `/dev/kvm` the target
//! does nothing. Never a panic; every refusal is a typed `Error::Invalid`,
//! `UnsupportedFlags` or `Unsupported` naming the operation; `Ok` exactly
//! when the documented rules hold; the fd count may not grow.
#![no_main]

use arbitrary::Arbitrary;
use kvm_gmem::populate::{Populate, Source, Strategy};
use kvm_gmem::{
    Error, GuestMemfd, GuestMemfdFlags, KvmDevice, MemoryRegion2, RegionFlags, Vm, VmOps, VmType,
    page_size,
};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Arbitrary, Debug)]
struct Input {
    gmem_size: u64,
    gmem_flags: u64,
    slot: u32,
    gpa: u64,
    slot_size: u64,
    gmem_offset: Option<u64>,
    userspace_addr: u64,
    region_flags: u32,
    range: (u64, u64),
    punch: bool,
    threads: Option<usize>,
    strategy: u8,
    gpa_base: Option<u64>,
    src_len: u16,
    detached: bool,
    mappable: bool,
    small: [bool; 6],
}

struct Fixture {
    _kvm: KvmDevice,
    vm: Vm,
    offered: GuestMemfdFlags,
    plain: GuestMemfd,
    mappable: Option<GuestMemfd>,
    src: Vec<u8>,
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Option<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let kvm = KvmDevice::open().ok()?;
        let vm = kvm.create_vm(VmType::DEFAULT).ok()?;
        let offered = vm.guest_memfd_flags().ok()?;
        let p = page_size();
        let plain = GuestMemfd::builder(16 * p).create(&vm).ok()?;
        let both = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
        let mappable = offered
            .contains(both)
            .then(|| GuestMemfd::builder(16 * p).flags(both).create(&vm).ok())
            .flatten();
        Some(Fixture {
            _kvm: kvm,
            vm,
            offered,
            plain,
            mappable,
            src: (0..16 * p).map(|i| (i % 251) as u8).collect(),
        })
    })
    .as_ref()
}

fn invalid<T: std::fmt::Debug>(r: kvm_gmem::Result<T>, op: &str, rule: &str) {
    match r {
        Err(Error::Invalid { op: o, rule: text }) if o == op && text.contains(rule) => {}
        other => panic!("expected Invalid({op}: ..{rule}..), got {other:?}"),
    }
}

/// Folds an arbitrary u64 into a small page multiple (or a neighbour of
/// one) when `small`, so that valid requests are common too.
fn shape(v: u64, small: bool) -> u64 {
    if !small {
        return v;
    }
    let p = page_size();
    let base = (v % 24) * p;
    match (v >> 8) % 8 {
        0 => base.wrapping_add(1),
        1 => base.wrapping_sub(1),
        _ => base,
    }
}

fn gmem_builder(f: &Fixture, size: u64, bits: u64) {
    let op = "KVM_CREATE_GUEST_MEMFD";
    let p = page_size();
    let flags = GuestMemfdFlags::from_bits_retain(bits);
    let r = GuestMemfd::builder(size).flags(flags).create(&f.vm);
    if size == 0 {
        return invalid(r, op, "non-zero");
    }
    if !size.is_multiple_of(p) {
        return invalid(r, op, "multiple of the page size");
    }
    if size > i64::MAX as u64 {
        return invalid(r, op, "largest file size");
    }
    let missing = flags.difference(f.offered);
    match r {
        Err(Error::UnsupportedFlags {
            op: o,
            unsupported,
            supported,
        }) if !missing.is_empty() => {
            assert_eq!((o, unsupported, supported), (op, missing, f.offered));
        }
        Ok(g) if missing.is_empty() => assert_eq!((g.size(), g.flags()), (size, flags)),
        other => panic!("{size:#x} {flags}: {other:?}"),
    }
}

fn memslot(f: &Fixture, i: &Input, gpa: u64, size: u64, off: Option<u64>) {
    let op = "KVM_SET_USER_MEMORY_REGION2";
    let p = page_size();
    let file = f.plain.size();
    let flags = RegionFlags::from_bits_retain(i.region_flags);
    let b = MemoryRegion2::builder(i.slot, gpa, size)
        .userspace_addr(i.userspace_addr)
        .flags(flags);
    let r = match off {
        Some(o) => b.guest_memfd(&f.plain, o).build(),
        None => b.build(),
    };
    let all = if off.is_some() {
        flags | RegionFlags::GUEST_MEMFD
    } else {
        flags
    };
    if size == 0 {
        return invalid(r, op, "non-zero");
    }
    if !size.is_multiple_of(p) {
        return invalid(r, op, "multiple of the page size");
    }
    if !gpa.is_multiple_of(p) {
        return invalid(r, op, "guest address");
    }
    if gpa.checked_add(size).is_none() {
        return invalid(r, op, "overflows");
    }
    if !i.userspace_addr.is_multiple_of(p) {
        return invalid(r, op, "userspace address");
    }
    if all.bits() & !RegionFlags::all().bits() != 0 {
        return invalid(r, op, "no KVM_MEM_* flag");
    }
    if off.is_none() && all.contains(RegionFlags::GUEST_MEMFD) {
        return invalid(r, op, "no guest_memfd was given");
    }
    if let Some(o) = off {
        if o % p != 0 {
            return invalid(r, op, "guest_memfd offset");
        }
        if o.checked_add(size).is_none_or(|end| end > file) {
            return invalid(r, op, "past the file size");
        }
    }
    let region = r.unwrap_or_else(|e| panic!("refused: {e}"));
    assert_eq!(
        (region.slot(), region.gpa(), region.size(), region.flags()),
        (i.slot, gpa, size, all)
    );
}

fn fallocate(f: &Fixture, a: u64, b: u64, punch: bool) {
    let p = page_size();
    let g = &f.plain;
    let (op, r) = if punch {
        ("fallocate(PUNCH_HOLE)", g.punch_hole(a..b))
    } else {
        ("fallocate(KEEP_SIZE)", g.allocate(a..b))
    };
    if a >= b {
        return invalid(r, op, "empty range");
    }
    if !a.is_multiple_of(p) || !b.is_multiple_of(p) {
        return invalid(r, op, "not page aligned");
    }
    if b > g.size() {
        return invalid(r, op, "past the file size");
    }
    r.unwrap_or_else(|e| panic!("{op} {a:#x}..{b:#x}: {e}"));
}

fn populate(f: &Fixture, i: &Input, a: u64, b: u64) {
    let op = "Populate::run";
    let p = page_size();
    let strategy = match i.strategy % 5 {
        0 => Strategy::Auto,
        1 => Strategy::PopulateIoctl,
        2 => Strategy::Write,
        3 => Strategy::MmapCopy,
        _ => Strategy::UffdCopy,
    };
    let g = match (&f.mappable, i.mappable) {
        (Some(m), true) => m,
        _ => &f.plain,
    };
    let mut pop = if i.detached {
        Populate::detached(g)
    } else {
        Populate::new(&f.vm, g)
    };
    pop = pop.strategy(strategy);
    // A thread count folded to 0..=32 (a huge one on a valid range would
    // start one thread per page).
    let threads = i.threads.map(|t| t % 33);
    if let Some(t) = threads {
        pop = pop.threads(t);
    }
    if let Some(base) = i.gpa_base {
        pop = pop.gpa_base(base);
    }
    let src_len = usize::from(i.src_len) % (f.src.len() + 1);
    let r = pop.run(a..b, Source::bytes(&f.src[..src_len]));
    if threads == Some(0) {
        return invalid(r, op, "threads must be at least 1");
    }
    if a >= b {
        return invalid(r, op, "empty range");
    }
    if !a.is_multiple_of(p) || !b.is_multiple_of(p) {
        return invalid(r, op, "not page aligned");
    }
    if b > g.size() {
        return invalid(r, op, "past the guest_memfd's size");
    }
    if b - a > src_len as u64 {
        return invalid(r, op, "the source must cover the whole range");
    }
    match r {
        Ok(report) => {
            assert_eq!(report.bytes, b - a);
            assert_ne!(report.strategy, Strategy::Auto);
        }
        Err(Error::Invalid { op: o, .. } | Error::Unsupported { op: o, .. }) => {
            assert!(o == op || o == "mmap(guest_memfd)", "{o}");
        }
        Err(Error::Kernel { op: o, errno }) => {
            // Only a real copy can meet the kernel (e.g. no memory).
            panic!("{o}: {errno}");
        }
        Err(e) => panic!("{e:?}"),
    }
}

fuzz_target!(|i: Input| {
    let Some(f) = fixture() else {
        return;
    };
    let s = i.small;
    // Mostly the low flag bits (named ones and their neighbours), sometimes
    // any.
    let bits = if i.gmem_flags >> 63 == 1 {
        i.gmem_flags
    } else {
        i.gmem_flags & 0x3f
    };
    gmem_builder(f, shape(i.gmem_size, s[0]), bits);
    let off = i.gmem_offset.map(|o| shape(o, s[3]));
    memslot(f, &i, shape(i.gpa, s[1]), shape(i.slot_size, s[2]), off);
    let (a, b) = (shape(i.range.0, s[4]), shape(i.range.1, s[5]));
    fallocate(f, a, b, i.punch);
    populate(f, &i, a, b);
    check_fds();
});

/// Every received or created fd is closed: the fd count, sampled every 1024
/// runs from run 1024 on (after libFuzzer and the fixtures have settled),
/// may not grow. A leak of one fd per run would add a thousand; the slack
/// absorbs libFuzzer's own threads opening a file at the same moment.
fn check_fds() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    static BASELINE: AtomicUsize = AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, Ordering::Relaxed) + 1;
    if !n.is_multiple_of(1024) {
        return;
    }
    let now = open_fds();
    if n == 1024 {
        BASELINE.store(now, Ordering::Relaxed);
        return;
    }
    let base = BASELINE.load(Ordering::Relaxed);
    assert!(
        now < base + 16,
        "fds leaked: {now} open, {base} after run 1024"
    );
}
