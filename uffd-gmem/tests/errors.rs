//! `Error`'s errno and `io::Error` kind, `Error::Poll`, and (feature
//! `guest-memfd`) `?` between `uffd_gmem::Error` and `kvm_gmem::Error` both
//! ways.

use std::io::ErrorKind;
use std::time::Duration;
use uffd_gmem::{Errno, Error, HostMapping, RegisterMode, Uffd};

#[test]
fn invalid_means_einval() {
    let e = HostMapping::anonymous(0).unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
    assert_eq!(e.errno(), Some(Errno(libc::EINVAL)));
    assert!(!e.is_unsupported());
    let io = std::io::Error::from(e);
    assert_eq!(io.kind(), ErrorKind::InvalidInput);
    assert!(io.get_ref().is_some_and(|inner| inner.is::<Error>()));
}

#[test]
fn poll_conditions_are_not_errnos() {
    // A blocking userfaultfd makes poll report POLLERR.
    let Ok(uffd) = Uffd::builder().non_blocking(false).create() else {
        eprintln!("SKIP poll_conditions_are_not_errnos: no userfaultfd");
        return;
    };
    let e = uffd.poll_readable(Duration::from_millis(1)).unwrap_err();
    assert!(
        matches!(e, Error::Poll { revents, .. } if revents & libc::POLLERR != 0),
        "{e}"
    );
    assert_eq!(e.errno(), None);
    assert!(e.to_string().contains("POLLERR"), "{e}");
    assert_eq!(std::io::Error::from(e).kind(), ErrorKind::Other);
    // Registering still works on it: only poll needs O_NONBLOCK.
    let mem = HostMapping::anonymous(uffd_gmem::page_size() as usize).unwrap();
    uffd.register_mapping(&mem, RegisterMode::MISSING).unwrap();
}

#[cfg(feature = "guest-memfd")]
mod guest_memfd {
    use super::*;

    fn kvm_kernel(errno: i32) -> kvm_gmem::Result<()> {
        Err(kvm_gmem::Error::Kernel {
            op: "KVM_CREATE_GUEST_MEMFD",
            errno: Errno(errno),
        })
    }

    fn kvm_unsupported() -> kvm_gmem::Result<()> {
        Err(kvm_gmem::Error::Unsupported {
            op: "KVM_CREATE_GUEST_MEMFD",
            capability: "KVM_CAP_GUEST_MEMFD",
            evidence: "KVM_CAP_GUEST_MEMFD = 0".into(),
        })
    }

    /// A uffd-gmem function using `?` on kvm-gmem errors.
    fn uffd_side(unsupported: bool) -> uffd_gmem::Result<()> {
        if unsupported {
            kvm_unsupported()?;
        }
        kvm_kernel(libc::ENOMEM)?;
        Ok(())
    }

    /// A kvm-gmem function using `?` on uffd-gmem errors.
    fn kvm_side(e: Error) -> kvm_gmem::Result<()> {
        Err(e)?;
        Ok(())
    }

    #[test]
    fn kvm_gmem_errors_convert_keeping_errno_and_unsupported() {
        let e = uffd_side(false).unwrap_err();
        assert!(
            matches!(e, Error::GuestMemfd(kvm_gmem::Error::Kernel { .. })),
            "{e}"
        );
        assert_eq!(e.errno(), Some(Errno(libc::ENOMEM)));
        assert!(!e.is_unsupported());
        assert_eq!(
            e.to_string(),
            kvm_kernel(libc::ENOMEM).unwrap_err().to_string()
        );
        let e = uffd_side(true).unwrap_err();
        assert!(e.is_unsupported(), "{e}");
        assert_eq!(e.errno(), None);
    }

    #[test]
    fn uffd_gmem_errors_convert_to_kvm_gmem_variants() {
        let k = kvm_side(Error::Kernel {
            op: "UFFDIO_COPY",
            errno: Errno(libc::EFAULT),
        })
        .unwrap_err();
        assert!(
            matches!(k, kvm_gmem::Error::Kernel { op: "UFFDIO_COPY", errno } if errno.0 == libc::EFAULT)
        );
        let k = kvm_side(HostMapping::anonymous(0).unwrap_err()).unwrap_err();
        assert!(matches!(k, kvm_gmem::Error::Invalid { .. }), "{k}");
        let k = kvm_side(Error::Exists {
            op: "UFFDIO_COPY",
            addr: 0x1000,
            done: 0,
        })
        .unwrap_err();
        assert_eq!(k.errno(), Some(Errno(libc::EEXIST)));
        let k = kvm_side(Error::Unsupported {
            op: "UFFDIO_REGISTER",
            what: "userfaultfd on guest_memfd",
            evidence: "EINVAL".into(),
        })
        .unwrap_err();
        assert!(k.is_unsupported(), "{k}");
        let k = kvm_side(Error::Poll {
            op: "poll(userfaultfd)",
            revents: libc::POLLERR,
        })
        .unwrap_err();
        assert!(matches!(k, kvm_gmem::Error::Protocol { .. }), "{k}");
        assert_eq!(k.errno(), None);
        // A kvm-gmem error that went through uffd-gmem comes back as itself.
        let round = kvm_side(uffd_side(false).unwrap_err()).unwrap_err();
        assert!(matches!(round, kvm_gmem::Error::Kernel { errno, .. } if errno.0 == libc::ENOMEM));
    }
}
