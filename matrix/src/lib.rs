//! `gmem-matrix`: the kernel lane's bookkeeping (`scripts/kernel-lane.sh`).
//!
//! - [`matrix`]: `docs/kernel-matrix.md` from the `GMEM-MATRIX` lines of
//!   `tests/kernel_matrix.rs`: lane columns (compared strictly) and one
//!   column per host the lane ran on (never a failure);
//! - [`host`]: which host a column comes from;
//! - [`skips`]: the `SKIP` lines of the lane's executables, and those naming
//!   a capability the lane's kernel must have.

pub mod host;
pub mod matrix;
pub mod skips;
