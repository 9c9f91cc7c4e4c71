//! Fault injection for the Firecracker handshake and the fault server: every
//! case ends in a reported error or a clean shutdown within a bounded time,
//! leaving no thread behind (`/proc/self/task`) and every fd closed
//! (`/proc/self/fd`), both counted before and after.
//!
//! Cases already covered elsewhere are not repeated here: a peer that closes
//! before sending or after a truncated message, wrong fd counts in one
//! message, a memfd as the uffd, oversized messages and timeouts
//! (`tests/firecracker.rs`); a page source I/O error in `UFFDIO_COPY` mode
//! served to a child VMM, and `REMOVE`/`UNMAP`/`REMAP` after serving settled
//! (`tests/serve.rs`); a VMM that kills itself while faulting, with the
//! server stopped by its watched socket (`tests/serve_e2e.rs`). Here:
//!
//! - the handshake: the peer closes mid-message while the handler waits in
//!   `recv` (no timeout); an extra fd riding on the continuation of a split
//!   message; every other kind of fd as the "userfaultfd" (`/dev/null`, an
//!   eventfd, a pipe, a socket, a directory, fds in the wrong order), also
//!   where `/proc` is not mounted; a real but uninitialised userfaultfd;
//! - forged records from a fake userfaultfd (a pipe): fork records naming
//!   fds of this process or impossible ones, address-space events that
//!   overflow or are misaligned, faults on and off the regions;
//! - the faulting process dies with faults pending: a forked child
//!   registers its memory with a userfaultfd it hands to this process's
//!   server, faults from several threads while the page source holds every
//!   read, and is `SIGKILL`ed; the fills then meet `ESRCH`;
//! - a `REMOVE` (`MADV_DONTNEED`) arrives between a fault and its fill, for
//!   both remove policies: the held fill must not copy the snapshot's page
//!   over the dropped one (it did, with `ZeroOnNextFault` every time, before
//!   the server learnt to abandon such fills);
//! - the page source fails (I/O error) or comes up short (`UnexpectedEof`)
//!   in `UFFDIO_COPY` and `UFFDIO_CONTINUE` mode, and a snapshot file is
//!   truncated under its `MappedFile`.
//!
//! Every test takes one file-wide lock: the fd and thread counts would
//! otherwise see the other tests' work. Without a userfaultfd a test prints
//! `SKIP <test>: <why>` and passes, unless `CI=true`, where it fails.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use common::{
    KIB, Mem, assert_no_server_threads, fake_uffd, fallocate, fill_pattern, open_fds, page,
    pattern, register, skip, uffd_or_skip, wait_until,
};
use uffd_gmem::firecracker::{self, GuestRegionUffdMapping, Handshake};
use uffd_gmem::serve::{MappedFile, PageSource, Region, RemovePolicy, Server, Stats};
use uffd_gmem::sys_bindings as sys;
use uffd_gmem::{Errno, Error, Event, Features, MSG_SIZE, RegisterMode, Uffd};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

/// The names (as `/proc/self/task/*/comm` shows them: at most 15 bytes) of
/// the test harness's threads that reached [`serial`]: the thread count
/// leaves them out, since the harness starts and ends them while another
/// test runs.
static HARNESS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn comm_of(name: &str) -> String {
    name.bytes().take(15).map(char::from).collect()
}

/// The file-wide lock every test holds.
fn serial() -> MutexGuard<'static, ()> {
    if let Some(name) = std::thread::current().name() {
        HARNESS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(comm_of(name));
    }
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts a named helper thread (a leaked one shows in the baseline check
/// by its `fi-` name).
fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::Builder::new()
        .name(format!("fi-{name}"))
        .spawn(f)
        .unwrap()
}

/// Reads the u64 at `addr` (faulting its page in).
///
/// # Safety
///
/// `addr` must be mapped, readable and 8-aligned for the call.
unsafe fn peek(addr: u64) -> u64 {
    // SAFETY: the caller's guarantee.
    unsafe { std::ptr::read_volatile(addr as *const u64) }
}

/// This process's threads: id and name (`comm`).
fn threads() -> BTreeMap<u32, String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let tid = e.file_name().to_string_lossy().parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            Some((tid, comm.trim_end().to_string()))
        })
        .collect()
}

/// The threads started since `before`, but for the test harness's.
fn new_threads(before: &BTreeMap<u32, String>) -> Vec<String> {
    let harness = HARNESS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    threads()
        .into_iter()
        .filter(|(tid, comm)| !before.contains_key(tid) && !harness.contains(comm))
        .map(|(tid, comm)| format!("{tid} {comm}"))
        .collect()
}

/// The fds and threads at the start of a case, to compare with at its end.
struct Baseline {
    fds: BTreeMap<i32, String>,
    threads: BTreeMap<u32, String>,
}

impl Baseline {
    fn take() -> Baseline {
        assert_no_server_threads();
        Baseline {
            fds: open_fds(),
            threads: threads(),
        }
    }

    /// Waits (bounded) for the fds and threads to be back to the start:
    /// exactly the same fds, and no thread that was not there at the start
    /// (the test harness's left out: it starts the next tests' threads
    /// meanwhile, which wait for [`serial`]).
    fn assert_back(&self, label: &str) {
        let back = wait_until(Duration::from_secs(3), || {
            open_fds() == self.fds && new_threads(&self.threads).is_empty()
        });
        assert!(
            back,
            "{label}: not back to the start: fds {:?} -> {:?}, new threads {:?}",
            self.fds,
            open_fds(),
            new_threads(&self.threads)
        );
    }
}

/// Runs one case under the file-wide lock: without a userfaultfd with
/// `needs` (`None`: the case needs none) a SKIP; otherwise `body`, after
/// which the fds and threads must be back to what they were before it.
fn case(test: &str, needs: Option<Features>, body: impl FnOnce()) {
    let _g = serial();
    if let Some(features) = needs
        && uffd_or_skip(test, features).is_none()
    {
        return;
    }
    let base = Baseline::take();
    body();
    base.assert_back(test);
}

/// A memfd of `len` bytes (named, as `/proc/self/fd` shows it,
/// `memfd:fault-injection`).
fn memfd(len: u64) -> OwnedFd {
    common::memfd(c"fault-injection", len)
}

fn summary(s: &Stats) -> String {
    format!(
        "faults={} copied={} continued={} zeroed={} eexist={} eagain={} wakes={} other={} \
         errors={:?} stopped_because={:?}",
        s.faults,
        s.pages_copied,
        s.pages_continued,
        s.pages_zeroed,
        s.eexist,
        s.eagain,
        s.wakes,
        s.other_events,
        s.errors
            .iter()
            .take(6)
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        s.stopped_because
    )
}

/// A page source that holds every read until opened (or 20 s pass, then
/// fails), counting the reads waiting.
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
    waiting: AtomicUsize,
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate {
            open: Mutex::new(false),
            cv: Condvar::new(),
            waiting: AtomicUsize::new(0),
        })
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }

    /// Waits (up to `timeout`) until a read is held at the gate.
    fn held(&self, timeout: Duration) -> bool {
        wait_until(timeout, || self.waiting.load(Ordering::SeqCst) >= 1)
    }

    fn pass(&self) -> std::io::Result<()> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let g = self.open.lock().unwrap();
        let (g, t) = self
            .cv
            .wait_timeout_while(g, Duration::from_secs(20), |open| !*open)
            .unwrap();
        drop(g);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        if t.timed_out() {
            return Err(std::io::Error::other("the gate never opened"));
        }
        Ok(())
    }
}

struct GatedSource {
    data: Arc<Vec<u8>>,
    gate: Arc<Gate>,
}

impl PageSource for GatedSource {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.gate.pass()?;
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }
}

/// How an injected source failure looks.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// `read_at` fails with an I/O error.
    Io,
    /// The source is shorter than it claims: `UnexpectedEof`.
    Short,
}

/// A source that fails for reads touching `[bad, bad + len)`.
struct FailingSource {
    data: Arc<Vec<u8>>,
    bad: std::ops::Range<u64>,
    how: Failure,
}

impl PageSource for FailingSource {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        if offset < self.bad.end && self.bad.start < end {
            return Err(match self.how {
                Failure::Io => std::io::Error::from_raw_os_error(libc::EIO),
                Failure::Short => std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("injected short read at {offset:#x}"),
                ),
            });
        }
        buf.copy_from_slice(&self.data[offset as usize..end as usize]);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// A forked child VMM
// ---------------------------------------------------------------------------

/// A child process forked from this one. It runs only the closure it was
/// given and leaves with `_exit`: no destructor, no test harness code. It
/// talks in lines over its end of a socket pair. Killed and reaped on drop.
struct Child {
    pid: libc::pid_t,
    reaped: bool,
}

impl Child {
    /// Forks; the child runs `body` with its end of the socket and exits
    /// with its status (101 if it panics).
    fn fork(sock: UnixStream, body: impl FnOnce(&UnixStream) -> i32) -> Child {
        // SAFETY: fork(2). The child runs only `body` (which uses the
        // allocator and starts threads: both fork-safe with glibc) and then
        // `_exit`s; it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&sock)))
                .unwrap_or(101);
            // SAFETY: leaves the child at once, running no destructor.
            unsafe { libc::_exit(code) };
        }
        drop(sock);
        Child { pid, reaped: false }
    }

    fn kill(&self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }

    /// Waits (bounded) for the child; returns its wait status.
    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut st = 0;
            // SAFETY: waitpid(2) on our own child, WNOHANG.
            let r = unsafe { libc::waitpid(self.pid, &mut st, libc::WNOHANG) };
            if r == self.pid {
                self.reaped = true;
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill();
            let _ = self.wait(Duration::from_secs(10));
        }
    }
}

/// The child's side: writes one line (no allocation beyond the format).
fn say(sock: &UnixStream, line: &str) {
    let _ = writeln!(&*sock, "{line}");
}

/// The child's side: waits for a line starting with `word`.
fn hear(sock: &UnixStream, word: &str) -> bool {
    let mut r = BufReader::new(sock);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) if line.starts_with(word) => return true,
            Ok(_) => {}
        }
    }
}

/// The child's set-up: a userfaultfd with `features` over all of `mem`
/// (mapped before the fork, so at the same address in both processes),
/// registered MISSING and handed over with Firecracker's handshake.
fn child_connect(sock: &UnixStream, mem: (u64, u64), features: Features) -> Option<Uffd> {
    let uffd = Uffd::builder()
        .non_blocking(true)
        .require_features(features)
        .create()
        .ok()?;
    // SAFETY: the child's copy of the test's anonymous mapping; nothing in
    // the child references it but the touching threads' raw reads.
    unsafe { uffd.register(mem.0..mem.0 + mem.1, RegisterMode::MISSING) }.ok()?;
    let regions = [GuestRegionUffdMapping::new(mem.0, mem.1, 0, page())];
    firecracker::send(sock, &regions, &[uffd.as_fd()]).ok()?;
    Some(uffd)
}

/// Forks a child VMM over `mem` (mapped before the fork, so at the same
/// address in both processes): it hands all of `mem` over with
/// [`child_connect`] (or says `fail connect` and exits with 1), then runs
/// `body` with its socket and `mem`'s address. Returns the child, this
/// side's socket and the handshake received on it.
fn fork_vmm(
    mem: &Mem,
    features: Features,
    body: impl FnOnce(&UnixStream, u64) -> i32,
) -> (Child, UnixStream, Handshake) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let m = (mem.addr, mem.len);
    let child = Child::fork(theirs, move |sock| {
        let Some(_uffd) = child_connect(sock, m, features) else {
            say(sock, "fail connect");
            return 1;
        };
        body(sock, m.0)
    });
    let hs = Handshake::recv_timeout(&ours, Duration::from_secs(10)).expect("handshake");
    (child, ours, hs)
}

/// A server with two workers for a forked child's handshake over `mem`,
/// whose page source holds every read at the gate returned (and with
/// `on_remove`, if given).
fn gated_server(hs: Handshake, mem: &Mem, on_remove: Option<RemovePolicy>) -> (Server, Arc<Gate>) {
    let gate = Gate::new();
    let mut builder = Server::builder(hs.uffd)
        .region(Region::new(mem.addr, mem.len))
        .source(GatedSource {
            data: pattern(),
            gate: gate.clone(),
        })
        .workers(2);
    if let Some(policy) = on_remove {
        builder = builder.on_remove(policy);
    }
    (builder.spawn().expect("spawn"), gate)
}

/// Whether a child's wait status (`None`: it did not end) is an exit with 0.
fn exited_ok(st: Option<i32>) -> bool {
    st.is_some_and(|st| libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0)
}

/// The parent's side of a line protocol with a deadline.
struct Lines {
    r: BufReader<UnixStream>,
}

impl Lines {
    fn new(s: &UnixStream) -> Lines {
        let s = s.try_clone().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Lines {
            r: BufReader::new(s),
        }
    }

    fn next(&mut self) -> String {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => "<eof>".into(),
            Ok(_) => line.trim_end().to_string(),
            Err(e) => format!("<error {e}>"),
        }
    }
}

// ---------------------------------------------------------------------------
// The handshake
// ---------------------------------------------------------------------------

fn send_raw(s: &UnixStream, payload: &[u8], fds: &[BorrowedFd<'_>]) {
    firecracker::send_payload(s, payload, fds).expect("send_payload");
}

fn expect_protocol(r: uffd_gmem::Result<Handshake>, needles: &[&str]) -> String {
    match r {
        Err(Error::Protocol { op, what }) => {
            assert_eq!(op, firecracker::OP);
            for n in needles {
                assert!(what.contains(n), "{what:?} does not mention {n:?}");
            }
            what
        }
        Err(e) => panic!("expected Error::Protocol, got {e:?}"),
        Ok(hs) => panic!("a hostile handshake was accepted: {hs:?}"),
    }
}

/// The peer sends the first part of the handshake with its fd, then closes
/// while the handler waits in `recv` (no timeout): the handler returns at
/// once with the error, and the fd it received is closed.
#[test]
fn handshake_peer_closes_mid_message_while_waiting() {
    let test = "handshake_peer_closes_mid_message_while_waiting";
    case(test, Some(Features::empty()), || {
        let uffd = Uffd::builder().non_blocking(true).create().unwrap();
        let (vmm, handler) = UnixStream::pair().unwrap();
        let payload = br#"[{"base_host_virt_addr":4096,"size":4096,"#;
        send_raw(&vmm, payload, &[uffd.as_fd()]);
        drop(uffd);
        let (tx, rx) = mpsc::channel();
        let t = spawn("recv", move || {
            let t0 = Instant::now();
            let r = Handshake::recv(&handler);
            let _ = tx.send((r, t0.elapsed()));
        });
        std::thread::sleep(Duration::from_millis(100));
        drop(vmm);
        let (r, took) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("recv did not return after the peer closed");
        t.join().unwrap();
        let what = expect_protocol(
            r,
            &[
                "closed the socket in the middle of the handshake",
                &format!("after {} bytes", payload.len()),
            ],
        );
        eprintln!("[fault] {test}: {took:?}: {what}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    });
}

/// One handshake in two `sendmsg`s, an fd on each: the second fd rides on
/// the continuation the handler reads to complete the JSON. Refused as a
/// wrong fd count; both fds closed.
#[test]
fn handshake_extra_fd_on_the_continuation() {
    let test = "handshake_extra_fd_on_the_continuation";
    case(test, Some(Features::empty()), || {
        let uffd = Uffd::builder().non_blocking(true).create().unwrap();
        let extra = memfd(page());
        let (vmm, handler) = UnixStream::pair().unwrap();
        let payload =
            serde_json::to_vec(&[GuestRegionUffdMapping::new(0x10000, 0x1000, 0, 4096)]).unwrap();
        let (a, b) = payload.split_at(payload.len() / 2);
        send_raw(&vmm, a, &[uffd.as_fd()]);
        send_raw(&vmm, b, &[extra.as_fd()]);
        drop((uffd, extra));
        let r = Handshake::recv_timeout(&handler, Duration::from_secs(5));
        let what = expect_protocol(r, &["expected 1 fd (the userfaultfd), received 2 fds"]);
        eprintln!("[fault] {test}: {what}");
        drop((vmm, handler));
    });
}

/// Every kind of fd but a userfaultfd in the userfaultfd's place, for the
/// main and the secret-hiding layout: refused naming what it is.
#[test]
fn handshake_non_userfaultfd_fds() {
    let test = "handshake_non_userfaultfd_fds";
    case(test, Some(Features::empty()), || {
        let p = page();
        let main = serde_json::to_vec(&[GuestRegionUffdMapping::new(0x10000, p, 0, p)]).unwrap();
        let mut sh = GuestRegionUffdMapping::new(0x10000, p, 0, p);
        sh.gpa_start = Some(0);
        sh.is_guest_memfd = Some(true);
        let sh = serde_json::to_vec(&[sh]).unwrap();

        let null = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: eventfd(2) returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(efd >= 0);
        // SAFETY: just created; nobody else owns it.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let mut pfd = [0; 2];
        // SAFETY: `pfd` has room for two descriptors.
        assert_eq!(unsafe { libc::pipe2(pfd.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both just created by pipe2.
        let (pr, pw) = unsafe { (OwnedFd::from_raw_fd(pfd[0]), OwnedFd::from_raw_fd(pfd[1])) };
        let (s1, _s2) = UnixStream::pair().unwrap();
        let dir = std::fs::File::open("/").unwrap();
        let uffd = Uffd::builder().non_blocking(true).create().unwrap();
        let gm = memfd(p);
        let bm = memfd(p);

        let (main, sh) = (main.as_slice(), sh.as_slice());
        let cases: Vec<(&str, &[u8], Vec<BorrowedFd<'_>>, &str)> = vec![
            ("/dev/null", main, vec![null.as_fd()], "/dev/null"),
            (
                "an eventfd",
                main,
                vec![efd.as_fd()],
                "anon_inode:[eventfd]",
            ),
            ("a pipe", main, vec![pr.as_fd()], "pipe:["),
            ("a socket", main, vec![s1.as_fd()], "socket:["),
            ("a directory", main, vec![dir.as_fd()], "(it is /)"),
            (
                "secret hiding, fds in the wrong order",
                sh,
                vec![gm.as_fd(), uffd.as_fd(), bm.as_fd()],
                "memfd:fault-injection",
            ),
            (
                "secret hiding, /dev/null first",
                sh,
                vec![null.as_fd(), gm.as_fd(), bm.as_fd()],
                "/dev/null",
            ),
        ];
        for (what, payload, fds, names) in cases {
            let (vmm, handler) = UnixStream::pair().unwrap();
            send_raw(&vmm, payload, &fds);
            let msg = expect_protocol(
                Handshake::recv_timeout(&handler, Duration::from_secs(5)),
                &["the first fd is not a userfaultfd", names],
            );
            eprintln!("[fault] {test}: {what}: {msg}");
        }
        drop((null, efd, pr, pw, dir, uffd, gm, bm));
    });
}

/// Where `/proc` is not mounted (a jail), the handshake cannot read the
/// fd's name: it still refuses every fd that is not an anonymous inode
/// (before the fix it accepted anything there). Run in a forked child with
/// its own mount namespace and `/proc` unmounted; needs `CAP_SYS_ADMIN`
/// (SKIP without it).
#[test]
fn handshake_identity_without_proc() {
    let test = "handshake_identity_without_proc";
    case(test, Some(Features::empty()), || {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut child = Child::fork(theirs, |sock| {
            // SAFETY: unshare/mount/umount2 with constant arguments, in this
            // single-threaded child only.
            let r = unsafe {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    -1
                } else if libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    -2
                } else {
                    libc::umount2(c"/proc".as_ptr(), libc::MNT_DETACH)
                }
            };
            if r != 0 || std::fs::read_link("/proc/self/fd/0").is_ok() {
                say(
                    sock,
                    &format!("skip {r}: {}", std::io::Error::last_os_error()),
                );
                return 0;
            }
            let p = page();
            let main =
                serde_json::to_vec(&[GuestRegionUffdMapping::new(0x10000, p, 0, p)]).unwrap();
            let null = std::fs::File::open("/dev/null").unwrap();
            let mfd = memfd(p);
            let (s1, _s2) = UnixStream::pair().unwrap();
            let Ok(uffd) = Uffd::builder().non_blocking(true).create() else {
                say(sock, "fail uffd");
                return 1;
            };
            let cases: [(&str, BorrowedFd<'_>); 4] = [
                ("memfd", mfd.as_fd()),
                ("devnull", null.as_fd()),
                ("socket", s1.as_fd()),
                ("uffd", uffd.as_fd()),
            ];
            for (what, fd) in cases {
                let (vmm, handler) = UnixStream::pair().unwrap();
                send_raw(&vmm, &main, &[fd]);
                match Handshake::recv_timeout(&handler, Duration::from_secs(5)) {
                    Ok(_) => say(sock, &format!("{what} accepted")),
                    Err(e) => say(sock, &format!("{what} refused: {e}")),
                }
            }
            say(sock, "done");
            0
        });
        let mut lines = Lines::new(&ours);
        let first = lines.next();
        if first.starts_with("skip") {
            eprintln!("SKIP {test}: cannot unmount /proc in a mount namespace ({first})");
        } else {
            let mut got = vec![first];
            while got
                .last()
                .is_some_and(|l| l != "done" && !l.starts_with('<'))
            {
                got.push(lines.next());
            }
            eprintln!("[fault] {test}: {got:?}");
            for what in ["memfd", "devnull", "socket"] {
                assert!(
                    got.iter().any(|l| l.starts_with(&format!("{what} refused"))
                        && l.contains("the first fd is not a userfaultfd (its filesystem type")),
                    "{what}: {got:?}"
                );
            }
            assert!(got.iter().any(|l| l == "uffd accepted"), "{got:?}");
        }
        let st = child.wait(Duration::from_secs(10));
        assert!(exited_ok(st), "{st:?}");
        drop((ours, lines));
    });
}

/// A real userfaultfd on which nobody did `UFFDIO_API`: it is a
/// userfaultfd, so the handshake takes it, and the server reports that it
/// cannot read from it (`EINVAL`) until it is shut down.
#[test]
fn uninitialised_userfaultfd_is_reported() {
    let test = "uninitialised_userfaultfd_is_reported";
    // Not through `case`: the SKIP below (no userfaultfd(2)) ends the test
    // before the fd and thread check.
    let _g = serial();
    if uffd_or_skip(test, Features::empty()).is_none() {
        return;
    }
    let base = Baseline::take();
    {
        // SAFETY: userfaultfd(2) with flags only; returns a new fd or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            skip(
                test,
                &format!("userfaultfd(2): {}", std::io::Error::last_os_error()),
            );
            return;
        }
        // SAFETY: a new descriptor that nothing else owns.
        let raw = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mem = Mem::anon(16 * page());
        let (vmm, handler) = UnixStream::pair().unwrap();
        firecracker::send(
            &vmm,
            &[GuestRegionUffdMapping::new(mem.addr, mem.len, 0, page())],
            &[raw.as_fd()],
        )
        .unwrap();
        drop(raw);
        let hs = Handshake::recv_timeout(&handler, Duration::from_secs(5))
            .expect("an uninitialised userfaultfd is still a userfaultfd");
        let server = Server::builder(hs.uffd)
            .region(Region::new(mem.addr, mem.len))
            .source_arc(pattern())
            .workers(2)
            .spawn()
            .expect("spawn");
        let reported = wait_until(Duration::from_secs(5), || {
            server
                .stats()
                .errors
                .iter()
                .any(|e| e.error.errno() == Some(Errno(libc::EINVAL)))
        });
        let t0 = Instant::now();
        let s = server.shutdown().expect("shutdown");
        eprintln!(
            "[fault] {test}: shut down in {:?}: {}",
            t0.elapsed(),
            summary(&s)
        );
        assert!(reported, "no EINVAL reported: {}", summary(&s));
        assert!(t0.elapsed() < Duration::from_secs(2));
        drop((mem, vmm, handler));
    }
    base.assert_back(test);
}

// ---------------------------------------------------------------------------
// Forged records
// ---------------------------------------------------------------------------

fn record(event: u8, args: [u64; 3]) -> [u8; MSG_SIZE] {
    let mut b = [0u8; MSG_SIZE];
    b[0] = event;
    for (i, a) in args.iter().enumerate() {
        b[8 + 8 * i..16 + 8 * i].copy_from_slice(&a.to_ne_bytes());
    }
    b
}

fn fork_record(ufd: u32) -> [u8; MSG_SIZE] {
    record(sys::UFFD_EVENT_FORK, [u64::from(ufd), 0, 0])
}

fn forge(tx: &OwnedFd, recs: &[[u8; MSG_SIZE]]) {
    let bytes: Vec<u8> = recs.concat();
    // SAFETY: `bytes` is readable for its length (well under a pipe buffer).
    let n = unsafe { libc::write(tx.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    assert_eq!(n, bytes.len() as isize);
}

fn fd_is_open(fd: i32) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Fork records read from an fd that is not a userfaultfd name descriptors
/// of this process (or none at all): they are reported as
/// `Event::Unknown`, and the descriptor named is not taken over (before the
/// fix, dropping the event closed it, and `u32::MAX` panicked).
#[test]
fn forged_fork_records_take_no_descriptor() {
    let test = "forged_fork_records_take_no_descriptor";
    case(test, None, || {
        let victim = std::fs::File::open("/dev/null").unwrap();
        let v = victim.as_raw_fd();
        let (uffd, tx) = fake_uffd();
        for ufd in [v as u32, u32::MAX, i32::MAX as u32 + 1, 0] {
            forge(&tx, &[fork_record(ufd)]);
            match uffd.read_event() {
                Ok(Some(Event::Unknown { event, raw })) => {
                    assert_eq!(event, sys::UFFD_EVENT_FORK);
                    assert_eq!(raw, fork_record(ufd));
                }
                other => panic!("fork record naming {ufd:#x}: {other:?}"),
            }
            assert!(
                fd_is_open(v),
                "the victim fd was closed by a forged fork record"
            );
        }
        drop((uffd, tx, victim));
    });
}

/// A server reading forged records: fork records naming its own fds,
/// address-space events that overflow or cut regions off page boundaries,
/// faults inside and outside its regions, contradictory and unknown
/// records. No panic, no fd closed, the impossible events reported and
/// ignored, a clean shutdown.
#[test]
fn server_fed_forged_records() {
    let test = "server_fed_forged_records";
    case(test, None, || {
        let p = page();
        let mem = Mem::anon(64 * p);
        let victim = std::fs::File::open("/dev/null").unwrap();
        let v = victim.as_raw_fd();
        let (uffd, tx) = fake_uffd();
        let server = Server::builder(uffd)
            .region(Region::new(mem.addr, mem.len))
            .source_arc(pattern())
            .workers(2)
            .fault_around(16 * KIB)
            .eagain_timeout(Duration::from_millis(200))
            .spawn()
            .expect("spawn");
        let a = mem.addr;
        let pf = |flags: u64, addr: u64| record(sys::UFFD_EVENT_PAGEFAULT, [flags, addr, 0]);
        let recs = [
            fork_record(v as u32),
            fork_record(server.uffd().as_fd().as_raw_fd() as u32),
            fork_record(u32::MAX),
            // REMAP overflowing, misaligned, or moving onto the top.
            record(sys::UFFD_EVENT_REMAP, [a, u64::MAX - 10, 8 * p]),
            record(sys::UFFD_EVENT_REMAP, [a, a + 1000 * p, u64::MAX]),
            record(sys::UFFD_EVENT_REMAP, [a + 1, a + 1000 * p, p]),
            record(sys::UFFD_EVENT_REMAP, [a, a + 1000 * p, p / 2]),
            // UNMAP backwards, misaligned.
            record(sys::UFFD_EVENT_UNMAP, [a + 8 * p, a, 0]),
            record(sys::UFFD_EVENT_UNMAP, [a + 3, a + 5 * p + 7, 0]),
            // REMOVE backwards, past everything, of everything.
            record(sys::UFFD_EVENT_REMOVE, [a + 8 * p, a, 0]),
            record(sys::UFFD_EVENT_REMOVE, [u64::MAX - p, u64::MAX, 0]),
            // Faults inside (the "ioctls" fail: it is a pipe), outside, at
            // the top of the address space, with contradictory flags.
            pf(0, a + 3 * p + 17),
            pf(1, a + 40 * p),
            pf(0, u64::MAX),
            pf(0, 0),
            pf(2 | 4 | 8, a),
            record(0xff, [1, 2, 3]),
            record(0, [0, 0, 0]),
        ];
        forge(&tx, &recs);
        let settled = wait_until(Duration::from_secs(5), || {
            let s = server.stats();
            s.faults >= 4
                && s.other_events >= 14
                && s.errors.iter().any(|e| e.op == "deferred fault")
        });
        let s = server.stats();
        assert!(fd_is_open(v), "a forged fork record closed an fd");
        assert!(
            fd_is_open(server.uffd().as_fd().as_raw_fd()),
            "a forged fork record closed the server's own fd"
        );
        assert!(settled, "{}", summary(&s));
        let impossible = s
            .errors
            .iter()
            .filter(|e| e.op == "event" && e.to_string().contains("not a range the kernel"))
            .count();
        assert_eq!(impossible, 6, "{}", summary(&s));
        assert!(
            s.errors
                .iter()
                .any(|e| e.error.errno() == Some(Errno(libc::ENOTTY))),
            "{}",
            summary(&s)
        );
        let t0 = Instant::now();
        let s = server
            .shutdown()
            .expect("a worker panicked on forged records");
        eprintln!(
            "[fault] {test}: shut down in {:?}: {}",
            t0.elapsed(),
            summary(&s)
        );
        drop((tx, victim, mem));
    });
}

// ---------------------------------------------------------------------------
// The faulting process dies with faults pending
// ---------------------------------------------------------------------------

/// A forked child registers its memory with a userfaultfd it hands to this
/// process's server and faults on eight pages from eight threads; the page
/// source holds every read, so the faults stay pending (one held in a fill,
/// the rest in the worker's batch or the kernel's queue). The child is `SIGKILL`ed; the held fills then
/// meet `ESRCH`, and the server stops by itself (no socket to watch) and
/// shuts down cleanly.
#[test]
fn vmm_dies_with_faults_pending() {
    let test = "vmm_dies_with_faults_pending";
    case(test, Some(Features::empty()), || {
        let p = page();
        let len = 256 * p;
        let mem = Mem::anon(len);
        let (mut child, ours, hs) = fork_vmm(&mem, Features::empty(), |sock, addr| {
            for i in 0..8u64 {
                std::thread::spawn(move || {
                    // SAFETY: the child's copy of the mapping, never unmapped.
                    unsafe { peek(addr + i * 32 * page()) }
                });
            }
            say(sock, "faulting");
            loop {
                // SAFETY: pause(2) waits for the signal that kills us.
                unsafe { libc::pause() };
            }
        });
        let (server, gate) = gated_server(hs, &mem, None);
        let mut lines = Lines::new(&ours);
        assert_eq!(lines.next(), "faulting");
        // A worker holds a fill; the other faults wait in its batch or in
        // the kernel's queue.
        let held = gate.held(Duration::from_secs(10));
        assert!(
            held,
            "the workers never read a fault: {}",
            summary(&server.stats())
        );
        std::thread::sleep(Duration::from_millis(50));
        let pending = server.stats();
        child.kill();
        let st = child
            .wait(Duration::from_secs(10))
            .expect("the child did not die");
        assert!(
            libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL,
            "{st:#x}"
        );
        gate.open();
        let t0 = Instant::now();
        let stopped = server.wait_timeout(Duration::from_secs(5));
        let noticed = t0.elapsed();
        let s = server.stats();
        assert!(stopped, "the server did not stop: {}", summary(&s));
        assert!(
            s.stopped_because
                .as_deref()
                .is_some_and(|w| w.contains("ESRCH")),
            "{}",
            summary(&s)
        );
        let t1 = Instant::now();
        let s = server.shutdown().expect("shutdown");
        eprintln!(
            "[fault] {test}: faults read before the kill {}, stopped {noticed:?} after the \
             gate opened, shut down in {:?}: {}",
            pending.faults,
            t1.elapsed(),
            summary(&s)
        );
        assert!(t1.elapsed() < Duration::from_secs(2));
        assert_eq!(s.pages_copied, 0, "{}", summary(&s));
        drop((ours, lines, mem));
    });
}

// ---------------------------------------------------------------------------
// REMOVE between a fault and its fill
// ---------------------------------------------------------------------------

/// A forked child faults on a page; the page source holds the fill; the
/// child drops the page (`MADV_DONTNEED`: a `REMOVE` event, read by the
/// other worker) while the fault is pending; once the server has taken the
/// REMOVE in, the fill is released. The held fill must not copy the
/// snapshot's page over the dropped one: the faulting read sees zeroes (a
/// fresh page: unregistered, or zero-filled), the page still reads as
/// zeroes afterwards, and again after a second drop.
fn remove_between_fault_and_fill(test: &str, policy: RemovePolicy) {
    case(test, Some(Features::EVENT_REMOVE), || {
        let p = page();
        let len = 64 * p;
        let target = 5u64;
        let mem = Mem::anon(len);
        let (mut child, ours, hs) = fork_vmm(&mem, Features::EVENT_REMOVE, |sock, base| {
            let addr = base + target * page();
            let done = Arc::new(AtomicBool::new(false));
            let d2 = done.clone();
            let toucher = std::thread::spawn(move || {
                // SAFETY: the child's copy of the mapping, never unmapped.
                let v = unsafe { peek(addr) };
                d2.store(true, Ordering::SeqCst);
                v
            });
            if !hear(sock, "go") {
                return 2;
            }
            let dontneed = || {
                // SAFETY: MADV_DONTNEED on one page of the child's own
                // mapping, which no reference points into.
                unsafe {
                    libc::madvise(
                        addr as *mut libc::c_void,
                        page() as usize,
                        libc::MADV_DONTNEED,
                    )
                }
            };
            if dontneed() != 0 {
                say(sock, "fail madvise");
                return 3;
            }
            say(sock, &format!("removed {}", done.load(Ordering::SeqCst)));
            let v = toucher.join().unwrap_or(u64::MAX);
            let mut want = [0u8; 8];
            fill_pattern(target * page(), &mut want);
            let what = if v == 0 {
                "zero"
            } else if v == u64::from_le_bytes(want) {
                "pattern"
            } else {
                "garbage"
            };
            say(sock, &format!("read {what}"));
            // Read again, after the drop and the faulting read both ended.
            // SAFETY: as above.
            let now = unsafe { peek(addr) };
            say(
                sock,
                &format!("then {}", if now == 0 { "zero" } else { "stale" }),
            );
            if dontneed() != 0 {
                return 4;
            }
            // SAFETY: as above.
            let again = unsafe { peek(addr) };
            say(
                sock,
                &format!("after {}", if again == 0 { "zero" } else { "stale" }),
            );
            // Stay until the server has handled every event: a REMOVE
            // applied after the exit would meet a vanished address space.
            if !hear(sock, "exit") {
                return 5;
            }
            0
        });
        let (server, gate) = gated_server(hs, &mem, Some(policy));
        let held = gate.held(Duration::from_secs(10));
        assert!(
            held,
            "the fault never reached the source: {}",
            summary(&server.stats())
        );
        let mut lines = Lines::new(&ours);
        writeln!(&ours, "go").unwrap();
        let removed = lines.next();
        // The REMOVE was read (MADV_DONTNEED returned); let the server take
        // it in before the held fill goes on.
        let taken = wait_until(Duration::from_secs(5), || server.stats().other_events >= 1);
        std::thread::sleep(Duration::from_millis(20));
        gate.open();
        let read = lines.next();
        let then = lines.next();
        let after = lines.next();
        let mut last = None;
        let settled = wait_until(Duration::from_secs(5), || {
            let s = server.stats();
            let key = (s.faults, s.other_events, s.pages_copied, s.pages_zeroed);
            let same = last == Some(key);
            last = Some(key);
            std::thread::sleep(Duration::from_millis(20));
            same
        });
        writeln!(&ours, "exit").unwrap();
        let st = child.wait(Duration::from_secs(10));
        let s = server.shutdown().expect("shutdown");
        eprintln!(
            "[fault] {test}: {removed}; {read}; {then}; {after}; child {st:?}: {}",
            summary(&s)
        );
        assert!(settled, "{}", summary(&s));
        // With `ZeroOnNextFault` nothing but the fill can end the faulting
        // read; unregistering (the other policy) may already have woken it.
        if policy == RemovePolicy::ZeroOnNextFault {
            assert_eq!(removed, "removed false", "the fault ended before its fill");
        } else {
            assert!(removed.starts_with("removed "), "{removed}");
        }
        assert!(
            taken,
            "the REMOVE never reached the server: {}",
            summary(&s)
        );
        // The fill held across the REMOVE is abandoned (before the fix it
        // copied the snapshot page after MADV_DONTNEED had returned: "read
        // pattern", "then stale"); the fault is answered as the policy says.
        assert_eq!(read, "read zero", "{}", summary(&s));
        assert_eq!(
            then,
            "then zero",
            "a dropped page came back: {}",
            summary(&s)
        );
        assert_eq!(
            after,
            "after zero",
            "a dropped page came back: {}",
            summary(&s)
        );
        assert!(exited_ok(st), "{st:?}");
        assert!(s.errors.is_empty(), "{}", summary(&s));
        assert!(s.other_events >= 1, "{}", summary(&s));
        drop((ours, lines, mem));
    });
}

/// Unregistering wakes the faulter, which gets a fresh zero page from the
/// kernel; the held fill is abandoned.
#[test]
fn remove_between_fault_and_fill_unregister() {
    let test = "remove_between_fault_and_fill_unregister";
    remove_between_fault_and_fill(test, RemovePolicy::Unregister);
}

/// The held fill is abandoned and its faulter woken; the fault comes back
/// and is answered with zeroes once the REMOVE is applied.
#[test]
fn remove_between_fault_and_fill_zero_on_next_fault() {
    let test = "remove_between_fault_and_fill_zero_on_next_fault";
    remove_between_fault_and_fill(test, RemovePolicy::ZeroOnNextFault);
}

// ---------------------------------------------------------------------------
// The page source fails
// ---------------------------------------------------------------------------

/// In-process: `pages` pages registered (MISSING for copy, MINOR over a
/// fallocated memfd with an alias for continue), a source that fails for
/// one page; a thread reads every page. The failure is reported naming the
/// offset, every other page is served, the faulting read of the bad page
/// stays blocked until the shutdown closes the userfaultfd (the kernel then
/// resolves it itself), and nothing is left behind.
fn source_failure(test: &str, continue_mode: bool, how: Failure) {
    let features = if continue_mode {
        Features::MINOR_SHMEM
    } else {
        Features::empty()
    };
    case(test, Some(features), || {
        let p = page();
        let pages = 64u64;
        let len = pages * p;
        let bad = 21u64;
        let src_off = 16 * p;
        let uffd = Uffd::builder()
            .non_blocking(true)
            .require_features(features)
            .create()
            .unwrap();
        let mut keep = Vec::new();
        let (vmm_addr, region) = if continue_mode {
            let fd = memfd(len);
            fallocate(&fd, len);
            let vmm = Mem::shared(&fd, len);
            let alias = Mem::shared(&fd, len);
            register(&uffd, &vmm, RegisterMode::MINOR);
            // SAFETY: `alias` is a writable shared mapping of the same memfd,
            // never registered, unmapped only after the server shut down.
            let region = unsafe {
                Region::new(vmm.addr, len)
                    .source_offset(src_off)
                    .continue_via_alias(alias.addr)
            };
            let a = vmm.addr;
            keep.push(vmm);
            keep.push(alias);
            (a, region)
        } else {
            let vmm = Mem::anon(len);
            register(&uffd, &vmm, RegisterMode::MISSING);
            let a = vmm.addr;
            keep.push(vmm);
            (a, Region::new(a, len).source_offset(src_off).resolve_copy())
        };
        let bad_off = src_off + bad * p;
        let server = Server::builder(uffd)
            .region(region)
            .source(FailingSource {
                data: pattern(),
                bad: bad_off..bad_off + p,
                how,
            })
            .fault_around(16 * KIB)
            .workers(2)
            .spawn()
            .expect("spawn");
        let (tx, rx) = mpsc::channel();
        let reader = spawn("reader", move || {
            let mut want = [0u8; 8];
            for i in (0..pages).filter(|&i| i != bad) {
                fill_pattern(src_off + i * p, &mut want);
                // SAFETY: the mapping outlives this thread (joined below).
                let v = unsafe { peek(vmm_addr + i * p) };
                if v != u64::from_le_bytes(want) {
                    let _ = tx.send(Err(format!("page {i}: {v:#x}")));
                    return;
                }
            }
            let _ = tx.send(Ok("good pages"));
            // SAFETY: as above; blocks until the userfaultfd is closed.
            let v = unsafe { peek(vmm_addr + bad * p) };
            let _ = tx.send(Ok(if v == 0 {
                "bad page: zero"
            } else {
                "bad page: data"
            }));
        });
        let first = rx.recv_timeout(Duration::from_secs(20));
        assert_eq!(first, Ok(Ok("good pages")), "{}", summary(&server.stats()));
        let needle = format!("page source read at {bad_off:#x}");
        let reported = wait_until(Duration::from_secs(5), || {
            server
                .stats()
                .errors
                .iter()
                .any(|e| e.op == "page source read" && e.source_offset == Some(bad_off))
        });
        // The bad page's read is still blocked.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        let t0 = Instant::now();
        let s = server.shutdown().expect("shutdown");
        let after = rx.recv_timeout(Duration::from_secs(5));
        eprintln!(
            "[fault] {test}: shut down in {:?}, then {after:?}: {}",
            t0.elapsed(),
            summary(&s)
        );
        assert!(reported, "{needle} not reported: {}", summary(&s));
        let kind = match how {
            Failure::Io => "Input/output error",
            Failure::Short => "injected short read",
        };
        // Fault-around runs that cover the bad page fail too, each named
        // by its own start.
        assert!(
            s.errors
                .iter()
                .all(|e| e.op == "page source read" && e.to_string().contains(kind)),
            "{}",
            summary(&s)
        );
        assert!(after.is_ok(), "the bad page's read never ended");
        reader.join().unwrap();
        let served = if continue_mode {
            s.pages_continued
        } else {
            s.pages_copied
        };
        assert_eq!(served, pages - 1, "{}", summary(&s));
        drop(keep);
    });
}

#[test]
fn source_io_error_copy() {
    source_failure("source_io_error_copy", false, Failure::Io);
}

#[test]
fn source_short_read_copy() {
    source_failure("source_short_read_copy", false, Failure::Short);
}

#[test]
fn source_io_error_continue() {
    source_failure("source_io_error_continue", true, Failure::Io);
}

#[test]
fn source_short_read_continue() {
    source_failure("source_short_read_continue", true, Failure::Short);
}

/// The snapshot file is truncated under its `MappedFile` while faults are
/// served: the zero-copy `UFFDIO_COPY` from the vanished part fails in the
/// kernel (`EFAULT`), reported; no signal reaches this process.
#[test]
fn snapshot_truncated_under_the_server() {
    let test = "snapshot_truncated_under_the_server";
    case(test, Some(Features::empty()), || {
        let p = page();
        let pages = 64u64;
        let len = pages * p;
        let path = std::env::temp_dir().join(format!("uffd-fault-snap-{}", std::process::id()));
        std::fs::write(&path, &pattern()[..len as usize]).unwrap();
        let source = MappedFile::open(&path).unwrap();
        let uffd = Uffd::builder().non_blocking(true).create().unwrap();
        let vmm = Mem::anon(len);
        register(&uffd, &vmm, RegisterMode::MISSING);
        let server = Server::builder(uffd)
            .region(Region::new(vmm.addr, len))
            .source(source)
            .workers(2)
            .spawn()
            .expect("spawn");
        // The first half is served, then the file loses its second half.
        let a = vmm.addr;
        for i in 0..pages / 2 {
            // SAFETY: `vmm` outlives the server and this read.
            let _ = unsafe { peek(a + i * p) };
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        let (tx, rx) = mpsc::channel();
        let reader = spawn("reader", move || {
            // SAFETY: as above; blocks until the userfaultfd is closed.
            let v = unsafe { peek(a + (pages - 1) * p) };
            let _ = tx.send(v);
        });
        let reported = wait_until(Duration::from_secs(5), || {
            server
                .stats()
                .errors
                .iter()
                .any(|e| e.error.errno() == Some(Errno(libc::EFAULT)))
        });
        let s = server.shutdown().expect("shutdown");
        let after = rx.recv_timeout(Duration::from_secs(5));
        eprintln!("[fault] {test}: then {after:?}: {}", summary(&s));
        assert!(reported, "{}", summary(&s));
        assert!(after.is_ok(), "the read of a vanished page never ended");
        reader.join().unwrap();
        drop(vmm);
    });
}
