//! A client of the inbox protocol (`src/cluster/user.rs`) that behaves
//! like a real one, and a [`Ledger`] of what the system promised it and
//! what it got, for tests that check delivery end to end under faults.
//!
//! A [`Client`] keeps the `epoch` and `last` seq it holds, connects
//! through `/route` and resumes with `&since=last&epoch=E` once welcomed,
//! drops what it already has (seq ≤ last: counted, not kept twice),
//! follows `resync` (a new epoch: last = 0), close codes (4003: reconnect
//! without since/epoch; 1013: wait a moment) and drain hints, acks
//! cumulatively now and then, and sends to other users with a `ref`. A
//! message is *accepted* when its sender holds its stamp (`sent` for the
//! ref, or a 200 from `/api/send` with its seq): [`Ledger::accepted`].
//! Included by the tests that use it with `#[path]`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::common::cluster::SECRET;
use crate::common::{http_get, http_request, is_timeout, ws_connect, WsClient};
use serde_json::{json, Value};
use tungstenite::Message;

/// A message the system accepted: stored in `to`'s inbox as `seq` of `epoch`.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub to: String,
    pub epoch: String,
    pub seq: u64,
    /// The test's own id (`data.id`).
    pub data: String,
    /// The server's id.
    pub id: String,
    pub at: Instant,
}

/// A `resync` a user was told: from epoch `old` to `new`.
#[derive(Debug, Clone)]
pub struct Resync {
    pub uid: String,
    pub old: String,
    pub new: String,
    pub reason: String,
    pub at: Instant,
}

/// What became of an accepted message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Its recipient kept it (same epoch, seq and `data.id`).
    Delivered,
    /// Not received, and its recipient was told `resync` away from its epoch.
    Resynced,
    /// Neither (yet).
    Lost,
}

/// What the clients and senders of a test record.
#[derive(Default)]
pub struct Ledger {
    /// Clients send nothing more (they still receive).
    pub stop_sending: AtomicBool,
    /// Clients close and their threads end.
    pub quit: AtomicBool,
    pub accepted: Mutex<Vec<Accepted>>,
    /// What the clients kept after dedupe: (uid, epoch, seq) → `data.id`.
    pub received: Mutex<HashMap<(String, String, u64), String>>,
    pub resyncs: Mutex<Vec<Resync>>,
    /// Each user's epoch, as its client holds it.
    pub epochs: Mutex<HashMap<String, String>>,
    /// When a send was refused (a 503, an error frame with its ref).
    pub refused: Mutex<Vec<Instant>>,
    /// Sends whose answer never came (the socket or the HTTP connection
    /// died): maybe stored, maybe not; not accepted.
    pub unanswered: AtomicU64,
    /// User sends never answered, when sent (with the user and what).
    pub silent: Mutex<Vec<(Instant, String, String)>>,
    /// User sends waiting for their `sent`.
    pub pending: AtomicI64,
    /// Stored messages a client dropped as already had (seq ≤ last).
    pub dropped: AtomicU64,
    /// What the protocol rules out: a gap, a silent epoch change, a frame
    /// before `welcome`, a message before an announced resync.
    pub violations: Mutex<Vec<String>>,
    /// Error frames without a ref.
    pub errors: Mutex<Vec<String>>,
    /// Each user's connection history, to explain a loss.
    pub events: Mutex<Vec<(Instant, String, String)>>,
    pub reconnects: AtomicU64,
}

impl Ledger {
    /// Records an accepted message from its `{"epoch","seq","id"}` stamp.
    pub fn accept(&self, to: &str, v: &Value, data: &str) -> bool {
        let (Some(epoch), Some(seq), Some(id)) =
            (v["epoch"].as_str(), v["seq"].as_u64(), v["id"].as_str())
        else {
            return false;
        };
        self.accepted.lock().unwrap().push(Accepted {
            to: to.into(),
            epoch: epoch.into(),
            seq,
            data: data.into(),
            id: id.into(),
            at: Instant::now(),
        });
        true
    }

    pub fn event(&self, uid: &str, what: String) {
        let e = (Instant::now(), uid.to_string(), what);
        self.events.lock().unwrap().push(e);
    }

    fn violation(&self, uid: &str, what: String) {
        self.event(uid, format!("VIOLATION {what}"));
        self.violations
            .lock()
            .unwrap()
            .push(format!("{uid}: {what}"));
    }

    /// Every accepted message with its fate, now.
    pub fn fates(&self) -> Vec<(Accepted, Fate)> {
        let received = self.received.lock().unwrap();
        let left: HashSet<(String, String)> = (self.resyncs.lock().unwrap().iter())
            .filter(|r| r.old != r.new)
            .map(|r| (r.uid.clone(), r.old.clone()))
            .collect();
        let accepted = self.accepted.lock().unwrap();
        (accepted.iter())
            .map(|a| {
                let key = (a.to.clone(), a.epoch.clone(), a.seq);
                let fate = if received.get(&key) == Some(&a.data) {
                    Fate::Delivered
                } else if left.contains(&(a.to.clone(), a.epoch.clone())) {
                    Fate::Resynced
                } else {
                    Fate::Lost
                };
                (a.clone(), fate)
            })
            .collect()
    }
}

/// One user's client: where it resumes from.
pub struct Client {
    uid: String,
    /// Users `u0`…: whom it sends to.
    peers: usize,
    epoch: Option<String>,
    last: u64,
    acked: u64,
    /// Resume with since/epoch (not right after a 4003).
    resume: bool,
    /// Where a drain hint said to reconnect.
    hint: Option<String>,
    sends: u64,
}

impl Client {
    /// Connects through `/route` (or the drain hint); whether it resumed.
    fn connect(&mut self, route: &str, sh: &Ledger) -> Option<(WsClient, bool)> {
        let url = match self.hint.take() {
            Some(u) => u,
            None => {
                let token = swocloud::auth::mint(SECRET.as_bytes(), &self.uid, "user", 600);
                let q = format!("/route?uid={}&token={token}", self.uid);
                let (status, _, body) = http_get(route, &q).ok()?;
                if status != 200 {
                    return None;
                }
                serde_json::from_str::<Value>(&body).ok()?["url"]
                    .as_str()?
                    .to_string()
            }
        };
        let resumed = self.resume && self.epoch.is_some();
        let host = url.split('/').nth(2).unwrap_or("?").to_string();
        let url = match &self.epoch {
            Some(e) if resumed => format!("{url}&since={}&epoch={e}", self.last),
            _ => url,
        };
        let ws = ws_connect(&url).ok()?;
        sh.event(
            &self.uid,
            format!("connected to {host}, since {}", self.last),
        );
        Some((ws, resumed))
    }

    fn adopt(&mut self, sh: &Ledger, epoch: &str) {
        (self.epoch, self.last, self.acked) = (Some(epoch.to_string()), 0, 0);
        let mut e = sh.epochs.lock().unwrap();
        e.insert(self.uid.clone(), epoch.to_string());
    }

    /// One connection, until it ends; returns why it ended.
    fn session(&mut self, ws: &mut WsClient, resumed: bool, sh: &Ledger) -> String {
        let uid = self.uid.clone();
        let mut pending: HashMap<String, (String, String, Instant)> = HashMap::new();
        let (mut welcomed, mut want_resync) = (false, false);
        // The feed's position on the server: an ack must not pass it.
        let mut pos = if resumed { self.last } else { 0 };
        let mut next_send = Instant::now() + Duration::from_millis(500);
        let mut next_ack = Instant::now() + Duration::from_secs(1);
        let why = loop {
            if sh.quit.load(Relaxed) {
                break "quit".to_string();
            }
            let v: Value = match ws.recv_timeout(Duration::from_millis(100)) {
                Ok(Message::Text(t)) => serde_json::from_str(t.as_str()).unwrap_or(Value::Null),
                Ok(Message::Close(cf)) => {
                    let code = cf.map_or(1005, |f| u16::from(f.code));
                    self.resume &= code != 4003; // reconnect without since/epoch
                    if code == 1013 {
                        std::thread::sleep(Duration::from_millis(300)); // try again later
                    }
                    break format!("closed {code}");
                }
                Ok(_) => Value::Null,
                Err(e) if is_timeout(&e) => Value::Null,
                Err(e) => break e.to_string(),
            };
            if v.is_object() && !welcomed && v["method"] != "welcome" {
                sh.violation(&uid, format!("first frame {v}"));
            }
            match v["method"].as_str() {
                Some("welcome") => {
                    welcomed = true;
                    let e = v["epoch"].as_str().unwrap_or_default();
                    sh.event(&uid, format!("welcome {e} seq {}", v["seq"]));
                    match self.epoch.clone() {
                        Some(old) if old != e && resumed => want_resync = true,
                        Some(old) if old != e => {
                            sh.violation(&uid, format!("silent epoch change {old} → {e}"));
                            self.adopt(sh, e);
                        }
                        Some(_) => {}
                        None => self.adopt(sh, e),
                    }
                    self.resume = true;
                }
                Some("resync") => {
                    let new = v["epoch"].as_str().unwrap_or_default().to_string();
                    let old = self.epoch.clone().unwrap_or_default();
                    let reason = v["reason"].as_str().unwrap_or_default().to_string();
                    sh.event(&uid, format!("resync {old} → {new} ({reason})"));
                    if new != old {
                        self.adopt(sh, &new);
                        pos = 0;
                    }
                    let at = Instant::now();
                    let r = Resync {
                        uid: uid.clone(),
                        old,
                        new,
                        reason,
                        at,
                    };
                    sh.resyncs.lock().unwrap().push(r);
                    want_resync = false;
                }
                Some("reconnect") => {
                    self.hint = v["url"].as_str().map(str::to_string);
                    break "drain hint".into();
                }
                _ => {}
            }
            if let Some((to, data, _)) = v["sent"].as_str().and_then(|r| pending.remove(r)) {
                sh.pending.fetch_sub(1, Relaxed);
                if !sh.accept(&to, &v, &data) {
                    sh.violation(&uid, format!("a sent frame without its stamp: {v}"));
                }
            }
            if v.get("error").is_some() {
                match v["ref"].as_str().and_then(|r| pending.remove(r)) {
                    Some(_) => {
                        sh.pending.fetch_sub(1, Relaxed);
                        sh.refused.lock().unwrap().push(Instant::now());
                    }
                    None => sh.errors.lock().unwrap().push(format!("{uid}: {v}")),
                }
            }
            if let (Some(seq), Some(_)) = (v["seq"].as_u64(), v.get("from")) {
                let data = v["data"]["id"].as_str().unwrap_or_default().to_string();
                pos = pos.max(seq);
                match self.epoch.clone() {
                    _ if want_resync => sh.violation(&uid, format!("{v} before the resync")),
                    None => sh.violation(&uid, format!("{v} without an epoch")),
                    Some(_) if seq <= self.last => {
                        sh.dropped.fetch_add(1, Relaxed);
                    }
                    Some(e) => {
                        if seq > self.last + 1 {
                            sh.violation(&uid, format!("gap in {e}: {} → {seq}", self.last));
                        }
                        self.last = seq;
                        sh.received
                            .lock()
                            .unwrap()
                            .insert((uid.clone(), e, seq), data);
                    }
                }
            }
            let now = Instant::now();
            if welcomed && !sh.stop_sending.load(Relaxed) && now >= next_send {
                self.sends += 1;
                let n = self.sends;
                let to = format!("u{}", (n as usize * 7 + uid.len()) % self.peers);
                let (data, r) = (format!("p-{uid}-{n}"), format!("r{n}"));
                let frame = json!({"to": to, "data": {"id": data}, "ref": r});
                if ws.send_json(&frame).is_err() {
                    break "send failed".into();
                }
                pending.insert(r, (to, data, now));
                sh.pending.fetch_add(1, Relaxed);
                next_send = now + Duration::from_millis(700);
            }
            let ack = self.last.min(pos);
            if welcomed && now >= next_ack && ack > self.acked {
                let epoch = self.epoch.clone().unwrap_or_default();
                if ws
                    .send_json(&json!({ "ack": ack, "epoch": epoch }))
                    .is_err()
                {
                    break "ack failed".into();
                }
                self.acked = ack;
                next_ack = now + Duration::from_secs(1);
            }
        };
        sh.pending.fetch_sub(pending.len() as i64, Relaxed);
        sh.unanswered.fetch_add(pending.len() as u64, Relaxed);
        for (r, (to, data, at)) in pending {
            let late = at.elapsed().as_secs_f64();
            let e = format!("{data} (ref {r}) to {to}: no answer in {late:.1}s, then {why}");
            sh.event(&uid, format!("UNANSWERED {e}"));
            sh.silent.lock().unwrap().push((at, uid.clone(), e));
        }
        why
    }
}

/// User `uid`: a [`Client`] sending to users `u0`…`u{peers-1}` every
/// 700 ms, connecting through the Route at `route`, reconnecting when its
/// socket ends, until [`Ledger::quit`].
pub fn spawn_user(uid: String, peers: usize, route: String, sh: Arc<Ledger>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut c = Client {
            uid,
            peers,
            epoch: None,
            last: 0,
            acked: 0,
            resume: true,
            hint: None,
            sends: 0,
        };
        let mut first = true;
        while !sh.quit.load(Relaxed) {
            let Some((mut ws, resumed)) = c.connect(&route, &sh) else {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            };
            if !first {
                sh.reconnects.fetch_add(1, Relaxed);
            }
            first = false;
            let why = c.session(&mut ws, resumed, &sh);
            sh.event(&c.uid, format!("connection ended: {why}"));
        }
    })
}

/// `POST /api/send` of `{"id": data}` to `uid`: an accepted message is
/// recorded, a refusal counted; the answer's `status` (`delivered`,
/// `queued`) when accepted.
pub fn send_api(sh: &Ledger, route: &str, uid: &str, data: &str) -> Option<String> {
    let body = json!({"uid": uid, "data": {"id": data}}).to_string();
    let json = [("Content-Type", "application/json")];
    let Ok((status, _, text)) = http_request(route, "POST", "/api/send", &json, body.as_bytes())
    else {
        sh.unanswered.fetch_add(1, Relaxed);
        return None;
    };
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status == 200 && sh.accept(uid, &v, data) {
        return v["status"].as_str().map(str::to_string);
    }
    sh.refused.lock().unwrap().push(Instant::now());
    None
}
