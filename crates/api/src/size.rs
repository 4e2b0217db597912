//! Byte sizes as people write them: `512M`, `1G`, `4096` (plain numbers are bytes, as in Cloud
//! Hypervisor). Suffixes are binary: K = 1024.

use std::fmt;
use std::str::FromStr;

use serde::Deserializer;
use serde::de::{self, Visitor};

/// Why a size did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("Empty size")]
    Empty,
    #[error("Unknown size suffix `{0}` (expected K, M or G, or a plain number of bytes)")]
    BadSuffix(String),
    #[error("Expected a number of bytes with an optional K, M or G suffix")]
    NotANumber,
    #[error("Size does not fit in 64 bits")]
    Overflow,
}

/// A size in bytes, parsed from `N`, `NK`, `NM` or `NG` (lower case accepted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_size(s).map(Self)
    }
}

/// Parses a size: digits, then at most one of K, M, G.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(SizeError::NotANumber);
    }
    let shift = match suffix {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        other => return Err(SizeError::BadSuffix(other.to_owned())),
    };
    let n: u64 = digits.parse().map_err(|_| SizeError::Overflow)?;
    n.checked_mul(1u64 << shift).ok_or(SizeError::Overflow)
}

/// A size for messages: exact in the largest binary unit that divides it.
pub fn display_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (unit, shift) in UNITS {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

/// Deserializes a size given as a number of bytes or as a string such as `"512M"`, so that a
/// config file reads like the command line.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number of bytes or a string such as \"512M\"")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(|e| E::custom(format_args!("invalid size `{v}`: {e}")))
        }
    }

    deserializer.deserialize_any(SizeVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1024G"), Ok(1 << 40));
    }

    #[test]
    fn bad_suffixes() {
        assert_eq!(parse_size("12Q"), Err(SizeError::BadSuffix("Q".into())));
        assert_eq!(parse_size("1KB"), Err(SizeError::BadSuffix("KB".into())));
        assert_eq!(parse_size("1MiB"), Err(SizeError::BadSuffix("MiB".into())));
        assert_eq!(parse_size("1 M"), Err(SizeError::BadSuffix(" M".into())));
        assert_eq!(parse_size("1.5G"), Err(SizeError::BadSuffix(".5G".into())));
    }

    #[test]
    fn not_numbers() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("M"), Err(SizeError::NotANumber));
        assert_eq!(parse_size("-1"), Err(SizeError::NotANumber));
        assert_eq!(parse_size(" 1"), Err(SizeError::NotANumber));
    }

    #[test]
    fn overflow() {
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_size("18446744073709551616"), Err(SizeError::Overflow));
        assert_eq!(parse_size("17179869184G"), Err(SizeError::Overflow));
        assert_eq!(parse_size("17179869183G"), Ok(17_179_869_183 << 30));
        assert_eq!(
            parse_size("99999999999999999999999K"),
            Err(SizeError::Overflow)
        );
    }

    #[test]
    fn display() {
        assert_eq!(display_size(1024), "1 KiB");
        assert_eq!(display_size(16 << 20), "16 MiB");
        assert_eq!(display_size(3 << 30), "3 GiB");
        assert_eq!(display_size(1 << 40), "1 TiB");
        assert_eq!(display_size(1000), "1000 bytes");
        assert_eq!(display_size(0), "0 bytes");
    }
}
