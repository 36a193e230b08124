//! `ferry tls-creds`: test credentials for TLS migrations, laid out as
//! `ferry run --tls-creds DIR` (and QEMU's tls-creds-x509) reads them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use ferry_vmm::tls::{self, TestCredsSpec};

use super::{CliError, CliResult};

#[derive(Debug, Args)]
pub struct TlsCredsArgs {
    /// Directory to write ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem
    /// and client-key.pem into (created if needed; existing files are replaced)
    pub dir: PathBuf,
    /// A name or IP address the destination's certificate is valid for (repeatable);
    /// the source checks it against tls-hostname or the host of the migration address
    #[arg(long = "server-name", value_name = "NAME", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    pub server_names: Vec<String>,
    /// The source's identity: the client certificate's subject CN (and DNS SAN), what
    /// a destination's tls-authz lists
    #[arg(long, value_name = "ID", default_value = "ferry-source")]
    pub client_name: String,
    /// Days the certificates are valid
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(i64).range(1..=36500))]
    pub days: i64,
}

pub fn main(args: TlsCredsArgs) -> CliResult {
    tls::make_test_creds(
        &args.dir,
        &TestCredsSpec {
            server_names: args.server_names.clone(),
            client_name: args.client_name.clone(),
            days: args.days,
        },
    )
    .map_err(|e| CliError::msg(e.to_string()))?;
    println!(
        "wrote a test CA, a server certificate for {} and a client certificate for {:?} to {}",
        args.server_names.join(", "),
        args.client_name,
        args.dir.display()
    );
    eprintln!(
        "ferry: these are test credentials from a CA made just now, with its key thrown away; \
         for production, issue the server and client certificates from your own CA \
         (the same file names: ca-cert.pem, server-cert.pem, server-key.pem, \
         client-cert.pem, client-key.pem)"
    );
    Ok(ExitCode::SUCCESS)
}
