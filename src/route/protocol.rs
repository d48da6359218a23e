//! The Route's wire protocol with IM servers: JSON text frames, validated
//! into a closed [`Command`] enum. Nothing is ever dispatched by name: an
//! unrecognised `method` becomes [`Command::Unknown`] and gets an error reply.
//!
//! ```text
//! → {"method":"register","serviceName":"IM_1","ip":"192.168.100.153","port":9000}
//!      (+ "token" when auth is on, + optional "load", "epoch")
//! ← {"method":"registered","serviceName":"IM_1","ip":…,"port":…,"lease_ms":…}
//! → {"method":"heartbeat","load":12}            (a load report; pings also count)
//! → {"method":"forward","to":"U2","from":"U1","data":…}   (a user elsewhere)
//! → {"method":"draining"}                        (stopping: no new users)
//! ← {"method":"deliver","to":"U2","from":"U1","data":…}   (a user it holds)
//! ← {"method":"broadcast","from":…,"data":…}
//! ← {"error":{"code":"…","message":"…"}}        (any refused frame)
//! ```

use std::net::IpAddr;

use serde_json::{json, Map, Value};

/// A validated request from an IM server.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Join the registry (the seed's message, unchanged).
    Register(Registration),
    /// A load report; also renews liveness.
    Heartbeat {
        /// Connected users now.
        load: Option<u64>,
    },
    /// A message for a user this IM server does not hold.
    Forward {
        /// Target uid.
        to: String,
        /// Sender uid.
        from: String,
        /// Payload (any JSON).
        data: Value,
    },
    /// The IM server is stopping: hand out no more users to it.
    Draining,
    /// A method this Route does not know.
    Unknown(String),
}

/// The fields of a `register`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// `serviceName`.
    pub service_name: String,
    /// Advertised IP (data: the Route never connects to it).
    pub ip: String,
    /// Advertised port.
    pub port: u16,
    /// Auth token (JWT HS256, aud "register", sub serviceName).
    pub token: Option<String>,
    /// Connected users.
    pub load: Option<u64>,
    /// Instance epoch: new at every IM server start.
    pub epoch: Option<String>,
}

impl Registration {
    /// The `im_server` set member, exactly as the seed's PHP wrote it
    /// (`json_encode(['ip' => …, 'port' => …])`).
    pub fn member(&self) -> String {
        json!({"ip": self.ip, "port": self.port}).to_string()
    }
}

/// Error codes, stable for clients.
pub mod code {
    /// Not JSON, or not a JSON object.
    pub const BAD_JSON: &str = "bad_json";
    /// A field is missing, mistyped or out of range.
    pub const BAD_REQUEST: &str = "bad_request";
    /// `method` names nothing this Route does.
    pub const UNKNOWN_METHOD: &str = "unknown_method";
    /// A bad or missing token.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// A heartbeat before any register.
    pub const NOT_REGISTERED: &str = "not_registered";
    /// Redis is unreachable: nothing was stored.
    pub const UNAVAILABLE: &str = "storage_unavailable";
    /// Binary frames are not part of the protocol.
    pub const BAD_FRAME: &str = "bad_frame";
    /// Too many registrations from this address (then close 1008).
    pub const RATE_LIMITED: &str = "rate_limited";
}

/// A refused frame: a code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    /// One of [`code`].
    pub code: &'static str,
    /// What was wrong.
    pub message: String,
}

impl ProtocolError {
    /// Builds an error.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
        }
    }

    /// The JSON error frame.
    pub fn to_frame(&self) -> String {
        json!({"error": {"code": self.code, "message": self.message}}).to_string()
    }
}

/// Longest serviceName accepted.
const MAX_NAME: usize = 128;

fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a Value, ProtocolError> {
    obj.get(key)
        .ok_or_else(|| ProtocolError::new(code::BAD_REQUEST, format!("missing field `{key}`")))
}

fn string(obj: &Map<String, Value>, key: &str) -> Result<String, ProtocolError> {
    field(obj, key)?
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| {
            ProtocolError::new(code::BAD_REQUEST, format!("field `{key}` must be a string"))
        })
}

fn opt_u64(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, ProtocolError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ProtocolError::new(
                code::BAD_REQUEST,
                format!("field `{key}` must be a non-negative integer"),
            )
        }),
    }
}

fn opt_string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, ProtocolError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ProtocolError::new(
            code::BAD_REQUEST,
            format!("field `{key}` must be a string"),
        )),
    }
}

/// Parses and validates one text frame.
pub fn parse(text: &str) -> Result<Command, ProtocolError> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new(code::BAD_JSON, format!("not JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(ProtocolError::new(code::BAD_JSON, "expected a JSON object"));
    };
    let method = string(&obj, "method")?;
    match method.as_str() {
        "register" => {
            let service_name = string(&obj, "serviceName")?;
            if service_name.is_empty()
                || service_name.len() > MAX_NAME
                || !service_name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c))
            {
                return Err(ProtocolError::new(
                    code::BAD_REQUEST,
                    format!("`serviceName` must be 1..={MAX_NAME} characters of [A-Za-z0-9_.:-]"),
                ));
            }
            let ip = string(&obj, "ip")?;
            if ip.parse::<IpAddr>().is_err() {
                return Err(ProtocolError::new(
                    code::BAD_REQUEST,
                    "`ip` must be an IPv4 or IPv6 address",
                ));
            }
            let port = field(&obj, "port")?
                .as_u64()
                .filter(|p| (1..=65535).contains(p))
                .ok_or_else(|| {
                    ProtocolError::new(code::BAD_REQUEST, "`port` must be an integer in 1..=65535")
                })? as u16;
            Ok(Command::Register(Registration {
                service_name,
                ip,
                port,
                token: opt_string(&obj, "token")?,
                load: opt_u64(&obj, "load")?,
                epoch: opt_string(&obj, "epoch")?,
            }))
        }
        "heartbeat" => Ok(Command::Heartbeat {
            load: opt_u64(&obj, "load")?,
        }),
        "forward" => Ok(Command::Forward {
            to: string(&obj, "to")?,
            from: string(&obj, "from")?,
            data: field(&obj, "data")?.clone(),
        }),
        "draining" => Ok(Command::Draining),
        _ => Ok(Command::Unknown(method.chars().take(64).collect())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_register_is_accepted_verbatim() {
        let seed =
            r#"{"method":"register","serviceName":"IM_1","ip":"192.168.100.153","port":9000}"#;
        let Command::Register(r) = parse(seed).unwrap() else {
            panic!()
        };
        assert_eq!(r.member(), r#"{"ip":"192.168.100.153","port":9000}"#);
        assert_eq!(r.token, None);
    }

    #[test]
    fn bad_frames_get_codes() {
        let code = |t: &str| parse(t).unwrap_err().code;
        assert_eq!(code("{nope"), code::BAD_JSON);
        assert_eq!(code("[1,2]"), code::BAD_JSON);
        assert_eq!(code(r#"{"serviceName":"x"}"#), code::BAD_REQUEST);
        assert_eq!(
            code(r#"{"method":"register","serviceName":"IM_1","ip":"1.2.3.4","port":"9000"}"#),
            code::BAD_REQUEST
        );
        assert_eq!(
            code(r#"{"method":"register","serviceName":"IM_1","ip":"not-an-ip","port":9000}"#),
            code::BAD_REQUEST
        );
        assert_eq!(
            code(r#"{"method":"register","serviceName":"IM 1;drop","ip":"1.2.3.4","port":9000}"#),
            code::BAD_REQUEST
        );
        assert_eq!(
            code(r#"{"method":"register","serviceName":"IM_1","ip":"1.2.3.4","port":70000}"#),
            code::BAD_REQUEST
        );
        assert_eq!(
            code(r#"{"method":"heartbeat","load":-1}"#),
            code::BAD_REQUEST
        );
        assert_eq!(
            parse(r#"{"method":"__destruct"}"#).unwrap(),
            Command::Unknown("__destruct".into())
        );
        assert_eq!(
            parse(r#"{"method":"draining"}"#).unwrap(),
            Command::Draining
        );
        assert!(matches!(
            parse(r#"{"method":"forward","to":"u2","from":"u1","data":[1]}"#).unwrap(),
            Command::Forward { .. }
        ));
        assert_eq!(
            code(r#"{"method":"forward","to":"u2","data":1}"#),
            code::BAD_REQUEST
        );
    }
}
