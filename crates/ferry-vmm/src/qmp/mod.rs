//! QMP, QEMU's JSON control protocol, over a unix socket: a server for a VMM to
//! expose and a client for tools that drive one.
//!
//! Nothing here knows about VMs. The server owns the protocol (greeting,
//! capabilities negotiation, request validation, replies, events); what commands
//! exist and what they do is up to a [`QmpHandler`].
//!
//! # Subset of QMP implemented
//!
//! Following QEMU's `docs/interop/qmp-spec.rst`:
//!
//! * Greeting `{"QMP": {"version": {"qemu": {"micro", "minor", "major"},
//!   "package": "ferry X.Y.Z"}, "capabilities": []}}`, the version being ferry's
//!   crate version ([`version_info`] gives the same object, for `query-version`).
//! * Capabilities negotiation: a connection starts in negotiation mode where only
//!   `qmp_capabilities` is accepted (any other command gets `CommandNotFound`). No
//!   capabilities are offered, so `arguments: {"enable": [...]}` must be empty.
//!   Afterwards `qmp_capabilities` itself is refused with `CommandNotFound`, as
//!   QEMU does.
//! * Commands `{"execute": name, "arguments": {...}, "id": any}`, executed one at
//!   a time per connection in arrival order. Replies `{"return": value}` or
//!   `{"error": {"class", "desc"}}`, with `id` echoed whenever the request was an
//!   object carrying one (even if the request was otherwise invalid).
//! * Error classes as QEMU names them: [`ErrorClass`].
//! * Events `{"event", "data", "timestamp": {"seconds", "microseconds"}}` (wall
//!   clock; `data` omitted when it is `null`), sent to every connection in command
//!   mode, in emission order.
//!
//! Not implemented: out-of-band execution (`exec-oob`, the `oob` capability),
//! the legacy `control` member, and any command other than `qmp_capabilities`
//! (those are the handler's).
//!
//! # Framing and limits
//!
//! Input is a stream of JSON texts, usually one per line but neither required
//! nor relied on: texts are delimited by bracket depth outside strings (see
//! `framer`), then parsed. Each text that is not a valid request (bad JSON, not
//! an object, missing or non-string `execute`, non-object `arguments`, unknown
//! members) gets one `GenericError` reply and the connection stays usable. An
//! ASCII control character other than tab, CR and LF discards any partial text
//! and gets an error, so a client can always resynchronise.
//!
//! A single text above [`MAX_MESSAGE_SIZE`] (1 MiB) gets an error and the
//! connection is closed; the server never buffers more than that per
//! connection. Output lines end in CRLF like QEMU's. Each connection has a
//! writer thread fed through a queue of [`OUTPUT_QUEUE_LEN`] messages with a
//! [`WRITE_TIMEOUT`] on the socket: a client that stops reading stalls only
//! itself, and is disconnected when its queue overflows with events or a write
//! times out.

mod client;
mod framer;
mod server;

#[cfg(test)]
mod tests;

use std::fmt;
use std::time::Duration;

use serde_json::{json, Value};
use thiserror::Error;

pub use client::{Event, Greeting, QmpClient, QmpClientError, Timestamp, DEFAULT_CLIENT_TIMEOUT};
pub use server::{EventSender, QmpServer};

/// Largest JSON text the server accepts on a connection, in bytes.
pub const MAX_MESSAGE_SIZE: usize = 1 << 20;
/// Messages a connection may have waiting to be written before events to it
/// are considered undeliverable and the connection is closed.
pub const OUTPUT_QUEUE_LEN: usize = 1024;
/// How long one write to a client may block before the connection is closed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The class of a QMP error, as QEMU names it on the wire.
///
/// QEMU recommends `GenericError` for everything new; the others exist for
/// compatibility with clients that test for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KVMMissingCap,
}

impl ErrorClass {
    /// Every class, in QEMU's order.
    pub const ALL: [ErrorClass; 5] = [
        ErrorClass::GenericError,
        ErrorClass::CommandNotFound,
        ErrorClass::DeviceNotActive,
        ErrorClass::DeviceNotFound,
        ErrorClass::KVMMissingCap,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }

    /// The class with this wire name, if there is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|class| class.as_str() == name)
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A QMP error reply: `{"error": {"class": class, "desc": desc}}`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    /// Human-readable; clients must not parse it.
    pub desc: String,
}

impl QmpError {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`, the class for almost every failure.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// The reply QEMU gives for a command it does not have.
    pub fn command_not_found(command: &str) -> Self {
        Self::new(
            ErrorClass::CommandNotFound,
            format!("The command {command} has not been found"),
        )
    }

    pub fn device_not_active(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotActive, desc)
    }

    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }

    pub fn kvm_missing_cap(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::KVMMissingCap, desc)
    }

    /// The `{"class", "desc"}` object of an error reply.
    pub fn to_json(&self) -> Value {
        json!({"class": self.class.as_str(), "desc": self.desc})
    }
}

/// What a successful command returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Sent as `{"return": value}`.
    pub value: Value,
    /// Close the connection once the reply is written (for `quit`).
    pub close_after: bool,
}

impl Reply {
    pub fn new(value: Value) -> Self {
        Reply {
            value,
            close_after: false,
        }
    }

    /// `{"return": {}}`, what commands without a result return.
    pub fn empty() -> Self {
        Self::new(json!({}))
    }

    /// The same reply, after which the server closes the connection.
    pub fn and_close(self) -> Self {
        Reply {
            close_after: true,
            ..self
        }
    }
}

impl From<Value> for Reply {
    fn from(value: Value) -> Self {
        Self::new(value)
    }
}

/// Executes the commands of a [`QmpServer`].
///
/// Called from one thread per connection, so possibly concurrently; a call
/// blocks only its own connection. `qmp_capabilities` never reaches the
/// handler. Unknown commands should get [`QmpError::command_not_found`].
pub trait QmpHandler: Send + Sync {
    /// Runs `command`. `arguments` is empty when the request had none.
    fn execute(
        &self,
        command: &str,
        arguments: serde_json::Map<String, Value>,
    ) -> Result<Reply, QmpError>;
}

impl<F> QmpHandler for F
where
    F: Fn(&str, serde_json::Map<String, Value>) -> Result<Reply, QmpError> + Send + Sync,
{
    fn execute(
        &self,
        command: &str,
        arguments: serde_json::Map<String, Value>,
    ) -> Result<Reply, QmpError> {
        self(command, arguments)
    }
}

fn version_component(text: &str) -> u64 {
    text.parse().unwrap_or(0)
}

/// `{"qemu": {"micro", "minor", "major"}, "package": "ferry X.Y.Z"}` for this
/// build: the `version` member of the greeting, and what `query-version` returns.
pub fn version_info() -> Value {
    json!({
        "qemu": {
            "micro": version_component(env!("CARGO_PKG_VERSION_PATCH")),
            "minor": version_component(env!("CARGO_PKG_VERSION_MINOR")),
            "major": version_component(env!("CARGO_PKG_VERSION_MAJOR")),
        },
        "package": concat!("ferry ", env!("CARGO_PKG_VERSION")),
    })
}

/// The greeting a server sends when a client connects.
fn greeting() -> Value {
    json!({"QMP": {"version": version_info(), "capabilities": []}})
}
