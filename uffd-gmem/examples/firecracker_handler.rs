//! A drop-in for Firecracker's example on-demand UFFD handler
//! (`src/firecracker/examples/uffd/on_demand_handler.rs`), built on
//! [`uffd_gmem::firecracker`] and [`uffd_gmem::serve`].
//!
//! ```text
//! firecracker_handler <socket path> <memory file>
//! ```
//!
//! Same command line and behaviour as Firecracker's: bind the socket, accept
//! Firecracker's connection, receive the handshake, check the regions against
//! the memory file (their sizes must add up to its length), and serve page
//! faults with `UFFDIO_COPY` from the file. Beyond the original:
//!
//! - the handshake is validated (see [`uffd_gmem::firecracker::parse`]) and
//!   received with a timeout, as Firecracker's documentation recommends;
//! - faults are served by `UFFD_WORKERS` threads (default 1), filling
//!   `UFFD_FAULT_AROUND` bytes around each fault (default 0: the faulting page
//!   only), with `EAGAIN`, `EEXIST` and `REMOVE` handled by the server;
//! - each connection gets its own server, so one handler serves several
//!   Firecracker instances restoring the same snapshot; a server stops when
//!   its Firecracker closes the socket (exits), and prints its statistics;
//! - if serving cannot start after a successful handshake, Firecracker (found
//!   with `SO_PEERCRED`) is killed rather than left hanging on its first
//!   fault, as Firecracker's example does from its panic hook.
//!
//! Huge-page regions (`page_size` 2 MiB, hugetlbfs) are served in huge-page
//! units. Not handled: the `feature/secret-hiding` branch's guest_memfd
//! handshakes (they need that branch's bitcode fault channel); they are
//! refused with a message.

use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use uffd_gmem::firecracker::Handshake;
use uffd_gmem::serve::{MappedFile, PageSource, Region, Resolve, Server};

/// How long a connected Firecracker has to send the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn env_u64(name: &str, default: u64) -> Result<u64, BoxError> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|e| format!("{name}={v:?} is not a number: {e}").into()),
        Err(_) => Ok(default),
    }
}

/// Settings shared by every connection.
struct Config {
    source: Arc<MappedFile>,
    workers: usize,
    fault_around: u64,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, memory] = args.as_slice() else {
        eprintln!("usage: {} <socket path> <memory file>", args[0]);
        return ExitCode::from(2);
    };
    match run(socket, memory) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("firecracker_handler: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(socket: &str, memory: &str) -> Result<(), BoxError> {
    let config = Arc::new(Config {
        source: Arc::new(
            MappedFile::open(memory.as_ref()).map_err(|e| format!("memory file {memory}: {e}"))?,
        ),
        workers: env_u64("UFFD_WORKERS", 1)?.max(1) as usize,
        fault_around: env_u64("UFFD_FAULT_AROUND", 0)?,
    });
    let listener = UnixListener::bind(socket).map_err(|e| format!("bind {socket}: {e}"))?;
    eprintln!(
        "firecracker_handler: listening on {socket}, serving {memory} ({} bytes)",
        config.source.len()
    );
    for (n, conn) in listener.incoming().enumerate() {
        let stream = conn.map_err(|e| format!("accept on {socket}: {e}"))?;
        let config = config.clone();
        std::thread::Builder::new()
            .name(format!("fc-conn-{n}"))
            .spawn(move || {
                if let Err(e) = connection(n, stream, &config) {
                    eprintln!("firecracker_handler: connection {n}: {e}");
                }
            })?;
    }
    Ok(())
}

fn connection(n: usize, stream: UnixStream, config: &Config) -> Result<(), BoxError> {
    let hs = Handshake::recv_timeout(&stream, HANDSHAKE_TIMEOUT)?;
    let peer = hs.peer;
    let who = peer.map_or_else(
        || "Firecracker".to_string(),
        |p| format!("Firecracker pid {}", p.pid),
    );
    eprintln!(
        "firecracker_handler: connection {n}: {who}, {} region(s), {} bytes, page size {}",
        hs.regions.len(),
        hs.total_size(),
        hs.page_size()
    );
    let server = match start(hs, stream, config) {
        Ok(server) => server,
        Err(e) => {
            // Firecracker already waits on this userfaultfd: without a
            // server its first fault would hang the VM forever.
            if let Some(p) = peer {
                eprintln!(
                    "firecracker_handler: connection {n}: killing {who}: its VM would hang on its first fault"
                );
                // SAFETY: kill(2) takes two integers and passes no memory; the
                // pid came from SO_PEERCRED of the still-connected socket.
                unsafe { libc::kill(p.pid, libc::SIGKILL) };
            }
            return Err(e);
        }
    };
    while !server.wait_timeout(Duration::from_secs(3600)) {}
    let stats = server.shutdown()?;
    eprintln!(
        "firecracker_handler: connection {n}: {who} gone ({}); {} faults, {} pages copied, \
         {} zeroed, {} EEXIST, {} EAGAIN, p99 latency {:?}, max {:?}",
        stats.stopped_because.as_deref().unwrap_or("stopped"),
        stats.faults,
        stats.pages_copied,
        stats.pages_zeroed,
        stats.eexist,
        stats.eagain,
        stats.latency.quantile(0.99),
        stats.max_latency,
    );
    for e in &stats.errors {
        eprintln!("firecracker_handler: connection {n}: error: {e}");
    }
    Ok(())
}

fn start(hs: Handshake, stream: UnixStream, config: &Config) -> Result<Server, BoxError> {
    hs.validate_against_snapshot(config.source.len())?;
    if hs.is_secret_hiding() {
        return Err(
            "secret-hiding (guest_memfd) handshake: this handler does not speak that \
                    branch's fault channel"
                .into(),
        );
    }
    let page_size = hs.page_size();
    let mut builder = Server::builder(hs.uffd)
        .source_arc(config.source.clone())
        .resolve(Resolve::Copy)
        .workers(config.workers)
        .fault_around(config.fault_around)
        .page_size(page_size)
        .stop_when_closed(OwnedFd::from(stream));
    for r in &hs.regions {
        builder =
            builder.region(Region::new(r.base_host_virt_addr, r.size).source_offset(r.offset));
    }
    Ok(builder.spawn()?)
}
