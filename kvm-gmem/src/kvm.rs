//! `/dev/kvm` and VM handles, and `KVM_CHECK_EXTENSION`.
#![allow(unsafe_code)]

use crate::error::{Errno, Error, Result};
use crate::sys::{ioctl_int, own_new_fd};
use kvm_gmem_sys as sys;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A capability number for `KVM_CHECK_EXTENSION`, named as in C.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extension(pub u32);

impl Extension {
    /// `KVM_CAP_NR_MEMSLOTS`: memory slots per address space.
    pub const NR_MEMSLOTS: Extension = Extension(sys::KVM_CAP_NR_MEMSLOTS);
    /// `KVM_CAP_MULTI_ADDRESS_SPACE`: number of address spaces.
    pub const MULTI_ADDRESS_SPACE: Extension = Extension(sys::KVM_CAP_MULTI_ADDRESS_SPACE);
    /// `KVM_CAP_USER_MEMORY2` (Linux 6.8).
    pub const USER_MEMORY2: Extension = Extension(sys::KVM_CAP_USER_MEMORY2);
    /// `KVM_CAP_MEMORY_FAULT_INFO` (Linux 6.8).
    pub const MEMORY_FAULT_INFO: Extension = Extension(sys::KVM_CAP_MEMORY_FAULT_INFO);
    /// `KVM_CAP_MEMORY_ATTRIBUTES` (Linux 6.8): the supported attribute mask.
    pub const MEMORY_ATTRIBUTES: Extension = Extension(sys::KVM_CAP_MEMORY_ATTRIBUTES);
    /// `KVM_CAP_GUEST_MEMFD` (Linux 6.8).
    pub const GUEST_MEMFD: Extension = Extension(sys::KVM_CAP_GUEST_MEMFD);
    /// `KVM_CAP_VM_TYPES` (Linux 6.8): a mask of `1 << type`.
    pub const VM_TYPES: Extension = Extension(sys::KVM_CAP_VM_TYPES);
    /// `KVM_CAP_PRE_FAULT_MEMORY` (Linux 6.11).
    pub const PRE_FAULT_MEMORY: Extension = Extension(sys::KVM_CAP_PRE_FAULT_MEMORY);
    /// `KVM_CAP_GUEST_MEMFD_FLAGS` (Linux 6.18): the flags a VM accepts.
    pub const GUEST_MEMFD_FLAGS: Extension = Extension(sys::KVM_CAP_GUEST_MEMFD_FLAGS);
    /// `KVM_CAP_ARM_VM_IPA_SIZE` (arm64): the largest IPA size, in bits, a
    /// VM type may ask for.
    pub const ARM_VM_IPA_SIZE: Extension = Extension(sys::KVM_CAP_ARM_VM_IPA_SIZE);
}

/// `ioctl(fd, KVM_CHECK_EXTENSION, cap)` on `/dev/kvm` or a VM fd: the one
/// implementation behind [`KvmDevice::extension`] and
/// [`VmOps::extension`](crate::VmOps::extension).
pub(crate) fn check_extension(fd: BorrowedFd<'_>, cap: Extension) -> Result<i32> {
    // SAFETY: KVM_CHECK_EXTENSION takes the capability number as its value.
    unsafe { ioctl_int::<{ sys::KVM_CHECK_EXTENSION }>(fd, cap.0.into()) }
        .map_err(|e| Error::kernel("KVM_CHECK_EXTENSION", e))
}

/// A VM type for `KVM_CREATE_VM`.
///
/// On x86 it is one of the `KVM_X86_*_VM` numbers; on arm64 the argument
/// carries the IPA size instead, and [`VmType::DEFAULT`] (0) asks for the
/// default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VmType(pub u64);

impl VmType {
    /// The default VM type (0) on every architecture.
    pub const DEFAULT: VmType = VmType(0);
    /// `KVM_X86_SW_PROTECTED_VM`: private memory without hardware protection.
    #[cfg(target_arch = "x86_64")]
    pub const SW_PROTECTED: VmType = VmType(sys::KVM_X86_SW_PROTECTED_VM);
    /// `KVM_X86_SEV_VM`.
    #[cfg(target_arch = "x86_64")]
    pub const SEV: VmType = VmType(sys::KVM_X86_SEV_VM);
    /// `KVM_X86_SEV_ES_VM`.
    #[cfg(target_arch = "x86_64")]
    pub const SEV_ES: VmType = VmType(sys::KVM_X86_SEV_ES_VM);
    /// `KVM_X86_SNP_VM`.
    #[cfg(target_arch = "x86_64")]
    pub const SNP: VmType = VmType(sys::KVM_X86_SNP_VM);
    /// `KVM_X86_TDX_VM`.
    #[cfg(target_arch = "x86_64")]
    pub const TDX: VmType = VmType(sys::KVM_X86_TDX_VM);

    /// arm64: a VM whose guest physical addresses have `bits` bits (32 up
    /// to `KVM_CAP_ARM_VM_IPA_SIZE`; [`VmType::DEFAULT`] is 40).
    #[cfg(target_arch = "aarch64")]
    pub const fn arm_ipa(bits: u8) -> VmType {
        VmType(bits as u64 & sys::KVM_VM_TYPE_ARM_IPA_SIZE_MASK)
    }

    /// The C name of an x86 type, if it has one.
    pub fn name(self) -> Option<&'static str> {
        #[cfg(target_arch = "x86_64")]
        {
            Some(match self.0 {
                sys::KVM_X86_DEFAULT_VM => "KVM_X86_DEFAULT_VM",
                sys::KVM_X86_SW_PROTECTED_VM => "KVM_X86_SW_PROTECTED_VM",
                sys::KVM_X86_SEV_VM => "KVM_X86_SEV_VM",
                sys::KVM_X86_SEV_ES_VM => "KVM_X86_SEV_ES_VM",
                sys::KVM_X86_SNP_VM => "KVM_X86_SNP_VM",
                sys::KVM_X86_TDX_VM => "KVM_X86_TDX_VM",
                _ => return None,
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            (self.0 == 0).then_some("default")
        }
    }
}

/// An open `/dev/kvm`.
///
/// # Examples
///
/// ```
/// use kvm_gmem::{Extension, KvmDevice, VmType};
///
/// # fn main() -> Result<(), kvm_gmem::Error> {
/// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
/// let kvm = KvmDevice::open()?;
/// println!("KVM_CAP_GUEST_MEMFD = {}", kvm.extension(Extension::GUEST_MEMFD)?);
/// let _vm = kvm.create_vm(VmType::DEFAULT)?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct KvmDevice {
    fd: OwnedFd,
}

impl KvmDevice {
    /// Opens `/dev/kvm` (read-write, close-on-exec).
    ///
    /// # Errors
    ///
    /// [`Error::Kernel`] with `open`'s errno: `ENOENT` without KVM,
    /// `EACCES` for a user outside the `kvm` group.
    ///
    /// # Examples
    ///
    /// ```
    /// use kvm_gmem::KvmDevice;
    ///
    /// # fn main() -> Result<(), kvm_gmem::Error> {
    /// let kvm = match KvmDevice::open() {
    ///     Ok(kvm) => kvm,
    ///     Err(e) => {
    ///         println!("no KVM here: {e}");
    ///         return Ok(());
    ///     }
    /// };
    /// assert_eq!(kvm.api_version()?, 12);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-get-api-version> (the system ioctls of `/dev/kvm`)
    pub fn open() -> Result<KvmDevice> {
        KvmDevice::open_path(Path::new("/dev/kvm"))
    }

    /// Opens a KVM device node at `path` (read-write, close-on-exec).
    pub fn open_path(path: &Path) -> Result<KvmDevice> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| Error::invalid("open /dev/kvm", "the path contains a NUL byte"))?;
        let fd = crate::sys::open_cloexec(&c, libc::O_RDWR)
            .map_err(|e| Error::kernel("open /dev/kvm", e))?;
        Ok(KvmDevice { fd })
    }

    /// `ioctl(kvm, KVM_GET_API_VERSION)`: 12 on every kernel since 2.6.22.
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-get-api-version>
    #[doc(alias = "KVM_GET_API_VERSION")]
    pub fn api_version(&self) -> Result<i32> {
        // SAFETY: KVM_GET_API_VERSION takes no argument (0).
        unsafe { ioctl_int::<{ sys::KVM_GET_API_VERSION }>(self.fd.as_fd(), 0) }
            .map_err(|e| Error::kernel("KVM_GET_API_VERSION", e))
    }

    /// `ioctl(kvm, KVM_CHECK_EXTENSION, cap)`: the system-wide answer (0 =
    /// not supported). A VM's own answer, which can differ (memory
    /// attributes, guest_memfd flags), is
    /// [`VmOps::extension`](crate::VmOps::extension).
    ///
    /// # Examples
    ///
    /// ```
    /// use kvm_gmem::{Extension, KvmDevice};
    ///
    /// # fn main() -> Result<(), kvm_gmem::Error> {
    /// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
    /// let kvm = KvmDevice::open()?;
    /// let slots = kvm.extension(Extension::NR_MEMSLOTS)?;
    /// println!("{slots} memory slots per address space");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-check-extension>
    #[doc(alias = "KVM_CHECK_EXTENSION")]
    pub fn extension(&self, cap: Extension) -> Result<i32> {
        check_extension(self.fd.as_fd(), cap)
    }

    /// `ioctl(kvm, KVM_CREATE_VM, type)`: a new VM.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] when `KVM_CAP_VM_TYPES` does not list `ty`
    /// (on arm64: when `ty` asks for an IPA size outside 32 to
    /// `KVM_CAP_ARM_VM_IPA_SIZE`); [`Error::Kernel`] for other refusals
    /// (e.g. `ENOMEM`).
    ///
    /// # Examples
    ///
    /// A default VM, and what it offers for guest_memfd (a VM's answer can
    /// differ from `/dev/kvm`'s):
    ///
    /// ```
    /// use kvm_gmem::{Extension, KvmDevice, VmOps, VmType};
    ///
    /// # fn main() -> Result<(), kvm_gmem::Error> {
    /// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
    /// let kvm = KvmDevice::open()?;
    /// let vm = kvm.create_vm(VmType::DEFAULT)?;
    /// println!(
    ///     "KVM_CAP_GUEST_MEMFD = {}, flags {}",
    ///     vm.extension(Extension::GUEST_MEMFD)?,
    ///     vm.guest_memfd_flags()?
    /// );
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # References
    ///
    /// <https://docs.kernel.org/virt/kvm/api.html#kvm-create-vm>
    #[doc(alias = "KVM_CREATE_VM")]
    pub fn create_vm(&self, ty: VmType) -> Result<Vm> {
        let op = "KVM_CREATE_VM";
        // SAFETY: KVM_CREATE_VM takes the VM type as its value.
        match unsafe { ioctl_int::<{ sys::KVM_CREATE_VM }>(self.fd.as_fd(), ty.0) } {
            Ok(raw) => Ok(Vm {
                fd: own_new_fd(op, raw)?,
            }),
            Err(Errno(libc::EINVAL)) if cfg!(target_arch = "aarch64") && ty != VmType::DEFAULT => {
                let max = self.extension(Extension::ARM_VM_IPA_SIZE).unwrap_or(0);
                let bits = ty.0 & sys::KVM_VM_TYPE_ARM_IPA_SIZE_MASK;
                if bits != 0 && (bits < 32 || bits > max as u64) {
                    Err(Error::Unsupported {
                        op,
                        capability: "KVM_CAP_ARM_VM_IPA_SIZE",
                        evidence: format!(
                            "VM type {:#x} asks for a {bits}-bit IPA, outside 32 to \
                             KVM_CAP_ARM_VM_IPA_SIZE = {max}; KVM_CREATE_VM gave EINVAL",
                            ty.0
                        ),
                    })
                } else {
                    Err(Error::kernel(op, Errno(libc::EINVAL)))
                }
            }
            Err(Errno(libc::EINVAL)) if ty != VmType::DEFAULT => {
                let types = self.extension(Extension::VM_TYPES).unwrap_or(0);
                if ty.0 < 64 && types as u64 & (1 << ty.0) == 0 {
                    Err(Error::Unsupported {
                        op,
                        capability: "KVM_CAP_VM_TYPES",
                        evidence: format!(
                            "VM type {} is not in KVM_CAP_VM_TYPES = {types:#x}; KVM_CREATE_VM gave EINVAL",
                            ty.name().unwrap_or("?")
                        ),
                    })
                } else {
                    Err(Error::kernel(op, Errno(libc::EINVAL)))
                }
            }
            Err(e) => Err(Error::kernel(op, e)),
        }
    }
}

impl AsFd for KvmDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for KvmDevice {
    fn as_raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

/// A VM fd owned by this crate. Its operations are the methods of
/// [`VmOps`](crate::VmOps), which any VM fd has (a borrowed fd, and with
/// feature `kvm-ioctls` a `kvm_ioctls::VmFd`).
#[derive(Debug)]
pub struct Vm {
    fd: OwnedFd,
}

impl Vm {
    /// Adopts a VM fd created elsewhere.
    pub fn from_owned_fd(fd: OwnedFd) -> Vm {
        Vm { fd }
    }
}

impl AsFd for Vm {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Vm {
    fn as_raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

impl From<Vm> for OwnedFd {
    fn from(vm: Vm) -> OwnedFd {
        vm.fd
    }
}
