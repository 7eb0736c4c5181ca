//! Client tokens: HS256 JWTs signed with the cluster's shared client secret.
//!
//! The claims follow the "Authentication" section of the protocol: `sub`, `roles`, optional
//! `skills` and `tier`, and a required `exp` (seconds since the Unix epoch).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// The claims of a client token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User id, 1..64 chars of `[A-Za-z0-9_.:-]`.
    pub sub: String,
    /// Any of `customer`, `driver`, `agent`, `dispatcher`, `station`, `admin`.
    pub roles: Vec<String>,
    /// Skill groups of an agent (`fee`, `damage`, `delivery`, `quality`, ...). Omitted when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skills: Vec<String>,
    /// `vip` or `standard`; omitted means `standard`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Tickets an agent works at once (1..100); omitted means the node's `tickets.agent_capacity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

impl Claims {
    /// Claims for `sub` with `roles`, expiring `ttl` from now; no skills, default tier.
    pub fn new<R, S>(sub: impl Into<String>, roles: R, ttl: Duration) -> Self
    where
        R: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Claims {
            sub: sub.into(),
            roles: roles.into_iter().map(Into::into).collect(),
            skills: Vec::new(),
            tier: None,
            capacity: None,
            exp: unix_now_secs().saturating_add(ttl.as_secs().max(1)),
        }
    }

    /// Sets the agent skill groups.
    pub fn with_skills<R, S>(mut self, skills: R) -> Self
    where
        R: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.skills = skills.into_iter().map(Into::into).collect();
        self
    }

    /// Sets how many tickets an agent works at once (1..100).
    pub fn with_capacity(mut self, capacity: u32) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// Sets the customer tier (`vip` or `standard`).
    pub fn with_tier(mut self, tier: impl Into<String>) -> Self {
        self.tier = Some(tier.into());
        self
    }

    /// Sets an absolute expiry (seconds since the Unix epoch), e.g. one in the past to test rejection.
    pub fn with_exp(mut self, exp: u64) -> Self {
        self.exp = exp;
        self
    }
}

/// Signing failed. With an HMAC key and these claims this does not happen in practice.
#[derive(Debug, thiserror::Error)]
#[error("could not sign token: {0}")]
pub struct TokenError(#[from] jsonwebtoken::errors::Error);

/// Signs `claims` with HS256 and `secret`, returning the compact JWT.
pub fn try_mint(secret: &[u8], claims: &Claims) -> Result<String, TokenError> {
    Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret))?)
}

/// Signs `claims` with HS256 and `secret`, returning the compact JWT.
///
/// HMAC accepts keys of any length and the claims always serialize, so this cannot fail; use
/// [`try_mint`] to handle the error anyway.
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    try_mint(secret, claims).expect("HS256 signing of plain claims cannot fail")
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    fn decode(token: &str, secret: &[u8]) -> jsonwebtoken::errors::Result<Claims> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret), &validation).map(|t| t.claims)
    }

    #[test]
    fn mint_round_trips_through_hs256() {
        let claims = Claims::new("u-17", ["driver", "dispatcher"], Duration::from_secs(3600));
        let token = mint(b"s3cret", &claims);
        assert_eq!(token.split('.').count(), 3);
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::HS256);
        let back = decode(&token, b"s3cret").unwrap();
        assert_eq!(back, claims);
        assert_eq!(back.sub, "u-17");
        assert_eq!(back.roles, vec!["driver".to_string(), "dispatcher".to_string()]);
        let now = unix_now_secs();
        assert!(back.exp >= now + 3590 && back.exp <= now + 3610, "exp {} now {now}", back.exp);
    }

    #[test]
    fn optional_claims_are_omitted_or_kept() {
        let plain = Claims::new("c-903", ["customer"], Duration::from_secs(60));
        let payload = serde_json::to_value(&plain).unwrap();
        assert!(payload.get("skills").is_none());
        assert!(payload.get("tier").is_none());

        let agent =
            Claims::new("a-5", ["agent"], Duration::from_secs(60)).with_skills(["fee", "damage"]).with_tier("vip");
        let back = decode(&mint(b"k", &agent), b"k").unwrap();
        assert_eq!(back.skills, vec!["fee".to_string(), "damage".to_string()]);
        assert_eq!(back.tier.as_deref(), Some("vip"));
    }

    #[test]
    fn wrong_secret_and_expired_tokens_are_rejected() {
        let claims = Claims::new("u-1", ["driver"], Duration::from_secs(60));
        assert!(decode(&mint(b"right", &claims), b"wrong").is_err());
        let expired = claims.with_exp(unix_now_secs() - 3600);
        assert!(decode(&mint(b"right", &expired), b"right").is_err());
    }

    #[test]
    fn empty_secret_still_signs() {
        let claims = Claims::new("u-1", ["driver"], Duration::from_secs(60));
        assert!(try_mint(b"", &claims).is_ok());
    }
}
