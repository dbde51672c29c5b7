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
///
/// The system's roots are read the first time a server certificate must be checked against
/// them (once per process), never when a client is built: plain-HTTP clusters run on machines
/// with no CA certificates at all, and an https URL then fails with a message saying so.
#[derive(Clone, Default)]
pub struct ClientTls {
    ca: Option<(PathBuf, Arc<rustls::RootCertStore>)>,
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

    /// Trusts only the certificates in the PEM file `path` (a private cluster's CA). Every
    /// certificate in it must parse and be accepted as a trust anchor, and there must be one.
    pub fn from_ca_file(path: &Path) -> anyhow::Result<Self> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading the CA file {}", path.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing the CA file {}", path.display()))?;
        if certs.is_empty() {
            anyhow::bail!("the CA file {} holds no PEM certificate", path.display());
        }
        let mut store = rustls::RootCertStore::empty();
        for (i, cert) in certs.into_iter().enumerate() {
            store.add(cert).with_context(|| {
                format!(
                    "the CA file {}: certificate {} is not a valid CA certificate",
                    path.display(),
                    i + 1
                )
            })?;
        }
        Ok(ClientTls {
            ca: Some((path.to_path_buf(), Arc::new(store))),
        })
    }

    /// `--ca-file` if given, else the system's roots.
    pub fn from_flag(ca_file: Option<&Path>) -> anyhow::Result<Self> {
        ca_file.map_or_else(|| Ok(ClientTls::system()), ClientTls::from_ca_file)
    }

    /// The rustls configuration clients get: these roots (the system's read lazily), HTTP/1.1.
    fn config(&self) -> anyhow::Result<rustls::ClientConfig> {
        install_provider();
        let provider = Arc::new(provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let mut config = match &self.ca {
            Some((_, store)) => builder
                .with_root_certificates(store.clone())
                .with_no_client_auth(),
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SystemRoots { provider }))
                .with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// A client builder that speaks http and, with these roots, https. Every HTTP client of
    /// dfs starts here; building it reads no CA certificates.
    pub fn builder(&self) -> anyhow::Result<reqwest::ClientBuilder> {
        // Every request of every dfs client names the protocol it speaks.
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            common::routes::PROTOCOL_HEADER,
            reqwest::header::HeaderValue::from(common::routes::PROTOCOL_VERSION),
        );
        Ok(reqwest::Client::builder()
            .tls_backend_preconfigured(self.config()?)
            .default_headers(headers))
    }

    /// A client with these roots and no other settings (tests, one-off calls).
    pub fn client(&self) -> anyhow::Result<reqwest::Client> {
        self.builder()?.build().context("building the HTTP client")
    }
}

/// A plain client (system roots, read on first https use): what tests and tools use.
pub fn client() -> anyhow::Result<reqwest::Client> {
    ClientTls::system().client()
}

/// The system's roots, read once per process on first need; an error when there are none.
fn system_roots() -> Result<Arc<rustls::RootCertStore>, rustls::Error> {
    static ROOTS: std::sync::OnceLock<Result<Arc<rustls::RootCertStore>, String>> =
        std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut store = rustls::RootCertStore::empty();
            let (_, ignored) = store.add_parsable_certificates(found.certs);
            if ignored > 0 {
                tracing::warn!(ignored, "system CA certificates ignored as unparsable");
            }
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system's CA certificates");
            }
            if store.is_empty() {
                return Err(NO_SYSTEM_ROOTS.to_owned());
            }
            Ok(Arc::new(store))
        })
        .clone()
        .map_err(rustls::Error::General)
}

/// What an https URL without `--ca-file` answers on a machine without CA certificates.
pub const NO_SYSTEM_ROOTS: &str = "no CA certificates could be loaded from the system \
     (SSL_CERT_FILE, SSL_CERT_DIR, /etc/ssl): pass the cluster's CA certificate with --ca-file PEM";

/// Checks server certificates against the system's roots, read on first use.
#[derive(Debug)]
struct SystemRoots {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for SystemRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let roots = system_roots()?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots,
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(format!("system CA certificates: {e}")))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
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

    #[test]
    fn a_truncated_or_damaged_ca_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = self_signed(dir.path(), "a");
        let pem = std::fs::read_to_string(&cert).unwrap();
        let lines: Vec<&str> = pem.lines().collect();
        assert!(lines.len() > 4, "{pem}");
        // Cut off halfway: the END line lost.
        let half = dir.path().join("half.pem");
        std::fs::write(&half, lines[..lines.len() / 2].join("\n")).unwrap();
        let e = error_of(ClientTls::from_ca_file(&half));
        assert!(e.contains("half.pem"), "{e}");
        // Base64 lines lost from the middle, the PEM wrapping intact: the DER is damaged.
        let damaged = dir.path().join("damaged.pem");
        let mut kept = vec![lines[0]];
        kept.extend(&lines[3..]);
        std::fs::write(&damaged, kept.join("\n")).unwrap();
        let e = error_of(ClientTls::from_ca_file(&damaged));
        assert!(
            e.contains("damaged.pem") && e.contains("not a valid CA certificate"),
            "{e}"
        );
        // One good certificate does not excuse a bad one after it.
        let mixed = dir.path().join("mixed.pem");
        std::fs::write(&mixed, format!("{pem}{}\n", kept.join("\n"))).unwrap();
        let e = error_of(ClientTls::from_ca_file(&mixed));
        assert!(
            e.contains("mixed.pem") && e.contains("certificate 2"),
            "{e}"
        );
    }
}
