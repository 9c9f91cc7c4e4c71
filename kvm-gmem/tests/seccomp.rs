//! `kvm_gmem::seccomp`: the table is consistent with `kvm-gmem-sys`, and
//! each feature runs to completion in a child process whose seccomp filter
//! allows only that feature's rule plus the runtime baseline documented in
//! `tests/common/seccomp_filter.rs` (anything else traps and names the call).
//!
//! Setup that is not the feature under test (opening `/dev/kvm`, creating
//! the VM, a guest_memfd, a socket pair, a source file) happens before the
//! filter is installed; the child ends with `_exit` right after the
//! feature, so no destructor outside the feature runs under the filter.
//!
//! Tests need `/dev/kvm`; without it they print `SKIP` and pass, except
//! under `CI=true`. The guest_memfd scenarios print a capability `SKIP`
//! where the kernel has no guest_memfd with MMAP|INIT_SHARED.

#![allow(unsafe_code)]

mod common;
#[path = "common/seccomp_filter.rs"]
mod filter;

use common::{kvm_has_guest_memfd, kvm_or_skip};
use filter::{Filter, fail, ok, run_child};
use kvm_gmem::populate::{Populate, Source, Strategy};
use kvm_gmem::seccomp::{Feature, Rule, rule, rules, thread_start};
use kvm_gmem::{
    Capabilities, Error, GuestMemfd, GuestMemfdFlags, KvmDevice, MemoryAttributes, MemoryRegion2,
    Vm, VmOps, VmType, page_size, pre_fault_memory,
};
use kvm_gmem_sys as sys;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

const CHILD: &str = "seccomp_child";
const ENV: &str = "KVM_GMEM_SECCOMP_SCENARIO";

/// Every request name the table uses, with the `kvm-gmem-sys` constant.
fn request_by_name(name: &str) -> Option<u32> {
    Some(match name {
        "KVM_CREATE_VM" => sys::KVM_CREATE_VM,
        "KVM_CHECK_EXTENSION" => sys::KVM_CHECK_EXTENSION,
        "KVM_GET_API_VERSION" => sys::KVM_GET_API_VERSION,
        "KVM_CREATE_GUEST_MEMFD" => sys::KVM_CREATE_GUEST_MEMFD,
        "KVM_SET_USER_MEMORY_REGION2" => sys::KVM_SET_USER_MEMORY_REGION2,
        "KVM_SET_MEMORY_ATTRIBUTES" => sys::KVM_SET_MEMORY_ATTRIBUTES,
        "KVM_PRE_FAULT_MEMORY" => sys::KVM_PRE_FAULT_MEMORY,
        #[cfg(feature = "rfc-populate")]
        "KVM_GUEST_MEMFD_POPULATE" => sys::rfc::populate::KVM_GUEST_MEMFD_POPULATE,
        _ => return None,
    })
}

#[test]
fn every_ioctl_is_the_sys_constant() {
    let seen = filter::check_rule_table(rules(), request_by_name);
    assert!(seen >= 10, "only {seen} ioctls listed");
    // Spot checks that names and numbers agree.
    let caps = rule(Feature::Capabilities);
    assert!(caps.allows_syscall(libc::SYS_openat));
    assert!(
        caps.syscalls
            .iter()
            .any(|s| s.name == "openat" && s.nr == libc::SYS_openat)
    );
    assert!(rule(Feature::PunchHole).allows_syscall(libc::SYS_fallocate));
    assert!(rule(Feature::CreateGuestMemfd).allows_ioctl(0xC040_AED4));
}

#[test]
fn every_feature_and_strategy_has_a_rule() {
    for f in [
        Feature::OpenKvm,
        Feature::CreateVm,
        Feature::Capabilities,
        Feature::CreateGuestMemfd,
        Feature::Map,
        Feature::PunchHole,
        Feature::MemslotV2,
        Feature::MemoryAttributes,
        Feature::PreFault,
        Feature::Populate(Strategy::Auto),
        Feature::Populate(Strategy::PopulateIoctl),
        Feature::Populate(Strategy::Write),
        Feature::Populate(Strategy::MmapCopy),
        Feature::ShareSend,
        Feature::ShareRecv,
        Feature::AdoptGuestMemfd,
    ] {
        let r = rule(f);
        assert_eq!(r.feature, f);
        assert!(
            !r.syscalls.is_empty()
                || !r.ioctls.is_empty()
                || f == Feature::Populate(Strategy::PopulateIoctl),
            "{f:?}: empty rule"
        );
    }
    // Auto is the union of the strategies it may pick.
    let auto = rule(Feature::Populate(Strategy::Auto));
    for s in [Strategy::PopulateIoctl, Strategy::Write, Strategy::MmapCopy] {
        let r = rule(Feature::Populate(s));
        for c in r.syscalls {
            assert!(auto.allows_syscall(c.nr), "Auto lacks {} of {s:?}", c.name);
        }
        for i in r.ioctls {
            assert!(
                auto.allows_ioctl(i.request),
                "Auto lacks {} of {s:?}",
                i.name
            );
        }
    }
}

// ---- the filter runs ------------------------------------------------------

fn filter_for(features: &[Feature]) -> Filter {
    let mut f = Filter::baseline();
    for &feature in features {
        let r: &Rule<Feature> = rule(feature);
        f.syscalls(r.syscalls.iter().map(|s| s.nr));
        f.ioctls(r.ioctls.iter().map(|i| i.request));
        if r.threads {
            f.syscalls(thread_start().iter().map(|s| s.nr));
        }
    }
    f
}

fn scenario(name: &str) {
    if kvm_or_skip(name).is_some() {
        run_child(CHILD, ENV, name);
    }
}

/// A scenario that needs a guest_memfd with MMAP|INIT_SHARED: a capability
/// skip (`common::skip_capability`) where a default VM does not offer it.
fn gmem_scenario(name: &str) {
    if let Some(kvm) = kvm_or_skip(name)
        && kvm_has_guest_memfd(&kvm, GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED)
    {
        run_child(CHILD, ENV, name);
    }
}

/// The child side: a no-op unless the parent set [`ENV`].
#[test]
fn seccomp_child() {
    let Ok(name) = std::env::var(ENV) else {
        return;
    };
    let name = name.as_str();
    match name {
        "open_and_create_vm" => open_and_create_vm(name),
        "create_guest_memfd" => create_guest_memfd(name),
        "map" => map(name),
        "punch_hole" => punch_hole(name),
        "memslot_v2" => memslot_v2(name),
        "memory_attributes" => memory_attributes(name),
        "pre_fault" => pre_fault(name),
        "populate_mmap_copy" => populate(name, Strategy::MmapCopy),
        "populate_auto" => populate(name, Strategy::Auto),
        "share" => share(name),
        "adopt" => adopt(name),
        "adopt_refusal" => adopt_refusal(name),
        "capabilities" => capabilities(name),
        other => fail(other, "unknown scenario"),
    }
}

fn setup(name: &str) -> (KvmDevice, Vm) {
    let kvm = KvmDevice::open().unwrap_or_else(|e| fail(name, e));
    let vm = kvm
        .create_vm(VmType::DEFAULT)
        .unwrap_or_else(|e| fail(name, e));
    (kvm, vm)
}

fn shared_gmem(name: &str, vm: &Vm, size: u64) -> GuestMemfd {
    GuestMemfd::builder(size)
        .mmap(true)
        .init_shared(true)
        .create(vm)
        .unwrap_or_else(|e| fail(name, e))
}

fn open_and_create_vm(name: &str) {
    filter_for(&[Feature::OpenKvm, Feature::CreateVm]).install();
    let kvm = KvmDevice::open().unwrap_or_else(|e| fail(name, e));
    let v = kvm.api_version().unwrap_or_else(|e| fail(name, e));
    if v != 12 {
        fail(name, format!("KVM_GET_API_VERSION = {v}"));
    }
    let vm = kvm
        .create_vm(VmType::DEFAULT)
        .unwrap_or_else(|e| fail(name, e));
    vm.extension(kvm_gmem::Extension::GUEST_MEMFD)
        .unwrap_or_else(|e| fail(name, e));
    drop(vm);
    drop(kvm);
    ok(name)
}

fn create_guest_memfd(name: &str) {
    let (_kvm, vm) = setup(name);
    filter_for(&[Feature::CreateGuestMemfd]).install();
    let g = shared_gmem(name, &vm, 2 << 20);
    let flags = vm.guest_memfd_flags().unwrap_or_else(|e| fail(name, e));
    if !flags.contains(g.flags()) {
        fail(name, "flags");
    }
    drop(g);
    ok(name)
}

fn map(name: &str) {
    let (_kvm, vm) = setup(name);
    let g = shared_gmem(name, &vm, 2 << 20);
    filter_for(&[Feature::Map]).install();
    let m = g.map().unwrap_or_else(|e| fail(name, e));
    m.write_at(0x1000, b"seccomp")
        .unwrap_or_else(|e| fail(name, e));
    m.fill(0x2000, 0x1000, 0xa5)
        .unwrap_or_else(|e| fail(name, e));
    m.populate_write(0x10_0000, 0x1000)
        .unwrap_or_else(|e| fail(name, e));
    let mut b = [0u8; 7];
    m.read_at(0x1000, &mut b).unwrap_or_else(|e| fail(name, e));
    if &b != b"seccomp" {
        fail(name, "read back");
    }
    drop(m);
    ok(name)
}

fn punch_hole(name: &str) {
    let (_kvm, vm) = setup(name);
    let g = shared_gmem(name, &vm, 2 << 20);
    let p = page_size();
    filter_for(&[Feature::PunchHole]).install();
    g.allocate(0..4 * p).unwrap_or_else(|e| fail(name, e));
    g.punch_hole(p..2 * p).unwrap_or_else(|e| fail(name, e));
    ok(name)
}

fn memslot_v2(name: &str) {
    let (_kvm, vm) = setup(name);
    let g = shared_gmem(name, &vm, 2 << 20);
    let m = g.map().unwrap_or_else(|e| fail(name, e));
    let region = MemoryRegion2::builder(3, 1 << 30, 2 << 20)
        .guest_memfd(&g, 0)
        .userspace(&m)
        .build()
        .unwrap_or_else(|e| fail(name, e));
    filter_for(&[Feature::MemslotV2]).install();
    // SAFETY: `m` outlives the slot, which is deleted right below (and the
    // process ends with _exit before anything is unmapped).
    unsafe { vm.set_memory_region(&region) }.unwrap_or_else(|e| fail(name, e));
    vm.delete_memory_region(3).unwrap_or_else(|e| fail(name, e));
    ok(name)
}

fn memory_attributes(name: &str) {
    let (_kvm, vm) = setup(name);
    let p = page_size();
    filter_for(&[Feature::MemoryAttributes]).install();
    let supported = vm.supported_attributes().unwrap_or_else(|e| fail(name, e));
    let want = if supported.contains(MemoryAttributes::PRIVATE) {
        MemoryAttributes::PRIVATE
    } else {
        MemoryAttributes::empty()
    };
    match vm.set_attributes(0..p, want) {
        Ok(()) => {}
        // A VM type without private memory: refused, after the calls ran.
        Err(e) if e.is_unsupported() => {}
        Err(e @ Error::Kernel { .. }) if !supported.contains(MemoryAttributes::PRIVATE) => {
            let _ = e;
        }
        Err(e) => fail(name, e),
    }
    ok(name)
}

fn pre_fault(name: &str) {
    let ki = kvm_ioctls::Kvm::new().unwrap_or_else(|e| fail(name, e));
    let vm_fd = ki.create_vm().unwrap_or_else(|e| fail(name, e));
    let vcpu = vm_fd.create_vcpu(0).unwrap_or_else(|e| fail(name, e));
    // SAFETY: `vcpu` owns its descriptor until the process ends with _exit.
    let vcpu_fd = unsafe { BorrowedFd::borrow_raw(vcpu.as_raw_fd()) };
    let p = page_size();
    filter_for(&[Feature::PreFault]).install();
    // No memslot covers the range: the kernel stops at once, and where it
    // has no pre-fault the crate opens /dev/kvm to say so.
    match pre_fault_memory(&vcpu_fd, 0..4 * p) {
        Ok(r) if !r.is_complete() => {}
        Ok(r) => fail(
            name,
            format!("pre-fault without a memslot completed: {r:?}"),
        ),
        Err(e) if e.is_unsupported() => {}
        Err(e) => fail(name, e),
    }
    ok(name)
}

fn populate(name: &str, strategy: Strategy) {
    let (_kvm, vm) = setup(name);
    let size: u64 = 8 << 20;
    let g = shared_gmem(name, &vm, size);
    let view = g.map().unwrap_or_else(|e| fail(name, e));
    let data: Vec<u8> = (0..size).map(|i| (i * 7 + (i >> 12)) as u8).collect();
    let path = std::env::temp_dir().join(format!("kvm-gmem-seccomp-{}", std::process::id()));
    std::fs::write(&path, &data).unwrap_or_else(|e| fail(name, e));
    let file = std::fs::File::open(&path).unwrap_or_else(|e| fail(name, e));
    let _ = std::fs::remove_file(&path);
    filter_for(&[Feature::Populate(strategy)]).install();
    let half = size / 2;
    // Two threads from the file, one from the buffer.
    let a = Populate::new(&vm, &g)
        .strategy(strategy)
        .gpa_base(0)
        .threads(2)
        .run(0..half, Source::file(&file, 0))
        .unwrap_or_else(|e| fail(name, e));
    let b = Populate::detached(&g)
        .strategy(strategy)
        .threads(1)
        .run(half..size, Source::bytes(&data[half as usize..]))
        .unwrap_or_else(|e| fail(name, e));
    // Reading through the mapping made before the filter is memory only.
    let mut back = vec![0u8; size as usize];
    view.read_at(0, &mut back).unwrap_or_else(|e| fail(name, e));
    if back != data {
        fail(name, "the populated contents differ from the source");
    }
    filter::say(&format!(
        "\n{name}: {:?} ({} threads), {:?}\n",
        a.strategy, a.threads, b.strategy
    ));
    ok(name)
}

fn share(name: &str) {
    let (_kvm, vm) = setup(name);
    let g = shared_gmem(name, &vm, 2 << 20);
    let (a, b) = UnixStream::pair().unwrap_or_else(|e| fail(name, e));
    filter_for(&[Feature::ShareSend, Feature::ShareRecv]).install();
    kvm_gmem::share::send(&a, &g).unwrap_or_else(|e| fail(name, e));
    let got = kvm_gmem::share::recv(&b).unwrap_or_else(|e| fail(name, e));
    if got.size() != g.size() || got.flags() != g.flags() {
        fail(name, "received size or flags differ");
    }
    drop(got);
    ok(name)
}

/// A memfd (not a guest_memfd), made before the filter.
fn memfd(name: &str) -> OwnedFd {
    // SAFETY: a NUL-terminated name; memfd_create returns a new descriptor.
    let raw = unsafe { libc::memfd_create(c"[kvm-gmem]".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        fail(name, std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is new and owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Adopting a guest_memfd handed over as a bare fd: the probe (`MMAP`),
/// the claimed flags' checks (`INIT_SHARED` faults the first page in), and
/// a refusal. The guest_memfd and its duplicates are made before the
/// filter.
fn adopt(name: &str) {
    let (_kvm, vm) = setup(name);
    let g = shared_gmem(name, &vm, 2 << 20);
    let dup = || {
        g.as_fd()
            .try_clone_to_owned()
            .unwrap_or_else(|e| fail(name, e))
    };
    let (plain, claimed) = (dup(), dup());
    let not_gmem = memfd(name);
    filter_for(&[Feature::AdoptGuestMemfd]).install();
    let a = GuestMemfd::adopt(plain).unwrap_or_else(|e| fail(name, e));
    if a.size() != g.size() || a.flags() != GuestMemfdFlags::MMAP {
        fail(
            name,
            format!("adopted {} bytes, flags {}", a.size(), a.flags()),
        );
    }
    let b = GuestMemfd::adopt_with_flags(claimed, g.flags()).unwrap_or_else(|e| fail(name, e));
    if b.flags() != g.flags() {
        fail(name, format!("claimed {}, got {}", g.flags(), b.flags()));
    }
    match GuestMemfd::adopt(not_gmem) {
        Err(Error::Invalid { .. }) => {}
        other => fail(name, format!("a memfd: {other:?}")),
    }
    drop((a, b));
    ok(name)
}

/// The refusals alone, which need no guest_memfd: the identity check and
/// the `close` of the refused fd.
fn adopt_refusal(name: &str) {
    let (first, second) = (memfd(name), memfd(name));
    filter_for(&[Feature::AdoptGuestMemfd]).install();
    match GuestMemfd::adopt(first) {
        Err(Error::Invalid { .. }) => {}
        other => fail(name, format!("{other:?}")),
    }
    match GuestMemfd::adopt_with_flags(second, GuestMemfdFlags::MMAP) {
        Err(Error::Invalid { .. }) => {}
        other => fail(name, format!("{other:?}")),
    }
    ok(name)
}

fn capabilities(name: &str) {
    let (kvm, vm) = setup(name);
    let gmem = vm
        .extension(kvm_gmem::Extension::GUEST_MEMFD)
        .unwrap_or_else(|e| fail(name, e));
    filter_for(&[Feature::Capabilities]).install();
    let caps = Capabilities::query(&kvm, &vm, VmType::DEFAULT).unwrap_or_else(|e| fail(name, e));
    if caps.guest_memfd.supported != (gmem > 0) {
        fail(
            name,
            format!("KVM_CAP_GUEST_MEMFD = {gmem}, but the report says {caps:?}"),
        );
    }
    ok(name)
}

#[test]
fn filter_open_and_create_vm() {
    scenario("open_and_create_vm");
}

#[test]
fn filter_create_guest_memfd() {
    gmem_scenario("create_guest_memfd");
}

#[test]
fn filter_map() {
    gmem_scenario("map");
}

#[test]
fn filter_punch_hole() {
    gmem_scenario("punch_hole");
}

#[test]
fn filter_memslot_v2() {
    gmem_scenario("memslot_v2");
}

#[test]
fn filter_memory_attributes() {
    scenario("memory_attributes");
}

#[test]
fn filter_pre_fault() {
    scenario("pre_fault");
}

#[test]
fn filter_populate_mmap_copy() {
    gmem_scenario("populate_mmap_copy");
}

#[test]
fn filter_populate_auto() {
    gmem_scenario("populate_auto");
}

#[test]
fn filter_share_send_recv() {
    gmem_scenario("share");
}

#[test]
fn filter_adopt() {
    gmem_scenario("adopt");
}

/// Needs no KVM: the refused fds are memfds.
#[test]
fn filter_adopt_refusal() {
    run_child(CHILD, ENV, "adopt_refusal");
}

#[test]
fn filter_capabilities() {
    scenario("capabilities");
}

/// The filter itself works: a call outside the rule is trapped and named.
#[test]
fn filter_traps_a_call_outside_the_rule() {
    if std::env::var(ENV).is_ok() {
        return;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "seccomp_negative_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KVM_GMEM_SECCOMP_NEGATIVE", "1")
        .output()
        .expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(filter::TRAPPED), "{stderr}");
    assert!(
        stderr.contains(&format!("system call {} ", libc::SYS_fallocate)),
        "{stderr}"
    );
}

#[test]
fn seccomp_negative_child() {
    if std::env::var("KVM_GMEM_SECCOMP_NEGATIVE").is_err() {
        return;
    }
    // Map's rule has no fallocate: punching a hole must trap.
    let raw = {
        // SAFETY: a NUL-terminated name; the fd is leaked to _exit.
        unsafe { libc::memfd_create(c"neg".as_ptr(), libc::MFD_CLOEXEC) }
    };
    filter_for(&[Feature::Map]).install();
    // SAFETY: fallocate takes integers only.
    unsafe { libc::fallocate(raw, 0, 0, 4096) };
    fail("negative", "fallocate was allowed");
}
