//! The daemon's life: start the broker, announce readiness, serve until SIGTERM/SIGINT,
//! reload on SIGHUP (see [`crate::reload`]), then drain and say goodbye on the status topic.

use crate::bridge::Bridges;
use crate::broker::{Broker, Bus};
use crate::config::{Config, ROUTER_SILENCE_MS};
use crate::devices::service::DeviceService;
use crate::reload;
use crate::status_doc::StatusDoc;
use crate::system::notify;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// Runs the gateway until a stop signal. `config_path` is re-read on SIGHUP, with `data_dir`
/// (the command line's `--data-dir`) over the file's, as at start.
pub async fn run(cfg: Config, config_path: Option<PathBuf>, data_dir: Option<PathBuf>) -> Result<()> {
    let started = std::time::Instant::now();
    let (mut serving, addrs) = start(&cfg).await?;
    let source = reload::Source {
        path: config_path,
        data_dir,
    };
    let mut running = cfg.clone();
    // Caught from before READY on, so a stop sent at once is not lost.
    let mut signals = Signals::new()?;
    log::info!(
        "outpost {} ready in {:?}: broker on {}",
        env!("CARGO_PKG_VERSION"),
        started.elapsed(),
        addrs.join(", ")
    );
    notify::ready(&format!("serving MQTT on {}", addrs.join(", ")));
    if let Some(every) = notify::watchdog_interval() {
        spawn_watchdog(every, serving.status.last_contact.clone());
    }
    serving.serve(&mut signals, &source, &mut running).await;
    serving.stop(cfg.gateway.shutdown_timeout.0).await;
    Ok(())
}

/// Starts everything, in order, and lets clients in. Returns what runs and the addresses it
/// serves on (the broker's listeners, then the dashboard).
async fn start(cfg: &Config) -> Result<(Serving, Vec<String>)> {
    crate::system::memory::return_large_blocks();
    crate::system::fds::check(cfg.broker.limits.max_connections)?;
    std::fs::create_dir_all(&cfg.gateway.data_dir)
        .with_context(|| format!("gateway.data_dir: cannot create {}", cfg.gateway.data_dir.display()))?;
    // The dashboard's port first: an address that does not bind stops the start here, as a bad
    // config does, before anything is announced (no `online` status, no READY).
    let dashboard = match &cfg.dashboard.bind {
        Some(b) => crate::dashboard::Dashboard::bind(b.0, cfg.dashboard.tls.as_ref()).await?,
        None => None,
    };
    let broker = Broker::start(cfg).await?;
    let bus = Bus::start(broker.shared.clone());
    let status = StatusTopic::start(&broker, bus.clone(), &cfg.gateway.id).await;
    let mut bridges = Bridges::new(broker.shared.clone(), bus.clone(), &cfg.gateway);
    bridges.apply(&cfg.bridges).await?;
    let Services { stops, plugs, devices } = start_services(cfg, &broker, bus).await?;
    // Only now do clients get in: every message they send passes the bridges' taps.
    broker.serve();
    let latest = Arc::new(arc_swap::ArcSwap::from_pointee(StatusDoc::default()));
    let stop_dashboard = tokio_util::sync::CancellationToken::new();
    let status_file = StatusFile {
        latest: latest.clone(),
        devices,
        plugs,
        path: cfg.gateway.data_dir.join("status.json"),
        id: cfg.gateway.id.clone(),
        started: std::time::SystemTime::now(),
    };
    status_file.write(&broker, &bridges);
    let mut addrs: Vec<String> = broker.local_addrs.iter().map(|a| a.to_string()).collect();
    if let Some(d) = dashboard {
        log::info!("dashboard: listening on http://{}", d.local);
        addrs.push(format!("dashboard http://{}", d.local));
        let view = Arc::new(crate::dashboard::View {
            status: latest,
            router_contact: status.last_contact.clone(),
            spool_dir: cfg.gateway.data_dir.join("bridges"),
            info: crate::dashboard::info(cfg, &broker.local_addrs, d.local),
            settings: crate::dashboard::api::Settings::from_config(cfg),
        });
        tokio::spawn(d.run(broker.front_door(), view, stop_dashboard.clone()));
    }
    let serving = Serving {
        broker,
        bridges,
        status,
        status_file,
        stops,
        stop_dashboard,
    };
    Ok((serving, addrs))
}

/// The services beside the broker (grants, provisioning, plugs, devices), started, with the
/// parts of the status document they keep.
struct Services {
    stops: Stops,
    plugs: crate::plugs::AllPlugs,
    devices: crate::devices::service::AllCounters,
}

/// What stops the services beside the broker.
struct Stops {
    /// Grants and provisioning.
    grants: tokio_util::sync::CancellationToken,
    plugs: tokio_util::sync::CancellationToken,
    devices: tokio_util::sync::CancellationToken,
}

/// Starts grants, provisioning, plugs and devices on the broker, before it lets clients in.
async fn start_services(cfg: &Config, broker: &Broker, bus: Bus) -> Result<Services> {
    let stop_grants = tokio_util::sync::CancellationToken::new();
    let grant_service =
        crate::grants::service::GrantService::new(broker.shared.clone(), bus.clone(), cfg.grants.clone(), &cfg.gateway);
    grant_service.load()?;
    let grant_link = grant_service.connect().await?;
    tokio::spawn(std::sync::Arc::new(grant_service).run(grant_link, stop_grants.clone()));
    let provision_service = std::sync::Arc::new(crate::provision::service::ProvisionService::new(
        broker.shared.clone(),
        bus.clone(),
        cfg,
    ));
    let provision_link = provision_service.connect().await?;
    tokio::spawn(provision_service.run(provision_link, stop_grants.clone()));
    let stop_plugs = tokio_util::sync::CancellationToken::new();
    let plugs = crate::plugs::start(
        cfg.plugs.clone(),
        broker.shared.clone(),
        bus.clone(),
        stop_plugs.clone(),
    );
    let device_service = DeviceService::new(broker.shared.clone(), bus, cfg.devices.clone(), &cfg.gateway);
    let devices = device_service.load()?;
    let device_counters = device_service.counters.clone();
    let stop_devices = tokio_util::sync::CancellationToken::new();
    let device_link = device_service.connect(&devices).await?;
    tokio::spawn(device_service.run(devices, device_link, stop_devices.clone()));
    if crate::devices::clock_synchronized() == Some(false) {
        log::warn!(
            "the system clock is not synchronized (no NTP fix): mqtt-e2e packets are accepted only within \
             {} of this clock, so devices may be refused as stale",
            cfg.devices.window
        );
    }
    Ok(Services {
        stops: Stops {
            grants: stop_grants,
            plugs: stop_plugs,
            devices: stop_devices,
        },
        plugs,
        devices: device_counters,
    })
}

/// Feeds the systemd watchdog every `every / 2`, but only while the router routes: a stuck
/// router gets the service restarted.
fn spawn_watchdog(every: Duration, contact: Arc<AtomicI64>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every / 2);
        loop {
            tick.tick().await;
            if crate::system::clock::now_ms() - contact.load(Ordering::Relaxed) < ROUTER_SILENCE_MS {
                notify::watchdog();
            } else {
                log::error!("the router has not routed the probe for {ROUTER_SILENCE_MS} ms; not feeding the watchdog");
            }
        }
    });
}

/// SIGTERM and SIGINT stop the gateway; SIGHUP reloads its config.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// The running gateway: what [`Serving::serve`] tends and [`Serving::stop`] takes down.
struct Serving {
    broker: Broker,
    bridges: Bridges,
    status: StatusTopic,
    status_file: StatusFile,
    stops: Stops,
    stop_dashboard: tokio_util::sync::CancellationToken,
}

impl Serving {
    /// Until SIGTERM or SIGINT: status.json every 2 s, a reload on each SIGHUP.
    async fn serve(&mut self, signals: &mut Signals, source: &reload::Source, running: &mut Config) {
        let mut status_tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = status_tick.tick() => self.status_file.write(&self.broker, &self.bridges),
                _ = signals.term.recv() => break,
                _ = signals.int.recv() => break,
                _ = signals.hup.recv() => {
                    notify::reloading();
                    let outcome = reload::reload(source, running, &self.broker, &mut self.bridges).await;
                    reload::report(source, &outcome);
                }
            }
        }
    }

    /// Says `offline`, lets clients go within `shutdown_timeout`, then stops the bridges and
    /// the services, and writes status.json a last time.
    async fn stop(mut self, shutdown_timeout: Duration) {
        log::info!("stopping");
        notify::stopping();
        self.status.offline().await;
        self.stop_dashboard.cancel();
        // Clients go first, while the bridges' taps still spool what they send.
        self.broker.shutdown(shutdown_timeout).await;
        self.bridges.stop_all().await;
        self.stops.devices.cancel();
        self.stops.plugs.cancel();
        self.stops.grants.cancel();
        self.status_file.write(&self.broker, &self.bridges);
        log::info!("stopped");
    }
}

/// How often the router is sent a probe message; the watchdog wants one back within
/// [`ROUTER_SILENCE_MS`].
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// `outpost/<id>/status`: retained `online` while the gateway serves, `offline` when it stops.
/// Beside it, a probe that goes through the router and back, so the watchdog and `/healthz`
/// notice a router that stops routing.
struct StatusTopic {
    bus: Bus,
    topic: String,
    task: tokio::task::JoinHandle<()>,
    /// When a probe last came back through the router (ms since epoch).
    last_contact: Arc<AtomicI64>,
}

impl StatusTopic {
    async fn start(broker: &Broker, bus: Bus, id: &str) -> StatusTopic {
        let topic = format!("outpost/{id}/status");
        bus.publish(&topic, bytes::Bytes::from_static(b"online"), 1, true, None)
            .await;
        let probe = format!("$SYS/outpost/{id}/probe");
        let mut client = broker.shared.local_client("status-probe", std::slice::from_ref(&probe));
        let last_contact = Arc::new(AtomicI64::new(crate::system::clock::now_ms()));
        let contact = last_contact.clone();
        let probe_bus = bus.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROBE_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => probe_bus.publish(&probe, bytes::Bytes::new(), 0, false, None).await,
                    _ = client.recv() => contact.store(crate::system::clock::now_ms(), Ordering::Relaxed),
                }
            }
        });
        StatusTopic {
            bus,
            topic,
            task,
            last_contact,
        }
    }

    async fn offline(self) {
        self.bus
            .publish(&self.topic, bytes::Bytes::from_static(b"offline"), 1, true, None)
            .await;
        self.task.abort();
    }
}

/// `data_dir/status.json`, rewritten every 2 s: what `outpost status` shows.
struct StatusFile {
    /// The last document written, for the dashboard.
    latest: Arc<arc_swap::ArcSwap<StatusDoc>>,
    devices: crate::devices::service::AllCounters,
    plugs: crate::plugs::AllPlugs,
    path: PathBuf,
    id: String,
    started: std::time::SystemTime,
}

impl StatusFile {
    fn plug_list(&self) -> Vec<crate::plugs::PlugStatus> {
        let mut v: Vec<_> = self.plugs.lock().expect("plugs lock").values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The document now: each part from the component that owns it.
    fn snapshot(&self, broker: &Broker, bridges: &Bridges) -> StatusDoc {
        let secs = |t| crate::system::clock::since_epoch(t).as_secs();
        let router = broker.shared.router();
        let mut broker_counters = broker.shared.metrics().snapshot();
        // Withheld by access checks, at routing and when a queued message goes out.
        broker_counters.delivery_denied = router.dropped_denied.load(Ordering::Relaxed);
        StatusDoc {
            gateway: self.id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            started: secs(self.started),
            written: secs(std::time::SystemTime::now()),
            listeners: broker.local_addrs.iter().map(|a| a.to_string()).collect(),
            broker: broker_counters,
            router: router.snapshot(),
            stores: broker.shared.stores(),
            bridges: bridges.states(),
            devices: self
                .devices
                .lock()
                .expect("counters lock")
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            clock_synchronized: crate::devices::clock_synchronized(),
            plugs: self.plug_list(),
            claims_refused: crate::grants::service::CLAIMS_REFUSED.load(Ordering::Relaxed),
            provisioning_frames_refused: crate::provision::protocol::REFUSED.load(Ordering::Relaxed),
        }
    }

    fn write(&self, broker: &Broker, bridges: &Bridges) {
        let doc = self.snapshot(broker, bridges);
        let bytes = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        self.latest.store(Arc::new(doc));
        if let Err(e) = crate::system::jsonfile::replace(&self.path, &bytes) {
            log::warn!("cannot write {}: {e:#}", self.path.display());
        }
    }
}
