//! `ValidName`: one path component, parsed once at every boundary (FUSE adapter and server).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest name in bytes, as on ext4 and in POSIX `NAME_MAX`.
pub const NAME_MAX: usize = 255;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The empty string.
    #[error("name is empty")]
    Empty,
    /// `.` or `..`.
    #[error("name {0:?} is reserved")]
    Reserved(String),
    /// Contains `/` or NUL.
    #[error("name {0:?} contains '/' or NUL")]
    BadChar(String),
    /// Over [`NAME_MAX`] bytes.
    #[error("name is {0} bytes long, more than {NAME_MAX}")]
    TooLong(usize),
}

/// A directory entry name: non-empty, not `.`/`..`, no `/` or NUL, at most 255 bytes, UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ValidName(String);

impl ValidName {
    /// Validates `s` as a single path component.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > NAME_MAX {
            return Err(NameError::TooLong(s.len()));
        }
        if s == "." || s == ".." {
            return Err(NameError::Reserved(s.to_owned()));
        }
        if s.contains('/') || s.contains('\0') {
            return Err(NameError::BadChar(s.to_owned()));
        }
        Ok(ValidName(s.to_owned()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ValidName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        ValidName::parse(&s)
    }
}

impl From<ValidName> for String {
    fn from(n: ValidName) -> String {
        n.0
    }
}

impl fmt::Display for ValidName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_every_invalid_name() {
        assert_eq!(ValidName::parse(""), Err(NameError::Empty));
        assert!(matches!(ValidName::parse("."), Err(NameError::Reserved(_))));
        assert!(matches!(
            ValidName::parse(".."),
            Err(NameError::Reserved(_))
        ));
        assert!(matches!(
            ValidName::parse("a/b"),
            Err(NameError::BadChar(_))
        ));
        assert!(matches!(
            ValidName::parse("a\0b"),
            Err(NameError::BadChar(_))
        ));
        assert_eq!(
            ValidName::parse(&"x".repeat(256)),
            Err(NameError::TooLong(256))
        );
    }

    #[test]
    fn accepts_ordinary_names() {
        for n in [
            "a",
            ".hidden",
            "...",
            "notes.txt",
            &"x".repeat(255),
            "ünïcode",
        ] {
            assert_eq!(ValidName::parse(n).map(String::from), Ok(n.to_owned()));
        }
    }
}
