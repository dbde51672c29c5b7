//! Bearer tokens: `base64url(claims JSON).base64url(RSA-PSS/SHA-256 signature)`, verified by
//! every service locally with the auth service's public key.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::api::Claims;
use rsa::PublicKey;
use rsa::sha2::Sha256;

use crate::error::{ServiceError, ServiceResult};

/// Verifies `payload.signature` (both base64url) with RSA-PSS/SHA-256 and checks expiry.
pub fn verify_token_with(key: &PublicKey, token: &str, now_ms: u64) -> ServiceResult<Claims> {
    let bad = || ServiceError::Unauthorized("malformed or forged token".into());
    let (payload, sig) = token.split_once('.').ok_or_else(bad)?;
    let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| bad())?;
    let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| bad())?;
    key.pss_verify::<Sha256>(&payload, &sig)
        .map_err(|_| bad())?;
    let claims: Claims = serde_json::from_slice(&payload).map_err(|_| bad())?;
    if claims.exp_ms <= now_ms {
        return Err(ServiceError::Unauthorized(
            "token expired; log in again".into(),
        ));
    }
    Ok(claims)
}
