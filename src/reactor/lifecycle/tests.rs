//! The lifecycle's transition table and scenarios.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    Ask,
    AskReplacement,
    FinishAdoption,
    ExtendAdoption,
    Drain,
    HandOver,
    Sent,
    Ack,
    End,
}

const EVENTS: [Ev; 9] = [
    Ev::Ask,
    Ev::AskReplacement,
    Ev::FinishAdoption,
    Ev::ExtendAdoption,
    Ev::Drain,
    Ev::HandOver,
    Ev::Sent,
    Ev::Ack,
    Ev::End,
];

fn out(now: Instant, stage: Stage) -> Outgoing {
    Outgoing {
        began: now,
        boundary_by: now,
        send_by: now,
        candidates: Vec::new(),
        stage,
    }
}

/// Every state the table covers, by name.
fn states(now: Instant) -> Vec<(&'static str, Lifecycle)> {
    let adoption = Adoption {
        began: now,
        until: now,
        adopted: 0,
    };
    let asked = Asked::default();
    let exit = WorkerExit::Stopped;
    vec![
        ("adopting", Lifecycle::Adopting { adoption, asked }),
        ("serving", Lifecycle::Serving { asked }),
        (
            "draining+adopting",
            Lifecycle::Draining {
                exit,
                adoption: Some(adoption),
            },
        ),
        (
            "draining",
            Lifecycle::Draining {
                exit,
                adoption: None,
            },
        ),
        (
            "gathering",
            Lifecycle::HandingOver(out(now, Stage::Gathering)),
        ),
        (
            "await-ack",
            Lifecycle::HandingOver(out(
                now,
                Stage::AwaitAck {
                    until: now,
                    sent: 1,
                },
            )),
        ),
        (
            "finished",
            Lifecycle::HandingOver(out(now, Stage::Finished)),
        ),
        ("done", Lifecycle::Done { exit }),
    ]
}

fn fire(lc: &mut Lifecycle, ev: Ev, now: Instant) -> bool {
    match ev {
        Ev::Ask => lc.ask(WorkerExit::Stopped),
        Ev::AskReplacement => lc.ask_replacement(),
        Ev::FinishAdoption => lc.finish_adoption("test").is_ok(),
        Ev::ExtendAdoption => lc.extend_adoption(now + Duration::from_secs(1)).is_ok(),
        Ev::Drain => lc.begin_drain(WorkerExit::Stopped).is_ok(),
        Ev::HandOver => lc.begin_handover(out(now, Stage::Gathering)).is_ok(),
        Ev::Sent => lc.sent(1, now).is_ok(),
        Ev::Ack => lc.ack_over(true).is_ok(),
        Ev::End => lc.end().is_ok(),
    }
}

/// The legal (state, event) pairs and the state each leads to; every
/// other pair must be refused and leave the state unchanged.
const LEGAL: &[(&str, Ev, &str)] = &[
    ("adopting", Ev::Ask, "Adopting"),
    ("adopting", Ev::AskReplacement, "Adopting"),
    ("adopting", Ev::FinishAdoption, "Serving"),
    ("adopting", Ev::ExtendAdoption, "Adopting"),
    ("adopting", Ev::Drain, "Draining (still adopting)"),
    ("serving", Ev::Ask, "Serving"),
    ("serving", Ev::AskReplacement, "Serving"),
    ("serving", Ev::Drain, "Draining"),
    ("serving", Ev::HandOver, "HandingOver (gathering)"),
    ("draining+adopting", Ev::FinishAdoption, "Draining"),
    (
        "draining+adopting",
        Ev::ExtendAdoption,
        "Draining (still adopting)",
    ),
    ("draining", Ev::End, "Done"),
    ("gathering", Ev::Sent, "HandingOver (awaiting the ACK)"),
    ("await-ack", Ev::Ack, "HandingOver (finished)"),
    ("finished", Ev::End, "Done"),
];

#[test]
fn transition_table() {
    let now = Instant::now();
    for (name, state) in states(now) {
        for ev in EVENTS {
            let mut lc = state.clone();
            let ok = fire(&mut lc, ev, now);
            let want = LEGAL.iter().find(|(s, e, _)| *s == name && *e == ev);
            match want {
                Some((_, _, to)) => {
                    assert!(ok, "{name} + {ev:?} should be legal");
                    assert_eq!(lc.name(), *to, "{name} + {ev:?}");
                }
                None => {
                    assert!(!ok, "{name} + {ev:?} should be refused");
                    assert_eq!(lc, state, "{name} + {ev:?} must not change the state");
                }
            }
        }
    }
}

#[test]
fn asks_are_first_wins_and_handover_waits_for_adoption() {
    let now = Instant::now();
    let mut lc = Lifecycle::new(true, now, Duration::from_secs(1));
    assert!(lc.is_adopting() && !lc.accepts() && !lc.reads_mailbox());
    assert!(lc.ask(WorkerExit::HandedOver));
    assert!(!lc.ask(WorkerExit::Stopped), "the first ask wins");
    assert_eq!(lc.due(), None, "a handover waits for the adoption");
    assert!(lc.stop_asked());
    lc.finish_adoption("END").unwrap();
    assert_eq!(lc.due(), Some(WorkerExit::HandedOver));
    assert!(lc.accepts() && lc.reads_mailbox());
    lc.begin_handover(out(now, Stage::Gathering)).unwrap();
    assert!(lc.is_stopping() && lc.is_handing_over() && !lc.draining());
    assert!(!lc.reads_mailbox() && !lc.can_end());
    lc.sent(3, now).unwrap();
    assert_eq!(lc.ack_over(true).unwrap().0, 3);
    assert_eq!(lc.end().unwrap(), WorkerExit::HandedOver);
    assert!(
        lc.is_handing_over(),
        "on_worker_stop still sees the handover"
    );
    assert_eq!(lc.exit(), WorkerExit::HandedOver);
}

#[test]
fn a_stop_during_adoption_drains_after_it() {
    let now = Instant::now();
    let mut lc = Lifecycle::new(true, now, Duration::from_secs(1));
    lc.ask(WorkerExit::Stopped);
    assert_eq!(lc.due(), Some(WorkerExit::Stopped));
    lc.begin_drain(WorkerExit::Stopped).unwrap();
    assert!(lc.draining() && lc.is_adopting() && !lc.reads_mailbox());
    assert!(!lc.can_end(), "the adoption must finish first");
    lc.count_adopted();
    assert_eq!(lc.finish_adoption("END").unwrap().adopted, 1);
    assert!(lc.can_end() && lc.reads_mailbox());
    assert_eq!(lc.end().unwrap(), WorkerExit::Stopped);
    assert!(!lc.is_handing_over() && lc.is_stopping());
}

#[test]
fn replacement_is_asked_once() {
    let mut lc = Lifecycle::new(false, Instant::now(), Duration::ZERO);
    assert!(lc.ask_replacement());
    assert!(!lc.ask_replacement());
    assert!(!lc.stop_asked(), "asking for a replacement is not a stop");
}
