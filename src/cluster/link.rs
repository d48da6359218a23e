//! The IM server ↔ Route link: JSON text frames over WebSocket, one
//! serde-tagged enum per direction (the tag is the `method` field). A
//! method this build does not know deserialises to the `Unknown` variant;
//! nothing from the wire is ever used as a name to call.
//!
//! ```text
//! IM → Route  [`ImFrame`]
//!   {"method":"register","serviceName":"IM_1","ip":"192.168.100.153","port":9000}
//!        (the seed's frame, unchanged; + "token" when auth is on, + optional "load", "epoch")
//!   {"method":"heartbeat","load":12}
//!   {"method":"forward","to":"U2","from":"U1","data":…[,"stamp":{"epoch","seq","id"}][,"sender":"W/FD"][,"here":true]}
//!   {"method":"draining"}
//!   {"method":"group_send","group","from","data"[,"ref"],"sender":"W/FD"}   a user's group message
//! Route → IM  [`RouteFrame`]
//!   {"method":"registered","serviceName":"IM_1","ip":…,"port":…,"node":…,"lease_ms":…}
//!   {"method":"deliver","to":"U2","from":"U1","data":…[,"stamp":{…}]}
//!        (a stamped message is stored in the user's inbox: see [`crate::cluster::inbox`];
//!         the Route never answers `offline` for one)
//!   {"method":"broadcast","from":…,"data":…}
//!   {"method":"offline","to":"U2","sender":"W/FD"[,"unavailable":true]}
//!        the forward's user is online nowhere (or, unavailable: its location could not be read)
//!   {"method":"check"}   relays may have been dropped: check every user's inbox
//!   {"method":"group_deliver","group","from","data","stamp","mver"}   to the local members
//!   {"method":"group_joined"|"group_left","group","uid","epoch","gseq","mver"}
//!   {"method":"group_sent","sender","ref","group","gseq","id"}   a user's group message is stored
//!   {"method":"group_refused","sender","ref","error":{…}}
//!   {"method":"group_event","group","event":"join"|"leave","uid"}   presence, to the members
//!   {"method":"kick","uid","reason"}   close the user's connections with 4000
//!   {"error":{"code":"…","message":"…"}}     (see [`crate::cluster::error`])
//! ```

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cluster::error::{ErrorCode, ProtocolError};
use crate::cluster::groups::{GroupMessage, Membership};
use crate::cluster::ids::{valid_service_name, MAX_NAME};
use crate::cluster::inbox::Stamp;

/// A message for one user: the body of `forward` and `deliver` (and of the
/// IM workers' own hand-offs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Addressed {
    /// Target uid.
    pub to: String,
    /// Sender uid (or the API caller's label).
    pub from: String,
    /// Payload (any JSON).
    pub data: Value,
    /// Its identity in `to`'s inbox, once stored (none: not stored, with
    /// `inbox = false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<Stamp>,
    /// `forward` only: the sending connection on the IM server
    /// (`<worker>/<fd>`), where an `offline` answer goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// `forward` only: the IM server already delivered to its own
    /// connections of `to`; the Route delivers to the other servers only,
    /// and says nothing if there are none.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub here: bool,
}

impl Addressed {
    /// A message from `from` to `to`.
    pub fn new(to: String, from: String, data: Value) -> Addressed {
        Addressed {
            to,
            from,
            data,
            stamp: None,
            sender: None,
            here: false,
        }
    }
}

/// The Route's answer to a `forward` it could not deliver: the user is
/// online nowhere, or (`unavailable`) where it is could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offline {
    /// The uid that is not online.
    pub to: String,
    /// The `sender` of the forward.
    pub sender: String,
    /// The user's location could not be read (Redis away): nothing was sent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unavailable: bool,
}

/// A message for every user: the body of `broadcast`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Broadcast {
    /// Sender label.
    #[serde(default)]
    pub from: String,
    /// Payload (any JSON).
    pub data: Value,
}

/// A user's group message, on its way to the Route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSend {
    /// The group.
    pub group: String,
    /// The sending user.
    pub from: String,
    /// Payload.
    pub data: Value,
    /// The sender's ref.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The sending connection (`<worker>/<fd>`).
    pub sender: String,
}

/// The Route stored a user's group message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSent {
    /// The sending connection.
    pub sender: String,
    /// The sender's ref.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The group.
    pub group: String,
    /// Its gseq.
    pub gseq: u64,
    /// Its id.
    pub id: String,
}

/// The Route refused a user's group message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRefused {
    /// The sending connection.
    pub sender: String,
    /// The sender's ref.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Why.
    pub error: ProtocolError,
}

/// A presence event for a group's members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupEvent {
    /// The group.
    pub group: String,
    /// `join` or `leave`.
    pub event: String,
    /// Who.
    pub uid: String,
}

/// Close a user's connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kick {
    /// The user.
    pub uid: String,
    /// The close reason.
    #[serde(default)]
    pub reason: String,
}

/// The fields of a `register` (the seed's message, plus optional fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// `serviceName`.
    #[serde(rename = "serviceName")]
    pub service_name: String,
    /// Advertised IP (data: the Route never connects to it).
    pub ip: String,
    /// Advertised port.
    pub port: u16,
    /// Auth token (JWT HS256, aud "register", sub serviceName).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Connected users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<u64>,
    /// Instance epoch: new at every IM server start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

impl Registration {
    /// The `im_server` set member, exactly as the seed's PHP wrote it.
    pub fn member(&self) -> String {
        crate::cluster::servers::member(&self.ip, self.port)
    }

    /// Checks what serde cannot: the name's alphabet and the address.
    fn validate(&self) -> Result<(), ProtocolError> {
        if !valid_service_name(&self.service_name) {
            return Err(ProtocolError::new(
                ErrorCode::BadRequest,
                format!("`serviceName` must be 1..={MAX_NAME} characters of [A-Za-z0-9_.:-]"),
            ));
        }
        if self.ip.parse::<IpAddr>().is_err() {
            return Err(ProtocolError::new(
                ErrorCode::BadRequest,
                "`ip` must be an IPv4 or IPv6 address",
            ));
        }
        if self.port == 0 {
            return Err(ProtocolError::new(
                ErrorCode::BadRequest,
                "`port` must be an integer in 1..=65535",
            ));
        }
        Ok(())
    }
}

/// A frame an IM server sends to the Route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum ImFrame {
    /// Join the registry.
    Register(Registration),
    /// A load report; also renews liveness.
    Heartbeat {
        /// Connected users now.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        load: Option<u64>,
    },
    /// A message for a user this IM server does not hold.
    Forward(Addressed),
    /// The IM server is stopping: hand out no more users to it.
    Draining,
    /// A user's message for a group.
    GroupSend(GroupSend),
    /// A method this build does not know.
    #[serde(other, skip_serializing)]
    Unknown,
}

impl ImFrame {
    /// The frame's JSON text.
    pub fn to_text(&self) -> String {
        super::encode(self)
    }
}

/// The body of `registered`: the stored registration, as the Route holds it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Registered {
    /// `serviceName`.
    #[serde(rename = "serviceName")]
    pub service_name: String,
    /// Advertised IP.
    pub ip: String,
    /// Advertised port.
    pub port: u16,
    /// The Route node holding the connection.
    pub node: String,
    /// The lease length: renewals must come faster than this.
    pub lease_ms: u64,
}

/// A frame the Route sends to an IM server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum RouteFrame {
    /// The registration is stored.
    Registered(Registered),
    /// Deliver to local user `to`.
    Deliver(Addressed),
    /// Deliver to every local user.
    Broadcast(Broadcast),
    /// The user of a `forward` is online nowhere.
    Offline(Offline),
    /// Relays to this server may have been dropped (the Route worker's
    /// pub/sub connection was re-established): check every connection
    /// against its inbox.
    Check,
    /// A group message for the local members.
    GroupDeliver(GroupMessage),
    /// A local user joined a group.
    GroupJoined(Membership),
    /// A local user left a group.
    GroupLeft(Membership),
    /// A user's group message is stored.
    GroupSent(GroupSent),
    /// A user's group message was refused.
    GroupRefused(GroupRefused),
    /// A presence event for a group's members.
    GroupEvent(GroupEvent),
    /// Close every connection of a user (code 4000).
    Kick(Kick),
    /// A refused frame (`{"error":…}`: no `method`).
    #[serde(skip)]
    Error(ProtocolError),
    /// A method this build does not know, or a malformed frame.
    #[serde(other, skip_serializing)]
    Unknown,
}

impl RouteFrame {
    /// The frame's JSON text.
    pub fn to_text(&self) -> String {
        match self {
            RouteFrame::Error(e) => e.to_frame(),
            f => super::encode(f),
        }
    }
}

/// The first checks of every frame: JSON, and an object.
fn object(text: &str) -> Result<Value, ProtocolError> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new(ErrorCode::BadJson, format!("not JSON: {e}")))?;
    if !v.is_object() {
        return Err(ProtocolError::new(
            ErrorCode::BadJson,
            "expected a JSON object",
        ));
    }
    Ok(v)
}

/// Parses and validates one text frame from an IM server (the Route's
/// side). An unknown `method` is refused with `unknown_method`, naming it;
/// a missing, mistyped or out-of-range field with `bad_request`.
pub fn parse_im(text: &str) -> Result<ImFrame, ProtocolError> {
    let v = object(text)?;
    let method = match v.get("method") {
        Some(Value::String(m)) => m.chars().take(64).collect::<String>(),
        Some(_) => {
            return Err(ProtocolError::new(
                ErrorCode::BadRequest,
                "field `method` must be a string",
            ))
        }
        None => {
            return Err(ProtocolError::new(
                ErrorCode::BadRequest,
                "missing field `method`",
            ))
        }
    };
    let frame = ImFrame::deserialize(v)
        .map_err(|e| ProtocolError::new(ErrorCode::BadRequest, format!("{method}: {e}")))?;
    match &frame {
        ImFrame::Register(r) => r.validate()?,
        ImFrame::Unknown => {
            return Err(ProtocolError::new(
                ErrorCode::UnknownMethod,
                format!("unknown method {method:?}"),
            ))
        }
        _ => {}
    }
    Ok(frame)
}

/// Parses one text frame from the Route (the IM server's side): never
/// fails; anything unusable is [`RouteFrame::Unknown`].
pub fn parse_route(text: &str) -> RouteFrame {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return RouteFrame::Unknown;
    };
    if let (None, Some(e)) = (v.get("method"), v.get("error")) {
        return RouteFrame::Error(
            ProtocolError::deserialize(e)
                .unwrap_or_else(|_| ProtocolError::new(ErrorCode::Unknown, e.to_string())),
        );
    }
    RouteFrame::deserialize(v).unwrap_or(RouteFrame::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_seed_register_is_accepted_verbatim() {
        let seed =
            r#"{"method":"register","serviceName":"IM_1","ip":"192.168.100.153","port":9000}"#;
        let ImFrame::Register(r) = parse_im(seed).unwrap() else {
            panic!()
        };
        assert_eq!(r.member(), r#"{"ip":"192.168.100.153","port":9000}"#);
        assert_eq!(r.token, None);
        // What an IM server sends without auth, load or epoch is the seed's frame.
        assert_eq!(ImFrame::Register(r).to_text(), seed);
    }

    #[test]
    fn bad_frames_get_codes() {
        let code = |t: &str| parse_im(t).unwrap_err().code;
        assert_eq!(code("{nope"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadJson);
        assert_eq!(code(r#"{"serviceName":"x"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"method":7}"#), ErrorCode::BadRequest);
        for bad in [
            r#"{"method":"register","serviceName":"IM_1","ip":"1.2.3.4","port":"9000"}"#,
            r#"{"method":"register","serviceName":"IM_1","ip":"not-an-ip","port":9000}"#,
            r#"{"method":"register","serviceName":"IM 1;drop","ip":"1.2.3.4","port":9000}"#,
            r#"{"method":"register","serviceName":"IM_1","ip":"1.2.3.4","port":70000}"#,
            r#"{"method":"register","serviceName":"IM_1","ip":"1.2.3.4","port":0}"#,
            r#"{"method":"heartbeat","load":-1}"#,
            r#"{"method":"forward","to":"u2","data":1}"#,
        ] {
            assert_eq!(code(bad), ErrorCode::BadRequest, "{bad}");
        }
        let e = parse_im(r#"{"method":"__destruct"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownMethod);
        assert!(e.message.contains("__destruct"), "{e}");
        assert_eq!(
            parse_im(r#"{"method":"draining"}"#).unwrap(),
            ImFrame::Draining
        );
        assert_eq!(
            parse_im(r#"{"method":"heartbeat"}"#).unwrap(),
            ImFrame::Heartbeat { load: None }
        );
        assert!(matches!(
            parse_im(r#"{"method":"forward","to":"u2","from":"u1","data":[1]}"#).unwrap(),
            ImFrame::Forward(_)
        ));
    }

    #[test]
    fn frames_round_trip() {
        let a = Addressed::new("u2".into(), "u1".into(), json!({"x": [1, 2]}));
        let fwd = Addressed {
            sender: Some("1/42".into()),
            here: true,
            ..a.clone()
        };
        assert_eq!(
            ImFrame::Forward(a.clone()).to_text(),
            r#"{"method":"forward","to":"u2","from":"u1","data":{"x":[1,2]}}"#,
            "the optional fields stay off the wire when unset"
        );
        for f in [
            ImFrame::Forward(a.clone()),
            ImFrame::Forward(fwd),
            ImFrame::Heartbeat { load: Some(3) },
            ImFrame::Draining,
        ] {
            assert_eq!(parse_im(&f.to_text()).unwrap(), f);
        }
        let reg = Registered {
            service_name: "IM_1".into(),
            ip: "1.2.3.4".into(),
            port: 9000,
            node: "n".into(),
            lease_ms: 30_000,
        };
        for f in [
            RouteFrame::Registered(reg),
            RouteFrame::Deliver(a),
            RouteFrame::Offline(Offline {
                to: "u2".into(),
                sender: "0/7".into(),
                unavailable: false,
            }),
            RouteFrame::Offline(Offline {
                to: "u2".into(),
                sender: "0/7".into(),
                unavailable: true,
            }),
            RouteFrame::Broadcast(Broadcast {
                from: "api".into(),
                data: json!(1),
            }),
            RouteFrame::Error(ProtocolError::new(ErrorCode::Unauthorized, "no")),
        ] {
            assert_eq!(parse_route(&f.to_text()), f);
        }
    }

    #[test]
    fn route_frames() {
        assert!(matches!(
            parse_route(r#"{"method":"registered","serviceName":"x"}"#),
            RouteFrame::Registered(_)
        ));
        assert_eq!(parse_route(r#"{"method":"exec"}"#), RouteFrame::Unknown);
        assert_eq!(
            parse_route(r#"{"method":"deliver","to":"a"}"#),
            RouteFrame::Unknown
        );
        assert_eq!(parse_route("nope"), RouteFrame::Unknown);
        assert!(matches!(
            parse_route(r#"{"error":{"code":"unauthorized"}}"#),
            RouteFrame::Error(ProtocolError {
                code: ErrorCode::Unauthorized,
                ..
            })
        ));
        assert!(matches!(
            parse_route(r#"{"error":"odd"}"#),
            RouteFrame::Error(ProtocolError {
                code: ErrorCode::Unknown,
                ..
            })
        ));
    }
}
