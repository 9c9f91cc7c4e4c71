//! ABI layout tests: kvm-gmem-sys against a C compiler's view of `headers/`,
//! for x86_64 and aarch64, and `headers/` against Debian's linux-libc-dev 7.3.
//!
//! `build.rs` compiles one C table per architecture and module (size and
//! alignment of every struct, offset and size of every member, value of every
//! constant and ioctl number) and generates the Rust side, which measures the
//! committed bindings of *each* architecture: both targets are LP64, so the
//! aarch64 files compile as plain modules on an x86_64 host, where bindgen's
//! own layout assertions are checked too. Any difference fails, and so does an
//! item present on one side only.
//!
//! `abi_native_c_equals_rust` checks the architecture this executable was
//! built for, inside the executable: the C rows that the target's C compiler
//! compiled as data and build.rs linked in, against the Rust side as this
//! target's rustc lays it out. Built for aarch64-unknown-linux-gnu and run
//! under qemu-aarch64-static (`scripts/kernel-lane.sh --arch aarch64`, step
//! 4), both sides come from aarch64 compilers.
//!
//! Missing tools (the aarch64 cross compiler, the linux-libc-dev download)
//! make a check print why it skips; under `CI=true` they fail it.

use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_ulong};

/// A row of a C table: (kind, item, value).
type CRow = (&'static str, &'static str, i128);

/// The tables of one architecture and module.
#[derive(Debug)]
pub struct ModuleTables {
    arch: &'static str,
    module: &'static str,
    /// Rows from the C compiler over `headers/`.
    c: Result<&'static [CRow], &'static str>,
    /// The same rows over linux-libc-dev (upstream module only).
    libc_dev: Option<Result<&'static [CRow], &'static str>>,
    /// Rows measured on the committed Rust bindings.
    rust: fn() -> Vec<(String, String, i128)>,
}

fn pointee_size<T>(_: *const T) -> usize {
    size_of::<T>()
}

/// Measured rows: (kind, item, value).
type Rows = Vec<(String, String, i128)>;

/// The native C tables of this executable: a module's rows (`stored`: the
/// objects that `CONST_TYPES` names), or `None` for an unknown name.
type NativeFn = fn(&str) -> Option<Rows>;

/// A row of a native C table, as build.rs's C declares it.
#[repr(C)]
#[derive(Debug)]
pub struct NativeRow {
    kind: *const c_char,
    name: *const c_char,
    value: i64,
}

/// The `*len` rows of a native C table starting at `first`.
fn read_native(first: *const NativeRow, len: *const c_ulong) -> Rows {
    let text = |p| {
        // SAFETY: every row's strings are NUL-terminated literals of the
        // linked C table (see below).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    };
    // SAFETY: build.rs's native_code passes a table's address and its
    // length's, both `const` objects of the C file linked into this
    // executable: `*len` rows start at `first`, and nothing writes them.
    let rows = unsafe { std::slice::from_raw_parts(first, *len as usize) };
    rows.iter()
        .map(|r| (text(r.kind), text(r.name), i128::from(r.value)))
        .collect()
}

include!(concat!(env!("OUT_DIR"), "/abi_data.rs"));

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A check whose tool or input is missing: a skip locally, a failure in CI.
fn unavailable(check: &str, why: &str) {
    if ci() {
        panic!("{check}: required under CI=true but unavailable: {why}");
    }
    eprintln!("SKIP {check}: {why}");
}

/// Whether a C-table error means the compiler or input is absent (as opposed
/// to a compile error in the table, which is always a failure).
fn is_missing_tool(err: &str) -> bool {
    err.starts_with("no C compiler")
        || err.starts_with("cannot run")
        || err.starts_with("GMEM_LINUX_LIBC_DEV is not set")
}

type Key = (String, String);

fn as_map<'a>(rows: impl IntoIterator<Item = (&'a str, &'a str, i128)>) -> BTreeMap<Key, u64> {
    // Values compare as 64-bit patterns: C prints `(long long)` immediates,
    // Rust constants are u32/u64/i32.
    rows.into_iter()
        .map(|(k, n, v)| ((k.to_string(), n.to_string()), v as u64))
        .collect()
}

/// Every difference between two tables, one line each.
fn diff(left: &str, l: &BTreeMap<Key, u64>, right: &str, r: &BTreeMap<Key, u64>) -> Vec<String> {
    let mut out = Vec::new();
    for ((kind, name), lv) in l {
        match r.get(&(kind.clone(), name.clone())) {
            None => out.push(format!("{kind} {name}: only in {left}")),
            Some(rv) if rv != lv => {
                out.push(format!("{kind} {name}: {left} {lv:#x}, {right} {rv:#x}"))
            }
            Some(_) => {}
        }
    }
    for (kind, name) in r.keys() {
        if !l.contains_key(&(kind.clone(), name.clone())) {
            out.push(format!("{kind} {name}: only in {right}"));
        }
    }
    out
}

fn rust_map(t: &ModuleTables) -> BTreeMap<Key, u64> {
    let rows = (t.rust)();
    as_map(rows.iter().map(|(k, n, v)| (k.as_str(), n.as_str(), *v)))
}

fn check_arch(arch: &str) {
    let mut failures = Vec::new();
    let mut checked = 0;
    for t in TABLES.iter().filter(|t| t.arch == arch) {
        let c = match t.c {
            Ok(rows) => as_map(rows.iter().copied()),
            Err(e) if is_missing_tool(e) => {
                unavailable(&format!("ABI {arch} {}", t.module), e);
                continue;
            }
            Err(e) => panic!("C table for {arch} {} did not compile:\n{e}", t.module),
        };
        let rust = rust_map(t);
        assert!(
            !c.is_empty() && !rust.is_empty(),
            "{arch} {}: empty tables",
            t.module
        );
        checked += c.len();
        failures.extend(
            diff("C", &c, "Rust", &rust)
                .into_iter()
                .map(|d| format!("{arch} {}: {d}", t.module)),
        );
    }
    assert!(
        failures.is_empty(),
        "ABI mismatches between headers/ (C) and kvm-gmem-sys (Rust):\n{}",
        failures.join("\n")
    );
    eprintln!("{arch}: {checked} C facts compared with their Rust counterparts");
}

#[test]
fn abi_x86_64_c_equals_rust() {
    check_arch("x86_64");
}

#[test]
fn abi_aarch64_c_equals_rust() {
    check_arch("aarch64");
}

/// A native module's rows, with the `tsize` and `signed` rows of each typed
/// constant taken from the native table of the stored objects, as build.rs's
/// `with_const_types` adds them to the assembly tables.
fn native_rows(native: NativeFn, module: &str) -> Rows {
    let stored = native("stored").expect("a native table of the stored objects");
    let mut rows = native(module).unwrap_or_else(|| panic!("no native table for {module}"));
    let typed: Vec<(String, &str)> = rows
        .iter()
        .filter(|(kind, _, _)| kind == "const")
        .filter_map(|(_, name, _)| Some((name.clone(), gmem_gen::const_type(name)?.names)))
        .collect();
    for (name, names) in typed {
        for kind in ["tsize", "signed"] {
            let (_, _, value) = stored
                .iter()
                .find(|(k, n, _)| k == kind && n == names)
                .unwrap_or_else(|| panic!("no {kind} row for {names} in the stored objects"));
            rows.push((kind.to_string(), name.clone(), *value));
        }
    }
    rows
}

/// This executable's own architecture: the C rows linked into it against the
/// Rust side measured by the same target's rustc, and against the C rows the
/// same compiler gave as assembly at build time.
#[test]
fn abi_native_c_equals_rust() {
    let arch = std::env::consts::ARCH;
    assert_eq!(
        NATIVE_ARCH, arch,
        "build.rs compiled the native tables for another arch"
    );
    let native = match NATIVE {
        Ok(native) => native,
        Err(e) if is_missing_tool(e) => return unavailable(&format!("ABI native {arch}"), e),
        Err(e) => panic!("the native C tables for {arch}: {e}"),
    };
    let mut failures = Vec::new();
    let mut checked = 0;
    for t in TABLES.iter().filter(|t| t.arch == arch) {
        let rows = native_rows(native, t.module);
        let c = as_map(rows.iter().map(|(k, n, v)| (k.as_str(), n.as_str(), *v)));
        checked += c.len();
        let mut d = diff("C (linked)", &c, "Rust", &rust_map(t));
        if let Ok(asm) = t.c {
            d.extend(diff(
                "C (linked)",
                &c,
                "C (assembly)",
                &as_map(asm.iter().copied()),
            ));
        }
        failures.extend(d.into_iter().map(|d| format!("{arch} {}: {d}", t.module)));
    }
    assert!(
        failures.is_empty(),
        "ABI mismatches in this {arch} executable:\n{}",
        failures.join("\n")
    );
    eprintln!(
        "{arch} (this executable): {checked} C facts linked in, compared with their Rust counterparts"
    );
}

#[test]
fn every_module_and_arch_has_a_table() {
    for arch in gmem_gen::ARCHES {
        for m in gmem_gen::MODULES {
            assert!(
                TABLES
                    .iter()
                    .any(|t| t.arch == arch.name && t.module == m.name),
                "no table for {} {}",
                arch.name,
                m.name
            );
        }
    }
}

#[test]
fn upstream_headers_equal_linux_libc_dev() {
    let mut failures = Vec::new();
    for t in TABLES.iter().filter(|t| t.libc_dev.is_some()) {
        let (Ok(ours), Some(theirs)) = (t.c, t.libc_dev) else {
            if let Err(e) = t.c {
                unavailable(&format!("linux-libc-dev {}", t.arch), e);
            }
            continue;
        };
        let theirs = match theirs {
            Ok(rows) => rows,
            Err(e) if is_missing_tool(e) => {
                unavailable(&format!("linux-libc-dev {}", t.arch), e);
                continue;
            }
            // An item of ours that Linux 7.3 does not have fails to compile.
            Err(e) => panic!(
                "our upstream rows do not compile against linux-libc-dev ({}):\n{e}",
                t.arch
            ),
        };
        let d = diff(
            "headers/",
            &as_map(ours.iter().copied()),
            "linux-libc-dev",
            &as_map(theirs.iter().copied()),
        );
        failures.extend(d.into_iter().map(|d| format!("{}: {d}", t.arch)));
        eprintln!(
            "{}: {} upstream facts compared with linux-libc-dev",
            t.arch,
            ours.len()
        );
    }
    assert!(
        failures.is_empty(),
        "headers/ differs from linux-libc-dev 7.3:\n{}",
        failures.join("\n")
    );
}

/// The comparison is able to fail: a copy of headers/ with one member removed
/// and two constants changed (tests/abi/wrong-fixture.txt) is caught, with
/// each fault named.
#[test]
fn wrong_fixture_is_caught() {
    let wrong = match WRONG_FIXTURE {
        Ok(rows) => as_map(rows.iter().copied()),
        Err(e) => panic!("the wrong fixture did not compile:\n{e}"),
    };
    let t = TABLES
        .iter()
        .find(|t| t.arch == "x86_64" && t.module == "uapi")
        .unwrap();
    let problems = diff("C", &wrong, "Rust", &rust_map(t));
    let expect = [
        "offset kvm_userspace_memory_region2.guest_memfd_offset: only in Rust",
        "size kvm_userspace_memory_region2: C 0x98, Rust 0xa0",
        "offset kvm_userspace_memory_region2.guest_memfd: C 0x20, Rust 0x28",
        "const KVMIO: C 0xaf, Rust 0xae",
        "const KVM_CREATE_GUEST_MEMFD: C 0xc040afd4, Rust 0xc040aed4",
        "const KVM_SET_USER_MEMORY_REGION2: C 0x4098af49, Rust 0x40a0ae49",
        "const UFFD_FEATURE_MOVE: C 0x8000, Rust 0x10000",
    ];
    for e in expect {
        assert!(
            problems.iter().any(|p| p == e),
            "expected the comparison to report `{e}`; it reported:\n{}",
            problems.join("\n")
        );
    }
    // Nothing outside the three faults and their consequences is reported.
    for p in &problems {
        assert!(
            p.contains("kvm_userspace_memory_region2")
                || p.starts_with("const KVM")
                || p.starts_with("const UFFD_API_FEATURES")
                || p.starts_with("const UFFD_FEATURE_MOVE"),
            "unexpected difference for the wrong fixture: {p}"
        );
    }
    // The same faults are caught by the independent source.
    if let Some(Ok(theirs)) = t.libc_dev {
        let d = diff(
            "wrong",
            &wrong,
            "linux-libc-dev",
            &as_map(theirs.iter().copied()),
        );
        assert!(d.iter().any(|p| p.starts_with("const KVMIO:")), "{d:?}");
        assert!(
            d.iter()
                .any(|p| p.contains("guest_memfd_offset: only in linux-libc-dev")),
            "{d:?}"
        );
    }
}

/// Each committed bindings file records the headers and the body it was
/// generated with: headers changed without regenerating, or a body edited by
/// hand, fail here without needing libclang (the CI drift check regenerates).
#[test]
fn bindings_provenance_matches_headers_and_body() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let digest = gmem_gen::headers_digest(&root.join("headers")).unwrap();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let mut failures = Vec::new();
    for arch in gmem_gen::ARCHES {
        for m in gmem_gen::MODULES {
            let rel = gmem_gen::bindings_path(arch, m);
            let text = std::fs::read_to_string(root.join(&rel)).unwrap();
            let (p, body) = match gmem_gen::Provenance::parse(&text) {
                Ok(x) => x,
                Err(e) => {
                    failures.push(format!("{rel}: {e}"));
                    continue;
                }
            };
            if p.headers_sha256 != digest {
                failures.push(format!(
                    "{rel}: generated from other headers ({}), headers/ is now {digest}: regenerate",
                    p.headers_sha256
                ));
            }
            if p.body_sha256 != gmem_gen::sha256_hex(body) {
                failures.push(format!("{rel}: the body was edited after generation"));
            }
            if p.target != arch.triple {
                failures.push(format!("{rel}: target {} != {}", p.target, arch.triple));
            }
            if !p.module.starts_with(m.name) {
                failures.push(format!("{rel}: module {} != {}", p.module, m.name));
            }
            if !manifest.contains(&format!("version = \"={}\"", p.bindgen)) {
                failures.push(format!(
                    "{rel}: bindgen {} is not the version pinned in Cargo.toml",
                    p.bindgen
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
