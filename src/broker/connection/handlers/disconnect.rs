//! DISCONNECT from a client: its reason decides whether the will goes, and MQTT 5 may change
//! the session expiry (but not raise it from 0).

use super::Step;
use crate::broker::codec::Goodbye;
use crate::broker::connection::{Ctx, End};
use crate::broker::metrics::Metrics;

pub(super) fn on_disconnect(ctx: &Ctx, reason: u8, session_expiry: Option<u32>) -> Step {
    let shared = &ctx.shared;
    if let Some(e) = session_expiry {
        if ctx.zero_expiry_at_connect && e != 0 {
            Metrics::inc(&shared.metrics.malformed_packets);
            return Step::Close(Goodbye::ProtocolError, "session expiry raised from 0 at DISCONNECT");
        }
        ctx.session.lock().expiry = e.min(shared.sessions_cfg.max_session_expiry);
    }
    // Only a normal disconnection (0x00) discards the will [MQTT-3.1.2-10]; 0x04 asks for it,
    // and any error reason leaves it to be published.
    if reason != 0x00 {
        return Step::End(End::DisconnectWithWill);
    }
    // A session that ends here is ended before the socket closes, so a client that reconnects
    // at once cannot find it still there.
    if ctx.session.lock().expiry == 0 {
        shared.detach(&ctx.session, ctx.gen, None);
    }
    Step::End(End::Disconnected)
}
