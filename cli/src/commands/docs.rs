//! `hop completions SHELL` and `hop man [DIR]`: shell completions and man pages generated from
//! the command-line definition itself, so they never drift from `--help`.

use anyhow::{Context, Result};
use clap::{Args, Command};
use std::path::PathBuf;
use std::process::ExitCode;

/// Print a shell completion script.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  hop completions bash > /etc/bash_completion.d/hop
  hop completions zsh > \"${fpath[1]}/_hop\"")]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

/// Write man pages: hop.1 and one per subcommand (hop-sync.1, ...).
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  hop man /usr/local/share/man/man1 && man hop-sync")]
pub struct ManArgs {
    /// Directory to write them into (created).
    #[arg(default_value = "man")]
    pub dir: PathBuf,
}

/// Run `hop completions`.
pub fn completions(a: CompletionsArgs, mut cmd: Command) -> Result<ExitCode> {
    clap_complete::generate(a.shell, &mut cmd, "hop", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

/// Run `hop man`.
pub fn man(a: ManArgs, cmd: Command) -> Result<ExitCode> {
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    clap_mangen::generate_to(cmd, &a.dir)
        .with_context(|| format!("cannot write man pages into {}", a.dir.display()))?;
    println!("wrote man pages into {}", a.dir.display());
    Ok(ExitCode::SUCCESS)
}
