//! A 1 GiB upload moves with bounded memory in the server (bodies are streamed, never held).

use dfs_tests::*;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

const CHUNK: usize = 1 << 20;
const CHUNKS: usize = 1024;

fn chunk(i: usize) -> bytes::Bytes {
    let mut v = vec![0u8; CHUNK];
    for (j, b) in v.iter_mut().enumerate().step_by(4096) {
        *b = (i * 31 + j / 4096) as u8;
    }
    bytes::Bytes::from(v)
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn one_gib_upload_with_bounded_server_memory() {
    let cluster = Cluster::start(&[]);
    let c = Client::new(&cluster.url);
    c.signup_login("alice");
    let creds: serde_json::Value = serde_json::from_slice(
        &std::fs::read(c.config_dir().join("dfs/credentials.json")).unwrap(),
    )
    .unwrap();
    let token = dfs_tests::only_saved_login(&creds)["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut hasher = Sha256::new();
    for i in 0..CHUNKS {
        hasher.update(chunk(i));
    }
    let hash = common::ContentHash::from_digest(&hasher.finalize().into());
    let before = vm_hwm_kib(cluster.pid());
    // The test acts as the lock service: it signs its own fencing token with the cluster key.
    let key = std::fs::read_to_string(cluster.data.join("cluster.key"))
        .unwrap()
        .trim()
        .to_owned();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let meta: common::NodeMeta = rt.block_on(async {
        let http = dfs_server::tls::client().expect("an HTTP client");
        let create = serde_json::json!({ "name": "big.bin", "kind": "file", "mode": 420 });
        let meta: common::NodeMeta = http
            .post(format!(
                "{}{}",
                cluster.url,
                common::routes::children(common::NodeId::ROOT)
            ))
            .bearer_auth(&token)
            .json(&create)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let info: common::api::ClusterInfo = http
            .get(format!("{}{}", cluster.url, common::routes::CLUSTER))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let primary = info
            .servers
            .iter()
            .find(|s| Some(s.id) == meta.primary)
            .unwrap()
            .url
            .clone();
        let body = futures_util::stream::iter(0..CHUNKS).map(|i| Ok::<_, std::io::Error>(chunk(i)));
        let resp = http
            .put(format!("{primary}{}", common::routes::file_write(meta.id)))
            .bearer_auth(&token)
            .header(common::routes::FENCE_HEADER, "1")
            .header(
                common::routes::FENCE_SIG_HEADER,
                dfs_server::lock::sign_fence(&key, meta.id, common::FenceToken(1)),
            )
            .header(common::routes::HASH_HEADER, hash.as_str())
            .header(
                common::routes::UPLOAD_ID_HEADER,
                common::UploadId::from_bytes([3; 16]).as_str(),
            )
            .header(common::routes::BASE_HEADER, "0;waiting")
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "upload: {}", resp.status());
        resp.json().await.unwrap()
    });
    assert_eq!(meta.size, (CHUNK * CHUNKS) as u64);
    assert_eq!(meta.hash, hash);
    assert!(meta.holders.len() >= 2, "primary and a replica hold it");
    let after = vm_hwm_kib(cluster.pid());
    println!("server peak RSS: {before} KiB before, {after} KiB after a 1 GiB upload");
    assert!(
        after < 256 * 1024,
        "server peak RSS {after} KiB: the body was buffered"
    );
}
