//! What the client tells the application: [`Event`]s through [`Events`], bounded by
//! `max_unread` so a slow application holds the broker back instead of filling memory.

use super::*;

/// What the client tells the application (see [`Events::recv`] for a loop over them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A connection is up; `session_present`: the broker resumed the session.
    Connected {
        /// Whether the broker had the session.
        session_present: bool,
    },
    /// A message from a subscription (acknowledged to the broker already).
    Message(Message),
    /// The connection was lost (the client reconnects if configured to).
    Disconnected {
        /// What happened.
        reason: String,
    },
}

impl EventTx {
    /// Hands `batch` to the application (dropped if it has dropped [`Events`]).
    pub(crate) fn send(&self, batch: Vec<Event>) {
        let messages = batch
            .iter()
            .filter(|e| matches!(e, Event::Message(_)))
            .count();
        self.unread.count.fetch_add(messages, Ordering::Relaxed);
        if self.tx.send(batch).is_err() {
            // Nobody reads: nothing waits.
            self.unread.count.store(0, Ordering::Relaxed);
        }
    }

    /// Whether the application has `max_unread` messages or more still to take.
    pub(crate) fn full(&self) -> bool {
        self.unread.count.load(Ordering::Relaxed) >= self.unread.limit && !self.tx.is_closed()
    }
}

impl Events {
    /// The next event; `None` once the client has ended.
    ///
    /// ```no_run
    /// # async fn run(mut events: tern_client::Events) {
    /// use tern_client::Event;
    /// while let Some(event) = events.recv().await {
    ///     match event {
    ///         Event::Message(m) => println!("{}", m.topic.as_str()),
    ///         Event::Connected { session_present } => println!("up, resumed: {session_present}"),
    ///         Event::Disconnected { reason } => println!("down: {reason}"),
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                if matches!(e, Event::Message(_)) {
                    let before = self.unread.count.fetch_sub(1, Ordering::Relaxed);
                    if before.saturating_sub(1) == self.unread.limit / 2 {
                        self.unread.drained.notify_one();
                    }
                }
                return Some(e);
            }
            let batch = self.rx.recv().await?;
            self.ready.extend(batch);
        }
    }

    /// Messages received from the broker that the application has yet to take with
    /// [`Events::recv`] (see [`Options::max_unread`]).
    pub fn unread(&self) -> usize {
        self.unread.count.load(Ordering::Relaxed)
    }
}
