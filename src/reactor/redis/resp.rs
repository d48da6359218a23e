//! Reply framing for the worker's Redis links: the cheap first phase of a
//! two-phase parse. [`complete_len`] says how many bytes the first whole
//! reply in a buffer takes, or that more bytes are needed; the `redis`
//! crate's own RESP parser then turns exactly those bytes into a
//! [`redis::Value`]. A partial reply is therefore never parsed twice: the
//! scan is a few comparisons per header, and bulk payloads are skipped by
//! length, not read.

/// Deepest nesting of aggregate replies accepted before the link is
/// declared broken (no Redis command answers deeper than a few levels).
const MAX_DEPTH: usize = 64;

/// Why the bytes cannot be a RESP reply.
#[derive(Debug, PartialEq, Eq)]
pub struct Garbage(pub &'static str);

/// The length of the first complete reply at the start of `buf`: `Ok(None)`
/// while more bytes are needed, `Err` when the bytes are not RESP. O(number
/// of headers in the reply).
pub fn complete_len(buf: &[u8]) -> Result<Option<usize>, Garbage> {
    let mut pos = 0;
    // Values still to read at each open aggregate level.
    let mut todo: Vec<u64> = Vec::new();
    let mut need: u64 = 1;
    loop {
        if need == 0 {
            match todo.pop() {
                Some(n) => {
                    need = n;
                    continue;
                }
                None => return Ok(Some(pos)),
            }
        }
        let Some(&kind) = buf.get(pos) else {
            return Ok(None);
        };
        let Some(eol) = find_crlf(&buf[pos + 1..]) else {
            return Ok(None);
        };
        let line = &buf[pos + 1..pos + 1 + eol];
        let after = pos + 1 + eol + 2;
        need -= 1;
        match kind {
            b'+' | b'-' | b':' | b',' | b'_' | b'#' | b'(' => pos = after,
            b'$' | b'!' | b'=' => {
                let n = number(line)?;
                if n < 0 {
                    pos = after; // null bulk
                } else {
                    let end = after + n as usize + 2;
                    if buf.len() < end {
                        return Ok(None);
                    }
                    if &buf[end - 2..end] != b"\r\n" {
                        return Err(Garbage("bulk string not ended by CRLF"));
                    }
                    pos = end;
                }
            }
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let n = number(line)?;
                pos = after;
                let n = if n < 0 { 0 } else { n as u64 };
                // Maps and attributes hold pairs; an attribute also
                // precedes the value it annotates.
                let n = match kind {
                    b'%' => n * 2,
                    b'|' => n * 2 + 1,
                    _ => n,
                };
                if n > 0 {
                    if todo.len() >= MAX_DEPTH {
                        return Err(Garbage("reply nested too deeply"));
                    }
                    todo.push(need);
                    need = n;
                }
            }
            _ => return Err(Garbage("unknown reply type byte")),
        }
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

fn number(line: &[u8]) -> Result<i64, Garbage> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Garbage("bad length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_and_partial() {
        assert_eq!(complete_len(b"+OK\r\n"), Ok(Some(5)));
        assert_eq!(complete_len(b"+OK\r"), Ok(None));
        assert_eq!(complete_len(b""), Ok(None));
        assert_eq!(complete_len(b":12\r\n+OK\r\n"), Ok(Some(5)));
        assert_eq!(complete_len(b"-ERR x\r\n"), Ok(Some(8)));
    }

    #[test]
    fn bulk_and_null() {
        assert_eq!(complete_len(b"$3\r\nabc\r\n"), Ok(Some(9)));
        assert_eq!(complete_len(b"$3\r\nab"), Ok(None));
        assert_eq!(complete_len(b"$-1\r\n"), Ok(Some(5)));
        assert_eq!(
            complete_len(b"$3\r\nabcXY"),
            Err(Garbage("bulk string not ended by CRLF"))
        );
    }

    #[test]
    fn nested_arrays() {
        let r = b"*2\r\n*2\r\n$1\r\na\r\n:1\r\n$-1\r\n";
        assert_eq!(complete_len(r), Ok(Some(r.len())));
        for cut in 0..r.len() {
            assert_eq!(complete_len(&r[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(complete_len(b"*0\r\n"), Ok(Some(4)));
        assert_eq!(complete_len(b"*-1\r\n"), Ok(Some(5)));
        let m = b"%1\r\n+k\r\n+v\r\n";
        assert_eq!(complete_len(m), Ok(Some(m.len())));
    }

    #[test]
    fn garbage() {
        assert!(complete_len(b"?x\r\n").is_err());
        assert!(complete_len(b"$x\r\n").is_err());
    }

    #[test]
    fn agrees_with_the_redis_parser() {
        let r = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n";
        let n = complete_len(r).unwrap().unwrap();
        let v = redis::parse_redis_value(&r[..n]).unwrap();
        assert!(matches!(v, redis::Value::Array(ref a) if a.len() == 3));
    }
}
