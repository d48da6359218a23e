//! The user ↔ IM server link: JSON text frames over WebSocket on
//! `ws://ip:port/?uid=U&token=T`.
//!
//! ```text
//! user → {"to":"U2","data":…}                       [`UserSend`]
//! user ← {"from":"U1","data":…}                     [`Delivered`]: a message
//! user ← {"method":"reconnect","ip","port","url"}   [`Reconnect`]: the server is draining
//! user ← {"error":{"code":…,"message":…}}           (see [`crate::cluster::error`])
//! ```
//!
//! A user frame has no `method`: any object with a valid `to` and a `data`
//! is a message; anything else is refused with `bad_json` or `bad_request`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cluster::error::{ErrorCode, ProtocolError};
use crate::cluster::ids::valid_uid;

/// A user's message for user `to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserSend {
    /// Target uid.
    pub to: String,
    /// Any JSON.
    pub data: Value,
}

/// Parses a user's text frame.
pub fn parse_user(text: &str) -> Result<UserSend, ProtocolError> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new(ErrorCode::BadJson, format!("not JSON: {e}")))?;
    if !v.is_object() {
        return Err(ProtocolError::new(
            ErrorCode::BadJson,
            "expected a JSON object",
        ));
    }
    let send = UserSend::deserialize(v).map_err(|e| {
        ProtocolError::new(
            ErrorCode::BadRequest,
            format!("expected {{\"to\": uid, \"data\": any}}: {e}"),
        )
    })?;
    if !valid_uid(&send.to) {
        return Err(ProtocolError::new(
            ErrorCode::BadRequest,
            "`to` is not a valid uid",
        ));
    }
    Ok(send)
}

/// The frame a user receives for a message (borrowed: built once per
/// delivery, pushed to every connection).
#[derive(Debug, Serialize)]
pub struct Delivered<'a> {
    /// Sender uid.
    pub from: &'a str,
    /// Payload.
    pub data: &'a Value,
}

impl Delivered<'_> {
    /// The frame's JSON text.
    pub fn to_text(&self) -> String {
        super::encode(self)
    }
}

/// A draining server's farewell: where to reconnect (nulls: nowhere known).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename = "reconnect")]
pub struct Reconnect {
    /// A live server's IP.
    pub ip: Option<String>,
    /// Its port.
    pub port: Option<u16>,
    /// Its `ws://` URL for this user, with a fresh token when auth is on.
    pub url: Option<String>,
}

impl Reconnect {
    /// The frame's JSON text.
    pub fn to_text(&self) -> String {
        super::encode(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn user_frames() {
        assert_eq!(
            parse_user(r#"{"to":"u2","data":{"x":1}}"#).unwrap(),
            UserSend {
                to: "u2".into(),
                data: json!({"x":1})
            }
        );
        let code = |t: &str| parse_user(t).unwrap_err().code;
        assert_eq!(code("nope"), ErrorCode::BadJson);
        assert_eq!(code("[1]"), ErrorCode::BadJson);
        assert_eq!(code(r#"{"data":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"to":"a b","data":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"to":"u2"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"to":5,"data":1}"#), ErrorCode::BadRequest);
    }

    #[test]
    fn frames_to_users() {
        let d = json!([1]);
        assert_eq!(
            Delivered {
                from: "u1",
                data: &d
            }
            .to_text(),
            r#"{"from":"u1","data":[1]}"#
        );
        let gone = Reconnect {
            ip: None,
            port: None,
            url: None,
        };
        assert_eq!(
            gone.to_text(),
            r#"{"method":"reconnect","ip":null,"port":null,"url":null}"#
        );
    }
}
