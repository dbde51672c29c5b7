//! API tests: a real in-process cluster on ephemeral loopback ports, driven over HTTP.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::time::Duration;

use common::api::{AcquireResponse, BatchItem, Claims, RenameRequest};
use common::{ErrorCode, FileKind, NodeId, NodeMeta, UploadId, ValidName, routes};

mod support;
use support::*;

#[tokio::test]
async fn signup_login_wrong_password_replay_and_expired_token() {
    let h = Harness::new(|_| {}).await;
    let pk = public_key(&h.http, &h.cluster).await;
    let wrong = dfs_server::auth::seal(&pk, "alice", "not-the-password").unwrap();
    assert_eq!(
        error_code(post_envelope(&h.http, &h.cluster, routes::AUTH_LOGIN, &wrong).await).await,
        (401, ErrorCode::Unauthorized)
    );
    let env = dfs_server::auth::seal(&pk, "alice", "password123").unwrap();
    assert!(
        post_envelope(&h.http, &h.cluster, routes::AUTH_LOGIN, &env)
            .await
            .status()
            .is_success()
    );
    assert_eq!(
        error_code(post_envelope(&h.http, &h.cluster, routes::AUTH_LOGIN, &env).await).await,
        (401, ErrorCode::Replay)
    );
    let dup = dfs_server::auth::seal(&pk, "alice", "password123").unwrap();
    assert_eq!(
        error_code(post_envelope(&h.http, &h.cluster, routes::AUTH_SIGNUP, &dup).await).await,
        (409, ErrorCode::Exists)
    );

    let expired = h
        .cluster
        .auth
        .sign(&Claims {
            user: "alice".into(),
            exp_ms: 1,
            id: common::Identity::default(),
        })
        .unwrap();
    let r = h
        .http
        .get(h.dir(&routes::node(NodeId::ROOT)))
        .bearer_auth(expired)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (401, ErrorCode::Unauthorized));
    let r = h
        .http
        .get(h.dir(&routes::node(NodeId::ROOT)))
        .bearer_auth("garbage.token")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (401, ErrorCode::Unauthorized));
    let r = h
        .http
        .get(h.dir(&routes::node(NodeId::ROOT)))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (401, ErrorCode::Unauthorized));
    let r = h
        .http
        .get(h.dir(&routes::node(NodeId::ROOT)))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    // Every service answers /health.
    let c = &h.cluster;
    let bases = [&c.directory_url, &c.lock_url, &c.auth_url];
    for base in bases.into_iter().chain(c.file_urls.iter()) {
        let r = h
            .http
            .get(format!("{base}{}", routes::HEALTH))
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "ok", "{base}");
    }
    h.cluster.shutdown().await;
}

#[tokio::test]
async fn create_write_read_rename_unlink_and_every_replica_has_the_same_hash() {
    let h = Harness::new(|_| {}).await;
    let d = h.create(NodeId::ROOT, "docs", FileKind::Dir).await;
    let f = h.create(d.id, "a.txt", FileKind::File).await;
    assert_eq!(f.replicas.len(), 2, "three copies with three live servers");
    let data = b"hello, distributed world\n".repeat(1000);
    let r = h.write(&f, &data, 1, 1).await;
    assert!(r.status().is_success(), "write: {}", r.status());
    let meta: NodeMeta = r.json().await.unwrap();
    assert_eq!(
        (meta.version, meta.size, &meta.hash),
        (1, data.len() as u64, &hash_of(&data))
    );
    // Acknowledged once the primary and one replica are durable; the third joins after.
    assert!(meta.holders.len() >= 2, "{:?}", meta.holders);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let meta = loop {
        let m: NodeMeta = h.get_json(&routes::node(f.id)).await;
        if m.holders.len() == 3 || std::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(meta.holders.len(), 3, "the late replica joins the holders");
    for server in std::iter::once(meta.primary.unwrap()).chain(meta.replicas.clone()) {
        let r = h.read_from(server, &meta).await;
        assert!(r.status().is_success());
        let body = r.bytes().await.unwrap();
        assert_eq!(
            hash_of(&body),
            meta.hash,
            "replica {server} has the same content"
        );
    }
    let rename = RenameRequest {
        parent: d.id,
        name: ValidName::parse("a.txt").unwrap(),
        new_parent: NodeId::ROOT,
        new_name: ValidName::parse("b.txt").unwrap(),
        no_replace: false,
    };
    let r = h
        .http
        .post(h.dir(routes::RENAME))
        .bearer_auth(&h.token)
        .json(&rename)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let looked: NodeMeta = h.get_json(&routes::child(NodeId::ROOT, "b.txt")).await;
    assert_eq!((looked.id, looked.version), (f.id, 1));
    let r = h
        .http
        .delete(h.dir(&routes::child(NodeId::ROOT, "b.txt")))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let r = h
        .http
        .get(h.dir(&routes::child(NodeId::ROOT, "b.txt")))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (404, ErrorCode::NotFound));
    h.cluster.shutdown().await;
}

#[tokio::test]
async fn three_waiters_are_granted_in_fifo_order() {
    let h = std::sync::Arc::new(Harness::new(|_| {}).await);
    let node = h.create(NodeId::ROOT, "queued", FileKind::File).await.id;
    let first = granted(&h.acquire(node, 1, 0).await);
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in [2u8, 3, 4] {
        // Join the queue in order, then long-poll concurrently.
        assert!(matches!(
            h.acquire(node, w, 0).await,
            AcquireResponse::Queued { .. }
        ));
    }
    for w in [4u8, 3, 2] {
        let (h, order) = (h.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                if let AcquireResponse::Granted(g) = h.acquire(node, w, 5_000).await {
                    order.lock().unwrap().push((w, g.fence.0));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    h.release(node, w).await;
                    return;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        order.lock().unwrap().is_empty(),
        "nobody is granted while 1 holds the lock"
    );
    h.release(node, 1).await;
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(order.iter().map(|o| o.0).collect::<Vec<_>>(), vec![2, 3, 4]);
    assert!(
        order.windows(2).all(|w| w[0].1 < w[1].1) && order[0].1 > first,
        "fences grow: {order:?}"
    );
}

#[tokio::test]
async fn unrenewed_lease_passes_the_lock_and_stale_fence_is_refused() {
    let h = Harness::new(|c| c.lock.lease = Duration::from_millis(300)).await;
    let f = h.create(NodeId::ROOT, "contended", FileKind::File).await;
    let old = granted(&h.acquire(f.id, 1, 0).await);
    // Holder 1 "crashes" (never renews); 2 gets the lock after the lease.
    let new = granted(&h.acquire(f.id, 2, 5_000).await);
    assert!(new > old);
    assert!(
        h.write(&f, b"new holder", new, 2)
            .await
            .status()
            .is_success()
    );
    let r = h.write(&f, b"stale holder", old, 1).await;
    assert_eq!(error_code(r).await, (409, ErrorCode::StaleFence));
    let meta: NodeMeta = h.get_json(&routes::node(f.id)).await;
    assert_eq!(
        meta.hash,
        hash_of(b"new holder"),
        "the stale write changed nothing"
    );
    h.cluster.shutdown().await;
}

#[tokio::test]
async fn directory_restart_keeps_all_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let http = dfs_server::tls::client().expect("an HTTP client");
    let (token, f) = {
        let cluster = start_on(dir.path(), |_| {}).await;
        let token = signup_login(&http, &cluster, "bob").await.token;
        let h = Harness {
            cluster,
            http: http.clone(),
            token: token.clone(),
            _dir: None,
        };
        let d = h.create(NodeId::ROOT, "kept", FileKind::Dir).await;
        let f = h.create(d.id, "f", FileKind::File).await;
        assert!(h.write(&f, b"durable", 1, 7).await.status().is_success());
        h.cluster.shutdown().await;
        (token, f)
    };
    let cluster = start_on(dir.path(), |_| {}).await;
    let h = Harness {
        cluster,
        http,
        token,
        _dir: None,
    };
    let page: common::api::ListPage = h.get_json(&routes::children(NodeId::ROOT)).await;
    assert_eq!(page.next, None);
    assert_eq!(
        page.entries
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        vec!["kept"]
    );
    let meta: NodeMeta = h.get_json(&routes::node(f.id)).await;
    assert_eq!((meta.version, meta.hash.clone()), (1, hash_of(b"durable")));
    let body = h
        .read_from(meta.primary.unwrap(), &meta)
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(&body[..], b"durable");
    h.cluster.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_json_errors_and_changes_nothing() {
    let h = Harness::new(|_| {}).await;
    let f = h.create(NodeId::ROOT, "f", FileKind::File).await;
    assert!(h.write(&f, b"original", 1, 1).await.status().is_success());
    // Malformed JSON.
    let r = h
        .http
        .post(h.dir(&routes::children(NodeId::ROOT)))
        .bearer_auth(&h.token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (400, ErrorCode::BadRequest));
    // Invalid names, in the body and in the path.
    for bad in ["", ".", "..", "a/b", "a\u{0}b", &"x".repeat(256)] {
        let body = serde_json::json!({ "name": bad, "kind": "file", "mode": 420 });
        let r = h
            .http
            .post(h.dir(&routes::children(NodeId::ROOT)))
            .bearer_auth(&h.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "name {bad:?}");
    }
    let r = h
        .http
        .get(h.dir(&routes::child(NodeId::ROOT, "a/b")))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (400, ErrorCode::InvalidName));
    // Oversize JSON body.
    let huge = serde_json::json!({ "name": "x".repeat(100_000), "kind": "file", "mode": 420 });
    let r = h
        .http
        .post(h.dir(&routes::children(NodeId::ROOT)))
        .bearer_auth(&h.token)
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (413, ErrorCode::TooLarge));
    // Unknown paths and nodes.
    // A route the service does not have is never "not found" (a file server would take that
    // for "this node was deleted").
    let r = h.http.get(h.dir("/v1/nope")).send().await.unwrap();
    assert_eq!(error_code(r).await, (404, ErrorCode::NoRoute));
    let r = h
        .http
        .get(h.dir(&routes::node(NodeId(999_999))))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (404, ErrorCode::NotFound));
    // A body that does not match its declared hash.
    let primary = h.server_url(f.primary.unwrap()).await;
    let r = h
        .http
        .put(format!("{primary}{}", routes::file_write(f.id)))
        .bearer_auth(&h.token)
        .header(routes::FENCE_HEADER, "5")
        .header(
            routes::FENCE_SIG_HEADER,
            dfs_server::lock::sign_fence(&h.cluster.cluster_key, f.id, common::FenceToken(5)),
        )
        .header(routes::HASH_HEADER, hash_of(b"declared").as_str())
        .header(
            routes::UPLOAD_ID_HEADER,
            UploadId::from_bytes([9; 16]).as_str(),
        )
        .header(routes::BASE_HEADER, "0;waiting")
        .body("actual")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (422, ErrorCode::HashMismatch));
    // A traversal attempt in the hash segment.
    let r = h
        .http
        .get(format!("{primary}/v1/files/{}/..%2F..%2Fcluster.key", f.id))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // Internal endpoints refuse user tokens.
    let r = h
        .http
        .post(h.dir(&routes::commit(f.id)))
        .bearer_auth(&h.token)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (403, ErrorCode::Forbidden));
    // Nothing stored was changed.
    let meta: NodeMeta = h.get_json(&routes::node(f.id)).await;
    assert_eq!((meta.version, meta.hash.clone()), (1, hash_of(b"original")));
    let body = h
        .read_from(meta.replicas[0], &meta)
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(&body[..], b"original");
    h.cluster.shutdown().await;
}

#[tokio::test]
async fn regression_a_stalled_upload_does_not_block_the_file() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::new(|cfg| cfg.body_idle = Duration::from_millis(500)).await;
    let f = h.create(NodeId::ROOT, "stalled", FileKind::File).await;
    let primary = h.server_url(f.primary.unwrap()).await;
    // A writer that sends its headers and a few bytes, then goes silent with the connection
    // open (a laptop that sleeps mid-upload): it holds the file's write mutex on the primary.
    let addr = primary.trim_start_matches("http://");
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "PUT {} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n{}: 3\r\n{}: {}\r\n\
         {}: {}\r\n{}: {}\r\n{}: 0;waiting\r\ncontent-length: 100000\r\n\r\npartial...",
        routes::file_write(f.id),
        h.token,
        routes::FENCE_HEADER,
        routes::FENCE_SIG_HEADER,
        dfs_server::lock::sign_fence(&h.cluster.cluster_key, f.id, common::FenceToken(3)),
        routes::HASH_HEADER,
        hash_of(&[0u8; 100_000]).as_str(),
        routes::UPLOAD_ID_HEADER,
        UploadId::from_bytes([1; 16]).as_str(),
        routes::BASE_HEADER,
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The next writer gets through once the stalled body's idle bound has passed.
    let r = tokio::time::timeout(Duration::from_secs(20), h.write(&f, b"next writer", 4, 2))
        .await
        .expect("the next write is not blocked forever by a stalled one");
    assert!(r.status().is_success(), "{}", r.status());
    let meta: NodeMeta = r.json().await.unwrap();
    assert_eq!(meta.hash, hash_of(b"next writer"));
    drop(stalled);
    h.cluster.shutdown().await;
}

#[tokio::test]
async fn retried_upload_is_applied_once() {
    let h = Harness::new(|_| {}).await;
    let f = h.create(NodeId::ROOT, "idem", FileKind::File).await;
    let a: NodeMeta = h.write(&f, b"payload", 3, 5).await.json().await.unwrap();
    let b: NodeMeta = h.write(&f, b"payload", 3, 5).await.json().await.unwrap();
    assert_eq!((a.version, b.version), (1, 1));
    h.cluster.shutdown().await;
}

#[tokio::test]
async fn a_fence_the_lock_service_did_not_sign_is_refused() {
    let h = Harness::new(|_| {}).await;
    let f = h.create(NodeId::ROOT, "guarded", FileKind::File).await;
    let primary = h.server_url(f.primary.unwrap()).await;
    for sig in [
        "",
        "00",
        &dfs_server::lock::sign_fence("wrong key", f.id, common::FenceToken(u64::MAX)),
    ] {
        let r = h
            .http
            .put(format!("{primary}{}", routes::file_write(f.id)))
            .bearer_auth(&h.token)
            .header(routes::FENCE_HEADER, u64::MAX.to_string())
            .header(routes::FENCE_SIG_HEADER, sig)
            .header(routes::HASH_HEADER, hash_of(b"x").as_str())
            .header(
                routes::UPLOAD_ID_HEADER,
                UploadId::from_bytes([1; 16]).as_str(),
            )
            .header(routes::BASE_HEADER, "0;waiting")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(r).await,
            (403, ErrorCode::Forbidden),
            "signature {sig:?}"
        );
    }
    // The file stays writable by a real lock holder.
    assert!(h.write(&f, b"ok", 1, 2).await.status().is_success());
    h.cluster.shutdown().await;
}

#[tokio::test]
async fn closed_signup_needs_the_cluster_key() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_on(dir.path(), |c| c.auth.open_signup = false).await;
    let http = dfs_server::tls::client().expect("an HTTP client");
    let pk = public_key(&http, &cluster).await;
    let env = dfs_server::auth::seal(&pk, "mallory", "password123").unwrap();
    let r = post_envelope(&http, &cluster, routes::AUTH_SIGNUP, &env).await;
    assert_eq!(error_code(r).await, (403, ErrorCode::Forbidden));
    let env = dfs_server::auth::seal(&pk, "alice", "password123").unwrap();
    let r = http
        .post(format!("{}{}", cluster.auth_url, routes::AUTH_SIGNUP))
        .header(routes::CLUSTER_KEY_HEADER, &cluster.cluster_key)
        .json(&env)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "the administrator signs a user up");
    let env = dfs_server::auth::seal(&pk, "alice", "password123").unwrap();
    assert!(
        post_envelope(&http, &cluster, routes::AUTH_LOGIN, &env)
            .await
            .status()
            .is_success()
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn regression_rewriting_an_earlier_version_never_loses_its_copies() {
    // A, B, then A again: the clean-up of A (superseded by B) must not delete the A that the
    // third write stored and committed meanwhile.
    let h = Harness::new(|_| {}).await;
    let f = h.create(NodeId::ROOT, "aba.txt", FileKind::File).await;
    for (i, data) in [&b"content A"[..], b"content B", b"content A"]
        .iter()
        .enumerate()
    {
        let fence = 10 + i as u64;
        let r = h.write(&f, data, fence, 1 + i as u8).await;
        assert!(r.status().is_success(), "write {i}: {}", r.status());
    }
    // Let the background clean-ups and late replicas finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let meta: NodeMeta = h.get_json(&routes::node(f.id)).await;
    assert_eq!(meta.hash, hash_of(b"content A"));
    assert!(meta.holders.len() >= 2, "{:?}", meta.holders);
    for server in &meta.holders {
        let r = h.read_from(*server, &meta).await;
        assert!(
            r.status().is_success(),
            "holder {server} lost the current version"
        );
        assert_eq!(&r.bytes().await.unwrap()[..], b"content A");
    }
    h.cluster.shutdown().await;
}

impl Harness {
    /// One item of a batched upload, signed like a lock grant.
    fn batch_item(&self, meta: &NodeMeta, data: &[u8], fence: u64, upload: u8) -> BatchItem {
        BatchItem {
            node: meta.id,
            hash: hash_of(data),
            size: data.len() as u64,
            fence: common::FenceToken(fence),
            fence_sig: dfs_server::lock::sign_fence(
                &self.cluster.cluster_key,
                meta.id,
                common::FenceToken(fence),
            ),
            upload_id: UploadId::from_bytes([upload; 16]),
            base: common::api::PushBase {
                version: meta.version,
                waiting: true,
            },
            placement: meta.primary.iter().chain(&meta.replicas).copied().collect(),
            mode: None,
            mtime_ns: None,
        }
    }

    async fn write_batch(
        &self,
        primary: common::ServerId,
        items: Vec<BatchItem>,
        bodies: &[&[u8]],
    ) -> reqwest::Response {
        let url = self.server_url(primary).await;
        let mut frame = common::batch::prefix(
            &serde_json::to_vec(&common::api::BatchHeader { items }).unwrap(),
        );
        for b in bodies {
            frame.extend_from_slice(b);
        }
        self.http
            .post(format!("{url}{}", routes::FILE_BATCH_WRITE))
            .bearer_auth(&self.token)
            .body(frame)
            .send()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn a_batch_is_all_or_nothing_per_file_and_fenced_per_file() {
    let h = Harness::new(|_| {}).await;
    let mut all = Vec::new();
    for i in 0..24 {
        all.push(
            h.create(NodeId::ROOT, &format!("b{i}"), FileKind::File)
                .await,
        );
    }
    // Five files of one primary, and one the batch's receiver is not the primary of. The most
    // frequent primary has at least 8 of the 24 files, however placement went (a server that
    // missed a heartbeat under load is skipped for a while).
    let primary = all
        .iter()
        .filter_map(|f| f.primary)
        .max_by_key(|p| all.iter().filter(|f| f.primary == Some(*p)).count())
        .unwrap();
    let mut files: Vec<NodeMeta> = all
        .iter()
        .filter(|f| f.primary == Some(primary))
        .take(5)
        .cloned()
        .collect();
    assert_eq!(files.len(), 5);
    files.push(
        all.iter()
            .find(|f| f.primary != Some(primary))
            .unwrap()
            .clone(),
    );
    // b1 already has a version written under fence 50: the batch's fence 40 is stale for it.
    let r = h.write(&files[1], b"newer, fence 50", 50, 99).await;
    assert!(r.status().is_success());
    let bodies: Vec<&[u8]> = vec![
        b"one",
        b"stale",
        b"declared otherwise",
        b"three",
        b"four",
        b"five",
    ];
    let mut items: Vec<BatchItem> = files
        .iter()
        .zip(&bodies)
        .enumerate()
        .map(|(i, (f, b))| h.batch_item(f, b, 40, 10 + i as u8))
        .collect();
    items[2].hash = hash_of(b"something else");
    // b3 claims a fence the lock service never signed.
    items[3].fence_sig = "forged".into();

    let r = h.write_batch(primary, items.clone(), &bodies).await;
    assert!(r.status().is_success(), "batch: {}", r.status());
    let resp: common::api::BatchResponse<NodeMeta> = r.json().await.unwrap();
    assert_eq!(resp.results.len(), 6);
    let code = |i: usize| match &resp.results[i] {
        common::api::ItemResult::Ok(_) => None,
        common::api::ItemResult::Err(e) => Some(e.code),
    };
    assert_eq!(code(1), Some(ErrorCode::StaleFence));
    assert_eq!(code(2), Some(ErrorCode::HashMismatch));
    assert_eq!(code(3), Some(ErrorCode::Forbidden));
    assert_eq!(code(0), None);
    assert_eq!(code(4), None);
    assert_eq!(code(5), Some(ErrorCode::NotPrimary));

    // Each refused file is untouched; each accepted one is a whole version on two servers.
    let meta: NodeMeta = h.get_json(&routes::node(files[1].id)).await;
    assert_eq!(
        meta.hash,
        hash_of(b"newer, fence 50"),
        "the stale item changed nothing"
    );
    for i in [2, 3, 5] {
        let meta: NodeMeta = h.get_json(&routes::node(files[i].id)).await;
        assert_eq!(meta.version, 0, "refused item {i} changed nothing");
    }
    for i in [0, 4] {
        // The third copy is made after the answer and joins the holders (bounded wait).
        let mut meta: NodeMeta = h.get_json(&routes::node(files[i].id)).await;
        for _ in 0..100 {
            if meta.holders.len() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            meta = h.get_json(&routes::node(files[i].id)).await;
        }
        assert_eq!(meta.hash, hash_of(bodies[i]));
        assert_eq!(meta.version, 1);
        assert_eq!(meta.holders.len(), 3, "{:?}", meta.holders);
        for server in &meta.holders {
            let r = h.read_from(*server, &meta).await;
            assert!(r.status().is_success(), "holder {server} of item {i}");
            assert_eq!(&r.bytes().await.unwrap()[..], bodies[i]);
        }
    }

    // The same batch again (a lost answer): applied once.
    let r = h.write_batch(primary, items.clone(), &bodies).await;
    assert!(r.status().is_success());
    let meta: NodeMeta = h.get_json(&routes::node(files[0].id)).await;
    assert_eq!(meta.version, 1, "a resent batch item is applied once");

    // Malformed batches are refused whole, with a clear code.
    let twice = vec![items[0].clone(), items[0].clone()];
    let r = h.write_batch(primary, twice, &[b"one", b"one"]).await;
    assert_eq!(error_code(r).await, (400, ErrorCode::BadRequest));
    let r = h
        .write_batch(primary, vec![items[0].clone()], &[b"one and more"])
        .await;
    assert_eq!(error_code(r).await, (400, ErrorCode::BadRequest));
    h.cluster.shutdown().await;
}

#[tokio::test]
async fn regression_a_batch_respects_the_servers_file_size_limit() {
    let h = Harness::new(|c| c.max_file_bytes = 8).await;
    let f = h.create(NodeId::ROOT, "big", FileKind::File).await;
    let data: &[u8] = b"more than eight bytes";
    let item = h.batch_item(&f, data, 1, 1);
    let r = h.write_batch(f.primary.unwrap(), vec![item], &[data]).await;
    assert_eq!(error_code(r).await, (413, ErrorCode::TooLarge));
    let meta: NodeMeta = h.get_json(&routes::node(f.id)).await;
    assert_eq!(meta.version, 0);
    h.cluster.shutdown().await;
}

#[tokio::test]
async fn file_servers_serve_a_user_only_what_the_directory_let_them_open() {
    let h = Harness::new(|_| {}).await;
    let secret = h.create(NodeId::ROOT, "secret", FileKind::File).await;
    let public = h.create(NodeId::ROOT, "public", FileKind::File).await;
    for (f, body) in [(&secret, b"alice's secret"), (&public, b"alice's public")] {
        let r = h.write(f, body, 1, f.id.0 as u8).await;
        assert!(r.status().is_success());
    }
    let r = h
        .http
        .patch(h.dir(&routes::node(secret.id)))
        .bearer_auth(&h.token)
        .json(&serde_json::json!({ "mode": 0o600 }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let secret: NodeMeta = h.get_json(&routes::node(secret.id)).await;
    let public: NodeMeta = h.get_json(&routes::node(public.id)).await;
    let server = secret.holders[0];
    // Alice reads through an open; without one, or with one for another file, she does not.
    assert!(h.read_from(server, &secret).await.status().is_success());
    let none = h.read_with(server, &secret, None).await;
    assert_eq!(error_code(none).await, (403, ErrorCode::AccessDenied));
    let other = h.capability(public.id).await.unwrap();
    let wrong = h.read_with(server, &secret, Some(&other)).await;
    assert_eq!(error_code(wrong).await, (403, ErrorCode::AccessDenied));

    // Bob gets no capability for her 0600 file, only for what everyone may read.
    let mut bob = h;
    bob.token = signup_login(&bob.http, &bob.cluster, "bob").await.token;
    assert!(bob.capability(secret.id).await.is_none());
    let r = bob
        .http
        .get(format!("{}?access=r", bob.dir(&routes::node(secret.id))))
        .bearer_auth(&bob.token)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (403, ErrorCode::AccessDenied));
    let stolen = bob.read_with(server, &secret, Some(&other)).await;
    assert_eq!(error_code(stolen).await, (403, ErrorCode::AccessDenied));
    assert!(bob.read_from(server, &public).await.status().is_success());
    bob.cluster.shutdown().await;
}

#[tokio::test]
async fn only_a_user_who_may_write_a_file_queues_for_its_lock() {
    let h = Harness::new(|_| {}).await;
    let f = h.create(NodeId::ROOT, "locked", FileKind::File).await;
    let url = format!("{}{}", h.cluster.lock_url, routes::lock(f.id, "acquire"));
    let body = serde_json::json!({ "waiter": UploadId::from_bytes([1; 16]), "wait_ms": 0 });
    // Without the directory's word, no one queues (a user could otherwise hold any lock).
    let r = h
        .http
        .post(&url)
        .bearer_auth(&h.token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (403, ErrorCode::AccessDenied));
    let mine = h.commit_capability(f.id).await;
    assert!(!mine.is_empty(), "the owner may write");
    granted(&h.acquire(f.id, 2, 0).await);
    h.release(f.id, 2).await;
    // Bob may not write Alice's 0644 file: no capability, and hers is no use to him on
    // another file.
    let mut bob = h;
    bob.token = signup_login(&bob.http, &bob.cluster, "bob").await.token;
    assert!(bob.commit_capability(f.id).await.is_empty());
    let other = bob.create(NodeId::ROOT, "bobs", FileKind::File).await;
    let r = bob
        .http
        .post(format!(
            "{}{}",
            bob.cluster.lock_url,
            routes::lock(other.id, "acquire")
        ))
        .bearer_auth(&bob.token)
        .header(routes::CAPABILITY_HEADER, mine)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (403, ErrorCode::AccessDenied));
    bob.cluster.shutdown().await;
}

/// A create request as `who` through an act-as header (None: the token's own identity).
async fn create_as(
    h: &Harness,
    token: &str,
    who: Option<&str>,
    parent: NodeId,
    name: &str,
    kind: FileKind,
    mode: u32,
) -> reqwest::Response {
    let req = common::api::CreateRequest {
        name: ValidName::parse(name).unwrap(),
        kind,
        mode,
        symlink_target: None,
        rdev: 0,
    };
    let mut r = h
        .http
        .post(h.dir(&routes::children(parent)))
        .bearer_auth(token)
        .json(&req);
    if let Some(who) = who {
        r = r.header(routes::ACT_AS_HEADER, who);
    }
    r.send().await.unwrap()
}

#[tokio::test]
async fn an_administrators_local_ids_mount_acts_as_each_local_caller() {
    let h = Harness::new(|_| {}).await;
    // alice becomes the administrator; her next login carries it.
    let r = h
        .http
        .patch(format!(
            "{}{}",
            h.cluster.auth_url,
            routes::auth_user("alice")
        ))
        .header(routes::CLUSTER_KEY_HEADER, &h.cluster.cluster_key)
        .json(&common::api::SetUserRequest {
            admin: Some(true),
            ..Default::default()
        })
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let pk = public_key(&h.http, &h.cluster).await;
    let env = dfs_server::auth::seal(&pk, "alice", "password123").unwrap();
    let admin: common::api::TokenResponse =
        post_envelope(&h.http, &h.cluster, routes::AUTH_LOGIN, &env)
            .await
            .json()
            .await
            .unwrap();
    let bob = signup_login(&h.http, &h.cluster, "bob").await.token;

    // Local root makes a 0755 directory (it owns it) and a 0777 one.
    let r = create_as(
        &h,
        &admin.token,
        Some("0:0:"),
        NodeId::ROOT,
        "etc",
        FileKind::Dir,
        0o755,
    )
    .await;
    assert!(r.status().is_success(), "{}", r.status());
    let etc: NodeMeta = r.json().await.unwrap();
    assert_eq!((etc.uid, etc.gid), (0, 0));
    let r = create_as(
        &h,
        &admin.token,
        Some("0:0:"),
        NodeId::ROOT,
        "tmp",
        FileKind::Dir,
        0o777,
    )
    .await;
    let tmp: NodeMeta = r.json().await.unwrap();

    // Local uid 12345 may not write in root's 0755 directory: the directory refuses it,
    // although the token is the administrator's.
    let r = create_as(
        &h,
        &admin.token,
        Some("12345:500:7"),
        etc.id,
        "x",
        FileKind::File,
        0o644,
    )
    .await;
    assert_eq!(error_code(r).await, (403, ErrorCode::AccessDenied));
    // In the 0777 one it may, and the file is its own.
    let r = create_as(
        &h,
        &admin.token,
        Some("12345:500:7"),
        tmp.id,
        "x",
        FileKind::File,
        0o644,
    )
    .await;
    assert!(r.status().is_success(), "{}", r.status());
    let x: NodeMeta = r.json().await.unwrap();
    assert_eq!((x.uid, x.gid), (12345, 500));

    // An ordinary user naming an identity is refused, not acted on nor ignored.
    let r = create_as(&h, &bob, Some("0:0:"), tmp.id, "y", FileKind::File, 0o644).await;
    assert_eq!(error_code(r).await, (403, ErrorCode::NotAdministrator));
    // A malformed one is a bad request.
    let r = create_as(
        &h,
        &admin.token,
        Some("root"),
        tmp.id,
        "z",
        FileKind::File,
        0o644,
    )
    .await;
    assert_eq!(error_code(r).await, (400, ErrorCode::BadRequest));
    h.cluster.shutdown().await;
}

/// `POST` of an administrator's group change with the cluster key (or `token`'s bearer).
async fn group_call<B: serde::Serialize>(
    h: &Harness,
    path: &str,
    body: &B,
    token: Option<&str>,
) -> reqwest::Response {
    let r = h
        .http
        .post(format!("{}{path}", h.cluster.auth_url))
        .json(body);
    match token {
        Some(t) => r.bearer_auth(t),
        None => r.header(routes::CLUSTER_KEY_HEADER, &h.cluster.cluster_key),
    }
    .send()
    .await
    .unwrap()
}

async fn refreshed(h: &Harness, t: &common::api::TokenResponse) -> common::api::TokenResponse {
    let r = h
        .http
        .post(format!("{}{}", h.cluster.auth_url, routes::AUTH_REFRESH))
        .json(&common::api::RefreshRequest {
            refresh_token: t.refresh_token.clone(),
        })
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.unwrap()
}

#[tokio::test]
async fn the_administrator_manages_groups_and_members_tokens_carry_them_from_renewal() {
    use common::api::{AddGroupRequest, GroupInfo, RemoveGroupRequest};
    let h = Harness::new(|_| {}).await;
    let pk = public_key(&h.http, &h.cluster).await;
    let alice: common::api::TokenResponse = post_envelope(
        &h.http,
        &h.cluster,
        routes::AUTH_LOGIN,
        &dfs_server::auth::seal(&pk, "alice", "password123").unwrap(),
    )
    .await
    .json()
    .await
    .unwrap();
    let bob = signup_login(&h.http, &h.cluster, "bob").await;
    let add = |members: &[&str], gid: Option<u32>| AddGroupRequest {
        gid,
        members: members.iter().map(|m| m.to_string()).collect(),
    };

    // Only the cluster key manages groups.
    let r = group_call(
        &h,
        &routes::auth_group("staff"),
        &add(&["bob"], None),
        Some(&h.token),
    )
    .await;
    assert_eq!(error_code(r).await, (403, ErrorCode::Forbidden));

    // A new group takes the next free id (alice 10000, bob 10001).
    let r = group_call(
        &h,
        &routes::auth_group("staff"),
        &add(&["bob", "alice"], None),
        None,
    )
    .await;
    let staff: GroupInfo = r.json().await.unwrap();
    assert_eq!(staff.gid, 10_002);
    assert_eq!(staff.members, vec!["alice", "bob"]);
    // gids are unique, and not a user's private group; names and members are checked.
    for (name, req, want) in [
        ("staff", add(&[], Some(5000)), (409, ErrorCode::Exists)),
        ("ops", add(&[], Some(10_002)), (409, ErrorCode::Exists)),
        ("ops", add(&[], Some(10_001)), (409, ErrorCode::Exists)),
        ("ops", add(&[], Some(0)), (400, ErrorCode::BadRequest)),
        (
            "ops",
            add(&["nosuchuser"], None),
            (404, ErrorCode::NotFound),
        ),
        ("bad!name", add(&[], None), (400, ErrorCode::BadRequest)),
    ] {
        let r = group_call(&h, &routes::auth_group(name), &req, None).await;
        assert_eq!(error_code(r).await, want, "{name} {req:?}");
    }
    // A user signing up later never gets a group's id as its private group.
    let carol = signup_login(&h.http, &h.cluster, "carol").await;
    assert_eq!(carol.id.as_ref().unwrap().uid, 10_003);

    // Tokens carry the group from their next renewal.
    assert!(!bob.id.as_ref().unwrap().groups.contains(&10_002));
    let bob = refreshed(&h, &bob).await;
    assert_eq!(bob.id.as_ref().unwrap().groups, vec![10_002]);
    let alice = refreshed(&h, &alice).await;
    let users: Vec<common::api::UserInfo> = h
        .http
        .get(format!("{}{}", h.cluster.auth_url, routes::AUTH_USERS))
        .header(routes::CLUSTER_KEY_HEADER, &h.cluster.cluster_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let of = |u: &str| {
        users
            .iter()
            .find(|x| x.user == u)
            .unwrap()
            .id
            .groups
            .clone()
    };
    assert_eq!((of("bob"), of("carol")), (vec![10_002], vec![]));

    // The directory grants by it: alice's 0770 directory of group staff lets bob in, not carol.
    let r = create_as(
        &h,
        &alice.token,
        None,
        NodeId::ROOT,
        "shared",
        FileKind::Dir,
        0o770,
    )
    .await;
    let shared: NodeMeta = r.json().await.unwrap();
    let r = h
        .http
        .patch(h.dir(&routes::node(shared.id)))
        .bearer_auth(&alice.token)
        .json(&common::api::SetAttrRequest {
            gid: Some(10_002),
            ..Default::default()
        })
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "chgrp to her group: {}",
        r.status()
    );
    let r = create_as(&h, &bob.token, None, shared.id, "b", FileKind::File, 0o644).await;
    assert!(r.status().is_success(), "{}", r.status());
    let r = create_as(
        &h,
        &carol.token,
        None,
        shared.id,
        "c",
        FileKind::File,
        0o644,
    )
    .await;
    assert_eq!(error_code(r).await, (403, ErrorCode::AccessDenied));

    // Removing a member: their next token lacks the group.
    let r = group_call(
        &h,
        &routes::auth_group_remove("staff"),
        &RemoveGroupRequest {
            members: vec!["bob".into()],
        },
        None,
    )
    .await;
    let left: Option<GroupInfo> = r.json().await.unwrap();
    assert_eq!(left.unwrap().members, vec!["alice"]);
    assert!(refreshed(&h, &bob).await.id.unwrap().groups.is_empty());

    // A group that is someone's primary group stays; then it goes.
    let set_gid = |gid: u32| {
        h.http
            .patch(format!(
                "{}{}",
                h.cluster.auth_url,
                routes::auth_user("carol")
            ))
            .header(routes::CLUSTER_KEY_HEADER, &h.cluster.cluster_key)
            .json(&common::api::SetUserRequest {
                gid: Some(gid),
                ..Default::default()
            })
            .send()
    };
    assert!(set_gid(10_002).await.unwrap().status().is_success());
    let remove = RemoveGroupRequest::default();
    let r = group_call(&h, &routes::auth_group_remove("staff"), &remove, None).await;
    assert_eq!(error_code(r).await, (409, ErrorCode::InUse));
    assert!(set_gid(10_003).await.unwrap().status().is_success());
    let r = group_call(&h, &routes::auth_group_remove("staff"), &remove, None).await;
    assert!(r.status().is_success(), "{}", r.status());
    let groups: Vec<GroupInfo> = h
        .http
        .get(format!("{}{}", h.cluster.auth_url, routes::AUTH_GROUPS))
        .header(routes::CLUSTER_KEY_HEADER, &h.cluster.cluster_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(groups.is_empty(), "{groups:?}");
    h.cluster.shutdown().await;
}

#[tokio::test]
async fn links_and_long_names_answer_their_own_codes() {
    let h = Harness::new(|_| {}).await;
    let f = h.create(NodeId::ROOT, "f", FileKind::File).await;
    let d = h.create(NodeId::ROOT, "d", FileKind::Dir).await;
    let link = |node: NodeId, name: &str| {
        let src = if node == f.id { "f" } else { "d" };
        let body = serde_json::json!({
            "node": node, "parent": NodeId::ROOT, "name": src,
            "new_parent": NodeId::ROOT, "new_name": name
        });
        h.http
            .post(h.dir(routes::LINK))
            .bearer_auth(&h.token)
            .json(&body)
            .send()
    };
    let r = link(f.id, "g").await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let linked: NodeMeta = r.json().await.unwrap();
    assert_eq!((linked.id, linked.nlink), (f.id, 2));
    assert_eq!(
        error_code(link(f.id, "d").await.unwrap()).await,
        (409, ErrorCode::Exists)
    );
    assert_eq!(
        error_code(link(d.id, "d2").await.unwrap()).await,
        (403, ErrorCode::Forbidden),
        "no hard links to directories (EPERM)"
    );
    // Too long: a name in the path, a symlink target.
    let r = h
        .http
        .get(h.dir(&routes::child(NodeId::ROOT, &"x".repeat(256))))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (400, ErrorCode::NameTooLong));
    // In a JSON body too (a create, a link's new name).
    let body = serde_json::json!({ "name": "x".repeat(256), "kind": "file", "mode": 420 });
    let r = h
        .http
        .post(h.dir(&routes::children(NodeId::ROOT)))
        .bearer_auth(&h.token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (400, ErrorCode::NameTooLong));
    assert_eq!(
        error_code(link(f.id, &"y".repeat(256)).await.unwrap()).await,
        (400, ErrorCode::NameTooLong)
    );
    let body = serde_json::json!({
        "name": "l", "kind": "symlink", "mode": 511, "symlink_target": "t".repeat(4097)
    });
    let r = h
        .http
        .post(h.dir(&routes::children(NodeId::ROOT)))
        .bearer_auth(&h.token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (400, ErrorCode::NameTooLong));
    // A FIFO made by an old client's body (no rdev) is a plain node.
    let body = serde_json::json!({ "name": "p", "kind": "fifo", "mode": 420 });
    let r = h
        .http
        .post(h.dir(&routes::children(NodeId::ROOT)))
        .bearer_auth(&h.token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let p: NodeMeta = r.json().await.unwrap();
    assert_eq!((p.kind, p.nlink, p.rdev), (FileKind::Fifo, 1, 0));
}

async fn login_as(h: &Harness, path: &str, user: &str) -> reqwest::Response {
    let pk = public_key(&h.http, &h.cluster).await;
    let env = dfs_server::auth::seal(&pk, user, "password123").unwrap();
    post_envelope(&h.http, &h.cluster, path, &env).await
}

async fn login_with(
    h: &Harness,
    http: &reqwest::Client,
    user: &str,
    password: &str,
) -> reqwest::Response {
    let pk = public_key(&h.http, &h.cluster).await;
    let env = dfs_server::auth::seal(&pk, user, password).unwrap();
    post_envelope(http, &h.cluster, routes::AUTH_LOGIN, &env).await
}

#[tokio::test]
async fn failed_logins_are_limited_per_user_and_address_and_never_lock_the_owner_out() {
    use dfs_server::auth::limit::Rate;
    let slow = Duration::from_secs(600);
    let h = Harness::new(|c| {
        c.auth.per_user = Rate {
            burst: 3,
            every: slow,
        };
    })
    .await;
    // An attacker on another loopback address guesses alice's password.
    let attacker = dfs_server::tls::ClientTls::system()
        .builder()
        .unwrap()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(
            login_with(&h, &attacker, "alice", "not-her-password")
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(&statuses[..3], &[401, 401, 401], "{statuses:?}");
    assert!(statuses[3..].iter().all(|s| *s == 429), "{statuses:?}");
    let r = login_with(&h, &attacker, "alice", "not-her-password").await;
    let body: common::ErrorBody = r.json().await.unwrap();
    assert_eq!(body.code, ErrorCode::RateLimited);
    assert!(
        body.message.contains(
            "too many login or signup attempts for user alice from address 127.0.0.2; try again in"
        ),
        "{}",
        body.message
    );
    // Alice, from her own address, logs in as often as she likes: successes spend nothing.
    for _ in 0..5 {
        let r = login_as(&h, routes::AUTH_LOGIN, "alice").await;
        assert!(r.status().is_success(), "{}", r.status());
    }
    // Her own typos count against her address only, and a success clears them.
    for _ in 0..2 {
        let r = login_with(&h, &h.http, "alice", "typo-typo").await;
        assert_eq!(r.status().as_u16(), 401);
    }
    assert!(
        login_as(&h, routes::AUTH_LOGIN, "alice")
            .await
            .status()
            .is_success()
    );
    for _ in 0..3 {
        let r = login_with(&h, &h.http, "alice", "typo-typo").await;
        assert_eq!(r.status().as_u16(), 401, "failures were forgotten");
    }
    assert_eq!(
        login_as(&h, routes::AUTH_LOGIN, "alice")
            .await
            .status()
            .as_u16(),
        429,
        "three failures in a row from one address spend its attempts"
    );
}

#[tokio::test]
async fn logins_past_the_rate_per_address_get_429_with_a_clear_message() {
    use dfs_server::auth::limit::Rate;
    let slow = Duration::from_secs(600);
    let h = Harness::new(|c| {
        c.auth.per_addr = Rate {
            burst: 6,
            every: slow,
        };
    })
    .await;
    // The harness's signup and login used two of the address's six.
    for path in [routes::AUTH_LOGIN, routes::AUTH_SIGNUP, routes::AUTH_LOGIN] {
        assert!(
            login_as(
                &h,
                path,
                if path == routes::AUTH_LOGIN {
                    "alice"
                } else {
                    "bob"
                }
            )
            .await
            .status()
            .is_success()
        );
    }
    assert!(
        login_as(&h, routes::AUTH_LOGIN, "bob")
            .await
            .status()
            .is_success()
    );
    let r = login_as(&h, routes::AUTH_LOGIN, "bob").await;
    assert_eq!(r.status().as_u16(), 429);
    let body: common::ErrorBody = r.json().await.unwrap();
    assert_eq!(body.code, ErrorCode::RateLimited);
    assert!(
        body.message
            .contains("too many login or signup attempts for address 127.0.0.1; try again in"),
        "{}",
        body.message
    );
}

#[tokio::test]
async fn regression_a_user_cannot_link_a_file_out_of_a_directory_they_cannot_search() {
    let h = Harness::new(|_| {}).await;
    let private = h.create(NodeId::ROOT, "private", FileKind::Dir).await;
    let r = h
        .http
        .patch(h.dir(&routes::node(private.id)))
        .bearer_auth(&h.token)
        .json(&serde_json::json!({ "mode": 0o700 }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let secret = h.create(private.id, "secret", FileKind::File).await;
    let bob = signup_login(&h.http, &h.cluster, "bob").await.token;
    let link = |body: serde_json::Value| {
        h.http
            .post(h.dir(routes::LINK))
            .bearer_auth(&bob)
            .json(&body)
            .send()
    };
    // Through alice's 0700 directory: EACCES, as link(2) gives.
    let r = link(serde_json::json!({
        "node": secret.id, "parent": private.id, "name": "secret",
        "new_parent": NodeId::ROOT, "new_name": "stolen"
    }))
    .await
    .unwrap();
    assert_eq!(error_code(r).await, (403, ErrorCode::AccessDenied));
    // By the node id alone (the old body): refused, nothing linked.
    let r = link(serde_json::json!({
        "node": secret.id, "new_parent": NodeId::ROOT, "new_name": "stolen"
    }))
    .await
    .unwrap();
    assert_eq!(error_code(r).await, (400, ErrorCode::BadRequest));
    let r = h
        .http
        .get(h.dir(&routes::child(NodeId::ROOT, "stolen")))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (404, ErrorCode::NotFound));
    let meta: NodeMeta = h.get_json(&routes::node(secret.id)).await;
    assert_eq!(meta.nlink, 1);
    h.cluster.shutdown().await;
}

#[tokio::test]
async fn every_service_names_its_protocol_and_refuses_a_newer_one() {
    let h = Harness::new(|_| {}).await;
    let c = &h.cluster;
    let mut services = vec![
        c.directory_url.clone(),
        c.lock_url.clone(),
        c.auth_url.clone(),
    ];
    services.extend(c.file_urls.iter().cloned());
    for base in &services {
        // This build's own requests (the header is set by every dfs client) are served, and
        // the answer names the service's protocol.
        let r = h
            .http
            .get(format!("{base}{}", routes::HEALTH))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{base}");
        assert_eq!(
            r.headers()[routes::PROTOCOL_HEADER].to_str().unwrap(),
            routes::PROTOCOL_VERSION.to_string()
        );
        // A client of a newer protocol is told so, with both versions, and nothing is done.
        for theirs in [
            (routes::PROTOCOL_VERSION + 1).to_string(),
            "not-a-number".to_owned(),
        ] {
            let r = h
                .http
                .get(format!("{base}{}", routes::CLUSTER))
                .header(routes::PROTOCOL_HEADER, &theirs)
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.headers()[routes::PROTOCOL_HEADER].to_str().unwrap(),
                routes::PROTOCOL_VERSION.to_string(),
                "an error names the protocol too"
            );
            let body: common::ErrorBody = r.json().await.unwrap();
            assert_eq!(body.code, ErrorCode::ProtocolMismatch, "{base}: {body:?}");
            assert!(
                body.message
                    .contains(&format!("speaks dfs protocol {}", routes::PROTOCOL_VERSION)),
                "{body:?}"
            );
        }
    }
    // A request without the header (a client from before it) is taken as version 1.
    let addr = h
        .cluster
        .directory_url
        .trim_start_matches("http://")
        .to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(
        format!(
            "GET {} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n",
            routes::CLUSTER
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains(&format!(
            "{}: {}",
            routes::PROTOCOL_HEADER,
            routes::PROTOCOL_VERSION
        )),
        "{answer}"
    );
}

#[tokio::test]
async fn a_service_fails_over_to_the_directory_url_that_answers_and_stays_there() {
    let h = Harness::new(|_| {}).await;
    let dead = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let live = h.cluster.directory_url.clone();
    let dirs = dfs_server::peer::Directories::parse(&format!("{dead}, {live}/")).unwrap();
    let peer = dfs_server::peer::Peer::new(&h.cluster.cluster_key).unwrap();
    let peer = &peer;
    let map = dirs
        .call(|d| async move { peer.cluster(&d).await })
        .await
        .unwrap();
    assert!(!map.cluster_id.is_empty());
    assert_eq!(dirs.current(), live, "stays on the URL that answered");
    // A definite answer is not failed over: it is the answer.
    let missing = dirs
        .call(|d| async move { peer.node(&d, NodeId(999_999)).await })
        .await;
    assert!(
        matches!(missing, Err(dfs_server::error::ServiceError::NotFound(_))),
        "{missing:?}"
    );
    // With no directory answering, a bounded ride-out gives up after its bound.
    let none = dfs_server::peer::Directories::parse(&dead).unwrap();
    let t = std::time::Instant::now();
    let r = none
        .call_within(Duration::from_millis(600), |d| async move {
            peer.cluster(&d).await
        })
        .await;
    assert!(
        matches!(r, Err(dfs_server::error::ServiceError::Unavailable(_))),
        "{r:?}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(550),
        "{:?}",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[tokio::test]
async fn a_listing_is_paged_by_a_name_cursor_and_bounded_by_the_server() {
    let h = Harness::new(|_| {}).await;
    let d = h.create(NodeId::ROOT, "big", FileKind::Dir).await;
    let mut want = Vec::new();
    for i in 0..7 {
        let name = format!("e{i}");
        h.create(d.id, &name, FileKind::File).await;
        want.push(name);
    }
    want.sort();
    let page = |after: Option<String>, limit: &str| {
        let mut url = format!("{}?limit={limit}", h.dir(&routes::children(d.id)));
        if let Some(a) = after {
            url.push_str(&format!("&after={a}"));
        }
        h.http.get(url).bearer_auth(&h.token).send()
    };
    // Pages of 3: 3 + 3 + 1, each cursor the last name of its page, the last without one.
    let mut got = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let r = page(after.clone(), "3").await.unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        let p: common::api::ListPage = r.json().await.unwrap();
        pages += 1;
        assert!(p.entries.len() <= 3);
        got.extend(p.entries.iter().map(|e| e.name.clone()));
        match p.next {
            Some(n) => {
                assert_eq!(Some(&n), p.entries.last().map(|e| &e.name));
                after = Some(n);
            }
            None => break,
        }
        assert!(pages < 10, "the cursor moves on");
    }
    assert_eq!((got, pages), (want.clone(), 3));
    // A name made behind the cursor is not seen, one ahead is; none twice.
    let first: common::api::ListPage = page(None, "2").await.unwrap().json().await.unwrap();
    let cursor = first.next.clone().unwrap();
    h.create(d.id, "a-behind", FileKind::File).await;
    h.create(d.id, "z-ahead", FileKind::File).await;
    let rest: common::api::ListPage = page(Some(cursor), "1000")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rest: Vec<String> = rest.entries.into_iter().map(|e| e.name).collect();
    assert!(!rest.contains(&"a-behind".to_owned()));
    assert_eq!(rest.last().map(String::as_str), Some("z-ahead"));
    assert!(first.entries.iter().all(|e| !rest.contains(&e.name)));
    // The server bounds what it is asked for: past its most is capped, 0 and bad cursors
    // are refused.
    let capped: common::api::ListPage = page(None, "100000").await.unwrap().json().await.unwrap();
    assert_eq!(capped.entries.len(), 9);
    assert_eq!(page(None, "0").await.unwrap().status(), 400);
    assert_eq!(page(Some("a%2Fb".into()), "1").await.unwrap().status(), 400);
    h.cluster.shutdown().await;
}

async fn poll_changes(
    h: &Harness,
    token: &str,
    epoch: Option<u64>,
    after: u64,
    wait_ms: u64,
) -> (String, common::api::ChangesResponse) {
    let mut url = format!("{}?after={after}&wait_ms={wait_ms}", h.dir(routes::CHANGES));
    if let Some(e) = epoch {
        url.push_str(&format!("&epoch={e}"));
    }
    let r = h.http.get(url).bearer_auth(token).send().await.unwrap();
    assert!(r.status().is_success(), "changes: {}", r.status());
    let body = r.text().await.unwrap();
    let parsed = serde_json::from_str(&body).unwrap();
    (body, parsed)
}

#[tokio::test]
async fn the_change_feed_names_node_ids_only_never_a_name_in_a_directory_one_cannot_read() {
    use common::api::ChangeKind;
    let h = Harness::new(|_| {}).await;
    let bob = signup_login(&h.http, &h.cluster, "bob").await.token;
    // Bob subscribes: the first poll is a resync that says where the feed is.
    let (_, first) = poll_changes(&h, &bob, None, 0, 0).await;
    assert!(first.resync);
    let (epoch, start) = (first.epoch, first.next);

    let private = h.create(NodeId::ROOT, "private", FileKind::Dir).await;
    let r = h
        .http
        .patch(h.dir(&routes::node(private.id)))
        .bearer_auth(&h.token)
        .json(&serde_json::json!({ "mode": 0o700 }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let secret = h
        .create(private.id, "salary-of-carol.xlsx", FileKind::File)
        .await;
    let r = h.write(&secret, b"a lot", 1, 1).await;
    assert!(r.status().is_success(), "write: {}", r.status());
    let rename = RenameRequest {
        parent: private.id,
        name: ValidName::parse("salary-of-carol.xlsx").unwrap(),
        new_parent: private.id,
        new_name: ValidName::parse("layoffs-2027.txt").unwrap(),
        no_replace: false,
    };
    let r = h
        .http
        .post(h.dir(routes::RENAME))
        .bearer_auth(&h.token)
        .json(&rename)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    // Bob may not list the directory ...
    let r = h
        .http
        .get(h.dir(&routes::children(private.id)))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (403, ErrorCode::AccessDenied));
    // ... and the feed tells him no name and no metadata of it, only that ids changed.
    let (body, got) = poll_changes(&h, &bob, Some(epoch), start, 0).await;
    assert!(!got.resync);
    for secret_word in [
        "salary", "carol", "layoffs", "xlsx", "private", "mode", "size",
    ] {
        assert!(!body.contains(secret_word), "{secret_word} leaked: {body}");
    }
    let what: Vec<ChangeKind> = got.changes.iter().map(|c| c.what).collect();
    for expected in [
        ChangeKind::Entry {
            dir: NodeId::ROOT,
            node: private.id,
        },
        ChangeKind::Node { node: private.id },
        ChangeKind::Entry {
            dir: private.id,
            node: secret.id,
        },
        ChangeKind::Node { node: secret.id },
    ] {
        assert!(
            what.contains(&expected),
            "{expected:?} missing from {what:?}"
        );
    }
    assert!(got.changes.windows(2).all(|w| w[0].seq <= w[1].seq));
    assert!(got.next > start);

    // A poll with nothing new waits, and a change wakes it at once.
    let t0 = std::time::Instant::now();
    let poll = poll_changes(&h, &bob, Some(epoch), got.next, 20_000);
    let remove = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = h
            .http
            .delete(h.dir(&routes::child(private.id, "layoffs-2027.txt")))
            .bearer_auth(&h.token)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    };
    let ((_, woken), ()) = tokio::join!(poll, remove);
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "woken by the change"
    );
    let what: Vec<ChangeKind> = woken.changes.iter().map(|c| c.what).collect();
    assert!(
        what.contains(&ChangeKind::Gone { node: secret.id }),
        "{what:?}"
    );

    // Another epoch (a restarted directory) or a wait beyond the bound.
    let (_, other) = poll_changes(&h, &bob, Some(epoch ^ 1), woken.next, 0).await;
    assert!(other.resync);
    let r = h
        .http
        .get(format!("{}?after=0&wait_ms=30001", h.dir(routes::CHANGES)))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (400, ErrorCode::BadRequest));
    let r = h.http.get(h.dir(routes::CHANGES)).send().await.unwrap();
    assert_eq!(error_code(r).await, (401, ErrorCode::Unauthorized));
    // A client is not told its own changes (it named itself in x-dfs-origin), but another is.
    let me = "0123456789abcdef0123456789abcdef";
    let r = h
        .http
        .post(h.dir(&routes::children(NodeId::ROOT)))
        .bearer_auth(&bob)
        .header(routes::ORIGIN_HEADER, me)
        .json(&serde_json::json!({ "name": "bobs", "kind": "file", "mode": 420 }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let bobs: NodeMeta = r.json().await.unwrap();
    let own = h
        .http
        .get(format!(
            "{}?epoch={epoch}&after={}&wait_ms=0",
            h.dir(routes::CHANGES),
            woken.next
        ))
        .bearer_auth(&bob)
        .header(routes::ORIGIN_HEADER, me)
        .send()
        .await
        .unwrap();
    let own: common::api::ChangesResponse = own.json().await.unwrap();
    assert!(own.changes.is_empty() && own.next > woken.next, "{own:?}");
    let (_, other) = poll_changes(&h, &h.token, Some(epoch), woken.next, 0).await;
    assert!(
        other.changes.iter().any(|c| c.what
            == ChangeKind::Entry {
                dir: NodeId::ROOT,
                node: bobs.id
            }),
        "{other:?}"
    );
    let r = h
        .http
        .get(h.dir(routes::CHANGES))
        .bearer_auth(&bob)
        .header(routes::ORIGIN_HEADER, "not-hex")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (400, ErrorCode::BadRequest));
    h.cluster.shutdown().await;
}

/// A create or remove sent again with the same `x-dfs-request-id` (its answer was lost) is
/// answered as the first one was, not EEXIST or ENOENT; a malformed id is refused as a bad
/// request, naming the header.
#[tokio::test]
async fn a_request_id_makes_a_retried_namespace_change_answer_once() {
    let h = Harness::new(|_| {}).await;
    let create = |id: &str| {
        let body = serde_json::json!({"name": "f", "kind": "file", "mode": 420});
        h.http
            .post(h.dir(&routes::children(NodeId::ROOT)))
            .bearer_auth(&h.token)
            .header(routes::REQUEST_ID, id)
            .json(&body)
            .send()
    };
    let first = create("create-f-1").await.unwrap();
    assert!(first.status().is_success(), "{}", first.status());
    let first: NodeMeta = first.json().await.unwrap();
    let again = create("create-f-1").await.unwrap();
    assert!(again.status().is_success(), "{}", again.status());
    assert_eq!(again.json::<NodeMeta>().await.unwrap().id, first.id);
    assert_eq!(
        error_code(create("create-f-2").await.unwrap()).await,
        (409, ErrorCode::Exists)
    );
    let bad = create("not an id!").await.unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let body: common::ErrorBody = bad.json().await.unwrap();
    assert!(
        body.message.contains(routes::REQUEST_ID),
        "{}",
        body.message
    );
    let remove = || {
        h.http
            .delete(h.dir(&format!("{}/f", routes::children(NodeId::ROOT))))
            .bearer_auth(&h.token)
            .header(routes::REQUEST_ID, "rm-f")
            .send()
    };
    for _ in 0..2 {
        let r = remove().await.unwrap();
        assert!(r.status().is_success(), "a retried unlink: {}", r.status());
        assert_eq!(r.json::<NodeMeta>().await.unwrap().nlink, 0);
    }
}

/// `all` with `--meta etcd://...`: the namespace lives in etcd, and a cluster started again
/// on the same prefix (its data directory gone: nothing of the namespace is local) finds it.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_on_etcd_keeps_its_namespace_there() {
    let etcd = dfs_server::testing::shared_etcd().unwrap_or_else(|e| panic!("{e}"));
    let meta = dfs_server::meta::MetaConfig::parse(
        &etcd.meta_url(&format!("api/{:08x}", rand::random::<u32>())),
    )
    .unwrap();
    let m = meta.clone();
    let h = Harness::new(move |c| c.meta = m).await;
    let d = h.create(NodeId::ROOT, "d", FileKind::Dir).await;
    let f = h.create(d.id, "f", FileKind::File).await;
    let r = h
        .http
        .post(h.dir(routes::RENAME))
        .bearer_auth(&h.token)
        .json(&RenameRequest {
            parent: d.id,
            name: ValidName::parse("f").unwrap(),
            new_parent: NodeId::ROOT,
            new_name: ValidName::parse("g").unwrap(),
            no_replace: false,
        })
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "rename: {}", r.status());
    let cluster_id = h.cluster_info().await.cluster_id;
    let Harness { cluster, _dir, .. } = h;
    cluster.shutdown().await;
    drop(_dir);
    let h = Harness::new(move |c| c.meta = meta).await;
    assert_eq!(h.cluster_info().await.cluster_id, cluster_id);
    let g: NodeMeta = h
        .get_json(&format!("{}/g", routes::children(NodeId::ROOT)))
        .await;
    assert_eq!(g.id, f.id);
    let page: common::api::ListPage = h.get_json(&routes::children(d.id)).await;
    assert!(page.entries.is_empty() && page.next.is_none());
}
