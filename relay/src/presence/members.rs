//! One channel's members, from the registry's entries in stream order (pure: time is an
//! argument, nothing sleeps).
//!
//! A KV entry is one connection's membership (`pres.<chan>.<relay>.<conn>` → member key and
//! info). Members are the distinct keys: a key joins when it goes from no connection to
//! one, and leaves `leaveGraceSeconds` after its last connection went, unless one came back
//! meanwhile (then neither leave nor join). Above `maxMembersWithEvents` members (or with
//! `events: false`) no per-member event is emitted, only `occupancy`, at most one per
//! [`OCCUPANCY_EVERY`] with the latest counts.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// At most one `occupancy` per channel this often (the latest counts; changes in between
/// are coalesced).
pub const OCCUPANCY_EVERY: Duration = Duration::from_secs(1);

/// How a channel's events are bounded (its binding's `presence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// `join` and `leave` are sent at all.
    pub events: bool,
    /// Above this many members: `occupancy` only.
    pub max_members_with_events: usize,
    /// A member gone for less is not gone.
    pub leave_grace: Duration,
}

/// One member as the others see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its key.
    pub key: Arc<str>,
    /// Its info, as JSON text (an object).
    pub info: Arc<str>,
}

/// Something the channel's presence subscribers hear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A key that was not a member has a connection now.
    Join(Member),
    /// A member has had no connection for the grace.
    Leave(Member),
    /// The counts (or whether events are sent) changed.
    Occupancy {
        /// Connections.
        clients: usize,
        /// Members, those in their grace included.
        users: usize,
        /// Whether `join`/`leave` are sent now.
        events: bool,
    },
}

#[derive(Debug, Clone)]
struct State {
    info: Arc<str>,
    /// Its connections now (KV keys holding it).
    clients: usize,
    /// When its last connection went (it is in its grace).
    gone_at: Option<Instant>,
}

/// A page of members (the `presence` of an `ok`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Members after the asked key, in key byte order: (member, its connections).
    pub members: Vec<(Member, usize)>,
    /// Connections on the channel.
    pub clients: usize,
    /// Members.
    pub users: usize,
    /// Whether `join`/`leave` are sent now.
    pub events: bool,
    /// Whether no member follows the page; else the key to page on from.
    pub next: Option<Arc<str>>,
}

/// One channel's members.
#[derive(Debug)]
pub struct Members {
    policy: Policy,
    /// KV key (a connection) → its member key.
    conns: HashMap<String, Arc<str>>,
    /// Member key → its state. A `BTreeMap`: pages are in key byte order.
    members: BTreeMap<Arc<str>, State>,
    /// The last occupancy emitted (clients, users, events), and when.
    sent: Option<((usize, usize, bool), Instant)>,
    /// The counts changed since `sent`; emitted once [`OCCUPANCY_EVERY`] has passed.
    dirty: bool,
    /// Events were off at some moment since `sent`: the next occupancy says `events: false`
    /// even if they are on again, so a subscriber never misses a pause (docs/protocol.md
    /// section 10).
    paused: bool,
}

impl Members {
    /// No members yet.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            conns: HashMap::new(),
            members: BTreeMap::new(),
            sent: None,
            dirty: false,
            paused: false,
        }
    }

    /// Connections.
    pub fn clients(&self) -> usize {
        self.conns.len()
    }

    /// Members, those in their grace included.
    pub fn users(&self) -> usize {
        self.members.len()
    }

    /// Whether KV key `conn` (a connection) is held.
    pub fn holds(&self, conn: &str) -> bool {
        self.conns.contains_key(conn)
    }

    /// The KV keys (connections) held.
    pub fn conns(&self) -> impl Iterator<Item = &str> {
        self.conns.keys().map(String::as_str)
    }

    /// Whether per-member events are sent with `users` members.
    fn events_with(&self, users: usize) -> bool {
        self.policy.events && users <= self.policy.max_members_with_events
    }

    /// Whether per-member events are sent now.
    pub fn events(&self) -> bool {
        self.events_with(self.users())
    }

    /// KV key `conn` holds `key` (with `info`) now: a put, replacing what it held.
    pub fn put(&mut self, conn: &str, key: &str, info: &str, now: Instant) -> Vec<Event> {
        let mut out = Vec::new();
        if let Some(old) = self.conns.get(conn) {
            if **old == *key {
                // The same membership written again (a reassertion): only its info may move.
                if let Some(s) = self.members.get_mut(key) {
                    s.info = Arc::from(info);
                }
                return out;
            }
            self.remove(conn, now, &mut out);
        }
        let key: Arc<str> = match self.members.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => Arc::from(key),
        };
        self.conns.insert(conn.to_owned(), key.clone());
        let users_after = self.users() + usize::from(!self.members.contains_key(&key));
        match self.members.get_mut(&key) {
            Some(s) => {
                // Back within its grace, or one more tab: no event.
                s.clients += 1;
                s.gone_at = None;
                s.info = Arc::from(info);
            }
            None => {
                let info: Arc<str> = Arc::from(info);
                self.members.insert(
                    key.clone(),
                    State {
                        info: info.clone(),
                        clients: 1,
                        gone_at: None,
                    },
                );
                if self.events_with(users_after) {
                    out.push(Event::Join(Member { key, info }));
                }
            }
        }
        self.changed(now, &mut out);
        out
    }

    /// KV key `conn` was deleted (a departure, or a purge of its relay).
    pub fn delete(&mut self, conn: &str, now: Instant) -> Vec<Event> {
        let mut out = Vec::new();
        if self.conns.contains_key(conn) {
            self.remove(conn, now, &mut out);
            self.changed(now, &mut out);
        }
        out
    }

    /// A connection of `key` (with `info`), which this view never held, ended at `gone_at`:
    /// a watcher that starts while the member is in its grace learns it from the delete
    /// marker. The member is kept in its grace until `gone_at` + the grace, as the relays
    /// that saw it keep it: a connection back within it makes no join, and otherwise it
    /// leaves then, here too.
    pub fn departed(
        &mut self,
        key: &str,
        info: &str,
        gone_at: Instant,
        now: Instant,
    ) -> Vec<Event> {
        let mut out = Vec::new();
        if self.members.contains_key(key) || now >= gone_at + self.policy.leave_grace {
            return out;
        }
        self.members.insert(
            Arc::from(key),
            State {
                info: Arc::from(info),
                clients: 0,
                gone_at: Some(gone_at),
            },
        );
        self.changed(now, &mut out);
        out
    }

    fn remove(&mut self, conn: &str, now: Instant, out: &mut Vec<Event>) {
        let Some(key) = self.conns.remove(conn) else {
            return;
        };
        let Some(s) = self.members.get_mut(&key) else {
            return;
        };
        s.clients = s.clients.saturating_sub(1);
        if s.clients == 0 {
            s.gone_at = Some(now);
            if self.policy.leave_grace.is_zero() {
                self.expire(now, out);
            }
        }
    }

    /// Members whose grace has passed leave.
    fn expire(&mut self, now: Instant, out: &mut Vec<Event>) {
        let grace = self.policy.leave_grace;
        let gone: Vec<Arc<str>> = self
            .members
            .iter()
            .filter(|(_, s)| s.gone_at.is_some_and(|g| now >= g + grace))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            // Sent when the member list the subscribers hold has it: events were on with it.
            let send = self.events_with(self.users());
            if let Some(s) = self.members.remove(&key)
                && send
            {
                out.push(Event::Leave(Member { key, info: s.info }));
            }
        }
    }

    /// The counts may have changed: an occupancy now, or once the last one is old enough.
    fn changed(&mut self, now: Instant, out: &mut Vec<Event>) {
        self.dirty = true;
        self.occupancy(now, out);
    }

    fn occupancy(&mut self, now: Instant, out: &mut Vec<Event>) {
        let on = self.events();
        self.paused |= !on;
        if !self.dirty {
            return;
        }
        let counts = (self.clients(), self.users(), on && !self.paused);
        match self.sent {
            Some((last, _)) if last == counts => {}
            Some((_, at)) if now < at + OCCUPANCY_EVERY => return,
            _ => {
                self.sent = Some((counts, now));
                out.push(Event::Occupancy {
                    clients: counts.0,
                    users: counts.1,
                    events: counts.2,
                });
            }
        }
        // A pause just reported while events are on again: one more, saying so.
        self.paused = !on;
        self.dirty = counts.2 != on;
    }

    /// What time alone brings: leaves whose grace passed, a coalesced occupancy.
    pub fn tick(&mut self, now: Instant) -> Vec<Event> {
        let mut out = Vec::new();
        let users = self.users();
        self.expire(now, &mut out);
        if self.users() != users {
            self.dirty = true;
        }
        self.occupancy(now, &mut out);
        out
    }

    /// When [`Members::tick`] has something to do next, if ever.
    pub fn next_due(&self) -> Option<Instant> {
        let grace = self.policy.leave_grace;
        let leave = self
            .members
            .values()
            .filter_map(|s| s.gone_at.map(|g| g + grace))
            .min();
        let occupancy = self
            .sent
            .filter(|_| self.dirty)
            .map(|(_, at)| at + OCCUPANCY_EVERY);
        match (leave, occupancy) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Up to `limit` members whose key sorts after `after` (exclusive), in key byte order.
    pub fn page(&self, after: Option<&str>, limit: usize) -> Page {
        let from = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut it = self
            .members
            .range::<str, _>((from, Bound::Unbounded))
            .map(|(k, s)| {
                (
                    Member {
                        key: k.clone(),
                        info: s.info.clone(),
                    },
                    s.clients,
                )
            });
        let members: Vec<(Member, usize)> = it.by_ref().take(limit).collect();
        let more = it.next().is_some();
        let next = more
            .then(|| members.last().map(|(m, _)| m.key.clone()))
            .flatten();
        Page {
            members,
            clients: self.clients(),
            users: self.users(),
            events: self.events(),
            next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy(max: usize, grace_ms: u64) -> Policy {
        Policy {
            events: true,
            max_members_with_events: max,
            leave_grace: Duration::from_millis(grace_ms),
        }
    }

    fn names(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Join(m) => format!("join {}", m.key),
                Event::Leave(m) => format!("leave {}", m.key),
                Event::Occupancy {
                    clients,
                    users,
                    events,
                } => format!("occupancy {clients}/{users}/{events}"),
            })
            .collect()
    }

    #[test]
    fn a_key_joins_once_whatever_its_tabs_and_leaves_after_the_grace() {
        let t0 = Instant::now();
        let mut m = Members::new(policy(10, 1000));
        assert_eq!(
            names(&m.put("c1", "alice", "{}", t0)),
            ["join alice", "occupancy 1/1/true"]
        );
        // A second tab: no join; the occupancy waits for its second.
        assert!(m.put("c2", "alice", "{}", t0 + T).is_empty());
        assert_eq!(m.next_due(), Some(t0 + OCCUPANCY_EVERY));
        assert_eq!(names(&m.tick(t0 + OCCUPANCY_EVERY)), ["occupancy 2/1/true"]);
        let t1 = t0 + 2 * OCCUPANCY_EVERY;
        assert_eq!(names(&m.delete("c1", t1)), ["occupancy 1/1/true"]);
        assert!(m.delete("c2", t1 + T).is_empty(), "in its grace: no leave");
        assert_eq!(m.users(), 1, "a member in its grace counts");
        assert_eq!(m.page(None, 10).members[0].1, 0, "with no clients");
        let gone = t1 + T + Duration::from_millis(1000);
        assert_eq!(
            m.next_due(),
            Some(t1 + OCCUPANCY_EVERY),
            "the occupancy first"
        );
        assert_eq!(names(&m.tick(gone - T)), ["occupancy 0/1/true"]);
        assert_eq!(m.next_due(), Some(gone));
        assert_eq!(names(&m.tick(gone)), ["leave alice"]);
        assert_eq!(m.users(), 0);
        assert_eq!(
            names(&m.tick(gone + OCCUPANCY_EVERY)),
            ["occupancy 0/0/true"]
        );
        assert_eq!(m.next_due(), None);
    }

    #[test]
    fn a_connection_back_within_the_grace_makes_no_pair() {
        let t0 = Instant::now();
        let mut m = Members::new(policy(10, 1000));
        m.put("r1.1", "bob", r#"{"name":"Bob"}"#, t0);
        m.delete("r1.1", t0 + T);
        // Back on another relay, within the grace.
        let back = m.put("r2.7", "bob", r#"{"name":"Bob"}"#, t0 + 500 * T);
        assert!(names(&back).iter().all(|e| e.starts_with("occupancy")));
        let later = m.tick(t0 + Duration::from_secs(5));
        assert!(names(&later).iter().all(|e| e.starts_with("occupancy")));
        assert_eq!(m.users(), 1);
        assert_eq!(m.clients(), 1);
    }

    #[test]
    fn a_member_learned_from_a_recent_departure_is_in_its_grace_not_a_join() {
        let t0 = Instant::now();
        let mut m = Members::new(policy(10, 5_000));
        // Bob went 2 s before this view started: in his grace, a member without connections.
        let e = m.departed("bob", "{}", t0, t0 + ms(2_000));
        assert!(!names(&e).iter().any(|n| n.starts_with("join")), "{e:?}");
        assert_eq!((m.users(), m.clients()), (1, 0));
        // Back on another relay within it: no join.
        let e = m.put("r2.9", "bob", "{}", t0 + ms(3_000));
        assert!(!names(&e).iter().any(|n| n.starts_with("join")), "{e:?}");
        assert_eq!((m.users(), m.clients()), (1, 1));
        // Carol went and does not come back: she leaves when her grace (from when she went) ends.
        m.departed("carol", "{}", t0 + ms(1_000), t0 + ms(3_000));
        let e = m.tick(t0 + ms(6_000));
        assert!(names(&e).contains(&"leave carol".to_owned()), "{e:?}");
        // A departure older than the grace is nobody's business any more.
        assert!(m.departed("dave", "{}", t0, t0 + ms(9_000)).is_empty());
        assert_eq!(m.users(), 1);
    }

    #[test]
    fn a_zero_grace_leaves_at_once() {
        let t0 = Instant::now();
        let mut m = Members::new(policy(10, 0));
        m.put("c", "k", "{}", t0);
        let out = m.delete("c", t0 + OCCUPANCY_EVERY);
        assert_eq!(names(&out), ["leave k", "occupancy 0/0/true"]);
    }

    #[test]
    fn a_put_to_the_same_kv_key_replaces_its_member() {
        let t0 = Instant::now();
        let mut m = Members::new(policy(10, 1000));
        m.put("c", "old", "{}", t0);
        let out = m.put("c", "new", "{}", t0 + T);
        assert_eq!(names(&out), ["join new"]);
        assert_eq!(m.clients(), 1);
        assert_eq!(m.users(), 2, "old is in its grace");
        assert_eq!(
            names(&m.tick(t0 + Duration::from_secs(2))),
            ["leave old"],
            "the counts are back to the ones last sent: no occupancy"
        );
        // The same value again (a reassertion): nothing.
        assert!(
            m.put("c", "new", "{}", t0 + Duration::from_secs(3))
                .is_empty()
        );
    }

    #[test]
    fn above_the_threshold_only_coalesced_occupancy() {
        let t0 = Instant::now();
        let mut m = Members::new(policy(3, 0));
        let mut all = Vec::new();
        for i in 0..10u32 {
            all.extend(m.put(&format!("c{i}"), &format!("u{i}"), "{}", t0 + T * (i * 10)));
        }
        let n = names(&all);
        assert_eq!(
            n.iter().filter(|e| e.starts_with("join")).count(),
            3,
            "{n:?}"
        );
        assert_eq!(n.iter().filter(|e| e.starts_with("occupancy")).count(), 1);
        assert!(!m.events());
        // A second later: the latest counts, events off.
        assert_eq!(
            names(&m.tick(t0 + OCCUPANCY_EVERY)),
            ["occupancy 10/10/false"]
        );
        // Leaves above the threshold are not sent; back at it, events are on again.
        let mut out = Vec::new();
        for i in 0..7u32 {
            out.extend(m.delete(&format!("c{i}"), t0 + OCCUPANCY_EVERY + T * i));
        }
        assert!(
            names(&out).iter().all(|e| !e.starts_with("leave")),
            "{out:?}"
        );
        // The pause is reported even though events are on again by then, then their return.
        assert!(m.events());
        assert_eq!(
            names(&m.tick(t0 + 3 * OCCUPANCY_EVERY)),
            ["occupancy 3/3/false"]
        );
        assert_eq!(m.next_due(), Some(t0 + 4 * OCCUPANCY_EVERY));
        assert_eq!(
            names(&m.delete("c7", t0 + 3 * OCCUPANCY_EVERY)),
            ["leave u7"]
        );
        assert_eq!(
            names(&m.tick(t0 + 4 * OCCUPANCY_EVERY)),
            ["occupancy 2/2/true"]
        );
        assert_eq!(m.next_due(), None);
    }

    #[test]
    fn events_false_sends_occupancy_only() {
        let t0 = Instant::now();
        let mut m = Members::new(Policy {
            events: false,
            ..policy(10, 0)
        });
        assert_eq!(names(&m.put("c", "k", "{}", t0)), ["occupancy 1/1/false"]);
        assert!(m.delete("c", t0 + T).is_empty(), "coalesced");
    }

    #[test]
    fn pages_are_in_key_byte_order_after_the_key_asked() {
        let t0 = Instant::now();
        let mut m = Members::new(policy(100, 0));
        for k in ["b", "a", "é", "Z", "c"] {
            m.put(&format!("conn-{k}"), k, "{}", t0);
        }
        m.put("conn-a2", "a", "{}", t0);
        let p = m.page(None, 2);
        let keys: Vec<&str> = p.members.iter().map(|(m, _)| &*m.key).collect();
        assert_eq!(keys, ["Z", "a"]);
        assert_eq!(p.members[1].1, 2);
        assert_eq!(p.next.as_deref(), Some("a"));
        assert_eq!((p.clients, p.users), (6, 5));
        let p = m.page(Some("a"), 10);
        let keys: Vec<&str> = p.members.iter().map(|(m, _)| &*m.key).collect();
        assert_eq!(keys, ["b", "c", "é"]);
        assert_eq!(p.next, None);
        assert!(m.page(Some("é"), 10).members.is_empty());
    }
}
