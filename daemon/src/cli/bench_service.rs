//! `fieldllmd bench --service mqtt://HOST:PORT`: what the MQTT service costs per request.
//!
//! The same requests run twice: straight into a scheduler in this process (the bare engine
//! path: validate, queue, generate), then through the broker to a running `fieldllmd serve`
//! (JSON encode, publish, broker, decode, the same scheduler, one message per chunk back).
//! Through the broker, each level of concurrency is that many devices, each on its own
//! connection asking one question at a time (closed loop); in process, that many requests in
//! flight. Latency is from submit (or publish) to the final message; throughput is requests
//! finished per second of wall time. `--mqtt-only` skips the in-process rows (to compare
//! daemons of different settings on the same load).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fieldllmd::config::parse_broker;
use fieldllmd::proto::{Request, Response};
use fieldllmd::request::{Intake, Limits, Origin};
use fieldllmd::scheduler::{ModelEngine, Reply, Scheduler, SchedulerConfig, Transport};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
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
    /// Only through the broker: no in-process rows (and no model loaded here).
    pub mqtt_only: bool,
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

/// One MQTT connection to the broker, subscribed to nothing yet.
async fn connect(b: &ServiceBench, name: &str) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let broker = parse_broker(&b.url).map_err(anyhow::Error::msg)?;
    if broker.tls {
        bail!("--service takes mqtt:// brokers");
    }
    let mut o = MqttOptions::new(name, broker.host.clone(), broker.port);
    o.set_max_packet_size(4 << 20, 4 << 20);
    o.set_inflight(100);
    let (client, mut ev) = AsyncClient::new(o, 1024);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    ev.set_network_options(net);
    Ok((client, ev))
}

/// Polls `ev` until `want` says yes of an incoming packet (30 s at most per packet).
async fn until(
    ev: &mut EventLoop,
    url: &str,
    mut want: impl FnMut(&Packet) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(30), ev.poll())
            .await
            .with_context(|| format!("nothing from {url} in 30 s: is a daemon serving it?"))?
            .with_context(|| format!("broker {url}"))?;
        if let Event::Incoming(p) = e
            && want(&p)?
        {
            return Ok(());
        }
    }
}

/// One device: its own connection, asking `ids` one after the other (each subscribed to its
/// own answer's topic before the clock starts); the latency of each.
async fn device(
    b: ServiceBench,
    name: String,
    ids: Vec<String>,
    start: Arc<tokio::sync::Barrier>,
) -> anyhow::Result<Vec<f64>> {
    let connected = async {
        let (client, mut ev) = connect(&b, &name).await?;
        until(&mut ev, &b.url, |p| Ok(matches!(p, Packet::ConnAck(_)))).await?;
        anyhow::Ok((client, ev))
    }
    .await;
    // the others start when every device is connected or has failed to
    start.wait().await;
    let (client, mut ev) = connected?;
    let req_topic = format!("{}/{}/req", b.prefix, b.node);
    let mut lat = Vec::with_capacity(ids.len());
    for id in ids {
        let topic = format!("{}/{}/resp/{id}", b.prefix, b.node);
        client.subscribe(&topic, QoS::AtLeastOnce).await?;
        until(&mut ev, &b.url, |p| Ok(matches!(p, Packet::SubAck(_)))).await?;
        let payload = serde_json::to_vec(&request(id.clone(), b.max_tokens))?;
        let t = Instant::now();
        client
            .publish(&req_topic, QoS::AtLeastOnce, false, payload)
            .await?;
        until(&mut ev, &b.url, |p| {
            let Packet::Publish(p) = p else {
                return Ok(false);
            };
            let r: Response = serde_json::from_slice(&p.payload).context("undecodable answer")?;
            if let Some(fieldllmd::proto::v1::response::Kind::Error(e)) = &r.kind {
                bail!("the daemon refused {}: {}", r.id(), e.message);
            }
            Ok(r.is_final() && r.id() == id)
        })
        .await?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        client.unsubscribe(&topic).await?;
    }
    let _ = client.disconnect().await;
    Ok(lat)
}

/// `clients` devices, each on its own connection asking one question at a time, until
/// `b.requests` are answered; wall time from when all are connected.
async fn over_mqtt(b: &ServiceBench, clients: usize, tag: &str) -> anyhow::Result<Row> {
    let start = Arc::new(tokio::sync::Barrier::new(clients + 1));
    // ids unique across runs: the daemon answers an id it has seen once only
    let run = format!("{:x}", std::process::id());
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let ids = (c..b.requests)
                .step_by(clients)
                .map(|i| format!("{run}-{tag}-{i}"))
                .collect();
            let name = format!("fieldllmd-bench-{run}-{tag}-{c}");
            tokio::spawn(device(b.clone(), name, ids, start.clone()))
        })
        .collect();
    start.wait().await;
    let t0 = Instant::now();
    let mut lat = Vec::with_capacity(b.requests);
    for t in tasks {
        lat.extend(t.await.context("a bench client panicked")??);
    }
    Ok(row("MQTT (broker + daemon)", clients, t0.elapsed(), lat))
}

/// The in-process rows: the model's name and one row per level.
fn in_process(
    b: &ServiceBench,
    model_dir: &std::path::Path,
    levels: &[usize],
) -> anyhow::Result<(String, Vec<Row>)> {
    let model =
        super::bench::load_model(model_dir, b.threads, Default::default(), Default::default())?;
    let name = model.manifest().model.name.clone();
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
    let rows = levels
        .iter()
        .map(|&c| bare(&s, &intake, b.requests, c, b.max_tokens, &format!("e{c}")))
        .collect();
    s.shutdown(Duration::from_secs(1));
    Ok((name, rows))
}

/// Runs both paths (or only MQTT's) at every concurrency level and prints a table (or JSON).
pub fn run(b: ServiceBench, model_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(b.requests > 0, "--requests must be positive");
    let levels = if b.concurrency.is_empty() {
        vec![1, 4]
    } else {
        b.concurrency.clone()
    };
    anyhow::ensure!(!levels.contains(&0), "--concurrency must be at least 1");
    let (name, mut rows) = if b.mqtt_only {
        ("the daemon's model".to_string(), Vec::new())
    } else {
        in_process(&b, model_dir, &levels)?
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
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
