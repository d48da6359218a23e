//! A reactor run in-process on a thread, for tests of the framework that
//! need no fork: [`InProc::start`] (one worker with one mailbox on a free
//! 127.0.0.1 port) or [`InProc::spawn`] (any mailbox, a task worker, a
//! listener of the test's own) builds the worker's context, waits until it
//! serves, and stops it on drop.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use swocloud::config::Settings;
use swocloud::event::App;
use swocloud::process::ipc::{Dest, Mailboxes, Postbox};
use swocloud::process::scoreboard::{Row, Scoreboard};
use swocloud::reactor::{run_worker_until, StopHandle, WorkerContext, WorkerExit};

/// How long a worker may take to become ready.
pub const READY_WAIT: Duration = Duration::from_secs(10);

/// A worker running on a thread of this process.
pub struct InProc {
    addr: Option<SocketAddr>, // where it listens (none: a task worker)
    /// Its scoreboard row.
    pub row: &'static Row,
    stop: StopHandle,
    thread: Option<JoinHandle<std::io::Result<WorkerExit>>>,
}

impl InProc {
    /// One worker with its own single mailbox, listening on a free
    /// 127.0.0.1 port (host, port and worker_num of `settings` are set here).
    #[track_caller]
    pub fn start<A: App, F: FnOnce() -> A + Send + 'static>(
        mut settings: Settings,
        make: F,
    ) -> InProc {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let addr = l.local_addr().expect("local addr");
        settings.host = "127.0.0.1".into();
        settings.port = addr.port();
        settings.worker_num = 1;
        let postbox = Mailboxes::create(1, 0)
            .and_then(|m| m.postbox(Dest::Worker(0)))
            .expect("mailboxes");
        InProc::spawn(settings, postbox, Some(l), make)
    }

    /// A worker on `postbox`'s slot (a task worker for a task slot), on
    /// `listener` if any.
    #[track_caller]
    pub fn spawn<A: App, F: FnOnce() -> A + Send + 'static>(
        settings: Settings,
        postbox: Postbox,
        listener: Option<TcpListener>,
        make: F,
    ) -> InProc {
        let addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        let (worker_id, task_worker) = match postbox.me() {
            Dest::Worker(i) => (i, false),
            Dest::TaskWorker(i) => (i, true),
        };
        let sb = Scoreboard::create(2).expect("scoreboard");
        let row = sb.row(0);
        let stop = StopHandle::new();
        let stop2 = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut app = make();
            let ctx = WorkerContext {
                worker_id,
                task_worker,
                settings: Arc::new(settings),
                listener,
                admin_listener: None,
                postbox,
                row,
                scoreboard: sb,
                on_ready: Some(Box::new(move || {
                    let _ = tx.send(());
                })),
                watch_signals: false,
                handover: None,
            };
            run_worker_until(ctx, &mut app, stop2)
        });
        rx.recv_timeout(READY_WAIT)
            .expect("the in-process worker became ready");
        InProc {
            addr,
            row,
            stop,
            thread: Some(thread),
        }
    }

    /// Asks it to stop (as its StopHandle would).
    pub fn stop(&self) {
        self.stop.stop();
    }

    /// Where it listens.
    #[track_caller]
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("this worker has a listener")
    }

    /// Waits for the worker to end by itself; why it ended.
    #[track_caller]
    pub fn join(mut self) -> WorkerExit {
        let t = self.thread.take().expect("joined once");
        t.join()
            .expect("the worker thread did not panic")
            .expect("the worker ran")
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
