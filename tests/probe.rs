//! Tests of `gmem probe`: the typed report that `report::collect` gathers
//! (its rows against an independent `kvm_gmem::Capabilities::query` and
//! independent system calls), the raw report of `probe::collect` (`--raw`),
//! their table and JSON renderings, fd hygiene and the command line.
//!
//! Kernel results are never hard-coded: every check compares the report with
//! what the test itself asks the kernel.
//!
//! Tests that need `/dev/kvm` or `/dev/userfaultfd` skip (saying why) when the
//! device cannot be opened, except under `CI=true`, where that is a failure.
//! Every test holds [`LOCK`]: the fd-counting test must not see another
//! test's fds, and the others open fds.

#[path = "../src/probe.rs"]
#[allow(dead_code)]
mod probe;
#[path = "../src/report.rs"]
#[allow(dead_code)]
mod report;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use kvm_gmem::{Capabilities, GuestMemfd, GuestMemfdFlags, KvmDevice, VmOps, VmType};
use kvm_gmem_sys as sys;
use probe::{CapKind, Report, UffdVia};

static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether `path` opens read-write; if not, skips (false) or, under
/// `CI=true`, fails.
fn device(test: &str, path: &str) -> bool {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                !ci(),
                "{test}: required under CI=true but unavailable: {path} cannot be opened ({e})"
            );
            eprintln!(
                "SKIP {test}: {path} cannot be opened ({e}); run on a KVM host with the \
                 device readable and writable (e.g. as root) to run this test"
            );
            false
        }
    }
}

const MISSING_KVM: &str = "/nonexistent/gmem-test/kvm";
const MISSING_UFFD: &str = "/nonexistent/gmem-test/userfaultfd";

fn real() -> Report {
    probe::collect(
        Path::new(probe::DEFAULT_KVM_PATH),
        Path::new(probe::DEFAULT_UFFD_PATH),
    )
}

fn cap(report: &Report, cap: u32) -> &probe::CapRow {
    report
        .kvm
        .caps
        .iter()
        .find(|row| row.cap == cap)
        .unwrap_or_else(|| panic!("no row for capability {cap}"))
}

// ---------------------------------------------------------------------------
// Direct, independent system calls
// ---------------------------------------------------------------------------

fn direct_check_extension(fd: &OwnedFd, cap: u32) -> i32 {
    // SAFETY: KVM_CHECK_EXTENSION takes the capability number by value; `fd`
    // is a live fd for the duration of the call.
    let ret = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            sys::KVM_CHECK_EXTENSION as _,
            libc::c_ulong::from(cap),
        )
    };
    assert!(
        ret >= 0,
        "KVM_CHECK_EXTENSION({cap}): {}",
        std::io::Error::last_os_error()
    );
    ret
}

fn direct_vm(kvm: &OwnedFd) -> OwnedFd {
    let ret = loop {
        // SAFETY: KVM_CREATE_VM takes the VM type by value; `kvm` is live.
        let ret =
            unsafe { libc::ioctl(kvm.as_raw_fd(), sys::KVM_CREATE_VM as _, 0 as libc::c_ulong) };
        let err = std::io::Error::last_os_error();
        if ret >= 0 || err.raw_os_error() != Some(libc::EINTR) {
            break ret;
        }
    };
    assert!(
        ret >= 0,
        "KVM_CREATE_VM: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: KVM_CREATE_VM returned a new fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(ret) }
}

fn open_rdwr(path: &str) -> OwnedFd {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {path}: {e}"))
        .into()
}

/// `UFFDIO_API` with features = 0 on a userfaultfd made through the device.
fn direct_uffd_features() -> (u64, u64) {
    let (_uffd, features, ioctls) = direct_uffd();
    (features, ioctls)
}

/// A userfaultfd made through the device, after `UFFDIO_API` with features =
/// 0, and the features and ioctls it reported.
fn direct_uffd() -> (OwnedFd, u64, u64) {
    let dev = open_rdwr(probe::DEFAULT_UFFD_PATH);
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value; `dev` is live.
    let raw = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            sys::USERFAULTFD_IOC_NEW as _,
            (libc::O_CLOEXEC | libc::O_NONBLOCK) as libc::c_ulong,
        )
    };
    assert!(
        raw >= 0,
        "USERFAULTFD_IOC_NEW: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: USERFAULTFD_IOC_NEW returned a new fd that nothing else owns.
    let uffd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut api = sys::uffdio_api {
        api: sys::UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: `api` is a valid, exclusively borrowed uffdio_api living across
    // the call; UFFDIO_API reads and writes exactly its size.
    let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), sys::UFFDIO_API as _, &raw mut api) };
    assert_eq!(ret, 0, "UFFDIO_API: {}", std::io::Error::last_os_error());
    (uffd, api.features, api.ioctls)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

// ---------------------------------------------------------------------------
// A tiny JSON parser (no serde): enough to check well-formedness and read
// values back.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(BTreeMap<String, Json>),
}

impl Json {
    fn get(&self, key: &str) -> &Json {
        match self {
            Json::Obj(map) => map
                .get(key)
                .unwrap_or_else(|| panic!("no key {key:?} in {self:?}")),
            _ => panic!("not an object: {self:?}"),
        }
    }

    fn items(&self) -> &[Json] {
        match self {
            Json::Arr(items) => items,
            _ => panic!("not an array: {self:?}"),
        }
    }

    fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            _ => panic!("not a string: {self:?}"),
        }
    }

    fn u64(&self) -> u64 {
        match self {
            Json::Num(n) => n.parse().unwrap_or_else(|e| panic!("{n}: {e}")),
            _ => panic!("not a number: {self:?}"),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn parse(text: &str) -> Result<Json, String> {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let value = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing data at byte {}", p.i));
        }
        Ok(value)
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\n' | b'\r' | b'\t') {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, b: u8) -> Result<(), String> {
        if self.peek() == Some(b) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected {:?} at byte {}", b as char, self.i))
        }
    }

    fn literal(&mut self, word: &str, value: Json) -> Result<Json, String> {
        if self.s[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(value)
        } else {
            Err(format!("bad literal at byte {}", self.i))
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.peek() {
            Some(b'{') => {
                self.i += 1;
                let mut map = BTreeMap::new();
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(map));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    self.ws();
                    self.expect(b':')?;
                    let value = self.value()?;
                    if map.insert(key.clone(), value).is_some() {
                        return Err(format!("duplicate key {key:?}"));
                    }
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(map));
                        }
                        _ => return Err(format!("expected , or }} at byte {}", self.i)),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => return Err(format!("expected , or ] at byte {}", self.i)),
                    }
                }
            }
            Some(b'"') => self.string().map(Json::Str),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.i;
                if self.peek() == Some(b'-') {
                    self.i += 1;
                }
                let digits = self.i;
                while matches!(self.peek(), Some(b'0'..=b'9')) {
                    self.i += 1;
                }
                let int = &self.s[digits..self.i];
                if int.is_empty() || (int.len() > 1 && int[0] == b'0') {
                    return Err(format!("bad number at byte {start}"));
                }
                // The probe writes integers only.
                if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
                    return Err(format!("unexpected non-integer at byte {start}"));
                }
                Ok(Json::Num(
                    String::from_utf8(self.s[start..self.i].to_vec()).unwrap(),
                ))
            }
            _ => Err(format!("unexpected byte at {}", self.i)),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            let Some(b) = self.peek() else {
                return Err("unterminated string".into());
            };
            self.i += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    let Some(e) = self.peek() else {
                        return Err("unterminated escape".into());
                    };
                    self.i += 1;
                    match e {
                        b'"' => out.push(b'"'),
                        b'\\' => out.push(b'\\'),
                        b'/' => out.push(b'/'),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex = self.s.get(self.i..self.i + 4).ok_or("short \\u escape")?;
                            let hex = std::str::from_utf8(hex).map_err(|e| e.to_string())?;
                            let code = u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
                            self.i += 4;
                            // The probe escapes control characters only (no surrogates).
                            let c = char::from_u32(code).ok_or("surrogate in \\u escape")?;
                            let mut buf = [0; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => return Err(format!("bad escape at byte {}", self.i)),
                    }
                }
                b if b < 0x20 => return Err(format!("raw control byte in string at {}", self.i)),
                b => out.push(b),
            }
        }
        String::from_utf8(out).map_err(|e| e.to_string())
    }
}

#[test]
fn json_parser_self_check() {
    let _g = lock();
    let v = Parser::parse(r#" {"a": [1, -2, {"b": null}], "c": "x\"\\\n\u0001y", "d": true} "#)
        .unwrap();
    assert_eq!(v.get("c").str(), "x\"\\\n\u{1}y");
    assert_eq!(v.get("a").items()[0].u64(), 1);
    for bad in [
        "{",
        "[1,]",
        "{\"a\" 1}",
        "\"\n\"",
        "{\"a\":1}}",
        "01",
        "{\"a\":1,\"a\":2}",
        "",
    ] {
        assert!(Parser::parse(bad).is_err(), "accepted {bad:?}");
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Checks the JSON of `report`: well-formed, and every row is there with the
/// report's values.
fn check_json(report: &Report) -> Json {
    let text = probe::render_json(report);
    let json = Parser::parse(&text).unwrap_or_else(|e| panic!("invalid JSON ({e}):\n{text}"));
    for key in ["kernel", "kvm", "userfaultfd", "problems"] {
        json.get(key);
    }
    let caps = json.get("kvm").get("caps").items();
    assert_eq!(caps.len(), report.kvm.caps.len());
    for (row, j) in report.kvm.caps.iter().zip(caps) {
        assert_eq!(j.get("name").str(), row.name);
        assert_eq!(j.get("cap").u64(), u64::from(row.cap));
        for (mine, theirs) in [(&row.system, j.get("system")), (&row.vm, j.get("vm"))] {
            match mine {
                None => assert_eq!(theirs, &Json::Null, "{}", row.name),
                Some(Ok(v)) => {
                    assert_eq!(theirs.get("value").u64(), *v as u64, "{}", row.name);
                    if let CapKind::Mask(_) = row.kind {
                        let names: Vec<&str> =
                            theirs.get("names").items().iter().map(Json::str).collect();
                        assert_eq!(names, row.decode(*v), "{}", row.name);
                    }
                }
                Some(Err(e)) => {
                    assert_eq!(
                        Some(theirs.get("errno").u64()),
                        e.errno.map(|n| n as u64),
                        "{}",
                        row.name
                    )
                }
            }
        }
    }
    assert_eq!(
        json.get("kvm").get("path").str(),
        report.kvm.path.to_str().unwrap()
    );
    assert_eq!(
        json.get("userfaultfd").get("path").str(),
        report.uffd.path.to_str().unwrap()
    );
    assert_eq!(json.get("problems").items().len(), report.problems().len());
    json
}

/// Checks the sections and rows every table has, whatever the host.
fn check_table_shape(report: &Report) -> String {
    let table = probe::render_table(report);
    for section in [
        "\nKernel\n",
        &format!("\nKVM ({})\n", report.kvm.path.display()),
        &format!("\nuserfaultfd ({})\n", report.uffd.path.display()),
        "KVM_GET_API_VERSION",
        "KVM_CREATE_VM (type 0)",
        "KVM_CHECK_EXTENSION",
        "USERFAULTFD_IOC_NEW",
        "userfaultfd(2) syscall",
        "UFFDIO_API",
    ] {
        assert!(table.contains(section), "no {section:?} in:\n{table}");
    }
    for row in &report.kvm.caps {
        assert!(table.contains(row.name), "no {} in:\n{table}", row.name);
    }
    table
}

#[test]
fn missing_devices_are_reported_with_errno_and_meaning() {
    let _g = lock();
    let report = probe::collect(Path::new(MISSING_KVM), Path::new(MISSING_UFFD));

    let e = report
        .kvm
        .open
        .as_ref()
        .expect_err("a missing /dev/kvm opened");
    assert_eq!((e.errno, e.name.as_str()), (Some(libc::ENOENT), "ENOENT"));
    assert!(e.hint.unwrap().contains("not a KVM host"), "{e:?}");
    assert_eq!(report.kvm.api_version, None);
    assert_eq!(report.kvm.vm, None);
    assert_eq!(report.kvm.caps.len(), 10, "every row is listed, unasked");
    assert!(
        report
            .kvm
            .caps
            .iter()
            .all(|c| c.system.is_none() && c.vm.is_none())
    );

    let e = report
        .uffd
        .open
        .as_ref()
        .expect_err("a missing /dev/userfaultfd opened");
    assert_eq!((e.errno, e.name.as_str()), (Some(libc::ENOENT), "ENOENT"));
    assert_eq!(report.uffd.ioc_new, None);
    let syscall = report
        .uffd
        .syscall
        .as_ref()
        .expect("a missing device falls back to userfaultfd(2)");
    match syscall {
        Ok(()) => {
            assert_eq!(report.uffd.via, Some(UffdVia::Syscall));
            assert!(matches!(report.uffd.api, Some(Ok(_))));
        }
        Err(_) => {
            assert_eq!(report.uffd.via, None);
            assert_eq!(report.uffd.api, None);
        }
    }

    let problems = report.problems();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains(MISSING_KVM) && problems[0].contains("ENOENT"));
    assert!(problems[1].contains(MISSING_UFFD) && problems[1].contains("ENOENT"));

    let table = check_table_shape(&report);
    assert!(
        table.contains("FAILED: ENOENT (errno 2): No such file or directory"),
        "{table}"
    );
    assert!(table.contains("not a KVM host"), "{table}");
    assert!(
        table.contains("the userfaultfd(2) syscall is tried instead"),
        "{table}"
    );
    assert!(
        table.contains("(not asked: the device did not open)"),
        "{table}"
    );

    let json = check_json(&report);
    let open = json.get("kvm").get("open");
    assert_eq!(open.get("ok"), &Json::Bool(false));
    assert_eq!(open.get("errno").u64(), libc::ENOENT as u64);
    assert_eq!(open.get("errno_name").str(), "ENOENT");
    assert!(open.get("hint").str().contains("not a KVM host"));
}

#[test]
fn wrong_device_node_gives_errors_not_panics() {
    let _g = lock();
    // /dev/null opens but answers no ioctl: every row is an ENOTTY.
    let report = probe::collect(Path::new("/dev/null"), Path::new("/dev/null"));
    assert_eq!(report.kvm.open, Ok(()));
    assert_eq!(
        report
            .kvm
            .api_version
            .as_ref()
            .unwrap()
            .as_ref()
            .unwrap_err()
            .errno,
        Some(libc::ENOTTY)
    );
    assert_eq!(
        report.kvm.vm.as_ref().unwrap().as_ref().unwrap_err().errno,
        Some(libc::ENOTTY)
    );
    for row in &report.kvm.caps {
        assert_eq!(
            row.system.as_ref().unwrap().as_ref().unwrap_err().errno,
            Some(libc::ENOTTY)
        );
        assert_eq!(row.vm, None);
    }
    assert_eq!(
        report
            .uffd
            .ioc_new
            .as_ref()
            .unwrap()
            .as_ref()
            .unwrap_err()
            .errno,
        Some(libc::ENOTTY)
    );
    assert_eq!(report.uffd.syscall, None, "no fallback when the node opens");
    assert_eq!(report.uffd.via, None);
    assert_eq!(report.problems().len(), 2);
    let table = check_table_shape(&report);
    assert!(table.contains("error ENOTTY (25)"), "{table}");
    check_json(&report);
}

#[test]
fn json_escapes_every_special_character() {
    let _g = lock();
    let odd = "/nonexistent/q\"uote\\back\nline\ttab\u{1}ctl\u{7f}del-é";
    let report = probe::collect(Path::new(odd), Path::new(odd));
    let text = probe::render_json(&report);
    assert!(
        !text.contains('\t') && !text.contains('\u{1}'),
        "raw control characters"
    );
    let json = check_json(&report);
    assert_eq!(json.get("kvm").get("path").str(), odd);
    assert_eq!(json.get("userfaultfd").get("path").str(), odd);
}

#[test]
fn kvm_rows_match_independent_ioctls() {
    let _g = lock();
    if !device("kvm_rows_match_independent_ioctls", probe::DEFAULT_KVM_PATH) {
        return;
    }
    let report = real();
    assert_eq!(report.kvm.open, Ok(()));
    assert_eq!(
        report.kvm.api_version,
        Some(Ok(sys::KVM_API_VERSION)),
        "KVM_GET_API_VERSION must be KVM_API_VERSION (12)"
    );
    assert_eq!(sys::KVM_API_VERSION, 12);
    assert_eq!(report.kvm.vm, Some(Ok(())), "KVM_CREATE_VM (type 0) failed");

    // Every row, on both fds, equals a direct ioctl on fds of our own.
    let kvm = open_rdwr(probe::DEFAULT_KVM_PATH);
    let vm = direct_vm(&kvm);
    for row in &report.kvm.caps {
        assert_eq!(
            row.system,
            Some(Ok(direct_check_extension(&kvm, row.cap))),
            "{} on /dev/kvm",
            row.name
        );
        assert_eq!(
            row.vm,
            Some(Ok(direct_check_extension(&vm, row.cap))),
            "{} on the VM fd",
            row.name
        );
    }

    // GUEST_MEMFD_FLAGS: the VM fd's value and its decoding.
    let flags_row = cap(&report, sys::KVM_CAP_GUEST_MEMFD_FLAGS);
    let flags = direct_check_extension(&vm, sys::KVM_CAP_GUEST_MEMFD_FLAGS);
    assert_eq!(flags_row.vm, Some(Ok(flags)));
    let names = flags_row.decode(flags);
    let flags = flags as u64;
    // The RFC bits as Firecracker's 6.18 stack numbers them (literals: this
    // test does not take them from the code it checks).
    let (rfc_no_direct_map, rfc_write) = (1u64 << 2, 1u64 << 3);
    for (bit, name) in [
        (sys::GUEST_MEMFD_FLAG_MMAP, "MMAP"),
        (sys::GUEST_MEMFD_FLAG_INIT_SHARED, "INIT_SHARED"),
        (
            rfc_no_direct_map,
            "bit 2 (RFC NO_DIRECT_MAP in Firecracker's stack)",
        ),
        (rfc_write, "bit 3 (RFC WRITE in Firecracker's stack)"),
    ] {
        assert_eq!(
            names.iter().any(|n| n == name),
            flags & bit != 0,
            "{name} vs GUEST_MEMFD_FLAGS {flags:#x}: {names:?}"
        );
    }
    let known = sys::GUEST_MEMFD_FLAG_MMAP
        | sys::GUEST_MEMFD_FLAG_INIT_SHARED
        | rfc_no_direct_map
        | rfc_write;
    assert_eq!(
        names.iter().any(|n| n.starts_with("unknown")),
        flags & !known != 0,
        "{names:?}"
    );

    // VM_TYPES: the default VM is always a type.
    let types = cap(&report, sys::KVM_CAP_VM_TYPES);
    #[cfg(target_arch = "x86_64")]
    for v in [&types.system, &types.vm] {
        let v = *v.as_ref().unwrap().as_ref().unwrap();
        assert_ne!(
            v & (1 << sys::KVM_X86_DEFAULT_VM),
            0,
            "VM_TYPES {v:#x} lacks the default VM"
        );
        assert!(types.decode(v).iter().any(|n| n == "KVM_X86_DEFAULT_VM"));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = types;

    // The table shows the numbers and the names.
    let table = check_table_shape(&report);
    assert!(
        table.contains("KVM_GET_API_VERSION                 12"),
        "{table}"
    );
    let flags_line = format!("{flags} ({flags:#x})");
    assert!(
        table.contains(&flags_line),
        "no {flags_line:?} in:\n{table}"
    );
    if flags != 0 {
        let joined = names.join(" | ");
        assert!(table.contains(&joined), "no {joined:?} in:\n{table}");
    }
    assert!(
        table.contains("245 (upstream>=6.19: ARM_SEA_TO_USER; Firecracker 6.18: USERFAULT)"),
        "{table}"
    );
    check_json(&report);
}

#[test]
fn userfaultfd_features_match_uffdio_api() {
    let _g = lock();
    if !device(
        "userfaultfd_features_match_uffdio_api",
        probe::DEFAULT_UFFD_PATH,
    ) {
        return;
    }
    let report = real();
    let u = &report.uffd;
    assert_eq!(u.open, Ok(()));
    assert_eq!(u.ioc_new, Some(Ok(())));
    assert_eq!(
        u.syscall, None,
        "the syscall is not tried when the device works"
    );
    assert_eq!(u.via, Some(UffdVia::Device));
    let api = u
        .api
        .as_ref()
        .expect("UFFDIO_API was asked")
        .as_ref()
        .expect("UFFDIO_API");
    assert_eq!(api.api, sys::UFFD_API);

    let (features, ioctls) = direct_uffd_features();
    assert_eq!((api.features, api.ioctls), (features, ioctls));
    assert_ne!(features, 0);
    let baseline = [
        sys::UFFD_FEATURE_EVENT_FORK,
        sys::UFFD_FEATURE_EVENT_REMAP,
        sys::UFFD_FEATURE_EVENT_REMOVE,
        sys::UFFD_FEATURE_EVENT_UNMAP,
        sys::UFFD_FEATURE_MISSING_SHMEM,
        sys::UFFD_FEATURE_SIGBUS,
        sys::UFFD_FEATURE_THREAD_ID,
        sys::UFFD_FEATURE_MINOR_SHMEM,
        sys::UFFD_FEATURE_EXACT_ADDRESS,
    ]
    .into_iter()
    .fold(0u64, |m, f| m | f);
    assert_eq!(
        features & baseline,
        baseline,
        "features {features:#x} lack 6.x baseline bits"
    );
    for bit in [
        sys::_UFFDIO_REGISTER,
        sys::_UFFDIO_UNREGISTER,
        sys::_UFFDIO_API,
    ] {
        assert_ne!(ioctls & (1 << bit), 0, "ioctls {ioctls:#x} lack bit {bit}");
    }

    // Every one of the 19 features: named in the table and the JSON exactly
    // when set.
    let all: [(u64, &str); 19] = [
        (sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
        (sys::UFFD_FEATURE_EVENT_FORK, "EVENT_FORK"),
        (sys::UFFD_FEATURE_EVENT_REMAP, "EVENT_REMAP"),
        (sys::UFFD_FEATURE_EVENT_REMOVE, "EVENT_REMOVE"),
        (sys::UFFD_FEATURE_MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
        (sys::UFFD_FEATURE_MISSING_SHMEM, "MISSING_SHMEM"),
        (sys::UFFD_FEATURE_EVENT_UNMAP, "EVENT_UNMAP"),
        (sys::UFFD_FEATURE_SIGBUS, "SIGBUS"),
        (sys::UFFD_FEATURE_THREAD_ID, "THREAD_ID"),
        (sys::UFFD_FEATURE_MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
        (sys::UFFD_FEATURE_MINOR_SHMEM, "MINOR_SHMEM"),
        (sys::UFFD_FEATURE_EXACT_ADDRESS, "EXACT_ADDRESS"),
        (sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
        (sys::UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED"),
        (sys::UFFD_FEATURE_POISON, "POISON"),
        (sys::UFFD_FEATURE_WP_ASYNC, "WP_ASYNC"),
        (sys::UFFD_FEATURE_MOVE, "MOVE"),
        (sys::UFFD_FEATURE_RWP, "RWP"),
        (sys::UFFD_FEATURE_RWP_ASYNC, "RWP_ASYNC"),
    ];
    assert_eq!(
        all.iter().fold(0, |m, (f, _)| m | f),
        sys::UFFD_API_FEATURES
    );
    let table = check_table_shape(&report);
    let json = check_json(&report);
    let jf = json.get("userfaultfd").get("api").get("features");
    assert_eq!(jf.get("value").u64(), features);
    assert_eq!(jf.get("hex").str(), format!("{features:#x}"));
    let json_names: Vec<&str> = jf.get("names").items().iter().map(Json::str).collect();
    let expected: Vec<&str> = all
        .iter()
        .filter(|(f, _)| features & f != 0)
        .map(|(_, n)| *n)
        .collect();
    let unknown = features & !sys::UFFD_API_FEATURES;
    if unknown == 0 {
        assert_eq!(json_names, expected);
    } else {
        assert_eq!(json_names[..expected.len()], expected[..]);
        assert_eq!(
            json_names[expected.len()..],
            [format!("unknown {unknown:#x}").as_str()]
        );
    }
    for (f, name) in all {
        let set_line = format!("bit {:>2}  {name}\n", f.trailing_zeros());
        assert_eq!(
            table.contains(&set_line),
            features & f != 0,
            "{set_line:?} vs features {features:#x}:\n{table}"
        );
    }
    assert!(
        table.contains(&format!("{features} ({features:#x})")),
        "{table}"
    );
    assert!(
        table.contains(&format!("{ioctls} ({ioctls:#x})")),
        "{table}"
    );
    assert!(table.contains("bit 63  API\n"), "{table}");
}

#[test]
fn collect_closes_every_fd() {
    let _g = lock();
    // Warm up: whatever std or the allocator opens once is open before the count.
    drop(real());
    let before = open_fds();
    drop(typed());
    for _ in 0..5 {
        drop(real());
        drop(typed());
        for (kvm, uffd) in [(MISSING_KVM, MISSING_UFFD), ("/dev/null", "/dev/null")] {
            drop(probe::collect(Path::new(kvm), Path::new(uffd)));
            drop(report::collect(Path::new(kvm), Path::new(uffd)));
        }
    }
    let after = open_fds();
    assert_eq!(
        before,
        after,
        "collect() (typed or raw) leaked {} fds",
        after as isize - before as isize
    );
}

// ---------------------------------------------------------------------------
// The typed report (`gmem probe`)
// ---------------------------------------------------------------------------

fn typed() -> report::Report {
    report::collect(
        Path::new(probe::DEFAULT_KVM_PATH),
        Path::new(probe::DEFAULT_UFFD_PATH),
    )
}

/// Finds every row of `report` in the typed `table`, in order: the row's line
/// (feature, status, origin in aligned columns) and the evidence wrapped
/// beneath it, which is returned unwrapped (one string per row).
fn table_rows(table: &str, report: &report::Report) -> Vec<String> {
    let lines: Vec<&str> = table.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.starts_with("FEATURE") && l.contains("STATUS") && l.contains("ORIGIN"))
        .unwrap_or_else(|| panic!("no column header in:\n{table}"));
    let status_col = lines[header].find("STATUS").unwrap();
    let origin_col = lines[header].find("ORIGIN").unwrap();
    // The table's width: evidence wraps within it (80 at least).
    let width = report
        .rows()
        .map(|(_, r)| origin_col + r.origin.len())
        .max()
        .unwrap_or(0)
        .max(80);
    let mut i = header + 1;
    let mut out = Vec::new();
    for (_, row) in report.rows() {
        while lines.get(i).is_some_and(|l| l.is_empty()) {
            i += 1;
        }
        let line = lines
            .get(i)
            .unwrap_or_else(|| panic!("no line for {:?} in:\n{table}", row.feature));
        // The columns line up with the header's.
        assert_eq!(
            line.get(..status_col).map(str::trim_end),
            Some(row.feature),
            "line {i}: {line:?} in:\n{table}"
        );
        assert_eq!(
            line.get(status_col..origin_col).map(str::trim_end),
            Some(report::status(row.supported)),
            "line {i}: {line:?}"
        );
        assert_eq!(
            line.get(origin_col..),
            Some(row.origin),
            "line {i}: {line:?}"
        );
        i += 1;
        let mut evidence = Vec::new();
        while let Some(l) = lines.get(i).and_then(|l| l.strip_prefix("    ")) {
            assert!(
                l.chars().count() + 4 <= width || !l.contains(' '),
                "line longer than {width}: {l:?}"
            );
            evidence.push(l);
            i += 1;
        }
        assert!(!evidence.is_empty(), "no evidence for {:?}", row.feature);
        out.push(evidence.join(" "));
    }
    out
}

/// Whitespace-collapsed, as the table wraps it.
fn words(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Checks the typed table: header lines, every row in order with its
/// evidence, the summary.
fn check_typed_table(report: &report::Report) -> String {
    let table = report::render_table(report);
    let kvm = format!("KVM           {}: ", report.kvm.path.display());
    let uffd = format!("userfaultfd   {}: ", report.uffd.path.display());
    for head in ["kernel        ", &kvm, &uffd] {
        assert!(
            table.lines().any(|l| l.starts_with(head)),
            "no {head:?} line in:\n{table}"
        );
    }
    if let Ok(k) = &report.kernel {
        assert!(table.contains(&k.release), "{table}");
    }
    let evidence = table_rows(&table, report);
    for ((_, row), ev) in report.rows().zip(&evidence) {
        assert!(table.contains(row.feature));
        assert_eq!(ev, &words(&row.evidence), "{}", row.feature);
    }
    let supported = report.rows().filter(|(_, r)| r.supported).count();
    let summary = format!(
        "\n{supported} of {} features supported.\n",
        report.rows().count()
    );
    assert!(table.ends_with(&summary), "{table}");
    table
}

/// Checks the typed JSON: well-formed, every row with its four fields, the
/// devices, the raw userfaultfd section and the problems.
fn check_typed_json(report: &report::Report) -> Json {
    let text = report::render_json(report);
    let json = Parser::parse(&text).unwrap_or_else(|e| panic!("invalid JSON ({e}):\n{text}"));
    assert_eq!(json.get("report").str(), "typed");
    let rows = json.get("rows").items();
    assert_eq!(rows.len(), report.rows().count());
    for ((group, row), j) in report.rows().zip(rows) {
        assert_eq!(j.get("feature").str(), row.feature);
        assert_eq!(j.get("origin").str(), row.origin);
        assert_eq!(
            j.get("supported"),
            &Json::Bool(row.supported),
            "{}",
            row.feature
        );
        assert_eq!(j.get("evidence").str(), row.evidence);
        assert_eq!(j.get("group").str(), group);
    }
    let devices = json.get("devices");
    let kvm = devices.get("kvm");
    assert_eq!(kvm.get("path").str(), report.kvm.path.to_str().unwrap());
    assert_eq!(kvm.get("ok"), &Json::Bool(report.kvm.failure.is_none()));
    match &report.kvm.failure {
        None => assert_eq!(kvm.get("error"), &Json::Null),
        Some(f) => {
            assert_eq!(kvm.get("stage").str(), f.stage.as_str());
            if let Some(os) = &f.os {
                assert_eq!(
                    Some(kvm.get("error").get("errno").u64()),
                    os.errno.map(|n| n as u64)
                );
            }
        }
    }
    let uffd_path = report.uffd.path.to_str().unwrap();
    assert_eq!(devices.get("userfaultfd").get("path").str(), uffd_path);
    assert_eq!(json.get("userfaultfd").get("path").str(), uffd_path);
    if let Some(Ok(api)) = &report.uffd.api {
        let f = json.get("userfaultfd").get("api").get("features");
        assert_eq!(f.get("value").u64(), api.features);
    }
    match &report.kernel {
        Ok(k) => assert_eq!(json.get("kernel").get("release").str(), k.release),
        Err(_) => assert_eq!(json.get("kernel").get("ok"), &Json::Bool(false)),
    }
    assert_eq!(json.get("problems").items().len(), report.problems().len());
    json
}

fn row<'a>(report: &'a report::Report, feature: &str) -> &'a kvm_gmem::caps::Row {
    report
        .rows()
        .map(|(_, r)| r)
        .find(|r| r.feature == feature)
        .unwrap_or_else(|| panic!("no row {feature:?}"))
}

#[test]
fn typed_rows_equal_capabilities_query() {
    let _g = lock();
    if !device(
        "typed_rows_equal_capabilities_query",
        probe::DEFAULT_KVM_PATH,
    ) {
        return;
    }
    let report = typed();
    assert_eq!(report.kvm.failure, None);

    // An independent query, on a KvmDevice and VM of the test's own.
    let kvm = KvmDevice::open().expect("open /dev/kvm");
    let vm = kvm.create_vm(VmType::DEFAULT).expect("KVM_CREATE_VM");
    let caps = Capabilities::query(&kvm, &vm, VmType::DEFAULT).expect("Capabilities::query");
    assert_eq!(
        report.kvm_rows,
        caps.rows(),
        "the KVM rows are the crate's rows"
    );

    // The fallback rows (printed when KVM cannot be queried) name the
    // crate's features, in order.
    let fallback: Vec<(&str, &str)> = kvm_gmem::caps::unavailable_rows("x")
        .iter()
        .map(|r| (r.feature, r.origin))
        .collect();
    let crate_features: Vec<(&str, &str)> =
        caps.rows().iter().map(|r| (r.feature, r.origin)).collect();
    assert_eq!(fallback, crate_features);

    // The userfaultfd rows follow, in the documented order.
    let uffd: Vec<&str> = report.uffd_rows.iter().map(|r| r.feature).collect();
    assert_eq!(
        uffd,
        [
            "userfaultfd",
            "userfaultfd MINOR on shmem",
            "userfaultfd RWP (Linux 7.3)",
            "userfaultfd MOVE",
            "userfaultfd POISON",
            "userfaultfd on guest_memfd",
        ]
    );

    let table = check_typed_table(&report);
    assert!(
        table.contains(&format!("kernel        {}", caps.kernel_release)),
        "{table}"
    );
    check_typed_json(&report);
}

#[test]
fn typed_userfaultfd_rows_match_uffdio_api() {
    let _g = lock();
    if !device(
        "typed_userfaultfd_rows_match_uffdio_api",
        probe::DEFAULT_UFFD_PATH,
    ) {
        return;
    }
    let report = typed();
    let (features, _) = direct_uffd_features();
    let uffd = row(&report, report::UFFD);
    assert!(uffd.supported);
    assert_eq!(
        uffd.evidence,
        format!("features {features:#x} via {}", probe::DEFAULT_UFFD_PATH)
    );
    // Bit numbers as literals: this test does not take them from the code
    // it checks.
    for (feature, bit) in [
        ("userfaultfd MINOR on shmem", 10),
        ("userfaultfd RWP (Linux 7.3)", 17),
        ("userfaultfd MOVE", 16),
        ("userfaultfd POISON", 14),
    ] {
        let r = row(&report, feature);
        let set = features & (1 << bit) != 0;
        assert_eq!(r.supported, set, "{feature} vs features {features:#x}");
        let says = if set { "set" } else { "not set" };
        assert!(
            r.evidence.contains(&format!(
                "(bit {bit}) {says} in UFFDIO_API features {features:#x}"
            )),
            "{feature}: {}",
            r.evidence
        );
    }
    check_typed_table(&report);
    check_typed_json(&report);
}

/// `UFFDIO_REGISTER` (MISSING) of a one-page guest_memfd mapping with a
/// userfaultfd of the test's own: the errno, or `Ok` (then unregistered).
/// `None` when no such mapping can be made on this kernel.
fn independent_register() -> Option<Result<(), i32>> {
    let kvm = KvmDevice::open().expect("open /dev/kvm");
    let vm = kvm.create_vm(VmType::DEFAULT).expect("KVM_CREATE_VM");
    let gmem = GuestMemfd::builder(kvm_gmem::page_size())
        .mmap(true)
        .init_shared(true)
        .create(&vm)
        .ok()?;
    let map = gmem.map().ok()?;
    let (uffd, _, _) = direct_uffd();
    let range = sys::uffdio_range {
        start: map.addr(),
        len: map.len() as u64,
    };
    let mut reg = sys::uffdio_register {
        range,
        mode: sys::UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: `reg` is a live, exclusively borrowed uffdio_register (the type
    // UFFDIO_REGISTER encodes); its range is `map`, which outlives `uffd`'s
    // registration and is never accessed while registered.
    let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), sys::UFFDIO_REGISTER as _, &raw mut reg) };
    if ret < 0 {
        return Some(Err(std::io::Error::last_os_error().raw_os_error().unwrap()));
    }
    let mut unreg = range;
    // SAFETY: `unreg` is a live, exclusively borrowed uffdio_range (the type
    // UFFDIO_UNREGISTER encodes) naming the range registered above.
    let ret = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            sys::UFFDIO_UNREGISTER as _,
            &raw mut unreg,
        )
    };
    assert_eq!(
        ret,
        0,
        "UFFDIO_UNREGISTER: {}",
        std::io::Error::last_os_error()
    );
    Some(Ok(()))
}

#[test]
fn userfaultfd_on_guest_memfd_matches_independent_register() {
    let _g = lock();
    let name = "userfaultfd_on_guest_memfd_matches_independent_register";
    if !device(name, probe::DEFAULT_KVM_PATH) || !device(name, probe::DEFAULT_UFFD_PATH) {
        return;
    }
    let report = typed();
    let r = row(&report, report::UFFD_ON_GMEM);
    match independent_register() {
        None => {
            assert!(!r.supported, "{r:?}");
            assert!(r.evidence.starts_with("not probed: "), "{r:?}");
        }
        Some(Ok(())) => {
            assert!(r.supported, "{r:?}");
            assert!(
                r.evidence
                    .starts_with("UFFDIO_REGISTER (MISSING) on a guest_memfd mapping succeeded"),
                "{r:?}"
            );
        }
        Some(Err(errno)) => {
            assert!(!r.supported, "{r:?}");
            let name = probe::errno_name(errno).map_or(format!("errno {errno}"), str::to_string);
            assert_eq!(
                r.evidence,
                format!("UFFDIO_REGISTER on a guest_memfd mapping answered {name}")
            );
            if errno == libc::EINVAL {
                assert!(r.evidence.contains("EINVAL"));
            }
        }
    }
    // The table wraps long evidence: compare word by word.
    let table = check_typed_table(&report);
    assert!(words(&table).contains(&words(&r.evidence)), "{table}");
}

#[test]
fn typed_report_of_missing_devices() {
    let _g = lock();
    let report = report::collect(Path::new(MISSING_KVM), Path::new(MISSING_UFFD));
    let f = report
        .kvm
        .failure
        .as_ref()
        .expect("a missing /dev/kvm opened");
    assert_eq!(f.stage, report::KvmStage::Open);
    let os = f.os.as_ref().expect("an errno");
    assert_eq!((os.errno, os.name.as_str()), (Some(libc::ENOENT), "ENOENT"));
    assert!(os.hint.unwrap().contains("not a KVM host"));

    // Every KVM row, not supported, naming the open error.
    let features = kvm_gmem::caps::unavailable_rows("");
    assert_eq!(report.kvm_rows.len(), features.len());
    let cause = format!(
        "not probed: {MISSING_KVM}: cannot open: ENOENT (errno 2): No such file or directory"
    );
    for (r, f) in report.kvm_rows.iter().zip(&features) {
        assert_eq!((r.feature, r.origin), (f.feature, f.origin));
        assert!(!r.supported, "{r:?}");
        assert_eq!(r.evidence, cause);
    }
    let gmem = row(&report, report::UFFD_ON_GMEM);
    assert!(!gmem.supported);
    assert_eq!(gmem.evidence, cause);

    // userfaultfd: the device is missing; the syscall may stand in.
    let uffd = row(&report, report::UFFD);
    assert_eq!(uffd.supported, matches!(report.uffd.api, Some(Ok(_))));
    if uffd.supported {
        assert!(
            uffd.evidence.ends_with("via the userfaultfd(2) syscall"),
            "{uffd:?}"
        );
    } else {
        assert!(uffd.evidence.contains(MISSING_UFFD), "{uffd:?}");
        for r in &report.uffd_rows[1..] {
            assert!(
                !r.supported && r.evidence.starts_with("not probed: "),
                "{r:?}"
            );
        }
    }

    let problems = report.problems();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains(MISSING_KVM) && problems[0].contains("ENOENT"));
    assert!(problems[1].contains(MISSING_UFFD) && problems[1].contains("ENOENT"));

    let table = check_typed_table(&report);
    assert!(words(&table).contains("not a KVM host"), "{table}");
    let json = check_typed_json(&report);
    let error = json.get("devices").get("kvm").get("error");
    assert_eq!(error.get("errno_name").str(), "ENOENT");
    assert!(error.get("hint").str().contains("not a KVM host"));
}

#[test]
fn typed_report_of_a_wrong_device_node() {
    let _g = lock();
    // /dev/null opens but answers no ioctl: KVM_CREATE_VM gives ENOTTY.
    let report = report::collect(Path::new("/dev/null"), Path::new("/dev/null"));
    let f = report.kvm.failure.as_ref().expect("/dev/null is no KVM");
    assert_eq!(f.stage, report::KvmStage::CreateVm);
    assert_eq!(f.os.as_ref().unwrap().errno, Some(libc::ENOTTY));
    assert!(report.rows().all(|(_, r)| !r.supported));
    for r in &report.kvm_rows {
        assert!(
            r.evidence.contains("KVM_CREATE_VM (type 0) failed: ENOTTY"),
            "{r:?}"
        );
    }
    assert_eq!(report.problems().len(), 2);
    let table = check_typed_table(&report);
    assert!(words(&table).contains("it is not a KVM device"), "{table}");
    check_typed_json(&report);
}

#[test]
fn typed_json_escapes_paths() {
    let _g = lock();
    let odd = "/nonexistent/q\"uote\\back\nline\ttab\u{1}ctl\u{7f}del-é";
    let report = report::collect(Path::new(odd), Path::new(odd));
    let text = report::render_json(&report);
    assert!(!text.contains('\t') && !text.contains('\u{1}'));
    let json = check_typed_json(&report);
    assert_eq!(json.get("devices").get("kvm").get("path").str(), odd);
    assert!(
        json.get("rows").items()[0]
            .get("evidence")
            .str()
            .contains(odd)
    );
}

#[test]
fn wrap_splits_at_spaces() {
    let _g = lock();
    assert_eq!(report::wrap("", 10), [""]);
    assert_eq!(report::wrap("a bb ccc", 4), ["a bb", "ccc"]);
    assert_eq!(report::wrap("a  bb", 80), ["a bb"]);
    // A word longer than the width keeps a line of its own, unbroken.
    assert_eq!(
        report::wrap("x 0123456789abc y", 5),
        ["x", "0123456789abc", "y"]
    );
    let text = "KVM_CAP_GUEST_MEMFD_FLAGS = MMAP|INIT_SHARED (0x3) lacks bit 2; \
                KVM_CREATE_GUEST_MEMFD with flags 0x4 gave EINVAL";
    for w in [20, 40, 60] {
        let lines = report::wrap(text, w);
        assert!(
            lines.iter().all(|l| l.len() <= w || !l.contains(' ')),
            "{lines:?}"
        );
        assert_eq!(lines.join(" "), text);
    }
}

// ---------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------

fn gmem(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gmem"))
        .args(args)
        .output()
        .expect("run gmem")
}

#[test]
fn command_line() {
    let _g = lock();
    let missing = ["--kvm", MISSING_KVM, "--userfaultfd", MISSING_UFFD];

    // The typed report: exit 0 even when both devices are missing, every
    // KVM row not supported with the open error as evidence.
    let out = gmem(&[&["probe"][..], &missing].concat());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(words(&stdout).contains("not a KVM host"), "{stdout}");
    assert!(
        stdout.starts_with("gmem probe: KVM guest_memfd"),
        "{stdout}"
    );
    let expected = report::collect(Path::new(MISSING_KVM), Path::new(MISSING_UFFD));
    let rows = table_rows(&stdout, &expected);
    for (row, evidence) in expected.kvm_rows.iter().zip(&rows) {
        assert!(!row.supported);
        assert!(
            evidence.contains(&format!("{MISSING_KVM}: cannot open: ENOENT (errno 2)")),
            "{}: {evidence}",
            row.feature
        );
    }

    // The raw table, as before.
    let out = gmem(&[&["probe", "--raw"][..], &missing].concat());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("not a KVM host"), "{stdout}");
    assert!(stdout.contains("\nuserfaultfd ("), "{stdout}");

    // --strict: exit 1, naming both devices on stderr, typed or raw.
    for raw in [&[][..], &["--raw"]] {
        let out = gmem(&[&["probe", "--strict"][..], raw, &missing].concat());
        assert_eq!(out.status.code(), Some(1), "{raw:?}: {out:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            stderr.contains(MISSING_KVM) && stderr.contains(MISSING_UFFD),
            "{raw:?}: {stderr}"
        );
    }

    // --json (and the default command): the typed report.
    let out = gmem(&[&["--json"][..], &missing].concat());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let json = Parser::parse(std::str::from_utf8(&out.stdout).unwrap()).expect("valid JSON");
    assert_eq!(json.get("report").str(), "typed");
    let kvm = json.get("devices").get("kvm");
    assert_eq!(kvm.get("path").str(), MISSING_KVM);
    assert_eq!(kvm.get("stage").str(), "open");
    assert_eq!(kvm.get("error").get("errno").u64(), libc::ENOENT as u64);
    assert_eq!(json.get("rows").items().len(), expected.rows().count());
    assert_eq!(json.get("problems").items().len(), 2);

    // --raw --json: the raw report.
    let out = gmem(&[&["probe", "--raw", "--json"][..], &missing].concat());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let json = Parser::parse(std::str::from_utf8(&out.stdout).unwrap()).expect("valid JSON");
    assert_eq!(json.get("kvm").get("path").str(), MISSING_KVM);
    assert_eq!(json.get("kvm").get("caps").items().len(), 10);
    assert_eq!(json.get("problems").items().len(), 2);

    // No arguments: the typed probe of the real devices, then the demo, which
    // runs each part the host supports and names the others: exit 0 with the
    // demo's "OK" on any host with a userfaultfd. --raw: the raw probe.
    let out = gmem(&[]);
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    for f in kvm_gmem::caps::unavailable_rows("") {
        assert!(
            stdout.contains(f.feature),
            "no {:?} in:\n{stdout}",
            f.feature
        );
    }
    assert!(stdout.contains(report::UFFD_ON_GMEM), "{stdout}");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.contains("gmem demo:") && stdout.contains(": OK"),
        "{stdout}"
    );
    // The population part runs exactly where a default VM offers guest_memfd
    // with MMAP|INIT_SHARED; elsewhere it is named as skipped, with the
    // capability.
    let ran = stdout.lines().find(|l| l.trim_start().starts_with("ran "));
    let population = "separate-process population";
    let gmem_shared = KvmDevice::open().ok().and_then(|kvm| {
        let vm = kvm.create_vm(VmType::DEFAULT).ok()?;
        let flags = vm.guest_memfd_flags().ok()?;
        let cap = vm.extension(kvm_gmem::Extension::GUEST_MEMFD).ok()?;
        Some(cap > 0 && flags.contains(GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED))
    });
    if gmem_shared == Some(true) {
        assert!(ran.is_some_and(|l| l.contains(population)), "{stdout}");
    } else {
        let skipped = stdout.lines().find(|l| {
            l.trim_start()
                .starts_with(&format!("skipped  {population}"))
        });
        assert!(
            skipped.is_some_and(|l| l.contains("KVM_CAP_GUEST_MEMFD") || l.contains("no KVM")),
            "{stdout}"
        );
    }
    let out = gmem(&["probe", "--raw"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("KVM_CHECK_EXTENSION")
    );

    for help in [&["--help"][..], &["-h"], &["help"], &["probe", "--help"]] {
        let out = gmem(help);
        assert_eq!(out.status.code(), Some(0), "{help:?}: {out:?}");
        assert!(
            String::from_utf8(out.stdout)
                .unwrap()
                .starts_with("Usage: gmem")
        );
    }
    for bad in [
        &["--bogus"][..],
        &["frob"],
        &["probe", "--kvm"],
        &["probe", "extra"],
        &["probe", "--raw", "extra"],
        &["probe", "--userfaultfd"],
    ] {
        let out = gmem(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{bad:?}: usage goes to stderr");
        assert!(
            String::from_utf8(out.stderr)
                .unwrap()
                .contains("Usage: gmem"),
            "{bad:?}"
        );
    }
}

#[test]
fn strict_passes_on_a_working_host() {
    let _g = lock();
    let name = "strict_passes_on_a_working_host";
    if !device(name, probe::DEFAULT_KVM_PATH) || !device(name, probe::DEFAULT_UFFD_PATH) {
        return;
    }
    let report = real();
    assert_eq!(report.problems(), Vec::<String>::new());
    assert_eq!(typed().problems(), Vec::<String>::new());
    for args in [&["probe", "--strict"][..], &["probe", "--strict", "--raw"]] {
        let out = gmem(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
    }
}
