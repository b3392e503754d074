//! Metrics asserted by value. This file is a test binary of its own, so it
//! runs in its own process with its own global recorder, and it holds a
//! single test: no other test's requests or jobs are counted in what it
//! reads from `/metrics`.

#[path = "it/common.rs"]
#[allow(dead_code)]
mod common;

use std::collections::BTreeMap;

use common::*;
use lapin::{options::BasicPublishOptions, BasicProperties};
use reqwest::{Method, StatusCode};
use serde_json::json;

/// One sample of the exposition text: name, labels, value.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split("\",")
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').expect("label");
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        out.push(Sample {
            name: name.to_string(),
            labels,
            value: value.parse().expect("value"),
        });
    }
    out
}

/// The sum of the samples of `name` whose labels include `want`.
fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

async fn scrape(app: &TestApp) -> Vec<Sample> {
    let text = app.metrics_text().await;
    parse(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let app = spawn_app().await;
    let p = app.create_partner(json!({})).await;
    // Three customers, and the first one twice more: 3 claims, 2 refusals.
    let mut ids = app
        .preregs(&p, 0..3, |i| {
            (
                format!("m{i}@customer.example"),
                format!("+86138000000{i:02}"),
            )
        })
        .await;
    for _ in 0..2 {
        ids.push(
            app.prereg(&p, "m0@customer.example", "+8613800000000")
                .await,
        );
    }
    for id in &ids {
        app.decided(&p, *id).await;
    }
    // An invented HTTP method is counted as `other`, never by its name.
    let resp = app
        .http
        .request(
            Method::from_bytes(b"FROBNICATE").unwrap(),
            format!("{}/v1/partner", app.addr),
        )
        .bearer_auth(&p.key)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_client_error());
    // A poison message: dead-lettered, counted as such.
    let (_, ch) = app.ctx.broker.channel().await.unwrap();
    ch.basic_publish(
        &app.ctx.broker.names.commands(),
        "preregistration.requested",
        BasicPublishOptions::default(),
        b"{not json",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    wait_until(std::time::Duration::from_secs(10), || async {
        value(
            &scrape(&app).await,
            "prereg_jobs_total",
            &[("queue", "registration"), ("outcome", "dead_lettered")],
        ) == 1.0
    })
    .await;
    // The queue gauges are refreshed when an operator reads the queues.
    let (s, _) = app.get("/v1/admin/queues", OPERATOR).await;
    assert_eq!(s, StatusCode::OK);

    let m = scrape(&app).await;
    assert_eq!(
        value(
            &m,
            "prereg_jobs_total",
            &[("queue", "registration"), ("outcome", "done")]
        ),
        5.0
    );
    assert_eq!(
        value(&m, "prereg_decisions_total", &[("status", "preregistered")]),
        3.0
    );
    assert_eq!(
        value(
            &m,
            "prereg_decisions_total",
            &[("status", "rejected"), ("reason", "already_preregistered")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &m,
            "prereg_http_requests_total",
            &[
                ("method", "POST"),
                ("route", "/v1/preregistrations"),
                ("status", "202")
            ]
        ),
        5.0
    );
    assert_eq!(
        value(&m, "prereg_http_requests_total", &[("method", "other")]),
        1.0
    );
    assert!(
        !m.iter()
            .any(|s| s.labels.values().any(|v| v.contains("FROBNICATE"))),
        "an invented method became a label value"
    );
    assert_eq!(
        value(
            &m,
            "prereg_job_duration_seconds_count",
            &[("queue", "registration")]
        ),
        6.0,
        "five decisions and one dead letter timed"
    );
    assert_eq!(
        value(&m, "prereg_dead_letters", &[("queue", "registration")]),
        1.0
    );
    assert_eq!(
        value(&m, "prereg_queue_depth", &[("queue", "registration")]),
        0.0
    );
    assert_eq!(
        value(&m, "prereg_queue_consumers", &[("queue", "registration")]),
        1.0
    );
    app.cleanup().await;
}
