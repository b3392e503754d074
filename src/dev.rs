//! `prereg dev`: the whole system in one process on a laptop (SPEC §6
//! Running): the database created and migrated, intake, every worker, the
//! outbox relay and the scheduler; email caught in a directory by lettre's
//! file transport and shown on the dashboard; an operator key and a demo
//! partner's key printed, ready for the README's walkthrough. Never for
//! production: it runs in the explicit development mode (`PREREG_DEV_MODE=1`).

use std::{path::PathBuf, sync::Arc};

use rand::RngCore;

use crate::{
    app::{self, Roles, Running},
    mq::Queue,
    store::{self, keys::Role, partners::PartnerFields},
    Config, Ctx,
};

/// The variable that marks the explicit development mode.
pub const DEV_MODE_VAR: &str = "PREREG_DEV_MODE";

/// The demo partner `prereg dev` creates once and issues a fresh key for.
pub const DEMO_PARTNER: &str = "Demo Partner";

/// What `prereg dev` set up, as printed for the developer.
pub struct DevSession {
    pub running: Running,
    pub http_addr: std::net::SocketAddr,
    pub operator_key: String,
    pub partner_id: uuid::Uuid,
    pub partner_key: String,
    pub upstream_key: String,
    pub mail_dir: Option<PathBuf>,
}

fn random_key(prefix: &str) -> String {
    let mut b = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut b);
    format!("{prefix}{}", hex::encode(b))
}

/// Adjusts the configuration for a laptop: email caught in `mail_dir` unless
/// `PREREG_SMTP_URL` was given, and an operator key when none was given.
pub fn dev_config(mut cfg: Config, smtp_url_given: bool, mail_dir: &std::path::Path) -> Config {
    if !smtp_url_given {
        let dir = std::path::absolute(mail_dir).unwrap_or_else(|_| mail_dir.to_path_buf());
        cfg.smtp_url = format!("file://{}", dir.display());
    }
    if cfg.operator_token.is_none() {
        cfg.operator_token = Some(random_key("dev-op-"));
    }
    cfg
}

/// Creates the database when missing, migrates, starts every role and
/// prepares the demo partner and keys.
pub async fn start(cfg: Config) -> anyhow::Result<DevSession> {
    crate::startup::ensure_database(&cfg.database_url).await?;
    let operator_key = cfg
        .operator_token
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no operator key"))?;
    let ctx = Ctx::new(cfg)?;
    crate::startup::migrate(&ctx).await?;
    let (partner_id, partner_key, upstream_key) = demo_partner(&ctx).await?;
    let roles = Roles {
        intake: true,
        workers: Queue::ALL.to_vec(),
        relay: true,
        health_server: false,
        scheduler: true,
    };
    let mail_dir = ctx.mailer.caught_dir().map(|p| p.to_path_buf());
    let running = app::start(ctx, roles).await?;
    let http_addr = running
        .http_addr
        .ok_or_else(|| anyhow::anyhow!("the intake did not start"))?;
    Ok(DevSession {
        running,
        http_addr,
        operator_key,
        partner_id,
        partner_key,
        upstream_key,
        mail_dir,
    })
}

/// The demo partner (created on the first run) with a fresh key, and a fresh
/// upstream key: keys are shown once, so each run issues new ones.
async fn demo_partner(ctx: &Arc<Ctx>) -> anyhow::Result<(uuid::Uuid, String, String)> {
    let mut tx = ctx.db.begin().await?;
    let existing = store::partners::first_named(&mut *tx, DEMO_PARTNER).await?;
    let id = match existing {
        Some(id) => id,
        None => {
            let fields = PartnerFields {
                name: Some(DEMO_PARTNER.into()),
                country: Some("CN".into()),
                contact_email: Some(Some("partner@demo.example".into())),
                contact_mobile: Some(None),
                billing_mode: Some("postpaid".into()),
                customer_development: Some(true),
                referral: Some(true),
                locale: Some("en".into()),
                account_managers: Some(vec![("Li Lei".into(), "li.lei@demo.example".into())]),
            };
            let p = store::partners::create(&mut tx, &fields).await?;
            store::audit(
                &mut tx,
                "operator:dev",
                "partner.created",
                Some(&p.id.to_string()),
                None,
            )
            .await?;
            p.id
        }
    };
    let (_, partner_key) =
        store::keys::issue(&mut tx, Role::Partner, Some(id), Some("dev")).await?;
    let (_, upstream_key) = store::keys::issue(&mut tx, Role::Upstream, None, Some("dev")).await?;
    tx.commit().await?;
    Ok((id, partner_key, upstream_key))
}

/// Drops the database and deletes the broker objects of this prefix.
pub async fn cleanup(cfg: Config) -> anyhow::Result<()> {
    use sqlx::migrate::MigrateDatabase;
    let url = cfg.database_url.clone();
    let ctx = Ctx::new(cfg)?;
    ctx.broker
        .delete_topology()
        .await
        .map_err(|e| anyhow::anyhow!("deleting the queues failed: {e}"))?;
    ctx.broker.close().await;
    ctx.db.close().await;
    sqlx::Postgres::force_drop_database(&url).await?;
    tracing::info!(database = %crate::startup::pg_where(&url), "database dropped and queues deleted");
    Ok(())
}

impl DevSession {
    /// What the developer needs, for the terminal.
    pub fn banner(&self, public_url: &str) -> String {
        let base = format!("http://{}", self.http_addr);
        let mail = match &self.mail_dir {
            Some(d) => format!("caught in {} (read them at {base}/admin/mail)", d.display()),
            None => "sent through PREREG_SMTP_URL".to_string(),
        };
        format!(
            "\nprereg dev is running (development mode: never use it in production)\n\
             \n  API            {base}  (invitation links use {public_url})\
             \n  API document   {base}/openapi.json\
             \n  messages       {base}/asyncapi.json (AsyncAPI: commands you may publish, events)\
             \n  dashboard      {base}/admin\
             \n  readiness      {base}/readyz\
             \n  metrics        {base}/metrics\
             \n  email          {mail}\
             \n\n  operator key   {}\
             \n  partner        {} ({DEMO_PARTNER})\
             \n  partner key    {}\
             \n  upstream key   {}\
             \n\nTry:\n  curl -s -X POST {base}/v1/preregistrations -H 'Authorization: Bearer {}' \\\n    \
             -H 'Content-Type: application/json' \\\n    \
             -d '{{\"full_name\": \"Zhang San\", \"email\": \"zhang.san@customer.example\", \"mobile\": \"+8613800138000\"}}'\n\
             \nCtrl-C stops everything.\n",
            self.operator_key,
            self.partner_id,
            self.partner_key,
            self.upstream_key,
            self.partner_key,
        )
    }
}
