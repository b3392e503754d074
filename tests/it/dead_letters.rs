//! Dead letters: browsing never drops them, one is replayed by its message id
//! with a fresh retry count, oversized messages and forged retry counts.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use prereg::mq::{dead_letters, CloudEvent, Queue};
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::{common::*, retries::depth};

/// A partner that may not develop customers, and two pre-registration
/// commands of it, published upstream and waiting as dead letters.
async fn two_dead_commands(app: &TestApp, tag: &str) -> (Partner, [(Uuid, CloudEvent); 2]) {
    let p = app
        .create_partner(json!({"customer_development": false}))
        .await;
    let cmds = [
        prereg_cmd(p.id, &format!("{tag}a@customer.example")),
        prereg_cmd(p.id, &format!("{tag}b@customer.example")),
    ];
    for (_, ev) in &cmds {
        app.ctx.broker.publish_upstream(ev).await.unwrap();
    }
    app.dead_letters(Queue::Registration, 2).await;
    (p, cmds)
}

/// The operator lets partner `p` develop customers (the dead letters' cause).
async fn allow_development(app: &TestApp, p: &Partner) {
    app.patch_partner(p, json!({"customer_development": true}))
        .await;
}

/// After `a` alone was replayed: it is stored and granted, and only `b`
/// is left in the dead letters.
async fn only_b_left(app: &TestApp, p: &Partner, a_id: Uuid, b: &CloudEvent) {
    wait_until(Duration::from_secs(10), || app.stored(a_id)).await;
    assert_eq!(app.decided(p, a_id).await["status"], "preregistered");
    let left = dead_letters::list(&app.ctx.broker, Queue::Registration, 10)
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].message_id.as_deref(), Some(b.id.as_str()));
}

fn prereg_cmd(partner_id: Uuid, email: &str) -> (Uuid, CloudEvent) {
    let id = Uuid::now_v7();
    let ev = CloudEvent::new(
        "preregistration.requested",
        json!({"id": id, "partner_id": partner_id, "full_name": "Zhang San",
               "email": email, "mobile": "+8613700000001"}),
    );
    (id, ev)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsing_leaves_dead_letters_and_one_is_replayed_by_id() {
    let app = spawn_app().await;
    let (p, [(a_id, a), (b_id, b)]) = two_dead_commands(&app, "").await;

    // Looking at them many times (more than RabbitMQ 4's default quorum
    // delivery limit of 20) leaves every one in place.
    for _ in 0..25 {
        let (s, v) = app
            .get("/v1/admin/dead-letters/registration", OPERATOR)
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["items"].as_array().unwrap().len(), 2, "{v}");
    }

    // The partner may now develop customers: replay only `a`.
    allow_development(&app, &p).await;
    let path = "/v1/admin/dead-letters/registration/replay";
    let (s, v) = app
        .post(path, OPERATOR, json!({"message_id": "no-such-id"}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = app.post(path, OPERATOR, json!({"message_id": a.id})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["replayed"], 1);
    only_b_left(&app, &p, a_id, &b).await;
    assert!(!app.stored(b_id).await);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_dead_letter_starts_its_retries_afresh() {
    // No consumers: the replayed message stays in its work queue to be read.
    let app = spawn_roles(|_| {}, vec![]).await;
    let names = app.ctx.broker.names.clone();
    let ev = CloudEvent::new(
        "association.requested",
        json!({"attempt_id": Uuid::now_v7()}),
    );
    let mut headers = FieldTable::default();
    headers.insert("x-retry-count".into(), AMQPValue::LongInt(5));
    headers.insert(
        "x-prereg-reason".into(),
        AMQPValue::LongString("retries_exhausted".into()),
    );
    app.ctx
        .broker
        .publish(&names.dlx(), Queue::Association.short(), &ev, headers)
        .await
        .unwrap();
    let dead = app.dead_letters(Queue::Association, 1).await;
    assert_eq!(dead[0].retries, Some(5));
    assert!(
        !dead_letters::replay_one(&app.ctx.broker, Queue::Association, "other")
            .await
            .unwrap()
    );
    assert!(
        dead_letters::replay_one(&app.ctx.broker, Queue::Association, &ev.id)
            .await
            .unwrap()
    );
    let (_, ch) = app.ctx.broker.channel().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let d = loop {
        if let Some(m) = ch
            .basic_get(
                &names.queue(Queue::Association),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            break m.delivery;
        }
        assert!(tokio::time::Instant::now() < deadline, "never replayed");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(
        d.properties.message_id().as_ref().map(|s| s.as_str()),
        Some(ev.id.as_str())
    );
    let h = d.properties.headers().clone();
    assert_eq!(prereg::mq::broker::header_u32(&h, "x-retry-count"), Some(0));
    assert_eq!(depth(&ch, &names.dlq(Queue::Association)).await, 0);
    let _ = ch.close(200, "done").await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_dead_lettered_and_forged_retry_counts_are_ignored() {
    let app = spawn_with(|c| {
        c.max_message_bytes = 4096;
        c.retry_delays = vec![Duration::from_secs(3)];
        c.max_attempts = 3;
        c.smtp_url = crate::retries::NO_SMTP.into();
    })
    .await;
    let p = app.create_partner(json!({})).await;
    // 1. Larger than the maximum: dead-lettered unparsed, nothing stored.
    let (id, mut big) = prereg_cmd(p.id, "big@customer.example");
    big.data["remarks"] = json!("x".repeat(8000));
    app.ctx.broker.publish_upstream(&big).await.unwrap();
    let dead = app.dead_letters(Queue::Registration, 1).await;
    assert_eq!(dead[0].reason.as_deref(), Some("too_large"));
    assert!(!app.stored(id).await);

    // 2. An upstream command claiming u32::MAX earlier attempts: the count
    // is not trusted (no overflow, no skipped schedule): it is retried like
    // any job and dead-lettered once its own retries are used up.
    let invitation = crate::retries::failing_invitation(&app).await;
    // The intake's own job fails first and waits out its 3 s delay, so the
    // forged copy is decided alone (two copies of one invitation in one
    // email batch are one send, and the second would not fail on its own).
    let (_, ch) = app.ctx.broker.channel().await.unwrap();
    let names = app.ctx.broker.names.clone();
    wait_until(Duration::from_secs(5), || async {
        depth(&ch, &names.retry_queue(0)).await == 1
    })
    .await;
    let forged = CloudEvent::new("invitation.requested", json!({"invitation_id": invitation}));
    let mut headers = FieldTable::default();
    headers.insert("x-retry-count".into(), AMQPValue::LongUInt(u32::MAX));
    app.ctx
        .broker
        .publish(&names.commands(), &forged.ty, &forged, headers)
        .await
        .unwrap();
    // Both copies (the intake's job and the forged one) wait for their first
    // retry; the forged one was neither dead-lettered at once nor crashed the
    // worker with an overflow.
    wait_until(Duration::from_secs(2), || async {
        depth(&ch, &names.retry_queue(0)).await == 2
    })
    .await;
    assert_eq!(depth(&ch, &names.dlq(Queue::Email)).await, 0);
    let _ = ch.close(200, "done").await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_violation_is_dead_lettered_at_once_naming_the_constraint() {
    let app = spawn_app().await;
    // This test's own database gets a rule the job's write will break.
    sqlx::query(
        "ALTER TABLE accounts ADD CONSTRAINT accounts_test_no_forbidden CHECK (account_id <> 'forbidden')",
    )
    .execute(app.db())
    .await
    .unwrap();
    let ev = CloudEvent::new(
        "account.upserted",
        json!({"account_id": "forbidden", "updated_at": "2026-01-01T00:00:00Z"}),
    );
    app.ctx.broker.publish_upstream(&ev).await.unwrap();
    let dead = app.dead_letters(Queue::Accounts, 1).await;
    assert_eq!(dead[0].reason.as_deref(), Some("constraint_violation"));
    assert_eq!(dead[0].retries, Some(0), "not retried");
    assert!(dead[0]
        .error
        .as_deref()
        .unwrap_or_default()
        .contains("accounts_test_no_forbidden"));
    app.cleanup().await;
}

/// `prereg admin dlq list|replay` (the real binary): lists the dead letters
/// as JSON lines without taking them, replays one by message id (the other
/// stays), then the rest; an unknown id or queue fails with a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_dlq_cli_lists_and_replays_one_then_all() {
    let app = spawn_app().await;
    let (p, [(a_id, a), (b_id, b)]) = two_dead_commands(&app, "cli-").await;
    let run = |args: &[&str]| {
        let out = app.binary(args).output().expect("run prereg");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (ok, stdout, stderr) = run(&["admin", "dlq", "list", "registration"]);
    assert!(ok, "{stderr}");
    let listed: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(listed.len(), 2, "{stdout}");
    let mut ids: Vec<&str> = listed
        .iter()
        .map(|d| d["message_id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut want = vec![a.id.as_str(), b.id.as_str()];
    want.sort();
    assert_eq!(ids, want);
    assert!(
        listed
            .iter()
            .all(|d| d["reason"] == "customer_development_disabled"),
        "{stdout}"
    );
    // Listing took nothing away.
    app.dead_letters(Queue::Registration, 2).await;

    // The cause is fixed; one is replayed by id.
    allow_development(&app, &p).await;
    let (ok, _, stderr) = run(&[
        "admin",
        "dlq",
        "replay",
        "registration",
        "--id",
        "no-such-id",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("no dead letter with message id no-such-id"),
        "{stderr}"
    );
    let (ok, stdout, stderr) = run(&["admin", "dlq", "replay", "registration", "--id", &a.id]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!("replayed {} to registration", a.id)),
        "{stdout}"
    );
    only_b_left(&app, &p, a_id, &b).await;

    // The rest.
    let (ok, stdout, stderr) = run(&["admin", "dlq", "replay", "registration"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("replayed 1 message(s) to registration"),
        "{stdout}"
    );
    wait_until(Duration::from_secs(10), || app.stored(b_id)).await;
    // Decided (same mobile as `a`, so it is refused as a duplicate).
    assert_ne!(app.decided(&p, b_id).await["status"], "queued");
    let (ok, stdout, _) = run(&["admin", "dlq", "list", "registration"]);
    assert!(ok);
    assert!(
        stdout.contains("no dead letters in registration"),
        "{stdout}"
    );
    let (ok, _, stderr) = run(&["admin", "dlq", "list", "nowhere"]);
    assert!(!ok);
    assert!(stderr.contains("unknown queue `nowhere`"), "{stderr}");
    app.cleanup().await;
}
