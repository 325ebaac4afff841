//! Integration tests: the real outpost binary against real MQTT clients on loopback sockets.

mod auth;
mod bridge;
mod cli;
// Real clustered upstreams (RabbitMQ, ejabberd): `--features cluster`, see cluster.rs.
#[cfg(feature = "cluster")]
mod cluster;
mod common;
mod dashboard;
mod devices;
mod grants;
mod isolation;
mod packaging;
mod paho;
mod plugs;
mod provisioning;
mod pubsub;
mod reload;
mod robustness;
mod router;
mod storm;
mod websocket;
mod wemo_sim;
