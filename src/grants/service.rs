//! The grants service: keeps the front door's grants in step with the grants file (polled
//! every second), ends subscriptions whose grant ended (checked four times a second), and
//! answers grant requests and payment claims on the gateway's grant topics.

use super::{Grant, GrantFile};
use crate::broker::LocalClient;
use crate::broker::{Bus, GrantState, Shared};
use crate::config::{self, Verifier};
use bytes::Bytes;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Claims whose payment was not confirmed, or that were malformed or replayed.
pub static CLAIMS_REFUSED: AtomicU64 = AtomicU64::new(0);

pub struct GrantService {
    shared: Arc<Shared>,
    bus: Bus,
    cfg: config::Grants,
    path: PathBuf,
    request_topic: String,
    claim_topic: String,
}

impl GrantService {
    pub fn new(shared: Arc<Shared>, bus: Bus, cfg: config::Grants, gateway: &config::Gateway) -> GrantService {
        GrantService {
            shared,
            bus,
            cfg,
            path: super::path(&gateway.data_dir),
            request_topic: format!("outpost/{}/grants/request", gateway.id),
            claim_topic: format!("outpost/{}/grants/claim", gateway.id),
        }
    }

    /// Installs the grants from the file (before clients are let in).
    pub fn load(&self) -> anyhow::Result<()> {
        let f: GrantFile = super::load(&self.path)?;
        let now = crate::system::clock::now_secs();
        let list = f.grants.into_iter().filter(|g| !g.revoked && g.expires > now).collect();
        self.shared.access().set_grants(GrantState { list });
        self.shared
            .access()
            .restrict_topic(&self.request_topic, &self.cfg.admins);
        // Claims come from anyone the ACL lets publish there, though the topic is the gateway's.
        self.shared.access().open_topic(&self.claim_topic);
        Ok(())
    }

    /// Where replies may go: `reply_to` must lie under it (a claim cannot make the gateway
    /// publish anywhere else).
    fn reply_prefix(&self) -> String {
        self.request_topic.trim_end_matches("request").to_string() + "reply/"
    }

    /// Subscribed to the grant topics before clients are let in.
    pub async fn connect(&self) -> anyhow::Result<LocalClient> {
        let mut filters = vec![self.request_topic.clone()];
        if self.cfg.claims {
            filters.push(self.claim_topic.clone());
        }
        Ok(self.shared.local_client("grants", &filters))
    }

    pub async fn run(self: Arc<Self>, mut client: LocalClient, stop: CancellationToken) {
        let (work, mut queue) =
            tokio::sync::mpsc::channel::<std::sync::Arc<crate::broker::router::message::Message>>(64);
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(p) = queue.recv().await {
                let msg: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                let reply = if *p.topic == *me.request_topic {
                    me.request(&msg)
                } else {
                    me.claim(&msg).await
                };
                let prefix = me.reply_prefix();
                if let Some(to) = msg["reply_to"]
                    .as_str()
                    .filter(|t| t.starts_with(&prefix) && crate::broker::topics::valid_topic(t))
                {
                    me.bus.publish(to, Bytes::from(reply.to_string()), 1, false, None).await;
                }
                let _ = me.load();
                me.shared.enforce_subscriptions();
            }
        });
        let mut mtime = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut polls = 0u32;
        loop {
            tokio::select! {
                // A retained request would come back at every restart: only live ones count.
                // Handled in order by the worker, off this loop: a slow verifier must not hold
                // up the expiry checks below.
                d = client.recv() => if !d.retain && work.try_send(d.msg).is_err() {
                    CLAIMS_REFUSED.fetch_add(1, Ordering::Relaxed);
                    log::warn!("grants: too many requests waiting; one dropped");
                },
                _ = tick.tick() => {
                    polls += 1;
                    if polls.is_multiple_of(4) {
                        let now = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
                        if now != mtime {
                            mtime = now;
                            if let Err(e) = self.load() {
                                log::error!("grants: {e:#}; keeping the grants loaded before");
                            }
                        }
                    }
                    // Expiry is checked against the clock, so an ended grant stops allowing at
                    // once; connections still holding what it alone allowed are closed here.
                    self.shared.enforce_subscriptions();
                }
                _ = stop.cancelled() => return,
            }
        }
    }

    /// `{"action": "add", "who": "user:alice", "topic": "...", "subscribe": true, "publish": false,
    /// "for": "1h" | "until": <secs>, "from": <secs>}` or `{"action": "revoke", "id": "..."}`.
    fn request(&self, m: &Value) -> Value {
        let res = match m["action"].as_str() {
            Some("add") => self.grant_from(m, "request", None),
            Some("revoke") => m["id"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("no id"))
                .and_then(|id| super::revoke(&self.path, id)),
            _ => Err(anyhow::anyhow!("action must be add or revoke")),
        };
        match res {
            Ok(g) => json!({ "ok": true, "grant": g }),
            Err(e) => json!({ "ok": false, "error": e.to_string() }),
        }
    }

    fn grant_from(&self, m: &Value, source: &str, reference: Option<&str>) -> anyhow::Result<Grant> {
        let now = crate::system::clock::now_secs();
        let from = m["from"].as_u64().unwrap_or(now);
        let until = match (m["until"].as_u64(), m["for"].as_str()) {
            (Some(u), _) => u,
            (None, Some(d)) => from.saturating_add(humantime::parse_duration(d)?.as_secs()),
            _ => anyhow::bail!("give `until` (seconds) or `for` (a duration)"),
        };
        let g = Grant {
            id: String::new(),
            who: m["who"].as_str().unwrap_or_default().to_string(),
            filter: m["topic"].as_str().unwrap_or_default().to_string(),
            subscribe: m["subscribe"].as_bool().unwrap_or(true),
            publish: m["publish"].as_bool().unwrap_or(false),
            not_before: from,
            expires: until,
            created: 0,
            source: source.to_string(),
            revoked: false,
        };
        super::add(&self.path, g, reference)
    }

    /// `{"user": "alice", "amount": 500, "reference": "tx-1", "topic": "sensor/kitchen/live"}`:
    /// one topic (never a wildcard), priced by the first price whose topic covers it, confirmed
    /// by the verifier.
    async fn claim(&self, m: &Value) -> Value {
        let refuse = |why: String| {
            CLAIMS_REFUSED.fetch_add(1, Ordering::Relaxed);
            log::info!(target: "outpost::audit", "claim refused: {why}");
            json!({ "ok": false, "error": why })
        };
        let (Some(user), Some(amount), Some(reference), Some(topic)) = (
            m["user"].as_str(),
            m["amount"].as_u64(),
            m["reference"].as_str(),
            m["topic"].as_str(),
        ) else {
            return refuse("a claim needs user, amount, reference and topic".into());
        };
        if user.is_empty() || user.contains(['/', '+', '#', '*']) || reference.is_empty() {
            return refuse("bad user or reference".into());
        }
        // A claim buys one topic: a price is for each topic it covers, so a wildcard would buy
        // every one of them for the price of one.
        if !crate::broker::topics::valid_topic(topic) || topic.starts_with('$') {
            return refuse(format!(
                "`{topic}` is not one topic: a claim buys one topic (no + or #), each at its price"
            ));
        }
        let Some(price) = self
            .cfg
            .prices
            .iter()
            .find(|p| crate::broker::topics::covers(&p.topic, topic))
        else {
            return refuse(format!("`{topic}` is not for sale"));
        };
        let units = amount / price.price;
        if units == 0 {
            return refuse(format!("{amount} is less than the price {}", price.price));
        }
        let verified = match &self.cfg.verifier {
            Some(v) => verify(v.clone(), reference.to_string(), amount, user.to_string()).await,
            None => Err("no verifier configured".into()),
        };
        if let Err(why) = verified {
            return refuse(format!("payment `{reference}` not confirmed: {why}"));
        }
        let secs = price.per.0.as_secs().saturating_mul(units);
        let request = json!({ "who": format!("user:{user}"), "topic": topic, "subscribe": true, "until": crate::system::clock::now_secs().saturating_add(secs) });
        match self.grant_from(&request, &format!("claim:{reference}"), Some(reference)) {
            Ok(g) => json!({ "ok": true, "grant": g }),
            Err(e) => refuse(e.to_string()),
        }
    }
}

/// Asks the configured verifier whether a payment is real (off the async threads, 10 s at most).
async fn verify(v: Verifier, reference: String, amount: u64, user: String) -> Result<(), String> {
    if let Some(cmd) = &v.command {
        return verify_command(cmd, &reference, amount, &user).await;
    }
    let job = tokio::task::spawn_blocking(move || match (v.url, v.command) {
        (Some(url), _) => {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(10)))
                .http_status_as_error(false)
                .build()
                .into();
            let body = json!({ "reference": reference, "amount": amount, "user": user }).to_string();
            let mut resp = agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(body)
                .map_err(|e| e.to_string())?;
            let status = resp.status();
            let text = resp
                .body_mut()
                .with_config()
                .limit(64 * 1024)
                .read_to_string()
                .map_err(|e| e.to_string())?;
            let valid = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["valid"].as_bool())
                .unwrap_or(false);
            if status.is_success() && valid {
                Ok(())
            } else {
                Err(format!(
                    "verifier answered {status}: {}",
                    text.chars().take(200).collect::<String>()
                ))
            }
        }
        (None, _) => Err("no verifier configured".into()),
    });
    match tokio::time::timeout(Duration::from_secs(15), job).await {
        Ok(Ok(r)) => r,
        _ => Err("verifier did not answer".into()),
    }
}

/// A verifier command, killed if it takes longer than 15 s. It gets no arguments: the claim
/// comes on standard input as one JSON line `{"reference": ..., "amount": ..., "user": ...}`,
/// so nothing a claimant writes can become an option of the command.
async fn verify_command(cmd: &str, reference: &str, amount: u64, user: &str) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let line = json!({ "reference": reference, "amount": amount, "user": user }).to_string() + "\n";
    let run = async {
        let mut child = tokio::process::Command::new(cmd)
            .stdin(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            // A command that does not read its input may close it: its exit status still counts.
            let _ = stdin.write_all(line.as_bytes()).await;
        }
        child.wait().await
    };
    match tokio::time::timeout(Duration::from_secs(15), run).await {
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => Err(format!("{cmd} said no ({st})")),
        Ok(Err(e)) => Err(format!("{cmd}: {e}")),
        Err(_) => Err(format!("{cmd} did not answer in 15 s")),
    }
}
