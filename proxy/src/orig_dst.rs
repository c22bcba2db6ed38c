//! The original destination of a connection redirected by iptables (`REDIRECT` in the nat
//! table), read with `getsockopt(SO_ORIGINAL_DST)` for IPv4 and
//! `getsockopt(IP6T_SO_ORIGINAL_DST)` for IPv6.
//!
//! With [`crate::sockopt`], this is the crate's only unsafe code: libc's `getsockopt` writes a `sockaddr_in` /
//! `sockaddr_in6` through a raw pointer. Each call passes a properly sized, zeroed,
//! stack-owned struct and its exact length, and the fd is borrowed from a live socket for
//! the duration of the call.
#![allow(unsafe_code)]

use std::{
    io,
    mem::{MaybeUninit, size_of},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd,
};

/// The destination the client originally dialled, before redirection.
///
/// Fails (typically `ENOENT`) when the connection was not redirected by netfilter.
pub fn original_dst(socket: &impl AsRawFd, local: SocketAddr) -> io::Result<SocketAddr> {
    let fd = socket.as_raw_fd();
    let ipv4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    if ipv4 {
        let mut addr = MaybeUninit::<libc::sockaddr_in>::zeroed();
        let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: `addr` is a zeroed sockaddr_in owned by this frame and `len` is its size;
        // the kernel writes at most `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                libc::SO_ORIGINAL_DST,
                addr.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: zero-initialised and then filled by the kernel; any bit pattern is valid.
        let addr = unsafe { addr.assume_init() };
        let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(addr.sin_port),
        )))
    } else {
        let mut addr = MaybeUninit::<libc::sockaddr_in6>::zeroed();
        let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: as above, with a sockaddr_in6.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                libc::IP6T_SO_ORIGINAL_DST,
                addr.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: zero-initialised and then filled by the kernel; any bit pattern is valid.
        let addr = unsafe { addr.assume_init() };
        let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
        Ok(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(addr.sin6_port),
            addr.sin6_flowinfo,
            addr.sin6_scope_id,
        )))
    }
}
