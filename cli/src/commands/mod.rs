//! One file per subcommand.

pub mod checkpoint;
pub mod docs;
pub mod doctor;
pub mod keygen;
pub mod migrate;
pub mod remote;
pub mod serve;
pub mod ssh;
pub mod sync;
pub mod vpn;

/// How chatty the command should be.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    /// -v count.
    pub verbose: u8,
    /// -q given.
    pub quiet: bool,
}

/// Exit code for a run where some entries failed (rsync's "partial transfer due to error").
pub const EXIT_PARTIAL: u8 = 23;
