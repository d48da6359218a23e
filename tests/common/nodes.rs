//! Several Route nodes for tests: one private Redis, N Route daemons (each
//! its own `node_id`, `route-a`, `route-b`, …) and IM servers whose
//! `route_urls` list every node, rotated per server (IM_0 starts at node
//! 0, IM_1 at node 1, …), so each node holds some. Plus the per-node user
//! helpers (`/route`, connect, `/api/send`) and whole-node signals.

use std::collections::BTreeMap;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use super::cluster::{IM_BIN, ROUTE_BIN, SECRET};
use super::daemon::Daemon;
use super::{
    descendants_of, http_get, http_request, wait_until, ws_connect, RedisServer, WsClient,
};

/// Route nodes, IM servers and their Redis.
pub struct Nodes {
    pub redis: RedisServer,
    pub routes: Vec<Daemon>,
    pub ims: Vec<Daemon>,
}

/// The `node_id` of Route node `i`: `route-a`, `route-b`, …
pub fn node_id(i: usize) -> String {
    format!("route-{}", (b'a' + i as u8) as char)
}

impl Nodes {
    /// Redis, `routes` Route nodes (2 workers each, the liveness timings of
    /// [`super::cluster::Cluster`], `consistent_hash`: where a uid lands
    /// does not depend on load reports in flight) and `ims` IM servers (2 workers each,
    /// heartbeat 0.3 s, `im_extra` lines) on 127.0.0.2, 127.0.0.3, …;
    /// waits until every IM server is registered with the first node of
    /// its list, as every node sees it.
    pub fn start(routes: usize, ims: usize, im_extra: &str) -> Nodes {
        let redis = RedisServer::start();
        let routes: Vec<Daemon> = (0..routes)
            .map(|i| {
                let d = Daemon::new(
                    ROUTE_BIN,
                    &format!(
                        "worker_num = 2\nnode_id = \"{}\"\nredis_url = \"{}\"\nauth_secret = \"{SECRET}\"\nheartbeat_check_interval = 0.5\nheartbeat_idle_time = 2.0\ncache_refresh = 1.0\nbalancer = \"consistent_hash\"\n",
                        node_id(i),
                        redis.url()
                    ),
                );
                d.start();
                d
            })
            .collect();
        let mut n = Nodes {
            redis,
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
                    "worker_num = 2\nredis_url = \"{}\"\nauth_secret = \"{SECRET}\"\nroute_urls = [{}]\nservice_name = \"IM_{i}\"\nroute_heartbeat = 0.3\n{im_extra}",
                    n.redis.url(),
                    list.join(", ")
                ),
            );
            im.start();
            n.ims.push(im);
        }
        let want: BTreeMap<String, String> = (0..ims)
            .map(|i| (format!("IM_{i}"), node_id(i % n.routes.len())))
            .collect();
        for node in 0..n.routes.len() {
            n.wait_held(node, &want, Duration::from_secs(10), false);
        }
        n
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

    /// `POST /api/send` on node `node`.
    pub fn api_send(&self, node: usize, uid: &str, data: Value) -> (u16, Value) {
        let body = serde_json::json!({"uid": uid, "data": data}).to_string();
        let (status, _, text) = http_request(
            self.routes[node].addr(),
            "POST",
            "/api/send",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .expect("POST /api/send");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Sends `sig` to every process of Route node `node` (its master and
    /// all descendants, listed before the first signal).
    pub fn signal_node(&self, node: usize, sig: Signal) {
        let master = self.routes[node].master_pid().expect("the node runs");
        let tree: Vec<i32> = std::iter::once(master)
            .chain(descendants_of(master))
            .collect();
        for p in tree {
            let _ = kill(Pid::from_raw(p), sig);
        }
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
