//! Server and client over real unix sockets, with a fake handler.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::*;

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ferry-qmp-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("qmp.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `echo` returns its arguments, `fail` fails with `arguments.class`,
/// `sleep` waits `arguments.ms`, `quit` closes the connection.
fn fake(command: &str, arguments: Map<String, Value>) -> Result<Reply, QmpError> {
    match command {
        "echo" => Ok(Value::Object(arguments).into()),
        "fail" => {
            let class = arguments["class"].as_str().unwrap_or_default();
            let class = ErrorClass::from_name(class).unwrap();
            Err(QmpError::new(class, format!("{class} on purpose")))
        }
        "sleep" => {
            let ms = arguments["ms"].as_u64().unwrap_or(0);
            thread::sleep(Duration::from_millis(ms));
            Ok(Reply::empty())
        }
        "quit" => Ok(Reply::empty().and_close()),
        "query-version" => Ok(version_info().into()),
        _ => Err(QmpError::command_not_found(command)),
    }
}

struct Fixture {
    server: QmpServer,
    _dir: TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = TempDir::new();
        let server = QmpServer::bind(dir.socket(), Arc::new(fake)).unwrap();
        Fixture { server, _dir: dir }
    }

    fn path(&self) -> &Path {
        self.server.path()
    }

    fn raw(&self) -> Raw {
        Raw::connect(self.path())
    }

    fn negotiated(&self) -> Raw {
        let mut raw = self.raw();
        raw.recv();
        raw.send(r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(raw.recv(), json!({"return": {}}));
        raw
    }

    fn client(&self) -> QmpClient {
        QmpClient::connect_with_timeout(self.path(), Some(Duration::from_secs(10))).unwrap()
    }
}

/// A hand-driven connection, to send arbitrary bytes.
struct Raw {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> Self {
        let writer = UnixStream::connect(path).unwrap();
        writer
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reader = BufReader::new(writer.try_clone().unwrap());
        Raw { writer, reader }
    }

    fn send_bytes(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    fn send(&mut self, line: &str) {
        self.send_bytes(format!("{line}\n").as_bytes());
    }

    /// The next message; each is one CRLF-terminated line.
    fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "server closed the connection");
        assert!(line.ends_with("\r\n"), "{line:?}");
        serde_json::from_str(&line).unwrap()
    }

    fn assert_closed(&mut self) {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest)),
            Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }

    fn assert_alive(&mut self) {
        self.send(r#"{"execute": "echo", "arguments": {"alive": true}, "id": "ping"}"#);
        assert_eq!(
            self.recv(),
            json!({"return": {"alive": true}, "id": "ping"})
        );
    }
}

fn error_of(reply: &Value) -> (&str, &str) {
    let error = &reply["error"];
    (
        error["class"].as_str().unwrap(),
        error["desc"].as_str().unwrap(),
    )
}

#[test]
fn greeting_has_qemu_shape_and_crate_version() {
    let fixture = Fixture::new();
    let mut raw = fixture.raw();
    let greeting = raw.recv();
    let version: Vec<u64> = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|part| part.parse().unwrap())
        .collect();
    assert_eq!(
        greeting,
        json!({"QMP": {
            "version": {
                "qemu": {"micro": version[2], "minor": version[1], "major": version[0]},
                "package": format!("ferry {}", env!("CARGO_PKG_VERSION")),
            },
            "capabilities": [],
        }})
    );
}

#[test]
fn commands_require_negotiation_first() {
    let fixture = Fixture::new();
    let mut raw = fixture.raw();
    raw.recv();
    raw.send(r#"{"execute": "echo", "id": 1}"#);
    assert_eq!(
        raw.recv(),
        json!({"error": {"class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1})
    );
    raw.send(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#);
    assert_eq!(
        error_of(&raw.recv()),
        ("GenericError", "Capability 'oob' not available")
    );
    raw.send(r#"{"execute": "qmp_capabilities", "arguments": {"bogus": 1}}"#);
    assert_eq!(error_of(&raw.recv()).0, "GenericError");
    // Still negotiating after the failures.
    raw.send(r#"{"execute": "echo"}"#);
    assert_eq!(error_of(&raw.recv()).0, "CommandNotFound");

    raw.send(r#"{"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": "n"}"#);
    assert_eq!(raw.recv(), json!({"return": {}, "id": "n"}));
    raw.assert_alive();
    raw.send(r#"{"execute": "qmp_capabilities"}"#);
    assert_eq!(
        error_of(&raw.recv()),
        (
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored"
        )
    );
}

#[test]
fn id_is_echoed_verbatim_and_only_when_given() {
    let fixture = Fixture::new();
    let mut raw = fixture.negotiated();
    for id in [
        json!(7),
        json!("abc"),
        json!({"nested": [1, null]}),
        json!(null),
        json!(1.5),
    ] {
        let request = json!({"execute": "echo", "arguments": {"x": 1}, "id": id});
        raw.send(&request.to_string());
        assert_eq!(raw.recv(), json!({"return": {"x": 1}, "id": id}));
        let request = json!({"execute": "nope", "id": id});
        raw.send(&request.to_string());
        assert_eq!(raw.recv()["id"], id);
    }
    raw.send(r#"{"execute": "echo"}"#);
    assert_eq!(raw.recv(), json!({"return": {}}));
    // Invalid requests that are objects still get their id back.
    raw.send(r#"{"execute": 5, "id": "bad"}"#);
    assert_eq!(raw.recv()["id"], "bad");
}

#[test]
fn handler_error_classes_reach_the_wire() {
    let fixture = Fixture::new();
    let mut raw = fixture.negotiated();
    for class in ErrorClass::ALL {
        let request = json!({"execute": "fail", "arguments": {"class": class.as_str()}});
        raw.send(&request.to_string());
        let reply = raw.recv();
        assert_eq!(
            error_of(&reply),
            (class.as_str(), format!("{class} on purpose").as_str())
        );
        assert!(reply.get("id").is_none());
    }
    raw.send(r#"{"execute": "no-such-command"}"#);
    assert_eq!(
        error_of(&raw.recv()),
        (
            "CommandNotFound",
            "The command no-such-command has not been found"
        )
    );
}

#[test]
fn malformed_input_gets_an_error_and_the_connection_survives() {
    let fixture = Fixture::new();
    let mut raw = fixture.negotiated();
    let cases: &[(&[u8], &str)] = &[
        (b"{\"execute\": }\n", "JSON parse error"),
        (b"{\"execute\" \"echo\"}\n", "JSON parse error"),
        (b"hello\n", "JSON parse error"),
        (b"}\n", "JSON parse error"),
        (b"[1, 2]\n", "QMP input must be a JSON object"),
        (b"42\n", "QMP input must be a JSON object"),
        (b"\"execute\"\n", "QMP input must be a JSON object"),
        (b"null\n", "QMP input must be a JSON object"),
        (b"{}\n", "QMP input lacks member 'execute'"),
        (b"{\"arguments\": {}}\n", "QMP input lacks member 'execute'"),
        (
            b"{\"execute\": 1}\n",
            "QMP input member 'execute' must be a string",
        ),
        (
            b"{\"execute\": [\"echo\"]}\n",
            "QMP input member 'execute' must be a string",
        ),
        (
            b"{\"execute\": \"echo\", \"arguments\": [1]}\n",
            "QMP input member 'arguments' must be an object",
        ),
        (
            b"{\"execute\": \"echo\", \"arguments\": null}\n",
            "QMP input member 'arguments' must be an object",
        ),
        (
            b"{\"execute\": \"echo\", \"foo\": 1}\n",
            "QMP input member 'foo' is unexpected",
        ),
        (
            b"{\"exec-oob\": \"echo\"}\n",
            "QMP input member 'exec-oob' is not supported",
        ),
        // Invalid UTF-8 inside a string.
        (b"{\"execute\": \"ec\xff\xfeho\"}\n", "JSON parse error"),
        // An unfinished text is abandoned at a control character.
        (
            b"{\"execute\": \"ech\x1b\n",
            "invalid control character 0x1b",
        ),
    ];
    for (input, want) in cases {
        raw.send_bytes(input);
        let reply = raw.recv();
        let (class, desc) = error_of(&reply);
        assert_eq!(class, "GenericError", "{reply}");
        assert!(
            desc.contains(want),
            "{:?}: {desc:?}",
            String::from_utf8_lossy(input)
        );
        raw.assert_alive();
    }
}

#[test]
fn deep_nesting_is_rejected_without_harm() {
    let fixture = Fixture::new();
    let mut raw = fixture.negotiated();
    let depth = 100_000;
    let input = format!("{}{}\n", "[".repeat(depth), "]".repeat(depth));
    raw.send(&input);
    let reply = raw.recv();
    assert!(
        error_of(&reply).1.starts_with("JSON parse error"),
        "{reply}"
    );
    raw.assert_alive();
}

#[test]
fn framing_does_not_depend_on_newlines_or_write_boundaries() {
    let fixture = Fixture::new();
    let mut raw = fixture.negotiated();
    // Several requests in one write, no newlines, braces inside strings.
    raw.send_bytes(
        br#"{"execute":"echo","id":1}{"execute":"echo","arguments":{"s":"}{\"]"},"id":2}  {"execute":"echo","id":3}"#,
    );
    assert_eq!(raw.recv(), json!({"return": {}, "id": 1}));
    assert_eq!(raw.recv(), json!({"return": {"s": "}{\"]"}, "id": 2}));
    assert_eq!(raw.recv(), json!({"return": {}, "id": 3}));
    // One request a byte at a time.
    for byte in br#"{"execute": "echo", "arguments": {"k": "v"}, "id": 4}"# {
        raw.send_bytes(&[*byte]);
    }
    assert_eq!(raw.recv(), json!({"return": {"k": "v"}, "id": 4}));
}

#[test]
fn oversize_message_gets_an_error_and_closes_only_that_connection() {
    let fixture = Fixture::new();
    let mut other = fixture.negotiated();
    let mut raw = fixture.negotiated();
    let big = format!(
        r#"{{"execute": "echo", "arguments": {{"s": "{}"}}}}"#,
        "a".repeat(MAX_MESSAGE_SIZE)
    );
    // Written from another thread: the server stops reading part way.
    let mut writer = raw.writer.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let _ = writer.write_all(big.as_bytes());
    });
    let reply = raw.recv();
    assert_eq!(
        error_of(&reply),
        (
            "GenericError",
            format!("QMP input exceeds the limit of {MAX_MESSAGE_SIZE} bytes per message").as_str()
        )
    );
    raw.assert_closed();
    sender.join().unwrap();
    other.assert_alive();
}

#[test]
fn unterminated_input_is_bounded_too() {
    let fixture = Fixture::new();
    let mut raw = fixture.negotiated();
    let mut writer = raw.writer.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let chunk = vec![b'['; 64 * 1024];
        for _ in 0..(2 * MAX_MESSAGE_SIZE / chunk.len()) {
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    assert!(error_of(&raw.recv()).1.contains("exceeds the limit"));
    raw.assert_closed();
    sender.join().unwrap();
}

#[test]
fn message_just_under_the_limit_is_accepted() {
    let fixture = Fixture::new();
    let mut raw = fixture.negotiated();
    let envelope = r#"{"execute": "echo", "arguments": {"s": ""}}"#.len();
    let s = "b".repeat(MAX_MESSAGE_SIZE - envelope);
    let request = format!(r#"{{"execute": "echo", "arguments": {{"s": "{s}"}}}}"#);
    assert_eq!(request.len(), MAX_MESSAGE_SIZE);
    raw.send(&request);
    assert_eq!(raw.recv()["return"]["s"].as_str().unwrap().len(), s.len());
}

#[test]
fn client_leaving_mid_message_does_not_disturb_others() {
    let fixture = Fixture::new();
    let mut other = fixture.negotiated();
    {
        let mut raw = fixture.negotiated();
        raw.send_bytes(br#"{"execute": "echo", "argum"#);
    }
    {
        let mut raw = fixture.raw();
        raw.send_bytes(br#"{"execute": "qmp_capa"#);
    }
    other.assert_alive();
    assert!(fixture.server.events().emit("AFTER", Value::Null) >= 1);
    assert_eq!(other.recv()["event"], "AFTER");
}

#[test]
fn quit_reply_is_delivered_before_the_connection_closes() {
    let fixture = Fixture::new();
    let mut raw = fixture.negotiated();
    raw.send(r#"{"execute": "quit", "id": "q"}{"execute": "echo", "id": "never"}"#);
    assert_eq!(raw.recv(), json!({"return": {}, "id": "q"}));
    raw.assert_closed();
}

#[test]
fn events_reach_negotiated_clients_in_order() {
    let fixture = Fixture::new();
    let mut first = fixture.client();
    let mut second = fixture.client();
    let mut negotiating = fixture.raw();
    negotiating.recv();
    let events = fixture.server.events();
    for i in 0..200 {
        assert_eq!(events.emit("TICK", json!({"n": i})), 2);
    }
    events.emit("STOP", Value::Null);
    for client in [&mut first, &mut second] {
        for i in 0..200 {
            let event = client.next_event(Duration::from_secs(10)).unwrap().unwrap();
            assert_eq!(event.name, "TICK");
            assert_eq!(event.data, json!({"n": i}));
            assert!(event.timestamp.unwrap().microseconds < 1_000_000);
        }
        let stop = client.next_event(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!((stop.name.as_str(), &stop.data), ("STOP", &Value::Null));
        assert_eq!(client.next_event(Duration::ZERO).unwrap(), None);
    }
    // The connection still negotiating got none; its next message is a reply.
    negotiating.send(r#"{"execute": "qmp_capabilities"}"#);
    assert_eq!(negotiating.recv(), json!({"return": {}}));
}

#[test]
fn event_wire_shape() {
    let fixture = Fixture::new();
    let mut raw = fixture.negotiated();
    fixture
        .server
        .events()
        .emit("MIGRATION", json!({"status": "active"}));
    let event = raw.recv();
    let object = event.as_object().unwrap();
    assert_eq!(object.len(), 3);
    assert_eq!(event["event"], "MIGRATION");
    assert_eq!(event["data"], json!({"status": "active"}));
    assert!(event["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
    assert!(event["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
}

#[test]
fn events_are_queued_while_a_command_runs() {
    let fixture = Fixture::new();
    let mut client = fixture.client();
    let events = fixture.server.events();
    let emitter = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        events.emit("DURING", json!({}));
    });
    client.execute("sleep", json!({"ms": 300})).unwrap();
    emitter.join().unwrap();
    let event = client.next_event(Duration::ZERO).unwrap().unwrap();
    assert_eq!(event.name, "DURING");
}

#[test]
fn client_round_trip() {
    let fixture = Fixture::new();
    let mut client = fixture.client();
    let greeting = client.greeting().clone();
    assert_eq!(
        greeting.package,
        format!("ferry {}", env!("CARGO_PKG_VERSION"))
    );
    assert!(greeting.capabilities.is_empty());
    assert_eq!(
        client.execute("query-version", Value::Null).unwrap(),
        version_info()
    );
    assert_eq!(
        client.execute("echo", json!({"a": [1, 2]})).unwrap(),
        json!({"a": [1, 2]})
    );
    let err = client
        .execute("fail", json!({"class": "DeviceNotFound"}))
        .unwrap_err();
    assert_eq!(
        err.qmp_error(),
        Some(&QmpError::device_not_found("DeviceNotFound on purpose"))
    );
    assert_eq!(err.to_string(), "QMP command 'fail' failed");
    assert!(matches!(
        client.execute("echo", json!([1])),
        Err(QmpClientError::InvalidArguments { .. })
    ));
    assert_eq!(
        client
            .execute("nope", Value::Null)
            .unwrap_err()
            .qmp_error()
            .unwrap()
            .class,
        ErrorClass::CommandNotFound
    );
}

#[test]
fn client_timeout_leaves_the_client_usable() {
    let fixture = Fixture::new();
    let mut client = fixture.client();
    client.set_timeout(Some(Duration::from_millis(100)));
    let started = Instant::now();
    assert!(matches!(
        client.execute("sleep", json!({"ms": 400})),
        Err(QmpClientError::Timeout)
    ));
    assert!(started.elapsed() < Duration::from_secs(5));
    client.set_timeout(Some(Duration::from_secs(10)));
    // The late reply to `sleep` arrives first and is recognised as stale.
    assert_eq!(
        client.execute("echo", json!({"after": 1})).unwrap(),
        json!({"after": 1})
    );
}

#[test]
fn client_sees_the_server_close() {
    let fixture = Fixture::new();
    let mut client = fixture.client();
    client.execute("quit", Value::Null).unwrap();
    assert!(matches!(
        client.execute("echo", Value::Null),
        Err(QmpClientError::Closed)
    ));
}

#[test]
fn client_connect_errors_name_the_socket() {
    let dir = TempDir::new();
    let err = QmpClient::connect(dir.socket()).unwrap_err();
    assert!(matches!(err, QmpClientError::Connect { .. }));
    assert_eq!(
        err.to_string(),
        format!("cannot connect to QMP socket {}", dir.socket().display())
    );
}

#[test]
fn concurrent_clients() {
    let fixture = Fixture::new();
    let served = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|worker| {
            let mut client = fixture.client();
            let served = Arc::clone(&served);
            thread::spawn(move || {
                for i in 0..50 {
                    let arguments = json!({"worker": worker, "i": i});
                    assert_eq!(
                        client.execute("echo", arguments.clone()).unwrap(),
                        arguments
                    );
                    served.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    assert_eq!(served.load(Ordering::Relaxed), 400);
}

#[test]
fn a_client_that_stops_reading_does_not_block_events_to_others() {
    let fixture = Fixture::new();
    let stalled = fixture.negotiated();
    let mut reader = fixture.client();
    let events = fixture.server.events();
    // Far more than the stalled client's socket buffer and queue can hold.
    let count = 4 * OUTPUT_QUEUE_LEN;
    let payload = "x".repeat(4096);
    // The emitter stays at most `lead` events ahead of the reading client,
    // as a VMM's event rate stays below what a healthy client consumes.
    let lead = OUTPUT_QUEUE_LEN / 4;
    let (progress_tx, progress) = std::sync::mpsc::channel::<usize>();
    let started = Instant::now();
    let emitter = {
        let events = events.clone();
        thread::spawn(move || {
            let mut received = 0;
            for i in 0..count {
                while i >= received + lead {
                    received = progress.recv().unwrap();
                }
                events.emit("BULK", json!({"i": i, "pad": payload}));
            }
        })
    };
    for i in 0..count {
        let event = reader.next_event(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(event.data["i"], i);
        let _ = progress_tx.send(i + 1);
    }
    emitter.join().unwrap();
    assert!(started.elapsed() < WRITE_TIMEOUT);
    // The stalled client was dropped; only the reader is left.
    assert_eq!(events.emit("LAST", Value::Null), 1);
    drop(stalled);
}

#[test]
fn shutdown_removes_the_socket_and_disconnects_clients() {
    let dir = TempDir::new();
    let server = QmpServer::bind(dir.socket(), Arc::new(fake)).unwrap();
    let events = server.events();
    let mut client =
        QmpClient::connect_with_timeout(dir.socket(), Some(Duration::from_secs(10))).unwrap();
    assert!(dir.socket().exists());
    server.shutdown();
    assert!(!dir.socket().exists());
    assert!(matches!(
        client.execute("echo", Value::Null),
        Err(QmpClientError::Closed)
    ));
    assert_eq!(events.emit("AFTER", Value::Null), 0);
}

#[test]
fn bind_replaces_only_stale_sockets() {
    let dir = TempDir::new();
    // A socket file nobody listens on any more.
    drop(UnixListener::bind(dir.socket()).unwrap());
    assert!(dir.socket().exists());
    let server = QmpServer::bind(dir.socket(), Arc::new(fake)).unwrap();

    let err = QmpServer::bind(dir.socket(), Arc::new(fake)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    drop(server);

    std::fs::write(dir.socket(), b"not a socket").unwrap();
    let err = QmpServer::bind(dir.socket(), Arc::new(fake)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(dir.socket()).unwrap(), b"not a socket");
}

#[test]
fn handles_cross_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<QmpServer>();
    assert_send_sync::<EventSender>();
    assert_send_sync::<QmpClient>();
    assert_send_sync::<QmpClientError>();
}
