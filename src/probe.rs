//! `gmem probe --raw`: the host's **raw** support table for KVM guest_memfd
//! and userfaultfd. (`gmem probe` alone prints the typed report of
//! `report.rs`, which reuses this module's userfaultfd probe, errno texts and
//! JSON writer.)
//!
//! Everything here is what the kernel answers to `uname(2)`,
//! `KVM_GET_API_VERSION`, `KVM_CREATE_VM`, `KVM_CHECK_EXTENSION` (on `/dev/kvm`
//! and on a default VM fd: the answers can differ per VM) and `UFFDIO_API`.
//! Nothing is probed by behaviour: a capability number alone (245 above all)
//! does not prove that a kernel has a feature. The KVM calls are made by
//! kvm-gmem ([`KvmDevice`], [`VmOps::extension`]), the userfaultfd ones by
//! uffd-gmem ([`Uffd::builder`]); this module only issues `uname(2)` and
//! opens the userfaultfd node to report that step on its own.
//!
//! [`collect`] gathers a plain-data [`Report`]; [`render_table`] and
//! [`render_json`] turn it into text. A missing or denied device is a row of
//! the report, never a panic. Every fd is closed before [`collect`] returns.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

use kvm_gmem::{Extension, KvmDevice, VmOps, VmType};
use kvm_gmem_sys as sys;
use uffd_gmem::{Origin, Uffd};

/// The KVM device node probed by default.
pub const DEFAULT_KVM_PATH: &str = "/dev/kvm";
/// The userfaultfd device node probed by default.
pub const DEFAULT_UFFD_PATH: &str = "/dev/userfaultfd";

/// The VM type asked of `KVM_CREATE_VM`: the default VM on every architecture.
pub const VM_TYPE: u64 = 0;

// ---------------------------------------------------------------------------
// Plain data
// ---------------------------------------------------------------------------

/// A failed system call: errno, its symbolic name, the C library's message
/// and, where the errno has a well-known meaning in its context, what it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsError {
    /// The errno value; `None` where the crate that made the call reported
    /// the failure in words only.
    pub errno: Option<i32>,
    /// The symbolic name (`"ENOENT"`), or `"errno <n>"` when not in the table
    /// (empty without an errno).
    pub name: String,
    /// `strerror` text, or the crate's message without an errno.
    pub message: String,
    /// What this errno means for the call that failed, if known.
    pub hint: Option<&'static str>,
}

/// Either the value a call returned or how it failed.
pub type Outcome<T> = Result<T, OsError>;

/// The answers of `uname(2)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// `uname -r`.
    pub release: String,
    /// `uname -m`.
    pub machine: String,
}

/// One bit of a mask and its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bit {
    /// The bit number.
    pub bit: u32,
    /// The name printed for it.
    pub name: &'static str,
}

impl Bit {
    const fn at(bit: u32, name: &'static str) -> Self {
        Bit { bit, name }
    }

    /// The bit of a one-bit mask such as `UFFD_FEATURE_MOVE`.
    const fn of_mask(mask: u64, name: &'static str) -> Self {
        assert!(mask.count_ones() == 1);
        Bit {
            bit: mask.trailing_zeros(),
            name,
        }
    }
}

/// How a capability's value reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapKind {
    /// A count or a yes/no: printed in decimal.
    Value,
    /// A mask with named bits: decimal, hex and the names of the set bits.
    Mask(&'static [Bit]),
    /// A mask this architecture has no names for: decimal and hex only.
    #[cfg_attr(
        target_arch = "x86_64",
        allow(dead_code, reason = "VM_TYPES elsewhere")
    )]
    RawMask,
}

/// One `KVM_CHECK_EXTENSION` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapRow {
    /// The row's name: the C name, or the description of an ambiguous number.
    pub name: &'static str,
    /// The capability number passed to `KVM_CHECK_EXTENSION`.
    pub cap: u32,
    /// How to read the value.
    pub kind: CapKind,
    /// The answer on `/dev/kvm`; `None` when `/dev/kvm` did not open.
    pub system: Option<Outcome<i32>>,
    /// The answer on the VM fd; `None` when no VM was created.
    pub vm: Option<Outcome<i32>>,
}

impl CapRow {
    /// The names of the set bits of `value` (empty for non-masks); bits
    /// without a name are gathered into one `"unknown 0x..."` entry.
    pub fn decode(&self, value: i32) -> Vec<String> {
        match self.kind {
            CapKind::Mask(bits) => decode_bits(u64::from(value as u32), bits),
            CapKind::Value | CapKind::RawMask => Vec::new(),
        }
    }

    /// Whether the value is a mask (printed in decimal and hex).
    pub fn is_mask(&self) -> bool {
        !matches!(self.kind, CapKind::Value)
    }
}

/// The KVM part of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmReport {
    /// The device node probed.
    pub path: PathBuf,
    /// Opening it `O_RDWR | O_CLOEXEC`.
    pub open: Outcome<()>,
    /// `KVM_GET_API_VERSION`; `None` when the device did not open.
    pub api_version: Option<Outcome<i32>>,
    /// `KVM_CREATE_VM` with type [`VM_TYPE`]; `None` when the device did not open.
    pub vm: Option<Outcome<()>>,
    /// Every capability row, always all of them (values `None` when not asked).
    pub caps: Vec<CapRow>,
}

/// How the userfaultfd was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdVia {
    /// `USERFAULTFD_IOC_NEW` on the device node.
    Device,
    /// The `userfaultfd(2)` system call.
    Syscall,
}

impl UffdVia {
    /// A short stable name (`"device"`, `"syscall"`).
    pub fn as_str(self) -> &'static str {
        match self {
            UffdVia::Device => "device",
            UffdVia::Syscall => "syscall",
        }
    }
}

/// What `UFFDIO_API` (api = `UFFD_API`, features = 0) returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UffdApi {
    /// The `api` field after the call.
    pub api: u64,
    /// Every feature the kernel supports.
    pub features: u64,
    /// The ioctls available on the userfaultfd, as a mask of `_UFFDIO_*` bits.
    pub ioctls: u64,
}

/// The userfaultfd part of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UffdReport {
    /// The device node probed.
    pub path: PathBuf,
    /// Opening it `O_RDWR | O_CLOEXEC`.
    pub open: Outcome<()>,
    /// `USERFAULTFD_IOC_NEW` on it; `None` when the device did not open.
    pub ioc_new: Option<Outcome<()>>,
    /// The `userfaultfd(2)` fallback; `None` when not tried (it is tried only
    /// when the device is missing or denied).
    pub syscall: Option<Outcome<()>>,
    /// Which path gave the userfaultfd; `None` when none did.
    pub via: Option<UffdVia>,
    /// `UFFDIO_API` on it; `None` when there is no userfaultfd.
    pub api: Option<Outcome<UffdApi>>,
}

/// Everything `gmem probe` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `uname(2)`.
    pub kernel: Outcome<Kernel>,
    /// KVM.
    pub kvm: KvmReport,
    /// userfaultfd.
    pub uffd: UffdReport,
}

impl Report {
    /// Why a device is unusable, one line each; empty when both work
    /// (`gmem probe --strict` exits 1 when this is not empty).
    pub fn problems(&self) -> Vec<String> {
        let mut out = self.kvm.problems();
        out.extend(self.uffd.problems());
        out
    }
}

impl KvmReport {
    /// Why the KVM device is unusable, one line each; empty when it works.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let kvm = self.path.display();
        match (&self.open, &self.api_version, &self.vm) {
            (Err(e), _, _) => out.push(format!("{kvm}: cannot open: {}", e.short())),
            (Ok(()), Some(Err(e)), _) => {
                out.push(format!("{kvm}: KVM_GET_API_VERSION failed: {}", e.short()))
            }
            (Ok(()), Some(Ok(v)), _) if *v != sys::KVM_API_VERSION => out.push(format!(
                "{kvm}: KVM_GET_API_VERSION is {v}, expected {}",
                sys::KVM_API_VERSION
            )),
            (Ok(()), _, Some(Err(e))) => out.push(format!(
                "{kvm}: KVM_CREATE_VM (type {VM_TYPE}) failed: {}",
                e.short()
            )),
            _ => {}
        }
        out
    }
}

impl UffdReport {
    /// Why no userfaultfd could be had from the device, one line each; empty
    /// when it works.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let uffd = self.path.display();
        match (&self.open, &self.ioc_new) {
            (Err(e), _) => out.push(format!("{uffd}: cannot open: {}", e.short())),
            (Ok(()), Some(Err(e))) => {
                out.push(format!("{uffd}: USERFAULTFD_IOC_NEW failed: {}", e.short()))
            }
            _ => {}
        }
        if let Some(Err(e)) = &self.api {
            out.push(format!("userfaultfd: UFFDIO_API failed: {}", e.short()));
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Name tables
// ---------------------------------------------------------------------------

/// `KVM_MEMORY_ATTRIBUTE_*`.
pub const MEMORY_ATTRIBUTE_BITS: &[Bit] =
    &[Bit::of_mask(sys::KVM_MEMORY_ATTRIBUTE_PRIVATE, "PRIVATE")];

/// `GUEST_MEMFD_FLAG_*`, upstream and Firecracker's RFC bits.
pub const GUEST_MEMFD_FLAG_BITS: &[Bit] = &[
    Bit::of_mask(sys::GUEST_MEMFD_FLAG_MMAP, "MMAP"),
    Bit::of_mask(sys::GUEST_MEMFD_FLAG_INIT_SHARED, "INIT_SHARED"),
    Bit::of_mask(
        RFC_NO_DIRECT_MAP,
        "bit 2 (RFC NO_DIRECT_MAP in Firecracker's stack)",
    ),
    Bit::of_mask(RFC_WRITE, "bit 3 (RFC WRITE in Firecracker's stack)"),
];

#[cfg(feature = "rfc-no-direct-map")]
const RFC_NO_DIRECT_MAP: u64 = sys::rfc::no_direct_map::GUEST_MEMFD_FLAG_NO_DIRECT_MAP;
#[cfg(not(feature = "rfc-no-direct-map"))]
const RFC_NO_DIRECT_MAP: u64 = 1 << 2;
#[cfg(feature = "rfc-gmem-write")]
const RFC_WRITE: u64 = sys::rfc::gmem_write::GUEST_MEMFD_FLAG_WRITE;
#[cfg(not(feature = "rfc-gmem-write"))]
const RFC_WRITE: u64 = 1 << 3;
const _: () = assert!(RFC_NO_DIRECT_MAP == 1 << 2 && RFC_WRITE == 1 << 3);

/// The capability number that upstream and Firecracker's stack disagree on.
pub const CAP_245: u32 = sys::KVM_CAP_ARM_SEA_TO_USER;
#[cfg(feature = "rfc-kvm-userfault")]
const _: () = assert!(CAP_245 == sys::rfc::kvm_userfault::KVM_CAP_USERFAULT);
const _: () = assert!(CAP_245 == 245);

/// `KVM_CAP_VM_TYPES` bits: bit n is VM type n.
#[cfg(target_arch = "x86_64")]
pub const VM_TYPES: CapKind = CapKind::Mask(&[
    Bit::of_mask(1 << sys::KVM_X86_DEFAULT_VM, "KVM_X86_DEFAULT_VM"),
    Bit::of_mask(1 << sys::KVM_X86_SW_PROTECTED_VM, "KVM_X86_SW_PROTECTED_VM"),
    Bit::of_mask(1 << sys::KVM_X86_SEV_VM, "KVM_X86_SEV_VM"),
    Bit::of_mask(1 << sys::KVM_X86_SEV_ES_VM, "KVM_X86_SEV_ES_VM"),
    Bit::of_mask(1 << sys::KVM_X86_SNP_VM, "KVM_X86_SNP_VM"),
    Bit::of_mask(1 << sys::KVM_X86_TDX_VM, "KVM_X86_TDX_VM"),
]);
/// `KVM_CAP_VM_TYPES` bits: no names on this architecture.
#[cfg(not(target_arch = "x86_64"))]
pub const VM_TYPES: CapKind = CapKind::RawMask;

/// The capability rows, in print order.
const CAPS: &[(&str, u32, CapKind)] = &[
    (
        "KVM_CAP_USER_MEMORY2",
        sys::KVM_CAP_USER_MEMORY2,
        CapKind::Value,
    ),
    (
        "KVM_CAP_MEMORY_FAULT_INFO",
        sys::KVM_CAP_MEMORY_FAULT_INFO,
        CapKind::Value,
    ),
    (
        "KVM_CAP_MEMORY_ATTRIBUTES",
        sys::KVM_CAP_MEMORY_ATTRIBUTES,
        CapKind::Mask(MEMORY_ATTRIBUTE_BITS),
    ),
    (
        "KVM_CAP_GUEST_MEMFD",
        sys::KVM_CAP_GUEST_MEMFD,
        CapKind::Value,
    ),
    ("KVM_CAP_VM_TYPES", sys::KVM_CAP_VM_TYPES, VM_TYPES),
    (
        "KVM_CAP_PRE_FAULT_MEMORY",
        sys::KVM_CAP_PRE_FAULT_MEMORY,
        CapKind::Value,
    ),
    (
        "KVM_CAP_GUEST_MEMFD_FLAGS",
        sys::KVM_CAP_GUEST_MEMFD_FLAGS,
        CapKind::Mask(GUEST_MEMFD_FLAG_BITS),
    ),
    (
        "KVM_CAP_NR_MEMSLOTS",
        sys::KVM_CAP_NR_MEMSLOTS,
        CapKind::Value,
    ),
    (
        "KVM_CAP_MULTI_ADDRESS_SPACE",
        sys::KVM_CAP_MULTI_ADDRESS_SPACE,
        CapKind::Value,
    ),
    (
        "245 (upstream>=6.19: ARM_SEA_TO_USER; Firecracker 6.18: USERFAULT)",
        CAP_245,
        CapKind::Value,
    ),
];

/// Every `UFFD_FEATURE_*` of Linux 7.3, without the prefix.
pub const UFFD_FEATURE_BITS: &[Bit] = &[
    Bit::of_mask(sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
    Bit::of_mask(sys::UFFD_FEATURE_EVENT_FORK, "EVENT_FORK"),
    Bit::of_mask(sys::UFFD_FEATURE_EVENT_REMAP, "EVENT_REMAP"),
    Bit::of_mask(sys::UFFD_FEATURE_EVENT_REMOVE, "EVENT_REMOVE"),
    Bit::of_mask(sys::UFFD_FEATURE_MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
    Bit::of_mask(sys::UFFD_FEATURE_MISSING_SHMEM, "MISSING_SHMEM"),
    Bit::of_mask(sys::UFFD_FEATURE_EVENT_UNMAP, "EVENT_UNMAP"),
    Bit::of_mask(sys::UFFD_FEATURE_SIGBUS, "SIGBUS"),
    Bit::of_mask(sys::UFFD_FEATURE_THREAD_ID, "THREAD_ID"),
    Bit::of_mask(sys::UFFD_FEATURE_MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
    Bit::of_mask(sys::UFFD_FEATURE_MINOR_SHMEM, "MINOR_SHMEM"),
    Bit::of_mask(sys::UFFD_FEATURE_EXACT_ADDRESS, "EXACT_ADDRESS"),
    Bit::of_mask(sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
    Bit::of_mask(sys::UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED"),
    Bit::of_mask(sys::UFFD_FEATURE_POISON, "POISON"),
    Bit::of_mask(sys::UFFD_FEATURE_WP_ASYNC, "WP_ASYNC"),
    Bit::of_mask(sys::UFFD_FEATURE_MOVE, "MOVE"),
    Bit::of_mask(sys::UFFD_FEATURE_RWP, "RWP"),
    Bit::of_mask(sys::UFFD_FEATURE_RWP_ASYNC, "RWP_ASYNC"),
];
const _: () = assert!(UFFD_FEATURE_BITS.len() == 19);
const _: () = assert!(mask_of(UFFD_FEATURE_BITS) == sys::UFFD_API_FEATURES);

/// Every `_UFFDIO_*` ioctl bit of Linux 7.3, without the prefix.
pub const UFFD_IOCTL_BITS: &[Bit] = &[
    Bit::at(sys::_UFFDIO_REGISTER, "REGISTER"),
    Bit::at(sys::_UFFDIO_UNREGISTER, "UNREGISTER"),
    Bit::at(sys::_UFFDIO_WAKE, "WAKE"),
    Bit::at(sys::_UFFDIO_COPY, "COPY"),
    Bit::at(sys::_UFFDIO_ZEROPAGE, "ZEROPAGE"),
    Bit::at(sys::_UFFDIO_MOVE, "MOVE"),
    Bit::at(sys::_UFFDIO_WRITEPROTECT, "WRITEPROTECT"),
    Bit::at(sys::_UFFDIO_CONTINUE, "CONTINUE"),
    Bit::at(sys::_UFFDIO_POISON, "POISON"),
    Bit::at(sys::_UFFDIO_RWPROTECT, "RWPROTECT"),
    Bit::at(sys::_UFFDIO_SET_MODE, "SET_MODE"),
    Bit::at(sys::_UFFDIO_API, "API"),
];
const _: () =
    assert!(mask_of(UFFD_IOCTL_BITS) == sys::UFFD_API_IOCTLS | sys::UFFD_API_RANGE_IOCTLS);

const fn mask_of(bits: &[Bit]) -> u64 {
    let mut mask = 0;
    let mut i = 0;
    while i < bits.len() {
        mask |= 1 << bits[i].bit;
        i += 1;
    }
    mask
}

/// The names of the set bits of `value`; bits without a name become one
/// `"unknown 0x..."` entry.
pub fn decode_bits(value: u64, bits: &[Bit]) -> Vec<String> {
    let mut names: Vec<String> = bits
        .iter()
        .filter(|b| value & (1 << b.bit) != 0)
        .map(|b| b.name.to_string())
        .collect();
    let unknown = value & !mask_of(bits);
    if unknown != 0 {
        names.push(format!("unknown {unknown:#x}"));
    }
    names
}

// ---------------------------------------------------------------------------
// System calls
// ---------------------------------------------------------------------------

/// Where a call failed, for the meaning of its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ctx {
    /// `uname(2)`.
    Uname,
    /// Opening the KVM device node.
    KvmOpen,
    /// An ioctl on the KVM device or a VM.
    KvmIoctl,
    /// `KVM_CREATE_VM`.
    CreateVm,
    /// Opening the userfaultfd device node.
    UffdOpen,
    /// `USERFAULTFD_IOC_NEW`.
    UffdIocNew,
    /// The `userfaultfd(2)` system call.
    UffdSyscall,
    /// `UFFDIO_API`.
    UffdApi,
}

/// The symbolic name of `errno` (`"EINVAL"`), when the crates' `Errno`
/// knows it.
pub fn errno_name(errno: i32) -> Option<&'static str> {
    kvm_gmem::Errno(errno).name()
}

fn hint(ctx: Ctx, errno: i32) -> Option<&'static str> {
    use Ctx::*;
    Some(match (ctx, errno) {
        (KvmOpen, libc::ENOENT) => {
            "no such device node: the KVM module is not loaded (kvm_intel / kvm_amd / kvm) \
             or this is not a KVM host (no hardware virtualisation, or nested virtualisation off)"
        }
        (KvmOpen, libc::EACCES | libc::EPERM) => {
            "permission denied: add the user to the kvm group (usermod -aG kvm USER, then log \
             in again), or run as root"
        }
        (KvmOpen, libc::ENXIO | libc::ENODEV) => {
            "the device node exists but no KVM driver is behind it: the KVM module is not \
             loaded, or virtualisation is disabled in firmware"
        }
        (CreateVm, libc::EINVAL) => "the kernel does not support this VM type",
        (CreateVm, libc::ENOMEM) => "out of memory creating the VM",
        (CreateVm, libc::EBUSY) => "virtualisation is in use by another hypervisor",
        (UffdOpen, libc::ENOENT) => {
            "no such device node: the kernel is older than 6.1 or built without \
             CONFIG_USERFAULTFD; the userfaultfd(2) syscall is tried instead"
        }
        (UffdOpen, libc::EACCES | libc::EPERM) => {
            "permission denied: the node is root-only by default; grant the user access to \
             it (group, ACL or udev rule) or run as root; the userfaultfd(2) syscall is \
             tried instead"
        }
        (KvmIoctl | CreateVm, libc::ENOTTY) => {
            "the node does not answer KVM ioctls: it is not a KVM device"
        }
        (UffdIocNew, libc::ENOTTY) => {
            "the node does not answer USERFAULTFD_IOC_NEW: it is not the userfaultfd device"
        }
        (UffdSyscall, libc::ENOSYS) => "the kernel has no userfaultfd (CONFIG_USERFAULTFD off)",
        (UffdSyscall, libc::EPERM) => {
            "vm.unprivileged_userfaultfd is 0 and the process lacks CAP_SYS_PTRACE \
             (KVM's faults need a userfaultfd without UFFD_USER_MODE_ONLY)"
        }
        (UffdApi, libc::EINVAL) => "the kernel refused api = UFFD_API (0xaa)",
        _ => return None,
    })
}

impl OsError {
    /// `errno` as it failed in `ctx`: its name, message and meaning there.
    pub fn new(ctx: Ctx, errno: i32) -> Self {
        let text = io::Error::from_raw_os_error(errno).to_string();
        let suffix = format!(" (os error {errno})");
        let message = text.strip_suffix(&suffix).unwrap_or(&text).to_string();
        OsError {
            errno: Some(errno),
            name: errno_name(errno).map_or_else(|| format!("errno {errno}"), str::to_string),
            message,
            hint: hint(ctx, errno),
        }
    }

    /// A failure reported without an errno: `message` says what it was.
    fn untyped(message: String) -> Self {
        OsError {
            errno: None,
            name: String::new(),
            message,
            hint: None,
        }
    }

    fn last(ctx: Ctx) -> Self {
        Self::from_io(ctx, &io::Error::last_os_error())
    }

    fn from_io(ctx: Ctx, err: &io::Error) -> Self {
        // Errors built by std without an errno do not come from the calls made
        // here; EIO stands in should one ever appear.
        Self::new(ctx, err.raw_os_error().unwrap_or(libc::EIO))
    }

    /// A kvm-gmem failure in `ctx`: its errno, or its message.
    fn from_kvm(ctx: Ctx, e: &kvm_gmem::Error) -> Self {
        e.errno()
            .map_or_else(|| Self::untyped(e.to_string()), |n| Self::new(ctx, n.0))
    }

    /// A uffd-gmem failure in `ctx`: its errno, or its message.
    fn from_uffd(ctx: Ctx, e: &uffd_gmem::Error) -> Self {
        e.errno()
            .map_or_else(|| Self::untyped(e.to_string()), |n| Self::new(ctx, n.0))
    }

    /// `ENOTTY (25)`, or `no errno`.
    pub fn code(&self) -> String {
        match self.errno {
            Some(n) => format!("{} ({n})", self.name),
            None => "no errno".to_string(),
        }
    }

    /// `ENOENT (errno 2): No such file or directory`, or the crate's message.
    pub fn short(&self) -> String {
        match self.errno {
            Some(n) => format!("{} (errno {n}): {}", self.name, self.message),
            None => self.message.clone(),
        }
    }
}

fn open_rdwr(path: &Path, ctx: Ctx) -> Outcome<()> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(drop)
        .map_err(|e| OsError::from_io(ctx, &e))
}

/// `uname(2)`: the kernel release and machine.
pub fn uname() -> Outcome<Kernel> {
    // SAFETY: `utsname` is a struct of `c_char` arrays, for which all-zero
    // bytes are a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, exclusively borrowed `utsname` that uname(2)
    // fills in; it lives across the call.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(OsError::last(Ctx::Uname));
    }
    Ok(Kernel {
        release: c_chars(&uts.release),
        machine: c_chars(&uts.machine),
    })
}

fn c_chars(field: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = field
        .iter()
        .map(|&c| c.to_ne_bytes()[0])
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn collect_kvm(path: &Path) -> KvmReport {
    let mut report = KvmReport {
        path: path.to_path_buf(),
        open: Ok(()),
        api_version: None,
        vm: None,
        caps: CAPS
            .iter()
            .map(|&(name, cap, kind)| CapRow {
                name,
                cap,
                kind,
                system: None,
                vm: None,
            })
            .collect(),
    };
    let kvm = match KvmDevice::open_path(path) {
        Ok(kvm) => kvm,
        Err(e) => {
            report.open = Err(OsError::from_kvm(Ctx::KvmOpen, &e));
            return report;
        }
    };
    let ioctl = |e: kvm_gmem::Error| OsError::from_kvm(Ctx::KvmIoctl, &e);
    report.api_version = Some(kvm.api_version().map_err(ioctl));
    let vm = kvm
        .create_vm(VmType(VM_TYPE))
        .map_err(|e| OsError::from_kvm(Ctx::CreateVm, &e));
    for row in &mut report.caps {
        row.system = Some(kvm.extension(Extension(row.cap)).map_err(ioctl));
        if let Ok(vm) = &vm {
            row.vm = Some(vm.extension(Extension(row.cap)).map_err(ioctl));
        }
    }
    report.vm = Some(vm.map(drop));
    report
}

fn collect_uffd(path: &Path) -> UffdReport {
    open_uffd(path).0
}

/// Creates a userfaultfd as [`collect`] does and asks `UFFDIO_API`
/// (features 0) on it: the report, and the userfaultfd when the handshake
/// succeeded.
///
/// uffd-gmem's [`Uffd::builder`] makes the calls: `USERFAULTFD_IOC_NEW` on
/// `path`, or the `userfaultfd(2)` fallback when the node is missing or
/// denied. The node is opened here first, for that step's own row; the
/// syscall is tried only when that open fails with `ENOENT`, `EACCES` or
/// `EPERM`.
pub fn open_uffd(path: &Path) -> (UffdReport, Option<Uffd>) {
    let mut report = UffdReport {
        path: path.to_path_buf(),
        open: Ok(()),
        ioc_new: None,
        syscall: None,
        via: None,
        api: None,
    };
    if let Err(e) = open_rdwr(path, Ctx::UffdOpen) {
        let fall_back = matches!(e.errno, Some(libc::ENOENT | libc::EACCES | libc::EPERM));
        report.open = Err(e);
        if !fall_back {
            return (report, None);
        }
    }
    let device = report.open.is_ok();
    let created = Uffd::builder()
        .device_path(path)
        .non_blocking(true)
        .create();
    let (origin, api) = match created {
        Ok(uffd) => (uffd.origin(), Ok(uffd)),
        // Created by the route tried; the handshake failed.
        Err(uffd_gmem::Error::Kernel {
            op: "UFFDIO_API",
            errno,
        }) => {
            let origin = if device {
                Origin::Device
            } else {
                Origin::Syscall
            };
            (origin, Err(OsError::new(Ctx::UffdApi, errno.0)))
        }
        Err(e) if device => {
            report.ioc_new = Some(Err(OsError::from_uffd(Ctx::UffdIocNew, &e)));
            return (report, None);
        }
        Err(e) => {
            report.syscall = Some(Err(OsError::from_uffd(Ctx::UffdSyscall, &e)));
            return (report, None);
        }
    };
    let via = match origin {
        Origin::Device => UffdVia::Device,
        _ => UffdVia::Syscall,
    };
    if device {
        report.ioc_new = Some(match via {
            UffdVia::Device => Ok(()),
            UffdVia::Syscall => Err(OsError::untyped(
                "refused with an errno uffd-gmem reads as a missing device; it fell back to \
                 the userfaultfd(2) syscall"
                    .to_string(),
            )),
        });
    }
    if via == UffdVia::Syscall {
        report.syscall = Some(Ok(()));
    }
    report.via = Some(via);
    report.api = Some(api.as_ref().map(uffd_api).map_err(OsError::clone));
    (report, api.ok())
}

/// What `UFFDIO_API` answered on `uffd`.
fn uffd_api(uffd: &Uffd) -> UffdApi {
    UffdApi {
        // UFFDIO_API writes back the api it accepted, UFFD_API.
        api: sys::UFFD_API,
        features: uffd.supported_features().map_or(0, |f| f.bits()),
        ioctls: uffd.api_ioctls().map_or(0, |i| i.bits()),
    }
}

/// Probes `kvm_path` and `uffd_path` (normally [`DEFAULT_KVM_PATH`] and
/// [`DEFAULT_UFFD_PATH`]) and the running kernel. Never panics; every fd it
/// opens is closed before it returns.
pub fn collect(kvm_path: &Path, uffd_path: &Path) -> Report {
    Report {
        kernel: uname(),
        kvm: collect_kvm(kvm_path),
        uffd: collect_uffd(uffd_path),
    }
}

// ---------------------------------------------------------------------------
// Table
// ---------------------------------------------------------------------------

/// Width of the label column, indent included.
const LABEL_W: usize = 38;
/// Width of the `/dev/kvm` value column.
const VALUE_W: usize = 22;

fn row(out: &mut String, label: &str, value: &str) {
    let label = format!("  {label}");
    if label.len() < LABEL_W {
        let _ = writeln!(out, "{label:<LABEL_W$}{value}");
    } else {
        let _ = writeln!(out, "{label}");
        let _ = writeln!(out, "{:LABEL_W$}{value}", "");
    }
}

fn failed(out: &mut String, label: &str, e: &OsError) {
    row(out, label, &format!("FAILED: {}", e.short()));
    if let Some(hint) = e.hint {
        row(out, "", &format!("-> {hint}"));
    }
}

fn mask_value(v: u64) -> String {
    format!("{v} ({v:#x})")
}

fn cap_cell(row: &CapRow, v: &Option<Outcome<i32>>) -> String {
    match v {
        None => "-".to_string(),
        Some(Err(e)) => format!("error {}", e.code()),
        Some(Ok(v)) if row.is_mask() => format!("{v} ({:#x})", *v as u32),
        Some(Ok(v)) => v.to_string(),
    }
}

fn names_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "(none)".to_string()
    } else {
        names.join(" | ")
    }
}

/// The human-readable table `gmem probe` prints.
pub fn render_table(r: &Report) -> String {
    let mut out = String::new();
    out.push_str(
        "gmem probe: raw host support (what the kernel answers; nothing probed by behaviour)\n\n",
    );

    out.push_str("Kernel\n");
    match &r.kernel {
        Ok(k) => {
            row(&mut out, "release", &k.release);
            row(&mut out, "machine", &k.machine);
        }
        Err(e) => failed(&mut out, "uname", e),
    }

    let kvm = &r.kvm;
    let _ = writeln!(out, "\nKVM ({})", kvm.path.display());
    match &kvm.open {
        Ok(()) => row(&mut out, "open O_RDWR|O_CLOEXEC", "ok"),
        Err(e) => failed(&mut out, "open O_RDWR|O_CLOEXEC", e),
    }
    match &kvm.api_version {
        None => row(&mut out, "KVM_GET_API_VERSION", "- (device not open)"),
        Some(Ok(v)) => {
            let expected = sys::KVM_API_VERSION;
            let note = if *v == expected { "ok" } else { "UNEXPECTED" };
            row(
                &mut out,
                "KVM_GET_API_VERSION",
                &format!("{v} (KVM_API_VERSION is {expected}: {note})"),
            );
        }
        Some(Err(e)) => failed(&mut out, "KVM_GET_API_VERSION", e),
    }
    let create_label = format!("KVM_CREATE_VM (type {VM_TYPE})");
    match &kvm.vm {
        None => row(&mut out, &create_label, "- (device not open)"),
        Some(Ok(())) => row(&mut out, &create_label, "ok"),
        Some(Err(e)) => failed(&mut out, &create_label, e),
    }

    out.push('\n');
    row(
        &mut out,
        "KVM_CHECK_EXTENSION",
        &format!("{:<VALUE_W$}VM fd (type {VM_TYPE})", "/dev/kvm"),
    );
    for cap in &kvm.caps {
        let label = format!("{} ({})", cap.name, cap.cap);
        let label = if cap.name.starts_with(|c: char| c.is_ascii_digit()) {
            cap.name.to_string()
        } else {
            label
        };
        let system = cap_cell(cap, &cap.system);
        let vm = cap_cell(cap, &cap.vm);
        row(&mut out, &label, &format!("{system:<VALUE_W$}{vm}"));
        if matches!(cap.kind, CapKind::Mask(_)) {
            let decode = |v: &Option<Outcome<i32>>| match v {
                Some(Ok(v)) => Some(cap.decode(*v)),
                _ => None,
            };
            match (decode(&cap.system), decode(&cap.vm)) {
                (Some(s), Some(v)) if s == v => {
                    if !s.is_empty() {
                        row(&mut out, "", &format!("= {}", s.join(" | ")));
                    }
                }
                (s, v) => {
                    if let Some(s) = s {
                        row(&mut out, "", &format!("/dev/kvm = {}", names_or_none(&s)));
                    }
                    if let Some(v) = v {
                        row(&mut out, "", &format!("VM fd    = {}", names_or_none(&v)));
                    }
                }
            }
        }
    }
    if kvm.open.is_err() {
        row(&mut out, "", "(not asked: the device did not open)");
    } else if !matches!(kvm.vm, Some(Ok(()))) {
        row(&mut out, "", "(VM fd column empty: no VM was created)");
    }

    let u = &r.uffd;
    let _ = writeln!(out, "\nuserfaultfd ({})", u.path.display());
    match &u.open {
        Ok(()) => row(&mut out, "open O_RDWR|O_CLOEXEC", "ok"),
        Err(e) => failed(&mut out, "open O_RDWR|O_CLOEXEC", e),
    }
    let ioc_label = "USERFAULTFD_IOC_NEW";
    match &u.ioc_new {
        None => row(&mut out, ioc_label, "- (device not open)"),
        Some(Ok(())) => row(&mut out, ioc_label, "ok (O_CLOEXEC|O_NONBLOCK)"),
        Some(Err(e)) => failed(&mut out, ioc_label, e),
    }
    let sys_label = "userfaultfd(2) syscall";
    match &u.syscall {
        None if u.via == Some(UffdVia::Device) => {
            row(&mut out, sys_label, "not tried (the device worked)")
        }
        None => row(
            &mut out,
            sys_label,
            "not tried (only when the device is missing or denied)",
        ),
        Some(Ok(())) => row(&mut out, sys_label, "ok (O_CLOEXEC|O_NONBLOCK)"),
        Some(Err(e)) => failed(&mut out, sys_label, e),
    }
    let via = match u.via {
        Some(UffdVia::Device) => format!("{} (USERFAULTFD_IOC_NEW)", u.path.display()),
        Some(UffdVia::Syscall) => "userfaultfd(2) syscall".to_string(),
        None => "NONE: no userfaultfd could be created".to_string(),
    };
    row(&mut out, "userfaultfd created via", &via);
    let api_label = format!("UFFDIO_API (api {:#x}, features 0)", sys::UFFD_API);
    match &u.api {
        None => row(&mut out, &api_label, "- (no userfaultfd)"),
        Some(Err(e)) => failed(&mut out, &api_label, e),
        Some(Ok(api)) => {
            row(&mut out, &api_label, &format!("ok, api {:#x}", api.api));
            let all_features = mask_of(UFFD_FEATURE_BITS);
            bit_list(
                &mut out,
                "features",
                api.features,
                UFFD_FEATURE_BITS,
                all_features,
            );
            // UFFDIO_API reports the fd-wide ioctls; the range ioctls (WAKE,
            // COPY, ...) are reported per range by UFFDIO_REGISTER.
            bit_list(
                &mut out,
                "ioctls",
                api.ioctls,
                UFFD_IOCTL_BITS,
                sys::UFFD_API_IOCTLS,
            );
            row(
                &mut out,
                "",
                "(range ioctls are reported by UFFDIO_REGISTER)",
            );
        }
    }
    out
}

/// A mask row, then one line per set bit, then the bits of `expected` not set.
fn bit_list(out: &mut String, label: &str, value: u64, bits: &[Bit], expected: u64) {
    row(out, label, &mask_value(value));
    for b in bits.iter().filter(|b| value & (1 << b.bit) != 0) {
        row(out, "", &format!("bit {:>2}  {}", b.bit, b.name));
    }
    let unknown = value & !mask_of(bits);
    if unknown != 0 {
        row(out, "", &format!("unknown {unknown:#x}"));
    }
    let unset: Vec<String> = bits
        .iter()
        .filter(|b| expected & !value & (1 << b.bit) != 0)
        .map(|b| format!("{} ({})", b.name, b.bit))
        .collect();
    if !unset.is_empty() {
        row(out, "", &format!("not set: {}", unset.join(", ")));
    }
}

// ---------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------

/// A JSON value, written by hand.
#[derive(Debug, Clone)]
pub enum Json {
    Null,
    Bool(bool),
    Int(i128),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(&'static str, Json)>),
}

impl Json {
    /// A JSON string.
    pub fn str(s: impl Into<String>) -> Self {
        Json::Str(s.into())
    }

    /// The value as a JSON document, with a final newline.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out.push('\n');
        out
    }

    fn write(&self, out: &mut String, indent: usize) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Int(n) => {
                let _ = write!(out, "{n}");
            }
            Json::Str(s) => json_string(out, s),
            Json::Arr(items) if items.is_empty() => out.push_str("[]"),
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    pad(out, indent + 1);
                    item.write(out, indent + 1);
                }
                out.push('\n');
                pad(out, indent);
                out.push(']');
            }
            Json::Obj(fields) if fields.is_empty() => out.push_str("{}"),
            Json::Obj(fields) => {
                out.push('{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    pad(out, indent + 1);
                    json_string(out, key);
                    out.push_str(": ");
                    value.write(out, indent + 1);
                }
                out.push('\n');
                pad(out, indent);
                out.push('}');
            }
        }
    }
}

fn pad(out: &mut String, indent: usize) {
    for _ in 0..indent {
        out.push_str("  ");
    }
}

/// Writes `s` as a JSON string: quotes, backslashes and every control
/// character escaped.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `{"ok": false, "errno": ..., "errno_name", "message", "hint"}`.
pub fn json_error(e: &OsError) -> Json {
    Json::Obj(vec![
        ("ok", Json::Bool(false)),
        ("errno", e.errno.map_or(Json::Null, |n| Json::Int(n.into()))),
        (
            "errno_name",
            e.errno.map_or(Json::Null, |_| Json::str(&e.name)),
        ),
        ("message", Json::str(&e.message)),
        ("hint", e.hint.map_or(Json::Null, Json::str)),
    ])
}

/// `{"ok": true, ...ok(value)}` or [`json_error`].
pub fn json_outcome<T>(o: &Outcome<T>, ok: impl FnOnce(&T) -> Vec<(&'static str, Json)>) -> Json {
    match o {
        Ok(v) => {
            let mut fields = vec![("ok", Json::Bool(true))];
            fields.extend(ok(v));
            Json::Obj(fields)
        }
        Err(e) => json_error(e),
    }
}

fn json_opt<T>(o: &Option<Outcome<T>>, ok: impl FnOnce(&T) -> Vec<(&'static str, Json)>) -> Json {
    o.as_ref().map_or(Json::Null, |o| json_outcome(o, ok))
}

fn json_names(names: Vec<String>) -> Json {
    Json::Arr(names.into_iter().map(Json::Str).collect())
}

/// `value`, `hex` and the `names` of its set bits.
pub fn json_mask(value: u64, bits: &[Bit]) -> Vec<(&'static str, Json)> {
    vec![
        ("value", Json::Int(value.into())),
        ("hex", Json::str(format!("{value:#x}"))),
        ("names", json_names(decode_bits(value, bits))),
    ]
}

fn json_cap_value(cap: &CapRow, v: i32) -> Vec<(&'static str, Json)> {
    let mut fields = vec![("value", Json::Int(v.into()))];
    if cap.is_mask() {
        fields.push(("hex", Json::str(format!("{:#x}", v as u32))));
    }
    if let CapKind::Mask(_) = cap.kind {
        fields.push(("names", json_names(cap.decode(v))));
    }
    fields
}

/// `uname(2)` as JSON.
pub fn json_kernel(kernel: &Outcome<Kernel>) -> Json {
    json_outcome(kernel, |k| {
        vec![
            ("release", Json::str(&k.release)),
            ("machine", Json::str(&k.machine)),
        ]
    })
}

/// The userfaultfd part of the report as JSON.
pub fn json_uffd(u: &UffdReport) -> Json {
    Json::Obj(vec![
        ("path", Json::str(u.path.to_string_lossy())),
        ("open", json_outcome(&u.open, |()| Vec::new())),
        ("ioc_new", json_opt(&u.ioc_new, |()| Vec::new())),
        ("syscall", json_opt(&u.syscall, |()| Vec::new())),
        ("via", u.via.map_or(Json::Null, |v| Json::str(v.as_str()))),
        (
            "api",
            json_opt(&u.api, |a| {
                vec![
                    ("api", Json::Int(a.api.into())),
                    (
                        "features",
                        Json::Obj(json_mask(a.features, UFFD_FEATURE_BITS)),
                    ),
                    ("ioctls", Json::Obj(json_mask(a.ioctls, UFFD_IOCTL_BITS))),
                ]
            }),
        ),
    ])
}

/// The same data as [`render_table`], as JSON.
pub fn render_json(r: &Report) -> String {
    let kernel = json_kernel(&r.kernel);
    let kvm = &r.kvm;
    let caps = kvm
        .caps
        .iter()
        .map(|cap| {
            Json::Obj(vec![
                ("name", Json::str(cap.name)),
                ("cap", Json::Int(cap.cap.into())),
                (
                    "kind",
                    Json::str(match cap.kind {
                        CapKind::Value => "value",
                        CapKind::Mask(_) => "mask",
                        CapKind::RawMask => "raw_mask",
                    }),
                ),
                ("system", json_opt(&cap.system, |v| json_cap_value(cap, *v))),
                ("vm", json_opt(&cap.vm, |v| json_cap_value(cap, *v))),
            ])
        })
        .collect();
    let kvm = Json::Obj(vec![
        ("path", Json::str(kvm.path.to_string_lossy())),
        ("open", json_outcome(&kvm.open, |()| Vec::new())),
        (
            "api_version",
            json_opt(&kvm.api_version, |v| {
                vec![
                    ("value", Json::Int((*v).into())),
                    ("expected", Json::Int(sys::KVM_API_VERSION.into())),
                ]
            }),
        ),
        (
            "create_vm",
            json_opt(&kvm.vm, |()| vec![("type", Json::Int(VM_TYPE.into()))]),
        ),
        ("caps", Json::Arr(caps)),
    ]);
    let uffd = json_uffd(&r.uffd);
    let problems = Json::Arr(r.problems().into_iter().map(Json::Str).collect());
    let root = Json::Obj(vec![
        ("kernel", kernel),
        ("kvm", kvm),
        ("userfaultfd", uffd),
        ("problems", problems),
    ]);
    root.render()
}
