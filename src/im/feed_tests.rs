//! The feed's state machine, event by event.

use super::*;

fn head(epoch: &str, seq: u64, acked: u64) -> Head {
    Head {
        epoch: epoch.into(),
        seq,
        acked,
    }
}

fn live(epoch: &str, seq: u64) -> Live {
    Live {
        epoch: epoch.into(),
        seq,
        frame: format!("m{seq}"),
    }
}

fn entries(seqs: impl IntoIterator<Item = u64>) -> Vec<Entry> {
    seqs.into_iter()
        .map(|seq| Entry {
            seq,
            id: format!("i{seq}"),
            from: "f".into(),
            data: seq.to_string(),
        })
        .collect()
}

fn pushed(steps: &[Step]) -> Vec<String> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Push(f) | Step::Message(f) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

fn resume(since: Option<u64>, epoch: Option<&str>) -> Resume {
    Resume {
        since,
        epoch: epoch.map(String::from),
    }
}

#[test]
fn welcome_then_unacked_replay_then_held_live_messages() {
    let mut f = Feed::opening(Resume::default());
    assert!(f.offer(live("e", 4)).is_empty(), "held while opening");
    let s = f.welcomed("u", head("e", 3, 1));
    assert!(pushed(&s)[0].contains(r#""method":"welcome""#));
    assert_eq!(s[1], Step::Fetch { from: 2, to: 3 });
    let s = f.fetched(&entries([2, 3]), 3);
    let p = pushed(&s);
    assert!(p[0].contains(r#""seq":2"#) && p[1].contains(r#""seq":3"#));
    assert_eq!(p[2], "m4", "the held live message comes after the replay");
    assert_eq!(f.position(), ("e", 4));
    assert!(f.offer(live("e", 4)).is_empty(), "a duplicate is dropped");
    assert_eq!(pushed(&f.offer(live("e", 5))), vec!["m5"]);
}

#[test]
fn since_resumes_after_it_and_a_bad_since_is_refused() {
    let mut f = Feed::opening(resume(Some(3), Some("e")));
    let s = f.welcomed("u", head("e", 3, 0));
    assert_eq!(s.len(), 1, "nothing to replay: {s:?}");
    let mut f = Feed::opening(resume(Some(9), Some("e")));
    let s = f.welcomed("u", head("e", 3, 0));
    assert!(matches!(&s[1], Step::Refuse(e) if e.contains("since=9")));
}

#[test]
fn a_stale_epoch_gets_resync_and_the_unacked_messages() {
    let mut f = Feed::opening(resume(Some(40), Some("old")));
    let s = f.welcomed("u", head("new", 2, 0));
    assert!(pushed(&s)[1].contains(r#""method":"resync""#));
    assert_eq!(s[2], Step::Fetch { from: 1, to: 2 });
    // A straggler of the old epoch changes nothing.
    f.fetched(&entries([1, 2]), 2);
    assert!(f.offer(live("old", 41)).is_empty());
}

#[test]
fn a_gap_is_filled_from_the_inbox_in_order() {
    let mut f = Feed::adopted("e".into(), 1);
    let s = f.offer(live("e", 4));
    assert_eq!(s, vec![Step::Fetch { from: 2, to: 3 }]);
    assert!(f.offer(live("e", 3)).is_empty(), "held while catching up");
    let p = pushed(&f.fetched(&entries([2, 3]), 3));
    assert_eq!(p.len(), 3, "{p:?}");
    assert!(p[0].contains(r#""seq":2"#) && p[1].contains(r#""seq":3"#));
    assert_eq!(p[2], "m4");
    assert_eq!(f.position().1, 4);
}

#[test]
fn trimmed_messages_are_reported() {
    let mut f = Feed::opening(resume(Some(0), Some("e")));
    let s = f.welcomed("u", head("e", 5, 0));
    assert_eq!(s[1], Step::Fetch { from: 1, to: 5 });
    let p = pushed(&f.fetched(&entries([4, 5]), 5));
    assert!(p[0].contains(r#""reason":"trimmed""#), "{p:?}");
    assert_eq!(p.len(), 3);
}

#[test]
fn a_new_epoch_mid_session_is_a_resync() {
    let mut f = Feed::adopted("e".into(), 7);
    let p = pushed(&f.offer(live("e2", 1)));
    assert!(p[0].contains(r#""epoch":"e2""#) && p[0].contains("resync"));
    assert_eq!(p[1], "m1");
    assert!(f.offer(live("e", 8)).is_empty(), "the old epoch is left");
}

#[test]
fn long_replays_are_paged_and_a_check_catches_up() {
    let n = PAGE as u64 * 2 + 3;
    let mut f = Feed::opening(Resume::default());
    let s = f.welcomed("u", head("e", n, 0));
    assert_eq!(
        s[1],
        Step::Fetch {
            from: 1,
            to: PAGE as u64
        }
    );
    let s = f.fetched(&entries(1..=PAGE as u64), PAGE as u64);
    assert_eq!(
        s.last(),
        Some(&Step::Fetch {
            from: PAGE as u64 + 1,
            to: 2 * PAGE as u64
        })
    );
    assert_eq!(f.retry(), s.last().cloned());
    f.fetched(&entries(PAGE as u64 + 1..=2 * PAGE as u64), 2 * PAGE as u64);
    f.fetched(&entries(2 * PAGE as u64 + 1..=n), n);
    assert_eq!(f.position().1, n);
    assert_eq!(
        f.checked("e", n + 2),
        vec![Step::Fetch {
            from: n + 1,
            to: n + 2
        }]
    );
}
