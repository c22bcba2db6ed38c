//! Leader election against the test bed's real API server when the holder's API server
//! stalls: the holder reaches the API server through a relay the test can freeze (requests
//! hang, as behind a hung API server or a partitioned network), the candidate reaches it
//! directly. The holder must step down (stop writing status) before the candidate takes
//! over: never two status writers.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::ensure;
use k8s_openapi::api::coordination::v1::Lease;
use support::mesh::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use weft_e2e::shared::{self, eventually};
use weft_operator::status::lease::{self, LeaseConfig};

/// A TCP relay to `upstream` that stops moving bytes, in both directions and on every
/// connection (new ones included), once `frozen` is set; sockets stay open.
async fn freezable_relay(upstream: String, frozen: watch::Receiver<bool>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let (upstream, frozen) = (upstream.clone(), frozen.clone());
            tokio::spawn(async move {
                if *frozen.borrow() {
                    // Hold the connection, answer nothing.
                    let _held = client;
                    std::future::pending::<()>().await;
                    return;
                }
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, frozen.clone()));
                pipe(sr, cw, frozen).await;
            });
        }
    });
    addr
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = frozen.wait_for(|f| *f) => break,
        };
        if *frozen.borrow() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // Frozen: keep both halves open and silent.
    let _held = (from, to);
    std::future::pending::<()>().await;
}

/// Leadership changes: (replica, leader, when).
type Log = Arc<Mutex<Vec<(&'static str, bool, Instant)>>>;

/// Records every change of a replica's leader flag with when it happened.
fn record(name: &'static str, mut leader: watch::Receiver<bool>, log: Log) {
    tokio::spawn(async move {
        while leader.changed().await.is_ok() {
            let now = *leader.borrow_and_update();
            log.lock().unwrap().push((name, now, Instant::now()));
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_api_server_hangs_steps_down_before_another_replica_takes_over() {
    let bed = Bed::new("lease-stall").await;
    let (freeze, frozen) = watch::channel(false);
    let server = shared::testbed().server().to_owned();
    let upstream = server.trim_start_matches("https://").to_owned();
    let relay = freezable_relay(upstream, frozen).await;
    let holder_client = shared::testbed()
        .client_at(Some(&format!("https://{relay}")))
        .await
        .unwrap();

    let timing = |identity: &str| LeaseConfig {
        namespace: bed.ns.clone(),
        name: "weft-operator".into(),
        identity: identity.into(),
        duration: Duration::from_secs(4),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(500),
    };
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let (a_tx, a_rx) = watch::channel(false);
    record("a", a_rx.clone(), log.clone());
    tokio::spawn(lease::run(holder_client, timing("a"), a_tx, stop.clone()));
    tokio::time::timeout(WAIT, a_rx.clone().wait_for(|l| *l))
        .await
        .expect("a takes the free Lease")
        .unwrap();
    let (b_tx, b_rx) = watch::channel(false);
    record("b", b_rx.clone(), log.clone());
    tokio::spawn(lease::run(
        bed.client.clone(),
        timing("b"),
        b_tx,
        stop.clone(),
    ));

    // While a renews, b waits, however long.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        *a_rx.borrow() && !*b_rx.borrow(),
        "{:?}",
        log.lock().unwrap()
    );

    // a's API server hangs.
    let frozen_at = Instant::now();
    freeze.send_replace(true);
    tokio::time::timeout(Duration::from_secs(20), b_rx.clone().wait_for(|l| *l))
        .await
        .expect("b takes over")
        .unwrap();
    // The recorders run as their own tasks: let them note what `wait_for` just saw.
    eventually(Duration::from_secs(2), || async {
        let seen = log.lock().unwrap().iter().any(|(n, l, _)| *n == "b" && *l);
        ensure!(seen, "b's change not recorded yet");
        Ok(())
    })
    .await
    .unwrap();
    let log = log.lock().unwrap().clone();
    let a_down = log
        .iter()
        .find(|(n, l, at)| *n == "a" && !l && *at >= frozen_at)
        .map(|(_, _, at)| *at)
        .unwrap_or_else(|| panic!("a never stepped down: {log:?}"));
    let b_up = log
        .iter()
        .find(|(n, l, _)| *n == "b" && *l)
        .map(|(_, _, at)| *at)
        .unwrap();
    assert!(
        a_down < b_up,
        "two leaders: a stepped down {:?} after b took over",
        a_down - b_up
    );
    // a steps down within its renew deadline (plus a retry period of slack); b waits
    // out the full duration from the last renewal it saw.
    assert!(
        a_down - frozen_at <= Duration::from_millis(2500),
        "a stepped down {:?} after its API server hung",
        a_down - frozen_at
    );
    assert!(
        b_up - frozen_at >= Duration::from_millis(3000),
        "b took over {:?} after a's last chance to renew",
        b_up - frozen_at
    );
    eventually(WAIT, || async {
        let lease = bed.api::<Lease>().get("weft-operator").await?;
        let holder = lease.spec.and_then(|s| s.holder_identity);
        ensure!(holder.as_deref() == Some("b"), "holder {holder:?}");
        Ok(())
    })
    .await
    .unwrap();
    stop.cancel();
    bed.cleanup().await;
}
