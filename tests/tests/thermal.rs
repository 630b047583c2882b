//! The firmware bridge end to end: a heat ramp written into a copy of the Jetson Orin Nano
//! sysfs fixture while the daemon answers MQTT requests. Each state's effect is checked where a
//! user sees it (answers, refusals, the retained status, telemetry, the console's `/thermal`,
//! systemd's STATUS line, the GPU's `max_freq`), and no request is lost or answered twice.

#![allow(clippy::unwrap_used)] // a failed unwrap in a test is a failed assertion

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fieldllm_tests::mqtt::{Client, json};
use fieldllm_tests::serial::{NullModem, Terminal};
use fieldllm_tests::{Daemon, Mosquitto, copy_tree, model_dir, repo_root};
use fieldllmd::proto::v1::{self, response::Kind};
use fieldllmd::proto::{ErrorCode, Response, Status};
use rumqttc::v5::mqttbytes::v5::PublishProperties;

const NODE: &str = "hot1";
const WAIT: Duration = Duration::from_secs(30);

fn set_temps(root: &Path, mc: i64) {
    for i in 0..9 {
        let p = root.join(format!("sys/class/thermal/thermal_zone{i}/temp"));
        // write then rename: the daemon never reads a half-written file
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{mc}\n")).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }
}

fn gpu_max(root: &Path) -> String {
    std::fs::read_to_string(root.join("sys/class/devfreq/17000000.gpu/max_freq"))
        .unwrap()
        .trim()
        .to_string()
}

/// Every status and telemetry message the daemon publishes, in order.
#[derive(Default)]
struct Seen {
    status: Vec<Status>,
    telemetry: Vec<Status>,
}

async fn watch(port: u16) -> Arc<Mutex<Seen>> {
    let mut w = Client::connect(port, "t-watch").await;
    w.sub(&format!("fieldllm/v1/{NODE}/status")).await;
    w.sub(&format!("fieldllm/v1/{NODE}/telemetry")).await;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let p = w.next().await;
            let st: Status = serde_json::from_slice(&p.payload).unwrap();
            let mut s = s.lock().unwrap();
            if p.topic.ends_with(b"/status") {
                s.status.push(st);
            } else {
                s.telemetry.push(st);
            }
        }
    });
    seen
}

async fn wait_thermal(seen: &Arc<Mutex<Seen>>, state: &str) {
    let until = Instant::now() + WAIT;
    loop {
        if seen
            .lock()
            .unwrap()
            .status
            .last()
            .is_some_and(|s| s.state == "ready" && s.thermal == state)
        {
            return;
        }
        assert!(Instant::now() < until, "status never said thermal {state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The asker's side: answers to several requests interleave on one subscription; each is
/// checked for chunk order and exactly one final.
struct Answers {
    c: Client,
    chunks: HashMap<String, u32>,
    finals: HashMap<String, Response>,
}

impl Answers {
    async fn ask(&self, id: &str, max_tokens: u32) {
        let body = format!(r#"{{"id":"{id}","prompt":"pump pressure","maxTokens":{max_tokens}}}"#);
        self.c
            .request(NODE, body, PublishProperties::default())
            .await;
    }

    async fn step(&mut self) {
        let r = json(&self.c.next().await);
        let id = r.id().to_string();
        assert!(
            !self.finals.contains_key(&id),
            "a message after the final of {id}: {r:?}"
        );
        match &r.kind {
            Some(Kind::Chunk(c)) => {
                let n = self.chunks.entry(id.clone()).or_default();
                assert_eq!(c.seq, *n, "chunks of {id} in order");
                *n += 1;
            }
            Some(Kind::Done(d)) => {
                assert_eq!(d.seq, self.chunks.get(&id).copied().unwrap_or(0));
                self.finals.insert(id, r);
            }
            Some(Kind::Error(_)) => {
                self.finals.insert(id, r);
            }
            None => panic!("empty response"),
        }
    }

    async fn first_chunk(&mut self, id: &str) {
        while !self.chunks.contains_key(id) {
            assert!(!self.finals.contains_key(id), "{id} ended before a chunk");
            self.step().await;
        }
    }

    async fn chunks_of(&mut self, id: &str, n: u32) {
        while self.chunks.get(id).copied().unwrap_or(0) < n {
            self.step().await;
        }
    }

    async fn done(&mut self, id: &str) -> v1::Done {
        while !self.finals.contains_key(id) {
            self.step().await;
        }
        match &self.finals[id].kind {
            Some(Kind::Done(d)) => d.clone(),
            other => panic!("{id}: expected Done, got {other:?}"),
        }
    }

    async fn error(&mut self, id: &str) -> v1::Error {
        while !self.finals.contains_key(id) {
            self.step().await;
        }
        match &self.finals[id].kind {
            Some(Kind::Error(e)) => e.clone(),
            other => panic!("{id}: expected Error, got {other:?}"),
        }
    }
}

fn finish(d: &v1::Done) -> v1::FinishReason {
    v1::FinishReason::try_from(d.finish_reason).unwrap()
}

fn rate(d: &v1::Done) -> f32 {
    d.timings.unwrap().decode_tok_s
}

/// systemd's side of `NOTIFY_SOCKET`: every datagram the daemon sends.
fn notify_socket(path: &Path) -> Arc<Mutex<Vec<String>>> {
    let sock = UnixDatagram::bind(path).unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            g.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heat_ramp_walks_every_state_and_no_answer_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let root: PathBuf = dir.path().join("board");
    copy_tree(
        &repo_root().join("firmware-bridge/tests/fixtures/jetson-orin-nano"),
        &root,
    );
    set_temps(&root, 45_000);
    let notify = notify_socket(&dir.path().join("notify"));
    let cable = NullModem::start(dir.path());
    let broker = Mosquitto::start("allow_anonymous true");
    let config = format!(
        "[model]\npath = {:?}\nthreads = 1\nslots = 2\n\n\
         [mqtt]\nbroker = \"mqtt://127.0.0.1:{}\"\nnode_id = \"{NODE}\"\ntelemetry_s = 1\n\n\
         [limits]\nmax_tokens = 64\n\n\
         [bridge]\nsysfs_root = {root:?}\npoll_ms = 50\nwarm_c = 70\nhot_c = 80\ncritical_c = 90\n\
         hysteresis_c = 3\ndwell_s = 1\nwarm_decode_tok_s = 10\nwarm_max_running = 2\n\n\
         [[bridge.devfreq]]\ndevice = \"17000000.gpu\"\nwarm_max_hz = 510000000\nhot_max_hz = 306000000\n\n\
         [[serial]]\npath = {:?}\nmode = \"console\"\n",
        model_dir("tiny-llama"),
        broker.port,
        cable.dev
    );
    let d = Daemon::start_with_env(
        &config,
        &[("NOTIFY_SOCKET", dir.path().join("notify").as_os_str())],
    );
    let seen = watch(broker.port).await;
    wait_thermal(&seen, "nominal").await;
    let mut t = Terminal::open(&cable.host);
    let banner = t.until(b"fieldllm> ", WAIT).await;
    let banner = String::from_utf8_lossy(&banner).into_owned();
    assert!(
        banner.contains("thermal nominal, 45.0 °C, 7.2 W"),
        "{banner}"
    );
    d.wait_log("thermal bridge on", WAIT);
    let mut a = Answers {
        c: Client::connect(broker.port, "t-ask").await,
        chunks: HashMap::new(),
        finals: HashMap::new(),
    };
    a.c.sub(&format!("fieldllm/v1/{NODE}/resp/+")).await;

    // nominal: full speed, the GPU clock as found
    a.ask("nominal", 40).await;
    let free = rate(&a.done("nominal").await);
    // load can only slow an answer, so the floor is twice the warm cap, not a speed: it says
    // this one was not paced
    assert!(free > 20.0, "uncapped decode {free} tok/s");
    assert_eq!(gpu_max(&root), "624750000");

    // around the warm threshold, 69 and 71 °C in turn: warm once, no flapping back
    for i in 0..20 {
        set_temps(&root, if i % 2 == 0 { 71_000 } else { 69_000 });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    set_temps(&root, 72_000);
    wait_thermal(&seen, "warm").await;
    // warm since the oscillation: the bridge caps the GPU clock (waited for, not slept on)
    let until = Instant::now() + WAIT;
    while gpu_max(&root) != "510000000" {
        assert!(
            Instant::now() < until,
            "no warm cap on the GPU clock: {}",
            gpu_max(&root)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // the console's /thermal shows the state, thresholds and the sensors, once the bridge's
    // 50 ms tick has read the 72 °C (asked again until then)
    let until = Instant::now() + WAIT;
    let out = loop {
        t.send(b"/thermal\r").await;
        let out = t.until(b"fieldllm> ", WAIT).await;
        let out = String::from_utf8_lossy(&out).into_owned();
        if out.contains("72.0 °C") || Instant::now() > until {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for needle in [
        "thermal: warm, 72.0 °C",
        "decode capped at 10 tok/s",
        "hot 80.0 °C",
        "cpu-thermal",
        "VDD_IN",
        "17000000.gpu",
    ] {
        assert!(out.contains(needle), "{needle:?} not in /thermal:\n{out}");
    }

    // warm: two answers at once, each under the 10 tok/s cap; then hot while both run
    a.ask("short", 16).await;
    a.ask("long", 64).await;
    a.chunks_of("short", 2).await;
    a.first_chunk("long").await;
    set_temps(&root, 85_000);
    wait_thermal(&seen, "hot").await;
    assert_eq!(gpu_max(&root), "306000000");
    a.ask("refused", 8).await;
    let e = a.error("refused").await;
    assert_eq!(e.code, ErrorCode::Overheated as i32, "{e:?}");
    assert!(e.retry_after_ms >= 1000, "{e:?}");
    // the running answers go on: the short one to its end
    let short = a.done("short").await;
    assert!(
        matches!(
            finish(&short),
            v1::FinishReason::Length | v1::FinishReason::Stop
        ),
        "{short:?}"
    );
    assert!(rate(&short) <= 10.0, "warm cap: {} tok/s", rate(&short));
    assert!(
        !a.finals.contains_key("long"),
        "the long answer is still running at hot"
    );

    // critical: the long answer ends now, with `thermal`; new work is refused
    set_temps(&root, 95_000);
    let long = a.done("long").await;
    assert_eq!(finish(&long), v1::FinishReason::Thermal, "{long:?}");
    assert!(long.usage.unwrap().completion_tokens < 64);
    wait_thermal(&seen, "critical").await;
    a.ask("at-critical", 8).await;
    assert_eq!(
        a.error("at-critical").await.code,
        ErrorCode::Overheated as i32
    );

    // cooling: one step per dwell, then full service again by itself
    set_temps(&root, 40_000);
    wait_thermal(&seen, "nominal").await;
    assert_eq!(gpu_max(&root), "624750000", "the clock cap lifted");
    a.ask("cooled", 40).await;
    let cooled = a.done("cooled").await;
    assert!(rate(&cooled) > 20.0, "unpaced again: {}", rate(&cooled));

    // the walk, as the retained status told it: each state once, no flapping
    let walk: Vec<String> = {
        let s = seen.lock().unwrap();
        let mut v: Vec<String> = Vec::new();
        for st in s.status.iter().filter(|s| s.state == "ready") {
            if v.last() != Some(&st.thermal) {
                v.push(st.thermal.clone());
            }
        }
        v
    };
    assert_eq!(
        walk,
        [
            "nominal", "warm", "hot", "critical", "hot", "warm", "nominal"
        ]
    );
    let changes = d.log().matches("thermal state changed").count();
    assert_eq!(changes, 6, "six transitions logged:\n{}", d.log());

    // telemetry carries the accelerator's readings
    {
        let s = seen.lock().unwrap();
        let acc = s
            .telemetry
            .iter()
            .filter_map(|t| t.accelerator.as_ref())
            .find(|a| a.temp_c >= 94.0)
            .expect("a telemetry message at critical");
        assert_eq!(acc.board, "jetson");
        assert_eq!(acc.temps_c.len(), 9);
        assert_eq!((acc.warm_c, acc.hot_c, acc.critical_c), (70.0, 80.0, 90.0));
        assert!(
            acc.rails_w
                .iter()
                .any(|r| r.name == "VDD_IN" && r.value > 7.0)
        );
        assert_eq!(acc.clocks_mhz[0].name, "17000000.gpu");
        assert_eq!(acc.throttle_events, 3);
    }

    // systemd saw READY and a STATUS line for each state
    let lines = notify.lock().unwrap().join("\n");
    assert!(lines.contains("READY=1"), "{lines}");
    for state in ["warm", "hot", "critical", "nominal"] {
        assert!(
            lines.contains(&format!("; thermal {state}, ")),
            "no STATUS with thermal {state}:\n{lines}"
        );
    }

    // every request ended exactly once: a probe asked now is answered after anything still
    // on its way for the earlier ones (one publisher, one subscription: in order), and `step`
    // fails on any message after an id's final
    a.ask("probe", 2).await;
    a.done("probe").await;
    assert_eq!(a.finals.len(), 7);
}
