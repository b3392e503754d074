//! prereg: the back end of a partner programme's customer development.
//!
//! The library every process shares: domain rules, Postgres store, RabbitMQ
//! topology and publisher, the typed job contracts (`jobs`), Redis locks, configuration, telemetry, the intake's
//! HTTP API and (from `workers/`) one module per job kind.

pub mod admission;
pub mod api;
pub mod app;
pub mod asyncapi;
pub mod config;
pub mod context;
pub mod deps;
pub mod dev;
pub mod domain;
pub mod events;
pub mod flows;
pub mod intake;
pub mod jobs;
pub mod jobstats;
pub mod links;
pub mod locks;
pub mod mail;
pub mod mq;
pub mod publisher;
pub mod scheduler;
pub mod stages;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod timekeeping;

#[path = "../workers/mod.rs"]
pub mod workers;

pub use config::Config;
pub use context::Ctx;
