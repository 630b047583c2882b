//! MQTT helpers of the end-to-end tests: a test client, answer readers, daemon configs, and a
//! test PKI (CA, broker and client certificates) made fresh for each test.

#![allow(clippy::unwrap_used)] // test harness: a failed unwrap is a failed assertion

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fieldllmd::proto::v1::{self, response::Kind};
use fieldllmd::proto::{ErrorCode, Response};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

use crate::model_dir;

/// Longest wait for one message.
pub const WAIT: Duration = Duration::from_secs(30);

/// A test client (MQTT 5) whose incoming publishes queue on a channel.
pub struct Client {
    /// The rumqttc handle.
    pub c: AsyncClient,
    rx: mpsc::UnboundedReceiver<Publish>,
    /// One item per SUBACK, in order: `sub` waits for its own.
    subacks: tokio::sync::Mutex<mpsc::UnboundedReceiver<()>>,
}

impl Client {
    /// Connects to 127.0.0.1:`port` as `id`.
    pub async fn connect(port: u16, id: &str) -> Client {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_max_packet_size(Some(4 * 1024 * 1024));
        Client::connect_with(o).await
    }

    /// Connects with these options (TLS, login, persistent session); reconnects on its own.
    pub async fn connect_with(o: MqttOptions) -> Client {
        let (c, mut ev) = AsyncClient::new(o, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ack_tx, subacks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(p).is_err() {
                            break;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ack_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Client {
            c,
            rx,
            subacks: tokio::sync::Mutex::new(subacks),
        }
    }

    /// Subscribes at QoS 1 and returns once the broker's SUBACK says it is live.
    pub async fn sub(&self, topic: &str) {
        let mut acks = self.subacks.lock().await;
        self.c.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
        tokio::time::timeout(WAIT, acks.recv())
            .await
            .unwrap_or_else(|_| panic!("no SUBACK for {topic} in {WAIT:?}"))
            .expect("client open");
    }

    /// The next message (panics after `WAIT`).
    pub async fn next(&mut self) -> Publish {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("a message in time")
            .expect("client open")
    }

    /// The next message within `wait`, if any.
    pub async fn try_next(&mut self, wait: Duration) -> Option<Publish> {
        tokio::time::timeout(wait, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits until the node's retained status says `state`.
    pub async fn wait_status(&mut self, node: &str, state: &str) {
        self.sub(&format!("fieldllm/v1/{node}/status")).await;
        loop {
            let p = self.next().await;
            let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            if v["state"] == state {
                return;
            }
        }
    }

    /// Publishes a request to `node`.
    pub async fn request(&self, node: &str, payload: impl Into<Bytes>, props: PublishProperties) {
        self.c
            .publish_with_properties(
                format!("fieldllm/v1/{node}/req"),
                QoS::AtLeastOnce,
                false,
                payload.into(),
                props,
            )
            .await
            .unwrap();
    }
}

/// v5 properties asking for the answer on `topic` with correlation data `corr`.
pub fn reply_props(topic: &str, corr: &[u8]) -> PublishProperties {
    PublishProperties {
        response_topic: Some(topic.into()),
        correlation_data: Some(Bytes::copy_from_slice(corr)),
        ..PublishProperties::default()
    }
}

/// Decodes a JSON response.
pub fn json(p: &Publish) -> Response {
    serde_json::from_slice(&p.payload).unwrap_or_else(|e| panic!("{e}: {:?}", p.payload))
}

/// Reads one answer: chunks in seq order, then the final; returns (chunks' text, final).
pub async fn answer(
    client: &mut Client,
    decode: fn(&Publish) -> Response,
) -> (String, Response, Vec<Publish>) {
    let mut text = String::new();
    let mut seq = 0;
    let mut raw = Vec::new();
    loop {
        let p = client.next().await;
        let r = decode(&p);
        raw.push(p);
        match &r.kind {
            Some(Kind::Chunk(c)) => {
                assert_eq!(c.seq, seq, "chunks arrive in seq order");
                seq += 1;
                text.push_str(&c.text);
            }
            Some(Kind::Done(d)) => {
                assert_eq!(d.seq, seq, "Done.seq follows the last chunk");
                return (text, r, raw);
            }
            Some(Kind::Error(_)) => return (text, r, raw),
            None => panic!("empty response"),
        }
    }
}

/// A daemon config for mosquitto on `port`, the tiny or named model, plus `extra` TOML.
pub fn daemon_config(port: u16, node: &str, model: &str, extra: &str) -> String {
    format!(
        "[model]\npath = {:?}\nthreads = 1\n\n[mqtt]\nbroker = \"mqtt://127.0.0.1:{port}\"\nnode_id = \"{node}\"\ntelemetry_s = 1\n\n[limits]\nmax_prompt_bytes = 2048\nmax_tokens = 64\n{extra}",
        model_dir(model)
    )
}

/// The finish reason of a `Done` (panics on anything else).
pub fn finish(r: &Response) -> v1::FinishReason {
    match &r.kind {
        Some(Kind::Done(d)) => v1::FinishReason::try_from(d.finish_reason).unwrap(),
        other => panic!("expected Done, got {other:?}"),
    }
}

/// The code of an `Error` (panics on anything else).
pub fn code(r: &Response) -> ErrorCode {
    match &r.kind {
        Some(Kind::Error(e)) => ErrorCode::try_from(e.code).unwrap(),
        other => panic!("expected Error, got {other:?}"),
    }
}

/// A CA with a broker certificate (for 127.0.0.1 and localhost) and a client certificate, as
/// PEM files in one directory.
pub struct Pki {
    /// CA certificate.
    pub ca: PathBuf,
    /// Broker certificate and key.
    pub server: (PathBuf, PathBuf),
    /// Client certificate and key.
    pub client: (PathBuf, PathBuf),
}

impl Pki {
    /// Makes one under `dir`.
    pub fn make(dir: &Path) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "fieldllm test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("key");
        let ca_cert = ca.self_signed(&ca_key).expect("CA");
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let mut p = CertificateParams::new(sans).expect("params");
            p.distinguished_name.push(DnType::CommonName, name);
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("key");
            let cert = p.signed_by(&key, &issuer).expect("sign");
            (cert.pem(), key.serialize_pem())
        };
        let server = leaf(
            "broker",
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = leaf("fieldllmd", vec![], ExtendedKeyUsagePurpose::ClientAuth);
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).expect("write pem");
            p
        };
        Pki {
            ca: write("ca.pem", &ca_cert.pem()),
            server: (
                write("server.pem", &server.0),
                write("server.key", &server.1),
            ),
            client: (
                write("client.pem", &client.0),
                write("client.key", &client.1),
            ),
        }
    }

    /// A rustls client config trusting the CA, presenting the client certificate if `cert`.
    pub fn client_config(&self, cert: bool) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca).expect("ca") {
            roots.add(c.expect("ca pem")).expect("add ca");
        }
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
        let config = if cert {
            let chain = CertificateDer::pem_file_iter(&self.client.0)
                .expect("cert")
                .collect::<Result<Vec<_>, _>>()
                .expect("cert pem");
            let key = PrivateKeyDer::from_pem_file(&self.client.1).expect("key");
            b.with_client_auth_cert(chain, key).expect("client auth")
        } else {
            b.with_no_client_auth()
        };
        Arc::new(config)
    }
}

/// A bare MQTT 3.1.1 publisher over TCP, for what client libraries do not let a test do:
/// resend a QoS 1 PUBLISH with the DUP flag and its first packet id, as a device does when
/// its connection broke before the PUBACK came.
pub struct RawPublisher {
    stream: std::net::TcpStream,
}

impl RawPublisher {
    /// Connects as `client_id`; `clean` false keeps the session across reconnects.
    pub fn connect(port: u16, client_id: &str, clean: bool) -> RawPublisher {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut body = Vec::new();
        put_str(&mut body, "MQTT");
        body.push(4); // protocol level: 3.1.1
        body.push(if clean { 0x02 } else { 0x00 });
        body.extend_from_slice(&60u16.to_be_bytes()); // keep alive
        put_str(&mut body, client_id);
        stream.write_all(&packet(0x10, &body)).unwrap();
        let mut ack = [0u8; 4];
        stream.read_exact(&mut ack).unwrap();
        assert_eq!((ack[0], ack[3]), (0x20, 0), "CONNACK accepted: {ack:?}");
        RawPublisher { stream }
    }

    /// Sends a QoS 1 PUBLISH with packet id `pid`, the DUP flag as given; does not wait for
    /// the PUBACK (the broker acknowledges, and nobody reads it: a device that lost it).
    pub fn publish(&mut self, topic: &str, payload: &[u8], pid: u16, dup: bool) {
        use std::io::Write as _;
        let mut body = Vec::new();
        put_str(&mut body, topic);
        body.extend_from_slice(&pid.to_be_bytes());
        body.extend_from_slice(payload);
        let first = 0x30 | 0x02 | if dup { 0x08 } else { 0 };
        self.stream.write_all(&packet(first, &body)).unwrap();
        self.stream.flush().unwrap();
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Fixed header (type and flags, variable-length remaining length) and body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}
