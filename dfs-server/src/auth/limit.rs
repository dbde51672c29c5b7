//! Login and signup rate limits: a token bucket per user name and one per source address, on
//! tokio's clock (tests pause and advance it). In memory: a restart forgets them, and the maps
//! are bounded (idle buckets go first), so a flood of made-up names cannot grow them.

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

    /// Takes one token for `key`, or says how long until one is earned.
    fn take(&mut self, key: &K, now: Instant) -> Result<(), Duration> {
        if !self.map.contains_key(key) && self.map.len() >= MAX_KEYS {
            self.evict(now);
        }
        let fresh = Bucket {
            tokens: f64::from(self.rate.burst),
            at: now,
        };
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

    /// Forgets full buckets (they hold nothing a fresh one would not), then, if that is not
    /// enough, half of the rest.
    fn evict(&mut self, now: Instant) {
        let burst = f64::from(self.rate.burst);
        let rate = self.rate;
        self.map.retain(|_, b| {
            let earned =
                now.saturating_duration_since(b.at).as_secs_f64() / rate.every.as_secs_f64();
            b.tokens + earned < burst
        });
        if self.map.len() >= MAX_KEYS / 2 {
            let drop: Vec<K> = self.map.keys().take(self.map.len() / 2).cloned().collect();
            for k in drop {
                self.map.remove(&k);
            }
        }
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
    users: std::sync::Mutex<Buckets<String>>,
    addrs: std::sync::Mutex<Buckets<IpAddr>>,
}

impl LoginLimits {
    /// Limits with these rates per user name and per source address.
    pub fn new(per_user: Rate, per_addr: Rate) -> Self {
        LoginLimits {
            users: std::sync::Mutex::new(Buckets::new(per_user)),
            addrs: std::sync::Mutex::new(Buckets::new(per_addr)),
        }
    }

    /// One attempt from `addr` (checked before the envelope is opened).
    pub fn check_addr(&self, addr: IpAddr) -> Result<(), Limited> {
        self.addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(&addr, Instant::now())
            .map_err(|retry_after| Limited {
                what: format!("address {addr}"),
                retry_after,
            })
    }

    /// One attempt for `user` (checked once the envelope names it, before any password hash).
    pub fn check_user(&self, user: &str) -> Result<(), Limited> {
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(&user.to_owned(), Instant::now())
            .map_err(|retry_after| Limited {
                what: format!("user {user}"),
                retry_after,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_allowed_then_one_per_interval_and_keys_are_apart() {
        let l = LoginLimits::new(
            Rate {
                burst: 3,
                every: Duration::from_secs(10),
            },
            Rate::per_minute(100),
        );
        for _ in 0..3 {
            assert!(l.check_user("alice").is_ok());
        }
        let refused = l.check_user("alice").unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(10));
        assert!(
            refused
                .to_string()
                .contains("user alice; try again in 10 s")
        );
        assert!(l.check_user("bob").is_ok(), "another user is not limited");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            l.check_user("alice").unwrap_err().retry_after,
            Duration::from_secs(5)
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(l.check_user("alice").is_ok(), "one earned back");
        assert!(l.check_user("alice").is_err());
        tokio::time::advance(Duration::from_secs(300)).await;
        for _ in 0..3 {
            assert!(l.check_user("alice").is_ok(), "never more than the burst");
        }
        assert!(l.check_user("alice").is_err());
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
    async fn the_map_stays_bounded_under_a_flood_of_names() {
        let l = LoginLimits::new(Rate::per_minute(1), Rate::per_minute(1));
        for i in 0..(MAX_KEYS + 10) {
            let _ = l.check_user(&format!("u{i}"));
        }
        let n = l.users.lock().unwrap().map.len();
        assert!(n <= MAX_KEYS, "{n}");
    }
}
