//! The technician console: a person at picocom, minicom or screen on a serial port.
//!
//! `Console` is the state of one terminal (line editor, conversation, settings, the running
//! answer) and turns input bytes and scheduler responses into bytes to write; `serve` drives
//! it over a port. It submits to the scheduler like any transport and never touches the model.

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::SerialContext;
use super::line::{LineEditor, LineEvent, MAX_LINE};
use crate::proto::v1::{self, response::Kind};
use crate::proto::{ErrorCode, Request, Response};
use crate::request::{Priority, validate};
use crate::scheduler::Conversation;

/// The prompt.
pub const PROMPT: &[u8] = b"fieldllm> ";

const HELP: &str = "\
Type a question and press Enter; the answer streams as it is written.
Follow-up questions continue the conversation.
  /help              this text
  /status            node, queue, answers so far, speed
  /thermal           accelerator temperature state
  /model             the model being served
  /cancel            stop the running answer (or press Ctrl-C)
  /set KEY VALUE     temperature, top_p, top_k, min_p, max_tokens, seed, system
  /set               show the settings
  /reset             start a new conversation
";

/// One terminal's state.
pub struct Console {
    ctx: SerialContext,
    port: String,
    priority: Priority,
    editor: LineEditor,
    history: Vec<v1::Message>,
    conversation: Conversation,
    settings: Request,
    system: Option<String>,
    running: Option<Running>,
    asked: u64,
    /// The daemon's own terminal: Ctrl-D on an empty line stops the daemon.
    local: bool,
    quit: bool,
}

struct Running {
    id: String,
    question: String,
    answer: String,
    /// The question was sent without the history after the context filled.
    fresh: bool,
}

/// Terminal text: LF becomes CR LF (raw terminals do not return the carriage themselves).
fn crlf(text: &str, out: &mut Vec<u8>) {
    for b in text.bytes() {
        if b == b'\n' {
            out.extend_from_slice(b"\r\n");
        } else {
            out.push(b);
        }
    }
}

impl Console {
    /// A console on `port` submitting at `priority`.
    pub fn new(ctx: SerialContext, port: &str, priority: Priority) -> Console {
        Console {
            ctx,
            port: port.to_string(),
            priority,
            editor: LineEditor::new(),
            history: Vec::new(),
            conversation: Conversation::new(),
            settings: Request::default(),
            system: None,
            running: None,
            asked: 0,
            local: false,
            quit: false,
        }
    }

    /// Banner and first prompt.
    pub fn banner(&self) -> Vec<u8> {
        let m = &self.ctx.model;
        let mut out = Vec::new();
        crlf(
            &format!(
                "\nfieldllm {} on {}\nmodel {} ({} weights, {} tokens of context), thermal {}\nType a question, or /help.\n",
                env!("CARGO_PKG_VERSION"),
                self.ctx.node,
                m.name,
                m.weights,
                m.context,
                self.ctx.thermal.summary()
            ),
            &mut out,
        );
        if self.local {
            crlf(
                "This is the daemon's own terminal: Ctrl-D on an empty line stops it.\n",
                &mut out,
            );
        }
        out.extend_from_slice(PROMPT);
        out
    }

    /// Whether an answer is streaming.
    pub fn busy(&self) -> bool {
        self.running.is_some()
    }

    /// Handles bytes from the terminal; returns what to write back.
    pub fn input(&mut self, bytes: &[u8], sink: &mpsc::UnboundedSender<Response>) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in bytes {
            if let Some(r) = &self.running {
                // while an answer streams only Ctrl-C counts; typing waits for the prompt
                if b == 0x03 {
                    let found = self.ctx.scheduler.cancel(&r.id);
                    tracing::info!(transport = "console", request_id = %r.id, port = %self.port, found, "console cancel");
                }
                continue;
            }
            let mut echo = Vec::new();
            let event = self.editor.push(b, &mut echo);
            out.extend_from_slice(&echo);
            match event {
                None => {}
                Some(LineEvent::Line(line)) => self.line(line.trim(), sink, &mut out),
                Some(LineEvent::EndOfInput) if self.local => {
                    crlf("\n[stopping fieldllmd]\n", &mut out);
                    self.quit = true;
                    return out;
                }
                Some(LineEvent::Interrupt) | Some(LineEvent::EndOfInput) => {
                    out.extend_from_slice(PROMPT)
                }
                Some(LineEvent::TooLong) => {
                    crlf(
                        &format!("That line is longer than {MAX_LINE} bytes; it was dropped.\n"),
                        &mut out,
                    );
                    out.extend_from_slice(PROMPT);
                }
                Some(LineEvent::NotText) => {
                    crlf("That line was not UTF-8 text; it was dropped.\n", &mut out);
                    out.extend_from_slice(PROMPT);
                }
            }
        }
        out
    }

    fn line(&mut self, line: &str, sink: &mpsc::UnboundedSender<Response>, out: &mut Vec<u8>) {
        if line.is_empty() {
            out.extend_from_slice(PROMPT);
            return;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            crlf(&self.command(cmd), out);
            out.extend_from_slice(PROMPT);
            return;
        }
        if !self.ask(line, false, sink, out) {
            out.extend_from_slice(PROMPT);
        }
    }

    /// Submits a question; false if it was refused before reaching the scheduler.
    fn ask(
        &mut self,
        question: &str,
        fresh: bool,
        sink: &mpsc::UnboundedSender<Response>,
        out: &mut Vec<u8>,
    ) -> bool {
        self.asked += 1;
        let id = format!("console-{}-{}", self.port_tag(), self.asked);
        let mut messages = Vec::new();
        if let Some(s) = &self.system {
            messages.push(v1::Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        messages.extend(self.history.iter().cloned());
        messages.push(v1::Message {
            role: "user".into(),
            content: question.to_string(),
        });
        let req = Request {
            id: id.clone(),
            messages,
            stream: Some(true),
            ..self.settings.clone()
        };
        let mut spec = match validate(req, &self.ctx.limits, Instant::now()) {
            Ok(s) => s,
            Err(r) => {
                crlf(&format!("Not asked: {}\n", r.message), out);
                return false;
            }
        };
        spec.priority = self.priority;
        spec.conversation = Some(self.conversation.clone());
        spec.transport = "console";
        tracing::info!(transport = "console", request_id = %id, port = %self.port, "console question");
        self.running = Some(Running {
            id,
            question: question.to_string(),
            answer: String::new(),
            fresh,
        });
        // accepted or refused (busy), the answer or the refusal comes on the sink
        self.ctx.scheduler.submit(spec, sink.clone());
        true
    }

    fn port_tag(&self) -> String {
        self.port
            .rsplit('/')
            .next()
            .unwrap_or("tty")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect()
    }

    /// Handles one response of the running answer; returns what to write.
    pub fn response(&mut self, r: Response, sink: &mpsc::UnboundedSender<Response>) -> Vec<u8> {
        let mut out = Vec::new();
        let Some(run) = &mut self.running else {
            return out;
        };
        if r.id() != run.id {
            return out;
        }
        match r.kind {
            Some(Kind::Chunk(c)) => {
                run.answer.push_str(&c.text);
                crlf(&c.text, &mut out);
                return out;
            }
            Some(Kind::Done(d)) => {
                let run = self.running.take().unwrap_or_else(|| unreachable!());
                let finish =
                    v1::FinishReason::try_from(d.finish_reason).unwrap_or(v1::FinishReason::Error);
                out.extend_from_slice(b"\r\n");
                match finish {
                    v1::FinishReason::Stop => {}
                    v1::FinishReason::Length => crlf("[cut: max_tokens reached]\n", &mut out),
                    v1::FinishReason::Cancelled => crlf("[cancelled]\n", &mut out),
                    v1::FinishReason::Thermal => crlf(
                        "[stopped: the accelerator is critically hot; see /thermal]\n",
                        &mut out,
                    ),
                    other => crlf(&format!("[ended: {}]\n", other.as_str_name()), &mut out),
                }
                self.history.push(v1::Message {
                    role: "user".into(),
                    content: run.question,
                });
                self.history.push(v1::Message {
                    role: "assistant".into(),
                    content: run.answer,
                });
            }
            Some(Kind::Error(e)) => {
                let run = self.running.take().unwrap_or_else(|| unreachable!());
                let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal);
                if code == ErrorCode::TooLarge && !self.history.is_empty() && !run.fresh {
                    // the conversation filled the context: say so and ask again, afresh
                    crlf(
                        "[the conversation filled the model's context: starting a new one]\n",
                        &mut out,
                    );
                    self.reset();
                    if self.ask(&run.question, true, sink, &mut out) {
                        return out;
                    }
                } else {
                    crlf(
                        &format!("\n[error {}: {}]\n", code.as_str_name(), e.message),
                        &mut out,
                    );
                }
            }
            None => return out,
        }
        out.extend_from_slice(PROMPT);
        out
    }

    fn reset(&mut self) {
        self.history.clear();
        self.conversation.reset();
    }

    /// Stops the running answer, if any (the port went away).
    pub fn abandon(&mut self) {
        if let Some(r) = self.running.take() {
            let found = self.ctx.scheduler.cancel(&r.id);
            tracing::info!(transport = "console", request_id = %r.id, port = %self.port, found, "console gone: answer cancelled");
        }
    }

    fn command(&mut self, cmd: &str) -> String {
        let mut words = cmd.split_whitespace();
        let name = words.next().unwrap_or("");
        let rest: Vec<&str> = words.collect();
        match name {
            "help" | "?" => HELP.to_string(),
            "status" => {
                let s = self.ctx.scheduler.stats();
                format!(
                    "node {} · model {} · thermal {}\nqueue {} · running {} · answered {} · last decode {:.1} tok/s · up {} s\nthis console: {} turns in the conversation\n",
                    self.ctx.node,
                    self.ctx.model.name,
                    self.ctx.thermal.summary(),
                    s.queued,
                    s.running,
                    s.answered,
                    s.last_decode_tok_s,
                    self.ctx.started.elapsed().as_secs(),
                    self.history.len() / 2
                )
            }
            "thermal" => self.ctx.thermal.report(),
            "model" => {
                let m = &self.ctx.model;
                format!(
                    "{} · {} parameters · {} weights · {} tokens of context\n",
                    m.name, m.parameters, m.weights, m.context
                )
            }
            "cancel" => "Nothing is running.\n".into(),
            "reset" => {
                self.reset();
                "New conversation.\n".into()
            }
            "set" => self.set(&rest),
            _ => format!("Unknown command /{name}. Type /help.\n"),
        }
    }

    fn set(&mut self, args: &[&str]) -> String {
        let s = &mut self.settings;
        let Some((&key, value)) = args.split_first() else {
            return format!(
                "temperature {} · top_p {} · top_k {} · min_p {} · max_tokens {} · seed {} · system {}\n",
                s.temperature.map_or("default".into(), |v| v.to_string()),
                s.top_p.map_or("default".into(), |v| v.to_string()),
                s.top_k.map_or("default".into(), |v| v.to_string()),
                s.min_p.map_or("default".into(), |v| v.to_string()),
                s.max_tokens.map_or("default".into(), |v| v.to_string()),
                s.seed.map_or("default".into(), |v| v.to_string()),
                self.system.as_deref().unwrap_or("the model's own")
            );
        };
        let value = value.join(" ");
        if value.is_empty() {
            return format!("/set {key} needs a value.\n");
        }
        let mut next = s.clone();
        let parsed = match key {
            "temperature" => value.parse().map(|v| next.temperature = Some(v)).is_ok(),
            "top_p" => value.parse().map(|v| next.top_p = Some(v)).is_ok(),
            "top_k" => value.parse().map(|v| next.top_k = Some(v)).is_ok(),
            "min_p" => value.parse().map(|v| next.min_p = Some(v)).is_ok(),
            "max_tokens" => value.parse().map(|v| next.max_tokens = Some(v)).is_ok(),
            "seed" => value.parse().map(|v| next.seed = Some(v)).is_ok(),
            "system" => {
                self.system = Some(value.clone());
                return format!("system = {value}\n");
            }
            _ => return format!("Unknown setting {key}. Type /set to list them.\n"),
        };
        if !parsed {
            return format!("{key}: {value:?} is not a number.\n");
        }
        // check with the same rules as any request
        let probe = Request {
            id: "probe".into(),
            prompt: "probe".into(),
            ..next.clone()
        };
        match validate(probe, &self.ctx.limits, Instant::now()) {
            Ok(_) => {
                self.settings = next;
                format!("{key} = {value}\n")
            }
            Err(r) => format!("Not set: {}\n", r.message),
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
    run(port, Console::new(ctx, name, priority), stop).await
}

/// Serves the daemon's own terminal until Ctrl-D on an empty line (`Ok`: stop the daemon),
/// `stop`, or an error.
pub async fn serve_local<P: AsyncRead + AsyncWrite>(
    port: P,
    ctx: SerialContext,
    stop: &mut watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut console = Console::new(ctx, "terminal", Priority::High);
    console.local = true;
    run(port, console, stop).await
}

async fn run<P: AsyncRead + AsyncWrite>(
    port: P,
    mut console: Console,
    stop: &mut watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (mut rd, mut wr) = tokio::io::split(port);
    let (tx, mut rx) = mpsc::unbounded_channel::<Response>();
    let result = async {
        wr.write_all(&console.banner()).await?;
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                n = rd.read(&mut buf) => {
                    let n = n?;
                    if n == 0 {
                        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the port closed"));
                    }
                    let out = console.input(&buf[..n], &tx);
                    wr.write_all(&out).await?;
                    if console.quit {
                        return Ok(());
                    }
                }
                Some(r) = rx.recv() => {
                    let out = console.response(r, &tx);
                    wr.write_all(&out).await?;
                }
                _ = stop.changed() => {
                    console.abandon();
                    let _ = wr.write_all(b"\r\n[fieldllmd is stopping]\r\n").await;
                    return Ok(());
                }
            }
        }
    }
    .await;
    console.abandon();
    result
}
