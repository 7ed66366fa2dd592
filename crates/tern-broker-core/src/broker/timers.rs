//! Timers: a lazy deadline heap, so only sessions with something due are touched
//! ([`Broker::poll_timeout`], [`Broker::handle_timeout`]).

use super::*;

impl Broker {
    /// When [`Broker::handle_timeout`] must next be called, if ever: the earliest keep
    /// alive, session expiry or will delay of any session.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let history = self.history_deadline();
        // Entries replaced by earlier ones would only wake the driver for nothing.
        while let Some(Reverse((at, client_id))) = self.timers.peek() {
            match self.sessions.get(client_id) {
                Some(s) if s.scheduled == Some(*at) => {
                    return Some(history.map_or(*at, |h| h.min(*at)));
                }
                _ => {
                    self.timers.pop();
                }
            }
        }
        history
    }

    /// Timers: whatever is due at `now` (keep alive of connections, expiry of offline
    /// sessions, delayed wills); sessions with nothing due are not looked at.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.trim_history(now);
        while let Some(Reverse((at, _))) = self.timers.peek()
            && *at <= now
        {
            let Some(Reverse((at, client_id))) = self.timers.pop() else {
                break;
            };
            match self.sessions.get_mut(&client_id) {
                Some(s) if s.scheduled == Some(at) => s.scheduled = None,
                _ => continue,
            }
            self.session_timeout(&client_id, now);
            self.schedule(&client_id);
        }
        self.commit(now);
    }

    /// Puts the session in [`Broker::timers`] if what it has due is earlier than its
    /// entry there (or it has none).
    pub(super) fn schedule(&mut self, client_id: &Str) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let Some(due) = s.deadline() else { return };
        if s.scheduled.is_some_and(|at| at <= due) {
            return;
        }
        s.scheduled = Some(due);
        self.timers.push(Reverse((due, client_id.clone())));
    }

    /// One session's timers at `now`.
    pub(super) fn session_timeout(&mut self, client_id: &Str, now: Instant) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        if let Some((_, c)) = session.conn.as_mut() {
            c.handle_timeout(now);
            let held_too_long = session.parked.front().is_some_and(|p| p.until <= now);
            self.drain(client_id, now);
            if held_too_long {
                self.unblock(Some(client_id), now);
            }
        } else if session.expires_at.is_some_and(|at| now >= at) {
            self.counters.sessions_expired += 1;
            self.end_session(client_id, now);
        } else if session
            .pending_will
            .as_deref()
            .is_some_and(|(at, _)| now >= *at)
        {
            let Some((_, will)) = session.pending_will.take().map(|p| *p) else {
                return;
            };
            let username = session.username.clone();
            self.put_session(client_id);
            self.publish_will(client_id, username.as_deref(), will, now);
            if self.settings.cluster {
                self.will_changes
                    .push(WillChange::Delete(client_id.clone()));
            }
        }
    }
}
