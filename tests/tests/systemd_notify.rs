//! The daemon speaks systemd's notify protocol: READY=1 only once the broker link is
//! subscribed (a question asked right then is answered), STATUS= lines, WATCHDOG=1 at half of
//! WATCHDOG_USEC, STOPPING=1 on SIGTERM and a clean exit.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use fieldllm_tests::mqtt::{Client, answer, daemon_config, finish, json};
use fieldllm_tests::{Daemon, Mosquitto};
use fieldllmd::proto::v1;
use rumqttc::v5::mqttbytes::v5::PublishProperties;

fn recv_until(sock: &UnixDatagram, seen: &mut Vec<String>, needle: &str, wait: Duration) {
    let until = Instant::now() + wait;
    let mut buf = [0u8; 4096];
    while !seen.iter().any(|m| m.contains(needle)) {
        assert!(
            Instant::now() < until,
            "{needle:?} never came; got {seen:?}"
        );
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_status_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    let broker = Mosquitto::start("allow_anonymous true");
    let mut d = Daemon::start_with_env(
        &daemon_config(broker.port, "sd1", "tiny-llama", ""),
        &[
            ("NOTIFY_SOCKET", path.as_os_str()),
            ("WATCHDOG_USEC", "1000000".as_ref()),
        ],
    );
    let mut c = Client::connect(broker.port, "t-sd").await;
    c.sub("fieldllm/v1/sd1/resp/r1").await;
    let mut seen = Vec::new();
    let s = tokio::task::block_in_place(|| {
        recv_until(&sock, &mut seen, "READY=1", Duration::from_secs(60));
        seen.clone()
    });
    let ready = s.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(
        ready.contains("STATUS=ready; tiny-llama; thermal nominal"),
        "{ready}"
    );
    // READY means subscribed: a question asked at once is answered
    c.request(
        "sd1",
        r#"{"id":"r1","prompt":"pump","maxTokens":4}"#,
        PublishProperties::default(),
    )
    .await;
    let (_, last, _) = answer(&mut c, json).await;
    assert!(matches!(
        finish(&last),
        v1::FinishReason::Length | v1::FinishReason::Stop
    ));

    // the watchdog is fed every 0.5 s
    let before = seen.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    let started = Instant::now();
    tokio::task::block_in_place(|| {
        let mut buf = [0u8; 4096];
        while started.elapsed() < Duration::from_millis(2200) {
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            if let Ok(n) = sock.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    });
    // load can only delay a ping: at least one came, and never more often than every 0.5 s
    let pings = seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() - before;
    assert!((1..=6).contains(&pings), "{pings} pings in 2.2 s: {seen:?}");
    assert!(
        d.log()
            .contains("feeding the systemd watchdog every_ms=500"),
        "{}",
        d.log()
    );

    // a status line counts the answer
    tokio::task::block_in_place(|| {
        recv_until(&sock, &mut seen, "1 answered", Duration::from_secs(10));
    });

    let status = d.terminate();
    assert!(status.success(), "{status:?}\n{}", d.log());
    tokio::task::block_in_place(|| {
        recv_until(&sock, &mut seen, "STOPPING=1", Duration::from_secs(5));
    });
}

#[test]
fn ready_within_ten_seconds_with_the_broker_down() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    // nobody listens on this port
    let port = fieldllm_tests::free_port();
    let d = Daemon::start_with_env(
        &daemon_config(port, "sd2", "tiny-llama", ""),
        &[("NOTIFY_SOCKET", path.as_os_str())],
    );
    let mut seen = Vec::new();
    // start-up (model load) plus the 10 s READY waits for the broker, with room for load
    recv_until(&sock, &mut seen, "READY=1", Duration::from_secs(60));
    let log = d.log();
    assert!(
        log.contains("broker not reached yet: ready without it"),
        "{log}"
    );
    assert!(log.contains("wait_s=10"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_a_token_for_stall_s_stops_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    let broker = Mosquitto::start("allow_anonymous true");
    // stall_s = 1 and a long prompt on one thread: the prefill alone outlasts it, as a hung
    // engine would
    let d = Daemon::start_with_env(
        &daemon_config(
            broker.port,
            "sd3",
            "smollm2-135m-instruct.gguf",
            "stall_s = 1\n",
        )
        // room for the long prompt below
        .replace("max_prompt_bytes = 2048", "max_prompt_bytes = 8192"),
        &[
            ("NOTIFY_SOCKET", path.as_os_str()),
            ("WATCHDOG_USEC", "400000".as_ref()),
        ],
    );
    let mut c = Client::connect(broker.port, "t-stall").await;
    c.sub("fieldllm/v1/sd3/resp/s1").await;
    let mut seen = Vec::new();
    tokio::task::block_in_place(|| {
        recv_until(&sock, &mut seen, "READY=1", Duration::from_secs(60));
    });
    // ~1,700 tokens (6.8 KB; `max_prompt_bytes` raised for it): 34 repeats prefilled in ~1.1 s once the
    // prompt kernels got faster, too close to stall_s; this outlasts it by a few times
    let prompt = "The hydraulic pump of line 3 loses pressure under load. ".repeat(120);
    c.request(
        "sd3",
        format!(r#"{{"id":"s1","prompt":"{prompt}","maxTokens":2}}"#),
        PublishProperties::default(),
    )
    .await;
    tokio::task::block_in_place(|| {
        d.wait_log("not feeding the watchdog", Duration::from_secs(60));
        // the pings sent before the stall, still queued on the socket
        sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        while sock.recv(&mut buf).is_ok() {}
        sock.set_nonblocking(false).unwrap();
    });
    let (_, last, _) = answer(&mut c, json).await;
    finish(&last);
    // tokens again: the pings come back
    tokio::task::block_in_place(|| {
        seen.clear();
        recv_until(&sock, &mut seen, "WATCHDOG=1", Duration::from_secs(10));
    });
}
