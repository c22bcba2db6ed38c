//! The data plane through changes of its control plane: the operator rolled by `helm
//! upgrade`, gone for a while, then Weft uninstalled. These disturb every namespace, so
//! they run last.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::{
    Ctx,
    basic::{READY, assert_injected, client, web},
    install::{self, NAMESPACE, OPERATOR_SELECTOR},
    kube::{eventually, metric, spiffe},
    traffic::{Demo, all_ok, split_route, wait_programmed},
};

/// 7. `helm upgrade` rolls the operator under constant meshed load (to two replicas with
///    a changed pod template, then back to one): no request fails, the proxies reconnect
///    to the new replicas (a Route changed after the roll reaches them and is Programmed),
///    and a pod created after it is injected and calls over mutual TLS with its identity.
///    The images stay the same: this is the chart's roll, not a change of version.
pub fn helm_upgrade_rolls_the_operator_without_a_lost_request(ctx: &Ctx) -> anyhow::Result<()> {
    let demo = Demo::deploy(ctx, "upgrade", 1, 1, &["client"])?;
    let (kube, ns) = (demo.kube, &demo.ns);
    demo.apply_programmed(&split_route(ns, 1, 0, ""), "route/web")?;
    let before = kube.pod_names(NAMESPACE, OPERATOR_SELECTOR)?;
    let bg = demo.start_load(
        ctx,
        "client",
        "http://web/upgrade",
        &["--duration", "30s", "--rps", "20"],
    )?;
    std::thread::sleep(Duration::from_secs(3));

    let t = Instant::now();
    let result = (|| -> anyhow::Result<()> {
        install::upgrade_weft(
            ctx,
            &[
                "operator.replicas=2",
                "operator.podAnnotations.e2e-upgrade=rolled",
            ],
        )?;
        let rolled = t.elapsed();
        let after = kube.pod_names(NAMESPACE, OPERATOR_SELECTOR)?;
        ensure!(
            after.len() == 2 && after.iter().all(|p| !before.contains(p)),
            "operator pods before the upgrade {before:?}, after {after:?}"
        );
        tracing::info!(?rolled, ?after, "helm upgrade rolled the operator");

        // Only a proxy that reconnected to a new replica can learn of this change.
        demo.apply_programmed(&split_route(ns, 0, 1, ""), "route/web")?;
        eventually(Duration::from_secs(30), || {
            let l = demo.load(
                "client",
                "http://web/upgrade",
                &["--count", "20", "--rps", "20"],
            )?;
            ensure!(l.served_by("web-v2") == l.sent, "not all web-v2 yet: {l:?}");
            ensure!(l.ok == l.sent, "{l:?}");
            Ok(())
        })
        .context("a Route changed after the upgrade did not reach the client's proxy")?;
        Ok(())
    })();
    let l = bg.finish()?;
    result?;
    tracing::info!(
        sent = l.sent,
        ok = l.ok,
        "load through the operator's upgrade"
    );
    ensure!(
        l.sent >= 500,
        "the load sent only {} requests: {l:?}",
        l.sent
    );
    all_ok(&l, "during the operator's upgrade")?;

    // A pod created after the roll: injected by the new replicas' webhook, and certified
    // by their identity endpoint (web's proxy counts its requests under its identity).
    demo.add_clients(&["late"])?;
    let late = kube.pods(ns, "app=late")?;
    let [late] = late.as_slice() else {
        bail!("expected one late pod, got {}", late.len());
    };
    assert_injected(late)?;
    let l = demo.load(
        "late",
        "http://web/upgrade",
        &["--count", "20", "--rps", "20"],
    )?;
    ensure!(l.ok == l.sent, "the pod created after the upgrade: {l:?}");
    let web_pod = kube
        .pod_names(ns, "version=web-v2")?
        .into_iter()
        .next()
        .context("no web-v2 pod")?;
    let id = spiffe(ns, "late");
    let seen = metric(
        &kube.proxy_admin(ns, &web_pod, "/metrics")?,
        "weft_requests_total",
        &[("client_id", id.as_str())],
    );
    ensure!(
        seen >= 20.0,
        "web-v2's proxy counted {seen} requests from {id}, expected the 20 sent"
    );

    // Back to the node's one replica, rolled again under load.
    let bg = demo.start_load(
        ctx,
        "client",
        "http://web/upgrade",
        &["--duration", "25s", "--rps", "20"],
    )?;
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    install::install_weft(ctx)?;
    tracing::info!(rolled = ?t.elapsed(), "helm upgrade rolled the operator back to one replica");
    let l = bg.finish()?;
    tracing::info!(sent = l.sent, ok = l.ok, "load through the upgrade back");
    all_ok(&l, "during the upgrade back to one replica")?;
    Ok(())
}

/// 8. With the operator's pod deleted (its Deployment scaled to zero, so it stays gone),
///    meshed traffic keeps flowing on the proxies' last config and a Route changed
///    meanwhile does not apply; once the operator is back the change arrives.
pub fn traffic_flows_without_the_operator_and_config_arrives_after(
    ctx: &Ctx,
) -> anyhow::Result<()> {
    let demo = Demo::deploy(ctx, "opdown", 1, 1, &["client"])?;
    let (kube, ns) = (demo.kube, &demo.ns);
    demo.apply_programmed(&split_route(ns, 1, 0, ""), "route/web")?;
    let args = ["--count", "100", "--rps", "50"];
    let l = demo.load("client", "http://web/opdown", &args)?;
    ensure!(
        l.ok == l.sent && l.served_by("web-v1") == l.sent,
        "before: {l:?}"
    );

    let operator = install::operator_deployment();
    let result = (|| -> anyhow::Result<()> {
        kube.run(&["-n", NAMESPACE, "scale", &operator, "--replicas=0"])?;
        eventually(Duration::from_secs(60), || {
            let left = kube.pod_names(NAMESPACE, OPERATOR_SELECTOR)?;
            let all = kube.pods(NAMESPACE, OPERATOR_SELECTOR)?;
            if left.is_empty() && all.is_empty() {
                Ok(())
            } else {
                bail!("operator pods remain: {left:?}")
            }
        })?;
        // The Route now says web-v2 only; nobody can tell the proxies.
        kube.apply(&split_route(ns, 0, 1, ""))?;
        std::thread::sleep(Duration::from_secs(3));
        let l = demo.load("client", "http://web/opdown", &args)?;
        ensure!(
            l.ok == l.sent && l.unanswered() == 0,
            "traffic without the operator: {l:?}"
        );
        ensure!(
            l.served_by("web-v1") == l.sent,
            "the proxies changed config with no operator running: {l:?}"
        );
        Ok(())
    })();
    kube.run(&["-n", NAMESPACE, "scale", &operator, "--replicas=1"])?;
    kube.rollout(NAMESPACE, &operator, Duration::from_secs(120))?;
    result?;

    // Back: the proxies resubscribe (their backoff tops out at 10 s) and get the Route as
    // it is now.
    let back = std::time::Instant::now();
    let l = eventually(Duration::from_secs(30), || {
        let l = demo.load(
            "client",
            "http://web/opdown",
            &["--count", "20", "--rps", "20"],
        )?;
        ensure!(l.served_by("web-v2") == l.sent, "not all web-v2 yet: {l:?}");
        Ok(l)
    })
    .context("the Route changed while the operator was down did not arrive once it was back")?;
    ensure!(l.ok == l.sent, "{l:?}");
    tracing::info!(after = ?back.elapsed(), "the changed Route arrived once the operator was back");
    wait_programmed(kube, ns, "route/web")?;
    Ok(())
}

/// 9. `helm uninstall` removes the operator and the webhook but leaves meshed workloads
///    running and serving each other over mutual TLS on their last config; a pod created
///    afterwards in the labelled namespace starts without the proxy and still reaches them.
pub fn helm_uninstall_leaves_workloads_serving(ctx: &Ctx) -> anyhow::Result<()> {
    let kube = &ctx.kube;
    let ns = ctx.namespace("uninstall", true)?;
    kube.apply(&web(&ns))?;
    kube.apply(&client(&ns, "client", "client", ""))?;
    kube.wait_ready(&ns, "app=web", READY)?;
    kube.wait_ready(&ns, "app=client", READY)?;
    let answer = kube.http_get(&ns, "client", "web", 80, "/")?;
    ensure!(answer.contains("200 OK"), "before: {answer}");
    let before = kube.pods(&ns, "app in (web,client)")?;

    install::uninstall_weft(ctx)?;
    // `helm uninstall --wait` waits for the Deployment; its pod takes its grace period.
    eventually(Duration::from_secs(60), || {
        let left = kube.pods(NAMESPACE, OPERATOR_SELECTOR)?;
        ensure!(
            left.is_empty(),
            "{} operator pods remain after helm uninstall",
            left.len()
        );
        Ok(())
    })?;
    let hooks = kube.run(&["get", "mutatingwebhookconfigurations", "-o", "name"])?;
    ensure!(hooks.trim().is_empty(), "webhooks remain: {hooks}");

    // Still serving, over mTLS, as the same pods with the same containers.
    std::thread::sleep(Duration::from_secs(5));
    let answer = kube.http_get(&ns, "client", "web", 80, "/after-uninstall")?;
    ensure!(answer.contains("HTTP/1.1 404"), "after uninstall: {answer}");
    let web_pod = kube.pod_names(&ns, "app=web")?.remove(0);
    let line = kube.logged_request(&ns, &web_pod, "/after-uninstall", None)?;
    ensure!(
        line["source_identity"] == spiffe(&ns, "client"),
        "after uninstall the request arrived as {}",
        line["source_identity"]
    );
    let after = kube.pods(&ns, "app in (web,client)")?;
    let restarts = |pods: &[serde_json::Value]| -> Vec<(String, String, i64)> {
        let mut v: Vec<_> = pods
            .iter()
            .flat_map(|p| {
                let uid = p["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
                p["status"]["initContainerStatuses"]
                    .as_array()
                    .into_iter()
                    .chain(p["status"]["containerStatuses"].as_array())
                    .flatten()
                    .map(move |s| {
                        (
                            uid.clone(),
                            s["name"].as_str().unwrap_or_default().to_owned(),
                            s["restartCount"].as_i64().unwrap_or(-1),
                        )
                    })
            })
            .collect();
        v.sort();
        v
    };
    ensure!(
        restarts(&before) == restarts(&after),
        "pods or containers changed across the uninstall:\nbefore {:?}\nafter {:?}",
        restarts(&before),
        restarts(&after)
    );

    // Without the webhook a new pod starts unmeshed, and plain text still reaches web.
    kube.apply(&client(&ns, "late", "late", ""))?;
    kube.wait_ready(&ns, "app=late", READY)?;
    let late = kube.pods(&ns, "app=late")?;
    ensure!(
        late.first()
            .is_some_and(|p| p["spec"]["initContainers"].is_null()),
        "a pod created after uninstall was injected"
    );
    let answer = kube.http_get(&ns, "late", "web", 80, "/")?;
    ensure!(answer.contains("200 OK"), "late → web: {answer}");
    Ok(())
}
