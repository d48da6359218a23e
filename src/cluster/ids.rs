//! Identifier validation shared by both applications: a user's uid and an
//! IM server's `serviceName`. Both are restricted so that they need no
//! escaping in a URL query, a Redis key or a log line.

/// Longest uid accepted.
pub const MAX_UID: usize = 128;
/// Longest serviceName accepted.
pub const MAX_NAME: usize = 128;

/// Whether `uid` is acceptable: 1..=128 characters of `[A-Za-z0-9_.@:-]`.
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= MAX_UID
        && uid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.@:".contains(c))
}

/// Whether `name` is an acceptable serviceName: 1..=128 characters of
/// `[A-Za-z0-9_.:-]`.
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_and_names() {
        assert!(valid_uid("alice@example.com"));
        assert!(!valid_uid(""));
        assert!(!valid_uid("a b"));
        assert!(!valid_uid(&"u".repeat(MAX_UID + 1)));
        assert!(valid_service_name("IM_1"));
        assert!(!valid_service_name("IM 1;drop"));
        assert!(!valid_service_name("a@b"));
    }
}
