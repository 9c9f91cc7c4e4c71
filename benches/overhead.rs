//! Wrapper overhead: each typed call of kvm-gmem / uffd-gmem against the same
//! operation written directly on libc, and against kvm-ioctls 0.25 and
//! userfaultfd-rs 0.9 where they have it.
//!
//! Every case times a batch of distinct operations (each candidate on its
//! own object, so none disturbs another's state) and restores the state
//! outside the timed part; the candidates' samples are interleaved and the
//! median is reported in ns per operation.
//!
//! The userfaultfd-rs rows need feature `bench-userfaultfd-rs` (libclang at
//! build time); without it they are reported as skipped, as is every row
//! this host cannot run (no guest_memfd, no userfaultfd).

#[path = "harness/mod.rs"]
mod harness;

use harness::{Bench, Map, Target, Unit, raw};
use kvm_gmem::{GuestMemfd, GuestMemfdFlags};
use kvm_gmem_sys as sys;
use std::os::fd::AsRawFd;
use std::time::Instant;
use uffd_gmem::{Features, Mode, RegisterMode, Uffd};

const PAGE: usize = 4096;

fn target_raw() -> Target {
    Target::min(1.0 / 1.03, "ours <= 1.03x raw libc")
}

fn target_crate(name: &str) -> Target {
    Target::min(1.0, format!("ours <= {name}"))
}

/// A userfaultfd case's baselines: their names and goals.
fn uffd_baselines(rs_name: &str) -> [(String, Target); 2] {
    [
        ("raw libc ioctl".into(), target_raw()),
        (rs_name.into(), target_crate("userfaultfd-rs")),
    ]
}

const CONTINUE_CASE: &str = "UFFDIO_CONTINUE one 4 KiB shmem page (MINOR)";
const CONTINUE_OURS: &str = "Uffd::continue";
const CONTINUE_RS: &str = "userfaultfd-rs Uffd::continue (feature linux5_13)";
const COPY_CASE: &str = "UFFDIO_COPY one 4 KiB anonymous page (MISSING)";
const COPY_OURS: &str = "Uffd::copy";
const COPY_RS: &str = "userfaultfd-rs Uffd::copy";

#[cfg(feature = "bench-userfaultfd-rs")]
fn rs_uffd(features: u64) -> userfaultfd::Uffd {
    userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(userfaultfd::FeatureFlags::from_bits_retain(features))
        .create()
        .expect("userfaultfd-rs: UffdBuilder::create")
}

fn ours_uffd(features: Features) -> Uffd {
    Uffd::builder()
        .non_blocking(true)
        .require_features(features)
        .create()
        .expect("uffd-gmem: Uffd::builder().create()")
}

fn main() {
    let mut bench = Bench::new("overhead");
    #[cfg(feature = "bench-userfaultfd-rs")]
    bench.note(
        "userfaultfd-rs 0.9 has UFFDIO_CONTINUE and MINOR registration behind its linux5_13 \
         feature (enabled here); its FeatureFlags do not name MINOR_SHMEM, which is passed with \
         from_bits_retain",
    );
    bench.note(
        "samples are many short interleaved batches (1024 ops; 250 for create) so that the \
         median skips batches preempted by other load on this shared 2-CPU machine",
    );
    let samples = harness::size(101, 5);
    let batch = harness::size(1024, 256);
    gmem_cases(&mut bench, samples);
    match harness::userfaultfd() {
        Ok(()) => {
            uffd_continue(&mut bench, samples, batch);
            uffd_copy(&mut bench, samples, batch);
        }
        Err(why) => {
            let b = uffd_baselines(CONTINUE_RS);
            bench.skip_vs(CONTINUE_CASE, CONTINUE_OURS, &b, &why);
            let b = uffd_baselines(COPY_RS);
            bench.skip_vs(COPY_CASE, COPY_OURS, &b, &why);
        }
    }
    bench.finish();
}

// ---------------------------------------------------------------------------
// guest_memfd: create + close, punch a hole
// ---------------------------------------------------------------------------

fn gmem_cases(bench: &mut Bench, samples: usize) {
    const CREATE_OURS: &str = "GuestMemfd::builder().create() + drop";
    const PUNCH_CASE: &str = "punch a 4 KiB hole in a guest_memfd";
    const PUNCH_OURS: &str = "GuestMemfd::punch_hole";
    let create_baselines: [(String, Target); 3] = [
        (
            "raw libc ioctl + fcntl(FD_CLOEXEC) + close".into(),
            target_raw(),
        ),
        ("raw libc ioctl + close".into(), target_raw()),
        (
            "kvm-ioctls VmFd::create_guest_memfd + close".into(),
            target_crate("kvm-ioctls"),
        ),
    ];
    let punch_baselines: [(String, Target); 1] = [(
        "raw libc fallocate(PUNCH_HOLE|KEEP_SIZE)".into(),
        target_raw(),
    )];
    let (vm, supported) = match harness::gmem_vm(GuestMemfdFlags::empty()) {
        Ok(v) => v,
        Err(why) => {
            let create = "create + close a guest_memfd (2 MiB)";
            bench.skip_vs(create, CREATE_OURS, &create_baselines, &why);
            bench.skip_vs(PUNCH_CASE, PUNCH_OURS, &punch_baselines, &why);
            return;
        }
    };
    let vm_fd = &vm;
    let want = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    let flags = if supported.contains(want) {
        want
    } else {
        GuestMemfdFlags::empty()
    };
    // -- create + close ----------------------------------------------------
    let size: u64 = 2 << 20;
    let per = harness::size(250, 100);
    let raw_vm = vm.as_raw_fd();
    let mut ours = || {
        harness::ns_per_op(per, || {
            let g = GuestMemfd::builder(size)
                .flags(flags)
                .create(&vm_fd)
                .expect("GuestMemfd::create");
            drop(g);
        })
    };
    let mut raw = || {
        harness::ns_per_op(per, || {
            let mut args = sys::kvm_create_guest_memfd {
                size,
                flags: flags.bits(),
                ..Default::default()
            };
            // SAFETY: KVM_CREATE_GUEST_MEMFD takes a kvm_create_guest_memfd.
            let fd = unsafe { libc::ioctl(raw_vm, sys::KVM_CREATE_GUEST_MEMFD as _, &mut args) };
            assert!(
                fd >= 0,
                "KVM_CREATE_GUEST_MEMFD: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: the fd the ioctl just returned, owned by nobody else.
            unsafe { libc::close(fd) };
        })
    };
    let mut kvmi = || {
        harness::ns_per_op(per, || {
            let args = kvm_bindings::kvm_create_guest_memfd {
                size,
                flags: flags.bits(),
                ..Default::default()
            };
            let fd = vm
                .create_guest_memfd(args)
                .expect("kvm-ioctls: create_guest_memfd");
            // SAFETY: the fd kvm-ioctls just returned, owned by nobody else.
            unsafe { libc::close(fd) };
        })
    };
    let mut raw_cloexec = || {
        harness::ns_per_op(per, || {
            let mut args = sys::kvm_create_guest_memfd {
                size,
                flags: flags.bits(),
                ..Default::default()
            };
            // SAFETY: KVM_CREATE_GUEST_MEMFD takes a kvm_create_guest_memfd.
            let fd = unsafe { libc::ioctl(raw_vm, sys::KVM_CREATE_GUEST_MEMFD as _, &mut args) };
            assert!(
                fd >= 0,
                "KVM_CREATE_GUEST_MEMFD: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: the fd the ioctl just returned; F_SETFD takes an integer.
            let r = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            assert!(r == 0, "fcntl(F_SETFD)");
            // SAFETY: the fd the ioctl just returned, owned by nobody else.
            unsafe { libc::close(fd) };
        })
    };
    let r = harness::interleaved(
        samples,
        &mut [&mut ours, &mut raw_cloexec, &mut raw, &mut kvmi],
    );
    let case = format!("create + close a guest_memfd (2 MiB, {flags})");
    let note = format!(
        "median of {samples} interleaved samples of {per} create+close; ours issues the ioctl \
         and fcntl(F_SETFD, FD_CLOEXEC) (the kernel returns the fd without close-on-exec; \
         kvm-ioctls and the plain raw call leave it inheritable across exec), and asks the \
         capabilities only when the kernel refuses"
    );
    bench.rows_vs(
        &case,
        CREATE_OURS,
        Unit::NsPerOp,
        &create_baselines,
        &r,
        &note,
    );

    // -- punch a 4 KiB hole -------------------------------------------------
    let pages = harness::size(1024, 256);
    let len = (pages * PAGE) as u64;
    let gmem = GuestMemfd::builder(len)
        .flags(flags)
        .create(&vm_fd)
        .expect("GuestMemfd::create for the punch-hole case");
    let gfd = gmem.as_raw_fd();
    let refill = |gmem: &GuestMemfd| gmem.allocate(0..len).expect("fallocate(KEEP_SIZE) refill");
    let mut ours = || {
        refill(&gmem);
        let t = Instant::now();
        for i in 0..pages as u64 {
            let off = i * PAGE as u64;
            gmem.punch_hole(off..off + PAGE as u64)
                .expect("GuestMemfd::punch_hole");
        }
        t.elapsed().as_nanos() as f64 / pages as f64
    };
    let mut raw = || {
        refill(&gmem);
        let t = Instant::now();
        for i in 0..pages as i64 {
            // SAFETY: fallocate takes only integers; `gfd` is open.
            let r = unsafe {
                libc::fallocate(
                    gfd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    i * PAGE as i64,
                    PAGE as i64,
                )
            };
            assert_eq!(
                r,
                0,
                "fallocate(PUNCH_HOLE): {}",
                std::io::Error::last_os_error()
            );
        }
        t.elapsed().as_nanos() as f64 / pages as f64
    };
    let r = harness::interleaved(samples, &mut [&mut ours, &mut raw]);
    let note = format!(
        "median of {samples} interleaved samples of {pages} distinct allocated pages of one \
         {flags} guest_memfd (never mapped); refilled with fallocate(KEEP_SIZE) outside the \
         timed part; kvm-ioctls has no fallocate wrapper"
    );
    bench.rows_vs(
        PUNCH_CASE,
        PUNCH_OURS,
        Unit::NsPerOp,
        &punch_baselines,
        &r,
        &note,
    );
    drop(gmem);
}

// ---------------------------------------------------------------------------
// UFFDIO_CONTINUE: one 4 KiB shmem page, MINOR, page cache populated
// ---------------------------------------------------------------------------

fn uffd_continue(bench: &mut Bench, samples: usize, pages: usize) {
    let len = pages * PAGE;
    let fd = raw::memfd(len as u64);
    let shared = libc::MAP_SHARED;
    let alias = Map::new(len, shared, fd.as_raw_fd());
    // Populate the page cache through the unregistered alias.
    for i in 0..pages {
        // SAFETY: inside our own shared mapping, which no Rust reference
        // points into.
        unsafe { std::ptr::write_volatile((alias.addr + i * PAGE) as *mut u64, i as u64 + 1) };
    }
    let minor = sys::UFFD_FEATURE_MINOR_SHMEM;

    let ours_view = Map::new(len, shared, fd.as_raw_fd());
    let ours_uffd = match Uffd::builder()
        .non_blocking(true)
        .require_features(Features::MINOR_SHMEM)
        .create()
    {
        Ok(u) => u,
        Err(e) => {
            let why = format!("no MINOR_SHMEM userfaultfd: {e}");
            let b = uffd_baselines(CONTINUE_RS);
            bench.skip_vs(CONTINUE_CASE, CONTINUE_OURS, &b, &why);
            return;
        }
    };
    // SAFETY: a mapping of this bench that no Rust reference points into; it
    // outlives the registration (the uffd is dropped first).
    unsafe { ours_uffd.register(ours_view.range(), RegisterMode::MINOR) }
        .expect("uffd-gmem: UFFDIO_REGISTER MINOR");

    let raw_view = Map::new(len, shared, fd.as_raw_fd());
    let raw_fd = raw::uffd(minor);
    raw::register(
        &raw_fd,
        raw_view.addr,
        raw_view.len,
        sys::UFFDIO_REGISTER_MODE_MINOR,
    );

    #[cfg(feature = "bench-userfaultfd-rs")]
    let (rs_view, rs) = {
        let view = Map::new(len, shared, fd.as_raw_fd());
        let rs = rs_uffd(minor);
        rs.register_with_mode(
            view.addr as *mut libc::c_void,
            len,
            userfaultfd::RegisterMode::MINOR,
        )
        .expect("userfaultfd-rs: register MINOR");
        (view, rs)
    };

    let mut ours = || {
        ours_view.zap();
        let t = Instant::now();
        for i in 0..pages as u64 {
            let a = ours_view.addr as u64 + i * PAGE as u64;
            ours_uffd
                .r#continue(a..a + PAGE as u64, Mode::empty())
                .expect("Uffd::continue");
        }
        t.elapsed().as_nanos() as f64 / pages as f64
    };
    let raw_ufd = raw_fd.as_raw_fd();
    let mut raw = || {
        raw_view.zap();
        let t = Instant::now();
        for i in 0..pages as u64 {
            let mut arg = sys::uffdio_continue {
                range: sys::uffdio_range {
                    start: raw_view.addr as u64 + i * PAGE as u64,
                    len: PAGE as u64,
                },
                mode: 0,
                mapped: 0,
            };
            // SAFETY: UFFDIO_CONTINUE takes a uffdio_continue; the range is
            // registered MINOR on this fd and its pages are in the page cache.
            let r = unsafe { libc::ioctl(raw_ufd, sys::UFFDIO_CONTINUE as _, &mut arg) };
            assert!(
                r == 0,
                "UFFDIO_CONTINUE: {}",
                std::io::Error::last_os_error()
            );
        }
        t.elapsed().as_nanos() as f64 / pages as f64
    };
    #[cfg(feature = "bench-userfaultfd-rs")]
    let mut rsf = || {
        rs_view.zap();
        let t = Instant::now();
        for i in 0..pages {
            rs.r#continue((rs_view.addr + i * PAGE) as *mut libc::c_void, PAGE, true)
                .expect("userfaultfd-rs: continue");
        }
        t.elapsed().as_nanos() as f64 / pages as f64
    };
    let r = harness::interleaved(
        samples,
        &mut [
            &mut ours,
            &mut raw,
            #[cfg(feature = "bench-userfaultfd-rs")]
            &mut rsf,
        ],
    );
    // Every view now maps the page cache: check one word per page.
    for view in [
        &ours_view,
        &raw_view,
        #[cfg(feature = "bench-userfaultfd-rs")]
        &rs_view,
    ] {
        for i in (0..pages).step_by(97) {
            // SAFETY: mapped by the last CONTINUE; no Rust reference into it.
            let v = unsafe { std::ptr::read_volatile((view.addr + i * PAGE) as *const u64) };
            assert_eq!(v, i as u64 + 1, "UFFDIO_CONTINUE mapped the wrong page");
        }
    }
    let note = format!(
        "median of {samples} interleaved samples of {pages} distinct pages, one ioctl each (wake \
         on); each candidate has its own view of one memfd whose page cache is populated; PTEs \
         zapped with MADV_DONTNEED outside the timed part"
    );
    measured_rows(bench, CONTINUE_CASE, CONTINUE_OURS, CONTINUE_RS, &r, &note);
    // The userfaultfds go before their views.
    drop(ours_uffd);
    drop(raw_fd);
    #[cfg(feature = "bench-userfaultfd-rs")]
    drop(rs);
}

// ---------------------------------------------------------------------------
// UFFDIO_COPY: one 4 KiB anonymous page, MISSING
// ---------------------------------------------------------------------------

fn uffd_copy(bench: &mut Bench, samples: usize, pages: usize) {
    let len = pages * PAGE;
    let src: Vec<u8> = (0..len).map(|i| (i / PAGE) as u8 ^ (i as u8)).collect();
    let src_addr = src.as_ptr() as usize;

    let ours_dst = Map::anon(len);
    let ours_uffd = ours_uffd(Features::empty());
    // SAFETY: a mapping of this bench that no Rust reference points into; it
    // outlives the registration (the uffd is dropped first).
    unsafe { ours_uffd.register(ours_dst.range(), RegisterMode::MISSING) }
        .expect("uffd-gmem: UFFDIO_REGISTER MISSING");

    let raw_dst = Map::anon(len);
    let raw_fd = raw::uffd(0);
    raw::register(
        &raw_fd,
        raw_dst.addr,
        raw_dst.len,
        sys::UFFDIO_REGISTER_MODE_MISSING,
    );

    #[cfg(feature = "bench-userfaultfd-rs")]
    let (rs_dst, rs) = {
        let dst = Map::anon(len);
        let rs = rs_uffd(0);
        rs.register(dst.addr as *mut libc::c_void, len)
            .expect("userfaultfd-rs: register MISSING");
        (dst, rs)
    };

    let mut ours = || {
        ours_dst.zap();
        let t = Instant::now();
        for i in 0..pages {
            let off = i * PAGE;
            // SAFETY: `src` is readable for PAGE bytes at `off`; the
            // destination is registered MISSING on this fd.
            unsafe {
                ours_uffd.copy(
                    (ours_dst.addr + off) as u64,
                    (src_addr + off) as *const u8,
                    PAGE as u64,
                    Mode::empty(),
                )
            }
            .expect("Uffd::copy");
        }
        t.elapsed().as_nanos() as f64 / pages as f64
    };
    let raw_ufd = raw_fd.as_raw_fd();
    let mut raw = || {
        raw_dst.zap();
        let t = Instant::now();
        for i in 0..pages {
            let off = i * PAGE;
            let mut arg = sys::uffdio_copy {
                dst: (raw_dst.addr + off) as u64,
                src: (src_addr + off) as u64,
                len: PAGE as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY takes a uffdio_copy; `src` is readable for
            // PAGE bytes and the destination is registered MISSING.
            let r = unsafe { libc::ioctl(raw_ufd, sys::UFFDIO_COPY as _, &mut arg) };
            assert!(r == 0, "UFFDIO_COPY: {}", std::io::Error::last_os_error());
        }
        t.elapsed().as_nanos() as f64 / pages as f64
    };
    #[cfg(feature = "bench-userfaultfd-rs")]
    let mut rsf = || {
        rs_dst.zap();
        let t = Instant::now();
        for i in 0..pages {
            let off = i * PAGE;
            // SAFETY: as for ours.
            unsafe {
                rs.copy(
                    (src_addr + off) as *const libc::c_void,
                    (rs_dst.addr + off) as *mut libc::c_void,
                    PAGE,
                    true,
                )
            }
            .expect("userfaultfd-rs: copy");
        }
        t.elapsed().as_nanos() as f64 / pages as f64
    };
    let r = harness::interleaved(
        samples,
        &mut [
            &mut ours,
            &mut raw,
            #[cfg(feature = "bench-userfaultfd-rs")]
            &mut rsf,
        ],
    );
    for dst in [
        &ours_dst,
        &raw_dst,
        #[cfg(feature = "bench-userfaultfd-rs")]
        &rs_dst,
    ] {
        for i in (0..pages).step_by(97) {
            // SAFETY: filled by the last COPY; no Rust reference into it.
            let v = unsafe { std::ptr::read_volatile((dst.addr + i * PAGE + 8) as *const u8) };
            assert_eq!(v, src[i * PAGE + 8], "UFFDIO_COPY copied the wrong bytes");
        }
    }
    let note = format!(
        "median of {samples} interleaved samples of {pages} distinct pages, one ioctl each (wake \
         on); each candidate has its own anonymous mapping (THP off); pages freed with \
         MADV_DONTNEED outside the timed part"
    );
    measured_rows(bench, COPY_CASE, COPY_OURS, COPY_RS, &r, &note);
    drop(ours_uffd);
    drop(raw_fd);
    #[cfg(feature = "bench-userfaultfd-rs")]
    drop(rs);
}

/// The rows of a userfaultfd case measured as `[ours, raw, userfaultfd-rs]`
/// (the last only with feature `bench-userfaultfd-rs`; skipped without it).
fn measured_rows(bench: &mut Bench, case: &str, ours: &str, rs: &str, r: &[Vec<f64>], note: &str) {
    let [raw, rs] = uffd_baselines(rs);
    let measured = [
        raw,
        #[cfg(feature = "bench-userfaultfd-rs")]
        rs,
    ];
    bench.rows_vs(case, ours, Unit::NsPerOp, &measured, r, note);
    #[cfg(not(feature = "bench-userfaultfd-rs"))]
    bench.skip_vs(case, ours, &[rs], harness::RS_SKIPPED);
}
