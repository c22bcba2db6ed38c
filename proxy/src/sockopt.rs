//! Socket options that tokio does not expose, set with `setsockopt`.
//!
//! With [`crate::orig_dst`], this is the crate's only unsafe code: each call passes a
//! `c_int` option value owned by the frame and its exact size, and the fd is borrowed
//! from a live socket for the duration of the call.
#![allow(unsafe_code)]

use std::{io, os::fd::AsRawFd};

/// Asks the kernel to pick a bound socket's port at `connect`, knowing the destination
/// (`IP_BIND_ADDRESS_NO_PORT`, Linux 4.2), rather than at `bind`, where the port must be
/// free for every destination. Call it before binding to a source address with port 0.
pub fn bind_address_no_port(socket: &impl AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a live socket's descriptor, and a c_int option value of its own size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
