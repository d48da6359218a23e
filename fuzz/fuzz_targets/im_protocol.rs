//! The IM server's parsers on arbitrary text: a user's frame
//! (`cluster::user::parse_user`), a Route frame (`cluster::link::parse_route`)
//! and uid validation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swocloud::cluster::link::parse_route;
use swocloud::cluster::user::parse_user;
use swocloud::cluster::valid_uid;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = parse_user(text) {
        assert!(e.to_frame().starts_with('{'));
    }
    let _ = parse_route(text).to_text();
    let _ = valid_uid(text);
});
