//! Messages are JSON in the CloudEvents 1.0 structured format.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::jobs::Job;

pub const SOURCE: &str = "urn:prereg";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub time: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default = "json_content_type")]
    pub datacontenttype: String,
    /// Extension attribute: the request or job id that caused this message,
    /// carried across HTTP → RabbitMQ → worker for log correlation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlationid: Option<String>,
    pub data: Value,
}

fn json_content_type() -> String {
    "application/json".to_string()
}

impl CloudEvent {
    pub fn new(ty: &str, data: Value) -> Self {
        Self::with_id(Uuid::now_v7().to_string(), ty, data)
    }

    /// A deterministic id makes republishing harmless: consumers dedupe on it.
    pub fn with_id(id: String, ty: &str, data: Value) -> Self {
        Self {
            specversion: "1.0".into(),
            id,
            source: SOURCE.into(),
            ty: ty.to_string(),
            time: Utc::now(),
            subject: None,
            datacontenttype: json_content_type(),
            correlationid: None,
            data,
        }
    }

    pub fn subject(mut self, subject: impl ToString) -> Self {
        self.subject = Some(subject.to_string());
        self
    }

    pub fn correlation(mut self, id: Option<String>) -> Self {
        self.correlationid = id;
        self
    }

    /// The message carrying one of our jobs (a deterministic `id` makes
    /// republishing harmless). Failing to encode is an error, never a
    /// `null` payload.
    pub fn job<J: Job>(id: impl Into<String>, job: &J) -> Result<Self, serde_json::Error> {
        Ok(Self::with_id(
            id.into(),
            J::TYPE,
            serde_json::to_value(job)?,
        ))
    }

    /// Reads this message's data as job `J`.
    pub fn decode<J: Job>(&self) -> Result<J, serde_json::Error> {
        crate::jobs::decode(&self.data)
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// Parses and checks the envelope; the error says why it is unusable.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let ev: CloudEvent = serde_json::from_slice(bytes)
            .map_err(|e| format!("not a CloudEvents JSON message: {e}"))?;
        if ev.specversion != "1.0" {
            return Err(format!("unsupported specversion `{}`", ev.specversion));
        }
        if ev.id.trim().is_empty() {
            return Err("empty id".into());
        }
        Ok(ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let ev = CloudEvent::new("preregistration.requested", serde_json::json!({"a": 1}));
        let back = CloudEvent::parse(&ev.to_bytes().unwrap()).unwrap();
        assert_eq!(back, ev);
        assert!(CloudEvent::parse(b"{not json").is_err());
        assert!(CloudEvent::parse(br#"{"specversion":"0.3","id":"x","source":"s","type":"t","time":"2026-01-01T00:00:00Z","data":{}}"#).is_err());
    }
}
