//! Frames on the IM server's two kinds of connection, as closed enums:
//! what users send, what the Route sends, and what IM workers hand each
//! other. Unknown input is an `Unknown` variant, never a lookup by name.
//!
//! ```text
//! user  → {"to":"U2","data":…}
//! user  ← {"from":"U1","data":…}                    a delivered message
//! user  ← {"method":"reconnect","ip","port","url"}  the server is draining
//! user  ← {"error":{"code":…,"message":…}}
//! route → {"method":"deliver","to":"U2","from":"U1","data":…}
//! route → {"method":"broadcast","from":…,"data":…}
//! route ← {"method":"forward","to":"U2","from":"U1","data":…}
//! ```

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Longest uid accepted.
pub const MAX_UID: usize = 128;

/// Whether `uid` is acceptable: 1..=128 characters that need no escaping in
/// a URL query or a Redis key.
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= MAX_UID
        && uid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.@:".contains(c))
}

/// A frame from a user.
#[derive(Debug, Clone, PartialEq)]
pub enum UserFrame {
    /// A message for user `to`.
    Send {
        /// Target uid.
        to: String,
        /// Any JSON.
        data: Value,
    },
    /// Anything else, with the reason it was refused.
    Invalid(&'static str, String),
}

/// Parses a user's text frame.
pub fn parse_user(text: &str) -> UserFrame {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return UserFrame::Invalid("bad_json", format!("not JSON: {e}")),
    };
    let Some(obj) = v.as_object() else {
        return UserFrame::Invalid("bad_json", "expected a JSON object".into());
    };
    let Some(to) = obj.get("to").and_then(Value::as_str) else {
        return UserFrame::Invalid(
            "bad_request",
            "field `to` (a uid string) is required".into(),
        );
    };
    if !valid_uid(to) {
        return UserFrame::Invalid("bad_request", "`to` is not a valid uid".into());
    }
    let Some(data) = obj.get("data") else {
        return UserFrame::Invalid("bad_request", "field `data` is required".into());
    };
    UserFrame::Send {
        to: to.to_string(),
        data: data.clone(),
    }
}

/// The frame a user receives for a message.
pub fn delivered_frame(from: &str, data: &Value) -> String {
    json!({"from": from, "data": data}).to_string()
}

/// An error frame for users.
pub fn error_frame(code: &str, message: &str) -> String {
    json!({"error": {"code": code, "message": message}}).to_string()
}

/// A frame from the Route.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteFrame {
    /// The registration is stored.
    Registered,
    /// Deliver to local user `to`.
    Deliver {
        /// Target uid.
        to: String,
        /// Sender uid (or the API caller's label).
        from: String,
        /// Payload.
        data: Value,
    },
    /// Deliver to every local user.
    Broadcast {
        /// Sender label.
        from: String,
        /// Payload.
        data: Value,
    },
    /// An error reply.
    Error(String),
    /// Anything else.
    Unknown,
}

/// Parses a Route frame.
pub fn parse_route(text: &str) -> RouteFrame {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return RouteFrame::Unknown;
    };
    if let Some(e) = v.get("error") {
        return RouteFrame::Error(e.to_string());
    }
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    match v.get("method").and_then(Value::as_str) {
        Some("registered") => RouteFrame::Registered,
        Some("deliver") => match (s("to"), s("from"), v.get("data")) {
            (Some(to), Some(from), Some(data)) => RouteFrame::Deliver {
                to,
                from,
                data: data.clone(),
            },
            _ => RouteFrame::Unknown,
        },
        Some("broadcast") => match v.get("data") {
            Some(data) => RouteFrame::Broadcast {
                from: s("from").unwrap_or_default(),
                data: data.clone(),
            },
            None => RouteFrame::Unknown,
        },
        _ => RouteFrame::Unknown,
    }
}

/// Messages between the workers of one IM server (over the framework's
/// worker-to-worker pipe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WorkerMsg {
    /// Deliver to your local connections of `to`.
    Deliver {
        /// Target uid.
        to: String,
        /// Sender.
        from: String,
        /// Payload.
        data: Value,
    },
    /// Deliver to all your local users.
    Broadcast {
        /// Sender.
        from: String,
        /// Payload.
        data: Value,
    },
    /// (to worker 0) Forward through the Route.
    Forward {
        /// Target uid.
        to: String,
        /// Sender.
        from: String,
        /// Payload.
        data: Value,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_frames() {
        assert_eq!(
            parse_user(r#"{"to":"u2","data":{"x":1}}"#),
            UserFrame::Send {
                to: "u2".into(),
                data: json!({"x":1})
            }
        );
        assert!(matches!(
            parse_user("nope"),
            UserFrame::Invalid("bad_json", _)
        ));
        assert!(matches!(
            parse_user(r#"{"data":1}"#),
            UserFrame::Invalid("bad_request", _)
        ));
        assert!(matches!(
            parse_user(r#"{"to":"a b","data":1}"#),
            UserFrame::Invalid("bad_request", _)
        ));
        assert!(matches!(
            parse_user(r#"{"to":"u2"}"#),
            UserFrame::Invalid("bad_request", _)
        ));
    }

    #[test]
    fn route_frames() {
        assert_eq!(
            parse_route(r#"{"method":"registered","serviceName":"x"}"#),
            RouteFrame::Registered
        );
        assert!(matches!(
            parse_route(r#"{"method":"deliver","to":"a","from":"b","data":1}"#),
            RouteFrame::Deliver { .. }
        ));
        assert_eq!(parse_route(r#"{"method":"exec"}"#), RouteFrame::Unknown);
        assert!(matches!(
            parse_route(r#"{"error":{"code":"unauthorized"}}"#),
            RouteFrame::Error(_)
        ));
    }
}
