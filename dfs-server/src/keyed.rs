//! `KeyedMutex`: one async mutex per key (a node), made on first use and forgotten once nobody
//! holds or waits for it, so the map stays as small as the set of keys in use. Used by the
//! primary (one write per file at a time) and by the client (pushes and opens of one file).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};

/// A map of per-key async mutexes whose entries are dropped when unused.
pub struct KeyedMutex<K> {
    map: Mutex<HashMap<K, Weak<tokio::sync::Mutex<()>>>>,
}

impl<K> Default for KeyedMutex<K> {
    fn default() -> Self {
        KeyedMutex {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Copy> KeyedMutex<K> {
    /// The mutex of `key`; lock it with `.lock().await`. Everyone who asks while a previous
    /// `Arc` is alive gets the same mutex.
    pub fn get(&self, key: K) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = map.get(&key).and_then(Weak::upgrade) {
            return m;
        }
        let m = Arc::new(tokio::sync::Mutex::new(()));
        map.insert(key, Arc::downgrade(&m));
        // Amortised clean-up: entries nobody holds any more.
        if map.len() > 64 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        m
    }

    /// Keys with a live mutex (for tests and status).
    pub fn len(&self) -> usize {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        map.len()
    }

    /// Whether no key has a live mutex.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn same_key_same_mutex_and_unused_keys_are_forgotten() {
        let k = KeyedMutex::default();
        let a = k.get(1u64);
        let g = a.lock().await;
        assert!(k.get(1).try_lock().is_err(), "one mutex per key");
        assert!(k.get(2).try_lock().is_ok(), "keys are independent");
        drop(g);
        drop(a);
        for i in 0..1000u64 {
            drop(k.get(i));
        }
        assert_eq!(k.len(), 0, "nothing held, nothing kept");
    }
}
