//! `fieldllmd serve`: the daemon. Model, scheduler, firmware bridge, MQTT, serial ports;
//! SIGTERM/SIGINT stop it cleanly.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use anyhow::Context;
use fieldllm_engine::{LoadOptions, Model};
use fieldllmd::config::{Broker, BrokerSetting, Config, Protocol, check_topic_level};
use fieldllmd::docs::library::{Library, LibraryConfig};
use fieldllmd::request::{Intake, Limits};
use fieldllmd::scheduler::{ModelEngine, Scheduler, SchedulerConfig};
use fieldllmd::systemd;
use fieldllmd::thermal::{self, ThermalView};
use fieldllmd::transport::mqtt::{MqttService, embedded};
use fieldllmd::transport::serial::{self, ModelInfo, PortInfo, SerialContext};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use super::ModelArg;

/// Flags of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (default: every key at its default).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArg,
    /// Do not open the technician console on this terminal (it opens when stdin is one).
    #[arg(long)]
    no_console: bool,
}

impl ServeArgs {
    /// Whether the console runs on the daemon's own terminal.
    pub fn local_console(&self) -> bool {
        use std::io::IsTerminal;
        !self.no_console && std::io::stdin().is_terminal()
    }
}

/// The machine's hostname as a topic level, or "fieldllm".
fn hostname() -> String {
    // uname(2), not /proc/sys/kernel/hostname: the unit's ProcSubset=pid hides /proc/sys
    let h = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let h = h.trim();
    if check_topic_level(h).is_ok() {
        h.to_string()
    } else {
        "fieldllm".to_string()
    }
}

/// The document library of `[docs]`, opened now when its index exists (so the first grounded
/// question does not wait for the embedding model); else it opens when the first question
/// asks for it, as `docs add` may make the index while the daemon runs.
fn library(config: &Config) -> anyhow::Result<Option<Arc<Library>>> {
    let d = &config.docs;
    if !d.enabled {
        tracing::info!("answers from documents are off ([docs] enabled = false)");
        return Ok(None);
    }
    let library = Arc::new(Library::new(LibraryConfig {
        index: fieldllmd::paths::default_docs_index(d.index.clone()),
        embedder: fieldllmd::paths::default_embedder_dir(d.embedder.clone()),
        settings: d.settings(),
        threads: config.model.threads,
    })?);
    if library.exists() {
        // a library that does not open now is said now, and tried again per question
        if let Err(e) = library.open() {
            tracing::warn!(error = %e, "the document library did not open; questions that ask for it are refused until it does");
        }
    } else {
        tracing::info!(index = %library.config().index.display(), "no document index yet: questions that ask for documents are refused until `fieldllmd docs add` makes one");
    }
    Ok(Some(library))
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let config = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let dir = fieldllmd::paths::model_dir(a.model.model.clone().or(config.model.path.clone()))?;
    let model = Model::load(
        &dir,
        &LoadOptions {
            verify: true,
            threads: config.model.threads,
            context: config.model.context,
            activations: config.model.activations,
            kv_cache: config.model.kv_cache,
        },
    )
    .with_context(|| format!("loading model {}", dir.display()))?;
    // what the load parsed and dropped goes back to the kernel, not to the heap's free lists
    fieldllmd::rss::release_freed_memory();
    let engine = Arc::new(ModelEngine::new(model.clone(), config.model.batch)?);
    let mut intake = Intake::new(Limits::from(&config.limits), engine.clone());
    if let Some(library) = library(&config).context("starting the document search thread")? {
        intake = intake.with_library(library);
    }
    let scheduler = Scheduler::start(
        engine,
        SchedulerConfig {
            queue: config.limits.queue,
            slots: config.model.slots,
            kv_memory: Some(config.model.kv_memory_bytes()),
        },
    )?;
    let on_change = {
        let s = scheduler.clone();
        Box::new(move |state, limits, retry| s.set_thermal(state, limits, retry))
    };
    let (thermal, bridge) = thermal::start(&config.bridge, on_change)?;
    let node = config.mqtt.node_id.clone().unwrap_or_else(hostname);
    let (broker, protocol) = match &config.mqtt.broker {
        BrokerSetting::Url(b) => (b.clone(), config.mqtt.protocol),
        BrokerSetting::Embedded => {
            let listen = config.mqtt.embedded_listen;
            embedded::start(listen, config.limits.max_payload_bytes)?;
            let host = if listen.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                listen.ip().to_string()
            };
            let b = Broker {
                host,
                port: listen.port(),
                tls: false,
            };
            (b, Protocol::V311)
        }
    };
    let service = MqttService {
        config: config.mqtt.clone(),
        broker,
        protocol,
        node: node.clone(),
        intake: intake.clone(),
        max_payload: config.limits.max_payload_bytes,
        model_name: model.manifest().model.name.clone(),
        open_streams: Arc::new(AtomicUsize::new(0)),
        thermal: thermal.clone(),
    };
    let serial_ctx = SerialContext {
        scheduler: scheduler.clone(),
        info: PortInfo {
            intake,
            node: node.clone(),
            model: ModelInfo {
                name: model.manifest().model.name.clone(),
                weights: model.manifest().graph.weights.to_string(),
                context: model.context_length,
                parameters: model.manifest().model.parameters,
            },
            thermal: thermal.clone(),
            started: std::time::Instant::now(),
        },
    };
    let ports = config.serial.clone();
    let local_console = a.local_console();
    let grace = Duration::from_secs(config.limits.grace_s);
    let stall = Duration::from_secs(config.limits.stall_s);
    let model_name = model.manifest().model.name.clone();
    let broker_name = service.broker.to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let serial_tasks: Vec<_> = ports
            .into_iter()
            .map(|p| tokio::spawn(serial::run(p, serial_ctx.clone(), stop_rx.clone())))
            .collect();
        let (quit_tx, mut quit_rx) = tokio::sync::mpsc::channel::<()>(1);
        let local = if local_console {
            match serial::tty::Tty::open() {
                Ok(tty) => {
                    let (ctx, mut stop) = (serial_ctx.clone(), stop_rx.clone());
                    Some(tokio::spawn(async move {
                        let ended = serial::console::serve_local(tty, ctx, &mut stop).await;
                        if let Err(e) = &ended {
                            tracing::warn!(error = %e, "terminal console ended");
                        }
                        let _ = quit_tx.send(()).await;
                    }))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no console on this terminal");
                    None
                }
            }
        } else {
            None
        };
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mqtt = tokio::spawn(service.run(scheduler.clone(), stop_rx.clone(), ready_tx));
        // READY once the broker link is subscribed; a broker that is down does not hold the
        // service in "activating" (MQTT keeps retrying, the console and framed ports serve)
        if tokio::time::timeout(READY_WAIT, ready_rx).await.is_err() {
            tracing::warn!(broker = %broker_name, wait_s = READY_WAIT.as_secs(), "broker not reached yet: ready without it, still trying");
        }
        tracing::info!(%node, model = %model_name, "serving");
        let status = tokio::spawn(systemd_status(
            scheduler.clone(),
            thermal.clone(),
            model_name.clone(),
            stop_rx.clone(),
        ));
        let watchdog = tokio::spawn(systemd_watchdog(scheduler.clone(), stall, stop_rx));
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            Some(()) = quit_rx.recv() => {}
        }
        tracing::info!(
            grace_s = grace.as_secs(),
            "stopping: intake closed, finishing answers"
        );
        systemd::stopping("stopping: finishing answers");
        let s = scheduler.clone();
        tokio::task::spawn_blocking(move || s.shutdown(grace)).await?;
        let _ = stop_tx.send(true);
        if let Some(t) = local {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        for t in serial_tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        let _ = status.await;
        let _ = watchdog.await;
        mqtt.await??;
        if let Some(b) = bridge {
            // puts the devfreq and power-mode controls back as found
            tokio::task::spawn_blocking(move || b.stop()).await?;
        }
        tracing::info!("stopped");
        Ok(())
    })
}

/// How long READY waits for the broker.
const READY_WAIT: Duration = Duration::from_secs(10);

/// Feeds systemd's watchdog (`WatchdogSec`) at half its period while the scheduler's heartbeat
/// is good: a worker stuck on one job for over `stall` without a token (a hung engine) stops
/// the pings, and systemd restarts the service. A stopped or wedged process stops them too.
async fn systemd_watchdog(scheduler: Scheduler, stall: Duration, mut stop: watch::Receiver<bool>) {
    let Some(period) = systemd::watchdog_period() else {
        return;
    };
    let every = period / 2;
    tracing::info!(
        every_ms = every.as_millis() as u64,
        stall_s = stall.as_secs(),
        "feeding the systemd watchdog"
    );
    loop {
        match scheduler.stalled(stall) {
            None => systemd::watchdog(),
            Some(d) => tracing::error!(
                stuck_s = d.as_secs(),
                "the engine has made no progress on an answer: not feeding the watchdog, systemd will restart the service"
            ),
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// `systemctl status`'s line: model, state, thermal summary and the queue, refreshed every
/// 2 s and on each thermal change. `READY=1` goes with the first one.
async fn systemd_status(
    scheduler: Scheduler,
    thermal: ThermalView,
    model: String,
    mut stop: watch::Receiver<bool>,
) {
    if !systemd::enabled() {
        return;
    }
    let line = || {
        let s = scheduler.stats();
        format!(
            "ready; {model}; thermal {}; {} queued, {} running, {} answered, last {:.1} tok/s",
            thermal.summary(),
            s.queued,
            s.running,
            s.answered,
            s.last_decode_tok_s
        )
    };
    let mut last = line();
    systemd::ready(&last);
    let mut changes = thermal.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
            Ok(()) = changes.changed() => {}
        }
        let now = line();
        if now != last {
            systemd::status(&now);
            last = now;
        }
    }
}
