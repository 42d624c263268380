//! Budget periods: UTC calendar days and months, their ids in Redis keys and their reset times.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::Error;

/// How long a day hash is kept after its day ends (ops dashboards read the last month of days).
pub const DAY_RETENTION: Duration = Duration::days(40);
/// How long a month hash is kept after its month ends (a year of months plus a margin).
pub const MONTH_RETENTION: Duration = Duration::days(400);

/// A budget period, always in UTC, so every instance and the observer agree on the boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// A UTC calendar day; id "2026-11-27".
    Day,
    /// A UTC calendar month; id "2026-11".
    Month,
}

/// The id of a period, written by `Display` (see [`Period::id`]).
pub(crate) struct PeriodId {
    period: Period,
    now: DateTime<Utc>,
}

impl std::fmt::Display for PeriodId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let now = self.now;
        let (y, m, d) = (now.year(), now.month(), now.day());
        if !(0..=9999).contains(&y) {
            // chrono's `%Y` signs years outside 0..=9999; kept for exactness (never in practice).
            return match self.period {
                Period::Day => write!(f, "{}", now.format("%Y-%m-%d")),
                Period::Month => write!(f, "{}", now.format("%Y-%m")),
            };
        }
        // Written directly: `format("%Y-%m-%d")` parses its pattern on every call, which the
        // enforcer's profile showed at ~1.5% of its CPU (four ids per call).
        match self.period {
            Period::Day => write!(f, "{y:04}-{m:02}-{d:02}"),
            Period::Month => write!(f, "{y:04}-{m:02}"),
        }
    }
}

impl Period {
    /// Both periods, in the order caps are checked.
    pub const ALL: [Period; 2] = [Period::Day, Period::Month];

    /// The id of the period containing `now`, as used in key names: "2026-11-27" or "2026-11".
    #[must_use]
    pub fn id(self, now: DateTime<Utc>) -> String {
        use std::fmt::Write as _;
        let mut id = String::with_capacity(10);
        let _ = write!(id, "{}", self.id_of(now));
        id
    }

    /// [`Period::id`] without a `String`: written where it goes (a script's arguments).
    pub(crate) fn id_of(self, now: DateTime<Utc>) -> PeriodId {
        PeriodId { period: self, now }
    }

    /// The first instant of the period containing `now`.
    #[must_use]
    pub fn start(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let d = now.date_naive();
        let first = match self {
            Period::Day => d,
            Period::Month => d.with_day(1).unwrap_or(d),
        };
        midnight(first)
    }

    /// When the period containing `now` ends and its budget resets: the next UTC midnight, or
    /// 00:00 UTC on the first of the next month.
    #[must_use]
    pub fn reset_at(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let d = now.date_naive();
        let next = match self {
            Period::Day => d.succ_opt().unwrap_or(d),
            Period::Month => {
                let (y, m) = if d.month() == 12 {
                    (d.year() + 1, 1)
                } else {
                    (d.year(), d.month() + 1)
                };
                NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(d)
            }
        };
        midnight(next)
    }

    /// When the hash of the period containing `now` expires: its reset plus the retention.
    #[must_use]
    pub fn expire_at(self, now: DateTime<Utc>) -> DateTime<Utc> {
        self.reset_at(now)
            + match self {
                Period::Day => DAY_RETENTION,
                Period::Month => MONTH_RETENTION,
            }
    }

    /// "day" or "month", as in config files and budget fields.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// The one-letter form used in key names and script arguments ("d" / "m").
    #[must_use]
    pub(crate) const fn letter(self) -> &'static str {
        match self {
            Period::Day => "d",
            Period::Month => "m",
        }
    }
}

fn midnight(d: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default())
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Period {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "day" => Ok(Period::Day),
            "month" => Ok(Period::Month),
            _ => Err(Error::Invalid {
                what: "period",
                detail: format!("{s:?} is not \"day\" or \"month\""),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn ids_are_utc_calendar_ids() {
        let now = t("2026-11-27T23:59:59.999Z");
        assert_eq!(Period::Day.id(now), "2026-11-27");
        assert_eq!(Period::Month.id(now), "2026-11");
        // 01:00 in UTC+2 is still the previous UTC day.
        let east = DateTime::parse_from_rfc3339("2026-12-01T01:00:00+02:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(Period::Day.id(east), "2026-11-30");
        assert_eq!(Period::Month.id(east), "2026-11");
    }

    /// The ids are chrono's `%Y-%m-%d` / `%Y-%m` for any instant, in and beyond years 0..=9999.
    #[test]
    fn ids_equal_chronos_format() {
        let mut at = Utc.with_ymd_and_hms(-3, 1, 1, 0, 0, 0).unwrap();
        let check = |at: DateTime<Utc>| {
            assert_eq!(Period::Day.id(at), at.format("%Y-%m-%d").to_string());
            assert_eq!(Period::Month.id(at), at.format("%Y-%m").to_string());
        };
        while at.year() < 12_000 {
            check(at);
            at += Duration::hours(24 * 37 + 5);
        }
        for s in [
            "0000-01-01T00:00:00Z",
            "0999-12-31T23:59:59Z",
            "9999-12-31T23:59:59Z",
        ] {
            check(t(s));
        }
        check(Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap());
    }

    #[test]
    fn reset_times() {
        assert_eq!(
            Period::Day.reset_at(t("2026-11-27T10:00:00Z")),
            t("2026-11-28T00:00:00Z")
        );
        assert_eq!(
            Period::Day.reset_at(t("2026-11-30T00:00:00Z")),
            t("2026-12-01T00:00:00Z")
        );
        assert_eq!(
            Period::Month.reset_at(t("2026-11-27T10:00:00Z")),
            t("2026-12-01T00:00:00Z")
        );
        assert_eq!(
            Period::Month.reset_at(t("2026-12-31T23:59:59Z")),
            t("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            Period::Day.reset_at(t("2028-02-28T12:00:00Z")),
            t("2028-02-29T00:00:00Z"),
            "leap day"
        );
        assert_eq!(
            Period::Month.reset_at(t("2028-02-29T12:00:00Z")),
            t("2028-03-01T00:00:00Z")
        );
        assert_eq!(
            Period::Month.start(t("2026-11-27T10:00:00Z")),
            t("2026-11-01T00:00:00Z")
        );
        assert_eq!(
            Period::Day.start(t("2026-11-27T10:00:00Z")),
            t("2026-11-27T00:00:00Z")
        );
    }

    #[test]
    fn retention() {
        assert_eq!(
            Period::Day.expire_at(t("2026-11-27T10:00:00Z")),
            t("2027-01-07T00:00:00Z")
        );
        assert_eq!(
            Period::Month.expire_at(t("2026-11-27T10:00:00Z")),
            t("2028-01-05T00:00:00Z")
        );
    }

    #[test]
    fn parses_and_prints() {
        assert_eq!("day".parse::<Period>().unwrap(), Period::Day);
        assert_eq!("month".parse::<Period>().unwrap(), Period::Month);
        assert!("week".parse::<Period>().is_err());
        assert_eq!(serde_json::to_string(&Period::Month).unwrap(), "\"month\"");
        assert_eq!(Period::Day.to_string(), "day");
    }
}
