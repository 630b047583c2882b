//! `fieldllmd serve` against a real mosquitto: requests in JSON and protobuf, reply routing,
//! streaming order, cancel, bad input, redelivered ids and a clean stop.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use fieldllm_tests::mqtt::{
    Client, RawPublisher, answer, code, daemon_config, finish, json, reply_props,
};
use fieldllm_tests::{Daemon, Mosquitto};
use fieldllmd::proto::v1::{self, response::Kind};
use fieldllmd::proto::{ErrorCode, Request, Response};
use prost::Message as _;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_protobuf_requests_are_answered_where_asked() {
    let broker = Mosquitto::start("allow_anonymous true");
    let d = Daemon::start(&daemon_config(broker.port, "n1", "tiny-llama", ""));
    let mut c = Client::connect(broker.port, "t-json").await;
    c.wait_status("n1", "ready").await;

    // v5: Response Topic + Correlation Data, echoed on every message of the answer
    c.sub("client/replies").await;
    c.request(
        "n1",
        r#"{"id":"j1","prompt":"pump pressure?","maxTokens":12}"#,
        reply_props("client/replies", b"corr-7"),
    )
    .await;
    let (_, last, raw) = answer(&mut c, json).await;
    assert!(matches!(
        finish(&last),
        v1::FinishReason::Stop | v1::FinishReason::Length
    ));
    for p in &raw {
        assert_eq!(p.topic.as_ref(), b"client/replies");
        let props = p.properties.clone().unwrap();
        assert_eq!(props.correlation_data.as_deref(), Some(&b"corr-7"[..]));
        assert_eq!(props.content_type.as_deref(), Some("application/json"));
        assert_eq!(json(p).id(), "j1");
    }

    // protobuf in, protobuf out, on the default topic {prefix}/{node}/resp/{id}
    c.sub("fieldllm/v1/n1/resp/p1").await;
    let req = Request {
        id: "p1".into(),
        prompt: "valve".into(),
        max_tokens: Some(6),
        ..Request::default()
    };
    let props = PublishProperties {
        content_type: Some("application/x-protobuf".into()),
        ..PublishProperties::default()
    };
    c.request("n1", req.encode_to_vec(), props).await;
    let (_, last, raw) = answer(&mut c, |p| Response::decode(p.payload.as_ref()).unwrap()).await;
    finish(&last);
    assert!(
        raw.iter()
            .all(|p| p.properties.as_ref().unwrap().content_type.as_deref()
                == Some("application/x-protobuf"))
    );
    // its log is a file here: plain text, no colour codes (issue 16)
    let log = d.log();
    assert!(log.contains("request_id=j1"), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in a log file: {log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_error_and_the_service_goes_on() {
    let broker = Mosquitto::start("allow_anonymous true");
    let _d = Daemon::start(&daemon_config(
        broker.port,
        "n2",
        "tiny-llama",
        "max_payload_bytes = 65536\n",
    ));
    let mut c = Client::connect(broker.port, "t-bad").await;
    c.wait_status("n2", "ready").await;
    c.sub("bad/replies").await;
    let big = format!(r#"{{"id":"big","prompt":"{}"}}"#, "a".repeat(1024 * 1024));
    let cases: Vec<(&str, Vec<u8>, Option<&str>, ErrorCode)> = vec![
        (
            "invalid JSON",
            b"{not json".to_vec(),
            None,
            ErrorCode::BadRequest,
        ),
        (
            "invalid protobuf",
            b"\xff\xff\xff\xff".to_vec(),
            Some("application/x-protobuf"),
            ErrorCode::BadRequest,
        ),
        (
            "wrong type",
            br#"{"id":"w","prompt":5}"#.to_vec(),
            None,
            ErrorCode::BadRequest,
        ),
        (
            "unknown field",
            br#"{"id":"u","prompt":"q","colour":"red"}"#.to_vec(),
            None,
            ErrorCode::BadRequest,
        ),
        (
            "empty id",
            br#"{"id":"","prompt":"q"}"#.to_vec(),
            None,
            ErrorCode::BadRequest,
        ),
        (
            "long id",
            format!(r#"{{"id":"{}","prompt":"q"}}"#, "x".repeat(65)).into_bytes(),
            None,
            ErrorCode::BadRequest,
        ),
        (
            "prompt over limit",
            format!(r#"{{"id":"l","prompt":"{}"}}"#, "a".repeat(2049)).into_bytes(),
            None,
            ErrorCode::TooLarge,
        ),
        (
            "NaN temperature",
            br#"{"id":"n","prompt":"q","temperature":"NaN"}"#.to_vec(),
            None,
            ErrorCode::BadRequest,
        ),
        (
            "negative temperature",
            br#"{"id":"t","prompt":"q","temperature":-1}"#.to_vec(),
            None,
            ErrorCode::BadRequest,
        ),
        (
            "negative max_tokens",
            br#"{"id":"m","prompt":"q","maxTokens":-5}"#.to_vec(),
            None,
            ErrorCode::BadRequest,
        ),
        (
            "max_tokens over limit",
            br#"{"id":"m2","prompt":"q","maxTokens":100000}"#.to_vec(),
            None,
            ErrorCode::BadRequest,
        ),
        ("1 MB payload", big.into_bytes(), None, ErrorCode::TooLarge),
    ];
    for (i, (what, payload, ctype, want)) in cases.into_iter().enumerate() {
        let mut props = reply_props("bad/replies", format!("case-{i}").as_bytes());
        props.content_type = ctype.map(str::to_string);
        c.request("n2", payload, props).await;
        let p = c.next().await;
        let r = if ctype.is_some() {
            Response::decode(p.payload.as_ref()).unwrap()
        } else {
            json(&p)
        };
        assert_eq!(code(&r), want, "{what}: {r:?}");
        assert_eq!(
            p.properties.unwrap().correlation_data.as_deref(),
            Some(format!("case-{i}").as_bytes()),
            "{what}"
        );
    }
    // and it still answers
    c.request(
        "n2",
        r#"{"id":"ok","prompt":"still there?","maxTokens":4}"#,
        reply_props("bad/replies", b"ok"),
    )
    .await;
    let (_, last, _) = answer(&mut c, json).await;
    finish(&last);
}

/// How many times the daemon logged that it answered `id` (the worker logs each answer once,
/// before its final goes out).
fn answered(log: &str, id: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(" answered ") && l.contains(&format!("request_id={id} ")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_id_is_answered_once() {
    let broker = Mosquitto::start("allow_anonymous true");
    let d = Daemon::start(&daemon_config(broker.port, "n3", "tiny-llama", ""));
    let mut c = Client::connect(broker.port, "t-dup").await;
    c.wait_status("n3", "ready").await;
    c.sub("fieldllm/v1/n3/resp/+").await;
    // a device publishes, loses its connection before the PUBACK, reconnects to its kept
    // session and sends the same packet again with DUP set (MQTT 3.1.1, 4.3.2)
    let (port, topic) = (broker.port, "fieldllm/v1/n3/req");
    let body = br#"{"id":"same","prompt":"q","maxTokens":3}"#;
    tokio::task::spawn_blocking(move || {
        let mut dev = RawPublisher::connect(port, "t-dup-raw", false);
        dev.publish(topic, body, 7, false);
        drop(dev);
        let mut dev = RawPublisher::connect(port, "t-dup-raw", false);
        dev.publish(topic, body, 7, true);
    })
    .await
    .unwrap();
    let (_, last, _) = answer(&mut c, json).await;
    assert_eq!(last.id(), "same");
    finish(&last);
    // the mechanism, not a quiet spell: the copy reached the daemon and was dropped for its id
    let dropped = "request id accepted before: dropped as a redelivery";
    d.wait_log(dropped, fieldllm_tests::mqtt::WAIT);
    let log = d.log();
    assert_eq!(log.matches(dropped).count(), 1, "{log}");
    assert_eq!(answered(&log, "same"), 1, "{log}");
    // and a request after it is answered, with nothing of `same` in between
    c.request(
        "n3",
        r#"{"id":"next","prompt":"q","maxTokens":2}"#,
        PublishProperties::default(),
    )
    .await;
    let (_, last, raw) = answer(&mut c, json).await;
    assert_eq!(last.id(), "next", "{raw:?}");
}

/// The final of `id` on `c`, skipping other answers' messages.
async fn final_of(c: &mut Client, id: &str) -> Response {
    loop {
        let r = json(&c.next().await);
        if r.id() == id && r.is_final() {
            return r;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_sent_again_with_its_id_is_answered() {
    let broker = Mosquitto::start("allow_anonymous true");
    // one answer at a time, so the second waits and the third finds the queue full
    let d = Daemon::start(
        &daemon_config(
            broker.port,
            "n7",
            "smollm2-135m-instruct.gguf",
            "queue = 1\n",
        )
        .replace("threads = 1\n", "threads = 1\nslots = 1\n"),
    );
    let mut c = Client::connect(broker.port, "t-retry").await;
    c.wait_status("n7", "ready").await;
    c.sub("retry/replies").await;
    let ask = |id: &str, extra: &str| {
        format!(
            r#"{{"id":"{id}","prompt":"Write a long story about a hydraulic pump.","maxTokens":48{extra}}}"#
        )
    };
    // one answer running (its first chunk is out), one waiting: the queue of 1 is full
    c.request("n7", ask("long", ""), reply_props("retry/replies", b"r"))
        .await;
    let first = json(&c.next().await);
    assert!(matches!(first.kind, Some(Kind::Chunk(_))), "{first:?}");
    c.request("n7", ask("wait", ""), reply_props("retry/replies", b"r"))
        .await;
    c.request("n7", ask("r1", ""), reply_props("retry/replies", b"r"))
        .await;
    let busy = final_of(&mut c, "r1").await;
    assert_eq!(code(&busy), ErrorCode::Busy, "{busy:?}");
    match &busy.kind {
        Some(Kind::Error(e)) => assert!(e.retry_after_ms > 0, "{e:?}"),
        _ => unreachable!(),
    }
    // a bad request, then the same id fixed
    c.request(
        "n7",
        ask("b1", r#","temperature":-3"#),
        reply_props("retry/replies", b"r"),
    )
    .await;
    assert_eq!(code(&final_of(&mut c, "b1").await), ErrorCode::BadRequest);
    // the queue drains; the retries, same ids, are answered
    for id in ["long", "wait"] {
        c.c.publish(
            "fieldllm/v1/n7/cancel",
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"id":"{id}"}}"#),
        )
        .await
        .unwrap();
        final_of(&mut c, id).await;
    }
    c.request("n7", ask("r1", ""), reply_props("retry/replies", b"r"))
        .await;
    let r1 = final_of(&mut c, "r1").await;
    assert!(matches!(r1.kind, Some(Kind::Done(_))), "{r1:?}");
    c.request("n7", ask("b1", ""), reply_props("retry/replies", b"r"))
        .await;
    let b1 = final_of(&mut c, "b1").await;
    assert!(
        matches!(b1.kind, Some(Kind::Done(_))),
        "{b1:?}\n{}",
        d.log()
    );
    assert!(!d.log().contains("accepted before"), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_stream_ends_with_cancelled_and_sigterm_stops_cleanly() {
    let broker = Mosquitto::start("allow_anonymous true");
    let mut d = Daemon::start(&daemon_config(
        broker.port,
        "n4",
        "smollm2-135m-instruct.gguf",
        "",
    ));
    let mut c = Client::connect(broker.port, "t-cancel").await;
    c.wait_status("n4", "ready").await;
    c.sub("cancel/replies").await;
    c.request(
        "n4",
        r#"{"id":"long","prompt":"Write a long story about a hydraulic pump.","maxTokens":64}"#,
        reply_props("cancel/replies", b"c"),
    )
    .await;
    let first = json(&c.next().await);
    assert!(matches!(first.kind, Some(Kind::Chunk(_))), "{first:?}");
    c.c.publish(
        "fieldllm/v1/n4/cancel",
        QoS::AtLeastOnce,
        false,
        r#"{"id":"long"}"#,
    )
    .await
    .unwrap();
    let last = loop {
        let r = json(&c.next().await);
        if r.is_final() {
            break r;
        }
    };
    assert_eq!(finish(&last), v1::FinishReason::Cancelled);
    let Some(Kind::Done(done)) = &last.kind else {
        unreachable!()
    };
    assert!(done.usage.unwrap().completion_tokens < 64);

    let status = d.terminate();
    assert!(status.success(), "exit {status}: {}", d.log());
    assert!(d.log().contains("stopped"), "{}", d.log());
    let mut s = Client::connect(broker.port, "t-status").await;
    s.sub("fieldllm/v1/n4/status").await;
    let v: serde_json::Value = serde_json::from_slice(&s.next().await.payload).unwrap();
    assert_eq!(v["state"], "offline");
    // the will carries no counters: this is the daemon's own clean-stop status
    assert_eq!(v["answered"], "1", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_via_mqtt_streams_a_running_daemons_answer() {
    let broker = Mosquitto::start("allow_anonymous true");
    let _d = Daemon::start(&daemon_config(
        broker.port,
        "n5",
        "smollm2-135m-instruct.gguf",
        "",
    ));
    let mut c = Client::connect(broker.port, "t-via").await;
    c.wait_status("n5", "ready").await;
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let o = tokio::task::spawn_blocking(move || {
        let direct = fieldllm_tests::run(&[
            "ask",
            "--via",
            &url,
            "--node",
            "n5",
            "Name the capital of France.",
        ]);
        let fleet = fieldllm_tests::run(&["ask", "--via", &url, "--max-tokens", "4", "Hello"]);
        let refused = fieldllm_tests::run(&[
            "ask",
            "--via",
            &url,
            "--node",
            "n5",
            "--max-tokens",
            "1000",
            "Hello",
        ]);
        (direct, fleet, refused)
    })
    .await
    .unwrap();
    let (out, err) = fieldllm_tests::texts(&o.0);
    assert!(o.0.status.success(), "{err}");
    assert!(out.contains("Paris"), "{out}");
    assert!(
        o.1.status.success(),
        "fleet topic: {}",
        fieldllm_tests::texts(&o.1).1
    );
    fieldllm_tests::assert_clean_failure(&o.2, &["bad_request", "max_tokens"]);

    let nobody = format!("mqtt://127.0.0.1:{}", fieldllm_tests::free_port());
    let o =
        tokio::task::spawn_blocking(move || fieldllm_tests::run(&["ask", "--via", &nobody, "hi"]))
            .await
            .unwrap();
    fieldllm_tests::assert_clean_failure(&o, &["MQTT broker"]);
}

/// Collects finals (and counts every message) per id from one reply topic until `n` finals.
async fn finals(c: &mut Client, n: usize) -> std::collections::HashMap<String, Response> {
    let mut out = std::collections::HashMap::new();
    while out.len() < n {
        let r = json(&c.next().await);
        if r.is_final() {
            let id = r.id().to_string();
            assert!(out.insert(id.clone(), r).is_none(), "{id} answered twice");
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_of_a_fleet_split_twenty_requests_each_answered_once() {
    let broker = Mosquitto::start("allow_anonymous true");
    let _a = Daemon::start(&daemon_config(broker.port, "fa", "tiny-llama", ""));
    let _b = Daemon::start(&daemon_config(broker.port, "fb", "tiny-llama", ""));
    let mut c = Client::connect(broker.port, "t-fleet").await;
    c.wait_status("fa", "ready").await;
    c.wait_status("fb", "ready").await;
    // both are subscribed once their status is out: a daemon subscribes, then publishes
    // `ready` on the same connection, and the broker takes packets in order
    c.sub("fleet/replies").await;
    for i in 0..20 {
        let props = reply_props("fleet/replies", format!("f{i}").as_bytes());
        c.c.publish_with_properties(
            "fieldllm/v1/fleet/req",
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"id":"f{i}","prompt":"q","maxTokens":4}}"#),
            props,
        )
        .await
        .unwrap();
    }
    let got = finals(&mut c, 20).await;
    for r in got.values() {
        assert!(matches!(r.kind, Some(Kind::Done(_))), "{r:?}");
    }
    // each answer once, by the daemons' own count (a worker logs an answer before its final
    // goes out), and both appliances took a share (mosquitto deals $share round-robin)
    let (la, lb) = (_a.log(), _b.log());
    for i in 0..20 {
        let id = format!("f{i}");
        assert_eq!(
            answered(&la, &id) + answered(&lb, &id),
            1,
            "{id}\n{la}\n{lb}"
        );
    }
    let count = |log: &str| {
        (0..20)
            .map(|i| answered(log, &format!("f{i}")))
            .sum::<usize>()
    };
    assert!(
        count(&la) > 0 && count(&lb) > 0,
        "a: {}, b: {}",
        count(&la),
        count(&lb)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_requests_from_five_clients_against_a_queue_of_eight() {
    let broker = Mosquitto::start("allow_anonymous true");
    // SmolLM2: slow enough that the queue fills
    let _d = Daemon::start(&daemon_config(
        broker.port,
        "n6",
        "smollm2-135m-instruct.gguf",
        "queue = 8\n",
    ));
    let mut watcher = Client::connect(broker.port, "t-load-w").await;
    watcher.wait_status("n6", "ready").await;
    let mut clients = Vec::new();
    for k in 0..5 {
        let c = Client::connect(broker.port, &format!("t-load-{k}")).await;
        c.sub(&format!("load/{k}")).await;
        clients.push(c);
    }
    for i in 0..10 {
        for (k, c) in clients.iter().enumerate() {
            let props = reply_props(&format!("load/{k}"), b"x");
            c.request(
                "n6",
                format!(r#"{{"id":"c{k}-{i}","prompt":"Say hi.","maxTokens":4}}"#),
                props,
            )
            .await;
        }
    }
    let (mut busy, mut done) = (0, 0);
    for c in clients.iter_mut() {
        for (id, r) in finals(c, 10).await {
            match &r.kind {
                Some(Kind::Done(_)) => done += 1,
                Some(Kind::Error(e)) => {
                    assert_eq!(
                        ErrorCode::try_from(e.code).unwrap(),
                        ErrorCode::Busy,
                        "{id}: {e:?}"
                    );
                    busy += 1;
                }
                _ => unreachable!(),
            }
        }
    }
    assert_eq!(busy + done, 50, "none lost");
    assert!(busy > 0, "a queue of 8 took all 50");
    // `queue = 8` bounds the requests waiting; whether the worker has taken the first
    // off the queue before the ninth arrives is a race, so only the 8 are certain.
    assert!(done >= 8, "at least the queue's eight complete: {done}");
    // once each, by the daemon's own count: every Done had one answer, nothing else ran
    let log = _d.log();
    let ran = log.lines().filter(|l| l.contains(" answered ")).count();
    assert_eq!(ran, done, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_is_marked_offline_by_its_will() {
    let broker = Mosquitto::start("allow_anonymous true");
    let mut d = Daemon::start(&daemon_config(broker.port, "n8", "tiny-llama", ""));
    let mut c = Client::connect(broker.port, "t-will").await;
    c.wait_status("n8", "ready").await;
    // SIGKILL: no clean stop, no offline status of its own; the broker publishes the will
    d.kill();
    c.wait_status("n8", "offline").await;
    // and it is retained: a client that connects afterwards sees it
    let mut late = Client::connect(broker.port, "t-will-late").await;
    late.wait_status("n8", "offline").await;
    assert!(!d.log().contains("stopped"), "{}", d.log());
}
