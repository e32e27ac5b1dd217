//! # hop-engine
//!
//! CloudHopper's transfer engine: makes a destination tree identical to a source tree while
//! moving only the data the destination does not already hold.
//!
//! Data flows one way, and the modules are named after the steps:
//! [`scan`] → [`chunk`] (or [`rechunk`], from a file's previous list) → [`index`] → [`plan`] → transfer ([`protocol`], [`sender`]) →
//! [`assemble`] (which verifies) → [`receiver`] applies the rest. [`local`] wires the two halves
//! together in one process.
#![warn(missing_docs)]

pub mod assemble;
pub mod beneath;
pub mod chunk;
pub mod chunklist;
pub mod delta;
pub mod error;
pub mod filter;
pub mod id;
pub mod index;
pub mod inplace;
pub mod local;
pub mod manifest;
pub mod meta;
pub mod net;
pub mod path;
pub mod plan;
pub mod protocol;
pub mod receiver;
pub mod rechunk;
pub mod report;
pub mod scan;
pub mod sender;
pub mod zstd_ctx;

pub use chunk::ChunkParams;
pub use error::{Error, Result};
pub use id::ChunkId;
pub use local::sync_local;
pub use receiver::{Receiver, ReceiverOptions};
pub use report::{Change, ChangeKind, Progress, Report, Stats};
pub use sender::{Sender, SenderOptions};
