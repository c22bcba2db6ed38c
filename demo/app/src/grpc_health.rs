//! `serve --grpc-health-listen`: the gRPC health service a pod's `grpc` probe calls.
//!
//! The kubelet's `grpc` probe (and the Weft proxy performing it for the kubelet, once
//! injection has rewritten it) calls `grpc.health.v1.Health/Check` in plain-text HTTP/2
//! with prior knowledge (h2c). This listener answers exactly that, written by hand on
//! hyper's HTTP/2 server: the response message is two bytes of protobuf in a 5-byte gRPC
//! frame, so no gRPC library is needed.
//!
//! ```text
//!  POST /grpc.health.v1.Health/Check  ─▶ fail file? ─ no ─▶ 200, [00 00000002 08 01], grpc-status: 0  (SERVING)
//!     HealthCheckRequest{service}                   └ yes ─▶ 200, [00 00000002 08 02], grpc-status: 0  (NOT_SERVING)
//!  any other path or method                          ─────▶ 200, no message,         grpc-status: 12 (UNIMPLEMENTED)
//! ```
//!
//! The request's `service` (the probe's `grpc.service`, `""` when it sets none) is read
//! and logged but does not change the answer: the whole server and every named service
//! are SERVING or NOT_SERVING together, as the fail file says (no `SERVICE_UNKNOWN`).
//! The first answer and every change of answer are logged at `info` with the caller's
//! `User-Agent` (the kubelet's `kube-probe/<version>`, passed on by Weft's proxy), so the
//! log shows whose probe reached the application and what it was told.

use std::{
    convert::Infallible,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::{
    body::{Body, Frame, Incoming},
    server::conn::http2,
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// The one method served.
pub const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// The largest request body read: a `HealthCheckRequest` is a service name in a 5-byte
/// frame, and a probe's service name is short.
const MAX_REQUEST_BYTES: usize = 4096;

/// gRPC status codes answered (`grpc-status`).
const GRPC_OK: u16 = 0;
const GRPC_INTERNAL: u16 = 13;
const GRPC_UNIMPLEMENTED: u16 = 12;

/// `grpc.health.v1.HealthCheckResponse.ServingStatus`: the values this server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServingStatus {
    /// The application serves (no fail file).
    Serving = 1,
    /// The application was made to fail (`weft-demo-app fail`).
    NotServing = 2,
}

impl ServingStatus {
    /// NOT_SERVING while the application is made to fail, SERVING otherwise.
    pub fn of(failing: bool) -> Self {
        if failing {
            Self::NotServing
        } else {
            Self::Serving
        }
    }

    /// The name in `health.proto`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Serving => "SERVING",
            Self::NotServing => "NOT_SERVING",
        }
    }
}

/// The last status answered (`0` before the first), so that changes are logged once.
type LastAnswer = Arc<AtomicU8>;

/// The gRPC message `HealthCheckResponse{status}` in its length-prefixed frame: no
/// compression, length 2, then field 1 (tag `0x08`: number 1, varint) with the status.
pub fn check_response(status: ServingStatus) -> Bytes {
    Bytes::copy_from_slice(&[0, 0, 0, 0, 2, 0x08, status as u8])
}

/// Why a request body is not a `HealthCheckRequest`.
#[derive(Debug, PartialEq, Eq)]
pub enum BadRequest {
    /// Not exactly one uncompressed gRPC frame.
    Framing,
    /// The frame does not hold a `HealthCheckRequest` as proto3 encoders write it.
    Message,
}

/// The `service` a `HealthCheckRequest` body (one gRPC frame) names: `""` when the field is
/// absent, as proto3 encoders omit an empty string. Only field 1 is understood.
pub fn requested_service(body: &[u8]) -> Result<String, BadRequest> {
    let [0, l0, l1, l2, l3, message @ ..] = body else {
        return Err(BadRequest::Framing);
    };
    if u32::from_be_bytes([*l0, *l1, *l2, *l3]) as usize != message.len() {
        return Err(BadRequest::Framing);
    }
    match message {
        [] => Ok(String::new()),
        // Field 1, length-delimited; names under 128 bytes have a one-byte length.
        [0x0a, len, name @ ..] if usize::from(*len) == name.len() && *len < 0x80 => {
            String::from_utf8(name.to_vec()).map_err(|_| BadRequest::Message)
        }
        _ => Err(BadRequest::Message),
    }
}

/// Serves the health service on `listener` until the process ends, answering from
/// whether `fail_file` exists.
pub async fn run(listener: TcpListener, fail_file: Arc<PathBuf>) {
    let last = LastAnswer::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "gRPC health: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (fail_file, last) = (fail_file.clone(), last.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(fail_file.clone(), last.clone(), req));
            if let Err(e) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "gRPC health: connection ended with an error");
            }
        });
    }
}

async fn answer(
    fail_file: Arc<PathBuf>,
    last: LastAnswer,
    req: Request<Incoming>,
) -> Result<Response<GrpcBody>, Infallible> {
    if req.method() != Method::POST || req.uri().path() != CHECK_PATH {
        tracing::debug!(path = req.uri().path(), "gRPC health: unimplemented method");
        return Ok(grpc_response(
            None,
            GRPC_UNIMPLEMENTED,
            "only grpc.health.v1.Health/Check is served",
        ));
    }
    let user_agent = req.headers().get(http::header::USER_AGENT).cloned();
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            tracing::debug!(error = %e, "gRPC health: request unreadable");
            return Ok(grpc_response(None, GRPC_INTERNAL, "request unreadable"));
        }
    };
    let service = match requested_service(&body) {
        Ok(service) => service,
        Err(e) => {
            tracing::debug!(error = ?e, "gRPC health: not a HealthCheckRequest");
            return Ok(grpc_response(
                None,
                GRPC_INTERNAL,
                "not a HealthCheckRequest",
            ));
        }
    };
    let status = ServingStatus::of(crate::serve::failing(&fail_file).await.is_some());
    let user_agent = user_agent
        .as_ref()
        .map(|ua| String::from_utf8_lossy(ua.as_bytes()));
    if last.swap(status as u8, Ordering::Relaxed) != status as u8 {
        tracing::info!(%service, status = status.name(), ?user_agent, "gRPC health: answer changed");
    } else {
        tracing::debug!(%service, status = status.name(), ?user_agent, "gRPC health check");
    }
    Ok(grpc_response(Some(check_response(status)), GRPC_OK, ""))
}

/// A gRPC response: HTTP 200, `content-type: application/grpc`, the framed `message` if
/// any, then `grpc-status` (and `grpc-message`, plain ASCII here) in trailers.
fn grpc_response(message: Option<Bytes>, code: u16, text: &'static str) -> Response<GrpcBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(code));
    if !text.is_empty() {
        trailers.insert("grpc-message", HeaderValue::from_static(text));
    }
    let mut response = Response::new(GrpcBody {
        message,
        trailers: Some(trailers),
    });
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A gRPC response body: at most one message, then the trailers carrying the status.
pub struct GrpcBody {
    message: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        Poll::Ready(match this.message.take() {
            Some(message) => Some(Ok(Frame::data(message))),
            None => this.trailers.take().map(|t| Ok(Frame::trailers(t))),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.message.is_none() && self.trailers.is_none()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_response_is_two_bytes_of_protobuf_in_a_five_byte_frame() {
        assert_eq!(
            check_response(ServingStatus::Serving).as_ref(),
            [0, 0, 0, 0, 2, 0x08, 0x01]
        );
        assert_eq!(
            check_response(ServingStatus::NotServing).as_ref(),
            [0, 0, 0, 0, 2, 0x08, 0x02]
        );
    }

    #[test]
    fn the_fail_file_switches_serving_to_not_serving() {
        assert_eq!(ServingStatus::of(false), ServingStatus::Serving);
        assert_eq!(ServingStatus::of(true), ServingStatus::NotServing);
    }

    #[test]
    fn the_requested_service_is_empty_or_named() {
        // What grpc-go and tonic send for `service: ""`: an empty message.
        assert_eq!(requested_service(&[0, 0, 0, 0, 0]).unwrap(), "");
        let mut named = vec![0, 0, 0, 0, 11, 0x0a, 9];
        named.extend_from_slice(b"shop.Cart");
        assert_eq!(requested_service(&named).unwrap(), "shop.Cart");
    }

    #[test]
    fn a_body_that_is_not_one_health_check_request_is_refused() {
        for (body, why) in [
            (&[][..], BadRequest::Framing),
            (&[0, 0, 0, 0][..], BadRequest::Framing),
            // Compressed flag set.
            (&[1, 0, 0, 0, 0][..], BadRequest::Framing),
            // Length says 3, two bytes follow.
            (&[0, 0, 0, 0, 3, 0x0a, 0][..], BadRequest::Framing),
            // Field 2, or a service name longer than its bytes.
            (&[0, 0, 0, 0, 2, 0x10, 1][..], BadRequest::Message),
            (&[0, 0, 0, 0, 3, 0x0a, 5, b'a'][..], BadRequest::Message),
            // Not UTF-8.
            (&[0, 0, 0, 0, 3, 0x0a, 1, 0xff][..], BadRequest::Message),
        ] {
            assert_eq!(requested_service(body), Err(why), "{body:02x?}");
        }
    }

    #[tokio::test]
    async fn the_body_yields_the_message_then_the_trailers() {
        let response = grpc_response(Some(check_response(ServingStatus::Serving)), 0, "");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/grpc");
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes().as_ref(), [0, 0, 0, 0, 2, 0x08, 0x01]);

        let unimplemented = grpc_response(None, GRPC_UNIMPLEMENTED, "no");
        let collected = unimplemented.into_body().collect().await.unwrap();
        let trailers = collected.trailers().unwrap().clone();
        assert_eq!(trailers["grpc-status"], "12");
        assert_eq!(trailers["grpc-message"], "no");
        assert!(collected.to_bytes().is_empty());
    }
}
