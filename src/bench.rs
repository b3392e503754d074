//! `prereg bench`: load generator against a running intake (filled in below).

use clap::Args;
use prereg::Config;

#[derive(Args)]
pub struct BenchArgs {}

pub async fn run(_cfg: Config, _args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench is not built yet")
}
