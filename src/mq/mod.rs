//! RabbitMQ: names and topology, CloudEvents envelope, a confirming publisher.

pub mod broker;
pub mod envelope;
pub mod topology;

pub use broker::{Broker, PublishError};
pub use envelope::CloudEvent;
pub use topology::{Names, Queue};
