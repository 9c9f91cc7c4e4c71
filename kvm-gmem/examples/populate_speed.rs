//! Times populating a 1 GiB guest_memfd from a 1 GiB buffer: the raw
//! baseline (map a fresh guest_memfd and `memcpy` into it, one fault per
//! page) against [`Populate`] with `MmapCopy` on 1 and 2 threads and `Auto`,
//! and `Auto` from a file in the page cache.
//!
//! ```text
//! cargo run --release -p kvm-gmem --example populate_speed [-- SIZE_MIB [RUNS]]
//! ```
//!
//! Every run uses a fresh guest_memfd (population is about allocating and
//! faulting in pages, which a second pass would not do); each variant prints
//! its best and median over the runs, in GB/s (10^9 bytes/s).

use kvm_gmem::populate::{Populate, Source, Strategy};
use kvm_gmem::{GuestMemfd, KvmDevice, Vm, VmType};
use std::time::{Duration, Instant};

fn fresh(vm: &Vm, size: u64) -> Result<GuestMemfd, kvm_gmem::Error> {
    GuestMemfd::builder(size)
        .mmap(true)
        .init_shared(true)
        .create(vm)
}

fn gbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

fn summary(name: &str, size: u64, mut times: Vec<Duration>, note: &str) {
    times.sort();
    let best = times[0];
    let median = times[times.len() / 2];
    println!(
        "{name:<34} best {:>6.2} GB/s ({:>7.1} ms)   median {:>6.2} GB/s   {note}",
        gbps(size, best),
        best.as_secs_f64() * 1e3,
        gbps(size, median),
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let runs: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let size = mib << 20;
    let kvm = KvmDevice::open()?;
    let vm = kvm.create_vm(VmType::DEFAULT)?;

    // A position-dependent pattern, touched once so the source is resident.
    let src: Vec<u8> = (0..size as usize)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[(i >> 12) & 3])
        .collect();
    println!(
        "populating {mib} MiB, {runs} runs each, {} CPUs",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    let mut raw = Vec::new();
    for _ in 0..runs {
        let gmem = fresh(&vm, size)?;
        let map = gmem.map()?;
        let t = Instant::now();
        // SAFETY: the mapping covers `size` bytes of a guest_memfd with MMAP
        // and INIT_SHARED (so every page faults in), nothing else uses it,
        // and `src` holds `size` bytes that do not overlap it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), map.as_ptr(), size as usize) };
        raw.push(t.elapsed());
    }
    summary(
        "raw mmap + memcpy (1 thread)",
        size,
        raw,
        "baseline: one fault per 4 KiB page",
    );

    let variants: [(&str, Strategy, Option<usize>); 3] = [
        ("Populate MmapCopy threads=1", Strategy::MmapCopy, Some(1)),
        ("Populate MmapCopy threads=2", Strategy::MmapCopy, Some(2)),
        ("Populate Auto", Strategy::Auto, None),
    ];
    for (name, strategy, threads) in variants {
        let mut times = Vec::new();
        let mut note = String::new();
        for _ in 0..runs {
            let gmem = fresh(&vm, size)?;
            let mut p = Populate::new(&vm, &gmem).strategy(strategy).gpa_base(0);
            if let Some(n) = threads {
                p = p.threads(n);
            }
            let report = p.run(0..size, Source::bytes(&src))?;
            times.push(report.elapsed);
            note = format!("ran {:?} on {} thread(s)", report.strategy, report.threads);
            // Spot check: first and last page.
            let map = gmem.map()?;
            let mut buf = vec![0u8; 4096];
            for off in [0, size - 4096] {
                map.read_at(off, &mut buf)?;
                assert!(
                    buf[..] == src[off as usize..off as usize + 4096],
                    "{name}: mismatch"
                );
            }
        }
        summary(name, size, times, &note);
    }

    // The same from a file already in the page cache (pread into the mapping).
    let path = std::env::temp_dir().join(format!("populate_speed-{}", std::process::id()));
    std::fs::write(&path, &src)?;
    let file = std::fs::File::open(&path)?;
    let _ = std::fs::remove_file(&path);
    let mut times = Vec::new();
    let mut note = String::new();
    for _ in 0..runs {
        let gmem = fresh(&vm, size)?;
        let report = Populate::detached(&gmem).run(0..size, Source::file(&file, 0))?;
        times.push(report.elapsed);
        note = format!("ran {:?} on {} thread(s)", report.strategy, report.threads);
    }
    summary("Populate Auto, from a cached file", size, times, &note);
    Ok(())
}
