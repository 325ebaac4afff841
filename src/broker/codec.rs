//! MQTT packets as the front door sees them: whole frames cut from the byte stream, and the few
//! packets it must read or write (CONNECT, CONNACK, PUBLISH, SUBSCRIBE, SUBACK, UNSUBSCRIBE,
//! acks, DISCONNECT) for MQTT 3.1.1 and 5 alike. Decoding and encoding are rumqttc's codecs;
//! this module only chooses the version and keeps the original bytes to forward untouched.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::v5;

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
}

/// The protocol level a CONNECT asks for (3 = 3.1, 4 = 3.1.1, 5 = 5), read before decoding.
pub fn protocol_level(frame: &Frame) -> Option<(String, u8)> {
    let b = frame.body();
    let n = u16::from_be_bytes([*b.first()?, *b.get(1)?]) as usize;
    let name = std::str::from_utf8(b.get(2..2 + n)?).ok()?.to_string();
    Some((name, *b.get(2 + n)?))
}

/// What the front door needs of a CONNECT, for either protocol; the rest is kept to re-encode.
#[derive(Clone, Debug)]
pub struct Connect {
    pub proto: Proto,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive: u16,
    pub clean: bool,
    pub will: Option<Will>,
    /// MQTT 5 enhanced authentication, which outpost does not offer.
    pub auth_method: Option<String>,
    raw: RawConnect,
}

/// A client's last will, as the front door needs it (ACL check, retained store, bridges).
#[derive(Clone, Debug)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 will delay: the engine may cancel the will if the client comes back.
    pub delayed: bool,
}

#[derive(Clone, Debug)]
enum RawConnect {
    V4(v4::Connect),
    V5(v5::Connect, Option<v5::LastWill>),
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
    if frame.bytes[0] & 0x0f != 0 {
        return Err(malformed("CONNECT with reserved flags set"));
    }
    let (_, level) = protocol_level(frame).ok_or_else(|| malformed("CONNECT too short"))?;
    match level {
        5 => {
            let (c, will, login) = v5::Connect::read(frame.v5_header(), frame.bytes.clone()).map_err(malformed)?;
            let will_info = match &will {
                Some(w) => Some(Will {
                    topic: String::from_utf8(w.topic.to_vec()).map_err(|_| malformed("will topic is not UTF-8"))?,
                    payload: w.message.clone(),
                    qos: w.qos as u8,
                    retain: w.retain,
                    delayed: w.properties.as_ref().and_then(|p| p.delay_interval).unwrap_or(0) > 0,
                }),
                None => None,
            };
            Ok(Connect {
                proto: Proto::V5,
                client_id: c.client_id.clone(),
                username: login.as_ref().map(|l| l.username.clone()),
                password: login.as_ref().map(|l| l.password.clone()),
                keep_alive: c.keep_alive,
                clean: c.clean_start,
                will: will_info,
                auth_method: c.properties.as_ref().and_then(|p| p.authentication_method.clone()),
                raw: RawConnect::V5(c, will),
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
                will: c.last_will.as_ref().map(|w| Will {
                    topic: w.topic.clone(),
                    payload: w.message.clone(),
                    qos: w.qos as u8,
                    retain: w.retain,
                    delayed: false,
                }),
                auth_method: None,
                raw: RawConnect::V4(c),
            })
        }
    }
}

impl Connect {
    /// The same CONNECT with the engine's credentials, client id and keep-alive.
    /// `fresh` asks the engine for a clean session whatever the client asked.
    pub fn for_engine(&self, client_id: &str, user: &str, pass: &str, keep_alive: u16, fresh: bool) -> Bytes {
        let mut out = BytesMut::new();
        match &self.raw {
            RawConnect::V4(c) => {
                let mut c = c.clone();
                c.client_id = client_id.to_string();
                c.keep_alive = keep_alive;
                c.clean_session |= fresh;
                c.login = Some(v4::Login::new(user, pass));
                c.write(&mut out).expect("re-encoding a decoded CONNECT");
            }
            RawConnect::V5(c, will) => {
                let mut c = c.clone();
                c.client_id = client_id.to_string();
                c.keep_alive = keep_alive;
                c.clean_start |= fresh;
                c.write(will, &Some(v5::Login::new(user, pass)), &mut out)
                    .expect("re-encoding a decoded CONNECT");
            }
        }
        out.freeze()
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

/// Reads the engine's CONNACK: was the connection accepted? For MQTT 5, the CONNACK is
/// re-encoded with the front door's own limits (Receive Maximum, Maximum Packet Size).
/// The MQTT 5 limits the front door announces in CONNACK, replacing the engine's.
pub struct Announce {
    pub receive_max: u16,
    pub max_packet: u32,
    pub topic_alias_max: u16,
    /// The client id the front door made for a client that sent none.
    pub assigned_id: Option<String>,
}

pub fn engine_connack(proto: Proto, frame: &Frame, a: &Announce) -> Result<(bool, Bytes), FrameError> {
    if frame.kind != kind::CONNACK {
        return Err(malformed("engine did not answer with CONNACK"));
    }
    match proto {
        Proto::V4 => {
            let ack = v4::ConnAck::read(frame.v4_header(), frame.bytes.clone()).map_err(malformed)?;
            Ok((ack.code == v4::ConnectReturnCode::Success, frame.bytes.clone()))
        }
        Proto::V5 => {
            let mut ack = v5::ConnAck::read(frame.v5_header(), frame.bytes.clone()).map_err(malformed)?;
            let ok = ack.code == v5::ConnectReturnCode::Success;
            if ok {
                let mut props = ack.properties.take().unwrap_or_else(empty_connack_props);
                props.receive_max = Some(a.receive_max);
                props.max_packet_size = Some(a.max_packet);
                props.topic_alias_max = Some(a.topic_alias_max);
                props.assigned_client_identifier = a.assigned_id.clone();
                ack.properties = Some(props);
            }
            let mut out = BytesMut::new();
            ack.write(&mut out).map_err(malformed)?;
            Ok((ok, out.freeze()))
        }
    }
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

/// What the front door needs of a PUBLISH.
#[derive(Clone, Debug)]
pub struct Publish {
    /// Empty when an MQTT 5 client sends only a topic alias.
    pub topic: String,
    pub alias: Option<u16>,
    pub qos: u8,
    pub retain: bool,
    pub pkid: u16,
    pub payload: Bytes,
}

pub fn decode_publish(proto: Proto, frame: &Frame) -> Result<Publish, FrameError> {
    match proto {
        Proto::V4 => {
            let p = v4::Publish::read(frame.v4_header(), frame.bytes.clone()).map_err(malformed)?;
            Ok(Publish {
                topic: p.topic,
                alias: None,
                qos: p.qos as u8,
                retain: p.retain,
                pkid: p.pkid,
                payload: p.payload,
            })
        }
        Proto::V5 => {
            let p = v5::Publish::read(frame.v5_header(), frame.bytes.clone()).map_err(malformed)?;
            let topic = String::from_utf8(p.topic.to_vec()).map_err(|_| malformed("topic is not UTF-8"))?;
            Ok(Publish {
                topic,
                alias: p.properties.as_ref().and_then(|pr| pr.topic_alias),
                qos: p.qos as u8,
                retain: p.retain,
                pkid: p.pkid,
                payload: p.payload,
            })
        }
    }
}

/// Why a subscription filter is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubDenied {
    NotAuthorized,
    InvalidFilter,
}

/// A decoded SUBSCRIBE: filters with their requested QoS.
#[derive(Clone, Debug)]
pub struct Subscribe {
    pub pkid: u16,
    pub filters: Vec<String>,
    raw: RawSubscribe,
}

#[derive(Clone, Debug)]
enum RawSubscribe {
    V4(v4::Subscribe),
    V5(v5::Subscribe),
}

pub fn decode_subscribe(proto: Proto, frame: &Frame) -> Result<Subscribe, FrameError> {
    if frame.bytes[0] & 0x0f != 0x02 {
        return Err(malformed("SUBSCRIBE with wrong fixed-header flags"));
    }
    match proto {
        Proto::V4 => {
            let s = v4::Subscribe::read(frame.v4_header(), frame.bytes.clone()).map_err(malformed)?;
            Ok(Subscribe {
                pkid: s.pkid,
                filters: s.filters.iter().map(|f| f.path.clone()).collect(),
                raw: RawSubscribe::V4(s),
            })
        }
        Proto::V5 => {
            let s = v5::Subscribe::read(frame.v5_header(), frame.bytes.clone()).map_err(malformed)?;
            Ok(Subscribe {
                pkid: s.pkid,
                filters: s.filters.iter().map(|f| f.path.clone()).collect(),
                raw: RawSubscribe::V5(s),
            })
        }
    }
}

impl Subscribe {
    /// The same SUBSCRIBE holding only the filters at `keep`, each under the given name.
    pub fn subset(&self, keep: &[(usize, String)]) -> Bytes {
        let mut out = BytesMut::new();
        match &self.raw {
            RawSubscribe::V4(s) => {
                let filters = keep
                    .iter()
                    .map(|(i, path)| {
                        let mut f = s.filters[*i].clone();
                        f.path = path.clone();
                        f
                    })
                    .collect();
                v4::Subscribe { pkid: s.pkid, filters }
                    .write(&mut out)
                    .expect("encoding SUBSCRIBE");
            }
            RawSubscribe::V5(s) => {
                let filters = keep
                    .iter()
                    .map(|(i, path)| {
                        let mut f = s.filters[*i].clone();
                        f.path = path.clone();
                        f
                    })
                    .collect();
                v5::Subscribe {
                    pkid: s.pkid,
                    filters,
                    properties: s.properties.clone(),
                }
                .write(&mut out)
                .expect("encoding SUBSCRIBE");
            }
        }
        out.freeze()
    }
}

/// One entry of a SUBACK: granted (with the engine's code) or refused by the front door.
#[derive(Clone, Copy, Debug)]
pub enum SubResult {
    FromEngine,
    Denied(SubDenied),
}

/// Builds the SUBACK the client gets: the engine's codes for forwarded filters (in order, from
/// `engine`, or none when nothing was forwarded) and refusals for the others.
/// Returns the packet and, per filter, whether it was granted.
pub fn merge_suback(
    proto: Proto,
    pkid: u16,
    plan: &[SubResult],
    engine: Option<&Frame>,
) -> Result<(Bytes, Vec<bool>), FrameError> {
    let mut out = BytesMut::new();
    let mut granted = Vec::with_capacity(plan.len());
    match proto {
        Proto::V4 => {
            use v4::SubscribeReasonCode as R;
            let mut from = match engine {
                Some(f) => v4::SubAck::read(f.v4_header(), f.bytes.clone())
                    .map_err(malformed)?
                    .return_codes
                    .into_iter(),
                None => Vec::new().into_iter(),
            };
            let codes: Vec<R> = plan
                .iter()
                .map(|p| match p {
                    SubResult::FromEngine => from.next().unwrap_or(R::Failure),
                    SubResult::Denied(_) => R::Failure,
                })
                .collect();
            granted.extend(codes.iter().map(|c| matches!(c, R::Success(_))));
            v4::SubAck::new(pkid, codes).write(&mut out).map_err(malformed)?;
        }
        Proto::V5 => {
            use v5::SubscribeReasonCode as R;
            let (mut from, properties) = match engine {
                Some(f) => {
                    let ack = v5::SubAck::read(f.v5_header(), f.bytes.clone()).map_err(malformed)?;
                    (ack.return_codes.into_iter(), ack.properties)
                }
                None => (Vec::new().into_iter(), None),
            };
            let codes: Vec<R> = plan
                .iter()
                .map(|p| match p {
                    SubResult::FromEngine => from.next().unwrap_or(R::Unspecified),
                    SubResult::Denied(SubDenied::NotAuthorized) => R::NotAuthorized,
                    SubResult::Denied(SubDenied::InvalidFilter) => R::TopicFilterInvalid,
                })
                .collect();
            granted.extend(codes.iter().map(|c| matches!(c, R::Success(_))));
            v5::SubAck {
                pkid,
                return_codes: codes,
                properties,
            }
            .write(&mut out)
            .map_err(malformed)?;
        }
    }
    Ok((out.freeze(), granted))
}

/// A decoded UNSUBSCRIBE.
pub fn decode_unsubscribe(proto: Proto, frame: &Frame) -> Result<(u16, Vec<String>), FrameError> {
    if frame.bytes[0] & 0x0f != 0x02 {
        return Err(malformed("UNSUBSCRIBE with wrong fixed-header flags"));
    }
    match proto {
        Proto::V4 => {
            let u = v4::Unsubscribe::read(frame.v4_header(), frame.bytes.clone()).map_err(malformed)?;
            Ok((u.pkid, u.topics))
        }
        Proto::V5 => {
            let u = v5::Unsubscribe::read(frame.v5_header(), frame.bytes.clone()).map_err(malformed)?;
            Ok((u.pkid, u.filters))
        }
    }
}

/// An UNSUBSCRIBE of the given filters (the engine's names for them).
pub fn unsubscribe(proto: Proto, pkid: u16, filters: Vec<String>) -> Bytes {
    let mut out = BytesMut::new();
    match proto {
        Proto::V4 => {
            v4::Unsubscribe { pkid, topics: filters }
                .write(&mut out)
                .expect("encoding UNSUBSCRIBE");
        }
        Proto::V5 => {
            v5::Unsubscribe {
                pkid,
                filters,
                properties: None,
            }
            .write(&mut out)
            .expect("encoding UNSUBSCRIBE");
        }
    }
    out.freeze()
}

/// The one UNSUBACK a client gets: per filter, whether it held it (the engine sends one
/// UNSUBACK per removed filter and none for the others, so the front door answers itself).
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

/// The packet id of a SUBACK or UNSUBACK.
pub fn ack_pkid(frame: &Frame) -> Option<u16> {
    let b = frame.body();
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
}

/// A bare PUBREL (the engine ignores PUBRELs that carry MQTT 5 properties).
pub fn pubrel(pkid: u16) -> Bytes {
    let [h, l] = pkid.to_be_bytes();
    Bytes::copy_from_slice(&[0x62, 0x02, h, l])
}

/// The ack a refused QoS 1/2 PUBLISH gets (PUBACK or PUBREC; "not authorized" in MQTT 5).
pub fn denied_publish_ack(proto: Proto, qos: u8, pkid: u16) -> Bytes {
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
            a.reason = v5::PubAckReason::NotAuthorized;
            a.write(&mut out).expect("encoding PUBACK");
        }
        (Proto::V5, _) => {
            let mut a = v5::PubRec::new(pkid, None);
            a.reason = v5::PubRecReason::NotAuthorized;
            a.write(&mut out).expect("encoding PUBREC");
        }
    }
    out.freeze()
}

/// PUBCOMP for a PUBREL the front door answers itself (MQTT 5: "packet identifier not found",
/// since a refused QoS 2 publish ends at its PUBREC).
pub fn pubcomp(proto: Proto, pkid: u16) -> Bytes {
    let mut out = BytesMut::new();
    match proto {
        Proto::V4 => {
            v4::PubComp::new(pkid).write(&mut out).expect("encoding ack");
        }
        Proto::V5 => {
            let mut c = v5::PubComp::new(pkid, None);
            c.reason = v5::PubCompReason::PacketIdentifierNotFound;
            c.write(&mut out).expect("encoding ack");
        }
    }
    out.freeze()
}

/// The reason code of an MQTT 5 DISCONNECT (0 when absent).
pub fn disconnect_reason(frame: &Frame) -> u8 {
    frame.body().first().copied().unwrap_or(0)
}

/// The packet id of a PUBREL.
pub fn pubrel_pkid(frame: &Frame) -> Result<u16, FrameError> {
    let b = frame.body();
    match (b.first(), b.get(1)) {
        (Some(&h), Some(&l)) => Ok(u16::from_be_bytes([h, l])),
        _ => Err(malformed("PUBREL without packet id")),
    }
}

/// Why the front door closes a connection, told to MQTT 5 clients in a DISCONNECT.
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

/// The DISCONNECT an MQTT 5 client is sent before the front door closes; none for 3.1.1.
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
                    let _ = decode_publish(proto, &f);
                    let _ = decode_subscribe(proto, &f);
                    let _ = decode_unsubscribe(proto, &f);
                    let _ = protocol_level(&f);
                    let _ = pubrel_pkid(&f);
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
