//! Times and durations in the words a person reads in the window, the tray and the CLI.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// "just now", "12 s ago", "12 min ago", "3 h ago", "2 days ago".
pub fn ago(then: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let seconds = (now - then).num_seconds();
    if seconds < 1 {
        return "just now".to_owned();
    }
    format!(
        "{} ago",
        duration(Duration::from_secs(seconds.unsigned_abs()))
    )
}

/// "45 s", "12 min", "3 h 5 min", "2 days".
pub fn duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0..=59 => format!("{seconds} s"),
        60..=3599 => format!("{} min", seconds / 60),
        3600..=86_399 => {
            let minutes = (seconds % 3600) / 60;
            if minutes == 0 {
                format!("{} h", seconds / 3600)
            } else {
                format!("{} h {minutes} min", seconds / 3600)
            }
        }
        _ => {
            let days = seconds / 86_400;
            if days == 1 {
                "1 day".to_owned()
            } else {
                format!("{days} days")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_like_a_person_would_say_it() {
        let now = Utc::now();
        assert_eq!(ago(now, now), "just now");
        assert_eq!(ago(now - chrono::Duration::seconds(10), now), "10 s ago");
        assert_eq!(ago(now - chrono::Duration::seconds(12), now), "12 s ago");
        assert_eq!(ago(now - chrono::Duration::minutes(12), now), "12 min ago");
        assert_eq!(
            ago(now - chrono::Duration::minutes(185), now),
            "3 h 5 min ago"
        );
        assert_eq!(ago(now - chrono::Duration::days(1), now), "1 day ago");
        assert_eq!(ago(now + chrono::Duration::seconds(5), now), "just now");
        assert_eq!(duration(Duration::from_secs(7200)), "2 h");
    }
}
