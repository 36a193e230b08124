//! The text form of a user's `-global driver.property=value`.

use std::fmt;
use std::str::FromStr;

use super::{CompatError, Global, GlobalProblem};

impl Global {
    pub fn new(
        driver: impl Into<String>,
        property: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        Self {
            driver: driver.into(),
            property: property.into(),
            value: value.into(),
        }
    }
}

/// Parses `driver.property=value`. The driver is everything before the first `.` (driver names
/// may contain `-` but never `.`), the property everything between that `.` and the first `=`,
/// the value everything after that `=` (it may itself contain `.` or `=`).
///
/// Only the shape is checked here; whether the driver, property and value exist and fit is
/// checked against a registry by [`Registry::configure`](super::Registry::configure).
impl FromStr for Global {
    type Err = CompatError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let malformed = |problem| CompatError::MalformedGlobal {
            text: text.to_string(),
            problem,
        };
        let (target, value) = text
            .split_once('=')
            .ok_or_else(|| malformed(GlobalProblem::MissingEquals))?;
        let (driver, property) = target
            .split_once('.')
            .ok_or_else(|| malformed(GlobalProblem::MissingDot))?;
        if driver.is_empty() {
            return Err(malformed(GlobalProblem::EmptyDriver));
        }
        if property.is_empty() {
            return Err(malformed(GlobalProblem::EmptyProperty));
        }
        if value.is_empty() {
            return Err(malformed(GlobalProblem::EmptyValue));
        }
        Ok(Global::new(driver, property, value))
    }
}

/// The `driver.property=value` text that [`Global::from_str`] reads back.
impl fmt::Display for Global {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}={}", self.driver, self.property, self.value)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn global_parses_driver_property_and_value() {
        let global: Global = "virtio-blk.num-queues=4".parse().unwrap();
        assert_eq!(global, Global::new("virtio-blk", "num-queues", "4"));
        // The property runs to the first '=', the value may hold '.' and '='.
        let global: Global = "a-b.c.d=e=f.g".parse().unwrap();
        assert_eq!(global, Global::new("a-b", "c.d", "e=f.g"));
        assert_eq!(global.to_string(), "a-b.c.d=e=f.g");
    }

    #[test]
    fn malformed_global_says_what_is_missing() {
        let cases = [
            ("virtio-blk.num-queues", GlobalProblem::MissingEquals),
            ("virtio-blk=4", GlobalProblem::MissingDot),
            ("migration=on.x", GlobalProblem::MissingDot),
            (".num-queues=4", GlobalProblem::EmptyDriver),
            ("virtio-blk.=4", GlobalProblem::EmptyProperty),
            ("virtio-blk.num-queues=", GlobalProblem::EmptyValue),
            ("", GlobalProblem::MissingEquals),
        ];
        for (text, problem) in cases {
            let err = text.parse::<Global>().unwrap_err();
            assert_eq!(
                err,
                CompatError::MalformedGlobal {
                    text: text.to_string(),
                    problem
                }
            );
            let message = err.to_string();
            for needle in [
                &format!("{text:?}"),
                &problem.to_string(),
                "driver.property=value",
            ] {
                assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            }
        }
    }

    proptest! {
        #[test]
        fn parsing_never_panics(text in "\\PC{0,24}") {
            if let Ok(global) = text.parse::<Global>() {
                prop_assert_eq!(global.to_string(), text);
            }
        }

        #[test]
        fn global_text_round_trips(
            driver in "[a-z][a-z0-9-]{0,12}",
            property in "[a-z][a-z0-9.-]{0,12}",
            value in "[ -~]{1,12}",
        ) {
            let global = Global::new(driver, property, value);
            prop_assert_eq!(global.to_string().parse::<Global>(), Ok(global));
        }
    }
}
