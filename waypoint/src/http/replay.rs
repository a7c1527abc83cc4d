//! What a retry sends again of the request body.
//!
//! Pingora replays a retried request's body from what it kept as it was read from downstream,
//! through `request_body_filter` again. Envoy's filters see a body once, and its router replays
//! what they passed on. So here the replay is recognised (a chunk that comes with no more body
//! read from downstream, or, once the body has ended, any call with nothing more read), the
//! plugins and mirrors are not given it again, and where plugins run the retry is sent what
//! they passed on the first time, kept for it. This holds as long as nothing before the filter
//! rewrites the body (the waypoint has no downstream module that does), and not for an upgraded
//! connection, whose bytes and close come after the end and are never replayed: the filter
//! leaves those out.

use bytes::{Bytes, BytesMut};

/// The most kept of what the plugins passed on. Pingora replays a body of at most 64 KiB; a
/// plugin that made more than this of one is not retried rather than sent a body it did not
/// make.
const LIMIT: usize = 1024 * 1024;

/// One request's body as it went upstream.
#[derive(Debug, Default)]
pub(super) struct Sent {
    /// Body bytes read from downstream when the last fresh chunk came.
    read: usize,
    /// A fresh chunk is in the plugins: until they pass it on, what went upstream is not known.
    passing: bool,
    /// The end of the body has been passed on.
    ended: bool,
    /// What went upstream, where plugins run, while a retry may still replay it.
    chunks: Vec<Bytes>,
    len: usize,
    /// More went than is kept, or Pingora no longer keeps the body: nothing can be replayed.
    spent: bool,
}

impl Sent {
    /// Whether `chunk`, given to the filter with `read` body bytes read from downstream so far,
    /// is a retry's replay: a chunk that came with nothing more read, or, once the end of the
    /// body went, any call with nothing more read (a body-less request's end again). What is
    /// read after the end, an upgraded connection's bytes, is fresh.
    pub(super) fn is_replay(&self, read: usize, chunk: Option<&Bytes>) -> bool {
        read == self.read && (self.ended || chunk.is_some_and(|c| !c.is_empty()))
    }

    /// A fresh chunk, with `read` body bytes read so far, goes into the plugins.
    pub(super) fn passing(&mut self, read: usize) {
        self.read = read;
        self.passing = true;
    }

    /// Keeps `chunk`, as the plugins passed it upstream, for a retry; `replayable` is false
    /// once Pingora can no longer replay the body (more arrived than it keeps), and what was
    /// kept is let go.
    pub(super) fn keep(&mut self, chunk: Option<&Bytes>, replayable: bool) {
        if self.spent {
            return;
        }
        let chunk = chunk.filter(|c| !c.is_empty());
        if !replayable || self.len + chunk.map_or(0, Bytes::len) > LIMIT {
            self.spent = true;
            self.chunks = Vec::new();
            return;
        }
        if let Some(chunk) = chunk {
            self.len += chunk.len();
            self.chunks.push(chunk.clone());
        }
    }

    /// The fresh chunk went on, ending the body with `end`.
    pub(super) fn passed(&mut self, end: bool) {
        self.passing = false;
        self.ended |= end;
    }

    /// Whether a retry can be sent the body as it went: not while a chunk is in the plugins
    /// (a call cut short there, when the attempt failed, left it unknown), nor once it is no
    /// longer kept.
    pub(super) fn replayable(&self) -> bool {
        !self.passing && !self.spent
    }

    /// What went upstream so far where plugins run, to send again; `None` once it cannot be.
    pub(super) fn replay(&self) -> Option<Bytes> {
        if !self.replayable() {
            return None;
        }
        match self.chunks.as_slice() {
            [one] => Some(one.clone()),
            chunks => {
                let mut all = BytesMut::with_capacity(self.len);
                chunks.iter().for_each(|c| all.extend_from_slice(c));
                Some(all.freeze())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh chunk passed through to its end.
    fn fresh(sent: &mut Sent, read: usize, chunk: &'static [u8], end: bool) {
        let chunk = Bytes::from_static(chunk);
        assert!(!sent.is_replay(read, Some(&chunk)), "fresh: {chunk:?}");
        sent.passing(read);
        sent.keep(Some(&chunk), true);
        sent.passed(end);
    }

    #[test]
    fn a_chunk_with_nothing_more_read_or_after_the_end_is_a_replay() {
        let mut sent = Sent::default();
        let hello = Bytes::from_static(b"hello");
        assert!(!sent.is_replay(0, None), "a body-less request's end");
        fresh(&mut sent, 5, b"hello", false);
        assert!(sent.is_replay(5, Some(&hello)), "the same bytes again");
        assert!(!sent.is_replay(5, None), "no chunk");
        assert!(!sent.is_replay(5, Some(&Bytes::new())), "an empty chunk");
        fresh(&mut sent, 11, b" world", true);
        assert!(sent.is_replay(11, None), "the end again");
        assert!(sent.is_replay(11, Some(&hello)));
        assert!(
            !sent.is_replay(15, Some(&hello)),
            "more read after the end: an upgraded connection's bytes"
        );
    }

    #[test]
    fn what_went_upstream_is_replayed_until_it_can_no_longer_be() {
        let mut sent = Sent::default();
        assert_eq!(sent.replay(), Some(Bytes::new()), "nothing went yet");
        fresh(&mut sent, 5, b"<hello", false);
        assert_eq!(sent.replay().as_deref(), Some(&b"<hello"[..]));
        fresh(&mut sent, 11, b" world", false);
        assert_eq!(sent.replay().as_deref(), Some(&b"<hello world"[..]));

        // A chunk in the plugins when the attempt failed: not known what went.
        sent.passing(12);
        assert!(!sent.replayable());
        assert_eq!(sent.replay(), None);
        sent.keep(None, true);
        sent.passed(false);
        assert!(sent.replayable(), "once passed on");

        sent.passing(100_000);
        sent.keep(Some(&Bytes::from_static(b"!")), false);
        sent.passed(false);
        assert_eq!(sent.replay(), None, "Pingora no longer keeps the body");
        sent.keep(Some(&Bytes::from_static(b"?")), true);
        assert!(!sent.replayable(), "and that stays so");

        let mut large = Sent::default();
        large.keep(Some(&Bytes::from(vec![0; LIMIT])), true);
        assert_eq!(large.replay().map(|b| b.len()), Some(LIMIT));
        large.keep(Some(&Bytes::from_static(b"x")), true);
        assert!(!large.replayable(), "more than is kept");
    }
}
