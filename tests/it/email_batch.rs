//! The batched email worker: leases of a batch in one transaction, the
//! emails sent concurrently over the SMTP pool, the results in one
//! transaction. What batching must not break: one bad recipient fails
//! alone, an invitation is never emailed twice (a copy in the same batch, a
//! worker killed mid-batch). Rows written in one transaction share their
//! timestamps (Postgres `now()` is the transaction's start), which is how
//! these tests see that a batch was leased and recorded together.

use std::{collections::HashMap, time::Duration};

use prereg::{
    mq::{CloudEvent, Queue},
    workers::{registration::Step, runtime, Outcome},
};
use prereg_devtools::smtp_sink::{AfterData, SmtpSink, Stage};
use serde_json::json;
use uuid::Uuid;

use crate::common::*;

/// An app without an email consumer (invitations wait in the queue until a
/// worker is added), sending to `sink`.
async fn without_email_worker(sink: &SmtpSink, tweak: impl FnOnce(&mut prereg::Config)) -> TestApp {
    let url = sink.url();
    spawn_roles(
        move |c| {
            c.smtp_url = url;
            tweak(c);
        },
        vec![Queue::Registration, Queue::Accounts],
    )
    .await
}

/// A worker whose batch waits long enough for every waiting delivery.
fn patient(c: &mut prereg::Config) {
    c.email_batch = 64;
    c.email_linger = Duration::from_millis(300);
}

/// `n` granted claims of `p`, invited by email in one request; returns the
/// invitation ids with their customers' addresses.
async fn invited(app: &TestApp, p: &Partner, tag: &str, n: usize) -> Vec<(Uuid, String)> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            app.claimed(
                p,
                &format!("{tag}{i}@batch-mail.example"),
                &format!("+861370{:03}{i:04}", tag.len()),
            )
            .await,
        );
    }
    let v = app.invite_ids("/v1/invitations", p, &ids).await;
    let invs: Vec<Uuid> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["invitation_id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(invs.len(), n, "{v}");
    sqlx::query_as(
        "SELECT i.id, p.email FROM invitations i JOIN preregistrations p ON p.id = i.preregistration_id
         WHERE i.id = ANY($1) ORDER BY i.id",
    )
    .bind(&invs)
    .fetch_all(app.db())
    .await
    .unwrap()
}

async fn count_where(app: &TestApp, ids: &[Uuid], condition: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM invitations WHERE id = ANY($1) AND {condition}"
    ))
    .bind(ids)
    .fetch_one(app.db())
    .await
    .unwrap()
}

/// How many emails each address received.
fn per_recipient(sink: &SmtpSink) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for m in sink.received() {
        for to in m.to {
            *n.entry(to).or_default() += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_recipient_in_a_batch_fails_alone_and_the_others_are_sent_once() {
    let sink = SmtpSink::start().await.unwrap();
    // One recipient of the batch (whichever exchange comes first) is
    // refused for good.
    sink.script(Stage::Rcpt, 550, "5.1.1 mailbox unavailable");
    let mut app = without_email_worker(&sink, |_| {}).await;
    let p = app.create_partner(json!({})).await;
    let invs = invited(&app, &p, "perm", 6).await;
    let ids: Vec<Uuid> = invs.iter().map(|(id, _)| *id).collect();
    app.add_worker_on(vec![Queue::Email], patient).await;

    wait_until(Duration::from_secs(20), || async {
        count_where(&app, &ids, "status IN ('sent', 'failed')").await == 6
    })
    .await;
    assert_eq!(count_where(&app, &ids, "status = 'sent'").await, 5);
    let (failed, failure): (Uuid, String) = sqlx::query_as(
        "SELECT id, failure FROM invitations WHERE id = ANY($1) AND status = 'failed'",
    )
    .bind(&ids)
    .fetch_one(app.db())
    .await
    .unwrap();
    assert!(failure.contains("550"), "{failure}");
    // The refused one got nothing; each other customer exactly one email.
    let got = per_recipient(&sink);
    for (id, email) in &invs {
        let want = usize::from(*id != failed);
        assert_eq!(got.get(email).copied().unwrap_or(0), want, "{email}");
    }
    assert_eq!(sink.count(), 5);
    // One lease transaction for the six, one results transaction for them.
    assert_eq!(
        count_where(
            &app,
            &ids,
            "activated_at = (SELECT min(activated_at) FROM invitations WHERE id = ANY($1))"
        )
        .await,
        6,
        "leased together"
    );
    let recorded: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT sent_at) FROM invitations WHERE id = ANY($1) AND status = 'sent'",
    )
    .bind(&ids)
    .fetch_one(app.db())
    .await
    .unwrap();
    assert_eq!(recorded, 1, "the five were recorded in one transaction");
    // Only the refused one is dead-lettered, with its reason.
    wait_until(Duration::from_secs(10), || async {
        !runtime::list_dead_letters(&app.ctx, Queue::Email, 10)
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    let dead = runtime::list_dead_letters(&app.ctx, Queue::Email, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason.as_deref(), Some("smtp_permanent"));
    app.cleanup().await;
}

fn requested(id: Uuid) -> CloudEvent {
    CloudEvent::with_id(
        format!("invitation.requested:{id}"),
        "invitation.requested",
        json!({"invitation_id": id}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_invitation_twice_in_one_batch_is_emailed_once() {
    let sink = SmtpSink::start().await.unwrap();
    let app = without_email_worker(&sink, |_| {}).await;
    let p = app.create_partner(json!({})).await;
    let invs = invited(&app, &p, "twice", 2).await;
    let (a, b) = (invs[0].0, invs[1].0);
    // The batch handler the runtime calls, with a copy of A in the batch
    // (the intake's publish and the relay's, or a replay).
    let batch = [requested(a), requested(b), requested(a)];
    let evs: Vec<&CloudEvent> = batch.iter().collect();
    let steps = prereg::workers::email::handle_batch(&app.ctx, &evs).await;
    let outcomes: Vec<Option<Outcome>> = steps
        .iter()
        .map(|s| match s {
            Step::Settled(Ok(o)) => Some(*o),
            _ => None,
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![
            Some(Outcome::Done),
            Some(Outcome::Done),
            Some(Outcome::Skipped("duplicate_delivery"))
        ],
        "{steps:?}"
    );
    assert_eq!(sink.count(), 2);
    let got = per_recipient(&sink);
    assert_eq!(got.get(&invs[0].1), Some(&1));
    assert_eq!(got.get(&invs[1].1), Some(&1));
    assert_eq!(
        count_where(&app, &[a, b], "status = 'sent' AND attempts = 1").await,
        2
    );
    // A later copy finds it sent.
    let again = [requested(a)];
    let evs: Vec<&CloudEvent> = again.iter().collect();
    let steps = prereg::workers::email::handle_batch(&app.ctx, &evs).await;
    assert!(
        matches!(
            steps[..],
            [Step::Settled(Ok(Outcome::Skipped("already_sent")))]
        ),
        "{steps:?}"
    );
    assert_eq!(sink.count(), 2);
    app.cleanup().await;
}

/// The real binary takes a batch of ten, leases it, and is SIGKILLed while
/// the mail server has all ten messages and has answered seven (its results
/// transaction waits for the last three). The deliveries go back to the
/// queue: another worker finds the leases, waits them out and fails the ten
/// `delivery_unknown` without a second email; the four deliveries the child
/// held outside its batch are sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_batch_sends_no_invitation_twice() {
    let sink = SmtpSink::start().await.unwrap();
    for _ in 0..3 {
        sink.after_data(AfterData::Delay(Duration::from_secs(60)));
    }
    let mut app = without_email_worker(&sink, |c| {
        c.retry_delays = vec![
            Duration::from_secs(1),
            Duration::from_secs(2),
            Duration::from_secs(3),
        ];
        c.max_attempts = 12;
    })
    .await;
    let p = app.create_partner(json!({})).await;
    let invs = invited(&app, &p, "kill", 14).await;
    let ids: Vec<Uuid> = invs.iter().map(|(id, _)| *id).collect();
    let mut child = crate::private::ChildProc::spawn(
        app.binary(&["worker", "--only", "email"])
            .env("PREREG_EMAIL_BATCH", "10")
            // The four after the first ten wait for a full second batch.
            .env("PREREG_EMAIL_LINGER", "60s"),
    );
    // The batch is leased and the server has every message of it.
    assert_eq!(sink.wait_for(10, Duration::from_secs(30)).await.len(), 10);
    assert_eq!(
        count_where(&app, &ids, "sending_since IS NOT NULL").await,
        10
    );
    assert_eq!(
        count_where(&app, &ids, "status = 'queued'").await,
        14,
        "nothing recorded yet"
    );
    child.kill();

    // Another worker takes the redelivered deliveries; its lease is its job
    // timeout + 5 s.
    app.add_worker_on(vec![Queue::Email], |c| {
        c.job_timeout = Duration::from_secs(1);
    })
    .await;
    wait_until(Duration::from_secs(40), || async {
        count_where(&app, &ids, "status = 'queued'").await == 0
    })
    .await;
    assert_eq!(count_where(&app, &ids, "status = 'sent'").await, 4);
    assert_eq!(
        count_where(
            &app,
            &ids,
            "status = 'failed' AND failure LIKE 'delivery outcome unknown%'"
        )
        .await,
        10
    );
    // Every customer got exactly one email: the killed batch's ten from the
    // child, the other four from the second worker.
    let got = per_recipient(&sink);
    for (_, email) in &invs {
        assert_eq!(got.get(email), Some(&1), "{email}");
    }
    assert_eq!(sink.count(), 14);
    app.cleanup().await;
}

/// The SMTP pool holds at most `PREREG_SMTP_POOL_SIZE` connections and
/// reuses them: a batch of twelve emails goes over two connections, not one
/// opened (and closed) per email as lettre's own pool did once every pooled
/// connection was busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_of_emails_goes_over_the_pools_few_reused_connections() {
    let sink = SmtpSink::start().await.unwrap();
    let mut app = without_email_worker(&sink, |_| {}).await;
    let p = app.create_partner(json!({})).await;
    let invs = invited(&app, &p, "pool", 12).await;
    let ids: Vec<Uuid> = invs.iter().map(|(id, _)| *id).collect();
    app.add_worker_on(vec![Queue::Email], |c| {
        patient(c);
        c.smtp_pool_size = 2;
    })
    .await;

    wait_until(Duration::from_secs(20), || async {
        count_where(&app, &ids, "status = 'sent'").await == 12
    })
    .await;
    assert_eq!(sink.count(), 12);
    assert!(
        sink.connections() <= 2,
        "{} SMTP connections for 12 emails with a pool of 2",
        sink.connections()
    );
}

/// A pooled connection the server closed while it sat idle is found out
/// and replaced: the next email goes out once, over a new connection, and
/// nothing is marked failed or `delivery_unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pooled_connection_the_server_closed_is_replaced_before_the_next_email() {
    let sink = SmtpSink::start().await.unwrap();
    let addr = sink.addr();
    let mut app = without_email_worker(&sink, |_| {}).await;
    let p = app.create_partner(json!({})).await;
    app.add_worker_on(vec![Queue::Email], |c| c.smtp_pool_size = 1)
        .await;
    let first = invited(&app, &p, "idle", 1).await;
    sink.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(sink.connections(), 1);

    // The server goes away (closing the idle pooled connection) and comes
    // back on the same address.
    sink.shutdown();
    drop(sink);
    // Its listener closes as its task ends.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let sink = loop {
        match SmtpSink::start_on(addr).await {
            Ok(sink) => break sink,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the sink's address stayed taken: {e}"),
        }
    };
    let second = invited(&app, &p, "idle-again", 1).await;
    let ids = [first[0].0, second[0].0];
    wait_until(Duration::from_secs(20), || async {
        count_where(&app, &ids, "status = 'sent'").await == 2
    })
    .await;
    assert_eq!(sink.count(), 1, "the second email, once");
    assert_eq!(sink.received()[0].to, vec![second[0].1.clone()]);
    assert_eq!(count_where(&app, &ids, "status = 'failed'").await, 0);
}
