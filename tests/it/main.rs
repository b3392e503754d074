//! Integration tests against the real Postgres, RabbitMQ and Redis.
//! One binary for every test module (faster to link, shared harness).

mod common;
mod concurrency;
mod dashboard;
mod faults_locks;
mod faults_outage;
mod history;
mod invitations;
mod lifecycle;
mod messaging;
mod pipeline;
mod private;
mod time;
