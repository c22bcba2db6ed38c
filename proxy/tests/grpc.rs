//! gRPC end to end: a real tonic server (the standard health service) behind the proxy,
//! a real tonic client in front, over HTTP/2 prior knowledge.

mod support;

use std::time::Duration;

use support::*;
use tonic_health::{
    ServingStatus,
    pb::{HealthCheckRequest, health_client::HealthClient},
};

#[tokio::test]
async fn grpc_unary_errors_and_server_streaming_pass_through() {
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Cart", ServingStatus::Serving)
        .await;
    let _server = Task(tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
    }));
    let proxy = TestProxy::start("web", config(&[("web", &[addr])])).await;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);

    // Unary.
    let resp = client
        .check(HealthCheckRequest {
            service: "shop.Cart".into(),
        })
        .await
        .unwrap();
    assert_eq!(resp.into_inner().status, ServingStatus::Serving as i32);

    // A gRPC error travels in grpc-status, untouched.
    let err = client
        .check(HealthCheckRequest {
            service: "shop.Nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Server streaming: an update made after the stream opened arrives through the proxy.
    let mut watch = client
        .watch(HealthCheckRequest {
            service: "shop.Cart".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    reporter
        .set_service_status("shop.Cart", ServingStatus::NotServing)
        .await;
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("streamed update within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
}

#[tokio::test]
async fn grpc_client_gets_a_grpc_status_for_proxy_errors() {
    let proxy = TestProxy::start("web", config(&[("web", &[])])).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "no_endpoints");
    assert_eq!(err.metadata().get("weft-error").unwrap(), "no_endpoints");
}
