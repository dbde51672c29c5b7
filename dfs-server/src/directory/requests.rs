//! Request ids: a namespace change (create, remove, rename, link, setattr) that carries
//! `x-dfs-request-id` is applied once, however often the client retries it (a lost answer,
//! a timeout, another directory instance). The id is looked up inside the operation's own
//! transaction: remembered, its answer (or its refusal) is returned and nothing is applied
//! again; else the operation runs and its answer is remembered in that same transaction.
//!
//! A refusal aborts the operation's transaction, so it is remembered by a second, small one
//! (unless an answer was remembered meanwhile, which then wins). Only refusals are
//! remembered (`ENOENT`, `EEXIST`, `EACCES`...); a failure of the store or of a peer is not,
//! so a retry runs again.
//!
//! Ids are scoped to the caller's uid (one user cannot read another's answers) and kept
//! `KEEP_MS`; an answer older than that is not honoured, even while still stored. After every
//! operation with an id a best-effort sweep, in a transaction of its own (`sweep`), removes at
//! most `EXPIRE_PER_OP` expired ones, oldest first, so the work per operation is bounded, the
//! tables stay as small as the last ten minutes' traffic, and the operations' own
//! transactions never read the shared expiry queue (etcd: no conflicts between unrelated
//! changes on it).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{ServiceError, ServiceResult};
use crate::meta::{MetaStore, Table, Txn};
use crate::store::{decode, encode};

/// `(uid, id)` → the remembered answer (`Remembered`, JSON).
pub(crate) const REQUESTS: Table<(u64, String), Vec<u8>> = Table::new("requests");
/// `(remembered at, ms; uid; id)`: the expiry queue of `REQUESTS`.
pub(crate) const REQUEST_EXPIRY: Table<(u64, u64, String), ()> = Table::new("request_expiry");

/// How long an answer is remembered.
pub const KEEP_MS: u64 = 10 * 60 * 1000;
/// Expired answers one operation removes at most.
pub const EXPIRE_PER_OP: usize = 8;
/// The longest request id.
pub const MAX_LEN: usize = 64;

/// A validated request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    /// Validates an id from the client: 1 to 64 characters of `[A-Za-z0-9-]`.
    pub fn parse(s: &str) -> ServiceResult<Self> {
        if s.is_empty()
            || s.len() > MAX_LEN
            || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(ServiceError::BadRequest(format!(
                "{} must be 1 to {MAX_LEN} characters of [A-Za-z0-9-]",
                common::routes::REQUEST_ID
            )));
        }
        Ok(RequestId(s.to_owned()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Serialize, Deserialize)]
struct Remembered {
    at_ms: u64,
    answer: Result<serde_json::Value, common::ErrorBody>,
}

/// The key of `id` for caller `uid`.
pub(crate) fn key(uid: u32, id: &RequestId) -> (u64, String) {
    (u64::from(uid), id.0.clone())
}

/// The answer remembered for `key`, if one younger than `KEEP_MS` is.
pub(crate) fn recall<T: DeserializeOwned>(
    tx: &Txn,
    key: &(u64, String),
    now_ms: u64,
) -> ServiceResult<Option<ServiceResult<T>>> {
    let Some(bytes) = tx.get(REQUESTS, key)? else {
        return Ok(None);
    };
    let r: Remembered = decode(&bytes)?;
    if r.at_ms.saturating_add(KEEP_MS) <= now_ms {
        return Ok(None);
    }
    Ok(Some(match r.answer {
        Ok(v) => Ok(serde_json::from_value(v)
            .map_err(|e| ServiceError::internal("decoding a remembered answer", e))?),
        Err(body) => Err(ServiceError::Remembered(body)),
    }))
}

/// Remembers `answer` for `key` (replacing an expired answer still stored).
pub(crate) fn remember<T: Serialize>(
    tx: &Txn,
    key: &(u64, String),
    answer: Result<&T, &common::ErrorBody>,
    now_ms: u64,
) -> ServiceResult<()> {
    if let Some(old) = tx.get(REQUESTS, key)? {
        let old: Remembered = decode(&old)?;
        tx.delete(REQUEST_EXPIRY, &(old.at_ms, key.0, key.1.clone()))?;
    }
    let answer = match answer {
        Ok(v) => Ok(serde_json::to_value(v)?),
        Err(body) => Err(body.clone()),
    };
    tx.put(
        REQUESTS,
        key,
        &encode(&Remembered {
            at_ms: now_ms,
            answer,
        })?,
    )?;
    tx.put(REQUEST_EXPIRY, &(now_ms, key.0, key.1.clone()), &())
}

/// After an operation with an id, in a transaction of its own, best effort: forgets at most
/// `EXPIRE_PER_OP` expired answers. Not in the operation's transaction, whose read set would
/// then hold the oldest expiry rows that every concurrent operation reads too (on etcd, a
/// conflict between unrelated changes). A sweep that conflicts with another is not run again
/// (the next operation sweeps); an expired answer not yet swept is not honoured (`recall`).
pub(crate) fn sweep(store: &MetaStore) {
    let now = crate::store::now_ms();
    // Most operations find nothing expired: a read answers that without a write transaction
    // (on redb, one more commit per operation; on etcd, one more raft write).
    match store.read(|tx| Ok(!expired(tx, now, 1)?.is_empty())) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::debug!(error = %e, "reading expired request ids failed; the next operation sweeps");
            return;
        }
    }
    match store.write_once(|tx| expire(tx, now)) {
        Ok(0) => {}
        Ok(n) => tracing::trace!(n, "expired request ids forgotten"),
        Err(e) => {
            tracing::debug!(error = %e, "sweeping expired request ids failed; the next operation sweeps")
        }
    }
}

/// An expiry row's key: (when remembered, ms; uid; id).
type ExpiryKey = (u64, u64, String);

/// At most `limit` expiry rows of answers older than `KEEP_MS`, oldest first.
fn expired(tx: &Txn, now_ms: u64, limit: usize) -> ServiceResult<Vec<(ExpiryKey, ())>> {
    let cutoff = now_ms.saturating_sub(KEEP_MS);
    tx.range(
        REQUEST_EXPIRY,
        None,
        Some(&(cutoff, 0, String::new())),
        Some(limit),
    )
}

/// Forgets at most `EXPIRE_PER_OP` answers older than `KEEP_MS`, oldest first; returns how
/// many.
pub(crate) fn expire(tx: &Txn, now_ms: u64) -> ServiceResult<usize> {
    let old = expired(tx, now_ms, EXPIRE_PER_OP)?;
    let n = old.len();
    for ((at, uid, id), ()) in old {
        tx.delete(REQUEST_EXPIRY, &(at, uid, id.clone()))?;
        tx.delete(REQUESTS, &(uid, id))?;
    }
    Ok(n)
}

/// A refusal worth remembering: the answer a retry must get again. Failures of the store or
/// of a peer are not: a retry runs again.
pub(crate) fn is_refusal(e: &ServiceError) -> bool {
    use common::ErrorCode as C;
    matches!(
        e.code(),
        C::BadRequest
            | C::InvalidName
            | C::NotFound
            | C::Exists
            | C::NotEmpty
            | C::NotDir
            | C::IsDir
            | C::InvalidMove
            | C::Forbidden
            | C::AccessDenied
            | C::TooLarge
            | C::NameTooLong
            | C::TooManyLinks
    ) && !matches!(e, ServiceError::Remembered(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_short_and_plain() {
        assert!(RequestId::parse("0f1e-AB-9").is_ok());
        assert!(RequestId::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "a b", "a/b", "ä", "a_b"] {
            assert!(RequestId::parse(bad).is_err(), "{bad:?}");
        }
        let long = RequestId::parse(&"a".repeat(65)).expect_err("65 characters");
        assert!(long.to_string().contains("x-dfs-request-id"), "{long}");
    }
}
