//! Newtypes for the identifiers that cross the wire, each validated where it is parsed.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A node (file, directory or symlink) of the namespace. The root directory is [`NodeId::ROOT`];
/// ids are never reused, so the client uses them directly as FUSE inode numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub u64);

impl NodeId {
    /// The root directory; equal to FUSE's root inode number.
    pub const ROOT: NodeId = NodeId(1);
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A file server, as numbered by the directory at registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ServerId(pub u64);

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fs{}", self.0)
    }
}

/// A fencing token issued with a lock grant; grows per file and never goes back, also across
/// lock-service restarts. Writers present it; the primary refuses tokens older than the newest
/// it accepted for that file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FenceToken(pub u64);

impl fmt::Display for FenceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Error for a malformed hash or upload id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be {len} lowercase hex digits")]
pub struct HexError {
    what: &'static str,
    len: usize,
}

fn parse_hex(s: &str, len: usize, what: &'static str) -> Result<String, HexError> {
    if s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(s.to_owned())
    } else {
        Err(HexError { what, len })
    }
}

/// SHA-256 of a file's whole content, as 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContentHash(String);

impl ContentHash {
    /// SHA-256 of the empty string: the content of every new file.
    pub const EMPTY_HEX: &'static str =
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// Parses 64 lowercase hex digits.
    pub fn parse(s: &str) -> Result<Self, HexError> {
        parse_hex(s, 64, "content hash").map(ContentHash)
    }

    /// The hash of empty content.
    pub fn empty() -> Self {
        ContentHash(Self::EMPTY_HEX.to_owned())
    }

    /// Builds a hash from a raw 32-byte digest.
    pub fn from_digest(digest: &[u8; 32]) -> Self {
        let mut s = String::with_capacity(64);
        for b in digest {
            s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            s.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
        }
        ContentHash(s)
    }

    /// The hex form; safe to use as a file name (validated hex only).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ContentHash {
    type Error = HexError;
    fn try_from(s: String) -> Result<Self, HexError> {
        ContentHash::parse(&s)
    }
}

impl From<ContentHash> for String {
    fn from(h: ContentHash) -> String {
        h.0
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Idempotency key of one upload: 32 lowercase hex digits chosen by the client. A retried upload
/// carries the same id, so the directory applies it at most once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UploadId(String);

impl UploadId {
    /// Parses 32 lowercase hex digits.
    pub fn parse(s: &str) -> Result<Self, HexError> {
        parse_hex(s, 32, "upload id").map(UploadId)
    }

    /// Builds an id from 16 random bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        let mut s = String::with_capacity(32);
        for b in bytes {
            s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            s.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
        }
        UploadId(s)
    }

    /// The hex form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UploadId {
    type Error = HexError;
    fn try_from(s: String) -> Result<Self, HexError> {
        UploadId::parse(&s)
    }
}

impl From<UploadId> for String {
    fn from(h: UploadId) -> String {
        h.0
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hash_accepts_only_lowercase_hex_of_right_length() {
        assert!(ContentHash::parse(ContentHash::EMPTY_HEX).is_ok());
        assert!(ContentHash::parse(&ContentHash::EMPTY_HEX.to_uppercase()).is_err());
        assert!(ContentHash::parse("../../etc/passwd").is_err());
        assert!(ContentHash::parse("abc").is_err());
        assert_eq!(
            ContentHash::from_digest(&[0xab; 32]).as_str(),
            "ab".repeat(32)
        );
    }

    #[test]
    fn upload_id_round_trips_through_json() {
        let id = UploadId::from_bytes([7; 16]);
        let json = serde_json_like(&id);
        assert_eq!(json, "07".repeat(16));
        assert!(UploadId::parse("zz").is_err());
    }

    fn serde_json_like(id: &UploadId) -> String {
        String::from(id.clone())
    }
}
