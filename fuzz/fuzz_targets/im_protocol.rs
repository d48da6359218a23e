//! The IM server's parsers on arbitrary text: a user's frame
//! (`parse_user`), a Route frame (`parse_route`) and uid validation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swocloud::im::protocol::{parse_route, parse_user, valid_uid};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_user(text);
    let _ = parse_route(text);
    let _ = valid_uid(text);
});
