//! Time-limited access to topics: grants `{who, topic filter, rights, from, until}` kept in
//! `<data_dir>/grants.json`, checked by the front door beside the static ACL. When a grant ends
//! (expiry or revocation), clients that hold a subscription only it allowed are disconnected
//! within a second. Grants come from `outpost grants`, from a privileged user's request topic,
//! or from a verified payment claim.

pub mod service;

use crate::broker::auth::{Identity, Who};
use crate::broker::topics;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const FORMAT: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Grant {
    pub id: String,
    /// `user:NAME` or `client:ID` (trailing `*` allowed).
    pub who: String,
    pub filter: String,
    #[serde(default)]
    pub subscribe: bool,
    #[serde(default)]
    pub publish: bool,
    /// Seconds since the epoch.
    pub not_before: u64,
    pub expires: u64,
    pub created: u64,
    /// `cli`, `request`, or `claim:<reference>`.
    pub source: String,
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GrantFile {
    pub format: u32,
    pub grants: Vec<Grant>,
}

pub fn now_secs() -> u64 {
    crate::devices::keystore::now_secs()
}

impl Grant {
    pub fn active(&self, now: u64) -> bool {
        !self.revoked && self.not_before <= now && now < self.expires
    }

    pub fn applies(&self, id: &Identity) -> bool {
        Who::parse(&self.who).is_ok_and(|w| w.applies(id))
    }

    pub fn allows_subscribe(&self, id: &Identity, filter: &str, now: u64) -> bool {
        self.subscribe
            && self.active(now)
            && self.applies(id)
            && topics::strip_share(filter).is_some_and(|f| topics::covers(&self.filter, f))
    }

    pub fn allows_publish(&self, id: &Identity, topic: &str, now: u64) -> bool {
        self.publish && self.active(now) && self.applies(id) && topics::matches(topic, &self.filter)
    }
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("grants.json")
}

pub fn load(path: &Path) -> Result<GrantFile> {
    let f: GrantFile = crate::system::jsonfile::load(path)?;
    if f.format > FORMAT {
        bail!(
            "{} was written by a newer outpost (format {})",
            path.display(),
            f.format
        );
    }
    Ok(f)
}

/// A new grant, checked and stored; `reference` (of a payment) may be used once only.
pub fn add(path: &Path, mut g: Grant, reference: Option<&str>) -> Result<Grant> {
    if Who::parse(&g.who)
        .map(|w| !matches!(w, Who::User(_) | Who::Client(_)))
        .unwrap_or(true)
    {
        bail!("who `{}` must be user:NAME or client:ID", g.who);
    }
    if !topics::valid_filter(&g.filter) || g.filter.starts_with('$') {
        bail!("`{}` is not a topic filter", g.filter);
    }
    if !g.subscribe && !g.publish {
        bail!("a grant needs subscribe and/or publish");
    }
    if g.expires <= g.not_before {
        bail!("a grant must end after it starts");
    }
    g.id = format!("{:012x}", rand::random::<u64>() >> 16);
    g.created = now_secs();
    let g = crate::system::jsonfile::update(path, load, |f: &mut GrantFile| {
        f.format = FORMAT;
        if let Some(r) = reference {
            if f.grants.iter().any(|x| x.source == format!("claim:{r}")) {
                bail!("payment reference `{r}` was already used");
            }
        }
        f.grants.push(g.clone());
        Ok(g)
    })?;
    audit("created", &g);
    Ok(g)
}

pub fn revoke(path: &Path, id: &str) -> Result<Grant> {
    let g = crate::system::jsonfile::update(path, load, |f: &mut GrantFile| {
        let g = f
            .grants
            .iter_mut()
            .find(|g| g.id == id)
            .with_context(|| format!("no grant `{id}`"))?;
        g.revoked = true;
        Ok(g.clone())
    })?;
    audit("revoked", &g);
    Ok(g)
}

/// One audit line per grant change (journald gets the fields as fields).
pub fn audit(what: &str, g: &Grant) {
    log::info!(
        target: "outpost::audit",
        grant_id = g.id.as_str(), grant_who = g.who.as_str(), grant_topic = g.filter.as_str(), grant_expires = g.expires, grant_source = g.source.as_str();
        "grant {} {what}: {} may {}{}{} {} until {} (from {})",
        g.id, g.who,
        if g.subscribe { "subscribe" } else { "" },
        if g.subscribe && g.publish { "/" } else { "" },
        if g.publish { "publish" } else { "" },
        g.filter, g.expires, g.source
    );
}
