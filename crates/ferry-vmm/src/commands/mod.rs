//! The `ferry` subcommands.

pub mod compat;
pub mod demo;
pub mod machines;
pub mod migrate;
pub mod run;
pub mod tls_creds;

use std::path::PathBuf;
use std::process::ExitCode;

use thiserror::Error;

/// A failed command; the message is what the user reads after `ferry: `.
#[derive(Debug, Error)]
pub enum CliError {
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    Vmm(#[from] ferry_vmm::vmm::VmmError),
    #[error(transparent)]
    Compat(#[from] ferry_migration::compat::CompatError),
    #[error(transparent)]
    Qmp(#[from] ferry_vmm::qmp::QmpClientError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl CliError {
    pub fn msg(s: impl Into<String>) -> Self {
        Self::Msg(s.into())
    }
}

pub type CliResult = Result<ExitCode, CliError>;

/// Parses `512M`, `1G`, `4096` and the like.
pub fn parse_size(s: &str) -> Result<u64, String> {
    ferry_migration::compat::parse_size(s)
        .map_err(|e| format!("{s:?} is not a size ({e}); write it like 512M or 4G"))
}

/// Accepts `unix:PATH` or a bare path for a QMP socket.
pub fn qmp_path(s: &str) -> Result<PathBuf, String> {
    let p = s.strip_prefix("unix:").unwrap_or(s);
    if p.is_empty() {
        return Err("expected a unix socket path, like /tmp/vm.sock or unix:/tmp/vm.sock".into());
    }
    Ok(PathBuf::from(p))
}

/// Renders a full error chain.
pub fn chain(e: &dyn std::error::Error) -> String {
    ferry_migration::engine::error_chain(e)
}
