//! Test harness: every test gets a fresh database, its own RabbitMQ prefix and
//! Redis key prefix, and the very same app the binaries build, on a random port.

use std::{sync::Arc, time::Duration};

use lapin::{
    options::{QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
    Channel,
};
use prereg::{
    app::{self, Roles, Running},
    mq::{
        dead_letters::{self, DeadLetter},
        Queue,
    },
    Config, Ctx,
};
use prereg_devtools::smtp_sink::SmtpSink;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

pub const OPERATOR: &str = "test-operator-token-7f3c9a1e5b2d4f608e1a3c5b7d9f0e2a";

pub fn pg_base() -> String {
    std::env::var("PREREG_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}
pub fn amqp_url() -> String {
    std::env::var("PREREG_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}
pub fn redis_url() -> String {
    std::env::var("PREREG_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("TEST_LOG").unwrap_or_else(|_| "warn,lapin=error".into()))
        .with_test_writer()
        .try_init();
}

/// How long a test's queues outlive their last use when nothing deletes
/// them: longer than any one test runs.
pub const TEST_QUEUES_EXPIRE: Duration = Duration::from_secs(15 * 60);

/// Arguments of a queue a test declares itself: gone once unused for
/// [`TEST_QUEUES_EXPIRE`], whether or not the test gets to delete it.
pub fn expiring_queue() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-expires".into(),
        lapin::types::AMQPValue::LongInt(TEST_QUEUES_EXPIRE.as_millis() as i32),
    );
    args
}

/// A test configuration on a fresh database and a unique broker prefix.
pub async fn test_config() -> (Config, String) {
    init_logs();
    let id = Uuid::new_v4().simple().to_string();
    let db_name = format!("prereg_test_{}", &id[..16]);
    let mut admin = PgConnection::connect(&format!("{}/postgres", pg_base()))
        .await
        .expect("postgres reachable");
    sqlx::query(&format!("CREATE DATABASE {db_name}"))
        .execute(&mut admin)
        .await
        .expect("create database");
    let cfg = Config {
        database_url: format!("{}/{db_name}", pg_base()),
        amqp_url: amqp_url(),
        redis_url: redis_url(),
        amqp_prefix: format!("test-{}", &id[..12]),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        operator_token: Some(OPERATOR.into()),
        link_secret: "test-link-secret-5e8d2c4a9b1f3e7d6c0a8b2e4f6d1c3a".into(),
        // A test killed before its teardown (and before `TestApp`'s drop
        // guard runs) leaves nothing on the shared broker for long.
        amqp_queue_expires: Some(TEST_QUEUES_EXPIRE),
        retry_delays: vec![
            Duration::from_millis(100),
            Duration::from_millis(200),
            Duration::from_millis(400),
        ],
        max_attempts: 4,
        outbox_interval: Duration::from_millis(50),
        worker_concurrency: 8,
        db_max_connections: 12,
        shutdown_grace: Duration::from_secs(10),
        ..Config::default()
    };
    (cfg, db_name)
}

pub struct TestApp {
    pub addr: String,
    pub http: reqwest::Client,
    pub ctx: Arc<Ctx>,
    pub cfg: Config,
    pub db_name: String,
    running: Vec<Running>,
    /// Set by `cleanup`; a test that panics before it is cleaned up by
    /// `Drop` instead, so a failing run leaves no queues on the shared
    /// broker and no database behind.
    cleaned: bool,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        // Dropping the runs' task sets aborts their consumers, so none
        // declares the topology again once it is deleted.
        self.running.clear();
        let names = self.ctx.broker.names.clone();
        let url = self.cfg.amqp_url.clone();
        let db_name = self.db_name.clone();
        // The test's runtime may be single-threaded or unwinding: clean up
        // on a thread of our own, over fresh connections.
        let cleaner = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    delete_broker_objects(&url, &names),
                )
                .await;
                drop_database(&db_name).await;
            });
        });
        let _ = cleaner.join();
    }
}

/// Deletes a prefix's queues and exchanges over a connection of its own to
/// the first broker of `url` (a comma-separated list for a cluster).
async fn delete_broker_objects(url: &str, names: &prereg::mq::Names) {
    let first = url.split(',').next().unwrap_or(url).trim();
    let Ok(conn) = lapin::Connection::connect(first, lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    if let Ok(ch) = conn.create_channel().await {
        for q in names.all_queue_names() {
            let _ = ch.queue_delete(&q, Default::default()).await;
        }
        for x in names.all_exchange_names() {
            let _ = ch.exchange_delete(&x, Default::default()).await;
        }
    }
    let _ = conn.close(200, "test cleanup").await;
}

pub async fn spawn_app() -> TestApp {
    spawn_with(|_| {}).await
}

/// The `change` of every entry of a timeline answer, in order.
pub fn timeline_changes(t: &Value) -> Vec<&str> {
    t["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["change"].as_str().unwrap())
        .collect()
}

/// [`spawn_app`] with one partner created through the operator API.
pub async fn spawn_with_partner() -> (TestApp, Partner) {
    let app = spawn_app().await;
    let p = app.create_partner(json!({})).await;
    (app, p)
}

/// Intake, every worker and the outbox relay, after `tweak` adjusts the config.
pub async fn spawn_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    spawn_roles(tweak, Queue::ALL.to_vec()).await
}

/// Intake and relay, consuming only `queues`.
pub async fn spawn_roles(tweak: impl FnOnce(&mut Config), queues: Vec<Queue>) -> TestApp {
    let roles = Roles {
        intake: true,
        workers: queues,
        relay: true,
        health_server: false,
        scheduler: false,
    };
    spawn_node(tweak, roles).await
}

/// One process-equivalent with `roles` (which must include the intake).
pub async fn spawn_node(tweak: impl FnOnce(&mut Config), roles: Roles) -> TestApp {
    let (mut cfg, db_name) = test_config().await;
    tweak(&mut cfg);
    let ctx = Ctx::new(cfg.clone()).expect("ctx");
    prereg::store::migrate(&ctx.db).await.expect("migrate");
    let running = app::start(ctx.clone(), roles).await.expect("start");
    let addr = format!("http://{}", running.http_addr.expect("http addr"));
    TestApp {
        addr,
        http: reqwest::Client::new(),
        ctx,
        cfg,
        db_name,
        running: vec![running],
        cleaned: false,
    }
}

pub struct Partner {
    pub id: Uuid,
    pub key: String,
}

impl TestApp {
    pub fn db(&self) -> &PgPool {
        &self.ctx.db
    }

    /// Starts another process-equivalent (own connections) with `roles` on
    /// the same database and broker prefix, after `tweak` adjusts the config.
    pub async fn node(&self, roles: Roles, tweak: impl FnOnce(&mut Config)) -> Running {
        let mut cfg = self.cfg.clone();
        tweak(&mut cfg);
        let ctx = Ctx::new(cfg).expect("ctx");
        app::start(ctx, roles).await.expect("start node")
    }

    /// Another process-equivalent with the scheduler alone.
    pub async fn scheduler_node(&self) -> Running {
        let roles = Roles {
            scheduler: true,
            ..Default::default()
        };
        self.node(roles, |_| {}).await
    }

    /// Starts another, independent worker process-equivalent (own connections)
    /// on the same database and broker prefix.
    pub async fn add_worker(&mut self, tweak: impl FnOnce(&mut Config)) {
        let roles = Roles {
            workers: vec![Queue::Registration, Queue::Accounts],
            relay: true,
            ..Default::default()
        };
        let node = self.node(roles, tweak).await;
        self.running.push(node);
    }

    /// Starts another worker process-equivalent (own connections, no relay)
    /// consuming exactly `queues`, on the same database and broker prefix.
    pub async fn add_worker_on(&mut self, queues: Vec<Queue>, tweak: impl FnOnce(&mut Config)) {
        let roles = Roles {
            workers: queues,
            ..Default::default()
        };
        let node = self.node(roles, tweak).await;
        self.running.push(node);
    }

    /// The real `prereg` binary with `args`, configured by environment for
    /// this app's database, broker prefix, Redis, SMTP server and retry
    /// delays (the delay queues' TTLs must match what this app declared).
    pub fn binary(&self, args: &[&str]) -> std::process::Command {
        let delays: Vec<String> = self
            .cfg
            .retry_delays
            .iter()
            .map(|d| format!("{}ms", d.as_millis()))
            .collect();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_prereg"));
        cmd.args(args)
            .env("PREREG_DATABASE_URL", &self.cfg.database_url)
            .env("PREREG_AMQP_URL", &self.cfg.amqp_url)
            .env("PREREG_REDIS_URL", &self.cfg.redis_url)
            .env("PREREG_AMQP_PREFIX", &self.cfg.amqp_prefix)
            .env("PREREG_SMTP_URL", &self.cfg.smtp_url)
            .env("PREREG_LINK_SECRET", &self.cfg.link_secret)
            .env(
                "PREREG_OPERATOR_TOKEN",
                self.cfg.operator_token.as_deref().unwrap_or_default(),
            )
            .env("PREREG_RETRY_DELAYS", delays.join(","))
            .env("PREREG_MAX_ATTEMPTS", self.cfg.max_attempts.to_string())
            .env("PREREG_METRICS_ADDR", "127.0.0.1:0")
            .env("PREREG_DEV_MODE", "1")
            .env("RUST_LOG", "error")
            .stdin(std::process::Stdio::null());
        // The queues are declared the same way by every process of a
        // prefix; a different x-expires would be refused by the broker.
        if let Some(e) = self.cfg.amqp_queue_expires {
            cmd.env("PREREG_AMQP_QUEUE_EXPIRES", format!("{}ms", e.as_millis()));
        }
        cmd
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.addr));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    /// The process's Prometheus exposition text (`GET /metrics`).
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.addr))
            .send()
            .await
            .expect("metrics reachable")
            .text()
            .await
            .expect("metrics text")
    }

    pub async fn get(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.request(Method::GET, path, Some(key), None).await
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        self.request(Method::POST, path, Some(key), Some(body))
            .await
    }

    pub async fn create_partner(&self, extra: Value) -> Partner {
        let mut body = json!({
            "name": "Partner Co",
            "country": "CN",
            "contact_email": "ops@partner.example",
            "customer_development": true,
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let (status, v) = self.post("/v1/admin/partners", OPERATOR, body).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        Partner {
            id: v["partner"]["id"].as_str().unwrap().parse().unwrap(),
            key: v["api_key"].as_str().unwrap().to_string(),
        }
    }

    pub async fn upstream_key(&self) -> String {
        let (status, v) = self
            .post(
                "/v1/admin/upstream-keys",
                OPERATOR,
                json!({"label": "tests"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        v["api_key"].as_str().unwrap().to_string()
    }

    /// A customer whose account was registered 40 days ago (`account_id`),
    /// pre-registered by `p`, rejected as `registered_over_7_days`, and its
    /// manual review requested (asserting the 202). Returns the
    /// pre-registration's id.
    pub async fn review_requested(
        &self,
        upstream: &str,
        p: &Partner,
        account_id: &str,
        email: &str,
        mobile: &str,
    ) -> Uuid {
        let registered = (chrono::Utc::now() - chrono::Duration::days(40)).to_rfc3339();
        self.account(
            upstream,
            account_id,
            json!({"email": email, "mobile": mobile, "registered_at": registered, "site": "intl", "country": "CN"}),
        )
        .await;
        let id = self.prereg(p, email, mobile).await;
        let reason = self.decided(p, id).await["reason"]["code"].clone();
        assert_eq!(reason, "registered_over_7_days");
        let body = json!({"justification": "Migration planned"});
        let (s, v) = self.ask_review(p, id, body).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        id
    }

    /// The operator changes partner `p` (asserting the 200).
    pub async fn patch_partner(&self, p: &Partner, body: Value) {
        let path = format!("/v1/admin/partners/{}", p.id);
        let (s, v) = self
            .request(Method::PATCH, &path, Some(OPERATOR), Some(body))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }

    /// The operator decides review `review` (`body` names the decision).
    pub async fn decide_review(
        &self,
        review: impl std::fmt::Display,
        body: Value,
    ) -> (StatusCode, Value) {
        let path = format!("/v1/admin/reviews/{review}/decision");
        self.post(&path, OPERATOR, body).await
    }

    /// Partner `p` asks for a manual review of pre-registration `id`.
    pub async fn ask_review(&self, p: &Partner, id: Uuid, body: Value) -> (StatusCode, Value) {
        let path = format!("/v1/preregistrations/{id}/review");
        self.post(&path, &p.key, body).await
    }

    /// Invites the customer of claim `id` by email (asserting the 202) and
    /// returns the invitation's id.
    pub async fn invite(&self, p: &Partner, id: Uuid) -> String {
        let body = json!({"preregistration_ids": [id]});
        let (s, v) = self.post("/v1/invitations", &p.key, body).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        v["results"][0]["invitation_id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Submits a pre-registration, waits until it is granted (asserting
    /// `preregistered`) and returns its id.
    pub async fn claimed(&self, p: &Partner, email: &str, mobile: &str) -> Uuid {
        let id = self.prereg(p, email, mobile).await;
        self.all_granted(p, &[id]).await;
        id
    }

    /// `POST /v1/preregistrations` of `body` as partner `p`.
    pub async fn submit(&self, p: &Partner, body: Value) -> (StatusCode, Value) {
        self.post("/v1/preregistrations", &p.key, body).await
    }

    /// Asserts that every one of `ids` was granted.
    pub async fn all_granted(&self, p: &Partner, ids: &[Uuid]) {
        for id in ids {
            assert_eq!(
                self.decided(p, *id).await["status"],
                "preregistered",
                "{id}"
            );
        }
    }

    /// Submits a pre-registration and returns its id (asserting the 202).
    pub async fn prereg(&self, p: &Partner, email: &str, mobile: &str) -> Uuid {
        let (status, v) = self
            .submit(
                p,
                json!({"full_name": "Zhang San", "email": email, "mobile": mobile}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        assert_eq!(v["status"], "queued");
        v["id"].as_str().unwrap().parse().unwrap()
    }

    /// `POST path` with `{"preregistration_ids": ids}` (`/v1/invitations`
    /// or `/v1/invitations/resend`), asserting the 202; returns the answer
    /// with its per-id `results`.
    pub async fn invite_ids(&self, path: &str, p: &Partner, ids: &[Uuid]) -> Value {
        let (status, v) = self
            .post(path, &p.key, json!({"preregistration_ids": ids}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        v
    }

    /// Polls until the pre-registration leaves `queued`.
    pub async fn decided(&self, p: &Partner, id: Uuid) -> Value {
        let path = format!("/v1/preregistrations/{id}");
        eventually(Duration::from_secs(20), || async {
            let (status, v) = self.get(&path, &p.key).await;
            assert_eq!(status, StatusCode::OK, "{v}");
            if v["status"] != "queued" {
                Ok(v)
            } else {
                Err(format!("pre-registration {id} never decided"))
            }
        })
        .await
    }

    /// Posts an association attempt (asserting the 202); returns the answer.
    pub async fn attempt(&self, upstream: &str, body: Value) -> Value {
        let (s, v) = self.post("/v1/associations", upstream, body).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        v
    }

    /// `PUT /v1/accounts/{account_id}` of `facts` as `upstream`.
    pub async fn put_account(
        &self,
        upstream: &str,
        account_id: &str,
        facts: Value,
    ) -> (StatusCode, Value) {
        let path = format!("/v1/accounts/{account_id}");
        self.request(Method::PUT, &path, Some(upstream), Some(facts))
            .await
    }

    /// Sets the claim expiry of pre-registration `id` to the SQL `expiry`.
    pub async fn set_expiry(&self, id: Uuid, expiry: &str) {
        sqlx::query(&format!(
            "UPDATE preregistrations SET expires_at = {expiry} WHERE id = $1"
        ))
        .bind(id)
        .execute(self.db())
        .await
        .unwrap();
    }

    /// Posts an association attempt and waits at most `limit` for its outcome.
    pub async fn associate_within(&self, upstream: &str, body: Value, limit: Duration) -> Value {
        let v = self.attempt(upstream, body).await;
        let path = format!("/v1/associations/{}", v["id"].as_str().unwrap());
        eventually(limit, || async {
            let (_, v) = self.get(&path, upstream).await;
            if v["status"] != "queued" {
                Ok(v)
            } else {
                Err(format!("association not decided: {v}"))
            }
        })
        .await
    }

    /// Stores account facts through the upstream API and waits until stored.
    pub async fn account(&self, upstream: &str, account_id: &str, facts: Value) {
        let (status, v) = self.put_account(upstream, account_id, facts.clone()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        wait_until(Duration::from_secs(10), || async {
            let (s, v) = self
                .get(&format!("/v1/accounts/{account_id}"), upstream)
                .await;
            s == StatusCode::OK
                && facts
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, val)| k.ends_with("_at") || v[k] == *val)
        })
        .await;
    }

    /// Stops everything and drops the test's database and broker objects.
    pub async fn cleanup(mut self) {
        for r in self.running.drain(..) {
            r.shutdown().await;
        }
        assert_quota_usage_exact(self.db()).await;
        release(&self.ctx, &self.db_name).await;
        self.cleaned = true;
    }

    /// Waits until invitation `inv` is `failed`, asserts that its failure
    /// names `reason`, and returns it.
    pub async fn invitation_failed_with(&self, p: &Partner, inv: &str, reason: &str) -> Value {
        let failed = self.invitation_state(p, inv, "failed").await;
        let failure = failed["failure"].as_str().unwrap_or_default();
        assert!(failure.contains(reason), "{failed}");
        failed
    }

    /// Polls until invitation `inv` (as partner `p` sees it) has status
    /// `want`, for at most 20 s; returns it.
    pub async fn invitation_state(&self, p: &Partner, inv: &str, want: &str) -> Value {
        let path = format!("/v1/invitations/{inv}");
        eventually(Duration::from_secs(20), || async {
            let v = self.get(&path, &p.key).await.1;
            if v["status"] == want {
                Ok(v)
            } else {
                Err(format!("invitation {inv} never became {want}: {v}"))
            }
        })
        .await
    }

    /// Polls until pre-registration `id` has status `want`.
    pub async fn wait_status(&self, p: &Partner, id: Uuid, want: &str, limit: Duration) {
        let path = format!("/v1/preregistrations/{id}");
        wait_until(limit, || async {
            self.get(&path, &p.key).await.1["status"] == want
        })
        .await;
    }

    /// Creates the offline link of claim `id` (asserting the 201).
    pub async fn offline_link(&self, p: &Partner, id: Uuid) -> Value {
        let path = format!("/v1/preregistrations/{id}/offline-link");
        let (s, v) = self.post(&path, &p.key, json!({})).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v
    }

    /// `DELETE /v1/preregistrations/{id}` as `key`.
    pub async fn delete_prereg(&self, id: Uuid, key: &str) -> (StatusCode, Value) {
        let path = format!("/v1/preregistrations/{id}");
        self.request(Method::DELETE, &path, Some(key), None).await
    }

    /// Submits one pre-registration per `i` in `range`, the email and
    /// mobile made by `contact(i)`; returns their ids in order.
    pub async fn preregs(
        &self,
        p: &Partner,
        range: std::ops::Range<u32>,
        contact: impl Fn(u32) -> (String, String),
    ) -> Vec<Uuid> {
        let mut ids = Vec::new();
        for i in range {
            let (email, mobile) = contact(i);
            ids.push(self.prereg(p, &email, &mobile).await);
        }
        ids
    }

    /// Customers `i` of `range` of the series `tag` ([`customer`]), each
    /// submitted by `p` and waited for until decided; their ids in order.
    pub async fn decided_preregs(
        &self,
        p: &Partner,
        range: std::ops::Range<u32>,
        tag: &str,
        mobile_base: u64,
    ) -> Vec<Uuid> {
        let ids = self
            .preregs(p, range, |i| customer(tag, i, mobile_base))
            .await;
        for id in &ids {
            self.decided(p, *id).await;
        }
        ids
    }

    /// The link token of invitation `inv`, as the customer's email carries it.
    pub async fn link_token(&self, inv: Uuid) -> String {
        let nonce: Vec<u8> = sqlx::query_scalar("SELECT nonce FROM invitations WHERE id = $1")
            .bind(inv)
            .fetch_one(self.db())
            .await
            .unwrap();
        prereg::links::token(self.cfg.link_secret.as_bytes(), inv, &nonce)
    }

    /// Whether pre-registration `id` is stored.
    pub async fn stored(&self, id: Uuid) -> bool {
        prereg::store::preregs::get(self.db(), id)
            .await
            .unwrap()
            .is_some()
    }

    /// A `count(*)` query's answer.
    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(self.db()).await.unwrap()
    }

    /// A `count(*)` query's answer, with `id` bound to `$1`.
    pub async fn count_for(&self, sql: &str, id: Uuid) -> i64 {
        sqlx::query_scalar(sql)
            .bind(id)
            .fetch_one(self.db())
            .await
            .unwrap()
    }

    /// How many audit entries `action` has.
    pub async fn audits(&self, action: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = $1")
            .bind(action)
            .fetch_one(self.db())
            .await
            .unwrap()
    }

    /// How many `decided` timeline entries pre-registration `id` has.
    pub async fn decided_entries(&self, id: Uuid) -> i64 {
        self.count_for(
            "SELECT count(*) FROM preregistration_events WHERE preregistration_id = $1 AND change = 'decided'",
            id,
        )
        .await
    }

    /// Waits until the relay has published every outbox row.
    pub async fn outbox_drained(&self) {
        wait_until(Duration::from_secs(10), || async {
            self.count("SELECT count(*) FROM outbox").await == 0
        })
        .await;
    }

    /// Waits until `q` holds at least `n` dead letters; returns them.
    pub async fn dead_letters(&self, q: Queue, n: usize) -> Vec<DeadLetter> {
        eventually(Duration::from_secs(15), || async {
            let all = dead_letters::list(&self.ctx.broker, q, 100).await.unwrap();
            if all.len() >= n {
                Ok(all)
            } else {
                Err(format!(
                    "{n} dead letters expected in {q:?}, {} seen",
                    all.len()
                ))
            }
        })
        .await
    }
}

/// Asserts an error answer: its status and its `error.code`.
pub fn assert_error(status: StatusCode, body: &Value, want: StatusCode, code: &str) {
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (want, Some(code)),
        "{body}"
    );
}

/// Customer `i` of a series: email `{tag}{i}@customer.example`, mobile
/// `+86` and `mobile_base + i`.
pub fn customer(tag: &str, i: u32, mobile_base: u64) -> (String, String) {
    let mobile = mobile_base + u64::from(i);
    (format!("{tag}{i}@customer.example"), format!("+86{mobile}"))
}

/// Header `name` of `resp` (which must have it, as text).
pub fn header<'r>(resp: &'r reqwest::Response, name: &str) -> &'r str {
    resp.headers()[name].to_str().unwrap()
}

/// Header `name` of `resp` as text, empty when absent.
pub fn header_or_empty(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// A test's own queue bound to `binding` on the events exchange (named
/// after `name`, deleted with its channel).
pub async fn capture_events(ctx: &Ctx, name: &str, binding: &str) -> (Channel, String) {
    let (_, ch) = ctx.broker.channel().await.expect("channel");
    let names = &ctx.broker.names;
    let queue = format!("{}.capture-{name}", names.prefix);
    ch.queue_declare(
        &queue,
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        // auto_delete alone never fires for a queue read with basic.get.
        expiring_queue(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        &queue,
        &names.events(),
        binding,
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    (ch, queue)
}

/// Every partner's quota counter, kept by triggers, equals a count of its
/// rows under review or holding a claim. Checked at the end of every test
/// that cleans up, so each flow the suite runs keeps the counters exact.
pub async fn assert_quota_usage_exact(db: &PgPool) {
    let counted: Vec<String> = prereg::domain::status::Status::ALL
        .into_iter()
        .filter(|s| s.counts_toward_quota())
        .map(|s| s.as_str().to_string())
        .collect();
    let wrong: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "SELECT p.id, coalesce(u.active, -1),
                (SELECT count(*) FROM preregistrations r
                  WHERE r.partner_id = p.id AND r.status = ANY($1))
           FROM partners p LEFT JOIN partner_quota_usage u ON u.partner_id = p.id
          WHERE coalesce(u.active, -1) <> (SELECT count(*) FROM preregistrations r
                  WHERE r.partner_id = p.id AND r.status = ANY($1))",
    )
    .bind(&counted)
    .fetch_all(db)
    .await
    .expect("quota usage check");
    assert!(
        wrong.is_empty(),
        "quota counters (partner, counter, rows): {wrong:?}"
    );
}

/// Deletes a test's broker objects, closes its connections and drops its
/// database.
pub async fn release(ctx: &Ctx, db_name: &str) {
    let _ = ctx.broker.delete_topology().await;
    ctx.broker.close().await;
    ctx.db.close().await;
    drop_database(db_name).await;
}

/// Drops a test database, whoever is still connected to it. A pool that
/// is still reconnecting can slip a new session in between `FORCE`'s
/// termination and the drop ("being accessed by other users"): tried a few
/// times, and said on stderr if it never went (a green run once left one).
pub async fn drop_database(db_name: &str) {
    let mut last = String::new();
    for _ in 0..10 {
        match PgConnection::connect(&format!("{}/postgres", pg_base())).await {
            Ok(mut admin) => {
                match sqlx::query(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                {
                    Ok(_) => return,
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("test database {db_name} not dropped: {last}");
}

/// An app whose mail goes to `sink`, links on `https://partners.example`,
/// after `tweak` adjusts the config.
pub async fn mail_app(sink: &SmtpSink, tweak: impl FnOnce(&mut Config)) -> TestApp {
    sink_app(sink, |c| {
        c.public_url = "https://partners.example".into();
        tweak(c);
    })
    .await
}

/// A new SMTP sink and a [`mail_app`] sending to it.
pub async fn with_mail(tweak: impl FnOnce(&mut Config)) -> (SmtpSink, TestApp) {
    let sink = SmtpSink::start().await.unwrap();
    let app = mail_app(&sink, tweak).await;
    (sink, app)
}

/// A new SMTP sink and a [`sink_app`] sending to it.
pub async fn with_sink(tweak: impl FnOnce(&mut Config)) -> (SmtpSink, TestApp) {
    let sink = SmtpSink::start().await.unwrap();
    let app = sink_app(&sink, tweak).await;
    (sink, app)
}

/// An app whose mail goes to `sink`, after `tweak` adjusts the config.
pub async fn sink_app(sink: &SmtpSink, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let url = sink.url();
    spawn_with(move |c| {
        c.smtp_url = url;
        tweak(c);
    })
    .await
}

/// Asserts that `sink` has exactly one email, a second not arriving
/// within `within`.
pub async fn assert_one_mail(sink: &SmtpSink, within: Duration, what: &str) {
    assert_eq!(sink.wait_for(2, within).await.len(), 1, "{what}");
}

/// The Redis lock keys under `prefix`.
pub async fn lock_keys(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(format!("{prefix}:lock:*"))
        .query_async(conn)
        .await
        .expect("redis KEYS")
}

/// Waits until exactly `n` lock keys are held under `prefix`.
pub async fn wait_lock_count(rc: &redis::aio::MultiplexedConnection, prefix: &str, n: usize) {
    wait_until(Duration::from_secs(20), || {
        let mut rc = rc.clone();
        async move { lock_keys(&mut rc, prefix).await.len() == n }
    })
    .await;
}

/// Holds partner `p`'s row locked until the returned transaction ends.
pub async fn lock_partner_row(
    app: &TestApp,
    p: &Partner,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut blocker = app.db().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM partners WHERE id = $1 FOR NO KEY UPDATE")
        .bind(p.id)
        .execute(&mut *blocker)
        .await
        .unwrap();
    blocker
}

/// Polls `f` every 25 ms until it answers `Ok`, failing with its last
/// `Err` after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(why) => assert!(
                tokio::time::Instant::now() < deadline,
                "{why} (waited {limit:?})"
            ),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn wait_until<F, Fut>(limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
