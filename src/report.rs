//! `gmem probe`: the **typed** support report, one row per feature (upstream
//! and RFC) with whether it is supported, where it comes from, and the
//! evidence.
//!
//! The KVM rows are [`kvm_gmem::Capabilities::rows`]: the logic, RFC probes
//! included, lives in the crate. The userfaultfd rows are read from the raw
//! probe's `UFFDIO_API` answer (see `probe.rs`) until uffd-gmem has a typed
//! report, plus one behavioural probe here: `UFFDIO_REGISTER` on a
//! guest_memfd mapping, through uffd-gmem's
//! [`Uffd::register_guest_memfd`](uffd_gmem::Uffd::register_guest_memfd).
//!
//! [`collect`] never panics. A device that does not open is part of the
//! report: every row it decides reads "not supported", with the failure as
//! its evidence. Every fd is closed before [`collect`] returns.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use kvm_gmem::caps::{Row, unavailable_rows};
use kvm_gmem::{Capabilities, GuestMemfd, KvmDevice, Vm, VmType};
use kvm_gmem_sys as sys;
use uffd_gmem::RegisterMode;

use crate::probe::{self, Ctx, Json, Kernel, OsError, Outcome, UffdReport, UffdVia};

/// The VM type of the VM the report is about.
pub const VM_TYPE: VmType = VmType::DEFAULT;

/// The row for a userfaultfd created and answering `UFFDIO_API`.
pub const UFFD: &str = "userfaultfd";
/// The row for `UFFD_FEATURE_MINOR_SHMEM`.
pub const UFFD_MINOR_SHMEM: &str = "userfaultfd MINOR on shmem";
/// The row for `UFFD_FEATURE_RWP`.
pub const UFFD_RWP: &str = "userfaultfd RWP (Linux 7.3)";
/// The row for `UFFD_FEATURE_MOVE`.
pub const UFFD_MOVE: &str = "userfaultfd MOVE";
/// The row for `UFFD_FEATURE_POISON`.
pub const UFFD_POISON: &str = "userfaultfd POISON";
/// The row for the behavioural `UFFDIO_REGISTER` probe.
pub const UFFD_ON_GMEM: &str = "userfaultfd on guest_memfd";

/// The userfaultfd feature rows: feature, origin, `UFFD_FEATURE_*` name, bit.
const UFFD_FEATURE_ROWS: &[(&str, &str, &str, u64)] = &[
    (
        UFFD_MINOR_SHMEM,
        "Linux 5.14",
        "UFFD_FEATURE_MINOR_SHMEM",
        sys::UFFD_FEATURE_MINOR_SHMEM,
    ),
    (
        UFFD_RWP,
        "Linux 7.3",
        "UFFD_FEATURE_RWP",
        sys::UFFD_FEATURE_RWP,
    ),
    (
        UFFD_MOVE,
        "Linux 6.8",
        "UFFD_FEATURE_MOVE",
        sys::UFFD_FEATURE_MOVE,
    ),
    (
        UFFD_POISON,
        "Linux 6.6",
        "UFFD_FEATURE_POISON",
        sys::UFFD_FEATURE_POISON,
    ),
];
const _: () = assert!(sys::UFFD_FEATURE_RWP == 1 << 17);

/// The origin of the `UFFDIO_REGISTER`-on-guest_memfd row: the series that
/// adds it defines no uAPI, so behaviour is the only evidence.
const UFFD_ON_GMEM_ORIGIN: &str = "RFC (rppt), Mar 2026";

// ---------------------------------------------------------------------------
// Plain data
// ---------------------------------------------------------------------------

/// Where opening and querying KVM stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmStage {
    /// `open(path, O_RDWR | O_CLOEXEC)` ([`KvmDevice::open_path`]).
    Open,
    /// `KVM_CREATE_VM` with [`VM_TYPE`].
    CreateVm,
    /// [`Capabilities::query`].
    Query,
}

impl KvmStage {
    /// A short stable name (`"open"`, `"create_vm"`, `"query"`).
    pub fn as_str(self) -> &'static str {
        match self {
            KvmStage::Open => "open",
            KvmStage::CreateVm => "create_vm",
            KvmStage::Query => "query",
        }
    }

    fn ctx(self) -> Ctx {
        match self {
            KvmStage::Open => Ctx::KvmOpen,
            KvmStage::CreateVm => Ctx::CreateVm,
            KvmStage::Query => Ctx::KvmIoctl,
        }
    }
}

/// Why KVM could not be queried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmFailure {
    /// The step that failed.
    pub stage: KvmStage,
    /// The operation the crate names (`"KVM_CHECK_EXTENSION"`).
    pub op: String,
    /// The errno, its name, message and meaning; `None` for a failure the
    /// crate reports without one (a path with a NUL byte).
    pub os: Option<OsError>,
    /// The crate's error message.
    pub message: String,
}

impl KvmFailure {
    fn new(stage: KvmStage, e: &kvm_gmem::Error) -> Self {
        let op = match e {
            kvm_gmem::Error::Kernel { op, .. } => (*op).to_string(),
            _ => match stage {
                KvmStage::Open => "open".to_string(),
                KvmStage::CreateVm => "KVM_CREATE_VM".to_string(),
                KvmStage::Query => "KVM_CHECK_EXTENSION".to_string(),
            },
        };
        KvmFailure {
            stage,
            op,
            os: e.errno().map(|n| OsError::new(stage.ctx(), n.0)),
            message: e.to_string(),
        }
    }

    /// `cannot open: ENOENT (errno 2): No such file or directory`.
    pub fn describe(&self) -> String {
        let what = match self.stage {
            KvmStage::Open => "cannot open".to_string(),
            KvmStage::CreateVm => format!("KVM_CREATE_VM (type {}) failed", VM_TYPE.0),
            KvmStage::Query => format!("the capability query failed at {}", self.op),
        };
        match &self.os {
            Some(os) => format!("{what}: {}", os.short()),
            None => format!("{what}: {}", self.message),
        }
    }
}

/// The KVM device and the VM the report is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmStatus {
    /// The device node.
    pub path: PathBuf,
    /// `None` when the device opened, the VM was created and queried.
    pub failure: Option<KvmFailure>,
}

impl KvmStatus {
    /// The one-line status: `"ok"` or `"cannot open: ..."`.
    pub fn describe(&self) -> String {
        match &self.failure {
            None => format!(
                "ok (opened; a VM of type {} created and queried)",
                VM_TYPE.0
            ),
            Some(f) => f.describe(),
        }
    }
}

/// Everything `gmem probe` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `uname(2)`.
    pub kernel: Outcome<Kernel>,
    /// The KVM device.
    pub kvm: KvmStatus,
    /// The userfaultfd device, as the raw probe saw it.
    pub uffd: UffdReport,
    /// [`Capabilities::rows`], or [`unavailable_rows`] when KVM could not
    /// be queried.
    pub kvm_rows: Vec<Row>,
    /// The userfaultfd rows: [`UFFD`], the feature bits, [`UFFD_ON_GMEM`].
    pub uffd_rows: Vec<Row>,
}

impl Report {
    /// Every row, KVM first.
    pub fn rows(&self) -> impl Iterator<Item = (&'static str, &Row)> {
        let kvm = self.kvm_rows.iter().map(|r| ("kvm", r));
        kvm.chain(self.uffd_rows.iter().map(|r| ("userfaultfd", r)))
    }

    /// Why a device is unusable, one line each; empty when both work
    /// (`gmem probe --strict` exits 1 when this is not empty).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(f) = &self.kvm.failure {
            out.push(format!("{}: {}", self.kvm.path.display(), f.describe()));
        }
        out.extend(self.uffd.problems());
        out
    }
}

// ---------------------------------------------------------------------------
// Collection
// ---------------------------------------------------------------------------

fn open_kvm(path: &Path) -> Result<(KvmDevice, Vm, Capabilities), Box<KvmFailure>> {
    let fail = |stage| move |e| Box::new(KvmFailure::new(stage, &e));
    let kvm = KvmDevice::open_path(path).map_err(fail(KvmStage::Open))?;
    let vm = kvm.create_vm(VM_TYPE).map_err(fail(KvmStage::CreateVm))?;
    let caps = Capabilities::query(&kvm, &vm, VM_TYPE).map_err(fail(KvmStage::Query))?;
    Ok((kvm, vm, caps))
}

fn unprobed(feature: &'static str, origin: &'static str, why: &str) -> Row {
    Row {
        feature,
        origin,
        supported: false,
        evidence: format!("not probed: {why}"),
    }
}

/// Why there is no userfaultfd, from the raw probe's report.
fn no_uffd(u: &UffdReport) -> String {
    let mut why = u.problems();
    if let Some(Err(e)) = &u.syscall {
        why.push(format!("userfaultfd(2): {}", e.short()));
    }
    if why.is_empty() {
        "no userfaultfd could be created".to_string()
    } else {
        why.join("; ")
    }
}

fn via(u: &UffdReport) -> String {
    match u.via {
        Some(UffdVia::Device) => u.path.display().to_string(),
        Some(UffdVia::Syscall) => "the userfaultfd(2) syscall".to_string(),
        None => "nothing".to_string(),
    }
}

fn uffd_feature_rows(u: &UffdReport) -> Vec<Row> {
    let features = match &u.api {
        Some(Ok(api)) => Ok(api.features),
        _ => Err(no_uffd(u)),
    };
    let mut rows = vec![match &features {
        Ok(f) => Row {
            feature: UFFD,
            origin: "Linux 4.3",
            supported: true,
            evidence: format!("features {f:#x} via {}", via(u)),
        },
        Err(why) => Row {
            feature: UFFD,
            origin: "Linux 4.3",
            supported: false,
            evidence: why.clone(),
        },
    }];
    for &(feature, origin, name, mask) in UFFD_FEATURE_ROWS {
        let bit = mask.trailing_zeros();
        rows.push(match &features {
            Ok(f) => {
                let set = f & mask != 0;
                let mut evidence = format!(
                    "{name} (bit {bit}) {} in UFFDIO_API features {f:#x}",
                    if set { "set" } else { "not set" }
                );
                if set && mask == sys::UFFD_FEATURE_RWP {
                    evidence.push_str(
                        " (older guest_memfd userfaultfd RFCs numbered MINOR_GUEST_MEMFD bit 17 too)",
                    );
                }
                Row {
                    feature,
                    origin,
                    supported: set,
                    evidence,
                }
            }
            Err(_) => unprobed(feature, origin, "no userfaultfd"),
        });
    }
    rows
}

fn errno_text(errno: i32) -> String {
    probe::errno_name(errno).map_or_else(|| format!("errno {errno}"), str::to_string)
}

/// `UFFDIO_REGISTER` (MISSING) of a one-page guest_memfd mapping
/// (`MMAP | INIT_SHARED`) on `vm` with a fresh userfaultfd from `uffd_path`;
/// unregistered again when it succeeds. The mapping is never touched.
fn uffd_on_guest_memfd(vm: Result<&Vm, String>, uffd_path: &Path) -> Row {
    let no = |why: &str| unprobed(UFFD_ON_GMEM, UFFD_ON_GMEM_ORIGIN, why);
    let vm = match vm {
        Ok(vm) => vm,
        Err(why) => return no(&why),
    };
    let gmem = match GuestMemfd::builder(kvm_gmem::page_size())
        .mmap(true)
        .init_shared(true)
        .create(vm)
    {
        Ok(g) => g,
        Err(e) => return no(&format!("no guest_memfd with MMAP|INIT_SHARED: {e}")),
    };
    let map = match gmem.map() {
        Ok(m) => m,
        Err(e) => return no(&format!("the guest_memfd could not be mapped: {e}")),
    };
    let (report, uffd) = probe::open_uffd(uffd_path);
    let Some(uffd) = uffd else {
        return no(&no_uffd(&report));
    };
    let answered = |e: &uffd_gmem::Error| match e.errno() {
        Some(n) => errno_text(n.0),
        // register_guest_memfd's one refusal without an errno is EINVAL,
        // read as the kernel lacking userfaultfd on guest_memfd.
        None if e.is_unsupported() => errno_text(libc::EINVAL),
        None => e.to_string(),
    };
    // Nothing accesses the mapping while it is registered, so no fault ever
    // waits on this userfaultfd; it is unregistered before `map` drops.
    let (supported, evidence) = match uffd.register_guest_memfd(&map, RegisterMode::MISSING) {
        Err(e) => (
            false,
            format!(
                "UFFDIO_REGISTER on a guest_memfd mapping answered {}",
                answered(&e)
            ),
        ),
        Ok(ioctls) => {
            let mut evidence = format!(
                "UFFDIO_REGISTER (MISSING) on a guest_memfd mapping succeeded (range ioctls {:#x})",
                ioctls.bits()
            );
            if let Err(e) = uffd.unregister(map.addr()..map.addr() + map.len() as u64) {
                let _ = write!(evidence, "; UFFDIO_UNREGISTER answered {}", answered(&e));
            }
            (true, evidence)
        }
    };
    drop(uffd);
    drop(map);
    Row {
        feature: UFFD_ON_GMEM,
        origin: UFFD_ON_GMEM_ORIGIN,
        supported,
        evidence,
    }
}

/// Probes `kvm_path` and `uffd_path` (normally `/dev/kvm` and
/// `/dev/userfaultfd`) and the running kernel. Never panics; every fd it
/// opens is closed before it returns.
pub fn collect(kvm_path: &Path, uffd_path: &Path) -> Report {
    let opened = open_kvm(kvm_path);
    let uffd = probe::open_uffd(uffd_path).0;
    let (kvm_rows, failure, gmem_row) = match &opened {
        Ok((_kvm, vm, caps)) => (caps.rows(), None, uffd_on_guest_memfd(Ok(vm), uffd_path)),
        Err(f) => {
            let why = format!("{}: {}", kvm_path.display(), f.describe());
            let rows = unavailable_rows(&format!("not probed: {why}"));
            (
                rows,
                Some(KvmFailure::clone(f)),
                uffd_on_guest_memfd(Err(why), uffd_path),
            )
        }
    };
    drop(opened);
    let mut uffd_rows = uffd_feature_rows(&uffd);
    uffd_rows.push(gmem_row);
    Report {
        kernel: probe::uname(),
        kvm: KvmStatus {
            path: kvm_path.to_path_buf(),
            failure,
        },
        uffd,
        kvm_rows,
        uffd_rows,
    }
}

// ---------------------------------------------------------------------------
// Table
// ---------------------------------------------------------------------------

/// Width of the header's label column.
const HEAD_W: usize = 14;
/// Indent of a row's evidence lines.
const EVIDENCE_INDENT: usize = 4;
/// The narrowest the text is wrapped to.
const MIN_WIDTH: usize = 80;

/// The status column's text.
pub fn status(supported: bool) -> &'static str {
    if supported {
        "supported"
    } else {
        "not supported"
    }
}

/// Splits `text` into lines of at most `width` characters at spaces; a word
/// longer than `width` gets a line of its own.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

fn head(out: &mut String, label: &str, value: &str, width: usize) {
    for (i, line) in wrap(value, width - HEAD_W).iter().enumerate() {
        let label = if i == 0 { label } else { "" };
        let _ = writeln!(out, "{label:<HEAD_W$}{line}");
    }
}

fn head_failed(out: &mut String, label: &str, what: &str, e: Option<&OsError>, width: usize) {
    head(out, label, what, width);
    if let Some(hint) = e.and_then(|e| e.hint) {
        head(out, "", &format!("-> {hint}"), width);
    }
}

fn uffd_head(out: &mut String, u: &UffdReport, width: usize) {
    let path = u.path.display();
    match (&u.open, &u.ioc_new) {
        (Err(e), _) => head_failed(
            out,
            "userfaultfd",
            &format!("{path}: cannot open: {}", e.short()),
            Some(e),
            width,
        ),
        (Ok(()), Some(Err(e))) => head_failed(
            out,
            "userfaultfd",
            &format!("{path}: USERFAULTFD_IOC_NEW failed: {}", e.short()),
            Some(e),
            width,
        ),
        (Ok(()), _) => head(
            out,
            "userfaultfd",
            &format!("{path}: ok (USERFAULTFD_IOC_NEW)"),
            width,
        ),
    }
    match &u.syscall {
        None => {}
        Some(Ok(())) => head(
            out,
            "",
            "the userfaultfd(2) syscall worked: used instead",
            width,
        ),
        Some(Err(e)) => head_failed(
            out,
            "",
            &format!("userfaultfd(2) syscall: {}", e.short()),
            Some(e),
            width,
        ),
    }
    match &u.api {
        Some(Err(e)) => head_failed(
            out,
            "",
            &format!("UFFDIO_API failed: {}", e.short()),
            Some(e),
            width,
        ),
        Some(Ok(api)) => head(
            out,
            "",
            &format!(
                "UFFDIO_API: api {:#x}, features {:#x}",
                api.api, api.features
            ),
            width,
        ),
        None => {}
    }
}

/// The human-readable report: a header (kernel, devices), then one row per
/// feature with its status and origin, its evidence wrapped beneath it.
pub fn render_table(r: &Report) -> String {
    let rows: Vec<&Row> = r.rows().map(|(_, row)| row).collect();
    let feature_w = rows
        .iter()
        .map(|row| row.feature.chars().count())
        .chain(["FEATURE".len()])
        .max()
        .unwrap_or(0);
    let status_w = status(false).len();
    let origin_w = rows
        .iter()
        .map(|row| row.origin.chars().count())
        .chain(["ORIGIN".len()])
        .max()
        .unwrap_or(0);
    let width = (feature_w + 2 + status_w + 2 + origin_w).max(MIN_WIDTH);

    let mut out = String::new();
    out.push_str(
        "gmem probe: KVM guest_memfd and userfaultfd support, feature by feature \
         (--raw: the kernel's raw answers)\n\n",
    );
    match &r.kernel {
        Ok(k) => head(
            &mut out,
            "kernel",
            &format!("{} ({})", k.release, k.machine),
            width,
        ),
        Err(e) => head_failed(
            &mut out,
            "kernel",
            &format!("uname failed: {}", e.short()),
            Some(e),
            width,
        ),
    }
    let kvm = r.kvm.path.display();
    match &r.kvm.failure {
        None => head(
            &mut out,
            "KVM",
            &format!("{kvm}: {}", r.kvm.describe()),
            width,
        ),
        Some(f) => head_failed(
            &mut out,
            "KVM",
            &format!("{kvm}: {}", f.describe()),
            f.os.as_ref(),
            width,
        ),
    }
    uffd_head(&mut out, &r.uffd, width);

    out.push('\n');
    let line = |out: &mut String, f: &str, s: &str, o: &str| {
        let text = format!("{f:<feature_w$}  {s:<status_w$}  {o}");
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(&mut out, "FEATURE", "STATUS", "ORIGIN");
    let evidence_w = width - EVIDENCE_INDENT;
    let mut group = None;
    for (g, row) in r.rows() {
        if group.is_some_and(|prev| prev != g) {
            out.push('\n');
        }
        group = Some(g);
        line(&mut out, row.feature, status(row.supported), row.origin);
        for l in wrap(&row.evidence, evidence_w) {
            let _ = writeln!(out, "{:EVIDENCE_INDENT$}{l}", "");
        }
    }
    let supported = rows.iter().filter(|row| row.supported).count();
    let _ = writeln!(out, "\n{supported} of {} features supported.", rows.len());
    out
}

// ---------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------

fn json_kvm(k: &KvmStatus) -> Json {
    let mut fields = vec![
        ("path", Json::str(k.path.to_string_lossy())),
        ("ok", Json::Bool(k.failure.is_none())),
        ("vm_type", Json::Int(VM_TYPE.0.into())),
    ];
    match &k.failure {
        None => {
            fields.push(("stage", Json::Null));
            fields.push(("error", Json::Null));
        }
        Some(f) => {
            fields.push(("stage", Json::str(f.stage.as_str())));
            let mut error = match &f.os {
                Some(os) => match probe::json_error(os) {
                    Json::Obj(v) => v,
                    other => vec![("error", other)],
                },
                None => vec![("ok", Json::Bool(false))],
            };
            error.push(("op", Json::str(&f.op)));
            error.push(("description", Json::str(f.describe())));
            fields.push(("error", Json::Obj(error)));
        }
    }
    Json::Obj(fields)
}

fn json_uffd_device(u: &UffdReport) -> Json {
    let usable = matches!(u.api, Some(Ok(_)));
    Json::Obj(vec![
        ("path", Json::str(u.path.to_string_lossy())),
        ("ok", Json::Bool(u.problems().is_empty() && usable)),
        ("open", probe::json_outcome(&u.open, |()| Vec::new())),
        ("via", u.via.map_or(Json::Null, |v| Json::str(v.as_str()))),
    ])
}

/// The same data as [`render_table`], as JSON: `kernel`, `devices`, `rows`
/// (feature, origin, supported, evidence, group), the raw `userfaultfd`
/// section and `problems`.
pub fn render_json(r: &Report) -> String {
    let rows = r
        .rows()
        .map(|(group, row)| {
            Json::Obj(vec![
                ("feature", Json::str(row.feature)),
                ("origin", Json::str(row.origin)),
                ("supported", Json::Bool(row.supported)),
                ("evidence", Json::str(&row.evidence)),
                ("group", Json::str(group)),
            ])
        })
        .collect();
    Json::Obj(vec![
        ("report", Json::str("typed")),
        ("kernel", probe::json_kernel(&r.kernel)),
        (
            "devices",
            Json::Obj(vec![
                ("kvm", json_kvm(&r.kvm)),
                ("userfaultfd", json_uffd_device(&r.uffd)),
            ]),
        ),
        ("rows", Json::Arr(rows)),
        ("userfaultfd", probe::json_uffd(&r.uffd)),
        (
            "problems",
            Json::Arr(r.problems().into_iter().map(Json::Str).collect()),
        ),
    ])
    .render()
}
