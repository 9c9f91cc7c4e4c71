//! Tests of `gmem probe`: the report that `probe::collect` gathers, its table
//! and JSON renderings, fd hygiene and the command line.
//!
//! Tests that need `/dev/kvm` or `/dev/userfaultfd` skip (saying why) when the
//! device cannot be opened, except under `CI=true`, where that is a failure.
//! Every test holds [`LOCK`]: the fd-counting test must not see another
//! test's fds, and the others open fds.

#[path = "../src/probe.rs"]
#[allow(dead_code)]
mod probe;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

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
    (api.features, api.ioctls)
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
                    assert_eq!(theirs.get("errno").u64(), e.errno as u64, "{}", row.name)
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
    assert_eq!((e.errno, e.name.as_str()), (libc::ENOENT, "ENOENT"));
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
    assert_eq!((e.errno, e.name.as_str()), (libc::ENOENT, "ENOENT"));
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
        libc::ENOTTY
    );
    assert_eq!(
        report.kvm.vm.as_ref().unwrap().as_ref().unwrap_err().errno,
        libc::ENOTTY
    );
    for row in &report.kvm.caps {
        assert_eq!(
            row.system.as_ref().unwrap().as_ref().unwrap_err().errno,
            libc::ENOTTY
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
        libc::ENOTTY
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
        Some(Ok(sys::KVM_API_VERSION as i32)),
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
    .fold(0u64, |m, f| m | u64::from(f));
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
    let all: [(u32, &str); 19] = [
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
        .filter(|(f, _)| features & u64::from(*f) != 0)
        .map(|(_, n)| *n)
        .collect();
    let unknown = features & !u64::from(sys::UFFD_API_FEATURES);
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
            features & u64::from(f) != 0,
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
    for _ in 0..5 {
        drop(real());
        drop(probe::collect(
            Path::new(MISSING_KVM),
            Path::new(MISSING_UFFD),
        ));
        drop(probe::collect(
            Path::new("/dev/null"),
            Path::new("/dev/null"),
        ));
    }
    let after = open_fds();
    assert_eq!(
        before,
        after,
        "collect() leaked {} fds",
        after as isize - before as isize
    );
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

    // A report: exit 0 even when both devices are missing.
    let out = gmem(&[&["probe"][..], &missing].concat());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("not a KVM host"), "{stdout}");
    assert!(stdout.contains("\nuserfaultfd ("), "{stdout}");

    // --strict: exit 1, naming both devices on stderr.
    let out = gmem(&[&["probe", "--strict"][..], &missing].concat());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(MISSING_KVM) && stderr.contains(MISSING_UFFD),
        "{stderr}"
    );

    // --json (and the default command).
    let out = gmem(&[&["--json"][..], &missing].concat());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let json = Parser::parse(std::str::from_utf8(&out.stdout).unwrap()).expect("valid JSON");
    assert_eq!(json.get("kvm").get("path").str(), MISSING_KVM);
    assert_eq!(json.get("problems").items().len(), 2);

    // No arguments: the probe of the real devices, exit 0 whatever the host.
    let out = gmem(&[]);
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
    let out = gmem(&["probe", "--strict"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}
