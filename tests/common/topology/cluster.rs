//! A local Redis Cluster for tests: see [`RedisCluster`].

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{
    connect, field, poll, port_of, query, query_text, redis_cli, redis_ping, run, server_args,
    Instance, SETTLE_TIMEOUT,
};

/// Hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// `cluster-node-timeout` unless the builder says otherwise: short, so that a
/// killed master is replaced within a few seconds.
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(1000);

/// A node as the live cluster sees it (one line of `CLUSTER NODES`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The 40-character node id.
    pub id: String,
    /// Its client port on 127.0.0.1 (its bus port is this + 10000).
    pub port: u16,
    /// Flagged `master` (a master without slots is possible, e.g. a
    /// failed one).
    pub master: bool,
    /// A replica's master id.
    pub master_id: Option<String>,
    /// Slot ranges served, inclusive, ascending.
    pub slots: Vec<(u16, u16)>,
    /// Every flag (`myself`, `master`, `slave`, `fail?`, `fail`, …).
    pub flags: Vec<String>,
    /// The asking node's link to it is up (`connected`).
    pub connected: bool,
    /// Whether the process this harness runs on that port is running.
    pub alive: bool,
}

impl Node {
    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr())
    }

    /// Flagged `fail` or `fail?` by the node that was asked.
    pub fn failed(&self) -> bool {
        self.flags.iter().any(|f| f == "fail" || f == "fail?")
    }

    /// Connected, and flagged neither failing nor in handshake nor without
    /// address.
    fn healthy(&self) -> bool {
        let odd = ["fail", "fail?", "handshake", "noaddr"];
        self.connected && !self.flags.iter().any(|f| odd.contains(&f.as_str()))
    }

    /// Whether it serves `slot`.
    pub fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }

    /// Parses one `CLUSTER NODES` line:
    /// `id ip:port@cport[,host] flags master ping pong epoch link slot…`.
    fn parse(line: &str) -> Option<Node> {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            return None;
        }
        let hostport = f[1].split(['@', ',']).next()?;
        let port = hostport.rsplit(':').next()?.parse().ok()?;
        let flags: Vec<String> = f[2].split(',').map(String::from).collect();
        let mut slots = Vec::new();
        // Slots being imported or migrated are listed as `[slot-<-id]`.
        for s in f[8..].iter().filter(|s| !s.starts_with('[')) {
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            slots.push((a.parse().ok()?, b.parse().ok()?));
        }
        slots.sort_unstable();
        Some(Node {
            id: f[0].to_string(),
            port,
            master: flags.iter().any(|x| x == "master"),
            master_id: (f[3] != "-").then(|| f[3].to_string()),
            slots,
            connected: f[7] == "connected",
            flags,
            alive: false,
        })
    }
}

/// Slot range → master port, as `CLUSTER SLOTS` says, sorted.
type SlotMap = Vec<(u16, u16, u16)>;

/// What [`RedisCluster::start`] builds; [`RedisCluster::builder`] sets the
/// options first.
#[derive(Clone, Debug)]
pub struct ClusterBuilder {
    masters: usize,
    replicas_per_master: usize,
    node_timeout: Duration,
}

impl ClusterBuilder {
    /// `cluster-node-timeout` (default [`DEFAULT_NODE_TIMEOUT`]): how long a
    /// node may be unreachable before it is flagged failing and, if a
    /// master, replaced by a replica. A test restarting a master on a new
    /// port that must not see a failover meanwhile sets it long (a few
    /// seconds); a failover test keeps it short.
    pub fn node_timeout(mut self, timeout: Duration) -> Self {
        self.node_timeout = timeout;
        self
    }

    /// Starts the nodes, creates the cluster and waits until it is healthy.
    #[track_caller]
    pub fn start(self) -> RedisCluster {
        let t0 = Instant::now();
        let total = self.masters * (1 + self.replicas_per_master);
        let timeout_ms = self.node_timeout.as_millis().to_string();
        let nodes: Vec<Instance> = (0..total)
            .map(|i| {
                Instance::start(&format!("cluster node {i}"), cluster_port, |port, dir| {
                    node_args(port, dir, &timeout_ms)
                })
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        create.args(nodes.iter().map(Instance::addr));
        create.args(["--cluster-replicas", &self.replicas_per_master.to_string()]);
        create.arg("--cluster-yes").stdin(Stdio::null());
        let out = create
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli --cluster create: {e}"));
        if !out.status.success() {
            panic!(
                "redis-cli --cluster create failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut cluster = RedisCluster {
            nodes,
            node_timeout: self.node_timeout,
            timeout_ms,
            started_in: Duration::ZERO,
            killed: HashMap::new(),
        };
        let expect = (self.masters, self.masters * self.replicas_per_master);
        poll(SETTLE_TIMEOUT, "the new cluster to settle", || {
            cluster.settled(Some(expect))
        });
        cluster.started_in = t0.elapsed();
        cluster
    }
}

/// A node killed by [`RedisCluster::kill`]: when, and the slots it served.
struct Killed {
    at: Instant,
    slots: Vec<(u16, u16)>,
}

/// A local Redis Cluster: `redis-server` children joined by
/// `redis-cli --cluster create`, SIGKILLed by pid when dropped.
pub struct RedisCluster {
    nodes: Vec<Instance>,
    node_timeout: Duration,
    timeout_ms: String,
    started_in: Duration,
    killed: HashMap<u16, Killed>,
}

/// Arguments of a cluster node.
///
/// `cluster-require-full-coverage no`: by default a node refuses every
/// command (CLUSTERDOWN) while any slot is unserved, so one failing shard
/// (a master down and its replica not yet promoted, or no replica at all)
/// would stop the healthy shards too. Tests of failover want the other
/// shards to keep serving, as a production cluster configured for
/// availability would.
fn node_args(port: u16, dir: &Path, timeout_ms: &str) -> Vec<OsString> {
    let cluster = format!(
        "--cluster-enabled yes --cluster-config-file nodes.conf \
         --cluster-node-timeout {timeout_ms} --cluster-require-full-coverage no"
    );
    server_args(port, dir, &cluster)
}

/// A free port whose cluster bus port (+10000) is free too (see
/// [`super::super::free_port_and`]).
fn cluster_port() -> u16 {
    super::super::free_port_and(10000)
}

impl RedisCluster {
    /// `masters` masters with `replicas_per_master` replicas each (at least
    /// 3 masters: `redis-cli --cluster create` refuses fewer), node timeout
    /// [`DEFAULT_NODE_TIMEOUT`]; returns once every node reports
    /// `cluster_state:ok`, all slots are served, every node sees every
    /// other connected and every replica's link is up.
    #[track_caller]
    pub fn start(masters: usize, replicas_per_master: usize) -> RedisCluster {
        RedisCluster::builder(masters, replicas_per_master).start()
    }

    /// A builder, for options ([`ClusterBuilder::node_timeout`]).
    pub fn builder(masters: usize, replicas_per_master: usize) -> ClusterBuilder {
        ClusterBuilder {
            masters,
            replicas_per_master,
            node_timeout: DEFAULT_NODE_TIMEOUT,
        }
    }

    /// How long [`start`](Self::start) took, creation and settling included.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The `cluster-node-timeout` the nodes run with.
    pub fn node_timeout(&self) -> Duration {
        self.node_timeout
    }

    /// `redis://127.0.0.1:P` of every running node.
    pub fn seeds(&self) -> Vec<String> {
        self.live_ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// Every node the cluster knows, failed ones included, as one running
    /// node sees it, sorted by port.
    #[track_caller]
    pub fn nodes(&self) -> Vec<Node> {
        let live = self.live_ports();
        let text = poll(SETTLE_TIMEOUT, "CLUSTER NODES from a running node", || {
            self.ask_any(&["CLUSTER", "NODES"])
        });
        let mut nodes: Vec<Node> = text.lines().filter_map(Node::parse).collect();
        for n in &mut nodes {
            n.alive = live.contains(&n.port);
        }
        nodes.sort_by_key(|n| n.port);
        nodes
    }

    /// The running masters serving slots, not flagged failing, by first slot.
    #[track_caller]
    pub fn masters(&self) -> Vec<Node> {
        let mut m: Vec<Node> = self
            .nodes()
            .into_iter()
            .filter(|n| n.master && n.alive && !n.failed() && !n.slots.is_empty())
            .collect();
        m.sort_by_key(|n| n.slots[0]);
        m
    }

    /// The running replicas not flagged failing, by port.
    #[track_caller]
    pub fn replicas(&self) -> Vec<Node> {
        self.nodes()
            .into_iter()
            .filter(|n| !n.master && n.alive && !n.failed())
            .collect()
    }

    /// The running replicas of `master`.
    #[track_caller]
    pub fn replicas_of(&self, master: &Node) -> Vec<Node> {
        self.replicas()
            .into_iter()
            .filter(|n| n.master_id.as_deref() == Some(master.id.as_str()))
            .collect()
    }

    /// The master serving `slot`, per `CLUSTER SLOTS` of a running node.
    #[track_caller]
    pub fn master_for_slot(&self, slot: u16) -> Node {
        let map = poll(SETTLE_TIMEOUT, "CLUSTER SLOTS from a running node", || {
            let port = self.any_port()?;
            slot_map(port)
        });
        let port = map
            .iter()
            .find(|&&(a, b, _)| (a..=b).contains(&slot))
            .map(|&(_, _, p)| p)
            .unwrap_or_else(|| panic!("slot {slot} is not served: {map:?}"));
        self.nodes()
            .into_iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("CLUSTER SLOTS names 127.0.0.1:{port}, CLUSTER NODES not"))
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    #[track_caller]
    pub fn keyslot(&self, key: &str) -> u16 {
        let slot = poll(SETTLE_TIMEOUT, "CLUSTER KEYSLOT", || {
            self.ask_any(&["CLUSTER", "KEYSLOT", key])
        });
        slot.parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key:?} answered {slot:?}"))
    }

    /// The master serving `key`.
    #[track_caller]
    pub fn master_for_key(&self, key: &str) -> Node {
        self.master_for_slot(self.keyslot(key))
    }

    /// SIGKILLs `node`'s process by pid and reaps it, remembering when and
    /// which slots it served (for [`wait_failover`](Self::wait_failover)).
    #[track_caller]
    pub fn kill(&mut self, node: &Node) {
        let slots = self
            .any_port()
            .and_then(slot_map)
            .map(|m| {
                m.iter()
                    .filter(|r| r.2 == node.port)
                    .map(|r| (r.0, r.1))
                    .collect()
            })
            .unwrap_or_default();
        self.instance(node.port).stop();
        let at = Instant::now();
        self.killed.insert(node.port, Killed { at, slots });
    }

    /// Freezes (`on`: SIGSTOP) or thaws (SIGCONT) `node`'s process. A
    /// frozen replica receives nothing of its master's stream: what the
    /// master acknowledges meanwhile is on the master alone.
    #[track_caller]
    pub fn freeze(&mut self, node: &Node, on: bool) {
        use nix::sys::signal::Signal;
        let sig = if on { Signal::SIGSTOP } else { Signal::SIGCONT };
        self.instance(node.port).signal(sig);
    }

    /// Waits until every running node agrees that the slots of the master
    /// `killed_addr` (killed by [`kill`](Self::kill)) are served by one
    /// other master, names no dead node in `CLUSTER SLOTS`, and reports
    /// `cluster_state:ok`. Returns the new master's `127.0.0.1:P` and the
    /// time since the kill (since this call if the node was not killed by
    /// [`kill`](Self::kill)).
    #[track_caller]
    pub fn wait_failover(&self, killed_addr: &str, timeout: Duration) -> (String, Duration) {
        let port = port_of(killed_addr);
        let (since, slots) = match self.killed.get(&port) {
            Some(k) => (k.at, k.slots.clone()),
            None => {
                let map = self.any_port().and_then(slot_map).unwrap_or_default();
                let slots = map.iter().filter(|r| r.2 == port).map(|r| (r.0, r.1));
                (Instant::now(), slots.collect())
            }
        };
        assert!(!slots.is_empty(), "{killed_addr} served no slots");
        let what = format!("a replica to take over the slots of {killed_addr}");
        let new = poll(timeout, &what, || {
            let map = self.settled(None)?;
            let owners: Vec<u16> = slots
                .iter()
                .flat_map(|&(a, b)| map.iter().filter(move |r| r.0 <= b && r.1 >= a))
                .map(|r| r.2)
                .collect();
            match owners.as_slice() {
                [first, rest @ ..] if rest.iter().all(|p| p == first) => Ok(*first),
                _ => Err(format!("slots {slots:?} served by {owners:?}")),
            }
        });
        (format!("127.0.0.1:{new}"), since.elapsed())
    }

    /// Stops `node` (SIGKILL), starts it again with the same directory
    /// (so the same `nodes.conf`: same id, same slots or master) on a new
    /// free port, and waits until every other running node lists it at the
    /// new address and the cluster is healthy again. Returns the new
    /// `127.0.0.1:P`. The node comes back empty (nothing is persisted). A
    /// restarted master stays master when it is back within the node
    /// timeout (see [`ClusterBuilder::node_timeout`]), but Redis keeps it
    /// in `cluster_state:fail` (refusing with CLUSTERDOWN) for 2 s after
    /// it starts, its "writable delay", so this takes at least that long.
    #[track_caller]
    pub fn restart_on_new_port(&mut self, node: &Node) -> String {
        let old = node.port;
        let timeout_ms = self.timeout_ms.clone();
        let inst = self.instance(old);
        inst.stop();
        let mut last = String::new();
        let mut started = false;
        for _ in 0..5 {
            let port = loop {
                let p = cluster_port();
                if p != old {
                    break p;
                }
            };
            let args = node_args(port, inst.dir.path(), &timeout_ms);
            match inst.spawn(port, &args) {
                Ok(()) => {
                    started = true;
                    break;
                }
                Err(e) => last = e,
            }
        }
        assert!(started, "{} did not restart: {last}", node.addr());
        let new = inst.port;
        self.killed.remove(&old);
        let what = format!("the cluster to see {} at 127.0.0.1:{new}", node.id);
        poll(SETTLE_TIMEOUT, &what, || {
            for p in self.live_ports() {
                let text = query_text(p, &["CLUSTER", "NODES"])?;
                let seen = text
                    .lines()
                    .filter_map(Node::parse)
                    .find(|n| n.id == node.id);
                if seen.as_ref().map(|n| n.port) != Some(new) {
                    return Err(format!("127.0.0.1:{p} sees {seen:?}"));
                }
            }
            self.settled(None).map(drop)
        });
        format!("127.0.0.1:{new}")
    }

    /// Runs `redis-cli args…` on `node` (see [`redis_cli`]).
    #[track_caller]
    pub fn cli(&self, node: &Node, args: &[&str]) -> String {
        redis_cli(&node.addr(), args)
    }

    /// FLUSHALL on every running master, each waiting (WAIT, up to 2 s)
    /// for its replicas to follow.
    #[track_caller]
    pub fn flushall(&self) {
        for m in self.masters() {
            let replicas = self.replicas_of(&m).len().to_string();
            let done = connect(m.port).and_then(|mut con| {
                run(&mut con, &["FLUSHALL"])?;
                run(&mut con, &["WAIT", &replicas, "2000"])
            });
            if let Err(e) = done {
                panic!("FLUSHALL on {}: {e}", m.addr());
            }
        }
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|i| i.alive())
            .map(|i| i.port)
            .collect()
    }

    fn any_port(&self) -> Result<u16, String> {
        self.live_ports()
            .into_iter()
            .find(|&p| redis_ping(p))
            .ok_or_else(|| "no cluster node answers PING".to_string())
    }

    /// The answer of the first running node that answers.
    fn ask_any(&self, args: &[&str]) -> Result<String, String> {
        query_text(self.any_port()?, args)
    }

    #[track_caller]
    fn instance(&mut self, port: u16) -> &mut Instance {
        self.nodes
            .iter_mut()
            .find(|i| i.port == port)
            .unwrap_or_else(|| panic!("127.0.0.1:{port} is not a node of this cluster"))
    }

    /// Whether the running nodes form a healthy cluster, and its slot map:
    /// on every running node `cluster_state:ok`; `CLUSTER SLOTS` covers all
    /// slots, with running masters only, the same on every node; every
    /// running node seen at its port, connected, not flagged failing; each
    /// running replica's link to its master up. With `expect` (masters,
    /// replicas), also exactly that many of each, and no other node known.
    fn settled(&self, expect: Option<(usize, usize)>) -> Result<SlotMap, String> {
        let live = self.live_ports();
        let mut first: Option<SlotMap> = None;
        for &p in &live {
            let info = query_text(p, &["CLUSTER", "INFO"])?;
            if field(&info, "cluster_state") != Some("ok") {
                return Err(format!("127.0.0.1:{p}: {info}"));
            }
            let map = slot_map(p)?;
            let mut next = 0u32;
            for &(a, b, m) in &map {
                if u32::from(a) != next || !live.contains(&m) {
                    return Err(format!("127.0.0.1:{p} CLUSTER SLOTS: {map:?}"));
                }
                next = u32::from(b) + 1;
            }
            if next != u32::from(SLOTS) {
                return Err(format!("127.0.0.1:{p} CLUSTER SLOTS: {map:?}"));
            }
            match &first {
                Some(f) if *f != map => return Err(format!("slot maps differ: {f:?} {map:?}")),
                _ => first = Some(map),
            }
            let view: Vec<Node> = query_text(p, &["CLUSTER", "NODES"])?
                .lines()
                .filter_map(Node::parse)
                .collect();
            for &q in &live {
                match view.iter().find(|n| n.port == q) {
                    Some(n) if n.healthy() => {}
                    other => return Err(format!("127.0.0.1:{p} sees {q} as {other:?}")),
                }
            }
            if let Some((masters, replicas)) = expect {
                let m = view.iter().filter(|n| n.master).count();
                if m != masters || view.len() != masters + replicas {
                    return Err(format!("127.0.0.1:{p} sees {view:?}"));
                }
            }
            let repl = query_text(p, &["INFO", "replication"])?;
            if field(&repl, "role") == Some("slave")
                && field(&repl, "master_link_status") != Some("up")
            {
                return Err(format!("127.0.0.1:{p}: {repl}"));
            }
        }
        first.ok_or_else(|| "no node is running".to_string())
    }
}

/// `CLUSTER SLOTS` of 127.0.0.1:`port` as (first, last, master port), sorted.
fn slot_map(port: u16) -> Result<SlotMap, String> {
    use redis::Value as V;
    let bad = |v: &V| format!("127.0.0.1:{port}: unexpected CLUSTER SLOTS entry {v:?}");
    let V::Array(entries) = query(port, &["CLUSTER", "SLOTS"])? else {
        return Err(format!("127.0.0.1:{port}: CLUSTER SLOTS is not an array"));
    };
    let mut map = SlotMap::new();
    for e in &entries {
        let V::Array(parts) = e else {
            return Err(bad(e));
        };
        match parts.as_slice() {
            [V::Int(a), V::Int(b), V::Array(master), ..] => match master.get(1) {
                Some(V::Int(p)) => map.push((*a as u16, *b as u16, *p as u16)),
                _ => return Err(bad(e)),
            },
            _ => return Err(bad(e)),
        }
    }
    map.sort_unstable();
    Ok(map)
}
