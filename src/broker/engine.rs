//! The routing engine: rumqttd on the gateway's own tokio runtime, listening only on loopback
//! ports that the front door alone can log in to (a random secret made at every start).
//! The engine never sees a client directly, which keeps its known bugs out of reach: the front
//! door escapes client ids it would choke on, keeps below its connection limit, and always
//! reads its CONNACK before closing (see ARCHITECTURE.md).

use anyhow::{bail, Context, Result};
use rand::Rng;
use rumqttd::protocol::{v4::V4, v5::V5};
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::time::Duration;

/// How to reach the engine.
#[derive(Clone)]
pub struct Engine {
    pub v4: SocketAddr,
    pub v5: SocketAddr,
    pub user: String,
    pub secret: String,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("v4", &self.v4)
            .field("v5", &self.v5)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

pub struct EngineLimits {
    pub max_connections: usize,
    pub max_packet_size: usize,
    pub segment_size: usize,
    pub segments: usize,
}

fn free_port() -> Result<SocketAddr> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl Engine {
    pub async fn start(limits: EngineLimits) -> Result<Engine> {
        let secret: String = rand::rng()
            .random::<[u8; 24]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let user = "outpost-front-door".to_string();
        let router = Router::new(
            0,
            RouterConfig {
                // Room for the front door's own clients (status, restore) above the client limit.
                max_connections: limits.max_connections + 64,
                max_outgoing_packet_count: 200,
                max_segment_size: limits.segment_size,
                max_segment_count: limits.segments,
                ..Default::default()
            },
        );
        let router_tx = router.spawn();
        let settings = |name: &str, listen: SocketAddr| ServerSettings {
            name: name.to_string(),
            listen,
            tls: None,
            next_connection_delay_ms: 0,
            connections: ConnectionSettings {
                connection_timeout_ms: 10_000,
                // The front door enforces the client limit; the engine must never cut first.
                max_payload_size: limits.max_packet_size + 1024,
                max_inflight_count: 100,
                auth: Some(HashMap::from([(user.clone(), secret.clone())])),
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let mut addrs = vec![];
        for (name, v5) in [("engine-v4", false), ("engine-v5", true)] {
            let mut last_err = None;
            let mut bound = None;
            // The port is chosen free and handed to rumqttd, which binds it itself; retry if
            // something else took it in between.
            for _ in 0..5 {
                let addr = free_port()?;
                let s = settings(name, addr);
                let handle = if v5 {
                    let mut srv = Server::new(s, router_tx.clone(), V5);
                    tokio::spawn(async move { srv.start(LinkType::Remote).await })
                } else {
                    let mut srv = Server::new(s, router_tx.clone(), V4);
                    tokio::spawn(async move { srv.start(LinkType::Remote).await })
                };
                match wait_listening(addr, &handle).await {
                    Ok(()) => {
                        bound = Some(addr);
                        break;
                    }
                    Err(e) => {
                        handle.abort();
                        last_err = Some(e)
                    }
                }
            }
            match bound {
                Some(a) => addrs.push(a),
                None => {
                    return Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no port")))
                        .context("starting the MQTT engine")
                }
            }
        }
        Ok(Engine {
            v4: addrs[0],
            v5: addrs[1],
            user,
            secret,
        })
    }
}

async fn wait_listening<T>(addr: SocketAddr, handle: &tokio::task::JoinHandle<T>) -> Result<()> {
    for _ in 0..200 {
        if handle.is_finished() {
            bail!("engine listener on {addr} stopped at start");
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("engine listener on {addr} did not come up")
}

/// Client ids the engine refuses (and, refused twice, lets poison its listener) hold `+ $ # /`.
/// Escaping them keeps every client id usable and distinct: `%` becomes `%25`, and so on.
pub fn escape_client_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for c in id.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            '+' => out.push_str("%2B"),
            '#' => out.push_str("%23"),
            '$' => out.push_str("%24"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape_client_id;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn escaped_ids_are_safe_and_distinct(a in ".{0,12}", b in ".{0,12}") {
            let (ea, eb) = (escape_client_id(&a), escape_client_id(&b));
            prop_assert!(!ea.contains(['+', '$', '#', '/']));
            prop_assert_eq!(a == b, ea == eb);
        }
    }
}
