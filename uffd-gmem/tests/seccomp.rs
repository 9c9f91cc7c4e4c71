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
        #[cfg(feature = "firecracker")]
        Feature::FirecrackerFaultChannel,
        #[cfg(feature = "firecracker-secret-hiding")]
        Feature::UserfaultServer,
    ] {
        let r = rule(f);
        assert_eq!(r.feature, f);
        assert!(!r.syscalls.is_empty() || !r.ioctls.is_empty(), "{f:?}");
    }
    let firecracker = if cfg!(feature = "firecracker") { 3 } else { 0 };
    let secret_hiding = usize::from(cfg!(feature = "firecracker-secret-hiding"));
    assert_eq!(rules().len(), 17 + firecracker + secret_hiding);
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

/// A scenario that needs no userfaultfd (the Firecracker fault channel and
/// userfault server work on a socket and a file).
#[cfg(feature = "firecracker")]
fn scenario_without_uffd(name: &str) {
    run_child(CHILD, ENV, name);
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
        #[cfg(feature = "firecracker")]
        "fault_channel" => fault_channel(name),
        #[cfg(feature = "firecracker-secret-hiding")]
        "userfault_server" => userfault_server(name),
        #[cfg(feature = "firecracker-secret-hiding")]
        "secret_hiding_handler" => secret_hiding_handler(name),
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

/// What the unfiltered peer thread of `fault_channel` does.
#[cfg(feature = "firecracker")]
enum Peer {
    /// Sleeps, then writes these bytes to its stream (a few, to an empty
    /// socket: even a non-blocking one takes them): the filtered thread is
    /// waiting in `poll` for them by then. The mode is left alone: it
    /// belongs to the open file, which the dup shares with the channel.
    WriteLater(UnixStream, Vec<u8>),
    /// Sleeps, then reads this many bytes from its stream (the filtered
    /// thread is waiting in `poll` for room by then) and sends them back.
    DrainLater(UnixStream, usize),
}

/// `FaultChannel` both ways, on Firecracker's non-blocking end and the
/// handler's blocking one: frames that are there, frames waited for with
/// `poll` (an empty socket, and a full one on the non-blocking end), and the
/// end of the stream after the VMM's end is dropped. The peer that makes the
/// waits happen is a thread started before the filter (seccomp filters
/// apply to the thread that installs them and the threads it starts later),
/// holding its own duplicates of the ends; the sockets are made before the
/// filter too.
#[cfg(feature = "firecracker")]
fn fault_channel(name: &str) {
    use std::io::{Read, Write};
    use std::sync::mpsc;
    use uffd_gmem::firecracker::{FaultChannel, FaultReply, FaultRequest};

    let (vmm, handler) = UnixStream::pair().unwrap_or_else(|e| fail(name, e));
    vmm.set_nonblocking(true).unwrap_or_else(|e| fail(name, e)); // as Firecracker does
    let dup = |s: &UnixStream| s.try_clone().unwrap_or_else(|e| fail(name, e));
    let (vmm_dups, handler_dups) = ([dup(&vmm), dup(&vmm)], [dup(&handler), dup(&handler)]);
    let (to_peer, jobs) = mpsc::channel::<Peer>();
    let (done, from_peer) = mpsc::channel::<Vec<u8>>();
    let peer = std::thread::spawn(move || {
        for job in jobs {
            std::thread::sleep(Duration::from_millis(100));
            match job {
                Peer::WriteLater(mut s, bytes) => {
                    s.write_all(&bytes).unwrap();
                }
                Peer::DrainLater(mut s, n) => {
                    let mut got = vec![0u8; n];
                    s.read_exact(&mut got).unwrap();
                    done.send(got).unwrap();
                }
            }
        }
    });
    let [vmm_dup_a, vmm_dup_b] = vmm_dups;
    let [handler_dup_a, handler_dup_b] = handler_dups;
    let (vmm, handler) = (FaultChannel::new(vmm), FaultChannel::new(handler));
    let req = |i: u32| FaultRequest::sync(i, 0x10_0000 + u64::from(i) * 0x1000, 1 << 4);
    filter_for(&[Feature::FirecrackerFaultChannel]).install();

    // A round trip: the request to the handler, the reply back.
    vmm.send_request(&req(1)).unwrap_or_else(|e| fail(name, e));
    let got = handler.recv_request().unwrap_or_else(|e| fail(name, e));
    if got != Some(req(1)) {
        fail(name, format!("request {got:?}"));
    }
    let reply = FaultReply::for_request(&req(1), 0x10_1000, 4096);
    handler.send_reply(&reply).unwrap_or_else(|e| fail(name, e));
    let back = vmm.recv_reply().unwrap_or_else(|e| fail(name, e));
    if back != Some(reply) {
        fail(name, format!("reply {back:?}"));
    }

    // Nothing there yet: each end waits in poll for the peer's frame.
    to_peer
        .send(Peer::WriteLater(vmm_dup_a, req(2).to_frame()))
        .unwrap_or_else(|e| fail(name, e));
    let got = handler.recv_request().unwrap_or_else(|e| fail(name, e));
    if got != Some(req(2)) {
        fail(name, format!("waited-for request {got:?}"));
    }
    to_peer
        .send(Peer::WriteLater(handler_dup_a, reply.to_frame()))
        .unwrap_or_else(|e| fail(name, e));
    let back = vmm.recv_reply().unwrap_or_else(|e| fail(name, e));
    if back != Some(reply) {
        fail(name, format!("waited-for reply {back:?}"));
    }

    // More than the socket holds, from the non-blocking end: it waits in
    // poll for room while the peer drains the other end.
    let frames: Vec<Vec<u8>> = (0..20_000).map(|i| req(i).to_frame()).collect();
    let total: usize = frames.iter().map(Vec::len).sum();
    to_peer
        .send(Peer::DrainLater(handler_dup_b, total))
        .unwrap_or_else(|e| fail(name, e));
    for i in 0..20_000 {
        vmm.send_request(&req(i)).unwrap_or_else(|e| fail(name, e));
    }
    let drained = from_peer.recv().unwrap_or_else(|e| fail(name, e));
    if drained != frames.concat() {
        fail(name, "the drained bytes are not the frames sent");
    }

    // Firecracker goes away: end of stream, between frames.
    drop(to_peer);
    peer.join()
        .unwrap_or_else(|_| fail(name, "the peer panicked"));
    drop((vmm, vmm_dup_b));
    match handler.recv_request() {
        Ok(None) => {}
        other => fail(name, format!("after the VMM closed: {other:?}")),
    }
    drop(handler);
    ok(name)
}

/// A stand-in guest_memfd (a memfd: it takes `pwrite` too; no guest_memfd
/// can be made on a host without KVM's), the snapshot, one region and a
/// bitmap shared as a memfd, all made before the filter; the bitmap's
/// construction (`UserfaultBitmap::memfd`, `from_fd`) is kvm-gmem's and has
/// no seccomp feature there yet. Returns the stand-in, a shared view of it,
/// the VMM's and the handler's bitmaps, the regions and the snapshot.
#[cfg(feature = "firecracker-secret-hiding")]
#[allow(clippy::type_complexity)]
fn userfault_setup(
    name: &str,
) -> (
    OwnedFd,
    u64,
    kvm_gmem::UserfaultBitmap,
    kvm_gmem::UserfaultBitmap,
    Vec<GuestRegionUffdMapping>,
    Vec<u8>,
) {
    let p = page();
    let gmem = memfd(name, 8 * p);
    let view = shared(name, &gmem, 8 * p);
    let vmm_bitmap = kvm_gmem::UserfaultBitmap::memfd(8, true).unwrap_or_else(|e| fail(name, e));
    let fd = vmm_bitmap
        .fd()
        .unwrap_or_else(|| fail(name, "no bitmap fd"))
        .try_clone_to_owned()
        .unwrap_or_else(|e| fail(name, e));
    let bitmap = kvm_gmem::UserfaultBitmap::from_fd(fd, 8).unwrap_or_else(|e| fail(name, e));
    let mut region = GuestRegionUffdMapping::new(0x7f00_0000_0000, 8 * p, 0, p);
    (region.gpa_start, region.is_guest_memfd) = (Some(0x10_0000), Some(true));
    let snapshot: Vec<u8> = (0..8 * p).map(|i| (i / p) as u8 ^ 0x3c).collect();
    (gmem, view, vmm_bitmap, bitmap, vec![region], snapshot)
}

/// Checks page `i` of the stand-in (through the view made before the
/// filter: memory, no system call) and its bit.
#[cfg(feature = "firecracker-secret-hiding")]
fn check_served(
    name: &str,
    view: u64,
    vmm_bitmap: &kvm_gmem::UserfaultBitmap,
    snapshot: &[u8],
    i: u64,
) {
    let p = page();
    // SAFETY: page `i` of the shared view, mapped until the process ends.
    let b = unsafe { std::ptr::read_volatile((view + i * p + 9) as *const u8) };
    if b != snapshot[(i * p + 9) as usize] || vmm_bitmap.is_set(i) {
        fail(
            name,
            format!("page {i}: byte {b:#x}, bit {}", vmm_bitmap.is_set(i)),
        );
    }
}

/// `UserfaultServer::from_fd` and `serve` under the filter: the page is
/// written, its bit cleared; a second request for it writes nothing.
#[cfg(feature = "firecracker-secret-hiding")]
fn userfault_server(name: &str) {
    use uffd_gmem::firecracker::{FaultRequest, UserfaultServer};

    let (gmem, view, vmm_bitmap, bitmap, regions, snapshot) = userfault_setup(name);
    let p = page();
    filter_for(&[Feature::UserfaultServer]).install();
    let server = UserfaultServer::from_fd(gmem.as_fd(), &bitmap, &regions, &snapshot)
        .unwrap_or_else(|e| fail(name, e));
    let reply = server
        .serve(&FaultRequest::sync(3, 0x10_0000 + 5 * p + 0x10, 1 << 4))
        .unwrap_or_else(|e| fail(name, e));
    if (reply.vcpu, reply.offset, reply.len) != (Some(3), 5 * p, p) {
        fail(name, format!("{reply:?}"));
    }
    check_served(name, view, &vmm_bitmap, &snapshot, 5);
    server
        .serve(&FaultRequest::sync(4, 0x10_0000 + 5 * p, 1 << 4))
        .unwrap_or_else(|e| fail(name, e));
    if (0..8).filter(|&i| vmm_bitmap.is_set(i)).count() != 7 {
        fail(name, "only page 5's bit is clear");
    }
    ok(name)
}

/// A secret-hiding handler's loop under the two features it needs: the
/// VMM's request over the fault channel, served, the reply back.
#[cfg(feature = "firecracker-secret-hiding")]
fn secret_hiding_handler(name: &str) {
    use uffd_gmem::firecracker::{FaultChannel, FaultRequest, UserfaultServer};

    let (gmem, view, vmm_bitmap, bitmap, regions, snapshot) = userfault_setup(name);
    let p = page();
    let (vmm, handler) = UnixStream::pair().unwrap_or_else(|e| fail(name, e));
    vmm.set_nonblocking(true).unwrap_or_else(|e| fail(name, e));
    let (vmm, handler) = (FaultChannel::new(vmm), FaultChannel::new(handler));
    filter_for(&[Feature::FirecrackerFaultChannel, Feature::UserfaultServer]).install();
    let server = UserfaultServer::from_fd(gmem.as_fd(), &bitmap, &regions, &snapshot)
        .unwrap_or_else(|e| fail(name, e));
    for i in [2u64, 7] {
        let req = FaultRequest::sync(i as u32, 0x10_0000 + i * p, 1 << 4);
        vmm.send_request(&req).unwrap_or_else(|e| fail(name, e));
        let got = handler
            .recv_request()
            .unwrap_or_else(|e| fail(name, e))
            .unwrap_or_else(|| fail(name, "end of stream"));
        let reply = server.serve(&got).unwrap_or_else(|e| fail(name, e));
        handler.send_reply(&reply).unwrap_or_else(|e| fail(name, e));
        let back = vmm.recv_reply().unwrap_or_else(|e| fail(name, e));
        if back.map(|r| (r.vcpu, r.offset, r.gpa)) != Some((Some(i as u32), i * p, req.gpa)) {
            fail(name, format!("{back:?}"));
        }
    }
    drop(vmm);
    if !matches!(handler.recv_request(), Ok(None)) {
        fail(name, "no end of stream after the VMM closed");
    }
    check_served(name, view, &vmm_bitmap, &snapshot, 2);
    check_served(name, view, &vmm_bitmap, &snapshot, 7);
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

#[cfg(feature = "firecracker")]
#[test]
fn filter_fault_channel() {
    scenario_without_uffd("fault_channel");
}

#[cfg(feature = "firecracker-secret-hiding")]
#[test]
fn filter_userfault_server() {
    scenario_without_uffd("userfault_server");
}

#[cfg(feature = "firecracker-secret-hiding")]
#[test]
fn filter_secret_hiding_handler() {
    scenario_without_uffd("secret_hiding_handler");
}
