//! MQTT packets as the broker reads and writes them, for 3.1.1 and 5 alike: whole frames cut
//! from the byte stream, client packets decoded into one version-neutral [`In`], and the
//! packets the broker sends encoded for the client's version. The byte-level work is rumqttc's
//! codecs; this module chooses the version and checks what the specification asks of a server.

use super::router::message::{Message, Props};
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};

/// The protocol a client speaks, from its CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    V4,
    V5,
}

/// MQTT packet type numbers (the high nibble of the first byte).
pub mod kind {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
    pub const AUTH: u8 = 15;
}

/// One whole packet as it came off the wire.
#[derive(Clone, Debug)]
pub struct Frame {
    pub kind: u8,
    pub bytes: Bytes,
    header_len: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("packet of {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(String),
}

fn malformed(e: impl std::fmt::Display) -> FrameError {
    FrameError::Malformed(e.to_string())
}

/// Cuts the next whole packet off `buf`, or returns `None` until enough bytes are there.
pub fn next_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    match m4::check(buf.iter(), max) {
        Ok(h) => {
            let len = h.frame_length();
            let header_len = len - remaining(&buf[..]).unwrap_or(0);
            let bytes = buf.split_to(len).freeze();
            let kind = bytes[0] >> 4;
            if kind == 0 {
                return Err(malformed("packet type 0 is reserved"));
            }
            Ok(Some(Frame {
                kind,
                bytes,
                header_len,
            }))
        }
        Err(m4::Error::InsufficientBytes(_)) => Ok(None),
        Err(m4::Error::PayloadSizeLimitExceeded(n)) => Err(FrameError::TooLarge(n)),
        Err(e) => Err(malformed(e)),
    }
}

/// The remaining-length field of a complete fixed header at the start of `b`.
fn remaining(b: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for (i, byte) in b.iter().skip(1).take(4).enumerate() {
        len += ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(len);
        }
    }
    None
}

impl Frame {
    fn v4_header(&self) -> m4::FixedHeader {
        m4::FixedHeader::new(self.bytes[0], self.header_len - 1, self.bytes.len() - self.header_len)
    }
    fn v5_header(&self) -> v5::FixedHeader {
        v5::FixedHeader::new(self.bytes[0], self.header_len - 1, self.bytes.len() - self.header_len)
    }
    fn body(&self) -> &[u8] {
        &self.bytes[self.header_len..]
    }
    fn flags(&self) -> u8 {
        self.bytes[0] & 0x0f
    }
}

/// The protocol level a CONNECT asks for (3 = 3.1, 4 = 3.1.1, 5 = 5), read before decoding.
pub fn protocol_level(frame: &Frame) -> Option<(String, u8)> {
    let b = frame.body();
    let n = u16::from_be_bytes([*b.first()?, *b.get(1)?]) as usize;
    let name = std::str::from_utf8(b.get(2..2 + n)?).ok()?.to_string();
    Some((name, *b.get(2 + n)?))
}

/// What the broker needs of a CONNECT, for either protocol.
#[derive(Clone, Debug)]
pub struct Connect {
    pub proto: Proto,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive: u16,
    /// 3.1.1 clean session, or MQTT 5 clean start.
    pub clean: bool,
    /// MQTT 5 session expiry (seconds; `u32::MAX` never). `None` for 3.1.1 (the broker's setting).
    pub session_expiry: Option<u32>,
    /// MQTT 5: what the client will take at once and how big (0: no limit said).
    pub receive_max: u16,
    pub max_packet: u32,
    pub topic_alias_max: u16,
    pub will: Option<Will>,
    /// MQTT 5 enhanced authentication, which outpost does not offer.
    pub auth_method: Option<String>,
}

/// A client's last will.
#[derive(Clone, Debug)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 will delay in seconds.
    pub delay: u32,
    pub props: Option<Box<Props>>,
    pub expiry: Option<u32>,
}

/// Why a CONNECT is refused; mapped to the right CONNACK code for each protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    UnsupportedVersion,
    BadClientId,
    BadCredentials,
    NotAuthorized,
    ServerUnavailable,
    ServerBusy,
    Malformed,
    BadAuthMethod,
}

pub fn decode_connect(frame: &Frame) -> Result<Connect, FrameError> {
    if frame.kind != kind::CONNECT {
        return Err(malformed("the first packet must be CONNECT"));
    }
    if frame.flags() != 0 {
        return Err(malformed("CONNECT with reserved flags set"));
    }
    let (_, level) = protocol_level(frame).ok_or_else(|| malformed("CONNECT too short"))?;
    // The connect flags' reserved bit (0) must be zero [MQTT-3.1.2-3].
    let b = frame.body();
    let name_len = u16::from_be_bytes([b[0], b[1]]) as usize;
    if b.get(2 + name_len + 1).is_some_and(|f| f & 0x01 != 0) {
        return Err(malformed("CONNECT flags' reserved bit is set"));
    }
    match level {
        5 => {
            check_properties(
                b.get(2 + name_len + 4..)
                    .ok_or_else(|| malformed("CONNECT too short"))?,
            )?;
            let (c, will, login) = v5::Connect::read(frame.v5_header(), frame.bytes.clone()).map_err(malformed)?;
            let p = c.properties.as_ref();
            if p.is_some_and(|p| p.receive_maximum == Some(0) || p.max_packet_size == Some(0)) {
                return Err(malformed("Receive Maximum or Maximum Packet Size of 0"));
            }
            let will_info = match &will {
                Some(w) => {
                    let wp = w.properties.as_ref();
                    Some(Will {
                        topic: String::from_utf8(w.topic.to_vec()).map_err(|_| malformed("will topic is not UTF-8"))?,
                        payload: w.message.clone(),
                        qos: w.qos as u8,
                        retain: w.retain,
                        delay: wp.and_then(|p| p.delay_interval).unwrap_or(0),
                        expiry: wp.and_then(|p| p.message_expiry_interval),
                        props: wp.and_then(|p| {
                            Props::from_parts(
                                p.payload_format_indicator,
                                p.content_type.clone(),
                                p.response_topic.clone(),
                                p.correlation_data.clone(),
                                p.user_properties.clone(),
                            )
                        }),
                    })
                }
                None => None,
            };
            Ok(Connect {
                proto: Proto::V5,
                client_id: c.client_id.clone(),
                username: login.as_ref().map(|l| l.username.clone()),
                password: login.as_ref().map(|l| l.password.clone()),
                keep_alive: c.keep_alive,
                clean: c.clean_start,
                session_expiry: Some(p.and_then(|p| p.session_expiry_interval).unwrap_or(0)),
                receive_max: p.and_then(|p| p.receive_maximum).unwrap_or(u16::MAX),
                max_packet: p.and_then(|p| p.max_packet_size).unwrap_or(0),
                topic_alias_max: p.and_then(|p| p.topic_alias_max).unwrap_or(0),
                will: will_info,
                auth_method: p.and_then(|p| p.authentication_method.clone()),
            })
        }
        _ => {
            let c = v4::Connect::read(frame.v4_header(), frame.bytes.clone()).map_err(malformed)?;
            Ok(Connect {
                proto: Proto::V4,
                client_id: c.client_id.clone(),
                username: c.login.as_ref().map(|l| l.username.clone()),
                password: c.login.as_ref().map(|l| l.password.clone()),
                keep_alive: c.keep_alive,
                clean: c.clean_session,
                session_expiry: None,
                receive_max: u16::MAX,
                max_packet: 0,
                topic_alias_max: 0,
                will: c.last_will.as_ref().map(|w| Will {
                    topic: w.topic.clone(),
                    payload: w.message.clone(),
                    qos: w.qos as u8,
                    retain: w.retain,
                    delay: 0,
                    props: None,
                    expiry: None,
                }),
                auth_method: None,
            })
        }
    }
}

/// A CONNACK that refuses the connection, in the client's protocol.
pub fn connack_refusal(proto: Proto, why: Refusal) -> Bytes {
    let mut out = BytesMut::new();
    match proto {
        Proto::V4 => {
            use v4::ConnectReturnCode as C;
            let code = match why {
                Refusal::UnsupportedVersion => C::RefusedProtocolVersion,
                Refusal::BadClientId => C::BadClientId,
                // As Mosquitto does: 3.1.1 clients report code 5 as "not authorised".
                Refusal::BadCredentials | Refusal::NotAuthorized => C::NotAuthorized,
                Refusal::ServerUnavailable | Refusal::ServerBusy | Refusal::Malformed | Refusal::BadAuthMethod => {
                    C::ServiceUnavailable
                }
            };
            v4::ConnAck::new(code, false).write(&mut out).expect("encoding CONNACK");
        }
        Proto::V5 => {
            use v5::ConnectReturnCode as C;
            let code = match why {
                Refusal::UnsupportedVersion => C::UnsupportedProtocolVersion,
                Refusal::BadClientId => C::ClientIdentifierNotValid,
                Refusal::BadCredentials => C::BadUserNamePassword,
                Refusal::NotAuthorized => C::NotAuthorized,
                Refusal::ServerUnavailable => C::ServerUnavailable,
                Refusal::ServerBusy => C::ServerBusy,
                Refusal::Malformed => C::MalformedPacket,
                Refusal::BadAuthMethod => C::BadAuthenticationMethod,
            };
            v5::ConnAck {
                session_present: false,
                code,
                properties: None,
            }
            .write(&mut out)
            .expect("encoding CONNACK");
        }
    }
    out.freeze()
}

/// What the broker tells an MQTT 5 client in its CONNACK.
pub struct Announce {
    pub receive_max: u16,
    pub max_packet: u32,
    pub topic_alias_max: u16,
    /// The client id made for a client that sent none.
    pub assigned_id: Option<String>,
    /// Set when the broker keeps the client's session for less than it asked.
    pub session_expiry: Option<u32>,
    /// Set when the broker overrides the client's keep-alive (it asked for none, or too long).
    pub server_keep_alive: Option<u16>,
}

/// The CONNACK that accepts a connection.
pub fn connack_ok(proto: Proto, session_present: bool, a: &Announce) -> Bytes {
    let mut out = BytesMut::new();
    match proto {
        Proto::V4 => {
            v4::ConnAck::new(v4::ConnectReturnCode::Success, session_present)
                .write(&mut out)
                .expect("encoding CONNACK");
        }
        Proto::V5 => {
            let mut props = empty_connack_props();
            props.receive_max = Some(a.receive_max);
            props.max_packet_size = Some(a.max_packet);
            props.topic_alias_max = Some(a.topic_alias_max);
            props.assigned_client_identifier = a.assigned_id.clone();
            props.session_expiry_interval = a.session_expiry;
            props.server_keep_alive = a.server_keep_alive;
            props.retain_available = Some(1);
            props.wildcard_subscription_available = Some(1);
            props.subscription_identifiers_available = Some(1);
            props.shared_subscription_available = Some(1);
            v5::ConnAck {
                session_present,
                code: v5::ConnectReturnCode::Success,
                properties: Some(props),
            }
            .write(&mut out)
            .expect("encoding CONNACK");
        }
    }
    out.freeze()
}

fn empty_connack_props() -> v5::ConnAckProperties {
    v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: vec![],
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

/// A PUBLISH from a client.
#[derive(Clone, Debug)]
pub struct Publish {
    /// Empty when an MQTT 5 client sends only a topic alias.
    pub topic: String,
    pub alias: Option<u16>,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
    pub payload: Bytes,
    pub props: Option<Box<Props>>,
    /// MQTT 5 message expiry interval, seconds.
    pub expiry: Option<u32>,
}

/// One filter of a SUBSCRIBE with its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubReq {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained at subscribe, 1: only if the subscription is new, 2: never.
    pub retain_handling: u8,
}

/// A client packet, decoded.
#[derive(Debug)]
pub enum In {
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<SubReq>,
        id: Option<u32>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        reason: u8,
        session_expiry: Option<u32>,
    },
}

fn pkid_of(frame: &Frame) -> Result<u16, FrameError> {
    let b = frame.body();
    match (b.first(), b.get(1)) {
        (Some(&h), Some(&l)) => Ok(u16::from_be_bytes([h, l])),
        _ => Err(malformed("packet without packet id")),
    }
}

/// Decodes a packet a client sent after CONNECT. Anything the specification calls malformed or
/// a protocol error is an `Err`: the caller closes the connection.
pub fn decode(proto: Proto, frame: &Frame) -> Result<In, FrameError> {
    let flags = frame.flags();
    let fixed = |want: u8, what: &str| {
        if flags == want {
            Ok(())
        } else {
            Err(malformed(format!("{what} with wrong fixed-header flags")))
        }
    };
    match frame.kind {
        kind::PUBLISH => decode_publish(proto, frame).map(In::Publish),
        kind::PUBACK => fixed(0, "PUBACK").and_then(|_| pkid_of(frame)).map(In::PubAck),
        kind::PUBREC => fixed(0, "PUBREC").and_then(|_| pkid_of(frame)).map(In::PubRec),
        kind::PUBREL => fixed(2, "PUBREL").and_then(|_| pkid_of(frame)).map(In::PubRel),
        kind::PUBCOMP => fixed(0, "PUBCOMP").and_then(|_| pkid_of(frame)).map(In::PubComp),
        kind::SUBSCRIBE => {
            fixed(2, "SUBSCRIBE")?;
            decode_subscribe(proto, frame)
        }
        kind::UNSUBSCRIBE => {
            fixed(2, "UNSUBSCRIBE")?;
            let (pkid, filters) = match proto {
                Proto::V4 => {
                    let u = v4::Unsubscribe::read(frame.v4_header(), frame.bytes.clone()).map_err(malformed)?;
                    (u.pkid, u.topics)
                }
                Proto::V5 => {
                    let u = v5::Unsubscribe::read(frame.v5_header(), frame.bytes.clone()).map_err(malformed)?;
                    (u.pkid, u.filters)
                }
            };
            if filters.is_empty() {
                return Err(malformed("UNSUBSCRIBE without filters"));
            }
            Ok(In::Unsubscribe { pkid, filters })
        }
        kind::PINGREQ => fixed(0, "PINGREQ").map(|_| In::PingReq),
        kind::DISCONNECT => {
            fixed(0, "DISCONNECT")?;
            match proto {
                Proto::V4 => Ok(In::Disconnect {
                    reason: 0,
                    session_expiry: None,
                }),
                Proto::V5 if frame.body().is_empty() => Ok(In::Disconnect {
                    reason: 0,
                    session_expiry: None,
                }),
                // A reason code alone, without a property length [MQTT-3.14.2.2.1].
                Proto::V5 if frame.body().len() == 1 => Ok(In::Disconnect {
                    reason: frame.body()[0],
                    session_expiry: None,
                }),
                Proto::V5 => {
                    let d = v5::Disconnect::read(frame.v5_header(), frame.bytes.clone()).map_err(malformed)?;
                    Ok(In::Disconnect {
                        reason: frame.body()[0],
                        session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
                    })
                }
            }
        }
        kind::CONNECT => Err(malformed("a second CONNECT")),
        kind::AUTH => Err(malformed("AUTH without enhanced authentication")),
        _ => Err(malformed("a packet type a client may not send")),
    }
}

pub fn decode_publish(proto: Proto, frame: &Frame) -> Result<Publish, FrameError> {
    let qos = (frame.bytes[0] >> 1) & 0x03;
    if qos == 3 {
        return Err(malformed("PUBLISH with QoS 3"));
    }
    if qos == 0 && frame.bytes[0] & 0x08 != 0 {
        return Err(malformed("QoS 0 PUBLISH with DUP set"));
    }
    match proto {
        Proto::V4 => {
            let p = v4::Publish::read(frame.v4_header(), frame.bytes.clone()).map_err(malformed)?;
            if qos > 0 && p.pkid == 0 {
                return Err(malformed("PUBLISH with packet id 0"));
            }
            Ok(Publish {
                topic: p.topic,
                alias: None,
                qos: p.qos as u8,
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
                payload: p.payload,
                props: None,
                expiry: None,
            })
        }
        Proto::V5 => {
            let body = frame.body();
            let tlen = u16::from_be_bytes([
                *body.first().ok_or_else(|| malformed("PUBLISH too short"))?,
                *body.get(1).ok_or_else(|| malformed("PUBLISH too short"))?,
            ]) as usize;
            let at = 2 + tlen + if qos > 0 { 2 } else { 0 };
            check_properties(body.get(at..).ok_or_else(|| malformed("PUBLISH too short"))?)?;
            let p = v5::Publish::read(frame.v5_header(), frame.bytes.clone()).map_err(malformed)?;
            if qos > 0 && p.pkid == 0 {
                return Err(malformed("PUBLISH with packet id 0"));
            }
            let topic = String::from_utf8(p.topic.to_vec()).map_err(|_| malformed("topic is not UTF-8"))?;
            let pr = p.properties;
            if pr.as_ref().is_some_and(|pr| !pr.subscription_identifiers.is_empty()) {
                return Err(malformed("a client PUBLISH may not carry subscription identifiers"));
            }
            if pr
                .as_ref()
                .is_some_and(|pr| pr.payload_format_indicator == Some(1) && std::str::from_utf8(&p.payload).is_err())
            {
                return Err(malformed("payload marked UTF-8 is not"));
            }
            Ok(Publish {
                topic,
                alias: pr.as_ref().and_then(|pr| pr.topic_alias),
                qos: p.qos as u8,
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
                payload: p.payload,
                expiry: pr.as_ref().and_then(|pr| pr.message_expiry_interval),
                props: pr.and_then(|pr| {
                    Props::from_parts(
                        pr.payload_format_indicator,
                        pr.content_type,
                        pr.response_topic,
                        pr.correlation_data,
                        pr.user_properties,
                    )
                }),
            })
        }
    }
}

fn decode_subscribe(proto: Proto, frame: &Frame) -> Result<In, FrameError> {
    let (pkid, filters, id) = match proto {
        Proto::V4 => {
            // Reserved bits of each requested QoS byte must be zero [MQTT-3-8.3-4].
            let s = v4::Subscribe::read(frame.v4_header(), frame.bytes.clone()).map_err(malformed)?;
            check_option_bytes(frame, proto)?;
            let f: Vec<SubReq> = s
                .filters
                .into_iter()
                .map(|f| SubReq {
                    filter: f.path,
                    qos: f.qos as u8,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                })
                .collect();
            (s.pkid, f, None)
        }
        Proto::V5 => {
            let s = v5::Subscribe::read(frame.v5_header(), frame.bytes.clone()).map_err(malformed)?;
            check_option_bytes(frame, proto)?;
            let id = match s.properties.as_ref().and_then(|p| p.id) {
                Some(0) => return Err(malformed("subscription identifier 0")),
                Some(n) if n > 268_435_455 => return Err(malformed("subscription identifier too large")),
                Some(n) => Some(n as u32),
                None => None,
            };
            let f: Vec<SubReq> = s
                .filters
                .into_iter()
                .map(|f| SubReq {
                    filter: f.path,
                    qos: f.qos as u8,
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retain_handling: match f.retain_forward_rule {
                        v5::RetainForwardRule::OnEverySubscribe => 0,
                        v5::RetainForwardRule::OnNewSubscribe => 1,
                        v5::RetainForwardRule::Never => 2,
                    },
                })
                .collect();
            (s.pkid, f, id)
        }
    };
    if filters.is_empty() {
        return Err(malformed("SUBSCRIBE without filters"));
    }
    Ok(In::Subscribe { pkid, filters, id })
}

/// Walks a SUBSCRIBE's payload and refuses reserved bits in the options bytes (rumqttc's
/// reader accepts them; the specification says close).
fn check_option_bytes(frame: &Frame, proto: Proto) -> Result<(), FrameError> {
    let b = frame.body();
    let mut i = 2;
    if proto == Proto::V5 {
        let (len, n) = varint(&b[i..]).ok_or_else(|| malformed("bad properties length"))?;
        i += n + len;
    }
    while i < b.len() {
        let n = u16::from_be_bytes([b[i], *b.get(i + 1).ok_or_else(|| malformed("short filter"))?]) as usize;
        i += 2 + n;
        let opts = *b.get(i).ok_or_else(|| malformed("filter without options"))?;
        let reserved = match proto {
            Proto::V4 => opts & 0xfc != 0,
            Proto::V5 => opts & 0xc0 != 0 || (opts >> 4) & 0x03 == 3,
        };
        if reserved || opts & 0x03 == 3 {
            return Err(malformed("SUBSCRIBE options with reserved bits set"));
        }
        i += 1;
    }
    Ok(())
}

/// Checks an MQTT 5 property section (`b` starts at its length): each property is one the
/// specification knows, well formed, and, but for User Property and Subscription Identifier,
/// present at most once (a duplicate is a protocol error, which rumqttc's reader lets through).
/// Returns the section's whole length (length field included).
fn check_properties(b: &[u8]) -> Result<usize, FrameError> {
    let (len, n) = varint(b).ok_or_else(|| malformed("bad properties length"))?;
    let body = b
        .get(n..n + len)
        .ok_or_else(|| malformed("properties longer than the packet"))?;
    let mut seen = [false; 64];
    let mut i = 0;
    let field = |i: usize, k: usize| -> Result<usize, FrameError> {
        body.get(i..i + k)
            .map(|_| i + k)
            .ok_or_else(|| malformed("property cut short"))
    };
    let string = |i: usize| -> Result<usize, FrameError> {
        let l = u16::from_be_bytes([
            *body.get(i).ok_or_else(|| malformed("property cut short"))?,
            *body.get(i + 1).ok_or_else(|| malformed("property cut short"))?,
        ]) as usize;
        field(i + 2, l)
    };
    while i < body.len() {
        let id = body[i];
        i += 1;
        i = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => field(i, 1)?,
            0x13 | 0x21 | 0x22 | 0x23 => field(i, 2)?,
            0x02 | 0x11 | 0x18 | 0x27 => field(i, 4)?,
            0x0b => {
                i + varint(&body[i..])
                    .ok_or_else(|| malformed("bad subscription identifier"))?
                    .1
            }
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1a | 0x1c | 0x1f => string(i)?,
            0x26 => string(string(i)?)?,
            _ => return Err(malformed(format!("unknown property {id:#04x}"))),
        };
        if id != 0x26 && id != 0x0b && std::mem::replace(&mut seen[id as usize], true) {
            return Err(malformed(format!("property {id:#04x} given twice")));
        }
    }
    Ok(n + len)
}

fn varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut v = 0usize;
    for (i, byte) in b.iter().take(4).enumerate() {
        v += ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// How one delivered PUBLISH goes out.
pub struct OutPublish<'a> {
    pub msg: &'a Message,
    pub qos: u8,
    pub pkid: u16,
    pub dup: bool,
    pub retain: bool,
    pub sub_ids: &'a [u32],
    /// MQTT 5 topic alias: `(alias, send the topic too)`.
    pub alias: Option<(u16, bool)>,
    /// Seconds left of the message's expiry, if it has one.
    pub expiry_left: Option<u32>,
}

/// Appends a PUBLISH to `out`; returns its size. MQTT 3.1.1 gets no properties (it has none).
pub fn encode_publish(proto: Proto, p: &OutPublish, out: &mut BytesMut) -> usize {
    let before = out.len();
    match proto {
        Proto::V4 => {
            let mut w = v4::Publish::new(&*p.msg.topic, m4::qos(p.qos).unwrap_or(m4::QoS::AtMostOnce), Vec::new());
            w.payload = p.msg.payload.clone();
            w.pkid = p.pkid;
            w.dup = p.dup;
            w.retain = p.retain;
            w.write(out).expect("encoding PUBLISH");
        }
        Proto::V5 => {
            let props = p.msg.props.as_deref();
            let mut pr = v5::PublishProperties {
                payload_format_indicator: props.and_then(|x| x.payload_format),
                message_expiry_interval: p.expiry_left,
                topic_alias: p.alias.map(|a| a.0),
                response_topic: props.and_then(|x| x.response_topic.clone()),
                correlation_data: props.and_then(|x| x.correlation_data.clone()),
                user_properties: props.map(|x| x.user_properties.clone()).unwrap_or_default(),
                subscription_identifiers: p.sub_ids.iter().map(|i| *i as usize).collect(),
                content_type: props.and_then(|x| x.content_type.clone()),
            };
            let empty = pr.payload_format_indicator.is_none()
                && pr.message_expiry_interval.is_none()
                && pr.topic_alias.is_none()
                && pr.response_topic.is_none()
                && pr.correlation_data.is_none()
                && pr.user_properties.is_empty()
                && pr.subscription_identifiers.is_empty()
                && pr.content_type.is_none();
            let topic = match p.alias {
                Some((_, false)) => Bytes::new(),
                _ => Bytes::copy_from_slice(p.msg.topic.as_bytes()),
            };
            let w = v5::Publish {
                dup: p.dup,
                qos: m5::qos(p.qos).unwrap_or(m5::QoS::AtMostOnce),
                retain: p.retain,
                topic,
                pkid: p.pkid,
                payload: p.msg.payload.clone(),
                properties: if empty {
                    None
                } else {
                    Some(std::mem::replace(&mut pr, empty_publish_props()))
                },
            };
            w.write(out).expect("encoding PUBLISH");
        }
    }
    out.len() - before
}

fn empty_publish_props() -> v5::PublishProperties {
    v5::PublishProperties {
        payload_format_indicator: None,
        message_expiry_interval: None,
        topic_alias: None,
        response_topic: None,
        correlation_data: None,
        user_properties: vec![],
        subscription_identifiers: vec![],
        content_type: None,
    }
}

/// The size a PUBLISH of `msg` will have at least (topic, payload, properties), to test it
/// against a client's Maximum Packet Size before it takes a packet id.
pub fn publish_size(proto: Proto, msg: &Message, qos: u8) -> usize {
    let props = match (proto, msg.props.as_deref()) {
        // Properties length (up to 4), message expiry (5) and topic alias (3) on top.
        (Proto::V5, Some(p)) => p.wire_len() + 12,
        (Proto::V5, None) => 12,
        _ => 0,
    };
    let body = 2 + msg.topic.len() + if qos > 0 { 2 } else { 0 } + props + msg.payload.len();
    1 + varint_len(body) + body
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// A SUBACK: per filter, the granted QoS or a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubCode {
    Granted(u8),
    NotAuthorized,
    InvalidFilter,
}

pub fn suback(proto: Proto, pkid: u16, codes: &[SubCode]) -> Bytes {
    let mut out = BytesMut::new();
    match proto {
        Proto::V4 => {
            use v4::SubscribeReasonCode as R;
            let c = codes
                .iter()
                .map(|c| match c {
                    SubCode::Granted(q) => R::Success(m4::qos(*q).unwrap_or(m4::QoS::AtMostOnce)),
                    _ => R::Failure,
                })
                .collect();
            v4::SubAck::new(pkid, c).write(&mut out).expect("encoding SUBACK");
        }
        Proto::V5 => {
            use v5::SubscribeReasonCode as R;
            let c = codes
                .iter()
                .map(|c| match c {
                    SubCode::Granted(q) => R::Success(m5::qos(*q).unwrap_or(m5::QoS::AtMostOnce)),
                    SubCode::NotAuthorized => R::NotAuthorized,
                    SubCode::InvalidFilter => R::TopicFilterInvalid,
                })
                .collect();
            v5::SubAck {
                pkid,
                return_codes: c,
                properties: None,
            }
            .write(&mut out)
            .expect("encoding SUBACK");
        }
    }
    out.freeze()
}

/// The UNSUBACK: per filter, whether the session held it.
pub fn unsuback(proto: Proto, pkid: u16, held: &[bool]) -> Bytes {
    let mut out = BytesMut::new();
    match proto {
        Proto::V4 => {
            v4::UnsubAck::new(pkid).write(&mut out).expect("encoding UNSUBACK");
        }
        Proto::V5 => {
            use v5::UnsubAckReason as R;
            let reasons = held
                .iter()
                .map(|h| if *h { R::Success } else { R::NoSubscriptionExisted })
                .collect();
            v5::UnsubAck {
                pkid,
                reasons,
                properties: None,
            }
            .write(&mut out)
            .expect("encoding UNSUBACK");
        }
    }
    out.freeze()
}

/// How the broker answers a PUBLISH it received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckCode {
    Success,
    NoMatchingSubscribers,
    NotAuthorized,
    QuotaExceeded,
}

/// PUBACK (QoS 1) or PUBREC (QoS 2) for a received PUBLISH.
pub fn publish_ack(proto: Proto, qos: u8, pkid: u16, code: AckCode) -> Bytes {
    let mut out = BytesMut::new();
    match (proto, qos) {
        (Proto::V4, 1) => {
            v4::PubAck::new(pkid).write(&mut out).expect("encoding ack");
        }
        (Proto::V4, _) => {
            v4::PubRec::new(pkid).write(&mut out).expect("encoding ack");
        }
        (Proto::V5, 1) => {
            let mut a = v5::PubAck::new(pkid, None);
            a.reason = match code {
                AckCode::Success => v5::PubAckReason::Success,
                AckCode::NoMatchingSubscribers => v5::PubAckReason::NoMatchingSubscribers,
                AckCode::NotAuthorized => v5::PubAckReason::NotAuthorized,
                AckCode::QuotaExceeded => v5::PubAckReason::QuotaExceeded,
            };
            a.write(&mut out).expect("encoding PUBACK");
        }
        (Proto::V5, _) => {
            let mut a = v5::PubRec::new(pkid, None);
            a.reason = match code {
                AckCode::Success => v5::PubRecReason::Success,
                AckCode::NoMatchingSubscribers => v5::PubRecReason::NoMatchingSubscribers,
                AckCode::NotAuthorized => v5::PubRecReason::NotAuthorized,
                AckCode::QuotaExceeded => v5::PubRecReason::QuotaExceeded,
            };
            a.write(&mut out).expect("encoding PUBREC");
        }
    }
    out.freeze()
}

/// PUBREL for a delivery whose PUBREC came in.
pub fn pubrel(pkid: u16) -> Bytes {
    let [h, l] = pkid.to_be_bytes();
    Bytes::copy_from_slice(&[0x62, 0x02, h, l])
}

/// PUBCOMP for a client's PUBREL; `found` is false for an id the session does not hold.
pub fn pubcomp(proto: Proto, pkid: u16, found: bool) -> Bytes {
    let mut out = BytesMut::new();
    match proto {
        Proto::V4 => {
            v4::PubComp::new(pkid).write(&mut out).expect("encoding ack");
        }
        Proto::V5 => {
            let mut c = v5::PubComp::new(pkid, None);
            if !found {
                c.reason = v5::PubCompReason::PacketIdentifierNotFound;
            }
            c.write(&mut out).expect("encoding ack");
        }
    }
    out.freeze()
}

/// Why the broker closes a connection, told to MQTT 5 clients in a DISCONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goodbye {
    Malformed,
    ProtocolError,
    PacketTooLarge,
    ReceiveMaximumExceeded,
    TopicNameInvalid,
    TopicAliasInvalid,
    ShuttingDown,
    KeepAliveTimeout,
    NotAuthorized,
    SessionTakenOver,
}

/// The DISCONNECT an MQTT 5 client is sent before the broker closes; none for 3.1.1.
pub fn disconnect(proto: Proto, why: Goodbye) -> Option<Bytes> {
    use v5::DisconnectReasonCode as D;
    if proto == Proto::V4 {
        return None;
    }
    let code = match why {
        Goodbye::Malformed => D::MalformedPacket,
        Goodbye::ProtocolError => D::ProtocolError,
        Goodbye::PacketTooLarge => D::PacketTooLarge,
        Goodbye::ReceiveMaximumExceeded => D::ReceiveMaximumExceeded,
        Goodbye::TopicNameInvalid => D::TopicNameInvalid,
        Goodbye::TopicAliasInvalid => D::TopicAliasInvalid,
        Goodbye::ShuttingDown => D::ServerShuttingDown,
        Goodbye::KeepAliveTimeout => D::KeepAliveTimeout,
        Goodbye::NotAuthorized => D::NotAuthorized,
        Goodbye::SessionTakenOver => D::SessionTakenOver,
    };
    let mut out = BytesMut::new();
    v5::Disconnect::new(code).write(&mut out).expect("encoding DISCONNECT");
    Some(out.freeze())
}

pub const PINGREQ: [u8; 2] = [0xc0, 0x00];
pub const PINGRESP: [u8; 2] = [0xd0, 0x00];
pub const DISCONNECT_V4: [u8; 2] = [0xe0, 0x00];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(mut buf: BytesMut, max: usize) -> Result<Vec<Frame>, FrameError> {
        let mut out = vec![];
        while let Some(f) = next_frame(&mut buf, max)? {
            out.push(f);
        }
        Ok(out)
    }

    fn publish_v4(topic: &str, payload: &[u8], qos: u8) -> Bytes {
        let mut p = v4::Publish::new(topic, v4_qos(qos), payload.to_vec());
        p.pkid = if qos > 0 { 7 } else { 0 };
        let mut b = BytesMut::new();
        p.write(&mut b).unwrap();
        b.freeze()
    }

    fn v4_qos(q: u8) -> m4::QoS {
        m4::qos(q).unwrap()
    }

    #[test]
    fn frames_split_and_decode() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&publish_v4("a/b", b"hi", 1));
        buf.extend_from_slice(&PINGREQ);
        let fs = frames(buf, 1024).unwrap();
        assert_eq!(fs.len(), 2);
        let p = decode_publish(Proto::V4, &fs[0]).unwrap();
        assert_eq!(
            (p.topic.as_str(), p.qos, p.pkid, &p.payload[..]),
            ("a/b", 1, 7, &b"hi"[..])
        );
        assert_eq!(fs[1].kind, kind::PINGREQ);
    }

    #[test]
    fn a_v5_disconnect_of_every_legal_length_decodes() {
        // Empty (normal), a reason code alone, a reason code and properties.
        for (wire, want) in [
            (&[0xe0, 0x00][..], 0x00),
            (&[0xe0, 0x01, 0x80], 0x80),
            (&[0xe0, 0x02, 0x04, 0x00], 0x04),
        ] {
            let f = frames(BytesMut::from(wire), 1024).unwrap().remove(0);
            match decode(Proto::V5, &f) {
                Ok(In::Disconnect { reason, .. }) => assert_eq!(reason, want, "{wire:02x?}"),
                _ => panic!("{wire:02x?} not read as a DISCONNECT"),
            }
        }
    }

    #[test]
    fn oversized_is_refused_before_it_is_read() {
        let mut buf = BytesMut::from(&publish_v4("t", &[0u8; 300], 0)[..4]);
        assert!(matches!(next_frame(&mut buf, 100), Err(FrameError::TooLarge(_))));
    }

    proptest! {
        // Any bytes: never a panic, and whatever frames come out decode or fail cleanly.
        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(f)) = next_frame(&mut buf, 256) {
                for proto in [Proto::V4, Proto::V5] {
                    let _ = decode_connect(&f);
                    let _ = decode(proto, &f);
                    let _ = protocol_level(&f);
                }
            }
        }

        // A stream of valid publishes, cut at any point, comes out whole and in order.
        #[test]
        fn publishes_survive_any_split(
            msgs in prop::collection::vec(("[a-z]{1,8}(/[a-z]{1,8}){0,3}", prop::collection::vec(any::<u8>(), 0..200), 0u8..3), 1..10),
            cut in 0usize..2000,
        ) {
            let mut wire = BytesMut::new();
            for (t, p, q) in &msgs {
                wire.extend_from_slice(&publish_v4(t, p, *q));
            }
            let cut = cut.min(wire.len());
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = vec![];
            while let Some(f) = next_frame(&mut buf, 1 << 20).unwrap() { got.push(f); }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = next_frame(&mut buf, 1 << 20).unwrap() { got.push(f); }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got.len(), msgs.len());
            for (f, (t, p, q)) in got.iter().zip(&msgs) {
                let d = decode_publish(Proto::V4, f).unwrap();
                prop_assert_eq!(&d.topic, t);
                prop_assert_eq!(&d.payload[..], &p[..]);
                prop_assert_eq!(d.qos, *q);
            }
        }
    }
}

/// A mutation fuzzer for the parsers a client reaches (framing, CONNECT, and every packet after
/// it, both versions): valid packets of every kind, cut, bit-flipped, spliced and with lengths
/// rewritten. The normal run tries a few thousand inputs; `OUTPOST_FUZZ_CASES=N` runs N (CI's
/// long run, `.ci/run --long`, and BENCHMARKS.md say how many ran). Any panic fails it.
#[cfg(test)]
mod fuzz {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn corpus() -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = vec![];
        let mut b = BytesMut::new();
        let mut push = |b: &mut BytesMut| out.push(b.split().to_vec());
        v4::Connect::new("c1").write(&mut b).unwrap();
        push(&mut b);
        let mut c5 = v5::Connect {
            keep_alive: 30,
            client_id: "c5".into(),
            clean_start: false,
            properties: None,
        };
        c5.properties = Some(v5::ConnectProperties {
            session_expiry_interval: Some(60),
            receive_maximum: Some(10),
            max_packet_size: Some(1000),
            topic_alias_max: Some(5),
            request_response_info: None,
            request_problem_info: None,
            user_properties: vec![("k".into(), "v".into())],
            authentication_method: None,
            authentication_data: None,
        });
        let will = v5::LastWill::new("w/t", "bye", m5::QoS::AtLeastOnce, true, None);
        c5.write(&Some(will), &Some(v5::Login::new("u", "p")), &mut b).unwrap();
        push(&mut b);
        let mut p = v4::Publish::new("a/b", m4::QoS::AtLeastOnce, b"x".to_vec());
        p.pkid = 3;
        p.write(&mut b).unwrap();
        push(&mut b);
        let msg = Message {
            topic: "t/1".into(),
            payload: Bytes::from_static(b"hello"),
            qos: 2,
            retain: true,
            props: Props::from_parts(Some(1), Some("text/plain".into()), Some("r".into()), None, vec![]),
            expires_ms: None,
            origin: None,
            from: 0,
        };
        let op = OutPublish {
            msg: &msg,
            qos: 2,
            pkid: 9,
            dup: false,
            retain: true,
            sub_ids: &[],
            alias: Some((2, true)),
            expiry_left: Some(5),
        };
        encode_publish(Proto::V5, &op, &mut b);
        push(&mut b);
        v4::Subscribe::new("a/+", m4::QoS::AtLeastOnce).write(&mut b).unwrap();
        push(&mut b);
        let mut s5 = v5::Subscribe::new(v5::Filter::new("$share/g/a/#", m5::QoS::ExactlyOnce), None);
        s5.properties = Some(v5::SubscribeProperties {
            id: Some(7),
            user_properties: vec![],
        });
        s5.write(&mut b).unwrap();
        push(&mut b);
        v4::Unsubscribe::new("a/+").write(&mut b).unwrap();
        push(&mut b);
        for raw in [
            &[0x40, 2, 0, 1][..],
            &[0x50, 2, 0, 1],
            &[0x62, 2, 0, 1],
            &[0x70, 2, 0, 1],
            &PINGREQ,
            &[0xe0, 0],
            &[0xe0, 7, 0x04, 5, 0x11, 0, 0, 0, 9],
        ] {
            out.push(raw.to_vec());
        }
        out
    }

    fn mutate(rng: &mut rand::rngs::StdRng, corpus: &[Vec<u8>]) -> Vec<u8> {
        let mut v = corpus[rng.random_range(0..corpus.len())].clone();
        for _ in 0..rng.random_range(1..5) {
            let n = v.len().max(1);
            match rng.random_range(0..6) {
                0 => {
                    let i = rng.random_range(0..n);
                    if i < v.len() {
                        v[i] ^= 1 << rng.random_range(0..8);
                    }
                }
                1 => v.truncate(rng.random_range(0..n)),
                2 => {
                    let i = rng.random_range(0..=v.len());
                    v.insert(i, rng.random());
                }
                3 => {
                    let other = &corpus[rng.random_range(0..corpus.len())];
                    v.extend_from_slice(&other[rng.random_range(0..other.len())..]);
                }
                4 if v.len() > 1 => v[1] = rng.random(),
                _ => {
                    let i = rng.random_range(0..n);
                    if i < v.len() {
                        v[i] = *[0x00, 0xff, 0x7f, 0x80, 0x03].get(rng.random_range(0..5)).unwrap_or(&0);
                    }
                }
            }
        }
        v
    }

    #[test]
    fn mutated_packets_never_panic_a_parser() {
        let cases: u64 = std::env::var("OUTPOST_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000);
        let corpus = corpus();
        let mut rng = rand::rngs::StdRng::seed_from_u64(cases ^ 0x006f_7574_706f_7374);
        let mut frames = 0u64;
        for _ in 0..cases {
            let input = mutate(&mut rng, &corpus);
            let mut buf = BytesMut::from(&input[..]);
            while let Ok(Some(f)) = next_frame(&mut buf, 4096) {
                frames += 1;
                let _ = decode_connect(&f);
                let _ = protocol_level(&f);
                let _ = decode(Proto::V4, &f);
                let _ = decode(Proto::V5, &f);
            }
        }
        eprintln!("fuzz: {cases} inputs, {frames} whole frames parsed, no panic");
        assert!(frames > cases / 4, "the mutations should still make frames: {frames}");
    }
}
