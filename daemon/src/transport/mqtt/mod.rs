//! The MQTT service (DESIGN.md section 4), on rumqttc (MQTT 5, or 3.1.1 by config).
//!
//! Shape, after rumqttc's own split: one task owns the event loop and only forwards incoming
//! publishes (it never awaits a publish, which deadlocks rumqttc when its request channel is
//! full); a handler task decodes and submits requests; one task per request publishes its
//! responses. Reconnecting is ours: exponential backoff with jitter and a cap.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::{mpsc, watch};

use crate::config::{Broker, MqttSection, Protocol};
use crate::proto::{self as wire, ErrorCode, Request, Response, Status};
use crate::request::{Limits, check_id, validate};
use crate::scheduler::Scheduler;
use crate::thermal::ThermalView;

pub mod embedded;
pub mod link;

use link::{Client, Identity, LinkEvent, Message, OutProps, Qos};

/// Content type of protobuf payloads (MQTT v5 property); anything else is proto3 JSON.
pub const PROTOBUF: &str = "application/x-protobuf";
/// How many recent request ids are remembered to drop QoS 1 redeliveries.
const RECENT_IDS: usize = 4096;

/// The topics of one node.
#[derive(Debug, Clone)]
pub struct Topics {
    /// `{prefix}/{node}/req`
    pub req: String,
    /// `$share/{group}/{prefix}/fleet/req`
    pub fleet: String,
    /// `{prefix}/{node}/cancel`
    pub cancel: String,
    /// `{prefix}/{node}/status` (retained; LWT)
    pub status: String,
    /// `{prefix}/{node}/telemetry`
    pub telemetry: String,
    /// `{prefix}/{node}/resp` (+ `/{id}`)
    pub resp: String,
    /// `{prefix}/{node}/errors`: answers to requests whose id could not be read.
    pub errors: String,
}

impl Topics {
    /// Topics for `node` under `prefix`, fleet shared by `group`.
    pub fn new(prefix: &str, node: &str, group: &str) -> Topics {
        let base = format!("{prefix}/{node}");
        Topics {
            req: format!("{base}/req"),
            fleet: format!("$share/{group}/{prefix}/fleet/req"),
            cancel: format!("{base}/cancel"),
            status: format!("{base}/status"),
            telemetry: format!("{base}/telemetry"),
            resp: format!("{base}/resp"),
            errors: format!("{base}/errors"),
        }
    }

    fn is_request(&self, topic: &str) -> bool {
        topic == self.req || topic.ends_with("/fleet/req")
    }
}

/// Everything the service needs besides the scheduler.
#[derive(Debug, Clone)]
pub struct MqttService {
    /// `[mqtt]` config.
    pub config: MqttSection,
    /// The broker to connect to (the embedded one's address when `broker = "embedded"`).
    pub broker: Broker,
    /// Protocol spoken to it.
    pub protocol: Protocol,
    /// Node id (config or hostname).
    pub node: String,
    /// Request limits.
    pub limits: Limits,
    /// Largest request payload.
    pub max_payload: usize,
    /// Model name for status messages.
    pub model_name: String,
    /// Requests whose responses are still being published (for a clean stop).
    pub open_streams: Arc<AtomicUsize>,
    /// The firmware bridge's state and readings.
    pub thermal: ThermalView,
}

/// Payload encoding of one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Json,
    Protobuf,
}

impl Encoding {
    /// The v5 content type decides; without one (3.1.1, or a v5 client that sets none) a
    /// payload whose first non-blank byte is `{` is JSON and anything else protobuf.
    fn of(m: &Message) -> Encoding {
        match m.content_type.as_deref() {
            Some(PROTOBUF) => Encoding::Protobuf,
            Some(_) => Encoding::Json,
            None if m.payload.trim_ascii_start().first() == Some(&b'{') => Encoding::Json,
            None if m.payload.is_empty() => Encoding::Json,
            None => Encoding::Protobuf,
        }
    }
}

/// Where and how one request's responses go.
#[derive(Debug, Clone)]
struct ReplyTo {
    topic: String,
    correlation: Option<Bytes>,
    encoding: Encoding,
}

fn encode<T: serde::Serialize + prost::Message>(r: &T, enc: Encoding) -> Vec<u8> {
    match enc {
        // serializing generated types cannot fail; an empty object is the safe fallback
        Encoding::Json => serde_json::to_vec(r).unwrap_or_else(|_| b"{}".to_vec()),
        Encoding::Protobuf => r.encode_to_vec(),
    }
}

/// Bounded memory of request ids already taken, for QoS 1 redelivery.
#[derive(Debug, Default)]
struct RecentIds {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl RecentIds {
    /// True the first time an id is seen (within the window).
    fn first_time(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == RECENT_IDS
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.set.insert(id.to_string());
        self.order.push_back(id.to_string());
        true
    }
}

impl MqttService {
    fn identity(&self, topics: &Topics) -> Identity<'_> {
        let offline = self.status("offline", 0, 0, 0, 0.0, 0);
        Identity {
            client_id: format!("fieldllmd-{}", self.node),
            broker: &self.broker,
            protocol: self.protocol,
            will: (topics.status.clone(), encode(&offline, Encoding::Json)),
        }
    }

    fn status(
        &self,
        state: &str,
        queued: usize,
        running: usize,
        answered: u64,
        tok_s: f32,
        uptime: u64,
    ) -> Status {
        Status {
            node: self.node.clone(),
            model: self.model_name.clone(),
            state: state.into(),
            thermal: self.thermal.state().as_str().into(),
            accelerator: self.thermal.accelerator(),
            queue_depth: queued as u32,
            running: running as u32,
            decode_tok_s: tok_s,
            uptime_s: uptime,
            answered,
        }
    }

    /// Runs until `stop` turns true: connects (and reconnects), serves requests, publishes
    /// status and telemetry. `ready` is told once the first connection is subscribed (the
    /// daemon's READY waits on it). On stop it publishes the `stopping` status and returns;
    /// answers still running are the scheduler's to end.
    pub async fn run(
        self,
        scheduler: Scheduler,
        mut stop: watch::Receiver<bool>,
        ready: tokio::sync::oneshot::Sender<()>,
    ) -> anyhow::Result<()> {
        let ready = Arc::new(std::sync::Mutex::new(Some(ready)));
        let topics = Topics::new(&self.config.prefix, &self.node, &self.config.group);
        let (client, mut link) = link::connect(&self.config, self.identity(&topics), 256)?;
        let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Message>();
        let started = Instant::now();

        // the event loop task: poll, forward, reconnect with backoff; never awaits a publish
        let loop_client = client.clone();
        let loop_topics = topics.clone();
        let loop_svc = self.clone();
        let closing = Arc::new(AtomicBool::new(false));
        let loop_closing = closing.clone();
        // runs until the broker has closed the connection after our DISCONNECT, so the last
        // answers and the offline status are delivered (see `closing`)
        let event_task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(250);
            let mut failures = 0u32;
            loop {
                tokio::select! {
                    ev = link.poll() => match ev {
                        // the DISCONNECT is only queued when this event comes: poll on until
                        // the broker closes the connection, so it (and the offline status) is sent
                        Ok(LinkEvent::DisconnectSent) => {}
                        Ok(LinkEvent::Connected) => {
                            tracing::info!(broker = %loop_svc.broker, protocol = ?loop_svc.protocol, "connected to the broker");
                            backoff = Duration::from_millis(250);
                            failures = 0;
                            let (c, t) = (loop_client.clone(), loop_topics.clone());
                            let status = loop_svc.status("ready", 0, 0, 0, 0.0, started.elapsed().as_secs());
                            let ready = ready.clone();
                            tokio::spawn(async move {
                                for topic in [&t.req, &t.fleet, &t.cancel] {
                                    if let Err(e) = c.subscribe(topic.clone()).await {
                                        tracing::warn!(%topic, error = %e, "subscribe failed");
                                    }
                                }
                                let _ = c.publish(t.status.clone(), Qos::AtLeastOnce, true, encode(&status, Encoding::Json), OutProps::default()).await;
                                let first = ready.lock().ok().and_then(|mut r| r.take());
                                if let Some(tx) = first {
                                    let _ = tx.send(());
                                }
                            });
                        }
                        Ok(LinkEvent::Message(m)) => {
                            let _ = in_tx.send(m);
                        }
                        Ok(LinkEvent::Refused(why)) => tracing::warn!(broker = %loop_svc.broker, "{why}"),
                        Ok(LinkEvent::Other) => {}
                        Err(_) if loop_closing.load(Ordering::Acquire) => break,
                        Err(e) => {
                            failures += 1;
                            // one line per failure streak step, not per retry storm
                            if failures <= 3 || failures.is_power_of_two() {
                                tracing::warn!(broker = %loop_svc.broker, error = %e, retry_in_ms = backoff.as_millis() as u64, failures, held = link.held(), dropped = link.dropped(), "broker connection failed");
                            }
                            let jitter = Duration::from_millis(u64::from(failures * 37 % 100));
                            tokio::time::sleep(backoff + jitter).await;
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                    }
                }
            }
        });

        let mut recent = RecentIds::default();
        let mut telemetry = tokio::time::interval(Duration::from_secs(self.config.telemetry_s));
        let mut thermal = self.thermal.subscribe();
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = telemetry.tick() => {
                    let s = scheduler.stats();
                    let st = self.status("ready", s.queued, s.running, s.answered, s.last_decode_tok_s, started.elapsed().as_secs());
                    let c = client.clone();
                    let topic = topics.telemetry.clone();
                    tokio::spawn(async move {
                        let _ = c.publish(topic, Qos::AtMostOnce, false, encode(&st, Encoding::Json), OutProps::default()).await;
                    });
                }
                // a thermal state change is news: the retained status and a telemetry message now
                Ok(()) = thermal.changed() => {
                    let s = scheduler.stats();
                    let st = encode(&self.status("ready", s.queued, s.running, s.answered, s.last_decode_tok_s, started.elapsed().as_secs()), Encoding::Json);
                    let (c, t) = (client.clone(), topics.clone());
                    tokio::spawn(async move {
                        let _ = c.publish(t.status, Qos::AtLeastOnce, true, st.clone(), OutProps::default()).await;
                        let _ = c.publish(t.telemetry, Qos::AtMostOnce, false, st, OutProps::default()).await;
                    });
                }
                Some(p) = in_rx.recv() => self.handle(p, &topics, &client, &scheduler, &mut recent),
            }
        }
        // let the answers the scheduler ended reach the broker before the connection goes
        let wait_until = Instant::now() + Duration::from_secs(5);
        while self.open_streams.load(Ordering::Acquire) > 0 && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // a clean stop: our own retained "offline" (the will covers the unclean ones), then
        // DISCONNECT, which tells the broker not to publish the will
        let offline = self.status(
            "offline",
            0,
            0,
            scheduler.stats().answered,
            0.0,
            started.elapsed().as_secs(),
        );
        closing.store(true, Ordering::Release);
        let bye = async {
            let _ = client
                .publish(
                    topics.status.clone(),
                    Qos::AtLeastOnce,
                    true,
                    encode(&offline, Encoding::Json),
                    OutProps::default(),
                )
                .await;
            let _ = client.disconnect().await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), bye).await;
        if tokio::time::timeout(Duration::from_secs(3), event_task)
            .await
            .is_err()
        {
            tracing::warn!("the broker did not take the disconnect in time");
        }
        Ok(())
    }

    fn handle(
        &self,
        p: Message,
        topics: &Topics,
        client: &Client,
        scheduler: &Scheduler,
        recent: &mut RecentIds,
    ) {
        let received = Instant::now();
        let topic = p.topic.clone();
        let encoding = Encoding::of(&p);
        if topic == topics.cancel {
            let id = match encoding {
                Encoding::Json => serde_json::from_slice::<wire::Cancel>(&p.payload)
                    .map(|c| c.id)
                    .ok(),
                Encoding::Protobuf => wire::Cancel::decode(p.payload.as_ref()).map(|c| c.id).ok(),
            };
            match id {
                Some(id) => {
                    let found = scheduler.cancel(&id);
                    tracing::info!(request_id = %id, transport = "mqtt", found, "cancel");
                }
                None => tracing::warn!(%topic, "undecodable cancel message"),
            }
            return;
        }
        if !topics.is_request(&topic) {
            return;
        }
        let reply = |id: &str| ReplyTo {
            topic: p.response_topic.clone().unwrap_or_else(|| {
                if check_id(id).is_ok() {
                    format!("{}/{id}", topics.resp)
                } else {
                    topics.errors.clone()
                }
            }),
            correlation: p.correlation.clone(),
            encoding,
        };
        let refuse = |id: &str, code: ErrorCode, msg: String| {
            tracing::info!(request_id = %id, transport = "mqtt", code = ?code, reason = %msg, "request refused");
            publish_all(client.clone(), reply(id), vec![wire::error(id, code, msg)]);
        };
        if p.payload.len() > self.max_payload {
            return refuse(
                "",
                ErrorCode::TooLarge,
                format!(
                    "payload is {} bytes, at most {}",
                    p.payload.len(),
                    self.max_payload
                ),
            );
        }
        let req = match encoding {
            Encoding::Json => serde_json::from_slice::<Request>(&p.payload)
                .map_err(|e| format!("invalid JSON request: {e}")),
            Encoding::Protobuf if p.content_type.is_none() => Request::decode(p.payload.as_ref())
                .map_err(|e| format!("invalid request: not a JSON object, and as protobuf: {e}")),
            Encoding::Protobuf => Request::decode(p.payload.as_ref())
                .map_err(|e| format!("invalid protobuf request: {e}")),
        };
        let req = match req {
            Ok(r) => r,
            Err(msg) => {
                // answer on the request's own topic when at least its id can be read
                let id = match encoding {
                    Encoding::Json => serde_json::from_slice::<serde_json::Value>(&p.payload)
                        .ok()
                        .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string))
                        .filter(|id| check_id(id).is_ok())
                        .unwrap_or_default(),
                    Encoding::Protobuf => String::new(),
                };
                return refuse(&id, ErrorCode::BadRequest, msg);
            }
        };
        let id = req.id.clone();
        if check_id(&id).is_ok() && !recent.first_time(&id) {
            tracing::info!(request_id = %id, transport = "mqtt", dup = p.dup, "request id seen before: not answered again");
            return;
        }
        let mut spec = match validate(req, &self.limits, received) {
            Ok(s) => s,
            Err(r) => return refuse(&id, r.code, r.message),
        };
        spec.transport = "mqtt";
        let (tx, rx) = mpsc::unbounded_channel();
        tracing::debug!(request_id = %id, transport = "mqtt", %topic, "request");
        // accepted or refused (busy, duplicate, shutting down), the channel carries the answer
        scheduler.submit(spec, tx);
        stream_replies(client.clone(), reply(&id), rx, self.open_streams.clone());
    }
}

fn publish_one(
    client: &Client,
    to: &ReplyTo,
    r: &Response,
) -> impl std::future::Future<Output = Result<(), String>> + use<> {
    let payload = encode(r, to.encoding);
    let props = OutProps {
        correlation: to.correlation.clone(),
        content_type: Some(match to.encoding {
            Encoding::Json => "application/json".to_string(),
            Encoding::Protobuf => PROTOBUF.to_string(),
        }),
    };
    let (c, topic) = (client.clone(), to.topic.clone());
    async move {
        c.publish(topic, Qos::AtLeastOnce, false, payload, props)
            .await
    }
}

fn publish_all(client: Client, to: ReplyTo, responses: Vec<Response>) {
    tokio::spawn(async move {
        for r in &responses {
            if let Err(e) = publish_one(&client, &to, r).await {
                tracing::warn!(request_id = %r.id(), transport = "mqtt", error = %e, "could not queue a response");
            }
        }
    });
}

/// Publishes a request's responses in order until its final one.
fn stream_replies(
    client: Client,
    to: ReplyTo,
    mut rx: mpsc::UnboundedReceiver<Response>,
    open: Arc<AtomicUsize>,
) {
    open.fetch_add(1, Ordering::AcqRel);
    tokio::spawn(async move {
        while let Some(r) = rx.recv().await {
            let last = r.is_final();
            if let Err(e) = publish_one(&client, &to, &r).await {
                tracing::warn!(request_id = %r.id(), transport = "mqtt", error = %e, "could not queue a response");
            }
            if last {
                break;
            }
        }
        open.fetch_sub(1, Ordering::AcqRel);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_the_design() {
        let t = Topics::new("fieldllm/v1", "hangar-3", "fieldllm");
        assert_eq!(t.req, "fieldllm/v1/hangar-3/req");
        assert_eq!(t.fleet, "$share/fieldllm/fieldllm/v1/fleet/req");
        assert!(t.is_request("fieldllm/v1/fleet/req"));
        assert_eq!(t.status, "fieldllm/v1/hangar-3/status");
    }

    #[test]
    fn recent_ids_are_bounded() {
        let mut r = RecentIds::default();
        assert!(r.first_time("a"));
        assert!(!r.first_time("a"));
        for i in 0..RECENT_IDS {
            r.first_time(&i.to_string());
        }
        assert!(r.first_time("a"), "forgotten after the window");
        assert_eq!(r.order.len(), RECENT_IDS);
    }
}
