//! The WebSocket frame decoder (`reactor::websocket::decode_one`) on
//! arbitrary bytes, in both roles, fed as a stream the way the reactor
//! feeds it (frames consumed from the front, fragments carried in the
//! state). The first byte picks the role and the message bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swocloud::reactor::websocket::{decode_one, Decoded, Role, WsState};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let role = if first & 1 == 0 { Role::Server } else { Role::Client };
    let max = 1024 + usize::from(first >> 1) * 64;
    let mut st = WsState::new(role);
    let mut buf = rest.to_vec();
    let mut pos = 0;
    while pos < buf.len() {
        match decode_one(&mut st, &mut buf[pos..], max) {
            Decoded::NeedMore | Decoded::Fail(..) => break,
            Decoded::Absorbed(n) | Decoded::Event(_, n) => {
                assert!(n > 0 && pos + n <= buf.len());
                pos += n;
            }
        }
    }
});
