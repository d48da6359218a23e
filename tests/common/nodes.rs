//! Several Route nodes for tests: N Route daemons (each its own
//! `node_id`, `route-a`, `route-b`, …) and IM servers whose `route_urls`
//! list every node, rotated per server (IM_0 starts at node 0, IM_1 at
//! node 1, …), so each node holds some; on one private Redis
//! ([`Nodes::start`]) or on any Redis the test gives ([`Nodes::start_on`]:
//! a Redis Cluster, a Sentinel set). Plus the per-node user helpers
//! (`/route`, connect, `/api/send`, users spread over the IM servers) and
//! whole-node signals.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use super::cluster::{IM_BIN, ROUTE_BIN, SECRET};
use super::daemon::Daemon;
use super::{
    descendants_of, http_get, http_request, wait_until, ws_connect, RedisServer, WsClient,
};

/// Which Redis the daemons use: the settings line(s) every one of them
/// gets.
#[derive(Clone, Debug)]
pub struct RedisSetting(String);

impl RedisSetting {
    /// One server: `redis_url = "…"`.
    pub fn url(url: &str) -> RedisSetting {
        RedisSetting(format!("redis_url = \"{url}\"\n"))
    }

    /// A Redis Cluster from these seeds (`redis://h:p`): `redis_cluster = […]`.
    pub fn cluster(seeds: &[String]) -> RedisSetting {
        RedisSetting(format!("redis_cluster = {}\n", toml_list(seeds)))
    }

    /// The master the Sentinels (`redis://h:p`) name `master`.
    pub fn sentinel(sentinels: &[String], master: &str) -> RedisSetting {
        RedisSetting(format!(
            "redis_sentinels = {}\nredis_sentinel_master = \"{master}\"\n",
            toml_list(sentinels)
        ))
    }

    /// The TOML lines.
    pub fn lines(&self) -> &str {
        &self.0
    }
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Route nodes, IM servers and the Redis they share.
pub struct Nodes {
    /// The private Redis of [`Nodes::start`] (none with [`Nodes::start_on`]).
    private: Option<RedisServer>,
    /// What every daemon was told about Redis.
    pub setting: RedisSetting,
    pub routes: Vec<Daemon>,
    pub ims: Vec<Daemon>,
}

/// The `node_id` of Route node `i`: `route-a`, `route-b`, …
pub fn node_id(i: usize) -> String {
    format!("route-{}", (b'a' + i as u8) as char)
}

impl Nodes {
    /// A private Redis, `routes` Route nodes (2 workers each, the liveness
    /// timings of [`super::cluster::Cluster`], `consistent_hash`: where a
    /// uid lands does not depend on load reports in flight) and `ims` IM
    /// servers (2 workers each, heartbeat 0.3 s, `im_extra` lines) on
    /// 127.0.0.2, 127.0.0.3, …; waits until every IM server is registered
    /// with the first node of its list, as every node sees it.
    pub fn start(routes: usize, ims: usize, im_extra: &str) -> Nodes {
        let redis = RedisServer::start();
        let mut n = Nodes::start_on(RedisSetting::url(&redis.url()), routes, ims, im_extra);
        n.private = Some(redis);
        n
    }

    /// As [`Nodes::start`], on the Redis that `redis` names (a server, a
    /// Sentinel set, a Redis Cluster), which the test owns.
    pub fn start_on(redis: RedisSetting, routes: usize, ims: usize, im_extra: &str) -> Nodes {
        let routes: Vec<Daemon> = (0..routes)
            .map(|i| {
                let d = Daemon::new(
                    ROUTE_BIN,
                    &format!(
                        "worker_num = 2\nnode_id = \"{}\"\n{}auth_secret = \"{SECRET}\"\nheartbeat_check_interval = 0.5\nheartbeat_idle_time = 2.0\ncache_refresh = 1.0\nbalancer = \"consistent_hash\"\n",
                        node_id(i),
                        redis.lines()
                    ),
                );
                d.start();
                d
            })
            .collect();
        let mut n = Nodes {
            private: None,
            setting: redis,
            routes,
            ims: Vec::new(),
        };
        for i in 0..ims {
            let list: Vec<String> = (0..n.routes.len())
                .map(|k| format!("\"ws://{}/\"", n.routes[(i + k) % n.routes.len()].addr()))
                .collect();
            let im = Daemon::on_host(
                IM_BIN,
                &format!("127.0.0.{}", i + 2),
                &format!(
                    "worker_num = 2\n{}auth_secret = \"{SECRET}\"\nroute_urls = [{}]\nservice_name = \"IM_{i}\"\nroute_heartbeat = 0.3\n{im_extra}",
                    n.setting.lines(),
                    list.join(", ")
                ),
            );
            im.start();
            n.ims.push(im);
        }
        for node in 0..n.routes.len() {
            n.wait_held(node, &n.initial(), Duration::from_secs(10), false);
        }
        // Every worker's cache too (a worker whose subscription was not up
        // yet learns it at its next refresh, within `cache_refresh`): each
        // connection lands on a worker at random (SO_REUSEPORT), so eight
        // answers in a row from each node, all right.
        for node in 0..n.routes.len() {
            let mut in_a_row = 0;
            wait_until(Duration::from_secs(5), "every worker's cache", || {
                in_a_row = if n.held(node, false) == n.initial() {
                    in_a_row + 1
                } else {
                    0
                };
                in_a_row >= 8
            });
        }
        n
    }

    /// The private Redis of [`Nodes::start`].
    #[track_caller]
    pub fn redis(&self) -> &RedisServer {
        self.private
            .as_ref()
            .expect("Nodes::start_on runs on the test's Redis, not a private one")
    }

    /// Where [`Nodes::start_on`] put each IM server: IM_i with node i mod N.
    pub fn initial(&self) -> BTreeMap<String, String> {
        (0..self.ims.len())
            .map(|i| (format!("IM_{i}"), node_id(i % self.routes.len())))
            .collect()
    }

    /// `GET /api/servers` on node `node` (`fresh`: read from Redis).
    pub fn servers(&self, node: usize, fresh: bool) -> Value {
        let path = if fresh {
            "/api/servers?fresh=1"
        } else {
            "/api/servers"
        };
        let (status, _, body) = http_get(self.routes[node].addr(), path).expect("GET /api/servers");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// serviceName → the Route node holding it, as node `node` sees it.
    pub fn held(&self, node: usize, fresh: bool) -> BTreeMap<String, String> {
        self.servers(node, fresh)["servers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        (
                            e["serviceName"].as_str().unwrap_or("?").to_string(),
                            e["node"].as_str().unwrap_or("?").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until node `node` sees exactly `want` (serviceName → node).
    #[track_caller]
    pub fn wait_held(
        &self,
        node: usize,
        want: &BTreeMap<String, String>,
        timeout: Duration,
        fresh: bool,
    ) {
        wait_until(timeout, &format!("{} sees {want:?}", node_id(node)), || {
            &self.held(node, fresh) == want
        });
    }

    /// `GET /route` for `uid` on node `node`, with a valid token.
    pub fn route_for(&self, node: usize, uid: &str) -> Value {
        let token = swocloud::auth::mint(SECRET.as_bytes(), uid, "user", 600);
        let (status, _, body) = http_get(
            self.routes[node].addr(),
            &format!("/route?uid={uid}&token={token}"),
        )
        .expect("GET /route");
        assert_eq!(status, 200, "/route for {uid} on {}: {body}", node_id(node));
        serde_json::from_str(&body).unwrap()
    }

    /// Asks node `node`'s `/route` and connects: the user's socket, past
    /// its `welcome` frame, and the route answer.
    pub fn connect_user(&self, node: usize, uid: &str) -> (WsClient, Value) {
        let r = self.route_for(node, uid);
        let url = r["url"].as_str().unwrap();
        let mut ws = ws_connect(url).unwrap_or_else(|e| panic!("connect {uid} to {url}: {e}"));
        ws.set_timeout(Duration::from_secs(5));
        let welcome = ws.recv_text_json();
        assert_eq!(welcome["method"], "welcome", "the first frame: {welcome}");
        (ws, r)
    }

    /// `POST path` with the JSON `body` on node `node`: (status, JSON).
    pub fn post(&self, node: usize, path: &str, body: &Value) -> (u16, Value) {
        let (status, _, text) = http_request(
            self.routes[node].addr(),
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `POST /api/send` on node `node`.
    pub fn api_send(&self, node: usize, uid: &str, data: Value) -> (u16, Value) {
        self.post(
            node,
            "/api/send",
            &serde_json::json!({"uid": uid, "data": data}),
        )
    }

    /// As [`Nodes::connect_user`] with `query` appended to the URL (e.g.
    /// `&since=3&epoch=E`); also returns the `welcome` frame.
    pub fn connect_resume(&self, node: usize, uid: &str, query: &str) -> (WsClient, Value, Value) {
        let r = self.route_for(node, uid);
        let url = format!("{}{query}", r["url"].as_str().unwrap());
        let mut ws = ws_connect(&url).unwrap_or_else(|e| panic!("connect {uid} to {url}: {e}"));
        ws.set_timeout(Duration::from_secs(5));
        let welcome = ws.recv_text_json();
        assert_eq!(welcome["method"], "welcome", "the first frame: {welcome}");
        assert_eq!(welcome["uid"], uid, "{welcome}");
        (ws, r, welcome)
    }

    /// `per_server` users on each IM server (uids `<prefix>N`, asking
    /// `/route` of each node in turn; the balancer is consistent hashing,
    /// so some uids land on each); returns uid → (socket, serviceName).
    pub fn users(&self, prefix: &str, per_server: usize) -> BTreeMap<String, (WsClient, String)> {
        let mut out = BTreeMap::new();
        let mut count: HashMap<String, usize> = HashMap::new();
        let nodes = self.routes.len();
        for i in 0..200 {
            if count.len() == self.ims.len() && count.values().all(|&c| c >= per_server) {
                return out;
            }
            let uid = format!("{prefix}{i}");
            let server = self.route_for(i % nodes, &uid)["serviceName"]
                .as_str()
                .unwrap()
                .to_string();
            if count.get(&server).is_some_and(|&c| c >= per_server) {
                continue;
            }
            let (ws, r) = self.connect_user(i % nodes, &uid);
            // Where it went: just after a start, the two lookups can meet
            // two Route workers whose registry caches differ a moment.
            let server = r["serviceName"].as_str().unwrap().to_string();
            if count.get(&server).is_some_and(|&c| c >= per_server) {
                continue;
            }
            *count.entry(server.clone()).or_default() += 1;
            out.insert(uid, (ws, server));
        }
        panic!("not {per_server} users on each IM server: {count:?}");
    }

    /// Every user gets a message sent through `/api/send` of `node`
    /// (answered `delivered`, received within 3 s).
    #[track_caller]
    pub fn reach_all(
        &self,
        node: usize,
        users: &mut BTreeMap<String, (WsClient, String)>,
        tag: &str,
    ) {
        for (uid, (ws, server)) in users.iter_mut() {
            let data = json!(format!("{tag} {uid} via {}", node_id(node)));
            let (status, v) = self.api_send(node, uid, data.clone());
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["status"], "delivered", "{uid} on {server}: {v}");
            let got = recv_data(
                ws,
                Duration::from_secs(3),
                &format!("{uid} on {server}"),
                &data,
            );
            assert_eq!(got["from"], "api", "{got}");
        }
    }

    /// A user on each of the first two IM servers sends the other a
    /// message (with a `ref`): both arrive, stored (with a seq), from the
    /// right sender.
    #[track_caller]
    pub fn user_to_user(&self, users: &mut BTreeMap<String, (WsClient, String)>) {
        let first_on = |s: &str| users.iter().find(|(_, (_, x))| x == s).unwrap().0.clone();
        let (u0, u1) = (first_on("IM_0"), first_on("IM_1"));
        for (from, to) in [(&u0, &u1), (&u1, &u0)] {
            let data = json!(format!("{from} to {to}"));
            let ws = &mut users.get_mut(from.as_str()).unwrap().0;
            ws.send_json(&json!({"to": to, "data": data, "ref": "r1"}))
                .unwrap();
            let ws = &mut users.get_mut(to.as_str()).unwrap().0;
            let got = recv_data(ws, Duration::from_secs(3), to, &data);
            assert_eq!(&got["from"], from, "{got}");
            assert!(got["seq"].as_u64().is_some(), "stored: {got}");
        }
    }

    /// `GET /api/message?uid&seq` on node `node`: the message's `status`.
    pub fn message_status(&self, node: usize, uid: &str, seq: u64) -> Value {
        let (_, _, body) = http_get(
            self.routes[node].addr(),
            &format!("/api/message?uid={uid}&seq={seq}"),
        )
        .expect("GET /api/message");
        serde_json::from_str::<Value>(&body).unwrap_or(Value::Null)["status"].clone()
    }

    /// The inbox of `uid` (offline, a new user) through the nodes in
    /// turn: two messages queued (seq 1, 2 of one epoch), both delivered
    /// in order at connect, seq 1 acked (`/api/message` says `acked` and
    /// `delivered`); a third sent while it is away again, and a resume
    /// with `since=1` gets exactly 2 and 3.
    #[track_caller]
    pub fn inbox_round_trip(&self, uid: &str) {
        let last = self.routes.len() - 1;
        let (st, v1) = self.api_send(0, uid, json!("first"));
        assert_eq!(
            (st, &v1["status"], &v1["seq"]),
            (200, &json!("queued"), &json!(1)),
            "{v1}"
        );
        let epoch = v1["epoch"].as_str().unwrap().to_string();
        let (st, v2) = self.api_send(last, uid, json!("second"));
        assert_eq!(
            (st, &v2["status"], &v2["seq"]),
            (200, &json!("queued"), &json!(2)),
            "{v2}"
        );
        assert_eq!(v2["epoch"], epoch.as_str());
        assert_eq!(self.message_status(last, uid, 2), "queued");
        let (mut ws, _, welcome) = self.connect_resume(last, uid, "");
        assert_eq!(
            (&welcome["epoch"], &welcome["seq"]),
            (&json!(epoch), &json!(2)),
            "{welcome}"
        );
        for (seq, data) in [(1, "first"), (2, "second")] {
            let got = ws
                .next_json(Duration::from_secs(3))
                .expect("a stored message");
            assert_eq!(
                (&got["seq"], &got["data"]),
                (&json!(seq), &json!(data)),
                "{got}"
            );
        }
        ws.send_json(&json!({"ack": 1})).unwrap();
        wait_until(
            Duration::from_secs(3),
            "seq 1 acked, seq 2 delivered",
            || {
                self.message_status(0, uid, 1) == "acked"
                    && self.message_status(0, uid, 2) == "delivered"
            },
        );
        drop(ws);
        let (st, v3) = self.api_send(0, uid, json!("third"));
        assert_eq!((st, &v3["seq"]), (200, &json!(3)), "{v3}");
        let since = format!("&since=1&epoch={epoch}");
        let (mut ws, _, welcome) = self.connect_resume(0, uid, &since);
        assert_eq!(
            (&welcome["epoch"], &welcome["seq"]),
            (&json!(epoch), &json!(3)),
            "{welcome}"
        );
        for (seq, data) in [(2, "second"), (3, "third")] {
            let got = ws
                .next_json(Duration::from_secs(3))
                .expect("a resumed message");
            assert_eq!(
                (&got["seq"], &got["data"]),
                (&json!(seq), &json!(data)),
                "{got}"
            );
        }
    }

    /// `GET /ready` on node `node`: the status (0: no answer) and body.
    pub fn ready(&self, node: usize) -> (u16, String) {
        http_get(self.routes[node].addr(), "/ready").map_or((0, String::new()), |r| (r.0, r.2))
    }

    /// Sends `sig` to every process of IM server `i` (as
    /// [`Nodes::signal_node`]).
    pub fn signal_im(&self, i: usize, sig: Signal) {
        signal_tree(&self.ims[i], sig);
    }

    /// Sends `sig` to every process of Route node `node` (its master and
    /// all descendants, listed before the first signal).
    pub fn signal_node(&self, node: usize, sig: Signal) {
        signal_tree(&self.routes[node], sig);
    }
}

/// Sends `sig` to a daemon's master and all its descendants (listed
/// before the first signal).
fn signal_tree(d: &Daemon, sig: Signal) {
    let master = d.master_pid().expect("the daemon runs");
    let tree: Vec<i32> = std::iter::once(master)
        .chain(descendants_of(master))
        .collect();
    for p in tree {
        let _ = kill(Pid::from_raw(p), sig);
    }
}

/// Reads frames until a message (`from` set) whose `data` is `data` comes,
/// skipping others (other messages, `sent` confirmations, checks); panics
/// after `timeout`. Returns the message.
#[track_caller]
pub fn recv_data(ws: &mut WsClient, timeout: Duration, what: &str, data: &Value) -> Value {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < timeout {
        match ws.recv_timeout(Duration::from_millis(200)) {
            Ok(tungstenite::Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v.get("from").is_some() && &v["data"] == data {
                    return v;
                }
            }
            Ok(_) => {}
            Err(e) if super::is_timeout(&e) => {}
            Err(e) => panic!("{what}: connection error {e}"),
        }
    }
    panic!("{what}: {data} did not come within {timeout:?}");
}
