//! A minimal HTTP/1.0 client, enough for the admin endpoints (`/healthz`, `/readyz`,
//! `/metrics`, the fault injection `POST`s).
//!
//! HTTP/1.0 keeps the exchange trivial: the server closes the connection after the response and
//! never uses chunked encoding, so the body is everything after the header block.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// GETs `url` (`http://HOST:PORT/path`). Errors are strings fit for an assertion message.
pub async fn get(url: &str) -> Result<Response, String> {
    request_with_token("GET", url, None).await
}

/// POSTs an empty body to `url`.
pub async fn post(url: &str) -> Result<Response, String> {
    request_with_token("POST", url, None).await
}

/// A request with an optional `Authorization: Bearer` token.
pub async fn request_with_token(method: &str, url: &str, token: Option<&str>) -> Result<Response, String> {
    tokio::time::timeout(Duration::from_secs(10), request_inner(method, url, token))
        .await
        .map_err(|_| format!("{method} {url}: timed out"))?
}

async fn request_inner(method: &str, url: &str, token: Option<&str>) -> Result<Response, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("not an http:// URL: {url}"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut stream = TcpStream::connect(host).await.map_err(|e| format!("{method} {url}: connect: {e}"))?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nAccept: */*\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("{method} {url}: write: {e}"))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.map_err(|e| format!("{method} {url}: read: {e}"))?;
    parse_response(&raw).map_err(|e| format!("{method} {url}: {e}"))
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("response has no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "response headers are not UTF-8")?;
    let status_line = head.lines().next().ok_or("empty response")?;
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let body = String::from_utf8_lossy(&raw[split + 4..]).into_owned();
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse() {
        let r = parse_response(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nok\n").unwrap();
        assert_eq!(r, Response { status: 200, body: "ok\n".into() });
        let r = parse_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").unwrap();
        assert_eq!(r.status, 503);
        assert!(parse_response(b"garbage").is_err());
    }
}
