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

/// "812 B", "4.2 MB", "2.58 GB" (decimal units, as download sizes are quoted).
pub fn bytes(count: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if count < 1000 {
        return format!("{count} B");
    }
    let mut value = count as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    let digits = if value < 10.0 {
        2
    } else if value < 100.0 {
        1
    } else {
        0
    };
    format!("{value:.digits$} {}", UNITS[unit])
}

/// A download's progress in words: the same in the window, `status` and `models pull`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownloadWords {
    /// "1.29 GB of 2.58 GB".
    pub amount: String,
    /// "50.0%".
    pub percent: String,
    /// "18.2 MB/s", once a speed is known.
    pub speed: Option<String>,
    /// "about 1 min left" (or "almost done"), once it can be told.
    pub time_left: Option<String>,
}

pub fn download_words(
    done_bytes: u64,
    total_bytes: u64,
    bytes_per_second: f64,
    eta: Option<Duration>,
) -> DownloadWords {
    DownloadWords {
        amount: format!("{} of {}", bytes(done_bytes), bytes(total_bytes)),
        percent: format!(
            "{:.1}%",
            100.0 * done_bytes as f64 / total_bytes.max(1) as f64
        ),
        speed: (bytes_per_second > 0.0).then(|| format!("{}/s", bytes(bytes_per_second as u64))),
        time_left: eta.map(|eta| {
            if eta.as_secs() == 0 {
                "almost done".to_owned()
            } else {
                format!("about {} left", duration(eta))
            }
        }),
    }
}

impl DownloadWords {
    /// The amount, speed and time left, as known, joined by `separator`.
    pub fn join(&self, separator: &str) -> String {
        std::iter::once(self.amount.as_str())
            .chain(self.speed.as_deref())
            .chain(self.time_left.as_deref())
            .collect::<Vec<_>>()
            .join(separator)
    }
}

/// `text` on one line: runs of whitespace become one space, control characters are dropped,
/// and at most `max_chars` characters remain, a cut marked with `…`. Reads no further into
/// `text` than it needs (a 10 MB prompt costs no more than a short one).
pub fn one_line(text: &str, max_chars: usize) -> String {
    let mut cleaned = Vec::with_capacity(max_chars + 1);
    let mut pending_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            pending_space = !cleaned.is_empty();
        } else if !c.is_control() {
            if pending_space {
                cleaned.push(' ');
                pending_space = false;
            }
            cleaned.push(c);
        }
        if cleaned.len() > max_chars {
            break;
        }
    }
    if cleaned.len() <= max_chars {
        return cleaned.into_iter().collect();
    }
    let kept: String = cleaned[..max_chars.saturating_sub(1)].iter().collect();
    format!("{}…", kept.trim_end())
}

/// The text with its first letter in capitals.
pub fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_uppercase().chain(chars).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_read_like_download_sizes() {
        assert_eq!(bytes(812), "812 B");
        assert_eq!(bytes(4_200_000), "4.20 MB");
        assert_eq!(bytes(2_580_000_000), "2.58 GB");
        assert_eq!(bytes(123_456_789), "123 MB");
    }

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

    #[test]
    fn one_line_collapses_strips_and_cuts() {
        assert_eq!(
            one_line("  a lighthouse\n at\tdusk  ", 40),
            "a lighthouse at dusk"
        );
        assert_eq!(one_line("bell\u{7}ring", 40), "bellring");
        assert_eq!(one_line("abcdef", 6), "abcdef");
        assert_eq!(one_line("abcdefg", 6), "abcde…");
        assert_eq!(
            one_line("abcd efg", 6),
            "abcd…",
            "no space before the ellipsis"
        );
        assert_eq!(one_line(&"x".repeat(10 << 20), 3), "xx…");
        assert_eq!(capitalise("paused by you"), "Paused by you");
        assert_eq!(capitalise(""), "");
    }
}
