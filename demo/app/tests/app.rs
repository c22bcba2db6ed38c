//! The demo application as its users drive it: `serve` on loopback, `load` against it,
//! `fail` and `recover` switching the server's answers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_weft-demo-app");

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn serve(name: &str, port: u16, fail_file: &std::path::Path) -> Server {
    serve_with(name, port, fail_file, &[], Stdio::null())
}

fn serve_with(
    name: &str,
    port: u16,
    fail_file: &std::path::Path,
    extra: &[&str],
    log: Stdio,
) -> Server {
    let child = Command::new(BIN)
        .args(["serve", "--name", name, "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--fail-file")
        .arg(fail_file)
        .args(extra)
        .env("HOSTNAME", format!("{name}-pod"))
        .stderr(log)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "serve did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Server(child)
}

/// Runs `load` to completion; returns its exit code and its report lines.
fn load(port: u16, extra: &[&str]) -> (i32, Vec<Value>) {
    let out = Command::new(BIN)
        .args([
            "load",
            "--rps",
            "200",
            "--report-every",
            "100ms",
            "--target",
        ])
        .arg(format!("http://127.0.0.1:{port}/hello"))
        .args(extra)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    (out.status.code().unwrap_or(-1), lines)
}

#[test]
fn load_counts_what_serve_answered_and_fail_switches_it_to_500() {
    let dir = tempfile::tempdir().unwrap();
    let fail_file = dir.path().join("fail");
    let port = free_port();
    let _server = serve("web-v1", port, &fail_file);

    let (code, lines) = load(port, &["--count", "40"]);
    assert_eq!(code, 0, "{lines:?}");
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "final", "{lines:?}");
    let total = &last["total"];
    assert_eq!(total["sent"], 40, "{total}");
    assert_eq!(total["ok"], 40, "{total}");
    assert_eq!(total["status"]["200"], 40, "{total}");
    assert_eq!(total["servers"]["web-v1"], 40, "{total}");
    assert_eq!(total["pods"]["web-v1-pod"], 40, "{total}");
    // Every line but the last is a periodic report, and the windows add up to the total.
    let windows: u64 = lines.iter().map(|l| l["sent"].as_u64().unwrap()).sum();
    assert_eq!(windows, 40, "{lines:?}");

    let status = Command::new(BIN)
        .args(["fail", "--status", "503", "--fail-file"])
        .arg(&fail_file)
        .status()
        .unwrap();
    assert!(status.success());
    let (code, lines) = load(port, &["--count", "10"]);
    assert_eq!(code, 1, "a run with failures exits 1: {lines:?}");
    let total = &lines.last().unwrap()["total"];
    assert_eq!(total["status"]["503"], 10, "{total}");
    assert_eq!(total["ok"], 0, "{total}");

    let status = Command::new(BIN)
        .args(["recover", "--fail-file"])
        .arg(&fail_file)
        .status()
        .unwrap();
    assert!(status.success());
    let (code, lines) = load(port, &["--count", "5"]);
    assert_eq!(code, 0, "{lines:?}");
}

/// `fail` or `recover` with `fail_file`.
fn switch(cmd: &str, fail_file: &std::path::Path) {
    let status = Command::new(BIN)
        .args([cmd, "--fail-file"])
        .arg(fail_file)
        .status()
        .unwrap();
    assert!(status.success(), "{cmd}");
}

/// `serve` on a free loopback port with `flag` opening another listener on another
/// (`addr`), its fail file (created first when `failing`) and log in a temporary directory.
struct Beside {
    _server: Server,
    fail_file: std::path::PathBuf,
    log: std::path::PathBuf,
    port: u16,
    addr: String,
    _dir: tempfile::TempDir,
}

fn serve_beside(flag: &str, failing: bool) -> Beside {
    let dir = tempfile::tempdir().unwrap();
    let (fail_file, log) = (dir.path().join("fail"), dir.path().join("serve.log"));
    if failing {
        switch("fail", &fail_file);
    }
    let (port, other) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{other}");
    let server = serve_with(
        "web-v1",
        port,
        &fail_file,
        &[flag, &addr],
        std::fs::File::create(&log).unwrap().into(),
    );
    Beside {
        _server: server,
        fail_file,
        log,
        port,
        addr,
        _dir: dir,
    }
}

#[test]
fn the_grpc_health_check_answers_serving_then_not_serving_while_failing() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    let served = serve_beside("--grpc-health-listen", false);
    let (fail_file, log, port, grpc_addr) =
        (&served.fail_file, &served.log, served.port, &served.addr);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The client the proxy performs rewritten `grpc` probes with (plain-text HTTP/2).
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        let check = |service: &str| HealthCheckRequest {
            service: service.to_owned(),
        };
        // The whole server ("") and any named service answer alike, as the fail file says.
        for (switched, expected) in [
            (None, ServingStatus::Serving),
            (Some("fail"), ServingStatus::NotServing),
            (Some("recover"), ServingStatus::Serving),
        ] {
            if let Some(cmd) = switched {
                switch(cmd, fail_file);
            }
            for service in ["", "shop.Cart"] {
                let answer = client.check(check(service)).await.unwrap().into_inner();
                assert_eq!(answer.status, expected as i32, "{switched:?} {service:?}");
            }
        }

        // Any other method is UNIMPLEMENTED (in the trailers, after the response's head),
        // as a gRPC server without it answers.
        let mut watch = client.watch(check("")).await.unwrap().into_inner();
        let watched = watch.message().await.unwrap_err();
        assert_eq!(watched.code(), tonic::Code::Unimplemented, "{watched:?}");
    });
    // The HTTP server beside it is unchanged.
    let (code, lines) = load(port, &["--count", "5"]);
    assert_eq!(code, 0, "{lines:?}");
    // The first answer and each change are logged, with the caller's User-Agent.
    let log = std::fs::read_to_string(log).unwrap();
    assert_eq!(log.matches("answer changed").count(), 3, "{log}");
    assert!(
        log.contains("NOT_SERVING") && log.contains("tonic/"),
        "{log}"
    );
}

#[test]
fn nothing_listening_is_a_connect_error_not_a_hang() {
    let port = free_port();
    let started = Instant::now();
    let (code, lines) = load(port, &["--count", "5"]);
    assert_eq!(code, 1);
    let total = &lines.last().unwrap()["total"];
    assert_eq!(total["errors"]["connect"], 5, "{total}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn bad_arguments_are_refused_with_a_reason() {
    for args in [
        &["load", "--target", "https://web"][..],
        &["load", "--target", "http://web", "--rps", "0"],
        &["load", "--target", "http://web", "--report-every", "5"],
        &["fail", "--status", "200"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}: no message");
    }
}

/// Connects to `addr` every 20 ms until `connected(result)` holds, for at most 3 s (the
/// port follows the fail file within 200 ms); returns how long that took.
fn until_connect(
    addr: &str,
    what: &str,
    connected: impl Fn(&std::io::Result<std::net::TcpStream>) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let attempt = std::net::TcpStream::connect(addr);
        if connected(&attempt) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{what}: last attempt {attempt:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `line` on a new connection to `addr` and returns what came back.
fn echoed(addr: &str, line: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(line.as_bytes()).unwrap();
    let mut got = vec![0; line.len()];
    stream.read_exact(&mut got).unwrap();
    String::from_utf8(got).unwrap()
}

#[test]
fn the_tcp_port_echoes_and_is_closed_while_failing() {
    let served = serve_beside("--tcp-listen", false);
    let (fail_file, log, port, tcp_addr) =
        (&served.fail_file, &served.log, served.port, &served.addr);
    // Bound before `serve` listens on HTTP: open at once.
    assert_eq!(echoed(tcp_addr, "hello\n"), "hello\n");
    // A connection made before `fail` keeps working after the port closes.
    let mut before = std::net::TcpStream::connect(tcp_addr).unwrap();

    switch("fail", fail_file);
    let closed_after = until_connect(tcp_addr, "closed after fail", |r| {
        r.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    });
    // Still closed a while later: the port stays shut while the file exists.
    std::thread::sleep(Duration::from_millis(500));
    let refused = std::net::TcpStream::connect(tcp_addr).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    {
        use std::io::{Read, Write};
        before
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        before.write_all(b"still\n").unwrap();
        let mut got = [0; 6];
        before.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"still\n");
    }
    // The HTTP server fails as before (not refused).
    let (code, lines) = load(port, &["--count", "2"]);
    assert_eq!(code, 1, "{lines:?}");
    assert_eq!(lines.last().unwrap()["total"]["status"]["500"], 2);

    switch("recover", fail_file);
    let open_after = until_connect(tcp_addr, "open after recover", |r| r.is_ok());
    assert_eq!(echoed(tcp_addr, "again\n"), "again\n");
    // Both within the bound of the file's polling (200 ms), with room for a slow machine.
    assert!(
        closed_after < Duration::from_secs(1) && open_after < Duration::from_secs(1),
        "closed after {closed_after:?}, open after {open_after:?}"
    );
    let log = std::fs::read_to_string(log).unwrap();
    assert_eq!(log.matches("tcp port open").count(), 2, "{log}");
    assert_eq!(log.matches("tcp port closed: failing").count(), 1, "{log}");
}

#[test]
fn the_tcp_port_starts_closed_when_serve_starts_failing() {
    let served = serve_beside("--tcp-listen", true);
    let (fail_file, tcp_addr) = (&served.fail_file, &served.addr);
    let refused = std::net::TcpStream::connect(tcp_addr).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    switch("recover", fail_file);
    until_connect(tcp_addr, "open after recover", |r| r.is_ok());
    assert_eq!(echoed(tcp_addr, "up\n"), "up\n");
}
