//! Blocking HTTP to one plug with ureq (run on the blocking pool, never on the async threads):
//! setup.xml, GetBinaryState, SetBinaryState, GetInsightParams. Bodies are capped; every
//! failure comes back as a short reason.

use super::wemo::{self, Insight, PlugState, Setup, BASICEVENT, INSIGHT, MAX_BODY};
use std::time::Duration;

#[derive(Clone)]
pub struct PlugClient {
    agent: ureq::Agent,
}

impl PlugClient {
    pub fn new(timeout: Duration) -> PlugClient {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into();
        PlugClient { agent }
    }

    fn read(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<String, String> {
        let mut resp = resp.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string()
            .map_err(|e| format!("body: {e}"))?;
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        Ok(body)
    }

    pub fn setup(&self, host: &str, port: u16) -> Result<Setup, String> {
        let body = Self::read(self.agent.get(format!("http://{host}:{port}/setup.xml")).call())?;
        wemo::parse_setup(&body).map_err(|e| e.to_string())
    }

    fn soap(
        &self,
        (host, port): (&str, u16),
        path: &str,
        service: &str,
        action: &str,
        args: &[(&str, &str)],
        value: &'static str,
    ) -> Result<String, String> {
        let resp = self
            .agent
            .post(format!("http://{host}:{port}{path}"))
            .header("Content-Type", "text/xml")
            .header("SOAPACTION", &wemo::soap_action(service, action))
            .send(wemo::soap_body(service, action, args));
        let body = Self::read(resp)?;
        wemo::soap_value(&body, value).map_err(|e| e.to_string())
    }

    pub fn state(&self, host: &str, port: u16, s: &Setup) -> Result<PlugState, String> {
        let v = self.soap(
            (host, port),
            &s.basicevent_url,
            BASICEVENT,
            "GetBinaryState",
            &[],
            "BinaryState",
        )?;
        wemo::parse_binary_state(&v)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "state `Error`".to_string())
    }

    /// Switches the plug; `None` when it already was in that state (the plug says `Error`).
    pub fn set(&self, host: &str, port: u16, s: &Setup, on: bool) -> Result<Option<PlugState>, String> {
        let v = self.soap(
            (host, port),
            &s.basicevent_url,
            BASICEVENT,
            "SetBinaryState",
            &[("BinaryState", if on { "1" } else { "0" })],
            "BinaryState",
        )?;
        wemo::parse_binary_state(&v).map_err(|e| e.to_string())
    }

    pub fn insight(&self, host: &str, port: u16, s: &Setup) -> Result<Insight, String> {
        let url = s.insight_url.as_deref().ok_or("no insight service")?;
        let v = self.soap((host, port), url, INSIGHT, "GetInsightParams", &[], "InsightParams")?;
        wemo::parse_insight(&v).map_err(|e| e.to_string())
    }
}
