//! SUBSCRIBE and UNSUBSCRIBE: each filter checked on its own (validity, shared-group rules,
//! access), granted ones put in the index, and the retained messages they get handed to the
//! writer behind the SUBACK.

use super::Step;
use crate::broker::codec::{self, Goodbye, SubCode, SubReq};
use crate::broker::connection::Ctx;
use crate::broker::metrics::Metrics;
use crate::broker::router::message::Message;
use crate::broker::router::session::SubOpts;
use crate::broker::router::{self, Target};
use crate::broker::{topics, Right};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(super) fn on_subscribe(ctx: &Ctx, pkid: u16, filters: Vec<SubReq>, id: Option<u32>) -> Step {
    let mut codes = Vec::with_capacity(filters.len());
    let mut retained = vec![];
    for f in filters {
        match one_filter(ctx, &f, id, &mut retained) {
            Ok(code) => codes.push(code),
            Err(close) => return close,
        }
    }
    Step::SubAck(codec::suback(ctx.proto, pkid, &codes), retained)
}

/// One filter of a SUBSCRIBE: its code in the SUBACK, or the close a protocol error asks for.
fn one_filter(
    ctx: &Ctx,
    f: &SubReq,
    id: Option<u32>,
    retained: &mut Vec<(Target, Arc<Message>)>,
) -> Result<SubCode, Step> {
    let shared = &ctx.shared;
    let (group, _) = router::split_share(&f.filter);
    let valid = topics::strip_share(&f.filter).is_some_and(topics::valid_filter)
        && group.is_none_or(|g| !g.is_empty() && !g.contains(['+', '#']));
    if !valid {
        return Ok(SubCode::InvalidFilter);
    }
    if group.is_some() && f.no_local {
        // A protocol error [MQTT-3.8.3-4]: the connection is closed.
        Metrics::inc(&shared.metrics.malformed_packets);
        return Err(Step::Close(Goodbye::ProtocolError, "No Local on a shared subscription"));
    }
    if !shared.access.allows(&ctx.id, &f.filter, Right::Subscribe) {
        Metrics::inc(&shared.metrics.subscribe_denied);
        shared.events.subscribe_denied(ctx.peer, &ctx.id, &f.filter);
        log::debug!("client {:?}: subscribe to {:?} denied", ctx.id.client_id, f.filter);
        return Ok(SubCode::NotAuthorized);
    }
    let qos = f.qos.min(2);
    let opts = SubOpts {
        qos,
        no_local: f.no_local,
        retain_as_published: f.retain_as_published,
        id,
    };
    let (_, msgs) = shared
        .router
        .subscribe(&ctx.session, &f.filter, opts, f.retain_handling);
    for msg in msgs {
        if !shared.access.allows(&ctx.id, &msg.topic, Right::Read) {
            shared.router.dropped_denied.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let target = Target {
            session: ctx.session.clone(),
            qos: qos.min(msg.qos),
            retain: true,
            sub_ids: id.into_iter().collect(),
            share: None,
        };
        retained.push((target, msg));
    }
    Ok(SubCode::Granted(qos))
}

pub(super) fn on_unsubscribe(ctx: &Ctx, pkid: u16, filters: &[String]) -> Step {
    let held: Vec<bool> = filters
        .iter()
        .map(|f| ctx.shared.router.unsubscribe(&ctx.session, f))
        .collect();
    Step::Reply(codec::unsuback(ctx.proto, pkid, &held))
}
