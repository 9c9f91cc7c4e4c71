//! The sync primitives of [`state`](super::state): `std`'s, or loom's in
//! the model of the claim / fill / `REMOVE` protocol (`--cfg loom`, tests
//! only: `RUSTFLAGS="--cfg loom" cargo test -p uffd-gmem --lib --release
//! loom`). `Arc` stays `std`'s: it only shares regions between threads and
//! is no part of the protocol.

#[cfg(all(test, loom))]
pub(super) use loom::sync::{
    RwLock, RwLockReadGuard,
    atomic::{AtomicU64, Ordering},
};
#[cfg(not(all(test, loom)))]
pub(super) use std::sync::{
    RwLock, RwLockReadGuard,
    atomic::{AtomicU64, Ordering},
};
