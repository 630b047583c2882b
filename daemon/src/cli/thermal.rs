//! `fieldllmd thermal`: live accelerator telemetry, one row per sample, like tegrastats.
//! Read-only: it runs the same probe, sampling and governor as the daemon but writes no
//! control, so it is safe beside a running daemon.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use fieldllmd::config::{BridgeSection, Config};
use firmware_bridge::{Controls, Monitor, Sensors, Thresholds};

/// Flags of `thermal`.
#[derive(Debug, clap::Args)]
pub struct ThermalArgs {
    /// Configuration file (its `[bridge]` section: root, thresholds, watched zones).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Root holding `sys/class/...` [default: the config's, else /].
    #[arg(long, value_name = "DIR")]
    sysfs_root: Option<PathBuf>,
    /// Time between rows, ms [default: the config's poll_ms].
    #[arg(long, value_name = "MS")]
    interval_ms: Option<u64>,
    /// Stop after this many rows [default: run until interrupted].
    #[arg(long, value_name = "N")]
    count: Option<u64>,
}

/// Reads one column's value from the monitor's last sample.
type Cell = Box<dyn Fn(&Monitor) -> Option<String>>;

/// A column: its header and how to read its value.
struct Column {
    head: String,
    value: Cell,
}

fn col(head: String, value: impl Fn(&Monitor) -> Option<String> + 'static) -> Column {
    Column {
        head,
        value: Box::new(value),
    }
}

/// One column per sensor, named short: `cpu` for `cpu-thermal`, `gpu` for `17000000.gpu`.
fn columns(s: &Sensors) -> Vec<Column> {
    let mut cols = Vec::new();
    for (i, z) in s.zones.iter().enumerate() {
        let name = z.name.strip_suffix("-thermal").unwrap_or(&z.name);
        cols.push(col(format!("{name}°C"), move |m: &Monitor| {
            let mc = m.telemetry().zones.get(i)?.value()?;
            Some(format!("{:.1}", mc as f64 / 1e3))
        }));
    }
    // hwmon temperatures only where there are no zones (x86 coretemp); on boards they repeat
    if s.zones.is_empty() {
        for (i, h) in s.hwmon_temps.iter().enumerate() {
            cols.push(col(format!("{}°C", h.label.replace(' ', "")), move |m| {
                let mc = m.telemetry().hwmon_temps.get(i)?.value()?;
                Some(format!("{:.1}", mc as f64 / 1e3))
            }));
        }
    }
    for (i, r) in s.rails.iter().enumerate() {
        cols.push(col(format!("{}(W)", r.label), move |m| {
            let mw = m.telemetry().rails.get(i)?.mw()?;
            Some(format!("{:.2}", mw as f64 / 1e3))
        }));
    }
    for (i, d) in s.devfreq.iter().enumerate() {
        let name = d.name.rsplit('.').next().unwrap_or(&d.name);
        cols.push(col(format!("{name}(MHz)"), move |m| {
            let hz = m.telemetry().freqs.get(i)?.value()?;
            Some(format!("{}", hz / 1_000_000))
        }));
    }
    for (i, f) in s.fans.iter().enumerate() {
        let name = if s.fans.len() == 1 {
            "fan".to_string()
        } else {
            f.label.replace(' ', "")
        };
        cols.push(col(format!("{name}(rpm)"), move |m| {
            Some(m.telemetry().fans.get(i)?.value()?.to_string())
        }));
    }
    if !s.throttle.is_empty() {
        cols.push(col("oc".into(), |m| {
            Some(m.telemetry().throttle_events().to_string())
        }));
    }
    cols
}

/// `HH:MM:SS` UTC (no time-zone database on the appliance to get local time from).
fn clock() -> String {
    let s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02}", s / 3600 % 24, s / 60 % 60, s % 60)
}

pub fn run(a: ThermalArgs) -> anyhow::Result<()> {
    let mut cfg: BridgeSection = match &a.config {
        Some(p) => Config::load(p)?.bridge,
        None => BridgeSection::default(),
    };
    if let Some(r) = a.sysfs_root {
        cfg.sysfs_root = r;
    }
    let sensors = Sensors::probe(&cfg.sysfs_root);
    let thresholds = cfg
        .thresholds(Thresholds::from_trips(&sensors.zones))
        .map_err(anyhow::Error::msg)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} under {}\nthresholds: warm {:.1} °C, hot {:.1} °C, critical {:.1} °C",
        sensors.describe(),
        cfg.sysfs_root.display(),
        thresholds.warm_mc as f64 / 1e3,
        thresholds.hot_mc as f64 / 1e3,
        thresholds.critical_mc as f64 / 1e3
    )?;
    if sensors.zones.is_empty() && sensors.hwmon_temps.is_empty() {
        anyhow::bail!(
            "no temperature sensors under {} (give --sysfs-root or [bridge] sysfs_root)",
            cfg.sysfs_root.display()
        );
    }
    let cols = columns(&sensors);
    let mut monitor = Monitor::new(
        sensors,
        Controls::default(),
        thresholds,
        cfg.policy(),
        &cfg.watch(),
        Some(cfg.nvpmodel_bin.clone()),
        Instant::now(),
    )
    .context("[bridge]")?;
    if let Some(m) = monitor.power_mode() {
        writeln!(out, "power mode: {} ({})", m.name, m.id)?;
    }
    let interval = Duration::from_millis(a.interval_ms.unwrap_or(cfg.poll_ms).max(10));
    let widths: Vec<usize> = cols.iter().map(|c| c.head.chars().count().max(5)).collect();
    let mut rows = 0u64;
    loop {
        let tick = monitor.tick(Instant::now());
        // a header every 20 rows, as vmstat does, so a scrolled terminal still has one
        let mut text = String::new();
        if rows.is_multiple_of(20) {
            text.push_str(&format!("{:<8} {:<8} {:>6}", "time", "state", "°C"));
            for (c, w) in cols.iter().zip(&widths) {
                text.push_str(&format!(" {:>w$}", c.head));
            }
            text.push('\n');
        }
        let temp = tick
            .watched_mc
            .map_or("-".to_string(), |mc| format!("{:.1}", mc as f64 / 1e3));
        text.push_str(&format!(
            "{:<8} {:<8} {:>6}",
            clock(),
            tick.state.as_str(),
            temp
        ));
        for (c, w) in cols.iter().zip(&widths) {
            let v = (c.value)(&monitor).unwrap_or_else(|| "-".into());
            text.push_str(&format!(" {v:>w$}"));
        }
        text.push('\n');
        // a closed pipe (`| head`) ends the command quietly
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return Ok(());
        }
        rows += 1;
        if a.count.is_some_and(|n| rows >= n) {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}
