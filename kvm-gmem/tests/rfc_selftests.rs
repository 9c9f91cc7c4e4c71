//! The RFC series' selftests (kernel-tests.md §6.1, §6.2 and the
//! `GUEST_MEMFD_FLAG_NO_DIRECT_MAP` part of §6.5), re-run through this
//! crate's API. The KVM Userfault selftests (§6.4) need a vCPU and live in
//! the workspace root's `tests/rfc_userfault.rs`; userfaultfd on guest_memfd
//! (§6.3) in uffd-gmem's `tests/selftests.rs`.
//!
//! - §6.1 `KVM_GUEST_MEMFD_POPULATE`: [`Populate`] with
//!   [`Strategy::PopulateIoctl`]; what the API does not issue (a NULL source,
//!   non-zero flags, an unreadable source, size 0, a call from another
//!   process) goes through the raw ioctl, to show the kernel's own answer.
//! - §6.2 guest_memfd `write()` (v7, `GUEST_MEMFD_FLAG_WRITE`): [`Populate`]
//!   with [`Strategy::Write`] where the API covers the case, raw
//!   `pwrite`/`write`/`read` where the case is about the kernel's answer.
//! - §6.5 `GUEST_MEMFD_FLAG_NO_DIRECT_MAP`: the §1 basics with the flag.
//!
//! Every case asserts contents through a mapping of the guest_memfd, so the
//! guest_memfds are `MMAP | INIT_SHARED` (Linux 6.18). Where the kernel
//! lacks what a test needs, the test prints `SKIP <test>: <capability> =
//! <value> on <kernel>` and passes (a lane that lists the capability in
//! `GMEM_REQUIRED_CAPS` fails instead): `KVM_CAP_GUEST_MEMFD`,
//! `GUEST_MEMFD_FLAG_INIT_SHARED`, then `KVM_GUEST_MEMFD_POPULATE`,
//! `GUEST_MEMFD_FLAG_WRITE` or `GUEST_MEMFD_FLAG_NO_DIRECT_MAP`, each as
//! [`Capabilities::query`] probes it. Without `/dev/kvm` a test prints
//! `SKIP` and passes, except under `CI=true`.
//!
//! Needs the features `rfc-populate`, `rfc-gmem-write` and
//! `rfc-no-direct-map` (`required-features` in Cargo.toml; `cargo test
//! --workspace` turns them on through the root package).

mod common;

use common::{
    errno, errno_name, expect_errno, gmem_vm_or_skip, lock, page, shared, skip_capability,
};
use kvm_gmem::populate::{Populate, Report, Source, Strategy};
use kvm_gmem::sys_bindings::rfc::populate::{KVM_GUEST_MEMFD_POPULATE, kvm_guest_memfd_populate};
use kvm_gmem::{
    Capabilities, Error, GuestMemfd, GuestMemfdFlags, KvmDevice, Mapping, MemoryRegion2, Vm, VmOps,
    VmType,
};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};

/// Pages in every test's guest_memfd.
const PAGES: u64 = 4;
/// The guest_memfd slot: slot 1 at guest physical 4 GiB.
const SLOT: u32 = 1;
const GPA: u64 = 1 << 32;
/// A guest physical address no memslot covers.
const NO_SLOT_GPA: u64 = 8 << 30;

/// A byte per page, different for every page and every fill (`round`).
fn byte(round: u8, page_index: u64) -> u8 {
    round.wrapping_mul(0x10).wrapping_add(page_index as u8 + 1)
}

/// `pages` pages, page `i` all [`byte`]`(round, first + i)`.
fn pages_of(round: u8, first: u64, pages: u64) -> Vec<u8> {
    (first..first + pages)
        .flat_map(|i| vec![byte(round, i); page() as usize])
        .collect()
}

/// Page `i` of `map`, read through the mapping.
fn page_of(map: &Mapping, i: u64) -> Vec<u8> {
    let mut buf = vec![0u8; page() as usize];
    map.read_at(i * page(), &mut buf)
        .unwrap_or_else(|e| panic!("reading page {i} through the mapping: {e}"));
    buf
}

/// Asserts every byte of page `i` is `b`.
#[track_caller]
fn assert_page(map: &Mapping, i: u64, b: u8, what: &str) {
    let got = page_of(map, i);
    if let Some(k) = got.iter().position(|&x| x != b) {
        panic!(
            "{what}: page {i} byte {k:#x} is {:#04x}, expected {b:#04x}",
            got[k]
        );
    }
}

/// The kernel's EINVAL for a gfn no guest_memfd memslot maps, as Populate
/// reports it: an `Invalid` error (errno EINVAL) naming the gpa, before
/// anything was written.
#[track_caller]
fn expect_no_slot<T: std::fmt::Debug>(r: kvm_gmem::Result<T>, what: &str) {
    match r {
        Err(e @ Error::Invalid { .. }) => {
            assert_eq!(
                e.errno(),
                Some(kvm_gmem::Errno(libc::EINVAL)),
                "{what}: {e}"
            );
            assert!(e.to_string().contains("no memslot"), "{what}: {e}");
        }
        other => panic!("{what}: expected Error::Invalid (no memslot), got {other:?}"),
    }
}

#[track_caller]
fn expect_kernel<T: std::fmt::Debug>(r: kvm_gmem::Result<T>, want: i32, what: &str) {
    match r {
        Err(Error::Kernel { errno, .. }) => assert_eq!(
            errno.0,
            want,
            "{what}: expected {}, got {errno}",
            errno_name(want)
        ),
        other => panic!(
            "{what}: expected Error::Kernel({}), got {other:?}",
            errno_name(want)
        ),
    }
}

/// The VM (and `/dev/kvm`) of a test that needs a mappable guest_memfd
/// (`MMAP | INIT_SHARED`) and the RFC feature `rfc` picks from the capability
/// report; `None` after a skip naming what is missing.
fn vm_or_skip(
    test: &str,
    name: &str,
    rfc: impl FnOnce(&Capabilities) -> &kvm_gmem::caps::Support,
) -> Option<(KvmDevice, Vm)> {
    let (kvm, vm) = gmem_vm_or_skip(test, shared())?;
    let caps = Capabilities::query(&kvm, &vm, VmType::DEFAULT).expect("capability report");
    let support = rfc(&caps);
    if !support.supported {
        skip_capability(name, &support.evidence);
        return None;
    }
    Some((kvm, vm))
}

// ---------------------------------------------------------------------------
// §6.1 KVM_GUEST_MEMFD_POPULATE
// ---------------------------------------------------------------------------

/// A VM with a `PAGES`-page `MMAP | INIT_SHARED` guest_memfd bound at
/// [`GPA`] (slot [`SLOT`], no userspace address), and its mapping.
struct PopulateVm {
    _kvm: KvmDevice,
    vm: Vm,
    gmem: GuestMemfd,
    map: Mapping,
}

fn populate_vm(test: &str) -> Option<PopulateVm> {
    let (kvm, vm) = vm_or_skip(test, "KVM_GUEST_MEMFD_POPULATE", |c| &c.rfc.populate)?;
    let gmem = common::gmem(&vm, PAGES * page(), shared());
    bind(&vm, SLOT, GPA, &gmem);
    let map = gmem.map().expect("map the guest_memfd");
    Some(PopulateVm {
        _kvm: kvm,
        vm,
        gmem,
        map,
    })
}

/// Binds the whole of `gmem` at `gpa` as slot `slot`, guest_memfd only.
fn bind(vm: &Vm, slot: u32, gpa: u64, gmem: &GuestMemfd) {
    let region = MemoryRegion2::builder(slot, gpa, gmem.size())
        .guest_memfd(gmem, 0)
        .build()
        .expect("guest_memfd slot");
    // SAFETY: a guest_memfd-only slot: no userspace address for KVM to use.
    unsafe { vm.set_memory_region(&region) }.expect("KVM_SET_USER_MEMORY_REGION2(GUEST_MEMFD)");
}

/// `Populate` with `Strategy::PopulateIoctl` of `range` (guest_memfd
/// offsets; offset 0 at `gpa_base`) from `src`.
fn populate(
    vm: &Vm,
    gmem: &GuestMemfd,
    gpa_base: u64,
    range: Range<u64>,
    src: &[u8],
) -> kvm_gmem::Result<Report> {
    Populate::new(vm, gmem)
        .strategy(Strategy::PopulateIoctl)
        .gpa_base(gpa_base)
        .run(range, Source::bytes(src))
}

/// `ioctl(vm, KVM_GUEST_MEMFD_POPULATE, {gpa, size, from, flags})` issued
/// directly: the kernel's own answer (the ioctl's return value, or errno).
fn raw_populate(vm: &Vm, gpa: u64, size: u64, from: *const u8, flags: u64) -> Result<i32, i32> {
    let mut arg = kvm_guest_memfd_populate {
        gpa,
        size,
        from: from.cast_mut().cast(),
        flags,
    };
    // SAFETY: the request encodes `kvm_guest_memfd_populate` (the size-0
    // probe of `Capabilities::query` confirmed 0xd6 is POPULATE here); the
    // kernel only reads `size` bytes at `from` (or nothing for NULL) with
    // copy_from_user, which answers an unreadable source with an error.
    let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_GUEST_MEMFD_POPULATE as _, &mut arg) };
    if r < 0 { Err(errno()) } else { Ok(r) }
}

/// §6.1 populate-once: the ioctl fills every page of the range (the
/// report says so) and the mapping shows the source's bytes; the pages it
/// did not cover stay empty (they populate later). The same on a
/// guest_memfd the host cannot access (no attribute requirement): a repeat
/// there answers EEXIST, which shows the first call filled it.
#[test]
fn populate_once() {
    let _guard = lock();
    let Some(t) = populate_vm("populate_once") else {
        return;
    };
    let p = page();
    let src = pages_of(1, 0, 2);
    let report = populate(&t.vm, &t.gmem, GPA, 0..2 * p, &src).expect("POPULATE of pages 0-1");
    assert_eq!(report.strategy, Strategy::PopulateIoctl);
    assert_eq!(report.bytes, 2 * p);
    assert!(report.tried.is_empty(), "{:?}", report.tried);
    assert_page(&t.map, 0, byte(1, 0), "populated page 0");
    assert_page(&t.map, 1, byte(1, 1), "populated page 1");
    // Pages 2-3 were not touched: populating them now succeeds.
    let src = pages_of(1, 2, 2);
    populate(&t.vm, &t.gmem, GPA, 2 * p..4 * p, &src).expect("POPULATE of pages 2-3");
    for i in 0..PAGES {
        assert_page(&t.map, i, byte(1, i), "after populating the rest");
    }

    // A guest_memfd the host cannot access (no INIT_SHARED; MMAP only where
    // the architecture binds nothing else), in a second slot.
    let private = common::gmem(&t.vm, PAGES * p, common::slot_flags());
    let gpa2 = GPA + (1 << 30);
    bind(&t.vm, SLOT + 1, gpa2, &private);
    let src = pages_of(2, 0, PAGES);
    populate(&t.vm, &private, gpa2, 0..PAGES * p, &src)
        .expect("POPULATE of a guest_memfd without INIT_SHARED");
    expect_kernel(
        populate(&t.vm, &private, gpa2, 0..p, &src[..p as usize]),
        libc::EEXIST,
        "a repeat on the guest_memfd without INIT_SHARED",
    );
}

/// §6.1 EEXIST on repeat: a populated page, and a page written through the
/// mapping (faulted in), refuse a second population with EEXIST and keep
/// their bytes. A range that reaches such a page stops there: the pages
/// before it are filled, the ones after it stay empty, and the ioctl
/// returns EEXIST, not a count.
#[test]
fn populate_eexist_on_repeat() {
    let _guard = lock();
    let Some(t) = populate_vm("populate_eexist_on_repeat") else {
        return;
    };
    let p = page();
    populate(&t.vm, &t.gmem, GPA, p..2 * p, &pages_of(1, 1, 1)).expect("POPULATE of page 1");
    expect_kernel(
        populate(&t.vm, &t.gmem, GPA, p..2 * p, &pages_of(2, 1, 1)),
        libc::EEXIST,
        "a second POPULATE of page 1",
    );
    assert_page(&t.map, 1, byte(1, 1), "page 1 after the refused repeat");

    // Page 3 faulted in through the mapping holds data too.
    t.map.fill(3 * p, p as usize, 0x77).unwrap();
    expect_kernel(
        populate(&t.vm, &t.gmem, GPA, 3 * p..4 * p, &pages_of(2, 3, 1)),
        libc::EEXIST,
        "POPULATE of a page written through the mapping",
    );
    assert_page(
        &t.map,
        3,
        0x77,
        "the written page after the refused POPULATE",
    );

    // 0..3: page 0 is filled, page 1 stops the call, which answers the
    // count it filled (1); resumed at page 1, it answers EEXIST; page 2 is
    // left alone.
    let src = pages_of(3, 0, 3);
    assert_eq!(
        raw_populate(&t.vm, GPA, 3 * p, src.as_ptr(), 0),
        Ok(1),
        "raw POPULATE of pages 0-2 with page 1 populated: the pages filled before it"
    );
    expect_errno(
        raw_populate(&t.vm, GPA + p, 2 * p, src[p as usize..].as_ptr(), 0),
        libc::EEXIST,
        "raw POPULATE resumed at the populated page 1",
    );
    assert_page(&t.map, 0, byte(3, 0), "page 0, before the populated page");
    assert_page(&t.map, 1, byte(1, 1), "page 1 keeps its first bytes");
    populate(&t.vm, &t.gmem, GPA, 2 * p..3 * p, &pages_of(4, 2, 1))
        .expect("page 2, after the populated page, was left empty");
    assert_page(&t.map, 2, byte(4, 2), "page 2");
}

/// §6.1 repopulate after punch: PUNCH_HOLE frees a populated page, which
/// can then be populated again with new bytes; its neighbour is still
/// populated (EEXIST) and unchanged.
#[test]
fn populate_after_punch() {
    let _guard = lock();
    let Some(t) = populate_vm("populate_after_punch") else {
        return;
    };
    let p = page();
    populate(&t.vm, &t.gmem, GPA, 0..2 * p, &pages_of(1, 0, 2)).expect("POPULATE of pages 0-1");
    t.gmem.punch_hole(0..p).expect("punch page 0");
    assert_page(&t.map, 0, 0, "the punched page");
    // Reading the punched page faulted it in (zeroes, up to date): a
    // POPULATE now is refused, and after a second punch it fills again.
    expect_kernel(
        populate(&t.vm, &t.gmem, GPA, 0..p, &pages_of(2, 0, 1)),
        libc::EEXIST,
        "POPULATE of a punched page read through the mapping",
    );
    t.gmem.punch_hole(0..p).expect("punch page 0 again");
    populate(&t.vm, &t.gmem, GPA, 0..p, &pages_of(2, 0, 1)).expect("POPULATE of the punched page");
    assert_page(&t.map, 0, byte(2, 0), "the repopulated page");
    assert_page(&t.map, 1, byte(1, 1), "the page next to it");
    expect_kernel(
        populate(&t.vm, &t.gmem, GPA, p..2 * p, &pages_of(2, 1, 1)),
        libc::EEXIST,
        "POPULATE of the page that was not punched",
    );
    expect_kernel(
        populate(&t.vm, &t.gmem, GPA, 0..p, &pages_of(3, 0, 1)),
        libc::EEXIST,
        "a second POPULATE of the repopulated page",
    );
}

/// §6.1 NULL source: `from == NULL` fills the pages with zeroes, and they
/// count as populated (a repeat answers EEXIST). On a page that holds data
/// it is refused like any other source, without clearing it.
#[test]
fn populate_null_source_zeroes() {
    let _guard = lock();
    let Some(t) = populate_vm("populate_null_source_zeroes") else {
        return;
    };
    let p = page();
    t.map.fill(0, 2 * p as usize, 0xee).unwrap();
    expect_errno(
        raw_populate(&t.vm, GPA, p, std::ptr::null(), 0),
        libc::EEXIST,
        "NULL-source POPULATE of a page written through the mapping",
    );
    assert_page(
        &t.map,
        0,
        0xee,
        "the written page after the refused NULL POPULATE",
    );

    t.gmem.punch_hole(0..2 * p).expect("punch pages 0-1");
    assert_eq!(
        raw_populate(&t.vm, GPA, 2 * p, std::ptr::null(), 0),
        Ok(0),
        "NULL-source POPULATE of pages 0-1"
    );
    assert_page(&t.map, 0, 0, "page 0 populated from NULL");
    assert_page(&t.map, 1, 0, "page 1 populated from NULL");
    expect_kernel(
        populate(&t.vm, &t.gmem, GPA, 0..p, &pages_of(1, 0, 1)),
        libc::EEXIST,
        "POPULATE of a page populated from NULL",
    );
    expect_errno(
        raw_populate(&t.vm, GPA + p, p, std::ptr::null(), 0),
        libc::EEXIST,
        "a second NULL-source POPULATE",
    );
    // Page 2 was never touched: a NULL population of it succeeds.
    assert_eq!(
        raw_populate(&t.vm, GPA + 2 * p, p, std::ptr::null(), 0),
        Ok(0)
    );
    assert_page(&t.map, 2, 0, "page 2 populated from NULL");
}

/// §6.1 flags != 0 → EINVAL, for every single bit, and nothing is filled
/// (the page then populates).
#[test]
fn populate_flags_refused() {
    let _guard = lock();
    let Some(t) = populate_vm("populate_flags_refused") else {
        return;
    };
    let p = page();
    let src = pages_of(1, 0, 1);
    for bit in 0..64 {
        expect_errno(
            raw_populate(&t.vm, GPA, p, src.as_ptr(), 1 << bit),
            libc::EINVAL,
            &format!("POPULATE with flags bit {bit}"),
        );
    }
    populate(&t.vm, &t.gmem, GPA, 0..p, &src).expect("the page was left empty by the refusals");
    assert_page(&t.map, 0, byte(1, 0), "page 0");
}

/// §6.1 a gfn outside a guest_memfd memslot → EINVAL: no memslot at all,
/// and a memslot of ordinary (anonymous) memory. Size 0 succeeds anywhere
/// (nothing to fill); the API refuses an empty range before the ioctl.
#[test]
fn populate_outside_gmem_slot() {
    let _guard = lock();
    let Some(t) = populate_vm("populate_outside_gmem_slot") else {
        return;
    };
    let p = page();
    let src = pages_of(1, 0, PAGES);
    expect_no_slot(
        populate(&t.vm, &t.gmem, NO_SLOT_GPA, 0..p, &src[..p as usize]),
        "POPULATE where no memslot is",
    );

    // Slot 2: anonymous memory, no guest_memfd.
    let anon_gpa = GPA + (2 << 30);
    let anon = vec![0u8; ((PAGES + 1) * p) as usize];
    let addr = (anon.as_ptr() as u64).next_multiple_of(p);
    let region = MemoryRegion2::builder(SLOT + 1, anon_gpa, PAGES * p)
        .userspace_addr(addr)
        .build()
        .expect("anonymous slot");
    // SAFETY: `anon` covers `addr..addr + PAGES * p` and outlives the slot,
    // which is deleted below before `anon` is dropped; no vCPU runs.
    unsafe { t.vm.set_memory_region(&region) }.expect("KVM_SET_USER_MEMORY_REGION2");
    expect_no_slot(
        populate(&t.vm, &t.gmem, anon_gpa, 0..p, &src[..p as usize]),
        "POPULATE of a memslot without a guest_memfd",
    );
    assert!(
        anon.iter().all(|&b| b == 0),
        "the anonymous slot's memory changed"
    );
    t.vm.delete_memory_region(SLOT + 1)
        .expect("delete the anonymous slot");
    drop(anon);

    assert_eq!(
        raw_populate(&t.vm, NO_SLOT_GPA, 0, src.as_ptr(), 0),
        Ok(0),
        "POPULATE of size 0"
    );
    match populate(&t.vm, &t.gmem, GPA, p..p, &src) {
        Err(Error::Invalid { .. }) => {}
        other => panic!("an empty range: expected Error::Invalid, got {other:?}"),
    }
    // None of this filled the guest_memfd.
    populate(&t.vm, &t.gmem, GPA, 0..PAGES * p, &src).expect("POPULATE of the whole slot");
    for i in 0..PAGES {
        assert_page(&t.map, i, byte(1, i), "after the refusals");
    }
}

/// §6.1 an unreadable source (a `PROT_NONE` page) → EINVAL, and the page
/// stays empty.
#[test]
fn populate_unreadable_source() {
    let _guard = lock();
    let Some(t) = populate_vm("populate_unreadable_source") else {
        return;
    };
    let p = page();
    // SAFETY: a fresh anonymous PROT_NONE mapping chosen by the kernel; it
    // replaces nothing and is only handed to the kernel, never read here.
    let none = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            p as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(none, libc::MAP_FAILED, "mmap: {}", errno_name(errno()));
    let r = raw_populate(&t.vm, GPA, p, none.cast(), 0);
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(none, p as usize) };
    expect_errno(r, libc::EINVAL, "POPULATE from a PROT_NONE source");
    populate(&t.vm, &t.gmem, GPA, 0..p, &pages_of(1, 0, 1))
        .expect("the page was left empty by the refused POPULATE");
    assert_page(&t.map, 0, byte(1, 0), "page 0");
}

/// §6.1 from a process other than the VM's creator (a forked child on the
/// inherited VM fd) → EIO, the generic VM-ioctl rule; nothing is filled.
#[test]
fn populate_foreign_mm() {
    let _guard = lock();
    let Some(t) = populate_vm("populate_foreign_mm") else {
        return;
    };
    let p = page();
    let src = pages_of(1, 0, 1);
    let mut arg = kvm_guest_memfd_populate {
        gpa: GPA,
        size: p,
        from: src.as_ptr().cast_mut().cast(),
        flags: 0,
    };
    let fd: RawFd = t.vm.as_raw_fd();
    // SAFETY: the child runs only the ioctl and `_exit` (async-signal-safe:
    // no allocation, no locks), with `arg` and `src` prepared before the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", errno_name(errno()));
    if pid == 0 {
        // SAFETY: as for `raw_populate`; in the child, `arg` points at its
        // copy of `src`.
        let r = unsafe { libc::ioctl(fd, KVM_GUEST_MEMFD_POPULATE as _, &mut arg) };
        // SAFETY: errno's location for this thread; `_exit` ends the child
        // without running the parent's destructors.
        unsafe { libc::_exit(if r < 0 { *libc::__errno_location() } else { 0 }) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    let w = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(w, pid, "waitpid: {}", errno_name(errno()));
    assert!(
        libc::WIFEXITED(status),
        "the child did not exit: {status:#x}"
    );
    let code = libc::WEXITSTATUS(status);
    assert_eq!(
        code,
        libc::EIO,
        "POPULATE from a forked child: expected EIO, got {}",
        if code == 0 {
            "success".into()
        } else {
            errno_name(code)
        }
    );
    populate(&t.vm, &t.gmem, GPA, 0..p, &src).expect("the child's refused call filled nothing");
    assert_page(&t.map, 0, byte(1, 0), "page 0");
}

// ---------------------------------------------------------------------------
// §6.2 guest_memfd write() (GUEST_MEMFD_FLAG_WRITE)
// ---------------------------------------------------------------------------

/// The VM of a write() test: needs `MMAP | INIT_SHARED` and
/// `GUEST_MEMFD_FLAG_WRITE` (as the capability report probes it).
fn write_vm(test: &str) -> Option<(KvmDevice, Vm)> {
    let (kvm, vm) = vm_or_skip(test, "GUEST_MEMFD_FLAG_WRITE", |c| &c.rfc.gmem_write)?;
    let offered = vm.guest_memfd_flags().expect("KVM_CAP_GUEST_MEMFD_FLAGS");
    assert!(
        offered.contains(GuestMemfdFlags::WRITE),
        "the probe found WRITE, but KVM_CAP_GUEST_MEMFD_FLAGS = {offered}"
    );
    Some((kvm, vm))
}

/// A `PAGES`-page guest_memfd with `MMAP | INIT_SHARED | WRITE`, built with
/// the builder's setters, and its mapping.
fn write_gmem(vm: &Vm) -> (GuestMemfd, Mapping) {
    let gmem = GuestMemfd::builder(PAGES * page())
        .mmap(true)
        .init_shared(true)
        .write(true)
        .create(vm)
        .expect("KVM_CREATE_GUEST_MEMFD(MMAP|INIT_SHARED|WRITE)");
    assert_eq!(gmem.flags(), shared() | GuestMemfdFlags::WRITE);
    let map = gmem.map().expect("map");
    (gmem, map)
}

fn raw_pwrite(fd: RawFd, buf: *const u8, len: u64, offset: u64) -> Result<usize, i32> {
    // SAFETY: the kernel reads at most `len` bytes at `buf` with
    // copy_from_user (callers pass a buffer of `len` bytes, or NULL to see
    // EFAULT); `fd` is open.
    let r = unsafe { libc::pwrite(fd, buf.cast(), len as usize, offset as i64) };
    if r < 0 { Err(errno()) } else { Ok(r as usize) }
}

fn raw_write(fd: RawFd, buf: &[u8]) -> Result<usize, i32> {
    // SAFETY: `buf` is readable for its length; `fd` is open.
    let r = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if r < 0 { Err(errno()) } else { Ok(r as usize) }
}

fn raw_lseek(fd: RawFd, offset: i64, whence: i32) -> Result<i64, i32> {
    // SAFETY: lseek takes integers only.
    let r = unsafe { libc::lseek(fd, offset, whence) };
    if r < 0 { Err(errno()) } else { Ok(r) }
}

/// `Populate` with `Strategy::Write` (no VM needed).
fn write_populate(gmem: &GuestMemfd, range: Range<u64>, src: &[u8]) -> kvm_gmem::Result<Report> {
    Populate::detached(gmem)
        .strategy(Strategy::Write)
        .run(range, Source::bytes(src))
}

/// §6.2 write_supported (v7): `pwrite` past the end, across the end, of
/// one byte, of a page minus one, and at offset 1 → EINVAL; an aligned
/// page → the page size, visible through the mapping; `write()` at the
/// file position (set with `lseek`) writes and advances it;
/// `Populate` with `Strategy::Write` fills the rest.
#[test]
fn write_supported() {
    let _guard = lock();
    let Some((_kvm, vm)) = write_vm("write_supported") else {
        return;
    };
    let p = page();
    let (gmem, map) = write_gmem(&vm);
    let fd = gmem.as_raw_fd();
    let size = gmem.size();
    let buf = pages_of(1, 0, 2);
    for (offset, len, what) in [
        (size, p, "at offset == size"),
        (size + p, p, "past the end"),
        (size - p, 2 * p, "across the end (pos + len > size)"),
        (0, 1, "of one byte"),
        (0, p - 1, "of page size - 1"),
        (1, p, "at offset 1"),
        (p, p + 1, "of an unaligned length"),
    ] {
        expect_errno(
            raw_pwrite(fd, buf.as_ptr(), len, offset),
            libc::EINVAL,
            &format!("pwrite {what}"),
        );
    }
    // None of the refusals wrote: page 0 takes an aligned write.
    assert_eq!(
        raw_pwrite(fd, buf.as_ptr(), p, 0),
        Ok(p as usize),
        "pwrite of page 0"
    );
    assert_page(&map, 0, byte(1, 0), "the pwritten page");

    // write() at the file position.
    assert_eq!(raw_lseek(fd, p as i64, libc::SEEK_SET), Ok(p as i64));
    let page1 = pages_of(2, 1, 1);
    assert_eq!(raw_write(fd, &page1), Ok(p as usize), "write() of page 1");
    assert_eq!(
        raw_lseek(fd, 0, libc::SEEK_CUR),
        Ok(2 * p as i64),
        "write() advances the file position"
    );
    assert_page(&map, 1, byte(2, 1), "the page write() filled");

    let rest = pages_of(3, 2, 2);
    let report = write_populate(&gmem, 2 * p..4 * p, &rest).expect("Populate(Write) of pages 2-3");
    assert_eq!(report.strategy, Strategy::Write);
    assert_eq!(report.bytes, 2 * p);
    assert_page(&map, 2, byte(3, 2), "page 2 from Populate(Write)");
    assert_page(&map, 3, byte(3, 3), "page 3 from Populate(Write)");
    assert_page(&map, 0, byte(1, 0), "page 0 unchanged");
}

/// §6.2 write_not_supported (v7): on a VM that offers WRITE, a guest_memfd
/// created without it answers `write`/`pwrite` with ENODEV (the check comes
/// first, so any offset or length); `Populate` with `Strategy::Write`
/// refuses it as `Unsupported` naming the flag, and nothing was written.
#[test]
fn write_not_supported() {
    let _guard = lock();
    let Some((_kvm, vm)) = write_vm("write_not_supported") else {
        return;
    };
    let p = page();
    let buf = pages_of(1, 0, 1);
    for flags in [GuestMemfdFlags::empty(), shared()] {
        let gmem = common::gmem(&vm, PAGES * p, flags);
        let fd = gmem.as_raw_fd();
        for (offset, len) in [(0, p), (0, 64), (1, p), (gmem.size(), p)] {
            expect_errno(
                raw_pwrite(fd, buf.as_ptr(), len, offset),
                libc::ENODEV,
                &format!("pwrite({offset:#x}, {len:#x}) without WRITE, flags {flags}"),
            );
        }
        expect_errno(
            raw_write(fd, &buf),
            libc::ENODEV,
            &format!("write() without WRITE, flags {flags}"),
        );
        match write_populate(&gmem, 0..p, &buf) {
            Err(Error::Unsupported { capability, .. }) => {
                assert_eq!(capability, "GUEST_MEMFD_FLAG_WRITE")
            }
            other => panic!("Populate(Write) without the flag: {other:?}"),
        }
        if flags.contains(GuestMemfdFlags::INIT_SHARED) {
            let map = gmem.map().unwrap();
            assert_page(&map, 0, 0, "the refused writes wrote nothing");
        }
    }
}

/// §6.2 file_read (v7): with WRITE the file still has no read side:
/// `read` → EINVAL, `pread` → ESPIPE; `lseek` works.
#[test]
fn file_read() {
    let _guard = lock();
    let Some((_kvm, vm)) = write_vm("file_read") else {
        return;
    };
    let (gmem, map) = write_gmem(&vm);
    let fd = gmem.as_raw_fd();
    map.fill(0, page() as usize, 0x5a).unwrap();
    let mut buf = vec![0u8; page() as usize];
    // SAFETY: `buf` is writable for its length; `fd` is open.
    let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    expect_errno(
        if r < 0 { Err(errno()) } else { Ok(r) },
        libc::EINVAL,
        "read",
    );
    // SAFETY: as above.
    let r = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    expect_errno(
        if r < 0 { Err(errno()) } else { Ok(r) },
        libc::ESPIPE,
        "pread",
    );
    assert!(
        buf.iter().all(|&b| b == 0),
        "a refused read filled the buffer"
    );
    assert_eq!(
        raw_lseek(fd, 0, libc::SEEK_END),
        Ok(gmem.size() as i64),
        "lseek(SEEK_END)"
    );
    assert_eq!(raw_lseek(fd, 0, libc::SEEK_SET), Ok(0), "lseek(SEEK_SET)");
}

/// §6.2 a NULL buffer → EFAULT, and the page stays empty (it then takes a
/// write).
#[test]
fn write_null_buffer() {
    let _guard = lock();
    let Some((_kvm, vm)) = write_vm("write_null_buffer") else {
        return;
    };
    let p = page();
    let (gmem, map) = write_gmem(&vm);
    expect_errno(
        raw_pwrite(gmem.as_raw_fd(), std::ptr::null(), p, 0),
        libc::EFAULT,
        "pwrite from NULL",
    );
    let buf = pages_of(1, 0, 1);
    assert_eq!(
        raw_pwrite(gmem.as_raw_fd(), buf.as_ptr(), p, 0),
        Ok(p as usize)
    );
    assert_page(&map, 0, byte(1, 0), "page 0");
}

/// §6.2 EEXIST on a populated page: a page already written by `pwrite`, by
/// `Populate` (Write), or faulted in through the mapping refuses `pwrite`
/// with EEXIST (nothing written before it) and keeps its bytes; a page that
/// was only allocated (`fallocate`) holds no data and takes the write.
#[test]
fn write_eexist_on_populated_page() {
    let _guard = lock();
    let Some((_kvm, vm)) = write_vm("write_eexist_on_populated_page") else {
        return;
    };
    let p = page();
    let (gmem, map) = write_gmem(&vm);
    let fd = gmem.as_raw_fd();
    let first = pages_of(1, 0, 2);
    write_populate(&gmem, 0..2 * p, &first).expect("Populate(Write) of pages 0-1");
    let again = pages_of(2, 0, 2);
    expect_errno(
        raw_pwrite(fd, again.as_ptr(), p, 0),
        libc::EEXIST,
        "pwrite of a written page",
    );
    expect_kernel(
        write_populate(&gmem, p..2 * p, &again[p as usize..]),
        libc::EEXIST,
        "Populate(Write) of a written page",
    );
    assert_page(&map, 0, byte(1, 0), "page 0 after the refused writes");
    assert_page(&map, 1, byte(1, 1), "page 1 after the refused writes");

    // Faulted in through the mapping (a read zero-fills it).
    assert_page(&map, 2, 0, "page 2, read through the mapping");
    expect_errno(
        raw_pwrite(fd, again.as_ptr(), p, 2 * p),
        libc::EEXIST,
        "pwrite of a page faulted in through the mapping",
    );
    assert_page(&map, 2, 0, "page 2 after the refused write");

    // Allocated only.
    gmem.allocate(3 * p..4 * p).expect("fallocate page 3");
    assert_eq!(
        raw_pwrite(fd, again.as_ptr(), p, 3 * p),
        Ok(p as usize),
        "pwrite of a page that was only allocated"
    );
    assert_page(&map, 3, byte(2, 0), "page 3");
}

/// §6.2 short count: a write over pages 0-3 with page 0 free and page 1
/// populated returns exactly one page; page 0 holds the new bytes, page 1
/// its old ones, pages 2-3 stay empty. `Populate` (Write) over such a range
/// fails with EEXIST after filling what comes before the populated page.
#[test]
fn write_short_count() {
    let _guard = lock();
    let Some((_kvm, vm)) = write_vm("write_short_count") else {
        return;
    };
    let p = page();
    let (gmem, map) = write_gmem(&vm);
    let fd = gmem.as_raw_fd();
    let one = pages_of(1, 1, 1);
    assert_eq!(raw_pwrite(fd, one.as_ptr(), p, p), Ok(p as usize));
    let all = pages_of(2, 0, PAGES);
    assert_eq!(
        raw_pwrite(fd, all.as_ptr(), PAGES * p, 0),
        Ok(p as usize),
        "a whole-file pwrite stops at the populated page 1"
    );
    assert_page(&map, 0, byte(2, 0), "page 0");
    assert_page(&map, 1, byte(1, 1), "page 1 keeps its bytes");
    // Pages 2-3 were not written: they take a write now, through Populate,
    // which then stops at page 3 once it is populated.
    let two = pages_of(3, 2, 1);
    assert_eq!(raw_pwrite(fd, two.as_ptr(), p, 3 * p), Ok(p as usize));
    let rest = pages_of(4, 2, 2);
    expect_kernel(
        write_populate(&gmem, 2 * p..4 * p, &rest),
        libc::EEXIST,
        "Populate(Write) of pages 2-3 with page 3 populated",
    );
    assert_page(
        &map,
        2,
        byte(4, 2),
        "page 2, written before the populated page",
    );
    assert_page(&map, 3, byte(3, 2), "page 3 keeps its bytes");
}

/// §6.2 repopulate after punch: PUNCH_HOLE frees a written page, which then
/// takes a write again (new bytes); its neighbour still refuses (EEXIST).
#[test]
fn write_after_punch() {
    let _guard = lock();
    let Some((_kvm, vm)) = write_vm("write_after_punch") else {
        return;
    };
    let p = page();
    let (gmem, map) = write_gmem(&vm);
    let fd = gmem.as_raw_fd();
    write_populate(&gmem, 0..2 * p, &pages_of(1, 0, 2)).expect("Populate(Write) of pages 0-1");
    gmem.punch_hole(0..p).expect("punch page 0");
    assert_page(&map, 0, 0, "the punched page");
    // Reading the punched page faulted it in (zeroes, up to date): a write
    // now is refused, and after a second punch it is taken again.
    let new = pages_of(2, 0, 2);
    expect_errno(
        raw_pwrite(fd, new.as_ptr(), p, 0),
        libc::EEXIST,
        "pwrite of a punched page read through the mapping",
    );
    gmem.punch_hole(0..p).expect("punch page 0 again");
    write_populate(&gmem, 0..p, &new[..p as usize]).expect("Populate(Write) of the punched page");
    assert_page(&map, 0, byte(2, 0), "the rewritten page");
    assert_page(&map, 1, byte(1, 1), "the page next to it");
    expect_errno(
        raw_pwrite(fd, new.as_ptr(), p, p),
        libc::EEXIST,
        "pwrite of the page that was not punched",
    );
}

// ---------------------------------------------------------------------------
// §6.5 GUEST_MEMFD_FLAG_NO_DIRECT_MAP
// ---------------------------------------------------------------------------

/// §6.5 the §1 basics with `NO_DIRECT_MAP`: the flag alone and with `MMAP |
/// INIT_SHARED` is accepted (fstat size, flags kept); the mappable one
/// fills and reads back (§1.6), a punched page reads zero while the others
/// keep their bytes, and the page refills; `MAP_PRIVATE` is refused
/// (§1.9); allocate and punch work (§1.14) and an unaligned punch is
/// refused (§1.15); without `MMAP` the file cannot be mapped (§1.5). Where
/// the VM also offers `WRITE`, `pwrite` fills a page of such a file too.
#[test]
fn no_direct_map_basics() {
    let _guard = lock();
    let Some((_kvm, vm)) = vm_or_skip(
        "no_direct_map_basics",
        "GUEST_MEMFD_FLAG_NO_DIRECT_MAP",
        |c| &c.rfc.no_direct_map,
    ) else {
        return;
    };
    let p = page();
    let ndm = GuestMemfdFlags::NO_DIRECT_MAP;

    // The flag alone: a file the host cannot map.
    let alone = GuestMemfd::builder(PAGES * p)
        .no_direct_map(true)
        .create(&vm)
        .expect("KVM_CREATE_GUEST_MEMFD(NO_DIRECT_MAP)");
    assert_eq!(alone.flags(), ndm);
    assert_eq!(fstat_size(alone.as_raw_fd()), PAGES * p);
    assert!(matches!(alone.map(), Err(Error::Invalid { .. })));
    alone.allocate(0..PAGES * p).expect("allocate");
    alone.punch_hole(p..2 * p).expect("punch");

    // With MMAP | INIT_SHARED.
    let gmem = GuestMemfd::builder(PAGES * p)
        .mmap(true)
        .init_shared(true)
        .no_direct_map(true)
        .create(&vm)
        .expect("KVM_CREATE_GUEST_MEMFD(MMAP|INIT_SHARED|NO_DIRECT_MAP)");
    assert_eq!(gmem.flags(), shared() | ndm);
    assert_eq!(fstat_size(gmem.as_raw_fd()), PAGES * p);
    let map = gmem.map().expect("map a NO_DIRECT_MAP guest_memfd");
    map.fill(0, (PAGES * p) as usize, 0xaa).unwrap();
    for i in 0..PAGES {
        assert_page(&map, i, 0xaa, "filled through the mapping");
    }
    gmem.punch_hole(0..p).expect("punch page 0");
    assert_page(&map, 0, 0, "the punched page");
    for i in 1..PAGES {
        assert_page(&map, i, 0xaa, "the pages not punched");
    }
    map.fill(0, p as usize, 0xbb).unwrap();
    assert_page(&map, 0, 0xbb, "the refilled page");
    // A second mapping sees the same pages.
    let again = gmem.map().unwrap();
    assert_page(&again, 0, 0xbb, "page 0 through a second mapping");
    assert_page(&again, 3, 0xaa, "page 3 through a second mapping");

    // SAFETY: a fresh mapping chosen by the kernel, unmapped at once if made.
    let private = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            p as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            gmem.as_raw_fd(),
            0,
        )
    };
    if private != libc::MAP_FAILED {
        // SAFETY: the mapping just made, never accessed.
        unsafe { libc::munmap(private, p as usize) };
        panic!("mmap(MAP_PRIVATE) of a NO_DIRECT_MAP guest_memfd succeeded");
    }
    assert_eq!(errno(), libc::EINVAL, "mmap(MAP_PRIVATE)");

    assert!(matches!(gmem.punch_hole(1..p), Err(Error::Invalid { .. })));
    // SAFETY: fallocate takes integers only; the fd is open.
    let r = unsafe {
        libc::fallocate(
            gmem.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            1,
            p as i64,
        )
    };
    assert_eq!((r, errno()), (-1, libc::EINVAL), "an unaligned punch");
    gmem.punch_hole(p..2 * p).expect("punch page 1");
    gmem.allocate(p..2 * p).expect("re-allocate page 1");
    assert_page(&map, 1, 0, "the punched, re-allocated page");

    // With WRITE too, where offered.
    if vm
        .guest_memfd_flags()
        .expect("KVM_CAP_GUEST_MEMFD_FLAGS")
        .contains(GuestMemfdFlags::WRITE)
    {
        let w = GuestMemfd::builder(PAGES * p)
            .flags(shared() | ndm | GuestMemfdFlags::WRITE)
            .create(&vm)
            .expect("KVM_CREATE_GUEST_MEMFD(MMAP|INIT_SHARED|NO_DIRECT_MAP|WRITE)");
        let src = pages_of(1, 0, 1);
        assert_eq!(
            raw_pwrite(w.as_raw_fd(), src.as_ptr(), p, 0),
            Ok(p as usize)
        );
        assert_page(
            &w.map().unwrap(),
            0,
            byte(1, 0),
            "pwrite into NO_DIRECT_MAP",
        );
    }
}

fn fstat_size(fd: RawFd) -> u64 {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a writable `struct stat`; `fd` is open.
    let r = unsafe { libc::fstat(fd, st.as_mut_ptr()) };
    assert_eq!(r, 0, "fstat: {}", errno_name(errno()));
    // SAFETY: fstat succeeded and filled the struct.
    unsafe { st.assume_init() }.st_size as u64
}
