//! What an application hands the worker's Redis client: a [`Request`] (one
//! command, a pipeline, a MULTI/EXEC transaction or a Lua [`Script`]
//! call), packed with the `redis` crate's own command encoder.

use std::sync::Arc;

use redis::{Cmd, Pipeline, ToRedisArgs};

/// A Lua script: its source and SHA1, for `EVALSHA` (the client loads it
/// with `SCRIPT LOAD` the first time a connection uses it, and falls back
/// to `EVAL` if the server forgot it).
#[derive(Debug, Clone)]
pub struct Script {
    code: Arc<str>, // the Lua source (shared: every call holds the script)
    hash: Arc<str>, // its SHA1, hex
}

impl Script {
    /// A script for `code`.
    pub fn new(code: &str) -> Script {
        Script {
            code: code.into(),
            hash: redis::Script::new(code).get_hash().into(),
        }
    }

    /// Its SHA1.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Its source.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// A call of the script with `keys` and `args`.
    pub fn call(&self) -> ScriptCall {
        ScriptCall {
            script: self.clone(),
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// One invocation of a [`Script`].
#[derive(Debug, Clone)]
pub struct ScriptCall {
    pub(crate) script: Script, // what runs
    keys: Vec<Vec<u8>>,        // KEYS
    args: Vec<Vec<u8>>,        // ARGV
}

impl ScriptCall {
    /// Adds a key (every key the script touches must be passed).
    pub fn key(mut self, k: impl ToRedisArgs) -> ScriptCall {
        self.keys.extend(k.to_redis_args());
        self
    }

    /// Adds an argument.
    pub fn arg(mut self, a: impl ToRedisArgs) -> ScriptCall {
        self.args.extend(a.to_redis_args());
        self
    }

    /// Its first key (a cluster routes the call by it).
    pub(crate) fn first_key(&self) -> Option<&[u8]> {
        self.keys.first().map(Vec::as_slice)
    }

    /// The call as one `EVAL` command (with the source): for a program
    /// that runs it on a plain connection, such as a test.
    pub fn eval_cmd(&self) -> Cmd {
        self.command(true)
    }

    /// The `EVALSHA` (or, with `by_source`, `EVAL`) command.
    pub(crate) fn command(&self, by_source: bool) -> Cmd {
        let mut c = if by_source {
            let mut c = redis::cmd("EVAL");
            c.arg(&*self.script.code);
            c
        } else {
            let mut c = redis::cmd("EVALSHA");
            c.arg(&*self.script.hash);
            c
        };
        c.arg(self.keys.len());
        for k in &self.keys {
            c.arg(k.as_slice());
        }
        for a in &self.args {
            c.arg(a.as_slice());
        }
        c
    }
}

/// One unit of work for Redis; its callback gets one reply.
#[derive(Clone)]
pub enum Request {
    /// One command; the reply is its reply.
    Cmd(Cmd),
    /// Commands sent back to back; the reply is an array of their replies
    /// (the first server error instead, if any).
    Pipe(Pipeline),
    /// `MULTI` … `EXEC`; the reply is `EXEC`'s array.
    Atomic(Pipeline),
    /// A Lua script; the reply is the script's.
    Script(ScriptCall),
}

impl Request {
    /// Replies the server sends for it.
    pub(crate) fn replies(&self) -> usize {
        match self {
            Request::Cmd(_) | Request::Script(_) => 1,
            Request::Pipe(p) => p.len(),
            Request::Atomic(p) => p.len() + 2,
        }
    }

    /// Appends the encoded request to `out`.
    pub(crate) fn pack(&self, out: &mut Vec<u8>) {
        match self {
            Request::Cmd(c) => c.write_packed_command(out),
            Request::Pipe(p) => p.cmd_iter().for_each(|c| c.write_packed_command(out)),
            Request::Atomic(p) => {
                redis::cmd("MULTI").write_packed_command(out);
                p.cmd_iter().for_each(|c| c.write_packed_command(out));
                redis::cmd("EXEC").write_packed_command(out);
            }
            Request::Script(s) => s.command(false).write_packed_command(out),
        }
    }

    /// Whether it has nothing to send (an empty pipeline).
    pub(crate) fn is_empty(&self) -> bool {
        match self {
            Request::Pipe(p) | Request::Atomic(p) => p.is_empty(),
            _ => false,
        }
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Request::Cmd(_) => "Cmd",
            Request::Pipe(_) => "Pipe",
            Request::Atomic(_) => "Atomic",
            Request::Script(_) => "Script",
        };
        write!(f, "Request::{kind}({} replies)", self.replies())
    }
}

impl From<Cmd> for Request {
    fn from(c: Cmd) -> Request {
        Request::Cmd(c)
    }
}

impl From<&mut Cmd> for Request {
    fn from(c: &mut Cmd) -> Request {
        Request::Cmd(c.clone())
    }
}

impl From<Pipeline> for Request {
    fn from(p: Pipeline) -> Request {
        Request::Pipe(p)
    }
}

impl From<&mut Pipeline> for Request {
    fn from(p: &mut Pipeline) -> Request {
        Request::Pipe(p.clone())
    }
}

impl From<ScriptCall> for Request {
    fn from(s: ScriptCall) -> Request {
        Request::Script(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_and_reply_counts() {
        let mut out = Vec::new();
        let r: Request = redis::cmd("PING").into();
        r.pack(&mut out);
        assert_eq!(out, b"*1\r\n$4\r\nPING\r\n");
        let mut p = redis::pipe();
        p.cmd("GET").arg("a").cmd("GET").arg("b");
        assert_eq!(Request::Pipe(p.clone()).replies(), 2);
        assert_eq!(Request::Atomic(p.clone()).replies(), 4);
        let mut out = Vec::new();
        Request::Atomic(p).pack(&mut out);
        assert!(out.starts_with(b"*1\r\n$5\r\nMULTI\r\n"));
        assert!(out.ends_with(b"*1\r\n$4\r\nEXEC\r\n"));
        let s = Script::new("return 1");
        let c = s.call().key("k").arg(7);
        let mut out = Vec::new();
        Request::Script(c).pack(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("EVALSHA") && text.contains(s.hash()) && text.contains("\r\nk\r\n"));
    }
}
