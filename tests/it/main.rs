//! Integration tests against the real Postgres, RabbitMQ and Redis.
//! One binary for every test module (faster to link, shared harness).

mod batching;
mod common;
mod concurrency;
mod dashboard;
mod history;
mod invitations;
mod lifecycle;
mod messaging;
mod pipeline;
mod time;
