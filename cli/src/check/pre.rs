//! `kubectl weft check --pre`: before installing, can Weft run on this cluster, and may the
//! caller install it.
//!
//! - the API server's version (1.29 or later: native sidecars on by default);
//! - native sidecars, by asking the API server to admit, without creating it, a pod whose
//!   init container has `restartPolicy: Always` — a server without the `SidecarContainers`
//!   feature drops that field, and injected proxies would then block the pod's start;
//! - the caller's permissions, by SelfSubjectAccessReview, for everything the chart creates
//!   (RBAC forbids granting what one does not hold, so the operator's own permissions are
//!   among them).

use k8s_openapi::api::{
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};
use weft_inject::keys;

use super::{CheckArgs, Finding, Report, names};

/// The oldest Kubernetes minor version supported (1.x): native sidecars are on by default
/// from 1.29.
pub const MIN_MINOR: u32 = 29;

/// Runs the pre-install checks.
pub async fn run(client: &Client, args: &CheckArgs) -> Report {
    let mut report = Report::default();
    report.push(match client.apiserver_version().await {
        Ok(info) => evaluate_version(&info.major, &info.minor, &info.git_version),
        Err(e) => Finding::fail(
            names::KUBERNETES_VERSION,
            format!("asking the API server its version: {e}"),
            "check KUBECONFIG and that the cluster is reachable",
        ),
    });
    report.push(native_sidecars(client, &args.probe_namespace).await);
    report.push(permissions(client, &args.operator_namespace).await);
    report
}

/// Judges the API server's version (`major`, `minor` as `/version` gives them: `"1"`,
/// `"29+"`).
pub fn evaluate_version(major: &str, minor: &str, git: &str) -> Finding {
    let num = |s: &str| s.trim_end_matches('+').parse::<u32>().ok();
    match (num(major), num(minor)) {
        (Some(1), Some(m)) if m >= MIN_MINOR => Finding::ok(
            names::KUBERNETES_VERSION,
            format!("Kubernetes {git} (1.{MIN_MINOR} or later needed)"),
        ),
        (Some(1), Some(m)) => Finding::fail(
            names::KUBERNETES_VERSION,
            format!(
                "Kubernetes {git} is older than 1.{MIN_MINOR}: 1.{m} has no native sidecars by default"
            ),
            format!("upgrade the cluster to 1.{MIN_MINOR} or later"),
        ),
        _ => Finding::warn(
            names::KUBERNETES_VERSION,
            format!("Kubernetes version not understood: major {major:?}, minor {minor:?} ({git})"),
            format!("make sure the cluster runs Kubernetes 1.{MIN_MINOR} or later"),
        ),
    }
}

async fn native_sidecars(client: &Client, namespace: &str) -> Finding {
    // Opted out, so that an installed webhook does not change what is asked.
    let pod: Result<Pod, _> = serde_json::from_value(serde_json::json!({
        "metadata": {"generateName": "weft-check-", "labels": {keys::INJECT: keys::DISABLED}},
        "spec": {
            "initContainers": [{"name": "sidecar", "image": "weft.invalid/check:1", "restartPolicy": "Always"}],
            "containers": [{"name": "app", "image": "weft.invalid/check:1"}]
        }
    }));
    let pod = match pod {
        Ok(p) => p,
        Err(e) => {
            return Finding::fail(
                names::NATIVE_SIDECARS,
                format!("building the probe pod: {e}"),
                "report this as a bug",
            );
        }
    };
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    match Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&params, &pod)
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 403 => Finding::warn(
            names::NATIVE_SIDECARS,
            format!(
                "not checked: you may not create pods in namespace {namespace}, even as a dry run"
            ),
            "run as a user who may, or pass --probe-namespace NS (nothing is created)",
        ),
        Err(e) => Finding::fail(
            names::NATIVE_SIDECARS,
            format!(
                "the API server refused a dry-run pod with a native sidecar in namespace {namespace}: {e}"
            ),
            "Weft injects its proxy as a native sidecar (an init container with restartPolicy: Always): needs Kubernetes 1.29+, or 1.28 with the SidecarContainers feature gate; pass --probe-namespace if the namespace is the problem",
        ),
        Ok(admitted) => {
            let kept = admitted
                .spec
                .and_then(|s| s.init_containers)
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.restart_policy.as_deref() == Some("Always"))
                });
            if kept {
                Finding::ok(
                    names::NATIVE_SIDECARS,
                    "init containers with restartPolicy: Always are admitted (dry run)",
                )
            } else {
                Finding::fail(
                    names::NATIVE_SIDECARS,
                    "the API server dropped restartPolicy: Always from an init container: native sidecars are off",
                    "enable the SidecarContainers feature gate (1.28) or upgrade to 1.29 or later",
                )
            }
        }
    }
}

/// One thing installing does, as an access review asks it.
struct Needed {
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    /// Whether it is asked in the operator's namespace (else cluster-wide).
    namespaced: bool,
}

/// What the chart creates, and what the operator's RBAC grants (which the installer must
/// hold to grant).
const NEEDED: &[Needed] = &[
    Needed {
        verb: "create",
        group: "apiextensions.k8s.io",
        resource: "customresourcedefinitions",
        namespaced: false,
    },
    Needed {
        verb: "create",
        group: "",
        resource: "namespaces",
        namespaced: false,
    },
    Needed {
        verb: "create",
        group: "rbac.authorization.k8s.io",
        resource: "clusterroles",
        namespaced: false,
    },
    Needed {
        verb: "create",
        group: "rbac.authorization.k8s.io",
        resource: "clusterrolebindings",
        namespaced: false,
    },
    Needed {
        verb: "create",
        group: "admissionregistration.k8s.io",
        resource: "mutatingwebhookconfigurations",
        namespaced: false,
    },
    Needed {
        verb: "patch",
        group: "admissionregistration.k8s.io",
        resource: "mutatingwebhookconfigurations",
        namespaced: false,
    },
    Needed {
        verb: "create",
        group: "authentication.k8s.io",
        resource: "tokenreviews",
        namespaced: false,
    },
    Needed {
        verb: "watch",
        group: "",
        resource: "pods",
        namespaced: false,
    },
    Needed {
        verb: "watch",
        group: "",
        resource: "services",
        namespaced: false,
    },
    Needed {
        verb: "watch",
        group: "discovery.k8s.io",
        resource: "endpointslices",
        namespaced: false,
    },
    Needed {
        verb: "create",
        group: "apps",
        resource: "deployments",
        namespaced: true,
    },
    Needed {
        verb: "create",
        group: "",
        resource: "services",
        namespaced: true,
    },
    Needed {
        verb: "create",
        group: "",
        resource: "serviceaccounts",
        namespaced: true,
    },
    Needed {
        verb: "create",
        group: "",
        resource: "configmaps",
        namespaced: true,
    },
    Needed {
        verb: "create",
        group: "",
        resource: "secrets",
        namespaced: true,
    },
    // The chart's Role lets the operator list and watch its webhook CA Secret; granting
    // that takes holding both.
    Needed {
        verb: "list",
        group: "",
        resource: "secrets",
        namespaced: true,
    },
    Needed {
        verb: "watch",
        group: "",
        resource: "secrets",
        namespaced: true,
    },
    Needed {
        verb: "create",
        group: "coordination.k8s.io",
        resource: "leases",
        namespaced: true,
    },
    Needed {
        verb: "create",
        group: "rbac.authorization.k8s.io",
        resource: "roles",
        namespaced: true,
    },
    Needed {
        verb: "create",
        group: "rbac.authorization.k8s.io",
        resource: "rolebindings",
        namespaced: true,
    },
];

async fn permissions(client: &Client, operator_namespace: &str) -> Finding {
    let api = Api::<SelfSubjectAccessReview>::all(client.clone());
    let mut denied = Vec::new();
    for n in NEEDED {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(n.verb.to_owned()),
                    group: Some(n.group.to_owned()),
                    resource: Some(n.resource.to_owned()),
                    namespace: n.namespaced.then(|| operator_namespace.to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let what = match (n.group, n.namespaced) {
            ("", false) => format!("{} {}", n.verb, n.resource),
            ("", true) => format!("{} {} in {operator_namespace}", n.verb, n.resource),
            (g, false) => format!("{} {}.{g}", n.verb, n.resource),
            (g, true) => format!("{} {}.{g} in {operator_namespace}", n.verb, n.resource),
        };
        match api.create(&PostParams::default(), &review).await {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => denied.push(what),
            Err(e) => {
                return Finding::fail(
                    names::PERMISSIONS,
                    format!("asking the API server whether you may {what}: {e}"),
                    "check KUBECONFIG; SelfSubjectAccessReview is open to every authenticated user",
                );
            }
        }
    }
    if denied.is_empty() {
        Finding::ok(
            names::PERMISSIONS,
            format!(
                "you may do the {} things installing does (CRDs, webhook, RBAC, the operator in {operator_namespace})",
                NEEDED.len()
            ),
        )
    } else {
        Finding::fail(
            names::PERMISSIONS,
            format!("you may not: {}", denied.join(", ")),
            "install as a cluster administrator, or have one grant these (or install for you)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Status;

    #[test]
    fn versions_before_1_29_fail_and_vendor_suffixes_are_understood() {
        assert_eq!(evaluate_version("1", "34", "v1.34.4").status, Status::Ok);
        assert_eq!(
            evaluate_version("1", "29+", "v1.29.3-gke.1").status,
            Status::Ok
        );
        let old = evaluate_version("1", "28", "v1.28.9");
        assert_eq!(old.status, Status::Fail);
        assert!(old.message.contains("older than 1.29"), "{old:?}");
        assert_eq!(evaluate_version("", "", "?").status, Status::Warn);
    }
}
