//! The protocol's error codes, and the domain's way of saying no.

use serde::{Deserialize, Serialize};

/// Every error code of protocol v1 (docs/protocol.md, "Error codes"). One enum, used from
/// the domain up to the gateway; the wire name is the snake_case variant name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    TooLarge,
    RateLimited,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A configured limit a request ran into (the name is its key under `limits.`), so the
/// runtime can count hits per limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    MaxTextChars,
    MaxMembersPerGroup,
    MaxGroupsPerUser,
    MaxReceiptWatchesPerGroup,
    SyncLimitMax,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::MaxTextChars => "max_text_chars",
            Limit::MaxMembersPerGroup => "max_members_per_group",
            Limit::MaxGroupsPerUser => "max_groups_per_user",
            Limit::MaxReceiptWatchesPerGroup => "max_receipt_watches_per_group",
            Limit::SyncLimitMax => "sync_limit_max",
        }
    }
}

/// Why the domain refused a command or a query. Replicated (it is part of an applied
/// command's outcome), so it carries only what every replica computes identically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: String,
    /// The limit that refused it, if one did. (Never skipped when serialized: rejections
    /// cross nodes in a binary encoding that cannot leave fields out.)
    pub limit: Option<Limit>,
}

impl Rejection {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), limit: None }
    }
    pub fn at_limit(mut self, limit: Limit) -> Self {
        self.limit = Some(limit);
        self
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_match_as_str() {
        for code in ErrorCode::ALL {
            assert_eq!(serde_json::to_string(&code).unwrap(), format!("\"{}\"", code.as_str()));
        }
    }
}
