//! The WeMo plug's side of the wire: SOAP requests as pywemo sends them, and parsers for what
//! plugs answer (setup.xml, BinaryState, InsightParams) that accept the real firmware's quirks
//! and refuse anything that would publish a wrong number.

use std::fmt;

pub const BASICEVENT: &str = "urn:Belkin:service:basicevent:1";
pub const INSIGHT: &str = "urn:Belkin:service:insight:1";
/// The ports WeMo plugs listen on, in the order pywemo probes them.
pub const PROBE_PORTS: [u16; 9] = [49153, 49152, 49154, 49151, 49155, 49156, 49157, 49158, 49159];
/// Largest response body read from a plug.
pub const MAX_BODY: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WemoError {
    Xml(String),
    Fault(String),
    Missing(&'static str),
    Fields(String),
}

impl fmt::Display for WemoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WemoError::Xml(e) => write!(f, "not XML: {e}"),
            WemoError::Fault(e) => write!(f, "SOAP fault: {e}"),
            WemoError::Missing(what) => write!(f, "no {what} in the reply"),
            WemoError::Fields(e) => write!(f, "bad fields: {e}"),
        }
    }
}

/// A SOAP request body, byte for byte as pywemo sends it.
pub fn soap_body(service: &str, action: &str, args: &[(&str, &str)]) -> String {
    let args: String = args
        .iter()
        .map(|(k, v)| format!("<{k}>{v}</{k}>"))
        .collect::<Vec<_>>()
        .join("\n");
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\">\n<s:Body>\n<u:{action} xmlns:u=\"{service}\">\n{args}\n</u:{action}>\n</s:Body>\n</s:Envelope>"
    )
}

/// The SOAPACTION header value (with its double quotes).
pub fn soap_action(service: &str, action: &str) -> String {
    format!("\"{service}#{action}\"")
}

fn parse_xml(text: &str) -> Result<roxmltree::Document<'_>, WemoError> {
    // Some firmware starts documents with a BOM or ends them with garbage.
    let text = text.trim_start_matches('\u{feff}').trim();
    roxmltree::Document::parse(text).map_err(|e| WemoError::Xml(e.to_string()))
}

/// The text of the first element named `name` in a SOAP reply (the response element's
/// namespace is ignored: real Insight firmware answers in the wrong one). A Fault is an error.
pub fn soap_value(text: &str, name: &'static str) -> Result<String, WemoError> {
    let trimmed = text.trim_start_matches('\u{feff}').trim();
    let doc = parse_xml(trimmed)?;
    if let Some(fault) = doc.descendants().find(|n| n.tag_name().name() == "Fault") {
        let text_of = |name: &str| {
            fault
                .descendants()
                .find(|n| n.tag_name().name() == name)
                .and_then(|n| n.text())
        };
        let why = text_of("errorDescription")
            .or_else(|| text_of("faultstring"))
            .unwrap_or("unknown");
        return Err(WemoError::Fault(why.to_string()));
    }
    doc.descendants()
        .find(|n| n.tag_name().name() == name)
        .map(|n| n.text().unwrap_or("").trim().to_string())
        .ok_or(WemoError::Missing(name))
}

/// On, off, or on with the load below the standby threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlugState {
    Off,
    On,
    Standby,
}

impl PlugState {
    pub fn name(self) -> &'static str {
        match self {
            PlugState::Off => "off",
            PlugState::On => "on",
            PlugState::Standby => "standby",
        }
    }
    fn from_code(code: &str) -> Result<PlugState, WemoError> {
        match code {
            "0" => Ok(PlugState::Off),
            "1" => Ok(PlugState::On),
            "8" => Ok(PlugState::Standby),
            other => Err(WemoError::Fields(format!("state `{other}` is not 0, 1 or 8"))),
        }
    }
}

/// A BinaryState value: a single state, or an Insight's 10-field form (state first).
/// `Error` (setting the state the plug already has) is `None`.
pub fn parse_binary_state(v: &str) -> Result<Option<PlugState>, WemoError> {
    if v == "Error" {
        return Ok(None);
    }
    PlugState::from_code(v.split('|').next().unwrap_or("")).map(Some)
}

/// An Insight reading, in the units people read.
#[derive(Clone, Debug, PartialEq)]
pub struct Insight {
    pub state: PlugState,
    pub power_w: f64,
    pub today_kwh: f64,
    pub total_kwh: f64,
    pub threshold_w: f64,
}

/// mW·minutes to kWh.
const MW_MIN_TO_KWH: f64 = 1.0 / 60_000_000.0;

/// The 11-field InsightParams string; anything else is refused rather than guessed.
pub fn parse_insight(v: &str) -> Result<Insight, WemoError> {
    let f: Vec<&str> = v.split('|').collect();
    if f.len() != 11 {
        return Err(WemoError::Fields(format!("{} fields, expected 11", f.len())));
    }
    let int = |i: usize| {
        f[i].trim()
            .parse::<i64>()
            .map_err(|_| WemoError::Fields(format!("field {i} `{}` is not an integer", f[i])))
    };
    let num = |i: usize| {
        f[i].trim()
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| WemoError::Fields(format!("field {i} `{}` is not a non-negative number", f[i])))
    };
    for i in 1..=4 {
        int(i)?;
    }
    Ok(Insight {
        state: PlugState::from_code(f[0].trim())?,
        power_w: num(7)? / 1000.0,
        today_kwh: num(8)? * MW_MIN_TO_KWH,
        total_kwh: num(9)? * MW_MIN_TO_KWH,
        threshold_w: num(10)? / 1000.0,
    })
}

/// What setup.xml says about a plug.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setup {
    pub name: String,
    pub udn: String,
    pub model: String,
    pub insight: bool,
    pub basicevent_url: String,
    pub insight_url: Option<String>,
}

pub fn parse_setup(text: &str) -> Result<Setup, WemoError> {
    let doc = parse_xml(text)?;
    let device = doc
        .descendants()
        .find(|n| n.tag_name().name() == "device")
        .ok_or(WemoError::Missing("device"))?;
    let field = |name: &'static str| {
        device
            .children()
            .find(|n| n.tag_name().name() == name)
            .and_then(|n| n.text())
            .map(|t| t.trim().to_string())
            .ok_or(WemoError::Missing(name))
    };
    let manufacturer = field("manufacturer")?;
    if manufacturer != "Belkin International Inc." {
        return Err(WemoError::Fields(format!(
            "manufacturer `{manufacturer}` is not Belkin"
        )));
    }
    let services: Vec<(String, String)> = device
        .descendants()
        .filter(|n| n.tag_name().name() == "service")
        .filter_map(|s| {
            let get = |k: &str| {
                s.children()
                    .find(|n| n.tag_name().name() == k)
                    .and_then(|n| n.text())
                    .map(str::trim)
            };
            Some((get("serviceType")?.to_string(), get("controlURL")?.to_string()))
        })
        .collect();
    let url = |st: &str| services.iter().find(|(t, _)| t == st).map(|(_, u)| u.clone());
    let udn = field("UDN")?;
    let device_type = field("deviceType")?;
    Ok(Setup {
        name: field("friendlyName")?,
        model: field("modelName")?,
        insight: device_type.contains("insight") || udn.starts_with("uuid:Insight"),
        basicevent_url: url(BASICEVENT).ok_or(WemoError::Missing("basicevent service"))?,
        insight_url: url(INSIGHT),
        udn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const INSIGHT_REPLY: &str = "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\n<u:GetInsightParamsResponse xmlns:u=\"urn:Belkin:service:metainfo:1\">\r\n<InsightParams>0|1611532924|231|300|183183|1209600|8|0|1164707|99830512.000000|8000</InsightParams>\r\n</u:GetInsightParamsResponse>\r\n</s:Body> </s:Envelope>";

    #[test]
    fn requests_are_byte_exact() {
        assert_eq!(soap_body(BASICEVENT, "GetBinaryState", &[]).len(), 278);
        assert_eq!(soap_body(INSIGHT, "GetInsightParams", &[]).len(), 279);
        assert_eq!(
            soap_body(BASICEVENT, "SetBinaryState", &[("BinaryState", "1")]).len(),
            306
        );
        assert_eq!(
            soap_action(BASICEVENT, "GetBinaryState"),
            "\"urn:Belkin:service:basicevent:1#GetBinaryState\""
        );
    }

    #[test]
    fn real_replies_parse_with_their_quirks() {
        let v = soap_value(INSIGHT_REPLY, "InsightParams").unwrap();
        let i = parse_insight(&v).unwrap();
        assert_eq!(i.state, PlugState::Off);
        assert!((i.today_kwh - 0.0194118).abs() < 1e-6 && (i.total_kwh - 1.6638418).abs() < 1e-6);
        assert_eq!((i.power_w, i.threshold_w), (0.0, 8.0));
        assert_eq!(
            parse_binary_state("8|1611530424|231|300|183183|1209600|8|1190|1164707|99830512").unwrap(),
            Some(PlugState::Standby)
        );
        assert_eq!(parse_binary_state("Error").unwrap(), None);
        let fault = "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Body><s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail><UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\"><errorCode>-1</errorCode><errorDescription>Invalid Action</errorDescription></UPnPError></detail></s:Fault></s:Body></s:Envelope>";
        assert_eq!(
            soap_value(fault, "BinaryState"),
            Err(WemoError::Fault("Invalid Action".into()))
        );
        assert!(soap_value("\u{feff}<a><BinaryState>1</BinaryState></a>  garbage?", "BinaryState").is_err());
        assert_eq!(
            soap_value("\u{feff}<a><BinaryState>1</BinaryState></a>\n", "BinaryState").unwrap(),
            "1"
        );
    }

    #[test]
    fn wrong_readings_are_refused() {
        assert!(parse_insight("0|1|2|3|4|5|6|7|8|9").is_err(), "10 fields");
        assert!(parse_insight("0|1|2|3|4|5|6|7|8|9|10|11").is_err(), "12 fields");
        assert!(parse_insight("0|x|2|3|4|5|6|7|8|9|10").is_err());
        assert!(parse_insight("0|1|2|3|4|5|6|-7|8|9|10").is_err());
        assert!(parse_insight("0|1|2|3|4|5|6|NaN|8|9|10").is_err());
        assert!(parse_insight("5|1|2|3|4|5|6|7|8|9|10").is_err());
    }

    proptest! {
        // Whatever a plug sends: an error or a sane reading, never a panic.
        #[test]
        fn parsers_never_panic(s in ".{0,300}") {
            let _ = soap_value(&s, "BinaryState");
            let _ = parse_setup(&s);
            let _ = parse_binary_state(&s);
            if let Ok(i) = parse_insight(&s) {
                prop_assert!(i.power_w.is_finite() && i.power_w >= 0.0);
            }
        }

        #[test]
        fn readings_round_trip(mw in 0u32..10_000_000, today in 0u64..u32::MAX as u64, state in prop::sample::select(vec!["0", "1", "8"])) {
            let s = format!("{state}|1611532924|231|300|183183|1209600|8|{mw}|{today}|99830512.000000|8000");
            let i = parse_insight(&s).unwrap();
            prop_assert!((i.power_w - mw as f64 / 1000.0).abs() < 1e-9);
            prop_assert_eq!(i.state.name(), match state { "0" => "off", "1" => "on", _ => "standby" });
        }
    }
}
