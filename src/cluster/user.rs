//! The user ↔ IM server link: JSON text frames over WebSocket on
//! `ws://ip:port/?uid=U&token=T`.
//!
//! ```text
//! user → {"to":"U2","data":…[,"ref":"r"]}             [`UserSend`]
//! user → {"ack":N[,"epoch":E]}                       [`UserFrame::Ack`]: everything ≤ N (of epoch E) is processed
//! user → {"group":G,"data":…[,"ref":"r"]}             a message for a group (the user's)
//! user → {"ack":N,"group":G[,"epoch":E]}             a group's cumulative ack (gseq)
//! user ← {"method":"group","group","epoch","gseq"}    a group's head, after welcome (one per group)
//! user ← {"group":G,"from","data","gseq","id"}         a group message
//! user ← {"method":"join"|"leave","group","uid"}       a group's presence event
//! user ← {"method":"welcome","uid","epoch","seq"}     [`Welcome`]: always the first frame
//! user ← {"method":"resync","epoch","reason"}         [`Resync`]: stored history is gone
//! user ← {"from":"U1","data":…,"seq":N,"id":"…"}      a stored message ([`Delivered`])
//! user ← {"from":"api","data":…}                      a broadcast (not stored: no seq)
//! user ← {"sent":"r","id":"…","seq":N,"epoch":"E"}     [`Sent`]: the message with ref r is stored
//! user ← {"method":"reconnect","ip","port","url"}     [`Reconnect`]: the server is draining
//! user ← {"error":{"code":…,"message":…}[,"ref":"r"]} (see [`crate::cluster::error`])
//! ```
//!
//! The query of the connection: `?uid=U[&token=T][&since=N&epoch=E]`
//! ([`Resume`]). A user frame has no `method`: an object with `ack` is an
//! ack, any other object with a valid `to` and a `data` is a message;
//! anything else is refused with `bad_json` or `bad_request` (with the
//! frame's `ref` when it had one).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cluster::error::{ErrorCode, ProtocolError};
use crate::cluster::ids::valid_uid;

/// Longest `ref` accepted.
pub const MAX_REF: usize = 128;

/// A user's message for user `to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserSend {
    /// Target uid.
    pub to: String,
    /// Any JSON.
    pub data: Value,
    /// The sender's label for the `sent` confirmation (or the error).
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// One frame from a user.
#[derive(Debug, Clone, PartialEq)]
pub enum UserFrame {
    /// A message for another user.
    Send(UserSend),
    /// A cumulative ack: every message up to `seq` is processed.
    Ack {
        /// The last seq processed.
        seq: u64,
        /// The epoch the client counts `seq` in (optional): an ack of
        /// another epoch than the connection's is stale (sent before the
        /// client read a `resync`) and is ignored.
        epoch: Option<String>,
    },
    /// A message for a group the user belongs to.
    GroupSend {
        /// The group.
        group: String,
        /// Any JSON.
        data: Value,
        /// The sender's label for the confirmation.
        reference: Option<String>,
    },
    /// A cumulative ack of a group's messages (gseq).
    GroupAck {
        /// The group.
        group: String,
        /// Everything up to this gseq is processed.
        gseq: u64,
        /// The group epoch the client counts `gseq` in (optional; as
        /// [`UserFrame::Ack`]'s).
        epoch: Option<String>,
    },
}

/// A refused user frame: the error, and the frame's `ref` if it had one.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// What was wrong.
    pub error: ProtocolError,
    /// The frame's `ref`.
    pub reference: Option<String>,
}

impl Refused {
    fn new(code: ErrorCode, message: impl Into<String>, reference: Option<String>) -> Refused {
        Refused {
            error: ProtocolError::new(code, message),
            reference,
        }
    }

    /// `{"error":{…}[,"ref":"…"]}`.
    pub fn to_frame(&self) -> String {
        error_frame(&self.error, self.reference.as_deref())
    }
}

/// `{"error":{…}[,"ref":"…"]}`.
pub fn error_frame(error: &ProtocolError, reference: Option<&str>) -> String {
    #[derive(Serialize)]
    struct F<'a> {
        error: &'a ProtocolError,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    }
    super::encode(&F { error, reference })
}

/// Parses a user's text frame.
pub fn parse_user(text: &str) -> Result<UserFrame, Refused> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| Refused::new(ErrorCode::BadJson, format!("not JSON: {e}"), None))?;
    let Value::Object(o) = v else {
        return Err(Refused::new(
            ErrorCode::BadJson,
            "expected a JSON object",
            None,
        ));
    };
    let reference = match o.get("ref") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) if r.len() <= MAX_REF => Some(r.clone()),
        Some(_) => {
            return Err(Refused::new(
                ErrorCode::BadRequest,
                format!("`ref` must be a string of at most {MAX_REF} bytes"),
                None,
            ))
        }
    };
    let group = match o.get("group") {
        None => None,
        Some(Value::String(g)) if crate::cluster::groups::valid_group(g) => Some(g.clone()),
        Some(_) => {
            return Err(Refused::new(
                ErrorCode::BadRequest,
                format!("`group`: {}", crate::cluster::groups::GROUP_RULE),
                reference,
            ))
        }
    };
    if let Some(a) = o.get("ack") {
        let epoch = match o.get("epoch") {
            None | Some(Value::Null) => None,
            Some(Value::String(e)) => Some(e.clone()),
            Some(e) => {
                return Err(Refused::new(
                    ErrorCode::BadRequest,
                    format!("`epoch` must be a string, not {e}"),
                    reference,
                ))
            }
        };
        return match (a.as_u64(), group) {
            (Some(n), Some(group)) => Ok(UserFrame::GroupAck {
                group,
                gseq: n,
                epoch,
            }),
            (Some(seq), None) => Ok(UserFrame::Ack { seq, epoch }),
            (None, _) => Err(Refused::new(
                ErrorCode::BadRequest,
                format!("`ack` must be a non-negative integer seq, not {a}"),
                reference,
            )),
        };
    }
    if let Some(group) = group {
        if o.contains_key("to") {
            return Err(Refused::new(
                ErrorCode::BadRequest,
                "a message goes `to` a user or to a `group`, not both",
                reference,
            ));
        }
        let Some(data) = o.get("data").cloned() else {
            return Err(Refused::new(
                ErrorCode::BadRequest,
                "expected {\"group\": name, \"data\": any}",
                reference,
            ));
        };
        return Ok(UserFrame::GroupSend {
            group,
            data,
            reference,
        });
    }
    let send = UserSend::deserialize(Value::Object(o)).map_err(|e| {
        Refused::new(
            ErrorCode::BadRequest,
            format!("expected {{\"to\": uid, \"data\": any}} or {{\"ack\": seq}}: {e}"),
            reference.clone(),
        )
    })?;
    if !valid_uid(&send.to) {
        return Err(Refused::new(
            ErrorCode::BadRequest,
            "`to` is not a valid uid",
            reference,
        ));
    }
    Ok(UserFrame::Send(send))
}

/// Where a reconnecting client resumes: the `since` and `epoch` query
/// parameters of its connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resume {
    /// The last seq it processed.
    pub since: Option<u64>,
    /// The epoch that seq belongs to.
    pub epoch: Option<String>,
}

impl Resume {
    /// Reads `since` and `epoch`; a malformed value is refused, naming it.
    pub fn parse(since: Option<&str>, epoch: Option<&str>) -> Result<Resume, String> {
        let since = match since {
            None | Some("") => None,
            Some(s) => Some(s.parse::<u64>().map_err(|_| {
                format!("since={s:?}: must be the last seq received (a non-negative integer)")
            })?),
        };
        let epoch = match epoch {
            None | Some("") => None,
            Some(e) if e.len() <= 64 && e.chars().all(|c| c.is_ascii_alphanumeric()) => {
                Some(e.to_string())
            }
            Some(e) => {
                let shown: String = e.chars().take(64).collect();
                return Err(format!(
                    "epoch={shown:?}: must be the epoch of a welcome frame (letters and digits)"
                ));
            }
        };
        if epoch.is_some() && since.is_none() {
            return Err("epoch without since: resume with both, or neither".into());
        }
        Ok(Resume { since, epoch })
    }
}

/// The per-group positions of a reconnecting member: the `gsince` query
/// parameter, `G~E~N[,G2~E2~N2…]` (group, its epoch, the last gseq
/// processed); a malformed one is refused, naming it.
pub fn parse_gsince(q: Option<&str>) -> Result<std::collections::HashMap<String, Resume>, String> {
    let mut out = std::collections::HashMap::new();
    let Some(q) = q.filter(|q| !q.is_empty()) else {
        return Ok(out);
    };
    for part in q.split(',') {
        let mut it = part.split('~');
        let (Some(g), Some(e), Some(n), None) = (it.next(), it.next(), it.next(), it.next()) else {
            return Err(format!("gsince part {part:?}: expected group~epoch~gseq"));
        };
        if !crate::cluster::groups::valid_group(g) {
            return Err(format!(
                "gsince part {part:?}: {}",
                crate::cluster::groups::GROUP_RULE
            ));
        }
        let r = Resume::parse(Some(n), Some(e))
            .map_err(|why| format!("gsince part {part:?}: {why}"))?;
        out.insert(g.to_string(), r);
    }
    Ok(out)
}

/// The first frame on every user connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename = "welcome")]
pub struct Welcome {
    /// The user.
    pub uid: String,
    /// Its epoch.
    pub epoch: String,
    /// The highest seq stored for it.
    pub seq: u64,
}

impl Welcome {
    /// The frame's JSON text.
    pub fn to_text(&self) -> String {
        super::encode(self)
    }
}

/// The stored history the client holds is gone (`reason`: `epoch`, Redis
/// lost it; `trimmed`, messages it had not processed were trimmed by the
/// inbox's bounds): reload from your own source of truth, and continue in
/// `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename = "resync")]
pub struct Resync {
    /// The epoch to continue in.
    pub epoch: String,
    /// `epoch` or `trimmed`.
    pub reason: String,
    /// The group whose stream it is (none: the user's inbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl Resync {
    /// The frame's JSON text.
    pub fn to_text(&self) -> String {
        super::encode(self)
    }
}

/// A sender's confirmation: the message with this `ref` is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    /// The sender's ref.
    pub sent: String,
    /// The message's id.
    pub id: String,
    /// Its seq in the recipient's inbox.
    pub seq: u64,
    /// The recipient's epoch it is stored in.
    pub epoch: String,
}

impl Sent {
    /// The frame's JSON text.
    pub fn to_text(&self) -> String {
        super::encode(self)
    }
}

/// The frame a user receives for a message (borrowed: built once per
/// delivery, pushed to every connection); `seq` and `id` for a stored one.
#[derive(Debug, Serialize)]
pub struct Delivered<'a> {
    /// Sender uid.
    pub from: &'a str,
    /// Payload.
    pub data: &'a Value,
    /// Its seq in the recipient's inbox.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Its id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
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
            UserFrame::Send(UserSend {
                to: "u2".into(),
                data: json!({"x":1}),
                reference: None,
            })
        );
        assert_eq!(
            parse_user(r#"{"ack":12}"#).unwrap(),
            UserFrame::Ack {
                seq: 12,
                epoch: None
            }
        );
        assert_eq!(
            parse_user(r#"{"ack":12,"epoch":"e1"}"#).unwrap(),
            UserFrame::Ack {
                seq: 12,
                epoch: Some("e1".into())
            }
        );
        let r = parse_user(r#"{"to":"a b","data":1,"ref":"r9"}"#).unwrap_err();
        assert_eq!(r.reference.as_deref(), Some("r9"));
        assert_eq!(
            r.to_frame(),
            r#"{"error":{"code":"bad_request","message":"`to` is not a valid uid"},"ref":"r9"}"#
        );
        let code = |t: &str| parse_user(t).unwrap_err().error.code;
        assert_eq!(code(r#"{"ack":-1}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"ack":"x"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"ack":1.5}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"ack":1,"epoch":7}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"to":"u2","data":1,"ref":7}"#),
            ErrorCode::BadRequest
        );
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
                data: &d,
                seq: None,
                id: None,
            }
            .to_text(),
            r#"{"from":"u1","data":[1]}"#
        );
        assert_eq!(
            Welcome {
                uid: "u".into(),
                epoch: "e1".into(),
                seq: 3
            }
            .to_text(),
            r#"{"method":"welcome","uid":"u","epoch":"e1","seq":3}"#
        );
        assert_eq!(
            Sent {
                sent: "r".into(),
                id: "i".into(),
                seq: 2,
                epoch: "e".into(),
            }
            .to_text(),
            r#"{"sent":"r","id":"i","seq":2,"epoch":"e"}"#
        );
        assert_eq!(Resume::parse(None, None).unwrap(), Resume::default());
        assert_eq!(
            Resume::parse(Some("4"), Some("ab12")).unwrap(),
            Resume {
                since: Some(4),
                epoch: Some("ab12".into())
            }
        );
        assert!(Resume::parse(Some("-1"), None).is_err());
        assert!(Resume::parse(Some("x"), None).is_err());
        assert!(Resume::parse(Some("1"), Some("a;b")).is_err());
        assert!(Resume::parse(None, Some("ab")).is_err());
        let g = parse_gsince(Some("room~e1~4,b~e2~0")).unwrap();
        assert_eq!(g["room"].since, Some(4));
        assert!(parse_gsince(Some("room~e1")).is_err());
        assert!(parse_gsince(Some("a b~e~1")).is_err());
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
