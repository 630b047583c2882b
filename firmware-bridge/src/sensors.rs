//! What a sysfs root offers, found once at start-up (this allocates), and sampling it (this
//! does not: paths are ready, values land in fixed-capacity buffers).

use std::path::{Path, PathBuf};

use crate::read::{self, Reading};

/// Most entries of each kind kept; more are ignored (and logged at probe).
pub const MAX_ENTRIES: usize = 32;

/// Which board the tree looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Board {
    /// NVIDIA Jetson (Orin): tegra zones, INA3221 rails, GPU devfreq, nvpmodel.
    Jetson,
    /// Rockchip RK3588: NPU devfreq.
    Rk3588,
    /// Anything else with Linux thermal/hwmon/devfreq.
    Generic,
}

/// Kind of a trip point, as the kernel names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TripKind {
    /// Fans.
    Active,
    /// The kernel starts throttling.
    Passive,
    /// Userspace is warned.
    Hot,
    /// The kernel shuts down.
    Critical,
}

/// One trip point of a zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trip {
    /// Its kind.
    pub kind: TripKind,
    /// Temperature, m°C.
    pub temp_mc: i64,
    /// Hysteresis, m°C (0 when the zone has none).
    pub hyst_mc: i64,
}

/// A thermal zone.
#[derive(Debug, Clone)]
pub struct Zone {
    /// Its `type` (`cpu-thermal`, `soc-thermal`, `x86_pkg_temp`).
    pub name: String,
    temp: PathBuf,
    /// Its trip points (unusable ones, such as a 0 °C trip, left out).
    pub trips: Vec<Trip>,
}

/// A named value file (hwmon temperature, fan, counter).
#[derive(Debug, Clone)]
pub struct Channel {
    /// Label, or the hwmon name and channel.
    pub label: String,
    path: PathBuf,
}

/// A power rail (INA3221 channel).
#[derive(Debug, Clone)]
pub struct Rail {
    /// `in*_label`.
    pub label: String,
    voltage: PathBuf,
    current: PathBuf,
}

/// A devfreq device (GPU, NPU).
#[derive(Debug, Clone)]
pub struct Devfreq {
    /// Its directory name (`17000000.gpu`, `fdab0000.npu`).
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// `available_frequencies`, Hz, ascending.
    pub available: Vec<i64>,
    cur: PathBuf,
}

/// A cooling device (fan, passive throttle) the kernel drives.
#[derive(Debug, Clone)]
pub struct Cooling {
    /// Its `type` (`pwm-fan`, `Processor`).
    pub name: String,
    /// `max_state`.
    pub max_state: i64,
    cur: PathBuf,
}

/// Everything found under a sysfs root.
#[derive(Debug, Clone)]
pub struct Sensors {
    /// The board.
    pub board: Board,
    /// Thermal zones.
    pub zones: Vec<Zone>,
    /// hwmon temperatures (m°C).
    pub hwmon_temps: Vec<Channel>,
    /// Power rails.
    pub rails: Vec<Rail>,
    /// Fans (rpm).
    pub fans: Vec<Channel>,
    /// Devfreq devices.
    pub devfreq: Vec<Devfreq>,
    /// Over-current throttle event counters.
    pub throttle: Vec<Channel>,
    /// Cooling devices.
    pub cooling: Vec<Cooling>,
}

/// One rail's reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RailReading {
    /// mV.
    pub mv: Reading<i64>,
    /// mA.
    pub ma: Reading<i64>,
}

impl RailReading {
    /// Power in mW, when both halves were read.
    pub fn mw(&self) -> Option<i64> {
        Some(self.mv.value()? * self.ma.value()? / 1000)
    }
}

/// One sample of everything, index-aligned with `Sensors`' lists. Fixed capacity: sampling
/// never allocates.
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    /// Zone temperatures, m°C.
    pub zones: heapless::Vec<Reading<i64>, MAX_ENTRIES>,
    /// hwmon temperatures, m°C.
    pub hwmon_temps: heapless::Vec<Reading<i64>, MAX_ENTRIES>,
    /// Rails.
    pub rails: heapless::Vec<RailReading, MAX_ENTRIES>,
    /// Fans, rpm.
    pub fans: heapless::Vec<Reading<i64>, MAX_ENTRIES>,
    /// Devfreq `cur_freq`, Hz.
    pub freqs: heapless::Vec<Reading<i64>, MAX_ENTRIES>,
    /// Throttle counters.
    pub throttle: heapless::Vec<Reading<i64>, MAX_ENTRIES>,
    /// Cooling devices' `cur_state`.
    pub cooling: heapless::Vec<Reading<i64>, MAX_ENTRIES>,
}

impl Telemetry {
    /// The hottest temperature read, m°C (zones and hwmon alike).
    pub fn hottest_mc(&self) -> Option<i64> {
        self.zones
            .iter()
            .chain(self.hwmon_temps.iter())
            .filter_map(|r| r.value())
            .max()
    }

    /// Total power of the rails that were read, mW (the board input when it is a rail).
    pub fn power_mw(&self) -> Option<i64> {
        self.rails.first().and_then(RailReading::mw)
    }

    /// Over-current throttle events counted so far, all counters together.
    pub fn throttle_events(&self) -> i64 {
        self.throttle.iter().filter_map(|r| r.value()).sum()
    }
}

fn sorted_dirs(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name.strip_prefix(prefix)?.parse::<u64>().ok()?;
            Some((n, e.path()))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

fn trips(zone: &Path) -> Vec<Trip> {
    let mut out = Vec::new();
    for i in 0..16 {
        let Ok(kind) = read::text(&zone.join(format!("trip_point_{i}_type"))) else {
            continue;
        };
        let kind = match kind.as_str() {
            "active" => TripKind::Active,
            "passive" => TripKind::Passive,
            "hot" => TripKind::Hot,
            "critical" => TripKind::Critical,
            _ => continue,
        };
        let Reading::Value(temp_mc) = read::int(&zone.join(format!("trip_point_{i}_temp"))) else {
            continue;
        };
        // x86_pkg_temp and friends report unprogrammed trips as 0 °C
        if temp_mc <= 0 {
            continue;
        }
        let hyst_mc = read::int(&zone.join(format!("trip_point_{i}_hyst")))
            .value()
            .unwrap_or(0);
        out.push(Trip {
            kind,
            temp_mc,
            hyst_mc,
        });
    }
    out
}

impl Zone {
    /// A zone without a file behind it (governor tests).
    #[doc(hidden)]
    pub fn for_tests(name: &str, trips: Vec<Trip>) -> Zone {
        Zone {
            name: name.into(),
            temp: PathBuf::new(),
            trips,
        }
    }
}

impl Sensors {
    /// Probes `root` (`/` on a device): every zone, hwmon chip and devfreq device it has.
    pub fn probe(root: &Path) -> Sensors {
        let sys = root.join("sys/class");
        let zones: Vec<Zone> = sorted_dirs(&sys.join("thermal"), "thermal_zone")
            .into_iter()
            .filter_map(|z| {
                let name = read::text(&z.join("type")).ok()?.to_string();
                Some(Zone {
                    trips: trips(&z),
                    temp: z.join("temp"),
                    name,
                })
            })
            .take(MAX_ENTRIES)
            .collect();
        let mut hwmon_temps = Vec::new();
        let mut rails = Vec::new();
        let mut fans = Vec::new();
        let mut throttle = Vec::new();
        for h in sorted_dirs(&sys.join("hwmon"), "hwmon") {
            let chip = read::text(&h.join("name"))
                .map(|s| s.to_string())
                .unwrap_or_else(|_| "hwmon".into());
            let label = |n: String, fallback: String| -> String {
                read::text(&h.join(n))
                    .map(|s| s.to_string())
                    .unwrap_or(fallback)
            };
            if chip.starts_with("ina3221") {
                for n in 1..=8 {
                    let v = h.join(format!("in{n}_input"));
                    if !v.exists() {
                        continue;
                    }
                    let l = label(format!("in{n}_label"), format!("{chip} in{n}"));
                    // the sum channel adds the others up: counting it would double the power
                    if l.to_ascii_lowercase().starts_with("sum") {
                        continue;
                    }
                    rails.push(Rail {
                        label: l,
                        voltage: v,
                        current: h.join(format!("curr{n}_input")),
                    });
                }
                continue;
            }
            if chip == "soctherm_oc" {
                for n in 1..=8 {
                    let p = h.join(format!("oc{n}_event_cnt"));
                    if p.exists() {
                        throttle.push(Channel {
                            label: format!("oc{n}"),
                            path: p,
                        });
                    }
                }
                continue;
            }
            for n in 1..=16 {
                let t = h.join(format!("temp{n}_input"));
                if t.exists() {
                    hwmon_temps.push(Channel {
                        label: label(format!("temp{n}_label"), format!("{chip} temp{n}")),
                        path: t,
                    });
                }
                let f = h.join(format!("fan{n}_input"));
                if f.exists() {
                    fans.push(Channel {
                        label: label(format!("fan{n}_label"), format!("{chip} fan{n}")),
                        path: f,
                    });
                }
            }
            // Jetson's tachometer
            if h.join("rpm").exists() {
                fans.push(Channel {
                    label: chip.clone(),
                    path: h.join("rpm"),
                });
            }
        }
        let cooling: Vec<Cooling> = sorted_dirs(&sys.join("thermal"), "cooling_device")
            .into_iter()
            .filter_map(|c| {
                Some(Cooling {
                    name: read::text(&c.join("type")).ok()?.to_string(),
                    max_state: read::int(&c.join("max_state")).value().unwrap_or(0),
                    cur: c.join("cur_state"),
                })
            })
            .take(MAX_ENTRIES)
            .collect();
        let devfreq: Vec<Devfreq> = std::fs::read_dir(sys.join("devfreq"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("cur_freq").exists())
            .map(|e| {
                let dir = e.path();
                let mut available =
                    read::list(&dir.join("available_frequencies")).unwrap_or_default();
                available.sort_unstable();
                Devfreq {
                    name: e.file_name().to_string_lossy().into_owned(),
                    cur: dir.join("cur_freq"),
                    dir,
                    available,
                }
            })
            .collect();
        let board = if root.join("etc/nv_tegra_release").exists()
            || zones.iter().any(|z| z.name == "tj-thermal")
        {
            Board::Jetson
        } else if devfreq.iter().any(|d| d.name == "fdab0000.npu") {
            Board::Rk3588
        } else {
            Board::Generic
        };
        let mut devfreq = devfreq;
        devfreq.sort_by(|a, b| a.name.cmp(&b.name));
        Sensors {
            board,
            zones,
            hwmon_temps: hwmon_temps.into_iter().take(MAX_ENTRIES).collect(),
            rails: rails.into_iter().take(MAX_ENTRIES).collect(),
            fans: fans.into_iter().take(MAX_ENTRIES).collect(),
            devfreq: devfreq.into_iter().take(MAX_ENTRIES).collect(),
            throttle: throttle.into_iter().take(MAX_ENTRIES).collect(),
            cooling,
        }
    }

    /// One line per kind of sensor, for the start-up log.
    pub fn describe(&self) -> String {
        let names = |v: &mut dyn Iterator<Item = &str>| v.collect::<Vec<_>>().join(", ");
        format!(
            "board {:?}; zones [{}]; rails [{}]; devfreq [{}]; cooling [{}]; {} hwmon temperatures, {} fans, {} throttle counters",
            self.board,
            names(&mut self.zones.iter().map(|z| z.name.as_str())),
            names(&mut self.rails.iter().map(|r| r.label.as_str())),
            names(&mut self.devfreq.iter().map(|d| d.name.as_str())),
            names(&mut self.cooling.iter().map(|c| c.name.as_str())),
            self.hwmon_temps.len(),
            self.fans.len(),
            self.throttle.len()
        )
    }

    /// Reads every sensor into `t` (cleared first). Allocates nothing.
    pub fn sample(&self, t: &mut Telemetry) {
        fn fill<I: Iterator<Item = Reading<i64>>, const N: usize>(
            out: &mut heapless::Vec<Reading<i64>, N>,
            it: I,
        ) {
            out.clear();
            for r in it {
                if out.push(r).is_err() {
                    break;
                }
            }
        }
        fill(&mut t.zones, self.zones.iter().map(|z| read::int(&z.temp)));
        fill(
            &mut t.hwmon_temps,
            self.hwmon_temps.iter().map(|c| read::int(&c.path)),
        );
        fill(&mut t.fans, self.fans.iter().map(|c| read::int(&c.path)));
        fill(
            &mut t.throttle,
            self.throttle.iter().map(|c| read::int(&c.path)),
        );
        fill(&mut t.freqs, self.devfreq.iter().map(|d| read::int(&d.cur)));
        fill(
            &mut t.cooling,
            self.cooling.iter().map(|c| read::int(&c.cur)),
        );
        t.rails.clear();
        for r in &self.rails {
            let _ = t.rails.push(RailReading {
                mv: read::int(&r.voltage),
                ma: read::int(&r.current),
            });
        }
    }
}
