//! The network between the two halves of a sync: QUIC (quinn) with mutual TLS 1.3 (rustls).
//!
//! Both peers have a long-lived identity (a key pair and a self-signed certificate) and trust
//! each other by the fingerprint of the public key, like ssh: the server keeps a list of
//! authorized client keys, the client a list of known servers. There is no plaintext mode.
//!
//! A session is one connection. The client opens a control stream and says what it wants
//! (`Hello`, see [`control::Control`]); from then on one side is the sender and the other the
//! receiver, whichever side is the client:
//!
//! - the sender streams the manifest on the control stream ([`session::send_tree`]) and answers
//!   want-list streams opened by the receiver ([`chunks::serve_wants`]);
//! - the receiver plans, opens a few streams (*lanes*), writes every want-list of a lane at
//!   once and assembles files as the chunks flow back ([`source::StreamSource`]); then it sends
//!   a summary on the control stream ([`session::receive_tree`]).
//!
//! `docs/PROTOCOL.md` describes the exchange byte by byte.

pub mod agent;
pub mod chunks;
pub mod client;
pub mod control;
pub mod endpoint;
pub mod pushed;
pub mod server;
pub mod session;
pub mod source;
pub mod trust;
pub mod wire;

pub use agent::{Agent, CallContext};
pub use client::{pull, push, ClientSettings, Link, RemotePath};
pub use endpoint::{Congestion, Credentials, NetOptions};
pub use server::{serve, ServeSettings};
#[cfg(test)]
mod tests;
