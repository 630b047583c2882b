//! Grounded answers from `fieldllmd serve`: a real index made by `docs add`, the real
//! embedding model and SmolLM2, asked over MQTT (mosquitto), framed serial and the console
//! (socat pseudo-terminals); the index changed by `docs add` while the daemon runs.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::path::Path;

use fieldllm_tests::corpus::{corpus, docs, indexed_corpus, ok};
use fieldllm_tests::mqtt::{Client, WAIT, answer, code, daemon_config, finish, json};
use fieldllm_tests::serial::{NullModem, Terminal, until_frame};
use fieldllm_tests::{Daemon, Mosquitto, model_dir};
use fieldllmd::proto::v1::{self, response::Kind};
use fieldllmd::proto::{ErrorCode, Request, Response};
use fieldllmd::transport::serial::frame::{self, Frame, Reader};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use tokio::io::AsyncWriteExt;

const PROMPT: &[u8] = b"fieldllm> ";

fn docs_section(index: &Path) -> String {
    format!(
        "[docs]\nindex = {:?}\nembedder = {:?}\n",
        index,
        model_dir("all-minilm-l6-v2")
    )
}

/// Asks over MQTT (JSON) and returns the answer's text and final response.
async fn ask(c: &mut Client, node: &str, id: &str, body: &str) -> (String, Response) {
    c.sub(&format!("fieldllm/v1/{node}/resp/{id}")).await;
    let payload = format!(r#"{{"id":"{id}",{body}}}"#);
    c.request(node, payload, PublishProperties::default()).await;
    let (text, last, _) = answer(c, json).await;
    (text, last)
}

fn done(r: &Response) -> &v1::Done {
    match &r.kind {
        Some(Kind::Done(d)) => d,
        other => panic!("expected Done, got {other:?}"),
    }
}

/// The text of a corpus document, lines joined (chunks join a paragraph's lines).
fn doc_text(name: &str) -> String {
    let path = fieldllm_tests::repo_root().join("tests/corpus").join(name);
    std::fs::read_to_string(path)
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_cite_the_documents_over_mqtt_and_see_a_changed_index() {
    let index = indexed_corpus();
    let broker = Mosquitto::start("allow_anonymous true");
    let model = "smollm2-135m-instruct.gguf";
    let d = Daemon::start(&daemon_config(
        broker.port,
        "dq",
        model,
        &docs_section(index.path()),
    ));
    let mut c = Client::connect(broker.port, "t-docs").await;
    c.wait_status("dq", "ready").await;
    assert!(d.log().contains("document library open"), "{}", d.log());

    // docs: true: the answer, then Done names the passage and quotes its key sentence
    let q = r#""prompt":"What is the setting of the main relief valve?","docs":true,"maxTokens":24,"temperature":0"#;
    let (text, last) = ask(&mut c, "dq", "g1", q).await;
    assert!(!text.trim().is_empty());
    let dn = done(&last);
    assert!(matches!(
        finish(&last),
        v1::FinishReason::Stop | v1::FinishReason::Length
    ));
    let s = &dn.sources[0];
    assert_eq!(
        (s.doc.as_str(), s.page),
        ("hpu-220-service-manual.md", None),
        "{dn:?}"
    );
    assert!(s.section.ends_with("4.1 Main relief valve RV-1"), "{dn:?}");
    assert!(s.similarity > 0.26 && s.score > 0.0, "{dn:?}");
    assert!(!dn.quote.is_empty(), "{dn:?}");
    let manual = doc_text("hpu-220-service-manual.md");
    assert!(
        manual.contains(&dn.quote.split_whitespace().collect::<Vec<_>>().join(" ")),
        "the quote is the manual's own words: {:?}",
        dn.quote
    );
    // the passages went into the prompt: far more tokens than the question alone
    let grounded_tokens = dn.usage.unwrap().prompt_tokens;

    // `ask --via --docs`: the same citations, printed as local `ask --docs` prints them
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let o = tokio::task::spawn_blocking(move || {
        fieldllm_tests::run(&[
            "ask",
            "--via",
            &url,
            "--node",
            "dq",
            "--docs",
            "--max-tokens",
            "8",
            "How tight should the relief valve lock nut be?",
        ])
    })
    .await
    .unwrap();
    let out = ok(&o);
    assert!(
        out.contains("From [1]: \"")
            && out
                .contains("Sources:\n[1] hpu-220-service-manual.md §4.1 Main relief valve RV-1\n"),
        "{out}"
    );

    // the same question without docs: the model alone, no sources
    let q = r#""prompt":"What is the setting of the main relief valve?","maxTokens":8"#;
    let (_, last) = ask(&mut c, "dq", "g2", q).await;
    let plain = done(&last);
    assert!(
        plain.sources.is_empty() && plain.quote.is_empty(),
        "{plain:?}"
    );
    assert!(
        grounded_tokens > plain.usage.unwrap().prompt_tokens + 100,
        "{grounded_tokens} vs {plain:?}"
    );

    // a question the documents do not cover: not_covered, and no model ran
    let q = r#""prompt":"What is the capital of France?","docs":true"#;
    let (text, last) = ask(&mut c, "dq", "g3", q).await;
    assert_eq!(code(&last), ErrorCode::NotCovered, "{last:?}");
    assert!(text.is_empty());

    // a bad request is refused before any search
    let q = r#""prompt":"Relief valve?","docs":true,"temperature":-1"#;
    let (_, last) = ask(&mut c, "dq", "g4", q).await;
    assert_eq!(code(&last), ErrorCode::BadRequest, "{last:?}");

    // a document added while the daemon runs is found by the next question, no restart
    let more = tempfile::tempdir().unwrap();
    std::fs::write(
        more.path().join("zx-9-bleed-valve.md"),
        "# ZX-9 bleed valve\n\n## 2 Bleed screw\n\nTighten the ZX-9 bleed screw to 7 Nm after \
         bleeding. Replace its copper washer each time it is opened.\n",
    )
    .unwrap();
    ok(&docs(index.path(), &["add", more.path().to_str().unwrap()]));
    let q = r#""prompt":"What torque does the ZX-9 bleed screw take?","docs":true,"maxTokens":8"#;
    let (_, last) = ask(&mut c, "dq", "g5", q).await;
    let dn = done(&last);
    assert_eq!(dn.sources[0].doc, "zx-9-bleed-valve.md", "{dn:?}");
    assert!(dn.quote.contains("7 Nm"), "{dn:?}");
    drop(d);
}

/// A daemon whose index does not exist yet refuses `docs: true` saying how to make one, then
/// answers from the index `docs add` makes while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_made_after_start_is_used_without_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let index = state.path().join("docs");
    let broker = Mosquitto::start("allow_anonymous true");
    let d = Daemon::start(&daemon_config(
        broker.port,
        "dn",
        "tiny-llama",
        &docs_section(&index),
    ));
    let mut c = Client::connect(broker.port, "t-docs-new").await;
    c.wait_status("dn", "ready").await;
    let q = r#""prompt":"Oil grade?","docs":true"#;
    let (_, last) = ask(&mut c, "dn", "n1", q).await;
    assert_eq!(code(&last), ErrorCode::BadRequest);
    let Some(Kind::Error(e)) = &last.kind else {
        unreachable!()
    };
    assert!(e.message.contains("fieldllmd docs add"), "{e:?}");
    assert!(!index.exists(), "asking does not make an index");

    let files = corpus();
    ok(&docs(&index, &["add", files.path().to_str().unwrap()]));
    // the tiny model's 256-token context holds the question, not the passages: refused whole
    let q = r#""prompt":"Which hydraulic oil grade does the power unit take?","docs":true,"maxTokens":4"#;
    let (_, last) = ask(&mut c, "dn", "n2", q).await;
    assert_eq!(code(&last), ErrorCode::TooLarge, "{last:?}");
    drop(d);
}

/// Framed serial carries the same request field and the same `Done.sources`; the console
/// answers from the documents by default, cites them, and shows them with `/sources`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framed_and_console_answers_cite_the_documents() {
    let index = indexed_corpus();
    let dir = tempfile::tempdir().unwrap();
    let (dir_f, dir_c) = (dir.path().join("f"), dir.path().join("c"));
    std::fs::create_dir_all(&dir_f).unwrap();
    std::fs::create_dir_all(&dir_c).unwrap();
    let framed = NullModem::start(&dir_f);
    let console = NullModem::start(&dir_c);
    let broker = Mosquitto::start("allow_anonymous true");
    let serial = format!(
        "{}\n[[serial]]\npath = {:?}\nmode = \"framed\"\n\n[[serial]]\npath = {:?}\nmode = \"console\"\n",
        docs_section(index.path()),
        framed.dev,
        console.dev
    );
    let d = Daemon::start(&daemon_config(
        broker.port,
        "ds",
        "smollm2-135m-instruct.gguf",
        &serial,
    ));

    // framed
    use tokio_serial::SerialPortBuilderExt;
    let mut port = tokio_serial::new(framed.host.to_string_lossy(), 115_200)
        .open_native_async()
        .unwrap();
    d.wait_log("serial port open", WAIT);
    let req = Frame::Request(Request {
        id: "f1".into(),
        prompt: "Generator stopped with fault F12".into(),
        max_tokens: Some(8),
        docs: Some(true),
        ..Request::default()
    });
    port.write_all(&frame::encode(&req).unwrap()).await.unwrap();
    let mut reader = Reader::new();
    let got = until_frame(&mut port, &mut reader, |f| {
        matches!(f, Frame::Done(_) | Frame::Error(_))
    })
    .await;
    let last = got.into_iter().last().unwrap();
    let Frame::Done(dn) = last else {
        panic!("{last:?}")
    };
    let s = &dn.sources[0];
    assert_eq!(
        (s.doc.as_str(), s.page),
        ("gen-15-generator-manual.pdf", Some(3)),
        "{dn:?}"
    );
    // the sentence of that page nearest the question (F12's remedy)
    assert!(dn.quote.contains("oil level"), "{dn:?}");

    // the console
    let mut t = Terminal::open(&console.host);
    let banner = String::from_utf8_lossy(&t.until(PROMPT, WAIT).await).to_string();
    assert!(banner.contains("installed documents"), "{banner}");
    t.send(b"/set max_tokens 16\r").await;
    t.until(PROMPT, WAIT).await;
    t.send(b"How tight should the relief valve lock nut be?\r")
        .await;
    let out = String::from_utf8_lossy(&t.until(PROMPT, WAIT).await).to_string();
    assert!(
        out.contains("From [1]: \"")
            && out.contains("Sources:\r\n[1] hpu-220-service-manual.md §4.1 Main relief valve"),
        "{out}"
    );
    t.send(b"/sources\r").await;
    let out = String::from_utf8_lossy(&t.until(PROMPT, WAIT).await).to_string();
    assert!(
        out.contains("[1] hpu-220-service-manual.md") && out.contains("25 Nm"),
        "{out}"
    );
    t.send(b"What is the capital of France?\r").await;
    let out = String::from_utf8_lossy(&t.until(PROMPT, WAIT).await).to_string();
    assert!(out.contains("do not cover this question"), "{out}");
    t.send(b"/docs off\r").await;
    t.until(PROMPT, WAIT).await;
    t.send(b"How tight should the relief valve lock nut be?\r")
        .await;
    let out = String::from_utf8_lossy(&t.until(PROMPT, WAIT).await).to_string();
    assert!(!out.contains("Sources:"), "{out}");
    t.send(b"/docs\r").await;
    let out = String::from_utf8_lossy(&t.until(PROMPT, WAIT).await).to_string();
    assert!(out.contains("Answers from documents: off"), "{out}");
    drop(d);
}
