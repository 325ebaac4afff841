//! What `/mqtt` checks before the broker's front door sees a WebSocket client:
//!
//! - **Origin.** A browser sends `Origin` with every WebSocket; a page from another site must not
//!   reach the broker through the operator's browser. Allowed: no `Origin` (not a browser), the
//!   dashboard's own origin (the `Host` it was reached at, when that host is an IP address or
//!   `localhost`: a DNS name could be re-pointed at this port by another site), and the
//!   configured `dashboard.origins`.
//!
//! Anonymous clients are the broker's to refuse: the front door is told whether
//! `dashboard.anonymous` is set, and answers an anonymous CONNECT with the CONNACK code of its
//! protocol version when it is not.

/// Is a WebSocket from `origin` to this port allowed?
pub fn origin_allowed(origin: Option<&str>, host: Option<&str>, tls: bool, extra: &[String]) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    if extra.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
        return true;
    }
    let Some(host) = host else {
        return false;
    };
    let own = format!("{}://{host}", if tls { "https" } else { "http" });
    own.eq_ignore_ascii_case(origin) && host_is_literal(host)
}

/// `127.0.0.1:8080`, `[::1]:8080`, `localhost:8080`: names no other site can point here.
fn host_is_literal(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => {
            return rest
                .split(']')
                .next()
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_own_literal_hosts_and_listed_ones_only() {
        let none: &[String] = &[];
        assert!(origin_allowed(None, Some("127.0.0.1:8080"), false, none));
        assert!(origin_allowed(
            Some("http://127.0.0.1:8080"),
            Some("127.0.0.1:8080"),
            false,
            none
        ));
        assert!(origin_allowed(
            Some("http://localhost:8080"),
            Some("localhost:8080"),
            false,
            none
        ));
        assert!(origin_allowed(
            Some("http://[::1]:8080"),
            Some("[::1]:8080"),
            false,
            none
        ));
        assert!(!origin_allowed(
            Some("https://evil.example"),
            Some("127.0.0.1:8080"),
            false,
            none
        ));
        // DNS rebinding: evil.example pointed at 127.0.0.1, same-origin by name.
        assert!(!origin_allowed(
            Some("http://evil.example:8080"),
            Some("evil.example:8080"),
            false,
            none
        ));
        assert!(!origin_allowed(
            Some("http://127.0.0.1:8080"),
            Some("127.0.0.1:8080"),
            true,
            none
        ));
        let listed = vec!["https://ops.example".to_string()];
        assert!(origin_allowed(
            Some("https://ops.example"),
            Some("gw.example"),
            false,
            &listed
        ));
        assert!(!origin_allowed(Some("null"), Some("127.0.0.1:8080"), false, &listed));
    }
}
