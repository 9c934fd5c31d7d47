//! Passwords (argon2id; the service hashes and verifies on its bounded pool, [`super::hashing`]),
//! random secrets, hashes of high-entropy tokens, TOTP (RFC 6238).

use argon2::{Algorithm, Argon2, PasswordHasher as _, PasswordVerifier as _, Version};
use base64::Engine as _;
use rand::RngCore as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;

/// Shortest password accepted.
pub const MIN_PASSWORD_LEN: usize = 12;
/// Longest password accepted (argon2 takes any length; this bounds the work per request).
pub const MAX_PASSWORD_LEN: usize = 256;

/// argon2id with OWASP's recommended minimum: 19 MiB, 2 passes, 1 lane.
fn argon2() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, super::hashing::params())
}

/// Why a new password is refused.
pub fn check_password_policy(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if n < MIN_PASSWORD_LEN {
        return Err(format!("the password must have at least {MIN_PASSWORD_LEN} characters"));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(format!("the password must have at most {MAX_PASSWORD_LEN} bytes"));
    }
    if password.chars().all(|c| c == password.chars().next().unwrap_or(' ')) {
        return Err("the password must not be one repeated character".into());
    }
    Ok(())
}

/// The PHC string of an argon2id hash with a fresh random salt, on the calling thread (tools and
/// tests; the service uses [`super::hashing::PasswordPool`]).
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    argon2().hash_password_with_salt(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Whether `password` matches the PHC string (constant time inside argon2). A malformed hash
/// never matches.
pub fn verify_password(password: &str, phc: &str) -> bool {
    if password.len() > MAX_PASSWORD_LEN {
        return false;
    }
    argon2().verify_password(password.as_bytes(), phc).is_ok()
}

/// `n` random bytes as base64url without padding.
pub fn random_token(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A random identifier of `n` characters from an unambiguous alphabet (lower case, no 0/1/l/o).
pub fn random_id(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char).collect()
}

/// SHA-256 as lower-case hex: the stored form of refresh tokens, API key secrets and recovery
/// codes (all high-entropy, so a fast hash is enough).
pub fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Constant-time equality of two strings.
pub fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// TOTP as every authenticator app does it: SHA-1, 6 digits, 30 s steps, one step of skew.
pub mod totp {
    use totp_rs::{Algorithm, Builder, Secret, Totp};

    pub const STEP_S: u64 = 30;

    /// A fresh 160-bit secret, base32.
    pub fn new_secret() -> String {
        let mut bytes = [0u8; 20];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        Secret::from(bytes.to_vec()).to_base32()
    }

    fn build(secret_b32: &str, account: &str, issuer: &str) -> Result<Totp, String> {
        let secret = Secret::try_from_base32(secret_b32).map_err(|e| format!("TOTP secret: {e:?}"))?;
        Builder::new()
            .with_algorithm(Algorithm::SHA1)
            .with_digits(6)
            .with_skew(1)
            .with_step_duration(STEP_S)
            .with_secret(secret)
            .with_account_name(account)
            .with_issuer(Some(issuer))
            .build()
            .map_err(|e| format!("TOTP: {e:?}"))
    }

    /// The `otpauth://totp/...` URI authenticator apps scan.
    pub fn uri(secret_b32: &str, account: &str, issuer: &str) -> Result<String, String> {
        build(secret_b32, account, issuer)?.to_url().map_err(|e| format!("otpauth URI: {e:?}"))
    }

    /// The code for Unix time `t` (seconds).
    pub fn code_at(secret_b32: &str, t: u64) -> Result<String, String> {
        Ok(build(secret_b32, "x", "x")?.generate(t).to_string())
    }

    /// The time step a code matches at Unix time `t` (within one step of skew), if any.
    pub fn matching_step(secret_b32: &str, code: &str, t: u64) -> Option<u64> {
        let code = code.trim();
        if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        build(secret_b32, "x", "x").ok()?.check(code, t)
    }

    /// The URI as a QR code, SVG.
    pub fn qr_svg(uri: &str) -> Result<String, String> {
        let code = qrcode::QrCode::new(uri.as_bytes()).map_err(|e| format!("QR code: {e}"))?;
        Ok(code.render::<qrcode::render::svg::Color<'_>>().min_dimensions(200, 200).quiet_zone(true).build())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse battery").expect("hash");
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert!(!verify_password("x", "not a hash"));
        assert_ne!(h, hash_password("correct horse battery").expect("hash"), "salted");
        assert!(check_password_policy("short").is_err());
        assert!(check_password_policy("aaaaaaaaaaaaaaaa").is_err());
        assert!(check_password_policy(&"ab".repeat(200)).is_err());
        assert!(check_password_policy("a long enough passphrase").is_ok());
    }

    #[test]
    fn totp_matches_rfc6238_vectors() {
        // RFC 6238 appendix B, SHA-1, secret "12345678901234567890", 8 digits there: the last 6
        // digits are the 6-digit code.
        let secret = totp_rs::Secret::from(b"12345678901234567890".to_vec()).to_base32();
        for (t, eight) in [(59u64, "94287082"), (1_111_111_109, "07081804"), (1_234_567_890, "89005924")] {
            assert_eq!(totp::code_at(&secret, t).expect("code"), &eight[2..], "t={t}");
            assert_eq!(totp::matching_step(&secret, &eight[2..], t), Some(t / 30));
        }
        let code = totp::code_at(&secret, 1_000_000).expect("code");
        assert_eq!(totp::matching_step(&secret, &code, 1_000_000 + 30), Some(1_000_000 / 30), "one step of skew");
        assert_eq!(totp::matching_step(&secret, &code, 1_000_000 + 90), None, "too late");
        assert_eq!(totp::matching_step(&secret, "12345", 0), None);
        assert_eq!(totp::matching_step(&secret, "abcdef", 0), None);
        let uri = totp::uri(&secret, "alice", "ITS Camera AI").expect("uri");
        assert!(uri.starts_with("otpauth://totp/ITS%20Camera%20AI:alice?"), "{uri}");
        assert!(uri.contains(&format!("secret={secret}")), "{uri}");
        assert!(totp::qr_svg(&uri).expect("svg").contains("<svg"));
    }

    #[test]
    fn helpers() {
        assert_eq!(random_token(32).len(), 43);
        assert_eq!(random_id(10).len(), 10);
        assert_ne!(random_id(10), random_id(10));
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(ct_eq("abc", "abc") && !ct_eq("abc", "abd") && !ct_eq("abc", "ab"));
    }
}
