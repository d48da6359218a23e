//! The HTTP request parser (`reactor::http::parse_request`) on arbitrary
//! bytes, pipelined: every `Complete` must use a non-empty prefix of the
//! input, and parsing must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swocloud::reactor::http::{parse_request, Parsed};

fuzz_target!(|data: &[u8]| {
    let max_body = 4096;
    let mut rest = data;
    while !rest.is_empty() {
        match parse_request(rest, max_body) {
            Parsed::Complete(req, n) => {
                assert!(n > 0 && n <= rest.len(), "used {n} of {}", rest.len());
                assert!(req.body.len() <= max_body);
                let _ = (req.path_only(), req.query(), req.keep_alive());
                rest = &rest[n..];
            }
            Parsed::Partial => break,
            Parsed::Reject(status, _) => {
                assert!((400..500).contains(&status), "status {status}");
                break;
            }
        }
    }
});
