//! One handler per kind of packet a client sends after CONNECT, as Mosquitto's `handle_*.c`:
//! each decides what the packet leads to ([`Step`]) and touches the session, the router and
//! the metrics; the reader does the waiting and the writing.

mod acks;
mod disconnect;
mod publish;
mod subscribe;

use super::{Ctx, End};
use crate::broker::codec::{self, Frame, Goodbye, In};
use crate::broker::metrics::Metrics;
use crate::broker::router::message::Message;
use crate::broker::router::Target;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::oneshot;

/// State only the reader uses.
#[derive(Default)]
pub(super) struct ReadState {
    /// MQTT 5 topic aliases the client set.
    pub aliases: HashMap<u16, String>,
    /// QoS 1/2 publishes of this batch whose acks wait for it to end (Receive Maximum).
    pub unacked: usize,
}

/// What one client packet leads to.
pub(super) enum Step {
    Reply(bytes::Bytes),
    /// A QoS 1/2 PUBLISH taken in: acknowledged once what it added to the waits has fired.
    Accepted {
        qos: u8,
        pkid: u16,
    },
    SubAck(bytes::Bytes, Vec<(Target, Arc<Message>)>),
    Nothing,
    Close(Goodbye, &'static str),
    End(End),
}

/// Decodes one packet and hands it to its handler. `waits` gets the durable copies a PUBLISH
/// must wait for before its ack.
pub(super) fn on_packet(ctx: &Ctx, st: &mut ReadState, frame: &Frame, waits: &mut Vec<oneshot::Receiver<()>>) -> Step {
    let packet = match codec::decode(ctx.proto, frame) {
        Ok(p) => p,
        Err(e) => {
            Metrics::inc(&ctx.shared.metrics.malformed_packets);
            log::debug!("client {:?}: {e}", ctx.id.client_id);
            return Step::Close(Goodbye::Malformed, "malformed or forbidden packet");
        }
    };
    match packet {
        In::Publish(p) => publish::on_publish(ctx, st, p, waits),
        In::PubAck(pkid) => acks::on_puback(ctx, pkid, false),
        In::PubComp(pkid) => acks::on_puback(ctx, pkid, true),
        In::PubRec(pkid) => acks::on_pubrec(ctx, pkid),
        In::PubRel(pkid) => acks::on_pubrel(ctx, pkid),
        In::Subscribe { pkid, filters, id } => subscribe::on_subscribe(ctx, pkid, filters, id),
        In::Unsubscribe { pkid, filters } => subscribe::on_unsubscribe(ctx, pkid, &filters),
        In::PingReq => Step::Reply(bytes::Bytes::from_static(&codec::PINGRESP)),
        In::Disconnect { reason, session_expiry } => disconnect::on_disconnect(ctx, reason, session_expiry),
    }
}
