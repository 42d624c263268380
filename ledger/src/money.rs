//! Integer money: every stored or compared amount is an `i64` count of nano-USD (1e-9 USD).
//!
//! Prices are per-token decimal figures such as `0.000003` USD. They are held exactly as integer
//! atto-USD (1e-18 USD) per token, multiplied by token counts in `i128`, summed, and rounded up to
//! nano-USD **once per call** (see [`AttoUsd::ceil_nanos`]). No float ever touches an amount.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Nano-USD per USD.
pub const NANOS_PER_USD: i64 = 1_000_000_000;
/// Atto-USD per nano-USD.
pub const ATTOS_PER_NANO: i128 = 1_000_000_000;
/// Atto-USD per USD.
pub const ATTOS_PER_USD: i128 = 1_000_000_000_000_000_000;

/// An amount of money in nano-USD (1e-9 USD), the unit of every counter in the ledger.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Nanos(pub i64);

impl Nanos {
    /// Zero dollars.
    pub const ZERO: Nanos = Nanos(0);

    /// The raw nano-USD count.
    #[must_use]
    pub const fn get(self) -> i64 {
        self.0
    }

    /// Parses a decimal USD amount ("5", "0.25", "12.000000001") exactly; more than nine
    /// fractional digits are rounded up, so a configured limit is never silently lowered... nor raised
    /// by more than one nano-USD.
    ///
    /// # Errors
    /// [`Error::InvalidAmount`] when the text is not a plain non-negative decimal number.
    pub fn from_usd_str(s: &str) -> Result<Nanos, Error> {
        let atto = AttoUsd::from_decimal_str(s)?;
        Ok(Nanos(atto.ceil_nanos()))
    }

    /// Converts a configured USD figure (TOML float such as `limit_usd = 5.0`) to nano-USD by way of
    /// its shortest decimal representation, so `0.1` becomes exactly 100_000_000.
    ///
    /// # Errors
    /// [`Error::InvalidAmount`] for negative, NaN, infinite or out-of-range values.
    pub fn from_usd_f64(v: f64) -> Result<Nanos, Error> {
        if !v.is_finite() || v < 0.0 {
            return Err(Error::InvalidAmount(format!(
                "{v} is not a non-negative finite USD amount"
            )));
        }
        // `{}` on f64 prints the shortest representation that round-trips, never exponent form.
        Nanos::from_usd_str(&format!("{v}"))
    }

    /// Saturating addition (a ledger never wraps).
    #[must_use]
    pub const fn saturating_add(self, o: Nanos) -> Nanos {
        Nanos(self.0.saturating_add(o.0))
    }

    /// Saturating subtraction.
    #[must_use]
    pub const fn saturating_sub(self, o: Nanos) -> Nanos {
        Nanos(self.0.saturating_sub(o.0))
    }
}

impl fmt::Display for Nanos {
    /// Formats as USD with up to nine decimals, trailing zeros trimmed to at least two: `$49.98`,
    /// `$0.000123456`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let neg = self.0 < 0;
        let abs = self.0.unsigned_abs();
        let whole = abs / NANOS_PER_USD.unsigned_abs();
        let frac = abs % NANOS_PER_USD.unsigned_abs();
        let mut frac_s = format!("{frac:09}");
        while frac_s.len() > 2 && frac_s.ends_with('0') {
            frac_s.pop();
        }
        write!(f, "{}${whole}.{frac_s}", if neg { "-" } else { "" })
    }
}

/// An exact amount in atto-USD (1e-18 USD): the unit of per-token prices and of a call's cost
/// before it is rounded to [`Nanos`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AttoUsd(pub i128);

impl AttoUsd {
    /// Zero.
    pub const ZERO: AttoUsd = AttoUsd(0);

    /// Parses a non-negative decimal USD figure exactly: "0.000003", "3e-06", "1.25E-7", "15".
    /// Digits beyond 18 decimals are rounded up (no real price has them).
    ///
    /// # Errors
    /// [`Error::InvalidAmount`] when the text is not a non-negative decimal or is out of range.
    pub fn from_decimal_str(s: &str) -> Result<AttoUsd, Error> {
        let bad =
            || Error::InvalidAmount(format!("{s:?} is not a non-negative decimal USD amount"));
        let t = s.trim();
        if t.is_empty() || t.starts_with('-') {
            return Err(bad());
        }
        let t = t.strip_prefix('+').unwrap_or(t);
        let (mantissa, exp) = match t.find(['e', 'E']) {
            Some(i) => (&t[..i], t[i + 1..].parse::<i32>().map_err(|_| bad())?),
            None => (t, 0),
        };
        let (int_part, frac_part) = match mantissa.split_once('.') {
            Some((a, b)) => (a, b),
            None => (mantissa, ""),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(bad());
        }
        if !int_part.bytes().all(|b| b.is_ascii_digit())
            || !frac_part.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        // value = digits * 10^(exp - frac_len); we want value * 10^18. Trailing fractional zeros
        // carry no value; i64 keeps an exponent near i32::MAX from overflowing (found by fuzzing).
        let frac_part = frac_part.trim_end_matches('0');
        let digits: String = format!("{int_part}{frac_part}");
        let digits = digits.trim_start_matches('0');
        let frac_len = i64::try_from(frac_part.len()).map_err(|_| bad())?;
        let shift = 18 + i64::from(exp) - frac_len;
        if digits.is_empty() {
            return Ok(AttoUsd::ZERO);
        }
        if digits.len() > 36 {
            return Err(bad());
        }
        let n: i128 = digits.parse().map_err(|_| bad())?;
        if shift >= 0 {
            let m = 10i128
                .checked_pow(u32::try_from(shift).map_err(|_| bad())?)
                .ok_or_else(bad)?;
            n.checked_mul(m).map(AttoUsd).ok_or_else(bad)
        } else {
            let d = 10i128.checked_pow(u32::try_from(-shift).map_err(|_| bad())?);
            match d {
                // Round up: a price is never made cheaper than written.
                Some(d) => Ok(AttoUsd((n + d - 1) / d)),
                None => Ok(AttoUsd(1)),
            }
        }
    }

    /// `self * tokens`, exact.
    #[must_use]
    pub fn times(self, tokens: u64) -> AttoUsd {
        AttoUsd(self.0.saturating_mul(i128::from(tokens)))
    }

    /// Sum, exact (saturating at i128 bounds, which no real call approaches).
    #[must_use]
    pub fn plus(self, o: AttoUsd) -> AttoUsd {
        AttoUsd(self.0.saturating_add(o.0))
    }

    /// Rounds up to whole nano-USD: the single rounding step of a call's cost.
    #[must_use]
    pub fn ceil_nanos(self) -> i64 {
        let q = self.0.div_euclid(ATTOS_PER_NANO);
        let r = self.0.rem_euclid(ATTOS_PER_NANO);
        let n = if r > 0 { q + 1 } else { q };
        i64::try_from(n).unwrap_or(i64::MAX)
    }
}

impl FromStr for AttoUsd {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AttoUsd::from_decimal_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_prices_exactly() {
        assert_eq!(
            AttoUsd::from_decimal_str("3e-06").unwrap().0,
            3_000_000_000_000
        );
        assert_eq!(
            AttoUsd::from_decimal_str("0.000003").unwrap().0,
            3_000_000_000_000
        );
        assert_eq!(
            AttoUsd::from_decimal_str("1.25E-7").unwrap().0,
            125_000_000_000
        );
        assert_eq!(
            AttoUsd::from_decimal_str("7.5e-08").unwrap().0,
            75_000_000_000
        );
        assert_eq!(
            AttoUsd::from_decimal_str("15").unwrap().0,
            15 * ATTOS_PER_USD
        );
        assert_eq!(AttoUsd::from_decimal_str("0").unwrap().0, 0);
        assert_eq!(
            AttoUsd::from_decimal_str("1e-19").unwrap().0,
            1,
            "sub-atto rounds up"
        );
        assert_eq!(
            AttoUsd::from_decimal_str("0.000003000000000000000000000000000000000")
                .unwrap()
                .0,
            3_000_000_000_000
        );
        assert_eq!(AttoUsd::from_decimal_str("1e-2147483648").unwrap().0, 1);
        for bad in [
            "",
            "-1",
            "abc",
            "1e",
            "1.2.3",
            ".",
            "1e99999",
            "1e2147483647",
        ] {
            assert!(
                AttoUsd::from_decimal_str(bad).is_err(),
                "{bad:?} must be rejected"
            );
        }
    }

    #[test]
    fn rounds_up_once_per_call() {
        // 1117 tokens at $0.15/M = 0.00016755 USD = 167_550 nano-USD exactly.
        let p = AttoUsd::from_decimal_str("1.5e-07").unwrap();
        assert_eq!(p.times(1117).ceil_nanos(), 167_550);
        // 1 token at 7.5e-11 USD = 0.075 nano-USD -> rounds up to 1.
        let p = AttoUsd::from_decimal_str("7.5e-11").unwrap();
        assert_eq!(p.times(1).ceil_nanos(), 1);
        // Three such tokens summed first: 0.225 -> 1, not 3.
        assert_eq!(p.times(1).plus(p.times(1)).plus(p.times(1)).ceil_nanos(), 1);
    }

    #[test]
    fn usd_strings_and_floats() {
        assert_eq!(
            Nanos::from_usd_str("50").unwrap(),
            Nanos(50 * NANOS_PER_USD)
        );
        assert_eq!(Nanos::from_usd_f64(0.1).unwrap(), Nanos(100_000_000));
        assert_eq!(Nanos::from_usd_f64(5.0).unwrap(), Nanos(5_000_000_000));
        assert!(Nanos::from_usd_f64(-1.0).is_err());
        assert!(Nanos::from_usd_f64(f64::NAN).is_err());
        assert_eq!(Nanos(49_980_000_000).to_string(), "$49.98");
        assert_eq!(Nanos(123_456).to_string(), "$0.000123456");
        assert_eq!(Nanos(-5).to_string(), "-$0.000000005");
    }
}
