//! Live migration: the source's orchestrator ([`run`]) and the target's agent ([`agent`]).
//!
//! Data flows one way: dump (CRIU, leaving the application running) → push the images with the
//! engine (only what the target lacks) → repeat while it pays ([`plan`]) → final dump (the
//! application is frozen from here) → final push → restore at the target → commit. Any failure
//! before the target confirms the restored application runs puts the application back at the
//! source from its final images ([`app::App::rollback`]).

pub mod agent;
pub mod app;
pub mod calls;
pub mod follow;
pub mod group;
pub mod haproxy;
pub mod ipsec;
pub mod plan;
pub mod run;
pub mod timeline;
pub mod vpn;
