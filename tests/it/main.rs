//! Integration tests against the real Postgres, RabbitMQ and Redis.
//! One binary for every test module (faster to link, shared harness).

mod batch_worker;
mod batching;
mod common;
mod concurrency;
mod dashboard;
mod dashboard_ops;
mod dead_letters;
mod email_batch;
mod faults_broker;
mod faults_cluster;
mod faults_locks;
mod faults_outage;
mod faults_slow;
mod first_hour;
mod guessing;
mod history;
mod invitations;
mod isolation;
mod lifecycle;
mod messaging;
mod pipeline;
mod private;
mod promises;
mod relay;
mod retries;
mod secrets;
mod security;
mod smtp_tls;
mod time;
mod trust;
mod wire;
