//! Test certificates: a CA and a certificate for 127.0.0.1 and localhost signed by it, made
//! afresh by each test (rcgen, ring) and written as PEM files in a temp dir.

use std::path::PathBuf;

/// A CA, and a server certificate and key it signed, as PEM files.
pub struct TestCerts {
    _dir: tempfile::TempDir,
    /// The CA certificate (what clients pass as `--ca-file`).
    pub ca: PathBuf,
    /// The server's certificate (`--tls-cert`).
    pub cert: PathBuf,
    /// The server's private key (`--tls-key`).
    pub key: PathBuf,
}

impl TestCerts {
    /// A fresh CA and a loopback server certificate.
    pub fn new() -> TestCerts {
        TestCerts::for_names(&["127.0.0.1", "localhost"])
    }

    /// A fresh CA and a server certificate naming `names` (IP addresses or DNS names).
    pub fn for_names(names: &[&str]) -> TestCerts {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "dfs test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        let certs = TestCerts {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            _dir: dir,
        };
        std::fs::write(&certs.ca, ca.pem()).unwrap();
        std::fs::write(&certs.cert, leaf.pem()).unwrap();
        std::fs::write(&certs.key, leaf_key.serialize_pem()).unwrap();
        certs
    }

    /// `dfs-server` flags: serve with this certificate, trust this CA for calls to others.
    pub fn server_args(&self) -> Vec<String> {
        [
            ("--tls-cert", &self.cert),
            ("--tls-key", &self.key),
            ("--ca-file", &self.ca),
        ]
        .into_iter()
        .flat_map(|(f, p)| [f.to_owned(), p.display().to_string()])
        .collect()
    }

    /// An HTTP client that trusts the CA.
    pub fn client(&self) -> reqwest::Client {
        dfs_server::tls::ClientTls::from_ca_file(&self.ca)
            .unwrap()
            .client()
            .unwrap()
    }
}

impl Default for TestCerts {
    fn default() -> Self {
        TestCerts::new()
    }
}
