//! Serial links (DESIGN.md section 5): the technician console and the framed device protocol.
//!
//! Each configured port has one task that owns it: open (exclusively), serve in its mode until
//! the port fails, then try to reopen it every half second, so an unplugged USB adapter comes
//! back by itself. Ports are independent of each other and of MQTT.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_serial::SerialPortBuilderExt;

use crate::config::{SerialMode, SerialSection};
use crate::request::Intake;
use crate::scheduler::Scheduler;
use crate::thermal::ThermalView;

pub mod console;
pub use fieldllm_proto::frame;
pub mod framed;
pub mod line;
pub mod tty;

/// What a console shows about the model (the transport never touches the model itself).
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Model name.
    pub name: String,
    /// Weight format.
    pub weights: String,
    /// Context length in tokens.
    pub context: usize,
    /// Parameter count.
    pub parameters: u64,
}

/// What a port's protocol reads to decide (no scheduler: it returns what to submit or cancel,
/// and the port's loop does it).
#[derive(Clone)]
pub struct PortInfo {
    /// Turns requests into jobs.
    pub intake: Intake,
    /// Node id.
    pub node: String,
    /// The served model.
    pub model: ModelInfo,
    /// The firmware bridge's state and readings, for banners, `/thermal` and status.
    pub thermal: ThermalView,
    /// When the daemon started.
    pub started: Instant,
}

/// Everything a port's task needs.
#[derive(Clone)]
pub struct SerialContext {
    /// The scheduler.
    pub scheduler: Scheduler,
    /// What the protocol reads.
    pub info: PortInfo,
}

/// How long between tries to reopen a missing port.
const REOPEN: Duration = Duration::from_millis(500);

fn open(s: &SerialSection) -> Result<tokio_serial::SerialStream, tokio_serial::Error> {
    let path = s.path.to_string_lossy();
    let mut port = tokio_serial::new(path, s.baud)
        .data_bits(tokio_serial::DataBits::Eight)
        .parity(tokio_serial::Parity::None)
        .stop_bits(tokio_serial::StopBits::One)
        .flow_control(tokio_serial::FlowControl::None)
        .open_native_async()?;
    // TIOCEXCL: nobody else opens it while we hold it
    port.set_exclusive(true)?;
    Ok(port)
}

/// Owns one port until `stop` turns true: opens, serves, reopens.
pub async fn run(section: SerialSection, ctx: SerialContext, mut stop: watch::Receiver<bool>) {
    let name = section.path.display().to_string();
    let mode = section.mode;
    let mut missing_logged = false;
    loop {
        if *stop.borrow() {
            return;
        }
        match open(&section) {
            Ok(port) => {
                missing_logged = false;
                tracing::info!(port = %name, ?mode, baud = section.baud, "serial port open");
                let served = match mode {
                    SerialMode::Console => {
                        console::serve(port, &name, ctx.clone(), section.priority(), &mut stop)
                            .await
                    }
                    SerialMode::Framed => {
                        framed::serve(port, &name, ctx.clone(), section.priority(), &mut stop).await
                    }
                };
                match served {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(port = %name, error = %e, "serial port lost; reopening it when it is back")
                    }
                }
            }
            Err(e) => {
                if !missing_logged {
                    tracing::warn!(port = %name, error = %e, "cannot open the serial port; trying again every {} ms", REOPEN.as_millis());
                    missing_logged = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(REOPEN) => {}
            _ = stop.changed() => return,
        }
    }
}
