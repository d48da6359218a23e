//! The tests' blocking WebSocket client with timeouts ([`ws_connect`],
//! [`ws_connect_from`], [`WsClient`]), re-exported by `common`.

use super::*;

/// Result type of the WebSocket helpers.
pub type WsResult<T> = Result<T, tungstenite::Error>;

/// A blocking WebSocket client over a plain `TcpStream` whose reads and writes
/// time out (5 s unless changed with [`WsClient::set_timeout`]).
pub struct WsClient {
    ws: WebSocket<TcpStream>,
    response: tungstenite::handshake::client::Response,
}

/// Connects to `url` (`ws://127.0.0.1:PORT/path`) and completes the handshake.
pub fn ws_connect(url: &str) -> WsResult<WsClient> {
    ws_connect_inner(None, url)
}

/// Like [`ws_connect`], but binds the client socket to `local_ip` (any
/// 127.0.0.x) first, so the server sees that source address.
pub fn ws_connect_from(local_ip: Ipv4Addr, url: &str) -> WsResult<WsClient> {
    ws_connect_inner(Some(local_ip), url)
}

fn ws_connect_inner(local_ip: Option<Ipv4Addr>, url: &str) -> WsResult<WsClient> {
    let request = url.into_client_request()?;
    let host = request.uri().host().unwrap_or("127.0.0.1").to_string();
    let port = request.uri().port_u16().unwrap_or(80);
    let addr = resolve((host.as_str(), port))?;
    let stream = tcp_connect_from(local_ip, addr)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    match tungstenite::client(request, stream) {
        Ok((ws, response)) => Ok(WsClient { ws, response }),
        Err(HandshakeError::Failure(e)) => Err(e),
        Err(HandshakeError::Interrupted(_)) => Err(tungstenite::Error::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            "WebSocket handshake timed out",
        ))),
    }
}

fn tcp_connect_from(local_ip: Option<Ipv4Addr>, addr: SocketAddr) -> io::Result<TcpStream> {
    let Some(ip) = local_ip else {
        return TcpStream::connect_timeout(&addr, IO_TIMEOUT);
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.bind(&SocketAddr::from((ip, 0)).into())?;
    socket.connect_timeout(&addr.into(), IO_TIMEOUT)?;
    Ok(socket.into())
}

impl WsClient {
    /// The server's handshake response (status, headers).
    pub fn response(&self) -> &tungstenite::handshake::client::Response {
        &self.response
    }

    /// The client socket's local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.ws.get_ref().local_addr().expect("local_addr")
    }

    /// Changes the read and write timeout of the underlying socket.
    pub fn set_timeout(&mut self, timeout: Duration) {
        let s = self.ws.get_ref();
        s.set_read_timeout(Some(timeout)).expect("set_read_timeout");
        s.set_write_timeout(Some(timeout))
            .expect("set_write_timeout");
    }

    pub fn send_text(&mut self, text: impl Into<String>) -> WsResult<()> {
        self.ws.send(Message::text(text.into()))
    }

    pub fn send_binary(&mut self, data: impl Into<Vec<u8>>) -> WsResult<()> {
        self.ws.send(Message::binary(data.into()))
    }

    /// Serialises `value` and sends it as a text message.
    pub fn send_json(&mut self, value: &serde_json::Value) -> WsResult<()> {
        self.send_text(value.to_string())
    }

    /// Sends any message, including control frames.
    pub fn send(&mut self, msg: Message) -> WsResult<()> {
        self.ws.send(msg)
    }

    /// The next Text, Binary or Close message. Pings are answered
    /// automatically and, like pongs, skipped. A timeout is an `Io` error of
    /// kind `WouldBlock` or `TimedOut`.
    pub fn recv(&mut self) -> WsResult<Message> {
        loop {
            match self.ws.read()? {
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                m => return Ok(m),
            }
        }
    }

    /// The next message of any kind, control frames included.
    pub fn recv_any(&mut self) -> WsResult<Message> {
        self.ws.read()
    }

    /// Like [`recv`](Self::recv) with a one-off timeout.
    pub fn recv_timeout(&mut self, timeout: Duration) -> WsResult<Message> {
        self.ws.get_ref().set_read_timeout(Some(timeout))?;
        let res = self.recv();
        self.ws.get_ref().set_read_timeout(Some(IO_TIMEOUT))?;
        res
    }

    /// The next message, which must be a text message holding JSON.
    #[track_caller]
    pub fn recv_text_json(&mut self) -> serde_json::Value {
        match self.recv() {
            Ok(Message::Text(t)) => serde_json::from_str(t.as_str())
                .unwrap_or_else(|e| panic!("text message is not JSON ({e}): {t}")),
            Ok(other) => panic!("expected a JSON text message, got {other:?}"),
            Err(e) => panic!("expected a JSON text message, got error: {e}"),
        }
    }

    /// The next JSON text frame within `timeout` (skipping pings and
    /// binary frames), or None: timed out, closed or broken.
    pub fn next_json(&mut self, timeout: Duration) -> Option<serde_json::Value> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            match self.recv_timeout(Duration::from_millis(100)) {
                Ok(Message::Text(t)) => {
                    return Some(
                        serde_json::from_str(t.as_str())
                            .unwrap_or_else(|e| panic!("text message is not JSON ({e}): {t}")),
                    )
                }
                Ok(Message::Close(_)) => return None,
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// Whether the connection is closed by the peer within `timeout`: a Close
    /// frame, EOF or a reset, after skipping any data messages still queued.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let _ = self.ws.get_ref().set_read_timeout(Some(timeout));
        loop {
            match self.ws.read() {
                Ok(Message::Close(_)) => return true,
                Ok(_) if Instant::now() < deadline => continue,
                Ok(_) => return false,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }

    /// Sends a Close frame and waits (bounded by the socket timeout) for the
    /// server's Close in reply.
    pub fn close(mut self) -> WsResult<()> {
        match self.ws.close(None) {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => {}
            Err(e) => return Err(e),
        }
        loop {
            match self.ws.read() {
                Ok(_) => continue,
                Err(tungstenite::Error::ConnectionClosed)
                | Err(tungstenite::Error::AlreadyClosed) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// The underlying tungstenite socket, for anything not covered here.
    pub fn inner(&mut self) -> &mut WebSocket<TcpStream> {
        &mut self.ws
    }
}
