//! One TOML file (DESIGN.md section 9). Every key has a default; an unknown key or a bad value
//! stops start-up with the file, the line and the key named (checks run inside the TOML
//! deserializer, so its errors carry the position).

use std::path::{Path, PathBuf};

use fieldllm_engine::attention::KvCache;
use fieldllm_engine::ggml::Activations;
use serde::{Deserialize, Deserializer};

mod bridge;

pub use bridge::{BridgeSection, DevfreqSection, NvpmodelSection};

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
    /// `[[serial]]`: one table per port.
    pub serial: Vec<SerialSection>,
    /// `[bridge]`.
    pub bridge: BridgeSection,
    /// `[docs]`.
    pub docs: DocsSection,
}

/// `[docs]`: the document library answers are grounded on (DESIGN.md section 10).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DocsSection {
    /// Answer from the index when a request asks (`docs: true`) and at the console; false:
    /// such requests are refused and the embedding model is never loaded.
    pub enabled: bool,
    /// Index directory (default: `docs` under the service's state directory, see
    /// `paths::default_docs_index`).
    pub index: Option<PathBuf>,
    /// Embedding model package (default: see `paths::default_embedder_dir`).
    pub embedder: Option<PathBuf>,
    /// Passages put in the prompt, at most.
    #[serde(deserialize_with = "positive")]
    pub passages: usize,
    /// Cosine similarity the best passage must reach, 0..1; below it the answer is
    /// `not_covered`.
    #[serde(deserialize_with = "unit_interval")]
    pub min_similarity: f32,
    /// How the passages are put to the model.
    pub style: crate::docs::ground::Style,
}

impl Default for DocsSection {
    fn default() -> Self {
        let g = crate::docs::ground::Settings::default();
        DocsSection {
            enabled: true,
            index: None,
            embedder: None,
            passages: g.passages,
            min_similarity: g.min_similarity,
            style: g.style,
        }
    }
}

impl DocsSection {
    /// The grounding settings it sets.
    pub fn settings(&self) -> crate::docs::ground::Settings {
        crate::docs::ground::Settings {
            passages: self.passages,
            min_similarity: self.min_similarity,
            style: self.style,
        }
    }
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
    /// Answers generated at once (decoded together: one pass over the weights per step).
    #[serde(deserialize_with = "positive")]
    pub slots: usize,
    /// Whether the running answers share one state and are decoded together (one weight pass
    /// per step for all of them). `false` gives each answer a state of its own, each reading
    /// every weight per token: the way before batching, kept to compare and to fall back on.
    pub batch: bool,
    /// The most memory the running answers' KV caches may take, in MB: each running answer
    /// reserves what its prompt and `max_tokens` can fill; a request that does not fit beside
    /// the running ones waits in the queue.
    #[serde(deserialize_with = "positive")]
    pub kv_memory_mb: usize,
    /// The most tokens one conversation holds (its KV cache grows to this): default the
    /// model's own context, at most `fieldllm_engine::graph::DEFAULT_CONTEXT`; more than the
    /// model's own is refused at load.
    #[serde(deserialize_with = "positive_option")]
    pub context: Option<usize>,
    /// How the matrix products quantize their activations: "8bit" (llama.cpp's arithmetic,
    /// the fastest) or "precise" (~15 bits into the attention projections and the LM head:
    /// closer to the f32 model, slower; docs/performance.md measures both).
    #[serde(deserialize_with = "activations")]
    pub activations: Activations,
    /// What the KV caches keep keys and values as: "f16" (llama.cpp's default: half the memory
    /// and half the attention's reads; keys and values rounded to 11 bits) or "f32".
    #[serde(deserialize_with = "kv_cache")]
    pub kv_cache: KvCache,
}

impl ModelSection {
    /// `kv_memory_mb` in bytes.
    pub fn kv_memory_bytes(&self) -> u64 {
        self.kv_memory_mb as u64 * 1_000_000
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: None,
            threads: 2,
            slots: 4,
            batch: true,
            kv_memory_mb: 1024,
            context: None,
            activations: Activations::default(),
            kv_cache: KvCache::default(),
        }
    }
}

/// `[mqtt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    /// `"embedded"`, `mqtt://HOST:PORT` or `mqtts://HOST:PORT`.
    #[serde(deserialize_with = "broker_setting")]
    pub broker: BrokerSetting,
    /// Where the embedded broker listens (MQTT 3.1.1; only with `broker = "embedded"`).
    pub embedded_listen: std::net::SocketAddr,
    /// MQTT version spoken to the broker: 5, or 3.1.1 for old brokers.
    pub protocol: Protocol,
    /// `[mqtt.tls]`, for `mqtts://` brokers.
    pub tls: TlsSection,
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
    /// Answer messages held while the broker is away; beyond that the oldest are dropped.
    #[serde(deserialize_with = "positive")]
    pub hold: usize,
}

impl Default for MqttSection {
    fn default() -> Self {
        MqttSection {
            broker: BrokerSetting::Embedded,
            embedded_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 1883)),
            protocol: Protocol::V5,
            tls: TlsSection::default(),
            node_id: None,
            prefix: "fieldllm/v1".into(),
            group: "fieldllm".into(),
            username: None,
            password: None,
            keepalive_s: 30,
            telemetry_s: 10,
            hold: 1024,
        }
    }
}

/// `[mqtt.tls]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// PEM file of the CA(s) that sign the broker's certificate.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for brokers that ask for one.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
}

/// Which broker to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerSetting {
    /// Start one in-process (rumqttd) on `embedded_listen` and use it.
    Embedded,
    /// An outside broker.
    Url(Broker),
}

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    /// MQTT 5: response topic, correlation data, content type.
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1: answers go to the default response topic; payloads are told apart by
    /// their first byte.
    #[serde(rename = "3.1.1")]
    V311,
}

/// Where an outside broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `mqtts://`: TLS.
    pub tls: bool,
}

impl std::fmt::Display for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// `[[serial]]`: one serial port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSection {
    /// Device path (`/dev/ttyUSB0`, `/dev/ttyAMA0`, a pty's link).
    pub path: PathBuf,
    /// Line speed; 8 data bits, no parity, 1 stop bit.
    #[serde(default = "default_baud", deserialize_with = "baud")]
    pub baud: u32,
    /// `console` (a technician's terminal) or `framed` (a device speaking COBS frames).
    pub mode: SerialMode,
    /// Scheduler priority of its requests (default: high for a console, normal for framed).
    #[serde(default)]
    pub priority: Option<PriorityName>,
}

fn default_baud() -> u32 {
    115_200
}

fn baud<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u32::deserialize(d)?;
    if !(50..=4_000_000).contains(&v) {
        return Err(serde::de::Error::custom(format!(
            "baud {v} is not a serial line speed (50 to 4000000)"
        )));
    }
    Ok(v)
}

/// What speaks on a serial port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialMode {
    /// A person at picocom, minicom or screen.
    Console,
    /// A machine speaking the framed protocol.
    Framed,
}

/// A scheduler priority, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PriorityName {
    /// Background.
    Low,
    /// Default.
    Normal,
    /// Ahead of the rest.
    High,
}

impl SerialSection {
    /// The priority of this port's requests.
    pub fn priority(&self) -> crate::scheduler::Priority {
        use crate::scheduler::Priority;
        match (self.priority, self.mode) {
            (Some(PriorityName::Low), _) => Priority::Low,
            (Some(PriorityName::Normal), _) => Priority::Normal,
            (Some(PriorityName::High), _) => Priority::High,
            (None, SerialMode::Console) => Priority::High,
            (None, SerialMode::Framed) => Priority::Normal,
        }
    }
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
    /// Seconds an answer may go without a token before the engine counts as hung and the
    /// systemd watchdog is no longer fed (above the longest prefill the board takes).
    #[serde(deserialize_with = "positive_u64")]
    pub stall_s: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            queue: 16,
            max_prompt_bytes: 8192,
            max_tokens: fieldllm_engine::generate::DEFAULT_MAX_TOKENS as u32,
            max_payload_bytes: 65536,
            grace_s: 10,
            stall_s: 120,
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
        let c: Config = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        c.check()?;
        Ok(c)
    }

    /// Rules that span keys (the deserializer checks each key alone).
    fn check(&self) -> Result<(), String> {
        let m = &self.mqtt;
        let tls = matches!(&m.broker, BrokerSetting::Url(b) if b.tls);
        let t = &m.tls;
        if t.client_cert.is_some() != t.client_key.is_some() {
            return Err(
                "[mqtt.tls] client_cert and client_key go together: set both or neither".into(),
            );
        }
        if tls && t.ca_file.is_none() {
            return Err(
                "[mqtt] broker is mqtts:// but [mqtt.tls] ca_file is not set: name the PEM file of the CA that signed the broker's certificate".into(),
            );
        }
        if !tls && (t.ca_file.is_some() || t.client_cert.is_some()) {
            return Err("[mqtt.tls] needs an mqtts:// broker".into());
        }
        for (i, p) in self.serial.iter().enumerate() {
            if self.serial[..i].iter().any(|q| q.path == p.path) {
                return Err(format!(
                    "[[serial]] {} is listed twice: a port has one owner",
                    p.path.display()
                ));
            }
        }
        if m.password.is_some() && m.username.is_none() {
            return Err("[mqtt] password is set without username".into());
        }
        self.bridge.check()
    }
}

fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let v = usize::deserialize(d)?;
    if v == 0 {
        return Err(serde::de::Error::custom("must be at least 1"));
    }
    Ok(v)
}

fn positive_option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    positive(d).map(Some)
}

fn activations<'de, D: Deserializer<'de>>(d: D) -> Result<Activations, D::Error> {
    String::deserialize(d)?
        .parse()
        .map_err(serde::de::Error::custom)
}

fn kv_cache<'de, D: Deserializer<'de>>(d: D) -> Result<KvCache, D::Error> {
    String::deserialize(d)?
        .parse()
        .map_err(serde::de::Error::custom)
}

fn unit_interval<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    let v = f32::deserialize(d)?;
    if !(0.0..=1.0).contains(&v) {
        return Err(serde::de::Error::custom(format!(
            "must be between 0 and 1, got {v}"
        )));
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

/// Parses `mqtt://HOST[:PORT]` (default port 1883) or `mqtts://HOST[:PORT]` (8883).
pub fn parse_broker(s: &str) -> Result<Broker, String> {
    let (rest, tls) = if let Some(r) = s.strip_prefix("mqtt://") {
        (r, false)
    } else if let Some(r) = s.strip_prefix("mqtts://") {
        (r, true)
    } else {
        return Err(format!(
            "broker {s:?} must be \"embedded\" or look like mqtt://HOST:PORT or mqtts://HOST:PORT"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("broker port {p:?} is not a port number"))?,
        ),
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() || port == 0 {
        return Err(format!("broker {s:?} must look like mqtt://HOST:PORT"));
    }
    Ok(Broker {
        host: host.trim_matches(['[', ']']).to_string(),
        port,
        tls,
    })
}

fn broker_setting<'de, D: Deserializer<'de>>(d: D) -> Result<BrokerSetting, D::Error> {
    let s = String::deserialize(d)?;
    if s == "embedded" {
        return Ok(BrokerSetting::Embedded);
    }
    parse_broker(&s)
        .map(BrokerSetting::Url)
        .map_err(serde::de::Error::custom)
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
        assert_eq!(c.mqtt.broker, BrokerSetting::Embedded);
        assert_eq!(c.mqtt.embedded_listen.to_string(), "127.0.0.1:1883");
        assert_eq!(c.mqtt.protocol, Protocol::V5);
        assert_eq!((c.limits.queue, c.model.threads, c.model.slots), (16, 2, 4));
    }

    #[test]
    fn the_design_example_parses() {
        let c = Config::parse(
            "[model]\npath = \"/usr/share/fieldllm/models/smollm2-135m-instruct\"\nthreads = 2\n\n\
             [mqtt]\nbroker = \"mqtt://10.0.0.5:8883\"\nnode_id = \"hangar-3\"\nprefix = \"fieldllm/v1\"\ngroup = \"fieldllm\"\n\n\
             [limits]\nqueue = 16\nmax_prompt_bytes = 8192\nmax_tokens = 512\n",
        )
        .unwrap();
        assert_eq!(
            c.mqtt.broker,
            BrokerSetting::Url(Broker {
                host: "10.0.0.5".into(),
                port: 8883,
                tls: false
            })
        );
        assert_eq!(c.mqtt.node_id.as_deref(), Some("hangar-3"));
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err()
    }

    #[test]
    fn broker_urls() {
        let b = parse_broker("mqtts://broker.lan").unwrap();
        assert_eq!((b.port, b.tls), (8883, true));
        assert_eq!(b.to_string(), "mqtts://broker.lan:8883");
        let b = parse_broker("mqtt://[::1]:1999").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("::1", 1999));
        assert_eq!(parse_broker("mqtt://[::1]").unwrap().port, 1883);
        assert!(parse_broker("tcp://x").is_err());
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
        let e = err("[model]\nactivations = \"4bit\"\n");
        assert!(e.contains("line 2") && e.contains("precise"), "{e}");
        let c = Config::parse("[model]\nactivations = \"precise\"\n").unwrap();
        assert_eq!(c.model.activations, Activations::Precise);
        let e = err("[model]\nkv_cache = \"q8_0\"\n");
        assert!(e.contains("line 2") && e.contains("f16 or f32"), "{e}");
        assert_eq!(Config::parse("").unwrap().model.kv_cache, KvCache::F16);
        let c = Config::parse("[model]\nkv_cache = \"f32\"\n").unwrap();
        assert_eq!(c.model.kv_cache, KvCache::F32);
        assert!(Config::parse("").unwrap().model.batch);
        let c = Config::parse("[model]\nbatch = false\n").unwrap();
        assert!(!c.model.batch);
        let e = err("[model]\nbatch = \"no\"\n");
        assert!(e.contains("line 2") && e.contains("batch"), "{e}");
        let e = err("[mqtt]\nprotocol = \"4\"\n");
        assert!(e.contains("line 2") && e.contains("3.1.1"), "{e}");
        let e = err("[mqtt]\nbroker = \"mqtts://b\"\n");
        assert!(e.contains("ca_file"), "{e}");
        let e = err(
            "[mqtt]\nbroker = \"mqtts://b\"\n[mqtt.tls]\nca_file = \"ca.pem\"\nclient_cert = \"c.pem\"\n",
        );
        assert!(e.contains("client_key"), "{e}");
        let e = err("[mqtt]\npassword = \"x\"\n");
        assert!(e.contains("username"), "{e}");
        let e = err("[mqtt.tls]\ncafile = \"x\"\n");
        assert!(e.contains("line 2") && e.contains("cafile"), "{e}");
        let e = err("[mqtt]\nembedded_listen = \"localhost\"\n");
        assert!(e.contains("line 2") && e.contains("embedded_listen"), "{e}");
        let e = err("[[serial]]\npath = \"/dev/ttyUSB0\"\nmode = \"modem\"\n");
        assert!(e.contains("line 3") && e.contains("console"), "{e}");
        let e = err("[[serial]]\npath = \"/dev/ttyUSB0\"\nmode = \"framed\"\nbaud = 0\n");
        assert!(e.contains("line 4") && e.contains("baud"), "{e}");
        let e = err("[[serial]]\npath = \"/dev/ttyUSB0\"\n");
        assert!(e.contains("mode"), "{e}");
        let e = err(
            "[[serial]]\npath = \"/dev/a\"\nmode = \"console\"\n[[serial]]\npath = \"/dev/a\"\nmode = \"framed\"\n",
        );
        assert!(e.contains("twice"), "{e}");
        let c = Config::parse("[[serial]]\npath = \"/dev/ttyAMA0\"\nmode = \"console\"\n[[serial]]\npath = \"/dev/ttyUSB0\"\nmode = \"framed\"\nbaud = 9600\n").unwrap();
        assert_eq!((c.serial[0].baud, c.serial[1].baud), (115_200, 9600));
        assert_eq!(c.serial[0].priority(), crate::scheduler::Priority::High);
        assert_eq!(c.serial[1].priority(), crate::scheduler::Priority::Normal);
        let e = err("[serial_ports]\n");
        assert!(e.contains("serial_ports"), "{e}");
    }
}
