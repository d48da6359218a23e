//! A whole cluster for tests: a private Redis, a Route, and IM servers on
//! their own 127.0.0.x addresses, all real daemons; plus user helpers
//! (ask `/route`, connect, send, receive).

use std::time::Duration;

use super::daemon::Daemon;
use super::proxy::FaultProxy;
use super::{http_get, http_request, wait_until, ws_connect, RedisServer, WsClient};

pub const ROUTE_BIN: &str = env!("CARGO_BIN_EXE_swocloud");
pub const IM_BIN: &str = env!("CARGO_BIN_EXE_swocloud-im");
pub const SECRET: &str = "cluster-test-secret";

pub struct Cluster {
    pub redis: RedisServer,
    pub route: Daemon,
    pub ims: Vec<Daemon>,
    /// Between the daemons and Redis, when started with [`Cluster::start_proxied`].
    pub proxy: Option<FaultProxy>,
    /// Settings lines every IM server gets besides the defaults.
    pub im_extra: String,
}

impl Cluster {
    /// Redis, a Route (`route_workers`), and `ims` IM servers with
    /// `im_workers` each on 127.0.0.2, 127.0.0.3, …; waits until every IM
    /// server is registered.
    pub fn start(
        route_workers: usize,
        ims: usize,
        im_workers: usize,
        route_extra: &str,
    ) -> Cluster {
        Cluster::build(route_workers, ims, im_workers, route_extra, "", false)
    }

    /// As [`Cluster::start`], with `im_extra` settings lines for every IM
    /// server.
    pub fn start_with(
        route_workers: usize,
        ims: usize,
        im_workers: usize,
        route_extra: &str,
        im_extra: &str,
    ) -> Cluster {
        Cluster::build(route_workers, ims, im_workers, route_extra, im_extra, false)
    }

    /// As [`Cluster::start`], with every daemon reaching Redis through a
    /// [`FaultProxy`] the test can slow down or silence.
    pub fn start_proxied(
        route_workers: usize,
        ims: usize,
        im_workers: usize,
        route_extra: &str,
    ) -> Cluster {
        Cluster::build(route_workers, ims, im_workers, route_extra, "", true)
    }

    fn build(
        route_workers: usize,
        ims: usize,
        im_workers: usize,
        route_extra: &str,
        im_extra: &str,
        proxied: bool,
    ) -> Cluster {
        let redis = RedisServer::start();
        let proxy = proxied.then(|| {
            FaultProxy::start(
                format!("127.0.0.1:{}", redis.port())
                    .parse()
                    .expect("redis address"),
            )
        });
        let url = proxy.as_ref().map_or_else(|| redis.url(), |p| p.url());
        let route = Daemon::new(
            ROUTE_BIN,
            &format!(
                "worker_num = {route_workers}\nredis_url = \"{url}\"\nauth_secret = \"{SECRET}\"\nheartbeat_check_interval = 0.5\nheartbeat_idle_time = 2.0\ncache_refresh = 1.0\n{route_extra}",
            ),
        );
        route.start();
        let mut c = Cluster {
            redis,
            route,
            ims: Vec::new(),
            proxy,
            im_extra: im_extra.to_string(),
        };
        for i in 0..ims {
            c.add_im(i, im_workers);
        }
        c.wait_registered(ims);
        c
    }

    /// Starts IM server `IM_<i>` on 127.0.0.<i+2>.
    pub fn add_im(&mut self, i: usize, workers: usize) {
        let host = format!("127.0.0.{}", i + 2);
        let im = Daemon::on_host(
            IM_BIN,
            &host,
            &format!(
                "worker_num = {workers}\nredis_url = \"{}\"\nauth_secret = \"{SECRET}\"\nroute_url = \"ws://{}/\"\nservice_name = \"IM_{i}\"\nroute_heartbeat = 0.3\n{}",
                self.redis_url(),
                self.route.addr(),
                self.im_extra
            ),
        );
        im.start();
        self.ims.push(im);
    }

    /// The Redis URL the daemons use (the proxy's, when there is one).
    pub fn redis_url(&self) -> String {
        self.proxy
            .as_ref()
            .map_or_else(|| self.redis.url(), |p| p.url())
    }

    pub fn servers(&self) -> serde_json::Value {
        let (status, _, body) =
            http_get(self.route.addr(), "/api/servers").expect("GET /api/servers");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    #[track_caller]
    pub fn wait_registered(&self, n: usize) {
        wait_until(
            Duration::from_secs(10),
            &format!("{n} IM servers registered and cached"),
            || {
                self.servers()["servers"]
                    .as_array()
                    .is_some_and(|a| a.iter().filter(|e| e["draining"] == false).count() == n)
            },
        );
    }

    /// `GET /route` for `uid` with a valid token.
    pub fn route_for(&self, uid: &str) -> serde_json::Value {
        let token = swocloud::auth::mint(SECRET.as_bytes(), uid, "user", 600);
        let (status, _, body) = http_get(
            self.route.addr(),
            &format!("/route?uid={uid}&token={token}"),
        )
        .expect("GET /route");
        assert_eq!(status, 200, "/route for {uid}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Asks `/route` and connects: the user's socket, past its `welcome`
    /// frame.
    pub fn connect_user(&self, uid: &str) -> (WsClient, serde_json::Value) {
        let (ws, r, _) = self.connect_resume(uid, "");
        (ws, r)
    }

    /// Asks `/route` and connects with `query` appended to the URL (e.g.
    /// `&since=3&epoch=E`); returns the socket, the route answer and the
    /// `welcome` frame, which must come first.
    pub fn connect_resume(
        &self,
        uid: &str,
        query: &str,
    ) -> (WsClient, serde_json::Value, serde_json::Value) {
        let r = self.route_for(uid);
        let url = format!("{}{query}", r["url"].as_str().unwrap());
        let mut ws = ws_connect(&url).unwrap_or_else(|e| panic!("connect {uid} to {url}: {e}"));
        ws.set_timeout(Duration::from_secs(5));
        let welcome = ws.recv_text_json();
        assert_eq!(welcome["method"], "welcome", "the first frame: {welcome}");
        assert_eq!(welcome["uid"], uid, "{welcome}");
        (ws, r, welcome)
    }

    /// `GET /api/message?uid=U&seq=N`.
    pub fn message_status(&self, uid: &str, seq: u64) -> (u16, serde_json::Value) {
        let (status, _, body) = http_get(
            self.route.addr(),
            &format!("/api/message?uid={uid}&seq={seq}"),
        )
        .expect("GET /api/message");
        (
            status,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// `POST /api/send`.
    pub fn api_send(&self, uid: &str, data: serde_json::Value) -> (u16, serde_json::Value) {
        let body = serde_json::json!({"uid": uid, "data": data}).to_string();
        let (status, _, text) = http_request(
            self.route.addr(),
            "POST",
            "/api/send",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .expect("POST /api/send");
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    /// `GET /api/online`.
    pub fn online(&self, uid: &str) -> serde_json::Value {
        let (_, _, body) = http_get(self.route.addr(), &format!("/api/online?uid={uid}"))
            .expect("GET /api/online");
        serde_json::from_str(&body).unwrap()
    }
}
