//! A conversation's session, kept between its turns so a follow-up question only feeds its
//! new tokens (the session itself finds what of the prompt it already holds).

use std::sync::{Arc, Mutex, PoisonError};

use super::engine::EngineSession;

/// A conversation's kept session. Turns of one conversation run one at a time: the session is
/// taken while a turn runs, and a turn that finds it taken starts from a fresh one.
#[derive(Clone, Default)]
pub struct Conversation(Arc<Mutex<Option<Box<dyn EngineSession>>>>);

impl std::fmt::Debug for Conversation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self.0.lock().map(|s| s.is_some()).unwrap_or(false);
        write!(f, "Conversation(kept: {kept})")
    }
}

impl Conversation {
    /// A new, empty conversation.
    pub fn new() -> Conversation {
        Conversation::default()
    }

    /// Forgets the KV cache (`/reset`).
    pub fn reset(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// The kept session, if any (the conversation holds none until it is put back).
    pub(super) fn take(&self) -> Option<Box<dyn EngineSession>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// Keeps `session` for the next turn.
    pub(super) fn put(&self, session: Box<dyn EngineSession>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(session);
    }
}
