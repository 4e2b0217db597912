//! The `key=value,key=value` syntax of command-line options, as Cloud Hypervisor spells it
//! (`--cpus boot=2`, `--memory size=512M`, later `--disk path=IMG,readonly=on`).
//!
//! One small parser serves every option: an option lists the keys it knows, and reads typed
//! values back by key. Errors name the option and the key so that a user sees what to fix.

use std::fmt::Display;
use std::str::FromStr;

/// A malformed option value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("{option}: Empty value")]
    Empty { option: &'static str },
    #[error("{option}: Empty item in `{input}`")]
    EmptyItem { option: &'static str, input: String },
    #[error("{option}: Unknown key `{key}` (expected {})", expected.join(", "))]
    UnknownKey {
        option: &'static str,
        key: String,
        expected: &'static [&'static str],
    },
    #[error("{option}: `{key}` is given twice")]
    DuplicateKey { option: &'static str, key: String },
    #[error("{option}: `{key}` needs a value ({key}=...)")]
    MissingValue { option: &'static str, key: String },
    #[error("{option}: `{key}` takes no value")]
    UnexpectedValue { option: &'static str, key: String },
    #[error("{option}: Unterminated quote in the value of `{key}`")]
    UnterminatedQuote { option: &'static str, key: String },
    #[error("{option}: `{key}` is required ({key}=...)")]
    MissingKey {
        option: &'static str,
        key: &'static str,
    },
    #[error("{option}: Invalid {key}={value}: {reason}")]
    InvalidValue {
        option: &'static str,
        key: String,
        value: String,
        reason: String,
    },
    #[error("{option}: Expected one of {expected}, got `{input}`")]
    OneOf {
        option: &'static str,
        expected: &'static str,
        input: String,
    },
}

/// One `key` or `key=value` item, the value unquoted.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Item<'a> {
    key: &'a str,
    value: Option<&'a str>,
}

/// The items of one option, checked against the keys the option knows.
#[derive(Clone, Debug)]
pub struct OptionList<'a> {
    option: &'static str,
    items: Vec<Item<'a>>,
}

impl<'a> OptionList<'a> {
    /// Splits `input` at commas into `key=value` or bare `key` items. A value may be wrapped in
    /// double quotes to hold commas (`path="a,b.img"`). Keys must be in `known`; none may repeat.
    pub fn parse(
        option: &'static str,
        input: &'a str,
        known: &'static [&'static str],
    ) -> Result<Self, OptionError> {
        if input.is_empty() {
            return Err(OptionError::Empty { option });
        }
        let mut items: Vec<Item<'a>> = Vec::new();
        let mut rest = input;
        loop {
            let (item, after) = split_item(option, rest)?;
            if item.key.is_empty() {
                return Err(OptionError::EmptyItem {
                    option,
                    input: input.to_owned(),
                });
            }
            if !known.contains(&item.key) {
                return Err(OptionError::UnknownKey {
                    option,
                    key: item.key.to_owned(),
                    expected: known,
                });
            }
            if items.iter().any(|i| i.key == item.key) {
                return Err(OptionError::DuplicateKey {
                    option,
                    key: item.key.to_owned(),
                });
            }
            items.push(item);
            match after {
                Some(next) => rest = next,
                None => break,
            }
        }
        Ok(Self { option, items })
    }

    /// The option's name, for errors raised by its caller.
    pub fn option(&self) -> &'static str {
        self.option
    }

    /// The keys given, in order.
    pub fn keys(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.items.iter().map(|i| i.key)
    }

    /// Number of items given.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Always false: an empty option is refused by [`OptionList::parse`].
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether `key` was given as a bare word; an error if it was given a value.
    pub fn flag(&self, key: &str) -> Result<bool, OptionError> {
        match self.items.iter().find(|i| i.key == key) {
            None => Ok(false),
            Some(Item { value: None, .. }) => Ok(true),
            Some(Item { value: Some(_), .. }) => Err(OptionError::UnexpectedValue {
                option: self.option,
                key: key.to_owned(),
            }),
        }
    }

    /// The raw value of `key`, if given; an error if it was given without `=value`.
    pub fn raw(&self, key: &str) -> Result<Option<&'a str>, OptionError> {
        match self.items.iter().find(|i| i.key == key) {
            None => Ok(None),
            Some(Item { value: Some(v), .. }) => Ok(Some(v)),
            Some(Item { value: None, .. }) => Err(OptionError::MissingValue {
                option: self.option,
                key: key.to_owned(),
            }),
        }
    }

    /// The value of `key` converted with `FromStr`, if given.
    pub fn get<T>(&self, key: &str) -> Result<Option<T>, OptionError>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.raw(key)?
            .map(|v| v.parse::<T>().map_err(|e| self.invalid(key, v, e)))
            .transpose()
    }

    /// The value of `key` converted with `FromStr`; an error if absent.
    pub fn required<T>(&self, key: &'static str) -> Result<T, OptionError>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.get(key)?.ok_or(OptionError::MissingKey {
            option: self.option,
            key,
        })
    }

    /// An [`OptionError::InvalidValue`] for `key=value`, for checks done after conversion.
    pub fn invalid(&self, key: &str, value: &str, reason: impl Display) -> OptionError {
        OptionError::InvalidValue {
            option: self.option,
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.to_string(),
        }
    }
}

/// Splits off the first item of `s`; returns it and what follows its comma, if any.
fn split_item<'a>(
    option: &'static str,
    s: &'a str,
) -> Result<(Item<'a>, Option<&'a str>), OptionError> {
    let key_end = s.find([',', '=']).unwrap_or(s.len());
    let key = &s[..key_end];
    let rest = &s[key_end..];
    if let Some(after) = rest.strip_prefix(',') {
        return Ok((Item { key, value: None }, Some(after)));
    }
    let Some(value_and_more) = rest.strip_prefix('=') else {
        // End of input after a bare key.
        return Ok((Item { key, value: None }, None));
    };
    if let Some(quoted) = value_and_more.strip_prefix('"') {
        let unterminated = || OptionError::UnterminatedQuote {
            option,
            key: key.to_owned(),
        };
        let close = quoted.find('"').ok_or_else(unterminated)?;
        let value = &quoted[..close];
        let after = &quoted[close + 1..];
        return match after.strip_prefix(',') {
            Some(next) => Ok((
                Item {
                    key,
                    value: Some(value),
                },
                Some(next),
            )),
            None if after.is_empty() => Ok((
                Item {
                    key,
                    value: Some(value),
                },
                None,
            )),
            // Text glued to the closing quote: the quoting is not what the user meant.
            None => Err(unterminated()),
        };
    }
    match value_and_more.find(',') {
        Some(comma) => Ok((
            Item {
                key,
                value: Some(&value_and_more[..comma]),
            },
            Some(&value_and_more[comma + 1..]),
        )),
        None => Ok((
            Item {
                key,
                value: Some(value_and_more),
            },
            None,
        )),
    }
}

/// An `on`/`off` switch (`readonly=on`); `true`/`false` are accepted too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Toggle(pub bool);

impl FromStr for Toggle {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" | "true" => Ok(Self(true)),
            "off" | "false" => Ok(Self(false)),
            _ => Err("Expected on or off"),
        }
    }
}

/// An unsigned integer with a readable error (the standard one says "invalid digit").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Number(pub u64);

impl FromStr for Number {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err("Expected a whole number");
        }
        s.parse().map(Self).map_err(|_| "Number too large")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[&str] = &["path", "readonly", "id", "tty"];

    fn parse(s: &str) -> Result<OptionList<'_>, OptionError> {
        OptionList::parse("--disk", s, KEYS)
    }

    #[test]
    fn key_values_and_flags() {
        let opts = parse("path=/a.img,readonly=on,tty").expect("valid");
        assert_eq!(opts.len(), 3);
        assert_eq!(opts.raw("path"), Ok(Some("/a.img")));
        assert_eq!(opts.get::<Toggle>("readonly"), Ok(Some(Toggle(true))));
        assert_eq!(opts.flag("tty"), Ok(true));
        assert_eq!(opts.flag("id"), Ok(false));
        assert_eq!(opts.raw("id"), Ok(None));
        assert_eq!(opts.keys().collect::<Vec<_>>(), ["path", "readonly", "tty"]);
    }

    #[test]
    fn empty_value_is_kept() {
        let opts = parse("id=").expect("valid");
        assert_eq!(opts.raw("id"), Ok(Some("")));
    }

    #[test]
    fn equals_inside_value() {
        let opts = parse("path=a=b").expect("valid");
        assert_eq!(opts.raw("path"), Ok(Some("a=b")));
    }

    #[test]
    fn quoted_value_holds_commas() {
        let opts = parse("path=\"a,b.img\",id=x").expect("valid");
        assert_eq!(opts.raw("path"), Ok(Some("a,b.img")));
        assert_eq!(opts.raw("id"), Ok(Some("x")));
        let opts = parse("path=\"a,b\"").expect("valid");
        assert_eq!(opts.raw("path"), Ok(Some("a,b")));
    }

    #[test]
    fn bad_quotes() {
        assert!(matches!(
            parse("path=\"a,b"),
            Err(OptionError::UnterminatedQuote { .. })
        ));
        assert!(matches!(
            parse("path=\"a\"b"),
            Err(OptionError::UnterminatedQuote { .. })
        ));
    }

    #[test]
    fn unknown_key_names_option_and_key() {
        let err = parse("path=x,size=1").expect_err("unknown key");
        assert_eq!(
            err.to_string(),
            "--disk: Unknown key `size` (expected path, readonly, id, tty)"
        );
    }

    #[test]
    fn structural_errors() {
        assert_eq!(
            parse("").expect_err("empty"),
            OptionError::Empty { option: "--disk" }
        );
        assert!(matches!(
            parse("path=x,,id=y"),
            Err(OptionError::EmptyItem { .. })
        ));
        assert!(matches!(
            parse("path=x,"),
            Err(OptionError::EmptyItem { .. })
        ));
        assert!(matches!(parse("=x"), Err(OptionError::EmptyItem { .. })));
        assert_eq!(
            parse("id=a,id=b").expect_err("duplicate").to_string(),
            "--disk: `id` is given twice"
        );
    }

    #[test]
    fn value_shape_errors() {
        let opts = parse("path,tty=1").expect("syntax is valid");
        assert_eq!(
            opts.raw("path").expect_err("bare").to_string(),
            "--disk: `path` needs a value (path=...)"
        );
        assert_eq!(
            opts.flag("tty").expect_err("valued").to_string(),
            "--disk: `tty` takes no value"
        );
        assert_eq!(
            opts.required::<String>("id")
                .expect_err("absent")
                .to_string(),
            "--disk: `id` is required (id=...)"
        );
    }

    #[test]
    fn conversion_errors_name_key_and_value() {
        let opts = parse("readonly=maybe,id=12x").expect("syntax is valid");
        assert_eq!(
            opts.get::<Toggle>("readonly")
                .expect_err("bad toggle")
                .to_string(),
            "--disk: Invalid readonly=maybe: Expected on or off"
        );
        assert_eq!(
            opts.get::<Number>("id")
                .expect_err("bad number")
                .to_string(),
            "--disk: Invalid id=12x: Expected a whole number"
        );
    }

    #[test]
    fn numbers() {
        assert_eq!("0".parse(), Ok(Number(0)));
        assert_eq!("18446744073709551615".parse(), Ok(Number(u64::MAX)));
        assert!("18446744073709551616".parse::<Number>().is_err());
        assert!("-1".parse::<Number>().is_err());
        assert!("+1".parse::<Number>().is_err());
        assert!("".parse::<Number>().is_err());
    }

    #[test]
    fn toggles() {
        assert_eq!("off".parse(), Ok(Toggle(false)));
        assert_eq!("false".parse(), Ok(Toggle(false)));
        assert_eq!("true".parse(), Ok(Toggle(true)));
        assert!("ON".parse::<Toggle>().is_err());
    }
}
