//! A tiny seccomp-BPF filter for the seccomp tests of kvm-gmem and
//! uffd-gmem (included by both with `#[path]`): allow a rule's system calls
//! and ioctl requests plus the runtime baseline below, trap on anything else.
//!
//! A trapped call raises SIGSYS; the handler writes the call's number (and,
//! for `ioctl`, the request) to stderr and ends the process with exit code
//! [`TRAPPED`], so a missing entry is named instead of showing up as a bare
//! kill. The filter applies to the calling thread and the threads it starts.
//!
//! # The runtime baseline
//!
//! What the test's own code, Rust's standard library and glibc need while a
//! feature runs, whatever the feature: none of it is a call the crates make
//! themselves.
//!
//! | call | why | restricted to |
//! | --- | --- | --- |
//! | `write` | diagnostics on stderr, the SIGSYS report | - |
//! | `exit`, `exit_group` | `_exit` at the end of the child, thread exit | - |
//! | `rt_sigreturn` | returning from a signal handler | - |
//! | `futex` | std's locks (stderr, thread join) | - |
//! | `sched_yield` | std's channels backing off under contention (on one CPU) | - |
//! | `brk`, `mremap`, `munmap`, `mprotect` | the allocator (thread arenas grow with `mprotect`) | - |
//! | `mmap` | the allocator | anonymous mappings (fd = -1) |
//! | `madvise` | the allocator returning memory | `MADV_DONTNEED`, `MADV_FREE` |
//! | `fcntl` | std's debug check that a dropped fd is open | `F_GETFD` |
//! | `clock_gettime` | `Instant::now` where the vDSO falls back to the call | - |
//!
//! So a feature's `mmap` of a file, its `madvise(MADV_POPULATE_*)` and its
//! `fcntl(F_SETFD)` must come from its rule; its `munmap` cannot be told
//! apart from the allocator's.

#![allow(dead_code)]

use std::os::raw::c_long;

/// The exit code of a process that made a call its filter does not allow.
pub const TRAPPED: i32 = 97;

const ALLOW: u32 = 0x7fff_0000; // SECCOMP_RET_ALLOW
const TRAP: u32 = 0x0003_0000; // SECCOMP_RET_TRAP
const KILL_PROCESS: u32 = 0x8000_0000; // SECCOMP_RET_KILL_PROCESS

const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

// Offsets in `struct seccomp_data`: nr, arch, instruction_pointer, args[6].
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// The low 32 bits of argument `i` (both targets are little-endian).
const fn off_arg(i: u32) -> u32 {
    16 + 8 * i
}

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64

#[derive(Clone, Debug)]
enum Allow {
    /// Any arguments.
    Any(c_long),
    /// When the low 32 bits of argument `arg` are one of `values`.
    ArgIn(c_long, u32, Vec<u32>),
}

/// A filter under construction.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    allow: Vec<Allow>,
    ioctls: Vec<u32>,
}

impl Filter {
    /// The runtime baseline (see the module docs), nothing else.
    pub fn baseline() -> Filter {
        let mut f = Filter::default();
        for nr in [
            libc::SYS_write,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_rt_sigreturn,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_brk,
            libc::SYS_mremap,
            libc::SYS_munmap,
            libc::SYS_mprotect,
            libc::SYS_clock_gettime,
        ] {
            f.allow.push(Allow::Any(nr));
        }
        // mmap(addr, len, prot, flags, fd = -1, off)
        f.allow
            .push(Allow::ArgIn(libc::SYS_mmap, 4, vec![u32::MAX]));
        f.allow.push(Allow::ArgIn(
            libc::SYS_madvise,
            2,
            vec![libc::MADV_DONTNEED as u32, libc::MADV_FREE as u32],
        ));
        f.allow
            .push(Allow::ArgIn(libc::SYS_fcntl, 1, vec![libc::F_GETFD as u32]));
        f
    }

    /// Allows `nrs` with any arguments.
    pub fn syscalls(&mut self, nrs: impl IntoIterator<Item = c_long>) -> &mut Self {
        // Unrestricted entries go first, so they win over the baseline's
        // restricted ones for the same call.
        for nr in nrs {
            self.allow.insert(0, Allow::Any(nr));
        }
        self
    }

    /// Allows `ioctl` with these requests (compared on the low 32 bits).
    pub fn ioctls(&mut self, requests: impl IntoIterator<Item = u32>) -> &mut Self {
        self.ioctls.extend(requests);
        self
    }

    fn program(&self) -> Vec<libc::sock_filter> {
        let ins = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
        let mut p = vec![
            ins(LD_W_ABS, 0, 0, OFF_ARCH),
            ins(JEQ_K, 1, 0, AUDIT_ARCH),
            ins(RET_K, 0, 0, KILL_PROCESS),
            ins(LD_W_ABS, 0, 0, OFF_NR),
        ];
        let mut allow = self.allow.clone();
        if !self.ioctls.is_empty() {
            allow.push(Allow::ArgIn(libc::SYS_ioctl, 1, self.ioctls.clone()));
        }
        for a in &allow {
            match a {
                Allow::Any(nr) => {
                    p.push(ins(JEQ_K, 0, 1, *nr as u32));
                    p.push(ins(RET_K, 0, 0, ALLOW));
                }
                Allow::ArgIn(nr, arg, values) => {
                    // Skip the block when the number differs: load the
                    // argument, one (jeq, ret allow) pair per value, reload
                    // the number.
                    let block = 2 + 2 * values.len();
                    assert!(block <= 255, "too many values for one jump");
                    p.push(ins(JEQ_K, 0, block as u8, *nr as u32));
                    p.push(ins(LD_W_ABS, 0, 0, off_arg(*arg)));
                    for v in values {
                        p.push(ins(JEQ_K, 0, 1, *v));
                        p.push(ins(RET_K, 0, 0, ALLOW));
                    }
                    p.push(ins(LD_W_ABS, 0, 0, OFF_NR));
                }
            }
        }
        p.push(ins(RET_K, 0, 0, TRAP));
        p
    }

    /// Installs the SIGSYS reporter and the filter on the calling thread
    /// (inherited by the threads it starts). Irreversible: call it in a
    /// child process.
    pub fn install(&self) {
        let prog = self.program();
        assert!(prog.len() <= 4096, "BPF program too long");
        // SAFETY: `report` is an async-signal-safe handler with the
        // SA_SIGINFO signature; the sigaction struct is fully initialised.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = report as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()), 0);
        }
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr().cast_mut(),
        };
        // SAFETY: prctl with integer arguments; then `fprog` points at the
        // live program for the call (the kernel copies it).
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
            assert_eq!(
                libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &fprog as *const libc::sock_fprog
                ),
                0,
                "PR_SET_SECCOMP: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The SIGSYS handler: names the refused call and exits with [`TRAPPED`].
/// Async-signal-safe: formats into a stack buffer, then `write` + `_exit`.
extern "C" fn report(_sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo (SIGSYS layout: si_syscall
    // is the int at byte 24) and ucontext for an SA_SIGINFO handler.
    let (nr, arg1) = unsafe {
        let nr = info.cast::<u8>().add(24).cast::<i32>().read();
        let uc = &*ctx.cast::<libc::ucontext_t>();
        #[cfg(target_arch = "x86_64")]
        let arg1 = uc.uc_mcontext.gregs[libc::REG_RSI as usize] as u64;
        #[cfg(target_arch = "aarch64")]
        let arg1 = uc.uc_mcontext.regs[1];
        (nr, arg1)
    };
    let mut buf = [0u8; 128];
    let mut n = 0;
    let mut put = |s: &[u8]| {
        for &b in s {
            if n < buf.len() {
                buf[n] = b;
                n += 1;
            }
        }
    };
    put(b"\nSECCOMP-TRAP: system call ");
    put(dec(nr as u64).trim_ascii_start());
    put(b" (arg1 ");
    put(&hex(arg1));
    put(b") is not in the filter\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf` is live.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        libc::_exit(TRAPPED);
    }
}

fn dec(mut v: u64) -> [u8; 20] {
    let mut out = [b' '; 20];
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out
}

fn hex(v: u64) -> [u8; 18] {
    let mut out = [b'0'; 18];
    out[1] = b'x';
    for i in 0..16 {
        let d = ((v >> (60 - 4 * i)) & 0xf) as u8;
        out[2 + i] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
    }
    out
}

/// Writes `msg` to stderr without allocating.
pub fn say(msg: &str) {
    // SAFETY: `msg` is readable for its length.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// Ends the child: success.
pub fn ok(scenario: &str) -> ! {
    say("\nSECCOMP-OK ");
    say(scenario);
    say("\n");
    // SAFETY: _exit ends the process without running destructors: nothing
    // outside the filter runs.
    unsafe { libc::_exit(0) }
}

/// Ends the child: failure, with a message (formatting allocates, which the
/// baseline allows).
pub fn fail(scenario: &str, what: impl std::fmt::Display) -> ! {
    say(&format!("\nSECCOMP-FAIL {scenario}: {what}\n"));
    // SAFETY: as in `ok`.
    unsafe { libc::_exit(1) }
}

/// Runs this test binary's `child_test` in a child process with
/// `env = scenario`, and checks it reported `SECCOMP-OK scenario`.
pub fn run_child(child_test: &str, env: &str, scenario: &str) {
    let exe = std::env::current_exe().expect("current_exe");
    let out = std::process::Command::new(exe)
        .args(["--exact", child_test, "--nocapture", "--test-threads=1"])
        .env(env, scenario)
        .output()
        .expect("spawn the child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ok = format!("SECCOMP-OK {scenario}\n");
    assert!(
        out.status.success() && stderr.contains(&ok),
        "{scenario}: the child {} under its filter\n--- stderr\n{stderr}\n--- stdout\n{stdout}",
        match out.status.code() {
            Some(TRAPPED) => "made a call outside its rule".to_string(),
            Some(c) => format!("exited with {c}"),
            None => format!("was killed ({:?})", out.status),
        }
    );
    if let Some(line) = stderr.lines().find(|l| l.starts_with("SKIP")) {
        eprintln!("{line}");
    }
}

/// Checks a crate's rule table: every ioctl request equals the kvm-gmem-sys
/// constant of its name (`by_name`), `ioctl` itself is never listed as a
/// system call, and no system call is listed twice. Returns the number of
/// ioctls checked.
pub fn check_rule_table<F: std::fmt::Debug>(
    rules: &[kvm_gmem_sys::support::seccomp::Rule<F>],
    by_name: impl Fn(&str) -> Option<u32>,
) -> usize {
    let mut seen = 0;
    for r in rules {
        for i in r.ioctls {
            let want = by_name(i.name)
                .unwrap_or_else(|| panic!("{:?}: unknown request name {}", r.feature, i.name));
            assert_eq!(
                i.request, want,
                "{:?}: {} is {:#x}, kvm-gmem-sys says {want:#x}",
                r.feature, i.name, i.request
            );
            seen += 1;
        }
        assert!(
            r.syscalls.iter().all(|s| s.nr != libc::SYS_ioctl),
            "{:?}: ioctl belongs in `ioctls`",
            r.feature
        );
        let mut names: Vec<_> = r.syscalls.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), r.syscalls.len(), "{:?}: duplicates", r.feature);
    }
    seen
}
