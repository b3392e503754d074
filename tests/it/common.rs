//! Test harness: every test gets a fresh database, its own RabbitMQ prefix and
//! Redis key prefix, and the very same app the binaries build, on a random port.

use std::{sync::Arc, time::Duration};

use prereg::{
    app::{self, Roles, Running},
    mq::Queue,
    Config, Ctx,
};
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
}

pub async fn spawn_app() -> TestApp {
    spawn_with(|_| {}).await
}

/// Intake, every worker and the outbox relay, after `tweak` adjusts the config.
pub async fn spawn_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    spawn_roles(tweak, Queue::ALL.to_vec()).await
}

/// Intake and relay, consuming only `queues`.
pub async fn spawn_roles(tweak: impl FnOnce(&mut Config), queues: Vec<Queue>) -> TestApp {
    let (mut cfg, db_name) = test_config().await;
    tweak(&mut cfg);
    let ctx = Ctx::new(cfg.clone()).expect("ctx");
    prereg::store::migrate(&ctx.db).await.expect("migrate");
    let roles = Roles {
        intake: true,
        workers: queues,
        relay: true,
        health_server: false,
        scheduler: false,
    };
    let running = app::start(ctx.clone(), roles).await.expect("start");
    let addr = format!("http://{}", running.http_addr.expect("http addr"));
    TestApp {
        addr,
        http: reqwest::Client::new(),
        ctx,
        cfg,
        db_name,
        running: vec![running],
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

    /// Starts another, independent worker process-equivalent (own connections)
    /// on the same database and broker prefix.
    pub async fn add_worker(&mut self, tweak: impl FnOnce(&mut Config)) {
        let mut cfg = self.cfg.clone();
        tweak(&mut cfg);
        let ctx = Ctx::new(cfg).expect("ctx");
        let roles = Roles {
            workers: vec![Queue::Registration, Queue::Accounts],
            relay: true,
            ..Default::default()
        };
        self.running
            .push(app::start(ctx, roles).await.expect("start worker"));
    }

    /// Starts another worker process-equivalent (own connections, no relay)
    /// consuming exactly `queues`, on the same database and broker prefix.
    pub async fn add_worker_on(&mut self, queues: Vec<Queue>, tweak: impl FnOnce(&mut Config)) {
        let mut cfg = self.cfg.clone();
        tweak(&mut cfg);
        let ctx = Ctx::new(cfg).expect("ctx");
        let roles = Roles {
            workers: queues,
            ..Default::default()
        };
        self.running
            .push(app::start(ctx, roles).await.expect("start worker"));
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
        let path = format!("/v1/preregistrations/{id}/review");
        let body = json!({"justification": "Migration planned"});
        let (s, v) = self.post(&path, &p.key, body).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        id
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
        assert_eq!(self.decided(p, id).await["status"], "preregistered");
        id
    }

    /// Submits a pre-registration and returns its id (asserting the 202).
    pub async fn prereg(&self, p: &Partner, email: &str, mobile: &str) -> Uuid {
        let (status, v) = self
            .post(
                "/v1/preregistrations",
                &p.key,
                json!({"full_name": "Zhang San", "email": email, "mobile": mobile}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        assert_eq!(v["status"], "queued");
        v["id"].as_str().unwrap().parse().unwrap()
    }

    /// Polls until the pre-registration leaves `queued`.
    pub async fn decided(&self, p: &Partner, id: Uuid) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, v) = self
                .get(&format!("/v1/preregistrations/{id}"), &p.key)
                .await;
            assert_eq!(status, StatusCode::OK, "{v}");
            if v["status"] != "queued" {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pre-registration {id} never decided"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Stores account facts through the upstream API and waits until stored.
    pub async fn account(&self, upstream: &str, account_id: &str, facts: Value) {
        let (status, v) = self
            .request(
                Method::PUT,
                &format!("/v1/accounts/{account_id}"),
                Some(upstream),
                Some(facts.clone()),
            )
            .await;
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
        let _ = self.ctx.broker.delete_topology().await;
        self.ctx.broker.close().await;
        self.ctx.db.close().await;
        if let Ok(mut admin) = PgConnection::connect(&format!("{}/postgres", pg_base())).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.db_name
            ))
            .execute(&mut admin)
            .await;
        }
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
