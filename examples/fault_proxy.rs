//! A TCP proxy for benchmarks that make Redis slow: the same
//! [`FaultProxy`] the tests use (tests/common/proxy.rs), as a program.
//!
//! ```sh
//! fault_proxy --upstream 127.0.0.1:6380 --listen-file /tmp/x/proxy.addr
//! ```
//! It prints its address (and writes it to `--listen-file`), then reads
//! commands on stdin, one per line: `pass`, `delay MS`, `hole`; EOF stops it.

#[path = "../tests/common/proxy.rs"]
mod proxy;

use std::io::BufRead;

fn main() {
    let mut upstream = None;
    let mut listen_file = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--upstream" => upstream = args.next(),
            "--listen-file" => listen_file = args.next(),
            other => {
                eprintln!("fault_proxy: unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    let Some(up) = upstream.and_then(|u| u.parse().ok()) else {
        eprintln!("fault_proxy: --upstream ip:port is required");
        std::process::exit(2);
    };
    let p = proxy::FaultProxy::start(up);
    println!("{}", p.addr());
    if let Some(f) = listen_file {
        if let Err(e) = std::fs::write(&f, p.addr().to_string()) {
            eprintln!("fault_proxy: cannot write {f}: {e}");
            std::process::exit(1);
        }
    }
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut w = line.split_whitespace();
        match (w.next(), w.next().and_then(|v| v.parse::<u64>().ok())) {
            (Some("pass"), _) => p.set(proxy::Mode::Pass),
            (Some("delay"), Some(ms)) => {
                p.set(proxy::Mode::Delay(std::time::Duration::from_millis(ms)))
            }
            (Some("hole"), _) => p.set(proxy::Mode::BlackHole),
            _ => eprintln!("fault_proxy: commands are `pass`, `delay MS`, `hole`"),
        }
        eprintln!("fault_proxy: {line}");
    }
}
