//! The crate's error type: every failure names the operation, and either the
//! rule that was broken (checked before any system call), the capability the
//! kernel lacks, or the errno the kernel returned.

pub use kvm_gmem_sys::support::Errno;

/// What went wrong, and where.
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

    /// The errno, when the kernel returned one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Kernel { errno, .. } => Some(*errno),
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
