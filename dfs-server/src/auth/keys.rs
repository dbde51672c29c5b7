//! The auth service's RSA key pair: made on first start, persisted as PKCS#8 PEM with mode 0600.

use std::path::Path;

use base64::Engine;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::sha2::{Digest, Sha256};
use rsa::{PrivateKey, PublicKey};

use crate::error::{ServiceError, ServiceResult};
use crate::store::write_durable;

/// RSA modulus size. 2048 bits leaves 190 bytes of OAEP-SHA256 plaintext, enough for the
/// credential envelope (user ≤ 32 bytes, password ≤ 64 bytes, nonce, timestamp).
pub const KEY_BITS: usize = 2048;

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

/// Loads `path`, or generates a key pair and stores it there durably.
pub fn load_or_create(path: &Path) -> ServiceResult<PrivateKey> {
    match std::fs::read_to_string(path) {
        Ok(pem) => PrivateKey::from_pkcs8_pem(&pem)
            .map_err(|e| ServiceError::internal(&format!("reading key {}", path.display()), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(path = %path.display(), "generating the auth RSA key pair");
            let key = PrivateKey::new(&mut rand::rng(), KEY_BITS)
                .map_err(|e| ServiceError::internal("generating RSA key", e))?;
            let pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| ServiceError::internal("encoding RSA key", e))?;
            write_durable(path, pem.as_bytes(), 0o600)?;
            Ok(key)
        }
        Err(e) => Err(ServiceError::internal(
            &format!("reading key {}", path.display()),
            e,
        )),
    }
}
