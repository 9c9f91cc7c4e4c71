//! Handing a guest_memfd to another process over a Unix socket.
