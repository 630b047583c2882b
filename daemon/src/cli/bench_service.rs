//! `fieldllmd bench --service mqtt://HOST:PORT`: what the MQTT service costs per request.
//!
//! The same requests run twice: straight into a scheduler in this process (the bare engine
//! path: validate, queue, generate), then through the broker to a running `fieldllmd serve`
//! (JSON encode, publish, broker, decode, the same scheduler, one message per chunk back).
//! Latency is from submit (or publish) to the final message; throughput at each concurrency is
//! requests finished per second of wall time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fieldllmd::config::parse_broker;
use fieldllmd::proto::{Request, Response};
use fieldllmd::request::{Intake, Limits, Origin};
use fieldllmd::scheduler::{ModelEngine, Reply, Scheduler, SchedulerConfig, Transport};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;

/// What to measure.
#[derive(Debug, Clone)]
pub struct ServiceBench {
    /// Broker URL.
    pub url: String,
    /// Node id of the daemon under test.
    pub node: String,
    /// Topic prefix.
    pub prefix: String,
    /// Requests per concurrency level.
    pub requests: usize,
    /// Concurrency levels.
    pub concurrency: Vec<usize>,
    /// Tokens per answer.
    pub max_tokens: u32,
    /// tract threads of the in-process scheduler (match the daemon's).
    pub threads: usize,
}

#[derive(Debug, Serialize)]
struct Row {
    path: &'static str,
    concurrency: usize,
    requests: usize,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn request(id: String, max_tokens: u32) -> Request {
    Request {
        id,
        prompt: "What does a pressure relief valve do?".into(),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        stream: Some(true),
        ..Request::default()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn row(path: &'static str, concurrency: usize, wall: Duration, mut lat: Vec<f64>) -> Row {
    lat.sort_by(f64::total_cmp);
    Row {
        path,
        concurrency,
        requests: lat.len(),
        rps: lat.len() as f64 / wall.as_secs_f64(),
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
    }
}

/// Closed loop: `concurrency` requests in flight until `n` are done.
fn bare(
    s: &Scheduler,
    intake: &Intake,
    n: usize,
    concurrency: usize,
    max_tokens: u32,
    tag: &str,
) -> Row {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Reply>();
    let mut started: HashMap<String, Instant> = HashMap::new();
    let mut lat = Vec::with_capacity(n);
    let mut sent = 0;
    let submit = |i: usize, started: &mut HashMap<String, Instant>| {
        let id = format!("{tag}-{i}");
        let now = Instant::now();
        let job = intake.job(
            request(id.clone(), max_tokens),
            None,
            Origin::new(Transport::Local),
            now,
        );
        started.insert(id, now);
        match job {
            Ok(job) => {
                s.submit(job, tx.clone());
            }
            Err(r) => panic!("bench request refused: {}", r.message),
        }
    };
    let t0 = Instant::now();
    while lat.len() < n {
        // keep `concurrency` in flight
        while sent < n && started.len() < concurrency {
            submit(sent, &mut started);
            sent += 1;
        }
        let Some(r) = rx.blocking_recv() else { break };
        if r.is_final()
            && let Some(t) = started.remove(r.id())
        {
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    row(
        "engine (in-process scheduler)",
        concurrency,
        t0.elapsed(),
        lat,
    )
}

async fn over_mqtt(b: &ServiceBench, concurrency: usize, tag: &str) -> anyhow::Result<Row> {
    let broker = parse_broker(&b.url).map_err(anyhow::Error::msg)?;
    if broker.tls {
        bail!("--service takes mqtt:// brokers");
    }
    let me = format!("fieldllmd-bench-{}-{tag}", std::process::id());
    let mut o = MqttOptions::new(me, broker.host.clone(), broker.port);
    o.set_max_packet_size(4 << 20, 4 << 20);
    o.set_inflight(100);
    let (client, mut ev) = AsyncClient::new(o, 1024);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    ev.set_network_options(net);
    let req_topic = format!("{}/{}/req", b.prefix, b.node);
    let resp = format!("{}/{}/resp/+", b.prefix, b.node);
    client.subscribe(&resp, QoS::AtLeastOnce).await?;
    // wait for the SUBACK before the clock starts
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("broker {}: {e}", b.url),
            Err(_) => bail!("no SUBACK from {} in 10 s", b.url),
        }
    }
    let n = b.requests;
    let mut started: HashMap<String, Instant> = HashMap::new();
    let mut lat = Vec::with_capacity(n);
    let mut sent = 0;
    let t0 = Instant::now();
    // ids unique across runs: the daemon answers an id it has seen once only
    let run = format!("{:x}", std::process::id());
    let publish = |i: usize| {
        let id = format!("{run}-{tag}-{i}");
        let payload = serde_json::to_vec(&request(id.clone(), b.max_tokens));
        (id, payload)
    };
    while lat.len() < n {
        // keep `concurrency` in flight
        while sent < n && started.len() < concurrency {
            let (id, payload) = publish(sent);
            started.insert(id, Instant::now());
            client
                .publish(&req_topic, QoS::AtLeastOnce, false, payload?)
                .await?;
            sent += 1;
        }
        let ev = tokio::time::timeout(Duration::from_secs(30), ev.poll())
            .await
            .with_context(|| format!("no answer in 30 s: is a daemon serving {req_topic}?"))?;
        let Event::Incoming(Packet::Publish(p)) = ev? else {
            continue;
        };
        let r: Response = serde_json::from_slice(&p.payload).context("undecodable answer")?;
        if !r.is_final() {
            continue;
        }
        if let Some(fieldllmd::proto::v1::response::Kind::Error(e)) = &r.kind {
            bail!("the daemon refused {}: {}", r.id(), e.message);
        }
        if let Some(t) = started.remove(r.id()) {
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let wall = t0.elapsed();
    let _ = client.disconnect().await;
    Ok(row("MQTT (broker + daemon)", concurrency, wall, lat))
}

/// Runs both paths at every concurrency level and prints a table (or JSON).
pub fn run(b: ServiceBench, model_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(b.requests > 0, "--requests must be positive");
    let model = super::bench::load_model(model_dir, b.threads, Default::default())?;
    let name = model.manifest().model.name.clone();
    let levels = if b.concurrency.is_empty() {
        vec![1, 4]
    } else {
        b.concurrency.clone()
    };
    let mut rows = Vec::new();
    let engine = Arc::new(ModelEngine::new(model, true)?);
    let intake = Intake::new(Limits::default(), engine.clone());
    // the daemon's defaults (slots, KV budget), a longer queue
    let s = Scheduler::start(
        engine,
        SchedulerConfig {
            queue: 64,
            ..SchedulerConfig::default()
        },
    )?;
    // warm-up: first requests pay for allocations
    bare(&s, &intake, 5, 1, b.max_tokens, "warm");
    for &c in &levels {
        rows.push(bare(
            &s,
            &intake,
            b.requests,
            c,
            b.max_tokens,
            &format!("e{c}"),
        ));
    }
    s.shutdown(Duration::from_secs(1));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let warm = ServiceBench {
            requests: 5,
            ..b.clone()
        };
        over_mqtt(&warm, 1, "warm").await?;
        for &c in &levels {
            rows.push(over_mqtt(&b, c, &format!("m{c}")).await?);
        }
        anyhow::Ok(())
    })?;
    if json {
        println!(
            "{}",
            serde_json::json!({"model": name, "max_tokens": b.max_tokens, "rows": rows})
        );
        return Ok(());
    }
    println!(
        "model {name}, {} tokens per answer (streamed), {} requests per row",
        b.max_tokens, b.requests
    );
    println!("| path | concurrency | req/s | p50 ms | p99 ms |");
    println!("|---|--:|--:|--:|--:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.2} |",
            r.path, r.concurrency, r.rps, r.p50_ms, r.p99_ms
        );
    }
    for &c in &levels {
        let e = rows
            .iter()
            .find(|r| r.concurrency == c && r.path.starts_with("engine"));
        let m = rows
            .iter()
            .find(|r| r.concurrency == c && r.path.starts_with("MQTT"));
        if let (Some(e), Some(m)) = (e, m) {
            println!(
                "concurrency {c}: MQTT adds {:.2} ms at p50, {:.2} ms at p99",
                m.p50_ms - e.p50_ms,
                m.p99_ms - e.p99_ms
            );
        }
    }
    Ok(())
}
