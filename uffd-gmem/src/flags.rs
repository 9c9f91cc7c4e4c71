//! Typed feature, ioctl and mode sets.

use kvm_gmem_sys as sys;

bitflags::bitflags! {
    /// `UFFD_FEATURE_*`: all 19 features of Linux 7.3. Unknown bits are kept.
    ///
    /// # Examples
    ///
    /// ```
    /// use uffd_gmem::{Features, Uffd};
    ///
    /// let wanted = Features::EVENT_REMOVE | Features::THREAD_ID;
    /// assert!(wanted.contains(Features::THREAD_ID));
    /// assert!(!wanted.contains(Features::MOVE));
    /// // A bit this crate does not name (a newer kernel's) survives.
    /// let raw = Features::from_bits_retain(wanted.bits() | 1 << 63);
    /// assert_eq!(raw.bits() >> 63, 1);
    /// assert_eq!(raw & Features::all(), wanted);
    /// // A userfaultfd knows what it enabled, and what the kernel offers.
    /// if let Ok(uffd) = Uffd::builder().create() {
    ///     assert!(uffd.supported_features().unwrap().contains(uffd.features().unwrap()));
    /// }
    /// ```
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Features: u64 {
        /// Write-protect faults are reported with `UFFD_PAGEFAULT_FLAG_WP` (4.3).
        const PAGEFAULT_FLAG_WP = sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP;
        /// `UFFD_EVENT_FORK` (4.11).
        const EVENT_FORK = sys::UFFD_FEATURE_EVENT_FORK;
        /// `UFFD_EVENT_REMAP` (4.11).
        const EVENT_REMAP = sys::UFFD_FEATURE_EVENT_REMAP;
        /// `UFFD_EVENT_REMOVE` (4.11).
        const EVENT_REMOVE = sys::UFFD_FEATURE_EVENT_REMOVE;
        /// MISSING on hugetlbfs (4.11).
        const MISSING_HUGETLBFS = sys::UFFD_FEATURE_MISSING_HUGETLBFS;
        /// MISSING on shmem (4.11).
        const MISSING_SHMEM = sys::UFFD_FEATURE_MISSING_SHMEM;
        /// `UFFD_EVENT_UNMAP` (4.11).
        const EVENT_UNMAP = sys::UFFD_FEATURE_EVENT_UNMAP;
        /// Faults raise SIGBUS instead of events (4.14).
        const SIGBUS = sys::UFFD_FEATURE_SIGBUS;
        /// The faulting thread id is reported (4.14).
        const THREAD_ID = sys::UFFD_FEATURE_THREAD_ID;
        /// MINOR on hugetlbfs (5.13).
        const MINOR_HUGETLBFS = sys::UFFD_FEATURE_MINOR_HUGETLBFS;
        /// MINOR on shmem (5.14).
        const MINOR_SHMEM = sys::UFFD_FEATURE_MINOR_SHMEM;
        /// Exact fault addresses, not page aligned (5.18).
        const EXACT_ADDRESS = sys::UFFD_FEATURE_EXACT_ADDRESS;
        /// WP on hugetlbfs and shmem (5.19).
        const WP_HUGETLBFS_SHMEM = sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        /// WP markers on unpopulated pages (6.4).
        const WP_UNPOPULATED = sys::UFFD_FEATURE_WP_UNPOPULATED;
        /// `UFFDIO_POISON` (6.6).
        const POISON = sys::UFFD_FEATURE_POISON;
        /// Asynchronous write protection (6.7).
        const WP_ASYNC = sys::UFFD_FEATURE_WP_ASYNC;
        /// `UFFDIO_MOVE` (6.8).
        const MOVE = sys::UFFD_FEATURE_MOVE;
        /// Read-write protection, `UFFDIO_RWPROTECT` (7.3).
        const RWP = sys::UFFD_FEATURE_RWP;
        /// Asynchronous read-write protection, `UFFDIO_SET_MODE` (7.3).
        ///
        /// Negotiating it in `UFFDIO_API` starts the userfaultfd in
        /// asynchronous mode: touches of protected pages are resolved by the
        /// kernel without an event. Negotiate only [`RWP`](Self::RWP) to
        /// start synchronous; [`Uffd::set_mode`](crate::Uffd::set_mode)
        /// switches either way at run time when the kernel offers this bit.
        const RWP_ASYNC = sys::UFFD_FEATURE_RWP_ASYNC;
    }
}

bitflags::bitflags! {
    /// The ioctls a userfaultfd or a registered range accepts (`1 << _UFFDIO_*`).
    ///
    /// # Examples
    ///
    /// ```
    /// use uffd_gmem::{HostMapping, Ioctls, RegisterMode, Uffd};
    ///
    /// # fn main() -> uffd_gmem::Result<()> {
    /// let Ok(uffd) = Uffd::builder().create() else {
    ///     return Ok(()); // no userfaultfd here
    /// };
    /// // The fd's own ioctls, from the `UFFDIO_API` handshake.
    /// assert!(uffd.api_ioctls().unwrap().contains(Ioctls::REGISTER | Ioctls::UNREGISTER));
    /// // A registered range's, from `UFFDIO_REGISTER`.
    /// let mem = HostMapping::anonymous(uffd_gmem::page_size() as usize)?;
    /// let range = uffd.register_mapping(&mem, RegisterMode::MISSING)?;
    /// assert!(range.contains(Ioctls::COPY | Ioctls::ZEROPAGE | Ioctls::WAKE));
    /// # Ok(())
    /// # }
    /// ```
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Ioctls: u64 {
        /// `UFFDIO_REGISTER`.
        const REGISTER = 1 << sys::_UFFDIO_REGISTER;
        /// `UFFDIO_UNREGISTER`.
        const UNREGISTER = 1 << sys::_UFFDIO_UNREGISTER;
        /// `UFFDIO_WAKE`.
        const WAKE = 1 << sys::_UFFDIO_WAKE;
        /// `UFFDIO_COPY`.
        const COPY = 1 << sys::_UFFDIO_COPY;
        /// `UFFDIO_ZEROPAGE`.
        const ZEROPAGE = 1 << sys::_UFFDIO_ZEROPAGE;
        /// `UFFDIO_MOVE`.
        const MOVE = 1 << sys::_UFFDIO_MOVE;
        /// `UFFDIO_WRITEPROTECT`.
        const WRITEPROTECT = 1 << sys::_UFFDIO_WRITEPROTECT;
        /// `UFFDIO_CONTINUE`.
        const CONTINUE = 1 << sys::_UFFDIO_CONTINUE;
        /// `UFFDIO_POISON`.
        const POISON = 1 << sys::_UFFDIO_POISON;
        /// `UFFDIO_RWPROTECT` (7.3).
        const RWPROTECT = 1 << sys::_UFFDIO_RWPROTECT;
        /// `UFFDIO_SET_MODE` (7.3).
        const SET_MODE = 1 << sys::_UFFDIO_SET_MODE;
        /// `UFFDIO_API`.
        const API = 1 << sys::_UFFDIO_API;
    }
}

bitflags::bitflags! {
    /// `UFFDIO_REGISTER_MODE_*`.
    ///
    /// # Examples
    ///
    /// ```
    /// use uffd_gmem::RegisterMode;
    /// use uffd_gmem::sys_bindings as sys;
    ///
    /// // A prefilled snapshot served with CONTINUE, holes with COPY.
    /// let mode = RegisterMode::MISSING | RegisterMode::MINOR;
    /// assert!(mode.contains(RegisterMode::MINOR));
    /// assert!(!mode.contains(RegisterMode::WP));
    /// // The bits are the kernel's.
    /// assert_eq!(
    ///     mode.bits(),
    ///     sys::UFFDIO_REGISTER_MODE_MISSING | sys::UFFDIO_REGISTER_MODE_MINOR
    /// );
    /// ```
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct RegisterMode: u64 {
        /// Faults on missing pages.
        const MISSING = sys::UFFDIO_REGISTER_MODE_MISSING;
        /// Write-protect faults.
        const WP = sys::UFFDIO_REGISTER_MODE_WP;
        /// Faults on pages present in the page cache but not mapped.
        const MINOR = sys::UFFDIO_REGISTER_MODE_MINOR;
        /// Read-write-protect faults (7.3).
        const RWP = sys::UFFDIO_REGISTER_MODE_RWP;
    }
}

bitflags::bitflags! {
    /// Mode bits of the resolving ioctls, named after their kernel flags.
    ///
    /// # Examples
    ///
    /// ```
    /// use uffd_gmem::{Error, Mode, Uffd};
    ///
    /// # fn main() -> uffd_gmem::Result<()> {
    /// // Resolve a batch without waking, then wake once.
    /// let mode = Mode::DONTWAKE | Mode::WP;
    /// assert!(mode.contains(Mode::DONTWAKE) && !mode.contains(Mode::ALLOW_SRC_HOLES));
    /// let Ok(uffd) = Uffd::builder().create() else {
    ///     return Ok(()); // no userfaultfd here
    /// };
    /// // A mode the ioctl does not take is refused before the call.
    /// let page = uffd_gmem::page_size();
    /// let e = uffd.zeropage(0..page, Mode::WP).unwrap_err();
    /// assert!(matches!(e, Error::Invalid { .. }), "{e}");
    /// # Ok(())
    /// # }
    /// ```
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Mode: u8 {
        /// `*_MODE_DONTWAKE`: resolve without waking the faulting threads
        /// (wake them later with [`crate::Uffd::wake`]).
        const DONTWAKE = 1 << 0;
        /// `UFFDIO_COPY_MODE_WP` / `UFFDIO_CONTINUE_MODE_WP`: map the pages
        /// write-protected.
        const WP = 1 << 1;
        /// `UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES`: holes in the source are not an error.
        const ALLOW_SRC_HOLES = 1 << 2;
    }
}
