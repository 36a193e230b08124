//! The QMP server: one accept thread, and per connection a reader thread that
//! runs commands plus a writer thread that drains the connection's output queue.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tracing::{debug, warn};

use super::framer::{Frame, Framer};
use super::{
    greeting, QmpError, QmpHandler, Reply, MAX_MESSAGE_SIZE, OUTPUT_QUEUE_LEN, WRITE_TIMEOUT,
};

/// Bytes read from a connection at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Pause after a failed `accept`, so that running out of descriptors does not
/// turn the accept thread into a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One serialized message, shared between the queues of all connections an
/// event goes to.
type Line = Arc<str>;

/// A QMP server listening on a unix socket.
///
/// Dropping it (or [`QmpServer::shutdown`]) stops accepting, disconnects every
/// client and removes the socket file. A command already running in a handler
/// finishes; its reply is discarded.
pub struct QmpServer {
    path: PathBuf,
    /// `(st_dev, st_ino)` of the socket we bound, so that shutdown never
    /// removes a file someone else put at `path` since.
    socket_id: Option<(u64, u64)>,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

/// State shared by the accept thread, the connections and every [`EventSender`].
struct Shared {
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    /// Set once by shutdown; no connection is registered afterwards.
    closed: bool,
    connections: HashMap<u64, Connection>,
}

struct Connection {
    /// A handle on the socket, to disconnect the client from another thread.
    stream: UnixStream,
    /// The output queue, once the connection is in command mode.
    events: Option<SyncSender<Line>>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Every update of the registry is a single insert or remove, so a
        // panic elsewhere cannot leave it inconsistent.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn deregister(&self, id: u64) {
        self.registry().connections.remove(&id);
    }
}

impl QmpServer {
    /// Listens on `path`, replacing a stale socket file left by a server that
    /// is gone, and serves each client with `handler`.
    ///
    /// Fails with `AddrInUse` if a server is answering on `path`, and with
    /// `AlreadyExists` if `path` is something other than a socket.
    pub fn bind(path: impl AsRef<Path>, handler: Arc<dyn QmpHandler>) -> io::Result<QmpServer> {
        let path = path.as_ref().to_path_buf();
        crate::transport::claim_unix_path(&path)?;
        let listener = UnixListener::bind(&path)?;
        let socket_id = std::fs::symlink_metadata(&path)
            .ok()
            .map(|meta| (meta.dev(), meta.ino()));
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry::default()),
        });
        let accept_shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || accept_loop(listener, accept_shared, handler));
        let accept_thread = match spawned {
            Ok(thread) => thread,
            Err(err) => {
                let _ = std::fs::remove_file(&path);
                return Err(err);
            }
        };
        debug!(path = %path.display(), "QMP server listening");
        Ok(QmpServer {
            path,
            socket_id,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle for emitting events to this server's clients.
    pub fn events(&self) -> EventSender {
        EventSender {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Stops the server; the same as dropping it.
    pub fn shutdown(self) {}

    fn is_our_socket(&self) -> bool {
        let current = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|meta| (meta.dev(), meta.ino()));
        current.is_some() && current == self.socket_id
    }

    fn stop(&mut self) {
        let Some(accept_thread) = self.accept_thread.take() else {
            return;
        };
        let connections = {
            let mut registry = self.shared.registry();
            registry.closed = true;
            std::mem::take(&mut registry.connections)
        };
        for connection in connections.values() {
            let _ = connection.stream.shutdown(std::net::Shutdown::Both);
        }
        // The accept thread is blocked in accept(); a connection of our own
        // wakes it up to see `closed`. If the socket file was replaced we
        // cannot reach it, and leave the thread to exit on its next client.
        if self.is_our_socket() && UnixStream::connect(&self.path).is_ok() {
            let _ = accept_thread.join();
        } else {
            warn!(path = %self.path.display(), "QMP socket file was replaced or removed; accept thread left behind");
        }
        if self.is_our_socket() {
            let _ = std::fs::remove_file(&self.path);
        }
        debug!(path = %self.path.display(), "QMP server stopped");
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Emits QMP events to every client of a server that has finished
/// capabilities negotiation. Cheap to clone; does nothing once the server is
/// gone.
#[derive(Clone)]
pub struct EventSender {
    shared: Arc<Shared>,
}

impl EventSender {
    /// Sends `{"event": name, "data": data, "timestamp": ...}` (without `data`
    /// if it is `null`) and returns how many clients it was queued for.
    ///
    /// Never blocks on a client: one whose output queue is full is not reading
    /// and gets disconnected. Events from concurrent callers reach every
    /// client in the same order.
    pub fn emit(&self, name: &str, data: Value) -> usize {
        let mut registry = self.shared.registry();
        let mut event = Map::new();
        event.insert("event".into(), Value::String(name.into()));
        if !data.is_null() {
            event.insert("data".into(), data);
        }
        event.insert("timestamp".into(), timestamp());
        let line: Line = Value::Object(event).to_string().into();

        let mut queued = 0;
        let mut stalled = Vec::new();
        for (&id, connection) in &registry.connections {
            let Some(events) = &connection.events else {
                continue;
            };
            match events.try_send(Arc::clone(&line)) {
                Ok(()) => queued += 1,
                Err(TrySendError::Full(_)) => stalled.push(id),
                // The connection is closing and will deregister itself.
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
        for id in stalled {
            if let Some(connection) = registry.connections.remove(&id) {
                warn!(
                    connection = id,
                    event = name,
                    "QMP client is not reading its output; disconnecting it"
                );
                let _ = connection.stream.shutdown(std::net::Shutdown::Both);
            }
        }
        queued
    }
}

impl std::fmt::Debug for EventSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSender").finish_non_exhaustive()
    }
}

fn timestamp() -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()})
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>, handler: Arc<dyn QmpHandler>) {
    loop {
        let accepted = listener.accept();
        if shared.registry().closed {
            return;
        }
        match accepted {
            Ok((stream, _)) => start_connection(stream, &shared, &handler),
            Err(err) => {
                warn!(error = %err, "QMP server cannot accept a connection");
                thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

fn start_connection(stream: UnixStream, shared: &Arc<Shared>, handler: &Arc<dyn QmpHandler>) {
    let handle = match stream.try_clone() {
        Ok(handle) => handle,
        Err(err) => {
            warn!(error = %err, "QMP server cannot take on a connection");
            return;
        }
    };
    let id = {
        let mut registry = shared.registry();
        if registry.closed {
            return;
        }
        let id = registry.next_id;
        registry.next_id += 1;
        registry.connections.insert(
            id,
            Connection {
                stream: handle,
                events: None,
            },
        );
        id
    };
    let conn_shared = Arc::clone(shared);
    let conn_handler = Arc::clone(handler);
    let spawned = thread::Builder::new()
        .name(format!("qmp-conn-{id}"))
        .spawn(move || serve(id, stream, conn_shared, conn_handler));
    if let Err(err) = spawned {
        warn!(error = %err, "QMP server cannot start a connection thread");
        shared.deregister(id);
    }
}

/// Removes a connection from the registry when its thread ends, even by panic.
struct Registration {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.deregister(self.id);
    }
}

fn serve(id: u64, mut stream: UnixStream, shared: Arc<Shared>, handler: Arc<dyn QmpHandler>) {
    let registration = Registration { shared, id };
    debug!(connection = id, "QMP client connected");
    let writer = match start_writer(id, &stream) {
        Ok(writer) => writer,
        Err(err) => {
            warn!(connection = id, error = %err, "QMP server cannot start a writer thread");
            return;
        }
    };
    let (queue, writer_thread) = writer;
    let mut session = Session {
        id,
        shared: &registration.shared,
        handler: handler.as_ref(),
        queue,
        negotiated: false,
    };
    if session.send(greeting()).is_continue() {
        session.read_loop(&mut stream);
    }
    // The writer exits once it has drained the queue and every sender is
    // gone: the session's and the registry's copy.
    drop(session);
    drop(registration);
    let _ = writer_thread.join();
    debug!(connection = id, "QMP client disconnected");
}

fn start_writer(id: u64, stream: &UnixStream) -> io::Result<(SyncSender<Line>, JoinHandle<()>)> {
    let stream = stream.try_clone()?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let (queue, output) = mpsc::sync_channel(OUTPUT_QUEUE_LEN);
    let thread = thread::Builder::new()
        .name(format!("qmp-write-{id}"))
        .spawn(move || write_loop(id, stream, output))?;
    Ok((queue, thread))
}

fn write_loop(id: u64, stream: UnixStream, output: Receiver<Line>) {
    let mut out = BufWriter::new(&stream);
    let write = |out: &mut BufWriter<&UnixStream>, line: &str| {
        out.write_all(line.as_bytes())?;
        out.write_all(b"\r\n")
    };
    while let Ok(line) = output.recv() {
        let mut result = write(&mut out, &line);
        while result.is_ok() {
            match output.try_recv() {
                Ok(line) => result = write(&mut out, &line),
                Err(_) => break,
            }
        }
        if let Err(err) = result.and_then(|()| out.flush()) {
            debug!(connection = id, error = %err, "QMP client cannot be written to");
            break;
        }
    }
    // Wakes the reader if it is still waiting for input.
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Whether a connection goes on after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

impl Flow {
    fn is_continue(self) -> bool {
        self == Flow::Continue
    }
}

/// A validated request.
struct Request {
    command: String,
    arguments: Map<String, Value>,
}

/// The protocol state of one connection, driven by its reader thread.
struct Session<'a> {
    id: u64,
    shared: &'a Arc<Shared>,
    handler: &'a dyn QmpHandler,
    queue: SyncSender<Line>,
    negotiated: bool,
}

impl Session<'_> {
    fn read_loop(&mut self, stream: &mut UnixStream) {
        let mut framer = Framer::new(MAX_MESSAGE_SIZE);
        let mut frames = VecDeque::new();
        let mut chunk = vec![0; READ_CHUNK];
        loop {
            let n = match stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    debug!(connection = self.id, error = %err, "QMP client read failed");
                    return;
                }
            };
            framer.feed(&chunk[..n], &mut frames);
            while let Some(frame) = frames.pop_front() {
                if !self.handle(frame).is_continue() {
                    return;
                }
            }
        }
    }

    fn handle(&mut self, frame: Frame) -> Flow {
        match frame {
            Frame::Text(text) => {
                let (id, request) = parse_request(&text);
                match request {
                    Ok(request) => self.dispatch(request, id),
                    Err(err) => self.send(response(Err(err), id)),
                }
            }
            Frame::ControlChar(byte) => self.send(response(
                Err(QmpError::generic(format!(
                    "JSON parse error, invalid control character 0x{byte:02x}; pending input discarded"
                ))),
                None,
            )),
            Frame::TooLarge => {
                warn!(
                    connection = self.id,
                    "QMP client sent an oversize message; disconnecting it"
                );
                let _ = self.send(response(
                    Err(QmpError::generic(format!(
                        "QMP input exceeds the limit of {MAX_MESSAGE_SIZE} bytes per message"
                    ))),
                    None,
                ));
                Flow::Close
            }
        }
    }

    fn dispatch(&mut self, request: Request, id: Option<Value>) -> Flow {
        if request.command == "qmp_capabilities" {
            if self.negotiated {
                return self.send(response(
                    Err(QmpError::new(
                        super::ErrorClass::CommandNotFound,
                        "Capabilities negotiation is already complete, command ignored",
                    )),
                    id,
                ));
            }
            return match negotiate(&request.arguments) {
                Ok(()) => self.enter_command_mode(response(Ok(json!({})), id)),
                Err(err) => self.send(response(Err(err), id)),
            };
        }
        if !self.negotiated {
            return self.send(response(
                Err(QmpError::new(
                    super::ErrorClass::CommandNotFound,
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                )),
                id,
            ));
        }
        match self.handler.execute(&request.command, request.arguments) {
            Ok(Reply { value, close_after }) => {
                let flow = self.send(response(Ok(value), id));
                if close_after {
                    Flow::Close
                } else {
                    flow
                }
            }
            Err(err) => self.send(response(Err(err), id)),
        }
    }

    /// Queues the reply to `qmp_capabilities` and subscribes to events, as
    /// one step when the queue has room, so that a client never misses an
    /// event emitted after it saw that reply, nor sees one before it.
    fn enter_command_mode(&mut self, reply: Value) -> Flow {
        let line: Line = reply.to_string().into();
        let mut registry = self.shared.registry();
        if let Err(err) = self.queue.try_send(line) {
            let TrySendError::Full(line) = err else {
                return Flow::Close;
            };
            // The client has a backlog of unread replies: wait for room
            // without holding up everyone else's events.
            drop(registry);
            if self.queue.send(line).is_err() {
                return Flow::Close;
            }
            registry = self.shared.registry();
        }
        // Gone if the server is shutting down or dropped the client.
        let Some(connection) = registry.connections.get_mut(&self.id) else {
            return Flow::Close;
        };
        connection.events = Some(self.queue.clone());
        self.negotiated = true;
        Flow::Continue
    }

    /// Queues a message, waiting while the client is behind on reading.
    fn send(&self, message: Value) -> Flow {
        match self.queue.send(message.to_string().into()) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close,
        }
    }
}

/// Parses and validates one request text. Returns the `id` to echo (present
/// whenever the text was an object carrying one) with the outcome.
fn parse_request(text: &[u8]) -> (Option<Value>, Result<Request, QmpError>) {
    let value: Value = match serde_json::from_slice(text) {
        Ok(value) => value,
        Err(err) => {
            return (
                None,
                Err(QmpError::generic(format!("JSON parse error, {err}"))),
            )
        }
    };
    let Value::Object(mut members) = value else {
        return (
            None,
            Err(QmpError::generic("QMP input must be a JSON object")),
        );
    };
    let id = members.remove("id");
    (id, validate_request(members))
}

fn validate_request(mut members: Map<String, Value>) -> Result<Request, QmpError> {
    if members.contains_key("exec-oob") {
        return Err(QmpError::generic(
            "QMP input member 'exec-oob' is not supported: no out-of-band execution",
        ));
    }
    let command = match members.remove("execute") {
        Some(Value::String(command)) => command,
        Some(_) => {
            return Err(QmpError::generic(
                "QMP input member 'execute' must be a string",
            ))
        }
        None => return Err(QmpError::generic("QMP input lacks member 'execute'")),
    };
    let arguments = match members.remove("arguments") {
        Some(Value::Object(arguments)) => arguments,
        Some(_) => {
            return Err(QmpError::generic(
                "QMP input member 'arguments' must be an object",
            ))
        }
        None => Map::new(),
    };
    if let Some(name) = members.keys().next() {
        return Err(QmpError::generic(format!(
            "QMP input member '{name}' is unexpected"
        )));
    }
    Ok(Request { command, arguments })
}

/// Checks the arguments of `qmp_capabilities`. No capability is offered, so
/// the only valid `enable` is an empty list.
fn negotiate(arguments: &Map<String, Value>) -> Result<(), QmpError> {
    for (name, value) in arguments {
        if name != "enable" {
            return Err(QmpError::generic(format!(
                "Parameter '{name}' is unexpected"
            )));
        }
        let Value::Array(capabilities) = value else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'enable', expected: array",
            ));
        };
        if let Some(capability) = capabilities.first() {
            return Err(match capability {
                Value::String(capability) => {
                    QmpError::generic(format!("Capability '{capability}' not available"))
                }
                _ => QmpError::generic("Invalid parameter type for 'enable[0]', expected: string"),
            });
        }
    }
    Ok(())
}

/// A reply object, with `id` echoed if there was one.
fn response(result: Result<Value, QmpError>, id: Option<Value>) -> Value {
    let mut reply = Map::new();
    match result {
        Ok(value) => reply.insert("return".into(), value),
        Err(err) => reply.insert("error".into(), err.to_json()),
    };
    if let Some(id) = id {
        reply.insert("id".into(), id);
    }
    Value::Object(reply)
}
