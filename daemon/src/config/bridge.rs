//! `[bridge]`: where the accelerator's sensors are, how often to read them, the thermal
//! thresholds and per-state limits, and the controls the bridge may write (DESIGN.md section 6).

use std::path::PathBuf;
use std::time::Duration;

use firmware_bridge::{DevfreqPlan, NvpmodelPlan, PerState, Plan, Policy, Thresholds, Watch};
use serde::{Deserialize, Deserializer};

/// `[bridge]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeSection {
    /// Read sensors at all (off: always nominal).
    pub enabled: bool,
    /// The root that holds `sys/class/...` (`/` on a device; a directory tree in tests).
    pub sysfs_root: PathBuf,
    /// Sampling period, ms.
    #[serde(deserialize_with = "poll_ms")]
    pub poll_ms: u64,
    /// Warm from here, °C (default: 10 °C below `hot_c`).
    #[serde(deserialize_with = "celsius_opt")]
    pub warm_c: Option<f64>,
    /// Hot from here, °C (default: the zones' lowest passive trip point, else 95).
    #[serde(deserialize_with = "celsius_opt")]
    pub hot_c: Option<f64>,
    /// Critical from here, °C (default: 5 °C below the lowest critical trip point, else 105).
    #[serde(deserialize_with = "celsius_opt")]
    pub critical_c: Option<f64>,
    /// How far below a threshold the temperature must fall to leave its state, °C.
    #[serde(deserialize_with = "non_negative")]
    pub hysteresis_c: f64,
    /// Least time in a state before stepping down, seconds.
    #[serde(deserialize_with = "non_negative")]
    pub dwell_s: f64,
    /// Watch only these zones (by `type`); empty: every temperature.
    pub zones: Vec<String>,
    /// Decode rate cap per answer when warm (and hot), tokens/s.
    #[serde(deserialize_with = "positive_f32")]
    pub warm_decode_tok_s: f32,
    /// Answers generated at once when warm.
    #[serde(deserialize_with = "super::positive")]
    pub warm_max_running: usize,
    /// The `nvpmodel` binary (Jetson power modes).
    pub nvpmodel_bin: PathBuf,
    /// `[[bridge.devfreq]]`: devfreq devices to drive.
    pub devfreq: Vec<DevfreqSection>,
    /// `[bridge.nvpmodel]`: power modes per state.
    pub nvpmodel: Option<NvpmodelSection>,
}

impl Default for BridgeSection {
    fn default() -> Self {
        BridgeSection {
            enabled: true,
            sysfs_root: PathBuf::from("/"),
            poll_ms: 1000,
            warm_c: None,
            hot_c: None,
            critical_c: None,
            hysteresis_c: 3.0,
            dwell_s: 10.0,
            zones: Vec::new(),
            warm_decode_tok_s: 10.0,
            warm_max_running: 1,
            nvpmodel_bin: PathBuf::from("/usr/sbin/nvpmodel"),
            devfreq: Vec::new(),
            nvpmodel: None,
        }
    }
}

/// `[[bridge.devfreq]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevfreqSection {
    /// Directory name under `/sys/class/devfreq` (`17000000.gpu`, `fdab0000.npu`).
    pub device: String,
    /// Governor to set at start (the old one is put back at stop).
    pub governor: Option<String>,
    /// `max_freq` when warm, Hz (one of `available_frequencies`).
    pub warm_max_hz: Option<i64>,
    /// `max_freq` when hot (default: warm's).
    pub hot_max_hz: Option<i64>,
    /// `max_freq` when critical (default: hot's).
    pub critical_max_hz: Option<i64>,
}

/// `[bridge.nvpmodel]`: mode numbers (`nvpmodel -m N`) per state; nominal is the mode found at
/// start.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NvpmodelSection {
    /// When warm.
    pub warm: Option<u32>,
    /// When hot (default: warm's).
    pub hot: Option<u32>,
    /// When critical (default: hot's).
    pub critical: Option<u32>,
}

fn mc(c: f64) -> i64 {
    (c * 1000.0).round() as i64
}

impl BridgeSection {
    /// The thresholds: those set here, the rest from the zones' trip points (`defaults`).
    pub fn thresholds(&self, defaults: Thresholds) -> Result<Thresholds, String> {
        let hot = self.hot_c.map_or(defaults.hot_mc, mc);
        let t = Thresholds {
            warm_mc: self.warm_c.map_or(hot - 10_000, mc),
            hot_mc: hot,
            critical_mc: self.critical_c.map_or(defaults.critical_mc, mc),
            hysteresis_mc: mc(self.hysteresis_c),
            dwell: Duration::from_secs_f64(self.dwell_s),
        };
        if !(t.warm_mc < t.hot_mc && t.hot_mc < t.critical_mc) {
            return Err(format!(
                "[bridge] thresholds must rise: warm {:.1} °C < hot {:.1} °C < critical {:.1} °C (unset ones come from the zones' trip points)",
                t.warm_mc as f64 / 1e3,
                t.hot_mc as f64 / 1e3,
                t.critical_mc as f64 / 1e3
            ));
        }
        Ok(t)
    }

    /// Per-state limits.
    pub fn policy(&self) -> Policy {
        Policy {
            warm_decode_tok_s: self.warm_decode_tok_s,
            warm_max_running: self.warm_max_running,
        }
    }

    /// Which temperatures the governor judges.
    pub fn watch(&self) -> Watch {
        if self.zones.is_empty() {
            Watch::All
        } else {
            Watch::Zones(self.zones.clone())
        }
    }

    /// The controls to bind.
    pub fn plan(&self) -> Plan {
        Plan {
            devfreq: self
                .devfreq
                .iter()
                .map(|d| DevfreqPlan {
                    device: d.device.clone(),
                    governor: d.governor.clone(),
                    max_hz: PerState {
                        warm: d.warm_max_hz,
                        hot: d.hot_max_hz,
                        critical: d.critical_max_hz,
                    },
                })
                .collect(),
            nvpmodel: self.nvpmodel.as_ref().map(|n| NvpmodelPlan {
                bin: self.nvpmodel_bin.clone(),
                modes: PerState {
                    warm: n.warm,
                    hot: n.hot,
                    critical: n.critical,
                },
            }),
        }
    }

    /// Rules that span keys.
    pub(super) fn check(&self) -> Result<(), String> {
        let set: Vec<f64> = [self.warm_c, self.hot_c, self.critical_c]
            .into_iter()
            .flatten()
            .collect();
        if set.windows(2).any(|w| w[0] >= w[1]) {
            return Err("[bridge] warm_c < hot_c < critical_c, where set".into());
        }
        for (i, d) in self.devfreq.iter().enumerate() {
            if self.devfreq[..i].iter().any(|e| e.device == d.device) {
                return Err(format!("[[bridge.devfreq]] {} is listed twice", d.device));
            }
        }
        Ok(())
    }
}

fn finite<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if !v.is_finite() {
        return Err(serde::de::Error::custom("must be a finite number"));
    }
    Ok(v)
}

fn celsius_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let v = finite(d)?;
    if !(-40.0..=200.0).contains(&v) {
        return Err(serde::de::Error::custom(
            "must be in °C, between -40 and 200",
        ));
    }
    Ok(Some(v))
}

fn non_negative<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = finite(d)?;
    if v < 0.0 {
        return Err(serde::de::Error::custom("must be at least 0"));
    }
    Ok(v)
}

fn positive_f32<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    let v = finite(d)?;
    if v <= 0.0 {
        return Err(serde::de::Error::custom("must be more than 0"));
    }
    Ok(v as f32)
}

fn poll_ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = u64::deserialize(d)?;
    if !(10..=60_000).contains(&v) {
        return Err(serde::de::Error::custom("must be between 10 and 60000 ms"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn bridge_keys_parse_and_bad_ones_are_named() {
        let c = Config::parse(
            "[bridge]\nsysfs_root = \"/tmp/x\"\npoll_ms = 100\nhot_c = 80\ndwell_s = 0.5\n\n\
             [[bridge.devfreq]]\ndevice = \"17000000.gpu\"\nwarm_max_hz = 510000000\n\n\
             [bridge.nvpmodel]\nhot = 1\n",
        )
        .unwrap();
        let b = &c.bridge;
        assert_eq!((b.poll_ms, b.hot_c, b.dwell_s), (100, Some(80.0), 0.5));
        let plan = b.plan();
        assert_eq!(plan.devfreq[0].max_hz.warm, Some(510_000_000));
        assert_eq!(plan.nvpmodel.unwrap().modes.hot, Some(1));
        let th = b
            .thresholds(firmware_bridge::Thresholds::from_trips(&[]))
            .unwrap();
        assert_eq!(
            (th.warm_mc, th.hot_mc, th.critical_mc),
            (70_000, 80_000, 105_000)
        );
        let err = |t: &str| Config::parse(t).unwrap_err();
        let e = err("[bridge]\nhot_c = nan\n");
        assert!(e.contains("hot_c") && e.contains("finite"), "{e}");
        let e = err("[bridge]\npoll_ms = 1\n");
        assert!(e.contains("poll_ms") && e.contains("10 and 60000"), "{e}");
        let e = err("[bridge]\nwarm_c = 90\nhot_c = 80\n");
        assert!(e.contains("warm_c < hot_c"), "{e}");
        let e = err("[bridge]\nwarm_decode_tok_s = 0\n");
        assert!(e.contains("more than 0"), "{e}");
        let e = err("[[bridge.devfreq]]\ndevice = \"a\"\nmax = 3\n");
        assert!(e.contains("unknown field") && e.contains("max"), "{e}");
        // the defaults from trip points can still cross a threshold set here
        let c = Config::parse("[bridge]\nhot_c = 110\n").unwrap();
        assert!(
            c.bridge
                .thresholds(firmware_bridge::Thresholds::from_trips(&[]))
                .is_err()
        );
    }
}
