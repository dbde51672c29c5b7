//! Architecture invariants (ARCHITECTURE.md), checked on the source: service logic knows nothing
//! of HTTP, and `common` does no I/O.

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
