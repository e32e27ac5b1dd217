//! The checkpoint/restore layer of the orchestrator: one small module per tool it drives.

pub mod criu;
pub mod runc;
