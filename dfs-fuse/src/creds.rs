//! Saved logins: one entry per cluster (`cluster:<id>`, the id the directory names in its
//! cluster map) in `dirs::config_dir()/dfs/credentials.json` (so `XDG_CONFIG_HOME` is
//! honoured), written durably with mode 0600. Adding, removing or renaming a directory URL
//! loses nothing; an entry an older client saved under a directory URL is found by that URL
//! once and moved to the cluster id.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// What a login leaves behind for one server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedLogin {
    /// User name.
    pub user: String,
    /// Bearer token.
    pub token: String,
    /// When it expires (ms since the epoch).
    pub expires_at_ms: u64,
    /// Single-use refresh token.
    pub refresh_token: String,
    /// When the token was obtained (ms since the epoch; 0 if unknown).
    #[serde(default)]
    pub issued_at_ms: u64,
    /// The user's numeric identity (unknown for logins saved before identities existed).
    #[serde(default)]
    pub id: Option<common::Identity>,
}

impl SavedLogin {
    /// From a login or refresh answer received now.
    pub fn from_response(t: common::api::TokenResponse) -> Self {
        SavedLogin {
            user: t.user,
            token: t.token,
            expires_at_ms: t.expires_at_ms,
            refresh_token: t.refresh_token,
            issued_at_ms: dfs_server::store::now_ms(),
            id: t.id,
        }
    }

    /// When to renew: a third of the lifetime before expiry, at most five minutes before.
    pub fn renew_at_ms(&self) -> u64 {
        let life = self.expires_at_ms.saturating_sub(self.issued_at_ms);
        let margin = if self.issued_at_ms == 0 {
            5 * 60_000
        } else {
            (life / 3).min(5 * 60_000)
        };
        self.expires_at_ms.saturating_sub(margin)
    }
}

/// The credentials file.
#[derive(Debug, Clone)]
pub struct CredStore {
    path: PathBuf,
}

impl CredStore {
    /// The default location under the user's config directory.
    pub fn default_location() -> anyhow::Result<Self> {
        let dir =
            dirs::config_dir().context("no config directory (set HOME or XDG_CONFIG_HOME)")?;
        Ok(CredStore {
            path: dir.join("dfs").join("credentials.json"),
        })
    }

    /// A store at an explicit path.
    pub fn at(path: PathBuf) -> Self {
        CredStore { path }
    }

    /// Its path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn load_all(&self) -> anyhow::Result<BTreeMap<String, SavedLogin>> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("parsing {}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
        }
    }

    /// The login saved for `server`, if any.
    pub fn get(&self, server: &str) -> anyhow::Result<Option<SavedLogin>> {
        Ok(self.load_all()?.remove(server))
    }

    /// Saves (or with `None`, forgets) the login for `server`.
    pub fn put(&self, server: &str, login: Option<SavedLogin>) -> anyhow::Result<()> {
        let mut all = self.load_all()?;
        match login {
            Some(l) => all.insert(server.to_owned(), l),
            None => all.remove(server),
        };
        self.save_all(&all)
    }

    fn save_all(&self, all: &BTreeMap<String, SavedLogin>) -> anyhow::Result<()> {
        let data = serde_json::to_vec_pretty(all)?;
        if let Some(dir) = self.path.parent() {
            dfs_server::cluster::create_private_dir(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        dfs_server::store::write_durable(&self.path, &data, 0o600)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// The login saved for cluster `cluster_id`; else one an older client saved under one of
    /// `urls`, which is then moved to the cluster id (a refresh token is single use: it must
    /// live in one entry only).
    pub fn get_for(&self, cluster_id: &str, urls: &[String]) -> anyhow::Result<Option<SavedLogin>> {
        let mut all = self.load_all()?;
        if let Some(l) = all.get(&cluster_key(cluster_id)) {
            return Ok(Some(l.clone()));
        }
        let Some(found) = urls.iter().find_map(|u| all.get(u.as_str()).cloned()) else {
            return Ok(None);
        };
        for u in urls {
            all.remove(u.as_str());
        }
        all.insert(cluster_key(cluster_id), found.clone());
        self.save_all(&all)?;
        tracing::info!(cluster = %cluster_id, "saved login moved from its directory URL to the cluster id");
        Ok(Some(found))
    }

    /// Saves (or with `None`, forgets) the login of cluster `cluster_id`; entries saved under
    /// any of `urls` by older clients go.
    pub fn put_for(
        &self,
        cluster_id: &str,
        urls: &[String],
        login: Option<SavedLogin>,
    ) -> anyhow::Result<()> {
        let mut all = self.load_all()?;
        for u in urls {
            all.remove(u.as_str());
        }
        match login {
            Some(l) => all.insert(cluster_key(cluster_id), l),
            None => all.remove(&cluster_key(cluster_id)),
        };
        self.save_all(&all)
    }
}

/// The key of a cluster's entry in the credentials and known-keys files.
pub fn cluster_key(cluster_id: &str) -> String {
    format!("cluster:{cluster_id}")
}

/// The auth keys this client trusts, one fingerprint per cluster id (`cluster:<id>`) and per
/// directory URL it was pinned through, in `known_auth_keys.json` next to the credentials (mode 0600): pinned at the first signup or
/// login (trust on first use, as ssh's `known_hosts`) or given with `--auth-key-fingerprint`,
/// and kept across logouts.
#[derive(Debug, Clone)]
pub struct KnownKeys {
    path: PathBuf,
}

impl KnownKeys {
    /// The default location, beside the credentials file.
    pub fn default_location() -> anyhow::Result<Self> {
        let creds = CredStore::default_location()?;
        Ok(KnownKeys::beside(&creds))
    }

    /// The file next to `creds`.
    pub fn beside(creds: &CredStore) -> Self {
        KnownKeys {
            path: creds.path().with_file_name("known_auth_keys.json"),
        }
    }

    /// Its path (named in the error a changed key gives).
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn load_all(&self) -> anyhow::Result<BTreeMap<String, String>> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("parsing {}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
        }
    }

    /// The fingerprint pinned for `server`, if any.
    pub fn get(&self, server: &str) -> anyhow::Result<Option<String>> {
        Ok(self.load_all()?.remove(server))
    }

    /// The fingerprint pinned for cluster `cluster_id`, else for any of `urls` (pins of older
    /// clients, and of a URL now claiming another cluster id: a directory in the middle that
    /// names a fresh cluster still meets the key pinned through its URL).
    pub fn get_for(&self, cluster_id: &str, urls: &[String]) -> anyhow::Result<Option<String>> {
        let mut all = self.load_all()?;
        if let Some(f) = all.remove(&cluster_key(cluster_id)) {
            return Ok(Some(f));
        }
        Ok(urls.iter().find_map(|u| all.remove(u.as_str())))
    }

    /// Pins `fingerprint` for cluster `cluster_id` and for each of `urls`.
    pub fn put_for(
        &self,
        cluster_id: &str,
        urls: &[String],
        fingerprint: &str,
    ) -> anyhow::Result<()> {
        let mut all = self.load_all()?;
        all.insert(cluster_key(cluster_id), fingerprint.to_owned());
        for u in urls {
            all.insert(u.clone(), fingerprint.to_owned());
        }
        self.save_all(&all)
    }

    /// Pins `fingerprint` for `server`.
    pub fn put(&self, server: &str, fingerprint: &str) -> anyhow::Result<()> {
        let mut all = self.load_all()?;
        all.insert(server.to_owned(), fingerprint.to_owned());
        self.save_all(&all)
    }

    fn save_all(&self, all: &BTreeMap<String, String>) -> anyhow::Result<()> {
        let data = serde_json::to_vec_pretty(all)?;
        if let Some(dir) = self.path.parent() {
            dfs_server::cluster::create_private_dir(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        dfs_server::store::write_durable(&self.path, &data, 0o600)
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(token: &str) -> SavedLogin {
        SavedLogin {
            user: "alice".into(),
            token: token.into(),
            expires_at_ms: 1,
            refresh_token: format!("r-{token}"),
            issued_at_ms: 0,
            id: None,
        }
    }

    #[test]
    fn a_login_saved_by_url_is_found_once_and_then_kept_by_cluster_id() {
        let tmp = tempfile::tempdir().expect("tmp");
        let creds = CredStore::at(tmp.path().join("dfs").join("credentials.json"));
        // An older client saved it under the URL it used.
        creds
            .put("http://127.0.0.1:7070", Some(login("old")))
            .expect("saved");
        let a = vec!["http://127.0.0.1:7070".to_owned()];
        let found = creds
            .get_for("c1", &a)
            .expect("read")
            .expect("found by URL");
        assert_eq!(found.token, "old");
        // Moved: one entry, under the cluster id, so its single-use refresh token lives once.
        assert!(creds.get("http://127.0.0.1:7070").expect("read").is_none());
        // Any URL of the cluster (an alias, a second directory, or none of the old ones) finds it.
        let other = vec![
            "http://localhost:7070".to_owned(),
            "http://127.0.0.2:7070".to_owned(),
        ];
        let again = creds
            .get_for("c1", &other)
            .expect("read")
            .expect("by cluster id");
        assert_eq!(again.token, "old");
        // Another cluster does not.
        assert!(creds.get_for("c2", &a).expect("read").is_none());
        // Renewed and forgotten by cluster id.
        creds
            .put_for("c1", &other, Some(login("new")))
            .expect("saved");
        assert_eq!(
            creds.get_for("c1", &a).expect("read").expect("kept").token,
            "new"
        );
        creds.put_for("c1", &a, None).expect("forgotten");
        assert!(creds.get_for("c1", &a).expect("read").is_none());
    }

    #[test]
    fn an_auth_key_pin_follows_the_cluster_and_stays_on_its_urls() {
        let tmp = tempfile::tempdir().expect("tmp");
        let creds = CredStore::at(tmp.path().join("dfs").join("credentials.json"));
        let known = KnownKeys::beside(&creds);
        let a = "http://127.0.0.1:7070".to_owned();
        // An older client's pin by URL still guards that URL, whatever cluster it claims.
        known.put(&a, "SHA256:old").expect("pinned");
        assert_eq!(
            known
                .get_for("fresh", std::slice::from_ref(&a))
                .expect("read")
                .as_deref(),
            Some("SHA256:old")
        );
        known
            .put_for("c1", std::slice::from_ref(&a), "SHA256:k1")
            .expect("pinned");
        // A new URL of the same cluster meets the cluster's pin.
        let b = vec!["http://127.0.0.2:7070".to_owned()];
        assert_eq!(
            known.get_for("c1", &b).expect("read").as_deref(),
            Some("SHA256:k1")
        );
        // A known URL claiming another cluster still meets the URL's pin.
        assert_eq!(
            known
                .get_for("c9", std::slice::from_ref(&a))
                .expect("read")
                .as_deref(),
            Some("SHA256:k1")
        );
        assert_eq!(known.get_for("c9", &b).expect("read"), None);
    }
}
