//! The auth service's RSA key pair: made on first start, persisted as PKCS#8 PEM with mode 0600.

use std::path::Path;

use base64::Engine;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::sha2::{Digest, Sha256};
use rsa::{PrivateKey, PublicKey};

use crate::error::{ServiceError, ServiceResult};
use crate::store::create_durable_new;

/// RSA modulus size. 2048 bits leaves 190 bytes of OAEP-SHA256 plaintext, enough for the
/// credential envelope (user ≤ 32 bytes, password ≤ 64 bytes, nonce, timestamp).
pub const KEY_BITS: usize = 2048;

/// The fingerprint of the key pair in a PKCS#8 PEM private key (what an administrator can
/// compute from the key file).
pub fn fingerprint_of_pem(pem: &str) -> ServiceResult<String> {
    let key = PrivateKey::from_pkcs8_pem(pem)
        .map_err(|e| ServiceError::BadRequest(format!("not a PKCS#8 PEM RSA key: {e}")))?;
    fingerprint(&key.to_public_key())
}

/// Makes the key file at `path` readable by its owner only, if it was not.
fn keep_private(path: &Path) -> ServiceResult<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the auth key was readable by others; made 0600");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// The fingerprint clients pin: `SHA256:` and the SHA-256 of the public key's DER
/// (SubjectPublicKeyInfo) in base64 without padding, as `ssh-keygen -l` writes its own.
pub fn fingerprint(public: &PublicKey) -> ServiceResult<String> {
    let der = public
        .to_public_key_der()
        .map_err(|e| ServiceError::internal("encoding public key", e))?;
    Ok(format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(der.as_bytes()))
    ))
}

/// Loads `path`, or generates a key pair and stores it there durably (a new file, 0600,
/// fsynced, linked into place: never replacing one another process made).
pub fn load_or_create(path: &Path) -> ServiceResult<PrivateKey> {
    match std::fs::read_to_string(path) {
        Ok(pem) => {
            keep_private(path)?;
            PrivateKey::from_pkcs8_pem(&pem)
                .map_err(|e| ServiceError::internal(&format!("reading key {}", path.display()), e))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(path = %path.display(), "generating the auth RSA key pair");
            let key = PrivateKey::new(&mut rand::rng(), KEY_BITS)
                .map_err(|e| ServiceError::internal("generating RSA key", e))?;
            let pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| ServiceError::internal("encoding RSA key", e))?;
            if create_durable_new(path, pem.as_bytes(), 0o600)? {
                Ok(key)
            } else {
                load_or_create(path)
            }
        }
        Err(e) => Err(ServiceError::internal(
            &format!("reading key {}", path.display()),
            e,
        )),
    }
}
