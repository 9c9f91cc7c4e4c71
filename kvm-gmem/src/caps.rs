//! Capability probing, all of it: the typed report ([`Capabilities`], also
//! at the crate root), its rows ([`Row`], [`unavailable_rows`]), and every
//! behavioural probe of an RFC feature. Queried once; a capability number
//! alone is never taken as proof of an RFC feature.

use crate::attributes::MemoryAttributes;
use crate::error::{Errno, Result};
use crate::gmem::GuestMemfdFlags;
use crate::kvm::{Extension, KvmDevice, VmType};
use crate::vm::VmOps;
use std::fmt;
use std::os::fd::BorrowedFd;

/// Whether one feature is usable, and how the crate knows.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Support {
    /// Usable on this kernel and VM.
    pub supported: bool,
    /// The evidence: a capability value, or what a behavioural probe got.
    pub evidence: String,
}

impl Support {
    fn yes(evidence: impl Into<String>) -> Support {
        Support {
            supported: true,
            evidence: evidence.into(),
        }
    }

    fn no(evidence: impl Into<String>) -> Support {
        Support {
            supported: false,
            evidence: evidence.into(),
        }
    }

    fn cap(name: &str, value: i32) -> Support {
        Support {
            supported: value > 0,
            evidence: format!("{name} = {value}"),
        }
    }
}

/// The RFC features, each confirmed by behaviour. New RFC series add fields.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RfcSupport {
    /// `KVM_GUEST_MEMFD_POPULATE`: the size-0 probe succeeded.
    pub populate: Support,
    /// `GUEST_MEMFD_FLAG_WRITE`: offered, accepted, and `pwrite` works.
    pub gmem_write: Support,
    /// `GUEST_MEMFD_FLAG_NO_DIRECT_MAP`: offered and accepted.
    pub no_direct_map: Support,
    /// KVM Userfault: a memslot with `KVM_MEM_USERFAULT` is accepted.
    pub kvm_userfault: Support,
}

/// What the kernel and a VM support for guest_memfd work.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// `uname -r`.
    pub kernel_release: String,
    /// `KVM_SET_USER_MEMORY_REGION2` (Linux 6.8).
    pub user_memory2: Support,
    /// `KVM_EXIT_MEMORY_FAULT` details (Linux 6.8).
    pub memory_fault_info: Support,
    /// The VM's supported memory attributes.
    pub memory_attributes: MemoryAttributes,
    /// `/dev/kvm`'s answer for memory attributes (may differ from the VM's).
    pub memory_attributes_system: MemoryAttributes,
    /// `KVM_CREATE_GUEST_MEMFD` (Linux 6.8).
    pub guest_memfd: Support,
    /// The VM types `KVM_CREATE_VM` accepts, as a mask of `1 << type`.
    pub vm_types: u64,
    /// arm64: `KVM_CAP_ARM_VM_IPA_SIZE`, the largest guest physical address
    /// size (bits) a VM type may ask for (the type is the IPA size there, and
    /// `KVM_CAP_VM_TYPES` does not apply); 0 on other architectures.
    pub arm_vm_ipa_size: u32,
    /// `KVM_PRE_FAULT_MEMORY` (Linux 6.11).
    pub pre_fault_memory: Support,
    /// The guest_memfd flags this VM accepts (Linux 6.18).
    pub guest_memfd_flags: GuestMemfdFlags,
    /// Memory slots per address space.
    pub nr_memslots: u32,
    /// The RFC features.
    pub rfc: RfcSupport,
}

/// One row of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The feature.
    pub feature: &'static str,
    /// Where it comes from: a Linux release or an RFC series.
    pub origin: &'static str,
    /// Usable or not.
    pub supported: bool,
    /// The evidence.
    pub evidence: String,
}

fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl Capabilities {
    /// Queries `kvm` (`/dev/kvm`) and `vm`; the RFC probes that change state
    /// (memslots, guest_memfds) run on a scratch VM of type `vm_type` created
    /// from `kvm`, never on `vm`.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Kernel`] if `KVM_CHECK_EXTENSION` itself fails.
    ///
    /// # Examples
    ///
    /// ```
    /// use kvm_gmem::{Capabilities, KvmDevice, VmType};
    ///
    /// # fn main() -> Result<(), kvm_gmem::Error> {
    /// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
    /// let kvm = KvmDevice::open()?;
    /// let vm = kvm.create_vm(VmType::DEFAULT)?;
    /// let caps = Capabilities::query(&kvm, &vm, VmType::DEFAULT)?;
    /// if !caps.guest_memfd.supported {
    ///     println!("no guest_memfd on {}: {}", caps.kernel_release, caps.guest_memfd.evidence);
    /// }
    /// for row in caps.rows() {
    ///     println!("{:<40} {:<5} {}", row.feature, row.supported, row.evidence);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// - <https://docs.kernel.org/virt/kvm/api.html#kvm-check-extension>, <https://docs.kernel.org/virt/kvm/api.html#kvm-create-vm>,
    ///   <https://docs.kernel.org/virt/kvm/api.html#kvm-create-guest-memfd>, <https://docs.kernel.org/virt/kvm/api.html#kvm-set-user-memory-region2>
    ///   (the probes)
    /// - RFC `KVM_GUEST_MEMFD_POPULATE`:
    ///   <https://lore.kernel.org/kvm/20241024095429.54052-1-kalyazin@amazon.com/>
    /// - RFC `GUEST_MEMFD_FLAG_WRITE`:
    ///   <https://lore.kernel.org/kvm/20251114151828.98165-2-kalyazin@amazon.com/>
    /// - RFC `GUEST_MEMFD_FLAG_NO_DIRECT_MAP`:
    ///   <https://lore.kernel.org/kvm/20260114134510.1835-8-kalyazin@amazon.com/>
    /// - RFC KVM Userfault:
    ///   <https://lore.kernel.org/kvm/20250618042424.330664-1-jthoughton@google.com/>
    pub fn query(kvm: &KvmDevice, vm: &impl VmOps, vm_type: VmType) -> Result<Capabilities> {
        let vm = vm.vm_fd();
        let vm_cap = |c: Extension| vm.extension(c);
        let flags =
            GuestMemfdFlags::from_bits_retain(vm_cap(Extension::GUEST_MEMFD_FLAGS)?.max(0) as u64);
        let scratch = kvm.create_vm(vm_type).ok();
        Ok(Capabilities {
            kernel_release: release(),
            user_memory2: Support::cap("KVM_CAP_USER_MEMORY2", vm_cap(Extension::USER_MEMORY2)?),
            memory_fault_info: Support::cap(
                "KVM_CAP_MEMORY_FAULT_INFO",
                vm_cap(Extension::MEMORY_FAULT_INFO)?,
            ),
            memory_attributes: MemoryAttributes::from_bits_retain(
                vm_cap(Extension::MEMORY_ATTRIBUTES)?.max(0) as u64,
            ),
            memory_attributes_system: MemoryAttributes::from_bits_retain(
                kvm.extension(Extension::MEMORY_ATTRIBUTES)?.max(0) as u64,
            ),
            guest_memfd: Support::cap("KVM_CAP_GUEST_MEMFD", vm_cap(Extension::GUEST_MEMFD)?),
            vm_types: match kvm.extension(Extension::VM_TYPES)? {
                0 => 1,
                v => v as u64,
            },
            arm_vm_ipa_size: if cfg!(target_arch = "aarch64") {
                kvm.extension(Extension::ARM_VM_IPA_SIZE)?.max(0) as u32
            } else {
                0
            },
            pre_fault_memory: Support::cap(
                "KVM_CAP_PRE_FAULT_MEMORY",
                vm_cap(Extension::PRE_FAULT_MEMORY)?,
            ),
            guest_memfd_flags: flags,
            nr_memslots: vm_cap(Extension::NR_MEMSLOTS)?.max(0) as u32,
            rfc: RfcSupport {
                populate: probe::populate(vm),
                gmem_write: probe::gmem_write(scratch.as_ref(), flags),
                no_direct_map: probe::no_direct_map(scratch.as_ref(), flags),
                kvm_userfault: probe::kvm_userfault(vm, scratch.as_ref()),
            },
        })
    }

    /// The report as rows: one per feature, upstream first.
    pub fn rows(&self) -> Vec<Row> {
        let attrs = |a: MemoryAttributes| {
            if a.contains(MemoryAttributes::PRIVATE) {
                "PRIVATE".to_string()
            } else {
                "none".to_string()
            }
        };
        let mut types = Vec::new();
        for t in 0..64 {
            if self.vm_types & (1 << t) != 0 {
                types.push(
                    VmType(t)
                        .name()
                        .map(str::to_string)
                        .unwrap_or(format!("type {t}")),
                );
            }
        }
        vec![
            Row {
                feature: "memslots v2 (KVM_SET_USER_MEMORY_REGION2)",
                origin: "Linux 6.8",
                supported: self.user_memory2.supported,
                evidence: self.user_memory2.evidence.clone(),
            },
            Row {
                feature: "guest_memfd (KVM_CREATE_GUEST_MEMFD)",
                origin: "Linux 6.8",
                supported: self.guest_memfd.supported,
                evidence: self.guest_memfd.evidence.clone(),
            },
            Row {
                feature: "guest_memfd mmap (GUEST_MEMFD_FLAG_MMAP)",
                origin: "Linux 6.18",
                supported: self.guest_memfd_flags.contains(GuestMemfdFlags::MMAP),
                evidence: format!("KVM_CAP_GUEST_MEMFD_FLAGS = {}", self.guest_memfd_flags),
            },
            Row {
                feature: "guest_memfd shared by default (GUEST_MEMFD_FLAG_INIT_SHARED)",
                origin: "Linux 6.18",
                supported: self
                    .guest_memfd_flags
                    .contains(GuestMemfdFlags::INIT_SHARED),
                evidence: format!("KVM_CAP_GUEST_MEMFD_FLAGS = {}", self.guest_memfd_flags),
            },
            Row {
                feature: "memory-fault exits (KVM_EXIT_MEMORY_FAULT)",
                origin: "Linux 6.8",
                supported: self.memory_fault_info.supported,
                evidence: self.memory_fault_info.evidence.clone(),
            },
            Row {
                feature: "private memory (KVM_SET_MEMORY_ATTRIBUTES, PRIVATE)",
                origin: "Linux 6.8",
                supported: self.memory_attributes.contains(MemoryAttributes::PRIVATE),
                evidence: format!(
                    "KVM_CAP_MEMORY_ATTRIBUTES = {} on the VM fd, {} on /dev/kvm",
                    attrs(self.memory_attributes),
                    attrs(self.memory_attributes_system)
                ),
            },
            Row {
                feature: "pre-fault (KVM_PRE_FAULT_MEMORY)",
                origin: "Linux 6.11",
                supported: self.pre_fault_memory.supported,
                evidence: self.pre_fault_memory.evidence.clone(),
            },
            Row {
                feature: "VM types (KVM_CAP_VM_TYPES)",
                origin: "Linux 6.8",
                supported: self.vm_types != 0,
                evidence: if cfg!(target_arch = "aarch64") && self.arm_vm_ipa_size != 0 {
                    format!(
                        "does not apply on arm64: the type is the IPA size, 32 to \
                         KVM_CAP_ARM_VM_IPA_SIZE = {} bits (0: the default, 40)",
                        self.arm_vm_ipa_size
                    )
                } else {
                    format!("{:#x} = {}", self.vm_types, types.join(", "))
                },
            },
            Row {
                feature: "KVM_GUEST_MEMFD_POPULATE",
                origin: "RFC 0/4, Oct 2024",
                supported: self.rfc.populate.supported,
                evidence: self.rfc.populate.evidence.clone(),
            },
            Row {
                feature: "guest_memfd write() (GUEST_MEMFD_FLAG_WRITE)",
                origin: "RFC write() v7 / Firecracker 6.18",
                supported: self.rfc.gmem_write.supported,
                evidence: self.rfc.gmem_write.evidence.clone(),
            },
            Row {
                feature: "direct-map removal (GUEST_MEMFD_FLAG_NO_DIRECT_MAP)",
                origin: "RFC v9 / Firecracker 6.18",
                supported: self.rfc.no_direct_map.supported,
                evidence: self.rfc.no_direct_map.evidence.clone(),
            },
            Row {
                feature: "KVM userfault (KVM_MEM_USERFAULT)",
                origin: "RFC v3 / Firecracker 6.18",
                supported: self.rfc.kvm_userfault.supported,
                evidence: self.rfc.kvm_userfault.evidence.clone(),
            },
        ]
    }
}

/// The rows of a report that could not be made (no `/dev/kvm`, no VM):
/// every feature of [`Capabilities::rows`], not supported, with `reason`
/// as the evidence.
pub fn unavailable_rows(reason: &str) -> Vec<Row> {
    let no = || Support::no(reason);
    let blank = Capabilities {
        kernel_release: release(),
        user_memory2: no(),
        memory_fault_info: no(),
        memory_attributes: MemoryAttributes::empty(),
        memory_attributes_system: MemoryAttributes::empty(),
        guest_memfd: no(),
        vm_types: 0,
        arm_vm_ipa_size: 0,
        pre_fault_memory: no(),
        guest_memfd_flags: GuestMemfdFlags::empty(),
        nr_memslots: 0,
        rfc: RfcSupport {
            populate: no(),
            gmem_write: no(),
            no_direct_map: no(),
            kvm_userfault: no(),
        },
    };
    blank
        .rows()
        .into_iter()
        .map(|r| Row {
            supported: false,
            evidence: reason.to_string(),
            ..r
        })
        .collect()
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel {}", self.kernel_release)?;
        for r in self.rows() {
            writeln!(
                f,
                "{:<62} {:<13} {:<34} {}",
                r.feature,
                if r.supported {
                    "supported"
                } else {
                    "not supported"
                },
                r.origin,
                r.evidence
            )?;
        }
        Ok(())
    }
}

/// `ioctl(vm, KVM_GUEST_MEMFD_POPULATE, {size: 0})`: the only way the crate
/// issues request 0x4020AED6 without knowing what it means on this kernel
/// (for [`Capabilities::query`] and before `Populate` uses the ioctl).
#[cfg(feature = "rfc-populate")]
pub(crate) fn populate_ioctl(vm: BorrowedFd<'_>) -> Result<(), Errno> {
    use kvm_gmem_sys::rfc::populate as rfc;
    let mut arg = rfc::kvm_guest_memfd_populate {
        gpa: 0,
        size: 0,
        from: std::ptr::null_mut(),
        flags: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: the request encodes `kvm_guest_memfd_populate` (checked at
    // compile time). With size 0 a POPULATE kernel copies nothing, and `from`
    // is NULL; a kernel where the number is KVM_ASYNC_PF reads op 0 and
    // refuses with EINVAL.
    unsafe { crate::sys::ioctl_arg::<{ rfc::KVM_GUEST_MEMFD_POPULATE }, _>(vm, &mut arg) }
        .map(|_| ())
}

/// The behavioural probes.
mod probe {
    use super::*;
    use crate::gmem::GuestMemfd;
    use crate::kvm::Vm;
    use std::os::fd::AsFd;

    fn errno_text(e: Errno) -> String {
        e.name()
            .map(str::to_string)
            .unwrap_or_else(|| format!("errno {}", e.0))
    }

    /// `KVM_GUEST_MEMFD_POPULATE` with size 0: POPULATE kernels succeed,
    /// Firecracker's `KVM_ASYNC_PF` (same number) answers EINVAL, kernels with
    /// neither ENOTTY. The ioctl is never issued any other way before this.
    #[cfg(feature = "rfc-populate")]
    pub(super) fn populate(vm: BorrowedFd<'_>) -> Support {
        match populate_ioctl(vm) {
            Ok(()) => Support::yes("KVM_GUEST_MEMFD_POPULATE (0x4020aed6) with size 0 succeeded"),
            // arm64 answers EINVAL to every VM ioctl it does not know.
            Err(Errno(libc::EINVAL)) if cfg!(target_arch = "aarch64") => Support::no(
                "ioctl 0x4020aed6 with size 0 answered EINVAL, arm64's answer to a VM ioctl it does not know",
            ),
            Err(Errno(libc::EINVAL)) => Support::no(
                "ioctl 0x4020aed6 with size 0 answered EINVAL: the number is Firecracker's KVM_ASYNC_PF on this kernel",
            ),
            Err(e) => Support::no(format!(
                "ioctl 0x4020aed6 with size 0 answered {}",
                errno_text(e)
            )),
        }
    }

    #[cfg(not(feature = "rfc-populate"))]
    pub(super) fn populate(_vm: BorrowedFd<'_>) -> Support {
        Support::no("not probed: the crate was built without feature rfc-populate")
    }

    /// Creating a one-page guest_memfd with `flags` on the scratch VM.
    fn try_create(scratch: Option<&Vm>, flags: u64) -> Result<GuestMemfd, String> {
        let vm = scratch.ok_or("no scratch VM could be created")?;
        GuestMemfd::builder(crate::sys::page_size())
            .flags(GuestMemfdFlags::from_bits_retain(flags))
            .create_unchecked(vm.as_fd())
            // The kernel's own answer only: `errno()` also reports EINVAL
            // for a refusal made before the ioctl.
            .map_err(|e| match e {
                crate::error::Error::Kernel { errno, .. } => format!(
                    "KVM_CREATE_GUEST_MEMFD with flags {flags:#x} gave {}",
                    errno_text(errno)
                ),
                e => e.to_string(),
            })
    }

    fn pwrite_works(gmem: &GuestMemfd) -> Result<(), Errno> {
        crate::sys::pwrite_zero_page(gmem.as_fd())
    }

    pub(super) fn gmem_write(scratch: Option<&Vm>, offered: GuestMemfdFlags) -> Support {
        const BIT3: u64 = 1 << 3;
        const BIT2: u64 = 1 << 2;
        if offered.bits() & BIT3 == 0 {
            // The v7 posting numbered WRITE bit 2: report it if bit 2 behaves so.
            if offered.bits() & BIT2 != 0
                && let Ok(g) = try_create(scratch, BIT2)
                && pwrite_works(&g).is_ok()
            {
                return Support::no(format!(
                    "KVM_CAP_GUEST_MEMFD_FLAGS = {offered} lacks bit 3, but bit 2 enables pwrite: \
                     the write() v7 numbering, which this crate does not use"
                ));
            }
            return Support::no(format!(
                "KVM_CAP_GUEST_MEMFD_FLAGS = {offered} lacks bit 3 (WRITE)"
            ));
        }
        match try_create(scratch, BIT3) {
            Err(e) => Support::no(format!("bit 3 offered, but {e}")),
            Ok(g) => match pwrite_works(&g) {
                Ok(()) => Support::yes(
                    "bit 3 offered; pwrite of one page on such a guest_memfd succeeded",
                ),
                Err(e) => Support::no(format!(
                    "bit 3 offered, but pwrite answered {}",
                    errno_text(e)
                )),
            },
        }
    }

    pub(super) fn no_direct_map(scratch: Option<&Vm>, offered: GuestMemfdFlags) -> Support {
        const BIT2: u64 = 1 << 2;
        if offered.bits() & BIT2 == 0 {
            let refused = match try_create(scratch, BIT2) {
                Err(e) => format!("; {e}"),
                Ok(_) => "; yet creating with bit 2 succeeded".into(),
            };
            return Support::no(format!(
                "KVM_CAP_GUEST_MEMFD_FLAGS = {offered} lacks bit 2{refused}"
            ));
        }
        match try_create(scratch, BIT2) {
            Err(e) => Support::no(format!("bit 2 offered, but {e}")),
            Ok(g) if pwrite_works(&g).is_ok() => Support::no(
                "bit 2 offered, but it enables pwrite: it is write() v7's WRITE, not NO_DIRECT_MAP",
            ),
            Ok(_) => Support::yes("bit 2 offered and a guest_memfd with it was created"),
        }
    }

    /// A one-page memslot with `KVM_MEM_USERFAULT` and a bitmap on the
    /// scratch VM, deleted again. The VM's answer for `KVM_CAP_USERFAULT`
    /// (245) is reported but proves nothing: upstream gave the number to
    /// `KVM_CAP_ARM_SEA_TO_USER`.
    #[cfg(feature = "rfc-kvm-userfault")]
    pub(super) fn kvm_userfault(vm: BorrowedFd<'_>, scratch: Option<&Vm>) -> Support {
        use kvm_gmem_sys::rfc::kvm_userfault::{KVM_CAP_USERFAULT, KVM_MEM_USERFAULT};
        let cap = vm.extension(Extension(KVM_CAP_USERFAULT)).unwrap_or(0);
        let Some(scratch) = scratch else {
            return Support::no("not probed: no scratch VM could be created");
        };
        let cap = format!("cap {KVM_CAP_USERFAULT} = {cap} (a number only, not evidence)");
        match userfault_memslot(scratch) {
            Ok(()) => Support::yes(format!(
                "a memslot with KVM_MEM_USERFAULT and a bitmap was accepted; {cap}"
            )),
            Err(e) => Support::no(format!(
                "KVM_SET_USER_MEMORY_REGION2 with KVM_MEM_USERFAULT (1 << {}) answered {e}; {cap}",
                KVM_MEM_USERFAULT.trailing_zeros()
            )),
        }
    }

    #[cfg(not(feature = "rfc-kvm-userfault"))]
    pub(super) fn kvm_userfault(_vm: BorrowedFd<'_>, _scratch: Option<&Vm>) -> Support {
        Support::no("not probed: the crate was built without feature rfc-kvm-userfault")
    }

    /// Sets slot 0 of `vm` to one page of scratch memory with a userfault
    /// bitmap, and deletes it again; the errno (or the error) if refused.
    #[cfg(feature = "rfc-kvm-userfault")]
    fn userfault_memslot(vm: &Vm) -> Result<(), String> {
        use crate::memslot::{MemoryRegion2, UserfaultBitmap};
        let page = crate::sys::page_size();
        // The slot's memory: the page-aligned page inside two of ours.
        let mem = vec![0u8; 2 * page as usize];
        let addr = (mem.as_ptr() as u64).next_multiple_of(page);
        let bitmap = UserfaultBitmap::new(1, true);
        let region = MemoryRegion2::builder(0, 0, page)
            .userspace_addr(addr)
            .userfault_bitmap(&bitmap)
            .build()
            .map_err(|e| e.to_string())?;
        #[allow(unsafe_code)]
        // SAFETY: `mem` and `bitmap` stay alive until after the slot is
        // deleted below; no vCPU of the scratch VM runs meanwhile.
        let set = unsafe { vm.set_memory_region(&region) };
        if set.is_ok() {
            let _ = vm.delete_memory_region(0);
        }
        set.map_err(|e| match e {
            crate::error::Error::Kernel { errno, .. } => errno_text(errno),
            e => e.to_string(),
        })
    }
}
