//! Serial links through real pseudo-terminals (socat as the null-modem cable): the console as
//! a technician's terminal sees it, picocom driven through tmux, the framed device protocol,
//! and a cable pulled and plugged back while MQTT keeps answering.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::process::Command;

use fieldllm_tests::mqtt::{Client, WAIT, answer, finish, json};
use fieldllm_tests::serial::{NullModem, Terminal, Tmux, find, until_frame};
use fieldllm_tests::{Daemon, Mosquitto, model_dir};
use fieldllmd::proto::v1;
use fieldllmd::proto::{Cancel, ErrorCode, Request};
use fieldllmd::transport::serial::frame::{self, Feed, Frame, Reader};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROMPT: &[u8] = b"fieldllm> ";

fn config(broker: u16, node: &str, model: &str, serial: &str) -> String {
    format!(
        "[model]\npath = {:?}\nthreads = 1\n\n[mqtt]\nbroker = \"mqtt://127.0.0.1:{broker}\"\nnode_id = \"{node}\"\n\n[limits]\nmax_tokens = 200\n\n{serial}",
        model_dir(model)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_answers_edits_cancels_and_survives_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let mut cable = NullModem::start(dir.path());
    let broker = Mosquitto::start("allow_anonymous true");
    let d = Daemon::start(&config(
        broker.port,
        "con",
        "smollm2-135m-instruct.gguf",
        &format!("[[serial]]\npath = {:?}\nmode = \"console\"\n", cable.dev),
    ));
    let mut t = Terminal::open(&cable.host);
    let banner = t.until(PROMPT, WAIT).await;
    let banner = String::from_utf8_lossy(&banner);
    assert!(
        banner.contains("con") && banner.contains("smollm2") && banner.contains("thermal"),
        "{banner}"
    );
    assert!(!banner.contains('\x1b'), "no ANSI sequences");

    // a question: the answer streams, then the prompt comes back
    t.send(b"/set temperature 0\r").await;
    t.until(PROMPT, WAIT).await;
    t.send(b"Name the capital of France.\r").await;
    let out = t.until(PROMPT, WAIT).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("Paris"), "{text}");
    assert!(!text.contains('\x1b'));

    // backspace editing and each line-end style: /sxx<DEL><BS>tatus is /status
    for end in [&b"\r"[..], b"\n", b"\r\n"] {
        let mut line = b"/sxx\x7f\x08tatus".to_vec();
        line.extend_from_slice(end);
        t.send(&line).await;
        let out = t.until(PROMPT, WAIT).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("queue") && text.contains("answered 1"),
            "{end:?}: {text}"
        );
    }
    // nothing extra after a CRLF: the next command's answer comes with no prompt before it
    // (the console takes input in order, so a second prompt for the LF would come first)
    t.send(b"/model\r").await;
    let out = t.until(b"tokens of context", WAIT).await;
    let text = String::from_utf8_lossy(&out);
    assert!(find(&out, PROMPT).is_none(), "{text:?}");
    assert!(
        text.contains("smollm2-135m-instruct") && text.contains("weights"),
        "{text}"
    );
    t.until(PROMPT, WAIT).await;

    // a follow-up keeps the conversation
    t.send(b"/status\r").await;
    let out = t.until(PROMPT, WAIT).await;
    assert!(
        find(&out, b"1 turns").is_some(),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // /reset starts a new one
    t.send(b"/reset\r").await;
    let out = t.until(PROMPT, WAIT).await;
    assert!(find(&out, b"New conversation.").is_some());
    t.send(b"/status\r").await;
    let out = t.until(PROMPT, WAIT).await;
    assert!(
        find(&out, b"0 turns").is_some(),
        "{}",
        String::from_utf8_lossy(&out)
    );

    // Ctrl-C mid-answer: once the answer's first text is out
    t.send(b"Write a long story about a hydraulic pump.\r")
        .await;
    t.until(b"\r\n", WAIT).await; // the echo of the line
    t.more(WAIT).await;
    t.send(b"\x03").await;
    let out = t.until(PROMPT, WAIT).await;
    assert!(
        find(&out, b"[cancelled]").is_some(),
        "{}",
        String::from_utf8_lossy(&out)
    );

    // a 10 KB line and binary garbage: a message, no crash
    let mut long = vec![b'a'; 10 * 1024];
    long.push(b'\r');
    t.send(&long).await;
    let out = t.until(PROMPT, WAIT).await;
    assert!(find(&out, b"longer than 4096 bytes").is_some());
    let garbage: Vec<u8> = (0..2000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .filter(|b| *b != 3)
        .collect();
    t.send(&garbage).await;
    // Ctrl-U clears the garbage from the line; the daemon is still there and answers
    t.send(b"\x15\r/model\r").await;
    let out = t.until(b"tokens of context", WAIT).await;
    assert!(find(&out, b"smollm2-135m-instruct").is_some());
    t.until(PROMPT, WAIT).await;
    t.send(b"/frobnicate\r").await;
    let out = t.until(PROMPT, WAIT).await;
    assert!(find(&out, b"Unknown command /frobnicate").is_some());
    t.send(b"/set temperature hot\r").await;
    let out = t.until(PROMPT, WAIT).await;
    assert!(find(&out, b"not a number").is_some());
    t.send(b"/set temperature 99\r").await;
    let out = t.until(PROMPT, WAIT).await;
    assert!(
        find(&out, b"Not set").is_some(),
        "{}",
        String::from_utf8_lossy(&out)
    );

    // the cable pulled mid-answer: the answer is cancelled, not left running for nobody
    t.send(b"Write a long story about a hydraulic pump.\r")
        .await;
    t.until(b"\r\n", WAIT).await;
    t.more(WAIT).await;
    drop(t);
    cable.kill();
    let gone = d.wait_line(&["console gone: answer cancelled"], WAIT);
    let id = gone
        .split("request_id=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{gone}"));
    let answered = d.wait_line(&[" answered ", &format!("request_id={id} ")], WAIT);
    assert!(answered.contains("finish=Cancelled"), "{answered}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn picocom_in_tmux_shows_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let cable = NullModem::start(dir.path());
    let broker = Mosquitto::start("allow_anonymous true");
    let _d = Daemon::start(&config(
        broker.port,
        "pico",
        "smollm2-135m-instruct.gguf",
        &format!("[[serial]]\npath = {:?}\nmode = \"console\"\n", cable.dev),
    ));
    let host = cable.host.display().to_string();
    let tmux = Tmux::start("pico", 120, 40, &["picocom", "-q", "-b", "115200", &host]);
    // the banner was written before picocom opened the port: ask for the prompt again
    tmux.keys(&["Enter"]);
    // (capture-pane drops trailing blanks: the prompt shows without its space)
    tmux.wait_for("fieldllm>", WAIT);
    tmux.keys(&["/set temperature 0", "Enter"]);
    tmux.wait_for("temperature = 0", WAIT);
    tmux.keys(&["Name the capital of France.", "Enter"]);
    let s = tmux.wait_for("Paris", WAIT);
    assert!(
        s.contains("Name the capital of France."),
        "the typed line is echoed:\n{s}"
    );
}

/// Reads frames from the host end until `n` finals (Done or Error) arrived.
async fn frames(
    port: &mut tokio_serial::SerialStream,
    reader: &mut Reader,
    finals: usize,
) -> Vec<Frame> {
    let mut seen = 0;
    until_frame(port, reader, |f| {
        if matches!(f, Frame::Done(_) | Frame::Error(_)) {
            seen += 1;
        }
        seen == finals
    })
    .await
}

fn req(id: &str, prompt: &str) -> Frame {
    Frame::Request(Request {
        id: id.into(),
        prompt: prompt.into(),
        max_tokens: Some(8),
        ..Request::default()
    })
}

fn error_code(f: &Frame) -> ErrorCode {
    match f {
        Frame::Error(e) => ErrorCode::try_from(e.code).unwrap(),
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framed_round_trip_bad_frames_and_resync() {
    let dir = tempfile::tempdir().unwrap();
    let cable = NullModem::start(dir.path());
    let broker = Mosquitto::start("allow_anonymous true");
    let d = Daemon::start(&config(
        broker.port,
        "fr",
        "tiny-llama",
        &format!("[[serial]]\npath = {:?}\nmode = \"framed\"\n", cable.dev),
    ));
    use tokio_serial::SerialPortBuilderExt;
    let mut port = tokio_serial::new(cable.host.to_string_lossy(), 115_200)
        .open_native_async()
        .unwrap();
    let mut reader = Reader::new();
    d.wait_log("serial port open", WAIT);
    // the daemon holds its port exclusively (TIOCEXCL): another program opening it gets EBUSY.
    // Root passes TIOCEXCL, so the other program runs as nobody, on a port it may open.
    let pts = std::fs::canonicalize(&cable.dev).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&pts, std::fs::Permissions::from_mode(0o666)).unwrap();
    let other = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(&pts)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success() && err.contains("Device or resource busy"),
        "a second opener of {pts:?}: {err}"
    );

    port.write_all(&frame::encode(&req("f1", "Hi")).unwrap())
        .await
        .unwrap();
    let got = frames(&mut port, &mut reader, 1).await;
    let mut seq = 0;
    for f in &got[..got.len() - 1] {
        match f {
            Frame::Chunk(c) => {
                assert_eq!((c.id.as_str(), c.seq), ("f1", seq));
                seq += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    match got.last().unwrap() {
        Frame::Done(d) => assert_eq!(d.finish_reason, v1::FinishReason::Length as i32),
        other => panic!("{other:?}"),
    }

    // a bad CRC, a truncated frame, an oversized frame, noise: each an Error frame; then a
    // good request is answered
    let mut bad = frame::encode(&req("bad", "Hi")).unwrap().to_vec();
    let body = bad.len() - 3;
    bad[body] ^= 0x01;
    port.write_all(&bad).await.unwrap();
    let got = frames(&mut port, &mut reader, 1).await;
    assert_eq!(error_code(&got[0]), ErrorCode::BadRequest);
    port.write_all(&[0x02, 0x01, 0x00]).await.unwrap();
    let got = frames(&mut port, &mut reader, 1).await;
    assert_eq!(error_code(&got[0]), ErrorCode::BadRequest);
    let mut big = vec![0x41u8; 6000];
    big.push(0);
    port.write_all(&big).await.unwrap();
    let got = frames(&mut port, &mut reader, 1).await;
    assert_eq!(error_code(&got[0]), ErrorCode::TooLarge);
    let mut noisy = b"\xde\xad\xbe\xef line noise".to_vec();
    noisy.push(0);
    noisy.extend_from_slice(&frame::encode(&req("f2", "Hello")).unwrap());
    port.write_all(&noisy).await.unwrap();
    let got = frames(&mut port, &mut reader, 2).await;
    assert_eq!(error_code(&got[0]), ErrorCode::BadRequest);
    assert!(matches!(got.last().unwrap(), Frame::Done(d) if d.id == "f2"));

    // invalid requests inside good frames: the validation errors of every transport
    port.write_all(&frame::encode(&req("", "Hi")).unwrap())
        .await
        .unwrap();
    let got = frames(&mut port, &mut reader, 1).await;
    assert_eq!(error_code(&got[0]), ErrorCode::BadRequest);
    // a good frame whose body is not a Request (field 15, wire type 7), and an unknown kind
    for (kind, body) in [(0x01u8, &b"\xff\xff\xff"[..]), (0x42, b"")] {
        port.write_all(&frame::encode_raw(kind, body).unwrap())
            .await
            .unwrap();
        let got = frames(&mut port, &mut reader, 1).await;
        assert_eq!(error_code(&got[0]), ErrorCode::BadRequest, "{kind:#x}");
    }

    // a cancel of an id nobody asked: logged, no reply, and the port goes on
    port.write_all(
        &frame::encode(&Frame::Cancel(Cancel {
            id: "nothing".into(),
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    d.wait_log("request_id=nothing", WAIT);
    assert!(d.log().contains("found=false"), "{}", d.log());
    // status
    port.write_all(&frame::encode(&Frame::StatusQuery).unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let status = loop {
        let n = tokio::time::timeout(WAIT, port.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if let (Some(Feed::Frame(Frame::Status(s))), _) = reader.feed(&buf[..n]) {
            break s;
        }
    };
    assert_eq!(status.node, "fr");
    assert_eq!(status.answered, 2, "f1 and f2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_framed_cancel_ends_the_answer_and_a_pulled_cable_cancels_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cable = NullModem::start(dir.path());
    let broker = Mosquitto::start("allow_anonymous true");
    let d = Daemon::start(&config(
        broker.port,
        "frc",
        "smollm2-135m-instruct.gguf",
        &format!("[[serial]]\npath = {:?}\nmode = \"framed\"\n", cable.dev),
    ));
    use tokio_serial::SerialPortBuilderExt;
    let mut port = tokio_serial::new(cable.host.to_string_lossy(), 115_200)
        .open_native_async()
        .unwrap();
    let mut reader = Reader::new();
    d.wait_log("serial port open", WAIT);
    let long = |id: &str| {
        Frame::Request(Request {
            id: id.into(),
            prompt: "Write a long story about a hydraulic pump.".into(),
            max_tokens: Some(200),
            ..Request::default()
        })
    };
    // a Cancel frame once the answer streams: its final says cancelled, long before 200 tokens
    port.write_all(&frame::encode(&long("c1")).unwrap())
        .await
        .unwrap();
    until_frame(&mut port, &mut reader, |f| matches!(f, Frame::Chunk(_))).await;
    let cancel = Frame::Cancel(Cancel { id: "c1".into() });
    port.write_all(&frame::encode(&cancel).unwrap())
        .await
        .unwrap();
    let got = frames(&mut port, &mut reader, 1).await;
    match got.last().unwrap() {
        Frame::Done(done) => {
            assert_eq!(done.id, "c1");
            assert_eq!(done.finish_reason, v1::FinishReason::Cancelled as i32);
            assert!(done.usage.unwrap().completion_tokens < 200);
        }
        other => panic!("{other:?}"),
    }
    // the cable pulled mid-answer: cancelled, not left running for nobody
    port.write_all(&frame::encode(&long("c2")).unwrap())
        .await
        .unwrap();
    until_frame(&mut port, &mut reader, |f| matches!(f, Frame::Chunk(_))).await;
    drop(port);
    cable.kill();
    d.wait_line(
        &["serial port gone: answer cancelled", "request_id=c2 "],
        WAIT,
    );
    let c2 = d.wait_line(&[" answered ", "request_id=c2 "], WAIT);
    assert!(c2.contains("finish=Cancelled"), "{c2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulled_cable_is_reopened_and_mqtt_answers_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let mut cable = NullModem::start(dir.path());
    let broker = Mosquitto::start("allow_anonymous true");
    let d = Daemon::start(&config(
        broker.port,
        "plug",
        "tiny-llama",
        &format!("[[serial]]\npath = {:?}\nmode = \"console\"\n", cable.dev),
    ));
    let mut t = Terminal::open(&cable.host);
    t.until(PROMPT, WAIT).await;
    drop(t);
    cable.kill();
    d.wait_log("serial port lost", WAIT);

    // MQTT during the outage
    let mut c = Client::connect(broker.port, "t-plug").await;
    // the console can greet before the daemon's MQTT subscription is live: a question published
    // before it would reach nobody (requests are not retained)
    c.wait_status("plug", "ready").await;
    c.sub("fieldllm/v1/plug/resp/#").await;
    c.request(
        "plug",
        r#"{"id":"m1","prompt":"Hi","max_tokens":4}"#,
        PublishProperties::default(),
    )
    .await;
    let (_, last, _) = answer(&mut c, json).await;
    finish(&last);

    // plug it back: the daemon reopens it and the console greets again
    let cable = NullModem::start(dir.path());
    let mut t = Terminal::open(&cable.host);
    t.send(b"/status\r").await;
    // the MQTT answer counts: the same scheduler behind both
    t.until(b"answered 1", WAIT).await;
    assert!(d.log().contains("serial port open"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_clients_ask_in_framed_mode() {
    let dir = tempfile::tempdir().unwrap();
    let cable = NullModem::start(dir.path());
    let broker = Mosquitto::start("allow_anonymous true");
    let d = Daemon::start(&config(
        broker.port,
        "ref",
        "smollm2-135m-instruct.gguf",
        &format!("[[serial]]\npath = {:?}\nmode = \"framed\"\n", cable.dev),
    ));
    d.wait_log("serial port open", WAIT);
    let root = fieldllm_tests::repo_root();
    // the Rust example (cargo test builds the workspace's examples)
    let example = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("debug/examples/framed_client");
    if !example.exists() {
        let s = Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "fieldllm-proto",
                "--example",
                "framed_client",
            ])
            .current_dir(&root)
            .status()
            .unwrap();
        assert!(s.success());
    }
    let host = cable.host.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(example)
            .arg(&host)
            .arg("Name the capital of France.")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Paris"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // the Python one, on Debian's python3 with pyserial
    let host = cable.host.clone();
    let script = root.join("proto/examples/framed_client.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("/usr/bin/python3")
            .arg(script)
            .arg(&host)
            .arg("Name the capital of France.")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Paris") && text.contains("[finish: stop]"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn serve_from_a_terminal_opens_the_console_there_and_ctrl_d_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("fieldllmd.toml");
    let port = fieldllm_tests::free_port();
    std::fs::write(
        &conf,
        format!(
            "[model]\npath = {:?}\nthreads = 1\n[mqtt]\nembedded_listen = \"127.0.0.1:{port}\"\nnode_id = \"tty\"\n",
            model_dir("tiny-llama")
        ),
    )
    .unwrap();
    let script = format!(
        "{} serve --config {}; echo EXIT=$?; stty -a | tr ' ' '\\n' | grep -x -- '-*icanon'; echo STTY-DONE; sleep 60",
        fieldllm_tests::fieldllmd().display(),
        conf.display()
    );
    let tmux = Tmux::start("tty", 150, 50, &["sh", "-c", &script]);
    tmux.wait_for("Ctrl-D on an empty line stops it", WAIT);
    tmux.keys(&["/status", "Enter"]);
    tmux.wait_for("answered 0", WAIT);
    // Ctrl-C at the prompt does not kill the daemon: it is a key of the console
    tmux.keys(&["C-c"]);
    tmux.keys(&["/model", "Enter"]);
    tmux.wait_for("tokens of context", WAIT);
    tmux.keys(&["C-d"]);
    // after the exit status, stty reports the terminal's mode
    let s = tmux.wait_for("STTY-DONE", WAIT);
    drop(tmux);
    assert!(s.contains("EXIT=0"), "clean exit:\n{s}");
    let after = s.split("EXIT=0").nth(1).unwrap_or("");
    assert!(
        after.lines().any(|l| l.trim() == "icanon"),
        "the terminal is back in canonical mode:\n{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_context_starts_a_new_conversation_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let cable = NullModem::start(dir.path());
    let broker = Mosquitto::start("allow_anonymous true");
    // the tiny model's context is 256 tokens: a few turns fill it
    let _d = Daemon::start(&config(
        broker.port,
        "full",
        "tiny-llama",
        &format!("[[serial]]\npath = {:?}\nmode = \"console\"\n", cable.dev),
    ));
    let mut t = Terminal::open(&cable.host);
    t.until(PROMPT, WAIT).await;
    t.send(b"/set max_tokens 30\r").await;
    t.until(PROMPT, WAIT).await;
    let question = b"Describe the inspection steps for the hydraulic pump and the relief valve.\r";
    let mut restarted = None;
    for turn in 0..12 {
        t.send(question).await;
        let out = t.until(PROMPT, WAIT).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        assert!(!text.contains("[error"), "turn {turn}: {text}");
        if let Some((_, after)) = text.split_once("filled the model's context: starting a new one")
        {
            // and the question was answered afresh: text after the notice, before the prompt
            let answer = after.trim_end_matches("fieldllm> ").trim();
            assert!(!answer.is_empty(), "no answer after the notice: {text:?}");
            restarted = Some(turn);
            break;
        }
    }
    let turn = restarted.expect("the context filled within 12 turns");
    assert!(turn >= 1, "the first turn fits");
    t.send(b"/status\r").await;
    let out = t.until(PROMPT, WAIT).await;
    assert!(
        find(&out, b"1 turns").is_some(),
        "the new conversation holds the one answered turn: {}",
        String::from_utf8_lossy(&out)
    );
}
