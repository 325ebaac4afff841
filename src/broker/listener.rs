//! The accept loop of one listener: TCP, TLS or WebSocket. Handshakes run in the connection's
//! own task under a deadline, so an idle or half-open socket never holds up anyone else.

use super::connection::{self as handler, ListenerInfo};
use super::websocket;
use super::Shared;
use crate::config::{self, ListenerProtocol};
use anyhow::{Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::rustls::{self, server::WebPkiClientVerifier, RootCertStore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Connections the kernel holds for the accept loop. A crowd of devices reconnecting at once
/// (a power cut, an access point's restart) overflowed tokio's default of 1024 on loopback:
/// overflowed handshakes hang for the client until its retries run out. The kernel caps this
/// at `net.core.somaxconn` (4096 on current kernels).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` with [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(LISTEN_BACKLOG)
}

/// A bound listener, ready to accept.
pub struct Listener {
    pub local: SocketAddr,
    tcp: TcpListener,
    protocol: ListenerProtocol,
    tls: Option<TlsAcceptor>,
    info: ListenerInfo,
}

impl Listener {
    /// Binds the socket and loads TLS material; errors name the listener and the file.
    pub async fn bind(index: usize, cfg: &config::Listener) -> Result<Listener> {
        let name = format!("broker.listeners[{index}] ({:?} on {})", cfg.protocol, cfg.bind.0).to_lowercase();
        let tls = match &cfg.tls {
            Some(t) => Some(tls_acceptor(t).with_context(|| format!("{name}: TLS setup"))?),
            None => None,
        };
        let tcp = listen(cfg.bind.0).with_context(|| format!("{name}: cannot bind {}", cfg.bind.0))?;
        let local = tcp.local_addr()?;
        Ok(Listener {
            local,
            tcp,
            protocol: cfg.protocol,
            tls,
            info: ListenerInfo {
                name,
                bind: cfg.bind.0.to_string(),
                anonymous: cfg.anonymous_allowed(),
            },
        })
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Accepts until `stop`; every connection runs on `tracker` so shutdown can wait for them,
    /// and ends when `close` is cancelled.
    pub async fn run(
        self,
        shared: Arc<Shared>,
        stop: CancellationToken,
        close: CancellationToken,
        tracker: TaskTracker,
    ) {
        loop {
            let (stream, peer) = tokio::select! {
                r = self.tcp.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little, keep serving.
                        log::warn!("{}: accept failed: {e}", self.info.name);
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let Some(slot) = admit(&shared, &self.info.name, peer) else {
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let deadline = Instant::now() + shared.limits.connect_timeout.0;
            let (shared, stop, info, tls, protocol) = (
                shared.clone(),
                close.clone(),
                self.info.clone(),
                self.tls.clone(),
                self.protocol,
            );
            tracker.spawn(async move {
                let Some(prelogin) = shared.admission.pre_login(deadline).await else {
                    log::warn!(
                        "{}: no pre-login slot for {peer} by its connect deadline; closing",
                        info.name
                    );
                    return;
                };
                accept_one(stream, peer, protocol, tls, info, shared, deadline, stop, prelogin).await;
                drop(slot);
            });
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn accept_one(
    stream: TcpStream,
    peer: SocketAddr,
    protocol: ListenerProtocol,
    tls: Option<TlsAcceptor>,
    info: ListenerInfo,
    shared: Arc<Shared>,
    deadline: Instant,
    stop: CancellationToken,
    prelogin: super::admission::PreLogin,
) {
    let evict = prelogin.evict.clone();
    let max_ws = shared.limits.max_packet_size.0 as usize;
    let metrics = shared.metrics.clone();
    let failed = |what: String| {
        super::metrics::Metrics::inc(&shared.metrics.handshakes_failed);
        log::info!("{peer} on {}: {what}", info.name);
    };
    match protocol {
        ListenerProtocol::Mqtt => handler::serve(stream, peer, info, shared, deadline, stop, prelogin).await,
        ListenerProtocol::Ws => {
            match handler::before_login(deadline, &evict, websocket::accept(stream, max_ws, metrics)).await {
                Ok(Ok(ws)) => handler::serve(ws, peer, info, shared, deadline, stop, prelogin).await,
                Ok(Err(e)) => failed(format!("WebSocket handshake failed: {e}")),
                Err(_) => failed("WebSocket handshake timed out".into()),
            }
        }
        ListenerProtocol::Mqtts | ListenerProtocol::Wss => {
            let acceptor = tls.expect("TLS listener has an acceptor");
            let tls_stream = match handler::before_login(deadline, &evict, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return failed(format!("TLS handshake failed: {e}")),
                Err(_) => return failed("TLS handshake timed out".into()),
            };
            if protocol == ListenerProtocol::Mqtts {
                return handler::serve(tls_stream, peer, info, shared, deadline, stop, prelogin).await;
            }
            match handler::before_login(deadline, &evict, websocket::accept(tls_stream, max_ws, metrics)).await {
                Ok(Ok(ws)) => handler::serve(ws, peer, info, shared, deadline, stop, prelogin).await,
                Ok(Err(e)) => failed(format!("WebSocket handshake failed: {e}")),
                Err(_) => failed("WebSocket handshake timed out".into()),
            }
        }
    }
}

impl super::FrontDoor {
    /// Serves an MQTT client on a WebSocket whose HTTP upgrade has already been answered
    /// (`101 Switching Protocols`), as the `ws` listener would after its handshake. Anonymous
    /// clients get in only when `anonymous` is set and the port is on loopback.
    pub fn adopt_websocket<S>(&self, stream: S, peer: SocketAddr, bind: SocketAddr, anonymous: bool)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let shared = self.shared.clone();
        let info = ListenerInfo {
            name: format!("dashboard {bind} /mqtt"),
            bind: bind.to_string(),
            anonymous: anonymous && bind.ip().is_loopback(),
        };
        let Some(slot) = admit(&shared, &info.name, peer) else {
            return;
        };
        let deadline = Instant::now() + shared.limits.connect_timeout.0;
        let close = self.close.clone();
        self.tracker.spawn(async move {
            let Some(prelogin) = shared.admission.pre_login(deadline).await else {
                return;
            };
            let max = shared.limits.max_packet_size.0 as usize;
            let ws = websocket::upgraded(stream, max, shared.metrics.clone()).await;
            handler::serve(ws, peer, info, shared, deadline, close, prelogin).await;
            drop(slot);
        });
    }
}

/// Takes the socket slot every new socket needs, or logs why it is dropped (the pre-login
/// slot is taken in the socket's own task: it may have to evict an older socket first).
fn admit(shared: &Shared, name: &str, peer: SocketAddr) -> Option<tokio::sync::OwnedSemaphorePermit> {
    // Every socket, logged in or not, holds a slot: this bounds what half-open sockets cost.
    let Some(slot) = shared.admission.socket() else {
        log::warn!("{name}: too many open sockets, dropping {peer}");
        return None;
    };
    Some(slot)
}

pub fn tls_acceptor(t: &config::Tls) -> Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert)
        .with_context(|| format!("reading certificate {}", t.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificate {}", t.cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no PEM certificate", t.cert.display());
    }
    let key =
        PrivateKeyDer::from_pem_file(&t.key).with_context(|| format!("reading private key {}", t.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match &t.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading client CA {}", ca.display()))? {
                roots.add(c.with_context(|| format!("parsing client CA {}", ca.display()))?)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("client CA {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs, key).with_context(|| {
        format!(
            "certificate {} does not match key {}",
            t.cert.display(),
            t.key.display()
        )
    })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
