//! The daemon's link to the broker: TLS with a test CA, password login and ACLs; a broker
//! killed and restarted mid-answer; MQTT 3.1.1 clients and the 3.1.1 setting; and the
//! embedded broker of the zero-config default, driven with mosquitto_pub as README shows.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use fieldllm_tests::mqtt::{Client, Pki, WAIT, answer, code, finish, json};
use fieldllm_tests::{Daemon, Mosquitto, fieldllmd, free_port, model_dir};
use fieldllmd::proto::v1::{self, response::Kind};
use fieldllmd::proto::{ErrorCode, Request, Response};
use prost::Message as _;
use rumqttc::v5::MqttOptions;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::mpsc;

/// An MQTT 3.1.1 client (rumqttc's v4 API): what old devices and mosquitto_pub speak.
struct Client311 {
    c: rumqttc::AsyncClient,
    rx: mpsc::UnboundedReceiver<rumqttc::Publish>,
    subacks: mpsc::UnboundedReceiver<()>,
}

impl Client311 {
    async fn connect(port: u16, id: &str) -> Client311 {
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        o.set_max_packet_size(4 << 20, 4 << 20);
        let (c, mut ev) = rumqttc::AsyncClient::new(o, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ack_tx, subacks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if tx.send(p).is_err() {
                            break;
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = ack_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Client311 { c, rx, subacks }
    }

    /// Subscribes; returns once the broker's SUBACK says it is live.
    async fn sub(&mut self, topic: &str) {
        self.c
            .subscribe(topic, rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::timeout(WAIT, self.subacks.recv())
            .await
            .expect("a SUBACK in time")
            .expect("client open");
    }

    async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.c
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// Responses until the final one, checking chunk order.
    async fn answer(&mut self, decode: fn(&[u8]) -> Response) -> (String, Response) {
        let mut text = String::new();
        let mut seq = 0;
        loop {
            let p = tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .expect("an answer in time")
                .unwrap();
            let r = decode(&p.payload);
            match &r.kind {
                Some(Kind::Chunk(c)) => {
                    assert_eq!(c.seq, seq, "chunks in seq order");
                    seq += 1;
                    text.push_str(&c.text);
                }
                _ => return (text, r),
            }
        }
    }
}

fn from_json(b: &[u8]) -> Response {
    serde_json::from_slice(b).unwrap()
}

fn from_protobuf(b: &[u8]) -> Response {
    Response::decode(b).unwrap()
}

fn mosquitto_passwd(file: &std::path::Path, user: &str, pass: &str) {
    let mut cmd = Command::new("mosquitto_passwd");
    cmd.arg("-b");
    if !file.exists() {
        cmd.arg("-c");
    }
    let s = cmd.arg(file).arg(user).arg(pass).status().unwrap();
    assert!(s.success(), "mosquitto_passwd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_password_and_acl_guard_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(dir.path());
    let passwd = dir.path().join("passwd");
    for (u, p) in [
        ("fieldllmd", "s3cret"),
        ("tech", "wrench"),
        ("intruder", "guess"),
    ] {
        mosquitto_passwd(&passwd, u, p);
    }
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "user fieldllmd\ntopic readwrite fieldllm/v1/#\ntopic read $share/fieldllm/fieldllm/v1/#\n\n\
         user tech\ntopic write fieldllm/v1/+/req\ntopic read fieldllm/v1/+/resp/#\ntopic write probe\n\n\
         user intruder\ntopic read fieldllm/v1/+/status\ntopic read probe\n",
    )
    .unwrap();
    let broker = Mosquitto::start(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nallow_anonymous false\npassword_file {}\nacl_file {}",
        pki.ca.display(),
        pki.server.0.display(),
        pki.server.1.display(),
        passwd.display(),
        acl.display()
    ));
    let config = |node: &str, password: &str, ca: &std::path::Path| {
        format!(
            "[model]\npath = {:?}\nthreads = 1\n\n[mqtt]\nbroker = \"mqtts://127.0.0.1:{}\"\nnode_id = \"{node}\"\n\
             username = \"fieldllmd\"\npassword = \"{password}\"\n[mqtt.tls]\nca_file = {:?}\nclient_cert = {:?}\nclient_key = {:?}\n\n\
             [limits]\nmax_tokens = 16\n",
            model_dir("tiny-llama"),
            broker.port,
            ca,
            pki.client.0,
            pki.client.1
        )
    };
    let good = Daemon::start(&config("sec", "s3cret", &pki.ca));
    let bad_pass = Daemon::start(&config("sec-badpass", "wrong", &pki.ca));
    let other = tempfile::tempdir().unwrap();
    let other_ca = Pki::make(other.path()).ca;
    let bad_ca = Daemon::start(&config("sec-badca", "s3cret", &other_ca));

    let login = |id: &str, user: &str, pass: &str| {
        let mut o = MqttOptions::new(id, "127.0.0.1", broker.port);
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(
            pki.client_config(true),
        )));
        o.set_credentials(user, pass);
        o
    };
    let mut tech = Client::connect_with(login("t-tech", "tech", "wrench")).await;
    let mut intruder = Client::connect_with(login("t-intruder", "intruder", "guess")).await;
    intruder.wait_status("sec", "ready").await;
    intruder.sub("fieldllm/v1/+/resp/#").await;
    intruder.sub("probe").await;
    tech.sub("fieldllm/v1/sec/resp/#").await;
    tech.request(
        "sec",
        r#"{"id":"s1","prompt":"Hi","max_tokens":8}"#,
        PublishProperties::default(),
    )
    .await;
    let (_, last, _) = answer(&mut tech, json).await;
    assert_eq!(last.id(), "s1");
    finish(&last);
    // the ACL lets the intruder read no answer: a probe published after the whole answer
    // reaches it with nothing of the answer before it (the broker keeps one client's order)
    tech.c
        .publish(
            "probe",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "after",
        )
        .await
        .unwrap();
    loop {
        let p = intruder.next().await;
        assert!(
            !p.topic.windows(6).any(|w| w == b"/resp/"),
            "the intruder read {:?}",
            p.topic
        );
        if p.topic.as_ref() == b"probe" {
            break;
        }
    }

    bad_pass.wait_log("refused the connection", WAIT);
    assert!(
        bad_pass.log().contains("BadUserNamePassword") || bad_pass.log().contains("NotAuthorized"),
        "{}",
        bad_pass.log()
    );
    assert!(
        !bad_pass.log().contains("wrong"),
        "the password is never logged"
    );
    bad_ca.wait_log("broker connection failed", WAIT);
    assert!(
        bad_ca.log().contains("certificate") || bad_ca.log().contains("UnknownIssuer"),
        "{}",
        bad_ca.log()
    );
    assert!(good.log().contains("connected to the broker"));
}

/// Collects one answer by seq across a broker restart: QoS 1 is at-least-once, so a message
/// in flight when the broker died may come twice; seq tells the copies apart.
async fn answer_across_restart(
    c: &mut Client,
    daemon: &Daemon,
) -> (BTreeMap<u32, String>, Vec<Response>, usize) {
    let mut chunks = BTreeMap::new();
    let mut finals: Vec<Response> = Vec::new();
    let mut copies = 0;
    while finals.is_empty() {
        let Some(p) = c.try_next(WAIT).await else {
            panic!(
                "the answer stopped at {:?}\n{}",
                chunks.keys().last(),
                daemon.log()
            )
        };
        // the status subscription of this session delivers too
        if !p.topic.starts_with(b"fieldllm/v1/crash/resp/") {
            continue;
        }
        let r = json(&p);
        match &r.kind {
            Some(Kind::Chunk(ch)) => {
                if let Some(old) = chunks.insert(ch.seq, ch.text.clone()) {
                    assert_eq!(old, ch.text, "a copy of chunk {} differs", ch.seq);
                    copies += 1;
                }
            }
            _ => finals.push(r),
        }
    }
    // a copy of the final may trail it
    while let Some(p) = c.try_next(Duration::from_millis(1500)).await {
        if !p.topic.starts_with(b"fieldllm/v1/crash/resp/") {
            continue;
        }
        let r = json(&p);
        if r.is_final() {
            finals.push(r);
        } else if let Some(Kind::Chunk(ch)) = &r.kind {
            assert!(chunks.contains_key(&ch.seq), "a new chunk after the final");
            copies += 1;
        }
    }
    (chunks, finals, copies)
}

/// The `messages=N` of the daemon's "sending the answers held" line (0 if none).
fn held_and_restored(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("sending the answers held while the broker was away"))
        .filter_map(|l| {
            l.split("messages=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_survives_the_broker_being_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // the broker keeps sessions on disk, as a deployed one does, so the asker's subscription
    // and its queued messages outlive the crash
    let persist = format!(
        "allow_anonymous true\npersistence true\npersistence_location {}/\nautosave_interval 1",
        dir.path().display()
    );
    let broker = Mosquitto::start_on(port, &persist, dir);
    let daemon = Daemon::start(&format!(
        "[model]\npath = {:?}\nthreads = 1\n\n[mqtt]\nbroker = \"mqtt://127.0.0.1:{port}\"\nnode_id = \"crash\"\n\n[limits]\nmax_tokens = 200\n",
        model_dir("smollm2-135m-instruct.gguf")
    ));
    let mut o = MqttOptions::new("t-crash", "127.0.0.1", port);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(600));
    let mut c = Client::connect_with(o).await;
    c.wait_status("crash", "ready").await;
    c.sub("fieldllm/v1/crash/resp/#").await;
    // until an autosave after the subscription, so it is on disk (waited for, not slept on)
    let db = broker.dir.path().join("mosquitto.db");
    let subscribed = std::time::SystemTime::now();
    let until = std::time::Instant::now() + WAIT;
    while !std::fs::metadata(&db)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t > subscribed)
    {
        assert!(
            std::time::Instant::now() < until,
            "mosquitto saved nothing to {db:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.request(
        "crash",
        r#"{"id":"long","prompt":"Write a long story about a hydraulic pump.","max_tokens":200,"temperature":0}"#,
        PublishProperties::default(),
    )
    .await;
    let first = loop {
        let p = c.next().await;
        if p.topic.starts_with(b"fieldllm/v1/crash/resp/") {
            break p;
        }
    };
    assert!(
        matches!(json(&first).kind, Some(Kind::Chunk(_))),
        "streaming began"
    );

    // the broker's host hangs for a second (answers go out and nothing is acknowledged), then
    // the broker dies: what was unacknowledged is held for the next connection
    broker.pause();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let dir = broker.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _broker = Mosquitto::start_on(port, &persist, dir);

    let (mut chunks, finals, copies) = answer_across_restart(&mut c, &daemon).await;
    if let Some(Kind::Chunk(ch)) = json(&first).kind {
        chunks.entry(ch.seq).or_insert(ch.text);
    }
    assert_eq!(finals.len(), 1, "exactly one final: {finals:?}");
    let done = match &finals[0].kind {
        Some(Kind::Done(d)) => d.clone(),
        other => panic!("expected Done, got {other:?}\n{}", daemon.log()),
    };
    let seqs: Vec<u32> = chunks.keys().copied().collect();
    assert_eq!(
        seqs,
        (0..done.seq).collect::<Vec<_>>(),
        "every chunk arrived\n{}",
        daemon.log()
    );
    let usage = done.usage.unwrap();
    assert!(usage.completion_tokens > 20, "a long answer: {usage:?}");
    eprintln!(
        "answer of {} tokens in {} chunks across the restart, {copies} QoS 1 copies dropped by seq",
        usage.completion_tokens, done.seq
    );
    // the mechanism: answers were held across the outage and sent after it, none dropped
    let log = daemon.log();
    assert!(log.contains("broker connection failed"), "{log}");
    let restored = held_and_restored(&log);
    assert!(restored > 0, "nothing was held: {log}");
    assert!(
        !log.contains("dropped=1") && log.contains("dropped=0"),
        "{log}"
    );
    eprintln!("{restored} answer messages held across the outage");

    // and the service goes on
    c.request(
        "crash",
        r#"{"id":"after","prompt":"Hi","max_tokens":4}"#,
        PublishProperties::default(),
    )
    .await;
    loop {
        let p = c.next().await;
        if p.topic.as_ref() != b"fieldllm/v1/crash/resp/after" {
            continue;
        }
        let r = json(&p);
        if r.is_final() {
            finish(&r);
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_311_clients_and_the_311_setting() {
    let broker = Mosquitto::start("allow_anonymous true");
    let cfg = |node: &str, extra: &str| {
        format!(
            "[model]\npath = {:?}\nthreads = 1\n\n[mqtt]\nbroker = \"mqtt://127.0.0.1:{}\"\nnode_id = \"{node}\"\n{extra}\n[limits]\nmax_tokens = 16\n",
            model_dir("tiny-llama"),
            broker.port
        )
    };
    let _v5 = Daemon::start(&cfg("d5", ""));
    let _v311 = Daemon::start(&cfg("d311", "protocol = \"3.1.1\"\n"));
    let mut watch = Client::connect(broker.port, "t-311-watch").await;
    watch.wait_status("d5", "ready").await;
    watch.wait_status("d311", "ready").await;

    // a 3.1.1 device asks the v5 daemon: JSON, answered on the default response topic
    let mut old = Client311::connect(broker.port, "t-311").await;
    old.sub("fieldllm/v1/d5/resp/j1").await;
    old.publish(
        "fieldllm/v1/d5/req",
        br#"{"id":"j1","prompt":"Hi","max_tokens":8}"#.to_vec(),
    )
    .await;
    let (_, last) = old.answer(from_json).await;
    assert_eq!(last.id(), "j1");
    finish(&last);

    // protobuf without a content type (3.1.1 has none): told apart from JSON by its first byte
    old.sub("fieldllm/v1/d5/resp/p1").await;
    let req = Request {
        id: "p1".into(),
        prompt: "Hi".into(),
        max_tokens: Some(8),
        ..Request::default()
    };
    old.publish("fieldllm/v1/d5/req", req.encode_to_vec()).await;
    let (_, last) = old.answer(from_protobuf).await;
    assert_eq!(last.id(), "p1");
    finish(&last);

    // the daemon set to 3.1.1 answers on the default topic, whatever v5 properties the asker
    // set (a 3.1.1 session never sees them)
    let mut asker = Client::connect(broker.port, "t-311-asker").await;
    asker.sub("fieldllm/v1/d311/resp/#").await;
    asker.sub("fieldllm/v1/d311/errors").await;
    asker
        .request(
            "d311",
            Bytes::from(req.encode_to_vec()),
            PublishProperties {
                content_type: Some("application/x-protobuf".into()),
                response_topic: Some("ignored/by/311".into()),
                ..PublishProperties::default()
            },
        )
        .await;
    let p = asker.next().await;
    assert_eq!(p.topic.as_ref(), b"fieldllm/v1/d311/resp/p1");
    let first = Response::decode(p.payload.as_ref()).unwrap();
    assert_eq!(first.id(), "p1");
    // and bad input still gets its error
    asker
        .request("d311", "{not json", PublishProperties::default())
        .await;
    let r = loop {
        let p = asker.next().await;
        if p.topic.as_ref() == b"fieldllm/v1/d311/errors" {
            break json(&p);
        }
    };
    assert_eq!(code(&r), ErrorCode::BadRequest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_serves_mosquitto_pub_and_ask_via() {
    let port = free_port();
    let daemon = Daemon::start(&format!(
        "[model]\npath = {:?}\nthreads = 1\n\n[mqtt]\nembedded_listen = \"127.0.0.1:{port}\"\nnode_id = \"emb\"\n\n[limits]\nmax_tokens = 16\n",
        model_dir("tiny-llama")
    ));
    daemon.wait_log("connected to the broker", WAIT);
    assert!(daemon.log().contains("embedded broker listening"));
    let mut c = Client311::connect(port, "t-emb").await;
    c.sub("fieldllm/v1/emb/resp/#").await;
    // exactly as README shows it
    let s = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", "fieldllm/v1/emb/req"])
        .args([
            "-m",
            r#"{"id":"e1","prompt":"What does a relief valve do?","max_tokens":8}"#,
        ])
        .status()
        .unwrap();
    assert!(s.success());
    let (_, last) = c.answer(from_json).await;
    assert_eq!(last.id(), "e1");
    assert_eq!(finish(&last), v1::FinishReason::Length);

    // the fleet topic too ($share works on the embedded broker), through ask --via
    let via = format!("mqtt://127.0.0.1:{port}");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(fieldllmd())
            .args(["ask", "--via", &via, "--max-tokens", "6", "Hello"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty());

    // retained status with the will's counterpart
    let mut w = Client311::connect(port, "t-emb-status").await;
    w.sub("fieldllm/v1/emb/status").await;
    let p = tokio::time::timeout(WAIT, w.rx.recv())
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(v["state"], "ready");
}

#[test]
fn a_taken_embedded_port_stops_start_up_with_the_fix() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut d = Daemon::start(&format!(
        "[model]\npath = {:?}\n\n[mqtt]\nembedded_listen = \"127.0.0.1:{port}\"\n",
        model_dir("tiny-llama")
    ));
    let status = d.wait_exit(WAIT).expect("exits");
    assert!(!status.success());
    let log = d.log();
    assert!(
        log.contains(&format!("cannot listen on 127.0.0.1:{port}"))
            && log.contains("broker = \"mqtt://"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hold_keeps_the_newest_answers_and_counts_what_it_dropped() {
    let port = free_port();
    let broker = Mosquitto::start_on(port, "allow_anonymous true", tempfile::tempdir().unwrap());
    let daemon = Daemon::start(&format!(
        "[model]\npath = {:?}\nthreads = 1\n\n[mqtt]\nbroker = \"mqtt://127.0.0.1:{port}\"\nnode_id = \"hold\"\nhold = 2\n\n[limits]\nmax_tokens = 200\n",
        model_dir("smollm2-135m-instruct.gguf")
    ));
    let mut c = Client::connect(port, "t-hold").await;
    c.wait_status("hold", "ready").await;
    c.sub("fieldllm/v1/hold/resp/#").await;
    c.request(
        "hold",
        r#"{"id":"long","prompt":"Write a long story about a hydraulic pump.","max_tokens":200}"#,
        PublishProperties::default(),
    )
    .await;
    loop {
        let p = c.next().await;
        if p.topic.starts_with(b"fieldllm/v1/hold/resp/") {
            break;
        }
    }
    // a second of a hung broker: more than two answer messages go out unacknowledged; then it
    // dies, and the hold of 2 keeps the newest two
    broker.pause();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let dir = broker.kill();
    let _broker = Mosquitto::start_on(port, "allow_anonymous true", dir);
    let failed = daemon.wait_line(&["broker connection failed", "dropped="], WAIT);
    let dropped: u64 = failed
        .split("dropped=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{failed}"));
    assert!(dropped > 0, "nothing dropped from a hold of 2: {failed}");
    assert!(failed.contains("held=2"), "{failed}");
    daemon.wait_line(&["sending the answers held", "messages=2"], WAIT);
    // the answer itself ran to its end
    let done = daemon.wait_line(&[" answered ", "request_id=long "], WAIT);
    assert!(
        done.contains("finish=Length") || done.contains("finish=Stop"),
        "{done}"
    );
    eprintln!("hold of 2: {dropped} older answer messages dropped and counted");
}
