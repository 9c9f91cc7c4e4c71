//! `gmem demo`: the whole story on this machine, end to end.
//!
//! 1. A VM (kvm-ioctls) whose memory slot 0 is a **guest_memfd**
//!    (`MMAP | INIT_SHARED`), holding the guest's code and a 64 KiB data
//!    block that a **separate process** populates: the guest_memfd travels
//!    over a Unix socket (`kvm_gmem::share`), and the child fills it
//!    (`kvm_gmem::populate`).
//! 2. Memory slot 1 is **restored lazily**: a shmem memfd registered
//!    `MISSING | MINOR` with a userfaultfd and served by `uffd_gmem::serve`
//!    (page cache filled through a second mapping, then `UFFDIO_CONTINUE`).
//!    That is the guest_memfd MINOR flow on the nearest equivalent this
//!    kernel offers; on a kernel with userfaultfd on guest_memfd the same
//!    server serves the guest_memfd mapping itself.
//! 3. A real-mode guest checksums both regions, stores the sums in guest
//!    memory and reports them over port I/O. The host checks them against
//!    its own sums and reads the guest's stores back through the mapping.
//!
//! The logic lives in the crates; this file only wires them together.

use kvm_gmem::populate::{Populate, Source};
use kvm_gmem::{GuestMemfd, MemoryRegion2, interop};
use kvm_ioctls::{Kvm, VcpuExit};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use uffd_gmem::serve::{Region, Server};
use uffd_gmem::{Features, RegisterMode, Uffd};

/// The hidden subcommand the child process runs.
pub const CHILD_ARG: &str = "__demo-populate";

const GMEM_SIZE: u64 = 0x8_0000;
const CODE_GPA: u64 = 0x1000;
const RESULT_GPA: u64 = 0x3000;
const DATA_GPA: u64 = 0x1_0000;
const DATA_LEN: u64 = 0x1_0000;
const LAZY_GPA: u64 = 0x8_0000;
const LAZY_LEN: u64 = 0x4_0000;
const PORT_A: u16 = 0x10;
const PORT_B: u16 = 0x11;

/// The guest: sums the bytes of the data block (segment 0x1000) and of the
/// lazy region (segments 0x8000..0xC000) modulo 2^16, stores the sums at
/// 0x3000 and 0x3002, reports them on ports 0x10 and 0x11, halts.
const GUEST: &[u8] = &[
    0xB8, 0x00, 0x10, //       mov ax, 0x1000
    0x8E, 0xD8, //             mov ds, ax
    0x31, 0xF6, //             xor si, si
    0x31, 0xDB, //             xor bx, bx
    0x31, 0xC9, //             xor cx, cx      ; 65536 iterations
    0xFC, //                   cld
    0xAC, //             l1:   lodsb
    0x00, 0xC3, //             add bl, al
    0x80, 0xD7, 0x00, //       adc bh, 0
    0xE2, 0xF8, //             loop l1
    0x31, 0xC0, //             xor ax, ax
    0x8E, 0xD8, //             mov ds, ax
    0x89, 0x1E, 0x00, 0x30, // mov [0x3000], bx
    0x89, 0xD8, //             mov ax, bx
    0xBA, 0x10, 0x00, //       mov dx, 0x10
    0xEF, //                   out dx, ax
    0x31, 0xDB, //             xor bx, bx
    0xBD, 0x00, 0x80, //       mov bp, 0x8000
    0x8E, 0xDD, //       l2:   mov ds, bp
    0x31, 0xF6, //             xor si, si
    0x31, 0xC9, //             xor cx, cx
    0xAC, //             l3:   lodsb
    0x00, 0xC3, //             add bl, al
    0x80, 0xD7, 0x00, //       adc bh, 0
    0xE2, 0xF8, //             loop l3
    0x81, 0xC5, 0x00, 0x10, // add bp, 0x1000
    0x81, 0xFD, 0x00, 0xC0, // cmp bp, 0xC000
    0x75, 0xE8, //             jne l2
    0x31, 0xC0, //             xor ax, ax
    0x8E, 0xD8, //             mov ds, ax
    0x89, 0x1E, 0x02, 0x30, // mov [0x3002], bx
    0x89, 0xD8, //             mov ax, bx
    0xBA, 0x11, 0x00, //       mov dx, 0x11
    0xEF, //                   out dx, ax
    0xF4, //                   hlt
];

/// Deterministic contents, the same in both processes.
fn pattern(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sum16(data: &[u8]) -> u16 {
    data.iter().fold(0u16, |s, &b| s.wrapping_add(u16::from(b)))
}

type Res<T> = Result<T, String>;

fn e<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |err| format!("{what}: {err}")
}

/// The child process: receive the guest_memfd, fill the data block, say so.
pub fn child(fd_arg: &str) -> Res<()> {
    let raw: i32 = fd_arg.parse().map_err(e("socket fd argument"))?;
    // SAFETY: the parent passed this descriptor number on our command line;
    // it is an inherited socket nothing else in this process owns.
    let sock = UnixStream::from(unsafe { OwnedFd::from_raw_fd(raw) });
    let gmem = kvm_gmem::share::recv(&sock).map_err(e("share::recv"))?;
    let data = pattern(DATA_LEN, 0xD1CE);
    let report = Populate::detached(&gmem)
        .run(DATA_GPA..DATA_GPA + DATA_LEN, Source::bytes(&data))
        .map_err(e("populate"))?;
    let line = format!(
        "{} {:?} {}\n",
        report.bytes,
        report.strategy,
        report.elapsed.as_micros()
    );
    std::io::Write::write_all(&mut &sock, line.as_bytes()).map_err(e("reply"))?;
    Ok(())
}

/// Runs the demo and prints its report.
pub fn run() -> Res<()> {
    let started = Instant::now();
    let kvm = Kvm::new().map_err(e("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(e("KVM_CREATE_VM"))?;
    let vmfd = interop::vm_fd(&vm);

    // Slot 0: guest_memfd with the code; its data block comes from a child.
    let gmem = GuestMemfd::builder(GMEM_SIZE)
        .mmap(true)
        .init_shared(true)
        .create(&vmfd)
        .map_err(e("guest_memfd"))?;
    let map = gmem.map().map_err(e("map guest_memfd"))?;
    map.write_at(CODE_GPA, GUEST)
        .map_err(e("write guest code"))?;

    let (ours, theirs) = UnixStream::pair().map_err(e("socketpair"))?;
    clear_cloexec(theirs.as_raw_fd())?;
    let mut child = std::process::Command::new(std::env::current_exe().map_err(e("current_exe"))?)
        .args([CHILD_ARG, &theirs.as_raw_fd().to_string()])
        .spawn()
        .map_err(e("spawn the populator"))?;
    drop(theirs);
    kvm_gmem::share::send(&ours, &gmem).map_err(e("share::send"))?;
    ours.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(e("socket timeout"))?;
    let mut reply = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&ours), &mut reply)
        .map_err(e("waiting for the populator"))?;
    let status = child.wait().map_err(e("wait for the populator"))?;
    if !status.success() {
        return Err(format!("the populator process failed: {status}"));
    }
    let mut parts = reply.split_whitespace();
    let (bytes, strategy, micros) = (parts.next(), parts.next(), parts.next());

    let region0 = MemoryRegion2::builder(0, 0, GMEM_SIZE)
        .guest_memfd(&gmem, 0)
        .userspace(&map)
        .build()
        .map_err(e("memslot 0"))?;
    // SAFETY: the slot is deleted below before `map` is dropped. On an early
    // return `map` is unmapped while the VM still exists, but no vCPU runs
    // then and the VM is closed right after, so KVM never uses the address.
    unsafe { region0.set(&vmfd) }.map_err(e("KVM_SET_USER_MEMORY_REGION2 slot 0"))?;

    // Slot 1: a shmem region restored lazily from a "snapshot".
    let snapshot = pattern(LAZY_LEN, 0x5EED);
    let lazy = Shmem::new(LAZY_LEN)?;
    let alias = lazy.map()?;
    let guest_view = lazy.map()?;
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require_features(Features::MISSING_SHMEM | Features::MINOR_SHMEM)
        .create()
        .map_err(e("userfaultfd"))?;
    // SAFETY: `guest_view` is a shared mapping only the guest (through KVM)
    // touches; no Rust reference points into it, and it outlives the server.
    unsafe {
        uffd.register(
            guest_view.range(),
            RegisterMode::MISSING | RegisterMode::MINOR,
        )
    }
    .map_err(e("UFFDIO_REGISTER"))?;
    // SAFETY: `alias` maps the same memfd, is not registered, and lives until
    // the server has been shut down below.
    let region = unsafe { Region::new(guest_view.addr, LAZY_LEN).continue_via_alias(alias.addr) };
    let server = Server::builder(uffd)
        .region(region)
        .source(snapshot.clone())
        .fault_around(16 << 10)
        .workers(1)
        .spawn()
        .map_err(e("serve"))?;
    let region1 = MemoryRegion2::builder(1, LAZY_GPA, LAZY_LEN)
        .userspace_addr(guest_view.addr)
        .build()
        .map_err(e("memslot 1"))?;
    // SAFETY: `guest_view` stays mapped until after the slot is deleted below.
    unsafe { region1.set(&vmfd) }.map_err(e("KVM_SET_USER_MEMORY_REGION2 slot 1"))?;

    // The guest.
    let mut vcpu = vm.create_vcpu(0).map_err(e("KVM_CREATE_VCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(e("KVM_SET_SREGS"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_GPA,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(e("KVM_SET_REGS"))?;
    let guest_start = Instant::now();
    let (mut sum_a, mut sum_b) = (None, None);
    loop {
        match vcpu.run().map_err(e("KVM_RUN"))? {
            VcpuExit::IoOut(port, data) if data.len() >= 2 => {
                let v = u16::from_le_bytes([data[0], data[1]]);
                match port {
                    PORT_A => sum_a = Some(v),
                    PORT_B => sum_b = Some(v),
                    p => return Err(format!("unexpected port {p:#x}")),
                }
            }
            VcpuExit::Hlt => break,
            other => return Err(format!("unexpected exit: {other:?}")),
        }
        if guest_start.elapsed() > Duration::from_secs(60) {
            return Err("the guest did not finish within 60 s".into());
        }
    }
    let guest_time = guest_start.elapsed();
    kvm_gmem::delete_memory_region(&vmfd, 1).map_err(e("delete slot 1"))?;
    kvm_gmem::delete_memory_region(&vmfd, 0).map_err(e("delete slot 0"))?;
    let stats = server.shutdown().map_err(e("serve shutdown"))?;

    // The host's view.
    let data = pattern(DATA_LEN, 0xD1CE);
    let want_a = sum16(&data);
    let want_b = sum16(&snapshot);
    let mut stored = [0u8; 4];
    map.read_at(RESULT_GPA, &mut stored)
        .map_err(e("read the guest's result"))?;
    let stored_a = u16::from_le_bytes([stored[0], stored[1]]);
    let stored_b = u16::from_le_bytes([stored[2], stored[3]]);
    let ok = sum_a == Some(want_a)
        && sum_b == Some(want_b)
        && stored_a == want_a
        && stored_b == want_b
        && stats.errors.is_empty();

    println!(
        "gmem demo: a guest_memfd VM populated by another process, plus a lazily restored region\n"
    );
    println!(
        "  separate-process population   {} bytes via {} in {} us (pid {})",
        bytes.unwrap_or("?"),
        strategy.unwrap_or("?"),
        micros.unwrap_or("?"),
        child.id()
    );
    println!(
        "  lazy restore (serve)          {} faults, {} pages continued, {} copied, fault-around 16 KiB",
        stats.faults, stats.pages_continued, stats.pages_copied
    );
    println!(
        "  time per fault                p50 <= {:?}, p99 <= {:?}, max {:?}",
        stats.latency_quantile(0.5).unwrap_or_default(),
        stats.latency_quantile(0.99).unwrap_or_default(),
        stats.max_latency
    );
    println!(
        "  guest checksum, data block    reported {:#06x}, stored {stored_a:#06x}, host {want_a:#06x}",
        sum_a.unwrap_or(0)
    );
    println!(
        "  guest checksum, lazy region   reported {:#06x}, stored {stored_b:#06x}, host {want_b:#06x}",
        sum_b.unwrap_or(0)
    );
    println!(
        "  guest run {guest_time:?}, whole demo {:?}: {}",
        started.elapsed(),
        if ok { "OK" } else { "MISMATCH" }
    );
    for err in &stats.errors {
        println!("  serve error: {err}");
    }
    if ok {
        Ok(())
    } else {
        Err("the guest's checksums do not match the host's".into())
    }
}

fn clear_cloexec(fd: i32) -> Res<()> {
    // SAFETY: F_GETFD/F_SETFD on a descriptor we own change only its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    // SAFETY: the same descriptor, still open; F_SETFD takes an integer and
    // changes only its close-on-exec flag.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(format!("fcntl: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A shmem memfd and its mappings (the lazily restored region).
struct Shmem {
    fd: OwnedFd,
    len: u64,
}

/// One shared mapping of a [`Shmem`].
struct ShmemMap {
    addr: u64,
    len: u64,
}

impl Shmem {
    fn new(len: u64) -> Res<Shmem> {
        // SAFETY: memfd_create reads a NUL-terminated name.
        let raw = unsafe { libc::memfd_create(c"gmem-demo-lazy".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: memfd_create returned a new descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) } < 0 {
            return Err(format!("ftruncate: {}", std::io::Error::last_os_error()));
        }
        Ok(Shmem { fd, len })
    }

    fn map(&self) -> Res<ShmemMap> {
        // SAFETY: a fresh shared mapping of our memfd chosen by the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(ShmemMap {
            addr: p as u64,
            len: self.len,
        })
    }
}

impl ShmemMap {
    fn range(&self) -> std::ops::Range<u64> {
        self.addr..self.addr + self.len
    }
}

impl Drop for ShmemMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `Shmem::map`; nothing refers to it any more.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}
