//! One connection to an upstream broker through rumqttc, MQTT 3.1.1 or 5, seen through the few
//! events the bridge needs. rumqttc's own replay of unacknowledged messages is switched off
//! (its queue is emptied after every error): the bridge re-sends from its spool instead, which
//! also covers an upstream that lost its session.

use crate::config::{self, Endpoint, MqttVersion};
use anyhow::{Context, Result};
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::{v5, TlsConfiguration, Transport};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls;

/// What the bridge hears from upstream.
pub enum UpEvent {
    /// `max_packet`: the upstream's limit from its MQTT 5 CONNACK, if it gave one.
    Connected {
        session_present: bool,
        max_packet: Option<u32>,
    },
    /// A PUBLISH was written, with its packet id (0 for QoS 0), in the order of `publish` calls.
    Sent(u16),
    /// The upstream finished a QoS 1/2 publish; `refused` when an MQTT 5 reason code says no,
    /// with whether that is for good (not authorized, bad topic) or for now (quota, busy).
    Acked {
        pkid: u16,
        refused: Option<(String, bool)>,
    },
    Message {
        topic: String,
        payload: Bytes,
        qos: u8,
        retain: bool,
    },
    /// Our DISCONNECT went out.
    Closed,
    Other,
}

pub enum Upstream {
    V4(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
    V5(v5::AsyncClient, Box<v5::EventLoop>),
}

/// Connection settings that failed to load, named by key (files are read here, not at poll).
pub fn tls_config(tls: Option<&config::BridgeTls>) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match tls.and_then(|t| t.ca.as_ref()) {
        Some(ca) => {
            for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("tls.ca {}", ca.display()))? {
                roots
                    .add(c.with_context(|| format!("tls.ca {}", ca.display()))?)
                    .with_context(|| format!("tls.ca {}", ca.display()))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for c in native.certs {
                let _ = roots.add(c);
            }
        }
    }
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let cfg = match tls.and_then(|t| t.cert.as_ref().zip(t.key.as_ref())) {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("tls.cert {}", cert.display()))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("tls.cert {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("tls.key {}", key.display()))?;
            b.with_client_auth_cert(chain, key)
                .context("tls.cert and tls.key do not match")?
        }
        None => b.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

fn password(b: &config::Bridge) -> Result<Option<(String, String)>> {
    let Some(a) = &b.auth else { return Ok(None) };
    let pw = match (&a.password_file, &a.password) {
        (Some(f), _) => std::fs::read_to_string(f)
            .with_context(|| format!("auth.password_file {}", f.display()))?
            .trim_end_matches(['\n', '\r'])
            .to_string(),
        (None, Some(p)) => p.clone(),
        (None, None) => String::new(),
    };
    Ok(Some((a.username.clone(), pw)))
}

impl Upstream {
    /// A client of `url`, one of the bridge's addresses.
    pub fn new(b: &config::Bridge, url: &str, client_id: &str, status_topic: &str) -> Result<Upstream> {
        let ep = Endpoint::parse(url).map_err(anyhow::Error::msg)?;
        let transport = match ep.scheme.as_str() {
            "mqtt" => Transport::Tcp,
            "mqtts" => Transport::Tls(TlsConfiguration::Rustls(tls_config(b.tls.as_ref())?)),
            "ws" => Transport::Ws,
            _ => Transport::Wss(TlsConfiguration::Rustls(tls_config(b.tls.as_ref())?)),
        };
        // WebSocket transports take the whole URL as the host.
        let host = if ep.scheme.starts_with("ws") {
            ep.url.clone()
        } else {
            ep.host.clone()
        };
        let creds = password(b)?;
        let max = b.max_packet_size.0 as usize;
        let cap = b.inflight as usize + 64;
        let up = match b.protocol {
            MqttVersion::V311 => {
                let mut o = rumqttc::MqttOptions::new(client_id, host, ep.port);
                o.set_transport(transport);
                o.set_keep_alive(b.keep_alive.0);
                o.set_clean_session(!b.persistent_session);
                o.set_max_packet_size(max.max(1 << 20), max);
                o.set_inflight(b.inflight);
                o.set_last_will(rumqttc::LastWill::new(
                    status_topic,
                    "offline",
                    rumqttc::QoS::AtLeastOnce,
                    !b.strip_retain,
                ));
                if let Some((u, p)) = creds {
                    o.set_credentials(u, p);
                }
                let (c, mut ev) = rumqttc::AsyncClient::new(o, cap);
                let mut net = ev.network_options();
                net.set_tcp_nodelay(true);
                net.set_connection_timeout(10);
                ev.set_network_options(net);
                Upstream::V4(c, Box::new(ev))
            }
            MqttVersion::V5 => {
                let mut o = v5::MqttOptions::new(client_id, host, ep.port);
                o.set_transport(transport);
                o.set_keep_alive(b.keep_alive.0);
                o.set_clean_start(!b.persistent_session);
                if b.persistent_session {
                    // Keep the session (and queued inbound messages) for a day of outage.
                    o.set_session_expiry_interval(Some(86_400));
                }
                o.set_max_packet_size(Some((max.max(1 << 20)) as u32));
                o.set_outgoing_inflight_upper_limit(b.inflight);
                o.set_last_will(m5::LastWill::new(
                    status_topic,
                    "offline",
                    v5::mqttbytes::QoS::AtLeastOnce,
                    !b.strip_retain,
                    None,
                ));
                if let Some((u, p)) = creds {
                    o.set_credentials(u, p);
                }
                let mut net = o.network_options();
                net.set_tcp_nodelay(true);
                net.set_connection_timeout(10);
                o.set_network_options(net);
                let (c, ev) = v5::AsyncClient::new(o, cap);
                Upstream::V5(c, Box::new(ev))
            }
        };
        Ok(up)
    }

    pub async fn poll(&mut self) -> Result<UpEvent, String> {
        use rumqttc::{Event, Outgoing, Packet};
        match self {
            Upstream::V4(_, ev) => match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => Ok(UpEvent::Connected {
                    session_present: a.session_present,
                    max_packet: None,
                }),
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Ok(UpEvent::Sent(pkid)),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => Ok(UpEvent::Closed),
                Ok(Event::Incoming(Packet::PubAck(a))) => Ok(UpEvent::Acked {
                    pkid: a.pkid,
                    refused: None,
                }),
                Ok(Event::Incoming(Packet::PubComp(a))) => Ok(UpEvent::Acked {
                    pkid: a.pkid,
                    refused: None,
                }),
                Ok(Event::Incoming(Packet::Publish(p))) => Ok(UpEvent::Message {
                    topic: p.topic,
                    payload: p.payload,
                    qos: p.qos as u8,
                    retain: p.retain,
                }),
                Ok(_) => Ok(UpEvent::Other),
                Err(e) => {
                    // No replay by rumqttc: the spool re-sends.
                    ev.pending.clear();
                    Err(describe4(&e))
                }
            },
            Upstream::V5(_, ev) => match ev.poll().await {
                Ok(v5::Event::Incoming(m5::Packet::ConnAck(a))) => Ok(UpEvent::Connected {
                    session_present: a.session_present,
                    max_packet: a.properties.as_ref().and_then(|p| p.max_packet_size),
                }),
                Ok(v5::Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => Ok(UpEvent::Sent(pkid)),
                Ok(v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Ok(UpEvent::Closed),
                Ok(v5::Event::Incoming(m5::Packet::PubAck(a))) => Ok(UpEvent::Acked {
                    pkid: a.pkid,
                    refused: refusal(a.reason),
                }),
                Ok(v5::Event::Incoming(m5::Packet::PubComp(a))) => Ok(UpEvent::Acked {
                    pkid: a.pkid,
                    refused: None,
                }),
                Ok(v5::Event::Incoming(m5::Packet::Publish(p))) => Ok(UpEvent::Message {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload,
                    qos: p.qos as u8,
                    retain: p.retain,
                }),
                Ok(_) => Ok(UpEvent::Other),
                Err(e) => {
                    ev.pending.clear();
                    Err(e.to_string())
                }
            },
        }
    }

    /// Queues a publish without waiting; `false` when rumqttc's queue is full.
    pub fn publish(&self, topic: &str, payload: &Bytes, qos: u8, retain: bool) -> bool {
        self.publish_expiring(topic, payload, qos, retain, None)
    }

    /// As `publish`, with an MQTT 5 message expiry in seconds (ignored on 3.1.1, which has none).
    pub fn publish_expiring(&self, topic: &str, payload: &Bytes, qos: u8, retain: bool, expiry: Option<u32>) -> bool {
        match self {
            Upstream::V4(c, _) => c
                .try_publish(
                    topic,
                    rumqttc::qos(qos).unwrap_or(rumqttc::QoS::AtLeastOnce),
                    retain,
                    payload.to_vec(),
                )
                .is_ok(),
            Upstream::V5(c, _) => match expiry {
                None => c.try_publish(
                    topic,
                    v5::mqttbytes::qos(qos).unwrap_or(v5::mqttbytes::QoS::AtLeastOnce),
                    retain,
                    payload.clone(),
                ),
                Some(secs) => c.try_publish_with_properties(
                    topic,
                    v5::mqttbytes::qos(qos).unwrap_or(v5::mqttbytes::QoS::AtLeastOnce),
                    retain,
                    payload.clone(),
                    m5::PublishProperties {
                        message_expiry_interval: Some(secs),
                        ..Default::default()
                    },
                ),
            }
            .is_ok(),
        }
    }

    /// Subscribes the inbound filters; MQTT 5 asks the upstream not to echo our own publishes.
    pub fn subscribe(&self, filters: &[(String, u8)]) -> bool {
        if filters.is_empty() {
            return true;
        }
        match self {
            Upstream::V4(c, _) => c
                .try_subscribe_many(filters.iter().map(|(f, q)| {
                    rumqttc::SubscribeFilter::new(f.clone(), rumqttc::qos(*q).unwrap_or(rumqttc::QoS::AtLeastOnce))
                }))
                .is_ok(),
            Upstream::V5(c, _) => c
                .try_subscribe_many(filters.iter().map(|(f, q)| {
                    let mut f = m5::Filter::new(
                        f.clone(),
                        v5::mqttbytes::qos(*q).unwrap_or(v5::mqttbytes::QoS::AtLeastOnce),
                    );
                    f.nolocal = true;
                    f.preserve_retain = true;
                    f
                }))
                .is_ok(),
        }
    }

    pub async fn disconnect(&mut self) {
        let done = match self {
            Upstream::V4(c, _) => c.try_disconnect().is_ok(),
            Upstream::V5(c, _) => c.try_disconnect().is_ok(),
        };
        if done {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Ok(ev) = self.poll().await {
                    if matches!(ev, UpEvent::Closed) {
                        break;
                    }
                }
            })
            .await;
        }
    }
}

/// An MQTT 5 PUBACK reason that is not a success, and whether it is final.
fn refusal(r: m5::PubAckReason) -> Option<(String, bool)> {
    use m5::PubAckReason as R;
    match r {
        R::Success | R::NoMatchingSubscribers => None,
        R::NotAuthorized | R::TopicNameInvalid | R::PayloadFormatInvalid => Some((format!("{r:?}"), true)),
        other => Some((format!("{other:?}"), false)),
    }
}

/// Error text that says what failed: for TLS, the host and rustls' reason.
fn describe4(e: &rumqttc::ConnectionError) -> String {
    match e {
        rumqttc::ConnectionError::Tls(t) => format!("TLS: {t}"),
        rumqttc::ConnectionError::ConnectionRefused(code) => format!("upstream refused the connection: {code:?}"),
        e => e.to_string(),
    }
}
