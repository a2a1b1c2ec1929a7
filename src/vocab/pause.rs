//! Why the worker is not taking jobs (the protocol's `pausedReason`, studio-api.md §2).

use serde::{Deserialize, Serialize};

/// Ordered by precedence: when several hold, the first is the one reported (a person's own
/// pause is what they want to see, the studio's last).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PauseReason {
    /// The person paused it (tray, window or `studio-worker pause`).
    User,
    /// A game or another heavy GPU program runs.
    Game,
    /// "Only while I am away" is on and the person is using the PC.
    Active,
    /// Outside the hours the person allowed.
    Schedule,
    /// The GPU is above the person's temperature limit.
    Temperature,
    /// A laptop runs on battery.
    Battery,
    /// The studio's operator paused this worker.
    Studio,
}

impl PauseReason {
    /// Every reason, in precedence order.
    pub const ALL: [Self; 7] = [
        Self::User,
        Self::Game,
        Self::Active,
        Self::Schedule,
        Self::Temperature,
        Self::Battery,
        Self::Studio,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Self::User => "paused by you",
            Self::Game => "paused while a game runs",
            Self::Active => "paused while you use this PC",
            Self::Schedule => "paused by schedule",
            Self::Temperature => "paused: the GPU is too hot",
            Self::Battery => "paused while on battery",
            Self::Studio => "paused by the studio",
        }
    }

    /// Whether the worker pauses for this by itself (the policy), as opposed to a person's
    /// or the studio's explicit pause. The person's Resume overrides these.
    pub fn is_automatic(self) -> bool {
        !matches!(self, Self::User | Self::Studio)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_ordered_as_the_protocol_lists_them_and_named_as_it_spells_them() {
        let mut sorted = PauseReason::ALL;
        sorted.sort();
        assert_eq!(sorted, PauseReason::ALL);
        let names: Vec<String> = PauseReason::ALL
            .iter()
            .map(|reason| {
                serde_json::to_value(reason)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "user",
                "game",
                "active",
                "schedule",
                "temperature",
                "battery",
                "studio"
            ]
        );
    }
}
