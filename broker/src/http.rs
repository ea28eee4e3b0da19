//! A minimal HTTP/1.1 client for the admin API: one request per connection, JSON bodies,
//! redirects reported (or followed, for tools). Used by brokers to reach the owners of other
//! topics and by `magnetar admin`.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest a request may take end to end.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Redirects followed by [`request_following`].
const MAX_REDIRECTS: usize = 5;

/// An answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// The `Location` header, if any.
    pub location: Option<String>,
    /// The body (chunked encoding undone).
    pub body: String,
}

/// `http://host:port` (or `host:port`) → `host:port`; `https` is refused.
fn authority(base: &str) -> io::Result<&str> {
    if base.starts_with("https://") {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "https is not supported yet; use http://"));
    }
    let rest = base.trim_start_matches("http://");
    Ok(rest.split('/').next().unwrap_or(rest))
}

/// One request to `base` (`http://host:port`); redirects are returned, not followed.
pub async fn request(base: &str, method: &str, path: &str, body: &str) -> io::Result<HttpResponse> {
    let addr = authority(base)?.to_owned();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, io::Error>(buf)
    };
    let buf = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("{method} {path} at {addr} timed out")))??;
    parse(&String::from_utf8_lossy(&buf))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("malformed HTTP answer from {addr}")))
}

/// Like [`request`], following 307/308 redirects (to other brokers) with the same method and
/// body, as pulsar-admin does.
pub async fn request_following(base: &str, method: &str, path: &str, body: &str) -> io::Result<HttpResponse> {
    let (mut base, mut path) = (base.to_owned(), path.to_owned());
    for _ in 0..MAX_REDIRECTS {
        let r = request(&base, method, &path, body).await?;
        match (&r.status, &r.location) {
            (307 | 308, Some(loc)) => {
                let (host, p) = split_location(loc)?;
                (base, path) = (format!("http://{host}"), p);
            }
            _ => return Ok(r),
        }
    }
    Err(io::Error::other(format!("more than {MAX_REDIRECTS} redirects for {method} {path}")))
}

/// `http://host:port/path?query` → (`host:port`, `/path?query`).
pub fn split_location(loc: &str) -> io::Result<(String, String)> {
    let rest = loc
        .strip_prefix("http://")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unsupported redirect to {loc}")))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    Ok((host.to_owned(), if path.is_empty() { "/".into() } else { path.to_owned() }))
}

fn parse(text: &str) -> Option<HttpResponse> {
    let status: u16 = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut location = None;
    let mut chunked = false;
    for line in head.lines().skip(1) {
        let Some((k, v)) = line.split_once(':') else { continue };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "location" {
            location = Some(v.to_owned());
        } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
    }
    let body = if chunked {
        let mut out = String::new();
        let mut r = rest;
        while let Some((size, tail)) = r.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            r = tail.get(n + 2..).unwrap_or("");
        }
        out
    } else {
        rest.to_owned()
    };
    Some(HttpResponse { status, location, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_with_location_and_chunks() {
        let r = parse("HTTP/1.1 307 Temporary Redirect\r\nLocation: http://b:8080/x?y=1\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(
            r,
            Some(HttpResponse { status: 307, location: Some("http://b:8080/x?y=1".into()), body: "".into() })
        );
        let r = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n");
        assert_eq!(r.map(|r| (r.status, r.body)), Some((200, "abcde".into())));
        assert_eq!(parse("garbage"), None);
        assert!(authority("https://x:1").is_err());
        assert_eq!(authority("http://h:1/p").ok(), Some("h:1"));
    }
}
