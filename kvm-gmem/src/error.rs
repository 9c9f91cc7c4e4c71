//! The crate's error type: every failure names the operation, and either the
//! rule that was broken (checked before any system call), the capability the
//! kernel lacks, or the errno the kernel returned.

pub use kvm_gmem_sys::support::Errno;

/// What went wrong, and where.
///
/// # Examples
///
/// ```
/// use kvm_gmem::{Error, KvmDevice, VmType};
///
/// # fn main() -> Result<(), Error> {
/// # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
/// let kvm = KvmDevice::open()?;
/// match kvm.create_vm(VmType(1 << 20)) {
///     Ok(_) => println!("created"),
///     Err(e @ Error::Unsupported { .. }) => println!("not on this kernel: {e}"),
///     Err(Error::Kernel { op, errno }) => println!("{op} answered {errno}"),
///     Err(e) => return Err(e),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The kernel refused the operation.
    #[error("{op}: {errno}")]
    Kernel {
        /// The operation: the ioctl or system call issued.
        op: &'static str,
        /// What the kernel returned.
        errno: Errno,
    },
    /// The request breaks a rule the kernel would enforce; no system call was
    /// made.
    ///
    /// The kernel answers such a request `EINVAL`, so
    /// [`Error::errno`] reports `Some(Errno(EINVAL))` for it, and the
    /// [`std::io::Error`] it converts to has kind
    /// [`InvalidInput`](std::io::ErrorKind::InvalidInput).
    #[error("{op}: {rule}")]
    Invalid {
        /// The operation that was refused.
        op: &'static str,
        /// The rule, and how the request broke it.
        rule: String,
    },
    /// The kernel (or the guest_memfd, or this build) lacks what the
    /// operation needs.
    #[error("{op}: not supported: {capability} ({evidence})")]
    Unsupported {
        /// The operation that was refused.
        op: &'static str,
        /// The capability or feature that is missing (`KVM_CAP_PRE_FAULT_MEMORY`).
        capability: &'static str,
        /// How the crate knows: a capability value or a probe's errno.
        evidence: String,
    },
    /// A guest_memfd flag the VM does not offer in `KVM_CAP_GUEST_MEMFD_FLAGS`.
    #[error(
        "{op}: guest_memfd flag(s) {unsupported} not supported by this VM \
         (KVM_CAP_GUEST_MEMFD_FLAGS offers {supported})"
    )]
    UnsupportedFlags {
        /// The operation that was refused.
        op: &'static str,
        /// The offending flags.
        unsupported: crate::gmem::GuestMemfdFlags,
        /// What the VM offers.
        supported: crate::gmem::GuestMemfdFlags,
    },
    /// A message from another process (a guest_memfd hand-over) was malformed.
    #[error("{op}: {what}")]
    Protocol {
        /// The operation.
        op: &'static str,
        /// What was wrong with the message.
        what: String,
    },
}

impl Error {
    pub(crate) fn kernel(op: &'static str, errno: Errno) -> Error {
        Error::Kernel { op, errno }
    }

    pub(crate) fn invalid(op: &'static str, rule: impl Into<String>) -> Error {
        Error::Invalid {
            op,
            rule: rule.into(),
        }
    }

    /// The errno the kernel returned, or would have returned.
    ///
    /// - [`Error::Kernel`]: the kernel's errno.
    /// - [`Error::Invalid`]: `EINVAL`. The request was refused before the
    ///   system call because it breaks a rule the kernel enforces, and
    ///   `EINVAL` is what the kernel answers such a request; callers that
    ///   switch on the errno see the same value with or without the check.
    ///   Match on [`Error::Invalid`] to tell the two apart.
    /// - Every other variant: `None` (a missing capability or a malformed
    ///   message is not one errno).
    ///
    /// # Examples
    ///
    /// ```
    /// use kvm_gmem::{Errno, Error, MemoryRegion2};
    ///
    /// // A slot size that is not a page multiple: refused before the ioctl.
    /// let e = MemoryRegion2::builder(0, 0, 123).build().unwrap_err();
    /// assert!(matches!(e, Error::Invalid { .. }));
    /// assert_eq!(e.errno(), Some(Errno(libc::EINVAL)));
    /// let io = std::io::Error::from(e);
    /// assert_eq!(io.kind(), std::io::ErrorKind::InvalidInput);
    /// ```
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Kernel { errno, .. } => Some(*errno),
            Error::Invalid { .. } => Some(Errno(libc::EINVAL)),
            _ => None,
        }
    }

    /// Whether the kernel lacks the feature (as opposed to a bad request).
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            Error::Unsupported { .. } | Error::UnsupportedFlags { .. }
        )
    }
}

/// The errno's kind ([`Error::errno`]): `InvalidInput` for
/// [`Error::Invalid`] (`EINVAL`), the kernel's errno's kind for
/// [`Error::Kernel`], `Other` otherwise. The [`Error`] is kept as the
/// source.
impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        match e.errno() {
            Some(errno) => std::io::Error::new(std::io::Error::from(errno).kind(), e),
            None => std::io::Error::other(e),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    #[test]
    fn invalid_reports_einval() {
        let e = Error::invalid("KVM_CREATE_GUEST_MEMFD", "size must be non-zero");
        assert_eq!(e.errno(), Some(Errno(libc::EINVAL)));
        assert!(!e.is_unsupported());
        let io = std::io::Error::from(e);
        assert_eq!(io.kind(), ErrorKind::InvalidInput);
        // The error is kept as the source, its text intact.
        assert!(io.to_string().contains("size must be non-zero"), "{io}");
        assert!(io.get_ref().is_some_and(|inner| inner.is::<Error>()));
    }

    #[test]
    fn kernel_reports_its_errno() {
        for errno in [libc::EEXIST, libc::EINVAL, libc::ENOMEM, libc::EFAULT] {
            let e = Error::kernel("KVM_SET_USER_MEMORY_REGION2", Errno(errno));
            assert_eq!(e.errno(), Some(Errno(errno)));
            let io = std::io::Error::from(e);
            assert_eq!(io.kind(), std::io::Error::from_raw_os_error(errno).kind());
        }
    }

    #[test]
    fn others_have_no_errno() {
        let unsupported = Error::Unsupported {
            op: "KVM_PRE_FAULT_MEMORY",
            capability: "KVM_CAP_PRE_FAULT_MEMORY",
            evidence: "KVM_CAP_PRE_FAULT_MEMORY = 0".into(),
        };
        let protocol = Error::Protocol {
            op: "share::recv",
            what: "wrong magic".into(),
        };
        for e in [unsupported, protocol] {
            assert_eq!(e.errno(), None, "{e}");
            assert_eq!(std::io::Error::from(e).kind(), ErrorKind::Other);
        }
    }
}
