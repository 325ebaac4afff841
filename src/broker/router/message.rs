//! A message as the router holds it: shared by every queue it sits in (one allocation however
//! many subscribers), with the MQTT 5 properties that travel with it untouched.

use bytes::Bytes;
use std::sync::Arc;

/// The MQTT 5 properties a server forwards as the publisher sent them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Props {
    pub payload_format: Option<u8>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

impl Props {
    /// `None` when nothing is set, so messages without properties carry no allocation.
    pub fn from_parts(
        payload_format: Option<u8>,
        content_type: Option<String>,
        response_topic: Option<String>,
        correlation_data: Option<Bytes>,
        user_properties: Vec<(String, String)>,
    ) -> Option<Box<Props>> {
        let p = Props {
            payload_format,
            content_type,
            response_topic,
            correlation_data,
            user_properties,
        };
        (p != Props::default()).then(|| Box::new(p))
    }

    /// As stored on disk (sessions, retained messages).
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "pf": self.payload_format,
            "ct": self.content_type,
            "rt": self.response_topic,
            "cd": self.correlation_data.as_ref().map(|b| b.to_vec()),
            "up": self.user_properties,
        })
        .to_string()
    }

    pub fn from_json(s: &str) -> Option<Box<Props>> {
        let v: serde_json::Value = serde_json::from_str(s).ok()?;
        let up = v["up"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|kv| Some((kv[0].as_str()?.to_string(), kv[1].as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Props::from_parts(
            v["pf"].as_u64().map(|x| x as u8),
            v["ct"].as_str().map(str::to_string),
            v["rt"].as_str().map(str::to_string),
            v["cd"].as_array().map(|a| {
                Bytes::from(
                    a.iter()
                        .filter_map(|x| x.as_u64().map(|b| b as u8))
                        .collect::<Vec<u8>>(),
                )
            }),
            up,
        )
    }

    /// Bytes these take in a PUBLISH's property section (an upper bound).
    pub fn wire_len(&self) -> usize {
        let s = |o: &Option<String>| o.as_ref().map_or(0, |v| 3 + v.len());
        self.payload_format.map_or(0, |_| 2)
            + s(&self.content_type)
            + s(&self.response_topic)
            + self.correlation_data.as_ref().map_or(0, |v| 3 + v.len())
            + self
                .user_properties
                .iter()
                .map(|(k, v)| 5 + k.len() + v.len())
                .sum::<usize>()
    }
}

/// One published message.
#[derive(Debug)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    /// The QoS it was published with (a delivery gets the lower of this and the subscription's).
    pub qos: u8,
    pub retain: bool,
    pub props: Option<Box<Props>>,
    /// Wall-clock expiry (ms since the epoch) from MQTT 5's message expiry interval.
    pub expires_ms: Option<i64>,
    /// The bridge it came in over, if any (loop prevention).
    pub origin: Option<Arc<str>>,
    /// The session that published it (0: the gateway itself), for No Local.
    pub from: u64,
}

impl Message {
    /// Memory it holds, for queue bounds and the global budget.
    pub fn cost(&self) -> usize {
        self.topic.len() + self.payload.len() + self.props.as_ref().map_or(0, |p| p.wire_len()) + 96
    }

    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_ms.is_some_and(|e| e <= now_ms)
    }

    /// Seconds of expiry left, rounded up, for the PUBLISH that delivers it.
    pub fn expiry_left(&self, now_ms: i64) -> Option<u32> {
        self.expires_ms
            .map(|e| ((e - now_ms).max(0) as u64).div_ceil(1000).min(u32::MAX as u64) as u32)
    }
}
