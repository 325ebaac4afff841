//! Config of time-limited access grants (the service is in `src/grants/`).

use super::Dur;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Grants {
    /// Users who may publish grant requests on `outpost/<gateway.id>/grants/request`.
    pub admins: Vec<String>,
    /// Accept payment claims on `outpost/<gateway.id>/grants/claim` (checked by `verifier`).
    pub claims: bool,
    /// What a grant costs: `{ topic: "sensor/+/live", price: 500, per: 1h }`.
    pub prices: Vec<Price>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verifier: Option<Verifier>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub topic: String,
    pub price: u64,
    pub per: Dur,
}

/// Confirms a payment: an HTTP endpoint (POST JSON, answers 200 with `{"valid": true}`) or a
/// command (run with no arguments, the claim on standard input as one JSON line
/// `{"reference", "amount", "user"}`; exit 0 means paid).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Verifier {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

pub(super) fn validate(g: &Grants) -> Result<(), (String, String)> {
    for (i, p) in g.prices.iter().enumerate() {
        if !crate::topic::valid_filter(&p.topic) {
            return Err((
                format!("grants.prices[{i}].topic"),
                format!("`{}` is not a topic filter", p.topic),
            ));
        }
        if p.price == 0 || p.per.0.is_zero() {
            return Err((format!("grants.prices[{i}]"), "price and per must be above 0".into()));
        }
    }
    if g.claims && (g.verifier.is_none() || g.prices.is_empty()) {
        return Err((
            "grants.claims".into(),
            "claims need a verifier and at least one price".into(),
        ));
    }
    if let Some(v) = &g.verifier {
        if v.url.is_some() == v.command.is_some() {
            return Err(("grants.verifier".into(), "give `url` or `command`, one of them".into()));
        }
        if let Some(u) = v
            .url
            .as_ref()
            .filter(|u| !u.starts_with("http://") && !u.starts_with("https://"))
        {
            return Err(("grants.verifier.url".into(), format!("`{u}` is not an http(s) URL")));
        }
    }
    Ok(())
}
