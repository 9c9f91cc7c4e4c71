// Module dependencies, bottom up: a module uses only those listed for it,
// and `error` (whose `UnsupportedFlags` names `gmem`'s flags type).
//
// - `sys`: none. Every raw system call of the crate; ioctls through
//   kvm-gmem-sys's checked `ioctl_arg`/`ioctl_int`.
// - `kvm`: `sys`. `/dev/kvm`, the `Vm` handle, `KVM_CHECK_EXTENSION`.
// - `fault`: none. `attributes`, `prefault`: `sys`, `kvm`.
// - `gmem`: `sys`, `kvm`, `mapping`, `vm` (the builder's bound only).
// - `mapping`: `sys`, `gmem`. `memslot`: `sys`, `gmem`, `mapping`.
// - `vm`: `kvm`, `gmem`, `memslot`, `attributes`. `VmOps`, whose methods
//   only delegate to the module that owns each operation.
// - `caps`: `sys`, `kvm`, `vm`, `gmem`, `memslot`, `attributes`. Every
//   capability and RFC probe.
// - `populate`: `sys`, `gmem`, `mapping`, `vm`, `caps` (the ioctl's probe).
// - `share`: `sys`, `gmem`. `seccomp`: `populate` (its `Strategy`).
// - `interop`: `vm`, `fault`, `memslot`, `attributes` (kvm-bindings
//   conversions of their types).

//! Typed, safe KVM **guest_memfd** API for VMM authors.
//!
//! - [`KvmDevice`] and [`Vm`] handles; [`VmOps`], the operations on any VM fd
//!   (yours, a borrowed fd, a `kvm_ioctls::VmFd`);
//! - [`Capabilities`], a typed report queried once, with every RFC feature
//!   confirmed by behaviour ([`caps`]);
//! - [`GuestMemfd::builder`] for `KVM_CREATE_GUEST_MEMFD`, with the size and
//!   size rules checked before the ioctl and refused flags named; [`GuestMemfd::punch_hole`] and
//!   [`GuestMemfd::allocate`];
//! - [`Mapping`]: the host's view, which refuses to exist where any access
//!   would raise SIGBUS, with volatile, bounds-checked copies;
//! - [`MemoryRegion2`] for `KVM_SET_USER_MEMORY_REGION2`, set with
//!   [`VmOps::set_memory_region`] (`unsafe` exactly where the kernel starts
//!   trusting a user address);
//! - [`VmOps::set_attributes`], [`MemoryFault`] decoding and
//!   [`pre_fault_memory`] with its partial progress;
//! - [`populate`]: filling guest memory, by the VMM or another process
//!   ([`share`]);
//! - [`seccomp`]: the system calls and ioctl requests each feature needs,
//!   for VMMs that run under a seccomp filter.
//!
//! One rule for the call shape: what creates something is a builder that
//! takes the VM (`GuestMemfd::builder(..).create(&vm)`,
//! `Populate::new(&vm, ..)`), and what acts on an existing VM is a
//! [`VmOps`] method (`vm.set_memory_region(&region)`). Both accept anything
//! that is [`VmOps`], so a `kvm_ioctls::VmFd` works as is (feature
//! `kvm-ioctls`). Errors name the operation and the rule, the missing
//! capability, or the errno.
//!
//! ```
//! use kvm_gmem::{GuestMemfd, GuestMemfdFlags, KvmDevice, MemoryRegion2, VmOps, VmType};
//!
//! # fn main() -> Result<(), kvm_gmem::Error> {
//! # if KvmDevice::open().is_err() { return Ok(()) } // no /dev/kvm here
//! let kvm = KvmDevice::open()?;
//! let vm = kvm.create_vm(VmType::DEFAULT)?;
//! let shared = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
//! let offered = vm.guest_memfd_flags()?;
//! if !offered.contains(shared) {
//!     println!("this VM offers guest_memfd flags {offered}; a mappable one needs Linux 6.18");
//!     return Ok(());
//! }
//! let gmem = GuestMemfd::builder(2 << 20).flags(shared).create(&vm)?;
//! let map = gmem.map()?;
//! map.write_at(0x1000, &[0xf4])?; // hlt
//! let region = MemoryRegion2::builder(0, 0, 2 << 20)
//!     .guest_memfd(&gmem, 0)
//!     .userspace(&map)
//!     .build()?;
//! // SAFETY: `map` stays mapped until the slot is deleted below.
//! unsafe { vm.set_memory_region(&region)? };
//! // ... create the vCPUs and run the guest ...
//! vm.delete_memory_region(0)?;
//! # Ok(())
//! # }
//! ```
//!
//! The same example is in the crate's README. Each wrapper of an ioctl links
//! its section of the kernel's KVM API documentation,
//! <https://docs.kernel.org/virt/kvm/api.html>, under `# References`.
//!
//! Where the API draws the `unsafe` line, and why, is in
//! [`guide::safety`]; moving from kvm-ioctls is in [`guide::migrating`].
//!
//! # Examples
//!
//! In `kvm-gmem/examples/` (`cargo run -p kvm-gmem --example NAME`):
//!
//! - `capabilities`: the typed capability report of this kernel and a
//!   default VM.
//! - `populate_speed`: population throughput, each strategy against a plain
//!   copy into a fresh mapping (run with `--release`).
//! - `separate_populator`: the VMM hands its guest_memfd to another process
//!   ([`share`]), which fills it with
//!   [`Populate::detached`](populate::Populate::detached); the VMM checks
//!   the contents.
//! - `kvm_ioctls_interop` (`--features kvm-ioctls`): a kvm-ioctls `VmFd` and
//!   vCPU with this crate's guest_memfd and memory slot; a real-mode guest
//!   writes into guest_memfd memory, the host reads it back.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod attributes;
pub mod caps;
mod error;
mod fault;
mod gmem;
pub mod guide;
mod kvm;
mod mapping;
mod memslot;
pub mod populate;
mod prefault;
pub mod seccomp;
pub mod share;
mod sys;
mod vm;

#[cfg(feature = "kvm-ioctls")]
#[cfg_attr(docsrs, doc(cfg(feature = "kvm-ioctls")))]
pub mod interop;

#[cfg(feature = "vm-memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "vm-memory")))]
pub mod vm_memory;

pub use attributes::MemoryAttributes;
pub use caps::Capabilities;
pub use error::{Errno, Error, Result};
pub use fault::{MemoryFault, MemoryFaultFlags};
pub use gmem::{GuestMemfd, GuestMemfdBuilder, GuestMemfdFlags};
pub use kvm::{Extension, KvmDevice, Vm, VmType};
pub use mapping::Mapping;
#[cfg(feature = "rfc-kvm-userfault")]
pub use memslot::UserfaultBitmap;
pub use memslot::{MemoryRegion2, MemoryRegion2Builder, RegionFlags};
pub use prefault::{PreFault, pre_fault_memory};
pub use sys::page_size;
pub use vm::VmOps;

/// The raw bindings this crate is built on.
pub use kvm_gmem_sys as sys_bindings;
