//! Commands besides sync that `hop serve` carries out for authenticated clients: the hook the
//! migration target plugs into. The engine only carries the commands; their meaning belongs to
//! the [`Agent`] the server was given.

use std::path::PathBuf;

/// Who asks, and on which connection.
#[derive(Clone, Debug)]
pub struct CallContext {
    /// Identifies the connection while it lasts (see [`Agent::closed`]).
    pub conn: u64,
    /// The client's key fingerprint (already authorized).
    pub peer: String,
    /// The server's root: every path a command names must stay under it.
    pub root: PathBuf,
}

/// Carries out agent commands. Calls run on a blocking thread, one at a time per connection.
pub trait Agent: Send + Sync {
    /// Carry out one command; `Err` is a refusal or failure, told to the client as text.
    fn call(&self, ctx: &CallContext, body: &str) -> std::result::Result<String, String>;

    /// The connection `conn` ended (closed by the client, timed out or failed): undo whatever
    /// was waiting for a later command on it.
    fn closed(&self, _conn: u64) {}
}
