//! The trust boundary on the broker (SPEC §8): the commands exchange is
//! shared with upstream systems, so internal jobs are not routable from it,
//! email recipients come from stored data, a worker handles only the types
//! bound to its queue, and upstream commands are checked as HTTP requests are.

use std::time::Duration;

use prereg::{
    mq::{CloudEvent, PublishError, Queue},
    workers::runtime::{self, DeadLetter},
};
use prereg_devtools::smtp_sink::SmtpSink;
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::common::*;

/// Waits for the dead letter of message `id` in `q`.
async fn dead_letter_of(app: &TestApp, q: Queue, id: &str) -> DeadLetter {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let all = runtime::list_dead_letters(&app.ctx, q, 100).await.unwrap();
        if let Some(d) = all
            .into_iter()
            .find(|d| d.message_id.as_deref() == Some(id))
        {
            return d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dead letter for {id} in {q:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_jobs_are_unroutable_from_the_commands_exchange_and_recipients_come_from_stored_data(
) {
    let sink = SmtpSink::start().await.unwrap();
    let url = sink.url();
    let app = spawn_with(move |c| c.smtp_url = url).await;
    let p = app.create_partner(json!({})).await;
    let id = app
        .claimed(&p, "victim@customer.example", "+8613900000001")
        .await;

    // An attacker on the shared commands exchange: an email job naming their
    // own address, and a deadline tick. Neither type is bound there.
    let forged = CloudEvent::new(
        "email.requested",
        json!({"kind": "claim_expiry_reminder", "to": "attacker@evil.example", "preregistration_id": id}),
    );
    let err = app.ctx.broker.publish_upstream(&forged).await.unwrap_err();
    assert!(matches!(err, PublishError::Unroutable(_)), "{err}");
    let tick = CloudEvent::new("deadline.tick", json!({}));
    let err = app.ctx.broker.publish_upstream(&tick).await.unwrap_err();
    assert!(matches!(err, PublishError::Unroutable(_)), "{err}");

    // Even where it is routable (the internal exchange), the message does not
    // choose the recipient: the reminder goes to the partner's stored contact.
    app.ctx.broker.publish_command(&forged).await.unwrap();
    let mails = sink.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = sink.received();
    assert_eq!(all.len(), 1, "{mails:?}");
    assert_eq!(all[0].to, vec!["ops@partner.example".to_string()]);
    assert!(all
        .iter()
        .all(|m| m.to.iter().all(|t| !t.contains("evil.example"))));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_not_bound_to_the_queue_it_arrives_on_is_dead_lettered() {
    let (app, p) = spawn_with_partner().await;
    let names = app.ctx.broker.names.clone();
    // A pre-registration command delivered straight into the email queue
    // (each work queue is bound on the internal exchange by its own name).
    let id = Uuid::now_v7();
    let ev = CloudEvent::new(
        "preregistration.requested",
        json!({"id": id, "partner_id": p.id, "full_name": "Zhang San",
               "email": "x@customer.example", "mobile": "+8613900000002"}),
    );
    app.ctx
        .broker
        .publish(
            &names.internal(),
            &names.queue(Queue::Email),
            &ev,
            Default::default(),
        )
        .await
        .unwrap();
    let d = dead_letter_of(&app, Queue::Email, &ev.id).await;
    assert_eq!(d.reason.as_deref(), Some("wrong_queue"));
    assert!(d.error.unwrap_or_default().contains("email"));
    assert!(prereg::store::preregs::get(app.db(), id)
        .await
        .unwrap()
        .is_none());
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_preregistration_commands_are_refused_for_the_reasons_http_gives() {
    let (app, p) = spawn_with_partner().await;
    let idle = app
        .create_partner(json!({"name": "Idle", "customer_development": false}))
        .await;
    let body =
        |email: &str| json!({"full_name": "Zhang San", "email": email, "mobile": "+8613900000003"});

    // 1. A partner without the customer-development permission.
    let (s, v) = app
        .post(
            "/v1/preregistrations",
            &idle.key,
            body("a@customer.example"),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let http_code = v["error"]["code"].as_str().unwrap_or_default().to_string();
    assert_eq!(http_code, "customer_development_disabled", "{v}");
    // 2. An account manager that is not the partner's.
    let mut with_am = body("b@customer.example");
    with_am["account_manager_id"] = json!(Uuid::now_v7());
    let (s, v) = app
        .post("/v1/preregistrations", &p.key, with_am.clone())
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["code"], "validation_failed", "{v}");

    let cases = [
        (idle.id, body("a@customer.example"), http_code.as_str()),
        (p.id, with_am, "validation_failed"),
        (
            Uuid::now_v7(),
            body("c@customer.example"),
            "unknown_partner",
        ),
    ];
    for (partner_id, mut data, reason) in cases {
        let id = Uuid::now_v7();
        data["id"] = json!(id);
        data["partner_id"] = json!(partner_id);
        let ev = CloudEvent::new("preregistration.requested", data);
        app.ctx.broker.publish_upstream(&ev).await.unwrap();
        let d = dead_letter_of(&app, Queue::Registration, &ev.id).await;
        assert_eq!(d.reason.as_deref(), Some(reason));
        if reason == "validation_failed" {
            assert!(d.error.unwrap_or_default().contains("account_manager_id"));
        }
        assert!(
            prereg::store::preregs::get(app.db(), id)
                .await
                .unwrap()
                .is_none(),
            "a refused command stored nothing"
        );
    }
    app.cleanup().await;
}
