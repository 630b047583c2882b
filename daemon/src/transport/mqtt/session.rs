//! The MQTT service's decisions, without I/O: which topic a message came on, how it is
//! encoded, whether its id was seen before, and whether it becomes a job, a cancel or a
//! refusal, and where the answer goes. [`Inbox::on_message`] returns an [`Action`]; the
//! service's loop (`super::MqttService::run`) carries it out. After rumqttc's own split of
//! protocol state from the event loop.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;

use super::link::Message;
use crate::docs::ground::Grounding;
use crate::proto::{self as wire, Request};
use crate::request::{Intake, Origin, Rejection, check_id, wants_docs};
use crate::scheduler::{Code, Job, Transport};
use crate::transport::wire::refusal;

/// Content type of protobuf payloads (MQTT v5 property); anything else is proto3 JSON.
pub const PROTOBUF: &str = "application/x-protobuf";
/// How many recent request ids are remembered to drop QoS 1 redeliveries.
pub const RECENT_IDS: usize = 4096;

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

/// Payload encoding of one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// proto3 JSON.
    Json,
    /// Protobuf.
    Protobuf,
}

impl Encoding {
    /// The v5 content type decides; without one (3.1.1, or a v5 client that sets none) a
    /// payload whose first non-blank byte is `{` is JSON and anything else protobuf.
    pub fn of(m: &Message) -> Encoding {
        match m.content_type.as_deref() {
            Some(PROTOBUF) => Encoding::Protobuf,
            Some(_) => Encoding::Json,
            None if m.payload.trim_ascii_start().first() == Some(&b'{') => Encoding::Json,
            None if m.payload.is_empty() => Encoding::Json,
            None => Encoding::Protobuf,
        }
    }

    /// The v5 content type of what we send in this encoding.
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => "application/json",
            Encoding::Protobuf => PROTOBUF,
        }
    }
}

/// Encodes a message of the schema.
pub fn encode<T: serde::Serialize + prost::Message>(r: &T, enc: Encoding) -> Vec<u8> {
    match enc {
        // serializing generated types cannot fail; an empty object is the safe fallback
        Encoding::Json => serde_json::to_vec(r).unwrap_or_else(|_| b"{}".to_vec()),
        Encoding::Protobuf => r.encode_to_vec(),
    }
}

/// Where and how one request's responses go.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyTo {
    /// The topic.
    pub topic: String,
    /// v5 Correlation Data to echo.
    pub correlation: Option<Bytes>,
    /// The request's encoding.
    pub encoding: Encoding,
}

/// Bounded memory of the ids of accepted requests, for QoS 1 redelivery. Only accepted ones:
/// a device that was refused (`busy` with its retry hint, or `bad_request`) and sends the same
/// id again is asking again, not redelivering, and must be answered.
#[derive(Debug, Default)]
struct RecentIds {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl RecentIds {
    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    /// Remembers an accepted id, forgetting the oldest past [`RECENT_IDS`].
    fn remember(&mut self, id: &str) {
        if self.set.contains(id) {
            return;
        }
        if self.order.len() == RECENT_IDS
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.set.insert(id.to_string());
        self.order.push_back(id.to_string());
    }
}

/// What to do about one incoming message.
#[derive(Debug)]
pub enum Action {
    /// Hand the job to the scheduler; its replies go to `to`.
    Submit {
        /// The job.
        job: Job,
        /// Where its answer goes.
        to: ReplyTo,
    },
    /// Search the documents for this request (`docs: true`), off the tokio workers, and pass
    /// the result to [`Inbox::grounded`] before the next message: nothing overtakes it.
    Ground {
        /// The request, its own rules checked by the search.
        req: Box<Request>,
        /// Where its answer goes.
        to: ReplyTo,
        /// When it arrived.
        received: Instant,
    },
    /// Cancel the job with this id.
    Cancel(String),
    /// Answer a refused request with this error.
    Refuse {
        /// Where.
        to: ReplyTo,
        /// The error.
        error: wire::Error,
    },
    /// Nothing: a redelivered id, a message on a topic that is not ours, an undecodable cancel.
    Ignore,
}

/// The incoming side of the service: topics, limits, and the ids already taken.
#[derive(Debug)]
pub struct Inbox {
    topics: Topics,
    intake: Intake,
    max_payload: usize,
    recent: RecentIds,
}

impl Inbox {
    /// An inbox for `topics`, refusing payloads over `max_payload` bytes.
    pub fn new(topics: Topics, intake: Intake, max_payload: usize) -> Inbox {
        Inbox {
            topics,
            intake,
            max_payload,
            recent: RecentIds::default(),
        }
    }

    /// Decides what `m`, received at `received`, calls for.
    pub fn on_message(&mut self, m: &Message, received: Instant) -> Action {
        let encoding = Encoding::of(m);
        if m.topic == self.topics.cancel {
            let id = match encoding {
                Encoding::Json => serde_json::from_slice::<wire::Cancel>(&m.payload)
                    .map(|c| c.id)
                    .ok(),
                Encoding::Protobuf => wire::Cancel::decode(m.payload.as_ref()).map(|c| c.id).ok(),
            };
            return match id {
                Some(id) => Action::Cancel(id),
                None => {
                    tracing::warn!(topic = %m.topic, "undecodable cancel message");
                    Action::Ignore
                }
            };
        }
        if !self.topics.is_request(&m.topic) {
            return Action::Ignore;
        }
        if m.payload.len() > self.max_payload {
            let r = Rejection {
                code: Code::TooLarge,
                message: format!(
                    "payload is {} bytes, at most {}",
                    m.payload.len(),
                    self.max_payload
                ),
            };
            return self.refuse(m, "", encoding, r);
        }
        let req = match decode(m, encoding) {
            Ok(r) => r,
            Err(message) => {
                // answer on the request's own topic when at least its id can be read
                let id = readable_id(m, encoding);
                let r = Rejection {
                    code: Code::BadRequest,
                    message,
                };
                return self.refuse(m, &id, encoding, r);
            }
        };
        let id = req.id.clone();
        if self.recent.contains(&id) {
            tracing::info!(request_id = %id, transport = "mqtt", dup = m.dup, "request id accepted before: dropped as a redelivery");
            return Action::Ignore;
        }
        let to = self.reply_to(m, &id, encoding);
        if wants_docs(&req) {
            return Action::Ground {
                req: Box::new(req),
                to,
                received,
            };
        }
        tracing::debug!(request_id = %id, transport = "mqtt", topic = %m.topic, "request");
        self.decided(
            id,
            self.intake
                .job(req, None, Origin::new(Transport::Mqtt), received),
            to,
        )
    }

    /// What a request that asked for documents calls for, once `grounding` (the document
    /// search's result, or why there is none) is known.
    pub fn grounded(
        &mut self,
        req: Request,
        grounding: Result<Grounding, Rejection>,
        to: ReplyTo,
        received: Instant,
    ) -> Action {
        let id = req.id.clone();
        tracing::debug!(request_id = %id, transport = "mqtt", "grounded request");
        let job = grounding.and_then(|g| {
            self.intake
                .job(req, Some(g), Origin::new(Transport::Mqtt), received)
        });
        self.decided(id, job, to)
    }

    fn decided(&self, id: String, job: Result<Job, Rejection>, to: ReplyTo) -> Action {
        match job {
            Ok(job) => Action::Submit { job, to },
            Err(r) => {
                tracing::info!(request_id = %id, transport = "mqtt", code = ?r.code, reason = %r.message, "request refused");
                Action::Refuse {
                    to,
                    error: refusal(&id, r),
                }
            }
        }
    }

    /// The scheduler took the job with this id: a message carrying it again is a redelivery
    /// (QoS 1, DUP or not) and is dropped. Refused ids are never remembered.
    pub fn accepted(&mut self, id: &str) {
        self.recent.remember(id);
    }

    /// Refuses a request: its error, addressed as its answer would be.
    fn refuse(&self, m: &Message, id: &str, encoding: Encoding, r: Rejection) -> Action {
        tracing::info!(request_id = %id, transport = "mqtt", code = ?r.code, reason = %r.message, "request refused");
        Action::Refuse {
            to: self.reply_to(m, id, encoding),
            error: refusal(id, r),
        }
    }

    /// The v5 Response Topic with its Correlation Data when given; else `resp/{id}`, or the
    /// errors topic for an id that cannot be a topic level.
    fn reply_to(&self, m: &Message, id: &str, encoding: Encoding) -> ReplyTo {
        ReplyTo {
            topic: m.response_topic.clone().unwrap_or_else(|| {
                if check_id(id).is_ok() {
                    format!("{}/{id}", self.topics.resp)
                } else {
                    self.topics.errors.clone()
                }
            }),
            correlation: m.correlation.clone(),
            encoding,
        }
    }
}

fn decode(m: &Message, encoding: Encoding) -> Result<Request, String> {
    match encoding {
        Encoding::Json => serde_json::from_slice::<Request>(&m.payload)
            .map_err(|e| format!("invalid JSON request: {e}")),
        Encoding::Protobuf if m.content_type.is_none() => Request::decode(m.payload.as_ref())
            .map_err(|e| format!("invalid request: not a JSON object, and as protobuf: {e}")),
        Encoding::Protobuf => Request::decode(m.payload.as_ref())
            .map_err(|e| format!("invalid protobuf request: {e}")),
    }
}

/// The id of a request that did not decode, when it can still be read (JSON only).
fn readable_id(m: &Message, encoding: Encoding) -> String {
    match encoding {
        Encoding::Json => serde_json::from_slice::<serde_json::Value>(&m.payload)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string))
            .filter(|id| check_id(id).is_ok())
            .unwrap_or_default(),
        Encoding::Protobuf => String::new(),
    }
}

/// Reconnecting: capped exponential backoff with jitter, and which failures are worth a log
/// line (the first three of a streak, then powers of two), so a broker that stays away does not
/// flood the journal.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Backoff::FIRST,
            failures: 0,
        }
    }
}

impl Backoff {
    /// The first wait.
    pub const FIRST: Duration = Duration::from_millis(250);
    /// The longest wait.
    pub const CAP: Duration = Duration::from_secs(30);

    /// The connection is up: the next failure waits the first wait again.
    pub fn connected(&mut self) {
        *self = Backoff::default();
    }

    /// A try failed: how long to wait before the next, the streak's length, and whether to log it.
    pub fn failed(&mut self) -> (Duration, u32, bool) {
        self.failures += 1;
        let jitter = Duration::from_millis(u64::from(self.failures * 37 % 100));
        let wait = self.next + jitter;
        self.next = (self.next * 2).min(Backoff::CAP);
        let log = self.failures <= 3 || self.failures.is_power_of_two();
        (wait, self.failures, log)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use super::*;
    use crate::proto::ErrorCode;
    use crate::request::Limits;
    use crate::scheduler::scripted::{Gate, ScriptedEngine};

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
        assert!(!r.contains("a"));
        r.remember("a");
        r.remember("a");
        assert!(r.contains("a"));
        assert_eq!(r.order.len(), 1, "remembered once");
        for i in 0..RECENT_IDS {
            r.remember(&i.to_string());
        }
        assert!(!r.contains("a"), "forgotten after the window");
        assert_eq!(r.order.len(), RECENT_IDS);
    }

    fn inbox() -> Inbox {
        let intake = Intake::new(
            Limits::default(),
            Arc::new(ScriptedEngine::new(Gate::open())),
        );
        Inbox::new(Topics::new("p", "n", "g"), intake, 256)
    }

    fn msg(topic: &str, payload: &[u8]) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload),
            dup: false,
            response_topic: None,
            correlation: None,
            content_type: None,
        }
    }

    fn refused(a: Action) -> (ReplyTo, ErrorCode) {
        match a {
            Action::Refuse { to, error } => (to, ErrorCode::try_from(error.code).unwrap()),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_request_becomes_a_job_answered_on_its_topic_once() {
        let mut inbox = inbox();
        let m = msg("p/n/req", br#"{"id":"q1","prompt":"pump noise"}"#);
        match inbox.on_message(&m, Instant::now()) {
            Action::Submit { job, to } => {
                assert_eq!((job.id.as_str(), job.transport), ("q1", Transport::Mqtt));
                assert_eq!(to.topic, "p/n/resp/q1");
                assert_eq!(to.encoding, Encoding::Json);
            }
            other => panic!("{other:?}"),
        }
        // until the scheduler takes it, the same id is a new try (after `busy`, say)
        assert!(matches!(
            inbox.on_message(&m, Instant::now()),
            Action::Submit { .. }
        ));
        inbox.accepted("q1");
        // once taken, the same id again (a QoS 1 redelivery) is not answered twice
        let mut again = m.clone();
        again.dup = true;
        assert!(matches!(
            inbox.on_message(&again, Instant::now()),
            Action::Ignore
        ));
        // the fleet topic and a v5 response topic with correlation data
        let mut v5 = msg("p/fleet/req", br#"{"id":"q2","prompt":"valve"}"#);
        v5.response_topic = Some("client/inbox".into());
        v5.correlation = Some(Bytes::from_static(b"c-1"));
        match inbox.on_message(&v5, Instant::now()) {
            Action::Submit { to, .. } => {
                assert_eq!(to.topic, "client/inbox");
                assert_eq!(to.correlation.as_deref(), Some(&b"c-1"[..]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_requests_are_refused_where_they_can_be_read() {
        let mut inbox = inbox();
        let (to, code) = refused(inbox.on_message(&msg("p/n/req", &[b'{'; 300]), Instant::now()));
        assert_eq!(
            (to.topic.as_str(), code),
            ("p/n/errors", ErrorCode::TooLarge)
        );
        let (to, code) = refused(inbox.on_message(
            &msg("p/n/req", br#"{"id":"q3","prompt":"x","bogus":1}"#),
            Instant::now(),
        ));
        assert_eq!(
            (to.topic.as_str(), code),
            ("p/n/resp/q3", ErrorCode::BadRequest)
        );
        let (to, code) =
            refused(inbox.on_message(&msg("p/n/req", b"\xff\xff\xff"), Instant::now()));
        assert_eq!(
            (to.topic.as_str(), code),
            ("p/n/errors", ErrorCode::BadRequest)
        );
        assert_eq!(to.encoding, Encoding::Protobuf);
        // checked before the queue: a max_tokens out of range
        let (_, code) = refused(inbox.on_message(
            &msg("p/n/req", br#"{"id":"q4","prompt":"x","maxTokens":100000}"#),
            Instant::now(),
        ));
        assert_eq!(code, ErrorCode::BadRequest);
        // a refused id is not remembered: the request fixed and sent again is answered
        assert!(matches!(
            inbox.on_message(
                &msg("p/n/req", br#"{"id":"q4","prompt":"x","maxTokens":10}"#),
                Instant::now()
            ),
            Action::Submit { job, .. } if job.id == "q4"
        ));
    }

    #[test]
    fn cancels_and_strangers() {
        let mut inbox = inbox();
        assert!(matches!(
            inbox.on_message(&msg("p/n/cancel", br#"{"id":"q1"}"#), Instant::now()),
            Action::Cancel(id) if id == "q1"
        ));
        assert!(matches!(
            inbox.on_message(&msg("p/n/cancel", b"{nope"), Instant::now()),
            Action::Ignore
        ));
        assert!(matches!(
            inbox.on_message(
                &msg("p/other/req", br#"{"id":"z","prompt":"x"}"#),
                Instant::now()
            ),
            Action::Ignore
        ));
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_logs_less_as_it_goes() {
        let mut b = Backoff::default();
        let mut waits = Vec::new();
        let mut logged = Vec::new();
        for _ in 0..12 {
            let (wait, n, log) = b.failed();
            waits.push(wait);
            if log {
                logged.push(n);
            }
        }
        assert!(waits[0] >= Backoff::FIRST && waits[0] < Backoff::FIRST * 2);
        assert!(waits[1] >= Backoff::FIRST * 2);
        assert!(
            waits
                .iter()
                .all(|w| *w < Backoff::CAP + Duration::from_millis(100))
        );
        assert!(waits[11] >= Backoff::CAP);
        assert_eq!(logged, [1, 2, 3, 4, 8]);
        b.connected();
        assert!(b.failed().0 < Backoff::FIRST * 2);
    }

    #[test]
    fn a_request_for_documents_is_searched_before_it_becomes_a_job() {
        let mut inbox = inbox();
        let m = msg(
            "p/n/req",
            br#"{"id":"d1","prompt":"relief valve?","docs":true}"#,
        );
        let Action::Ground { req, to, received } = inbox.on_message(&m, Instant::now()) else {
            panic!("no search")
        };
        assert_eq!((req.id.as_str(), to.topic.as_str()), ("d1", "p/n/resp/d1"));
        // the search's refusal is the request's answer, on its topic
        let r = Rejection {
            code: Code::NotCovered,
            message: "not covered".into(),
        };
        let (to, code) = refused(inbox.grounded(*req.clone(), Err(r), to, received));
        assert_eq!(
            (to.topic.as_str(), code),
            ("p/n/resp/d1", ErrorCode::NotCovered)
        );
        // found passages make a job that cites them
        let g = Grounding::Covered {
            sources: Vec::new(),
            key_sentence: String::new(),
        };
        match inbox.grounded(*req, Ok(g), to, received) {
            Action::Submit { job, .. } => assert!(job.citations.is_some()),
            other => panic!("{other:?}"),
        }
        // docs false or unset: a job at once
        let m = msg(
            "p/n/req",
            br#"{"id":"d2","prompt":"relief valve?","docs":false}"#,
        );
        assert!(matches!(
            inbox.on_message(&m, Instant::now()),
            Action::Submit { .. }
        ));
    }
}
