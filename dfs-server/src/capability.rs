//! Capabilities: the directory's signed word that one user may read one version of one file,
//! so that the file servers, which serve the bytes, enforce what the directory decided. The
//! directory issues one with every open it authorises (`GET /v1/nodes/{id}?access=r`); a file
//! server serves a blob to a user only against a capability for that node and content hash,
//! still valid. Signed with HMAC-SHA256 under the cluster key, which every service holds.
//!
//! Form: `v1.<node>.<hash>.<uid>.<access>.<expiry ms>.<hex signature>`.

use common::perm::{R, W};
use common::{ContentHash, NodeId};
use hmac::{KeyInit, Mac};

use crate::error::{ServiceError, ServiceResult};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// How long a capability stays valid: enough to start the download an open leads to.
pub const TTL_MS: u64 = 10 * 60 * 1000;

fn mac(key: &str, body: &str) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(b"dfs-capability:");
    mac.update(body.as_bytes());
    mac
}

/// A capability for `uid` to `access` (`R`, `W` or both) version `hash` of `node`.
pub fn issue(
    key: &str,
    node: NodeId,
    hash: &ContentHash,
    uid: u32,
    access: u32,
    now_ms: u64,
) -> String {
    let body = format!(
        "v1.{node}.{}.{uid}.{}.{}",
        hash.as_str(),
        access & (R | W),
        now_ms.saturating_add(TTL_MS)
    );
    let sig = hex::encode(mac(key, &body).finalize().into_bytes());
    format!("{body}.{sig}")
}

/// Checks that `cap` lets its holder `want` version `hash` of `node` now; refused (EACCES)
/// otherwise.
pub fn verify(
    key: &str,
    cap: &str,
    node: NodeId,
    hash: &ContentHash,
    want: u32,
    now_ms: u64,
) -> ServiceResult<()> {
    check(key, cap, node, Some(hash), want, now_ms)
}

/// As `verify`, for any version of `node` (a writer queueing for its lock writes a new one).
pub fn verify_node(
    key: &str,
    cap: &str,
    node: NodeId,
    want: u32,
    now_ms: u64,
) -> ServiceResult<()> {
    check(key, cap, node, None, want, now_ms)
}

fn check(
    key: &str,
    cap: &str,
    node: NodeId,
    hash: Option<&ContentHash>,
    want: u32,
    now_ms: u64,
) -> ServiceResult<()> {
    let denied = |why: &str| ServiceError::AccessDenied(format!("capability {why}"));
    let (body, sig) = cap.rsplit_once('.').ok_or_else(|| denied("malformed"))?;
    let sig = hex::decode(sig).map_err(|_| denied("malformed"))?;
    mac(key, body)
        .verify_slice(&sig)
        .map_err(|_| denied("not signed by this cluster"))?;
    let parts: Vec<&str> = body.split('.').collect();
    let [version, n, h, _uid, access, exp] = parts[..] else {
        return Err(denied("malformed"));
    };
    if version != "v1" {
        return Err(denied("of an unknown version"));
    }
    if n != node.0.to_string() || hash.is_some_and(|hash| h != hash.as_str()) {
        return Err(denied("for another file or version"));
    }
    let access: u32 = access.parse().map_err(|_| denied("malformed"))?;
    if access & want != want {
        return Err(denied("does not grant this access"));
    }
    let exp: u64 = exp.parse().map_err(|_| denied("malformed"))?;
    if exp <= now_ms {
        return Err(denied("expired; open the file again"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capability_grants_exactly_one_version_for_its_access_until_it_expires() {
        let h = ContentHash::from_digest(&[1; 32]);
        let other = ContentHash::from_digest(&[2; 32]);
        let cap = issue("k", NodeId(7), &h, 10_000, R, 1_000);
        verify("k", &cap, NodeId(7), &h, R, 2_000).expect("valid");
        assert!(
            verify("k", &cap, NodeId(7), &h, W, 2_000).is_err(),
            "read only"
        );
        assert!(
            verify("k", &cap, NodeId(8), &h, R, 2_000).is_err(),
            "another node"
        );
        assert!(
            verify("k", &cap, NodeId(7), &other, R, 2_000).is_err(),
            "another version"
        );
        assert!(
            verify("other-key", &cap, NodeId(7), &h, R, 2_000).is_err(),
            "forged"
        );
        assert!(
            verify("k", &cap, NodeId(7), &h, R, 1_000 + TTL_MS).is_err(),
            "expired"
        );
        let tampered = cap.replacen(".10000.", ".0.", 1);
        assert!(
            verify("k", &tampered, NodeId(7), &h, R, 2_000).is_err(),
            "tampered"
        );
        assert!(verify("k", "garbage", NodeId(7), &h, R, 2_000).is_err());
        let w = issue("k", NodeId(7), &h, 10_000, W, 1_000);
        verify_node("k", &w, NodeId(7), W, 2_000).expect("any version, for the lock");
        assert!(
            verify_node("k", &cap, NodeId(7), W, 2_000).is_err(),
            "a reader's"
        );
        assert!(verify_node("k", &w, NodeId(8), W, 2_000).is_err());
    }
}
