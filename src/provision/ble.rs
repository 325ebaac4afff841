//! Provisioning over Bluetooth LE (btleplug, BlueZ over D-Bus): the gateway is the central; it
//! scans for the provisioning service, writes to one characteristic and is notified on another.
//! Messages travel as `length (2) | message`, in pieces of at most 20 bytes (the minimum ATT MTU).

use super::protocol::{ProvError, Transport, MAX_MESSAGE, REFUSED};
use btleplug::api::{
    Central, CentralEvent, Characteristic, Manager as _, Peripheral as _, ScanFilter, ValueNotification, WriteType,
};
use btleplug::platform::{Manager, Peripheral};
use futures_util::stream::{Stream, StreamExt};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;
use uuid::Uuid;

pub const SERVICE: Uuid = Uuid::from_u128(0x6f75742d_706f_7374_0000_70726f760001);
pub const TO_DEVICE: Uuid = Uuid::from_u128(0x6f75742d_706f_7374_0000_70726f760002);
pub const FROM_DEVICE: Uuid = Uuid::from_u128(0x6f75742d_706f_7374_0000_70726f760003);
pub const CHUNK: usize = 20;

/// A message cut into ATT-sized pieces.
pub fn chunks(msg: &[u8]) -> Vec<Vec<u8>> {
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(msg);
    framed.chunks(CHUNK).map(<[u8]>::to_vec).collect()
}

/// Puts pieces back together; refuses a length over the protocol's maximum.
#[derive(Default)]
pub struct Reassembler {
    buf: Vec<u8>,
}

impl Reassembler {
    pub fn push(&mut self, piece: &[u8]) -> Result<Option<Vec<u8>>, ProvError> {
        self.buf.extend_from_slice(piece);
        if self.buf.len() < 2 {
            return Ok(None);
        }
        let len = u16::from_be_bytes([self.buf[0], self.buf[1]]) as usize;
        if len > MAX_MESSAGE {
            self.buf.clear();
            REFUSED.fetch_add(1, Ordering::Relaxed);
            return Err(ProvError::Protocol(format!("message of {len} bytes announced")));
        }
        if self.buf.len() < 2 + len {
            return Ok(None);
        }
        let msg = self.buf[2..2 + len].to_vec();
        self.buf.drain(..2 + len);
        Ok(Some(msg))
    }
}

type Notifications = Pin<Box<dyn Stream<Item = ValueNotification> + Send>>;
type Events = Pin<Box<dyn Stream<Item = CentralEvent> + Send>>;

pub struct Ble {
    peripheral: Peripheral,
    write: Characteristic,
    notifications: Notifications,
    /// The adapter's events, to notice the device disconnecting while we wait.
    events: Events,
    reassembler: Reassembler,
}

async fn adapter() -> Result<btleplug::platform::Adapter, ProvError> {
    let manager = Manager::new()
        .await
        .map_err(|e| ProvError::Link(format!("Bluetooth: {e} (is BlueZ running, and D-Bus reachable?)")))?;
    let adapters = manager
        .adapters()
        .await
        .map_err(|e| ProvError::Link(format!("Bluetooth: {e}")))?;
    adapters
        .into_iter()
        .next()
        .ok_or_else(|| ProvError::Link("no Bluetooth adapter found".into()))
}

/// Devices advertising the provisioning service, with their names.
pub async fn scan(wait: Duration) -> Result<Vec<(Peripheral, String)>, ProvError> {
    scan_on(&adapter().await?, wait, |_| false).await
}

/// Scans for `wait`, or until a device whose name satisfies `enough` shows up.
async fn scan_on(
    a: &btleplug::platform::Adapter,
    wait: Duration,
    enough: impl Fn(&str) -> bool,
) -> Result<Vec<(Peripheral, String)>, ProvError> {
    a.start_scan(ScanFilter {
        services: vec![SERVICE],
    })
    .await
    .map_err(|e| ProvError::Link(format!("scan: {e}")))?;
    let end = tokio::time::Instant::now() + wait;
    let mut out = vec![];
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        out.clear();
        for p in a.peripherals().await.map_err(|e| ProvError::Link(e.to_string()))? {
            if let Ok(Some(props)) = p.properties().await {
                if props.services.contains(&SERVICE) {
                    out.push((p, props.local_name.unwrap_or_else(|| "(no name)".into())));
                }
            }
        }
        if out.iter().any(|(_, n)| enough(n)) || tokio::time::Instant::now() >= end {
            break;
        }
    }
    let _ = a.stop_scan().await;
    Ok(out)
}

impl Ble {
    /// Connects to the first device whose name contains `name` (any, when empty).
    pub async fn connect(name: &str, wait: Duration) -> Result<Ble, ProvError> {
        let a = adapter().await?;
        let found = scan_on(&a, wait, |n| n.contains(name)).await?;
        let (peripheral, _) = found.into_iter().find(|(_, n)| n.contains(name)).ok_or_else(|| {
            ProvError::Link(format!(
                "no device advertising the provisioning service matches `{name}`"
            ))
        })?;
        let e = |e: btleplug::Error| ProvError::Link(e.to_string());
        let events = a.events().await.map_err(e)?;
        peripheral
            .connect()
            .await
            .map_err(|x| ProvError::Link(format!("connect: {x}")))?;
        peripheral
            .discover_services()
            .await
            .map_err(|x| ProvError::Link(format!("service discovery: {x}")))?;
        let chars = peripheral.characteristics();
        let find = |u: Uuid| {
            chars
                .iter()
                .find(|c| c.uuid == u)
                .cloned()
                .ok_or_else(|| ProvError::Link(format!("device lacks characteristic {u}")))
        };
        let (write, notify) = (find(TO_DEVICE)?, find(FROM_DEVICE)?);
        let notifications = peripheral.notifications().await.map_err(e)?;
        peripheral
            .subscribe(&notify)
            .await
            .map_err(|x| ProvError::Link(format!("notifications: {x}")))?;
        Ok(Ble {
            peripheral,
            write,
            notifications,
            events,
            reassembler: Reassembler::default(),
        })
    }

    /// Disconnects (BlueZ would otherwise keep the connection up for other clients).
    pub async fn close(self) {
        let _ = self.peripheral.disconnect().await;
    }
}

impl Transport for Ble {
    async fn send(&mut self, msg: &[u8]) -> Result<(), ProvError> {
        for piece in chunks(msg) {
            self.peripheral
                .write(&self.write, &piece, WriteType::WithResponse)
                .await
                .map_err(|e| ProvError::Link(format!("write: {e}")))?;
        }
        Ok(())
    }

    async fn recv(&mut self, within: Duration) -> Result<Vec<u8>, ProvError> {
        let end = tokio::time::Instant::now() + within;
        let me = self.peripheral.id();
        loop {
            tokio::select! {
                n = self.notifications.next() => match n {
                    None => return Err(ProvError::Link("the device disconnected".into())),
                    Some(n) if n.uuid == FROM_DEVICE => {
                        if let Some(m) = self.reassembler.push(&n.value)? {
                            return Ok(m);
                        }
                    }
                    Some(_) => {}
                },
                ev = self.events.next() => match ev {
                    Some(CentralEvent::DeviceDisconnected(id)) if id == me => {
                        return Err(ProvError::Link("the device disconnected".into()))
                    }
                    None => return Err(ProvError::Link("BlueZ went away".into())),
                    Some(_) => {}
                },
                _ = tokio::time::sleep_until(end) => return Err(ProvError::Timeout),
            }
        }
    }
}
