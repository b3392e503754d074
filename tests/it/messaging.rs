//! Poison messages, upstream-published commands, reconnection.

use prereg::{
    mq::{CloudEvent, Queue},
    workers::runtime,
};
use serde_json::json;
use uuid::Uuid;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_their_reason_and_the_queue_moves_on() {
    let app = spawn_app().await;
    let p = app.create_partner(json!({})).await;
    let broker = &app.ctx.broker;
    let commands = broker.names.commands();
    // Not JSON at all.
    broker
        .publish_raw(
            &commands,
            "preregistration.requested",
            b"{definitely not json",
            None,
            Default::default(),
            None,
        )
        .await
        .unwrap();
    // A valid envelope whose data fails validation (bad email and mobile).
    let bad = CloudEvent::new(
        "preregistration.requested",
        json!({"id": Uuid::now_v7(), "partner_id": p.id, "full_name": "X", "email": "nope", "mobile": "123"}),
    );
    broker.publish_upstream(&bad).await.unwrap();
    // Then a good command, published straight by an "upstream system".
    let id = Uuid::now_v7();
    let good = CloudEvent::new(
        "preregistration.requested",
        json!({"id": id, "partner_id": p.id, "full_name": "Good Customer", "email": "good@customer.example", "mobile": "+8612900000001"}),
    );
    broker.publish_upstream(&good).await.unwrap();
    // The worker creates the row from the upstream command.
    wait_until(std::time::Duration::from_secs(10), || async {
        prereg::store::preregs::get(app.db(), id)
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let v = app.decided(&p, id).await;
    assert_eq!(v["status"], "preregistered");

    wait_until(std::time::Duration::from_secs(10), || async {
        runtime::list_dead_letters(&app.ctx, Queue::Registration, 10)
            .await
            .unwrap()
            .len()
            == 2
    })
    .await;
    let dead = runtime::list_dead_letters(&app.ctx, Queue::Registration, 10)
        .await
        .unwrap();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_deref().unwrap()).collect();
    assert!(reasons.contains(&"unparseable"), "{dead:?}");
    // Checked as the intake checks an HTTP request: the same reason.
    assert!(reasons.contains(&"validation_failed"), "{dead:?}");
    let invalid = dead
        .iter()
        .find(|d| d.reason.as_deref() == Some("validation_failed"))
        .unwrap();
    assert!(
        invalid.error.as_deref().unwrap().contains("email"),
        "{invalid:?}"
    );
    // Listing leaves them in place; the operator API shows them too.
    let (s, listed) = app
        .get("/v1/admin/dead-letters/registration", OPERATOR)
        .await;
    assert_eq!(s, reqwest::StatusCode::OK);
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);
    // Listed messages go back to the queue as the listing channel closes.
    let registration = || async {
        let (_, queues) = app.get("/v1/admin/queues", OPERATOR).await;
        queues["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["queue"] == "registration")
            .unwrap()
            .clone()
    };
    wait_until(std::time::Duration::from_secs(5), || async {
        registration().await["dead_letters"] == 2
    })
    .await;
    let reg = registration().await;
    assert!(reg["consumers"].as_u64().unwrap() >= 1);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_dead_letters_are_processed_once_fixed() {
    // A command for a partner that does not exist yet dead-letters; once the
    // partner exists, a replay decides it.
    let app = spawn_app().await;
    let partner_id = Uuid::now_v7();
    let id = Uuid::now_v7();
    let cmd = CloudEvent::new(
        "preregistration.requested",
        json!({"id": id, "partner_id": partner_id, "full_name": "Late", "email": "late@customer.example", "mobile": "+8612900000002"}),
    );
    app.ctx.broker.publish_command(&cmd).await.unwrap();
    wait_until(std::time::Duration::from_secs(10), || async {
        runtime::list_dead_letters(&app.ctx, Queue::Registration, 5)
            .await
            .unwrap()
            .len()
            == 1
    })
    .await;
    sqlx::query("INSERT INTO partners (id, name, country, contact_email) VALUES ($1, 'Late Partner', 'CN', 'x@y.co')")
        .bind(partner_id)
        .execute(app.db())
        .await
        .unwrap();
    let (s, v) = app
        .post(
            "/v1/admin/dead-letters/registration/replay",
            OPERATOR,
            json!({}),
        )
        .await;
    assert_eq!(
        (s, v["replayed"].as_u64()),
        (reqwest::StatusCode::OK, Some(1))
    );
    wait_until(std::time::Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, String>("SELECT status FROM preregistrations WHERE id = $1")
            .bind(id)
            .fetch_optional(app.db())
            .await
            .unwrap()
            .is_some_and(|s| s == "preregistered")
    })
    .await;
    assert!(runtime::list_dead_letters(&app.ctx, Queue::Registration, 5)
        .await
        .unwrap()
        .is_empty());
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_reconnect_after_the_connection_drops() {
    let app = spawn_app().await;
    let p = app.create_partner(json!({})).await;
    let first = app
        .prereg(&p, "before@customer.example", "+8612800000001")
        .await;
    app.decided(&p, first).await;
    // The broker drops the connection (as on a restart).
    app.ctx.broker.drop_connection().await;
    // New work is still accepted (the publisher reconnects) and consumed
    // (the consumers reconnect).
    app.claimed(&p, "after@customer.example", "+8612800000002")
        .await;
    app.cleanup().await;
}
