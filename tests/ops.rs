//! Operations end to end: the systemd units (checked by `systemd-analyze`),
//! `install.sh`, and sd_notify from a foreground `swocloud start`. `/metrics`,
//! `/dashboard`, `status` and `/ready` are in `ops_metrics.rs`.

// Tests report failures by panicking: unwrap and expect are the assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::{http_get, temp_dir, Proc, RedisServer};

const BIN: &str = env!("CARGO_BIN_EXE_swocloud");

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

// ---------------------------------------------------------------------------
// systemd units and install.sh
// ---------------------------------------------------------------------------

/// Copies the units into `dir` with every ExecStart/ExecStop binary
/// rewritten to the built `swocloud` (verify refuses a missing executable).
/// The IM unit's `swocloud-im` also points at `swocloud`: that binary is not
/// built on this branch, and verify only checks that the file is executable.
fn staged_units(dir: &Path, units: &[&str]) -> Vec<PathBuf> {
    units
        .iter()
        .map(|u| {
            let text = std::fs::read_to_string(scripts().join(u)).unwrap();
            let text = text
                .replace("/usr/local/bin/swocloud-im", BIN)
                .replace("/usr/local/bin/swocloud", BIN);
            let p = dir.join(u);
            std::fs::write(&p, text).unwrap();
            p
        })
        .collect()
}

/// `systemd-analyze verify` output (stdout + stderr) and success.
fn verify(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .args(files)
        .output()
        .expect("systemd-analyze (scripts/setup.sh installs the systemd package)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn systemd_units_pass_verify_and_the_security_review() {
    let dir = temp_dir();
    let units = [
        "swocloud.service",
        "swocloud-im.service",
        "swocloud-notify.service",
    ];
    let files = staged_units(dir.path(), &units);
    let (ok, text) = verify(&files);
    // No filtering: `verify` of standalone unit files needs no running
    // systemd, so any line it prints (unknown key, bad value, missing
    // executable) is a real problem of the units.
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );

    // Control: the same check does catch a misspelt key (it only warns, so
    // the output must be empty, not just the exit code zero) …
    let bad = dir.path().join("typo.service");
    let typo = std::fs::read_to_string(&files[0])
        .unwrap()
        .replace("LimitNOFILE=", "LimitNOFLIE=");
    std::fs::write(&bad, typo).unwrap();
    let (_, text) = verify(&[bad]);
    assert!(
        text.contains("LimitNOFLIE"),
        "verify must report a typo: {text}"
    );
    // … and a missing executable.
    let gone = dir.path().join("gone.service");
    let text = std::fs::read_to_string(&files[0])
        .unwrap()
        .replace(BIN, "/nonexistent/swocloud");
    std::fs::write(&gone, text).unwrap();
    assert!(!verify(&[gone]).0, "verify must refuse a missing ExecStart");

    // The hardening, as systemd itself scores it (0 = locked down, 10 =
    // exposed; "OK" is below 4.5). The forking unit must stay below 3.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&files[0])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for").nth(1))
        .and_then(|rest| rest.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    eprintln!("systemd-analyze security: exposure {score}");
    assert!(score < 3.0, "exposure {score}:\n{text}");

    // The units agree with each other on the contract.
    let forking = std::fs::read_to_string(scripts().join("swocloud.service")).unwrap();
    for line in [
        "Type=forking",
        "PIDFile=/run/swocloud/swocloud.pid",
        "ExecStart=/usr/local/bin/swocloud start -d -c /etc/swocloud/swocloud.toml",
        "ExecReload=/bin/kill -USR1 $MAINPID",
        "ExecStop=/usr/local/bin/swocloud stop -c /etc/swocloud/swocloud.toml",
        "User=swocloud",
        "LimitNOFILE=1048576",
        "RuntimeDirectory=swocloud",
        "LogsDirectory=swocloud",
    ] {
        assert!(
            forking.lines().any(|l| l == line),
            "swocloud.service lacks {line}"
        );
    }
    let notify = std::fs::read_to_string(scripts().join("swocloud-notify.service")).unwrap();
    assert!(notify.lines().any(|l| l == "Type=notify"));
    let exec = notify
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .unwrap();
    assert!(
        !exec.contains(" -d"),
        "a Type=notify service must not daemonize: {exec}"
    );
    let example = scripts().join("swocloud.toml.example");
    let text = std::fs::read_to_string(&example).unwrap();
    assert!(text.contains("pid_file = \"/run/swocloud/swocloud.pid\""));
    // The example config loads (status: "not running", exit 3, not a
    // settings error, exit 2).
    let out = Command::new(BIN)
        .args(["status", "-c"])
        .arg(&example)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn install_sh_stages_everything_and_keeps_an_existing_config() {
    let dest = temp_dir();
    let run = |args: &[&str]| {
        let out = Command::new("bash")
            .arg(scripts().join("install.sh"))
            .args(args)
            .env("DESTDIR", dest.path())
            .env("BUILD_DIR", Path::new(BIN).parent().unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install.sh {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["--no-build"]);
    let root = dest.path();
    assert!(root.join("usr/local/bin/swocloud").is_file());
    let conf = root.join("etc/swocloud/swocloud.toml");
    let unit = root.join("etc/systemd/system/swocloud.service");
    assert!(std::fs::read_to_string(&unit)
        .unwrap()
        .contains("Type=forking"));
    assert!(root.join("etc/logrotate.d/swocloud").is_file());
    std::fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .unwrap()
        .write_all(b"# edited by the operator\n")
        .unwrap();
    run(&["--no-build", "--notify"]);
    assert!(
        std::fs::read_to_string(&conf)
            .unwrap()
            .ends_with("# edited by the operator\n"),
        "a re-run must not overwrite the config"
    );
    assert!(std::fs::read_to_string(&unit)
        .unwrap()
        .contains("Type=notify"));
}

// ---------------------------------------------------------------------------
// sd_notify
// ---------------------------------------------------------------------------

fn recv(sock: &UnixDatagram, what: &str) -> String {
    let mut buf = [0u8; 1024];
    match sock.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!("no sd_notify message ({what}): {e}"),
    }
}

#[test]
fn a_foreground_start_speaks_sd_notify_around_serving_reload_and_stop() {
    let redis = RedisServer::start();
    let d = Daemon::new(
        BIN,
        &format!("worker_num = 2\nredis_url = \"{}\"", redis.url()),
    );
    let sock_path = d.dir().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut proc = Proc::spawn(
        Command::new(BIN)
            .arg("start")
            .arg("-c")
            .arg(&d.config)
            .env("NOTIFY_SOCKET", &sock_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );

    let msg = recv(&sock, "READY after start");
    // At the moment READY=1 arrives the server must already serve.
    let health = http_get(d.addr(), "/health").map(|r| r.0).ok();
    assert_eq!(health, Some(200), "READY=1 was sent before /health answers");
    assert_eq!(
        msg,
        format!("READY=1\nMAINPID={}", proc.pid()),
        "first message"
    );

    let before: HashSet<i64> = d.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    let out = d.run("reload", &[]);
    assert!(out.status.success());
    let msg = recv(&sock, "RELOADING");
    assert!(msg.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{msg:?}");
    let t0 = Instant::now();
    let msg = recv(&sock, "READY after reload");
    assert!(msg.starts_with("READY=1"), "{msg:?}");
    eprintln!(
        "rolling reload of 2 workers: READY=1 after {} ms",
        t0.elapsed().as_millis()
    );
    // "Finished": every serving worker is a new process.
    let serving: Vec<i64> = d.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["stopping"] != true)
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    assert_eq!(serving.len(), 2, "two serving workers after the reload");
    assert!(
        serving.iter().all(|p| !before.contains(p)),
        "READY=1 came before every worker was replaced: {serving:?} vs {before:?}"
    );
    assert_eq!(http_get(d.addr(), "/health").unwrap().0, 200);

    let out = d.run("stop", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(recv(&sock, "STOPPING"), "STOPPING=1");
    let status = proc
        .wait_timeout(Duration::from_secs(5))
        .expect("master exits");
    assert!(status.success(), "{status:?}");
}
