//! The chat page in a real browser: headless Chromium (Debian's `chromium`)
//! driven by playwright-core (`tests/node/browser_chat.mjs`, installed by
//! scripts/setup.sh) opens `/chat` for two users on two different IM
//! servers. They chat; mid-conversation this test SIGKILLs the whole IM
//! server of one of them while both keep sending. The page of the user who
//! lost their server reconnects by itself (through `/route`, to the
//! survivor) and resumes; in the end every message each page sent is shown
//! exactly once, in order, on the other page, each stored seq was handed to
//! the page once and without a gap, and the (id, seq) each sender was
//! confirmed is among them. A send whose confirmation died with the server
//! is sent again by the page with the same ref, and the server stores it
//! once (the test asserts no message reached a page twice).
//! A screenshot of both pages is kept in the output folder the test prints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use common::cluster::{Cluster, SECRET};
use common::{descendants_of, pid_alive, wait_until, Proc};

/// How long the driver may stay silent before the test gives up on it.
const DRIVER_SILENCE: Duration = Duration::from_secs(90);

/// The process group of `pid` (`/proc/PID/stat`'s 5th field).
fn pgid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// SIGKILLs an IM server's master and every process under it at once: one
/// signal to its process group (`start -d` forks, `setsid`s and forks the
/// master, so the group is the daemon's own, named after the gone middle
/// process; manager and workers stay in it). Killing them one by one instead
/// lets a manager that outlives its master by a few ms (the test thread
/// preempted between two kills) stop its workers gracefully, which sends
/// the users a drain hint: a different test.
fn kill_server(c: &Cluster, service_name: &str) {
    let i: usize = service_name
        .strip_prefix("IM_")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not one of the cluster's servers: {service_name}"));
    let master = c.ims[i].master_pid().expect("the IM server runs");
    let tree: Vec<i32> = std::iter::once(master)
        .chain(descendants_of(master))
        .collect();
    let group = pgid(master).expect("the master's process group");
    assert!(
        group != nix::unistd::getpgrp().as_raw() && tree.iter().all(|&p| pgid(p) == Some(group)),
        "{service_name}'s processes {tree:?} are all in a group of their own ({group})"
    );
    killpg(Pid::from_raw(group), Signal::SIGKILL).expect("killpg");
    wait_until(
        Duration::from_secs(5),
        "the killed server's processes gone",
        || tree.iter().all(|&p| !pid_alive(p)),
    );
}

/// The strings at `key` of each element of `v`.
fn strings(v: &[&Value], key: &str) -> Vec<String> {
    v.iter()
        .map(|m| m[key].as_str().unwrap_or("?").to_string())
        .collect()
}

/// The elements of array `v[key]` whose `from` is `uid`.
fn from<'a>(v: &'a Value, key: &str, uid: &str) -> Vec<&'a Value> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["from"] == uid)
        .collect()
}

/// Checks one direction, `from` → `to`: every text `from` posted was
/// confirmed to it and shown once, in order, on `to`'s page; `to`'s client
/// handed over each seq once, gap-free (1..=N: only `from` writes to
/// `to`), the confirmed (id, seq) pairs among them, nothing twice (a
/// send retried with its ref is stored once). Returns how many sends of
/// `from` were retried (their confirmation was lost with the killed
/// server).
#[track_caller]
fn check_direction(result: &Value, from_side: &str, to_side: &str) -> usize {
    let posted: Vec<&str> = result["posted"][from_side]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let (sender, receiver) = (&result[from_side], &result[to_side]);
    let (uid, peer) = (
        sender["uid"].as_str().unwrap(),
        receiver["uid"].as_str().unwrap(),
    );
    let sent: Vec<&Value> = sender["sent"].as_array().unwrap().iter().collect();
    assert_eq!(
        strings(&sent, "text"),
        posted,
        "{uid}: confirmed sends in posting order"
    );
    let shown = from(receiver, "shown", uid);
    assert_eq!(
        strings(&shown, "text"),
        posted,
        "{peer}'s page shows each message of {uid} exactly once, in order"
    );
    let received = from(receiver, "received", uid);
    let seqs: Vec<u64> = received
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{peer} gets each stored message once, in order, without a gap"
    );
    for s in &sent {
        assert!(
            received.iter().any(|r| r["seq"] == s["seq"]
                && r["id"] == s["id"]
                && r["data"]["mid"] == s["ref"]),
            "{uid}'s confirmed {s} is among what {peer} received"
        );
    }
    // A send retried after its confirmation died with the server carries
    // the same ref: the server stored it once, so nothing was stored twice.
    let repeats = from(receiver, "repeats", uid);
    assert!(
        repeats.is_empty(),
        "{peer} got messages of {uid} twice (retried: {}): {repeats:?}",
        sender["retried"]
    );
    assert_eq!(received.len(), posted.len());
    assert_eq!(receiver["resyncs"], 0, "{peer}: Redis kept the history");
    sender["retried"].as_array().map_or(0, Vec::len)
}

#[test]
fn two_browsers_chat_through_an_im_server_kill() {
    let node_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    assert!(
        node_dir.join("node_modules/playwright-core").exists(),
        "tests/node/node_modules/playwright-core is missing: run scripts/setup.sh"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: run scripts/setup.sh"
    );
    // One Route worker taking the servers in turn: the two pages, opened
    // one after the other, land on different servers (asserted below).
    let c = Cluster::start(1, 2, 2, "balancer = \"round_robin\"");
    // The test's output folder: cargo's per-target scratch directory
    // (target/tmp), one folder per run, kept for the screenshots.
    let out = tempfile::Builder::new()
        .prefix("browser-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("an output folder under CARGO_TARGET_TMPDIR")
        .keep();
    let token = |uid: &str| swocloud::auth::mint(SECRET.as_bytes(), uid, "user", 600);

    let mut driver = Proc::spawn(
        Command::new("node")
            .current_dir(&node_dir)
            .arg("browser_chat.mjs")
            .arg(c.route.addr())
            .args(["alice", &token("alice"), "bob", &token("bob")])
            .arg(&out)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let mut to_driver = driver.child_mut().stdin.take().unwrap();
    let from_driver = BufReader::new(driver.child_mut().stdout.take().unwrap());
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in from_driver.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut result = None;
    let mut killed = None;
    while result.is_none() {
        let line = match lines.recv_timeout(DRIVER_SILENCE) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the driver said nothing for 90 s"),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                "the driver exited ({:?}) before its result; logs:\nIM_0:\n{}\nIM_1:\n{}",
                driver.wait_timeout(Duration::from_secs(5)),
                c.ims[0].log(),
                c.ims[1].log()
            ),
        };
        eprintln!("driver: {line}");
        let (word, rest) = line.split_once(' ').unwrap_or((&line, ""));
        match word {
            "SERVERS" => {
                let v: Value = serde_json::from_str(rest).unwrap();
                assert_ne!(v["a"], v["b"], "the two users are on different IM servers");
            }
            "KILL" => {
                kill_server(&c, rest);
                killed = Some(rest.to_string());
                to_driver.write_all(b"killed\n").unwrap();
                to_driver.flush().unwrap();
            }
            "SCREENSHOT" => eprintln!("screenshot: {rest}"),
            "RESULT" => result = Some(serde_json::from_str::<Value>(rest).unwrap()),
            _ => {}
        }
    }
    let result = result.unwrap();
    assert_eq!(result["error"], Value::Null, "the driver: {result:#}");
    let killed = killed.expect("the driver asked for a kill");
    assert_eq!(result["first"]["b"], killed.as_str());
    let moved = result["b"]["servers"].as_array().unwrap();
    assert!(
        moved.len() >= 2 && moved.last() != Some(&Value::from(killed.as_str())),
        "bob's page reconnected to the survivor: {moved:?}"
    );
    let bob = c.online("bob");
    eprintln!("bob at the end: {bob}");
    assert_eq!(bob["online"], true, "{bob}");
    let retried = check_direction(&result, "a", "b") + check_direction(&result, "b", "a");
    eprintln!("sends retried after the kill (stored once each, by ref): {retried}");
    assert!(driver
        .wait_timeout(Duration::from_secs(20))
        .is_some_and(|s| s.success()));
    eprintln!("screenshots of both pages in {}", out.display());
}
