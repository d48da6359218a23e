//! Unit tests of `conn.rs`: what an idle connection costs.

use super::*;

/// What an idle connection costs in the slab (issue 17: at most 256
/// bytes per connection above the baseline, all told). Prints the
/// sizes with `--nocapture`.
#[test]
fn an_idle_connection_is_small() {
    let sizes = [
        ("Conn", std::mem::size_of::<Conn>()),
        ("Phase", std::mem::size_of::<Phase>()),
        ("WsState", std::mem::size_of::<WsState>()),
        (
            "ConnLimits",
            std::mem::size_of::<crate::reactor::limits::ConnLimits>(),
        ),
        ("SocketAddr", std::mem::size_of::<SocketAddr>()),
        ("Instant", std::mem::size_of::<Instant>()),
        ("ConnTimer", std::mem::size_of::<ConnTimer>()),
    ];
    println!("{sizes:?}");
    // 272 before issue 17; every byte here is paid per idle connection.
    assert!(std::mem::size_of::<Conn>() <= 224, "{sizes:?}");
}
