//! The crate's error type: the operation, and the rule, the missing kernel
//! feature, or the errno, with the partial progress the kernel reported.

pub use kvm_gmem_sys::support::Errno;

use crate::flags::Features;

/// What went wrong, and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The kernel refused the operation.
    #[error("{op}: {errno}")]
    Kernel {
        /// The ioctl or system call.
        op: &'static str,
        /// What the kernel returned.
        errno: Errno,
    },
    /// The request breaks a rule the kernel enforces, or one this crate
    /// enforces for portability (e.g. negotiating a feature before using its
    /// ioctl); no call was made.
    #[error("{op}: {rule}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// The rule, and how it was broken.
        rule: String,
    },
    /// The kernel (or this userfaultfd) lacks what the operation needs.
    #[error("{op}: not supported: {what} ({evidence})")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The missing feature or capability.
        what: &'static str,
        /// How the crate knows.
        evidence: String,
    },
    /// `UFFDIO_API`: features the kernel does not offer.
    #[error(
        "UFFDIO_API: features {missing:?} are not offered by this kernel (it offers {supported:?})"
    )]
    MissingFeatures {
        /// Requested but not offered.
        missing: Features,
        /// What the kernel offers.
        supported: Features,
    },
    /// `EEXIST`: the page is already present. The faulting thread is *not*
    /// woken: issue [`crate::Uffd::wake`] for the range.
    #[error(
        "{op}: page already present at {addr:#x} (EEXIST) after {done} bytes; the faulter still needs UFFDIO_WAKE"
    )]
    Exists {
        /// The operation.
        op: &'static str,
        /// The first page that was already present.
        addr: u64,
        /// Bytes handled before it.
        done: u64,
    },
    /// `EAGAIN`: the address space is changing (a `REMOVE`, `REMAP` or
    /// `UNMAP` event is queued); read events, then retry the rest.
    #[error(
        "{op}: the address space is changing (EAGAIN) after {done} bytes; read events and retry"
    )]
    Again {
        /// The operation.
        op: &'static str,
        /// Bytes handled before the kernel stopped (never the negative errno
        /// the kernel stores in the result field).
        done: u64,
    },
    /// The operation stopped part way with another errno.
    #[error("{op}: {errno} after {done} bytes")]
    Partial {
        /// The operation.
        op: &'static str,
        /// Bytes handled.
        done: u64,
        /// Why it stopped.
        errno: Errno,
    },
    /// A record from the kernel or a message from another process was
    /// malformed.
    #[error("{op}: {what}")]
    Protocol {
        /// What was being decoded.
        op: &'static str,
        /// What was wrong.
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

    /// Whether the kernel lacks the feature.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            Error::Unsupported { .. } | Error::MissingFeatures { .. }
        )
    }

    /// The errno, when the kernel returned one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Kernel { errno, .. } | Error::Partial { errno, .. } => Some(*errno),
            Error::Exists { .. } => Some(Errno(libc::EEXIST)),
            Error::Again { .. } => Some(Errno(libc::EAGAIN)),
            _ => None,
        }
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
