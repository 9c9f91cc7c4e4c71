//! `uffd_gmem::seccomp`: the table is consistent with `kvm-gmem-sys`, and
//! each feature runs to completion in a child process whose seccomp filter
//! allows only that feature's rule plus the runtime baseline documented in
//! `tests/common/seccomp_filter.rs` (a byte-identical copy of kvm-gmem's
//! `tests/common/seccomp_filter.rs`; anything else traps and names the
//! call).
//!
//! Setup that is not the feature under test (the userfaultfd, the memory,
//! registration when the feature is not registration, a socket pair) happens
//! before the filter is installed; the child ends with `_exit` right after
//! the feature.
//!
//! Tests need a userfaultfd (`/dev/userfaultfd` or the system call); without
//! one they print `SKIP` and pass, except under `CI=true`.

#![allow(unsafe_code)]

mod common;
// A byte-identical copy of kvm-gmem's tests/common/seccomp_filter.rs.
#[path = "common/seccomp_filter.rs"]
mod filter;

use common::{page, uffd_or_skip};
use filter::{Filter, fail, ok, run_child};
use kvm_gmem_sys as sys;
#[cfg(feature = "firecracker")]
use std::os::fd::AsFd;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
#[cfg(feature = "firecracker")]
use std::os::unix::net::UnixStream;
use std::time::Duration;
#[cfg(feature = "firecracker")]
use uffd_gmem::firecracker::{self, GuestRegionUffdMapping, Handshake};
use uffd_gmem::seccomp::{Feature, rule, rules, thread_start};
use uffd_gmem::serve::{MappedFile, PageSource, Region, Server};
use uffd_gmem::{Features, HostMapping, Mode, Origin, RegisterMode, Uffd};

const CHILD: &str = "seccomp_child";
const ENV: &str = "UFFD_GMEM_SECCOMP_SCENARIO";

/// Every request name the table uses, with the `kvm-gmem-sys` constant.
fn request_by_name(name: &str) -> Option<u32> {
    Some(match name {
        "USERFAULTFD_IOC_NEW" => sys::USERFAULTFD_IOC_NEW,
        "UFFDIO_API" => sys::UFFDIO_API,
        "UFFDIO_REGISTER" => sys::UFFDIO_REGISTER,
        "UFFDIO_UNREGISTER" => sys::UFFDIO_UNREGISTER,
        "UFFDIO_WAKE" => sys::UFFDIO_WAKE,
        "UFFDIO_COPY" => sys::UFFDIO_COPY,
        "UFFDIO_ZEROPAGE" => sys::UFFDIO_ZEROPAGE,
        "UFFDIO_CONTINUE" => sys::UFFDIO_CONTINUE,
        "UFFDIO_WRITEPROTECT" => sys::UFFDIO_WRITEPROTECT,
        "UFFDIO_POISON" => sys::UFFDIO_POISON,
        "UFFDIO_MOVE" => sys::UFFDIO_MOVE,
        "UFFDIO_RWPROTECT" => sys::UFFDIO_RWPROTECT,
        "UFFDIO_SET_MODE" => sys::UFFDIO_SET_MODE,
        _ => return None,
    })
}

#[test]
fn every_ioctl_is_the_sys_constant() {
    let seen = filter::check_rule_table(rules(), request_by_name);
    assert!(seen >= 15, "only {seen} ioctls listed");
    let create = rule(Feature::CreateSyscall);
    assert!(
        create
            .syscalls
            .iter()
            .any(|s| s.name == "userfaultfd" && s.nr == libc::SYS_userfaultfd)
    );
}

#[test]
fn every_feature_has_a_rule() {
    for f in [
        Feature::CreateDevice,
        Feature::CreateSyscall,
        Feature::Adopt,
        Feature::Register,
        Feature::Copy,
        Feature::Zeropage,
        Feature::Continue,
        Feature::Wake,
        Feature::WriteProtect,
        Feature::Poison,
        Feature::Move,
        Feature::RwProtect,
        Feature::SetMode,
        Feature::Events,
        Feature::Serve,
        Feature::MappedFile,
        Feature::HostMapping,
        #[cfg(feature = "firecracker")]
        Feature::FirecrackerHandshake,
        #[cfg(feature = "firecracker")]
        Feature::FirecrackerSend,
    ] {
        let r = rule(f);
        assert_eq!(r.feature, f);
        assert!(!r.syscalls.is_empty() || !r.ioctls.is_empty(), "{f:?}");
    }
    let firecracker = if cfg!(feature = "firecracker") { 2 } else { 0 };
    assert_eq!(rules().len(), 17 + firecracker);
}

// ---- the filter runs ------------------------------------------------------

fn filter_for(features: &[Feature]) -> Filter {
    let mut f = Filter::baseline();
    for &feature in features {
        let r = rule(feature);
        f.syscalls(r.syscalls.iter().map(|s| s.nr));
        f.ioctls(r.ioctls.iter().map(|i| i.request));
        if r.threads {
            f.syscalls(thread_start().iter().map(|s| s.nr));
        }
    }
    f
}

fn scenario(name: &str) {
    if uffd_or_skip(name, Features::empty()).is_some() {
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
        "create_device" => create_device(name),
        "create_syscall" => create_syscall(name),
        "adopt" => adopt(name),
        "register_copy_zeropage_wake" => register_copy_zeropage_wake(name),
        "continue" => continue_minor(name),
        "events" => events(name),
        "serve" => serve(name),
        "mapped_file" => mapped_file(name),
        "host_mapping" => host_mapping(name),
        #[cfg(feature = "firecracker")]
        "firecracker" => firecracker_handshake(name),
        other => fail(other, "unknown scenario"),
    }
}

/// An anonymous private mapping, never unmapped (the child ends with _exit).
fn anon(name: &str, len: u64) -> u64 {
    // SAFETY: a fresh private anonymous mapping chosen by the kernel.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        fail(name, std::io::Error::last_os_error());
    }
    p as u64
}

fn create_device(name: &str) {
    filter_for(&[Feature::CreateDevice]).install();
    let u = Uffd::builder()
        .require_features(Features::EVENT_REMOVE)
        .create()
        .unwrap_or_else(|e| fail(name, e));
    if u.origin() != Origin::Device {
        // A host without /dev/userfaultfd: the device was tried, refused.
        filter::say(&format!("\nSKIP {name}: origin {:?}\n", u.origin()));
    }
    drop(u);
    ok(name)
}

fn create_syscall(name: &str) {
    filter_for(&[Feature::CreateSyscall]).install();
    let u = Uffd::builder()
        .device_path("/nonexistent/userfaultfd")
        .create()
        .unwrap_or_else(|e| fail(name, e));
    if u.origin() != Origin::Syscall {
        fail(name, format!("origin {:?}", u.origin()));
    }
    drop(u);
    ok(name)
}

fn adopt(name: &str) {
    let u = Uffd::builder().create().unwrap_or_else(|e| fail(name, e));
    let fd = OwnedFd::from(u);
    filter_for(&[Feature::Adopt]).install();
    let u = Uffd::from_initialized(fd);
    if u.origin() != Origin::Adopted {
        fail(name, format!("origin {:?}", u.origin()));
    }
    ok(name)
}

fn register_copy_zeropage_wake(name: &str) {
    let u = Uffd::builder().create().unwrap_or_else(|e| fail(name, e));
    let p = page();
    let mem = anon(name, 4 * p);
    let src = vec![0x5au8; p as usize];
    filter_for(&[
        Feature::Register,
        Feature::Copy,
        Feature::Zeropage,
        Feature::Wake,
    ])
    .install();
    // SAFETY: `mem` is a private anonymous mapping nothing references; it
    // stays mapped until the process ends.
    unsafe { u.register(mem..mem + 4 * p, RegisterMode::MISSING) }
        .unwrap_or_else(|e| fail(name, e));
    // SAFETY: `src` is readable for one page.
    let n =
        unsafe { u.copy(mem, src.as_ptr(), p, Mode::empty()) }.unwrap_or_else(|e| fail(name, e));
    if n != p {
        fail(name, format!("copied {n}"));
    }
    u.zeropage(mem + p..mem + 2 * p, Mode::empty())
        .unwrap_or_else(|e| fail(name, e));
    u.wake(mem..mem + 4 * p).unwrap_or_else(|e| fail(name, e));
    u.unregister(mem..mem + 4 * p)
        .unwrap_or_else(|e| fail(name, e));
    // SAFETY: the copied page, now mapped and unregistered.
    let b = unsafe { std::ptr::read_volatile(mem as *const u8) };
    if b != 0x5a {
        fail(name, "copied byte");
    }
    ok(name)
}

fn memfd(name: &str, len: u64) -> OwnedFd {
    // SAFETY: a NUL-terminated name; memfd_create returns a new descriptor.
    let raw = unsafe { libc::memfd_create(c"uffd-seccomp".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        fail(name, std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is new and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: integer arguments on our memfd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) } < 0 {
        fail(name, std::io::Error::last_os_error());
    }
    fd
}

fn shared(name: &str, fd: &OwnedFd, len: u64) -> u64 {
    // SAFETY: a fresh shared mapping of our memfd chosen by the kernel.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        fail(name, std::io::Error::last_os_error());
    }
    p as u64
}

fn continue_minor(name: &str) {
    let u = match Uffd::builder()
        .require_features(Features::MINOR_SHMEM)
        .create()
    {
        Ok(u) => u,
        Err(e) => {
            filter::say(&format!("\nSKIP {name}: {e}\n"));
            ok(name)
        }
    };
    let p = page();
    let fd = memfd(name, 2 * p);
    let view = shared(name, &fd, 2 * p);
    let alias = shared(name, &fd, 2 * p);
    // SAFETY: the alias maps two pages of our memfd.
    unsafe { std::ptr::write_bytes(alias as *mut u8, 0x33, 2 * p as usize) };
    // SAFETY: `view` is a shared mapping nothing references.
    unsafe { u.register(view..view + 2 * p, RegisterMode::MINOR) }
        .unwrap_or_else(|e| fail(name, e));
    filter_for(&[Feature::Continue]).install();
    let n = u
        .r#continue(view..view + 2 * p, Mode::empty())
        .unwrap_or_else(|e| fail(name, e));
    if n != 2 * p {
        fail(name, format!("mapped {n}"));
    }
    // SAFETY: the page is mapped now.
    let b = unsafe { std::ptr::read_volatile((view + p) as *const u8) };
    if b != 0x33 {
        fail(name, "continued byte");
    }
    ok(name)
}

fn events(name: &str) {
    let u = Uffd::builder()
        .non_blocking(true)
        .create()
        .unwrap_or_else(|e| fail(name, e));
    filter_for(&[Feature::Events]).install();
    if u.poll_readable(Duration::from_millis(1))
        .unwrap_or_else(|e| fail(name, e))
    {
        fail(name, "an event on a fresh userfaultfd");
    }
    if let Some(e) = u.read_event().unwrap_or_else(|e| fail(name, e)) {
        fail(name, format!("event {e:?}"));
    }
    ok(name)
}

fn serve(name: &str) {
    let u = Uffd::builder()
        .non_blocking(true)
        .create()
        .unwrap_or_else(|e| fail(name, e));
    let p = page();
    let pages = 64u64;
    let mem = anon(name, pages * p);
    let src: Vec<u8> = (0..pages * p).map(|i| (i / p) as u8 ^ 0x5c).collect();
    // SAFETY: `mem` is a private anonymous mapping only this test touches,
    // through volatile reads after the server resolves each fault.
    unsafe { u.register(mem..mem + pages * p, RegisterMode::MISSING) }
        .unwrap_or_else(|e| fail(name, e));
    filter_for(&[Feature::Serve]).install();
    let server = Server::builder(u)
        .region(Region::new(mem, pages * p))
        .source(src.clone())
        .workers(2)
        .spawn()
        .unwrap_or_else(|e| fail(name, e));
    // Each first touch faults; the server copies the page in.
    let toucher = std::thread::spawn(move || {
        (0..pages)
            .map(|i| {
                // SAFETY: inside the registered mapping; the read waits for
                // the server to fill the page.
                unsafe { std::ptr::read_volatile((mem + i * p + 7) as *const u8) }
            })
            .collect::<Vec<u8>>()
    });
    let got = toucher
        .join()
        .unwrap_or_else(|_| fail(name, "toucher panicked"));
    let stats = server.shutdown().unwrap_or_else(|e| fail(name, e));
    for (i, b) in got.iter().enumerate() {
        if *b != src[i * p as usize + 7] {
            fail(name, format!("page {i}: {b:#x}"));
        }
    }
    if stats.faults == 0 || !stats.errors.is_empty() {
        fail(name, format!("{stats:?}"));
    }
    ok(name)
}

/// The file `mapped_file` maps: named after the test process, which runs
/// the scenario in a child and removes it afterwards (the child cannot: its
/// filter allows no `unlink`).
fn mapped_file_path(test_pid: u32) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("uffd-gmem-seccomp-{test_pid}"))
}

fn mapped_file(name: &str) {
    let path = mapped_file_path(std::os::unix::process::parent_id());
    std::fs::write(&path, vec![0x42u8; 3 * page() as usize]).unwrap_or_else(|e| fail(name, e));
    filter_for(&[Feature::MappedFile]).install();
    let f = MappedFile::open(&path).unwrap_or_else(|e| fail(name, e));
    let mut b = [0u8; 16];
    f.read_at(page(), &mut b).unwrap_or_else(|e| fail(name, e));
    if b != [0x42; 16] {
        fail(name, "read back");
    }
    drop(f);
    ok(name)
}

fn host_mapping(name: &str) {
    let u = Uffd::builder()
        .non_blocking(true)
        .create()
        .unwrap_or_else(|e| fail(name, e));
    let p = page() as usize;
    filter_for(&[Feature::HostMapping, Feature::Register]).install();
    let anon = HostMapping::anonymous(4 * p).unwrap_or_else(|e| fail(name, e));
    let shm = HostMapping::memfd("uffd-gmem-seccomp", 4 * p).unwrap_or_else(|e| fail(name, e));
    let memfd = shm.memfd_fd().unwrap_or_else(|| fail(name, "no memfd"));
    let alias = HostMapping::file(memfd, 0, 4 * p, true).unwrap_or_else(|e| fail(name, e));
    shm.write_at(p as u64 + 3, b"seccomp")
        .unwrap_or_else(|e| fail(name, e));
    let mut b = [0u8; 7];
    alias
        .read_at(p as u64 + 3, &mut b)
        .unwrap_or_else(|e| fail(name, e));
    if &b != b"seccomp" {
        fail(name, "read back through the alias");
    }
    u.register_mapping(&anon, RegisterMode::MISSING)
        .unwrap_or_else(|e| fail(name, e));
    u.unregister(anon.range()).unwrap_or_else(|e| fail(name, e));
    drop((anon, alias, shm));
    ok(name)
}

#[cfg(feature = "firecracker")]
fn firecracker_handshake(name: &str) {
    let u = Uffd::builder().create().unwrap_or_else(|e| fail(name, e));
    let (vmm, handler) = UnixStream::pair().unwrap_or_else(|e| fail(name, e));
    let regions = vec![
        GuestRegionUffdMapping::new(0x7f00_0000_0000, 1 << 20, 0, page()),
        GuestRegionUffdMapping::new(0x7f00_0010_0000, 1 << 20, 1 << 20, page()),
    ];
    filter_for(&[Feature::FirecrackerSend, Feature::FirecrackerHandshake]).install();
    firecracker::send(&vmm, &regions, &[u.as_fd()]).unwrap_or_else(|e| fail(name, e));
    let hs = Handshake::recv_timeout(&handler, Duration::from_secs(10))
        .unwrap_or_else(|e| fail(name, e));
    if hs.regions != regions || hs.peer.is_none() {
        fail(name, format!("{hs:?}"));
    }
    drop(hs);
    ok(name)
}

#[test]
fn filter_create_device() {
    scenario("create_device");
}

#[test]
fn filter_create_syscall() {
    scenario("create_syscall");
}

#[test]
fn filter_adopt() {
    scenario("adopt");
}

#[test]
fn filter_register_copy_zeropage_wake() {
    scenario("register_copy_zeropage_wake");
}

#[test]
fn filter_continue() {
    scenario("continue");
}

#[test]
fn filter_events() {
    scenario("events");
}

#[test]
fn filter_serve() {
    scenario("serve");
}

#[test]
fn filter_mapped_file() {
    scenario("mapped_file");
    let _ = std::fs::remove_file(mapped_file_path(std::process::id()));
}

#[test]
fn filter_host_mapping() {
    scenario("host_mapping");
}

#[cfg(feature = "firecracker")]
#[test]
fn filter_firecracker_handshake() {
    scenario("firecracker");
}
