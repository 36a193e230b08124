//! A blocking QMP client, for `ferry migrate`, `ferry status` and tests.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use thiserror::Error;
use tracing::{debug, warn};

use super::framer::{Frame, Framer};
use super::{ErrorClass, QmpError};

/// How long [`QmpClient::connect`] waits for the server, and then for each
/// command, unless told otherwise.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest message accepted from a server. Far above anything QEMU sends
/// (its `query-qmp-schema` reply is a few hundred KiB).
const MAX_SERVER_MESSAGE: usize = 64 << 20;
/// Events kept while nobody calls [`QmpClient::next_event`]; the oldest are
/// dropped beyond this.
const MAX_QUEUED_EVENTS: usize = 4096;
/// Shortest read attempted, so that a zero timeout still picks up what has
/// already arrived.
const MIN_WAIT: Duration = Duration::from_millis(1);
const READ_CHUNK: usize = 64 * 1024;

/// Why a QMP client operation failed.
#[derive(Debug, Error)]
pub enum QmpClientError {
    #[error("cannot connect to QMP socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QMP socket I/O failed")]
    Io(#[source] io::Error),
    #[error("timed out waiting for the QMP server")]
    Timeout,
    #[error("QMP server closed the connection")]
    Closed,
    #[error("QMP server sent invalid JSON")]
    InvalidJson(#[source] serde_json::Error),
    #[error("QMP server sent a message larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("QMP server broke the protocol: {0}")]
    Protocol(String),
    #[error("arguments of QMP command '{command}' are not a JSON object")]
    InvalidArguments { command: String },
    /// The server answered with an error reply.
    #[error("QMP command '{command}' failed")]
    Command {
        command: String,
        #[source]
        source: QmpError,
    },
}

impl QmpClientError {
    /// The server's error reply, if that is what this is.
    pub fn qmp_error(&self) -> Option<&QmpError> {
        match self {
            QmpClientError::Command { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// What the server said about itself when the client connected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Greeting {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
    /// For example `ferry 0.1.0`, or a distribution's QEMU package string.
    pub package: String,
    /// Capabilities offered; this client enables none.
    pub capabilities: Vec<String>,
}

/// When the server emitted an event (its wall clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

/// An asynchronous event from the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    /// `null` when the event carries no data.
    pub data: Value,
    pub timestamp: Option<Timestamp>,
}

/// A message from the server, other than the greeting.
enum Incoming {
    Reply {
        id: Option<Value>,
        result: Result<Value, QmpError>,
    },
    Event(Event),
    Other(Map<String, Value>),
}

/// A connection to a QMP server, in command mode.
///
/// Commands are synchronous: [`execute`](Self::execute) sends one and waits
/// for its reply, matched by `id`, queueing the events that arrive meanwhile.
/// A reply that arrives after its command timed out is recognised by its `id`
/// and dropped, so a timeout leaves the client usable.
pub struct QmpClient {
    stream: UnixStream,
    framer: Framer,
    frames: VecDeque<Frame>,
    chunk: Vec<u8>,
    events: VecDeque<Event>,
    greeting: Greeting,
    timeout: Option<Duration>,
    last_id: u64,
}

impl QmpClient {
    /// Connects with [`DEFAULT_CLIENT_TIMEOUT`], reads the greeting and
    /// negotiates capabilities.
    pub fn connect(path: impl AsRef<Path>) -> Result<QmpClient, QmpClientError> {
        Self::connect_with_timeout(path, Some(DEFAULT_CLIENT_TIMEOUT))
    }

    /// Like [`connect`](Self::connect), with `timeout` for the handshake and
    /// then for each command (`None` waits forever).
    pub fn connect_with_timeout(
        path: impl AsRef<Path>,
        timeout: Option<Duration>,
    ) -> Result<QmpClient, QmpClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| QmpClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let mut client = QmpClient {
            stream,
            framer: Framer::new(MAX_SERVER_MESSAGE),
            frames: VecDeque::new(),
            chunk: vec![0; READ_CHUNK],
            events: VecDeque::new(),
            greeting: Greeting::default(),
            timeout,
            last_id: 0,
        };
        let deadline = client.deadline();
        let greeting = client.read_message(deadline)?;
        client.greeting = parse_greeting(greeting)?;
        client.execute("qmp_capabilities", Value::Null)?;
        Ok(client)
    }

    /// The server's greeting.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// How long a command may take, `None` for no limit.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Runs `command` and returns its `return` value. `arguments` is a JSON
    /// object, or `null` for none.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpClientError> {
        let mut request = Map::new();
        request.insert("execute".into(), Value::String(command.into()));
        match arguments {
            Value::Null => {}
            Value::Object(arguments) => {
                request.insert("arguments".into(), Value::Object(arguments));
            }
            _ => {
                return Err(QmpClientError::InvalidArguments {
                    command: command.into(),
                })
            }
        }
        self.last_id += 1;
        let id = Value::from(self.last_id);
        request.insert("id".into(), id.clone());

        let deadline = self.deadline();
        self.send(&Value::Object(request))?;
        loop {
            match self.read_incoming(deadline)? {
                Incoming::Reply {
                    id: Some(reply_id),
                    result,
                } if reply_id == id => {
                    return result.map_err(|source| QmpClientError::Command {
                        command: command.into(),
                        source,
                    })
                }
                Incoming::Reply { id, .. } => {
                    debug!(?id, "dropping QMP reply to an earlier request");
                }
                Incoming::Event(event) => self.queue_event(event),
                Incoming::Other(message) => {
                    debug!(?message, "dropping unexpected QMP message");
                }
            }
        }
    }

    /// The next event: a queued one, or the first to arrive within `timeout`
    /// (`Ok(None)` if none does). Replies arriving meanwhile belong to
    /// commands that timed out, and are dropped.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, QmpClientError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        let deadline = Some(Instant::now() + timeout);
        loop {
            match self.read_incoming(deadline) {
                Ok(Incoming::Event(event)) => return Ok(Some(event)),
                Ok(Incoming::Reply { id, .. }) => {
                    debug!(?id, "dropping QMP reply to an earlier request");
                }
                Ok(Incoming::Other(message)) => {
                    debug!(?message, "dropping unexpected QMP message");
                }
                Err(QmpClientError::Timeout) => return Ok(None),
                Err(err) => return Err(err),
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.timeout.map(|timeout| Instant::now() + timeout)
    }

    fn queue_event(&mut self, event: Event) {
        if self.events.len() == MAX_QUEUED_EVENTS {
            let dropped = self.events.pop_front();
            warn!(event = ?dropped.map(|event| event.name), "QMP event queue full; dropping the oldest event");
        }
        self.events.push_back(event);
    }

    fn send(&mut self, message: &Value) -> Result<(), QmpClientError> {
        let mut bytes = message.to_string().into_bytes();
        bytes.push(b'\n');
        self.stream
            .set_write_timeout(self.timeout)
            .map_err(QmpClientError::Io)?;
        self.stream.write_all(&bytes).map_err(io_error)
    }

    fn read_incoming(&mut self, deadline: Option<Instant>) -> Result<Incoming, QmpClientError> {
        let mut message = self.read_message(deadline)?;
        if let Some(name) = message.remove("event") {
            let Value::String(name) = name else {
                return Err(QmpClientError::Protocol(
                    "event name is not a string".into(),
                ));
            };
            return Ok(Incoming::Event(Event {
                name,
                data: message.remove("data").unwrap_or(Value::Null),
                timestamp: message.get("timestamp").and_then(parse_timestamp),
            }));
        }
        let id = message.remove("id");
        if let Some(value) = message.remove("return") {
            return Ok(Incoming::Reply {
                id,
                result: Ok(value),
            });
        }
        if let Some(error) = message.remove("error") {
            return Ok(Incoming::Reply {
                id,
                result: Err(parse_error(&error)),
            });
        }
        if let Some(id) = id {
            message.insert("id".into(), id);
        }
        Ok(Incoming::Other(message))
    }

    /// The next message as a JSON object, reading until `deadline`.
    fn read_message(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Map<String, Value>, QmpClientError> {
        let mut waited = false;
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return match frame {
                    Frame::Text(text) => match serde_json::from_slice(&text) {
                        Ok(Value::Object(message)) => Ok(message),
                        Ok(_) => Err(QmpClientError::Protocol(
                            "message is not a JSON object".into(),
                        )),
                        Err(err) => Err(QmpClientError::InvalidJson(err)),
                    },
                    Frame::ControlChar(byte) => Err(QmpClientError::Protocol(format!(
                        "control character 0x{byte:02x} in the message stream"
                    ))),
                    Frame::TooLarge => Err(QmpClientError::TooLarge {
                        limit: MAX_SERVER_MESSAGE,
                    }),
                };
            }
            let wait = match deadline {
                None => None,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() && waited {
                        return Err(QmpClientError::Timeout);
                    }
                    Some(left.max(MIN_WAIT))
                }
            };
            waited = true;
            self.stream
                .set_read_timeout(wait)
                .map_err(QmpClientError::Io)?;
            match self.stream.read(&mut self.chunk) {
                Ok(0) => return Err(QmpClientError::Closed),
                Ok(n) => self.framer.feed(&self.chunk[..n], &mut self.frames),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(io_error(err)),
            }
        }
    }
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("greeting", &self.greeting)
            .field("timeout", &self.timeout)
            .field("queued_events", &self.events.len())
            .finish_non_exhaustive()
    }
}

fn io_error(err: io::Error) -> QmpClientError {
    match err.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => QmpClientError::Timeout,
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => QmpClientError::Closed,
        _ => QmpClientError::Io(err),
    }
}

fn parse_greeting(mut message: Map<String, Value>) -> Result<Greeting, QmpClientError> {
    let Some(Value::Object(qmp)) = message.remove("QMP") else {
        return Err(QmpClientError::Protocol(
            "first message is not a QMP greeting".into(),
        ));
    };
    let version = qmp.get("version");
    let number = |key: &str| {
        version
            .and_then(|version| version.get("qemu"))
            .and_then(|qemu| qemu.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Ok(Greeting {
        major: number("major"),
        minor: number("minor"),
        micro: number("micro"),
        package: version
            .and_then(|version| version.get("package"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        capabilities: qmp
            .get("capabilities")
            .and_then(Value::as_array)
            .map(|capabilities| {
                capabilities
                    .iter()
                    .filter_map(|capability| capability.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// An error reply's `{"class", "desc"}`. QEMU tells clients to treat classes
/// they do not know as `GenericError`.
fn parse_error(error: &Value) -> QmpError {
    let class = error
        .get("class")
        .and_then(Value::as_str)
        .and_then(ErrorClass::from_name)
        .unwrap_or(ErrorClass::GenericError);
    let desc = error
        .get("desc")
        .and_then(Value::as_str)
        .unwrap_or_default();
    QmpError::new(class, desc)
}

fn parse_timestamp(timestamp: &Value) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: timestamp.get("seconds")?.as_i64()?,
        microseconds: timestamp.get("microseconds")?.as_i64()?,
    })
}
