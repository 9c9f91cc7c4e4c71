//! The header reader behind kvm-gmem's generated bindings and ABI tests.
//!
//! `headers/` is written by the project in a small, regular subset of C:
//! object-like `#define`s, `struct` definitions with nested anonymous or named
//! aggregates, and `#include`s. This crate reads that subset so that the
//! generator (`gmem-gen`, behind the `bindgen` feature) and the root package's
//! `build.rs` (the C side of the ABI tests) agree on one list of items:
//!
//! - [`MODULES`] and [`ARCHES`]: which translation unit produces which Rust
//!   module, and how each architecture's include path is laid out;
//! - [`read_unit`]: every define and struct a translation unit declares,
//!   following its `#include`s through the hermetic include path;
//! - [`CONST_TYPES`] and [`Unit::const_kind`]: the Rust type of every
//!   constant, taken from the C object it is stored in where the table names
//!   one, else from its C spelling;
//! - [`headers_digest`] and [`Provenance`]: the hashes that tie each committed
//!   bindings file to the exact `headers/` it was generated from.

#![forbid(unsafe_code)]

use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// A target architecture with committed bindings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arch {
    /// Rust's `target_arch` and the bindings directory name.
    pub name: &'static str,
    /// The clang / Rust target triple the bindings are generated for.
    pub triple: &'static str,
    /// The `headers/` directory that supplies `<asm/...>`.
    pub asm_dir: &'static str,
    /// Debian's multiarch triplet, where linux-libc-dev keeps `<asm/...>`.
    pub multiarch: &'static str,
    /// The GNU C compiler for this target on a Debian host.
    pub gcc: &'static str,
}

/// Every architecture the bindings are generated for.
pub const ARCHES: &[Arch] = &[
    Arch {
        name: "x86_64",
        triple: "x86_64-unknown-linux-gnu",
        asm_dir: "asm-x86",
        multiarch: "x86_64-linux-gnu",
        gcc: "x86_64-linux-gnu-gcc",
    },
    Arch {
        name: "aarch64",
        triple: "aarch64-unknown-linux-gnu",
        asm_dir: "asm-arm64",
        multiarch: "aarch64-linux-gnu",
        gcc: "aarch64-linux-gnu-gcc",
    },
];

impl Arch {
    /// The architecture called `name` (`x86_64`, `aarch64`).
    pub fn by_name(name: &str) -> Option<&'static Arch> {
        ARCHES.iter().find(|a| a.name == name)
    }

    /// The hermetic include path for this architecture, in search order.
    pub fn include_dirs(&self, headers: &Path) -> Vec<PathBuf> {
        vec![
            headers.join(self.asm_dir),
            headers.join("stub"),
            headers.to_path_buf(),
        ]
    }
}

/// One generated Rust module: a translation unit of `headers/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Module {
    /// Module and file name (`uapi`, `rfc_populate`, ...).
    pub name: &'static str,
    /// The cargo feature that compiles it in, if it is an RFC module.
    pub feature: Option<&'static str>,
    /// The headers the translation unit includes, relative to `headers/`.
    pub entries: &'static [&'static str],
    /// Whether the module owns only the files under `rfc/` it names (RFC
    /// modules) or every non-RFC file its unit reaches (the upstream module).
    pub rfc: bool,
}

/// Every generated module, the upstream one first.
pub const MODULES: &[Module] = &[
    Module {
        name: "uapi",
        feature: None,
        entries: &["linux/kvm.h", "linux/userfaultfd.h"],
        rfc: false,
    },
    Module {
        name: "rfc_populate",
        feature: Some("rfc-populate"),
        entries: &["rfc/populate.h"],
        rfc: true,
    },
    Module {
        name: "rfc_gmem_write",
        feature: Some("rfc-gmem-write"),
        entries: &["rfc/gmem-write.h"],
        rfc: true,
    },
    Module {
        name: "rfc_no_direct_map",
        feature: Some("rfc-no-direct-map"),
        entries: &["rfc/no-direct-map.h"],
        rfc: true,
    },
    Module {
        name: "rfc_kvm_userfault",
        feature: Some("rfc-kvm-userfault"),
        entries: &["rfc/kvm-userfault.h"],
        rfc: true,
    },
];

impl Module {
    /// Whether this module owns the items of `file` (relative to `headers/`).
    pub fn owns(&self, file: &str) -> bool {
        if self.rfc {
            self.entries.contains(&file)
        } else {
            !file.starts_with("rfc/")
        }
    }
}

/// An object-like `#define` with a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Define {
    /// The macro name.
    pub name: String,
    /// The replacement text, comments removed, whitespace collapsed.
    pub value: String,
    /// The file it is defined in, relative to `headers/`.
    pub file: String,
}

impl Define {
    /// Whether the value is an ioctl request built with `_IO`/`_IOR`/`_IOW`/`_IOWR`.
    pub fn is_ioctl(&self) -> bool {
        ["_IO(", "_IOR(", "_IOW(", "_IOWR("]
            .iter()
            .any(|p| self.value.replace(' ', "").starts_with(p))
    }

    /// The identifiers and number literals of the value, in order.
    fn tokens(&self) -> impl Iterator<Item = &str> {
        self.value
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|t| !t.is_empty())
    }
}

impl Unit {
    /// The C type of define `name`, as its spelling fixes it: a literal with
    /// an `L`/`LL` suffix or a `(__u64)` cast makes a 64-bit unsigned value
    /// (both targets are LP64), and so does any define it refers to that is
    /// 64-bit; otherwise it is a 32-bit `int` (signed only when negative).
    pub fn int_kind(&self, name: &str) -> IntKind {
        self.int_kind_depth(name, 0)
    }

    fn int_kind_depth(&self, name: &str, depth: usize) -> IntKind {
        let Some(d) = self.defines.iter().find(|d| d.name == name) else {
            return IntKind::U32;
        };
        let wide = depth < 16
            && d.tokens().any(|t| {
                if t.starts_with(|c: char| c.is_ascii_digit()) {
                    let suffix = t.trim_start_matches(|c: char| c.is_ascii_hexdigit() || c == 'x');
                    suffix.to_ascii_uppercase().contains('L')
                } else {
                    t == "__u64"
                        || t == "__s64"
                        || self.int_kind_depth(t, depth + 1) == IntKind::U64
                }
            });
        if wide {
            IntKind::U64
        } else if d.value.trim_start_matches('(').starts_with('-') {
            IntKind::I32
        } else {
            IntKind::U32
        }
    }
}

/// The Rust type a define's value gets in the bindings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntKind {
    /// `u8`
    U8,
    /// `u32`
    U32,
    /// `i32`
    I32,
    /// `u64`
    U64,
}

impl Unit {
    /// The Rust type define `name` gets in the bindings: the type of the C
    /// object its [`CONST_TYPES`] entry names, or, for a define no entry
    /// covers, the type its spelling gives it ([`Unit::int_kind`]).
    pub fn const_kind(&self, name: &str) -> IntKind {
        const_type(name).map_or_else(|| self.int_kind(name), |t| t.kind)
    }
}

/// The C object that the values of a family of defines are stored in, and so
/// the Rust type the generator gives them. One row of [`CONST_TYPES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConstType {
    /// The defines it covers: every name starting with it when it ends in
    /// `_` (`UFFD_FEATURE_`), otherwise exactly that name (`UFFD_API`).
    pub names: &'static str,
    /// The Rust type of every define it covers: the C object's type.
    pub kind: IntKind,
    /// Where C stores the values.
    pub stored_in: StoredIn,
}

/// Where C stores a constant's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredIn {
    /// A struct member: the struct's tag, a dot, the member's C access path
    /// (`uffd_msg.arg.pagefault.flags`).
    Member(&'static str),
    /// A value that is no struct member (a syscall or ioctl argument or
    /// result), by its C type (`int`).
    Value(&'static str),
}

impl ConstType {
    const fn member(names: &'static str, kind: IntKind, member: &'static str) -> Self {
        ConstType {
            names,
            kind,
            stored_in: StoredIn::Member(member),
        }
    }

    const fn value(names: &'static str, kind: IntKind, c_type: &'static str) -> Self {
        ConstType {
            names,
            kind,
            stored_in: StoredIn::Value(c_type),
        }
    }

    /// Whether this entry covers define `name`.
    pub fn covers(&self, name: &str) -> bool {
        if self.names.ends_with('_') {
            name.starts_with(self.names)
        } else {
            name == self.names
        }
    }
}

impl StoredIn {
    /// A C operand of `sizeof` and `__typeof__` with the object's type: the
    /// member through a null pointer, or the type name itself.
    pub fn c_operand(&self) -> String {
        match self {
            StoredIn::Member(member) => {
                let (tag, path) = member.split_once('.').unwrap_or((member, ""));
                format!("((struct {tag} *)0)->{path}")
            }
            StoredIn::Value(c_type) => (*c_type).to_string(),
        }
    }
}

/// The types of the constants, by the C object they are stored in.
///
/// Left alone, bindgen types a define by its spelling ([`Unit::int_kind`]):
/// `(1 << 16)` is an `int`, `(1UL << 2)` an `unsigned long`. That is seldom
/// the type of the member the value is written to: `UFFD_FEATURE_*` are
/// `int`s but go into the `__u64 uffdio_api.features`, `KVM_MEM_*` are
/// `unsigned long`s but go into the `__u32` memslot `flags`. Every family
/// listed here gets the type of the C object it is stored in, so that the
/// safe crates use the constants as they are, without casts. A define no row
/// covers keeps its spelling's type.
///
/// | Defines | Rust | Stored in |
/// | --- | --- | --- |
/// | `KVM_API_VERSION` | `i32` | the `int` that `KVM_GET_API_VERSION` returns |
/// | `KVM_X86_*` (VM types), `KVM_VM_TYPE_*` | `u64` | the `unsigned long` type argument of `KVM_CREATE_VM` |
/// | `KVM_CAP_*` | `u32` | a capability number, as `__u32 kvm_enable_cap.cap` holds it upstream (`KVM_CHECK_EXTENSION` widens it to its `unsigned long` argument) |
/// | `KVM_MEM_*` | `u32` | `kvm_userspace_memory_region2.flags` (`__u32`) |
/// | `KVM_MEMORY_ATTRIBUTE_*` | `u64` | `kvm_memory_attributes.attributes` (`__u64`) |
/// | `GUEST_MEMFD_FLAG_*` | `u64` | `kvm_create_guest_memfd.flags` (`__u64`) |
/// | `KVM_EXIT_*` | `u32` | `kvm_run.exit_reason` (`__u32`) |
/// | `KVM_MEMORY_EXIT_FLAG_*` | `u64` | `kvm_run.memory_fault.flags` (`__u64`) |
/// | `UFFD_USER_MODE_ONLY` | `i32` | the `int flags` of `userfaultfd(2)` and of `USERFAULTFD_IOC_NEW` |
/// | `UFFD_API` | `u64` | `uffdio_api.api` (`__u64`) |
/// | `UFFD_FEATURE_*`, `UFFD_API_FEATURES` | `u64` | `uffdio_api.features` (`__u64`) |
/// | `UFFD_API_IOCTLS` | `u64` | `uffdio_api.ioctls` (`__u64`) |
/// | `UFFDIO_REGISTER_MODE_*`, `UFFD_API_REGISTER_MODES` | `u64` | `uffdio_register.mode` (`__u64`) |
/// | `UFFD_API_RANGE_IOCTLS`, `UFFD_API_RANGE_IOCTLS_BASIC` | `u64` | `uffdio_register.ioctls` (`__u64`) |
/// | `UFFDIO_COPY_MODE_*` | `u64` | `uffdio_copy.mode` (`__u64`) |
/// | `UFFDIO_ZEROPAGE_MODE_*` | `u64` | `uffdio_zeropage.mode` (`__u64`) |
/// | `UFFDIO_WRITEPROTECT_MODE_*` | `u64` | `uffdio_writeprotect.mode` (`__u64`) |
/// | `UFFDIO_CONTINUE_MODE_*` | `u64` | `uffdio_continue.mode` (`__u64`) |
/// | `UFFDIO_POISON_MODE_*` | `u64` | `uffdio_poison.mode` (`__u64`) |
/// | `UFFDIO_RWPROTECT_MODE_*` | `u64` | `uffdio_rwprotect.mode` (`__u64`) |
/// | `UFFDIO_MOVE_MODE_*` | `u64` | `uffdio_move.mode` (`__u64`) |
/// | `UFFD_EVENT_*` | `u8` | `uffd_msg.event` (`__u8`) |
/// | `UFFD_PAGEFAULT_FLAG_*` | `u64` | `uffd_msg.arg.pagefault.flags` (`__u64`) |
///
/// The prefixes hold in every module: `KVM_MEM_USERFAULT`,
/// `KVM_MEMORY_EXIT_FLAG_USERFAULT`, `KVM_CAP_USERFAULT` and the RFC
/// `GUEST_MEMFD_FLAG_*` are typed like their upstream siblings. No name is
/// covered by two rows (a unit test checks it). The rest keep their
/// spelling's type: the ioctl encoding (`_IOC_*`, `KVMIO`, `UFFDIO`,
/// `USERFAULTFD_IOC`, the `_UFFDIO_*` numbers, all `u32` like the encoders'
/// arguments) and sizes (`SYNC_REGS_SIZE_BYTES`).
///
/// The ABI tests hold the table to C: for every architecture and module,
/// each constant a row covers must have the size and signedness of the C
/// object the row names, as the target's C compiler sees it in `headers/`
/// ([`StoredIn::c_operand`]).
#[rustfmt::skip]
pub const CONST_TYPES: &[ConstType] = &[
    // <linux/kvm.h>, <asm/kvm.h>
    ConstType::value( "KVM_API_VERSION",             IntKind::I32, "int"),
    ConstType::value( "KVM_X86_",                    IntKind::U64, "unsigned long"),
    ConstType::value( "KVM_VM_TYPE_",                IntKind::U64, "unsigned long"),
    ConstType::value( "KVM_CAP_",                    IntKind::U32, "unsigned int"),
    ConstType::member("KVM_MEM_",                    IntKind::U32, "kvm_userspace_memory_region2.flags"),
    ConstType::member("KVM_MEMORY_ATTRIBUTE_",       IntKind::U64, "kvm_memory_attributes.attributes"),
    ConstType::member("GUEST_MEMFD_FLAG_",           IntKind::U64, "kvm_create_guest_memfd.flags"),
    ConstType::member("KVM_EXIT_",                   IntKind::U32, "kvm_run.exit_reason"),
    ConstType::member("KVM_MEMORY_EXIT_FLAG_",       IntKind::U64, "kvm_run.memory_fault.flags"),
    // <linux/userfaultfd.h>
    ConstType::value( "UFFD_USER_MODE_ONLY",         IntKind::I32, "int"),
    ConstType::member("UFFD_API",                    IntKind::U64, "uffdio_api.api"),
    ConstType::member("UFFD_FEATURE_",               IntKind::U64, "uffdio_api.features"),
    ConstType::member("UFFD_API_FEATURES",           IntKind::U64, "uffdio_api.features"),
    ConstType::member("UFFD_API_IOCTLS",             IntKind::U64, "uffdio_api.ioctls"),
    ConstType::member("UFFDIO_REGISTER_MODE_",       IntKind::U64, "uffdio_register.mode"),
    ConstType::member("UFFD_API_REGISTER_MODES",     IntKind::U64, "uffdio_register.mode"),
    ConstType::member("UFFD_API_RANGE_IOCTLS",       IntKind::U64, "uffdio_register.ioctls"),
    ConstType::member("UFFD_API_RANGE_IOCTLS_BASIC", IntKind::U64, "uffdio_register.ioctls"),
    ConstType::member("UFFDIO_COPY_MODE_",           IntKind::U64, "uffdio_copy.mode"),
    ConstType::member("UFFDIO_ZEROPAGE_MODE_",       IntKind::U64, "uffdio_zeropage.mode"),
    ConstType::member("UFFDIO_WRITEPROTECT_MODE_",   IntKind::U64, "uffdio_writeprotect.mode"),
    ConstType::member("UFFDIO_CONTINUE_MODE_",       IntKind::U64, "uffdio_continue.mode"),
    ConstType::member("UFFDIO_POISON_MODE_",         IntKind::U64, "uffdio_poison.mode"),
    ConstType::member("UFFDIO_RWPROTECT_MODE_",      IntKind::U64, "uffdio_rwprotect.mode"),
    ConstType::member("UFFDIO_MOVE_MODE_",           IntKind::U64, "uffdio_move.mode"),
    ConstType::member("UFFD_EVENT_",                 IntKind::U8,  "uffd_msg.event"),
    ConstType::member("UFFD_PAGEFAULT_FLAG_",        IntKind::U64, "uffd_msg.arg.pagefault.flags"),
];

/// The row of [`CONST_TYPES`] that covers define `name`, if any.
pub fn const_type(name: &str) -> Option<&'static ConstType> {
    CONST_TYPES.iter().find(|t| t.covers(name))
}

/// A member of a struct, by its C access path (`memory_fault.gpa`).
///
/// Anonymous members are transparent, as in C: a member of an anonymous
/// union is reached without naming the union.
pub type FieldPath = String;

/// A `struct` or `union` defined at file scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    /// `struct` or `union`.
    pub keyword: &'static str,
    /// The tag.
    pub name: String,
    /// Every member path, outer members before their sub-members.
    pub fields: Vec<FieldPath>,
    /// Whether it carries `__attribute__((packed))`.
    pub packed: bool,
    /// The file it is defined in, relative to `headers/`.
    pub file: String,
}

/// Everything a translation unit declares, in include order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unit {
    /// The files read, relative to `headers/`, in include order.
    pub files: Vec<String>,
    /// Object-like defines with a value.
    pub defines: Vec<Define>,
    /// File-scope structs and unions.
    pub aggregates: Vec<Aggregate>,
}

impl Unit {
    /// The part of this unit that `module` owns.
    pub fn owned_by(&self, module: &Module) -> Unit {
        Unit {
            files: self
                .files
                .iter()
                .filter(|f| module.owns(f))
                .cloned()
                .collect(),
            defines: self
                .defines
                .iter()
                .filter(|d| module.owns(&d.file))
                .cloned()
                .collect(),
            aggregates: self
                .aggregates
                .iter()
                .filter(|a| module.owns(&a.file))
                .cloned()
                .collect(),
        }
    }
}

/// Reads the translation unit made of `entries` (relative to `headers`) for
/// `arch`, following `#include <...>` through the arch's include path.
pub fn read_unit(headers: &Path, arch: &Arch, entries: &[&str]) -> Result<Unit, String> {
    let dirs = arch.include_dirs(headers);
    let mut unit = Unit::default();
    let mut seen = BTreeSet::new();
    for entry in entries {
        read_file(headers, &dirs, entry, &mut unit, &mut seen)?;
    }
    Ok(unit)
}

fn resolve(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn read_file(
    headers: &Path,
    dirs: &[PathBuf],
    name: &str,
    unit: &mut Unit,
    seen: &mut BTreeSet<PathBuf>,
) -> Result<(), String> {
    let path = resolve(dirs, name).ok_or_else(|| format!("#include <{name}>: not found"))?;
    if !seen.insert(path.clone()) {
        return Ok(());
    }
    let rel = path
        .strip_prefix(headers)
        .map_err(|_| format!("{} is outside {}", path.display(), headers.display()))?
        .to_string_lossy()
        .into_owned();
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let parsed = parse_header(&text).map_err(|e| format!("{rel}: {e}"))?;
    for inc in &parsed.includes {
        read_file(headers, dirs, inc, unit, seen)?;
    }
    unit.files.push(rel.clone());
    unit.defines
        .extend(parsed.defines.into_iter().map(|(name, value)| Define {
            name,
            value,
            file: rel.clone(),
        }));
    unit.aggregates
        .extend(parsed.aggregates.into_iter().map(|mut a| {
            a.file = rel.clone();
            a
        }));
    Ok(())
}

/// What one header file declares, before includes are followed.
#[derive(Debug, Default)]
pub struct ParsedHeader {
    /// `#include <...>` targets, in order.
    pub includes: Vec<String>,
    /// Object-like defines with a value: (name, value).
    pub defines: Vec<(String, String)>,
    /// File-scope structs and unions (their `file` left empty).
    pub aggregates: Vec<Aggregate>,
}

/// Removes `/* */` and `//` comments, keeping line structure.
fn strip_comments(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("/*") {
            let end = after.find("*/").ok_or("unterminated comment")?;
            // Keep the newlines so that line-based directives stay on their lines.
            out.extend(after[..end].chars().filter(|&c| c == '\n'));
            out.push(' ');
            rest = &after[end + 2..];
        } else if let Some(after) = rest.strip_prefix("//") {
            let end = after.find('\n').unwrap_or(after.len());
            rest = &after[end..];
        } else {
            let c = rest.chars().next().unwrap_or_default();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    Ok(out)
}

/// Parses one header of the project's C subset.
pub fn parse_header(text: &str) -> Result<ParsedHeader, String> {
    let text = strip_comments(text)?.replace("\\\n", " ");
    let mut parsed = ParsedHeader::default();
    let mut code = String::new();
    for line in text.lines() {
        let t = line.trim();
        let Some(directive) = t.strip_prefix('#') else {
            code.push_str(line);
            code.push('\n');
            continue;
        };
        let directive = directive.trim_start();
        if let Some(inc) = directive.strip_prefix("include") {
            let inc = inc.trim();
            let inner = inc
                .strip_prefix('<')
                .and_then(|s| s.strip_suffix('>'))
                .ok_or_else(|| format!("only <...> includes are allowed: {t}"))?;
            parsed.includes.push(inner.to_string());
        } else if let Some(def) = directive.strip_prefix("define") {
            let def = def.trim_start();
            let name_len = def
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(def.len());
            let (name, rest) = def.split_at(name_len);
            if name.is_empty() {
                return Err(format!("malformed #define: {t}"));
            }
            if rest.starts_with('(') {
                continue; // function-like: an encoder or helper, not an item
            }
            let value = rest.split_whitespace().collect::<Vec<_>>().join(" ");
            if !value.is_empty() {
                parsed.defines.push((name.to_string(), value));
            }
        } else if ["ifndef", "ifdef", "endif", "if ", "else", "elif", "undef"]
            .iter()
            .any(|d| directive.starts_with(d))
        {
            // Include guards only; the subset has no other conditionals.
        } else {
            return Err(format!("unsupported directive: {t}"));
        }
    }
    let tokens = tokenize(&code)?;
    let mut p = Parser { tokens, pos: 0 };
    while !p.at_end() {
        if let Some(agg) = p.top_level()? {
            parsed.aggregates.push(agg);
        }
    }
    Ok(parsed)
}

fn tokenize(code: &str) -> Result<Vec<String>, String> {
    let mut tokens = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push(chars[start..i].iter().collect());
        } else if "{}[]();,*+-<>|&".contains(c) {
            tokens.push(c.to_string());
            i += 1;
        } else {
            return Err(format!("unexpected character {c:?} in declarations"));
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<String>,
    pos: usize,
}

/// A member as parsed: its name (None when anonymous) and its sub-members.
struct Member {
    name: Option<String>,
    children: Vec<Member>,
}

impl Parser {
    fn at_end(&self) -> bool {
        self.pos >= self.tokens.len()
    }

    fn peek(&self) -> Option<&str> {
        self.tokens.get(self.pos).map(String::as_str)
    }

    fn peek_at(&self, n: usize) -> Option<&str> {
        self.tokens.get(self.pos + n).map(String::as_str)
    }

    fn next(&mut self) -> Result<String, String> {
        let t = self
            .tokens
            .get(self.pos)
            .cloned()
            .ok_or("unexpected end of declarations")?;
        self.pos += 1;
        Ok(t)
    }

    fn expect(&mut self, want: &str) -> Result<(), String> {
        let got = self.next()?;
        if got == want {
            Ok(())
        } else {
            Err(format!("expected `{want}`, found `{got}`"))
        }
    }

    /// Skips a balanced `( ... )` or `[ ... ]` group starting at the cursor.
    fn skip_group(&mut self) -> Result<(), String> {
        let open = self.next()?;
        let close = match open.as_str() {
            "(" => ")",
            "[" => "]",
            other => return Err(format!("expected a group, found `{other}`")),
        };
        let mut depth = 1;
        while depth > 0 {
            let t = self.next()?;
            if t == open {
                depth += 1;
            } else if t == close {
                depth -= 1;
            }
        }
        Ok(())
    }

    /// `__attribute__((...))`*; returns whether `packed` was among them.
    fn attributes(&mut self) -> Result<bool, String> {
        let mut packed = false;
        while self.peek() == Some("__attribute__") {
            self.next()?;
            let start = self.pos;
            self.skip_group()?;
            packed |= self.tokens[start..self.pos].iter().any(|t| t == "packed");
        }
        Ok(packed)
    }

    /// One file-scope declaration; a struct/union definition is returned.
    fn top_level(&mut self) -> Result<Option<Aggregate>, String> {
        let first = self.next()?;
        match first.as_str() {
            "struct" | "union" if self.peek_at(1) == Some("{") => {
                let name = self.next()?;
                let members = self.body()?;
                let packed = self.attributes()?;
                self.expect(";")?;
                let mut fields = Vec::new();
                flatten(&members, "", &mut fields);
                Ok(Some(Aggregate {
                    keyword: if first == "struct" { "struct" } else { "union" },
                    name,
                    fields,
                    packed,
                    file: String::new(),
                }))
            }
            _ => {
                // typedefs and other declarations: skip to the closing `;`.
                let mut depth = 0i32;
                let mut t = first;
                loop {
                    match t.as_str() {
                        "{" | "(" | "[" => depth += 1,
                        "}" | ")" | "]" => depth -= 1,
                        ";" if depth == 0 => return Ok(None),
                        _ => {}
                    }
                    t = self.next()?;
                }
            }
        }
    }

    /// `{ member* }`
    fn body(&mut self) -> Result<Vec<Member>, String> {
        self.expect("{")?;
        let mut members = Vec::new();
        while self.peek() != Some("}") {
            members.extend(self.member()?);
        }
        self.expect("}")?;
        Ok(members)
    }

    /// One member declaration, possibly with several declarators.
    fn member(&mut self) -> Result<Vec<Member>, String> {
        let kw = self.peek().unwrap_or_default().to_string();
        if (kw == "struct" || kw == "union")
            && (self.peek_at(1) == Some("{") || self.peek_at(2) == Some("{"))
        {
            self.next()?;
            if self.peek() != Some("{") {
                self.next()?; // a tag on an inline definition
            }
            let children = self.body()?;
            self.attributes()?;
            let name = if self.peek() == Some(";") {
                None
            } else {
                Some(self.next()?)
            };
            if self.peek() == Some("[") {
                self.skip_group()?;
            }
            self.expect(";")?;
            return Ok(vec![Member { name, children }]);
        }
        // A plain member: type words, then declarators separated by commas.
        let mut out = Vec::new();
        let mut last_ident: Option<String> = None;
        loop {
            let t = self.next()?;
            match t.as_str() {
                "[" => {
                    self.pos -= 1;
                    self.skip_group()?;
                }
                "*" => {}
                "," | ";" => {
                    let name = last_ident
                        .take()
                        .ok_or_else(|| format!("member without a name before `{t}`"))?;
                    out.push(Member {
                        name: Some(name),
                        children: Vec::new(),
                    });
                    if t == ";" {
                        return Ok(out);
                    }
                }
                _ if t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
                    last_ident = Some(t)
                }
                other => return Err(format!("unexpected `{other}` in a member")),
            }
        }
    }
}

fn flatten(members: &[Member], prefix: &str, out: &mut Vec<FieldPath>) {
    for m in members {
        match &m.name {
            Some(name) => {
                let path = format!("{prefix}{name}");
                out.push(path.clone());
                flatten(&m.children, &format!("{path}."), out);
            }
            None => flatten(&m.children, prefix, out),
        }
    }
}

/// The SHA-256 of `headers/`: every file except `README.md`, by relative path
/// in sorted order, each as `path NUL contents NUL`. The generated bindings
/// record it; the tests recompute it.
pub fn headers_digest(headers: &Path) -> Result<String, String> {
    let mut files = Vec::new();
    collect_files(headers, headers, &mut files)?;
    files.sort();
    let mut h = Sha256::new();
    for rel in files {
        if rel == "README.md" {
            continue;
        }
        let data = fs::read(headers.join(&rel)).map_err(|e| format!("{rel}: {e}"))?;
        h.update(rel.as_bytes());
        h.update([0]);
        h.update(&data);
        h.update([0]);
    }
    Ok(hex(&h.finalize()))
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_dir() {
            collect_files(root, &path, out)?;
        } else {
            let rel = path
                .strip_prefix(root)
                .map_err(|e| e.to_string())?
                .to_string_lossy()
                .replace('\\', "/");
            out.push(rel);
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The SHA-256 of a text, in hex.
pub fn sha256_hex(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// The first line of every generated file.
pub const GENERATED_MARKER: &str =
    "// @generated by gmem-gen from headers/. Do not edit: change headers/ and regenerate.";

/// The provenance block at the top of a generated bindings file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    /// bindgen's version.
    pub bindgen: String,
    /// libclang's version string.
    pub clang: String,
    /// The target triple.
    pub target: String,
    /// The module name.
    pub module: String,
    /// [`headers_digest`] at generation time.
    pub headers_sha256: String,
    /// [`sha256_hex`] of the body that follows the block.
    pub body_sha256: String,
}

impl Provenance {
    /// Renders the block followed by `body`: the complete file.
    pub fn render(&self, body: &str) -> String {
        format!(
            "{GENERATED_MARKER}\n\
             // Regenerate: cargo run -p gmem-gen --features bindgen -- bindings\n\
             // bindgen: {}\n\
             // libclang: {}\n\
             // target: {}\n\
             // module: {}\n\
             // headers-sha256: {}\n\
             // body-sha256: {}\n\
             \n{body}",
            self.bindgen,
            self.clang,
            self.target,
            self.module,
            self.headers_sha256,
            self.body_sha256
        )
    }

    /// Splits a generated file into its provenance and its body.
    pub fn parse(file: &str) -> Result<(Provenance, &str), String> {
        let mut rest = file;
        let mut line = || -> Result<&str, String> {
            let end = rest.find('\n').ok_or("truncated provenance block")?;
            let l = &rest[..end];
            rest = &rest[end + 1..];
            Ok(l)
        };
        if line()? != GENERATED_MARKER {
            return Err("the first line is not gmem-gen's marker".into());
        }
        line()?; // the regeneration command
        let mut field = |key: &str| -> Result<String, String> {
            let l = line()?;
            l.strip_prefix(&format!("// {key}: "))
                .map(str::to_string)
                .ok_or_else(|| format!("expected `// {key}: ...`, found `{l}`"))
        };
        let p = Provenance {
            bindgen: field("bindgen")?,
            clang: field("libclang")?,
            target: field("target")?,
            module: field("module")?,
            headers_sha256: field("headers-sha256")?,
            body_sha256: field("body-sha256")?,
        };
        let body = rest
            .strip_prefix('\n')
            .ok_or("no blank line after the provenance block")?;
        Ok((p, body))
    }
}

/// Where a module's generated file lives, relative to the workspace root.
pub fn bindings_path(arch: &Arch, module: &Module) -> String {
    format!("kvm-gmem-sys/src/bindings/{}/{}.rs", arch.name, module.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_anonymous_members_flatten_like_c() {
        let h = parse_header(
            "struct s { __u8 a; __u8 pad[6]; union { struct { __u64 x; } inner; char p[256]; };\n\
             union { __u32 t; } named; __u64 r1, r2; void *ptr; } __attribute__((packed));",
        )
        .unwrap();
        let s = &h.aggregates[0];
        assert!(s.packed);
        assert_eq!(
            s.fields,
            [
                "a", "pad", "inner", "inner.x", "p", "named", "named.t", "r1", "r2", "ptr"
            ]
        );
    }

    #[test]
    fn defines_skip_guards_and_function_like_macros() {
        let h = parse_header(
            "#ifndef G\n#define G\n#define A (1ULL << 2) /* c */\n#define F(x) (x)\n\
             #define L (1 | \\\n 2)\n#endif\n",
        )
        .unwrap();
        assert_eq!(
            h.defines,
            [
                ("A".into(), "(1ULL << 2)".into()),
                ("L".into(), "(1 | 2)".into())
            ]
        );
    }

    /// A unit made of the defines of one header text.
    fn unit_of(text: &str) -> Unit {
        let defines = parse_header(text).unwrap().defines;
        Unit {
            defines: defines
                .into_iter()
                .map(|(name, value)| Define {
                    name,
                    value,
                    file: String::new(),
                })
                .collect(),
            ..Unit::default()
        }
    }

    #[test]
    fn int_kinds_follow_the_spelling_and_the_references() {
        let unit = unit_of(
            "#define A (1ULL << 3)\n#define B ((__u64)1 << 0)\n#define C (1UL << 2)\n\
             #define D (1 << 17)\n#define E_UNPOPULATED (1 << 13)\n#define F (D | E_UNPOPULATED)\n\
             #define G (B | D)\n#define H 0xffULL\n#define I 0xAE\n",
        );
        let k = |n: &str| unit.int_kind(n);
        assert_eq!(
            [
                k("A"),
                k("B"),
                k("C"),
                k("D"),
                k("E_UNPOPULATED"),
                k("F"),
                k("G"),
                k("H"),
                k("I")
            ],
            [
                IntKind::U64,
                IntKind::U64,
                IntKind::U64,
                IntKind::U32,
                IntKind::U32,
                IntKind::U32,
                IntKind::U64,
                IntKind::U64,
                IntKind::U32
            ]
        );
        let d = |v: &str| Define {
            name: "X".into(),
            value: v.into(),
            file: String::new(),
        };
        assert!(d("_IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)").is_ioctl());
        assert!(!d("0xAE").is_ioctl());
    }

    #[test]
    fn const_kinds_follow_the_table_then_the_spelling() {
        let unit = unit_of(
            "#define UFFD_FEATURE_X (1 << 3)\n#define KVM_MEM_X (1UL << 1)\n\
             #define UFFD_EVENT_X 0x12\n#define UFFD_USER_MODE_ONLY 1\n#define OTHER (1UL << 2)\n\
             #define PLAIN 7\n#define UFFD_API_FEATURESX (1 << 1)\n",
        );
        let k = |n: &str| unit.const_kind(n);
        assert_eq!(k("UFFD_FEATURE_X"), IntKind::U64);
        assert_eq!(k("KVM_MEM_X"), IntKind::U32);
        assert_eq!(k("UFFD_EVENT_X"), IntKind::U8);
        assert_eq!(k("UFFD_USER_MODE_ONLY"), IntKind::I32);
        assert_eq!(k("OTHER"), IntKind::U64);
        assert_eq!(k("PLAIN"), IntKind::U32);
        // An entry without a trailing `_` is one exact name, not a prefix.
        assert_eq!(k("UFFD_API_FEATURESX"), IntKind::U32);
        assert_eq!(
            StoredIn::Member("uffd_msg.arg.pagefault.flags").c_operand(),
            "((struct uffd_msg *)0)->arg.pagefault.flags"
        );
        assert_eq!(StoredIn::Value("int").c_operand(), "int");
    }

    #[test]
    fn no_name_is_covered_by_two_const_types() {
        // Two entries cover a common name only if one covers the other's
        // `names` (a prefix of a longer prefix, or of an exact name).
        for (i, a) in CONST_TYPES.iter().enumerate() {
            for (j, b) in CONST_TYPES.iter().enumerate() {
                assert!(
                    i == j || !a.covers(b.names),
                    "{} also covers {}",
                    a.names,
                    b.names
                );
            }
        }
    }

    /// Every row of the table types at least one define of `headers/`, none
    /// of them an ioctl request (those are not generated), and names a
    /// member that the upstream structs have.
    #[test]
    fn const_types_match_the_real_headers() {
        let headers = Path::new(env!("CARGO_MANIFEST_DIR")).join("../headers");
        let mut defines = Vec::new();
        for arch in ARCHES {
            for m in MODULES {
                let unit = read_unit(&headers, arch, m.entries).unwrap();
                defines.extend(unit.owned_by(m).defines);
            }
        }
        let uapi = read_unit(&headers, &ARCHES[0], MODULES[0].entries).unwrap();
        for t in CONST_TYPES {
            let covered: Vec<&Define> = defines.iter().filter(|d| t.covers(&d.name)).collect();
            assert!(!covered.is_empty(), "{} covers no define", t.names);
            for d in covered {
                assert!(!d.is_ioctl(), "{} covers the ioctl {}", t.names, d.name);
            }
            if let StoredIn::Member(member) = t.stored_in {
                let (tag, path) = member.split_once('.').unwrap();
                assert!(
                    uapi.aggregates
                        .iter()
                        .any(|a| a.name == tag && a.fields.iter().any(|f| f == path)),
                    "{}: headers/ has no member {member}",
                    t.names
                );
            }
        }
    }

    #[test]
    fn unsupported_constructs_are_rejected() {
        assert!(parse_header("#pragma once\n").is_err());
        assert!(parse_header("#include \"x.h\"\n").is_err());
        assert!(parse_header("/* open").is_err());
    }

    #[test]
    fn provenance_round_trips() {
        let p = Provenance {
            bindgen: "0.73.2".into(),
            clang: "clang version 19".into(),
            target: "x86_64-unknown-linux-gnu".into(),
            module: "uapi".into(),
            headers_sha256: "ab".into(),
            body_sha256: sha256_hex("body\n"),
        };
        let text = p.render("body\n");
        let (q, body) = Provenance::parse(&text).unwrap();
        assert_eq!(q, p);
        assert_eq!(body, "body\n");
    }

    #[test]
    fn the_real_headers_parse_for_every_arch_and_module() {
        let headers = Path::new(env!("CARGO_MANIFEST_DIR")).join("../headers");
        for arch in ARCHES {
            for m in MODULES {
                let unit = read_unit(&headers, arch, m.entries).unwrap();
                let owned = unit.owned_by(m);
                assert!(!owned.defines.is_empty(), "{} {}", arch.name, m.name);
            }
            let uapi = read_unit(&headers, arch, MODULES[0].entries).unwrap();
            let run = uapi
                .aggregates
                .iter()
                .find(|a| a.name == "kvm_run")
                .unwrap();
            assert!(run.fields.contains(&"memory_fault.gpa".to_string()));
            let msg = uapi
                .aggregates
                .iter()
                .find(|a| a.name == "uffd_msg")
                .unwrap();
            assert!(msg.packed && msg.fields.contains(&"arg.pagefault.feat.ptid".to_string()));
        }
    }
}
