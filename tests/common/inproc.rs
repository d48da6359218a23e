//! A reactor run in-process on a thread, for tests of the framework that
//! need no fork: [`InProc::start`] builds the worker's context (one
//! mailbox, a scoreboard), waits until it serves, and stops it on drop.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use swocloud::config::Settings;
use swocloud::event::App;
use swocloud::process::ipc::{Dest, Mailboxes};
use swocloud::process::scoreboard::{Row, Scoreboard};
use swocloud::reactor::{run_worker_until, StopHandle, WorkerContext, WorkerExit};

/// A worker serving on a free 127.0.0.1 port in this process.
pub struct InProc {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its scoreboard row.
    pub row: &'static Row,
    stop: StopHandle,
    thread: Option<JoinHandle<std::io::Result<WorkerExit>>>,
}

impl InProc {
    /// Starts `make()`'s app with `settings` (host and port are set here).
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
        let sb = Scoreboard::create(2).expect("scoreboard");
        let row = sb.row(0);
        let stop = StopHandle::new();
        let stop2 = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut app = make();
            let ctx = WorkerContext {
                worker_id: 0,
                task_worker: false,
                settings: Arc::new(settings),
                listener: Some(l),
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
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the in-process worker became ready");
        InProc {
            addr,
            row,
            stop,
            thread: Some(thread),
        }
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
