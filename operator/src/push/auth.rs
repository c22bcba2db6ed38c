//! Who is subscribing: the pod's projected ServiceAccount token, checked with the API
//! server's TokenReview, must belong to the ServiceAccount the pod runs as (and, for tokens
//! bound to a pod, to that very pod).
//!
//! Verdicts are cached for a minute per token, so a reconnect storm does not become a
//! TokenReview storm.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};

/// How long a TokenReview verdict is reused.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// Cached verdicts at most; the cache is cleared when full.
const CACHE_MAX: usize = 100_000;

/// The `extra` key in which the API server names the pod a token is bound to.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// The identity a token proves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenIdentity {
    /// The ServiceAccount's namespace.
    pub namespace: String,
    /// The ServiceAccount's name.
    pub service_account: String,
    /// The pod the token is bound to, for projected tokens.
    pub pod: Option<String>,
}

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No bearer token.
    #[error("no bearer token in the authorization header")]
    NoToken,
    /// The API server did not authenticate the token.
    #[error("token not authenticated: {0}")]
    Rejected(String),
    /// The TokenReview call failed.
    #[error("TokenReview failed")]
    Review(#[source] kube::Error),
}

/// Checks subscriber tokens.
pub enum Authenticator {
    /// TokenReview against the API server, requiring one of `audiences`.
    TokenReview {
        /// The client.
        client: Client,
        /// Accepted token audiences (Weft's projected tokens use `weft`).
        audiences: Vec<String>,
        /// Verdicts by token.
        cache: Mutex<HashMap<String, (TokenIdentity, Instant)>>,
    },
    /// Trusts the pod header without a token. Only for in-process benchmarks; the operator
    /// binary never selects it.
    InsecureTrustPodHeader,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authenticator::TokenReview { audiences, .. } => f
                .debug_struct("TokenReview")
                .field("audiences", audiences)
                .finish(),
            Authenticator::InsecureTrustPodHeader => f.write_str("InsecureTrustPodHeader"),
        }
    }
}

impl Authenticator {
    /// TokenReview with `audiences`.
    pub fn token_review(client: Client, audiences: Vec<String>) -> Self {
        Authenticator::TokenReview {
            client,
            audiences,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The identity `token` proves, or `None` when this authenticator trusts headers.
    pub async fn authenticate(
        &self,
        token: Option<&str>,
    ) -> Result<Option<TokenIdentity>, AuthError> {
        let Authenticator::TokenReview {
            client,
            audiences,
            cache,
        } = self
        else {
            return Ok(None);
        };
        let token = token.ok_or(AuthError::NoToken)?;
        if let Ok(c) = cache.lock()
            && let Some((id, at)) = c.get(token)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(Some(id.clone()));
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(audiences.clone()),
            },
            ..Default::default()
        };
        let out = Api::<TokenReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(AuthError::Review)?;
        let status = out.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some(rest) = username.strip_prefix("system:serviceaccount:") else {
            return Err(AuthError::Rejected(format!(
                "{username} is not a ServiceAccount"
            )));
        };
        let Some((namespace, sa)) = rest.split_once(':') else {
            return Err(AuthError::Rejected(format!("malformed user {username}")));
        };
        let id = TokenIdentity {
            namespace: namespace.to_owned(),
            service_account: sa.to_owned(),
            pod: user
                .extra
                .as_ref()
                .and_then(|e| e.get(POD_NAME_EXTRA))
                .and_then(|v| v.first().cloned()),
        };
        if let Ok(mut c) = cache.lock() {
            if c.len() >= CACHE_MAX {
                c.clear();
            }
            c.insert(token.to_owned(), (id.clone(), Instant::now()));
        }
        Ok(Some(id))
    }
}
