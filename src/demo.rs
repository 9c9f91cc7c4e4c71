//! `gmem demo`: the whole story on this machine, end to end, in four parts;
//! each runs where the host offers what it needs (probed, never assumed),
//! and the summary names every part skipped and why.
//!
//! 1. **Separate-process population** (needs a guest_memfd with
//!    `MMAP | INIT_SHARED`): memory slot 0 is a guest_memfd holding the
//!    guest's code and a 64 KiB data block that a **separate process**
//!    populates: the guest_memfd travels over a Unix socket
//!    (`kvm_gmem::share`), and the child fills it (`kvm_gmem::populate`).
//!    Skipped, slot 0 is an ordinary memfd and the VMM writes the data
//!    block itself (the hand-over carries only guest_memfds).
//! 2. **Lazy restore** (needs userfaultfd `MISSING_SHMEM | MINOR_SHMEM`):
//!    memory slot 1 is a shmem memfd registered `MISSING | MINOR` with a
//!    userfaultfd and served by `uffd_gmem::serve` (page cache filled
//!    through a second mapping, then `UFFDIO_CONTINUE`). That is the
//!    guest_memfd MINOR flow on the nearest equivalent the kernels offer;
//!    on a kernel with userfaultfd on guest_memfd the same server serves the
//!    guest_memfd mapping itself. Skipped, the VMM copies the snapshot in.
//! 3. **Guest checksum** (needs a KVM VM and `KVM_CAP_USER_MEMORY2`): a
//!    guest (16-bit real mode on x86_64, EL1 with the MMU off on aarch64)
//!    checksums both regions, stores the sums in guest memory and reports
//!    them (x86_64: port I/O; aarch64: stores to an address without memory,
//!    which exit as MMIO). Skipped, a host thread reads
//!    and checksums the same memory instead (which still takes the lazy
//!    region's faults through the server).
//! 4. **Secret-free restore** (needs a guest_memfd with `MMAP | INIT_SHARED
//!    | NO_DIRECT_MAP | WRITE`, KVM Userfault and userfaultfd `MISSING |
//!    MINOR` on a guest_memfd mapping, as `Capabilities::query` and a trial
//!    registration find them; see `demo/secret_free.rs`): Firecracker's
//!    secret-hiding restore in two processes. A second VM's slot 1 is such
//!    a guest_memfd, out of the kernel's direct map, with
//!    `KVM_MEM_USERFAULT` and every bitmap bit set; a **handler process**
//!    receives `[uffd, guest_memfd, bitmap memfd]` with Firecracker's
//!    handshake and restores the snapshot with `pwrite`: on each vCPU
//!    userfault exit, which the VMM forwards as a `FaultRequest` on the
//!    handshake's socket (`UserfaultServer`, answered with a `FaultReply`);
//!    on each uffd fault of the VMM's own reads through the mapping (then
//!    `UFFDIO_CONTINUE`); and in the background. The same guest checksums
//!    the restored region. Skipped, nothing stands in for it.
//!
//! The host checks every sum against its own. The logic lives in the
//! crates; this file only wires them together.

use kvm_gmem::populate::{Populate, Source};
use kvm_gmem::{
    Extension, GuestMemfd, GuestMemfdFlags, Mapping, MemoryFault, MemoryRegion2, VmOps,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use uffd_gmem::serve::{Region, Server, Stats};
use uffd_gmem::{Features, RegisterMode, Uffd};

/// The hidden subcommand the child process runs.
pub const CHILD_ARG: &str = "__demo-populate";
/// The hidden subcommand part 4's handler process runs.
pub const HANDLER_ARG: &str = "__demo-handler";

const GMEM_SIZE: u64 = 0x8_0000;
const CODE_GPA: u64 = 0x1000;
const RESULT_GPA: u64 = 0x3000;
const DATA_GPA: u64 = 0x1_0000;
const DATA_LEN: u64 = 0x1_0000;
const DATA_SEED: u64 = 0xD1CE;
const LAZY_GPA: u64 = 0x8_0000;
const LAZY_LEN: u64 = 0x4_0000;
const LAZY_SEED: u64 = 0x5EED;
#[cfg(target_arch = "x86_64")]
const PORT_A: u16 = 0x10;
#[cfg(target_arch = "x86_64")]
const PORT_B: u16 = 0x11;
/// aarch64: where the guest reports its sums (no memslot there: MMIO).
#[cfg(target_arch = "aarch64")]
const MMIO_A: u64 = 0x10_0000;
#[cfg(target_arch = "aarch64")]
const MMIO_B: u64 = 0x10_0002;
/// Width of a report line's label.
const LABEL_W: usize = 36;

/// The guest: sums the bytes of the data block (segment 0x1000) and of the
/// lazy region (segments 0x8000..0xC000) modulo 2^16, stores the sums at
/// 0x3000 and 0x3002, reports them on ports 0x10 and 0x11, halts.
#[cfg(target_arch = "x86_64")]
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

/// The same guest on aarch64, at EL1 with the MMU off: reports the sums
/// with stores to `MMIO_A` and `MMIO_B`, then PSCI `SYSTEM_OFF` (assembled
/// with aarch64-linux-gnu-as; `objdump -d` shows it as below).
#[cfg(target_arch = "aarch64")]
#[rustfmt::skip]
const GUEST_WORDS: [u32; 26] = [
    0xd2860005, //  0: mov  x5, #0x3000
    0xd2a00020, //  4: mov  x0, #0x10000        ; DATA_GPA
    0xd2a00021, //  8: mov  x1, #0x10000        ; DATA_LEN
    0x9400000e, //  c: bl   44                  ; sum
    0x790000a2, // 10: strh w2, [x5]
    0xd2a00206, // 14: mov  x6, #0x100000       ; MMIO_A
    0x790000c2, // 18: strh w2, [x6]
    0xd2a00100, // 1c: mov  x0, #0x80000        ; LAZY_GPA
    0xd2a00081, // 20: mov  x1, #0x40000        ; LAZY_LEN
    0x94000008, // 24: bl   44                  ; sum
    0x790004a2, // 28: strh w2, [x5, #2]
    0xd2a00206, // 2c: mov  x6, #0x100000
    0x790004c2, // 30: strh w2, [x6, #2]        ; MMIO_B
    0x52800100, // 34: mov  w0, #0x8
    0x72b08000, // 38: movk w0, #0x8400, lsl #16 ; PSCI SYSTEM_OFF
    0xd4000002, // 3c: hvc  #0
    0x14000000, // 40: b    40
    0x52800002, // 44: sum: mov w2, #0          ; w2 = sum of x1 bytes at x0
    0xd2800003, // 48: mov  x3, #0
    0x38636804, // 4c: ldrb w4, [x0, x3]
    0x0b040042, // 50: add  w2, w2, w4
    0x91000463, // 54: add  x3, x3, #1
    0xeb01007f, // 58: cmp  x3, x1
    0x54ffff81, // 5c: b.ne 4c
    0x12003c42, // 60: and  w2, w2, #0xffff
    0xd65f03c0, // 64: ret
];

/// The guest's bytes.
fn guest_code() -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    return GUEST.to_vec();
    #[cfg(target_arch = "aarch64")]
    return GUEST_WORDS.iter().flat_map(|w| w.to_le_bytes()).collect();
}

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

// ---------------------------------------------------------------------------
// The plan
// ---------------------------------------------------------------------------

/// The demo's parts, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Populate,
    LazyRestore,
    Guest,
    SecretFree,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Populate => "separate-process population (guest_memfd)",
            Part::LazyRestore => "lazy restore (userfaultfd)",
            Part::Guest => "guest checksum (vCPU)",
            Part::SecretFree => "secret-free restore (guest_memfd, KVM userfault)",
        }
    }
}

#[derive(Debug)]
enum Status {
    Run,
    /// Why not: the capability and its value, or the probe's error.
    Skipped(String),
}

/// Which parts run on this host.
#[derive(Debug)]
struct Plan {
    parts: [(Part, Status); 4],
}

impl Plan {
    /// Probes the host: `vm` is the demo's VM (or why there is none), asked
    /// for its capabilities; a throwaway userfaultfd is asked for its
    /// features; part 4 asks `Capabilities::query` and tries a
    /// registration.
    fn probe(vm: &Res<VmFd>) -> Plan {
        let release = crate::probe::uname().map_or_else(|_| "?".into(), |k| k.release);
        let on_vm = |check: fn(&VmFd, &str) -> Res<()>| match vm {
            Ok(vm) => check(vm, &release),
            Err(why) => Err(why.clone()),
        };
        let status = |r: Res<()>| r.map_or_else(Status::Skipped, |()| Status::Run);
        Plan {
            parts: [
                (Part::Populate, status(on_vm(guest_memfd_usable))),
                (Part::LazyRestore, status(uffd_usable())),
                (
                    Part::Guest,
                    status(on_vm(|vm, release| {
                        cap_set(vm, Extension::USER_MEMORY2, "KVM_CAP_USER_MEMORY2", release)
                    })),
                ),
                (
                    Part::SecretFree,
                    status(on_vm(|vm, release| {
                        cap_set(vm, Extension::USER_MEMORY2, "KVM_CAP_USER_MEMORY2", release)?;
                        secret_free::usable(vm, release)
                    })),
                ),
            ],
        }
    }

    fn runs(&self, part: Part) -> bool {
        self.parts
            .iter()
            .any(|(p, s)| *p == part && matches!(s, Status::Run))
    }

    /// The closing lines: what ran, what was skipped and why.
    fn summary(&self) -> String {
        let ran: Vec<&str> = self
            .parts
            .iter()
            .filter(|(_, s)| matches!(s, Status::Run))
            .map(|(p, _)| p.name())
            .collect();
        let mut text = format!(
            "  ran      {}\n",
            if ran.is_empty() {
                "nothing".to_string()
            } else {
                ran.join(", ")
            }
        );
        let mut skipped = false;
        for (part, status) in &self.parts {
            if let Status::Skipped(why) = status {
                text += &format!("  skipped  {}: {why}\n", part.name());
                skipped = true;
            }
        }
        if skipped {
            text += "  to see the skipped parts: scripts/kernel-lane.sh (the kernel lane) runs this demo on \
                     Linux 7.3 under QEMU\n";
        }
        if !self.runs(Part::SecretFree) {
            text += "  the secret-free restore needs the RFC uAPIs: scripts/kernel-lane.sh --kernel ours \
                     boots the project's patched 7.3.4 (kernel/README.md)\n";
        }
        text
    }
}

/// The demo's VM, or why this host has none.
fn create_vm() -> Res<VmFd> {
    let kvm = Kvm::new().map_err(e("no KVM: open /dev/kvm"))?;
    kvm.create_vm()
        .map_err(e("no KVM: KVM_CREATE_VM on /dev/kvm"))
}

/// `KVM_CHECK_EXTENSION(cap)` on the VM is non-zero, or its value as the
/// reason.
fn cap_set(vm: &VmFd, cap: Extension, name: &str, release: &str) -> Res<()> {
    match vm.extension(cap) {
        Ok(v) if v > 0 => Ok(()),
        Ok(v) => Err(format!("{name} = {v} on {release}")),
        Err(err) => Err(err.to_string()),
    }
}

/// A guest_memfd the host can map and fill (part 1's needs).
fn guest_memfd_usable(vm: &VmFd, release: &str) -> Res<()> {
    cap_set(vm, Extension::GUEST_MEMFD, "KVM_CAP_GUEST_MEMFD", release)?;
    let needed = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    let flags = vm.guest_memfd_flags().map_err(|err| err.to_string())?;
    if flags.contains(needed) {
        Ok(())
    } else {
        Err(format!(
            "KVM_CAP_GUEST_MEMFD_FLAGS = {flags} on {release}, needs MMAP|INIT_SHARED"
        ))
    }
}

/// A userfaultfd offering MISSING and MINOR faults on shmem (part 2's needs).
fn uffd_usable() -> Res<()> {
    let uffd = Uffd::builder().create().map_err(|err| err.to_string())?;
    let offered = uffd.supported_features().unwrap_or_default();
    if offered.contains(Features::MISSING_SHMEM | Features::MINOR_SHMEM) {
        Ok(())
    } else {
        Err(format!(
            "UFFDIO_API features {:#x} lack UFFD_FEATURE_MISSING_SHMEM|UFFD_FEATURE_MINOR_SHMEM",
            offered.bits()
        ))
    }
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

/// Runs the parts this host supports and prints the report.
pub fn run() -> Res<()> {
    let started = Instant::now();
    let vm = create_vm();
    let plan = Plan::probe(&vm);
    let data = pattern(DATA_LEN, DATA_SEED);
    let snapshot = pattern(LAZY_LEN, LAZY_SEED);
    let in_part = |part: Part| move |err: String| format!("{}: {err}", part.name());

    let (slot0, filled) = match &vm {
        Ok(vm) if plan.runs(Part::Populate) => {
            populate_guest_memfd(vm).map_err(in_part(Part::Populate))?
        }
        _ => (
            Slot0::memfd(&data)?,
            ("data block", "written by the VMM into a memfd".to_string()),
        ),
    };
    slot0.write_at(CODE_GPA, &guest_code())?;
    let lazy = if plan.runs(Part::LazyRestore) {
        lazy_restore(&snapshot).map_err(in_part(Part::LazyRestore))?
    } else {
        LazyRegion::eager(&snapshot)?
    };
    let check = match &vm {
        Ok(vm) if plan.runs(Part::Guest) => {
            run_guest(vm, &slot0, &lazy.view).map_err(in_part(Part::Guest))?
        }
        _ => host_check(&slot0, &lazy.view)?,
    };
    let stats = lazy.finish().map_err(in_part(Part::LazyRestore))?;
    let secret = if plan.runs(Part::SecretFree) {
        Some(secret_free::run().map_err(in_part(Part::SecretFree))?)
    } else {
        None
    };
    let problems = secret.as_ref().map_or(&[][..], |r| &r.problems[..]);

    let (want_a, want_b) = (sum16(&data), sum16(&snapshot));
    let errors = stats.as_ref().map_or(&[][..], |s| &s.errors[..]);
    let ok = check.data.iter().all(|(_, v)| *v == Some(want_a))
        && check.lazy.iter().all(|(_, v)| *v == Some(want_b))
        && errors.is_empty()
        && problems.is_empty();

    println!(
        "gmem demo: a guest_memfd populated by another process, a region restored lazily by\n\
         userfaultfd, a guest that checksums both, and a secret-free restore (Firecracker's\n\
         secret-hiding handler in another process): each part this host supports\n"
    );
    println!("  {:<LABEL_W$}{}", filled.0, filled.1);
    match &stats {
        Some(stats) => {
            println!(
                "  {:<LABEL_W$}{} faults, {} pages continued, {} copied, fault-around 16 KiB",
                "lazy restore (serve)", stats.faults, stats.pages_continued, stats.pages_copied
            );
            println!(
                "  {:<LABEL_W$}p50 <= {:?}, p99 <= {:?}, max {:?}",
                "time per fault",
                stats.latency_quantile(0.5).unwrap_or_default(),
                stats.latency_quantile(0.99).unwrap_or_default(),
                stats.max_latency
            );
        }
        None => println!("  {:<LABEL_W$}copied in by the VMM", "lazy region"),
    }
    for (region, seen, want) in [
        ("data block", &check.data, want_a),
        ("lazy region", &check.lazy, want_b),
    ] {
        let got: Vec<String> = seen
            .iter()
            .map(|(how, v)| match v {
                Some(v) => format!("{how} {v:#06x}"),
                None => format!("{how} none"),
            })
            .collect();
        let label = format!("{} checksum, {region}", check.by);
        println!("  {label:<LABEL_W$}{}, host {want:#06x}", got.join(", "));
    }
    for (label, text) in secret.iter().flat_map(|r| &r.lines) {
        println!("  {label:<LABEL_W$}{text}");
    }
    println!(
        "  {} run {:?}, whole demo {:?}: {}",
        check.by,
        check.elapsed,
        started.elapsed(),
        if ok { "OK" } else { "MISMATCH" }
    );
    for err in errors {
        println!("  serve error: {err}");
    }
    for problem in problems {
        println!("  secret-free restore: {problem}");
    }
    println!("\n{}", plan.summary());
    if ok {
        Ok(())
    } else {
        Err("the checksums do not match the host's".into())
    }
}

/// Part 4's handler process (`gmem __demo-handler <fd>`).
pub fn handler(fd_arg: &str) -> Res<()> {
    secret_free::handler(fd_arg)
}

#[cfg(feature = "demo-secret-free")]
mod secret_free;

/// Part 4 where `gmem` was built without it: always skipped.
#[cfg(not(feature = "demo-secret-free"))]
mod secret_free {
    use super::Res;

    const WHY: &str = "gmem was built without feature demo-secret-free";

    pub(super) struct Report {
        pub(super) lines: Vec<(String, String)>,
        pub(super) problems: Vec<String>,
    }

    pub(super) fn usable(_vm: &kvm_ioctls::VmFd, _release: &str) -> Res<()> {
        Err(WHY.into())
    }

    pub(super) fn run() -> Res<Report> {
        Err(WHY.into())
    }

    pub(super) fn handler(_fd_arg: &str) -> Res<()> {
        Err(WHY.into())
    }
}

// ---------------------------------------------------------------------------
// Part 1: separate-process population
// ---------------------------------------------------------------------------

/// The child process: receive the guest_memfd, fill the data block, say so.
pub fn child(fd_arg: &str) -> Res<()> {
    let raw: i32 = fd_arg.parse().map_err(e("socket fd argument"))?;
    // SAFETY: the parent passed this descriptor number on our command line;
    // it is an inherited socket nothing else in this process owns.
    let sock = UnixStream::from(unsafe { OwnedFd::from_raw_fd(raw) });
    let gmem = kvm_gmem::share::recv(&sock).map_err(e("share::recv"))?;
    let data = pattern(DATA_LEN, DATA_SEED);
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

/// Part 1: a guest_memfd for slot 0 whose data block a child process fills;
/// with the report line (label, text).
fn populate_guest_memfd(vm: &VmFd) -> Res<(Slot0, (&'static str, String))> {
    let gmem = GuestMemfd::builder(GMEM_SIZE)
        .mmap(true)
        .init_shared(true)
        .create(vm)
        .map_err(e("guest_memfd"))?;
    let map = gmem.map().map_err(e("map guest_memfd"))?;

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
    let line = format!(
        "{} bytes via {} in {} us (pid {})",
        bytes.unwrap_or("?"),
        strategy.unwrap_or("?"),
        micros.unwrap_or("?"),
        child.id()
    );
    Ok((
        Slot0::GuestMemfd { gmem, map },
        ("separate-process population", line),
    ))
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

/// Slot 0's memory (code, results, data block): the guest_memfd of part 1,
/// or, where that part is skipped, an ordinary memfd.
enum Slot0 {
    GuestMemfd { gmem: GuestMemfd, map: Mapping },
    Memfd(ShmemMap),
}

impl Slot0 {
    /// An ordinary memfd with the data block written in by the VMM.
    fn memfd(data: &[u8]) -> Res<Slot0> {
        let map = Shmem::new(GMEM_SIZE)?.map()?;
        map.write_at(DATA_GPA, data)?;
        Ok(Slot0::Memfd(map))
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Res<()> {
        match self {
            Slot0::GuestMemfd { map, .. } => map.write_at(offset, data).map_err(e("slot 0")),
            Slot0::Memfd(map) => map.write_at(offset, data),
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Res<()> {
        match self {
            Slot0::GuestMemfd { map, .. } => map.read_at(offset, buf).map_err(e("slot 0")),
            Slot0::Memfd(map) => map.read_at(offset, buf),
        }
    }

    fn region(&self) -> Res<MemoryRegion2<'_>> {
        let slot = MemoryRegion2::builder(0, 0, GMEM_SIZE);
        match self {
            Slot0::GuestMemfd { gmem, map } => slot.guest_memfd(gmem, 0).userspace(map).build(),
            Slot0::Memfd(map) => slot.userspace_addr(map.addr).build(),
        }
        .map_err(e("memslot 0"))
    }
}

// ---------------------------------------------------------------------------
// Part 2: lazy restore
// ---------------------------------------------------------------------------

/// Slot 1's memory: a shmem memfd holding the snapshot, restored lazily by
/// part 2 or, where it is skipped, copied in by the VMM.
struct LazyRegion {
    /// Part 2's fault server and the alias it fills the page cache through;
    /// the server is dropped (stopped) first.
    restore: Option<(Server, ShmemMap)>,
    /// What the guest (or the host thread) reads.
    view: ShmemMap,
}

impl LazyRegion {
    fn eager(snapshot: &[u8]) -> Res<LazyRegion> {
        let view = Shmem::new(LAZY_LEN)?.map()?;
        view.write_at(0, snapshot)?;
        Ok(LazyRegion {
            restore: None,
            view,
        })
    }

    /// Stops the server: its statistics, where part 2 ran.
    fn finish(self) -> Res<Option<Stats>> {
        match self.restore {
            Some((server, _alias)) => server.shutdown().map(Some).map_err(e("serve shutdown")),
            None => Ok(None),
        }
    }
}

/// Part 2: slot 1's memory, registered with a userfaultfd and served from
/// `snapshot` on first touch.
fn lazy_restore(snapshot: &[u8]) -> Res<LazyRegion> {
    let lazy = Shmem::new(LAZY_LEN)?;
    let alias = lazy.map()?;
    let view = lazy.map()?;
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require_features(Features::MISSING_SHMEM | Features::MINOR_SHMEM)
        .create()
        .map_err(e("userfaultfd"))?;
    // SAFETY: `view` is a shared mapping that only the guest (through KVM)
    // or the host thread reads, with raw copies; no Rust reference points
    // into it, and it outlives the server (`LazyRegion` drops it last).
    unsafe { uffd.register(view.range(), RegisterMode::MISSING | RegisterMode::MINOR) }
        .map_err(e("UFFDIO_REGISTER"))?;
    // SAFETY: `alias` maps the same memfd, is not registered, and is kept
    // next to the server, which stops before it is unmapped.
    let region = unsafe { Region::new(view.addr, LAZY_LEN).continue_via_alias(alias.addr) };
    let server = Server::builder(uffd)
        .region(region)
        .source(snapshot.to_vec())
        .fault_around(16 << 10)
        .workers(1)
        // The summary reports time per fault.
        .record(true)
        .spawn()
        .map_err(e("serve"))?;
    Ok(LazyRegion {
        restore: Some((server, alias)),
        view,
    })
}

// ---------------------------------------------------------------------------
// Part 3: the guest's checksums (or a host thread's)
// ---------------------------------------------------------------------------

/// What the checker (the guest or a host thread) found.
struct Check {
    by: &'static str,
    /// Per region, each sum the checker gave, named by how it gave it.
    data: Vec<(&'static str, Option<u16>)>,
    lazy: Vec<(&'static str, Option<u16>)>,
    elapsed: Duration,
}

/// Part 3: a guest over slot 0 and slot 1 (`lazy`).
fn run_guest(vm: &VmFd, slot0: &Slot0, lazy: &ShmemMap) -> Res<Check> {
    let region0 = slot0.region()?;
    let region1 = MemoryRegion2::builder(1, LAZY_GPA, LAZY_LEN)
        .userspace_addr(lazy.addr)
        .build()
        .map_err(e("memslot 1"))?;
    // SAFETY: slot 0 is deleted below, on every path, before this function
    // returns; `slot0` outlives the call.
    unsafe { vm.set_memory_region(&region0) }.map_err(e("KVM_SET_USER_MEMORY_REGION2 slot 0"))?;
    let started = Instant::now();
    // SAFETY: slot 1 is deleted right after the guest ran, on every path;
    // `lazy` outlives the call.
    let ran = unsafe { vm.set_memory_region(&region1) }
        .map_err(e("KVM_SET_USER_MEMORY_REGION2 slot 1"))
        .and_then(|()| {
            let sums = drive_guest(vm, |fault| Err(format!("unexpected exit: {fault:?}")));
            let deleted = vm.delete_memory_region(1).map_err(e("delete slot 1"));
            sums.and_then(|sums| deleted.map(|()| sums))
        });
    let elapsed = started.elapsed();
    let deleted = vm.delete_memory_region(0).map_err(e("delete slot 0"));
    let (sum_a, sum_b) = ran?;
    deleted?;
    let mut stored = [0u8; 4];
    slot0.read_at(RESULT_GPA, &mut stored)?;
    Ok(Check {
        by: "guest",
        data: vec![
            ("reported", sum_a),
            ("stored", Some(u16::from_le_bytes([stored[0], stored[1]]))),
        ],
        lazy: vec![
            ("reported", sum_b),
            ("stored", Some(u16::from_le_bytes([stored[2], stored[3]]))),
        ],
        elapsed,
    })
}

/// Runs vCPU 0 from `CODE_GPA` until it halts: the sums it reported.
/// Each `KVM_EXIT_MEMORY_FAULT` goes to `on_fault`, which resolves it (the
/// vCPU then re-enters) or fails the run.
fn drive_guest(
    vm: &VmFd,
    mut on_fault: impl FnMut(MemoryFault) -> Res<()>,
) -> Res<(Option<u16>, Option<u16>)> {
    let mut vcpu = guest_vcpu(vm)?;
    let started = Instant::now();
    let (mut sum_a, mut sum_b) = (None, None);
    loop {
        if started.elapsed() > Duration::from_secs(60) {
            return Err("the guest did not finish within 60 s".into());
        }
        let exit = vcpu.run().map_err(e("KVM_RUN"))?;
        if let Some(fault) = MemoryFault::from_vcpu_exit(&exit) {
            on_fault(fault)?;
            continue;
        }
        match exit {
            #[cfg(target_arch = "x86_64")]
            VcpuExit::IoOut(port, data) if data.len() >= 2 => {
                let v = u16::from_le_bytes([data[0], data[1]]);
                match port {
                    PORT_A => sum_a = Some(v),
                    PORT_B => sum_b = Some(v),
                    p => return Err(format!("unexpected port {p:#x}")),
                }
            }
            #[cfg(target_arch = "x86_64")]
            VcpuExit::Hlt => return Ok((sum_a, sum_b)),
            #[cfg(target_arch = "aarch64")]
            VcpuExit::MmioWrite(addr, data) if data.len() >= 2 => {
                let v = u16::from_le_bytes([data[0], data[1]]);
                match addr {
                    MMIO_A => sum_a = Some(v),
                    MMIO_B => sum_b = Some(v),
                    a => return Err(format!("unexpected MMIO write at {a:#x}")),
                }
            }
            #[cfg(target_arch = "aarch64")]
            VcpuExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN, _) => {
                return Ok((sum_a, sum_b));
            }
            other => return Err(format!("unexpected exit: {other:?}")),
        }
    }
}

/// vCPU 0 in real mode at `CODE_GPA`.
#[cfg(target_arch = "x86_64")]
fn guest_vcpu(vm: &VmFd) -> Res<VcpuFd> {
    let vcpu = vm.create_vcpu(0).map_err(e("KVM_CREATE_VCPU"))?;
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
    Ok(vcpu)
}

/// vCPU 0 (the preferred target, with PSCI 0.2 for `SYSTEM_OFF`) at EL1h
/// with the MMU off and DAIF masked, at `CODE_GPA`.
#[cfg(target_arch = "aarch64")]
fn guest_vcpu(vm: &VmFd) -> Res<VcpuFd> {
    use kvm_bindings::{
        KVM_ARM_VCPU_PSCI_0_2, KVM_REG_ARM_CORE, KVM_REG_ARM64, KVM_REG_SIZE_U64, kvm_regs,
        kvm_vcpu_init,
    };
    use std::mem::offset_of;
    let vcpu = vm.create_vcpu(0).map_err(e("KVM_CREATE_VCPU"))?;
    let mut init = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut init)
        .map_err(e("KVM_ARM_PREFERRED_TARGET"))?;
    init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    vcpu.vcpu_init(&init).map_err(e("KVM_ARM_VCPU_INIT"))?;
    let core_reg = |offset: usize| {
        KVM_REG_ARM64 | KVM_REG_SIZE_U64 | u64::from(KVM_REG_ARM_CORE) | (offset / 4) as u64
    };
    // PSTATE 0x3c5: D, A, I, F masked; EL1 with SP_EL1.
    for (offset, value) in [
        (offset_of!(kvm_regs, regs.pc), CODE_GPA),
        (offset_of!(kvm_regs, regs.pstate), 0x3c5),
    ] {
        vcpu.set_one_reg(core_reg(offset), &value.to_le_bytes())
            .map_err(e("KVM_SET_ONE_REG"))?;
    }
    Ok(vcpu)
}

/// Without a guest: a host thread reads both regions as the guest would (the
/// lazy region's first touches are faults the server resolves).
fn host_check(slot0: &Slot0, lazy: &ShmemMap) -> Res<Check> {
    let started = Instant::now();
    let (sum_a, sum_b) = std::thread::scope(|s| {
        let reader = std::thread::Builder::new()
            .name("gmem-demo-reader".into())
            .spawn_scoped(s, || -> Res<(u16, u16)> {
                let mut data = vec![0u8; DATA_LEN as usize];
                slot0.read_at(DATA_GPA, &mut data)?;
                let mut region = vec![0u8; LAZY_LEN as usize];
                lazy.read_at(0, &mut region)?;
                Ok((sum16(&data), sum16(&region)))
            })
            .map_err(e("spawn the reader thread"))?;
        reader
            .join()
            .map_err(|_| "the reader thread panicked".to_string())?
    })?;
    Ok(Check {
        by: "host thread",
        data: vec![("read", Some(sum_a))],
        lazy: vec![("read", Some(sum_b))],
        elapsed: started.elapsed(),
    })
}

// ---------------------------------------------------------------------------
// Memfd memory
// ---------------------------------------------------------------------------

/// A shmem memfd; its mappings keep the memory after it is dropped.
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
        let raw = unsafe { libc::memfd_create(c"gmem-demo".as_ptr(), libc::MFD_CLOEXEC) };
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

    /// The address of `offset .. offset + len`, checked to lie inside.
    fn at(&self, offset: u64, len: usize) -> Res<u64> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(self.addr + offset),
            _ => Err(format!(
                "range {offset:#x}+{len:#x} is outside the memfd mapping (size {:#x})",
                self.len
            )),
        }
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Res<()> {
        let dst = self.at(offset, data.len())? as *mut u8;
        // SAFETY: `dst .. dst + data.len()` lies inside this live, writable
        // shared mapping of a memfd at least as long (checked), so the copy
        // stays in bounds and cannot raise SIGBUS; no Rust reference points
        // into the mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Res<()> {
        let src = self.at(offset, buf.len())? as *const u8;
        // SAFETY: as in `write_at`, reading; `buf` is a distinct Rust buffer.
        // A registered range's missing pages are faults the server resolves.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
}

impl Drop for ShmemMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `Shmem::map`; nothing refers to it any more.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}
