//! The test bed shared by every test in one test binary, started on first use.
//!
//! Tests share one control plane (starting one takes seconds) and isolate themselves by
//! namespace: [`namespace`] creates a fresh one per test. Each test builds its own client
//! with [`client`], because a client's connections belong to the runtime that made them.

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow};
use k8s_openapi::{
    api::core::v1::Namespace,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};

use crate::testbed::TestBed;

/// The field manager Weft's tests apply with.
pub const FIELD_MANAGER: &str = "weft-e2e";

/// The test bed for this test binary. Panics (failing the test with the reason) when it
/// cannot start: a missing test bed is a failure, never a skip.
pub fn testbed() -> &'static TestBed {
    static BED: OnceLock<Result<TestBed, String>> = OnceLock::new();
    let bed = BED.get_or_init(|| {
        init_tracing();
        // Started on a plain thread: callers are usually inside a tokio runtime, and the
        // start-up blocks on a runtime of its own.
        std::thread::spawn(|| TestBed::start_attached().map_err(|e| format!("{e:#}")))
            .join()
            .unwrap_or_else(|_| Err("the test-bed start-up thread panicked".to_owned()))
    });
    match bed {
        Ok(bed) => bed,
        Err(e) => panic!("the test bed did not start: {e}"),
    }
}

/// Logs to the test's captured output (`RUST_LOG` filters); a no-op when already set up.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube_client=off".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A client for the shared test bed, for the calling test's runtime.
pub async fn client() -> anyhow::Result<Client> {
    testbed().client().await
}

/// Creates a namespace with a unique name starting with `prefix`.
pub async fn namespace(client: &Client, prefix: &str) -> anyhow::Result<String> {
    let name = format!("{prefix}-{:08x}", rand::random::<u32>());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(name)
}

/// Applies Weft's CRDs (server-side apply, so repeating it is harmless) and waits until
/// the API server reports each one `Established`.
pub async fn install_crds(client: &Client) -> anyhow::Result<()> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut names = Vec::new();
    for (_, crd) in weft_crds::all() {
        let name = crd.metadata.name.clone().context("CRD without a name")?;
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .with_context(|| format!("applying CRD {name}"))?;
        names.push(name);
    }
    for name in names {
        eventually(Duration::from_secs(30), || {
            let api = api.clone();
            let name = name.clone();
            async move {
                let crd = api.get(&name).await?;
                if weft_crds::is_established(&crd) {
                    Ok(())
                } else {
                    Err(anyhow!("CRD {name} not established yet"))
                }
            }
        })
        .await?;
    }
    Ok(())
}

/// Retries `check` every 100 ms until it succeeds or `timeout` passes, then returns the
/// last error.
pub async fn eventually<F, Fut, T>(timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= timeout => {
                return Err(e.context(format!("still failing after {timeout:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
