//! `prereg admin`: operator tasks from a terminal.

use clap::Subcommand;
use prereg::{
    domain::workdays::{self, Calendar},
    mq::{dead_letters, Queue},
    store::{self, keys::Role, partners::PartnerFields},
    Config, Ctx,
};

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Create a partner and print its API key (shown once).
    CreatePartner {
        /// The partner's name, as shown to its customers in invitations.
        #[arg(long)]
        name: String,
        /// ISO 3166-1 alpha-2, e.g. CN.
        #[arg(long)]
        country: String,
        /// Contact email for notices (a contact email or mobile is needed
        /// before the partner may pre-register customers).
        #[arg(long)]
        contact_email: Option<String>,
        /// Contact mobile in E.164, e.g. +8613800000000.
        #[arg(long)]
        contact_mobile: Option<String>,
        /// Allow referral invitations (reseller only otherwise).
        #[arg(long)]
        referral: bool,
        /// Prepaid billing (postpaid otherwise); prepaid partners cannot
        /// associate customers in the reseller model.
        #[arg(long)]
        prepaid: bool,
    },
    /// Issue an upstream key and print it (shown once).
    UpstreamKey {
        /// Who or what the key is for, e.g. "account system".
        #[arg(long)]
        label: Option<String>,
    },
    /// Operator keys, stored hashed: issue (printed once), list, revoke.
    OperatorKey {
        #[command(subcommand)]
        command: OperatorKeyCommand,
    },
    /// Dead letters: list or replay.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// The working-day calendar: load a year from a file, or show one.
    Calendar {
        #[command(subcommand)]
        command: CalendarCommand,
    },
    /// Run the expiry sweep and the review deadlines once, here and now.
    Sweep,
}

#[derive(Subcommand)]
pub enum CalendarCommand {
    /// Load (replace) one year from a TSV file: `date<TAB>kind<TAB>name`
    /// lines after a header, `#` comments allowed (the format of
    /// calendar-cn-2026.tsv).
    Load {
        /// The TSV file to load.
        file: std::path::PathBuf,
        /// The year being loaded; needed when the file has no entries,
        /// otherwise taken from them (every date must be in that year).
        #[arg(long)]
        year: Option<i32>,
    },
    /// Print one year as TSV.
    Show {
        /// The year, e.g. 2027.
        year: i32,
    },
}

#[derive(Subcommand)]
pub enum OperatorKeyCommand {
    /// Issue an operator key and print it (shown once; only its hash is kept).
    Issue {
        /// Who or what the key is for, e.g. a person's name.
        #[arg(long)]
        label: Option<String>,
    },
    /// List operator keys (id, label, created, revoked); never the keys.
    List,
    /// Revoke an operator key by its id (it stops working within seconds).
    Revoke {
        /// The key's id, as `list` shows it.
        key_id: uuid::Uuid,
    },
}

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Show the dead letters of a queue (they stay in place).
    List {
        /// registration, accounts, email, association, sweeps, deadlines or export.
        queue: String,
        /// At most this many messages.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Send the dead letters of a queue back to it (or only the one whose
    /// message id is `--id`), with a fresh retry count.
    Replay {
        /// registration, accounts, email, association, sweeps, deadlines or export.
        queue: String,
        /// At most this many messages.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Replay only the dead letter with this message id.
        #[arg(long)]
        id: Option<String>,
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
            commit_audited(tx, "partner.created", p.id).await?;
            println!("partner_id {}\napi_key {key}", p.id);
        }
        AdminCommand::UpstreamKey { label } => {
            let mut tx = ctx.db.begin().await?;
            let (id, key) =
                store::keys::issue(&mut tx, Role::Upstream, None, label.as_deref()).await?;
            tx.commit().await?;
            println!("key_id {id}\napi_key {key}");
        }
        AdminCommand::OperatorKey { command } => operator_key(&ctx, command).await?,
        AdminCommand::Dlq {
            command: DlqCommand::List { queue: q, limit },
        } => {
            let items = dead_letters::list(&ctx.broker, queue(&q)?, limit).await?;
            if items.is_empty() {
                println!("no dead letters in {q}");
            }
            for d in items {
                println!("{}", serde_json::to_string(&d)?);
            }
        }
        AdminCommand::Dlq {
            command:
                DlqCommand::Replay {
                    queue: q,
                    limit,
                    id,
                },
        } => match id {
            Some(id) => {
                if dead_letters::replay_one(&ctx.broker, queue(&q)?, &id).await? {
                    println!("replayed {id} to {q}");
                } else {
                    anyhow::bail!("no dead letter with message id {id} in {q}");
                }
            }
            None => {
                let n = dead_letters::replay(&ctx.broker, queue(&q)?, limit).await?;
                println!("replayed {n} message(s) to {q}");
            }
        },
        AdminCommand::Calendar {
            command: CalendarCommand::Load { file, year },
        } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let entries = workdays::parse_tsv(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let year = match (year, workdays::single_year(&entries)) {
                (Some(y), _) => y,
                (None, Ok(Some(y))) => y,
                (None, Ok(None)) => {
                    anyhow::bail!("the file lists no dates: give the year with --year")
                }
                (None, Err(years)) => anyhow::bail!(
                    "the file spans several years ({years:?}): load one year per file"
                ),
            };
            if !prereg::domain::workdays::YEARS.contains(&year) {
                anyhow::bail!("year {year} is out of range");
            }
            // Same checks as the API: every date in the year, none twice.
            Calendar::new()
                .load_year(year, &entries)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let (_, recomputed) =
                prereg::flows::calendar::load_year(&ctx, "operator:cli", year, &entries).await?;
            println!(
                "loaded {year}: {} holidays, {} make-up workdays; {recomputed} review deadline(s) recomputed",
                entries.iter().filter(|e| e.kind == workdays::DayKind::Holiday).count(),
                entries.iter().filter(|e| e.kind == workdays::DayKind::Workday).count(),
            );
        }
        AdminCommand::Calendar {
            command: CalendarCommand::Show { year },
        } => {
            let (source, entries) = match store::calendar::get_year(&ctx.db, year).await? {
                Some((_, e)) => ("uploaded", e),
                None if year == workdays::CN_2026_YEAR => {
                    ("default", Calendar::cn_2026().entries_for_year(year))
                }
                None => anyhow::bail!("no calendar loaded for {year} (weekends only)"),
            };
            println!("# {year} ({source})\ndate\tkind\tname");
            for e in entries {
                println!("{}\t{}\t{}", e.date, e.kind, e.name);
            }
        }
        AdminCommand::Sweep => {
            let s = prereg::workers::sweeps::run(&ctx).await?;
            let d = prereg::workers::deadlines::run(&ctx).await?;
            println!(
                "sweep {}\ndeadlines {}",
                serde_json::to_string(&s)?,
                serde_json::to_string(&d)?
            );
        }
    }
    ctx.broker.close().await;
    Ok(())
}

async fn operator_key(ctx: &Ctx, command: OperatorKeyCommand) -> anyhow::Result<()> {
    match command {
        OperatorKeyCommand::Issue { label } => {
            let mut tx = ctx.db.begin().await?;
            let (id, key) =
                store::keys::issue(&mut tx, Role::Operator, None, label.as_deref()).await?;
            commit_audited(tx, "operator_key.issued", id).await?;
            println!("key_id {id}\napi_key {key}");
        }
        OperatorKeyCommand::List => {
            let keys = store::keys::list(&ctx.db, Role::Operator).await?;
            if keys.is_empty() {
                println!("no operator keys stored");
            }
            for k in keys {
                println!(
                    "{}\t{}\tcreated {}\t{}",
                    k.id,
                    k.label.as_deref().unwrap_or("-"),
                    k.created_at.to_rfc3339(),
                    k.revoked_at
                        .map(|t| format!("revoked {}", t.to_rfc3339()))
                        .unwrap_or_else(|| "live".into())
                );
            }
        }
        OperatorKeyCommand::Revoke { key_id } => {
            let mut tx = ctx.db.begin().await?;
            if !store::keys::revoke(&mut tx, key_id, Role::Operator).await? {
                anyhow::bail!("no live operator key {key_id}");
            }
            commit_audited(tx, "operator_key.revoked", key_id).await?;
            println!("revoked {key_id}");
        }
    }
    Ok(())
}

/// Records `action` on `target` by the CLI's operator in the audit log and
/// commits the change with it.
async fn commit_audited(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    action: &str,
    target: impl std::fmt::Display,
) -> anyhow::Result<()> {
    let target = target.to_string();
    store::audit(&mut tx, "operator:cli", action, Some(&target), None).await?;
    tx.commit().await?;
    Ok(())
}
