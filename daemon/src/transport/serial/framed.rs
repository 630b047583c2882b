//! The framed device protocol over a port: frames in, requests to the scheduler, frames out.

use std::collections::HashSet;
use std::time::Instant;

use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::SerialContext;
use super::frame::{self, Feed, Frame, FrameError, Reader};
use crate::docs::ground::Grounding;
use crate::proto::{Request, Status};
use crate::request::{Origin, Rejection, check_id, wants_docs};
use crate::scheduler::{Code, Priority, Reply, Transport};
use crate::transport::wire;

/// The frame that answers a bad one.
fn error_frame(id: &str, code: Code, message: String) -> Frame {
    Frame::Error(wire::refusal(id, Rejection { code, message }))
}

fn to_frame(r: Reply) -> Frame {
    match r {
        Reply::Chunk(c) => Frame::Chunk(wire::chunk(c)),
        Reply::Done(d) => Frame::Done(wire::done(d)),
        Reply::Failed(f) => Frame::Error(wire::failure(f)),
    }
}

async fn write<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> std::io::Result<()> {
    match frame::encode(f) {
        Ok(bytes) => w.write_all(&bytes).await,
        Err(e) => {
            // a chunk is a few tokens and an error message is short: this is a bug, not input
            tracing::error!(error = %e, "response does not fit a frame");
            Ok(())
        }
    }
}

/// Serves one opened port until it fails (returned) or `stop` turns true (`Ok`).
pub async fn serve<P: AsyncRead + AsyncWrite>(
    port: P,
    name: &str,
    ctx: SerialContext,
    priority: Priority,
    stop: &mut watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (mut rd, mut wr) = tokio::io::split(port);
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let mut reader = Reader::new();
    // this port's answers in progress: cancelled if the port goes away
    let mut mine: HashSet<String> = HashSet::new();
    let mut buf = [0u8; 1024];
    let result = loop {
        tokio::select! {
            n = rd.read(&mut buf) => {
                let n = match n {
                    Ok(0) => break Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the port closed")),
                    Ok(n) => n,
                    Err(e) => break Err(e),
                };
                let mut input = &buf[..n];
                loop {
                    let (found, rest) = reader.feed(input);
                    input = rest;
                    let Some(found) = found else { break };
                    let reply = match found {
                        // searched in place: a cancel that follows finds the job submitted
                        Feed::Frame(Frame::Request(req)) if wants_docs(&req) => {
                            let received = Instant::now();
                            let grounding = ctx.info.intake.ground(&req).await;
                            let port = Port { name, ctx: &ctx, priority, tx: &tx };
                            request(req, Some(grounding), received, &port, &mut mine)
                        }
                        found => handle(found, name, &ctx, priority, &tx, &mut mine),
                    };
                    if let Some(reply) = reply
                        && let Err(e) = write(&mut wr, &reply).await
                    {
                        return finish(e, &ctx, &mine);
                    }
                }
            }
            Some(r) = rx.recv() => {
                if r.is_final() {
                    mine.remove(r.id());
                }
                if let Err(e) = write(&mut wr, &to_frame(r)).await {
                    break Err(e);
                }
            }
            _ = stop.changed() => break Ok(()),
        }
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) => finish(e, &ctx, &mine),
    }
}

fn finish(e: std::io::Error, ctx: &SerialContext, mine: &HashSet<String>) -> std::io::Result<()> {
    for id in mine {
        let found = ctx.scheduler.cancel(id);
        tracing::info!(transport = "framed", request_id = %id, found, "serial port gone: answer cancelled");
    }
    Err(e)
}

/// The port a request came on.
struct Port<'a> {
    name: &'a str,
    ctx: &'a SerialContext,
    priority: Priority,
    tx: &'a mpsc::UnboundedSender<Reply>,
}

/// Submits a request (with its document search's result when it asked for one), or the
/// frame that refuses it.
fn request(
    req: Request,
    grounding: Option<Result<Grounding, Rejection>>,
    received: Instant,
    port: &Port<'_>,
    mine: &mut HashSet<String>,
) -> Option<Frame> {
    let id = req.id.clone();
    let name = port.name;
    // the port's priority, whatever the request says
    let origin = Origin::new(Transport::Framed).at(port.priority);
    let job = match grounding {
        Some(g) => g.and_then(|g| port.ctx.info.intake.job(req, Some(g), origin, received)),
        None => port.ctx.info.intake.job(req, None, origin, received),
    };
    let job = match job {
        Ok(job) => job,
        Err(r) => {
            let id = if check_id(&id).is_ok() {
                id
            } else {
                String::new()
            };
            tracing::info!(transport = "framed", request_id = %id, port = %name, code = ?r.code, reason = %r.message, "framed request refused");
            return Some(Frame::Error(wire::refusal(&id, r)));
        }
    };
    tracing::info!(transport = "framed", request_id = %id, port = %name, "framed request");
    mine.insert(id);
    port.ctx.scheduler.submit(job, port.tx.clone());
    None
}

fn handle(
    found: Feed,
    name: &str,
    ctx: &SerialContext,
    priority: Priority,
    tx: &mpsc::UnboundedSender<Reply>,
    mine: &mut HashSet<String>,
) -> Option<Frame> {
    let received = Instant::now();
    let f = match found {
        Feed::Frame(f) => f,
        Feed::Error(e) => {
            tracing::info!(port = %name, error = %e, "bad frame dropped");
            let code = match e {
                FrameError::Oversized => Code::TooLarge,
                _ => Code::BadRequest,
            };
            return Some(error_frame("", code, format!("bad frame: {e}")));
        }
    };
    match f {
        Frame::Request(req) => {
            let port = Port {
                name,
                ctx,
                priority,
                tx,
            };
            request(req, None, received, &port, mine)
        }
        Frame::Cancel(c) => {
            let found = ctx.scheduler.cancel(&c.id);
            tracing::info!(transport = "framed", request_id = %c.id, port = %name, found, "framed cancel");
            None
        }
        Frame::StatusQuery => {
            let s = ctx.scheduler.stats();
            let mut status = Status {
                node: ctx.info.node.clone(),
                model: ctx.info.model.name.clone(),
                state: "ready".into(),
                thermal: ctx.info.thermal.state().as_str().into(),
                accelerator: ctx.info.thermal.accelerator(),
                queue_depth: s.queued as u32,
                running: s.running as u32,
                decode_tok_s: s.last_decode_tok_s,
                uptime_s: ctx.info.started.elapsed().as_secs(),
                answered: s.answered,
            };
            // a board with many sensors could overflow a frame: keep the summary, drop the lists
            if status.encoded_len() + 16 > frame::MAX_FRAME
                && let Some(a) = &mut status.accelerator
            {
                a.temps_c.clear();
                a.rails_w.clear();
                a.clocks_mhz.clear();
                a.fans_rpm.clear();
                a.cooling.clear();
            }
            Some(Frame::Status(Box::new(status)))
        }
        other => Some(error_frame(
            "",
            Code::BadRequest,
            format!("frames of this kind go from the appliance to the host, not back: {other:?}")
                .chars()
                .take(200)
                .collect(),
        )),
    }
}
