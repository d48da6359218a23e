//! Which worker of this IM server holds which user: every worker keeps
//! the whole server's map, told by its siblings over the worker pipe when
//! a user connects, moves or leaves, so a message between two users of
//! the same server, or one the Route hands in, goes straight to the right
//! worker without asking Redis.

use std::collections::HashMap;

/// Where one user is: almost always one worker, kept inline; a user with
/// devices on several workers spills into a small vector.
#[derive(Debug)]
enum Where {
    /// (worker, connections there).
    One(u16, u32),
    /// Several workers.
    Many(Vec<(u16, u32)>),
}

/// uid → where its connections are.
#[derive(Debug, Default)]
pub struct Directory {
    users: HashMap<Box<str>, Where>, // who is where
}

impl Directory {
    /// One more connection of `uid` on `worker`. O(devices).
    pub fn add(&mut self, uid: &str, worker: usize) {
        let w = worker as u16;
        match self.users.get_mut(uid) {
            None => {
                self.users.insert(uid.into(), Where::One(w, 1));
            }
            Some(Where::One(x, n)) if *x == w => *n += 1,
            Some(at) => {
                let mut v = match std::mem::replace(at, Where::Many(Vec::new())) {
                    Where::One(x, n) => vec![(x, n)],
                    Where::Many(v) => v,
                };
                match v.iter_mut().find(|(x, _)| *x == w) {
                    Some((_, n)) => *n += 1,
                    None => v.push((w, 1)),
                }
                *at = Where::Many(v);
            }
        }
    }

    /// One connection fewer of `uid` on `worker`. O(devices).
    pub fn remove(&mut self, uid: &str, worker: usize) {
        let w = worker as u16;
        let Some(at) = self.users.get_mut(uid) else {
            return;
        };
        let gone = match at {
            Where::One(x, n) if *x == w => {
                *n -= 1;
                *n == 0
            }
            Where::One(..) => false,
            Where::Many(v) => {
                if let Some(i) = v.iter().position(|(x, _)| *x == w) {
                    v[i].1 -= 1;
                    if v[i].1 == 0 {
                        v.swap_remove(i);
                    }
                }
                if let [(x, n)] = v.as_slice() {
                    *at = Where::One(*x, *n);
                }
                matches!(at, Where::Many(v) if v.is_empty())
            }
        };
        if gone {
            self.users.remove(uid);
        }
    }

    /// Forgets every user of `worker` (it died; its users are gone).
    pub fn drop_worker(&mut self, worker: usize) {
        let w = worker as u16;
        self.users.retain(|_, at| match at {
            Where::One(x, _) => *x != w,
            Where::Many(v) => {
                v.retain(|(x, _)| *x != w);
                !v.is_empty()
            }
        });
    }

    /// The workers holding `uid` (empty: not on this server). Messages
    /// only ask [`Directory::has`]; this is for checking the bookkeeping.
    #[cfg(test)]
    pub fn workers(&self, uid: &str) -> impl Iterator<Item = usize> + '_ {
        let (one, many): (Option<usize>, &[(u16, u32)]) = match self.users.get(uid) {
            None => (None, &[]),
            Some(Where::One(w, _)) => (Some(*w as usize), &[]),
            Some(Where::Many(v)) => (None, v.as_slice()),
        };
        one.into_iter().chain(many.iter().map(|(w, _)| *w as usize))
    }

    /// Whether `uid` has a connection on this server.
    pub fn has(&self, uid: &str) -> bool {
        self.users.contains_key(uid)
    }

    /// Users known on this server.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether no user is known.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_connections_per_worker() {
        let mut d = Directory::default();
        d.add("u", 0);
        d.add("u", 1);
        d.add("u", 1);
        let mut w: Vec<usize> = d.workers("u").collect();
        w.sort();
        assert_eq!(w, vec![0, 1]);
        d.remove("u", 1);
        assert_eq!(d.workers("u").count(), 2, "one connection left on 1");
        d.remove("u", 1);
        assert_eq!(d.workers("u").collect::<Vec<_>>(), vec![0]);
        d.remove("u", 0);
        assert!(!d.has("u") && d.is_empty());
        d.remove("nobody", 3);
    }

    #[test]
    fn a_dead_worker_takes_its_users_along() {
        let mut d = Directory::default();
        d.add("a", 0);
        d.add("b", 1);
        d.add("c", 1);
        d.add("c", 0);
        d.drop_worker(1);
        assert!(d.has("a") && !d.has("b"));
        assert_eq!(d.workers("c").collect::<Vec<_>>(), vec![0]);
    }
}
