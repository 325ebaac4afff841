//! Acknowledgements: PUBACK and PUBCOMP of the broker's deliveries (which free the window and
//! the budget), PUBREC (answered with PUBREL) and PUBREL of the client's QoS 2 publishes.

use super::Step;
use crate::broker::codec;
use crate::broker::connection::Ctx;

/// PUBACK, or PUBCOMP when `comp`: the delivery is done.
pub(super) fn on_puback(ctx: &Ctx, pkid: u16, comp: bool) -> Step {
    if let Some((freed, id)) = ctx.session.acked(ctx.gen, pkid, comp) {
        ctx.shared.router.release(freed);
        ctx.shared.router.done(id);
    }
    Step::Nothing
}

pub(super) fn on_pubrec(ctx: &Ctx, pkid: u16) -> Step {
    // PUBREL either way: for an unknown id it tells the client to let it go too.
    if let (Some(id), Some(store)) = (ctx.session.received(ctx.gen, pkid), ctx.store()) {
        if id != 0 {
            store.released(id);
        }
    }
    Step::Reply(codec::pubrel(pkid))
}

pub(super) fn on_pubrel(ctx: &Ctx, pkid: u16) -> Step {
    let found = ctx.session.lock().incoming_qos2.remove(&pkid);
    if let (true, Some(store)) = (found, ctx.store()) {
        store.qos2_in(&ctx.session.key, pkid, false);
    }
    Step::Reply(codec::pubcomp(ctx.proto, pkid, found))
}
