//! The Route's frame parser (`cluster::link::parse_im`) on arbitrary text:
//! never panics, and every refusal renders as a JSON error frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swocloud::cluster::link::{parse_im, ImFrame};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_im(text) {
        Ok(ImFrame::Register(reg)) => {
            let _ = reg.member();
        }
        Ok(f) => {
            let _ = f.to_text();
        }
        Err(e) => {
            let frame = e.to_frame();
            assert!(frame.starts_with('{'), "{frame}");
        }
    }
});
