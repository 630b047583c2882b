//! Command line: flags (clap) and the subcommands that drive the library.

mod ask;
mod bench;
mod bench_docs;
mod bench_parallel;
mod bench_quality;
mod bench_service;
mod docs;
mod docs_answers;
mod model;
mod model_gguf;
mod serve;
mod thermal;
mod via;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Offline LLM answers for field equipment and technicians.
#[derive(Debug, Parser)]
#[command(name = "fieldllmd", version, about)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: load the model and answer over MQTT.
    Serve(serve::ServeArgs),
    /// Answer one question, streamed to stdout.
    Ask(ask::AskArgs),
    /// Measure load time, peak memory, prefill and decode speed.
    Bench(bench::BenchArgs),
    /// Build, describe and check model packages.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// The document index answers are grounded on: add, list, remove, search.
    Docs(docs::DocsArgs),
    /// Live accelerator telemetry (temperatures, rails, clocks, thermal state), like tegrastats.
    Thermal(thermal::ThermalArgs),
}

/// Logs go to stderr; `RUST_LOG` overrides the level the flags give.
pub fn init_logging(verbose: u8, serving: bool) {
    // tract warns that opset 23 is beyond what it is "tested against": the engine's own tests
    // are what vouch for the graph, so that line is noise for users
    // the embedded broker logs every client's connect and disconnect at info, and a client
    // that goes away (the daemon's own link at shutdown included) as an error of its server
    // module; the daemon checks the one error that matters there, a taken port, itself
    let level = match verbose {
        0 if serving => "info,tract_onnx=error,rumqttd=warn,rumqttd::server::broker=off",
        0 => "warn,tract_onnx=error,rumqttd::server::broker=off",
        1 => "info,tract_onnx=error,rumqttd=warn,rumqttd::server::broker=off",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let journal = stderr_is_journal()
        .then(|| {
            tracing_journald::layer().ok().map(|l| {
                // fields as their own journal fields: `journalctl REQUEST_ID=q1`
                l.with_field_prefix(None)
                    .with_syslog_identifier("fieldllmd".into())
            })
        })
        .flatten();
    let registry = tracing_subscriber::registry().with(filter);
    match journal {
        Some(j) => registry.with(j).init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(colour())
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
}

/// Colour codes only for a person at a terminal: a log file or a pipe gets plain text, and
/// `NO_COLOR` (no-color.org) turns them off everywhere.
fn colour() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Whether stderr is systemd's journal stream (`JOURNAL_STREAM` names its device and inode),
/// as under a unit; then logs go to journald with structured fields instead.
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self/fd/2")
        .is_ok_and(|m| dev.parse::<u64>() == Ok(m.dev()) && ino.parse::<u64>() == Ok(m.ino()))
}

impl Cli {
    /// Whether the command is the daemon (it logs at info by default).
    pub fn serving(&self) -> bool {
        // with the console on its terminal, info lines would bury the conversation
        matches!(&self.command, Command::Serve(s) if !s.local_console())
    }
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(s) => serve::run(s),
        Command::Ask(a) => ask::run(a),
        Command::Bench(b) => bench::run(b),
        Command::Model(m) => model::run(m),
        Command::Docs(d) => docs::run(d),
        Command::Thermal(t) => thermal::run(t),
    }
}

/// `--model DIR`, shared by the subcommands that load one.
#[derive(Debug, clap::Args)]
pub struct ModelArg {
    /// Model artifact directory, or a .gguf file (imported into the cache on first use)
    /// [default: $FIELDLLM_MODEL, the installed model, or
    /// models/build/smollm2-135m-instruct.gguf].
    #[arg(long, value_name = "DIR|FILE.gguf")]
    pub model: Option<PathBuf>,
}

impl ModelArg {
    /// The model directory; a GGUF file is imported into the cache on first use.
    fn dir(&self) -> anyhow::Result<PathBuf> {
        fieldllmd::paths::model_dir(self.model.clone())
    }
}
