//! The inbound side of mutual TLS: tells a peer proxy's TLS from anything else on the
//! same port, and terminates it.
//!
//! ```text
//! first bytes ─▶ 0x16 (TLS handshake record)? ─no──▶ plain text, bytes replayed
//!                   └yes─▶ ClientHello offers a weft-* ALPN? ─no──▶ the application's own
//!                              └yes─▶ TLS 1.3 handshake            TLS: replayed untouched
//!                                       (client certificate verified against the bundle)
//!                                     ─▶ identity + what ALPN says is inside
//! ```
//!
//! The ClientHello is read by a rustls [`Acceptor`] from a copy of the bytes, so a hello
//! that is not a peer proxy's goes to the application byte for byte.

use std::{sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::{ALPN_ALL, ALPN_H2, ALPN_HTTP1, ALPN_MUX, ALPN_TCP, IdentityStore, Inner, TlsFailure};
use crate::detect::PrefixedIo;

/// The largest ClientHello read before deciding: one full TLS record.
const MAX_HELLO_BYTES: usize = 5 + 16 * 1024;

/// What the first bytes of an inbound connection turned out to be.
pub enum Sniffed<I> {
    /// A peer proxy's mutual TLS, terminated.
    Tls(
        Box<tokio_rustls::server::TlsStream<PrefixedIo<I>>>,
        InboundTls,
    ),
    /// Not a peer proxy's TLS; the bytes read so far are replayed.
    Plain {
        /// The connection, first bytes included.
        io: PrefixedIo<I>,
        /// The client sent nothing within the wait (a server-speaks-first protocol).
        silent: bool,
    },
}

/// What an inbound mutual TLS session established.
#[derive(Clone, Debug, Default)]
pub struct InboundTls {
    /// The client's SPIFFE ID, when it presented a (verified) certificate.
    pub identity: Option<Arc<str>>,
    /// What ALPN says is inside.
    pub inner: Option<Inner>,
}

/// Why an inbound connection was closed before anything was forwarded.
#[derive(Debug, thiserror::Error)]
pub enum SniffError {
    /// The socket failed or closed during the ClientHello.
    #[error("reading the first bytes")]
    Io(#[source] std::io::Error),
    /// The TLS handshake failed: a bad client certificate, TLS below 1.3, and so on.
    #[error("TLS handshake refused ({})", .failure.as_str())]
    Refused {
        /// The classified reason.
        failure: TlsFailure,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Reads the start of `io` (waiting at most `wait` for its first byte) and terminates TLS
/// if it is a peer proxy's, within `handshake_timeout`.
pub async fn sniff<I: AsyncRead + AsyncWrite + Unpin>(
    mut io: I,
    identity: &IdentityStore,
    wait: Duration,
    handshake_timeout: Duration,
) -> Result<Sniffed<I>, SniffError> {
    let mut buf = BytesMut::with_capacity(1024);
    match tokio::time::timeout(wait, io.read_buf(&mut buf)).await {
        Err(_) => {
            return Ok(Sniffed::Plain {
                io: PrefixedIo::new(Bytes::new(), io),
                silent: true,
            });
        }
        Ok(Err(e)) => return Err(SniffError::Io(e)),
        Ok(Ok(_)) => {}
    }
    if buf.first() != Some(&0x16) {
        return Ok(plain(buf, io));
    }
    let deadline = tokio::time::Instant::now() + handshake_timeout;
    let mut acceptor = Acceptor::default();
    let mut fed = 0;
    let ours = loop {
        let mut chunk = &buf[fed..];
        if acceptor.read_tls(&mut chunk).is_err() {
            break false;
        }
        fed = buf.len() - chunk.len();
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                break accepted
                    .client_hello()
                    .alpn()
                    .is_some_and(|mut offered| offered.any(|p| ALPN_ALL.contains(&p)));
            }
            Ok(None) => {}
            Err(_) => break false,
        }
        if fed < buf.len() {
            continue;
        }
        if buf.len() >= MAX_HELLO_BYTES {
            break false;
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break false,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(SniffError::Io(e)),
        }
    };
    if !ours {
        return Ok(plain(buf, io));
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config());
    let handshake = acceptor.accept(PrefixedIo::new(buf.freeze(), io));
    let tls = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(source)) => {
            return Err(SniffError::Refused {
                failure: TlsFailure::of_io(&source),
                source,
            });
        }
        Err(_) => {
            return Err(SniffError::Refused {
                failure: TlsFailure::Handshake,
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"),
            });
        }
    };
    let (_, session) = tls.get_ref();
    let info = InboundTls {
        identity: session
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(super::peer_identity),
        inner: match session.alpn_protocol() {
            Some(p) if p == ALPN_MUX => Some(Inner::Mux),
            Some(p) if p == ALPN_HTTP1 => Some(Inner::Http1),
            Some(p) if p == ALPN_H2 => Some(Inner::H2),
            Some(p) if p == ALPN_TCP => Some(Inner::Tcp),
            _ => None,
        },
    };
    Ok(Sniffed::Tls(Box::new(tls), info))
}

fn plain<I>(buf: BytesMut, io: I) -> Sniffed<I> {
    Sniffed::Plain {
        io: PrefixedIo::new(buf.freeze(), io),
        silent: false,
    }
}
