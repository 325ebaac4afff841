//! One connection to an upstream broker through rumqttc, MQTT 3.1.1 or 5, seen through the few
//! events the bridge needs. rumqttc's own replay of unacknowledged messages is switched off
//! (its queue is emptied after every error): the bridge re-sends from its spool instead, which
//! also covers an upstream that lost its session.

use crate::broker::router::message::Props;
use crate::config::{self, Endpoint, MqttVersion};
use anyhow::{Context, Result};
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::{v5, TlsConfiguration, Transport};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use tokio_rustls::rustls;

/// What the bridge hears from upstream.
pub enum UpEvent {
    /// `max_packet`: the upstream's limit from its MQTT 5 CONNACK, if it gave one.
    Connected {
        session_present: bool,
        max_packet: Option<u32>,
        /// The upstream's Receive Maximum (MQTT 5).
        receive_max: Option<u16>,
    },
    /// A PUBLISH was written, with its packet id (0 for QoS 0), in the order of `publish` calls.
    Sent(u16),
    /// The upstream finished a QoS 1/2 publish; `refused` when an MQTT 5 reason code says no,
    /// with whether that is for good (not authorized, bad topic) or for now (quota, busy).
    Acked {
        pkid: u16,
        refused: Option<(String, bool)>,
        /// A PUBCOMP with a failure code: rumqttc does not free its in-flight slot, so the
        /// connection must start over.
        reset: bool,
    },
    /// PUBREC for a QoS 2 publish: the upstream has it; only PUBREL may follow.
    Received {
        pkid: u16,
        refused: Option<(String, bool)>,
    },
    Message {
        topic: String,
        payload: Bytes,
        qos: u8,
        retain: bool,
        /// MQTT 5 properties as the upstream sent them (none on 3.1.1).
        props: Option<Box<Props>>,
        /// Sends the upstream its PUBACK (PUBREC): only once the message is safe locally.
        ack: Ack,
    },
    /// Our DISCONNECT went out.
    Closed,
    Other,
}

/// The acknowledgement an inbound QoS 1/2 message is owed (acks are manual on every bridge).
pub enum Ack {
    /// The client of that connection, the packet id and the QoS.
    V4(rumqttc::AsyncClient, u16, rumqttc::QoS),
    V5(v5::AsyncClient, u16, v5::mqttbytes::QoS),
}

impl Ack {
    /// Sent on the connection the message came in on; if that one is gone the upstream sends
    /// the message again on the next (a persistent session) or never had it to lose.
    pub async fn send(self) {
        let _ = match self {
            // What `ack` reads of a PUBLISH: its packet id and QoS.
            Ack::V4(c, pkid, qos) => {
                let mut p = rumqttc::Publish::new("", qos, Vec::new());
                p.pkid = pkid;
                c.ack(&p).await.map_err(|_| ())
            }
            Ack::V5(c, pkid, qos) => {
                let mut p = m5::Publish::new("", qos, Bytes::new(), None);
                p.pkid = pkid;
                c.ack(&p).await.map_err(|_| ())
            }
        };
    }
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
                o.set_manual_acks(true);
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
                o.set_manual_acks(true);
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
            Upstream::V4(c, ev) => match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => Ok(UpEvent::Connected {
                    session_present: a.session_present,
                    max_packet: None,
                    receive_max: None,
                }),
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Ok(UpEvent::Sent(pkid)),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => Ok(UpEvent::Closed),
                Ok(Event::Incoming(Packet::PubAck(a))) => Ok(UpEvent::Acked {
                    pkid: a.pkid,
                    refused: None,
                    reset: false,
                }),
                Ok(Event::Incoming(Packet::PubComp(a))) => Ok(UpEvent::Acked {
                    pkid: a.pkid,
                    refused: None,
                    reset: false,
                }),
                Ok(Event::Incoming(Packet::PubRec(r))) => Ok(UpEvent::Received {
                    pkid: r.pkid,
                    refused: None,
                }),
                Ok(Event::Incoming(Packet::Publish(p))) => Ok(UpEvent::Message {
                    topic: p.topic,
                    payload: p.payload,
                    qos: p.qos as u8,
                    retain: p.retain,
                    props: None,
                    ack: Ack::V4(c.clone(), p.pkid, p.qos),
                }),
                Ok(_) => Ok(UpEvent::Other),
                Err(e) => {
                    // No replay by rumqttc: the spool re-sends.
                    ev.pending.clear();
                    Err(describe4(&e))
                }
            },
            Upstream::V5(c, ev) => match ev.poll().await {
                Ok(v5::Event::Incoming(m5::Packet::ConnAck(a))) => Ok(UpEvent::Connected {
                    session_present: a.session_present,
                    max_packet: a.properties.as_ref().and_then(|p| p.max_packet_size),
                    receive_max: a.properties.as_ref().and_then(|p| p.receive_max),
                }),
                Ok(v5::Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => Ok(UpEvent::Sent(pkid)),
                Ok(v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Ok(UpEvent::Closed),
                Ok(v5::Event::Incoming(m5::Packet::PubAck(a))) => Ok(UpEvent::Acked {
                    pkid: a.pkid,
                    refused: refusal(a.reason),
                    reset: false,
                }),
                // Any PUBCOMP ends the message: a failure code (packet id not found) says the
                // upstream had finished it already.
                Ok(v5::Event::Incoming(m5::Packet::PubComp(a))) => Ok(UpEvent::Acked {
                    pkid: a.pkid,
                    refused: None,
                    reset: a.reason != m5::PubCompReason::Success,
                }),
                Ok(v5::Event::Incoming(m5::Packet::PubRec(r))) => Ok(UpEvent::Received {
                    pkid: r.pkid,
                    refused: match r.reason {
                        m5::PubRecReason::Success | m5::PubRecReason::NoMatchingSubscribers => None,
                        m5::PubRecReason::NotAuthorized
                        | m5::PubRecReason::TopicNameInvalid
                        | m5::PubRecReason::PayloadFormatInvalid => Some((format!("{:?}", r.reason), true)),
                        other => Some((format!("{other:?}"), false)),
                    },
                }),
                Ok(v5::Event::Incoming(m5::Packet::Publish(p))) => {
                    Ok(UpEvent::Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                        qos: p.qos as u8,
                        retain: p.retain,
                        // Expiry, alias and subscription ids are the upstream's hop, not the message's.
                        props: p.properties.and_then(|pp| {
                            Props::from_parts(
                                pp.payload_format_indicator,
                                pp.content_type,
                                pp.response_topic,
                                pp.correlation_data,
                                pp.user_properties,
                            )
                        }),
                        ack: Ack::V5(c.clone(), p.pkid, p.qos),
                    })
                }
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
        self.publish_with(topic, payload, qos, retain, None, None)
    }

    /// As `publish`, with the message's MQTT 5 properties and an expiry in seconds (3.1.1 has
    /// neither: they are left out).
    pub fn publish_with(
        &self,
        topic: &str,
        payload: &Bytes,
        qos: u8,
        retain: bool,
        props: Option<&Props>,
        expiry: Option<u32>,
    ) -> bool {
        match self {
            Upstream::V4(c, _) => c
                .try_publish(
                    topic,
                    rumqttc::qos(qos).unwrap_or(rumqttc::QoS::AtLeastOnce),
                    retain,
                    payload.to_vec(),
                )
                .is_ok(),
            Upstream::V5(c, _) => {
                let qos = v5::mqttbytes::qos(qos).unwrap_or(v5::mqttbytes::QoS::AtLeastOnce);
                if props.is_none() && expiry.is_none() {
                    return c.try_publish(topic, qos, retain, payload.clone()).is_ok();
                }
                let p = props.cloned().unwrap_or_default();
                let pp = m5::PublishProperties {
                    payload_format_indicator: p.payload_format,
                    message_expiry_interval: expiry,
                    response_topic: p.response_topic,
                    correlation_data: p.correlation_data,
                    user_properties: p.user_properties,
                    content_type: p.content_type,
                    ..Default::default()
                };
                c.try_publish_with_properties(topic, qos, retain, payload.clone(), pp)
                    .is_ok()
            }
        }
    }

    /// Finishes QoS 2 messages of the session the upstream resumed, ahead of anything new: PUBREL
    /// for those it had answered with PUBREC, the PUBLISH again (DUP, same packet id) for the
    /// rest. False for a packet id this connection cannot track (the `inflight` setting shrank).
    pub fn resume(&mut self, items: &[super::spool::InFlight], inflight: u16, strip_retain: bool) -> bool {
        if items.iter().any(|i| i.pkid == 0 || i.pkid > inflight) {
            return false;
        }
        for i in items {
            match self {
                Upstream::V4(_, ev) => ev.pending.push_back(if i.rec {
                    rumqttc::Request::PubRel(rumqttc::PubRel::new(i.pkid))
                } else {
                    let mut p =
                        rumqttc::Publish::from_bytes(&i.msg.topic, rumqttc::QoS::ExactlyOnce, i.msg.payload.clone());
                    p.retain = i.msg.retain && !strip_retain;
                    p.pkid = i.pkid;
                    p.dup = true;
                    rumqttc::Request::Publish(p)
                }),
                Upstream::V5(_, ev) => ev.pending.push_back(if i.rec {
                    v5::Request::PubRel(m5::PubRel::new(i.pkid, None))
                } else {
                    let props = i.msg.props.as_deref().map(|p| m5::PublishProperties {
                        payload_format_indicator: p.payload_format,
                        response_topic: p.response_topic.clone(),
                        correlation_data: p.correlation_data.clone(),
                        user_properties: p.user_properties.clone(),
                        content_type: p.content_type.clone(),
                        ..Default::default()
                    });
                    v5::Request::Publish(m5::Publish {
                        dup: true,
                        qos: v5::mqttbytes::QoS::ExactlyOnce,
                        retain: i.msg.retain && !strip_retain,
                        topic: Bytes::copy_from_slice(i.msg.topic.as_bytes()),
                        pkid: i.pkid,
                        payload: i.msg.payload.clone(),
                        properties: props,
                    })
                }),
            }
        }
        true
    }

    /// Subscribes the inbound filters; MQTT 5 asks the upstream not to echo our own publishes.
    /// At QoS 1 at most: rumqttc forgets the ids of QoS 2 messages received on one connection,
    /// and would fail every later one on the PUBREL a resumed session owes it.
    pub fn subscribe(&self, filters: &[(String, u8)]) -> bool {
        if filters.is_empty() {
            return true;
        }
        let filters: Vec<(String, u8)> = filters.iter().map(|(f, q)| (f.clone(), (*q).min(1))).collect();
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

    /// Queues a DISCONNECT after what is queued; `UpEvent::Closed` says it went out.
    pub fn request_disconnect(&self) -> bool {
        match self {
            Upstream::V4(c, _) => c.try_disconnect().is_ok(),
            Upstream::V5(c, _) => c.try_disconnect().is_ok(),
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
