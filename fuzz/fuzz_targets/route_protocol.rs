//! The Route's frame parser (`route::protocol::parse`) on arbitrary text:
//! never panics, and every refusal renders as a JSON error frame.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match swocloud::route::protocol::parse(text) {
        Ok(swocloud::route::protocol::Command::Register(reg)) => {
            let _ = reg.member();
        }
        Ok(_) => {}
        Err(e) => {
            let frame = e.to_frame();
            assert!(frame.starts_with('{'), "{frame}");
        }
    }
});
