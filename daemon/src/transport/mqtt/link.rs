//! One connection to the broker, over rumqttc's v5 or v3.1.1 client: the service sees the same
//! client handle and events whichever version the config names.
//!
//! It also holds answers across an outage. rumqttc moves unacknowledged and queued publishes
//! into its `pending` list when the connection drops, then clears that list when the next
//! broker has no session for us (a restarted broker never does). So on each drop the link
//! takes those publishes into its own bounded list, and puts them back at the head of
//! `pending` the moment the next CONNACK arrives, before anything newer is sent.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{
    self as v5b, LastWill as V5Will, Packet as V5Packet, PublishProperties,
};
use rumqttc::v5::{self, mqttbytes::QoS as V5QoS};
use rumqttc::{Outgoing, TlsConfiguration, Transport};

use crate::config::{Broker, MqttSection, Protocol};

/// Largest packet accepted from the broker: bigger than any valid request, so an oversized one
/// still reaches us and gets a `too_large` answer instead of being dropped unseen.
pub const MAX_PACKET: u32 = 2 * 1024 * 1024;

/// Why the link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A TLS file is missing or unreadable.
    #[error("{what} {path}: {reason}")]
    TlsFile {
        /// `ca_file`, `client_cert` or `client_key`.
        what: &'static str,
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the certificates.
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// Delivery guarantee of one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    /// Fire and forget (telemetry).
    AtMostOnce,
    /// Acknowledged, redelivered (everything else).
    AtLeastOnce,
}

/// v5 properties of an outgoing message (ignored on 3.1.1).
#[derive(Debug, Clone, Default)]
pub struct OutProps {
    /// Echo of the request's correlation data.
    pub correlation: Option<Bytes>,
    /// MIME type of the payload.
    pub content_type: Option<String>,
}

/// An incoming publish, whichever the protocol.
#[derive(Debug, Clone)]
pub struct Message {
    /// Topic it came on.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// The broker's redelivery flag.
    pub dup: bool,
    /// v5 Response Topic.
    pub response_topic: Option<String>,
    /// v5 Correlation Data.
    pub correlation: Option<Bytes>,
    /// v5 Content Type.
    pub content_type: Option<String>,
}

/// What one turn of the event loop produced.
#[derive(Debug)]
pub enum LinkEvent {
    /// A CONNACK: (re)subscribe and announce.
    Connected,
    /// A SUBACK granting every filter of one SUBSCRIBE: the broker routes them to us now.
    Subscribed,
    /// A message on one of our subscriptions.
    Message(Message),
    /// Our DISCONNECT has been written.
    DisconnectSent,
    /// The broker refused something (subscription, publish): log it.
    Refused(String),
    /// Anything else.
    Other,
}

/// Cloneable handle to publish and subscribe.
#[derive(Clone)]
pub enum Client {
    /// MQTT 5.
    V5(v5::AsyncClient),
    /// MQTT 3.1.1.
    V311(rumqttc::AsyncClient),
}

fn v5_qos(q: Qos) -> V5QoS {
    match q {
        Qos::AtMostOnce => V5QoS::AtMostOnce,
        Qos::AtLeastOnce => V5QoS::AtLeastOnce,
    }
}

fn v4_qos(q: Qos) -> rumqttc::QoS {
    match q {
        Qos::AtMostOnce => rumqttc::QoS::AtMostOnce,
        Qos::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
    }
}

impl Client {
    /// Queues a publish; waits only when rumqttc's request channel is full.
    pub async fn publish(
        &self,
        topic: String,
        qos: Qos,
        retain: bool,
        payload: Vec<u8>,
        props: OutProps,
    ) -> Result<(), String> {
        match self {
            Client::V5(c) => {
                let p = PublishProperties {
                    correlation_data: props.correlation,
                    content_type: props.content_type,
                    ..PublishProperties::default()
                };
                c.publish_with_properties(topic, v5_qos(qos), retain, payload, p)
                    .await
                    .map_err(|e| e.to_string())
            }
            Client::V311(c) => c
                .publish(topic, v4_qos(qos), retain, payload)
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Subscribes at QoS 1.
    pub async fn subscribe(&self, filter: String) -> Result<(), String> {
        match self {
            Client::V5(c) => c.subscribe(filter, V5QoS::AtLeastOnce).await,
            Client::V311(c) => {
                return c
                    .subscribe(filter, rumqttc::QoS::AtLeastOnce)
                    .await
                    .map_err(|e| e.to_string());
            }
        }
        .map_err(|e| e.to_string())
    }

    /// Queues a DISCONNECT (so the broker drops our will).
    pub async fn disconnect(&self) -> Result<(), String> {
        match self {
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V311(c) => c.disconnect().await.map_err(|e| e.to_string()),
        }
    }
}

enum Loop {
    V5(Box<v5::EventLoop>, VecDeque<v5::Request>),
    V311(Box<rumqttc::EventLoop>, VecDeque<rumqttc::Request>),
}

/// The event loop side: poll it from one task only.
pub struct Link {
    inner: Loop,
    hold: usize,
    dropped: u64,
}

/// What `connect` needs besides the config.
pub struct Identity<'a> {
    /// MQTT client id.
    pub client_id: String,
    /// Where the broker is.
    pub broker: &'a Broker,
    /// Protocol to speak.
    pub protocol: Protocol,
    /// Retained will: topic and payload.
    pub will: (String, Vec<u8>),
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, LinkError> {
    std::fs::read(path).map_err(|e| LinkError::TlsFile {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// rustls client config with ring as the provider (no process-wide default is installed, so
/// nothing else in the process is affected).
fn tls_config(c: &MqttSection) -> Result<Arc<rustls::ClientConfig>, LinkError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &c.tls.ca_file {
        let pem = read_pem("ca_file", ca)?;
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| LinkError::TlsFile {
                what: "ca_file",
                path: ca.display().to_string(),
                reason: e.to_string(),
            })?;
            roots
                .add(cert)
                .map_err(|e| LinkError::Tls(format!("CA certificate: {e}")))?;
            n += 1;
        }
        if n == 0 {
            return Err(LinkError::TlsFile {
                what: "ca_file",
                path: ca.display().to_string(),
                reason: "no PEM certificate in it".into(),
            });
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| LinkError::Tls(e.to_string()))?
    .with_root_certificates(roots);
    let config = match (&c.tls.client_cert, &c.tls.client_key) {
        (Some(cert), Some(key)) => {
            let cert_pem = read_pem("client_cert", cert)?;
            let chain = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| LinkError::TlsFile {
                    what: "client_cert",
                    path: cert.display().to_string(),
                    reason: e.to_string(),
                })?;
            let key_pem = read_pem("client_key", key)?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| LinkError::TlsFile {
                what: "client_key",
                path: key.display().to_string(),
                reason: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| LinkError::Tls(format!("client certificate: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Builds the client handle and its event loop; nothing connects until `Link::poll`.
pub fn connect(c: &MqttSection, id: Identity<'_>, cap: usize) -> Result<(Client, Link), LinkError> {
    let transport = if id.broker.tls {
        Transport::Tls(TlsConfiguration::Rustls(tls_config(c)?))
    } else {
        Transport::Tcp
    };
    let keep_alive = Duration::from_secs(c.keepalive_s);
    // an answer is many small publishes: Nagle plus delayed ACKs would hold each for ~40 ms
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    let (client, inner) = match id.protocol {
        Protocol::V5 => {
            let mut o = v5::MqttOptions::new(id.client_id, id.broker.host.clone(), id.broker.port);
            o.set_keep_alive(keep_alive);
            o.set_max_packet_size(Some(MAX_PACKET));
            o.set_clean_start(true);
            o.set_transport(transport);
            if let Some(user) = &c.username {
                o.set_credentials(user.clone(), c.password.clone().unwrap_or_default());
            }
            o.set_last_will(V5Will::new(
                id.will.0,
                id.will.1,
                V5QoS::AtLeastOnce,
                true,
                None,
            ));
            o.set_network_options(net);
            let (cl, ev) = v5::AsyncClient::new(o, cap);
            (Client::V5(cl), Loop::V5(Box::new(ev), VecDeque::new()))
        }
        Protocol::V311 => {
            let mut o =
                rumqttc::MqttOptions::new(id.client_id, id.broker.host.clone(), id.broker.port);
            o.set_keep_alive(keep_alive);
            o.set_max_packet_size(MAX_PACKET as usize, MAX_PACKET as usize);
            o.set_clean_session(true);
            o.set_transport(transport);
            if let Some(user) = &c.username {
                o.set_credentials(user.clone(), c.password.clone().unwrap_or_default());
            }
            o.set_last_will(rumqttc::LastWill::new(
                id.will.0,
                id.will.1,
                rumqttc::QoS::AtLeastOnce,
                true,
            ));
            let (cl, mut ev) = rumqttc::AsyncClient::new(o, cap);
            ev.set_network_options(net);
            (Client::V311(cl), Loop::V311(Box::new(ev), VecDeque::new()))
        }
    };
    Ok((
        client,
        Link {
            inner,
            hold: c.hold,
            dropped: 0,
        },
    ))
}

impl Link {
    /// One turn of the event loop. An error means the connection is down; calling again
    /// reconnects (the caller sleeps between tries).
    pub async fn poll(&mut self) -> Result<LinkEvent, String> {
        let hold = self.hold;
        match &mut self.inner {
            Loop::V5(ev, held) => match ev.poll().await {
                Ok(v5::Event::Incoming(V5Packet::ConnAck(_))) => {
                    restore(&mut ev.pending, held);
                    Ok(LinkEvent::Connected)
                }
                Ok(v5::Event::Incoming(V5Packet::Publish(p))) => {
                    let props = p.properties.unwrap_or_default();
                    Ok(LinkEvent::Message(Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                        dup: p.dup,
                        response_topic: props.response_topic,
                        correlation: props.correlation_data,
                        content_type: props.content_type,
                    }))
                }
                Ok(v5::Event::Incoming(V5Packet::SubAck(s))) => {
                    let bad: Vec<_> = s
                        .return_codes
                        .iter()
                        .filter(|c| !matches!(c, v5b::SubscribeReasonCode::Success(_)))
                        .map(|c| format!("{c:?}"))
                        .collect();
                    Ok(if bad.is_empty() {
                        LinkEvent::Subscribed
                    } else {
                        LinkEvent::Refused(format!("subscription refused: {}", bad.join(", ")))
                    })
                }
                Ok(v5::Event::Incoming(V5Packet::PubAck(a)))
                    if !matches!(
                        a.reason,
                        v5b::PubAckReason::Success | v5b::PubAckReason::NoMatchingSubscribers
                    ) =>
                {
                    Ok(LinkEvent::Refused(format!(
                        "publish refused: {:?}",
                        a.reason
                    )))
                }
                Ok(v5::Event::Outgoing(Outgoing::Disconnect)) => Ok(LinkEvent::DisconnectSent),
                Ok(_) => Ok(LinkEvent::Other),
                Err(e) => {
                    let taken = keep_publishes(&mut ev.pending, held, hold, |r| match r {
                        v5::Request::Publish(p) if p.qos != V5QoS::AtMostOnce => {
                            p.pkid = 0;
                            p.dup = false;
                            true
                        }
                        _ => false,
                    });
                    self.dropped += taken;
                    Err(match e {
                        v5::ConnectionError::ConnectionRefused(code) => {
                            format!("the broker refused the connection: {code:?}")
                        }
                        e => e.to_string(),
                    })
                }
            },
            Loop::V311(ev, held) => match ev.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    restore(&mut ev.pending, held);
                    Ok(LinkEvent::Connected)
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    Ok(LinkEvent::Message(Message {
                        topic: p.topic,
                        payload: p.payload,
                        dup: p.dup,
                        response_topic: None,
                        correlation: None,
                        content_type: None,
                    }))
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(s))) => Ok(
                    if s.return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        LinkEvent::Refused("subscription refused by the broker".into())
                    } else {
                        LinkEvent::Subscribed
                    },
                ),
                Ok(rumqttc::Event::Outgoing(Outgoing::Disconnect)) => Ok(LinkEvent::DisconnectSent),
                Ok(_) => Ok(LinkEvent::Other),
                Err(e) => {
                    let taken = keep_publishes(&mut ev.pending, held, hold, |r| match r {
                        rumqttc::Request::Publish(p) if p.qos != rumqttc::QoS::AtMostOnce => {
                            p.pkid = 0;
                            p.dup = false;
                            true
                        }
                        _ => false,
                    });
                    self.dropped += taken;
                    Err(match e {
                        rumqttc::ConnectionError::ConnectionRefused(code) => {
                            format!("the broker refused the connection: {code:?}")
                        }
                        e => e.to_string(),
                    })
                }
            },
        }
    }

    /// Messages held for the next connection.
    pub fn held(&self) -> usize {
        match &self.inner {
            Loop::V5(_, h) => h.len(),
            Loop::V311(_, h) => h.len(),
        }
    }

    /// Held messages dropped because the hold was full, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// Moves the QoS 1 publishes out of rumqttc's `pending` into `held` (oldest dropped beyond
/// `cap`); returns how many were dropped.
fn keep_publishes<R>(
    pending: &mut VecDeque<R>,
    held: &mut VecDeque<R>,
    cap: usize,
    mut keep: impl FnMut(&mut R) -> bool,
) -> u64 {
    let mut dropped = 0;
    for mut r in pending.drain(..) {
        if keep(&mut r) {
            if held.len() == cap {
                held.pop_front();
                dropped += 1;
            }
            held.push_back(r);
        }
    }
    dropped
}

/// Puts held messages back ahead of whatever rumqttc still has queued.
fn restore<R>(pending: &mut VecDeque<R>, held: &mut VecDeque<R>) {
    if held.is_empty() {
        return;
    }
    tracing::info!(
        messages = held.len(),
        "sending the answers held while the broker was away"
    );
    let newer = std::mem::take(pending);
    pending.extend(held.drain(..));
    pending.extend(newer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hold_is_bounded_and_keeps_order() {
        let mut pending: VecDeque<u32> = (0..10).collect();
        let mut held = VecDeque::new();
        let dropped = keep_publishes(&mut pending, &mut held, 4, |r| *r % 2 == 0);
        assert_eq!(dropped, 1, "0 2 4 6 8 kept, the oldest (0) dropped");
        assert_eq!(held, [2, 4, 6, 8]);
        let mut pending: VecDeque<u32> = [100, 101].into();
        restore(&mut pending, &mut held);
        assert_eq!(pending, [2, 4, 6, 8, 100, 101]);
        assert!(held.is_empty());
    }
}
