//! permessage-deflate's inflate path (`reactor::deflate`) on arbitrary
//! bytes: a compressed message must inflate or fail with 1007/1009, never
//! panic, never produce more than the bound; and whatever our compressor
//! makes of the same bytes must inflate back to them. The first byte
//! picks the bound and whether the peer keeps its context (two messages
//! through one decompressor).
#![no_main]

use libfuzzer_sys::fuzz_target;
use swocloud::reactor::deflate::{Codec, Config, Params, PerConn};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let takeover = first & 1 == 1;
    let max = 64 + usize::from(first >> 1) * 512;
    let params = Params {
        server_no_context_takeover: !takeover,
        client_no_context_takeover: !takeover,
        server_max_window_bits: 9 + (first >> 1) % 7,
        client_max_window_bits: 15,
    };
    let cfg = Config {
        enabled: true,
        context_takeover: takeover,
        threshold: 0,
    };
    let mut codec = Codec::new(cfg);
    let mut pc = PerConn::new(params);
    let (a, b) = rest.split_at(rest.len() / 2);
    for msg in [a, b] {
        match codec.decompress(&mut pc, msg, max) {
            Ok(out) => assert!(out.len() <= max),
            Err((code, _)) => assert!(code == 1007 || code == 1009, "close code {code}"),
        }
    }
    // Our own output always inflates back (a fresh pair: the state above
    // may have been reset by an error).
    let mut tx = Codec::new(cfg);
    let mut rx = Codec::new(cfg);
    let (mut ours, mut theirs) = (PerConn::new(params), PerConn::new(params));
    for msg in [a, b] {
        let z = tx.compress(&mut ours, msg).expect("compressible");
        let back = rx.decompress(&mut theirs, &z, msg.len()).expect("inflates");
        assert_eq!(back, msg);
    }
});
