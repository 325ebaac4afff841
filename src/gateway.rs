//! The daemon's life: start the broker, announce readiness, serve until SIGTERM/SIGINT,
//! reload users and ACLs on SIGHUP, then drain and say goodbye on the status topic.

use crate::broker::{self, Broker};
use crate::config::Config;
use crate::system::notify;
use anyhow::{Context, Result};
use rumqttc::{AsyncClient, LastWill, QoS};
use std::path::PathBuf;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// Runs the gateway until a stop signal. `config_path` is re-read on SIGHUP.
pub async fn run(cfg: Config, config_path: Option<PathBuf>) -> Result<()> {
    let started = std::time::Instant::now();
    std::fs::create_dir_all(&cfg.gateway.data_dir)
        .with_context(|| format!("gateway.data_dir: cannot create {}", cfg.gateway.data_dir.display()))?;
    let broker = Broker::start(&cfg).await?;
    let status = StatusTopic::start(&broker, &cfg.gateway.id).await?;

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let addrs: Vec<String> = broker.local_addrs.iter().map(|a| a.to_string()).collect();
    log::info!(
        "outpost {} ready in {:?}: broker on {}",
        env!("CARGO_PKG_VERSION"),
        started.elapsed(),
        addrs.join(", ")
    );
    notify::ready(&format!("serving MQTT on {}", addrs.join(", ")));
    if let Some(every) = notify::watchdog_interval() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            loop {
                tick.tick().await;
                notify::watchdog();
            }
        });
    }

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                notify::reloading();
                match &config_path {
                    Some(p) => match Config::load(p) {
                        Ok(new) => {
                            broker.reload(&new);
                            log::info!("reloaded users and ACLs from {}", p.display());
                        }
                        Err(e) => log::error!("reload refused, keeping the running config: {e}"),
                    },
                    None => log::info!("SIGHUP: running on the built-in config, nothing to reload"),
                }
                notify::ready("serving (reloaded)");
            }
        }
    }

    log::info!("stopping");
    notify::stopping();
    status.offline().await;
    broker.shutdown(cfg.gateway.shutdown_timeout.0).await;
    log::info!("stopped");
    Ok(())
}

/// `outpost/<id>/status`: retained `online` while the gateway serves, `offline` when it stops
/// (and as the will, should the link to the engine break).
struct StatusTopic {
    client: AsyncClient,
    topic: String,
    task: tokio::task::JoinHandle<()>,
}

impl StatusTopic {
    async fn start(broker: &Broker, id: &str) -> Result<StatusTopic> {
        let topic = format!("outpost/{id}/status");
        let mut opts = broker::engine_client(&broker.shared.engine, &format!("outpost-status-{id}"));
        opts.set_last_will(LastWill::new(&topic, "offline", QoS::AtLeastOnce, true));
        let (client, mut events) = AsyncClient::new(opts, 16);
        client.publish(&topic, QoS::AtLeastOnce, true, "online").await?;
        // Wait for the engine to take `online` before calling the gateway ready.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e).context("status topic: engine connection"),
                Err(_) => anyhow::bail!("status topic: engine did not answer in 10s"),
            }
        }
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        log::warn!("status topic: {e}; reconnecting");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(StatusTopic { client, topic, task })
    }

    async fn offline(self) {
        let _ = self
            .client
            .publish(&self.topic, QoS::AtLeastOnce, true, "offline")
            .await;
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}
