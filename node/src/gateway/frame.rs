//! Protocol v1 frames: parsing requests, rendering replies.

use convoy_actors::domain::Reply;
use convoy_actors::ids::MAX_ID_LEN;
use convoy_actors::{ErrorCode, Rejection};
use serde::Serialize;
use serde_json::{Map, Value};

/// A request frame whose envelope is valid.
#[derive(Debug)]
pub struct RequestFrame {
    pub id: String,
    pub op: String,
    /// The client's W3C trace context: the server's spans become children of its span.
    pub traceparent: Option<String>,
    /// Every field of the frame (the op parser ignores `id`, `op` and unknown ones).
    pub fields: Map<String, Value>,
}

/// An error to send back, with the request id when the frame had a usable one.
#[derive(Debug)]
pub struct FrameError {
    pub id: Option<String>,
    pub rejection: Rejection,
}

fn bad(id: Option<String>, message: impl Into<String>) -> FrameError {
    FrameError { id, rejection: Rejection::bad_request(message) }
}

pub fn parse(text: &str) -> Result<RequestFrame, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|e| bad(None, format!("frame is not JSON: {e}")))?;
    let Value::Object(mut fields) = value else {
        return Err(bad(None, "frame must be a JSON object"));
    };
    let id = match fields.get("id") {
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= MAX_ID_LEN => s.clone(),
        Some(_) => return Err(bad(None, format!("id must be a string of 1..{MAX_ID_LEN} characters"))),
        None => return Err(bad(None, "frame has no id")),
    };
    let op = match fields.remove("op") {
        Some(Value::String(op)) => op,
        Some(_) => return Err(bad(Some(id), "op must be a string")),
        None => return Err(bad(Some(id), "frame has no op")),
    };
    let traceparent = match fields.remove("traceparent") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) if crate::telemetry::trace::valid_traceparent(&t) => Some(t),
        Some(_) => {
            return Err(bad(
                Some(id),
                "traceparent must be a W3C traceparent: 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>",
            ));
        }
    };
    Ok(RequestFrame { id, op, traceparent, fields })
}

#[derive(Serialize)]
struct OkFrame<'a, T: Serialize> {
    re: &'a str,
    ok: bool,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Serialize)]
struct ErrFrame<'a> {
    re: Option<&'a str>,
    ok: bool,
    error: ErrBody<'a>,
}

#[derive(Serialize)]
struct ErrBody<'a> {
    code: ErrorCode,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

/// Renders a successful reply with `body`'s fields.
pub fn ok<T: Serialize>(id: &str, body: &T) -> String {
    serde_json::to_string(&OkFrame { re: id, ok: true, body }).unwrap_or_else(|e| {
        error(Some(id), &Rejection::new(ErrorCode::Internal, format!("reply could not be encoded: {e}")), None)
    })
}

pub fn reply(id: &str, reply: &Reply) -> String {
    ok(id, &reply.protocol())
}

/// Renders an error reply. `unavailable` and `rate_limited` always say when to retry.
pub fn error(id: Option<&str>, r: &Rejection, retry_after_ms: Option<u64>) -> String {
    let retry_after_ms = retry_after_ms.or(match r.code {
        ErrorCode::Unavailable => Some(250),
        ErrorCode::RateLimited => Some(1000),
        _ => None,
    });
    let frame = ErrFrame { re: id, ok: false, error: ErrBody { code: r.code, message: &r.message, retry_after_ms } };
    serde_json::to_string(&frame).expect("error frames always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_checked() {
        assert!(parse(r#"{"id":"1","op":"ping"}"#).is_ok());
        let traced =
            r#"{"id":"1","op":"ping","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#;
        assert_eq!(
            parse(traced).unwrap().traceparent.as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        for (text, has_id) in [
            ("nope", false),
            ("[1]", false),
            (r#"{"op":"ping"}"#, false),
            (r#"{"id":5,"op":"ping"}"#, false),
            (r#"{"id":"","op":"ping"}"#, false),
            (r#"{"id":"1"}"#, true),
            (r#"{"id":"1","op":7}"#, true),
            (r#"{"id":"1","op":"ping","traceparent":"00-xyz"}"#, true),
            (r#"{"id":"1","op":"ping","traceparent":7}"#, true),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.id.is_some(), has_id, "{text}");
            assert_eq!(e.rejection.code, ErrorCode::BadRequest);
        }
    }

    #[test]
    fn replies_match_the_protocol() {
        assert_eq!(reply("3", &Reply::Updated { changed: true }), r#"{"re":"3","ok":true,"changed":true}"#);
        let e = error(None, &Rejection::bad_request("frame is not JSON"), None);
        assert_eq!(e, r#"{"re":null,"ok":false,"error":{"code":"bad_request","message":"frame is not JSON"}}"#);
        let u = error(Some("9"), &Rejection::new(ErrorCode::Unavailable, "moving"), None);
        assert!(u.contains(r#""retry_after_ms":250"#));
    }
}
