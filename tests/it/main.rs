//! Integration tests against the real Postgres, RabbitMQ and Redis.
//! One binary for every test module (faster to link, shared harness).

mod common;
mod concurrency;
mod dashboard;
mod dashboard_ops;
mod faults_broker;
mod faults_cluster;
mod faults_locks;
mod faults_outage;
mod faults_slow;
mod first_hour;
mod history;
mod invitations;
mod isolation;
mod lifecycle;
mod messaging;
mod pipeline;
mod private;
mod promises;
mod retries;
mod security;
mod time;
mod trust;
mod wire;
