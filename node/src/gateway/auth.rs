//! Client tokens: HS256 JWTs signed with the cluster's client secret (protocol v1,
//! "Authentication"). The same keys mint tokens for `convoy token` and `convoy dev`.

use std::time::Duration;

use convoy_actors::principal::Principal;
use convoy_actors::{ErrorCode, Rejection};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The claims of a client token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skills: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
    pub exp: u64,
}

/// Who a token to mint names: every claim but the expiry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Holder<'a> {
    pub sub: &'a str,
    pub roles: &'a [String],
    pub skills: &'a [String],
    pub tier: Option<&'a str>,
    pub capacity: Option<u32>,
}

/// A verified token: who it names and until when it is valid (Unix seconds).
#[derive(Debug, Clone)]
pub struct Verified {
    pub principal: Principal,
    pub expires_at: u64,
}

pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    max_ttl: Duration,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl TokenKeys {
    pub fn new(secret: &[u8], max_ttl: Duration) -> TokenKeys {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        TokenKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            max_ttl,
        }
    }

    /// Signs a token for `claims` valid for `ttl`.
    pub fn mint(&self, holder: &Holder<'_>, ttl: Duration) -> String {
        let claims = Claims {
            sub: holder.sub.to_string(),
            roles: holder.roles.to_vec(),
            skills: holder.skills.to_vec(),
            tier: holder.tier.map(str::to_string),
            capacity: holder.capacity,
            exp: unix_now() + ttl.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// Checks signature, expiry and claims. Every failure is `unauthorized` with a reason.
    pub fn verify(&self, token: &str) -> Result<Verified, Rejection> {
        let unauthorized = |m: String| Rejection::new(ErrorCode::Unauthorized, m);
        if token.len() > 8192 {
            return Err(unauthorized("token is longer than 8192 bytes".into()));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            unauthorized(match e.kind() {
                ErrorKind::ExpiredSignature => "token expired".into(),
                ErrorKind::InvalidSignature => "token signature does not match the cluster's client secret".into(),
                ErrorKind::InvalidAlgorithm => "token must be signed with HS256".into(),
                _ => format!("token is not a valid JWT: {e}"),
            })
        })?;
        let c = data.claims;
        if c.exp > unix_now() + self.max_ttl.as_secs() + 60 {
            return Err(unauthorized(format!("token expiry is more than {}s away, the limit", self.max_ttl.as_secs())));
        }
        let principal =
            Principal::from_claims(&c.sub, &c.roles, &c.skills, c.tier.as_deref())?.with_capacity(c.capacity)?;
        Ok(Verified { principal, expires_at: c.exp })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secret: &str) -> TokenKeys {
        TokenKeys::new(secret.as_bytes(), Duration::from_secs(86400))
    }

    #[test]
    fn minted_tokens_verify() {
        let k = keys("a-secret-of-at-least-thirty-two-bytes!!");
        let roles = ["agent".to_string()];
        let holder = Holder { sub: "u-17", roles: &roles, tier: Some("vip"), capacity: Some(3), ..Holder::default() };
        let v = k.verify(&k.mint(&holder, Duration::from_secs(60))).unwrap();
        assert_eq!(v.principal.user.as_str(), "u-17");
        assert_eq!(v.principal.tier, convoy_actors::principal::Tier::Vip);
        assert_eq!(v.principal.capacity, Some(3));
    }

    #[test]
    fn wrong_secret_expired_and_garbage_are_unauthorized() {
        let k = keys("a-secret-of-at-least-thirty-two-bytes!!");
        let other = keys("another-secret-of-at-least-thirty-two!!");
        let driver = ["driver".to_string()];
        let holder = Holder { sub: "u", roles: &driver, ..Holder::default() };
        let t = other.mint(&holder, Duration::from_secs(60));
        assert!(k.verify(&t).unwrap_err().message.contains("signature"));
        let claims = Claims {
            sub: "u".into(),
            roles: driver.to_vec(),
            skills: vec![],
            tier: None,
            capacity: None,
            exp: unix_now() - 100,
        };
        let expired = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &k.encoding).unwrap();
        assert_eq!(k.verify(&expired).unwrap_err().message, "token expired");
        assert!(k.verify("not.a.jwt").is_err());
        assert!(k.verify("").is_err());
        let pilot = ["pilot".to_string()];
        let bad_role = k.mint(&Holder { roles: &pilot, ..holder }, Duration::from_secs(60));
        assert_eq!(k.verify(&bad_role).unwrap_err().code, ErrorCode::Unauthorized);
        let no_room = k.mint(&Holder { capacity: Some(0), ..holder }, Duration::from_secs(60));
        assert!(k.verify(&no_room).unwrap_err().message.contains("capacity"));
        let too_long = k.mint(&holder, Duration::from_secs(10 * 86400));
        assert!(k.verify(&too_long).is_err());
    }
}
