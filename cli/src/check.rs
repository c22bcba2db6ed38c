//! `kubectl weft check`: is the mesh installed and healthy, and which pods opted in but
//! run without the proxy.

use std::fmt::Write as _;

use k8s_openapi::{
    api::admissionregistration::v1::MutatingWebhookConfiguration,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{Api, Client};
use weft_inject::{InjectConfig, settings::CONFIG_MAP};

/// The result of the checks: lines to print, and whether anything failed.
#[derive(Debug, Default)]
pub struct Report {
    /// Human-readable lines, one per finding.
    pub text: String,
    /// Failures (the mesh is not working); warnings do not count.
    pub failures: usize,
    /// Warnings (something users should act on).
    pub warnings: usize,
}

impl Report {
    fn ok(&mut self, msg: &str) {
        let _ = writeln!(self.text, "ok    {msg}");
    }
    fn warn(&mut self, msg: &str) {
        self.warnings += 1;
        let _ = writeln!(self.text, "WARN  {msg}");
    }
    fn fail(&mut self, msg: &str) {
        self.failures += 1;
        let _ = writeln!(self.text, "FAIL  {msg}");
    }
}

/// Runs every check against the cluster `client` talks to; the operator runs in
/// `operator_namespace`.
pub async fn run(client: Client, webhook_name: &str, operator_namespace: &str) -> Report {
    let mut report = Report::default();
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for name in ["routes.weft.dev", "policies.weft.dev", "breakers.weft.dev"] {
        match crds.get_opt(name).await {
            Ok(Some(crd)) => {
                if weft_crds::is_established(&crd) {
                    report.ok(&format!("CRD {name} is established"));
                } else {
                    report.fail(&format!("CRD {name} exists but is not established"));
                }
            }
            Ok(None) => report.fail(&format!("CRD {name} is missing: kubectl apply -f crds/")),
            Err(e) => report.fail(&format!("reading CRD {name}: {e}")),
        }
    }
    match Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get_opt(webhook_name)
        .await
    {
        Ok(Some(hook)) => {
            let hooks = hook.webhooks.unwrap_or_default();
            let bundles = hooks.iter().all(|h| {
                h.client_config
                    .ca_bundle
                    .as_ref()
                    .is_some_and(|b| !b.0.is_empty())
            });
            if hooks.is_empty() || !bundles {
                report.fail(&format!(
                    "webhook {webhook_name} has no caBundle: is the operator running?"
                ));
            } else {
                let policy = hooks[0].failure_policy.clone().unwrap_or_default();
                report.ok(&format!(
                    "injection webhook {webhook_name} is registered (failurePolicy {policy})"
                ));
            }
        }
        Ok(None) => report.fail(&format!(
            "injection webhook {webhook_name} is not registered: pods are not being injected"
        )),
        Err(e) => report.fail(&format!("reading webhook {webhook_name}: {e}")),
    }
    // Which namespaces are never injected is a setting: read it as the webhook does.
    let cfg = match crate::settings::from_cluster(&client, operator_namespace, CONFIG_MAP).await {
        Ok((cfg, source)) => {
            report.ok(&source.to_string());
            cfg
        }
        Err(e) => {
            report.fail(&e.to_string());
            InjectConfig::for_operator(operator_namespace, crate::settings::OPERATOR_SERVICE)
        }
    };
    match weft_inject::audit::scan(&client, &cfg).await {
        Ok(found) if found.is_empty() => report.ok("every pod that opted in runs with the proxy"),
        Ok(found) => {
            for u in found {
                report.warn(&format!(
                    "pod {}/{} opted in ({}) but runs without the proxy (created while the webhook was unreachable?): restart it",
                    u.namespace, u.name, u.opted_in_by
                ));
            }
        }
        Err(e) => report.fail(&format!("listing pods: {e}")),
    }
    report
}
