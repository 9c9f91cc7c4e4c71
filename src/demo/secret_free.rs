//! Part 4 of `gmem demo`: the secret-free restore, Firecracker's
//! `feature/secret-hiding` flow end to end, in two processes.
//!
//! - **The VMM** (the demo process) gives slot 1 a guest_memfd created
//!   `MMAP | INIT_SHARED | NO_DIRECT_MAP | WRITE`: its pages leave the
//!   kernel's direct map once they hold data, and the VMM's view of guest
//!   memory is the guest_memfd mapped `MAP_SHARED`, which is also the
//!   slot's `userspace_addr`. The slot has `KVM_MEM_USERFAULT` with a
//!   bitmap in a memfd, every bit set; a userfaultfd is registered
//!   `MISSING | MINOR` on the mapping. The guest's code stays in an
//!   ordinary slot 0.
//! - **The handler** (`gmem __demo-handler`, a second process) receives
//!   `[uffd, guest_memfd, bitmap memfd]` with Firecracker's handshake
//!   (`gpa_start`, `is_guest_memfd`) and keeps the socket as the
//!   [`FaultChannel`]. It holds the snapshot and fills every page with
//!   `pwrite` into the guest_memfd, clearing the page's bit after the write,
//!   three ways: a [`FaultRequest`] (a vCPU's userfault exit) through
//!   [`UserfaultServer`]; a uffd fault (the VMM's own access through the
//!   mapping), written where its bit is still set and then mapped with
//!   `UFFDIO_CONTINUE`; and, in the background, the upper half of the
//!   region.
//! - **The vCPU loop** turns each `KVM_EXIT_MEMORY_FAULT` with `USERFAULT`
//!   into `FaultRequest::sync` and re-enters on the `FaultReply`. Before
//!   the guest runs, the VMM
//!   reads a device's buffer through the mapping (MISSING faults); after,
//!   it reads the whole region back (MINOR faults: the pages are in the
//!   page cache, not yet in the VMM's page tables).
//!
//! The handler answers uffd faults itself rather than through
//! `uffd_gmem::serve`: a page it writes on a uffd fault must also leave the
//! KVM userfault bitmap, so that the vCPU does not trap a page that is
//! there already, and `serve` knows nothing of that bitmap.

use super::{
    CODE_GPA, DATA_LEN, DATA_SEED, LAZY_GPA, LAZY_LEN, RESULT_GPA, Res, Slot0, clear_cloexec,
    drive_guest, e, guest_code, pattern, sum16,
};
use kvm_gmem::{
    Capabilities, GuestMemfd, GuestMemfdFlags, KvmDevice, Mapping, MemoryFault, MemoryRegion2,
    UserfaultBitmap, VmOps, VmType,
};
use kvm_ioctls::{Kvm, VmFd};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use uffd_gmem::firecracker::{
    self, FaultChannel, FaultRequest, GuestRegionUffdMapping, Handshake, UserfaultServer,
};
use uffd_gmem::{Event, EventBuffer, FaultKind, Ioctls, Mode, RegisterMode, Uffd};

/// The guest_memfd's flags: Firecracker's restore set.
const FLAGS: GuestMemfdFlags = GuestMemfdFlags::MMAP
    .union(GuestMemfdFlags::INIT_SHARED)
    .union(GuestMemfdFlags::NO_DIRECT_MAP)
    .union(GuestMemfdFlags::WRITE);
/// The snapshot of slot 1, the same in both processes.
const SNAPSHOT_SEED: u64 = 0x5EC2E7;
/// Pages of the device's buffer the VMM reads before the guest runs.
const DEVICE_PAGES: u64 = 4;
/// How long the VMM waits for the handler (a reply, its statistics).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Part 4's report lines (label, text) and what did not match.
pub(in crate::demo) struct Report {
    pub(in crate::demo) lines: Vec<(String, String)>,
    pub(in crate::demo) problems: Vec<String>,
}

// ---------------------------------------------------------------------------
// The probe
// ---------------------------------------------------------------------------

/// Everything part 4 needs, probed through the crates: `Capabilities`'
/// RFC rows, the VM's guest_memfd flags, and a trial `MISSING | MINOR`
/// registration of a guest_memfd with [`FLAGS`].
pub(in crate::demo) fn usable(vm: &VmFd, release: &str) -> Res<()> {
    let kvm = KvmDevice::open().map_err(|err| err.to_string())?;
    let caps = Capabilities::query(&kvm, vm, VmType::DEFAULT).map_err(|err| err.to_string())?;
    let mut lacking: Vec<(&str, String)> = [
        ("KVM_CAP_GUEST_MEMFD", &caps.guest_memfd),
        ("GUEST_MEMFD_FLAG_NO_DIRECT_MAP", &caps.rfc.no_direct_map),
        ("GUEST_MEMFD_FLAG_WRITE", &caps.rfc.gmem_write),
        ("KVM_MEM_USERFAULT", &caps.rfc.kvm_userfault),
    ]
    .into_iter()
    .filter(|(_, s)| !s.supported)
    .map(|(name, s)| (name, s.evidence.clone()))
    .collect();
    let offered = vm.guest_memfd_flags().map_err(|err| err.to_string())?;
    if !offered.contains(FLAGS) {
        let why = format!("KVM_CAP_GUEST_MEMFD_FLAGS = {offered}, needs {FLAGS}");
        lacking.push(("KVM_CAP_GUEST_MEMFD_FLAGS", why));
    }
    if lacking.is_empty()
        && let Err(why) = trial_register(vm)
    {
        lacking.push(("UFFDIO_REGISTER_GUEST_MEMFD", why));
    }
    let Some(((name, first), rest)) = lacking.split_first() else {
        return Ok(());
    };
    let mut why = if first.starts_with(name) {
        format!("{first} on {release}")
    } else {
        format!("{name}: {first} on {release}")
    };
    if !rest.is_empty() {
        let names: Vec<&str> = rest.iter().map(|(n, _)| *n).collect();
        why += &format!(" (also lacking: {})", names.join(", "));
    }
    Err(why)
}

/// A one-page guest_memfd with [`FLAGS`], mapped and registered `MISSING |
/// MINOR` on a throwaway userfaultfd, which must offer `UFFDIO_CONTINUE`.
fn trial_register(vm: &VmFd) -> Res<()> {
    let uffd = Uffd::builder()
        .create()
        .map_err(|err| format!("userfaultfd: {err}"))?;
    let gmem = GuestMemfd::builder(kvm_gmem::page_size())
        .flags(FLAGS)
        .create(vm)
        .map_err(|err| format!("a guest_memfd with {FLAGS}: {err}"))?;
    let map = gmem
        .map()
        .map_err(|err| format!("mmap of a guest_memfd with {FLAGS}: {err}"))?;
    let ioctls = uffd
        .register_guest_memfd(&map, RegisterMode::MISSING | RegisterMode::MINOR)
        .map_err(|err| err.to_string())?;
    if ioctls.contains(Ioctls::CONTINUE) {
        Ok(())
    } else {
        Err(format!(
            "UFFDIO_REGISTER (MISSING|MINOR) of a guest_memfd mapping offers {ioctls:?}, \
             without UFFDIO_CONTINUE"
        ))
    }
}

// ---------------------------------------------------------------------------
// The VMM
// ---------------------------------------------------------------------------

/// Part 4, the VMM's side: sets up the guest_memfd slot, hands it to the
/// handler, runs the guest, reads the region back; the report.
pub(in crate::demo) fn run() -> Res<Report> {
    let started = Instant::now();
    let page = kvm_gmem::page_size();
    let pages = LAZY_LEN / page;
    let snapshot = pattern(LAZY_LEN, SNAPSHOT_SEED);

    let vm = Kvm::new()
        .map_err(e("open /dev/kvm"))?
        .create_vm()
        .map_err(e("KVM_CREATE_VM"))?;
    let gmem = GuestMemfd::builder(LAZY_LEN)
        .mmap(true)
        .init_shared(true)
        .no_direct_map(true)
        .write(true)
        .create(&vm)
        .map_err(e("KVM_CREATE_GUEST_MEMFD"))?;
    let map = gmem.map().map_err(e("mmap(guest_memfd)"))?;
    let bitmap = UserfaultBitmap::memfd(pages, true).map_err(e("userfault bitmap"))?;
    let bitmap_fd = bitmap.fd().ok_or("the userfault bitmap is not a memfd")?;
    let uffd = Uffd::builder()
        .non_blocking(true)
        .create()
        .map_err(e("userfaultfd"))?;
    uffd.register_guest_memfd(&map, RegisterMode::MISSING | RegisterMode::MINOR)
        .map_err(e("UFFDIO_REGISTER"))?;
    let mut region = GuestRegionUffdMapping::new(map.addr(), LAZY_LEN, 0, page);
    (region.gpa_start, region.is_guest_memfd) = (Some(LAZY_GPA), Some(true));

    let handler = Handler::spawn()?;
    let pid = handler.child.id();
    let sent = firecracker::send(
        handler.channel.stream(),
        &[region],
        &[uffd.as_fd(), gmem.as_fd(), bitmap_fd],
    )
    .map_err(e("firecracker::send"));
    // Unlike Firecracker, the VMM keeps no copy of the userfaultfd: should
    // the handler die, the registration goes with its copy, and a fault
    // reads the guest_memfd as it is (a mismatch) instead of hanging.
    drop(uffd);
    let seen = sent.and_then(|()| restore(&vm, &gmem, &map, &bitmap, &handler.channel));
    let stats = handler.finish();
    let (seen, stats) = match (seen, stats) {
        (Ok(seen), Ok(stats)) => (seen, stats),
        (Err(err), Ok(_)) => return Err(err),
        (Ok(_), Err(why)) => return Err(format!("the handler (pid {pid}): {why}")),
        (Err(err), Err(why)) => return Err(format!("{err}; the handler (pid {pid}): {why}")),
    };

    let want = (sum16(&pattern(DATA_LEN, DATA_SEED)), sum16(&snapshot));
    let mut problems = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    let no_direct_map = gmem.flags().contains(GuestMemfdFlags::NO_DIRECT_MAP);
    check(
        no_direct_map,
        format!("the guest_memfd's flags are {}", gmem.flags()),
    );
    for (what, got, want) in [
        ("data block, reported", seen.sums.0, want.0),
        ("data block, stored", Some(seen.stored.0), want.0),
        ("restored region, reported", seen.sums.1, want.1),
        ("restored region, stored", Some(seen.stored.1), want.1),
    ] {
        check(
            got == Some(want),
            format!("guest checksum, {what}: {got:#06x?}, host {want:#06x}"),
        );
    }
    let device_kib = (DEVICE_PAGES * page) >> 10;
    check(
        seen.device == snapshot[..seen.device.len()],
        format!("the device's {device_kib} KiB differ from the snapshot"),
    );
    check(
        seen.back == snapshot,
        "the region read back differs from the snapshot".into(),
    );
    check(
        seen.trapping.is_none(),
        format!("page {:?} of slot 1 still traps", seen.trapping),
    );
    check(
        seen.exits == stats.served,
        format!(
            "{} userfault exits, but the handler served {} FaultRequests",
            seen.exits, stats.served
        ),
    );
    // Each path must have run: pages DEVICE_PAGES..pages/2 are written only
    // on userfault exits, the device's pages only on uffd MISSING faults.
    check(seen.exits > 0, "no userfault exit: nothing trapped".into());
    check(stats.missing > 0, "no uffd MISSING fault".into());
    check(stats.minor > 0, "no uffd MINOR fault".into());

    let verdict = |same: bool| {
        if same {
            "equal to the snapshot"
        } else {
            "DIFFERS"
        }
    };
    let by_exits = pages.saturating_sub(stats.prefilled + stats.written);
    let lines = vec![
        (
            "secret-free restore".into(),
            format!(
                "slot 1: a guest_memfd {} ({}), KVM_MEM_USERFAULT, {pages} pages; handler pid \
                 {pid} got [uffd, guest_memfd, bitmap memfd]",
                gmem.flags(),
                if no_direct_map {
                    "out of the direct map"
                } else {
                    "in the direct map"
                }
            ),
        ),
        (
            "userfault exits (fault channel)".into(),
            format!(
                "{} exits with USERFAULT, {} FaultRequests served by UserfaultServer (pwrite, \
                 bit cleared), each answered with a FaultReply",
                seen.exits, stats.served
            ),
        ),
        (
            "uffd faults (guest_memfd mapping)".into(),
            format!(
                "{} MISSING (pwrite, then CONTINUE), {} MINOR (CONTINUE): {} UFFDIO_CONTINUE, {} \
                 duplicates",
                stats.missing, stats.minor, stats.continued, stats.duplicates
            ),
        ),
        (
            "pages written with write()".into(),
            format!(
                "{pages}: {} prefilled in the background, {} on uffd faults, {by_exits} on \
                 userfault exits; bitmap {}",
                stats.prefilled,
                stats.written,
                match seen.trapping {
                    None => "empty".to_string(),
                    Some(p) => format!("still set at page {p}"),
                }
            ),
        ),
        (
            "VMM reads through the mapping".into(),
            format!(
                "{device_kib} KiB before the run (a device's buffer): {}; {} KiB after: {}",
                verdict(seen.device == snapshot[..seen.device.len()]),
                LAZY_LEN >> 10,
                verdict(seen.back == snapshot)
            ),
        ),
        (
            "guest checksum, restored region".into(),
            format!(
                "reported {}, stored {:#06x}, host {:#06x}",
                seen.sums.1.map_or("none".into(), |v| format!("{v:#06x}")),
                seen.stored.1,
                want.1
            ),
        ),
        (
            "secret-free run".into(),
            format!(
                "guest {:?}, part {:?}: {}",
                seen.elapsed,
                started.elapsed(),
                if problems.is_empty() {
                    "OK"
                } else {
                    "MISMATCH"
                }
            ),
        ),
    ];
    Ok(Report { lines, problems })
}

/// What the VMM saw.
struct Seen {
    /// The device's buffer, read before the guest ran.
    device: Vec<u8>,
    /// The whole region, read after.
    back: Vec<u8>,
    /// Userfault exits resolved over the fault channel.
    exits: u64,
    /// The sums the guest reported (data block, restored region).
    sums: (Option<u16>, Option<u16>),
    /// The sums the guest stored in slot 0.
    stored: (u16, u16),
    /// The first page whose userfault bit is still set, if any.
    trapping: Option<u64>,
    elapsed: Duration,
}

/// Reads the device's buffer, runs the guest over slot 0 (code, data
/// block) and slot 1 (the guest_memfd with `KVM_MEM_USERFAULT`), reads the
/// region back.
fn restore(
    vm: &VmFd,
    gmem: &GuestMemfd,
    map: &Mapping,
    bitmap: &UserfaultBitmap,
    channel: &FaultChannel,
) -> Res<Seen> {
    // A device model reading a buffer from guest memory: MISSING faults,
    // which the handler serves.
    let mut device = vec![0u8; (DEVICE_PAGES * kvm_gmem::page_size()) as usize];
    map.read_at(0, &mut device)
        .map_err(e("read through the mapping"))?;

    let slot0 = Slot0::memfd(&pattern(DATA_LEN, DATA_SEED))?;
    slot0.write_at(CODE_GPA, &guest_code())?;
    let region0 = slot0.region()?;
    let region1 = MemoryRegion2::builder(1, LAZY_GPA, LAZY_LEN)
        .guest_memfd(gmem, 0)
        .userspace(map)
        .userfault_bitmap(bitmap)
        .build()
        .map_err(e("memslot 1"))?;
    // SAFETY: slot 0 is deleted below, on every path, before this function
    // returns; `slot0` outlives the call.
    unsafe { vm.set_memory_region(&region0) }.map_err(e("KVM_SET_USER_MEMORY_REGION2 slot 0"))?;
    let started = Instant::now();
    let mut exits = 0;
    // SAFETY: slot 1 is deleted right after the guest ran, on every path;
    // `map` and `bitmap` (the caller's) outlive this function.
    let ran = unsafe { vm.set_memory_region(&region1) }
        .map_err(e("KVM_SET_USER_MEMORY_REGION2 slot 1 (KVM_MEM_USERFAULT)"))
        .and_then(|()| {
            let sums = drive_guest(vm, |fault| {
                exits += 1;
                resolve(channel, fault)
            });
            let deleted = vm.delete_memory_region(1).map_err(e("delete slot 1"));
            sums.and_then(|sums| deleted.map(|()| sums))
        });
    let elapsed = started.elapsed();
    let deleted = vm.delete_memory_region(0).map_err(e("delete slot 0"));
    let sums = ran?;
    deleted?;
    let mut stored = [0u8; 4];
    slot0.read_at(RESULT_GPA, &mut stored)?;

    // The VMM reads the whole region: the pages the guest made the handler
    // write are in the page cache, not in the VMM's page tables (MINOR).
    let mut back = vec![0u8; LAZY_LEN as usize];
    map.read_at(0, &mut back)
        .map_err(e("read through the mapping"))?;
    Ok(Seen {
        device,
        back,
        exits,
        sums,
        stored: (
            u16::from_le_bytes([stored[0], stored[1]]),
            u16::from_le_bytes([stored[2], stored[3]]),
        ),
        trapping: bitmap.first_set(0),
        elapsed,
    })
}

/// One userfault exit: a [`FaultRequest`] to the handler, its reply
/// awaited (with a deadline), then the vCPU re-enters.
fn resolve(channel: &FaultChannel, fault: MemoryFault) -> Res<()> {
    if !fault.is_userfault() {
        return Err(format!("a memory fault without USERFAULT: {fault:?}"));
    }
    let req = FaultRequest::sync(0, fault.gpa, fault.flags.bits());
    channel
        .send_request(&req)
        .map_err(e("FaultChannel::send_request"))?;
    // The channel itself would wait for ever.
    if !readable(channel.stream(), TIMEOUT)? {
        return Err(format!(
            "no FaultReply within {TIMEOUT:?} for gpa {:#x}",
            fault.gpa
        ));
    }
    let reply = channel
        .recv_reply()
        .map_err(e("FaultChannel::recv_reply"))?
        .ok_or("the handler closed the fault channel")?;
    if reply.vcpu != Some(req.vcpu) || reply.gpa != req.gpa {
        return Err(format!("{reply:?} does not answer {req:?}"));
    }
    Ok(())
}

/// `poll(POLLIN)` on `stream` for up to `timeout`: whether a byte (or the
/// end of the stream) is there to read.
fn readable(stream: &UnixStream, timeout: Duration) -> Res<bool> {
    let mut p = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: one `pollfd`, valid and writable for the call, naming the
        // socket `stream` holds open.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != ErrorKind::Interrupted {
            return Err(format!("poll(fault channel): {err}"));
        }
    }
}

/// The handler process, seen from the VMM: the child and the socket, which
/// carries the handshake, then the fault channel, then the statistics.
struct Handler {
    child: Child,
    channel: FaultChannel,
}

impl Handler {
    fn spawn() -> Res<Handler> {
        let (ours, theirs) = UnixStream::pair().map_err(e("socketpair"))?;
        clear_cloexec(theirs.as_raw_fd())?;
        let child = std::process::Command::new(std::env::current_exe().map_err(e("current_exe"))?)
            .args([super::HANDLER_ARG, &theirs.as_raw_fd().to_string()])
            .spawn()
            .map_err(e("spawn the handler"))?;
        drop(theirs);
        ours.set_read_timeout(Some(TIMEOUT))
            .map_err(e("socket timeout"))?;
        Ok(Handler {
            child,
            channel: FaultChannel::new(ours),
        })
    }

    /// Ends the fault channel (the handler reads the end of the stream),
    /// then reads the handler's statistics and waits for it.
    fn finish(self) -> Res<HandlerStats> {
        let Handler { mut child, channel } = self;
        let stream = channel.into_inner();
        let _ = stream.shutdown(Shutdown::Write);
        let mut line = String::new();
        let read = (&stream).read_to_string(&mut line);
        if read.is_err() {
            // Stuck: do not wait for it.
            let _ = child.kill();
        }
        let status = child.wait().map_err(e("wait for the handler"))?;
        read.map_err(e("reading the handler's statistics"))?;
        if !status.success() {
            return Err(format!("it failed: {status}"));
        }
        HandlerStats::parse(&line)
    }
}

/// The handler's counts, as it reports them in its last line.
#[derive(Debug, Default)]
struct HandlerStats {
    /// `FaultRequest`s served.
    served: u64,
    /// uffd faults by kind.
    missing: u64,
    minor: u64,
    /// `UFFDIO_CONTINUE`s that mapped a page, and those that found it
    /// mapped already (a duplicate event).
    continued: u64,
    duplicates: u64,
    /// Pages written with `pwrite` on uffd faults, and in the background.
    written: u64,
    prefilled: u64,
}

impl HandlerStats {
    /// `served=.. missing=.. ...`, as [`Counters::line`] writes it.
    fn parse(line: &str) -> Res<HandlerStats> {
        let mut s = HandlerStats::default();
        for pair in line.split_whitespace() {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("a statistics line without key=value: {line:?}"))?;
            let value: u64 = value
                .parse()
                .map_err(|_| format!("a statistics line with a bad number: {line:?}"))?;
            match key {
                "served" => s.served = value,
                "missing" => s.missing = value,
                "minor" => s.minor = value,
                "continued" => s.continued = value,
                "duplicates" => s.duplicates = value,
                "written" => s.written = value,
                "prefilled" => s.prefilled = value,
                _ => {}
            }
        }
        if line.trim().is_empty() {
            return Err("it sent no statistics".into());
        }
        Ok(s)
    }
}

// ---------------------------------------------------------------------------
// The handler process
// ---------------------------------------------------------------------------

/// The handler's counters, shared by its threads.
#[derive(Default)]
struct Counters {
    served: AtomicU64,
    missing: AtomicU64,
    minor: AtomicU64,
    continued: AtomicU64,
    duplicates: AtomicU64,
    written: AtomicU64,
    prefilled: AtomicU64,
}

impl Counters {
    fn line(&self) -> String {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "served={} missing={} minor={} continued={} duplicates={} written={} prefilled={}\n",
            n(&self.served),
            n(&self.missing),
            n(&self.minor),
            n(&self.continued),
            n(&self.duplicates),
            n(&self.written),
            n(&self.prefilled)
        )
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The handler process: the handshake, then the fault channel, the uffd
/// and the background prefill until the VMM ends the channel; its
/// statistics as the last line on the socket.
pub(in crate::demo) fn handler(fd_arg: &str) -> Res<()> {
    let raw: i32 = fd_arg.parse().map_err(e("socket fd argument"))?;
    // SAFETY: the VMM passed this descriptor number on our command line; it
    // is an inherited socket nothing else in this process owns.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(raw) });
    let hs = Handshake::recv_timeout(&stream, TIMEOUT).map_err(e("Handshake::recv"))?;
    let snapshot = pattern(LAZY_LEN, SNAPSHOT_SEED);
    hs.validate_against_snapshot(snapshot.len() as u64)
        .map_err(e("the handshake's regions"))?;
    let page = uffd_gmem::page_size();
    let pages = hs.total_size() / page;
    let Handshake {
        regions,
        uffd,
        guest_memfd: Some(gmem),
        userfault_bitmap: Some(bitmap_fd),
        ..
    } = hs
    else {
        return Err("not a secret-hiding handshake: no guest_memfd and bitmap fds".into());
    };
    let bitmap =
        UserfaultBitmap::from_fd(bitmap_fd, pages).map_err(e("UserfaultBitmap::from_fd"))?;
    let gmem = File::from(gmem);
    let server = UserfaultServer::from_fd(gmem.as_fd(), &bitmap, &regions, &snapshot)
        .map_err(e("UserfaultServer"))?;
    let channel = FaultChannel::new(stream.try_clone().map_err(e("dup the socket"))?);
    let counters = Counters::default();
    let pages = Pages {
        gmem: &gmem,
        bitmap: &bitmap,
        snapshot: &snapshot,
        page,
    };
    let uffd = UffdServer {
        uffd: &uffd,
        regions: &regions,
        pages: &pages,
        counters: &counters,
    };
    let stop = AtomicBool::new(false);
    let (served, faults, prefill) = std::thread::scope(|s| {
        let faults = s.spawn(|| {
            let r = uffd.run(&stop);
            if r.is_err() {
                // Ends the channel loop below: the handler exits, and its
                // userfaultfd with it.
                let _ = stream.shutdown(Shutdown::Both);
            }
            r
        });
        let prefill = s.spawn(|| pages.prefill(&stop, &counters.prefilled));
        let served = serve_channel(&channel, &server, &counters);
        stop.store(true, Ordering::Release);
        let join = |r: std::thread::Result<Res<()>>| {
            r.unwrap_or_else(|_| Err("a handler thread panicked".into()))
        };
        (served, join(faults.join()), join(prefill.join()))
    });
    served
        .and(faults.map_err(|err| format!("uffd faults: {err}")))
        .and(prefill.map_err(|err| format!("prefill: {err}")))?;
    (&stream)
        .write_all(counters.line().as_bytes())
        .map_err(e("sending the statistics"))
}

/// Serves `FaultRequest`s until the VMM ends the channel.
fn serve_channel(
    channel: &FaultChannel,
    server: &UserfaultServer<'_>,
    counters: &Counters,
) -> Res<()> {
    while let Some(req) = channel
        .recv_request()
        .map_err(e("FaultChannel::recv_request"))?
    {
        let reply = server.serve(&req).map_err(e("UserfaultServer::serve"))?;
        channel
            .send_reply(&reply)
            .map_err(e("FaultChannel::send_reply"))?;
        bump(&counters.served);
    }
    Ok(())
}

/// The guest_memfd's pages as the handler fills them.
struct Pages<'a> {
    gmem: &'a File,
    bitmap: &'a UserfaultBitmap,
    snapshot: &'a [u8],
    page: u64,
}

impl Pages<'_> {
    /// Writes the page at file `offset` from the snapshot if its bit is
    /// still set, then clears the bit: whether this call wrote it. The
    /// kernel refuses a page that holds data already (`EEXIST`, `ENOSPC`):
    /// another path wrote it first.
    fn populate(&self, offset: u64) -> Res<bool> {
        let bit = offset / self.page;
        if !self.bitmap.is_set(bit) {
            return Ok(false);
        }
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.snapshot.get(o..o + self.page as usize))
            .ok_or_else(|| format!("file offset {offset:#x} lies past the snapshot"))?;
        let written = loop {
            match self.gmem.write_at(src, offset) {
                Ok(n) => break n == src.len(),
                Err(err) if matches!(err.raw_os_error(), Some(libc::EEXIST | libc::ENOSPC)) => {
                    break false;
                }
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => return Err(format!("pwrite(guest_memfd) at {offset:#x}: {err}")),
            }
        };
        self.bitmap.clear(bit);
        Ok(written)
    }

    /// Fills the upper half of the region, last page first, until done or
    /// stopped: Firecracker's handler "fills pages with write()" before
    /// faults ask for them.
    fn prefill(&self, stop: &AtomicBool, prefilled: &AtomicU64) -> Res<()> {
        let pages = self.bitmap.pages();
        for bit in (pages / 2..pages).rev() {
            if stop.load(Ordering::Acquire) {
                break;
            }
            if self.populate(bit * self.page)? {
                bump(prefilled);
            }
        }
        Ok(())
    }
}

/// Faults on the VMM's guest_memfd mapping, from the handshake's
/// userfaultfd.
struct UffdServer<'a> {
    uffd: &'a Uffd,
    regions: &'a [GuestRegionUffdMapping],
    pages: &'a Pages<'a>,
    counters: &'a Counters,
}

impl UffdServer<'_> {
    fn run(&self, stop: &AtomicBool) -> Res<()> {
        let mut events = EventBuffer::with_capacity(16);
        while !stop.load(Ordering::Acquire) {
            if !self
                .uffd
                .poll_readable(Duration::from_millis(20))
                .map_err(e("poll(userfaultfd)"))?
            {
                continue;
            }
            for event in self
                .uffd
                .read_events(&mut events)
                .map_err(e("read(userfaultfd)"))?
            {
                match event {
                    Event::Pagefault { kind, address, .. } => self.fault(kind, address)?,
                    other => return Err(format!("an unexpected event: {other:?}")),
                }
            }
        }
        Ok(())
    }

    /// One fault: the page is written if its bit is still set (no path has
    /// written it: a MISSING fault), then mapped with `UFFDIO_CONTINUE`.
    fn fault(&self, kind: FaultKind, address: u64) -> Res<()> {
        let page = self.pages.page;
        let start = address - address % page;
        let offset = self
            .regions
            .iter()
            .find_map(|r| r.snapshot_offset(start))
            .ok_or_else(|| format!("a fault at {address:#x}, outside every region"))?;
        match kind {
            FaultKind::Missing => bump(&self.counters.missing),
            FaultKind::Minor => bump(&self.counters.minor),
            other => return Err(format!("an unexpected {other:?} fault at {address:#x}")),
        }
        if self.pages.populate(offset)? {
            bump(&self.counters.written);
        }
        let range = start..start + page;
        match self.uffd.r#continue(range.clone(), Mode::empty()) {
            Ok(_) => {
                bump(&self.counters.continued);
                Ok(())
            }
            // Mapped meanwhile (a duplicate event): the faulter needs a wake.
            Err(uffd_gmem::Error::Exists { .. }) => {
                bump(&self.counters.duplicates);
                self.uffd.wake(range).map_err(e("UFFDIO_WAKE"))
            }
            Err(err) => Err(format!("UFFDIO_CONTINUE at {start:#x}: {err}")),
        }
    }
}
