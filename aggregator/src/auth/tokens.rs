//! RS256 signing keys and JWTs.
//!
//! Keys live in the database (`signing_keys`), so every replica signs with the same key and
//! verifies every replica's tokens. The newest unretired key signs; a rotation adds a key and
//! retires the others, which keep verifying (and stay in the JWKS at
//! `/.well-known/jwks.json`) until every token they signed has expired. Each token names its
//! key in the `kid` header. Only RS256 is accepted: `alg: none`, HS256 (for instance made with
//! the public key as the secret), unknown `kid`s and missing `kid`s are all refused.

use std::collections::HashMap;
use std::sync::RwLock;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::secrets::random_id;
use super::store::{AuthStore, SigningKeyRow};
use crate::store::StoreError;

/// Issuer (`iss`) of every token.
pub const ISSUER: &str = "its-aggregator";
/// Audience of access tokens.
pub const AUDIENCE_ACCESS: &str = "its-api";
/// Audience of the short-lived token between password and second factor.
pub const AUDIENCE_MFA: &str = "its-mfa";
/// Clock skew tolerated on `exp`/`iat`, seconds.
pub const LEEWAY_S: u64 = 5;

/// Why a token is refused (never shown in detail to the caller).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("unknown signing key {0:?}")]
    UnknownKey(String),
    #[error("token has no key id")]
    NoKeyId,
    #[error("algorithm {0:?} is not accepted")]
    Algorithm(String),
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("no signing key is loaded")]
    NoSigningKey,
    #[error("signing failed: {0}")]
    Sign(String),
}

struct Keys {
    signing: Option<(String, EncodingKey, i64)>,
    verifying: HashMap<String, DecodingKey>,
    jwks: serde_json::Value,
}

/// The keys in use. Cheap to share (`Arc`); [`KeyRing::reload`] picks up rotations made by other
/// replicas or the command line.
pub struct KeyRing {
    store: AuthStore,
    /// How long a retired key keeps verifying: the longest token lifetime plus the leeway.
    verify_grace_ms: i64,
    keys: RwLock<Keys>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing").field("verify_grace_ms", &self.verify_grace_ms).finish_non_exhaustive()
    }
}

/// A new RSA-2048 key: PKCS#8 PEM, base64url modulus and exponent.
fn generate_key() -> Result<(String, String, String), TokenError> {
    use aws_lc_rs::encoding::{AsDer as _, Pkcs8V1Der, PublicKeyX509Der};
    use aws_lc_rs::signature::KeyPair as _;
    let fail = |what: &str| TokenError::Sign(format!("RSA key generation: {what}"));
    let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).map_err(|_| fail("generate"))?;
    let pkcs8: Pkcs8V1Der<'static> = kp.as_der().map_err(|_| fail("private key"))?;
    let spki: PublicKeyX509Der<'static> = kp.public_key().as_der().map_err(|_| fail("public key"))?;
    let spki = spki.as_ref();
    let (_, info) = <x509_parser::x509::SubjectPublicKeyInfo as x509_parser::prelude::FromDer<_>>::from_der(spki)
        .map_err(|e| TokenError::Sign(format!("public key: {e}")))?;
    let parsed = info.parsed().map_err(|e| TokenError::Sign(format!("public key: {e}")))?;
    let x509_parser::public_key::PublicKey::RSA(rsa) = parsed else {
        return Err(TokenError::Sign("generated key is not RSA".into()));
    };
    let strip = |b: &[u8]| -> Vec<u8> {
        let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
        b[start..].to_vec()
    };
    let b64 = |b: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let body = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    Ok((pem, b64(strip(rsa.modulus)), b64(strip(rsa.exponent))))
}

impl KeyRing {
    /// Loads the keys, creating the first one when there is none.
    pub async fn open(store: AuthStore, verify_grace_ms: i64, now_ms: i64) -> Result<Self, StoreError> {
        let ring = Self {
            store,
            verify_grace_ms,
            keys: RwLock::new(Keys { signing: None, verifying: HashMap::new(), jwks: serde_json::json!({"keys": []}) }),
        };
        ring.reload(now_ms).await?;
        if ring.active_kid().is_none() {
            ring.rotate(now_ms).await?;
        }
        Ok(ring)
    }

    /// Re-reads the keys from the database.
    pub async fn reload(&self, now_ms: i64) -> Result<(), StoreError> {
        let rows = self.store.signing_keys(now_ms - self.verify_grace_ms).await?;
        let mut signing = None;
        let mut verifying = HashMap::new();
        let mut jwks = Vec::new();
        for row in &rows {
            let Ok(dk) = DecodingKey::from_rsa_components(&row.n, &row.e) else {
                tracing::error!(kid = %row.kid, "stored signing key has a malformed public key; skipped");
                continue;
            };
            if signing.is_none() && row.retired_at_ms.is_none() {
                match EncodingKey::from_rsa_pem(row.private_pem.as_bytes()) {
                    Ok(ek) => signing = Some((row.kid.clone(), ek, row.created_at_ms)),
                    Err(e) => tracing::error!(kid = %row.kid, error = %e, "stored signing key unreadable; skipped"),
                }
            }
            verifying.insert(row.kid.clone(), dk);
            jwks.push(serde_json::json!({
                "kty": "RSA", "use": "sig", "alg": "RS256", "kid": row.kid, "n": row.n, "e": row.e,
            }));
        }
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        *keys = Keys { signing, verifying, jwks: serde_json::json!({ "keys": jwks }) };
        Ok(())
    }

    /// Creates a new signing key and retires the others (which keep verifying for the grace
    /// period). Returns the new key id.
    pub async fn rotate(&self, now_ms: i64) -> Result<String, StoreError> {
        let (pem, n, e) = tokio::task::spawn_blocking(generate_key)
            .await
            .map_err(|e| StoreError::InvalidData(format!("key generation: {e}")))?
            .map_err(|e| StoreError::InvalidData(e.to_string()))?;
        let kid = format!("k{}-{}", now_ms / 1000, random_id(6));
        let row =
            SigningKeyRow { kid: kid.clone(), private_pem: pem, n, e, created_at_ms: now_ms, retired_at_ms: None };
        self.store.insert_signing_key(&row).await?;
        self.store.retire_signing_keys_except(&kid, now_ms).await?;
        self.reload(now_ms).await?;
        Ok(kid)
    }

    /// Id and creation time of the key that signs.
    pub fn active_kid(&self) -> Option<(String, i64)> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.signing.as_ref().map(|(kid, _, created)| (kid.clone(), *created))
    }

    /// The JWKS document.
    pub fn jwks(&self) -> serde_json::Value {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).jwks.clone()
    }

    /// Signs claims with the active key (RS256, `kid` in the header).
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, TokenError> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let (kid, key, _) = keys.signing.as_ref().ok_or(TokenError::NoSigningKey)?;
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.clone());
        jsonwebtoken::encode(&header, claims, key).map_err(|e| TokenError::Sign(e.to_string()))
    }

    /// Verifies a token for `audience`: RS256 only, known `kid`, signature, `iss`, `aud`, `exp`.
    pub fn verify<T: DeserializeOwned>(&self, token: &str, audience: &str) -> Result<T, TokenError> {
        if token.len() > 8192 {
            return Err(TokenError::Malformed("too long".into()));
        }
        // The header's alg is checked before any key is touched: `none`, HS256 and every other
        // algorithm are refused here (jsonwebtoken refuses them again against the validation).
        let header_alg = token
            .split('.')
            .next()
            .and_then(|h| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(h).ok())
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("alg").and_then(|a| a.as_str()).map(str::to_owned))
            .ok_or_else(|| TokenError::Malformed("no readable header".into()))?;
        if header_alg != "RS256" {
            return Err(TokenError::Algorithm(header_alg));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let kid = header.kid.ok_or(TokenError::NoKeyId)?;
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = keys.verifying.get(&kid).ok_or_else(|| TokenError::UnknownKey(kid.clone()))?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = LEEWAY_S;
        validation.set_audience(&[audience]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<T>(token, key, &validation)
            .map(|d| d.claims)
            .map_err(|e| TokenError::Invalid(e.to_string()))
    }
}
