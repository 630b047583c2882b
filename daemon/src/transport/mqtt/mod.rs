//! The MQTT service (DESIGN.md section 4), on rumqttc (MQTT 5, or 3.1.1 by config).
//!
//! Shape, after rumqttc's own split: one task owns the event loop and only forwards incoming
//! publishes (it never awaits a publish, which deadlocks rumqttc when its request channel is
//! full); the service's loop hands each to the [`Inbox`] (plain code in [`session`]: decode,
//! dedup, check, address) and carries out the [`Action`] it returns; one task per request
//! publishes its replies, encoded here at the edge. Reconnecting is ours: [`Backoff`],
//! exponential with jitter and a cap.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::config::{Broker, MqttSection, Protocol};
use crate::proto::{Response, Status};
use crate::request::Intake;
use crate::scheduler::{Reply, Scheduler};
use crate::thermal::ThermalView;
use crate::transport::wire;

pub mod embedded;
pub mod link;
pub mod session;

use link::{Client, Identity, LinkEvent, Message, OutProps, Qos};
pub use session::{Action, Backoff, Encoding, Inbox, PROTOBUF, ReplyTo, Topics, encode};

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
    /// Turns requests into jobs.
    pub intake: Intake,
    /// Largest request payload.
    pub max_payload: usize,
    /// Model name for status messages.
    pub model_name: String,
    /// Requests whose responses are still being published (for a clean stop).
    pub open_streams: Arc<AtomicUsize>,
    /// The firmware bridge's state and readings.
    pub thermal: ThermalView,
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
    /// daemon's READY waits on it). On stop it publishes the `offline` status and returns;
    /// answers still running are the scheduler's to end.
    pub async fn run(
        self,
        scheduler: Scheduler,
        mut stop: watch::Receiver<bool>,
        ready: tokio::sync::oneshot::Sender<()>,
    ) -> anyhow::Result<()> {
        let topics = Topics::new(&self.config.prefix, &self.node, &self.config.group);
        let (client, link) = link::connect(&self.config, self.identity(&topics), 256)?;
        let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Message>();
        let started = Instant::now();
        let closing = Arc::new(AtomicBool::new(false));
        let event_task = tokio::spawn(event_loop(
            link,
            client.clone(),
            topics.clone(),
            self.clone(),
            ready,
            in_tx,
            closing.clone(),
            started,
        ));
        let mut inbox = Inbox::new(topics.clone(), self.intake.clone(), self.max_payload);
        let mut telemetry = tokio::time::interval(Duration::from_secs(self.config.telemetry_s));
        let mut thermal = self.thermal.subscribe();
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = telemetry.tick() => {
                    let st = encode(&self.current(&scheduler, started), Encoding::Json);
                    let c = client.clone();
                    let topic = topics.telemetry.clone();
                    tokio::spawn(async move {
                        let _ = c.publish(topic, Qos::AtMostOnce, false, st, OutProps::default()).await;
                    });
                }
                // a thermal state change is news: the retained status and a telemetry message now
                Ok(()) = thermal.changed() => {
                    let st = encode(&self.current(&scheduler, started), Encoding::Json);
                    let (c, t) = (client.clone(), topics.clone());
                    tokio::spawn(async move {
                        let _ = c.publish(t.status, Qos::AtLeastOnce, true, st.clone(), OutProps::default()).await;
                        let _ = c.publish(t.telemetry, Qos::AtMostOnce, false, st, OutProps::default()).await;
                    });
                }
                Some(m) = in_rx.recv() => {
                    let mut action = inbox.on_message(&m, Instant::now());
                    // in place, so a cancel or redelivery that follows finds the job submitted
                    if let Action::Ground { req, to, received } = action {
                        let grounding = self.intake.ground(&req).await;
                        action = inbox.grounded(*req, grounding, to, received);
                    }
                    if let Some(id) = self.act(action, &client, &scheduler) {
                        inbox.accepted(&id);
                    }
                }
            }
        }
        self.close(&client, &topics, &scheduler, started, &closing)
            .await;
        if tokio::time::timeout(Duration::from_secs(3), event_task)
            .await
            .is_err()
        {
            tracing::warn!("the broker did not take the disconnect in time");
        }
        Ok(())
    }

    /// The `ready` status with the scheduler's counters.
    fn current(&self, scheduler: &Scheduler, started: Instant) -> Status {
        let s = scheduler.stats();
        self.status(
            "ready",
            s.queued,
            s.running,
            s.answered,
            s.last_decode_tok_s,
            started.elapsed().as_secs(),
        )
    }

    /// Carries out what the inbox decided; the id of a job the scheduler accepted.
    fn act(&self, action: Action, client: &Client, scheduler: &Scheduler) -> Option<String> {
        match action {
            Action::Submit { job, to } => {
                let (tx, rx) = mpsc::unbounded_channel();
                let id = job.id.clone();
                // accepted or refused (busy, duplicate, shutting down), the channel carries
                // the answer
                let accepted = scheduler.submit(job, tx);
                stream_replies(client.clone(), to, rx, self.open_streams.clone());
                return accepted.then_some(id);
            }
            Action::Cancel(id) => {
                let found = scheduler.cancel(&id);
                tracing::info!(request_id = %id, transport = "mqtt", found, "cancel");
            }
            Action::Refuse { to, error } => {
                let response = wire::error_response(error);
                let client = client.clone();
                tokio::spawn(async move {
                    if let Err(e) = publish_one(&client, &to, &response).await {
                        tracing::warn!(request_id = %response.id(), transport = "mqtt", error = %e, "could not queue a response");
                    }
                });
            }
            Action::Ground { req, to, .. } => {
                // the loop searches before it acts: this is a bug, answered as one
                tracing::error!(request_id = %req.id, "a document search was skipped");
                let r = crate::request::Rejection {
                    code: crate::scheduler::Code::Internal,
                    message: "the document search was skipped".into(),
                };
                let error = wire::refusal(&req.id, r);
                return self.act(Action::Refuse { to, error }, client, scheduler);
            }
            Action::Ignore => {}
        }
        None
    }

    /// A clean stop: lets the answers the scheduler ended reach the broker, then our own
    /// retained "offline" (the will covers the unclean stops), then DISCONNECT, which tells
    /// the broker not to publish the will.
    async fn close(
        &self,
        client: &Client,
        topics: &Topics,
        scheduler: &Scheduler,
        started: Instant,
        closing: &AtomicBool,
    ) {
        let wait_until = Instant::now() + Duration::from_secs(5);
        while self.open_streams.load(Ordering::Acquire) > 0 && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
    }
}

/// The event loop task: polls the link, forwards incoming messages, reconnects with backoff;
/// never awaits a publish (that deadlocks rumqttc when its request channel is full). Runs until
/// the broker has closed the connection after our DISCONNECT (`closing`), so the last answers
/// and the offline status are delivered.
#[allow(clippy::too_many_arguments)]
async fn event_loop(
    mut link: link::Link,
    client: Client,
    topics: Topics,
    svc: MqttService,
    ready: tokio::sync::oneshot::Sender<()>,
    incoming: mpsc::UnboundedSender<Message>,
    closing: Arc<AtomicBool>,
    started: Instant,
) {
    let mut ready = Some(ready);
    let mut backoff = Backoff::default();
    let subscriptions = [
        topics.req.clone(),
        topics.fleet.clone(),
        topics.cancel.clone(),
    ];
    // SUBACKs still to come on this connection: READY and the `ready` status wait for all of
    // them, since a subscribe call returns once the request is queued, before the broker
    // routes anything to us (a request published in between would be dropped by the broker)
    let mut unacked = 0;
    loop {
        match link.poll().await {
            // the DISCONNECT is only queued when this event comes: poll on until the broker
            // closes the connection, so it (and the offline status) is sent
            Ok(LinkEvent::DisconnectSent) => {}
            Ok(LinkEvent::Connected) => {
                tracing::info!(broker = %svc.broker, protocol = ?svc.protocol, "connected to the broker");
                backoff.connected();
                unacked = subscriptions.len();
                let (c, filters) = (client.clone(), subscriptions.clone());
                tokio::spawn(async move {
                    for topic in filters {
                        if let Err(e) = c.subscribe(topic.clone()).await {
                            tracing::warn!(%topic, error = %e, "subscribe failed");
                        }
                    }
                });
            }
            Ok(LinkEvent::Subscribed) if unacked > 0 => {
                unacked -= 1;
                if unacked == 0 {
                    tracing::info!("subscribed: taking requests");
                    let c = client.clone();
                    let topic = topics.status.clone();
                    let status = svc.status("ready", 0, 0, 0, 0.0, started.elapsed().as_secs());
                    let status = encode(&status, Encoding::Json);
                    let first = ready.take();
                    tokio::spawn(async move {
                        let _ = c
                            .publish(topic, Qos::AtLeastOnce, true, status, OutProps::default())
                            .await;
                        if let Some(tx) = first {
                            let _ = tx.send(());
                        }
                    });
                }
            }
            Ok(LinkEvent::Subscribed) => {}
            Ok(LinkEvent::Message(m)) => {
                let _ = incoming.send(m);
            }
            Ok(LinkEvent::Refused(why)) => tracing::warn!(broker = %svc.broker, "{why}"),
            Ok(LinkEvent::Other) => {}
            Err(_) if closing.load(Ordering::Acquire) => break,
            Err(e) => {
                let (wait, failures, log) = backoff.failed();
                if log {
                    tracing::warn!(broker = %svc.broker, error = %e, retry_in_ms = wait.as_millis() as u64, failures, held = link.held(), dropped = link.dropped(), "broker connection failed");
                }
                tokio::time::sleep(wait).await;
            }
        }
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
        content_type: Some(to.encoding.content_type().to_string()),
    };
    let (c, topic) = (client.clone(), to.topic.clone());
    async move {
        c.publish(topic, Qos::AtLeastOnce, false, payload, props)
            .await
    }
}

/// Publishes a request's replies in order until its final one.
fn stream_replies(
    client: Client,
    to: ReplyTo,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    open: Arc<AtomicUsize>,
) {
    open.fetch_add(1, Ordering::AcqRel);
    tokio::spawn(async move {
        while let Some(r) = rx.recv().await {
            let last = r.is_final();
            let response = wire::response(r);
            if let Err(e) = publish_one(&client, &to, &response).await {
                tracing::warn!(request_id = %response.id(), transport = "mqtt", error = %e, "could not queue a response");
            }
            if last {
                break;
            }
        }
        open.fetch_sub(1, Ordering::AcqRel);
    });
}
