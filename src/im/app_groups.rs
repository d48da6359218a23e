//! [`ImApp`]'s group wiring: the Route's group frames (messages,
//! membership changes, presence events, kicks, answers to a user's group
//! message) handed to [`crate::im::groups::GroupFeeds`] on every worker,
//! and a user's group message on its way to the Route.

use super::ImApp;
use crate::cluster::groups::{GroupMessage, Membership};
use crate::cluster::link::{GroupEvent, GroupSend, ImFrame, Kick, RouteFrame};
use crate::cluster::user::error_frame;
use crate::im::workers::{self, WorkerMsg};
use crate::reactor::{Fd, Message, Server};

/// `<worker>/<fd>`: a sending connection, as the Route echoes it.
fn sender_of(s: &str) -> Option<(usize, Fd)> {
    let (w, fd) = s.split_once('/')?;
    Some((w.parse().ok()?, fd.parse().ok()?))
}

impl ImApp {
    /// A group frame from the Route (worker 0): handled here and by every
    /// sibling, or sent to the sender's worker. Returns the frame back
    /// when it is not a group frame.
    pub(super) fn on_group_frame(
        &mut self,
        srv: &mut Server<Self>,
        f: RouteFrame,
    ) -> Option<RouteFrame> {
        match f {
            RouteFrame::GroupDeliver(m) => {
                crate::im::stats::add(srv, crate::im::stats::GROUP_IN, 1);
                workers::to_siblings(srv, &WorkerMsg::GroupDeliver(m.clone()));
                self.group_deliver(srv, m);
            }
            RouteFrame::GroupJoined(m) => {
                workers::to_siblings(srv, &WorkerMsg::GroupJoined(m.clone()));
                self.group_joined(srv, &m);
            }
            RouteFrame::GroupLeft(m) => {
                workers::to_siblings(srv, &WorkerMsg::GroupLeft(m.clone()));
                self.group_left(srv, &m);
            }
            RouteFrame::GroupEvent(e) => {
                workers::to_siblings(srv, &WorkerMsg::GroupEvent(e.clone()));
                self.group_event(srv, &e);
            }
            RouteFrame::Kick(k) => {
                workers::to_siblings(srv, &WorkerMsg::Kick(k.clone()));
                self.kick(srv, &k);
            }
            RouteFrame::GroupSent(s) => {
                let frame = serde_json::json!({
                    "sent": s.reference, "group": s.group, "gseq": s.gseq, "id": s.id,
                })
                .to_string();
                self.answer_sender(srv, &s.sender, frame);
            }
            RouteFrame::GroupRefused(r) => {
                let frame = error_frame(&r.error, r.reference.as_deref());
                self.answer_sender(srv, &r.sender, frame);
            }
            other => return Some(other),
        }
        None
    }

    /// Pushes `frame` to the connection `sender` names (on this worker or
    /// a sibling).
    fn answer_sender(&mut self, srv: &mut Server<Self>, sender: &str, frame: String) {
        match sender_of(sender) {
            Some((w, fd)) if w == srv.worker_id() => {
                srv.push(fd, Message::Text(frame));
            }
            Some((w, fd)) => workers::send(srv, w, &WorkerMsg::Push { fd, frame }),
            None => log::debug!("im: an answer for an unknown sender {sender:?}"),
        }
    }

    pub(super) fn group_deliver(&mut self, srv: &mut Server<Self>, m: GroupMessage) {
        self.groups.deliver(srv, m);
    }

    pub(super) fn group_joined(&mut self, srv: &mut Server<Self>, m: &Membership) {
        let fds = self.sessions.fds(&m.uid).to_vec();
        self.groups.joined(srv, &fds, m);
    }

    pub(super) fn group_left(&mut self, srv: &mut Server<Self>, m: &Membership) {
        let fds = self.sessions.fds(&m.uid).to_vec();
        self.groups.left(srv, &fds, m);
    }

    pub(super) fn group_event(&mut self, srv: &mut Server<Self>, e: &GroupEvent) {
        let frame = serde_json::json!({"method": e.event, "group": e.group, "uid": e.uid});
        self.groups.event(srv, &e.group, &frame.to_string());
    }

    pub(super) fn kick(&mut self, srv: &mut Server<Self>, k: &Kick) {
        for fd in self.sessions.fds(&k.uid).to_vec() {
            srv.disconnect(fd, 4000, &k.reason);
        }
    }

    /// A user's group message: to the Route (through worker 0), which
    /// checks membership, stores and fans it out, and answers the sender.
    pub(super) fn group_send(
        &mut self,
        srv: &mut Server<Self>,
        fd: Fd,
        from: String,
        group: String,
        data: serde_json::Value,
        reference: Option<String>,
    ) {
        let m = GroupSend {
            group,
            from,
            data,
            reference,
            sender: format!("{}/{fd}", srv.worker_id()),
        };
        if srv.worker_id() == 0 {
            self.route.send(srv, &ImFrame::GroupSend(m));
        } else {
            workers::send(srv, 0, &WorkerMsg::GroupSend(m));
        }
    }
}
