//! Why the worker is not taking jobs (the protocol's `pausedReason`, §2).

use serde::{Deserialize, Serialize};

/// Ordered by precedence: when several hold, the first is the one reported (a person's own
/// pause is what they want to see).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PauseReason {
    User,
    Game,
    Schedule,
    Studio,
}

impl PauseReason {
    pub fn describe(self) -> &'static str {
        match self {
            Self::User => "paused by you",
            Self::Game => "paused while a game runs",
            Self::Schedule => "paused by schedule",
            Self::Studio => "paused by the studio",
        }
    }
}
