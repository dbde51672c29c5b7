//! TLS: the one place that builds the services' server configuration (`--tls-cert`,
//! `--tls-key`) and the HTTP clients that services and the `dfs` command call with
//! (`--ca-file`, else the system's roots), and that turns TLS failures into messages saying
//! what to pass. rustls with the ring provider, installed once per process.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The crypto provider: ring. rustls 0.23.48 deprecates it in favour of aws-lc-rs, whose
/// post-quantum key exchange it lacks; aws-lc-rs is a large C build (minutes on the project's
/// 2-core machines, and cmake on some targets), so dfs stays on ring with classical X25519
/// until that trade changes.
#[allow(deprecated)]
fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Installs ring as the process's rustls provider (once; later calls do nothing). Every
/// client builder calls it, so reqwest (built without a provider of its own) never lacks one.
pub fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err: a provider is already installed (by an embedding program): keep it.
        let _ = provider().install_default();
    });
}

/// A service's certificate and key, loaded once at start.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// Loads the certificate chain (PEM, leaf first) and private key (PEM: PKCS#8, PKCS#1 or
    /// SEC1) a service presents.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        install_provider();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("reading the TLS certificate {}", cert.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing the TLS certificate {}", cert.display()))?;
        if chain.is_empty() {
            anyhow::bail!(
                "the TLS certificate file {} holds no PEM certificate",
                cert.display()
            );
        }
        let private = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading the TLS private key {}", key.display()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .with_context(|| {
                format!(
                    "the TLS key {} does not fit the certificate {}",
                    key.display(),
                    cert.display()
                )
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
        })
    }

    /// Loads `cert` and `key` when both are given; neither: plain HTTP.
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> anyhow::Result<Option<ServerTls>> {
        match (cert, key) {
            (Some(c), Some(k)) => Ok(Some(ServerTls::load(c, k)?)),
            (None, None) => Ok(None),
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        }
    }

    /// The acceptor for incoming connections.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}

/// Which certificate authorities an HTTP client trusts: the system's (the default) or only
/// those of a `--ca-file`.
#[derive(Clone, Default)]
pub struct ClientTls {
    ca: Option<(PathBuf, Arc<Vec<reqwest::Certificate>>)>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.ca {
            Some((p, _)) => write!(f, "ClientTls(ca {})", p.display()),
            None => f.write_str("ClientTls(system roots)"),
        }
    }
}

impl ClientTls {
    /// Trusts the operating system's roots (read on first use of an https URL).
    pub fn system() -> Self {
        ClientTls::default()
    }

    /// Trusts only the certificates in the PEM file `path` (a private cluster's CA).
    pub fn from_ca_file(path: &Path) -> anyhow::Result<Self> {
        let pem = std::fs::read(path)
            .with_context(|| format!("reading the CA file {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("parsing the CA file {}", path.display()))?;
        if certs.is_empty() {
            anyhow::bail!("the CA file {} holds no PEM certificate", path.display());
        }
        Ok(ClientTls {
            ca: Some((path.to_path_buf(), Arc::new(certs))),
        })
    }

    /// `--ca-file` if given, else the system's roots.
    pub fn from_flag(ca_file: Option<&Path>) -> anyhow::Result<Self> {
        ca_file.map_or_else(|| Ok(ClientTls::system()), ClientTls::from_ca_file)
    }

    /// A client builder that speaks http and, with these roots, https. Every HTTP client of
    /// dfs starts here.
    pub fn builder(&self) -> reqwest::ClientBuilder {
        install_provider();
        let b = reqwest::Client::builder();
        match &self.ca {
            Some((_, certs)) => b.tls_certs_only(certs.iter().cloned()),
            None => b,
        }
    }

    /// A client with these roots and no other settings (tests, one-off calls).
    pub fn client(&self) -> reqwest::Client {
        self.builder().build().unwrap_or_else(|e| {
            tracing::error!(error = %e, "building an HTTP client; using a default one");
            reqwest::Client::new()
        })
    }
}

/// A plain client (system roots), with the provider installed: what tests and tools use.
pub fn client() -> reqwest::Client {
    ClientTls::system().client()
}

/// What a failed request says, with the causes reqwest keeps to itself, plus what to do when
/// the cause is TLS: an unknown CA, a certificate for another name, or a plain HTTP server
/// reached with https.
pub fn describe(e: &reqwest::Error) -> String {
    let mut causes = Vec::new();
    let mut tls: Option<String> = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !causes.iter().any(|c: &String| c.contains(&s)) {
            causes.push(s);
        }
        let mut inner = err.source();
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(r) = io.get_ref()
        {
            // io::Error's source() skips the error it wraps: look at it.
            if let Some(t) = r.downcast_ref::<rustls::Error>() {
                tls = tls.or_else(|| hint(t));
            }
            inner = Some(r);
        }
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            tls = tls.or_else(|| hint(t));
        }
        cur = inner;
    }
    let url = e.url().map(|u| u.to_string()).unwrap_or_default();
    let mut out = causes.join(": ");
    if let Some(h) = tls {
        out.push_str(&format!(" ({h}; URL {url})"));
    }
    out
}

fn hint(e: &rustls::Error) -> Option<String> {
    use rustls::{CertificateError, Error};
    Some(match e {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the server's certificate is not signed by a CA this client trusts: pass the cluster's \
             CA certificate with --ca-file PEM"
                .into()
        }
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "the server's certificate does not name the host in the URL".into(),
        Error::InvalidCertificate(_) => "the server's certificate was refused: if the cluster \
             uses a CA of its own, pass its certificate with --ca-file PEM"
            .into(),
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => {
            "the server did not answer in TLS: if it serves plain HTTP, use an http:// URL".into()
        }
        _ => return None,
    })
}

/// The first bytes of a TLS connection: a handshake record. Anything else on a TLS port is
/// (most likely) a plain HTTP request, answered with this.
pub const PLAIN_HTTP_ON_TLS: &str = "this dfs service speaks TLS only: use an https:// URL \
     (with --ca-file PEM if its certificate is not signed by a system root)";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A self-signed certificate for 127.0.0.1 and its key, as PEM files in `dir`.
    fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn error_of<T>(r: anyhow::Result<T>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn a_certificate_loads_and_bad_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "a");
        assert!(ServerTls::load(&cert, &key).is_ok());
        let missing = dir.path().join("missing.pem");
        assert!(error_of(ServerTls::load(&missing, &key)).contains("missing.pem"));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(error_of(ServerTls::load(&empty, &key)).contains("holds no PEM certificate"));
        // A key that belongs to another certificate.
        let (_, other_key) = self_signed(dir.path(), "b");
        let e = error_of(ServerTls::load(&cert, &other_key));
        assert!(e.contains("does not fit the certificate"), "{e}");
        assert!(
            error_of(ServerTls::from_flags(Some(&cert), None)).contains("go together"),
            "one without the other"
        );
        assert!(ServerTls::from_flags(None, None).unwrap().is_none());
    }

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "a");
        assert!(ClientTls::from_ca_file(&cert).is_ok());
        assert!(error_of(ClientTls::from_ca_file(&key)).contains("holds no PEM certificate"));
        let missing = dir.path().join("nope.pem");
        assert!(error_of(ClientTls::from_ca_file(&missing)).contains("nope.pem"));
    }
}
