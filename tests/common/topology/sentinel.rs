//! A Redis Sentinel set for tests: see [`SentinelSet`].

use std::collections::HashMap;
use std::fs;
use std::time::{Duration, Instant};

use super::{
    field, free_port, poll, port_of, query, query_text, redis_cli, server_args, Instance,
    SETTLE_TIMEOUT,
};

/// `down-after-milliseconds`: a master silent this long is subjectively
/// down for a sentinel; with 2 of 3 agreeing it is objectively down and
/// failed over.
const DOWN_AFTER_MS: u64 = 1000;

/// `failover-timeout`: also how long a sentinel waits before it retries a
/// failover that did not complete (twice this), so kept small.
const FAILOVER_TIMEOUT_MS: u64 = 2000;

/// One master and two replicas (`--replicaof`), watched by three sentinels
/// with quorum 2, all `redis-server` children on free 127.0.0.1 ports, each
/// in its own directory; SIGKILLed by pid when dropped.
pub struct SentinelSet {
    name: String,
    /// The data nodes; the first started as the master.
    data: Vec<Instance>,
    sentinels: Vec<Instance>,
    /// Data nodes killed by [`kill_master`](Self::kill_master), by port.
    killed: HashMap<u16, Instant>,
    started_in: Duration,
}

impl SentinelSet {
    /// Starts the master, its two replicas (waiting until both are in sync)
    /// and three sentinels monitoring it as `name`; returns once every
    /// sentinel sees the master, 2 replicas and the 2 other sentinels.
    #[track_caller]
    pub fn start(name: &str) -> SentinelSet {
        let t0 = Instant::now();
        let master = Instance::start("sentinel set master", free_port, |p, dir| {
            server_args(p, dir, "")
        });
        let mport = master.port;
        let mut data = vec![master];
        for i in 1..=2 {
            data.push(Instance::start(
                &format!("sentinel set replica {i}"),
                free_port,
                |p, dir| server_args(p, dir, &format!("--replicaof 127.0.0.1 {mport}")),
            ));
        }
        poll(SETTLE_TIMEOUT, "both replicas in sync", || {
            for r in &data[1..] {
                let info = query_text(r.port, &["INFO", "replication"])?;
                if field(&info, "master_link_status") != Some("up") {
                    return Err(format!("{}: {info}", r.addr()));
                }
            }
            let info = query_text(mport, &["INFO", "replication"])?;
            match field(&info, "connected_slaves") {
                Some("2") => Ok(()),
                _ => Err(format!("master: {info}")),
            }
        });
        let sentinels = (0..3)
            .map(|i| {
                Instance::start(&format!("sentinel {i}"), free_port, |port, dir| {
                    // Rewritten for each attempt: the sentinel rewrites its
                    // file (its id, what it learnt) while it runs.
                    let conf = dir.join("sentinel.conf");
                    let text = format!(
                        "port {port}\nbind 127.0.0.1\ndaemonize no\ndir \"{dir}\"\n\
                         sentinel resolve-hostnames no\n\
                         sentinel monitor {name} 127.0.0.1 {mport} 2\n\
                         sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}\n\
                         sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}\n\
                         sentinel parallel-syncs {name} 1\n",
                        dir = dir.display()
                    );
                    if let Err(e) = fs::write(&conf, text) {
                        panic!("cannot write {}: {e}", conf.display());
                    }
                    vec![conf.into_os_string(), "--sentinel".into()]
                })
            })
            .collect();
        let mut set = SentinelSet {
            name: name.to_string(),
            data,
            sentinels,
            killed: HashMap::new(),
            started_in: Duration::ZERO,
        };
        poll(
            SETTLE_TIMEOUT,
            "every sentinel to see 2 replicas and 2 other sentinels",
            || {
                for s in &set.sentinels {
                    let m = set.sentinel_master(s.port)?;
                    let get = |k: &str| m.get(k).map(String::as_str);
                    let want = [
                        ("flags", "master"),
                        ("num-slaves", "2"),
                        ("num-other-sentinels", "2"),
                    ];
                    if want.iter().any(|&(k, v)| get(k) != Some(v)) {
                        return Err(format!("{}: {m:?}", s.addr()));
                    }
                }
                Ok(())
            },
        );
        set.started_in = t0.elapsed();
        set
    }

    /// How long [`start`](Self::start) took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The name the sentinels monitor the master as.
    pub fn master_name(&self) -> &str {
        &self.name
    }

    /// `redis://127.0.0.1:P` of each running sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinel_addrs()
            .iter()
            .map(|a| format!("redis://{a}"))
            .collect()
    }

    /// `127.0.0.1:P` of each running sentinel.
    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .filter(|s| s.alive())
            .map(|s| s.addr())
            .collect()
    }

    /// `127.0.0.1:P` of each running data node (master and replicas).
    pub fn data_addrs(&self) -> Vec<String> {
        self.data
            .iter()
            .filter(|s| s.alive())
            .map(|s| s.addr())
            .collect()
    }

    /// The master's `127.0.0.1:P`, per `SENTINEL get-master-addr-by-name`
    /// of the first sentinel that answers.
    #[track_caller]
    pub fn master_addr(&self) -> String {
        poll(SETTLE_TIMEOUT, "a sentinel to name the master", || {
            let mut last = String::from("no sentinel running");
            for s in self.sentinels.iter().filter(|s| s.alive()) {
                match self.get_master_addr(s.port) {
                    Ok(a) => return Ok(a),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
    }

    /// SIGKILLs the current master (as the sentinels name it) by pid and
    /// reaps it; returns its `127.0.0.1:P`.
    #[track_caller]
    pub fn kill_master(&mut self) -> String {
        let addr = self.master_addr();
        let port = port_of(&addr);
        let inst = self
            .data
            .iter_mut()
            .find(|i| i.port == port)
            .unwrap_or_else(|| panic!("the sentinels name {addr}, not a node of this set"));
        inst.stop();
        self.killed.insert(port, Instant::now());
        addr
    }

    /// Waits until every running sentinel names the same master other than
    /// `old` and that node answers ROLE as master. Returns its
    /// `127.0.0.1:P` and the time since [`kill_master`](Self::kill_master)
    /// killed `old` (since this call otherwise).
    #[track_caller]
    pub fn wait_switch(&self, old: &str, timeout: Duration) -> (String, Duration) {
        let since = self
            .killed
            .get(&port_of(old))
            .copied()
            .unwrap_or_else(Instant::now);
        let what = format!("the sentinels to promote a replica of {old}");
        let new = poll(timeout, &what, || {
            let mut named = Vec::new();
            for s in self.sentinels.iter().filter(|s| s.alive()) {
                named.push(self.get_master_addr(s.port)?);
            }
            match named.as_slice() {
                [first, rest @ ..] if first != old && rest.iter().all(|a| a == first) => {
                    let role = query_text(port_of(first), &["ROLE"])?;
                    if role.lines().next() == Some("master") {
                        Ok(first.clone())
                    } else {
                        Err(format!("{first} answers ROLE {role:?}"))
                    }
                }
                _ => Err(format!("sentinels name {named:?}")),
            }
        });
        (new, since.elapsed())
    }

    /// Runs `redis-cli args…` on `addr` (a data node or a sentinel; see
    /// [`redis_cli`](super::redis_cli)).
    #[track_caller]
    pub fn cli(&self, addr: &str, args: &[&str]) -> String {
        redis_cli(addr, args)
    }

    /// `SENTINEL get-master-addr-by-name` of the sentinel on `port`.
    fn get_master_addr(&self, port: u16) -> Result<String, String> {
        let v = query(port, &["SENTINEL", "get-master-addr-by-name", &self.name])?;
        match redis::from_redis_value::<Option<(String, String)>>(&v) {
            Ok(Some((ip, p))) => Ok(format!("{ip}:{p}")),
            Ok(None) => Err(format!("127.0.0.1:{port} knows no master {}", self.name)),
            Err(e) => Err(format!("127.0.0.1:{port}: {e}")),
        }
    }

    /// `SENTINEL MASTER name` of the sentinel on `port`, as a map.
    fn sentinel_master(&self, port: u16) -> Result<HashMap<String, String>, String> {
        let v = query(port, &["SENTINEL", "MASTER", &self.name])?;
        redis::from_redis_value(&v).map_err(|e| format!("127.0.0.1:{port}: {e}"))
    }
}
