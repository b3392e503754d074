//! Invitations, email delivery through a real SMTP server, association.

use std::time::Duration;

use prereg::{
    domain::association::Causes,
    mq::{CloudEvent, Queue},
    workers::runtime,
};
use prereg_devtools::smtp_sink::{AfterData, SmtpSink, Stage};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::Row;
use uuid::Uuid;

use crate::common::*;

struct Mail {
    to: Vec<String>,
    subject: String,
    text: String,
    html: String,
}

fn parse(m: &prereg_devtools::smtp_sink::ReceivedMail) -> Mail {
    let parsed = mailparse::parse_mail(m.data.as_bytes()).expect("a MIME message");
    let subject = parsed
        .headers
        .iter()
        .find(|h| h.get_key_ref().eq_ignore_ascii_case("subject"))
        .map(|h| h.get_value())
        .unwrap_or_default();
    let mut text = String::new();
    let mut html = String::new();
    for part in &parsed.subparts {
        let body = part.get_body().unwrap_or_default();
        if part.ctype.mimetype == "text/plain" {
            text = body;
        } else if part.ctype.mimetype == "text/html" {
            html = body;
        }
    }
    Mail {
        to: m.to.clone(),
        subject,
        text,
        html,
    }
}

/// [`crate::common::mail_app`] of the provider `Example Cloud`.
async fn mail_app(sink: &SmtpSink, tweak: impl FnOnce(&mut prereg::Config)) -> TestApp {
    crate::common::mail_app(sink, |c| {
        c.provider_name = "Example Cloud".into();
        tweak(c);
    })
    .await
}

async fn claimed(app: &TestApp, p: &Partner, n: u32) -> Uuid {
    let id = app
        .claimed(
            p,
            &format!("cust{n}@customer.example"),
            &format!("+8615000000{n:03}"),
        )
        .await;
    id
}

async fn invite(app: &TestApp, p: &Partner, ids: &[Uuid], body: Value) -> Value {
    let mut b = body;
    b["preregistration_ids"] = json!(ids);
    let (s, v) = app.post("/v1/invitations", &p.key, b).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    v
}

/// An association attempt with the link `token` or offline `code` (`by`),
/// for `account`; waits for its outcome.
async fn associate(app: &TestApp, upstream: &str, by: &str, link: &str, account: &str) -> Value {
    let body = json!({by: link, "account_id": account});
    app.associate_within(upstream, body, Duration::from_secs(15))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invitation_email_arrives_with_a_working_link_in_the_right_language() {
    let (sink, app) = with_mail(|_| {}).await;
    let upstream = app.upstream_key().await;
    let p = app
        .create_partner(json!({"name": "Acme Cloud", "contact_email": "sales@acme.example"}))
        .await;
    let id = claimed(&app, &p, 1).await;
    // The preview renders what will be sent.
    let (s, preview) = app
        .get(
            &format!("/v1/invitations/preview?preregistration_id={id}&locale=zh-CN&reveal=true"),
            &p.key,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{preview}");
    let v = invite(&app, &p, &[id], json!({"locale": "zh-CN"})).await;
    assert_eq!(v["results"][0]["status"], "queued");
    let inv = v["results"][0]["invitation_id"]
        .as_str()
        .unwrap()
        .to_string();
    let sent = app.invitation_state(&p, &inv, "sent").await;
    assert!(sent["sent_at"].is_string());
    let mails = sink.wait_for(1, Duration::from_secs(10)).await;
    let m = parse(&mails[0]);
    assert_eq!(m.to, ["cust1@customer.example"]);
    assert!(
        m.subject.contains("Acme Cloud") && m.subject.contains("邀请"),
        "{}",
        m.subject
    );
    assert!(m.text.contains("经销模式"), "{}", m.text);
    assert!(m.html.contains("lang=\"zh-CN\""));
    assert_eq!(m.subject, preview["subject"]);
    // Exactly the preview, but for the real token.
    let token = app.link_token(inv.parse().unwrap()).await;
    let link = format!("https://partners.example/i/{token}");
    assert!(m.text.contains(&link), "{}", m.text);
    assert_eq!(
        m.text.replace("\r\n", "\n").trim_end(),
        preview["text"]
            .as_str()
            .unwrap()
            .replace("PREVIEW-TOKEN", &token)
            .trim_end()
    );
    // The pre-registration is invited, with the invitation listed.
    let (_, pr) = app.get(&format!("/v1/preregistrations/{id}"), &p.key).await;
    assert_eq!(pr["status"], "invited");
    assert_eq!(pr["invitations"][0]["id"], inv);
    // The customer opens the link and registers: associated.
    app.account(
        &upstream,
        "acct-ok",
        json!({"email": "CUST1@customer.example", "site": "intl", "country": "CN"}),
    )
    .await;
    let a = associate(&app, &upstream, "token", &token, "acct-ok").await;
    assert_eq!(a["status"], "succeeded", "{a}");
    assert_eq!(a["cause"], Value::Null);
    let (_, pr) = app.get(&format!("/v1/preregistrations/{id}"), &p.key).await;
    assert_eq!(pr["status"], "associated");
    // The partner is told by email.
    let mails = sink.wait_for(2, Duration::from_secs(10)).await;
    let note = parse(&mails[1]);
    assert_eq!(note.to, ["sales@acme.example"]);
    assert!(note.subject.contains("associated"), "{}", note.subject);
    // The used link answers link_used.
    let again = associate(&app, &upstream, "token", &token, "acct-ok").await;
    assert_eq!(again["cause"]["code"], "link_used");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_451_then_250_sends_once_after_a_retry() {
    let sink = SmtpSink::start().await.unwrap();
    sink.script(Stage::Data, 451, "4.3.0 try again later");
    // The first retry's delay (jitter takes at most a fifth off it).
    let delay = Duration::from_millis(1000);
    let app = mail_app(&sink, |c| {
        c.retry_delays = vec![delay, Duration::from_secs(4)];
    })
    .await;
    let p = app.create_partner(json!({})).await;
    let id = claimed(&app, &p, 2).await;
    let inv = app.invite(&p, id).await;
    // The refused attempt: the sink has counted nothing, the SMTP exchange
    // happened (one connection).
    wait_until(Duration::from_secs(10), || async {
        sink.connections() >= 1
    })
    .await;
    let refused_at = tokio::time::Instant::now();
    let sent = app.invitation_state(&p, &inv, "sent").await;
    let waited = refused_at.elapsed();
    assert_eq!(sent["attempts"], 2, "{sent}");
    assert!(
        waited >= delay * 4 / 5 - Duration::from_millis(100),
        "retried after {waited:?}, before its {delay:?} delay less jitter"
    );
    assert!(
        waited < Duration::from_secs(3),
        "the first retry took the second tier's delay: {waited:?}"
    );
    assert_one_mail(
        &sink,
        Duration::from_millis(500),
        "one email, after one retry",
    )
    .await;
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_550_fails_the_invitation_and_dead_letters_the_job() {
    let sink = SmtpSink::start().await.unwrap();
    sink.script(Stage::Rcpt, 550, "5.1.1 mailbox unavailable");
    let app = mail_app(&sink, |_| {}).await;
    let p = app.create_partner(json!({})).await;
    let id = claimed(&app, &p, 3).await;
    let inv = app.invite(&p, id).await;
    let failed = app.invitation_state(&p, &inv, "failed").await;
    assert!(
        failed["failure"].as_str().unwrap().contains("550"),
        "{failed}"
    );
    assert!(
        failed["failure"]
            .as_str()
            .unwrap()
            .contains("mailbox unavailable"),
        "{failed}"
    );
    let dead = app.dead_letters(Queue::Email, 1).await;
    assert_eq!(dead[0].reason.as_deref(), Some("smtp_permanent"));
    assert_eq!(sink.count(), 0);
    // A failed invitation can be resent (the cause fixed).
    let v = app.invite_ids("/v1/invitations/resend", &p, &[id]).await;
    app.invitation_state(
        &p,
        v["results"][0]["invitation_id"].as_str().unwrap(),
        "sent",
    )
    .await;
    app.cleanup().await;
}

/// A server that answers each message 1.5 s after taking it, an app that
/// retries soon, and a channel to watch its queues.
async fn slow_smtp_app() -> (SmtpSink, TestApp, lapin::Channel) {
    let sink = SmtpSink::start().await.unwrap();
    sink.after_data(AfterData::Delay(Duration::from_millis(1500)));
    let app = mail_app(&sink, |c| {
        c.retry_delays = vec![Duration::from_millis(600), Duration::from_secs(1)];
        c.max_attempts = 8;
    })
    .await;
    let (_, ch) = app.ctx.broker.channel().await.unwrap();
    (sink, app, ch)
}

/// How many messages wait in the delay queues now (retries scheduled).
async fn waiting_retries(app: &TestApp, ch: &lapin::Channel) -> u32 {
    let names = &app.ctx.broker.names;
    let mut n = 0;
    for i in 0..names.retry_delays.len() {
        n += crate::retries::depth(ch, &names.retry_queue(i)).await;
    }
    n
}

/// Waits until no retry waits and the queue holds no ready message: every
/// copy of a job has been taken by a consumer.
async fn drained(app: &TestApp, ch: &lapin::Channel, q: Queue) {
    let queue = app.ctx.broker.names.queue(q);
    wait_until(Duration::from_secs(15), || async {
        waiting_retries(app, ch).await == 0 && crate::retries::depth(ch, &queue).await == 0
    })
    .await;
}

/// The second copy of an invitation job arrives while the first is in the
/// middle of the SMTP exchange (the server has the message; its 250 is late):
/// the copy finds the delivery leased, is retried, then finds it sent. One
/// email. Without the lease the copy sends a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_the_job_arriving_mid_smtp_sends_no_second_email() {
    let (sink, app, ch) = slow_smtp_app().await;
    let p = app.create_partner(json!({})).await;
    let id = claimed(&app, &p, 4).await;
    let inv: Uuid = app.invite(&p, id).await.parse().unwrap();
    // The server has taken the message and not yet answered.
    assert_eq!(sink.wait_for(1, Duration::from_secs(10)).await.len(), 1);
    let (_, now) = app.get(&format!("/v1/invitations/{inv}"), &p.key).await;
    assert_eq!(now["status"], "queued", "mid-SMTP: {now}");
    // A redelivery of the same job (same id) arrives now.
    let job = CloudEvent::with_id(
        inv.to_string(),
        "invitation.requested",
        json!({"invitation_id": inv}),
    );
    app.ctx.broker.publish_command(&job).await.unwrap();
    // The copy found the lease and waits for a retry.
    wait_until(Duration::from_secs(5), || async {
        waiting_retries(&app, &ch).await > 0
    })
    .await;
    let sent = app.invitation_state(&p, &inv.to_string(), "sent").await;
    assert_eq!(sent["attempts"], 1, "the copy never claimed it: {sent}");
    drained(&app, &ch, Queue::Email).await;
    // Every copy is handled: a second email would have arrived by now.
    assert_one_mail(&sink, Duration::from_secs(1), "one email").await;
    assert!(runtime::list_dead_letters(&app.ctx, Queue::Email, 5)
        .await
        .unwrap()
        .is_empty());
    let _ = ch.close(200, "done").await;
    app.cleanup().await;
}

/// The same for a notice (deduplicated by job id in `email_deliveries`): a
/// copy of the partner's claim-expiry reminder arriving while the first is
/// mid-SMTP, and another after it was sent, send nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_job_delivered_again_mid_smtp_and_after_sends_one_email() {
    let (sink, app, ch) = slow_smtp_app().await;
    let p = app
        .create_partner(json!({"contact_email": "notices@partner.example"}))
        .await;
    let id = claimed(&app, &p, 8).await;
    let job = CloudEvent::with_id(
        format!("email:claim_expiry_reminder:{id}"),
        "email.requested",
        json!({"kind": "claim_expiry_reminder", "preregistration_id": id}),
    );
    app.ctx.broker.publish_command(&job).await.unwrap();
    let mails = sink.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(mails[0].to, ["notices@partner.example"]);
    // Mid-SMTP: a copy.
    app.ctx.broker.publish_command(&job).await.unwrap();
    wait_until(Duration::from_secs(5), || async {
        waiting_retries(&app, &ch).await > 0
    })
    .await;
    wait_until(Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, String>("SELECT state FROM email_deliveries WHERE job_id = $1")
            .bind(&job.id)
            .fetch_optional(app.db())
            .await
            .unwrap()
            .is_some_and(|s| s == "sent")
    })
    .await;
    // After it was sent: another copy (a replay).
    app.ctx.broker.publish_command(&job).await.unwrap();
    drained(&app, &ch, Queue::Email).await;
    assert_one_mail(&sink, Duration::from_secs(1), "one email").await;
    let _ = ch.close(200, "done").await;
    app.cleanup().await;
}

/// A worker killed in the middle of the SMTP exchange (the real binary,
/// SIGKILL, after the server took the message): its job is redelivered to
/// another worker, which finds the lease held and retries, and once the
/// lease has run out marks the delivery `delivery_unknown` (failed, dead
/// letter) instead of sending a second email.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_smtp_leaves_delivery_unknown_and_no_second_email() {
    let sink = SmtpSink::start().await.unwrap();
    sink.after_data(AfterData::Stall);
    let url = sink.url();
    // No email worker in this process: the first delivery is the child's.
    let mut app = spawn_roles(
        move |c| {
            c.smtp_url = url;
            c.job_timeout = Duration::from_secs(2);
            c.retry_delays = vec![
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(3),
            ];
            c.max_attempts = 12;
        },
        vec![Queue::Registration, Queue::Accounts],
    )
    .await;
    let p = app.create_partner(json!({})).await;
    let id = claimed(&app, &p, 9).await;
    let mut child =
        crate::private::ChildProc::spawn(&mut app.binary(&["worker", "--only", "email"]));
    let inv = app.invite(&p, id).await;
    // The server has the message; the child waits for its answer.
    assert_eq!(sink.wait_for(1, Duration::from_secs(30)).await.len(), 1);
    let leased: bool =
        sqlx::query_scalar("SELECT sending_since IS NOT NULL FROM invitations WHERE id = $1")
            .bind(inv.parse::<Uuid>().unwrap())
            .fetch_one(app.db())
            .await
            .unwrap();
    assert!(leased, "the child holds the delivery lease");
    child.kill();
    let killed_at = tokio::time::Instant::now();
    // Another worker takes the redelivered job.
    app.add_worker_on(vec![Queue::Email], |_| {}).await;
    app.invitation_failed_with(&p, &inv, "delivery outcome unknown")
        .await;
    // Not before the lease (job timeout + 5 s from the child's claim) ran out.
    assert!(
        killed_at.elapsed() >= Duration::from_secs(5),
        "gave up after {:?}, inside the lease",
        killed_at.elapsed()
    );
    let dead = app.dead_letters(Queue::Email, 1).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason.as_deref(), Some("delivery_unknown"));
    assert!(
        dead[0].retries.unwrap_or(0) >= 1,
        "retried while the lease was held: {dead:?}"
    );
    assert_eq!(sink.count(), 1, "one email, the one the killed worker sent");
    app.cleanup().await;
}

/// A copy of an email job that only ever finds another worker mid-send
/// (a live delivery lease) runs out of retries and is dead-lettered, but it
/// must not mark the invitation failed: the worker holding the lease settles
/// it. Before the fix the copy's give-up turned a live invitation, whose
/// email then went out, into `failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_exhausts_its_retries_while_another_worker_sends_leaves_the_invitation_live() {
    let sink = SmtpSink::start().await.unwrap();
    let url = sink.url();
    // No email worker yet: the invitation stays queued until the test has
    // put a live lease on it, as a worker in the SMTP exchange would.
    let mut app = spawn_roles(
        move |c| {
            c.smtp_url = url;
            c.retry_delays = vec![Duration::from_millis(100)];
            c.max_attempts = 3;
        },
        vec![Queue::Registration, Queue::Accounts],
    )
    .await;
    let p = app.create_partner(json!({})).await;
    let id = claimed(&app, &p, 41).await;
    let inv: Uuid = app.invite(&p, id).await.parse().unwrap();
    sqlx::query("UPDATE invitations SET sending_since = now() WHERE id = $1")
        .bind(inv)
        .execute(app.db())
        .await
        .unwrap();
    app.add_worker_on(vec![Queue::Email], |_| {}).await;
    let dead = app.dead_letters(Queue::Email, 1).await;
    assert_eq!(
        dead[0].reason.as_deref(),
        Some("retries_exhausted"),
        "{dead:?}"
    );
    // The runtime gives up on the job (workers::exhausted) before it
    // publishes the dead letter, so its effect is visible now.
    let (status, failure): (String, Option<String>) =
        sqlx::query_as("SELECT status, failure FROM invitations WHERE id = $1")
            .bind(inv)
            .fetch_one(app.db())
            .await
            .unwrap();
    assert_eq!(status, "queued", "failure recorded: {failure:?}");
    assert_eq!(sink.count(), 0, "the copy never sent");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referral_needs_the_permission_and_batches_answer_per_item() {
    let (_sink, app) = with_mail(|_| {}).await;
    let p = app.create_partner(json!({})).await;
    let other = app.create_partner(json!({"name": "Other"})).await;
    let id = claimed(&app, &p, 5).await;
    let (s, v) = app
        .post(
            "/v1/invitations",
            &p.key,
            json!({"preregistration_ids": [id], "association_type": "referral"}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(v["error"]["code"], "referral_not_permitted");
    let not_mine = claimed(&app, &other, 6).await;
    let rejected = app
        .prereg(&p, "cust5@customer.example", "+8615000000005")
        .await; // already_preregistered
    app.decided(&p, rejected).await;
    let v = invite(&app, &p, &[id, not_mine, rejected], json!({})).await;
    let r = v["results"].as_array().unwrap();
    assert_eq!(r[0]["status"], "queued");
    assert_eq!(r[1]["error"]["code"], "not_found");
    assert_eq!(r[2]["error"]["code"], "not_invitable");
    let (s, _) = app
        .post(
            "/v1/invitations",
            &p.key,
            json!({"preregistration_ids": (0..101).map(|_| Uuid::now_v7()).collect::<Vec<_>>()}),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_link_qr_and_one_time_code() {
    let (_sink, app) = with_mail(|_| {}).await;
    let upstream = app.upstream_key().await;
    let p = app.create_partner(json!({})).await;
    let id = claimed(&app, &p, 7).await;
    let v = app.offline_link(&p, id).await;
    assert!(v["url"]
        .as_str()
        .unwrap()
        .starts_with("https://partners.example/i/"));
    assert_eq!(v["link_expires_at"], Value::Null);
    let code = v["code"].as_str().unwrap().to_string();
    let resp = app
        .http
        .get(format!(
            "{}/v1/preregistrations/{id}/offline-link/qr.png",
            app.addr
        ))
        .bearer_auth(&p.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "image/png");
    let png = resp.bytes().await.unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    app.account(
        &upstream,
        "acct-off",
        json!({"email": "cust7@customer.example"}),
    )
    .await;
    let a = associate(&app, &upstream, "code", &code.to_lowercase(), "acct-off").await;
    assert_eq!(a["status"], "succeeded", "{a}");
    let b = associate(&app, &upstream, "code", &code, "acct-off").await;
    assert_eq!(b["cause"]["code"], "code_used");
    app.cleanup().await;
}

/// Every cause of the table, reached through the real pipeline and returned
/// word for word (with `{provider}` filled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_association_failure_cause_is_reachable_word_for_word() {
    let (_sink, app) = with_mail(|c| {
        c.max_attempts = 2;
        // This test fails on purpose many times with one key: no lockout.
        c.attempt_key_limit = 10_000;
        c.attempt_limit = 1_000;
    })
    .await;
    let upstream = app.upstream_key().await;
    let reseller = app.create_partner(json!({"name": "Reseller"})).await;
    let referral = app
        .create_partner(json!({"name": "Referrer", "referral": true}))
        .await;
    let prepaid = app
        .create_partner(json!({"name": "Prepaid", "billing_mode": "prepaid"}))
        .await;
    let causes = Causes::shipped();
    let old = (chrono::Utc::now() - chrono::Duration::days(30)).to_rfc3339();
    let mut n = 100;
    for code in causes.codes() {
        n += 1;
        let (partner, kind) = match code {
            "prepaid_partner_reseller" => (&prepaid, "reseller"),
            "referral_not_allowed_relationship" | "referral_not_allowed_country" => {
                (&referral, "referral")
            }
            _ => (&reseller, "reseller"),
        };
        let id = claimed(&app, partner, n).await;
        let v = invite(&app, partner, &[id], json!({"association_type": kind})).await;
        let inv: Uuid = v["results"][0]["invitation_id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        app.invitation_state(partner, &inv.to_string(), "sent")
            .await;
        let mut token = app.link_token(inv).await;
        let account = format!("acct-{code}");
        let mut facts = json!({"email": format!("cust{n}@customer.example")});
        if code == "registration_time_exceeded" {
            facts["registered_at"] = json!(old);
        } else if let Some(flag) = cause_flag(code) {
            facts[flag] = json!(true);
        }
        match code {
            "email_mismatch" => facts["email"] = json!("someone.else@customer.example"),
            "link_not_found" => token = "no-such-token".into(),
            "link_expired" => {
                // A resend supersedes the first link.
                let r = app
                    .invite_ids("/v1/invitations/resend", partner, &[id])
                    .await;
                app.invitation_state(
                    partner,
                    r["results"][0]["invitation_id"].as_str().unwrap(),
                    "sent",
                )
                .await;
            }
            "link_used" => {
                let first_account = format!("{account}-first");
                app.account(&upstream, &first_account, facts.clone()).await;
                let first = associate(&app, &upstream, "token", &token, &first_account).await;
                assert_eq!(first["status"], "succeeded");
            }
            "code_used" => {
                let off = app.offline_link(partner, id).await;
                let code_str = off["code"].as_str().unwrap().to_string();
                app.account(&upstream, &account, facts.clone()).await;
                assert_eq!(
                    associate(&app, &upstream, "code", &code_str, &account).await["status"],
                    "succeeded"
                );
                let a = associate(&app, &upstream, "code", &code_str, &account).await;
                assert_cause(&app, &a, code);
                continue;
            }
            _ => {}
        }
        if code != "system_busy" {
            app.account(&upstream, &account, facts).await;
        }
        // system_busy: no facts ever arrive for the account; retries run out.
        let a = associate(&app, &upstream, "token", &token, &account).await;
        assert_cause(&app, &a, code);
        if ![
            "link_not_found",
            "link_expired",
            "link_used",
            "code_used",
            "system_busy",
        ]
        .contains(&code)
        {
            let (_, pr) = app
                .get(&format!("/v1/preregistrations/{id}"), &partner.key)
                .await;
            assert_eq!(pr["status"], "association_failed", "{code}");
            assert_eq!(pr["reason"]["code"], code);
        }
    }
    app.cleanup().await;
}

/// The account fact that, set to `true`, causes the association failure
/// `code` (`None` for the causes that come from elsewhere).
fn cause_flag(code: &str) -> Option<&str> {
    Some(match code {
        "customer_is_partner" => "is_partner_or_applying",
        "associated_with_other_partner" => "associated_with_partner",
        "special_contract" => "has_special_contract",
        "referral_not_allowed_relationship" => "referral_blocked_by_relationship",
        "referral_not_allowed_country" => "referral_blocked_by_country",
        "consumption_record" => "has_consumption_record",
        "topup_balance_invoice_limit" => "topup_balance_over_invoice_limit",
        "support_plan" => "has_support_plan",
        "member_support_plan" => "member_has_support_plan",
        "registered_by_other_partner"
        | "internal_account"
        | "enterprise_master_independent_accounting"
        | "enterprise_member_account"
        | "overdue_payment"
        | "credit_bill_run_overdue" => code,
        _ => return None,
    })
}

fn assert_cause(app: &TestApp, a: &Value, code: &str) {
    assert_eq!(a["status"], "failed", "{code}: {a}");
    let want = Causes::shipped()
        .view(code, &app.cfg.provider_name)
        .unwrap();
    assert_eq!(a["cause"]["code"], code, "{a}");
    assert_eq!(a["cause"]["message"], want.message, "{code}");
    assert_eq!(a["cause"]["suggestion"], want.suggestion, "{code}");
    assert!(!want.message.contains("{provider}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_invitation_at_preregistration_and_deleting_kills_the_link() {
    let (sink, app) = with_mail(|_| {}).await;
    let upstream = app.upstream_key().await;
    let p = app.create_partner(json!({})).await;
    let (s, v) = app
        .post("/v1/preregistrations", &p.key, json!({"full_name": "Now", "email": "now@customer.example", "mobile": "+8615100000001", "send_invitation": true, "locale": "en"}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let id: Uuid = v["id"].as_str().unwrap().parse().unwrap();
    sink.wait_for(1, Duration::from_secs(10)).await;
    let row = sqlx::query("SELECT id, status FROM invitations WHERE preregistration_id = $1")
        .bind(id)
        .fetch_one(app.db())
        .await
        .unwrap();
    let inv: Uuid = row.get("id");
    app.invitation_state(&p, &inv.to_string(), "sent").await;
    let token = app.link_token(inv).await;
    assert_eq!(app.delete_prereg(id, &p.key).await.0, StatusCode::OK);
    app.account(
        &upstream,
        "acct-now",
        json!({"email": "now@customer.example"}),
    )
    .await;
    let a = associate(&app, &upstream, "token", &token, "acct-now").await;
    assert_eq!(a["cause"]["code"], "link_expired");
    app.cleanup().await;
}

/// The server takes the message and the connection drops before its reply,
/// or the reply never comes (the job times out mid-exchange): the outcome is
/// unknown, so the worker must not send again: `delivery_unknown`, at once
/// for the dropped connection, after the lease for the time-out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_after_the_server_took_the_message_sends_no_second_email() {
    for action in [AfterData::Drop, AfterData::Stall] {
        let sink = SmtpSink::start().await.unwrap();
        sink.after_data(action);
        let app = mail_app(&sink, |c| {
            // A stalled reply ends with the job's time-out; its retries
            // then outlast the lease (job timeout + 5 s).
            c.smtp_timeout = Duration::from_millis(800);
            c.job_timeout = Duration::from_secs(1);
            c.retry_delays = vec![Duration::from_millis(500), Duration::from_secs(1)];
            c.max_attempts = 12;
        })
        .await;
        let p = app.create_partner(json!({})).await;
        let id = claimed(&app, &p, 10).await;
        let inv = app.invite(&p, id).await;
        app.invitation_failed_with(&p, &inv, "delivery outcome unknown")
            .await;
        assert_one_mail(
            &sink,
            Duration::from_secs(1),
            &format!("{action:?}: one email"),
        )
        .await;
        app.cleanup().await;
    }
}

/// The per-partner send rate lives in Redis. With Redis unreachable the
/// emails still go out (the rate is not enforced, nothing fails or waits
/// for it): five invitations at a rate of one per second arrive together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_the_partner_email_rate_is_skipped_and_nothing_fails() {
    let (sink, app) = with_mail(|c| {
        c.partner_email_rate = 1;
        c.redis_url = "redis://127.0.0.1:1".into();
    })
    .await;
    assert!(app.ctx.locks.ping().await.is_err(), "Redis is unreachable");
    let p = app.create_partner(json!({})).await;
    let mut ids = Vec::new();
    for n in 20..25 {
        ids.push(claimed(&app, &p, n).await);
    }
    let started = tokio::time::Instant::now();
    let v = invite(&app, &p, &ids, json!({})).await;
    assert_eq!(sink.wait_for(5, Duration::from_secs(15)).await.len(), 5);
    let took = started.elapsed();
    // At one per second, five would need at least four seconds.
    assert!(
        took < Duration::from_millis(3000),
        "five emails took {took:?}: the rate was applied without Redis"
    );
    for r in v["results"].as_array().unwrap() {
        let sent = app
            .invitation_state(&p, r["invitation_id"].as_str().unwrap(), "sent")
            .await;
        assert_eq!(sent["attempts"], 1, "{sent}");
    }
    app.cleanup().await;
}

/// SMTP AUTH with the credentials of `PREREG_SMTP_URL` (`smtp://user:pass@…`):
/// a server that requires it gets them and takes the email; wrong ones are a
/// permanent failure (535) that names the reply and never the password.
/// (STARTTLS and implicit TLS: `tests/it/smtp_tls.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_auth_uses_the_url_credentials_and_a_refusal_is_permanent() {
    for (password, ok) in [("s3cret-pw", true), ("wrong-pw", false)] {
        let sink = SmtpSink::start().await.unwrap();
        sink.require_auth("mailer", "s3cret-pw");
        let url = format!("smtp://mailer:{password}@{}", sink.addr());
        let app = spawn_with(move |c| c.smtp_url = url).await;
        let p = app.create_partner(json!({})).await;
        let id = claimed(&app, &p, 30).await;
        let inv = app.invite(&p, id).await;
        if ok {
            app.invitation_state(&p, &inv, "sent").await;
            assert_eq!(sink.wait_for(1, Duration::from_secs(5)).await.len(), 1);
            assert!(sink.logins() >= 1);
        } else {
            let failed = app.invitation_state(&p, &inv, "failed").await;
            let failure = failed["failure"].as_str().unwrap();
            assert!(failure.contains("535"), "{failure}");
            assert!(
                !failure.contains(password),
                "the password leaked: {failure}"
            );
            assert_eq!(sink.count(), 0);
            assert_eq!(sink.logins(), 0);
        }
        app.cleanup().await;
    }
}
