//! Tokens: JWT HS256 (RFC 7519) minted by whoever holds the shared secret.
//!
//! One format for every credential in the cluster, so any language with an
//! HMAC-SHA256 can mint one (PHP: `hash_hmac('sha256', …, true)`; Java:
//! `javax.crypto.Mac` "HmacSHA256"). A token is
//! `base64url(header) . base64url(claims) . base64url(HMAC-SHA256(secret, header.claims))`
//! with header `{"alg":"HS256","typ":"JWT"}` and claims:
//!
//! | claim | meaning |
//! |-------|---------|
//! | `sub` | who: the IM server's `serviceName`, or the user's uid |
//! | `aud` | what for: `"register"` (an IM server joining the Route) or `"user"` (a client connecting) |
//! | `exp` | expiry, Unix seconds |
//!
//! Verification rejects any other `alg` (no `none`, no algorithm
//! confusion), a wrong `aud` or `sub`, an expired token (with a small leeway
//! for clock skew) and a bad signature; the signature comparison is
//! constant-time (`hmac`'s `verify_slice`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Seconds of clock skew tolerated on `exp`.
pub const LEEWAY_SECS: u64 = 30;
/// Longest token accepted, in bytes (anything larger is not ours).
const MAX_TOKEN: usize = 4096;

/// The claims swocloud mints and checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: serviceName or uid.
    pub sub: String,
    /// Audience: "register" or "user".
    pub aud: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No token where one is required.
    Missing,
    /// Not three base64url parts of JSON, or too long.
    Malformed,
    /// `alg` is not HS256.
    Algorithm,
    /// The signature does not match.
    Signature,
    /// `exp` is in the past.
    Expired,
    /// Minted for another audience.
    Audience,
    /// Minted for another subject.
    Subject,
}

impl AuthError {
    /// A short stable code for error replies and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Malformed => "malformed_token",
            AuthError::Algorithm => "bad_algorithm",
            AuthError::Signature => "bad_signature",
            AuthError::Expired => "expired_token",
            AuthError::Audience => "wrong_audience",
            AuthError::Subject => "wrong_subject",
        }
    }
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthError::Missing => "a token is required",
            AuthError::Malformed => "the token is not a JWT",
            AuthError::Algorithm => "only HS256 tokens are accepted",
            AuthError::Signature => "the token's signature is wrong",
            AuthError::Expired => "the token has expired",
            AuthError::Audience => "the token was minted for another purpose",
            AuthError::Subject => "the token was minted for someone else",
        })
    }
}

impl std::error::Error for AuthError {}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
}

/// Mints a token for `sub`/`aud` valid for `ttl_secs`.
pub fn mint(secret: &[u8], sub: &str, aud: &str, ttl_secs: u64) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = Claims {
        sub: sub.to_string(),
        aud: aud.to_string(),
        exp: unix_now() + ttl_secs,
    };
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
    let signing_input = format!("{header}.{body}");
    let mut m = mac(secret);
    m.update(signing_input.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

/// Verifies `token` for audience `aud` and, when given, subject `sub`.
pub fn verify(
    secret: &[u8],
    token: &str,
    aud: &str,
    sub: Option<&str>,
) -> Result<Claims, AuthError> {
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    if token.len() > MAX_TOKEN {
        return Err(AuthError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let header: Header = URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(AuthError::Malformed)?;
    if header.alg != "HS256" {
        return Err(AuthError::Algorithm);
    }
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| AuthError::Malformed)?;
    let mut m = mac(secret);
    m.update(h.as_bytes());
    m.update(b".");
    m.update(c.as_bytes());
    m.verify_slice(&sig).map_err(|_| AuthError::Signature)?;
    let claims: Claims = URL_SAFE_NO_PAD
        .decode(c)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(AuthError::Malformed)?;
    if claims.exp + LEEWAY_SECS < unix_now() {
        return Err(AuthError::Expired);
    }
    if !constant_eq(claims.aud.as_bytes(), aud.as_bytes()) {
        return Err(AuthError::Audience);
    }
    if let Some(sub) = sub {
        if !constant_eq(claims.sub.as_bytes(), sub.as_bytes()) {
            return Err(AuthError::Subject);
        }
    }
    Ok(claims)
}

/// Compares two byte strings (for API keys and other shared secrets) in
/// time that does not depend on where they differ, nor on whether their
/// lengths match: both are hashed with SHA-256 and the digests compared
/// with a branch-free fold, so the secret's length does not leak either.
pub fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    let diff = x
        .iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_then_verify() {
        let t = mint(b"s3cret", "IM_1", "register", 60);
        let c = verify(b"s3cret", &t, "register", Some("IM_1")).unwrap();
        assert_eq!((c.sub.as_str(), c.aud.as_str()), ("IM_1", "register"));
    }

    #[test]
    fn every_kind_of_bad_token_is_refused() {
        let t = mint(b"s3cret", "IM_1", "register", 60);
        assert_eq!(
            verify(b"other", &t, "register", None),
            Err(AuthError::Signature)
        );
        assert_eq!(
            verify(b"s3cret", &t, "user", None),
            Err(AuthError::Audience)
        );
        assert_eq!(
            verify(b"s3cret", &t, "register", Some("IM_2")),
            Err(AuthError::Subject)
        );
        assert_eq!(
            verify(b"s3cret", "", "register", None),
            Err(AuthError::Missing)
        );
        assert_eq!(
            verify(b"s3cret", "a.b", "register", None),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            verify(b"s3cret", "a.b.c.d", "register", None),
            Err(AuthError::Malformed)
        );
        // alg=none with the same claims.
        let claims = t.split('.').nth(1).unwrap();
        let none = format!("{}.{claims}.", URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#));
        assert_eq!(
            verify(b"s3cret", &none, "register", None),
            Err(AuthError::Algorithm)
        );
        // Tampered claims keep the old signature.
        let forged_claims =
            URL_SAFE_NO_PAD.encode(br#"{"sub":"IM_9","aud":"register","exp":99999999999}"#);
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!("{}.{forged_claims}.{}", parts[0], parts[2]);
        assert_eq!(
            verify(b"s3cret", &forged, "register", None),
            Err(AuthError::Signature)
        );
    }

    #[test]
    fn expired_tokens_are_refused_after_the_leeway() {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"sub":"u1","aud":"user","exp":{}}}"#,
            unix_now() - LEEWAY_SECS - 5
        ));
        let mut m = mac(b"k");
        m.update(format!("{header}.{body}").as_bytes());
        let t = format!(
            "{header}.{body}.{}",
            URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
        );
        assert_eq!(
            verify(b"k", &t, "user", Some("u1")),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn constant_eq_compares() {
        assert!(constant_eq(b"abc", b"abc"));
        assert!(!constant_eq(b"abc", b"abd"));
        assert!(!constant_eq(b"abc", b"ab"));
    }
}
