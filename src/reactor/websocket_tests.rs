//! Unit tests of the frame codec and the handshakes (`websocket.rs`).

use super::*;

fn client_frame(op: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mask = random_mask();
    let hdr = FrameHeader {
        is_final: fin,
        opcode: op,
        mask: Some(mask),
        ..FrameHeader::default()
    };
    hdr.format(payload.len() as u64, &mut out).unwrap();
    let s = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[s..], mask);
    out
}

#[test]
fn round_trip_client_to_server() {
    let mut out = Vec::new();
    encode_message(&mut out, Role::Client, &Message::Text("héllo".into()));
    let mut st = WsState::new(Role::Server);
    let n = out.len();
    assert_eq!(decode_one(&mut st, &mut out[..1], 100), Decoded::NeedMore);
    // The header is complete: the partial payload moves into the body.
    assert_eq!(
        decode_one(&mut st, &mut out[..n - 1], 100),
        Decoded::Absorbed(n - 1)
    );
    assert_eq!(
        decode_one(&mut st, &mut out[n - 1..], 100),
        Decoded::Event(WsEvent::Message("héllo".into()), 1)
    );
}

#[test]
fn server_frames_are_unmasked_and_large_lengths_work() {
    let mut out = Vec::new();
    let big = vec![7u8; 70_000];
    encode_message(&mut out, Role::Server, &Message::Binary(big.clone()));
    assert_eq!(out[1] & 0x80, 0, "server frames are not masked");
    let mut st = WsState::new(Role::Client);
    let n = out.len();
    assert_eq!(
        decode_one(&mut st, &mut out, 100_000),
        Decoded::Event(WsEvent::Message(Message::Binary(big)), n)
    );
}

#[test]
fn fragments_reassemble_and_controls_interleave() {
    let mut st = WsState::new(Role::Server);
    let mut a = client_frame(OpCode::Data(Data::Text), false, b"ab");
    let mut p = client_frame(OpCode::Control(Control::Ping), true, b"x");
    let mut b = client_frame(OpCode::Data(Data::Continue), true, b"cd");
    assert!(matches!(
        decode_one(&mut st, &mut a, 100),
        Decoded::Absorbed(_)
    ));
    assert!(
        matches!(decode_one(&mut st, &mut p, 100), Decoded::Event(WsEvent::Ping(ref v), _) if v == b"x")
    );
    assert!(
        matches!(decode_one(&mut st, &mut b, 100), Decoded::Event(WsEvent::Message(Message::Text(ref s)), _) if s == "abcd")
    );
}

#[test]
fn violations_map_to_close_codes() {
    let fail = |role, mut f: Vec<u8>, max| match decode_one(&mut WsState::new(role), &mut f, max) {
        Decoded::Fail(c, _) => c,
        other => panic!("{other:?}"),
    };
    let mut unmasked = Vec::new();
    encode_message(&mut unmasked, Role::Server, &"x".into());
    assert_eq!(fail(Role::Server, unmasked, 100), close::PROTOCOL);
    assert_eq!(
        fail(
            Role::Server,
            client_frame(OpCode::Data(Data::Binary), true, &[0; 200]),
            100
        ),
        close::TOO_BIG
    );
    assert_eq!(
        fail(
            Role::Server,
            client_frame(OpCode::Data(Data::Text), true, &[0xff, 0xfe]),
            100
        ),
        close::BAD_DATA
    );
    assert_eq!(
        fail(
            Role::Server,
            client_frame(OpCode::Data(Data::Continue), true, b"x"),
            100
        ),
        close::PROTOCOL
    );
    let mut rsv = client_frame(OpCode::Data(Data::Text), true, b"x");
    rsv[0] |= 0x40;
    assert_eq!(fail(Role::Server, rsv, 100), close::PROTOCOL);
    let mut reserved = client_frame(OpCode::Data(Data::Text), true, b"x");
    reserved[0] = (reserved[0] & 0xf0) | 0x3;
    assert_eq!(fail(Role::Server, reserved, 100), close::PROTOCOL);
    assert_eq!(
        fail(
            Role::Server,
            client_frame(OpCode::Control(Control::Ping), false, b""),
            100
        ),
        close::PROTOCOL
    );
    assert_eq!(
        fail(
            Role::Server,
            client_frame(OpCode::Control(Control::Close), true, &[3, 0xe7]),
            100
        ),
        close::PROTOCOL
    );
}

#[test]
fn close_frames_and_handshake() {
    let mut out = Vec::new();
    encode_close(&mut out, Role::Client, 1001, &"é".repeat(100));
    assert!(out.len() <= 2 + 4 + 125);
    let mut st = WsState::new(Role::Server);
    assert!(matches!(
        decode_one(&mut st, &mut out, 10),
        Decoded::Event(WsEvent::Close(Some(1001), _), _)
    ));

    let (req, key) = client_request("h", "/ws");
    let Ok(crate::reactor::http::Parsed::Complete(r, _)) =
        Ok::<_, ()>(crate::reactor::http::parse_request(&req, 0))
    else {
        panic!()
    };
    assert!(wants_upgrade(&r));
    let resp = accept_upgrade(&r).unwrap();
    assert_eq!(
        check_response(&resp, &key),
        ClientHandshake::Done(resp.len())
    );
    assert!(matches!(
        check_response(&resp, "other"),
        ClientHandshake::Fail(_)
    ));
}
