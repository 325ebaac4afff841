//! PUBLISH from a client: topic alias, topic validity, the inflight bound, access, QoS 2
//! exactly once, then into the broker; the ack is the reader's to send once the durable copies
//! are kept.

use super::{ReadState, Step};
use crate::broker::codec::{self, AckCode, Goodbye, Publish};
use crate::broker::connection::{Ctx, TOPIC_ALIAS_MAX};
use crate::broker::metrics::Metrics;
use crate::broker::router::message::Message;
use crate::broker::{topics, Right};
use crate::system::clock::now_ms;
use std::sync::Arc;
use tokio::sync::oneshot;

pub(super) fn on_publish(ctx: &Ctx, st: &mut ReadState, p: Publish, waits: &mut Vec<oneshot::Receiver<()>>) -> Step {
    let shared = &ctx.shared;
    let m = &shared.metrics;
    let proto = ctx.proto;
    Metrics::inc(&m.publishes_in);
    let topic = match resolve_alias(st, &p) {
        Ok(t) => t,
        Err(step) => {
            Metrics::inc(&m.malformed_packets);
            return step;
        }
    };
    if !topics::valid_topic(&topic) {
        Metrics::inc(&m.malformed_packets);
        return Step::Close(Goodbye::TopicNameInvalid, "PUBLISH to an invalid topic name");
    }
    if p.qos > 0 {
        st.unacked += 1;
        // QoS 2 publishes stay open until their PUBREL: this one counts unless it is a resend
        // of one already open.
        let qos2_open = if p.qos == 2 {
            let st = ctx.session.lock();
            st.incoming_qos2.len() + !st.incoming_qos2.contains(&p.pkid) as usize
        } else {
            0
        };
        if st.unacked.max(qos2_open) > shared.limits.max_inflight as usize {
            Metrics::inc(&m.inflight_exceeded);
            return Step::Close(Goodbye::ReceiveMaximumExceeded, "too many unacknowledged publishes");
        }
    }
    if !shared.access.allows(&ctx.id, &topic, Right::Publish) {
        Metrics::inc(&m.publish_denied);
        shared.events.publish_denied(ctx.peer, &ctx.id, &topic);
        log::debug!("client {:?}: publish to {topic:?} denied", ctx.id.client_id);
        return match p.qos {
            0 => Step::Nothing,
            q => Step::Reply(codec::publish_ack(proto, q, p.pkid, AckCode::NotAuthorized)),
        };
    }
    // A QoS 2 PUBLISH resent before its PUBREL is acknowledged again, not routed again.
    if p.qos == 2 {
        if !ctx.session.lock().incoming_qos2.insert(p.pkid) {
            return Step::Reply(codec::publish_ack(proto, 2, p.pkid, AckCode::Success));
        }
        if let Some(store) = ctx.store() {
            store.qos2_in(&ctx.session.key, p.pkid, true);
        }
    }
    let (qos, pkid) = (p.qos, p.pkid);
    let msg = Arc::new(Message {
        topic: Arc::from(topic.as_str()),
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        props: p.props,
        expires_ms: p.expiry.map(|e| now_ms() + e as i64 * 1000),
        origin: None,
        from: ctx.session.id,
    });
    shared.ingress(&msg, qos > 0, waits);
    match qos {
        0 => Step::Nothing,
        qos => Step::Accepted { qos, pkid },
    }
}

/// The topic a PUBLISH is for: its own, or the one its MQTT 5 topic alias stands for (an alias
/// with a topic sets it). An alias out of range or never set closes the connection.
fn resolve_alias(st: &mut ReadState, p: &Publish) -> Result<String, Step> {
    match (p.alias, p.topic.is_empty()) {
        (Some(a), _) if a == 0 || a > TOPIC_ALIAS_MAX => {
            Err(Step::Close(Goodbye::TopicAliasInvalid, "topic alias out of range"))
        }
        (Some(a), false) => {
            st.aliases.insert(a, p.topic.clone());
            Ok(p.topic.clone())
        }
        (Some(a), true) => st
            .aliases
            .get(&a)
            .cloned()
            .ok_or(Step::Close(Goodbye::TopicAliasInvalid, "unknown topic alias")),
        (None, _) => Ok(p.topic.clone()),
    }
}
