//! Money as integer micro-units: 1 currency unit = 1 000 000 micros, so sums are exact.

use crate::error::{KeyError, Result};

/// Micro-units in one currency unit.
pub const MICROS_PER_UNIT: u64 = 1_000_000;

/// The largest amount of micros stores accept (SQL `BIGINT`): `i64::MAX`.
pub const MAX_MICROS: u64 = i64::MAX as u64;

/// `amount` currency units as micros, rounded to the nearest micro.
///
/// [`KeyError::Invalid`] for a negative, NaN or infinite amount, or one above [`MAX_MICROS`]
/// micros (about 9.2 × 10^12 units).
pub fn to_micros(amount: f64) -> Result<u64> {
    if !amount.is_finite() || amount < 0.0 {
        return Err(KeyError::Invalid(format!(
            "amount {amount} is not a finite, non-negative number"
        )));
    }
    let micros = (amount * MICROS_PER_UNIT as f64).round();
    // MAX_MICROS as f64 rounds up to 2^63, which is itself out of range.
    if micros >= MAX_MICROS as f64 {
        return Err(KeyError::Invalid(format!("amount {amount} is too large")));
    }
    // In range and integral: the conversion is exact.
    Ok(micros as u64)
}

/// `micros` in currency units. [`to_micros`] turns the result back into `micros` exactly below
/// 2^50 micros (about 10^9 currency units).
pub fn from_micros(micros: u64) -> f64 {
    micros as f64 / MICROS_PER_UNIT as f64
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn conversions() {
        assert_eq!(to_micros(0.0).unwrap(), 0);
        assert_eq!(to_micros(0.20).unwrap(), 200_000);
        assert_eq!(to_micros(1.0).unwrap(), 1_000_000);
        assert_eq!(to_micros(12.345678).unwrap(), 12_345_678);
        assert_eq!(
            to_micros(0.0000004).unwrap(),
            0,
            "rounds down below half a micro"
        );
        assert_eq!(
            to_micros(0.0000006).unwrap(),
            1,
            "rounds up above half a micro"
        );
        // 0.1 + 0.2 != 0.3 in f64, but in micros it is.
        assert_eq!(
            to_micros(0.1).unwrap() + to_micros(0.2).unwrap(),
            to_micros(0.3).unwrap()
        );
        assert_eq!(from_micros(200_000), 0.2);
        assert_eq!(from_micros(0), 0.0);
        assert_eq!(from_micros(1), 0.000001);
        assert_eq!(to_micros(9e12).unwrap(), 9_000_000_000_000_000_000);
        for bad in [
            -0.01,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e13,
            9.3e12,
        ] {
            assert!(matches!(to_micros(bad), Err(KeyError::Invalid(_))), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn micros_round_trip(micros in 0u64..(1 << 50)) {
            prop_assert_eq!(to_micros(from_micros(micros)).unwrap(), micros);
        }
    }
}
