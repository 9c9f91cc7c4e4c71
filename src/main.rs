//! `gmem`: the kvm-gmem workspace's command.
//!
//! `gmem probe` prints the typed support report, one row per feature (see
//! `report.rs`, built on `kvm_gmem::Capabilities`); `gmem probe --raw` the
//! raw table of what the kernel answers (see `probe.rs`); `gmem demo` the
//! end-to-end story (see `demo.rs`). `gmem` alone runs `gmem probe`, then
//! `gmem demo`; options without a command apply to `probe`.

mod demo;
mod probe;
mod report;

use std::ffi::OsString;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
Usage: gmem [COMMAND] [OPTIONS]

Commands:
  probe    Print which KVM guest_memfd / userfaultfd features the host
           supports, one row per feature (upstream and RFC) with its origin
           and the evidence: a capability value or what a behavioural probe
           got
  demo     Run a guest whose memory is a guest_memfd populated by
           a separate process, plus a region restored lazily by the
           userfaultfd fault server; print pages populated, faults served
           and time per fault. Then the secret-free restore: a
           NO_DIRECT_MAP|WRITE guest_memfd with KVM userfault, restored by
           a handler process over Firecracker's secret-hiding protocol.
           Runs each part the host supports and names
           each part skipped with the capability that is missing; fails
           only when a part the host supports fails
  help     Print this help

Without a command, gmem runs probe and then demo; options without a command
apply to probe.

Options of probe:
      --raw                Print the raw table instead: the kernel's answers
                           to KVM_CHECK_EXTENSION (on /dev/kvm and a VM) and
                           UFFDIO_API, nothing probed by behaviour
      --json               Print the report (or, with --raw, the raw table) as
                           JSON instead of a table
      --strict             Exit 1 when /dev/kvm or /dev/userfaultfd is unusable
                           (without it, probe always exits 0: it is a report,
                           and a missing device makes its rows not supported)
      --kvm PATH           The KVM device node [default: /dev/kvm]
      --userfaultfd PATH   The userfaultfd device node [default: /dev/userfaultfd]
  -h, --help               Print this help

Exit status: 0 report printed; 1 --strict and a device is unusable, or output
failed; 2 usage error.
";

#[derive(Debug)]
struct ProbeArgs {
    raw: bool,
    json: bool,
    strict: bool,
    kvm: PathBuf,
    uffd: PathBuf,
}

#[derive(Debug)]
enum Command {
    Help,
    Probe(ProbeArgs),
    Demo,
    /// `gmem` alone: probe, then demo.
    Default,
    /// The demo's populator process (internal).
    DemoChild(String),
    /// The demo's secret-free restore handler process (internal).
    DemoHandler(String),
}

fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut args = args.into_iter().peekable();
    let Some(first) = args.peek() else {
        return Ok(Command::Default);
    };
    {
        match first.to_str() {
            Some("probe") => {
                args.next();
            }
            Some("demo") => {
                args.next();
                return match args.next() {
                    None => Ok(Command::Demo),
                    Some(a) if a == "-h" || a == "--help" => Ok(Command::Help),
                    Some(a) => Err(format!("unexpected argument {a:?}")),
                };
            }
            Some(demo::CHILD_ARG) => {
                args.next();
                let fd = args.next().ok_or("missing descriptor")?;
                return Ok(Command::DemoChild(fd.to_string_lossy().into_owned()));
            }
            Some(demo::HANDLER_ARG) => {
                args.next();
                let fd = args.next().ok_or("missing descriptor")?;
                return Ok(Command::DemoHandler(fd.to_string_lossy().into_owned()));
            }
            Some("help") => return Ok(Command::Help),
            Some(a) if a.starts_with('-') => {}
            _ => return Err(format!("unknown command {first:?}")),
        }
    }
    let mut probe = ProbeArgs {
        raw: false,
        json: false,
        strict: false,
        kvm: PathBuf::from(probe::DEFAULT_KVM_PATH),
        uffd: PathBuf::from(probe::DEFAULT_UFFD_PATH),
    };
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("-h" | "--help") => return Ok(Command::Help),
            Some("--raw") => probe.raw = true,
            Some("--json") => probe.json = true,
            Some("--strict") => probe.strict = true,
            Some(opt @ ("--kvm" | "--userfaultfd")) => {
                let path = args.next().ok_or_else(|| format!("{opt} needs a PATH"))?;
                if opt == "--kvm" {
                    probe.kvm = path.into();
                } else {
                    probe.uffd = path.into();
                }
            }
            _ => return Err(format!("unexpected argument {arg:?}")),
        }
    }
    Ok(Command::Probe(probe))
}

/// Writes `text` to stdout; false (after saying so on stderr, if it can) when
/// stdout is gone.
fn print(text: &str) -> bool {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => true,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "gmem: cannot write to stdout: {e}");
            false
        }
    }
}

fn run_demo() -> ExitCode {
    match demo::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            let _ = writeln!(std::io::stderr(), "gmem demo: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    match parse(std::env::args_os().skip(1)) {
        Ok(Command::Demo) => run_demo(),
        Ok(Command::DemoChild(fd)) => match demo::child(&fd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(msg) => {
                let _ = writeln!(std::io::stderr(), "gmem demo (populator): {msg}");
                ExitCode::FAILURE
            }
        },
        Ok(Command::DemoHandler(fd)) => match demo::handler(&fd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(msg) => {
                let _ = writeln!(std::io::stderr(), "gmem demo (handler): {msg}");
                ExitCode::FAILURE
            }
        },
        Ok(Command::Default) => {
            let report = report::collect(
                std::path::Path::new(probe::DEFAULT_KVM_PATH),
                std::path::Path::new(probe::DEFAULT_UFFD_PATH),
            );
            if !print(&report::render_table(&report)) || !print("\n") {
                return ExitCode::FAILURE;
            }
            run_demo()
        }
        Err(msg) => {
            let _ = write!(std::io::stderr(), "gmem: {msg}\n\n{USAGE}");
            ExitCode::from(2)
        }
        Ok(Command::Help) => {
            if print(USAGE) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Ok(Command::Probe(args)) => {
            let (text, problems) = if args.raw {
                let report = probe::collect(&args.kvm, &args.uffd);
                let text = if args.json {
                    probe::render_json(&report)
                } else {
                    probe::render_table(&report)
                };
                (text, report.problems())
            } else {
                let report = report::collect(&args.kvm, &args.uffd);
                let text = if args.json {
                    report::render_json(&report)
                } else {
                    report::render_table(&report)
                };
                (text, report.problems())
            };
            if !print(&text) {
                return ExitCode::FAILURE;
            }
            if args.strict && !problems.is_empty() {
                let mut stderr = std::io::stderr().lock();
                for p in &problems {
                    let _ = writeln!(stderr, "gmem probe --strict: {p}");
                }
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
    }
}
