//! The topic grammar lives in [`crate::topic`], a leaf that config and broker both use; this
//! re-export keeps the `broker::topics::…` paths working.
pub use crate::topic::*;
