//! Time-limited access to topics: grants `{who, topic filter, rights, from, until}` kept in
//! `<data_dir>/grants.json`, checked by the front door beside the static ACL. When a grant ends
//! (expiry or revocation), clients that hold a subscription only it allowed are disconnected
//! within a second. Grants come from `outpost grants`, from a privileged user's request topic,
//! or from a verified payment claim.

pub mod service;

use crate::broker::auth::Who;
pub use crate::broker::grant::Grant;
use crate::broker::topics;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const FORMAT: u32 = 1;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GrantFile {
    pub format: u32,
    pub grants: Vec<Grant>,
}

use crate::system::clock::now_secs;

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
    match Who::parse(&g.who) {
        Ok(Who::User(name)) if !name.ends_with('*') && !name.contains(['/', '+', '#']) => {}
        Ok(Who::Client(_)) => bail!(
            "who `{}`: a grant names a logged-in user (user:NAME); a client id proves nothing, \
             anyone may connect with it",
            g.who
        ),
        _ => bail!("who `{}` must be user:NAME", g.who),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::auth::Identity;

    fn grant(who: &str) -> Grant {
        Grant {
            id: String::new(),
            who: who.into(),
            filter: "sensor/kiosk/live".into(),
            subscribe: true,
            publish: false,
            not_before: 0,
            expires: u64::MAX,
            created: 0,
            source: "cli".into(),
            revoked: false,
        }
    }

    fn id(user: Option<&str>, client: &str, device: bool) -> Identity {
        Identity {
            username: user.map(str::to_string),
            client_id: client.into(),
            listener: "127.0.0.1:1883".into(),
            device,
        }
    }

    #[test]
    fn a_client_id_grant_is_refused_and_one_on_file_grants_nothing() {
        let d = tempfile::tempdir().unwrap();
        let e = add(&path(d.path()), grant("client:kiosk-7"), None).unwrap_err();
        assert!(e.to_string().contains("user:NAME"), "{e}");
        let old = grant("client:kiosk-7");
        assert!(!old.allows_subscribe(&id(None, "kiosk-7", false), "sensor/kiosk/live", 1));
        assert!(!old.allows_subscribe(&id(Some("bob"), "kiosk-7", false), "sensor/kiosk/live", 1));
        let user = grant("user:kiosk");
        assert!(user.allows_subscribe(&id(Some("kiosk"), "any", false), "sensor/kiosk/live", 1));
        assert!(
            !user.allows_subscribe(&id(Some("kiosk"), "any", true), "sensor/kiosk/live", 1),
            "a device named like the user"
        );
        assert!(add(&path(d.path()), grant("user:kiosk*"), None).is_err());
    }
}
