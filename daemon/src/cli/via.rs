//! `fieldllmd ask --via mqtt://HOST:PORT`: ask a running daemon instead of loading the model.
//!
//! It speaks MQTT 3.1.1, which every broker (the embedded one included) understands, and
//! listens on the design's default response topic, `{prefix}/{node}/resp/{id}`; a fleet
//! question's answer comes from whichever node took it, hence `+` for the node.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use fieldllmd::config::parse_broker;
use fieldllmd::proto::v1::{self, response::Kind};
use fieldllmd::proto::{ErrorCode, Request, Response};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;

/// A grounded answer's citations as `ask --docs` prints them: the quote, then one line per
/// source (`[1] doc §section p.N`); nothing for an answer from the model alone.
fn cited(d: &v1::Done) -> String {
    if d.sources.is_empty() {
        return String::new();
    }
    let mut s = String::new();
    if !d.quote.is_empty() {
        s.push_str(&format!("From [1]: \"{}\"\n", d.quote));
    }
    s.push_str("Sources:\n");
    for (i, src) in d.sources.iter().enumerate() {
        let source = fieldllmd::docs::ground::Source {
            n: i + 1,
            doc: src.doc.clone(),
            section: src.section.clone(),
            page: src.page,
            score: src.score,
            similarity: src.similarity,
            text: String::new(),
        };
        s.push_str(&source.line());
        s.push('\n');
    }
    s
}

/// Longest silence before giving up on an answer.
const SILENCE: Duration = Duration::from_secs(60);

/// Sends `req` through the broker at `url` to `node` (or the fleet topic) and streams the
/// answer to stdout. Logprobs, when asked for, print as JSON lines like local `ask`.
pub fn ask(
    url: &str,
    prefix: &str,
    node: Option<&str>,
    req: Request,
    json_lines: bool,
) -> anyhow::Result<()> {
    let broker = parse_broker(url).map_err(anyhow::Error::msg)?;
    if broker.tls {
        bail!(
            "ask --via takes mqtt:// brokers only; ask a TLS broker with mosquitto_pub and mosquitto_sub"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let me = format!("fieldllmd-ask-{}", std::process::id());
        let mut o = MqttOptions::new(me.clone(), broker.host.clone(), broker.port);
        o.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        let (client, mut events) = AsyncClient::new(o, 16);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        events.set_network_options(net);
        let reply_topic = format!("{prefix}/{}/resp/{}", node.unwrap_or("+"), req.id);
        let req_topic = match node {
            Some(n) => format!("{prefix}/{n}/req"),
            None => format!("{prefix}/fleet/req"),
        };
        let payload = serde_json::to_vec(&req)?;
        let mut out = std::io::stdout().lock();
        let mut subscribed = false;
        loop {
            let ev = tokio::time::timeout(SILENCE, events.poll())
                .await
                .with_context(|| format!("no answer from {url} within {} s (is a daemon serving {req_topic}?)", SILENCE.as_secs()))?;
            match ev.with_context(|| format!("MQTT broker {url}"))? {
                Event::Incoming(Packet::ConnAck(_)) if !subscribed => {
                    subscribed = true;
                    client.subscribe(reply_topic.clone(), QoS::AtLeastOnce).await?;
                }
                Event::Incoming(Packet::SubAck(_)) => {
                    client.publish(req_topic.clone(), QoS::AtLeastOnce, false, payload.clone()).await?;
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let r: Response = serde_json::from_slice(&p.payload).context("undecodable answer")?;
                    match r.kind {
                        Some(Kind::Chunk(c)) if json_lines => {
                            for lp in c.logprobs {
                                let top: Vec<_> = lp.top.iter().map(|t| json!({"id": t.token_id, "token": t.token, "logprob": t.logprob})).collect();
                                writeln!(out, "{}", json!({"id": lp.token_id, "token": lp.token, "logprob": lp.logprob, "top_logprobs": top}))?;
                            }
                            if !c.text.is_empty() {
                                writeln!(out, "{}", json!({"text": c.text}))?;
                            }
                        }
                        Some(Kind::Chunk(c)) => {
                            write!(out, "{}", c.text)?;
                            out.flush()?;
                        }
                        Some(Kind::Done(d)) => {
                            let finish = v1::FinishReason::try_from(d.finish_reason).map(|f| f.as_str_name()).unwrap_or("?");
                            if json_lines {
                                let sources: Vec<_> = d.sources.iter().map(|s| json!({"doc": s.doc, "section": s.section, "page": s.page, "score": s.score, "similarity": s.similarity})).collect();
                                writeln!(out, "{}", json!({"finish_reason": finish, "usage": d.usage.map(|u| json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens})), "sources": sources, "quote": d.quote}))?;
                            } else {
                                writeln!(out)?;
                                write!(out, "{}", cited(&d))?;
                            }
                            let _ = client.disconnect().await;
                            return Ok(());
                        }
                        Some(Kind::Error(e)) => {
                            let code = ErrorCode::try_from(e.code).map(|c| c.as_str_name()).unwrap_or("?");
                            let _ = client.disconnect().await;
                            bail!("the daemon refused the question ({code}): {}", e.message);
                        }
                        None => bail!("empty answer message"),
                    }
                }
                _ => {}
            }
        }
    })
}
