//! The skip rules every kernel test of the workspace follows, in one place
//! (`std` only: both crates' test helpers include this file).
//!
//! - A missing **device** (`/dev/kvm`, `/dev/userfaultfd`) is a skip that
//!   fails under `CI=true` ([`ci`]): CI must run the tests.
//! - A **capability** the host kernel lacks is a skip in every run, CI
//!   included, because CI proves those paths in the kernel lanes: the test
//!   prints `SKIP <test>: <capability> = <value> on <kernel>` and passes
//!   ([`skip_capability`]). A lane names the capabilities its kernel must
//!   have in `GMEM_REQUIRED_CAPS` (comma-separated kernel names such as
//!   `KVM_CAP_GUEST_MEMFD` or `UFFD_FEATURE_RWP`); a skip of one of those
//!   fails.

use std::fmt::Display;

/// Whether `CI=true`: a missing device is then a failure.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_else(|e| format!("a kernel whose release cannot be read ({e})"))
}

/// The running test's name (libtest names each test's thread after it).
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("(unnamed test)")
        .to_owned()
}

/// The skip rule for a capability the host kernel lacks: prints `SKIP
/// <test>: <capability> = <value> on <kernel>`, and the caller returns (the
/// test passes, also under `CI=true`). Fails instead when `GMEM_REQUIRED_CAPS`
/// (comma-separated names, set by a kernel lane) lists `capability`.
pub fn skip_capability(capability: &str, value: impl Display) {
    let test = test_name();
    let line = format!("{test}: {capability} = {value} on {}", kernel_release());
    let required = std::env::var("GMEM_REQUIRED_CAPS").unwrap_or_default();
    if required.split(',').any(|c| c.trim() == capability) {
        panic!("{line}, but GMEM_REQUIRED_CAPS says this kernel must have {capability}");
    }
    eprintln!("SKIP {line}");
}
