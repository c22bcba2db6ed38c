#![deny(warnings)]

use futures::StreamExt;
use h2_support::prelude::*;

// Weft's patch: a server that queues a response head and resets the stream before the
// connection writes anything sends the head, then the reset (the DATA is dropped).
#[tokio::test]
async fn a_queued_response_head_goes_out_before_the_reset() {
    h2_support::trace_init!();
    let (io, mut client) = mock::new();

    let client = async move {
        let settings = client.assert_server_handshake().await;
        assert_default_settings!(settings);
        client
            .send_frame(
                frames::headers(1)
                    .request("GET", "https://example.com/")
                    .eos(),
            )
            .await;
        client.recv_frame(frames::headers(1).response(200)).await;
        client
            .recv_frame(frames::reset(1).reason(Reason::INTERNAL_ERROR))
            .await;
    };

    let srv = async move {
        let mut srv = server::handshake(io).await.expect("handshake");
        let (_req, mut respond) = srv.next().await.unwrap().unwrap();
        let rsp = http::Response::builder().status(200).body(()).unwrap();
        let mut stream = respond.send_response(rsp, false).unwrap();
        stream.reserve_capacity(7);
        let _ = stream.send_data("partial".into(), false);
        stream.send_reset(Reason::INTERNAL_ERROR);

        assert!(srv.next().await.is_none());
    };

    join(client, srv).await;
}
