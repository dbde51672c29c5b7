//! `AuthService`: users with argon2id password hashes, RSA-OAEP sealed credential envelopes with
//! a nonce + timestamp replay window, and RSA-PSS signed bearer tokens with refresh tokens.

pub mod keys;
pub mod limit;
pub mod routes;
pub mod token;

use std::path::Path;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::Identity;
use common::api::{
    AddGroupRequest, Claims, Credentials, Envelope, GroupInfo, RemoveGroupRequest, SetUserRequest,
    TokenResponse, UserInfo,
};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use rsa::sha2::{Digest, Sha256};
use rsa::{PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};

use crate::commit::GroupCommit;
use crate::error::{ServiceError, ServiceResult};
use crate::store::{decode, encode, now_ms};

const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
const NONCES: TableDefinition<&str, u64> = TableDefinition::new("nonces");
const REFRESH: TableDefinition<&str, &[u8]> = TableDefinition::new("refresh_tokens");
/// Named groups: name → `GroupRecord`.
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");
/// The store's format record (`crate::store::check_format`).
const AUTH_META: TableDefinition<&str, u64> = TableDefinition::new("auth_meta");
/// The auth store's format: 1, the first with a format record.
pub const AUTH_FORMAT: u64 = 1;

/// Most named groups a user may be a member of (with at most 64 explicit ones, a token's
/// groups stay well under `common::perm::MAX_GROUPS`).
const MAX_NAMED_GROUPS: usize = 64;

#[derive(Serialize, Deserialize)]
struct GroupRecord {
    gid: u32,
    /// Member user names, sorted, no duplicates.
    members: Vec<String>,
}

/// Default failed login and signup attempts per minute (and at once) for one user name from
/// one address.
pub const DEFAULT_LOGINS_PER_USER: u32 = 10;
/// Default login and signup attempts per minute (and at once) from one address.
pub const DEFAULT_LOGINS_PER_ADDR: u32 = 60;

/// Tunables of the auth service.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Lifetime of a bearer token.
    pub token_ttl: Duration,
    /// Lifetime of a refresh token.
    pub refresh_ttl: Duration,
    /// How far an envelope's timestamp may be from the server clock.
    pub replay_window: Duration,
    /// Anyone may sign up (else only callers with the cluster key).
    pub open_signup: bool,
    /// Failed login and signup attempts allowed per user name and source address.
    pub per_user: limit::Rate,
    /// Login and signup attempts allowed per source address.
    pub per_addr: limit::Rate,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            token_ttl: Duration::from_secs(3600),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            replay_window: Duration::from_secs(300),
            open_signup: true,
            per_user: limit::Rate::per_minute(DEFAULT_LOGINS_PER_USER),
            per_addr: limit::Rate::per_minute(DEFAULT_LOGINS_PER_ADDR),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct UserRecord {
    phc: String,
    created_ms: u64,
    /// Numeric identity; `None` only in records written before identities existed (given one
    /// when the store is opened).
    #[serde(default)]
    id: Option<Identity>,
}

/// The next free uid: above every uid in use and every named group's gid (a new user's
/// private group takes the same number, which must not be a shared group's), from
/// `FIRST_UID`.
fn next_uid(
    users: &impl ReadableTable<&'static str, &'static [u8]>,
    groups: &impl ReadableTable<&'static str, &'static [u8]>,
) -> ServiceResult<u32> {
    // Past every id in use: each user's uid and gid (a primary gid need not be a private
    // group), and each named group's gid; never a reserved id.
    let mut next = common::perm::FIRST_UID;
    for row in users.iter()? {
        let (_, v) = row?;
        if let Some(id) = decode::<UserRecord>(v.value())?.id {
            next = next.max(id.uid.saturating_add(1));
            next = next.max(id.gid.saturating_add(1));
        }
    }
    for row in groups.iter()? {
        let (_, v) = row?;
        next = next.max(decode::<GroupRecord>(v.value())?.gid.saturating_add(1));
    }
    while reserved_id(next) {
        if next == u32::MAX {
            return Err(ServiceError::Unavailable("no free uid left".into()));
        }
        next += 1;
    }
    Ok(next)
}

/// `id` with the gids of the named groups `user` is a member of added to its groups (what a
/// token carries).
fn with_named_groups(
    mut id: Identity,
    user: &str,
    groups: &impl ReadableTable<&'static str, &'static [u8]>,
) -> ServiceResult<Identity> {
    for row in groups.iter()? {
        let (_, v) = row?;
        let g: GroupRecord = decode(v.value())?;
        if g.members.binary_search_by(|m| m.as_str().cmp(user)).is_ok() {
            id.groups.push(g.gid);
        }
    }
    let primary = id.gid;
    id.groups.retain(|g| *g != primary);
    id.groups.sort_unstable();
    id.groups.dedup();
    Ok(id)
}

/// Gives every user record without an identity one (uid and gid the next free id), oldest
/// first, so that users made before identities existed keep working.
fn assign_missing_ids(tx: &redb::WriteTransaction) -> ServiceResult<()> {
    let groups = tx.open_table(GROUPS)?;
    let mut users = tx.open_table(USERS)?;
    let mut missing: Vec<(u64, String, UserRecord)> = Vec::new();
    for row in users.iter()? {
        let (k, v) = row?;
        let rec: UserRecord = decode(v.value())?;
        if rec.id.is_none() {
            missing.push((rec.created_ms, k.value().to_owned(), rec));
        }
    }
    missing.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    for (_, name, mut rec) in missing {
        let uid = next_uid(&users, &groups)?;
        rec.id = Some(Identity {
            uid,
            gid: uid,
            groups: vec![],
            admin: false,
        });
        users.insert(name.as_str(), encode(&rec)?.as_slice())?;
        tracing::info!(user = %name, uid, "user given a numeric identity");
    }
    Ok(())
}

#[derive(Serialize, Deserialize)]
struct RefreshRecord {
    user: String,
    exp_ms: u64,
}

/// Signup, login and token issue. Pure logic over a redb store and the key pair.
pub struct AuthService {
    db: GroupCommit,
    key: PrivateKey,
    public: PublicKey,
    config: AuthConfig,
    /// Password hashing is CPU and memory heavy (argon2id, ~19 MiB each): at most one per core
    /// runs at a time, whatever the request rate.
    pub hashing: tokio::sync::Semaphore,
    /// A hash to verify against for unknown users, so timing does not reveal which exist.
    dummy_phc: String,
    /// Login and signup attempts per user and per address.
    pub limits: limit::LoginLimits,
    /// The data directory's lock, held while the service lives.
    _lock: std::fs::File,
}

/// uid 0 owns what was made before owners were stored, and nobody/u32::MAX are sentinels:
/// no user or group gets them.
fn reserved_id(id: u32) -> bool {
    id == 0 || id == common::perm::NOBODY || id == u32::MAX
}

/// A user or group name: 1 to 32 characters of A-Z a-z 0-9 . _ -.
fn validate_user(user: &str) -> ServiceResult<()> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ServiceError::BadRequest(
            "user name must be 1 to 32 characters of A-Z a-z 0-9 . _ -".into(),
        ))
    }
}

impl AuthService {
    /// Opens the store and key pair under `data_dir` (creating both on first start).
    pub fn open(data_dir: &Path, config: AuthConfig) -> ServiceResult<Self> {
        crate::cluster::create_private_dir(data_dir)?;
        // Before the key is read or made: two auth services on one directory could otherwise
        // each make a key, and clients would be told two different ones.
        let lock = crate::store::lock_dir(data_dir, "auth service")?;
        let key = keys::load_or_create(&data_dir.join("auth_key.pem"))?;
        let path = data_dir.join("auth.redb");
        let db = GroupCommit::open(&path)?;
        db.write(|tx| {
            crate::store::check_format(tx, AUTH_META, &path, AUTH_FORMAT)?;
            tx.open_table(USERS)?;
            tx.open_table(NONCES)?;
            tx.open_table(REFRESH)?;
            tx.open_table(GROUPS)?;
            assign_missing_ids(tx)
        })?;
        let public = key.to_public_key();
        tracing::info!(
            fingerprint = %keys::fingerprint(&public)?,
            "auth public key (clients pin it at first login; give it out for --auth-key-fingerprint)"
        );
        let dummy_phc = Argon2::default()
            .hash_password(&rand::random::<[u8; 16]>())
            .map_err(|e| ServiceError::internal("hashing", e))?
            .to_string();
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(AuthService {
            db,
            key,
            public,
            hashing: tokio::sync::Semaphore::new(cores),
            dummy_phc,
            limits: limit::LoginLimits::new(config.per_user, config.per_addr),
            config,
            _lock: lock,
        })
    }

    /// One login or signup attempt for `user`, refused past the per-user rate.
    fn limit_user(&self, user: &str, addr: Option<std::net::IpAddr>) -> ServiceResult<()> {
        self.limits.check_user(user, addr).map_err(|l| {
            tracing::warn!(%l, "login attempts limited");
            ServiceError::RateLimited(l.to_string())
        })
    }

    /// One login or signup attempt from `addr`, refused past the per-address rate.
    pub fn limit_addr(&self, addr: std::net::IpAddr) -> ServiceResult<()> {
        self.limits.check_addr(addr).map_err(|l| {
            tracing::warn!(%l, "login attempts limited");
            ServiceError::RateLimited(l.to_string())
        })
    }

    /// Whether anyone may sign up.
    pub fn open_signup(&self) -> bool {
        self.config.open_signup
    }

    /// The public key clients encrypt envelopes with and services verify tokens with.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The public key's fingerprint (`keys::fingerprint`), what clients pin.
    pub fn fingerprint(&self) -> ServiceResult<String> {
        keys::fingerprint(&self.public)
    }

    /// The public key as SPKI PEM.
    pub fn public_key_pem(&self) -> ServiceResult<String> {
        use rsa::pkcs8::{EncodePublicKey, LineEnding};
        self.public
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| ServiceError::internal("encoding public key", e))
    }

    /// Decrypts an envelope and enforces the replay rules: timestamp within the window, nonce
    /// never seen before (nonces are persisted, so a restart does not reopen the window).
    fn open_envelope(&self, env: &Envelope) -> ServiceResult<Credentials> {
        let bad = |m: &str| ServiceError::BadRequest(format!("bad credential envelope: {m}"));
        if env.ciphertext.len() > 2048 {
            return Err(ServiceError::TooLarge(
                "credential envelope too large".into(),
            ));
        }
        let ct = STANDARD
            .decode(&env.ciphertext)
            .map_err(|_| bad("not base64"))?;
        let plain = self
            .key
            .oaep_decrypt::<Sha256>(&ct)
            .map_err(|_| bad("cannot decrypt with this server's key"))?;
        let creds: Credentials = serde_json::from_slice(&plain).map_err(|_| bad("not JSON"))?;
        validate_user(&creds.user)?;
        if creds.nonce.len() != 32 || !creds.nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("nonce must be 32 hex digits"));
        }
        let now = now_ms();
        let window = u64::try_from(self.config.replay_window.as_millis()).unwrap_or(u64::MAX);
        if creds.timestamp_ms.abs_diff(now) > window {
            return Err(ServiceError::Replay(
                "credential envelope timestamp outside the replay window (check the clock)".into(),
            ));
        }
        self.db.write(|tx| {
            let mut nonces = tx.open_table(NONCES)?;
            if nonces.get(creds.nonce.as_str())?.is_some() {
                return Err(ServiceError::Replay("credential envelope replayed".into()));
            }
            // Forget nonces whose timestamps are outside the window: they can no longer pass.
            nonces.retain(|_, exp| exp > now)?;
            nonces.insert(
                creds.nonce.as_str(),
                creds.timestamp_ms.saturating_add(window),
            )?;
            Ok(())
        })?;
        Ok(creds)
    }

    /// Creates a user from a sealed envelope.
    pub fn signup(&self, env: &Envelope) -> ServiceResult<String> {
        self.signup_from(env, None)
    }

    /// Creates a user from a sealed envelope sent from `addr`; a refusal counts as a failed
    /// attempt for that name from there (`limit`).
    pub fn signup_from(
        &self,
        env: &Envelope,
        addr: Option<std::net::IpAddr>,
    ) -> ServiceResult<String> {
        let creds = self.open_envelope(env)?;
        self.limit_user(&creds.user, addr)?;
        let user = creds.user.clone();
        let r = self.signup_checked(creds);
        if r.is_ok() {
            self.limits.not_failed(&user, addr);
        }
        r
    }

    fn signup_checked(&self, creds: Credentials) -> ServiceResult<String> {
        if !(8..=64).contains(&creds.password.len()) {
            return Err(ServiceError::BadRequest(
                "password must be 8 to 64 bytes".into(),
            ));
        }
        let phc = Argon2::default()
            .hash_password(creds.password.as_bytes())
            .map_err(|e| ServiceError::internal("hashing password", e))?
            .to_string();
        self.db.write(|tx| {
            let mut users = tx.open_table(USERS)?;
            if users.get(creds.user.as_str())?.is_some() {
                return Err(ServiceError::Exists(format!("user {}", creds.user)));
            }
            let uid = next_uid(&users, &tx.open_table(GROUPS)?)?;
            let rec = encode(&UserRecord {
                phc,
                created_ms: now_ms(),
                id: Some(Identity {
                    uid,
                    gid: uid,
                    groups: vec![],
                    admin: false,
                }),
            })?;
            users.insert(creds.user.as_str(), rec.as_slice())?;
            Ok(())
        })?;
        tracing::info!(user = %creds.user, "user signed up");
        Ok(creds.user)
    }

    /// Checks a sealed user/password pair and issues tokens.
    pub fn login(&self, env: &Envelope) -> ServiceResult<TokenResponse> {
        self.login_from(env, None)
    }

    /// As `login`, sent from `addr`: a wrong password or unknown user counts as a failed
    /// attempt for that name from there, a success clears them (`limit`).
    pub fn login_from(
        &self,
        env: &Envelope,
        addr: Option<std::net::IpAddr>,
    ) -> ServiceResult<TokenResponse> {
        let creds = self.open_envelope(env)?;
        self.limit_user(&creds.user, addr)?;
        let user = creds.user.clone();
        let r = self.login_checked(creds);
        match &r {
            Ok(_) => self.limits.succeeded(&user, addr),
            Err(ServiceError::Unauthorized(_)) => {}
            Err(_) => self.limits.not_failed(&user, addr),
        }
        r
    }

    fn login_checked(&self, creds: Credentials) -> ServiceResult<TokenResponse> {
        let wrong = || ServiceError::Unauthorized("wrong user name or password".into());
        let rec: UserRecord = {
            let tx = self.db.db()?.begin_read()?;
            let users = tx.open_table(USERS)?;
            let Some(v) = users.get(creds.user.as_str())? else {
                if let Ok(parsed) = PasswordHash::new(&self.dummy_phc) {
                    let _ = Argon2::default().verify_password(creds.password.as_bytes(), &parsed);
                }
                return Err(wrong());
            };
            decode(v.value())?
        };
        let parsed =
            PasswordHash::new(&rec.phc).map_err(|e| ServiceError::internal("stored hash", e))?;
        Argon2::default()
            .verify_password(creds.password.as_bytes(), &parsed)
            .map_err(|_| wrong())?;
        self.issue(&creds.user)
    }

    /// Exchanges a refresh token (single use) for a new token pair.
    pub fn refresh(&self, refresh_token: &str) -> ServiceResult<TokenResponse> {
        let key = hex::encode(Sha256::digest(refresh_token.as_bytes()));
        let rec: RefreshRecord = self.db.write(|tx| {
            let mut table = tx.open_table(REFRESH)?;
            match table.remove(key.as_str())? {
                Some(v) => decode(v.value()),
                None => Err(ServiceError::Unauthorized("unknown refresh token".into())),
            }
        })?;
        if rec.exp_ms <= now_ms() {
            return Err(ServiceError::Unauthorized(
                "refresh token expired; log in again".into(),
            ));
        }
        self.issue(&rec.user)
    }

    /// The user's record, as it is now.
    fn record(&self, user: &str) -> ServiceResult<UserRecord> {
        let db = self.db.db()?;
        let tx = db.begin_read()?;
        let users = tx.open_table(USERS)?;
        let v = users
            .get(user)?
            .ok_or_else(|| ServiceError::Unauthorized(format!("user {user} no longer exists")))?;
        decode(v.value())
    }

    /// Every user and their identity, by name, with the groups a token of theirs carries
    /// (named groups included).
    pub fn users(&self) -> ServiceResult<Vec<UserInfo>> {
        let db = self.db.db()?;
        let tx = db.begin_read()?;
        let users = tx.open_table(USERS)?;
        let groups = tx.open_table(GROUPS)?;
        let mut out = Vec::new();
        for row in users.iter()? {
            let (k, v) = row?;
            let rec: UserRecord = decode(v.value())?;
            out.push(UserInfo {
                user: k.value().to_owned(),
                id: with_named_groups(rec.id.unwrap_or_default(), k.value(), &groups)?,
            });
        }
        Ok(out)
    }

    /// Every named group, by name.
    pub fn groups(&self) -> ServiceResult<Vec<GroupInfo>> {
        let db = self.db.db()?;
        let tx = db.begin_read()?;
        let groups = tx.open_table(GROUPS)?;
        let mut out = Vec::new();
        for row in groups.iter()? {
            let (k, v) = row?;
            let g: GroupRecord = decode(v.value())?;
            out.push(GroupInfo {
                name: k.value().to_owned(),
                gid: g.gid,
                members: g.members,
            });
        }
        Ok(out)
    }

    /// Creates group `name` if it does not exist (with `req.gid`, unique among groups and not
    /// another user's private group, or the next free id) and adds `req.members`, who must be
    /// users. Members' tokens carry the gid from their next renewal.
    pub fn add_group(&self, name: &str, req: &AddGroupRequest) -> ServiceResult<GroupInfo> {
        validate_user(name)?;
        if req.gid.is_some_and(reserved_id) {
            return Err(ServiceError::BadRequest(
                "gid 0, 65534 and 4294967295 are reserved".into(),
            ));
        }
        for m in &req.members {
            validate_user(m)?;
        }
        self.db.write(|tx| {
            let users = tx.open_table(USERS)?;
            let mut groups = tx.open_table(GROUPS)?;
            let existing: Option<GroupRecord> = match groups.get(name)? {
                Some(v) => Some(decode(v.value())?),
                None => None,
            };
            let mut rec = match existing {
                Some(g) => {
                    if let Some(gid) = req.gid
                        && gid != g.gid
                    {
                        return Err(ServiceError::Exists(format!(
                            "group {name} with gid {} (not {gid})",
                            g.gid
                        )));
                    }
                    g
                }
                None => {
                    let gid = match req.gid {
                        Some(gid) => gid,
                        None => next_uid(&users, &groups)?,
                    };
                    for row in groups.iter()? {
                        let (k, v) = row?;
                        if decode::<GroupRecord>(v.value())?.gid == gid {
                            return Err(ServiceError::Exists(format!(
                                "gid {gid} (group {})",
                                k.value()
                            )));
                        }
                    }
                    // Nor any user's primary gid: a private group (uid = gid) must never
                    // gain members, and naming a gid users already have as their primary
                    // group would make that group's removal refused for reasons its
                    // creator never saw; give such users the new group's gid afterwards.
                    for row in users.iter()? {
                        let (k, v) = row?;
                        if decode::<UserRecord>(v.value())?
                            .id
                            .is_some_and(|id| id.gid == gid)
                        {
                            return Err(ServiceError::Exists(format!(
                                "gid {gid} (the primary group of user {})",
                                k.value()
                            )));
                        }
                    }
                    GroupRecord {
                        gid,
                        members: vec![],
                    }
                }
            };
            for m in &req.members {
                if users.get(m.as_str())?.is_none() {
                    return Err(ServiceError::NotFound(format!("user {m}")));
                }
                let mut named = 0;
                for row in groups.iter()? {
                    let (k, v) = row?;
                    if k.value() != name
                        && decode::<GroupRecord>(v.value())?
                            .members
                            .binary_search(m)
                            .is_ok()
                    {
                        named += 1;
                    }
                }
                if named >= MAX_NAMED_GROUPS {
                    return Err(ServiceError::BadRequest(format!(
                        "user {m} is already in {MAX_NAMED_GROUPS} groups"
                    )));
                }
                if let Err(at) = rec.members.binary_search(m) {
                    rec.members.insert(at, m.clone());
                }
            }
            groups.insert(name, encode(&rec)?.as_slice())?;
            Ok(GroupInfo {
                name: name.to_owned(),
                gid: rec.gid,
                members: rec.members,
            })
        })
    }

    /// Removes `req.members` from group `name`; with none named, removes the group itself,
    /// unless it is a user's primary group (files keep its gid, which then has no name).
    /// Returns the group as it is now, None once removed.
    pub fn remove_group(
        &self,
        name: &str,
        req: &RemoveGroupRequest,
    ) -> ServiceResult<Option<GroupInfo>> {
        validate_user(name)?;
        self.db.write(|tx| {
            let users = tx.open_table(USERS)?;
            let mut groups = tx.open_table(GROUPS)?;
            let mut rec: GroupRecord = match groups.get(name)? {
                Some(v) => decode(v.value())?,
                None => return Err(ServiceError::NotFound(format!("group {name}"))),
            };
            if req.members.is_empty() {
                for row in users.iter()? {
                    let (k, v) = row?;
                    if decode::<UserRecord>(v.value())?
                        .id
                        .is_some_and(|id| id.gid == rec.gid)
                    {
                        return Err(ServiceError::InUse(format!(
                            "group {name} (gid {}) is the primary group of user {}: give them \
                             another gid first (dfs user set {} --gid N)",
                            rec.gid,
                            k.value(),
                            k.value()
                        )));
                    }
                }
                groups.remove(name)?;
                return Ok(None);
            }
            for m in &req.members {
                match rec.members.binary_search(m) {
                    Ok(at) => {
                        rec.members.remove(at);
                    }
                    Err(_) => {
                        return Err(ServiceError::NotFound(format!("user {m} in group {name}")));
                    }
                }
            }
            groups.insert(name, encode(&rec)?.as_slice())?;
            Ok(Some(GroupInfo {
                name: name.to_owned(),
                gid: rec.gid,
                members: rec.members,
            }))
        })
    }

    /// Changes a user's identity (administrator only, checked by the caller): uid, gid, groups,
    /// administrator flag. A uid already taken by another user is refused. Takes effect in the
    /// user's next token (at the latest when the current one is renewed).
    pub fn set_user(&self, user: &str, req: &SetUserRequest) -> ServiceResult<UserInfo> {
        validate_user(user)?;
        if req.uid.is_some_and(reserved_id) || req.gid.is_some_and(reserved_id) {
            return Err(ServiceError::BadRequest(
                "uid and gid 0, 65534 and 4294967295 are reserved".into(),
            ));
        }
        if req.groups.as_ref().is_some_and(|g| g.len() > 64) {
            return Err(ServiceError::BadRequest(
                "a user is in at most 64 groups".into(),
            ));
        }
        self.db.write(|tx| {
            let mut users = tx.open_table(USERS)?;
            let mut rec: UserRecord = match users.get(user)? {
                Some(v) => decode(v.value())?,
                None => return Err(ServiceError::NotFound(format!("user {user}"))),
            };
            let mut id = rec.id.clone().unwrap_or_default();
            if let Some(uid) = req.uid
                && uid != id.uid
            {
                for row in users.iter()? {
                    let (k, v) = row?;
                    if k.value() != user
                        && decode::<UserRecord>(v.value())?
                            .id
                            .is_some_and(|o| o.uid == uid)
                    {
                        return Err(ServiceError::Exists(format!(
                            "uid {uid} belongs to user {}",
                            k.value()
                        )));
                    }
                }
                id.uid = uid;
            }
            if let Some(gid) = req.gid {
                id.gid = gid;
            }
            if let Some(groups) = &req.groups {
                let mut g = groups.clone();
                g.sort_unstable();
                g.dedup();
                id.groups = g;
            }
            if let Some(admin) = req.admin {
                id.admin = admin;
            }
            // A private group (uid = gid) is the user's alone: it may not be a named group,
            // whose members would share it.
            if id.uid == id.gid && (req.uid.is_some() || req.gid.is_some()) {
                for row in tx.open_table(GROUPS)?.iter()? {
                    let (k, v) = row?;
                    if decode::<GroupRecord>(v.value())?.gid == id.gid {
                        return Err(ServiceError::Exists(format!(
                            "uid {} = gid {} would make group {} the private group of user {user}",
                            id.uid,
                            id.gid,
                            k.value()
                        )));
                    }
                }
            }
            rec.id = Some(id.clone());
            users.insert(user, encode(&rec)?.as_slice())?;
            Ok(UserInfo {
                user: user.to_owned(),
                id: with_named_groups(id, user, &tx.open_table(GROUPS)?)?,
            })
        })
    }

    /// Signs a token for `user` valid for the configured lifetime, plus a refresh token. The
    /// token carries the user's identity as it is now.
    pub fn issue(&self, user: &str) -> ServiceResult<TokenResponse> {
        let id = self.record(user)?.id.unwrap_or_default();
        let id = {
            let db = self.db.db()?;
            let tx = db.begin_read()?;
            with_named_groups(id, user, &tx.open_table(GROUPS)?)?
        };
        let now = now_ms();
        let ttl = u64::try_from(self.config.token_ttl.as_millis()).unwrap_or(u64::MAX);
        let exp_ms = now.saturating_add(ttl);
        let token = self.sign(&Claims {
            user: user.to_owned(),
            exp_ms,
            id: id.clone(),
        })?;
        let refresh_token = hex::encode(rand::random::<[u8; 32]>());
        let refresh_ttl = u64::try_from(self.config.refresh_ttl.as_millis()).unwrap_or(u64::MAX);
        let rec = RefreshRecord {
            user: user.to_owned(),
            exp_ms: now.saturating_add(refresh_ttl),
        };
        self.db.write(|tx| {
            let mut table = tx.open_table(REFRESH)?;
            table.retain(|_, v| {
                decode::<RefreshRecord>(v)
                    .map(|r| r.exp_ms > now)
                    .unwrap_or(false)
            })?;
            let key = hex::encode(Sha256::digest(refresh_token.as_bytes()));
            table.insert(key.as_str(), encode(&rec)?.as_slice())?;
            Ok(())
        })?;
        Ok(TokenResponse {
            token,
            expires_at_ms: exp_ms,
            refresh_token,
            user: user.to_owned(),
            id: Some(id),
        })
    }

    /// Signs arbitrary claims (exposed for tests that need an expired token).
    pub fn sign(&self, claims: &Claims) -> ServiceResult<String> {
        let payload = serde_json::to_vec(claims)?;
        let sig = self
            .key
            .pss_sign::<Sha256>(&payload)
            .map_err(|e| ServiceError::internal("signing token", e))?;
        Ok(format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(sig)
        ))
    }
}

/// Seals credentials for `public` (what the client does; used by `dfs` and tests).
pub fn seal(public: &PublicKey, user: &str, password: &str) -> ServiceResult<Envelope> {
    let creds = Credentials {
        user: user.to_owned(),
        password: password.to_owned(),
        nonce: hex::encode(rand::random::<[u8; 16]>()),
        timestamp_ms: now_ms(),
    };
    let plain = serde_json::to_vec(&creds)?;
    let ct = public
        .oaep_encrypt::<Sha256>(&plain)
        .map_err(|e| ServiceError::BadRequest(format!("credentials too long to seal: {e}")))?;
    Ok(Envelope {
        ciphertext: STANDARD.encode(ct),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::token::verify_token_with;

    fn service(dir: &Path) -> AuthService {
        AuthService::open(dir, AuthConfig::default()).expect("open auth")
    }

    #[test]
    fn signup_then_login_issues_a_verifiable_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = service(dir.path());
        let pk = auth.public_key().clone();
        auth.signup(&seal(&pk, "alice", "correct horse").expect("seal"))
            .expect("signup");
        let t = auth
            .login(&seal(&pk, "alice", "correct horse").expect("seal"))
            .expect("login");
        let claims = verify_token_with(&pk, &t.token, now_ms()).expect("verify");
        assert_eq!(claims.user, "alice");
        assert!(matches!(
            auth.login(&seal(&pk, "alice", "wrong password").expect("seal")),
            Err(ServiceError::Unauthorized(_))
        ));
    }

    #[test]
    fn replayed_envelope_is_refused_even_after_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = {
            let auth = service(dir.path());
            let pk = auth.public_key().clone();
            auth.signup(&seal(&pk, "bob", "password1").expect("seal"))
                .expect("signup");
            let env = seal(&pk, "bob", "password1").expect("seal");
            auth.login(&env).expect("first login");
            env
        };
        let auth = service(dir.path());
        assert!(matches!(auth.login(&env), Err(ServiceError::Replay(_))));
    }

    #[test]
    fn stored_password_is_an_argon2id_hash_and_key_survives_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pem1 = {
            let auth = service(dir.path());
            let pk = auth.public_key().clone();
            auth.signup(&seal(&pk, "carol", "sekrit-pass").expect("seal"))
                .expect("signup");
            auth.public_key_pem().expect("pem")
        };
        let auth = service(dir.path());
        assert_eq!(auth.public_key_pem().expect("pem"), pem1);
        let db = auth.db.db().expect("db");
        let tx = db.begin_read().expect("read");
        let users = tx.open_table(USERS).expect("table");
        let rec: UserRecord =
            decode(users.get("carol").expect("get").expect("row").value()).expect("decode");
        assert!(rec.phc.starts_with("$argon2id$"), "{}", rec.phc);
        assert!(!rec.phc.contains("sekrit-pass"));
    }

    #[test]
    fn regression_a_token_without_an_identity_acts_as_nobody() {
        let c: Claims = serde_json::from_str(r#"{"user":"old","exp_ms":1}"#).expect("parse");
        assert_eq!(c.id, Identity::nobody());
        assert!(
            !c.id.owns(0),
            "it owns none of the files from before owners"
        );
    }

    #[test]
    fn expired_token_and_refresh_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = service(dir.path());
        let pk = auth.public_key().clone();
        let expired = auth
            .sign(&Claims {
                user: "x".into(),
                exp_ms: now_ms() - 1,
                id: Identity::default(),
            })
            .expect("sign");
        assert!(matches!(
            verify_token_with(&pk, &expired, now_ms()),
            Err(ServiceError::Unauthorized(_))
        ));
        auth.signup(&seal(&pk, "x", "password-1").expect("seal"))
            .expect("signup");
        let t = auth.issue("x").expect("issue");
        let t2 = auth.refresh(&t.refresh_token).expect("refresh");
        assert_eq!(t2.user, "x");
        assert!(
            auth.refresh(&t.refresh_token).is_err(),
            "refresh tokens are single use"
        );
        let mut forged = t2.token.clone();
        forged.insert(3, 'A');
        assert!(verify_token_with(&pk, &forged, now_ms()).is_err());
    }

    #[test]
    fn regression_a_user_in_too_many_groups_is_a_bad_request_not_a_body_too_large() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = service(dir.path());
        let pk = auth.public_key().clone();
        auth.signup(&seal(&pk, "dora", "password-1").expect("seal"))
            .expect("signup");
        let join = |g: usize| {
            auth.add_group(
                &format!("g{g}"),
                &AddGroupRequest {
                    gid: None,
                    members: vec!["dora".into()],
                },
            )
        };
        for g in 0..MAX_NAMED_GROUPS {
            join(g).expect("joins");
        }
        assert!(
            matches!(join(MAX_NAMED_GROUPS), Err(ServiceError::BadRequest(_))),
            "the uploader takes TooLarge for a body over its limit"
        );
        let many = SetUserRequest {
            groups: Some((1..=65).collect()),
            ..Default::default()
        };
        assert!(matches!(
            auth.set_user("dora", &many),
            Err(ServiceError::BadRequest(_))
        ));
    }

    #[test]
    fn regression_ids_never_make_a_private_group_a_named_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = service(dir.path());
        let pk = auth.public_key().clone();
        for u in ["ann", "ben"] {
            auth.signup(&seal(&pk, u, "password-1").expect("seal"))
                .expect("signup");
        }
        let group = |name: &str, gid: Option<u32>| {
            auth.add_group(
                name,
                &AddGroupRequest {
                    gid,
                    members: vec![],
                },
            )
        };
        let set = |user: &str, uid: Option<u32>, gid: Option<u32>| {
            auth.set_user(
                user,
                &SetUserRequest {
                    uid,
                    gid,
                    ..Default::default()
                },
            )
        };
        let staff = group("staff", None).expect("group").gid;
        // ben's primary gid becomes 30000 (no group has it): no new group may take it, and
        // the next ids skip it.
        set("ben", None, Some(30_000)).expect("gid");
        assert!(matches!(
            group("ops", Some(30_000)),
            Err(ServiceError::Exists(_))
        ));
        assert_eq!(group("ops", None).expect("group").gid, 30_001);
        // uid = gid = a named group's gid would make it ann's private group.
        assert!(matches!(
            set("ann", Some(staff), Some(staff)),
            Err(ServiceError::Exists(_))
        ));
        // A named group as a primary group (uid differs) is allowed.
        set("ann", None, Some(staff)).expect("primary group");
    }
}
