//! Named fault points of the services, for tests that inject a failure or a delay at one
//! place in milliseconds instead of stopping a whole service. They are `fail` crate points:
//! compiled to nothing unless the crate's `failpoints` feature is on, which only the test
//! builds enable (dev-dependencies); a release binary has none. Each point is a function of
//! its own, so a call site stays one line and the macro's early return stays in here.
//!
//! | point | where | action |
//! |---|---|---|
//! | `commit-answer-lost` | directory, after a version commit (applied or refused) | `return`: the caller gets 503 as if the answer was lost |
//! | `commit-part-fails` | directory, a part (one transaction) of a batch commit | `return(UPLOAD_ID)`: a part with that upload id fails (503) before its transaction |
//! | `replica-store` | file server, a replica about to store a pushed copy | `return`: the replica refuses (503) |
//! | `heartbeat-lost` | file server, before a heartbeat | `return(ID)`: server ID skips its beat |

use common::ServerId;

use crate::error::ServiceResult;

/// `commit-answer-lost`: the commit happened, its answer does not arrive.
pub fn commit_answer_lost() -> ServiceResult<()> {
    fail::fail_point!("commit-answer-lost", |_| Err(
        crate::error::ServiceError::Unavailable(
            "fault point commit-answer-lost: the commit's answer was lost".into()
        )
    ));
    Ok(())
}

/// `commit-part-fails`: a part of a batch commit holding the configured upload id fails (keyed
/// by upload id, so that tests running at once in one binary do not meet it).
pub fn commit_part_fails<'a>(mut upload_ids: impl Iterator<Item = &'a str>) -> ServiceResult<()> {
    let _ = &mut upload_ids; // unused where points are compiled out
    fail::fail_point!("commit-part-fails", |v: Option<String>| {
        match v {
            Some(v) if upload_ids.any(|u| u == v.trim()) => {
                Err(crate::error::ServiceError::Unavailable(
                    "fault point commit-part-fails: this part of the batch failed".into(),
                ))
            }
            _ => Ok(()),
        }
    });
    Ok(())
}

/// `replica-store`: a replica refuses the copy pushed to it.
pub fn replica_store() -> ServiceResult<()> {
    fail::fail_point!("replica-store", |_| Err(
        crate::error::ServiceError::Unavailable(
            "fault point replica-store: this replica refuses copies".into()
        )
    ));
    Ok(())
}

/// `heartbeat-lost`: whether server `me` skips this heartbeat.
pub fn heartbeat_lost(me: ServerId) -> bool {
    let _ = me; // unused where points are compiled out
    fail::fail_point!("heartbeat-lost", |v: Option<String>| v
        .is_some_and(|v| v.split(',').any(|id| id.trim() == me.to_string())));
    false
}
