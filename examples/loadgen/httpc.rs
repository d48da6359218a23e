//! A keep-alive HTTP/1.1 client for the `http`, `api-send` and `group`
//! modes: one request in flight per connection, `Content-Length` bodies
//! only (what swocloud answers); a reconnecting [`Client`] and a pool of
//! them ([`post_pool`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::connect::{resolve_loopback, ErrorLog};
use crate::{CONNECT_TIMEOUT, ECHO_TIMEOUT};

/// A parsed `http://host:port/path` URL: the loopback address and the
/// request target.
pub fn parse_http_url(url: &str) -> Result<(SocketAddr, String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("bad --url {url}: only http:// is supported"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = resolve_loopback(hostport, hostport)?;
    Ok((addr, hostport.to_string(), path.to_string()))
}

/// One keep-alive HTTP/1.1 connection.
pub struct HttpConn {
    stream: tokio::io::BufReader<TcpStream>,
    host: String,
}

impl HttpConn {
    /// Connects within [`CONNECT_TIMEOUT`], with `TCP_NODELAY`.
    pub async fn open(addr: SocketAddr, host: &str) -> Result<Self, String> {
        let stream = timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(HttpConn {
            stream: tokio::io::BufReader::new(stream),
            host: host.to_string(),
        })
    }

    /// Sends one request and reads the answer: (status, body).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), String> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        let exchange = async {
            self.stream
                .get_mut()
                .write_all(&bytes)
                .await
                .map_err(|e| format!("send: {e}"))?;
            let mut line = String::new();
            let mut status = 0u16;
            let mut len = 0usize;
            let mut first = true;
            loop {
                line.clear();
                let n = self
                    .stream
                    .read_line(&mut line)
                    .await
                    .map_err(|e| format!("recv: {e}"))?;
                if n == 0 {
                    return Err("closed by server".to_string());
                }
                let l = line.trim_end();
                if first {
                    first = false;
                    status = l
                        .split(' ')
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| format!("bad status line {l:?}"))?;
                } else if l.is_empty() {
                    break;
                } else if let Some((k, v)) = l.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().map_err(|_| "bad Content-Length")?;
                    }
                }
            }
            let mut out = vec![0u8; len];
            self.stream
                .read_exact(&mut out)
                .await
                .map_err(|e| format!("recv body: {e}"))?;
            Ok((status, out))
        };
        timeout(ECHO_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err("request timed out".to_string()))
    }
}

/// A keep-alive connection to `http://host:port[/base]`, opened on first
/// use and reopened after a failure.
pub struct Client {
    addr: std::net::SocketAddr,
    host: String,
    base: String,
    conn: Option<HttpConn>,
}

impl Client {
    /// A client of `url` (loopback only); nothing is opened yet.
    pub fn new(url: &str) -> Result<Client, String> {
        let (addr, host, path) = parse_http_url(url)?;
        Ok(Client {
            addr,
            host,
            base: path.trim_end_matches('/').to_string(),
            conn: None,
        })
    }

    /// `method base+path` with a JSON `body`: (status, body).
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<(u16, Vec<u8>), String> {
        let conn = match self.conn.as_mut() {
            Some(c) => c,
            None => self
                .conn
                .insert(HttpConn::open(self.addr, &self.host).await?),
        };
        let r = conn
            .request(method, &format!("{}{path}", self.base), body.as_bytes())
            .await;
        if r.is_err() {
            self.conn = None;
        }
        r
    }
}

/// An unexpected answer, for an error tally.
pub fn http_error(status: u16, body: &[u8]) -> String {
    let b: String = String::from_utf8_lossy(body).chars().take(100).collect();
    format!("HTTP {status} {b}")
}

/// `n` requests `make(i)` (path, JSON body) over `conns` keep-alive
/// connections (`POST`), one in flight on each; how many were answered 200.
pub async fn post_pool<F>(
    route: &str,
    conns: usize,
    n: usize,
    errors: &Arc<ErrorLog>,
    make: F,
) -> usize
where
    F: Fn(usize) -> (&'static str, String) + Send + Sync + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let make = Arc::new(make);
    let mut tasks = Vec::new();
    for _ in 0..conns.max(1) {
        let (next, ok, make, errors) = (next.clone(), ok.clone(), make.clone(), errors.clone());
        let Ok(mut api) = Client::new(route) else {
            break;
        };
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= n {
                    return;
                }
                let (path, body) = make(i);
                match api.call("POST", path, &body).await {
                    Ok((200, _)) => {
                        ok.fetch_add(1, Relaxed);
                    }
                    Ok((s, b)) => errors.record(http_error(s, &b)),
                    Err(e) => errors.record(e),
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    ok.load(Relaxed)
}
