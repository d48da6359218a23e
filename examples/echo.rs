//! WebSocket echo server on the swocloud reactor.
//!
//! ```text
//! cargo run --release --example echo -- --port 9501 --workers 2 [--host 127.0.0.1]
//! ```
//!
//! Echoes text and binary WebSocket messages; `GET /` answers 200. Ctrl-C
//! or SIGTERM stops the workers gracefully (WebSocket peers get close 1001).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use swocloud::config::Settings;
use swocloud::event::App;
use swocloud::process::ipc::{Dest, Mailboxes};
use swocloud::process::scoreboard::{Role, Scoreboard};
use swocloud::process::signals::{self, Control};
use swocloud::reactor::{run_worker, Fd, Message, Request, Response, Server, WorkerContext};

/// Command line.
#[derive(Parser, Debug)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 9501)]
    port: u16,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

/// The echo application.
struct Echo;

impl App for Echo {
    fn on_message(&mut self, srv: &mut Server<Self>, fd: Fd, msg: Message) {
        srv.push(fd, msg);
    }

    fn on_request(&mut self, srv: &mut Server<Self>, req: &Request) -> Response {
        match (req.method.as_str(), req.path_only()) {
            ("GET", "/") => {
                Response::text(200, &format!("swocloud echo, worker {}\n", srv.worker_id()))
            }
            _ => Response::text(404, "not found\n"),
        }
    }
}

/// A listening socket with SO_REUSEPORT, one per worker.
fn reuseport_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrStorage,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .map_err(|e| io::Error::other(format!("bind {addr}: {e}")))?;
    listen(&fd, Backlog::new(1024)?)?;
    Ok(TcpListener::from(fd))
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    let _ = simplelog::TermLogger::init(
        log::LevelFilter::Info,
        simplelog::Config::default(),
        simplelog::TerminalMode::Stderr,
        simplelog::ColorChoice::Never,
    );
    let settings = Settings {
        host: args.host.clone(),
        port: args.port,
        worker_num: args.workers.max(1),
        ..Settings::default()
    };
    let addr = settings.listen_addr();
    let n = settings.worker_num;
    let settings = Arc::new(settings);

    // TODO(lead): switch to process::serve — this is a stand-in for the
    // master/manager runtime so the example runs before it lands: fork N
    // workers, each with its own SO_REUSEPORT listener, and wait.
    signals::install()?;
    let mailboxes = Mailboxes::create(n, 0)?;
    let scoreboard = Scoreboard::create(n + 1)?;
    let mut children: Vec<Pid> = Vec::new();
    for id in 0..n {
        let listener = reuseport_listener(addr)?;
        let row = scoreboard
            .claim(Role::Worker, id as u32)
            .map(|i| scoreboard.row(i))
            .ok_or_else(|| io::Error::other("scoreboard full"))?;
        let mask = signals::block_all();
        // SAFETY: the process is single-threaded here (no thread was
        // started), so the child may run arbitrary code after fork.
        match unsafe { fork() }.map_err(|e| io::Error::other(format!("fork worker {id}: {e}")))? {
            ForkResult::Child => {
                signals::reset_after_fork()?;
                signals::restore(&mask);
                row.pid.store(
                    std::process::id() as i32,
                    std::sync::atomic::Ordering::Relaxed,
                );
                let ctx = WorkerContext {
                    worker_id: id,
                    task_worker: false,
                    settings: settings.clone(),
                    listener: Some(listener),
                    postbox: mailboxes.postbox(Dest::Worker(id))?,
                    row,
                    scoreboard,
                    on_ready: Some(Box::new(move || {
                        log::info!("worker {id} serving on {addr}")
                    })),
                    watch_signals: true,
                };
                let code = match run_worker(ctx, &mut Echo) {
                    Ok(_) => 0,
                    Err(e) => {
                        log::error!("worker {id}: {e}");
                        1
                    }
                };
                std::process::exit(code);
            }
            ForkResult::Parent { child } => {
                signals::restore(&mask);
                children.push(child);
            }
        }
    }
    log::info!("echo: {n} workers on ws://{addr}/ (Ctrl-C to stop)");
    while !children.is_empty() {
        if signals::take_pending().contains(&Control::Terminate) {
            for c in &children {
                let _ = kill(*c, Signal::SIGTERM);
            }
        }
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                log::info!("worker pid {pid} exited with code {code}");
                children.retain(|c| *c != pid);
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                log::info!("worker pid {pid} exited on signal {sig}");
                children.retain(|c| *c != pid);
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    Ok(())
}
