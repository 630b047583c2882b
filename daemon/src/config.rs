//! One TOML file (DESIGN.md section 9). Every key has a default; an unknown key or a bad value
//! stops start-up with the file, the line and the key named (checks run inside the TOML
//! deserializer, so its errors carry the position).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[model]`.
    pub model: ModelSection,
    /// `[mqtt]`.
    pub mqtt: MqttSection,
    /// `[limits]`.
    pub limits: LimitsSection,
}

/// `[model]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Package or artifact directory (default: see `paths::default_model_dir`).
    pub path: Option<PathBuf>,
    /// tract threads per engine worker.
    #[serde(deserialize_with = "positive")]
    pub threads: usize,
    /// Engine workers (answers generated at once).
    #[serde(deserialize_with = "positive")]
    pub slots: usize,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: None,
            threads: 2,
            slots: 1,
        }
    }
}

/// `[mqtt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    /// `mqtt://HOST:PORT`.
    #[serde(deserialize_with = "broker_url")]
    pub broker: Broker,
    /// This appliance's name in topics (default: the hostname).
    #[serde(deserialize_with = "topic_level_opt")]
    pub node_id: Option<String>,
    /// Topic prefix.
    #[serde(deserialize_with = "topic_prefix")]
    pub prefix: String,
    /// Shared-subscription group of the fleet topic.
    #[serde(deserialize_with = "topic_level")]
    pub group: String,
    /// Broker login.
    pub username: Option<String>,
    /// Broker password.
    pub password: Option<String>,
    /// MQTT keep-alive, seconds.
    #[serde(deserialize_with = "positive_u64")]
    pub keepalive_s: u64,
    /// Period of the telemetry message, seconds.
    #[serde(deserialize_with = "positive_u64")]
    pub telemetry_s: u64,
}

impl Default for MqttSection {
    fn default() -> Self {
        MqttSection {
            broker: Broker {
                host: "127.0.0.1".into(),
                port: 1883,
            },
            node_id: None,
            prefix: "fieldllm/v1".into(),
            group: "fieldllm".into(),
            username: None,
            password: None,
            keepalive_s: 30,
            telemetry_s: 10,
        }
    }
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Jobs waiting before new ones get `busy`.
    #[serde(deserialize_with = "positive")]
    pub queue: usize,
    /// Most bytes of prompt text.
    #[serde(deserialize_with = "positive")]
    pub max_prompt_bytes: usize,
    /// Most tokens per answer (and the default).
    #[serde(deserialize_with = "positive_u32")]
    pub max_tokens: u32,
    /// Most bytes of one request message; larger ones get `too_large`.
    #[serde(deserialize_with = "positive")]
    pub max_payload_bytes: usize,
    /// Seconds in-flight answers get to finish on SIGTERM before they are cancelled.
    pub grace_s: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            queue: 16,
            max_prompt_bytes: 8192,
            max_tokens: 512,
            max_payload_bytes: 65536,
            grace_s: 10,
        }
    }
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// What and where (the TOML error names line, column and key).
    pub message: String,
}

impl Config {
    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Config::parse(&text).map_err(|message| ConfigError {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses and checks TOML text.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }
}

fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let v = usize::deserialize(d)?;
    if v == 0 {
        return Err(serde::de::Error::custom("must be at least 1"));
    }
    Ok(v)
}

fn positive_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u32::deserialize(d)?;
    if v == 0 {
        return Err(serde::de::Error::custom("must be at least 1"));
    }
    Ok(v)
}

fn positive_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = u64::deserialize(d)?;
    if v == 0 {
        return Err(serde::de::Error::custom("must be at least 1"));
    }
    Ok(v)
}

/// Parses `mqtt://HOST[:PORT]`.
pub fn parse_broker(s: &str) -> Result<Broker, String> {
    let rest = s
        .strip_prefix("mqtt://")
        .ok_or_else(|| format!("broker {s:?} must look like mqtt://HOST:PORT"))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("broker port {p:?} is not a port number"))?,
        ),
        None => (rest, 1883),
    };
    if host.is_empty() || port == 0 {
        return Err(format!("broker {s:?} must look like mqtt://HOST:PORT"));
    }
    Ok(Broker {
        host: host.trim_matches(['[', ']']).to_string(),
        port,
    })
}

fn broker_url<'de, D: Deserializer<'de>>(d: D) -> Result<Broker, D::Error> {
    parse_broker(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

/// Checks a string that becomes one MQTT topic level.
pub fn check_topic_level(s: &str) -> Result<(), String> {
    if s.is_empty() || s.chars().any(|c| matches!(c, '/' | '+' | '#' | '\0')) {
        return Err(format!(
            "{s:?} must be a non-empty topic level without / + # or NUL"
        ));
    }
    Ok(())
}

fn topic_level<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    check_topic_level(&s).map_err(serde::de::Error::custom)?;
    Ok(s)
}

fn topic_level_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    topic_level(d).map(Some)
}

fn topic_prefix<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty()
        || s.starts_with('/')
        || s.ends_with('/')
        || s.split('/').any(|l| check_topic_level(l).is_err())
    {
        return Err(serde::de::Error::custom(format!(
            "prefix {s:?} must be topic levels joined by /, without + # or NUL"
        )));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(
            c.mqtt.broker,
            Broker {
                host: "127.0.0.1".into(),
                port: 1883
            }
        );
        assert_eq!((c.limits.queue, c.model.threads, c.model.slots), (16, 2, 1));
    }

    #[test]
    fn the_design_example_parses() {
        let c = Config::parse(
            "[model]\npath = \"/usr/share/fieldllm/models/smollm2-135m-instruct\"\nthreads = 2\n\n\
             [mqtt]\nbroker = \"mqtt://10.0.0.5:8883\"\nnode_id = \"hangar-3\"\nprefix = \"fieldllm/v1\"\ngroup = \"fieldllm\"\n\n\
             [limits]\nqueue = 16\nmax_prompt_bytes = 8192\nmax_tokens = 512\n",
        )
        .unwrap();
        assert_eq!(c.mqtt.broker.port, 8883);
        assert_eq!(c.mqtt.node_id.as_deref(), Some("hangar-3"));
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err()
    }

    #[test]
    fn errors_name_line_and_key() {
        let e = err("[model]\nthreads = 2\ntreads = 3\n");
        assert!(e.contains("line 3") && e.contains("treads"), "{e}");
        let e = err("[limits]\nqueue = 0\n");
        assert!(
            e.contains("line 2") && e.contains("queue") && e.contains("at least 1"),
            "{e}"
        );
        let e = err("[mqtt]\nbroker = \"http://x\"\n");
        assert!(e.contains("line 2") && e.contains("mqtt://"), "{e}");
        let e = err("[mqtt]\nnode_id = \"a/b\"\n");
        assert!(e.contains("line 2") && e.contains("node_id"), "{e}");
        let e = err("[limits]\nmax_tokens = \"many\"\n");
        assert!(e.contains("line 2") && e.contains("max_tokens"), "{e}");
        let e = err("[serial_ports]\n");
        assert!(e.contains("serial_ports"), "{e}");
    }
}
