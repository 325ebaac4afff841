//! outpost: an IoT edge gateway. See ARCHITECTURE.md for the map of this crate.

pub mod bridge;
pub mod broker;
pub mod config;
pub mod dashboard;
pub mod devices;
pub mod gateway;
pub mod grants;
pub mod plugs;
pub mod provision;
pub mod reload;
pub mod status;
pub mod status_doc;
pub mod system;
pub mod topic;
