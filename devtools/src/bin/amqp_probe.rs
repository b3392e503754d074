//! `amqp-probe URL [SECONDS]`: exits 0 when the broker at URL does real work
//! within SECONDS (default 20): it opens a channel, declares a quorum queue,
//! publishes one message with a confirm, reads it back and deletes the queue.
//!
//! `.ci/run` uses it to tell a broker that only accepts TCP (a wedged node,
//! a resource alarm, a Raft system still recovering) from a healthy one; a
//! port check or `rabbitmq-diagnostics ping` passes on both.

use std::{process::ExitCode, time::Duration};

use lapin::{
    options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties, Connection, ConnectionProperties,
};

async fn probe(url: &str) -> Result<(), String> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| format!("channel: {e}"))?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("confirm.select: {e}"))?;
    let queue = format!("amqp-probe-{}", std::process::id());
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    // Gone on its own if this probe dies before deleting it.
    args.insert("x-expires".into(), AMQPValue::LongInt(60_000));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(&queue, durable, args)
        .await
        .map_err(|e| format!("declare a quorum queue: {e}"))?;
    let confirm = ch
        .basic_publish(
            "",
            &queue,
            BasicPublishOptions::default(),
            b"probe",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .map_err(|e| format!("publish: {e}"))?
        .await
        .map_err(|e| format!("confirm: {e}"))?;
    if !confirm.is_ack() {
        return Err(format!("publish not acknowledged: {confirm:?}"));
    }
    let got = ch
        .basic_get(&queue, BasicGetOptions { no_ack: true })
        .await
        .map_err(|e| format!("get: {e}"))?;
    if got.is_none() {
        return Err("the confirmed message was not in the queue".into());
    }
    ch.queue_delete(&queue, Default::default())
        .await
        .map_err(|e| format!("delete: {e}"))?;
    let _ = conn.close(200, "probe done").await;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(url) = args.next() else {
        eprintln!("usage: amqp-probe URL [SECONDS]");
        return ExitCode::from(2);
    };
    let secs = args.next().and_then(|s| s.parse().ok()).unwrap_or(20);
    match tokio::time::timeout(Duration::from_secs(secs), probe(&url)).await {
        Ok(Ok(())) => {
            println!("amqp-probe: the broker declared, confirmed, delivered and deleted");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("amqp-probe: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("amqp-probe: no complete answer within {secs} s");
            ExitCode::FAILURE
        }
    }
}
