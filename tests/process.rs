//! The process model end to end, with a real daemon binary (the framework's
//! `health_daemon` example, the same CLI and process tree as `swocloud`): daemon
//! start and stop, the process tree, SO_REUSEPORT spreading, respawn after
//! SIGKILL, rolling reload under load, parent-death cleanup, max_request,
//! task round trips, and every refused start.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::{
    assert_port_free, descendants_of, http_get, pid_alive, wait_for, wait_until, ws_connect,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// GET /health on a fresh connection; the serving worker's pid.
fn health_pid(addr: &str) -> std::io::Result<i64> {
    let (status, _, body) = http_get(addr, "/health")?;
    if status != 200 {
        return Err(std::io::Error::other(format!("status {status}: {body}")));
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(std::io::Error::other)?;
    v["pid"]
        .as_i64()
        .ok_or_else(|| std::io::Error::other("no pid"))
}

#[test]
fn daemon_start_builds_the_tree_and_stop_removes_it() {
    let d = Daemon::new(
        &common::health_daemon_bin(),
        "worker_num = 3\ntask_worker_num = 1",
    );
    let master = d.start();
    assert!(pid_alive(master));
    let manager = d.manager_pid();
    let workers = d.worker_pids();
    assert_eq!(
        workers.len(),
        4,
        "3 workers + 1 task worker under the manager {manager}: {workers:?}"
    );
    let status = d.status();
    assert_eq!(status["master"]["pid"], master);
    assert_eq!(status["manager"]["pid"], manager);
    assert_eq!(status["workers"].as_array().unwrap().len(), 3);
    assert_eq!(status["task_workers"].as_array().unwrap().len(), 1);
    let mut listed: Vec<i64> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(status["task_workers"].as_array().unwrap())
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        workers.iter().map(|&p| p as i64).collect::<Vec<_>>()
    );
    // The table form names every role too.
    let table = String::from_utf8(d.run("status", &[]).stdout).unwrap();
    for role in ["master", "manager", "worker", "task_worker"] {
        assert!(table.contains(role), "{table}");
    }
    health_pid(&d.addr()).expect("serves /health");
    d.stop();
    assert_port_free(d.port);
}

#[test]
fn connections_are_spread_over_several_workers() {
    let d = Daemon::new(&common::health_daemon_bin(), "worker_num = 4");
    d.start();
    let pids: HashSet<i64> = (0..64)
        .map(|_| health_pid(&d.addr()).expect("health"))
        .collect();
    assert!(
        pids.len() > 1,
        "64 connections all served by one worker: {pids:?}"
    );
    let workers: HashSet<i64> = d.worker_pids().into_iter().map(i64::from).collect();
    assert!(
        pids.is_subset(&workers),
        "answers come from the workers: {pids:?} vs {workers:?}"
    );
    d.stop();
}

#[test]
fn a_killed_worker_is_respawned_and_reported() {
    let d = Daemon::new(&common::health_daemon_bin(), "worker_num = 2");
    d.start();
    let before = d.worker_pids();
    let victim = before[0];
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let t0 = std::time::Instant::now();
    let after = wait_for(
        Duration::from_secs(1),
        "a replacement worker within 1 s",
        || {
            let now = d.worker_pids();
            (now.len() == 2 && !now.contains(&victim)).then_some(now)
        },
    );
    let new_pid = *after.iter().find(|p| !before.contains(p)).unwrap();
    // The replacement serves: some fresh connection lands on it.
    wait_until(
        Duration::from_secs(1)
            .saturating_sub(t0.elapsed())
            .max(Duration::from_millis(500)),
        "the new worker serves",
        || (0..16).any(|_| health_pid(&d.addr()).ok() == Some(new_pid as i64)),
    );
    let log = d.log();
    assert!(
        log.contains(&format!(
            "on_worker_error: worker_id=0 pid={victim} exit_code=0 signal=9"
        )) || log.contains(&format!(
            "on_worker_error: worker_id=1 pid={victim} exit_code=0 signal=9"
        )),
        "on_worker_error saw signal 9:\n{log}"
    );
    assert_eq!(d.status()["totals"]["worker_restarts"], 1);
    d.stop();
}

#[test]
fn rolling_reloads_replace_every_worker_without_a_failed_request() {
    let d = Daemon::new(&common::health_daemon_bin(), "worker_num = 2");
    let master = d.start();
    let manager = d.manager_pid();
    let before = d.worker_pids();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let loaders: Vec<_> = (0..2)
        .map(|_| {
            let (stop, ok, failed, addr) = (stop.clone(), ok.clone(), failed.clone(), d.addr());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match health_pid(&addr) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("request failed during reload: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    wait_until(Duration::from_secs(2), "load running", || {
        ok.load(Ordering::Relaxed) > 20
    });
    // Three rolling reloads in a row under load.
    let mut current = before.clone();
    for round in 0..3 {
        let out = d.run("reload", &[]);
        assert!(out.status.success());
        wait_until(
            Duration::from_secs(10),
            &format!("every worker replaced (reload {round})"),
            || {
                let now = d.worker_pids();
                now.len() == 2 && now.iter().all(|p| !current.contains(p))
            },
        );
        current = d.worker_pids();
    }
    let served_before = ok.load(Ordering::Relaxed);
    wait_until(
        Duration::from_secs(2),
        "load continues after the reload",
        || ok.load(Ordering::Relaxed) > served_before + 20,
    );
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.join().unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the reload ({} served)",
        ok.load(Ordering::Relaxed)
    );
    assert_eq!(d.master_pid(), Some(master), "master keeps its pid");
    assert_eq!(d.manager_pid(), manager, "manager keeps its pid");
    d.stop();
}

#[test]
fn killing_the_master_takes_the_whole_tree_down() {
    let d = Daemon::new(
        &common::health_daemon_bin(),
        "worker_num = 2\ntask_worker_num = 1",
    );
    let master = d.start();
    let tree = descendants_of(master);
    assert_eq!(
        tree.len(),
        4,
        "manager + 2 workers + 1 task worker: {tree:?}"
    );
    kill(Pid::from_raw(master), Signal::SIGKILL).unwrap();
    wait_until(
        Duration::from_secs(3),
        "no swocloud process left 3 s after the master's SIGKILL",
        || tree.iter().all(|&p| !pid_alive(p)),
    );
    wait_until(Duration::from_secs(1), "the port is free", || {
        std::net::TcpListener::bind(("127.0.0.1", d.port)).is_ok()
    });
}

#[test]
fn max_request_replaces_a_worker() {
    let d = Daemon::new(
        &common::health_daemon_bin(),
        "worker_num = 1\nmax_request = 5",
    );
    d.start();
    let first = d.worker_pids();
    let mut served_by = Vec::new();
    for _ in 0..12 {
        let pid = wait_for(Duration::from_secs(2), "request served", || {
            health_pid(&d.addr()).ok()
        });
        served_by.push(pid);
    }
    let distinct: HashSet<i64> = served_by.iter().copied().collect();
    assert!(
        distinct.len() >= 2,
        "12 requests with max_request=5 were all served by one process: {served_by:?}"
    );
    assert_eq!(
        served_by.iter().filter(|&&p| p == first[0] as i64).count(),
        5,
        "the first worker served exactly max_request: {served_by:?}"
    );
    d.stop();
}

#[test]
fn a_task_goes_to_a_task_worker_and_its_result_comes_back() {
    let d = Daemon::new(
        &common::health_daemon_bin(),
        "worker_num = 2\ntask_worker_num = 2",
    );
    d.start();
    let status = d.status();
    let task_pids: Vec<i64> = status["task_workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    let mut ws = ws_connect(&format!("ws://{}/", d.addr())).expect("websocket");
    for i in 0..4 {
        ws.send_text(format!("task:job{i}")).unwrap();
        let reply = ws.recv().unwrap().into_text().unwrap().to_string();
        let rest = reply
            .strip_prefix(&format!("done:job{i}:"))
            .unwrap_or_else(|| panic!("unexpected reply {reply}"));
        let pid: i64 = rest.parse().unwrap();
        assert!(
            task_pids.contains(&pid),
            "task ran in a task worker ({pid} not in {task_pids:?})"
        );
    }
    d.stop();
}

#[test]
fn refused_starts_say_why() {
    // Unknown key: names the key and the file.
    let d = Daemon::new(&common::health_daemon_bin(), "wroker_num = 2");
    let out = d.run("start", &["-d"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("wroker_num") && err.contains(d.config.to_str().unwrap()),
        "{err}"
    );

    // Bad value.
    let d = Daemon::new(&common::health_daemon_bin(), "worker_num = \"many\"");
    let out = d.run("start", &["-d"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("`worker_num`") && err.contains(d.config.to_str().unwrap()),
        "{err}"
    );

    // Port in use.
    let d = Daemon::new(&common::health_daemon_bin(), "worker_num = 1");
    let squatter = std::net::TcpListener::bind(("127.0.0.1", d.port)).unwrap();
    let out = d.run("start", &["-d"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("address already in use"), "{err}");
    assert!(!d.pid_file().exists());
    drop(squatter);

    // Second start while running.
    let master = d.start();
    let out = d.run("start", &["-d"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("already running (pid {master}")),
        "{err}"
    );
    d.stop();

    // Stale pid file: reported and replaced, pid 1 never signalled.
    let d = Daemon::new(&common::health_daemon_bin(), "worker_num = 1");
    std::fs::write(d.pid_file(), "1\n").unwrap();
    let out = d.run("stop", &[]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stale pid file"));
    let out = d.run("start", &["-d"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stale pid file"),
        "the stale pid file is reported"
    );
    let master = d.master_pid().unwrap();
    assert_ne!(master, 1);
    assert!(pid_alive(1), "pid 1 untouched");
    d.stop();

    // Unwritable log path.
    let d = Daemon::new(&common::health_daemon_bin(), "worker_num = 1");
    let out = d.run(
        "start",
        &["-d", "--log-file", "/proc/swocloud-cannot-write-here.log"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cannot open log file /proc/swocloud-cannot-write-here.log"));
}

#[test]
fn a_crash_looping_worker_is_respawned_with_backoff_not_in_a_fork_storm() {
    let d = Daemon::new(&common::health_daemon_bin(), "worker_num = 1");
    let flag = d.dir().join("crash");
    let out = std::process::Command::new(&d.bin)
        .args(["start", "-d", "-c"])
        .arg(&d.config)
        .env("HEALTH_CRASH_FLAG", &flag)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&flag, "1").unwrap();
    let victim = d.worker_pids()[0];
    let t0 = Instant::now();
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let crashes = |log: &str| log.matches("exited with code 70").count();
    wait_until(
        Duration::from_secs(10),
        "five crashes of the respawned worker, the backoff logged",
        || {
            let log = d.log();
            crashes(&log) >= 5 && log.contains("crash-looping")
        },
    );
    // Respawn delays double from 100 ms from the second quick exit on, so
    // five crashes take at least 100 + 200 + 400 ms (even if the killed
    // worker's exit was not quick); a fork storm takes a few milliseconds.
    let took = t0.elapsed();
    let log = d.log();
    assert!(
        took >= Duration::from_millis(700),
        "backoff, not a fork storm: five crashes in {took:?}\n{log}"
    );
    assert!(
        crashes(&log) <= 10,
        "backoff, not a fork storm: {} crashes in {took:?}\n{log}",
        crashes(&log)
    );
    std::fs::remove_file(&flag).unwrap();
    wait_until(
        Duration::from_secs(8),
        "the slot serves again once the fault is gone",
        || health_pid(&d.addr()).is_ok(),
    );
    d.stop();
}

#[test]
fn sighup_reopens_the_log_file_in_every_process() {
    let d = Daemon::new(&common::health_daemon_bin(), "worker_num = 2");
    let master = d.start();
    let rotated = d.dir().join("swocloud.log.1");
    std::fs::rename(d.log_file(), &rotated).unwrap();
    kill(Pid::from_raw(master), Signal::SIGHUP).unwrap();
    wait_until(Duration::from_secs(2), "a new log file", || {
        d.log_file().exists()
    });
    // A reload makes the manager and the new workers log: into the new file.
    assert!(d.run("reload", &[]).status.success());
    wait_until(
        Duration::from_secs(5),
        "reload lines in the new file",
        || {
            let log = d.log();
            log.contains("[manager ") && log.contains("serves; ") && log.contains("reload finished")
        },
    );
    assert!(
        !std::fs::read_to_string(&rotated)
            .unwrap()
            .contains("reloading"),
        "nothing new goes to the rotated file"
    );
    d.stop();
}
