//! Redis Cluster's key → slot function: CRC16 (XMODEM) of the key's hash
//! tag modulo 16384, exactly as `CLUSTER KEYSLOT` computes it.
//!
//! The hash tag is the part between the first `{` and the next `}` when
//! that part is not empty; otherwise the whole key. Keys that must meet
//! in one Lua script or MULTI share a tag (`inbox:{u1}`, `inbox:{u1}:meta`),
//! and a tag equal to a bare key's name lands in that key's slot
//! (`{im_server}:lease` is in `im_server`'s slot).

/// The number of slots of a Redis Cluster.
pub const SLOTS: usize = 16384;

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), by table.
const TABLE: [u16; 256] = {
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut b = 0;
        while b < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            b += 1;
        }
        t[i] = crc;
        i += 1;
    }
    t
};

fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ TABLE[usize::from((crc >> 8) as u8 ^ b)]
    })
}

/// The part of `key` that is hashed: its tag if it has a non-empty one.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The slot of `key` (0..16384).
pub fn slot_of(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % SLOTS as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_slots() {
        // Values from CLUSTER KEYSLOT on Redis 7.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"im_server"), slot_of(b"{im_server}:lease"));
        assert_eq!(slot_of(b"inbox:{u1}"), slot_of(b"u1"));
        assert_eq!(slot_of(b"a{}b"), crc16(b"a{}b") % 16384);
        assert_eq!(slot_of(b"a{b}{c}"), slot_of(b"b"));
        assert_eq!(slot_of(b"{"), crc16(b"{") % 16384);
    }
}
