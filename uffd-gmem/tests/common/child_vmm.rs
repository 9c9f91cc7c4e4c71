//! The handler's side of a child VMM (tests that speak Firecracker's
//! handshake; feature `firecracker`).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uffd_gmem::firecracker::Handshake;
use uffd_gmem::serve::Server;

use super::{DEADLINE, TempDir, summary};

/// The parent's side of a child VMM: this test binary re-executed with one
/// ignored test as its only test. Everything is bounded: the child is killed
/// (and its output shown) on every failure and timeout, and on drop.
pub struct ChildVmm {
    pub label: String,
    pub child: Child,
    pub stream: UnixStream,
    pub lines: BufReader<UnixStream>,
    pub output: Arc<Mutex<Vec<u8>>>,
    pub readers: Vec<JoinHandle<()>>,
    /// A scratch directory the child uses, removed after the child is gone.
    pub dir: Option<TempDir>,
}

impl ChildVmm {
    /// Listens on `sock`, starts this binary's ignored test `child_test`
    /// with `envs` as the child VMM, accepts its connection (within 20 s)
    /// and receives its handshake.
    pub fn start(
        label: &str,
        child_test: &str,
        sock: &Path,
        envs: &[(&str, &OsStr)],
    ) -> (ChildVmm, Handshake) {
        let listener = UnixListener::bind(sock).expect("bind");
        listener.set_nonblocking(true).unwrap();
        let mut child = Command::new(std::env::current_exe().expect("current_exe"))
            .args([
                child_test,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the child VMM");
        let output = Arc::new(Mutex::new(Vec::new()));
        let pipes: Vec<Box<dyn Read + Send>> = vec![
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        let readers = pipes
            .into_iter()
            .map(|mut p| {
                let out = output.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = p.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        out.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend_from_slice(&buf[..n]);
                    }
                })
            })
            .collect::<Vec<_>>();
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{label}: accept: {e}"),
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let status = child.wait();
                for r in readers {
                    let _ = r.join();
                }
                panic!(
                    "{label}: the child VMM never connected ({status:?}); its output:\n{}",
                    String::from_utf8_lossy(&output.lock().unwrap())
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let lines = BufReader::new(stream.try_clone().unwrap());
        let mut vmm = ChildVmm {
            label: label.to_string(),
            child,
            stream,
            lines,
            output,
            readers,
            dir: None,
        };
        let hs = match Handshake::recv_timeout(&vmm.stream, Duration::from_secs(20)) {
            Ok(hs) => hs,
            Err(e) => vmm.fail(&format!("handshake: {e}")),
        };
        (vmm, hs)
    }

    /// Kills the child and fails with `msg` and the child's output.
    pub fn fail(&mut self, msg: &str) -> ! {
        let _ = self.child.kill();
        let status = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let out = self.output.lock().unwrap_or_else(|e| e.into_inner());
        let out = String::from_utf8_lossy(&out);
        let tail: String = out
            .chars()
            .rev()
            .take(6000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        panic!(
            "{}: {msg}\nchild VMM: {status:?}; its output (tail):\n{tail}",
            self.label
        );
    }

    /// Reads lines until one starts with `word`; returns the rest of it.
    /// Fails on a `fail` line, end of file, or after [`DEADLINE`], with the
    /// server's statistics.
    pub fn expect(&mut self, word: &str, server: &Server) -> String {
        match self.expect_line(word) {
            Ok(rest) => rest,
            Err(msg) => {
                let s = server.stats();
                self.fail(&format!("{msg}\nserver: {}", summary(&s)))
            }
        }
    }

    fn expect_line(&mut self, word: &str) -> Result<String, String> {
        let mut line = String::new();
        loop {
            line.clear();
            match self.lines.read_line(&mut line) {
                Ok(0) => return Err(format!("the child closed the socket; expected {word:?}")),
                Ok(_) => {
                    let l = line.trim_end();
                    if let Some(rest) = l.strip_prefix(word) {
                        return Ok(rest.trim().to_string());
                    }
                    if l.starts_with("fail") {
                        return Err(format!("the child reported: {l}"));
                    }
                    eprintln!("[child] {l}");
                }
                Err(e) => {
                    return Err(format!(
                        "no {word:?} from the child within {DEADLINE:?} ({e})"
                    ));
                }
            }
        }
    }

    /// Writes one line to the child.
    pub fn send(&mut self, line: &str) {
        if let Err(e) = writeln!(self.stream, "{line}") {
            self.fail(&format!("send {line:?}: {e}"));
        }
    }

    /// Waits (bounded) for the child to exit.
    pub fn finish(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    for r in self.readers.drain(..) {
                        let _ = r.join();
                    }
                    return st;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => self.fail("the child did not exit"),
            }
        }
    }

    /// Waits (bounded) for the child to exit, and fails unless it succeeded.
    pub fn finish_ok(&mut self) {
        let st = self.finish();
        if !st.success() {
            self.fail(&format!("the child exited with {st}"));
        }
    }
}

impl Drop for ChildVmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}
