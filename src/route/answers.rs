//! The Route's HTTP answers as typed documents (`/health`, `/ready`,
//! `/api/*`, refusals), shared by the endpoints ([`crate::route::api`])
//! and the answers that wait for a user's location
//! ([`crate::route::delivery`]). `/route`'s answer is built from the
//! picker's pre-serialised parts ([`crate::route::balancer::Slot::answer`]).

use serde::Serialize;

use crate::reactor::Response;

/// A refusal: `{"error", ["message"], ["path"], ["uid"]}`.
#[derive(Serialize)]
pub(crate) struct Refusal<'a> {
    pub(crate) error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) uid: Option<&'a str>,
}

impl<'a> Refusal<'a> {
    pub(crate) fn new(error: &'a str) -> Self {
        Refusal {
            error,
            message: None,
            path: None,
            uid: None,
        }
    }
}

/// `/health`.
#[derive(Serialize)]
pub(crate) struct Health {
    pub(crate) status: &'static str,
    pub(crate) worker_id: usize,
    pub(crate) pid: u32,
}

/// `/ready`: `{"ready":true}`, or false with the reasons.
#[derive(Serialize)]
pub(crate) struct Ready {
    pub(crate) ready: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) reasons: Vec<String>,
}

/// `/api/send` with `inbox = false`.
#[derive(Serialize)]
pub(crate) struct Sent {
    pub(crate) delivered: usize,
}

/// `/api/send`: the message is stored; `delivered` when it was handed to
/// an IM server holding the user, `queued` when the user is online
/// nowhere (or where could not be read): it waits in the inbox.
#[derive(Serialize)]
pub(crate) struct Accepted<'a> {
    pub(crate) uid: &'a str,
    pub(crate) id: &'a str,
    pub(crate) seq: u64,
    pub(crate) epoch: &'a str,
    pub(crate) status: &'static str,
}

/// `/api/message`.
#[derive(Serialize)]
pub(crate) struct MessageStatus<'a> {
    pub(crate) uid: &'a str,
    pub(crate) seq: u64,
    pub(crate) id: &'a str,
    pub(crate) epoch: &'a str,
    pub(crate) status: &'static str,
}

/// `/api/broadcast`.
#[derive(Serialize)]
pub(crate) struct BroadcastDone {
    pub(crate) routes: i64,
}

/// `/api/online`.
#[derive(Serialize)]
pub(crate) struct Online<'a> {
    pub(crate) uid: &'a str,
    pub(crate) online: bool,
    pub(crate) connections: usize,
    pub(crate) servers: Vec<&'a str>,
}

pub(crate) fn answer(status: u16, body: &impl Serialize) -> Response {
    Response::new(status, serde_json::to_vec(body).unwrap_or_default())
        .with_header("Content-Type", "application/json")
}

pub(crate) fn bad(status: u16, error: &str, message: &str) -> Response {
    answer(
        status,
        &Refusal {
            message: Some(message),
            ..Refusal::new(error)
        },
    )
}

pub(crate) fn not_found(path: &str) -> Response {
    answer(
        404,
        &Refusal {
            path: Some(path),
            ..Refusal::new("not_found")
        },
    )
}

pub(crate) fn method_not_allowed(allow: &str) -> Response {
    answer(405, &Refusal::new("method_not_allowed")).with_header("Allow", allow)
}
