//! Placement: which live file servers hold a new file. Pure, so it is tested exhaustively.

use common::ServerId;

use crate::error::{ServiceError, ServiceResult};

/// Where a file lives: one primary that takes writes, replicas that get copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Takes writes and pushes them on.
    pub primary: ServerId,
    /// Hold copies; serve reads.
    pub replicas: Vec<ServerId>,
}

/// Picks `min(copies, live.len())` distinct servers, starting at `seed` modulo the live count so
/// that primaries spread evenly over the cluster.
pub fn place(live: &[ServerId], copies: u32, seed: u64) -> ServiceResult<Placement> {
    if live.is_empty() {
        return Err(ServiceError::Unavailable(
            "no live file servers to place the file on".into(),
        ));
    }
    let n = live.len();
    let want = usize::try_from(copies).unwrap_or(usize::MAX).clamp(1, n);
    let start = usize::try_from(seed % n as u64).unwrap_or(0);
    let mut chosen = (0..want).map(|i| live[(start + i) % n]);
    let primary = chosen
        .next()
        .ok_or_else(|| ServiceError::internal("placement", "empty"))?;
    Ok(Placement {
        primary,
        replicas: chosen.collect(),
    })
}

/// As [`place`] over the servers with room (`roomy`); servers short of space (`short`, most
/// free first) are taken only for the copies the others cannot hold.
pub fn place_by_room(
    roomy: &[ServerId],
    short: &[ServerId],
    copies: u32,
    seed: u64,
) -> ServiceResult<Placement> {
    if roomy.is_empty() {
        return place(short, copies, 0);
    }
    let mut p = place(roomy, copies, seed)?;
    let want = usize::try_from(copies).unwrap_or(usize::MAX);
    for s in short {
        if 1 + p.replicas.len() >= want {
            break;
        }
        p.replicas.push(*s);
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_short_of_space_get_only_the_copies_others_cannot_hold() {
        let ids = |v: &[u64]| v.iter().copied().map(ServerId).collect::<Vec<_>>();
        for seed in 0..6 {
            let p = place_by_room(&ids(&[1, 2, 3]), &ids(&[4]), 3, seed).expect("placement");
            let mut all = vec![p.primary];
            all.extend(&p.replicas);
            assert!(!all.contains(&ServerId(4)), "{all:?}");
            let p = place_by_room(&ids(&[1]), &ids(&[4, 3]), 3, seed).expect("placement");
            assert_eq!(p.primary, ServerId(1));
            assert_eq!(
                p.replicas,
                ids(&[4, 3]),
                "the short ones fill in, most free first"
            );
        }
        // All short: still placed (a small file may fit), on the roomiest first.
        let p = place_by_room(&[], &ids(&[5, 6]), 2, 9).expect("placement");
        assert_eq!(p.primary, ServerId(5));
        assert!(place_by_room(&[], &[], 2, 0).is_err());
    }

    #[test]
    fn placements_are_distinct_sized_and_spread() {
        for n in 1..=6u64 {
            let live: Vec<ServerId> = (1..=n).map(ServerId).collect();
            for copies in 1..=5u32 {
                let mut primaries = std::collections::HashSet::new();
                for seed in 0..n {
                    let p = place(&live, copies, seed).expect("placement");
                    let mut all = vec![p.primary];
                    all.extend(&p.replicas);
                    let expect = usize::try_from(u64::from(copies).min(n)).expect("fits");
                    assert_eq!(all.len(), expect);
                    let set: std::collections::HashSet<_> = all.iter().collect();
                    assert_eq!(set.len(), all.len(), "distinct servers");
                    assert!(all.iter().all(|s| live.contains(s)));
                    primaries.insert(p.primary);
                }
                assert_eq!(
                    primaries.len() as u64,
                    n,
                    "every server is primary for some seed"
                );
            }
        }
    }

    #[test]
    fn no_live_server_is_unavailable() {
        assert!(matches!(
            place(&[], 3, 0),
            Err(ServiceError::Unavailable(_))
        ));
    }
}
