//! Classification of frames received from the server.
//!
//! Everything here is total: any input, however malformed, yields a value or an error that
//! the connection counts; nothing panics on server input.

use serde_json::{Map, Value};

/// A well-formed frame from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A reply: `re` is the request id, `None` for `"re": null` (a reply to a frame the server
    /// could not attribute to a request).
    Reply { re: Option<String>, frame: Value },
    /// A server push: `{"ev": "...", ...}`.
    Event { ev: String, frame: Value },
}

/// Why a frame from the server was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("frame is not JSON: {0}")]
    NotJson(String),
    #[error("frame is not a JSON object")]
    NotObject,
    #[error("`re` is neither a string nor null")]
    BadRe,
    #[error("`ev` is not a string")]
    BadEv,
    #[error("frame has neither `re` nor `ev`")]
    Unrecognized,
    #[error("binary frame")]
    Binary,
}

/// An error reply's `error` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub code: String,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

/// Classifies one text frame.
pub fn parse_incoming(text: &str) -> Result<Incoming, Malformed> {
    let frame: Value = serde_json::from_str(text).map_err(|e| Malformed::NotJson(e.to_string()))?;
    classify(frame)
}

/// Classifies one already parsed frame.
pub fn classify(frame: Value) -> Result<Incoming, Malformed> {
    let Value::Object(map) = &frame else {
        return Err(Malformed::NotObject);
    };
    if let Some(re) = map.get("re") {
        let re = match re {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            _ => return Err(Malformed::BadRe),
        };
        return Ok(Incoming::Reply { re, frame });
    }
    if let Some(ev) = map.get("ev") {
        let Value::String(ev) = ev else {
            return Err(Malformed::BadEv);
        };
        return Ok(Incoming::Event { ev: ev.clone(), frame });
    }
    Err(Malformed::Unrecognized)
}

/// The outcome a reply carries: the whole frame when `ok` is true, the server error when it is
/// false, or a description of what is wrong with the reply.
pub fn reply_outcome(frame: Value) -> Result<Value, ReplyError> {
    let Some(map) = frame.as_object() else {
        return Err(ReplyError::Malformed("reply is not a JSON object".into()));
    };
    match map.get("ok") {
        Some(Value::Bool(true)) => Ok(frame),
        Some(Value::Bool(false)) => Err(parse_error(map)),
        Some(_) => Err(ReplyError::Malformed("`ok` is not a boolean".into())),
        None => Err(ReplyError::Malformed("reply has no `ok`".into())),
    }
}

/// Why a reply does not carry a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    Server(ServerError),
    Malformed(String),
}

fn parse_error(map: &Map<String, Value>) -> ReplyError {
    let Some(Value::Object(err)) = map.get("error") else {
        return ReplyError::Malformed("error reply without an `error` object".into());
    };
    let Some(Value::String(code)) = err.get("code") else {
        return ReplyError::Malformed("error reply without a string `error.code`".into());
    };
    let message = err.get("message").and_then(Value::as_str).unwrap_or_default().to_string();
    let retry_after_ms = err.get("retry_after_ms").and_then(|v| {
        v.as_u64().or_else(|| v.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f.ceil() as u64))
    });
    ReplyError::Server(ServerError { code: code.clone(), message, retry_after_ms })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn replies_and_events_are_classified() {
        match parse_incoming(r#"{"re":"7","ok":true,"seq":3}"#).unwrap() {
            Incoming::Reply { re, frame } => {
                assert_eq!(re.as_deref(), Some("7"));
                assert_eq!(frame["seq"], 3);
            }
            other => panic!("unexpected {other:?}"),
        }
        match parse_incoming(r#"{"re":null,"ok":false,"error":{"code":"bad_request","message":"x"}}"#).unwrap() {
            Incoming::Reply { re, .. } => assert_eq!(re, None),
            other => panic!("unexpected {other:?}"),
        }
        match parse_incoming(r#"{"ev":"msg","group":"g","seq":1}"#).unwrap() {
            Incoming::Event { ev, frame } => {
                assert_eq!(ev, "msg");
                assert_eq!(frame["group"], "g");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let cases: &[(&str, Malformed)] = &[
            ("", Malformed::NotJson(String::new())),
            ("{", Malformed::NotJson(String::new())),
            ("\u{0}\u{1}garbage", Malformed::NotJson(String::new())),
            ("[1,2]", Malformed::NotObject),
            ("\"re\"", Malformed::NotObject),
            ("42", Malformed::NotObject),
            ("null", Malformed::NotObject),
            (r#"{"re":5,"ok":true}"#, Malformed::BadRe),
            (r#"{"re":["a"],"ok":true}"#, Malformed::BadRe),
            (r#"{"ev":7}"#, Malformed::BadEv),
            (r#"{"ev":null}"#, Malformed::BadEv),
            (r#"{"ok":true}"#, Malformed::Unrecognized),
            ("{}", Malformed::Unrecognized),
        ];
        for (text, want) in cases {
            let got = parse_incoming(text).expect_err(text);
            match (want, &got) {
                (Malformed::NotJson(_), Malformed::NotJson(_)) => {}
                _ => assert_eq!(&got, want, "{text}"),
            }
        }
        // Deeply nested input must not overflow the stack.
        let deep = "[".repeat(100_000);
        assert!(parse_incoming(&deep).is_err());
    }

    #[test]
    fn reply_outcomes() {
        let ok = json!({"re":"1","ok":true,"user":"u"});
        assert_eq!(reply_outcome(ok.clone()), Ok(ok));

        let err = json!({"re":"1","ok":false,"error":{"code":"unavailable","message":"moving","retry_after_ms":250}});
        assert_eq!(
            reply_outcome(err),
            Err(ReplyError::Server(ServerError {
                code: "unavailable".into(),
                message: "moving".into(),
                retry_after_ms: Some(250)
            }))
        );

        let no_message = json!({"re":"1","ok":false,"error":{"code":"forbidden"}});
        match reply_outcome(no_message) {
            Err(ReplyError::Server(e)) => {
                assert_eq!(e.code, "forbidden");
                assert_eq!(e.message, "");
                assert_eq!(e.retry_after_ms, None);
            }
            other => panic!("unexpected {other:?}"),
        }

        let float_retry = json!({"re":"1","ok":false,"error":{"code":"rate_limited","retry_after_ms":12.2}});
        match reply_outcome(float_retry) {
            Err(ReplyError::Server(e)) => assert_eq!(e.retry_after_ms, Some(13)),
            other => panic!("unexpected {other:?}"),
        }

        for bad in [
            json!({"re":"1"}),
            json!({"re":"1","ok":"yes"}),
            json!({"re":"1","ok":false}),
            json!({"re":"1","ok":false,"error":"boom"}),
            json!({"re":"1","ok":false,"error":{"message":"no code"}}),
            json!({"re":"1","ok":false,"error":{"code":17}}),
            json!("not an object"),
        ] {
            assert!(matches!(reply_outcome(bad.clone()), Err(ReplyError::Malformed(_))), "{bad}");
        }
    }
}
