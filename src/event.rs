//! The application contract: Swoole's lifecycle and protocol hooks as one
//! trait, and the event bus (the seed's `Event` / `Listen`).
//!
//! An application is a type implementing [`App`]; every hook has a no-op
//! default. The application value is built once, before the master forks, so
//! each process gets its own copy and runs the hooks that belong to its
//! role:
//!
//! | process      | hooks |
//! |--------------|-------|
//! | master       | `on_start`, `on_shutdown` |
//! | manager      | `on_manager_start`, `on_manager_stop`, `on_worker_error` |
//! | event worker | `on_worker_start`, `on_worker_exit`, `on_worker_stop`, `on_open`, `on_adopt`, `on_message`, `on_close`, `on_request`, `on_pipe_message`, `on_finish`, `on_connect` |
//! | task worker  | `on_worker_start`, `on_worker_stop`, `on_task` |
//!
//! The [`EventBus`] maps case-insensitive event names to listeners, run in
//! registration order. Inside a worker the framework triggers
//! `workerStart` and `workerStop`; applications trigger their own names.

use std::collections::HashMap;

use serde_json::Value;

use crate::config::Settings;
use crate::reactor::{Fd, Message, Request, Response, Server};

/// What the master and manager hooks see of the server.
#[derive(Debug, Clone, Copy)]
pub struct ServerInfo<'a> {
    /// The settings the server runs with.
    pub settings: &'a Settings,
    /// The master's pid.
    pub master_pid: i32,
    /// The manager's pid (0 before it exists).
    pub manager_pid: i32,
}

/// How a worker ended, for [`App::on_worker_error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerFailure {
    /// The worker slot.
    pub worker_id: usize,
    /// The dead process.
    pub pid: i32,
    /// Its exit code (0 when killed by a signal).
    pub exit_code: i32,
    /// The signal that killed it (0 when it exited).
    pub signal: i32,
}

/// An application that owns a component `C`: how the component's Redis
/// callbacks (`srv.redis(req, |app, srv, reply| …)`), which get the whole
/// application, find the component again without knowing the app's type.
pub trait Holds<C>: App {
    /// The component.
    fn part(&mut self) -> &mut C;
}

/// A swocloud application: implement the hooks you need.
#[allow(unused_variables)]
pub trait App: Sized + 'static {
    /// Master, once the manager runs (Swoole's onStart).
    fn on_start(&mut self, info: &ServerInfo) {}
    /// Master, after everything stopped (onShutdown).
    fn on_shutdown(&mut self, info: &ServerInfo) {}
    /// Manager, before it forks workers (onManagerStart).
    fn on_manager_start(&mut self, info: &ServerInfo) {}
    /// Manager, after the last worker exited (onManagerStop).
    fn on_manager_stop(&mut self, info: &ServerInfo) {}
    /// Manager, when a worker died abnormally (onWorkerError).
    fn on_worker_error(&mut self, info: &ServerInfo, failure: &WorkerFailure) {}

    /// Registers the application's event listeners (each worker, before
    /// `on_worker_start`).
    fn listeners(&mut self, bus: &mut EventBus<Server<Self>>) {}
    /// Worker or task worker start: open per-process resources here.
    fn on_worker_start(&mut self, srv: &mut Server<Self>) {}
    /// A graceful stop begins: connections are still open (Swoole's
    /// onWorkerExit). Say goodbye here; the framework then closes
    /// WebSocket peers with 1001 — unless [`Server::is_handing_over`]: then
    /// they move to the replacement worker and no goodbye is due.
    fn on_worker_exit(&mut self, srv: &mut Server<Self>) {}
    /// Worker or task worker stop.
    fn on_worker_stop(&mut self, srv: &mut Server<Self>) {}
    /// A WebSocket client finished its upgrade.
    fn on_open(&mut self, srv: &mut Server<Self>, fd: Fd, req: &Request) {}
    /// A complete WebSocket message (text or binary) arrived.
    fn on_message(&mut self, srv: &mut Server<Self>, fd: Fd, msg: Message) {}
    /// A WebSocket connection (server or client side) moved here from the
    /// worker this one replaces (rolling reload, `max_request`): it stays
    /// open, so there is no `on_open` (nor `on_close` in the old worker).
    /// `fd` is its new id in this worker; `attrs` are the attributes set with
    /// [`Server::set_attr`] in the old worker (also readable with
    /// [`Server::attr`]). Restore per-connection state from them here.
    fn on_adopt(&mut self, srv: &mut Server<Self>, fd: Fd, attrs: &HashMap<String, Value>) {}
    /// A WebSocket connection (server or client side) closed.
    fn on_close(&mut self, srv: &mut Server<Self>, fd: Fd) {}
    /// An HTTP request on a non-upgraded connection.
    fn on_request(&mut self, srv: &mut Server<Self>, req: &Request) -> Response {
        Response::text(404, "not found\n")
    }
    /// A message from another worker (`Server::send_message`).
    fn on_pipe_message(&mut self, srv: &mut Server<Self>, from_worker: usize, data: Vec<u8>) {}
    /// Task worker: run a job and return its result (sent back to the
    /// worker that asked, as `on_finish`).
    fn on_task(
        &mut self,
        srv: &mut Server<Self>,
        task_id: u64,
        from_worker: usize,
        data: Vec<u8>,
    ) -> Vec<u8> {
        Vec::new()
    }
    /// A task's result came back.
    fn on_finish(&mut self, srv: &mut Server<Self>, task_id: u64, result: Vec<u8>) {}
    /// An outbound WebSocket connection (`Server::ws_connect`) finished its
    /// handshake.
    fn on_connect(&mut self, srv: &mut Server<Self>, fd: Fd) {}
}

/// A boxed listener: gets the context and the trigger's arguments.
pub type Callback<C> = Box<dyn FnMut(&mut C, &[Value])>;

/// A named listener object, as the seed's `Listen` class: a name and a
/// handler.
pub trait Listen<C> {
    /// The event name it listens to (case-insensitive).
    fn name(&self) -> &str;
    /// Runs when the event is triggered.
    fn handle(&mut self, ctx: &mut C, args: &[Value]);
}

/// Event name → listeners, names compared case-insensitively.
pub struct EventBus<C> {
    listeners: HashMap<String, Vec<Callback<C>>>,
}

impl<C: 'static> std::fmt::Debug for EventBus<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("events", &self.events())
            .finish()
    }
}

impl<C> Default for EventBus<C> {
    fn default() -> Self {
        EventBus {
            listeners: HashMap::new(),
        }
    }
}

impl<C: 'static> EventBus<C> {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a listener for `event`; several may listen to one name.
    pub fn register(&mut self, event: &str, f: impl FnMut(&mut C, &[Value]) + 'static) {
        self.listeners
            .entry(event.to_lowercase())
            .or_default()
            .push(Box::new(f));
    }

    /// Adds a [`Listen`] object under its own name.
    pub fn listen(&mut self, mut l: impl Listen<C> + 'static) {
        let name = l.name().to_string();
        self.register(&name, move |ctx, args| l.handle(ctx, args));
    }

    /// Runs the listeners of `event` in registration order and returns how
    /// many ran (0: nobody listens). A listener may register more listeners
    /// for the same event; they run from the next trigger on.
    pub fn trigger(&mut self, ctx: &mut C, event: &str, args: &[Value]) -> usize {
        let key = event.to_lowercase();
        let Some(mut list) = self.listeners.remove(&key) else {
            return 0;
        };
        for f in list.iter_mut() {
            f(ctx, args);
        }
        let n = list.len();
        let added = self.listeners.remove(&key).unwrap_or_default();
        list.extend(added);
        self.listeners.insert(key, list);
        n
    }

    /// The event names that have listeners, sorted.
    pub fn events(&self) -> Vec<String> {
        let mut v: Vec<String> = self.listeners.keys().cloned().collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Stare;
    impl Listen<Vec<String>> for Stare {
        fn name(&self) -> &str {
            "StareListen"
        }
        fn handle(&mut self, ctx: &mut Vec<String>, args: &[Value]) {
            ctx.push(format!("stare {}", args.len()));
        }
    }

    #[test]
    fn names_are_case_insensitive_and_listeners_run_in_order() {
        let mut bus: EventBus<Vec<String>> = EventBus::new();
        bus.register("WorkerStart", |c, _| c.push("a".into()));
        bus.register("workerstart", |c, a| c.push(format!("b{}", a[0])));
        bus.listen(Stare);
        let mut log = Vec::new();
        assert_eq!(bus.trigger(&mut log, "WORKERSTART", &[Value::from(1)]), 2);
        assert_eq!(bus.trigger(&mut log, "starelisten", &[]), 1);
        assert_eq!(bus.trigger(&mut log, "nobody", &[]), 0);
        assert_eq!(log, vec!["a", "b1", "stare 0"]);
        assert_eq!(bus.events(), vec!["starelisten", "workerstart"]);
    }
}
