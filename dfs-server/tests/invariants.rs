//! Architecture invariants (ARCHITECTURE.md), checked on the source: service logic knows nothing
//! of HTTP, `common` does no I/O, and every HTTP client starts from `tls::ClientTls`.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;

fn source(rel: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn service_logic_imports_no_http_types() {
    for rel in [
        "dfs-server/src/directory/mod.rs",
        "dfs-server/src/directory/registry.rs",
        "dfs-server/src/directory/placement.rs",
        "dfs-server/src/directory/repair.rs",
        "dfs-server/src/lock/mod.rs",
        "dfs-server/src/auth/mod.rs",
        "dfs-server/src/auth/token.rs",
        "dfs-server/src/auth/keys.rs",
        "dfs-server/src/auth/limit.rs",
        "dfs-server/src/file/mod.rs",
    ] {
        let src = source(rel);
        for banned in ["axum", "crate::http"] {
            assert!(!src.contains(banned), "{rel} mentions {banned}");
        }
    }
}

#[test]
fn common_does_no_io() {
    for rel in [
        "lib.rs",
        "api.rs",
        "error.rs",
        "ids.rs",
        "meta.rs",
        "name.rs",
        "routes.rs",
    ] {
        let src = source(&format!("common/src/{rel}"));
        for banned in ["std::fs", "std::net", "tokio", "reqwest", "axum"] {
            let code: String = src
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect();
            assert!(!code.contains(banned), "common/src/{rel} uses {banned}");
        }
    }
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_http_client_is_built_by_tls_client_tls() {
    // reqwest is built without a TLS provider of its own: a client made any other way than
    // through `ClientTls::builder` (which installs ring first) panics when nothing installed
    // one yet, and would not trust `--ca-file`.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in [
        "dfs-server/src",
        "dfs-server/tests",
        "dfs-fuse/src",
        "dfs-fuse/tests",
        "tests",
    ] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 20, "found the sources");
    for f in files {
        if f.ends_with("dfs-server/src/tls.rs") || f.ends_with("dfs-server/tests/invariants.rs") {
            continue;
        }
        let src = std::fs::read_to_string(&f).unwrap();
        for banned in [
            "reqwest::Client::new",
            "reqwest::Client::builder",
            "reqwest::ClientBuilder::new",
            "reqwest::get(",
        ] {
            assert!(
                !src.contains(banned),
                "{} uses {banned}: start from dfs_server::tls::ClientTls (or tls::client())",
                f.display()
            );
        }
    }
}
