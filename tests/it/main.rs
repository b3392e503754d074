//! Integration tests against the real Postgres, RabbitMQ and Redis.
//! One binary for every test module (faster to link, shared harness).

mod common;
mod concurrency;
mod dashboard;
mod guessing;
mod history;
mod invitations;
mod isolation;
mod lifecycle;
mod messaging;
mod pipeline;
mod promises;
mod retries;
mod secrets;
mod security;
mod time;
mod wire;
