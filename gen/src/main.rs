//! `gmem-gen`: the only producer of kvm-gmem-sys's committed bindings.
//!
//! ```text
//! cargo run -p gmem-gen --features bindgen -- bindings          # rewrite the files
//! cargo run -p gmem-gen --features bindgen -- bindings --check  # fail on any difference
//! ```
//!
//! For every architecture in [`gmem_gen::ARCHES`] and every module in
//! [`gmem_gen::MODULES`], bindgen runs over that module's translation unit of
//! `headers/` with `clang --target=<triple> -nostdinc` and only `headers/` on
//! the include path, so the build host's `/usr/include` is never read. ioctl
//! request macros are left out (kvm-gmem-sys computes them with `const fn`
//! encoders); every other object-like define gets the type of the C object
//! it is stored in where [`gmem_gen::CONST_TYPES`] names one (`UFFD_FEATURE_*`
//! are `u64` like `uffdio_api.features`), else the integer type its C spelling
//! gives it. The output is formatted with rustfmt (edition 2024) and prefixed
//! with its provenance. Needs libclang at run time (`LIBCLANG_PATH`).

use bindgen::callbacks::{IntKind as BgIntKind, ParseCallbacks};
use gmem_gen::{
    ARCHES, Arch, IntKind, MODULES, Module, Provenance, bindings_path, headers_digest, read_unit,
    sha256_hex,
};
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// Must equal the exact pin of `bindgen` in the workspace Cargo.toml.
const BINDGEN_VERSION: &str = "0.73.2";

/// bindgen's parse callback: each define's type, as [`gmem_gen::Unit::const_kind`] gives it.
#[derive(Debug)]
struct IntKinds(HashMap<String, IntKind>);

impl ParseCallbacks for IntKinds {
    fn int_macro(&self, name: &str, _value: i64) -> Option<BgIntKind> {
        self.0.get(name).map(|k| match k {
            IntKind::U8 => BgIntKind::U8,
            IntKind::U32 => BgIntKind::U32,
            IntKind::I32 => BgIntKind::I32,
            IntKind::U64 => BgIntKind::U64,
        })
    }
}

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$-".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn rustfmt(code: &str) -> Result<String, String> {
    let rustfmt = std::env::var("RUSTFMT").unwrap_or_else(|_| "rustfmt".into());
    let mut child = Command::new(&rustfmt)
        .args(["--edition", "2024", "--emit", "stdout"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {rustfmt}: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("rustfmt stdin")?
        .write_all(code.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "rustfmt failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| e.to_string())
}

fn generate(root: &Path, arch: &Arch, module: &Module, digest: &str) -> Result<String, String> {
    let headers = root.join("headers");
    let unit = read_unit(&headers, arch, module.entries)?;
    let owned = unit.owned_by(module);
    let kinds = owned
        .defines
        .iter()
        .map(|d| (d.name.clone(), unit.const_kind(&d.name)))
        .collect();

    let scratch = std::env::temp_dir().join(format!("gmem-gen-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;

    let mut b = bindgen::Builder::default()
        .clang_arg(format!("--target={}", arch.triple))
        .clang_arg("-nostdinc")
        .clang_arg("-std=gnu11")
        .clang_args(
            arch.include_dirs(&headers)
                .iter()
                .map(|d| format!("-I{}", d.display())),
        )
        .rust_target(bindgen::RustTarget::stable(88, 0).map_err(|e| e.to_string())?)
        .rust_edition(bindgen::RustEdition::Edition2024)
        .use_core()
        .ctypes_prefix("::core::ffi")
        .derive_default(true)
        .derive_debug(true)
        .layout_tests(true)
        .generate_comments(false)
        .disable_header_comment()
        .formatter(bindgen::Formatter::None)
        .clang_macro_fallback()
        .clang_macro_fallback_build_dir(&scratch)
        .parse_callbacks(Box::new(IntKinds(kinds)));
    for entry in module.entries {
        b = b.header(headers.join(entry).to_string_lossy());
    }
    for file in &owned.files {
        b = b.allowlist_file(regex_escape(&headers.join(file).to_string_lossy()));
    }
    for d in owned.defines.iter().filter(|d| d.is_ioctl()) {
        b = b.blocklist_item(format!("^{}$", regex_escape(&d.name)));
    }
    let bindings = b
        .generate()
        .map_err(|e| format!("bindgen ({} {}): {e}", arch.name, module.name))?;
    let _ = std::fs::remove_dir_all(&scratch);

    let body = rustfmt(&bindings.to_string())?;
    let prov = Provenance {
        bindgen: BINDGEN_VERSION.into(),
        clang: bindgen::clang_version().full,
        target: arch.triple.into(),
        module: format!("{} ({})", module.name, module.entries.join(", ")),
        headers_sha256: digest.into(),
        body_sha256: sha256_hex(&body),
    };
    Ok(prov.render(&body))
}

fn run(check: bool) -> Result<bool, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace root")?
        .to_path_buf();
    let digest = headers_digest(&root.join("headers"))?;
    let mut clean = true;
    for arch in ARCHES {
        for module in MODULES {
            let text = generate(&root, arch, module, &digest)?;
            let rel = bindings_path(arch, module);
            let path = root.join(&rel);
            let old = std::fs::read_to_string(&path).unwrap_or_default();
            if old == text {
                eprintln!("unchanged  {rel}");
                continue;
            }
            if check {
                eprintln!("DIFFERS    {rel}");
                clean = false;
            } else {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
                }
                std::fs::write(&path, text).map_err(|e| format!("{rel}: {e}"))?;
                eprintln!("written    {rel}");
            }
        }
    }
    Ok(clean)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let check = args.iter().any(|a| a == "--check");
    if args.first().map(String::as_str) != Some("bindings") {
        eprintln!("usage: gmem-gen bindings [--check]");
        return ExitCode::from(2);
    }
    match run(check) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("gmem-gen: committed bindings differ from what headers/ generates");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("gmem-gen: {e}");
            ExitCode::FAILURE
        }
    }
}
