//! The dashboard's HTTP port: `/healthz` and `/metrics` for supervisors and scrapers, and MQTT
//! over WebSocket on `/mqtt`, handed to the broker's front door (same users, ACLs and limits).
//! The page (`page/`, compiled in) is itself an MQTT client of `/mqtt`: it sees only what its
//! user's ACL lets it subscribe to. The endpoints read the gateway's state only through the
//! status document the gateway hands over.

pub mod metrics;

use crate::broker::FrontDoor;
use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the endpoints read.
pub struct View {
    /// The status document (`status.json`), replaced every status tick.
    pub status: Arc<ArcSwap<Value>>,
    /// When the router last delivered the gateway's probe (ms since epoch).
    pub router_contact: Arc<AtomicI64>,
    /// Where the bridges' spools live; must stay writable.
    pub spool_dir: PathBuf,
    /// `/info.json`: what the page shows before login (gateway id, version, how to connect).
    pub info: Value,
}

/// The page, compiled in: no request leaves the gateway.
const INDEX_HTML: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");

/// The `/info.json` document: gateway id, version, start time and every way to connect.
pub fn info(cfg: &crate::config::Config, broker_addrs: &[SocketAddr], dashboard: SocketAddr) -> Value {
    let ws = if cfg.dashboard.tls.is_some() { "wss" } else { "ws" };
    let mut listeners: Vec<Value> = cfg
        .broker
        .listeners
        .iter()
        .zip(broker_addrs)
        .map(|(l, a)| {
            let proto = format!("{:?}", l.protocol).to_lowercase();
            let url = match l.protocol {
                crate::config::ListenerProtocol::Ws | crate::config::ListenerProtocol::Wss => {
                    format!("{proto}://{a}/mqtt")
                }
                _ => format!("{proto}://{a}"),
            };
            serde_json::json!({ "protocol": proto, "url": url })
        })
        .collect();
    listeners.push(
        serde_json::json!({ "protocol": format!("{ws} (this port)"), "url": format!("{ws}://{dashboard}/mqtt") }),
    );
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    serde_json::json!({
        "gateway": cfg.gateway.id,
        "version": env!("CARGO_PKG_VERSION"),
        "started": started,
        "listeners": listeners,
    })
}

impl View {
    /// Healthy when the router routes and, with bridges configured, their spool directory
    /// takes a write. Returns the problems otherwise.
    pub fn health(&self) -> Vec<String> {
        let mut problems = vec![];
        let silent = crate::bridge::spool::now_ms() - self.router_contact.load(Ordering::Relaxed);
        if silent > crate::gateway::ROUTER_SILENCE_MS {
            problems.push(format!(
                "router has not routed the gateway's probe for {} s",
                silent / 1000
            ));
        }
        let status = self.status.load();
        let bridges: Vec<&str> = status["bridges"]
            .as_array()
            .map(|a| a.iter().filter_map(|b| b["name"].as_str()).collect())
            .unwrap_or_default();
        if !bridges.is_empty() {
            let probe = self.spool_dir.join(".healthz-probe");
            let res = std::fs::write(&probe, b"ok").and_then(|_| std::fs::remove_file(&probe));
            if let Err(e) = res {
                for b in bridges {
                    problems.push(format!(
                        "bridge {b}: spool directory {} not writable: {e}",
                        self.spool_dir.display()
                    ));
                }
            }
        }
        problems
    }
}

/// A bound dashboard port, ready to serve.
pub struct Dashboard {
    pub local: SocketAddr,
    tcp: TcpListener,
    /// Set for HTTPS; the handshake runs in the connection's task under a deadline.
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Dashboard {
    pub async fn bind(addr: SocketAddr, tls: Option<&crate::config::Tls>) -> Result<Dashboard> {
        let tls = match tls {
            Some(t) => Some(crate::broker::listener::tls_acceptor(t).context("dashboard.tls")?),
            None => None,
        };
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("dashboard.bind: cannot bind {addr}"))?;
        Ok(Dashboard {
            local: tcp.local_addr()?,
            tcp,
            tls,
        })
    }

    /// Accepts until `stop`; each connection is served in its own task.
    pub async fn run(self, door: FrontDoor, view: Arc<View>, stop: CancellationToken) {
        let local = self.local;
        loop {
            let (stream, peer) = tokio::select! {
                r = self.tcp.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        log::warn!("dashboard: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            // HTTP sockets hold a slot of the broker's socket limit too, so the page cannot
            // be used to exhaust file descriptors.
            let Ok(slot) = door.shared.sockets_allowed.clone().try_acquire_owned() else {
                log::warn!("dashboard: too many open sockets, dropping {peer}");
                continue;
            };
            let (door, view, stop, tls) = (door.clone(), view.clone(), stop.clone(), self.tls.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tls {
                    None => serve_http(stream, peer, local, door, view, stop).await,
                    Some(acceptor) => {
                        let deadline = door.shared.limits.connect_timeout.0;
                        match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => serve_http(s, peer, local, door, view, stop).await,
                            Ok(Err(e)) => log::info!("dashboard: {peer}: TLS handshake failed: {e}"),
                            Err(_) => log::info!("dashboard: {peer}: TLS handshake timed out"),
                        }
                    }
                }
            });
        }
    }
}

/// One HTTP/1 connection; `/mqtt` upgrades leave it for the front door.
async fn serve_http<S>(
    stream: S,
    peer: SocketAddr,
    local: SocketAddr,
    door: FrontDoor,
    view: Arc<View>,
    stop: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let (door, view) = (door.clone(), view.clone());
        async move { Ok::<_, std::convert::Infallible>(route(req, &door, &view, peer, local)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            log::debug!("dashboard: {peer}: {e}");
        },
        _ = stop.cancelled() => {}
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_str(content_type).expect("ascii"));
    r
}

fn route(req: Request<Incoming>, door: &FrontDoor, view: &View, peer: SocketAddr, local: SocketAddr) -> Reply {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
    }
    match req.uri().path() {
        "/healthz" => {
            let problems = view.health();
            let code = if problems.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::json!({ "healthy": problems.is_empty(), "problems": problems });
            reply(code, "application/json", body.to_string())
        }
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics::render(&view.status.load()),
        ),
        "/mqtt" => upgrade(req, door, peer, local),
        "/" | "/index.html" => reply(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML),
        "/app.js" => reply(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS),
        "/info.json" => reply(StatusCode::OK, "application/json", view.info.to_string()),
        p => reply(StatusCode::NOT_FOUND, "text/plain", format!("no such page: {p}\n")),
    }
}

/// Answers a WebSocket upgrade (RFC 6455) and passes the connection to the front door.
fn upgrade(mut req: Request<Incoming>, door: &FrontDoor, peer: SocketAddr, local: SocketAddr) -> Reply {
    let h = req.headers();
    let is_ws = h
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let (Some(key), true) = (h.get(SEC_WEBSOCKET_KEY), is_ws) else {
        return reply(
            StatusCode::UPGRADE_REQUIRED,
            "text/plain",
            "/mqtt takes MQTT over WebSocket\n",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let offered = h
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let door = door.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => door.adopt_websocket(TokioIo::new(up), peer, local),
            Err(e) => log::info!("dashboard: {peer}: WebSocket upgrade failed: {e}"),
        }
    });
    let mut r = reply(StatusCode::SWITCHING_PROTOCOLS, "text/plain", Bytes::new());
    r.headers_mut().remove(CONTENT_TYPE);
    let hs = r.headers_mut();
    hs.insert(UPGRADE, HeaderValue::from_static("websocket"));
    hs.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    hs.insert(SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&accept).expect("base64"));
    if let Some(p) = crate::broker::listener::mqtt_subprotocol(&offered) {
        hs.insert("sec-websocket-protocol", HeaderValue::from_str(p).expect("ascii"));
    }
    r
}
