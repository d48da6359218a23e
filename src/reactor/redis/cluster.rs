//! What the client knows of a Redis Cluster: the slot map (slot → the
//! node serving it, read with `CLUSTER SLOTS` and patched by `MOVED`),
//! when to read it again, and where a request goes (the slot of its key:
//! a command's key by the command's shape, a script's first key, a
//! transaction's first key; a pipeline is split, command by command).
//!
//! The map is read again at once after a `MOVED`, every
//! [`REFRESH_FAST`] while a node of the map is unreachable or requests
//! wait for a slot (a failover is under way), and every [`REFRESH_IDLE`]
//! otherwise, so a node that came back on a new address is dialled there
//! (centrifugo#735).

use std::time::{Duration, Instant};

use redis::{Cmd, Value};

use super::request::Request;
use super::slot::{slot_of, SLOTS};
use super::target::Addr;

/// The map is read this often while something is wrong.
pub const REFRESH_FAST: Duration = Duration::from_millis(200);
/// … and this often when all is well.
pub const REFRESH_IDLE: Duration = Duration::from_secs(5);

/// No node serves the slot (yet).
const NONE: u16 = u16::MAX;

/// The slot map and its refresh schedule.
#[derive(Debug)]
pub struct SlotMap {
    owner: Vec<u16>,                            // slot → node index, NONE unknown
    pub(crate) refresh_at: Instant,             // next CLUSTER SLOTS
    pub(crate) asked: Option<(usize, Instant)>, // in flight: node, since
    pub(crate) seeds: Vec<Addr>,                // where to start over
    pub(crate) sharded: bool,                   // SPUBLISH/SSUBSCRIBE
    pub(crate) known: bool,                     // a map was read
}

impl SlotMap {
    /// An empty map, to be read from `seeds`.
    pub fn new(seeds: Vec<Addr>, sharded: bool) -> SlotMap {
        SlotMap {
            owner: vec![NONE; SLOTS],
            refresh_at: Instant::now(),
            asked: None,
            seeds,
            sharded,
            known: false,
        }
    }

    /// The node serving `slot`.
    pub fn owner(&self, slot: u16) -> Option<usize> {
        match self.owner.get(usize::from(slot)) {
            Some(&n) if n != NONE => Some(usize::from(n)),
            _ => None,
        }
    }

    /// Moves `slot` to node `i` (a `MOVED` answer); whether it had
    /// another node before.
    pub fn set(&mut self, slot: u16, i: usize) -> bool {
        match self.owner.get_mut(usize::from(slot)) {
            Some(o) => {
                let moved = *o != NONE && usize::from(*o) != i;
                *o = i as u16;
                moved
            }
            None => false,
        }
    }

    /// Replaces the map: `ranges` are `(first, last, node index)`; whether
    /// a slot moved from one node to another.
    pub fn replace(&mut self, ranges: &[(u16, u16, usize)]) -> bool {
        let before = std::mem::replace(&mut self.owner, vec![NONE; SLOTS]);
        for &(a, b, i) in ranges {
            for s in a..=b.min(SLOTS as u16 - 1) {
                self.owner[usize::from(s)] = i as u16;
            }
        }
        self.known = true;
        (before.iter().zip(&self.owner)).any(|(&was, &is)| was != NONE && is != NONE && was != is)
    }

    /// Whether every slot has a node.
    pub fn complete(&self) -> bool {
        self.known && self.owner.iter().all(|&o| o != NONE)
    }

    /// The nodes the map names, each once, in slot order.
    pub fn nodes(&self) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        for &o in &self.owner {
            if o != NONE && !out.contains(&usize::from(o)) {
                out.push(usize::from(o));
            }
        }
        out
    }

    /// A short hash tag whose slot node `i` serves (for its probe
    /// channel), if it serves any.
    pub fn tag_for(&self, i: usize) -> Option<String> {
        (0u32..200_000)
            .map(|n| n.to_string())
            .find(|t| self.owner(slot_of(t.as_bytes())) == Some(i))
    }

    /// Asks for the map again within `after`.
    pub fn soon(&mut self, after: Duration) {
        let at = Instant::now() + after;
        if at < self.refresh_at {
            self.refresh_at = at;
        }
    }
}

/// The `(first, last, host, port)` ranges of a `CLUSTER SLOTS` reply. An
/// empty host means the node that answered (`asked`).
pub fn parse_slots(v: &Value, asked: &Addr) -> Result<Vec<(u16, u16, Addr)>, String> {
    let Value::Array(ranges) = v else {
        return Err(format!("CLUSTER SLOTS: not an array: {v:?}"));
    };
    let int = |v: &Value| match v {
        Value::Int(n) => u16::try_from(*n).ok(),
        _ => None,
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let mut out = Vec::new();
    for r in ranges {
        let Value::Array(parts) = r else {
            return Err("CLUSTER SLOTS: a range is not an array".into());
        };
        let (Some(a), Some(b), Some(Value::Array(master))) = (
            parts.first().and_then(int),
            parts.get(1).and_then(int),
            parts.get(2),
        ) else {
            return Err("CLUSTER SLOTS: a range lacks its bounds or master".into());
        };
        let (Some(host), Some(port)) = (master.first().and_then(text), master.get(1).and_then(int))
        else {
            return Err("CLUSTER SLOTS: a master lacks its address".into());
        };
        let host = if host.is_empty() || host == "?" {
            asked.0.clone()
        } else {
            host
        };
        out.push((a, b, (host, port)));
    }
    Ok(out)
}

/// `host:port` of a redirection's target (`MOVED 3999 127.0.0.1:7001`).
pub fn parse_addr(s: &str) -> Option<Addr> {
    let (h, p) = s.rsplit_once(':')?;
    Some((h.trim_matches(['[', ']']).to_string(), p.parse().ok()?))
}

/// The argument a command is routed by (its first key; a channel for
/// PUBLISH), or `None` for a command that names no key.
pub fn cmd_key(c: &Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = c
        .args_iter()
        .filter_map(|a| match a {
            redis::Arg::Simple(b) => Some(b),
            redis::Arg::Cursor => None,
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            let n: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
            (n > 0).then(|| args.get(3).map(|k| k.to_vec()))?
        }
        b"XREAD" | b"XREADGROUP" => {
            let at = args
                .iter()
                .position(|a| a.eq_ignore_ascii_case(b"STREAMS"))?;
            args.get(at + 1).map(|k| k.to_vec())
        }
        b"PING" | b"INFO" | b"SCRIPT" | b"CLUSTER" | b"TIME" | b"DBSIZE" | b"FLUSHALL"
        | b"FLUSHDB" | b"KEYS" | b"SCAN" | b"RANDOMKEY" | b"CONFIG" | b"COMMAND" | b"CLIENT"
        | b"ROLE" | b"ECHO" | b"MULTI" | b"EXEC" | b"ASKING" | b"AUTH" | b"SELECT" | b"HELLO" => {
            None
        }
        _ => args.get(1).map(|k| k.to_vec()),
    }
}

/// The slot a request goes to (`None`: any node). A pipeline has none of
/// its own: it is split ([`split`]).
pub fn request_slot(req: &Request) -> Option<u16> {
    match req {
        Request::Cmd(c) => cmd_key(c).map(|k| slot_of(&k)),
        Request::Script(s) => s.first_key().map(slot_of),
        Request::Atomic(p) | Request::Pipe(p) => {
            p.cmd_iter().find_map(cmd_key).map(|k| slot_of(&k))
        }
    }
}

/// `PUBLISH ch msg` as `SPUBLISH ch msg` (sharded pub/sub); any other
/// command unchanged.
pub fn shard_publish(c: Cmd) -> Cmd {
    let sharded = {
        let mut args = c.args_iter().filter_map(|a| match a {
            redis::Arg::Simple(b) => Some(b),
            redis::Arg::Cursor => None,
        });
        match args.next() {
            Some(n) if n.eq_ignore_ascii_case(b"PUBLISH") => {
                let mut s = redis::cmd("SPUBLISH");
                for a in args {
                    s.arg(a);
                }
                Some(s)
            }
            _ => None,
        }
    };
    sharded.unwrap_or(c)
}

/// A pipeline's commands, one request each (a cluster routes each by its
/// own key; the replies are put back together in order).
pub fn split(p: &redis::Pipeline) -> Vec<Cmd> {
    p.cmd_iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_commands() {
        let mut c = redis::cmd("HSET");
        c.arg("im_user:{u1}").arg("f").arg("v");
        assert_eq!(cmd_key(&c).unwrap(), b"im_user:{u1}");
        let mut e = redis::cmd("EVALSHA");
        e.arg("abc")
            .arg(2)
            .arg("inbox:{u1}")
            .arg("inbox:{u1}:meta")
            .arg("x");
        assert_eq!(cmd_key(&e).unwrap(), b"inbox:{u1}");
        let mut e0 = redis::cmd("EVAL");
        e0.arg("return 1").arg(0);
        assert_eq!(cmd_key(&e0), None);
        let mut x = redis::cmd("XREAD");
        x.arg("COUNT").arg(5).arg("STREAMS").arg("s1").arg("0");
        assert_eq!(cmd_key(&x).unwrap(), b"s1");
        assert_eq!(cmd_key(&redis::cmd("PING")), None);
        let mut p = redis::cmd("PUBLISH");
        p.arg("ch").arg("m");
        let sp = shard_publish(p);
        assert_eq!(sp.args_iter().count(), 3);
        assert_eq!(cmd_key(&sp).unwrap(), b"ch");
        assert!(matches!(
            sp.args_iter().next(),
            Some(redis::Arg::Simple(b"SPUBLISH"))
        ));
    }

    #[test]
    fn slots_reply() {
        let node = |h: &str, p: i64| {
            Value::Array(vec![
                Value::BulkString(h.into()),
                Value::Int(p),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let v = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7000),
                node("127.0.0.1", 7003),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node("", 7001)]),
        ]);
        let r = parse_slots(&v, &("10.0.0.9".into(), 7005)).unwrap();
        assert_eq!(r[0], (0, 5460, ("127.0.0.1".into(), 7000)));
        assert_eq!(r[1], (5461, 16383, ("10.0.0.9".into(), 7001)));
        let mut m = SlotMap::new(Vec::new(), true);
        assert!(!m.complete());
        m.replace(&[(0, 5460, 0), (5461, 16383, 1)]);
        assert!(m.complete());
        assert_eq!(m.owner(5460), Some(0));
        assert_eq!(m.nodes(), vec![0, 1]);
        let t = m.tag_for(1).unwrap();
        assert!(slot_of(t.as_bytes()) >= 5461);
        assert_eq!(
            parse_addr("127.0.0.1:7001"),
            Some(("127.0.0.1".into(), 7001))
        );
    }
}
