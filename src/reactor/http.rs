//! HTTP/1.1 for the reactor: the [`Request`] and [`Response`] types, the
//! two-phase request parser (a cheap "need more bytes" answer, then the
//! parse) over a connection's read buffer, and response encoding.
//!
//! Limits: at most [`MAX_HEADERS`] header fields and [`MAX_HEAD`] bytes of
//! request head (431 past either), `Content-Length` bodies up to
//! `package_max_length` (413 past it). Chunked request bodies are refused
//! with 411 Length Required: no client of this framework needs them.

use std::net::SocketAddr;

use crate::reactor::Fd;

/// Most header fields a request may carry.
pub const MAX_HEADERS: usize = 64;
/// Largest request head (request line + headers), in bytes.
pub const MAX_HEAD: usize = 16 * 1024;

/// An HTTP request (also the upgrade request of a WebSocket connection).
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The connection it arrived on.
    pub fd: Fd,
    /// Method, as sent (`GET`).
    pub method: String,
    /// Path with query (`/a?b=1`).
    pub path: String,
    /// HTTP minor version (0 or 1).
    pub version: u8,
    /// Header fields in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
    /// The peer's address.
    pub peer: Option<SocketAddr>,
}

impl Request {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The path without the query.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or("")
    }

    /// The query string (after `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.path.split_once('?').map(|(_, q)| q)
    }

    /// The first value of `key` in the query string, percent-decoded
    /// (`%40` is `@`, `+` a space: what `URLSearchParams` and
    /// `encodeURIComponent` send); borrowed when there was nothing to
    /// decode. Invalid UTF-8 after decoding is replaced (U+FFFD), which no
    /// validated parameter accepts.
    pub fn query_param(&self, key: &str) -> Option<std::borrow::Cow<'_, str>> {
        query_param(self.query()?, key).map(percent_decode)
    }

    /// Whether the connection may stay open after the response.
    pub fn keep_alive(&self) -> bool {
        let conn = self.header("connection").unwrap_or("");
        let has = |t: &str| conn.split(',').any(|v| v.trim().eq_ignore_ascii_case(t));
        if self.version >= 1 {
            !has("close")
        } else {
            has("keep-alive")
        }
    }
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Extra header fields (`Content-Length` and `Connection` are added).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with a body and no extra headers.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// No answer now: the application answers later with
    /// `Server::respond(req.fd, …)` (after a Redis reply, say). Until then
    /// the connection reads no further request.
    pub fn later() -> Response {
        Response::new(0, Vec::new())
    }

    /// Whether this is [`Response::later`].
    pub fn is_later(&self) -> bool {
        self.status == 0
    }

    /// A `text/plain` response.
    pub fn text(status: u16, body: &str) -> Response {
        Response::new(status, body).with_header("Content-Type", "text/plain; charset=utf-8")
    }

    /// An `application/json` response.
    pub fn json(status: u16, body: &serde_json::Value) -> Response {
        Response::new(status, body.to_string()).with_header("Content-Type", "application/json")
    }

    /// Adds a header field.
    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Appends the encoded response to `out`. O(body).
    pub fn encode_into(&self, keep_alive: bool, out: &mut Vec<u8>) {
        use std::io::Write;
        let _ = write!(out, "HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (k, v) in &self.headers {
            // Header injection guard: CR/LF in application values are dropped.
            let clean = |s: &str| s.replace(['\r', '\n'], "");
            let _ = write!(out, "{}: {}\r\n", clean(k), clean(v));
        }
        let _ = write!(
            out,
            "Content-Length: {}\r\nConnection: {}\r\n\r\n",
            self.body.len(),
            if keep_alive { "keep-alive" } else { "close" }
        );
        out.extend_from_slice(&self.body);
    }
}

/// The reason phrase for the statuses this framework sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// What the parser made of the bytes so far.
#[derive(Debug)]
pub enum Parsed {
    /// Need more bytes (the head or the body is incomplete).
    Partial,
    /// A complete request and how many bytes it used.
    Complete(Request, usize),
    /// The input is refused with this status (the connection then closes).
    Reject(u16, &'static str),
}

/// Phase one: whether `buf` can hold a complete head yet (looks for the
/// blank line). O(len).
pub fn head_complete(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

/// Parses one request from the front of `buf`. O(head + body).
pub fn parse_request(buf: &[u8], max_body: usize) -> Parsed {
    if !head_complete(buf) {
        return if buf.len() > MAX_HEAD {
            Parsed::Reject(431, "request head too large")
        } else {
            Parsed::Partial
        };
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Reject(431, "too many header fields")
        }
        Err(_) => return Parsed::Reject(400, "malformed request"),
    };
    if head_len > MAX_HEAD {
        return Parsed::Reject(431, "request head too large");
    }
    let mut out = Request {
        method: req.method.unwrap_or("").to_string(),
        path: req.path.unwrap_or("").to_string(),
        version: req.version.unwrap_or(1),
        ..Request::default()
    };
    let mut length: Option<usize> = None;
    for h in req.headers.iter() {
        let Ok(value) = std::str::from_utf8(h.value) else {
            return Parsed::Reject(400, "header value is not UTF-8");
        };
        if h.name.eq_ignore_ascii_case("content-length") {
            match value.trim().parse::<usize>() {
                Ok(n) if length.map_or(true, |l| l == n) => length = Some(n),
                _ => return Parsed::Reject(400, "bad Content-Length"),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Reject(
                411,
                "chunked request bodies are not supported; send Content-Length",
            );
        }
        out.headers.push((h.name.to_string(), value.to_string()));
    }
    let body_len = length.unwrap_or(0);
    if body_len > max_body {
        return Parsed::Reject(413, "request body exceeds package_max_length");
    }
    if buf.len() < head_len + body_len {
        return Parsed::Partial;
    }
    out.body = buf[head_len..head_len + body_len].to_vec();
    Parsed::Complete(out, head_len + body_len)
}

/// A minimal error response that closes the connection.
pub fn error_response(status: u16, why: &str) -> Vec<u8> {
    let mut out = Vec::new();
    Response::text(status, &format!("{why}\n")).encode_into(false, &mut out);
    out
}

/// Decodes `%XX` escapes and `+` (a space) in a query value; a `%` not
/// followed by two hex digits is kept as it is.
pub fn percent_decode(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['%', '+']) {
        return std::borrow::Cow::Borrowed(v);
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// The first value of `key` in a query string `a=1&b=2`, as sent (see
/// [`Request::query_param`] for the decoded one); a key without `=` has
/// no value.
pub fn query_param<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params() {
        let q = "uid=u1&token=a.b-c&fresh=1&flag&uidx=no";
        assert_eq!(query_param(q, "uid"), Some("u1"));
        assert_eq!(query_param(q, "token"), Some("a.b-c"));
        assert_eq!(query_param(q, "fresh"), Some("1"));
        assert_eq!(query_param(q, "flag"), None);
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(query_param("uidx=1&uid=2", "uid"), Some("2"));
        assert_eq!(percent_decode("a%40b%3Ac"), "a@b:c");
        assert_eq!(percent_decode("x+y%2"), "x y%2");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%FF"), "\u{FFFD}");
        assert!(matches!(
            percent_decode("plain"),
            std::borrow::Cow::Borrowed("plain")
        ));
    }

    #[test]
    fn parses_in_two_phases_with_body() {
        let raw = b"POST /x?a=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello";
        assert!(matches!(parse_request(&raw[..20], 100), Parsed::Partial));
        assert!(matches!(
            parse_request(&raw[..raw.len() - 1], 100),
            Parsed::Partial
        ));
        let Parsed::Complete(r, n) = parse_request(raw, 100) else {
            panic!()
        };
        assert_eq!(
            (r.method.as_str(), r.path_only(), r.query(), n),
            ("POST", "/x", Some("a=1"), raw.len())
        );
        assert_eq!(r.body, b"hello");
        assert!(r.keep_alive());
    }

    #[test]
    fn rejects_with_the_right_status() {
        assert!(matches!(
            parse_request(b"\x00\x01garbage\r\n\r\n", 100),
            Parsed::Reject(400, _)
        ));
        assert!(matches!(
            parse_request(b"POST / HTTP/1.1\r\nContent-Length: 500\r\n\r\n", 100),
            Parsed::Reject(413, _)
        ));
        let many: String = (0..70).map(|i| format!("X-{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(
            parse_request(raw.as_bytes(), 100),
            Parsed::Reject(431, _)
        ));
        assert!(matches!(
            parse_request(&vec![b'a'; MAX_HEAD + 1], 100),
            Parsed::Reject(431, _)
        ));
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(
            parse_request(chunked, 100),
            Parsed::Reject(411, _)
        ));
    }

    #[test]
    fn response_encoding() {
        let mut out = Vec::new();
        Response::text(200, "hi").encode_into(true, &mut out);
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.starts_with("HTTP/1.1 200 OK\r\n") && s.ends_with("Connection: keep-alive\r\n\r\nhi"),
            "{s}"
        );
    }
}
