//! Guest memory filled by another process: the VMM need not do the copying.
//!
//! The parent (the "VMM") creates a VM and a guest_memfd, listens on a Unix
//! socket and starts this same program again as the populator. The child
//! connects, receives the guest_memfd (`kvm_gmem::share::recv`, which checks
//! that it really is one), fills it with `Populate::detached` from a file or
//! a generated pattern, reports its checksum and exits. The parent then
//! reads the whole guest_memfd through its own mapping and compares
//! checksums.
//!
//! ```text
//! cargo run -p kvm-gmem --example separate_populator [-- --file SNAPSHOT] [-- --size MIB]
//! ```
//!
//! Without `--file`, the source is a deterministic pattern. Needs `/dev/kvm`
//! and a kernel with guest_memfd `MMAP | INIT_SHARED` (Linux 6.18). Exits
//! non-zero on failure.

use kvm_gmem::populate::{Populate, Source};
use kvm_gmem::{GuestMemfd, KvmDevice, VmType, share};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

/// The flag that makes this program the populator.
const CHILD_FLAG: &str = "--populate-from-socket";

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (who, result) = match args.iter().position(|a| a == CHILD_FLAG) {
        Some(i) => ("populator", child(&args, i)),
        None => ("separate_populator", parent(&args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{who}: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The value after `flag`, if given.
fn opt<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(String::as_str)
}

/// Byte `i` of the generated source.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ (i >> 12) as u8
}

/// FNV-1a over `bytes`, continuing from `h`.
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn parent(args: &[String]) -> Res<()> {
    let size = match opt(args, "--size") {
        Some(mib) => mib.parse::<u64>()? << 20,
        None => 64 << 20,
    };
    let file = opt(args, "--file").map(PathBuf::from);

    let kvm = KvmDevice::open()?;
    let vm = kvm.create_vm(VmType::DEFAULT)?;
    let gmem = GuestMemfd::builder(size)
        .mmap(true)
        .init_shared(true)
        .create(&vm)?;
    println!(
        "VMM (pid {}): guest_memfd of {} MiB, flags {}",
        std::process::id(),
        size >> 20,
        gmem.flags()
    );

    // A private socket directory; the child connects by path, so no
    // descriptor has to be inherited across exec.
    let dir = std::env::temp_dir().join(format!("kvm-gmem-populator-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)?;
    let result = serve_child(&listener, &sock, &gmem, size, file.as_deref());
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_dir(&dir);
    result
}

fn serve_child(
    listener: &UnixListener,
    sock: &Path,
    gmem: &GuestMemfd,
    size: u64,
    file: Option<&Path>,
) -> Res<()> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg(CHILD_FLAG)
        .arg(sock)
        .args(["--size-bytes", &size.to_string()]);
    if let Some(f) = file {
        cmd.arg("--file").arg(f);
    }
    let mut child = cmd.spawn()?;
    let started = Instant::now();
    let (stream, _) = listener.accept()?;
    share::send(&stream, gmem)?;
    println!(
        "VMM: sent the guest_memfd to the populator (pid {}) over {}",
        child.id(),
        sock.display()
    );
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("the populator failed: {status}").into());
    }
    // "<checksum> <strategy> <threads> <micros>"
    let mut parts = line.split_whitespace();
    let their_sum = u64::from_str_radix(parts.next().ok_or("empty reply")?, 16)?;
    let strategy = parts.next().unwrap_or("?");
    let threads = parts.next().unwrap_or("?");
    let micros = parts.next().unwrap_or("?");
    println!(
        "populator: {} MiB via {strategy} with {threads} thread(s) in {micros} us (round trip {:?})",
        size >> 20,
        started.elapsed()
    );

    // The VMM's own view of what the other process wrote.
    let map = gmem.map()?;
    let mut buf = vec![0u8; 1 << 20];
    let mut ours = FNV_START;
    let mut at = 0;
    while at < size {
        let n = buf.len().min((size - at) as usize);
        map.read_at(at, &mut buf[..n])?;
        ours = fnv(ours, &buf[..n]);
        at += n as u64;
    }
    println!("checksum: populator's source {their_sum:016x}, VMM's mapping {ours:016x}");
    if ours != their_sum {
        return Err("the guest_memfd does not hold what the populator wrote".into());
    }
    println!("OK: the guest_memfd holds the source, written by another process");
    Ok(())
}

fn child(args: &[String], i: usize) -> Res<()> {
    let sock = args.get(i + 1).ok_or("missing socket path")?;
    let size: u64 = opt(args, "--size-bytes")
        .ok_or("missing --size-bytes")?
        .parse()?;
    let stream = UnixStream::connect(sock)?;
    let gmem = share::recv(&stream)?;
    if gmem.size() != size {
        return Err(format!("received {} bytes, expected {size}", gmem.size()).into());
    }
    let (report, sum) = match opt(args, "--file") {
        Some(path) => {
            let file = std::fs::File::open(path)?;
            let report = Populate::detached(&gmem).run(0..size, Source::file(&file, 0))?;
            let data = std::fs::read(path)?;
            let len = (size as usize).min(data.len());
            (report, fnv(FNV_START, &data[..len]))
        }
        None => {
            let data: Vec<u8> = (0..size).map(pattern).collect();
            let report = Populate::detached(&gmem).run(0..size, Source::bytes(&data))?;
            (report, fnv(FNV_START, &data))
        }
    };
    println!(
        "populator (pid {}): received the guest_memfd ({} MiB, flags {}), populated it",
        std::process::id(),
        size >> 20,
        gmem.flags()
    );
    for (skipped, why) in &report.tried {
        println!("populator: skipped {skipped:?}: {why}");
    }
    writeln!(
        &stream,
        "{sum:016x} {:?} {} {}",
        report.strategy,
        report.threads,
        report.elapsed.as_micros()
    )?;
    Ok(())
}
