//! Parsing property values from text and printing them back in canonical form.
//!
//! The parsers are the only place where text from a user (`-global`), from a compat table or from
//! a property default becomes a typed value, so they refuse anything they do not fully understand
//! and never panic: digits are checked before conversion, multiplications are checked for
//! overflow, and a suffix is split off at a character boundary.

use std::fmt;

use thiserror::Error;

use super::{PropKind, PropValue};

/// Words a [`PropKind::Bool`] accepts for true. The first is the canonical one.
pub const BOOL_TRUE_WORDS: &[&str] = &["on", "true", "yes"];
/// Words a [`PropKind::Bool`] accepts for false. The first is the canonical one.
pub const BOOL_FALSE_WORDS: &[&str] = &["off", "false", "no"];

/// Size suffixes and the power of two they stand for. All multiples are binary: `K` and `KiB`
/// both mean 1024, as in QEMU. `KB` is refused rather than guessed at, because it is read as
/// 1000 as often as 1024.
const SIZE_SUFFIXES: &[(&str, u32)] = &[
    ("", 0),
    ("B", 0),
    ("K", 10),
    ("k", 10),
    ("KiB", 10),
    ("M", 20),
    ("m", 20),
    ("MiB", 20),
    ("G", 30),
    ("g", 30),
    ("GiB", 30),
    ("T", 40),
    ("t", 40),
    ("TiB", 40),
];

/// Why a text is not a valid value of a property kind. Paired with the value, the property and
/// the kind's own description in [`CompatError::InvalidValue`](super::CompatError::InvalidValue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ValueProblem {
    #[error("the value is empty")]
    Empty,
    #[error("not one of the accepted words")]
    UnknownWord,
    #[error("not a decimal number")]
    NotANumber,
    #[error("fractions are not accepted")]
    Fraction,
    #[error("unknown size suffix")]
    UnknownSuffix,
    #[error("too large for 64 bits")]
    Overflow,
    #[error("out of range")]
    OutOfRange,
}

impl PropKind {
    /// Parses `text` as a value of this kind, checking ranges and words.
    ///
    /// `Size` values are returned as [`PropValue::U64`] holding bytes; their canonical text is
    /// the plain decimal byte count, which this parser accepts too.
    pub fn parse(&self, text: &str) -> Result<PropValue, ValueProblem> {
        if text.is_empty() {
            return Err(ValueProblem::Empty);
        }
        match *self {
            PropKind::Bool => parse_bool(text)
                .map(PropValue::Bool)
                .ok_or(ValueProblem::UnknownWord),
            PropKind::U64 { min, max } => {
                let n = parse_decimal(text)?;
                check_range(n, min, max).map(PropValue::U64)
            }
            PropKind::Size { min, max } => {
                let n = parse_size(text)?;
                check_range(n, min, max).map(PropValue::U64)
            }
            PropKind::Enum(words) => words
                .iter()
                .find(|word| **word == text)
                .map(|word| PropValue::Enum((*word).to_string()))
                .ok_or(ValueProblem::UnknownWord),
        }
    }
}

fn parse_bool(text: &str) -> Option<bool> {
    if BOOL_TRUE_WORDS.contains(&text) {
        Some(true)
    } else if BOOL_FALSE_WORDS.contains(&text) {
        Some(false)
    } else {
        None
    }
}

/// Plain ASCII decimal digits only: no sign, no spaces, no `0x`, no `_`.
fn parse_decimal(text: &str) -> Result<u64, ValueProblem> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ValueProblem::NotANumber);
    }
    // Only digits are left, so the one way `parse` can fail is a number above u64::MAX.
    text.parse::<u64>().map_err(|_| ValueProblem::Overflow)
}

/// A decimal number of bytes, optionally followed by `B`, by `K`, `M`, `G`, `T` (also in lower
/// case) or by `KiB`, `MiB`, `GiB`, `TiB`; every multiple is binary.
pub fn parse_size(text: &str) -> Result<u64, ValueProblem> {
    if text.is_empty() {
        return Err(ValueProblem::Empty);
    }
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(ValueProblem::NotANumber);
    }
    if suffix.starts_with('.') {
        return Err(ValueProblem::Fraction);
    }
    let shift = SIZE_SUFFIXES
        .iter()
        .find(|(word, _)| *word == suffix)
        .map(|(_, shift)| *shift)
        .ok_or(ValueProblem::UnknownSuffix)?;
    parse_decimal(digits)?
        .checked_mul(1u64 << shift)
        .ok_or(ValueProblem::Overflow)
}

fn check_range(n: u64, min: u64, max: u64) -> Result<u64, ValueProblem> {
    if (min..=max).contains(&n) {
        Ok(n)
    } else {
        Err(ValueProblem::OutOfRange)
    }
}

/// Bytes as text, with the largest exact binary suffix added in parentheses when there is one:
/// `4096 (4K)`, `1000`.
fn size_text(n: u64) -> String {
    let exact = [(40, "T"), (30, "G"), (20, "M"), (10, "K")]
        .into_iter()
        .find(|(shift, _)| n != 0 && n.trailing_zeros() >= *shift);
    match exact {
        Some((shift, suffix)) => format!("{n} ({}{suffix})", n >> shift),
        None => n.to_string(),
    }
}

/// Describes the valid values, for error messages: the words, or the range.
impl fmt::Display for PropKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PropKind::Bool => write!(
                f,
                "one of: {}, {}",
                BOOL_TRUE_WORDS.join(", "),
                BOOL_FALSE_WORDS.join(", ")
            ),
            PropKind::U64 { min, max } => write!(f, "an integer from {min} to {max}"),
            PropKind::Size { min, max } => write!(
                f,
                "a size from {} to {} bytes (a decimal number of bytes, optionally followed by \
                 K, M, G, T or KiB, MiB, GiB, TiB, all binary multiples)",
                size_text(min),
                size_text(max)
            ),
            PropKind::Enum([]) => f.write_str("nothing (this enum has no words)"),
            PropKind::Enum(words) => write!(f, "one of: {}", words.join(", ")),
        }
    }
}

/// The canonical text of a value: `on`/`off`, a decimal number (bytes, for sizes), or the word.
/// [`PropKind::parse`] of this text gives the value back.
impl fmt::Display for PropValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropValue::Bool(true) => f.write_str(BOOL_TRUE_WORDS[0]),
            PropValue::Bool(false) => f.write_str(BOOL_FALSE_WORDS[0]),
            PropValue::U64(n) => write!(f, "{n}"),
            PropValue::Enum(word) => f.write_str(word),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn size_suffixes_are_binary() {
        let cases = [
            ("0", 0),
            ("4096", 4096),
            ("007", 7),
            ("1B", 1),
            ("1K", 1 << 10),
            ("1k", 1 << 10),
            ("1KiB", 1 << 10),
            ("64M", 64 << 20),
            ("64MiB", 64 << 20),
            ("2G", 2 << 30),
            ("2g", 2 << 30),
            ("2GiB", 2 << 30),
            ("3T", 3 << 40),
            ("3TiB", 3 << 40),
            ("0G", 0),
            ("18446744073709551615", u64::MAX),
            ("16777215T", 16_777_215 << 40),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn size_overflow_and_junk_are_refused() {
        let cases = [
            ("18446744073709551616", ValueProblem::Overflow),
            ("16777216T", ValueProblem::Overflow),
            ("17179869184G", ValueProblem::Overflow),
            ("99999999999999999999999999999999K", ValueProblem::Overflow),
            ("", ValueProblem::Empty),
            ("K", ValueProblem::NotANumber),
            ("-1", ValueProblem::NotANumber),
            ("+1", ValueProblem::NotANumber),
            (" 1", ValueProblem::NotANumber),
            ("1 K", ValueProblem::UnknownSuffix),
            ("1KB", ValueProblem::UnknownSuffix),
            ("1Kib", ValueProblem::UnknownSuffix),
            ("1P", ValueProblem::UnknownSuffix),
            ("1K ", ValueProblem::UnknownSuffix),
            ("0x10", ValueProblem::UnknownSuffix),
            ("1.5G", ValueProblem::Fraction),
            ("1\u{0661}", ValueProblem::UnknownSuffix),
            ("\u{0661}", ValueProblem::NotANumber),
            ("1é", ValueProblem::UnknownSuffix),
        ];
        for (text, problem) in cases {
            assert_eq!(parse_size(text), Err(problem), "{text:?}");
        }
    }

    #[test]
    fn size_kind_checks_its_range_after_the_suffix() {
        let kind = PropKind::Size {
            min: 4096,
            max: 1 << 30,
        };
        assert_eq!(kind.parse("4K"), Ok(PropValue::U64(4096)));
        assert_eq!(kind.parse("1G"), Ok(PropValue::U64(1 << 30)));
        assert_eq!(kind.parse("4095"), Err(ValueProblem::OutOfRange));
        assert_eq!(kind.parse("1025M"), Err(ValueProblem::OutOfRange));
        assert!(kind
            .to_string()
            .contains("from 4096 (4K) to 1073741824 (1G) bytes"));
    }

    #[test]
    fn bool_words() {
        for (text, value) in [
            ("on", true),
            ("true", true),
            ("yes", true),
            ("off", false),
            ("false", false),
            ("no", false),
        ] {
            assert_eq!(PropKind::Bool.parse(text), Ok(PropValue::Bool(value)));
        }
        for text in ["ON", "1", "0", "y", "", "on "] {
            assert!(PropKind::Bool.parse(text).is_err(), "{text:?}");
        }
        assert_eq!(PropValue::Bool(true).to_string(), "on");
        assert_eq!(PropValue::Bool(false).to_string(), "off");
    }

    fn kind_and_value() -> impl Strategy<Value = (PropKind, PropValue)> {
        static WORD_SETS: &[&[&str]] = &[
            &["only"],
            &["none", "legacy", "multifd"],
            &["a-b", "c_d", "9"],
        ];
        let bool_case = any::<bool>().prop_map(|b| (PropKind::Bool, PropValue::Bool(b)));
        let ranged = |size: bool| {
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(move |(a, b, pick)| {
                let (min, max) = (a.min(b), a.max(b));
                // `max - min + 1` only saturates when the range is all of u64, where min is 0.
                let n = min + pick % (max - min).saturating_add(1);
                let kind = if size {
                    PropKind::Size { min, max }
                } else {
                    PropKind::U64 { min, max }
                };
                (kind, PropValue::U64(n))
            })
        };
        let enum_case =
            (0..WORD_SETS.len(), any::<prop::sample::Index>()).prop_map(|(set, pick)| {
                let words = WORD_SETS[set];
                let word = words[pick.index(words.len())];
                (PropKind::Enum(words), PropValue::Enum(word.to_string()))
            });
        prop_oneof![bool_case, ranged(false), ranged(true), enum_case]
    }

    proptest! {
        #[test]
        fn canonical_text_parses_back((kind, value) in kind_and_value()) {
            prop_assert_eq!(kind.parse(&value.to_string()), Ok(value));
        }

        #[test]
        fn suffixed_sizes_parse_to_their_multiple(n in any::<u64>(), suffix in 0usize..4) {
            let (text, shift) = [("K", 10), ("MiB", 20), ("G", 30), ("TiB", 40)][suffix];
            let expected = n.checked_mul(1 << shift).ok_or(ValueProblem::Overflow);
            prop_assert_eq!(parse_size(&format!("{n}{text}")), expected);
        }

        #[test]
        fn parsers_never_panic(text in "\\PC{0,24}") {
            for kind in [
                PropKind::Bool,
                PropKind::U64 { min: 0, max: u64::MAX },
                PropKind::Size { min: 0, max: u64::MAX },
                PropKind::Enum(&["none", "legacy", "multifd"]),
            ] {
                if let Ok(value) = kind.parse(&text) {
                    prop_assert_eq!(kind.parse(&value.to_string()), Ok(value));
                }
            }
        }
    }
}
