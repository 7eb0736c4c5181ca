//! Validated identifiers. An id that exists has passed validation: code that holds a
//! `GroupId` never re-checks it, and storage keys can use `0x00` as a separator because no
//! id contains it. The one exception is `ClientMsgId`: the protocol lets it be any 1..64
//! characters, so it only ever ends a key, after the sender's id and a `/`.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest id the protocol accepts (users, groups, tickets, client message ids).
pub const MAX_ID_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} must be 1..{MAX_ID_LEN} characters, got {len}")]
    Length { what: &'static str, len: usize },
    #[error("{what} may only contain A-Z a-z 0-9 _ . : - (found {found:?})")]
    Charset { what: &'static str, found: char },
}

/// Checks the protocol's id grammar: 1..64 chars of `[A-Za-z0-9_.:-]`.
pub fn validate_id(what: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() || s.len() > MAX_ID_LEN {
        return Err(IdError::Length { what, len: s.chars().count() });
    }
    if let Some(found) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))) {
        return Err(IdError::Charset { what, found });
    }
    Ok(())
}

/// Checks a `client_msg_id`: 1..64 characters, any characters.
pub fn validate_client_msg_id(what: &'static str, s: &str) -> Result<(), IdError> {
    let len = s.chars().count();
    if len == 0 || len > MAX_ID_LEN {
        return Err(IdError::Length { what, len });
    }
    Ok(())
}

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        define_id!($(#[$doc])* $name, $what, validate_id);
    };
    ($(#[$doc:meta])* $name:ident, $what:literal, $validate:path) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Arc<str>);

        impl $name {
            pub const WHAT: &'static str = $what;

            pub fn parse(s: &str) -> Result<Self, IdError> {
                $validate($what, s)?;
                Ok(Self(Arc::from(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

define_id!(
    /// A user: the JWT `sub` claim.
    UserId,
    "user id"
);
define_id!(
    /// A group (exception group or chat).
    GroupId,
    "group id"
);
define_id!(
    /// The sender's idempotency key for one message.
    ClientMsgId,
    "client_msg_id",
    validate_client_msg_id
);
define_id!(
    /// A support ticket.
    TicketId,
    "ticket id"
);
define_id!(
    /// A skill group of agents (`fee`, `damage`, ...).
    SkillGroup,
    "skill group"
);

/// The user id the server uses as `from` on entries it writes itself (timers).
/// Tokens with this `sub` are refused so no client can impersonate it.
pub const SYSTEM_USER: &str = "system";

pub fn system_user() -> UserId {
    UserId::parse(SYSTEM_USER).expect("the system user id is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_protocol_grammar() {
        for ok in ["a", "exc-20261122-0042", "u_17", "a.b:c-d", &"x".repeat(64)] {
            assert!(GroupId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        for bad in ["", &"x".repeat(65), "a b", "a/b", "ü", "a\0b", "g#1"] {
            assert!(GroupId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn client_msg_ids_are_any_one_to_sixty_four_characters() {
        for ok in ["a", "a/b", "{3f2a-uuid}", "外包装 1", &"ü".repeat(64)] {
            assert!(ClientMsgId::parse(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", &"ü".repeat(65)] {
            assert!(ClientMsgId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deserialization_validates() {
        assert!(serde_json::from_str::<UserId>("\"ok-1\"").is_ok());
        let err = serde_json::from_str::<UserId>("\"no spaces\"").unwrap_err();
        assert!(err.to_string().contains("user id may only contain"), "{err}");
    }
}
