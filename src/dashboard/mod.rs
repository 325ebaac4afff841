//! The dashboard's HTTP port: `/healthz` and `/metrics` for supervisors and scrapers, and MQTT
//! over WebSocket on `/mqtt`, handed to the broker's front door (same users, ACLs and limits)
//! once [`gate`] has checked its `Origin` and that it names a user. The page (`page/`, compiled
//! in) is itself an MQTT 5 client of `/mqtt`: it sees only what its user's ACL lets it read, and
//! every action it takes is a PUBLISH checked by the broker. `/api/me` tells it what its user
//! may read; `/api/problems` what went wrong lately (counts from the status document, names from
//! the broker's ring of security events, `broker::events`). Otherwise the endpoints read the
//! gateway's state only through the status document the gateway hands over.
//!
//! Bound off loopback, `/metrics` and `/info.json` need a broker user's login or the
//! `dashboard.token`, and `/healthz` says only whether the gateway is healthy.

pub mod api;
pub mod gate;
pub mod metrics;

use crate::broker::FrontDoor;
use crate::status_doc::StatusDoc;
use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, HOST, ORIGIN, SEC_WEBSOCKET_ACCEPT,
    SEC_WEBSOCKET_KEY, UPGRADE, WWW_AUTHENTICATE,
};
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
    pub status: Arc<ArcSwap<StatusDoc>>,
    /// When the router last delivered the gateway's probe (ms since epoch).
    pub router_contact: Arc<AtomicI64>,
    /// Where the bridges' spools live; must stay writable.
    pub spool_dir: PathBuf,
    /// `/info.json`: what the page shows before login (gateway id, version, how to connect).
    pub info: Value,
    /// What the dashboard needs from the config.
    pub settings: api::Settings,
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
    let started = crate::system::clock::now_secs();
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
        let silent = crate::system::clock::now_ms() - self.router_contact.load(Ordering::Relaxed);
        if silent > crate::config::ROUTER_SILENCE_MS {
            problems.push(format!(
                "router has not routed the gateway's probe for {} s",
                silent / 1000
            ));
        }
        let status = self.status.load();
        if status.stores.retained.failing {
            problems.push(
                "retained store: its last write failed (a full disk?); QoS 1/2 retained publishes are refused".into(),
            );
        }
        let bridges: Vec<&str> = status.bridges.iter().map(|b| b.name.as_str()).collect();
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
    /// Binds `addr`. An address that does not bind is an error naming it and why, so the
    /// gateway refuses to start; only the default address, when another program holds it,
    /// gives way: `Ok(None)`, no dashboard, and a warning saying so.
    pub async fn bind(addr: SocketAddr, tls: Option<&crate::config::Tls>) -> Result<Option<Dashboard>> {
        let tls = match tls {
            Some(t) => Some(crate::broker::listener::tls_acceptor(t).context("dashboard.tls")?),
            None => None,
        };
        let tcp = match TcpListener::bind(addr).await {
            Ok(t) => t,
            // The default comes on by itself: another program on 8080 must not keep the
            // gateway from starting. An address someone wrote must bind.
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && addr.to_string() == crate::config::DEFAULT_DASHBOARD_BIND =>
            {
                log::warn!(
                    "dashboard: the default address {addr} is in use ({e}); the dashboard is off. \
                     Set dashboard.bind to another address, or `dashboard.bind: null` to say so"
                );
                return Ok(None);
            }
            Err(e) => return Err(e).with_context(|| format!("dashboard.bind: cannot bind {addr}")),
        };
        Ok(Some(Dashboard {
            local: tcp.local_addr()?,
            tcp,
            tls,
        }))
    }

    /// Accepts until `stop`; each connection is served in its own task.
    pub async fn run(self, door: FrontDoor, view: Arc<View>, stop: CancellationToken) {
        let local = self.local;
        let tcp = self.tcp;
        let info = view.info.clone();
        let settings = view.settings.clone();
        // Bridge requests are for the dashboard's admins alone, whatever the ACL says.
        door.shared
            .access()
            .restrict_topic(&settings.bridge_request_topic(), &settings.admins);
        let ctx = Arc::new(Ctx {
            door: door.clone(),
            view,
            info,
            settings,
            logins: api::Logins::default(),
            problems: api::Problems::default(),
            local,
            open: local.ip().is_loopback(),
        });
        let sampler = ctx.clone();
        let stop_sampler = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => sampler.problems.sample(&sampler.view.status.load()),
                    _ = stop_sampler.cancelled() => return,
                }
            }
        });
        loop {
            let (stream, peer) = tokio::select! {
                r = tcp.accept() => match r {
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
            let Some(slot) = door.shared.admission().socket() else {
                log::warn!("dashboard: too many open sockets, dropping {peer}");
                continue;
            };
            let (ctx, stop, tls) = (ctx.clone(), stop.clone(), self.tls.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tls {
                    None => serve_http(stream, peer, ctx, stop).await,
                    Some(acceptor) => {
                        let deadline = ctx.door.shared.limits().connect_timeout.0;
                        match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => serve_http(s, peer, ctx, stop).await,
                            Ok(Err(e)) => log::info!("dashboard: {peer}: TLS handshake failed: {e}"),
                            Err(_) => log::info!("dashboard: {peer}: TLS handshake timed out"),
                        }
                    }
                }
            });
        }
    }
}

/// What every request is served with.
struct Ctx {
    door: FrontDoor,
    view: Arc<View>,
    /// `/info.json` as served (without the settings).
    info: Value,
    settings: api::Settings,
    logins: api::Logins,
    problems: api::Problems,
    local: SocketAddr,
    /// Bound on loopback: `/metrics` and `/info.json` need no login.
    open: bool,
}

/// One HTTP/1 connection; `/mqtt` upgrades leave it for the front door.
async fn serve_http<S>(stream: S, peer: SocketAddr, ctx: Arc<Ctx>, stop: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, std::convert::Infallible>(route(req, &ctx, peer).await) }
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

/// 401, with a challenge only for other clients (curl, a browser opening `/metrics`): the
/// page asks with its own form, and a challenge would make the browser pop up its login dialog.
fn unauthorized(why: &str, challenge: bool) -> Reply {
    let mut r = reply(StatusCode::UNAUTHORIZED, "text/plain", format!("{why}\n"));
    if challenge {
        r.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"outpost\", charset=\"UTF-8\""),
        );
    }
    r
}

fn json_reply(v: &Value) -> Reply {
    let mut r = reply(StatusCode::OK, "application/json", v.to_string());
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn route(req: Request<Incoming>, ctx: &Ctx, peer: SocketAddr) -> Reply {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
    }
    let path = req.uri().path().to_string();
    let challenge = !path.starts_with("/api/") && !req.headers().contains_key("x-outpost-page");
    let needs_caller = matches!(path.as_str(), "/api/me" | "/api/problems")
        || (!ctx.open && matches!(path.as_str(), "/metrics" | "/info.json"));
    let caller = if needs_caller {
        let header = req.headers().get(AUTHORIZATION);
        match ctx
            .logins
            .caller(&ctx.door.shared, &ctx.settings, header, peer.ip())
            .await
        {
            Ok(c) => c,
            Err(()) => {
                let user = header
                    .and_then(api::credentials::<headers::authorization::Basic>)
                    .map(|a| a.0.username().to_string())
                    .unwrap_or_default();
                ctx.door.shared.events().login_refused(
                    peer,
                    "",
                    Some(&user),
                    "dashboard page login (HTTP): wrong user or password",
                );
                return unauthorized("wrong user or password", challenge);
            }
        }
    } else {
        api::Caller::Nobody
    };
    let anonymous_ok = ctx.settings.anonymous && caller == api::Caller::Nobody;
    match path.as_str() {
        "/healthz" => {
            let problems = ctx.view.health();
            let code = if problems.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            // Off loopback, only whether: the problems name paths and bridges.
            let body = if ctx.open {
                serde_json::json!({ "healthy": problems.is_empty(), "problems": problems })
            } else {
                serde_json::json!({ "healthy": problems.is_empty() })
            };
            reply(code, "application/json", body.to_string())
        }
        "/metrics" if !ctx.open && caller == api::Caller::Nobody => {
            unauthorized("log in, or send the dashboard token", challenge)
        }
        "/info.json" if !ctx.open && caller == api::Caller::Nobody => {
            unauthorized("log in to see this gateway", challenge)
        }
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics::render(&ctx.view.status.load()),
        ),
        "/info.json" => json_reply(&ctx.info),
        "/api/me" | "/api/problems" => {
            let user = match &caller {
                api::Caller::User(u) => Some(u.as_str()),
                api::Caller::Nobody if anonymous_ok => None,
                _ => return unauthorized("log in with a broker user", false),
            };
            let status = ctx.view.status.load();
            if path == "/api/me" {
                json_reply(&api::me(
                    &ctx.door.shared,
                    &ctx.settings,
                    user,
                    &ctx.local.to_string(),
                    &status,
                ))
            } else {
                let admin = user.is_some_and(|u| ctx.settings.admins.iter().any(|a| a == u));
                json_reply(
                    &ctx.problems
                        .doc(&status, &ctx.door.shared.events().recent(), user, admin),
                )
            }
        }
        "/mqtt" => upgrade(req, ctx, peer),
        "/" | "/index.html" => reply(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML),
        "/app.js" => reply(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS),
        p => reply(StatusCode::NOT_FOUND, "text/plain", format!("no such page: {p}\n")),
    }
}

/// Answers a WebSocket upgrade (RFC 6455) and passes the connection to the front door.
fn upgrade(mut req: Request<Incoming>, ctx: &Ctx, peer: SocketAddr) -> Reply {
    let h = req.headers();
    let origin = h.get(ORIGIN).and_then(|v| v.to_str().ok());
    let host = h.get(HOST).and_then(|v| v.to_str().ok());
    if !gate::origin_allowed(origin, host, ctx.settings.tls, &ctx.settings.origins) {
        let origin = origin.unwrap_or_default().chars().take(100).collect::<String>();
        log::warn!("dashboard: {peer}: WebSocket from origin `{origin}` refused (not in dashboard.origins)");
        ctx.problems
            .note("origin_refused", 1, format!("WebSocket from origin `{origin}` refused"));
        return reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            "this origin may not open /mqtt (see dashboard.origins)\n",
        );
    }
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
    let (door, local, anonymous) = (ctx.door.clone(), ctx.local, ctx.settings.anonymous);
    tokio::spawn(async move {
        match on_upgrade.await {
            // The broker refuses an anonymous CONNECT itself unless `dashboard.anonymous` is set.
            Ok(up) => door.adopt_websocket(TokioIo::new(up), peer, local, anonymous),
            Err(e) => log::info!("dashboard: {peer}: WebSocket upgrade failed: {e}"),
        }
    });
    let mut r = reply(StatusCode::SWITCHING_PROTOCOLS, "text/plain", Bytes::new());
    r.headers_mut().remove(CONTENT_TYPE);
    let hs = r.headers_mut();
    hs.insert(UPGRADE, HeaderValue::from_static("websocket"));
    hs.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    hs.insert(SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&accept).expect("base64"));
    if let Some(p) = crate::broker::websocket::mqtt_subprotocol(&offered) {
        hs.insert("sec-websocket-protocol", HeaderValue::from_str(p).expect("ascii"));
    }
    r
}
