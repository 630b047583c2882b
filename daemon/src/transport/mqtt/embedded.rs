//! `broker = "embedded"`: an in-process MQTT broker (rumqttd) for a zero-config appliance,
//! so `fieldllmd serve` answers `mosquitto_pub` with nothing else installed.
//!
//! rumqttd serves MQTT 3.1.1 on one port and v5 on another; the embedded one serves 3.1.1
//! only, the version every client speaks by default, and the daemon talks to it in 3.1.1 too
//! (answers then go to the default response topic).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// Another program holds the port.
    #[error(
        "cannot listen on {addr} for the embedded broker: {source}. Is another MQTT broker running there? Then set [mqtt] broker = \"mqtt://{addr}\" to use it, or embedded_listen to another address"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// This build has no embedded broker.
    #[error(
        "this fieldllmd was built without the embedded broker (cargo feature embedded-broker): set [mqtt] broker = \"mqtt://HOST:PORT\""
    )]
    NotBuilt,
    /// The broker's thread could not start or never listened.
    #[error("embedded broker: {0}")]
    Start(String),
}

/// Starts the broker on `listen` and returns once it accepts connections. It runs on its own
/// threads until the process ends.
#[cfg(feature = "embedded-broker")]
pub fn start(listen: SocketAddr, max_payload: usize) -> Result<(), EmbeddedError> {
    use std::collections::HashMap;

    use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

    // rumqttd only logs a failed bind from its own thread; find out first, with a clear error
    drop(
        std::net::TcpListener::bind(listen).map_err(|source| EmbeddedError::Bind {
            addr: listen,
            source,
        })?,
    );
    let server = ServerSettings {
        name: "embedded-v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            // above any request the daemon accepts, so it can answer `too_large` itself
            max_payload_size: max_payload.max(super::link::MAX_PACKET as usize),
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1024,
            max_outgoing_packet_count: 200,
            // small segments: an appliance keeps little message history in memory
            max_segment_size: 1 << 20,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("embedded".to_string(), server)])),
        ..Config::default()
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| EmbeddedError::Start(e.to_string()))?;
    // ready once it accepts (the probe's abrupt close is logged by rumqttd's server module,
    // which the default log filter silences)
    let until = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err() {
        if Instant::now() > until {
            return Err(EmbeddedError::Start(format!(
                "not listening on {listen} after 5 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(%listen, protocol = "3.1.1", "embedded broker listening");
    Ok(())
}

/// Without the `embedded-broker` feature there is nothing to start.
#[cfg(not(feature = "embedded-broker"))]
pub fn start(_listen: SocketAddr, _max_payload: usize) -> Result<(), EmbeddedError> {
    Err(EmbeddedError::NotBuilt)
}
