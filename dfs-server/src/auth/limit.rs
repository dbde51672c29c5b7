//! Login and signup rate limits, on tokio's clock (tests pause and advance it):
//!
//! - every attempt spends a token of its source address's bucket (this bounds the password
//!   hashing one address can cause);
//! - every *failed* attempt (wrong password, unknown user, taken name) spends a token of the
//!   bucket of its (user name, source address); once that is empty, attempts for that user
//!   from that address are refused before any password is checked. A success spends nothing
//!   and clears its (user, address) bucket, so nobody's failures from another address can
//!   keep a user out, the administrator included.
//!
//! In memory: a restart forgets them, and the maps are bounded (idle buckets go first), so a
//! flood of made-up names cannot grow them.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// A rate: `burst` attempts at once, then one more every `every`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Attempts allowed back to back.
    pub burst: u32,
    /// Time to earn one more.
    pub every: Duration,
}

impl Rate {
    /// `n` per minute, all of them at once if saved up.
    pub fn per_minute(n: u32) -> Rate {
        let n = n.max(1);
        Rate {
            burst: n,
            every: Duration::from_secs(60) / n,
        }
    }
}

/// Most keys remembered per map.
const MAX_KEYS: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens as of `at`.
    tokens: f64,
    at: Instant,
}

/// Token buckets by key.
#[derive(Debug)]
struct Buckets<K> {
    rate: Rate,
    map: HashMap<K, Bucket>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(rate: Rate) -> Self {
        Buckets {
            rate,
            map: HashMap::new(),
        }
    }

    fn refilled(&self, b: Bucket, now: Instant) -> f64 {
        let earned = now.saturating_duration_since(b.at).as_secs_f64()
            / self.rate.every.as_secs_f64().max(1e-9);
        (b.tokens + earned).min(f64::from(self.rate.burst))
    }

    /// Gives back one token taken for `key` (never past the burst).
    fn refund(&mut self, key: &K, now: Instant) {
        if let Some(b) = self.map.get(key).copied() {
            let tokens = (self.refilled(b, now) + 1.0).min(f64::from(self.rate.burst));
            self.map.insert(key.clone(), Bucket { tokens, at: now });
        }
    }

    /// Takes one token for `key`, or says how long until one is earned.
    fn take(&mut self, key: &K, now: Instant) -> Result<(), Duration> {
        if !self.map.contains_key(key) && self.map.len() >= MAX_KEYS {
            self.evict(now);
        }
        let fresh = Bucket {
            tokens: f64::from(self.rate.burst),
            at: now,
        };
        if !self.map.contains_key(key) && self.map.len() >= MAX_KEYS {
            // Every remembered key is still spending: a new one waits rather than push out
            // one of them (the map stays bounded and no limit is forgotten).
            return Err(self.rate.every);
        }
        let b = self.map.get(key).copied().unwrap_or(fresh);
        let tokens = self.refilled(b, now);
        if tokens >= 1.0 {
            self.map.insert(
                key.clone(),
                Bucket {
                    tokens: tokens - 1.0,
                    at: now,
                },
            );
            Ok(())
        } else {
            Err(self.rate.every.mul_f64(1.0 - tokens))
        }
    }

    /// Forgets full buckets (they hold nothing a fresh one would not), and only those: a
    /// drained bucket forgotten would hand its key a fresh burst.
    fn evict(&mut self, now: Instant) {
        let burst = f64::from(self.rate.burst);
        let rate = self.rate;
        self.map.retain(|_, b| {
            let earned =
                now.saturating_duration_since(b.at).as_secs_f64() / rate.every.as_secs_f64();
            b.tokens + earned < burst
        });
    }
}

/// Why an attempt was refused, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// What was limited ("user alice", "address 127.0.0.1").
    pub what: String,
    /// Until the next attempt is allowed.
    pub retry_after: Duration,
}

impl std::fmt::Display for Limited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "too many login or signup attempts for {}; try again in {} s",
            self.what,
            self.retry_after.as_secs().max(1)
        )
    }
}

/// The login and signup limits of one auth service.
#[derive(Debug)]
pub struct LoginLimits {
    /// Failed attempts by (user name, source address; None: a caller without one).
    users: std::sync::Mutex<Buckets<(String, Option<IpAddr>)>>,
    addrs: std::sync::Mutex<Buckets<IpAddr>>,
}

/// The key an address is limited by: IPv4 as it is, IPv6 by its /64 (one host usually has a
/// whole /64 to pick addresses from), IPv4-mapped IPv6 as the IPv4 address.
pub fn addr_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

fn show(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("{a}/64"),
    }
}

fn user_at(user: &str, addr: Option<IpAddr>) -> String {
    match addr {
        Some(a) => format!("user {user} from address {}", show(a)),
        None => format!("user {user}"),
    }
}

impl LoginLimits {
    /// Limits with these rates: failed attempts per user name and source address, all
    /// attempts per source address.
    pub fn new(per_user: Rate, per_addr: Rate) -> Self {
        LoginLimits {
            users: std::sync::Mutex::new(Buckets::new(per_user)),
            addrs: std::sync::Mutex::new(Buckets::new(per_addr)),
        }
    }

    /// One attempt for `user` from `addr` (checked once the envelope names the user, before
    /// any password hash): spends one of that pair's tokens up front, so attempts sent in
    /// parallel cannot all pass before the first failure is counted; refused while they are
    /// spent. An attempt that turns out not to be a failure gives its token back
    /// (`not_failed`) or clears the pair (`succeeded`).
    pub fn check_user(&self, user: &str, addr: Option<IpAddr>) -> Result<(), Limited> {
        let addr = addr.map(addr_key);
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(&(user.to_owned(), addr), Instant::now())
            .map_err(|retry_after| Limited {
                what: user_at(user, addr),
                retry_after,
            })
    }

    /// An attempt for `user` from `addr` ended other than by a wrong password (a signup made,
    /// a service error): the token it spent comes back.
    pub fn not_failed(&self, user: &str, addr: Option<IpAddr>) {
        let addr = addr.map(addr_key);
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refund(&(user.to_owned(), addr), Instant::now());
    }

    /// An attempt for `user` from `addr` succeeded: that pair's failures are forgotten.
    pub fn succeeded(&self, user: &str, addr: Option<IpAddr>) {
        let addr = addr.map(addr_key);
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .remove(&(user.to_owned(), addr));
    }

    /// One attempt from `addr` (checked before the envelope is opened).
    pub fn check_addr(&self, addr: IpAddr) -> Result<(), Limited> {
        let addr = addr_key(addr);
        self.addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(&addr, Instant::now())
            .map_err(|retry_after| Limited {
                what: format!("address {}", show(addr)),
                retry_after,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failures_are_limited_per_user_and_address_and_a_success_spends_nothing() {
        let l = LoginLimits::new(
            Rate {
                burst: 3,
                every: Duration::from_secs(10),
            },
            Rate::per_minute(100),
        );
        let attacker: Option<IpAddr> = Some([10, 0, 0, 9].into());
        let owner: Option<IpAddr> = Some([10, 0, 0, 1].into());
        // Attempts sent together: each spends a token before any is judged, so no more than
        // the burst get through however many are in flight.
        let through = (0..20)
            .filter(|_| l.check_user("alice", attacker).is_ok())
            .count();
        assert_eq!(through, 3);
        let refused = l.check_user("alice", attacker).unwrap_err();
        assert!(refused.retry_after <= Duration::from_secs(10));
        assert!(
            refused
                .to_string()
                .contains("user alice from address 10.0.0.9; try again in"),
            "{refused}"
        );
        // The owner, elsewhere, is not touched by the attacker's failures.
        for _ in 0..10 {
            assert!(l.check_user("alice", owner).is_ok());
            l.succeeded("alice", owner);
        }
        assert!(
            l.check_user("bob", attacker).is_ok(),
            "another user is apart"
        );
        // One failure earned back per interval, never more than the burst.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(l.check_user("alice", attacker).is_ok(), "one earned back");
        assert!(l.check_user("alice", attacker).is_err());
        // An attempt that was no failure (say, the service erred) gives its token back.
        l.not_failed("alice", attacker);
        assert!(l.check_user("alice", attacker).is_ok(), "given back");
        assert!(l.check_user("alice", attacker).is_err());
        tokio::time::advance(Duration::from_secs(300)).await;
        for _ in 0..3 {
            assert!(l.check_user("alice", attacker).is_ok());
        }
        assert!(l.check_user("alice", attacker).is_err());
        // A success from there clears that pair's failures.
        l.succeeded("alice", attacker);
        assert!(l.check_user("alice", attacker).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn addresses_are_limited_apart_from_users() {
        let l = LoginLimits::new(Rate::per_minute(100), Rate::per_minute(2));
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        assert!(l.check_addr(a).is_ok() && l.check_addr(a).is_ok());
        let e = l.check_addr(a).unwrap_err();
        assert!(e.to_string().contains("address 127.0.0.1"), "{e}");
        assert!(l.check_addr(b).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_addresses_are_limited_by_their_64() {
        let l = LoginLimits::new(Rate::per_minute(100), Rate::per_minute(2));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:eeee:dddd:cccc".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(l.check_addr(a).is_ok() && l.check_addr(b).is_ok());
        let e = l.check_addr(a).unwrap_err();
        assert!(e.to_string().contains("address 2001:db8:1:2::/64"), "{e}");
        assert!(l.check_addr(other).is_ok(), "another /64 is apart");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(addr_key(mapped), IpAddr::from([10, 0, 0, 1]));
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_forgets_only_full_buckets_never_a_drained_one() {
        let mut b = Buckets::new(Rate {
            burst: 1,
            every: Duration::from_secs(60),
        });
        let now = Instant::now();
        // One drained bucket, then the map filled with buckets that are full again later.
        b.take(&0usize, now).unwrap();
        for k in 1..MAX_KEYS {
            b.map.insert(
                k,
                Bucket {
                    tokens: 1.0,
                    at: now,
                },
            );
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        let later = Instant::now();
        b.take(&MAX_KEYS, later).unwrap();
        assert!(b.take(&0, later).is_err(), "the drained bucket was kept");
        assert!(b.map.len() <= 2, "full ones went: {}", b.map.len());
        // A map full of drained buckets refuses a new key rather than forget one.
        let mut d = Buckets::new(Rate {
            burst: 1,
            every: Duration::from_secs(60),
        });
        for k in 0..MAX_KEYS {
            d.take(&k, later).unwrap();
        }
        assert!(d.take(&MAX_KEYS, later).is_err());
        assert!(d.take(&0, later).is_err(), "still drained");
        assert_eq!(d.map.len(), MAX_KEYS);
    }

    #[tokio::test(start_paused = true)]
    async fn the_map_stays_bounded_under_a_flood_of_names() {
        let l = LoginLimits::new(Rate::per_minute(1), Rate::per_minute(1));
        for i in 0..(MAX_KEYS + 10) {
            let _ = l.check_user(&format!("u{i}"), None);
        }
        let n = l.users.lock().unwrap().map.len();
        assert!(n <= MAX_KEYS, "{n}");
    }
}
