//! Calendar windows in UTC.

use std::fmt;
use std::str::FromStr;

use crate::clock::UnixMillis;
use crate::error::RateLimitError;

const DAY_MS: i64 = 86_400_000;

/// A calendar window quotas are counted over, in UTC: midnight to midnight, or the first of a
/// month to the first of the next.
///
/// ```
/// use ratelimit::Window;
///
/// // 2024-02-29T13:00:00Z, in a leap year
/// let now = 1_709_211_600_000;
/// assert_eq!(Window::Day.window_start(now), 1_709_164_800_000); // 2024-02-29T00:00Z
/// assert_eq!(Window::Month.window_start(now), 1_706_745_600_000); // 2024-02-01T00:00Z
/// assert_eq!(Window::Month.window_end(now), 1_709_251_200_000); // 2024-03-01T00:00Z
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Window {
    /// A UTC day.
    Day,
    /// A UTC calendar month.
    Month,
}

impl Window {
    /// Both windows.
    pub const ALL: [Window; 2] = [Window::Day, Window::Month];

    /// `"day"` or `"month"`: the name stored in the database and in Redis keys.
    pub fn as_str(&self) -> &'static str {
        match self {
            Window::Day => "day",
            Window::Month => "month",
        }
    }

    /// The first millisecond of the window containing `now`.
    pub fn window_start(&self, now: UnixMillis) -> UnixMillis {
        let days = now.div_euclid(DAY_MS);
        let start_day = match self {
            Window::Day => days,
            Window::Month => {
                let (y, m, _) = civil_from_days(days);
                days_from_civil(y, m, 1)
            }
        };
        start_day.saturating_mul(DAY_MS)
    }

    /// The end of the window containing `now` (exclusive): the next window's start, when the
    /// counters reset.
    pub fn window_end(&self, now: UnixMillis) -> UnixMillis {
        let days = now.div_euclid(DAY_MS);
        let end_day = match self {
            Window::Day => days.saturating_add(1),
            Window::Month => {
                let (y, m, _) = civil_from_days(days);
                if m == 12 {
                    days_from_civil(y.saturating_add(1), 1, 1)
                } else {
                    days_from_civil(y, m + 1, 1)
                }
            }
        };
        end_day.saturating_mul(DAY_MS)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Window {
    type Err = RateLimitError;

    fn from_str(s: &str) -> Result<Window, RateLimitError> {
        match s {
            "day" => Ok(Window::Day),
            "month" => Ok(Window::Month),
            _ => Err(RateLimitError::InvalidArgument(format!(
                "unknown quota window {s:?} (day, month)"
            ))),
        }
    }
}

/// Days since 1970-01-01 of the proleptic Gregorian date `y-m-d` (H. Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400; // [0, 399]
    let mp = i64::from((m + 9) % 12); // March = 0
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date `(year, month, day)` of `days` since 1970-01-01.
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn is_leap(y: i64) -> bool {
        (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
    }

    fn month_len(y: i64, m: u32) -> i64 {
        match m {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            _ if is_leap(y) => 29,
            _ => 28,
        }
    }

    /// Unix millis of `y-m-d hh:mm`, by counting month lengths from 1970: an independent
    /// computation to check the closed-form one against.
    fn naive(y: i64, m: u32, d: u32, hh: i64, mm: i64) -> i64 {
        let mut days = 0i64;
        if y >= 1970 {
            for yy in 1970..y {
                days += if is_leap(yy) { 366 } else { 365 };
            }
        } else {
            for yy in y..1970 {
                days -= if is_leap(yy) { 366 } else { 365 };
            }
        }
        for mm_ in 1..m {
            days += month_len(y, mm_);
        }
        days += i64::from(d) - 1;
        days * DAY_MS + hh * 3_600_000 + mm * 60_000
    }

    #[test]
    fn known_dates() {
        let t = |y, m, d| naive(y, m, d, 0, 0);
        assert_eq!(t(1970, 1, 1), 0);
        assert_eq!(t(2024, 2, 29), 1_709_164_800_000);
        assert_eq!(t(2026, 11, 23), 1_795_392_000_000);
        let now = naive(2026, 11, 23, 17, 45) + 123;
        assert_eq!(Window::Day.window_start(now), t(2026, 11, 23));
        assert_eq!(Window::Day.window_end(now), t(2026, 11, 24));
        assert_eq!(Window::Month.window_start(now), t(2026, 11, 1));
        assert_eq!(Window::Month.window_end(now), t(2026, 12, 1));
        // December rolls into the next year.
        let dec = naive(2026, 12, 31, 23, 59) + 59_999;
        assert_eq!(Window::Month.window_end(dec), t(2027, 1, 1));
        assert_eq!(Window::Day.window_end(dec), t(2027, 1, 1));
        // February: 29 days in 2024 and 2000, 28 in 2100 and 2023.
        for (y, len) in [(2024, 29), (2000, 29), (2100, 28), (2023, 28), (1900, 28)] {
            let feb = naive(y, 2, 10, 12, 0);
            let days = (Window::Month.window_end(feb) - Window::Month.window_start(feb)) / DAY_MS;
            assert_eq!(days, len, "February {y}");
        }
        // Exact boundaries belong to the window they start.
        let midnight = t(2025, 3, 1);
        assert_eq!(Window::Month.window_start(midnight), midnight);
        assert_eq!(Window::Month.window_start(midnight - 1), t(2025, 2, 1));
        assert_eq!(Window::Day.window_start(midnight - 1), t(2025, 2, 28));
        // Before the epoch.
        assert_eq!(Window::Day.window_start(-1), -DAY_MS);
        assert_eq!(Window::Month.window_start(-1), t(1969, 12, 1));
    }

    #[test]
    fn extremes_do_not_panic() {
        for now in [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX - 1, i64::MAX] {
            for w in Window::ALL {
                let _ = (w.window_start(now), w.window_end(now));
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for w in Window::ALL {
            assert_eq!(w.as_str().parse::<Window>().ok(), Some(w));
            assert_eq!(w.to_string(), w.as_str());
        }
        assert!("week".parse::<Window>().is_err());
    }

    proptest! {
        #[test]
        fn civil_round_trip(days in -4_000_000i64..4_000_000) {
            let (y, m, d) = civil_from_days(days);
            prop_assert!((1..=12).contains(&m));
            prop_assert!(d >= 1 && i64::from(d) <= month_len(y, m));
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }

        #[test]
        fn matches_the_naive_calendar(
            y in 1600i64..2600, m in 1u32..=12, d0 in 0u32..31, hh in 0i64..24, mm in 0i64..60,
        ) {
            let d = 1 + d0 % u32::try_from(month_len(y, m)).unwrap_or(28);
            let now = naive(y, m, d, hh, mm);
            prop_assert_eq!(Window::Day.window_start(now), naive(y, m, d, 0, 0));
            prop_assert_eq!(Window::Month.window_start(now), naive(y, m, 1, 0, 0));
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            prop_assert_eq!(Window::Month.window_end(now), naive(ny, nm, 1, 0, 0));
        }

        /// For any instant: start ≤ now < end; windows tile time (the end is the next window's
        /// start, the instant before the start is in the previous window); days last 24 h,
        /// months 28–31 days and start on the 1st at midnight.
        #[test]
        fn windows_tile_time(now in -300_000_000_000_000i64..300_000_000_000_000) {
            for w in Window::ALL {
                let (start, end) = (w.window_start(now), w.window_end(now));
                prop_assert!(start <= now && now < end);
                prop_assert_eq!(w.window_start(start), start);
                prop_assert_eq!(w.window_start(end), end);
                prop_assert_eq!(w.window_end(start), end);
                prop_assert_eq!(w.window_end(end - 1), end);
                prop_assert_eq!(w.window_end(start - 1), start);
                prop_assert_eq!(start.rem_euclid(DAY_MS), 0);
                let days = (end - start) / DAY_MS;
                match w {
                    Window::Day => prop_assert_eq!(days, 1),
                    Window::Month => {
                        let (y, m, d) = civil_from_days(start / DAY_MS);
                        prop_assert_eq!(d, 1);
                        prop_assert_eq!(days, month_len(y, m));
                    }
                }
            }
        }
    }
}
