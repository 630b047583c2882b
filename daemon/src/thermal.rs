//! The firmware bridge inside the daemon: one dedicated OS thread samples the sensors every
//! `poll_ms`, runs the governor, writes the configured controls, and on each state change
//! hands the new limits to a callback (the scheduler's `set_thermal`) and to a `watch`
//! channel (the MQTT status). Transports read what it saw through a [`ThermalView`]; nothing
//! here knows of MQTT, serial or the engine.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use firmware_bridge::{
    Board, Controls, Limits, Monitor, Sensors, Telemetry, ThermalState, Thresholds,
};
use tokio::sync::watch;

use crate::config::BridgeSection;
use crate::proto::v1;

/// What the sampling thread last saw.
#[derive(Debug, Clone, Default)]
struct Latest {
    state: ThermalState,
    telemetry: Telemetry,
    watched_mc: Option<i64>,
    power_mode: Option<String>,
    cap: Option<f32>,
}

#[derive(Debug)]
struct Inner {
    sensors: Option<Sensors>,
    thresholds: Option<Thresholds>,
    latest: Mutex<Latest>,
    changes: watch::Sender<ThermalState>,
}

/// Read-only access to the bridge's state and last sample (cheap to clone).
#[derive(Debug, Clone)]
pub struct ThermalView(Arc<Inner>);

fn c(mc: i64) -> f32 {
    mc as f32 / 1000.0
}

impl ThermalView {
    /// A view with no sensors behind it: always nominal.
    pub fn none() -> ThermalView {
        ThermalView(Arc::new(Inner {
            sensors: None,
            thresholds: None,
            latest: Mutex::new(Latest::default()),
            changes: watch::channel(ThermalState::Nominal).0,
        }))
    }

    fn latest(&self) -> Latest {
        self.0
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The state now.
    pub fn state(&self) -> ThermalState {
        self.0
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state
    }

    /// A receiver that sees each state change.
    pub fn subscribe(&self) -> watch::Receiver<ThermalState> {
        self.0.changes.subscribe()
    }

    /// One line: `warm, 72.0 °C, 7.2 W` (banners, `/status`, systemd's STATUS).
    pub fn summary(&self) -> String {
        let l = self.latest();
        if self.0.sensors.is_none() {
            return format!("{} (no sensors read)", l.state.as_str());
        }
        let mut s = l.state.as_str().to_string();
        match l.watched_mc {
            Some(mc) => s.push_str(&format!(", {:.1} °C", c(mc))),
            None => s.push_str(", temperature unavailable"),
        }
        if let Some(mw) = l.telemetry.power_mw() {
            s.push_str(&format!(", {:.1} W", mw as f32 / 1000.0));
        }
        if let Some(cap) = l.cap {
            s.push_str(&format!(", decode capped at {cap} tok/s"));
        }
        s
    }

    /// Several lines for the console's `/thermal`: state and thresholds, then each sensor.
    pub fn report(&self) -> String {
        let Some(sensors) = &self.0.sensors else {
            return format!(
                "thermal: {} (no sensors read: [bridge] is off or found nothing)\n",
                self.state().as_str()
            );
        };
        let l = self.latest();
        let mut out = format!("thermal: {}\n", self.summary());
        if let Some(t) = &self.0.thresholds {
            out.push_str(&format!(
                "thresholds: warm {:.1} °C, hot {:.1} °C, critical {:.1} °C (hysteresis {:.1} °C, dwell {} s)\n",
                c(t.warm_mc),
                c(t.hot_mc),
                c(t.critical_mc),
                c(t.hysteresis_mc),
                t.dwell.as_secs_f32()
            ));
        }
        if let Some(m) = &l.power_mode {
            out.push_str(&format!("power mode: {m}\n"));
        }
        for (z, r) in sensors.zones.iter().zip(&l.telemetry.zones) {
            match r.value() {
                Some(mc) => out.push_str(&format!("  {:<22} {:6.1} °C\n", z.name, c(mc))),
                None => out.push_str(&format!("  {:<22} unavailable ({:?})\n", z.name, r)),
            }
        }
        for (h, r) in sensors.hwmon_temps.iter().zip(&l.telemetry.hwmon_temps) {
            if let Some(mc) = r.value() {
                out.push_str(&format!("  {:<22} {:6.1} °C\n", h.label, c(mc)));
            }
        }
        for (rail, r) in sensors.rails.iter().zip(&l.telemetry.rails) {
            if let Some(mw) = r.mw() {
                out.push_str(&format!(
                    "  {:<22} {:6.2} W\n",
                    rail.label,
                    mw as f32 / 1000.0
                ));
            }
        }
        for (d, r) in sensors.devfreq.iter().zip(&l.telemetry.freqs) {
            if let Some(hz) = r.value() {
                out.push_str(&format!("  {:<22} {:6} MHz\n", d.name, hz / 1_000_000));
            }
        }
        for (f, r) in sensors.fans.iter().zip(&l.telemetry.fans) {
            if let Some(rpm) = r.value() {
                out.push_str(&format!("  {:<22} {:6} rpm\n", f.label, rpm));
            }
        }
        if !sensors.throttle.is_empty() {
            out.push_str(&format!(
                "  over-current throttle events: {}\n",
                l.telemetry.throttle_events()
            ));
        }
        out
    }

    /// The telemetry message (`None` without sensors).
    pub fn accelerator(&self) -> Option<v1::Accelerator> {
        let sensors = self.0.sensors.as_ref()?;
        let l = self.latest();
        let t = &l.telemetry;
        let reading = |name: &str, v: f32| v1::Reading {
            name: name.to_string(),
            value: v,
        };
        let th = self.0.thresholds;
        Some(v1::Accelerator {
            board: match sensors.board {
                Board::Jetson => "jetson",
                Board::Rk3588 => "rk3588",
                Board::Generic => "generic",
            }
            .into(),
            temp_c: l.watched_mc.map_or(0.0, c),
            warm_c: th.map_or(0.0, |t| c(t.warm_mc)),
            hot_c: th.map_or(0.0, |t| c(t.hot_mc)),
            critical_c: th.map_or(0.0, |t| c(t.critical_mc)),
            power_w: t.power_mw().map_or(0.0, |mw| mw as f32 / 1000.0),
            temps_c: sensors
                .zones
                .iter()
                .map(|z| z.name.as_str())
                .zip(&t.zones)
                .chain(
                    sensors
                        .hwmon_temps
                        .iter()
                        .map(|h| h.label.as_str())
                        .zip(&t.hwmon_temps),
                )
                .filter_map(|(n, r)| Some(reading(n, c(r.value()?))))
                .collect(),
            rails_w: sensors
                .rails
                .iter()
                .zip(&t.rails)
                .filter_map(|(rail, r)| Some(reading(&rail.label, r.mw()? as f32 / 1000.0)))
                .collect(),
            clocks_mhz: sensors
                .devfreq
                .iter()
                .zip(&t.freqs)
                .filter_map(|(d, r)| Some(reading(&d.name, r.value()? as f32 / 1e6)))
                .collect(),
            fans_rpm: sensors
                .fans
                .iter()
                .zip(&t.fans)
                .filter_map(|(f, r)| Some(reading(&f.label, r.value()? as f32)))
                .collect(),
            cooling: sensors
                .cooling
                .iter()
                .zip(&t.cooling)
                .filter_map(|(d, r)| Some(reading(&d.name, r.value()? as f32)))
                .collect(),
            throttle_events: t.throttle_events().max(0) as u64,
            power_mode: l.power_mode.clone().unwrap_or_default(),
            decode_cap_tok_s: l.cap.unwrap_or(0.0),
        })
    }
}

/// Why the bridge cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ThermalError {
    /// The configuration asks for something the board does not have.
    #[error("[bridge] {0}")]
    Config(String),
    /// The sampling thread could not be started.
    #[error("cannot start the thermal thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// The running sampling thread; [`Bridge::stop`] ends it and puts the controls back.
#[derive(Debug)]
pub struct Bridge {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Bridge {
    /// Stops sampling and restores the controls as found.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let (flag, cv) = &*self.stop;
        *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Called on every state change with the new state, its limits and how long a refused client
/// should wait before trying again.
pub type OnChange = Box<dyn Fn(ThermalState, Limits, Duration) + Send>;

/// Probes `cfg.sysfs_root`, binds the configured controls, and starts sampling. Without
/// sensors (or with `enabled = false`) there is no thread and the view stays nominal.
pub fn start(
    cfg: &BridgeSection,
    on_change: OnChange,
) -> Result<(ThermalView, Option<Bridge>), ThermalError> {
    if !cfg.enabled {
        tracing::info!("thermal bridge off ([bridge] enabled = false)");
        return Ok((ThermalView::none(), None));
    }
    let sensors = Sensors::probe(&cfg.sysfs_root);
    tracing::info!(root = %cfg.sysfs_root.display(), "sensors: {}", sensors.describe());
    if sensors.zones.is_empty() && sensors.hwmon_temps.is_empty() {
        if !cfg.devfreq.is_empty() || cfg.nvpmodel.is_some() {
            return Err(ThermalError::Config(format!(
                "controls are configured but no temperature sensor was found under {}",
                cfg.sysfs_root.display()
            )));
        }
        tracing::warn!(root = %cfg.sysfs_root.display(), "no temperature sensors found: the thermal state stays nominal");
        return Ok((ThermalView::none(), None));
    }
    let thresholds = cfg
        .thresholds(Thresholds::from_trips(&sensors.zones))
        .map_err(ThermalError::Config)?;
    let controls =
        Controls::bind(&sensors, &cfg.plan()).map_err(|e| ThermalError::Config(e.to_string()))?;
    let policy = cfg.policy();
    let mut monitor = Monitor::new(
        sensors.clone(),
        controls,
        thresholds,
        policy,
        &cfg.watch(),
        Some(cfg.nvpmodel_bin.clone()),
        Instant::now(),
    )
    .map_err(|e| ThermalError::Config(e.to_string()))?;
    tracing::info!(
        warm_c = c(thresholds.warm_mc),
        hot_c = c(thresholds.hot_mc),
        critical_c = c(thresholds.critical_mc),
        poll_ms = cfg.poll_ms,
        "thermal bridge on"
    );
    let view = ThermalView(Arc::new(Inner {
        sensors: Some(sensors),
        thresholds: Some(thresholds),
        latest: Mutex::new(Latest {
            power_mode: monitor.power_mode().map(|m| m.name.clone()),
            ..Latest::default()
        }),
        changes: watch::channel(ThermalState::Nominal).0,
    }));
    let stop = Arc::new((Mutex::new(false), Condvar::new()));
    let poll = Duration::from_millis(cfg.poll_ms);
    // a refused client is told to wait at least one dwell (the least time before stepping down)
    let retry = thresholds.dwell.max(poll).max(Duration::from_secs(1));
    let on_change = move |state, limits| on_change(state, limits, retry);
    // the first reading before any transport starts: a board that boots hot takes no work
    tick(&mut monitor, &view, &on_change);
    let (v, s) = (view.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("thermal".into())
        .spawn(move || {
            sample_loop(&mut monitor, &v, &s, poll, &on_change);
            monitor.restore();
        })?;
    Ok((
        view,
        Some(Bridge {
            stop,
            thread: Some(thread),
        }),
    ))
}

/// One sample: the view updated, and on a change the callback and the watch told.
fn tick(monitor: &mut Monitor, view: &ThermalView, on_change: &dyn Fn(ThermalState, Limits)) {
    let tick = monitor.tick(Instant::now());
    {
        let mut l = view.0.latest.lock().unwrap_or_else(|p| p.into_inner());
        l.state = tick.state;
        l.watched_mc = tick.watched_mc;
        // clone_from into fixed-capacity buffers: no allocation per tick
        l.telemetry.clone_from(monitor.telemetry());
        if tick.changed {
            l.power_mode = monitor.power_mode().map(|m| m.name.clone());
            l.cap = monitor.limits().decode_tok_s.filter(|c| *c > 0.0);
        }
    }
    if tick.changed {
        let limits = monitor.limits();
        tracing::warn!(
            state = tick.state.as_str(),
            temp_c = tick.watched_mc.map(c),
            accept = limits.accept,
            decode_cap_tok_s = limits.decode_tok_s,
            "thermal state changed"
        );
        on_change(tick.state, limits);
        view.0.changes.send_replace(tick.state);
    }
}

fn sample_loop(
    monitor: &mut Monitor,
    view: &ThermalView,
    stop: &(Mutex<bool>, Condvar),
    poll: Duration,
    on_change: &dyn Fn(ThermalState, Limits),
) {
    let (flag, cv) = stop;
    let mut next = Instant::now();
    loop {
        next += poll;
        let now = Instant::now();
        if next < now {
            // fell behind (a suspended board): start afresh rather than burst
            next = now + poll;
        }
        let mut stopped = flag.lock().unwrap_or_else(|p| p.into_inner());
        while !*stopped {
            let now = Instant::now();
            if now >= next {
                break;
            }
            stopped = cv
                .wait_timeout(stopped, next - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        if *stopped {
            return;
        }
        drop(stopped);
        tick(monitor, view, on_change);
    }
}
