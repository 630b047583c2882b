//! A job: one request, checked and complete, as the scheduler runs it.

use std::sync::Arc;
use std::time::Instant;

use fieldllm_engine::GenerateParams;

use super::Conversation;
use crate::docs::ground::Citations;

/// Scheduling priority; higher runs first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// Background work.
    Low = 1,
    /// The default.
    Normal = 2,
    /// A person waiting (the console).
    High = 3,
}

/// The transport a job came by: in every log line about it, and the rules it is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// MQTT, direct or fleet topic.
    Mqtt,
    /// A technician's console on a serial port (or the daemon's own terminal).
    Console,
    /// The framed device protocol on a serial port.
    Framed,
    /// In-process callers: benchmarks and tests.
    Local,
}

impl Transport {
    /// Lower-case name, as in the logs' `transport` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Mqtt => "mqtt",
            Transport::Console => "console",
            Transport::Framed => "framed",
            Transport::Local => "local",
        }
    }
}

/// A request that passed every check that can refuse it before it runs, with everything the
/// worker needs: nobody patches a job after it is made.
#[derive(Debug, Clone)]
pub struct Job {
    /// The client's id.
    pub id: String,
    /// The whole conversation's prompt as token ids, chat template applied; it fits the
    /// model's context with room for at least one generated token.
    pub prompt: Vec<u32>,
    /// Generation parameters, validated.
    pub params: GenerateParams,
    /// Priority.
    pub priority: Priority,
    /// Latest time the answer may still be running.
    pub deadline: Option<Instant>,
    /// Stream chunks as they come (true) or send the whole text in one chunk.
    pub stream: bool,
    /// When the request arrived (queue time is measured from here).
    pub received: Instant,
    /// A conversation whose KV cache carries over between turns (the console's); `None`: a
    /// fresh session for this request alone.
    pub conversation: Option<Conversation>,
    /// Which transport it came by.
    pub transport: Transport,
    /// A grounded answer's passages and key sentence: passed on to its final [`super::Done`].
    pub citations: Option<Arc<Citations>>,
}
