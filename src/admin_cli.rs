//! `prereg admin`: operator tasks from a terminal.

use clap::Subcommand;
use prereg::{
    mq::Queue,
    store::{self, keys::Role, partners::PartnerFields},
    workers::runtime,
    Config, Ctx,
};

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Create a partner and print its API key (shown once).
    CreatePartner {
        #[arg(long)]
        name: String,
        /// ISO 3166-1 alpha-2, e.g. CN.
        #[arg(long)]
        country: String,
        #[arg(long)]
        contact_email: Option<String>,
        #[arg(long)]
        contact_mobile: Option<String>,
        #[arg(long)]
        referral: bool,
        #[arg(long)]
        prepaid: bool,
    },
    /// Issue an upstream key and print it (shown once).
    UpstreamKey {
        #[arg(long)]
        label: Option<String>,
    },
    /// Dead letters: list or replay.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Show the dead letters of a queue (they stay in place).
    List {
        queue: String,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Send the dead letters of a queue back to it.
    Replay {
        queue: String,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

fn queue(name: &str) -> anyhow::Result<Queue> {
    Queue::parse(name).ok_or_else(|| {
        let all: Vec<&str> = Queue::ALL.iter().map(|q| q.short()).collect();
        anyhow::anyhow!("unknown queue `{name}`; one of: {}", all.join(", "))
    })
}

pub async fn run(cfg: Config, cmd: AdminCommand) -> anyhow::Result<()> {
    let ctx = Ctx::new(cfg)?;
    match cmd {
        AdminCommand::CreatePartner {
            name,
            country,
            contact_email,
            contact_mobile,
            referral,
            prepaid,
        } => {
            let fields = PartnerFields {
                name: Some(name),
                country: Some(country.to_ascii_uppercase()),
                contact_email: Some(contact_email),
                contact_mobile: Some(contact_mobile),
                referral: Some(referral),
                billing_mode: Some(if prepaid { "prepaid" } else { "postpaid" }.into()),
                ..Default::default()
            };
            let mut tx = ctx.db.begin().await?;
            let p = store::partners::create(&mut tx, &fields).await?;
            let (_, key) =
                store::keys::issue(&mut tx, Role::Partner, Some(p.id), Some("cli")).await?;
            store::audit(
                &mut tx,
                "operator:cli",
                "partner.created",
                Some(&p.id.to_string()),
                None,
            )
            .await?;
            tx.commit().await?;
            println!("partner_id {}\napi_key {key}", p.id);
        }
        AdminCommand::UpstreamKey { label } => {
            let mut tx = ctx.db.begin().await?;
            let (id, key) =
                store::keys::issue(&mut tx, Role::Upstream, None, label.as_deref()).await?;
            tx.commit().await?;
            println!("key_id {id}\napi_key {key}");
        }
        AdminCommand::Dlq {
            command: DlqCommand::List { queue: q, limit },
        } => {
            let items = runtime::list_dead_letters(&ctx, queue(&q)?, limit).await?;
            if items.is_empty() {
                println!("no dead letters in {q}");
            }
            for d in items {
                println!("{}", serde_json::to_string(&d)?);
            }
        }
        AdminCommand::Dlq {
            command: DlqCommand::Replay { queue: q, limit },
        } => {
            let n = runtime::replay_dead_letters(&ctx, queue(&q)?, limit).await?;
            println!("replayed {n} message(s) to {q}");
        }
    }
    ctx.broker.close().await;
    Ok(())
}
