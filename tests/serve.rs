//! The real binary on port 0 with the bundled model: bundled samples posted over HTTP; a
//! SIGKILL in the middle of a load after which every answered inspection is found with
//! its stored image; a SIGTERM that lets requests in flight finish before exiting 0 (and
//! one sent the moment the server listens, which must not kill it);
//! thousands of mutated uploads answered with 200 or a 4xx JSON error, never anything else;
//! a tiny model of every family served side by side.

mod common;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

struct Server {
    child: Child,
    addr: String,
    /// The last lines the server logged, for failure messages.
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Server {
    fn log_tail(&self) -> String {
        self.log.lock().unwrap().iter().cloned().collect()
    }

    fn sigterm(&self) {
        common::send_signal(&self.child, "-TERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `vigil serve` on an ephemeral port and waits for its "listening on" line.
fn start(data_dir: &std::path::Path) -> Server {
    start_with(data_dir, &[])
}

fn start_with(data_dir: &std::path::Path, extra: &[&str]) -> Server {
    let models = concat!(env!("CARGO_MANIFEST_DIR"), "/models");
    start_serving(std::path::Path::new(models), data_dir, extra)
}

fn start_serving(models: &std::path::Path, data_dir: &std::path::Path, extra: &[&str]) -> Server {
    let mut child = common::vigil()
        .env("RUST_LOG", "info")
        .args(["serve", "--listen", "127.0.0.1:0", "--models-dir"])
        .arg(models)
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("vigil serve starts");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "server exited before listening");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .to_string();
        }
    };
    // Keep draining the log so the server never blocks on a full pipe; the last lines stay
    // for failure messages.
    let log = Arc::new(Mutex::new(VecDeque::from([line.clone()])));
    let kept = log.clone();
    std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            let mut kept = kept.lock().unwrap();
            if kept.len() == 200 {
                kept.pop_front();
            }
            kept.push_back(l + "\n");
        }
    });
    Server { child, addr, log }
}

/// A minimal HTTP/1.1 exchange (Connection: close).
fn http(addr: &str, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let (status, _, body) = http_with(addr, method, path, content_type, "", body);
    (status, body)
}

/// [`http`] with `extra` header lines (each ending in CRLF); also returns the head.
fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    extra: &str,
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}\r\n", body.len()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").expect("header end");
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = resp[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, head, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

fn samples() -> Vec<std::path::PathBuf> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/default/samples");
    vigil::train::dataset::image_files(std::path::Path::new(dir)).unwrap()
}

#[test]
fn bundled_samples_over_http() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path());
    let (s, b) = http(&server.addr, "GET", "/health/ready", "text/plain", b"");
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    // Counters are there at 0 before their first event, so that an alert on their
    // increase sees that event.
    let (_, b) = http(&server.addr, "GET", "/metrics", "text/plain", b"");
    let text = String::from_utf8_lossy(&b);
    for series in [
        r#"vigil_verdicts_total{model="default",verdict="anomalous"} 0"#,
        r#"vigil_verdicts_total{model="default",verdict="normal"} 0"#,
        r#"vigil_database_errors_total{code="database_unavailable"} 0"#,
        r#"vigil_database_errors_total{code="image_store_unavailable"} 0"#,
        r#"vigil_inspections_replayed_total{model="default"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == series), "no {series} in:\n{text}");
    }
    // The command line's verdicts on the same files are the reference (their values are
    // held to the recorded golden ones in tests/bundled.rs): the service must agree.
    let cli = common::inspect_bundled_samples("default");
    let mut verdicts = Vec::new();
    for path in samples() {
        let bytes = std::fs::read(&path).unwrap();
        let (s, b) = http(&server.addr, "POST", "/v1/inspect", "image/png", &bytes);
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
        let v: Value = serde_json::from_slice(&b).unwrap();
        let name = path.file_name().unwrap().to_string_lossy();
        let reference = common::record_for(&cli, &name);
        assert_eq!(v["is_anomalous"], reference["is_anomalous"], "{name}: {v}");
        let (got, want) = (v["score"].as_f64().unwrap(), reference["score"].as_f64().unwrap());
        assert!(
            (got - want).abs() <= 1e-3 * want.abs().max(1.0),
            "{name}: {got} over HTTP, {want} from the CLI"
        );
        verdicts.push(v["is_anomalous"].as_bool().unwrap());
        let id = v["id"].as_str().unwrap();
        let (s, b) = http(
            &server.addr,
            "GET",
            &format!("/v1/inspections/{id}/heatmap.png"),
            "text/plain",
            b"",
        );
        assert_eq!(s, 200);
        assert!(image::load_from_memory(&b).is_ok());
    }
    assert!(verdicts.contains(&true) && verdicts.contains(&false), "{verdicts:?}");
    // The container health check.
    let probe = common::run(&["probe", &format!("http://{}/health/ready", server.addr)]);
    assert!(probe.status.success(), "{}", common::stderr(&probe));
    let probe = common::run(&["probe", &format!("http://{}/v1/models/nope", server.addr)]);
    // 1 is what a container runtime reads as unhealthy (it reserves 2).
    assert_eq!(probe.status.code(), Some(1), "{}", common::stderr(&probe));
    let (s, b) = http(&server.addr, "GET", "/metrics", "text/plain", b"");
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&b).contains("vigil_model_info"));
    // Each request is logged once at info, with its request id, status and latency.
    let log = server.log_tail();
    assert!(
        log.lines().any(|l| l.contains("answered")
            && l.contains("request_id=")
            && l.contains("path=/v1/inspect")
            && l.contains("status=200")
            && l.contains("latency_ms=")),
        "{log}"
    );
}

#[test]
fn every_answered_inspection_survives_sigkill() {
    let data = tempfile::tempdir().unwrap();
    let server = start(data.path());
    let image = std::fs::read(&samples()[0]).unwrap();
    let addr = server.addr.clone();
    // Four clients post until the server dies; each keeps the ids it got a 200 for.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            let image = image.clone();
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                for _ in 0..200 {
                    let Ok(mut s) = TcpStream::connect(&addr) else { break };
                    let head = format!("POST /v1/inspect HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n", image.len());
                    if s.write_all(head.as_bytes()).and_then(|_| s.write_all(&image)).is_err() {
                        break;
                    }
                    let mut resp = Vec::new();
                    if s.read_to_end(&mut resp).is_err() || resp.is_empty() {
                        break;
                    }
                    let text = String::from_utf8_lossy(&resp);
                    if text.starts_with("HTTP/1.1 200") {
                        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
                        let start = body.find("\"id\":\"").unwrap() + 6;
                        ids.push(body[start..start + 36].to_string());
                    }
                }
                ids
            })
        })
        .collect();
    // Kill once some inspections have been answered: wait on the database, not a clock.
    let mut server = server;
    let db = data.path().join("vigil.db");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt
        .block_on(vigil::storage::Store::connect(&format!("sqlite://{}", db.display())))
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while rt.block_on(store.count()).unwrap() < 8 {
        assert!(std::time::Instant::now() < deadline, "no inspections recorded");
        std::thread::yield_now();
    }
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    let answered: Vec<String> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    assert!(!answered.is_empty(), "some requests were answered before the kill");
    drop(store);
    let restarted = start(data.path());
    for id in &answered {
        let (s, b) = http(
            &restarted.addr,
            "GET",
            &format!("/v1/inspections/{id}"),
            "text/plain",
            b"",
        );
        assert_eq!(s, 200, "answered 200 but lost: {id}: {}", String::from_utf8_lossy(&b));
    }
    // And each answered inspection's stored image is whole: its bytes hash to what was sent.
    let store = rt
        .block_on(vigil::storage::Store::connect(&format!("sqlite://{}", db.display())))
        .unwrap();
    let sent = hex::encode(Sha256::digest(&image));
    for id in &answered {
        let r = rt
            .block_on(store.get(id))
            .unwrap()
            .expect("the row of an answered inspection");
        assert_eq!(r.image_sha256, sent, "{id}");
        let path = r
            .image_path
            .unwrap_or_else(|| panic!("{id}: answered without its image stored"));
        let stored = std::fs::read(data.path().join(&path)).unwrap_or_else(|e| panic!("{id}: {path}: {e}"));
        assert_eq!(hex::encode(Sha256::digest(&stored)), sent, "{id}: stored image differs");
    }
}

#[test]
fn sigterm_lets_requests_in_flight_finish_then_exits_0() {
    let data = tempfile::tempdir().unwrap();
    let mut server = start(data.path());
    let image = std::fs::read(&samples()[0]).unwrap();
    // Each client sends its headers with `Expect: 100-continue`: the server answers
    // "100 Continue" only once the handler reads the body, so the request is provably in
    // flight (not waiting in the accept queue) when the signal comes.
    let mut streams: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(&server.addr).unwrap();
            let head = format!("POST /v1/inspect HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: 100-continue\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n", image.len());
            s.write_all(head.as_bytes()).unwrap();
            let mut interim = [0u8; 25];
            s.read_exact(&mut interim).unwrap();
            assert!(interim.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"), "{:?}", String::from_utf8_lossy(&interim));
            s
        })
        .collect();
    server.sigterm();
    for s in &mut streams {
        s.write_all(&image).unwrap();
    }
    for mut s in streams {
        let mut resp = Vec::new();
        if let Err(e) = s.read_to_end(&mut resp) {
            panic!(
                "reading the answer of a request in flight: {e} ({:?}); got {:?}; the server's exit: {:?}; its log:\n{}",
                e.kind(),
                String::from_utf8_lossy(&resp),
                server.child.try_wait(),
                server.log_tail()
            );
        }
        let text = String::from_utf8_lossy(&resp);
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "a request in flight was not answered: {text}"
        );
        assert!(text.contains("\"is_anomalous\""), "{text}");
    }
    let status = server.child.wait().unwrap();
    assert!(
        status.success(),
        "vigil serve exited with {status} after SIGTERM; its log:\n{}",
        server.log_tail()
    );
    // Stopped cleanly, SQLite's write-ahead log is folded into the database file, so a
    // copy of that file alone holds every record.
    let wal = data.path().join("vigil.db-wal");
    assert!(
        std::fs::metadata(&wal).map_or(true, |m| m.len() == 0),
        "{} left behind",
        wal.display()
    );
}

/// Waits, up to a minute, until the server's log has a line containing `text`.
fn wait_for_log(server: &Server, text: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !server.log_tail().contains(text) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {text:?} in the log:\n{}",
            server.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits, up to `limit`, for the server to exit.
fn exit_within(server: &mut Server, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return Some(status);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn after_sigterm_it_answers_not_ready_for_the_shutdown_delay_and_still_serves() {
    let data = tempfile::tempdir().unwrap();
    let mut server = start_with(data.path(), &["--shutdown-delay", "5"]);
    server.sigterm();
    wait_for_log(&server, "still accepting connections");
    let (s, _) = http(&server.addr, "GET", "/health/ready", "text/plain", b"");
    assert_eq!(s, 503, "readiness during the shutdown delay");
    let (s, _) = http(&server.addr, "GET", "/health/live", "text/plain", b"");
    assert_eq!(s, 200);
    let image = std::fs::read(&samples()[0]).unwrap();
    let (s, b) = http(&server.addr, "POST", "/v1/inspect", "image/png", &image);
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let status = exit_within(&mut server, Duration::from_secs(60)).expect("still running a minute after SIGTERM");
    assert!(
        status.success(),
        "exited with {status}; its log:\n{}",
        server.log_tail()
    );
}

#[test]
fn a_client_stalling_its_body_holds_the_drain_no_longer_than_the_drain_timeout() {
    let data = tempfile::tempdir().unwrap();
    // The body timeout (30 s) would end the stalled request too; the drain must not wait for it.
    let mut server = start_with(data.path(), &["--drain-timeout", "1"]);
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.write_all(b"POST /v1/inspect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n")
        .unwrap();
    // "100 Continue" comes once the handler reads the body: the request is in flight.
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    s.write_all(&[0u8; 10]).unwrap();
    server.sigterm();
    let status = exit_within(&mut server, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("still draining 20 s after SIGTERM; its log:\n{}", server.log_tail()));
    assert!(
        status.success(),
        "exited with {status}; its log:\n{}",
        server.log_tail()
    );
    assert!(
        server.log_tail().contains("after the drain timeout"),
        "{}",
        server.log_tail()
    );
}

#[test]
fn sigterm_the_moment_it_listens_still_exits_0() {
    // The handlers are installed before the port is bound, so even a SIGTERM sent as soon
    // as "listening" is logged is a graceful shutdown, not the signal's default (death).
    let data = tempfile::tempdir().unwrap();
    let mut server = start(data.path());
    server.sigterm();
    let status = server.child.wait().unwrap();
    assert!(
        status.success(),
        "vigil serve exited with {status} after an early SIGTERM; its log:\n{}",
        server.log_tail()
    );
}

#[test]
fn a_starting_server_leaves_another_servers_quiet_job_to_the_heartbeat() {
    // Just after a database outage every server's jobs look quiet; a server starting
    // then must not mark a job another live server is training (here, one last heard
    // long ago) interrupted: only its heartbeat judges, a full quiet minute after start.
    let data = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = data.path().join("vigil.db");
    let store = rt
        .block_on(vigil::storage::Store::connect(&format!("sqlite://{}", db.display())))
        .unwrap();
    let job = vigil::storage::jobs::JobRow {
        id: "job-of-another-server".into(),
        model: "elsewhere".into(),
        status: "running".into(),
        message: None,
        options: "[]".into(),
        data: "/d".into(),
        created_at: 100,
        finished_at: None,
    };
    rt.block_on(store.insert_job(&job)).unwrap();
    drop(store);
    let server = start(data.path());
    let (s, b) = http(
        &server.addr,
        "GET",
        "/v1/training-jobs/job-of-another-server",
        "text/plain",
        b"",
    );
    let body = String::from_utf8_lossy(&b);
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["status"], "running", "{body}\n{}", server.log_tail());
}

#[test]
fn two_replicas_share_one_postgresql_database() {
    let Some(url) = common::postgres_url("two_replicas_share_one_postgresql_database") else {
        return;
    };
    // One database and one image volume, as in the compose and Kubernetes deployments.
    let shared = tempfile::tempdir().unwrap();
    let one = start_with(shared.path(), &["--database-url", &url]);
    let two = start_with(shared.path(), &["--database-url", &url]);
    let images = samples();
    let mut made = Vec::new();
    for (i, (by, other)) in [(&one, &two), (&two, &one)].into_iter().enumerate() {
        let image = std::fs::read(&images[i]).unwrap();
        let (s, b) = http(&by.addr, "POST", "/v1/inspect", "image/png", &image);
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
        let answer: Value = serde_json::from_slice(&b).unwrap();
        let id = answer["id"].as_str().unwrap().to_string();
        // The other replica finds the record and renders its heatmap from the shared image.
        let (s, b) = http(&other.addr, "GET", &format!("/v1/inspections/{id}"), "text/plain", b"");
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
        let seen: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(seen["score"], answer["score"]);
        let (s, b) = http(
            &other.addr,
            "GET",
            &format!("/v1/inspections/{id}/heatmap.png"),
            "text/plain",
            b"",
        );
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
        assert!(b.starts_with(b"\x89PNG"));
        made.push(id);
    }
    // Both replicas list both inspections (the database may hold other tests' rows too).
    for server in [&one, &two] {
        let (s, b) = http(&server.addr, "GET", "/v1/inspections?limit=500", "text/plain", b"");
        assert_eq!(s, 200);
        let page: Value = serde_json::from_slice(&b).unwrap();
        let ids: Vec<&str> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        for id in &made {
            assert!(ids.contains(&id.as_str()), "{id} missing from a replica's list");
        }
    }
    // A retry sent to the other replica is answered from the first one's record.
    let key = format!("Idempotency-Key: {}\r\n", made[0]);
    let image = std::fs::read(&images[2]).unwrap();
    let (s, head, first) = http_with(&one.addr, "POST", "/v1/inspect", "image/png", &key, &image);
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&first));
    assert!(!head.to_ascii_lowercase().contains("idempotent-replayed"));
    let (s, head, again) = http_with(&two.addr, "POST", "/v1/inspect", "image/png", &key, &image);
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&again));
    assert!(
        head.to_ascii_lowercase().contains("idempotent-replayed: true"),
        "{head}"
    );
    let (first, again): (Value, Value) = (
        serde_json::from_slice(&first).unwrap(),
        serde_json::from_slice(&again).unwrap(),
    );
    assert_eq!(first["id"], again["id"]);
    // PostgreSQL refuses a NUL in text: a request carrying one is the client's mistake
    // (404 or 400), not a database outage (503) to retry.
    for (method, uri, body, want) in [
        ("GET", "/v1/inspections/%00".to_string(), &b""[..], 404),
        ("GET", "/v1/training-jobs/a%00b".to_string(), &b""[..], 404),
        ("GET", "/v1/inspections?part_id=%00".to_string(), &b""[..], 400),
        ("GET", "/v1/inspections?part_prefix=a%00".to_string(), &b""[..], 400),
        (
            "POST",
            format!("/v1/inspections/{}/feedback", made[0]),
            &br#"{"label": "good", "note": "a\u0000b"}"#[..],
            400,
        ),
    ] {
        let (s, b) = http(&one.addr, method, &uri, "application/json", body);
        assert_eq!(s, want, "{uri}: {}", String::from_utf8_lossy(&b));
    }
}

/// Forwards every connection to `127.0.0.1:listen_port` to `target`, from now on.
fn forward(listen_port: u16, target: String) {
    let listener = std::net::TcpListener::bind(("127.0.0.1", listen_port)).expect("the reserved port is free");
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let Ok(server) = TcpStream::connect(&target) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
}

/// `vigil serve` on the database at `url`, willing to wait 120 s for it, its log piped.
fn serve_waiting_for(data: &std::path::Path, url: &str) -> Child {
    common::vigil()
        .env("RUST_LOG", "info")
        .args(["serve", "--listen", "127.0.0.1:0", "--models-dir"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/models"))
        .arg("--data-dir")
        .arg(data)
        .args(["--database-url", url, "--database-wait", "120"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_postgresql_server_that_answers_only_after_vigil_starts_is_waited_for() {
    let Some(url) = common::postgres_url("a_postgresql_server_that_answers_only_after_vigil_starts_is_waited_for")
    else {
        return;
    };
    // The database's address, and a port where nothing listens yet.
    let host_port = url.split('@').nth(1).unwrap().split('/').next().unwrap().to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let late_url = url.replace(&host_port, &format!("127.0.0.1:{port}"));
    let data = tempfile::tempdir().unwrap();
    let mut child = serve_waiting_for(data.path(), &late_url);
    let mut lines = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let mut seen = Vec::new();
    // It says it waits...
    for line in lines.by_ref() {
        seen.push(line.clone());
        assert!(
            !line.contains("listening on"),
            "listening without a database: {seen:#?}"
        );
        if line.contains("the database does not answer yet") {
            break;
        }
    }
    assert!(
        seen.last().is_some_and(|l| l.contains("does not answer yet")),
        "{seen:#?}"
    );
    // ...and once the database answers, it starts serving.
    forward(port, host_port);
    let addr = lines
        .by_ref()
        .find_map(|line| {
            seen.push(line.clone());
            line.split("listening on http://").nth(1).map(|rest| {
                rest.split_whitespace()
                    .next()
                    .unwrap()
                    .trim_end_matches(|c: char| !c.is_ascii_digit())
                    .to_string()
            })
        })
        .unwrap_or_else(|| panic!("never listened: {seen:#?}"));
    let (status, _) = http(&addr, "GET", "/health/ready", "text/plain", b"");
    assert_eq!(status, 200);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_database_certificate_that_fails_ends_the_start_at_once() {
    let Some(url) = common::postgres_tls_url("a_database_certificate_that_fails_ends_the_start_at_once") else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let mut child = serve_waiting_for(data.path(), common::without_ca(&url));
    let mut seen = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        if line.contains("does not answer yet") || line.contains("listening on") {
            let _ = child.kill();
            panic!("a failing certificate was waited on or ignored: {line}");
        }
        seen.push(line);
    }
    // The pipe closes when it exits: no retry loop was entered.
    let status = child.wait().unwrap();
    assert!(!status.success(), "{seen:#?}");
    assert!(seen.iter().any(|l| l.contains("certificate")), "{seen:#?}");
}

/// The fuzz seeds (one small image per format and variant) mutated the way a broken camera
/// link or a hostile client would: bits flipped, bytes overwritten with extremes, cut
/// short, spliced. Hand-written: a dozen lines, and it must be seeded and fast.
fn mutate(seed: &[u8], rng: &mut rand_chacha::ChaCha8Rng) -> Vec<u8> {
    use rand::Rng;
    let mut b = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        if b.is_empty() {
            break;
        }
        let at = rng.random_range(0..b.len());
        match rng.random_range(0..6) {
            0 => b[at] ^= 1 << rng.random_range(0..8),
            1 => b[at] = [0x00, 0xff, 0x7f, 0x80][rng.random_range(0..4)],
            2 => b.truncate(at),
            3 => {
                let junk: Vec<u8> = (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
                b.splice(at..at, junk);
            }
            4 => {
                let end = (at + rng.random_range(1..64)).min(b.len());
                let copy = b[at..end].to_vec();
                let to = rng.random_range(0..b.len());
                b.splice(to..to, copy);
            }
            _ => {
                // A 32-bit field (a width, a length, an offset) set to something large.
                let v: u32 = [0xffff_ffff, 0x7fff_ffff, 0x0001_0000, 0][rng.random_range(0..4)];
                for (k, byte) in v.to_be_bytes().iter().enumerate() {
                    if let Some(x) = b.get_mut(at + k) {
                        *x = *byte;
                    }
                }
            }
        }
    }
    b
}

#[test]
fn mutated_uploads_get_200_or_a_4xx_json_error_and_the_server_stays_up() {
    use rand::SeedableRng;
    let total: usize = std::env::var("VIGIL_TEST_MUTATIONS").map_or(10_000, |v| v.parse().unwrap());
    let models = tempfile::tempdir().unwrap();
    common::copy_model(common::tiny_model(), &models.path().join("default"));
    let data = tempfile::tempdir().unwrap();
    let server = start_serving(models.path(), data.path(), &[]);
    let seeds_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz-seeds/decode");
    let seeds: Vec<Vec<u8>> = std::fs::read_dir(seeds_dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(seeds.len() >= 4, "the seed corpus has every format");
    let content_types = ["image/png", "image/jpeg", "application/octet-stream", "image/tiff"];
    let clients = 4;
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            let (addr, seeds) = (server.addr.clone(), seeds.clone());
            std::thread::spawn(move || {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c as u64);
                let mut counts = std::collections::BTreeMap::<u16, usize>::new();
                for i in (c..total).step_by(clients) {
                    let body = mutate(&seeds[i % seeds.len()], &mut rng);
                    let (status, answer) = http(&addr, "POST", "/v1/inspect", content_types[i % 4], &body);
                    *counts.entry(status).or_default() += 1;
                    if status != 200 {
                        assert!((400..500).contains(&status), "upload {i} got {status}");
                        let v: Value = serde_json::from_slice(&answer)
                            .unwrap_or_else(|_| panic!("upload {i}: {status} without a JSON body"));
                        assert!(v["error"]["code"].is_string(), "upload {i}: {v}");
                    }
                }
                counts
            })
        })
        .collect();
    let mut counts = std::collections::BTreeMap::<u16, usize>::new();
    for w in workers {
        for (status, n) in w.join().unwrap() {
            *counts.entry(status).or_default() += n;
        }
    }
    assert_eq!(counts.values().sum::<usize>(), total);
    // The mutations reach both sides: some still decode and are judged, some are refused.
    assert!(counts.get(&200).is_some_and(|&n| n > 0), "{counts:?}");
    assert!(counts.keys().any(|&s| s != 200), "{counts:?}");
    let (s, _) = http(&server.addr, "GET", "/health/ready", "text/plain", b"");
    assert_eq!(s, 200, "the server is still up");
    let _ = writeln!(std::io::stderr(), "{total} mutated uploads: {counts:?}");
}

#[test]
fn a_model_of_every_family_is_served_side_by_side() {
    // Tiny models of each family in one models folder, one `vigil serve`: each answers
    // the same image by its own name, and usad's map mix can be set per request.
    let models = tempfile::tempdir().unwrap();
    let data = common::dataset().to_str().unwrap().to_string();
    for family in ["spatial", "vae", "usad", "adversarial", "draem"] {
        let out = models.path().join(family);
        let mut args = common::tiny_train_args(&data, out.to_str().unwrap());
        args.extend(["--arch", family]);
        let o = common::run(&args);
        assert!(o.status.success(), "{family}: {}", common::stderr(&o));
    }
    let dir = tempfile::tempdir().unwrap();
    let server = start_serving(models.path(), dir.path(), &[]);
    let img = std::fs::read(common::dataset().join("test/hole/000.png")).unwrap();
    for family in ["spatial", "vae", "usad", "adversarial", "draem"] {
        let (s, b) = http(
            &server.addr,
            "POST",
            &format!("/v1/models/{family}/inspect"),
            "image/png",
            &img,
        );
        assert_eq!(s, 200, "{family}: {}", String::from_utf8_lossy(&b));
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["model"], family);
        assert!(v["score"].as_f64().unwrap().is_finite(), "{family}: {v}");
        // Only usad mixes two maps.
        assert_eq!(v["alpha"].is_null(), family != "usad", "{family}: {v}");
    }
    let (s, b) = http(
        &server.addr,
        "POST",
        "/v1/models/usad/inspect?alpha=0",
        "image/png",
        &img,
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(serde_json::from_slice::<Value>(&b).unwrap()["alpha"], 0.0);
    let (s, _) = http(
        &server.addr,
        "POST",
        "/v1/models/draem/inspect?alpha=0",
        "image/png",
        &img,
    );
    assert_eq!(s, 400);
}
