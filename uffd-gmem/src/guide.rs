//! Guides shipped with the crate (documentation only, no items): where the
//! API is `unsafe` and why, and moving from userfaultfd-rs.

#[doc = include_str!("../docs/safety.md")]
pub mod safety {}

#[doc = include_str!("../docs/migrating.md")]
pub mod migrating {}
