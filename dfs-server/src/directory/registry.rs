//! The file server registry: registrations persisted in the directory's store, heartbeats and
//! liveness in memory. Also remembers where the lock and auth services are.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use common::ServerId;
use common::api::{RegisterServerRequest, RegisterServiceRequest, ServerStatus, ServiceKind};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::{ServiceError, ServiceResult};
use crate::meta::{Table, Txn};
use crate::store::{decode, encode};

pub(crate) const SERVERS: Table<u64, Vec<u8>> = Table::new("servers");
pub(crate) const SERVICES: Table<String, String> = Table::new("services");
/// Heartbeats shared by several directory instances (etcd): server id → `Beat`, rewritten
/// (a blind put) by whichever instance received the heartbeat.
const BEATS: Table<u64, Vec<u8>> = Table::new("beats");

/// A heartbeat as recorded in the store: a fresh random tag per beat (an instance that sees
/// the tag change counts a beat on its own clock: no clock is compared across machines) and
/// the space it reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Beat {
    tag: u64,
    #[serde(default)]
    space: Option<common::api::Space>,
}

/// Records a heartbeat of server `id` in `tx` (shared liveness on etcd).
pub fn record_beat(tx: &Txn, id: ServerId, space: Option<common::api::Space>) -> ServiceResult<()> {
    let beat = Beat {
        tag: rand::random(),
        space,
    };
    tx.put(BEATS, &id.0, &encode(&beat)?)
}

/// The lock registrations recorded in `services`.
pub(super) struct LockRows {
    /// The latest registration's URL.
    latest: Option<String>,
    /// Every instance: (url, tag of its last registration).
    instances: Vec<(String, String)>,
}

impl LockRows {
    /// Every instance's (url, tag) (tests).
    #[cfg(test)]
    pub(super) fn instances(&self) -> &[(String, String)] {
        &self.instances
    }
}

/// Reads the lock registrations.
pub(super) fn lock_rows(tx: &Txn) -> ServiceResult<LockRows> {
    let mut rows = LockRows {
        latest: None,
        instances: vec![],
    };
    for (k, v) in tx.all(SERVICES)? {
        if k == service_key(ServiceKind::Lock) {
            rows.latest = Some(v);
        } else if let Some(url) = k.strip_prefix(LOCK_INSTANCE) {
            rows.instances.push((url.to_owned(), v));
        }
    }
    Ok(rows)
}

/// What the directory keeps of a file server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerRecord {
    url: String,
    capacity_bytes: u64,
}

struct Entry {
    rec: ServerRecord,
    last_beat: Option<Instant>,
    /// Disk space as of the last heartbeat that carried it.
    space: Option<common::api::Space>,
    /// The tag of the last shared beat seen (`sync`).
    tag: Option<u64>,
    /// When this instance learned of the server without hearing it (at its start, or from
    /// the store): it counts as alive for one dead-after period from then, unheard, so a
    /// server registered through another instance is not found dead before its next beat is
    /// seen (and, never heard, it is never taken for one that returned).
    known_since: Option<Instant>,
}

struct Inner {
    servers: BTreeMap<ServerId, Entry>,
    /// The latest lock registration (the map's `lock_url`, for clients that read only it).
    lock_url: Option<String>,
    auth_url: Option<String>,
    /// Every lock instance recorded in the store (`lock/<url>` rows), with the tag of its
    /// last registration seen and when this instance saw it change (its own clock).
    locks: BTreeMap<String, Seen>,
}

/// A lock instance's registrations as this directory instance saw them.
struct Seen {
    tag: String,
    /// When the tag last changed; `None` for a row found at this instance's start whose tag
    /// has not changed since (a row of an instance gone for good looks just like it, so it
    /// is not counted live: the map's `lock_url` covers the first registrations).
    at: Option<Instant>,
}

/// A lock instance's row unchanged this long (or found at start and unchanged since, with
/// this directory instance up this long) is deleted at the next lock registration.
pub const LOCK_PRUNE_AFTER: Duration = Duration::from_secs(3600);

/// A lock instance counts as live while it registered (a changed tag) within this long: three
/// re-registrations.
pub const LOCK_DEAD_AFTER: Duration = Duration::from_secs(15);
/// Most lock URLs one cluster map lists (the live ones, by URL).
pub const MAX_LOCK_URLS: usize = 16;
/// The `services` row prefix of one lock instance's registration (`lock/<url>` → a random
/// tag per registration).
const LOCK_INSTANCE: &str = "lock/";

/// Registered file servers and their liveness.
pub struct Registry {
    inner: Mutex<Inner>,
    dead_after: Duration,
    started: Instant,
    /// When `sync` last read the store.
    synced: Mutex<Option<Instant>>,
    /// Makes `sync` fail as a store read would (tests).
    #[cfg(test)]
    pub(crate) sync_fails: std::sync::atomic::AtomicBool,
}

fn service_key(kind: ServiceKind) -> &'static str {
    match kind {
        ServiceKind::Lock => "lock",
        ServiceKind::Auth => "auth",
    }
}

impl Registry {
    /// Loads registrations from the store. Servers known from before a restart count as alive
    /// for one dead-after period, so the cluster is usable while their heartbeats resume.
    pub fn open(tx: &Txn, dead_after: Duration) -> ServiceResult<Self> {
        let mut servers = BTreeMap::new();
        for (k, v) in tx.all(SERVERS)? {
            servers.insert(
                ServerId(k),
                Entry {
                    rec: decode(&v)?,
                    last_beat: None,
                    space: None,
                    tag: None,
                    known_since: None,
                },
            );
        }
        let auth_url = tx.get(SERVICES, &service_key(ServiceKind::Auth).to_owned())?;
        // Lock instances recorded before this start count from their next registration (a
        // changed tag): a row is all that is left of an instance gone for good.
        let rows = lock_rows(tx)?;
        let lock_url = rows.latest;
        let locks = rows
            .instances
            .into_iter()
            .map(|(url, tag)| (url, Seen { tag, at: None }))
            .collect();
        Ok(Registry {
            inner: Mutex::new(Inner {
                servers,
                lock_url,
                auth_url,
                locks,
            }),
            dead_after,
            started: Instant::now(),
            synced: Mutex::new(None),
            #[cfg(test)]
            sync_fails: Default::default(),
        })
    }

    fn inner(&self) -> ServiceResult<std::sync::MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| ServiceError::internal("registry", "poisoned"))
    }

    fn alive(&self, e: &Entry, now: Instant) -> bool {
        e.last_beat.or(e.known_since).unwrap_or(self.started) + self.dead_after > now
    }

    /// Registers (or re-registers, keeping its id) a server at `req.url`.
    /// Its record is written in `tx`; the registry in memory learns of it from `admit`, once
    /// the transaction is durable (a failed commit, or a store recovery, must leave no ghost).
    pub fn register(
        &self,
        tx: &Txn,
        req: &RegisterServerRequest,
    ) -> ServiceResult<(ServerId, ServerRecord)> {
        if req.url.len() > 512
            || !(req.url.starts_with("http://") || req.url.starts_with("https://"))
        {
            return Err(ServiceError::BadRequest(
                "server url must be an http(s) URL".into(),
            ));
        }
        // Only the id the server remembers is reused: a server whose data was wiped comes back
        // as a new server, so it is never counted as holding copies it lost. Ids come from
        // the store, so that two registrations in a row never share one.
        let known = match req.previous_id {
            Some(id) => tx.get(SERVERS, &id.0)?.is_some(),
            None => false,
        };
        let id = match req.previous_id {
            Some(id) if known => id,
            _ => ServerId(tx.last(SERVERS)?.map_or(1, |(k, _)| k + 1)),
        };
        let rec = ServerRecord {
            url: req.url.clone(),
            capacity_bytes: req.capacity_bytes,
        };
        tx.put(SERVERS, &id.0, &encode(&rec)?)?;
        Ok((id, rec))
    }

    /// A registration whose transaction is durable: the server is known, and alive.
    pub fn admit(&self, id: ServerId, rec: ServerRecord) -> ServiceResult<()> {
        tracing::info!(server = %id, url = %rec.url, "file server registered");
        self.inner()?.servers.insert(
            id,
            Entry {
                rec,
                last_beat: Some(Instant::now()),
                space: None,
                tag: None,
                known_since: None,
            },
        );
        Ok(())
    }

    /// Learns from the store what other directory instances recorded: servers registered
    /// through them, heartbeats they received (a beat whose tag changed since the last sync
    /// counts as one now), and the lock and auth URLs. Several instances thereby agree on
    /// which servers are alive, within one sync interval.
    ///
    /// A beat is judged by its change between two reads, never by its first sight: the tag
    /// first read is only a baseline (it may be hours old: a server long dead left its last
    /// beat in the store), so no clocks are compared and a restarted instance does not count
    /// a dead server as returned. `now` is the caller's (the store may run `tx` on another
    /// thread, outside the runtime whose clock liveness is judged on).
    pub fn sync(&self, tx: &Txn, now: Instant) -> ServiceResult<()> {
        #[cfg(test)]
        if self.sync_fails.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ServiceError::Unavailable(
                "test: the store read failed".into(),
            ));
        }
        let servers = tx.all(SERVERS)?;
        let beats = tx.all(BEATS)?;
        let auth_url = tx.get(SERVICES, &service_key(ServiceKind::Auth).to_owned())?;
        self.note_locks(lock_rows(tx)?)?;
        let mut inner = self.inner()?;
        for (k, v) in servers {
            let rec: ServerRecord = decode(&v)?;
            let e = inner.servers.entry(ServerId(k)).or_insert_with(|| {
                tracing::info!(server = k, url = %rec.url, "file server learned from the store");
                Entry {
                    rec: rec.clone(),
                    last_beat: None,
                    space: None,
                    tag: None,
                    known_since: Some(now),
                }
            });
            e.rec = rec;
        }
        for (k, v) in beats {
            let Ok(beat) = decode::<Beat>(&v) else {
                continue;
            };
            if let Some(e) = inner.servers.get_mut(&ServerId(k))
                && e.tag != Some(beat.tag)
            {
                let baseline = e.tag.is_none();
                e.tag = Some(beat.tag);
                if baseline {
                    continue;
                }
                // `now` was taken before the read: a beat heard here meanwhile is newer.
                e.last_beat = e.last_beat.max(Some(now));
                if beat.space.is_some() {
                    e.space = beat.space;
                }
            }
        }
        if auth_url.is_some() {
            inner.auth_url = auth_url;
        }
        drop(inner);
        *self.synced.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        Ok(())
    }

    /// Whether `sync` read the store less than `age` ago.
    pub fn synced_within(&self, age: Duration) -> bool {
        self.synced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < age)
    }

    /// Records a heartbeat. An unknown id must register again.
    pub fn heartbeat(&self, id: ServerId, space: Option<common::api::Space>) -> ServiceResult<()> {
        let mut inner = self.inner()?;
        let e = inner
            .servers
            .get_mut(&id)
            .ok_or_else(|| ServiceError::NotFound(format!("file server {id}; register again")))?;
        if e.last_beat
            .is_some_and(|b| b + self.dead_after <= Instant::now())
        {
            tracing::info!(server = %id, "file server is alive again");
        }
        e.last_beat = Some(Instant::now());
        if space.is_some() {
            e.space = space;
        }
        Ok(())
    }

    /// The lock instances whose rows `register_service` deletes: unchanged for
    /// `LOCK_PRUNE_AFTER` (or found at start and unchanged since, this instance up that
    /// long), at most 64, never `keep`. Read on the caller's clock (the store's transactions
    /// run on a thread of their own).
    pub fn stale_lock_rows(&self, keep: &str) -> Vec<String> {
        let now = Instant::now();
        let Ok(inner) = self.inner() else {
            return vec![];
        };
        inner
            .locks
            .iter()
            .filter(|(url, s)| {
                url.as_str() != keep && s.at.unwrap_or(self.started) + LOCK_PRUNE_AFTER <= now
            })
            .map(|(url, _)| url.clone())
            .take(64)
            .collect()
    }

    /// Records the lock or auth service URL, and deletes the rows `stale` of lock instances
    /// long gone (`stale_lock_rows`).
    pub fn register_service(
        &self,
        tx: &Txn,
        req: &RegisterServiceRequest,
        stale: &[String],
    ) -> ServiceResult<()> {
        if req.url.len() > 512 || !req.url.starts_with("http") {
            return Err(ServiceError::BadRequest(
                "service url must be an http(s) URL".into(),
            ));
        }
        tx.put(SERVICES, &service_key(req.kind).to_owned(), &req.url)?;
        if req.kind == ServiceKind::Lock {
            // Rows of instances long gone are deleted (bounded: a few per registration).
            for url in stale.iter().filter(|u| **u != req.url) {
                tracing::info!(%url, "forgetting a lock instance unregistered for an hour");
                // Forgotten in memory once a sync no longer finds the row (`note_locks`).
                tx.delete::<String, String>(SERVICES, &format!("{LOCK_INSTANCE}{url}"))?;
            }
            // Its own row too, a fresh tag per registration: every directory instance counts
            // it live from the change it sees (`sync`), on its own clock.
            tx.put(
                SERVICES,
                &format!("{LOCK_INSTANCE}{}", req.url),
                &hex::encode(rand::random::<[u8; 8]>()),
            )?;
        }
        Ok(())
    }

    /// A service registration whose transaction is durable.
    pub fn admit_service(&self, req: &RegisterServiceRequest) -> ServiceResult<()> {
        let mut inner = self.inner()?;
        match req.kind {
            ServiceKind::Lock => {
                inner.lock_url = Some(req.url.clone());
                // The tag is learnt at the next sync (a changed tag then counts once more).
                let seen = Seen {
                    tag: String::new(),
                    at: Some(Instant::now()),
                };
                inner.locks.insert(req.url.clone(), seen);
            }
            ServiceKind::Auth => inner.auth_url = Some(req.url.clone()),
        }
        Ok(())
    }

    /// Learns the lock registrations (`lock_rows`): the latest, and each instance's (one
    /// whose tag changed counts as registered now).
    pub(super) fn note_locks(&self, rows: LockRows) -> ServiceResult<()> {
        let now = Instant::now();
        let mut inner = self.inner()?;
        if rows.latest.is_some() {
            inner.lock_url = rows.latest;
        }
        // Rows deleted (pruned) are forgotten.
        let present: std::collections::HashSet<&str> =
            rows.instances.iter().map(|(u, _)| u.as_str()).collect();
        inner.locks.retain(|u, _| present.contains(u.as_str()));
        for (url, tag) in rows.instances {
            match inner.locks.get_mut(&url) {
                Some(seen) if seen.tag == tag => {}
                Some(seen) => *seen = Seen { tag, at: Some(now) },
                None => {
                    inner.locks.insert(url, Seen { tag, at: Some(now) });
                }
            }
        }
        Ok(())
    }

    /// Every live lock instance (registered within `LOCK_DEAD_AFTER`), at most
    /// `MAX_LOCK_URLS`, by URL: a stable order (a client's index into it keeps naming the
    /// same instance across map fetches), the same on every directory instance within a sync
    /// interval.
    pub fn lock_urls(&self) -> Vec<String> {
        let now = Instant::now();
        let Ok(inner) = self.inner() else {
            return vec![];
        };
        inner
            .locks
            .iter()
            .filter(|(_, s)| s.at.is_some_and(|at| at + LOCK_DEAD_AFTER > now))
            .map(|(url, _)| url.clone())
            .take(MAX_LOCK_URLS)
            .collect()
    }

    /// Ids of live servers, ascending.
    pub fn live(&self) -> Vec<ServerId> {
        let now = Instant::now();
        self.inner()
            .map(|i| {
                i.servers
                    .iter()
                    .filter(|(_, e)| self.alive(e, now))
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Live servers for new copies: those with room (at least `MIN_PLACEMENT_FREE`, or not
    /// yet reporting their space), then those short of space, most free first.
    pub fn live_by_room(&self) -> (Vec<ServerId>, Vec<ServerId>) {
        let now = Instant::now();
        let Ok(inner) = self.inner() else {
            return (vec![], vec![]);
        };
        let (mut roomy, mut short) = (Vec::new(), Vec::new());
        for (id, e) in inner.servers.iter().filter(|(_, e)| self.alive(e, now)) {
            match e.space {
                Some(s) if s.free_bytes < common::api::MIN_PLACEMENT_FREE => {
                    short.push((*id, s.free_bytes));
                }
                _ => roomy.push(*id),
            }
        }
        short.sort_by_key(|(_, free)| std::cmp::Reverse(*free));
        (roomy, short.into_iter().map(|(id, _)| id).collect())
    }

    /// (size, free) summed over the live servers that report their space, and how many do.
    pub fn live_space(&self) -> (u64, u64, usize) {
        let now = Instant::now();
        let Ok(inner) = self.inner() else {
            return (0, 0, 0);
        };
        inner
            .servers
            .values()
            .filter(|e| self.alive(e, now))
            .filter_map(|e| e.space)
            .fold((0, 0, 0), |(t, f, n), s| {
                (
                    t.saturating_add(s.total_bytes),
                    f.saturating_add(s.free_bytes),
                    n + 1,
                )
            })
    }

    /// The URL of server `id`.
    pub fn url(&self, id: ServerId) -> Option<String> {
        self.inner()
            .ok()?
            .servers
            .get(&id)
            .map(|e| e.rec.url.clone())
    }

    /// Lock and auth URLs.
    pub fn services(&self) -> (Option<String>, Option<String>) {
        self.inner()
            .map(|i| (i.lock_url.clone(), i.auth_url.clone()))
            .unwrap_or_default()
    }

    /// Every server with liveness and the given (primaries, replicas) counts.
    pub fn status(&self, counts: &HashMap<ServerId, (u64, u64)>) -> Vec<ServerStatus> {
        let now = Instant::now();
        let Ok(inner) = self.inner() else {
            return vec![];
        };
        inner
            .servers
            .iter()
            .map(|(id, e)| {
                let (primaries, replicas) = counts.get(id).copied().unwrap_or((0, 0));
                ServerStatus {
                    id: *id,
                    url: e.rec.url.clone(),
                    alive: self.alive(e, now),
                    last_heartbeat_ms_ago: e.last_beat.map(|b| {
                        u64::try_from(now.duration_since(b).as_millis()).unwrap_or(u64::MAX)
                    }),
                    capacity_bytes: e.rec.capacity_bytes,
                    space: e.space,
                    primaries,
                    replicas,
                }
            })
            .collect()
    }
}
