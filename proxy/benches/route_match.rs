//! Route matching on the request path: `first_match` over a route of 32 rules, each
//! matching on a regex path and an exact header, and `normalize_path` on a clean and a
//! dirty path. `cargo bench -p weft-proxy --bench route_match`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use weft_api::traffic::{MatchConfig, PathMatchConfig, ValueMatchConfig, ValueMatchKind};
use weft_proxy::route::{
    matching::{MatchInput, RequestMatch, first_match},
    normalize::normalize_path,
};

const RULES: usize = 32;

/// Rule `i` takes `/api/v<n>/svc<i>/orders/<n>`, with `x-tenant: tenant-<i>` when
/// `with_header`.
fn route(with_header: bool) -> Vec<Vec<RequestMatch>> {
    (0..RULES)
        .map(|i| {
            let w = MatchConfig {
                path: Some(PathMatchConfig::Regex(format!(
                    "/api/v[0-9]+/svc{i}/orders/[0-9]+"
                ))),
                headers: if with_header {
                    vec![ValueMatchConfig {
                        name: "x-tenant".into(),
                        value: format!("tenant-{i}"),
                        kind: ValueMatchKind::Exact,
                    }]
                } else {
                    Vec::new()
                },
                ..MatchConfig::default()
            };
            vec![RequestMatch::from_wire(&w, &format!("route.rules[{i}].matches[0]")).unwrap()]
        })
        .collect()
}

fn headers(tenant: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("orders.shop.svc"));
    h.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    h.insert("accept", HeaderValue::from_static("application/json"));
    h.insert("x-tenant", HeaderValue::from_static(tenant));
    h
}

fn bench(c: &mut Criterion) {
    let get = Method::GET;
    let cases = [
        (
            "first_match/last_rule",
            "/api/v2/svc31/orders/42",
            "tenant-31",
            Some((31, Some(0))),
        ),
        (
            "first_match/no_rule",
            "/api/v2/svc99/orders/42",
            "tenant-99",
            None,
        ),
        (
            "first_match/first_rule",
            "/api/v2/svc0/orders/42",
            "tenant-0",
            Some((0, Some(0))),
        ),
    ];
    let with_header = route(true);
    for (name, path, tenant, want) in cases {
        let rules = &with_header;
        let headers = headers(tenant);
        let input = MatchInput {
            path,
            query: Some("page=2&sort=desc"),
            method: &get,
            headers: &headers,
        };
        assert_eq!(first_match(rules.iter().map(Vec::as_slice), &input), want);
        c.bench_function(name, |b| {
            b.iter(|| first_match(rules.iter().map(Vec::as_slice), black_box(&input)))
        });
    }

    // The worst case: no cheap condition rejects a rule, so all 32 regexes run.
    let regex_only = route(false);
    let headers = headers("tenant-31");
    let input = MatchInput {
        path: "/api/v2/svc31/orders/42",
        query: Some("page=2&sort=desc"),
        method: &get,
        headers: &headers,
    };
    assert_eq!(
        first_match(regex_only.iter().map(Vec::as_slice), &input),
        Some((31, Some(0)))
    );
    c.bench_function("first_match/last_rule_regex_only", |b| {
        b.iter(|| first_match(regex_only.iter().map(Vec::as_slice), black_box(&input)))
    });

    c.bench_function("normalize_path/clean", |b| {
        b.iter(|| normalize_path(black_box("/api/v2/svc31/orders/42")))
    });
    c.bench_function("normalize_path/dirty", |b| {
        b.iter(|| normalize_path(black_box("/api//v2/./svc%33%31/orders/../orders/%2f42")))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
