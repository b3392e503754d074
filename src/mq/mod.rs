//! RabbitMQ: names and topology, CloudEvents envelope, a confirming
//! publisher, and dead-letter operations with queue statistics.

pub mod broker;
pub mod dead_letters;
pub mod envelope;
pub mod topology;

pub use broker::{Broker, PublishError};
pub use envelope::CloudEvent;
pub use topology::{Names, Queue};
