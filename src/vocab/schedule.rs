//! The hours of the week the person lets the worker run ([`WeeklyHours`]), in the PC's local
//! time: seven days of 24 one-hour cells, written in `config.toml` as ranges per day
//! (`mon = "0-8,18-24"`).

use std::fmt::Write as _;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Monday first, as ISO 8601 and most of the world count.
pub const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// One bit per hour (bit `h` is the hour from `h`:00 to `h+1`:00), one mask per day,
/// Monday first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeeklyHours([u32; 7]);

const ALL_DAY: u32 = (1 << 24) - 1;

impl Default for WeeklyHours {
    /// Every hour of every day.
    fn default() -> Self {
        Self([ALL_DAY; 7])
    }
}

/// A day's hours that do not read as ranges of whole hours.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{day}: {reason} (write hours as ranges, like \"0-8,18-24\")")]
pub struct BadHours {
    pub day: &'static str,
    pub reason: String,
}

impl WeeklyHours {
    /// No hour at all.
    pub const NEVER: Self = Self([0; 7]);

    /// Whether `hour` (0–23) of `day` (0 = Monday) is allowed.
    pub fn allows(&self, day: usize, hour: u32) -> bool {
        day < 7 && hour < 24 && self.0[day] & (1 << hour) != 0
    }

    pub fn set(&mut self, day: usize, hour: u32, allowed: bool) {
        if day < 7 && hour < 24 {
            if allowed {
                self.0[day] |= 1 << hour;
            } else {
                self.0[day] &= !(1 << hour);
            }
        }
    }

    /// Whether any hour of the week is allowed.
    pub fn any(&self) -> bool {
        self.0.iter().any(|day| *day != 0)
    }

    /// How many hours from (`day`, `hour`) until the next hour whose allowance differs, at
    /// most a week: when the schedule next changes its mind.
    pub fn hours_until_change(&self, day: usize, hour: u32) -> u32 {
        let now = self.allows(day, hour);
        for ahead in 1..=(7 * 24) {
            let absolute = day as u32 * 24 + hour + ahead;
            if self.allows((absolute / 24 % 7) as usize, absolute % 24) != now {
                return ahead;
            }
        }
        7 * 24
    }

    /// A day's hours as ranges: `"0-8,18-24"`, `""` for none.
    pub fn day_text(&self, day: usize) -> String {
        let mask = self.0.get(day).copied().unwrap_or(0);
        let mut text = String::new();
        let mut hour = 0;
        while hour < 24 {
            if mask & (1 << hour) == 0 {
                hour += 1;
                continue;
            }
            let start = hour;
            while hour < 24 && mask & (1 << hour) != 0 {
                hour += 1;
            }
            if !text.is_empty() {
                text.push(',');
            }
            let _ = write!(text, "{start}-{hour}");
        }
        text
    }

    /// Reads one day's ranges (`"9-17"`, `"0-8,18-24"`, `""`; hour 24 ends the day).
    pub fn parse_day(day: &'static str, text: &str) -> Result<u32, BadHours> {
        let bad = |reason: String| BadHours { day, reason };
        let mut mask = 0_u32;
        for range in text
            .split(',')
            .map(str::trim)
            .filter(|range| !range.is_empty())
        {
            let (start, end) = range
                .split_once('-')
                .ok_or_else(|| bad(format!("{range:?} is not a range")))?;
            let hour = |text: &str| -> Result<u32, BadHours> {
                text.trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|hour| *hour <= 24)
                    .ok_or_else(|| bad(format!("{text:?} is not an hour from 0 to 24")))
            };
            let (start, end) = (hour(start)?, hour(end)?);
            if start >= end {
                return Err(bad(format!("{range:?} ends before it starts")));
            }
            for hour in start..end {
                mask |= 1 << hour;
            }
        }
        Ok(mask)
    }
}

impl Serialize for WeeklyHours {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = serializer.serialize_map(Some(7))?;
        for (index, day) in DAYS.iter().enumerate() {
            map.serialize_entry(day, &self.day_text(index))?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for WeeklyHours {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let days = std::collections::BTreeMap::<String, String>::deserialize(deserializer)?;
        let mut hours = Self::default();
        for (name, text) in &days {
            let Some(index) = DAYS.iter().position(|day| day == name) else {
                return Err(serde::de::Error::custom(format!(
                    "{name:?} is not a day (mon, tue, wed, thu, fri, sat, sun)"
                )));
            };
            hours.0[index] =
                Self::parse_day(DAYS[index], text).map_err(serde::de::Error::custom)?;
        }
        // Days left out keep every hour.
        Ok(hours)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_read_and_write_as_hour_ranges() {
        assert_eq!(WeeklyHours::parse_day("mon", "0-8,18-24"), Ok(0xFC_00FF));
        assert_eq!(WeeklyHours::parse_day("mon", ""), Ok(0));
        assert_eq!(WeeklyHours::parse_day("mon", " 9 - 17 "), Ok(0x1_FE00));
        for bad in ["9", "17-9", "0-25", "a-b", "8-8"] {
            assert!(WeeklyHours::parse_day("mon", bad).is_err(), "{bad}");
        }
        let mut hours = WeeklyHours::NEVER;
        for hour in (0..8).chain(18..24) {
            hours.set(0, hour, true);
        }
        assert_eq!(hours.day_text(0), "0-8,18-24");
        assert_eq!(hours.day_text(1), "");
        assert_eq!(WeeklyHours::default().day_text(6), "0-24");
    }

    #[test]
    fn the_week_round_trips_through_toml_and_missing_days_allow_everything() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Section {
            schedule: WeeklyHours,
        }
        let mut hours = WeeklyHours::default();
        hours.set(2, 3, false);
        let text = toml::to_string(&Section { schedule: hours }).unwrap();
        assert!(text.contains("wed = \"0-3,4-24\""), "{text}");
        let back: Section = toml::from_str(&text).unwrap();
        assert_eq!(back.schedule, hours);
        let partial: Section = toml::from_str("[schedule]\nsat = \"\"\n").unwrap();
        assert!(!partial.schedule.allows(5, 12) && partial.schedule.allows(6, 12));
        assert!(toml::from_str::<Section>("[schedule]\nfunday = \"0-24\"\n").is_err());
    }

    #[test]
    fn the_next_change_is_found_across_midnight_and_the_week() {
        let mut hours = WeeklyHours::default();
        for hour in 22..24 {
            hours.set(6, hour, false); // Sunday 22:00 to midnight
        }
        hours.set(0, 0, false); // Monday 00:00–01:00
        assert_eq!(hours.hours_until_change(6, 20), 2);
        assert_eq!(
            hours.hours_until_change(6, 22),
            3,
            "through midnight into Monday"
        );
        assert_eq!(WeeklyHours::default().hours_until_change(3, 5), 7 * 24);
    }
}
