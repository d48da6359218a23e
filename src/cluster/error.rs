//! The error frame both applications send, `{"error":{"code","message"}}`,
//! and its codes: one enum, one builder.

use serde::{Deserialize, Serialize};

/// Error codes, stable for clients (their wire spelling is snake_case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or not a JSON object.
    BadJson,
    /// A field is missing, mistyped or out of range.
    BadRequest,
    /// `method` names nothing the receiver does.
    UnknownMethod,
    /// A bad or missing token.
    Unauthorized,
    /// A heartbeat or forward before any register.
    NotRegistered,
    /// Redis is unreachable: nothing was stored.
    #[serde(rename = "storage_unavailable")]
    Unavailable,
    /// Binary frames are not part of the protocol.
    BadFrame,
    /// Too many registrations from this address (then close 1008).
    RateLimited,
    /// (to users) The target user is not online.
    Offline,
    /// The sender is not a member of the group.
    NotMember,
    /// A code this build does not know (from a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownMethod => "unknown_method",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotRegistered => "not_registered",
            ErrorCode::Unavailable => "storage_unavailable",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Offline => "offline",
            ErrorCode::NotMember => "not_member",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused frame: a code and a message for humans. Its wire form is the
/// body of the error frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolError {
    /// What kind of refusal.
    pub code: ErrorCode,
    /// What was wrong.
    #[serde(default)]
    pub message: String,
}

/// `{"error":{…}}` on the wire.
#[derive(Serialize)]
struct ErrorFrame<'a> {
    error: &'a ProtocolError,
}

impl ProtocolError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
        }
    }

    /// The JSON error frame `{"error":{"code":…,"message":…}}`.
    pub fn to_frame(&self) -> String {
        super::encode(&ErrorFrame { error: self })
    }
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ProtocolError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_and_the_spelling() {
        let e = ProtocolError::new(ErrorCode::Unavailable, "away");
        assert_eq!(
            e.to_frame(),
            r#"{"error":{"code":"storage_unavailable","message":"away"}}"#
        );
        for c in [
            ErrorCode::BadJson,
            ErrorCode::BadRequest,
            ErrorCode::UnknownMethod,
            ErrorCode::Unauthorized,
            ErrorCode::NotRegistered,
            ErrorCode::Unavailable,
            ErrorCode::BadFrame,
            ErrorCode::RateLimited,
            ErrorCode::Offline,
            ErrorCode::NotMember,
        ] {
            let wire = serde_json::to_value(c).unwrap();
            assert_eq!(wire.as_str(), Some(c.as_str()));
            assert_eq!(serde_json::from_value::<ErrorCode>(wire).unwrap(), c);
        }
        let odd: ErrorCode = serde_json::from_str(r#""from_the_future""#).unwrap();
        assert_eq!(odd, ErrorCode::Unknown);
    }
}
