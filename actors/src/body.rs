//! Message bodies: what clients may send, how the server writes its own entries, and
//! the one canonical JSON form in which every body is stored and served.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Rejection;
use crate::group::{MemberRole, Seq};
use crate::ids::{TicketId, UserId};

/// Bounds on what a body may contain. `max_text_chars` comes from configuration; the
/// others are protocol constants.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_text_chars: usize,
}

pub const MAX_URL_LEN: usize = 2048;
pub const MAX_CHOICES: usize = 16;
pub const MAX_LABEL_CHARS: usize = 200;
pub const MAX_NAME_CHARS: usize = 255;

/// A body as a client sends it (protocol v1, "Bodies"). `system` is not here: only the
/// server writes system entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Body {
    Text {
        text: String,
    },
    Image {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        width: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        height: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
    Voice {
        url: String,
        duration_ms: u64,
    },
    Video {
        url: String,
        duration_ms: u64,
    },
    Location {
        lat: f64,
        lng: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        accuracy_m: Option<f64>,
    },
    File {
        url: String,
        name: String,
        size: u64,
    },
    Action {
        prompt: String,
        choices: Vec<ActionChoice>,
    },
    Choice {
        reply_to: Seq,
        choice: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionChoice {
    pub id: String,
    pub label: String,
}

fn check_len(field: &str, value: &str, max_chars: usize) -> Result<(), Rejection> {
    let n = value.chars().count();
    if n == 0 {
        return Err(Rejection::bad_request(format!("body.{field} must not be empty")));
    }
    if n > max_chars {
        return Err(Rejection::bad_request(format!("body.{field} has {n} characters, the limit is {max_chars}")));
    }
    Ok(())
}

/// `check_len` for text whose bound is the configured `limits.max_text_chars`.
fn check_text(field: &str, value: &str, max_chars: usize) -> Result<(), Rejection> {
    check_len(field, value, max_chars)
        .map_err(|r| if value.is_empty() { r } else { r.at_limit(crate::error::Limit::MaxTextChars) })
}

fn check_url(url: &str) -> Result<(), Rejection> {
    check_len("url", url, MAX_URL_LEN)?;
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(Rejection::bad_request("body.url must be an http(s) URL"));
    }
    Ok(())
}

impl Body {
    /// Checks every field against the protocol and `limits`, and returns the stored form.
    pub fn validate(self, limits: &BodyLimits) -> Result<MessageBody, Rejection> {
        let mut reply_to = None;
        match &self {
            Body::Text { text } => check_text("text", text, limits.max_text_chars)?,
            Body::Image { url, sha256, .. } => {
                check_url(url)?;
                if let Some(h) = sha256
                    && (h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()))
                {
                    return Err(Rejection::bad_request("body.sha256 must be 64 hex digits"));
                }
            }
            Body::Voice { url, .. } | Body::Video { url, .. } => check_url(url)?,
            Body::Location { lat, lng, accuracy_m } => {
                if !lat.is_finite() || !(-90.0..=90.0).contains(lat) {
                    return Err(Rejection::bad_request("body.lat must be within -90..90"));
                }
                if !lng.is_finite() || !(-180.0..=180.0).contains(lng) {
                    return Err(Rejection::bad_request("body.lng must be within -180..180"));
                }
                if let Some(a) = accuracy_m
                    && (!a.is_finite() || *a < 0.0)
                {
                    return Err(Rejection::bad_request("body.accuracy_m must be a non-negative number"));
                }
            }
            Body::File { url, name, .. } => {
                check_url(url)?;
                check_len("name", name, MAX_NAME_CHARS)?;
            }
            Body::Action { prompt, choices } => {
                check_text("prompt", prompt, limits.max_text_chars)?;
                if choices.is_empty() || choices.len() > MAX_CHOICES {
                    return Err(Rejection::bad_request(format!("body.choices must have 1..{MAX_CHOICES} entries")));
                }
                for c in choices {
                    check_len("choices[].id", &c.id, crate::ids::MAX_ID_LEN)?;
                    check_len("choices[].label", &c.label, MAX_LABEL_CHARS)?;
                }
            }
            Body::Choice { reply_to: r, choice } => {
                if *r == 0 {
                    return Err(Rejection::bad_request("body.reply_to must be a seq >= 1"));
                }
                check_len("choice", choice, crate::ids::MAX_ID_LEN)?;
                reply_to = Some(*r);
            }
        }
        let json = serde_json::to_string(&self).expect("a Body always serializes");
        Ok(MessageBody { json: Arc::from(json), reply_to })
    }
}

/// A validated body in its canonical JSON text. Stored and served as is: reads and
/// pushes splice it into frames without parsing it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageBody {
    pub json: Arc<str>,
    /// For `choice` bodies: the seq answered, which must exist when the message is applied.
    pub reply_to: Option<Seq>,
}

impl MessageBody {
    pub fn system(event: &SystemEvent) -> Self {
        #[derive(Serialize)]
        struct Tagged<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            #[serde(flatten)]
            event: &'a SystemEvent,
        }
        let json = serde_json::to_string(&Tagged { kind: "system", event }).expect("a SystemEvent always serializes");
        MessageBody { json: Arc::from(json), reply_to: None }
    }
}

/// Entries the server writes into a group's log: `{"type":"system","event":...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SystemEvent {
    GroupOpened { by: UserId, members: Vec<MemberSpec> },
    MemberJoined { user: UserId, role: MemberRole, by: UserId },
    MemberRemoved { user: UserId, by: UserId },
    MemberLeft { user: UserId },
    GroupClosed { resolution: String, by: UserId },
    ReceiptOverdue { seq: Seq, pending: Vec<UserId> },
    TicketLinked { ticket: TicketId, category: String, state: String },
    TicketChanged { ticket: TicketId, state: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSpec {
    pub user: UserId,
    pub role: MemberRole,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: BodyLimits = BodyLimits { max_text_chars: 10 };

    fn parse(json: &str) -> Result<MessageBody, Rejection> {
        let body: Body = serde_json::from_str(json).map_err(|e| Rejection::bad_request(e.to_string()))?;
        body.validate(&LIMITS)
    }

    #[test]
    fn every_client_body_type_round_trips_canonically() {
        let cases = [
            r#"{"type":"text","text":"外包装破损"}"#,
            r#"{"type":"image","url":"https://x/y.jpg","width":10,"height":20}"#,
            r#"{"type":"voice","url":"https://x/v.ogg","duration_ms":3000}"#,
            r#"{"type":"video","url":"https://x/v.mp4","duration_ms":3000}"#,
            r#"{"type":"location","lat":30.5,"lng":114.3,"accuracy_m":12.0}"#,
            r#"{"type":"file","url":"https://x/f.pdf","name":"f.pdf","size":42}"#,
            r#"{"type":"action","prompt":"what now","choices":[{"id":"wait","label":"keep waiting"}]}"#,
            r#"{"type":"choice","reply_to":3,"choice":"wait"}"#,
        ];
        for case in cases {
            let body = parse(case).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(&*body.json, case);
        }
    }

    #[test]
    fn malformed_bodies_are_bad_requests() {
        for case in [
            r#"{"type":"system","event":"member_left","user":"u"}"#,
            r#"{"type":"sticker"}"#,
            r#"{"type":"text"}"#,
            r#"{"type":"text","text":""}"#,
            r#"{"type":"text","text":"eleven chars"}"#,
            r#"{"type":"image","url":"ftp://x"}"#,
            r#"{"type":"location","lat":91,"lng":0}"#,
            r#"{"type":"action","prompt":"p","choices":[]}"#,
            r#"{"type":"choice","reply_to":0,"choice":"a"}"#,
            r#"{"type":"voice","url":"https://x","duration_ms":-1}"#,
        ] {
            assert!(parse(case).is_err(), "{case} was accepted");
        }
    }

    #[test]
    fn system_bodies_are_tagged_twice() {
        let body = MessageBody::system(&SystemEvent::MemberLeft { user: UserId::parse("u1").unwrap() });
        assert_eq!(&*body.json, r#"{"type":"system","event":"member_left","user":"u1"}"#);
    }
}
