//! Messages on a session's control stream, besides the manifest's [`crate::protocol::Frame`]s.

use crate::chunk::ChunkParams;
use crate::path::RelPath;
use crate::report::{Change, Report, Stats};
use serde::{Deserialize, Serialize};

/// What the client asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The client sends a tree; the server receives it at `path` (relative to its root). When
    /// the client sends a single file and `path` ends in `/` or is an existing directory, the
    /// file goes into it as `name_if_dir`.
    Push {
        /// Destination, relative to the server's root.
        path: String,
        /// The file's name, for a single-file push into a directory.
        name_if_dir: Option<String>,
    },
    /// The server sends the tree at `path` (relative to its root); the client receives it.
    Pull {
        /// Source, relative to the server's root.
        path: String,
    },
    /// A command for the server's agent (see [`super::agent::Agent`]), e.g. a migration step;
    /// the body's format belongs to the agent. Answered by [`Control::Reply`] or
    /// [`Control::Refused`].
    Agent {
        /// The command.
        body: String,
    },
}

/// Settings of the sync that the server must apply on its side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncSettings {
    /// Chunk sizes (both sides must chunk alike).
    pub params: ChunkParams,
    /// zstd level for the sender, `None` for raw payloads.
    pub compress: Option<i32>,
    /// Receiver: delete entries not in the source.
    pub delete: bool,
    /// Receiver: change nothing, report what would change.
    pub dry_run: bool,
    /// Receiver: fsync files before renaming them into place.
    pub fsync: bool,
    /// Receiver: write zero runs as holes.
    pub sparse: bool,
    /// Neither side reads or writes chunk caches.
    pub no_index_cache: bool,
    /// Receiver: streams (lanes) to fetch chunks on; the server caps it at 64.
    pub streams: u32,
    /// Receiver: ask for sub-chunk patches.
    pub delta: bool,
    /// Include/exclude rules, in order (the sender skips excluded entries, the receiver keeps
    /// them from `--delete`).
    pub rules: Vec<crate::filter::Rule>,
    /// Receiver: update files in place (see [`crate::inplace`]).
    pub inplace: bool,
    /// Sender: with a basis the receiver holds, push the chunks it lacks without waiting for
    /// want-lists (see [`crate::sender::SenderOptions::push`]).
    pub push: bool,
}

/// Control messages. The order on a control stream is: client `Hello`; server `Welcome` or
/// `Refused`; sender's manifest (`Frame::Entry`..., `Frame::ManifestEnd`) and `SenderNotes`;
/// receiver's `Summary`; sender's `Bye`. For an agent command: client `Hello`, server `Reply`
/// or `Refused`. A connection carries requests one after another, each on its own control
/// stream; a pull ends the connection.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Control {
    /// The client's request.
    Hello {
        /// [`crate::protocol::VERSION`] of the client.
        version: u32,
        /// What it wants.
        request: Request,
        /// How.
        settings: SyncSettings,
    },
    /// The server accepts the request.
    Welcome {
        /// The server's protocol version.
        version: u32,
        /// For a pull: whether the source is a directory (the client applies rsync's
        /// trailing-slash rule with it).
        source_is_dir: bool,
    },
    /// The server refuses the request; nothing was changed.
    Refused {
        /// Why, for the user.
        reason: String,
    },
    /// The agent's answer to [`Request::Agent`].
    Reply {
        /// The answer; its format belongs to the agent.
        body: String,
    },
    /// What the sender could not send: entries of kinds that are not synced, and read errors.
    SenderNotes {
        /// Skipped entries and their kind.
        skipped: Vec<(RelPath, String)>,
        /// Read errors.
        errors: Vec<String>,
    },
    /// The receiver's outcome.
    Summary(Summary),
    /// The sender saw the summary; the session is over.
    Bye,
}

/// A receiver's report in a form that travels.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Figures.
    pub stats: Stats,
    /// Itemized changes.
    pub changes: Vec<Change>,
    /// Per-entry errors, as text.
    pub errors: Vec<String>,
    /// Filled in locally by the sender with its own notes; never sent.
    #[serde(skip)]
    pub sender_notes: Option<super::session::SenderNotes>,
}

impl SyncSettings {
    /// Settings for a request that syncs nothing (an agent command).
    pub fn none() -> SyncSettings {
        SyncSettings {
            params: ChunkParams::default(),
            compress: None,
            delete: false,
            dry_run: false,
            fsync: false,
            sparse: false,
            no_index_cache: false,
            streams: 1,
            delta: false,
            rules: Vec::new(),
            inplace: false,
            push: false,
        }
    }
}

impl Summary {
    /// Summarize a report.
    pub fn of(r: &Report) -> Summary {
        Summary {
            stats: r.stats.clone(),
            changes: r.changes.clone(),
            errors: r.errors.iter().map(|e| e.to_string()).collect(),
            sender_notes: None,
        }
    }

    /// Turn back into a report; errors become [`crate::Error::Remote`].
    pub fn into_report(self) -> Report {
        Report {
            stats: self.stats,
            changes: self.changes,
            skipped: Vec::new(),
            errors: self
                .errors
                .into_iter()
                .map(|e| crate::Error::Remote(format!("(remote) {e}")))
                .collect(),
        }
    }
}
