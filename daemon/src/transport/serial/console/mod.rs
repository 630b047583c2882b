//! The technician console: a person at picocom, minicom or screen on a serial port.
//!
//! [`Console`] is the state of one terminal (line editor, conversation, settings, the running
//! answer) and decides in plain code: input bytes and scheduler replies go in, and a [`Step`]
//! comes out — bytes to write and what to ask of the scheduler (submit a job, cancel one).
//! [`serve`] is the thin loop that does both over a port. It never touches the model.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::line::{LineEditor, LineEvent, MAX_LINE};
use super::{PortInfo, SerialContext};
use crate::docs::ground::{Citations, Grounding};
use crate::proto::{Request, v1};
use crate::request::{Origin, Rejection};
use crate::scheduler::{Code, Conversation, Finish, Job, Priority, Reply, Stats, Transport};
use crate::transport::wire;

/// Numbers the console questions of the daemon's whole life, on every port. A reopened port
/// numbering from 1 again would reuse the id of an answer still in flight from before the
/// cable was pulled, and its first question would be refused as a duplicate.
static QUESTIONS: AtomicU64 = AtomicU64::new(0);

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
  /docs [on|off]     answer from the installed documents, citing them (on when an index exists)
  /sources           the passages the last answer came from, with their text
";

/// What the console asks of the scheduler.
#[derive(Debug)]
pub enum Action {
    /// Submit this job; its replies come back through [`Console::response`].
    Submit(Job),
    /// Search the documents for this request (the question alone) and hand the result to
    /// [`Console::grounded`].
    Ground(Box<Request>),
    /// Cancel the job with this id.
    Cancel(String),
}

/// What one input or reply leads to.
#[derive(Debug, Default)]
pub struct Step {
    /// Bytes to write to the terminal.
    pub out: Vec<u8>,
    /// What to ask of the scheduler, in order.
    pub actions: Vec<Action>,
    /// The daemon's own terminal asked to stop the daemon (Ctrl-D on an empty line).
    pub quit: bool,
}

/// One terminal's state.
pub struct Console {
    info: PortInfo,
    port: String,
    priority: Priority,
    editor: LineEditor,
    history: Vec<v1::Message>,
    conversation: Conversation,
    settings: Request,
    system: Option<String>,
    running: Option<Running>,
    /// The daemon's own terminal: Ctrl-D on an empty line stops the daemon.
    local: bool,
    /// Questions are answered from the document library (`/docs on|off`).
    docs: bool,
    /// What the last answer cited (`/sources`).
    last_citations: Option<Arc<Citations>>,
}

struct Running {
    /// The documents are being searched; the job is not submitted yet.
    searching: bool,
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
    pub fn new(info: PortInfo, port: &str, priority: Priority) -> Console {
        Console {
            port: port.to_string(),
            priority,
            editor: LineEditor::new(),
            history: Vec::new(),
            conversation: Conversation::new(),
            settings: Request::default(),
            system: None,
            running: None,
            local: false,
            docs: info.intake.library().is_some_and(|l| l.exists()),
            last_citations: None,
            info,
        }
    }

    /// The daemon's own terminal (Ctrl-D on an empty line stops the daemon).
    pub fn local(info: PortInfo) -> Console {
        let mut c = Console::new(info, "terminal", Priority::High);
        c.local = true;
        c
    }

    /// Banner and first prompt.
    pub fn banner(&self) -> Vec<u8> {
        let m = &self.info.model;
        let mut out = Vec::new();
        crlf(
            &format!(
                "\nfieldllm {} on {}\nmodel {} ({} weights, {} tokens of context), thermal {}\nType a question, or /help.\n",
                env!("CARGO_PKG_VERSION"),
                self.info.node,
                m.name,
                m.weights,
                m.context,
                self.info.thermal.summary()
            ),
            &mut out,
        );
        if self.docs {
            crlf(
                "Answers come from the installed documents and cite them (/docs off: the model alone).\n",
                &mut out,
            );
        }
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

    /// Handles bytes from the terminal; `stats` is the scheduler's, for `/status`.
    pub fn input(&mut self, bytes: &[u8], stats: Stats) -> Step {
        let mut step = Step::default();
        for &b in bytes {
            if let Some(r) = &self.running {
                // while an answer streams only Ctrl-C counts; typing waits for the prompt
                if b == 0x03 {
                    tracing::info!(transport = "console", request_id = %r.id, port = %self.port, "console cancel");
                    step.actions.push(Action::Cancel(r.id.clone()));
                }
                continue;
            }
            let mut echo = Vec::new();
            let event = self.editor.push(b, &mut echo);
            step.out.extend_from_slice(&echo);
            match event {
                None => {}
                Some(LineEvent::Line(line)) => self.line(line.trim(), stats, &mut step),
                Some(LineEvent::EndOfInput) if self.local => {
                    crlf("\n[stopping fieldllmd]\n", &mut step.out);
                    step.quit = true;
                    return step;
                }
                Some(LineEvent::Interrupt) | Some(LineEvent::EndOfInput) => {
                    step.out.extend_from_slice(PROMPT)
                }
                Some(LineEvent::TooLong) => {
                    crlf(
                        &format!("That line is longer than {MAX_LINE} bytes; it was dropped.\n"),
                        &mut step.out,
                    );
                    step.out.extend_from_slice(PROMPT);
                }
                Some(LineEvent::NotText) => {
                    crlf(
                        "That line was not UTF-8 text; it was dropped.\n",
                        &mut step.out,
                    );
                    step.out.extend_from_slice(PROMPT);
                }
            }
        }
        step
    }

    fn line(&mut self, line: &str, stats: Stats, step: &mut Step) {
        if line.is_empty() {
            step.out.extend_from_slice(PROMPT);
            return;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            crlf(&self.command(cmd, stats), &mut step.out);
            step.out.extend_from_slice(PROMPT);
            return;
        }
        if !self.ask(line, false, step) {
            step.out.extend_from_slice(PROMPT);
        }
    }

    /// Asks a question (with the conversation so far, unless `fresh`); false if it was refused
    /// before reaching the scheduler. A conversation too long for the limits or the model's
    /// context starts afresh, if the question fits alone (else it is kept, and the question is
    /// not asked).
    fn ask(&mut self, question: &str, fresh: bool, step: &mut Step) -> bool {
        let n = QUESTIONS.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("console-{}-{n}", self.port_tag());
        if self.docs {
            // the search checks the question and settings alone; the conversation is added
            // when the job is made
            let req = Request {
                id: id.clone(),
                prompt: question.to_string(),
                docs: Some(true),
                ..self.settings.clone()
            };
            self.running = Some(Running {
                searching: true,
                id,
                question: question.to_string(),
                answer: String::new(),
                fresh,
            });
            step.actions.push(Action::Ground(Box::new(req)));
            return true;
        }
        self.ask_with(id, question, fresh, None, step)
    }

    /// The document search's result for the question waiting on it.
    pub fn grounded(&mut self, result: Result<Grounding, Rejection>) -> Step {
        let mut step = Step::default();
        let Some(run) = self.running.take_if(|r| r.searching) else {
            return step;
        };
        let asked = match result {
            Ok(g) => self.ask_with(run.id, &run.question, run.fresh, Some(g), &mut step),
            Err(r) => {
                refused(&r, &mut step.out);
                false
            }
        };
        if !asked {
            step.out.extend_from_slice(PROMPT);
        }
        step
    }

    fn ask_with(
        &mut self,
        id: String,
        question: &str,
        fresh: bool,
        grounding: Option<Grounding>,
        step: &mut Step,
    ) -> bool {
        let job = match self.job(&id, question, !fresh, grounding.clone()) {
            Ok(job) => job,
            Err(r) if r.code == Code::TooLarge && !self.history.is_empty() && !fresh => {
                match self.job(&id, question, false, grounding) {
                    Ok(job) => {
                        crlf(
                            "[the conversation filled the model's context: starting a new one]\n",
                            &mut step.out,
                        );
                        self.reset();
                        return self.submit(id, question, job, true, step);
                    }
                    Err(alone) => {
                        refused(&alone, &mut step.out);
                        return false;
                    }
                }
            }
            Err(r) => {
                refused(&r, &mut step.out);
                return false;
            }
        };
        self.submit(id, question, job, fresh, step)
    }

    /// The job for `question`, after the conversation so far when `with_history`.
    fn job(
        &self,
        id: &str,
        question: &str,
        with_history: bool,
        grounding: Option<Grounding>,
    ) -> Result<Job, Rejection> {
        let mut messages = Vec::new();
        if let Some(s) = &self.system {
            messages.push(v1::Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        if with_history {
            messages.extend(self.history.iter().cloned());
        }
        messages.push(v1::Message {
            role: "user".into(),
            content: question.to_string(),
        });
        let req = Request {
            id: id.to_string(),
            messages,
            stream: Some(true),
            docs: Some(grounding.is_some()),
            ..self.settings.clone()
        };
        let origin = Origin::new(Transport::Console)
            .at(self.priority)
            .in_conversation(self.conversation.clone());
        self.info.intake.job(req, grounding, origin, Instant::now())
    }

    /// Marks `job` running and asks the loop to submit it.
    fn submit(
        &mut self,
        id: String,
        question: &str,
        job: Job,
        fresh: bool,
        step: &mut Step,
    ) -> bool {
        tracing::info!(transport = "console", request_id = %id, port = %self.port, "console question");
        self.running = Some(Running {
            searching: false,
            id,
            question: question.to_string(),
            answer: String::new(),
            fresh,
        });
        // accepted or refused (busy), the answer or the refusal comes back as replies
        step.actions.push(Action::Submit(job));
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

    /// Handles one reply of the running answer.
    pub fn response(&mut self, r: Reply) -> Step {
        let mut step = Step::default();
        let Some(run) = &mut self.running else {
            return step;
        };
        if r.id() != run.id {
            return step;
        }
        let run = match r {
            Reply::Chunk(c) => {
                run.answer.push_str(&c.text);
                crlf(&c.text, &mut step.out);
                return step;
            }
            Reply::Done(d) => {
                let Some(run) = self.running.take() else {
                    return step;
                };
                step.out.extend_from_slice(b"\r\n");
                let note = match d.finish {
                    Finish::Stop => None,
                    Finish::Length => Some("[cut: max_tokens reached]\n"),
                    Finish::Cancelled => Some("[cancelled]\n"),
                    Finish::Thermal => {
                        Some("[stopped: the accelerator is critically hot; see /thermal]\n")
                    }
                    Finish::Deadline => Some("[ended: deadline]\n"),
                };
                if let Some(note) = note {
                    crlf(note, &mut step.out);
                }
                if let Some(c) = &d.citations {
                    crlf(&cited(c), &mut step.out);
                }
                self.last_citations = d.citations;
                self.history.push(v1::Message {
                    role: "user".into(),
                    content: run.question,
                });
                self.history.push(v1::Message {
                    role: "assistant".into(),
                    content: run.answer,
                });
                None
            }
            Reply::Failed(f) => self.running.take().map(|run| (run, f)),
        };
        if let Some((run, f)) = run {
            if f.code == Code::TooLarge && !self.history.is_empty() && !run.fresh {
                // the conversation filled the context: say so and ask again, afresh
                crlf(
                    "[the conversation filled the model's context: starting a new one]\n",
                    &mut step.out,
                );
                self.reset();
                if self.ask(&run.question, true, &mut step) {
                    return step;
                }
            } else {
                let code = wire::code(f.code).as_str_name();
                crlf(&format!("\n[error {code}: {}]\n", f.message), &mut step.out);
            }
        }
        step.out.extend_from_slice(PROMPT);
        step
    }

    fn reset(&mut self) {
        self.history.clear();
        self.conversation.reset();
    }

    /// The running answer, if any, to cancel because the port went away.
    pub fn abandon(&mut self) -> Option<String> {
        let r = self.running.take()?;
        tracing::info!(transport = "console", request_id = %r.id, port = %self.port, "console gone: answer cancelled");
        Some(r.id)
    }

    fn command(&mut self, cmd: &str, s: Stats) -> String {
        let mut words = cmd.split_whitespace();
        let name = words.next().unwrap_or("");
        let rest: Vec<&str> = words.collect();
        let info = &self.info;
        match name {
            "help" | "?" => HELP.to_string(),
            "status" => format!(
                "node {} · model {} · thermal {}\nqueue {} · running {} · answered {} · last decode {:.1} tok/s · up {} s\nthis console: {} turns in the conversation\n",
                info.node,
                info.model.name,
                info.thermal.summary(),
                s.queued,
                s.running,
                s.answered,
                s.last_decode_tok_s,
                info.started.elapsed().as_secs(),
                self.history.len() / 2
            ),
            "thermal" => info.thermal.report(),
            "model" => {
                let m = &info.model;
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
            "docs" => self.docs_command(&rest),
            "sources" => match &self.last_citations {
                Some(c) => c
                    .sources
                    .iter()
                    .map(|s| format!("{}\n{}\n\n", s.line(), s.text.trim()))
                    .collect(),
                None => "The last answer cited no documents.\n".into(),
            },
            _ => format!("Unknown command /{name}. Type /help.\n"),
        }
    }

    fn docs_command(&mut self, args: &[&str]) -> String {
        let Some(library) = self.info.intake.library() else {
            return "This daemon answers from no documents ([docs] enabled = false).\n".into();
        };
        let index = library.config().index.display().to_string();
        match args {
            [] => format!(
                "Answers from documents: {} (index {index}{}).\n",
                if self.docs { "on" } else { "off" },
                if library.exists() {
                    ""
                } else {
                    ", not made yet"
                }
            ),
            ["on"] if !library.exists() => format!(
                "There is no document index at {index} yet: add documents with `fieldllmd docs add`.\n"
            ),
            ["on"] => {
                self.docs = true;
                "Answers now come from the installed documents and cite them.\n".into()
            }
            ["off"] => {
                self.docs = false;
                "Answers now come from the model alone.\n".into()
            }
            _ => "Usage: /docs [on|off]\n".into(),
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
        // checked with the same rules as any request
        match self.info.intake.check_parameters(&next) {
            Ok(()) => {
                self.settings = next;
                format!("{key} = {value}\n")
            }
            Err(r) => format!("Not set: {}\n", r.message),
        }
    }
}

/// What a grounded answer cites, printed under it: the key sentence of [1] (a small model's
/// wording can miss the fact; the manual's does not), then one line per source.
fn cited(c: &Citations) -> String {
    let mut s = String::new();
    if !c.key_sentence.is_empty() {
        s.push_str(&format!("From [1]: \"{}\"\n", c.key_sentence));
    }
    s.push_str("Sources:\n");
    for src in &c.sources {
        s.push_str(&src.line());
        s.push('\n');
    }
    s
}

/// A question that was not asked, and why ("the documents do not cover it" is an answer, said
/// as one).
fn refused(r: &Rejection, out: &mut Vec<u8>) {
    if r.code == Code::NotCovered {
        crlf(&format!("{}\n", r.message), out);
    } else {
        crlf(&format!("Not asked: {}\n", r.message), out);
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
    let console = Console::new(ctx.info.clone(), name, priority);
    run(port, console, &ctx, stop).await
}

/// Serves the daemon's own terminal until Ctrl-D on an empty line (`Ok`: stop the daemon),
/// `stop`, or an error.
pub async fn serve_local<P: AsyncRead + AsyncWrite>(
    port: P,
    ctx: SerialContext,
    stop: &mut watch::Receiver<bool>,
) -> std::io::Result<()> {
    let console = Console::local(ctx.info.clone());
    run(port, console, &ctx, stop).await
}

/// Writes what a step says and does what it asks of the scheduler (a document search's
/// result is a step of its own); true when the daemon's own terminal asked to stop it.
async fn act<W: AsyncWrite + Unpin>(
    step: Step,
    console: &mut Console,
    ctx: &SerialContext,
    sink: &mpsc::UnboundedSender<Reply>,
    wr: &mut W,
) -> std::io::Result<bool> {
    let mut steps = vec![step];
    while let Some(step) = steps.pop() {
        wr.write_all(&step.out).await?;
        for action in step.actions {
            match action {
                Action::Submit(job) => {
                    ctx.scheduler.submit(job, sink.clone());
                }
                Action::Cancel(id) => {
                    ctx.scheduler.cancel(&id);
                }
                Action::Ground(req) => {
                    let grounding = ctx.info.intake.ground(&req).await;
                    steps.push(console.grounded(grounding));
                }
            }
        }
        if step.quit {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn run<P: AsyncRead + AsyncWrite>(
    port: P,
    mut console: Console,
    ctx: &SerialContext,
    stop: &mut watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (mut rd, mut wr) = tokio::io::split(port);
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let result = async {
        wr.write_all(&console.banner()).await?;
        let mut buf = [0u8; 1024];
        loop {
            let step = tokio::select! {
                n = rd.read(&mut buf) => {
                    let n = n?;
                    if n == 0 {
                        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the port closed"));
                    }
                    console.input(&buf[..n], ctx.scheduler.stats())
                }
                Some(r) = rx.recv() => console.response(r),
                _ = stop.changed() => {
                    if let Some(id) = console.abandon() {
                        ctx.scheduler.cancel(&id);
                    }
                    let _ = wr.write_all(b"\r\n[fieldllmd is stopping]\r\n").await;
                    return Ok(());
                }
            };
            if act(step, &mut console, ctx, &tx, &mut wr).await? {
                return Ok(());
            }
        }
    }
    .await;
    if let Some(id) = console.abandon() {
        ctx.scheduler.cancel(&id);
    }
    result
}

#[cfg(test)]
mod tests;
