//! What a retry sends again of the request body.
//!
//! Pingora replays a retried request's body from what it kept as it was read from downstream,
//! through `request_body_filter` again. Envoy's filters see a body once, and its router replays
//! what they passed on. So here the replay is recognised (a chunk that comes with no more body
//! read from downstream), the plugins and mirrors are not given it again, and where plugins run
//! the retry is sent what they passed on the first time, kept for it.

use bytes::{Bytes, BytesMut};

/// The most kept of what the plugins passed on. Pingora replays a body of at most 64 KiB; a
/// plugin that made more than this of one is not retried rather than sent a body it did not
/// make.
const LIMIT: usize = 1024 * 1024;

/// One request's body as it went upstream.
#[derive(Debug, Default)]
pub(super) struct Sent {
    /// Body bytes read from downstream when the filter last ran.
    read: usize,
    /// What went upstream, while a retry may still replay it.
    chunks: Vec<Bytes>,
    len: usize,
    /// More went than is kept, or Pingora no longer keeps the body: nothing can be replayed.
    spent: bool,
}

impl Sent {
    /// Whether `chunk`, given to the filter with `read` body bytes read from downstream so far,
    /// is a retry's replay: a chunk that came with nothing more read.
    pub(super) fn is_replay(&mut self, read: usize, chunk: Option<&Bytes>) -> bool {
        let replay = read == self.read && chunk.is_some_and(|c| !c.is_empty());
        self.read = read;
        replay
    }

    /// Keeps `chunk`, as passed upstream, for a retry; `replayable` is false once Pingora can
    /// no longer replay the body (more arrived than it keeps), and what was kept is let go.
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

    /// What went upstream so far, to send again; `None` once it is no longer kept.
    pub(super) fn replay(&self) -> Option<Bytes> {
        if self.spent {
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

    #[test]
    fn a_chunk_with_nothing_more_read_is_a_replay() {
        let mut sent = Sent::default();
        let hello = Bytes::from_static(b"hello");
        assert!(!sent.is_replay(5, Some(&hello)), "read from downstream");
        assert!(sent.is_replay(5, Some(&hello)), "the same bytes again");
        assert!(!sent.is_replay(5, None), "no chunk");
        assert!(!sent.is_replay(5, Some(&Bytes::new())), "an empty end");
        assert!(!sent.is_replay(11, Some(&hello)), "more read");
    }

    #[test]
    fn what_went_upstream_is_replayed_until_it_can_no_longer_be() {
        let mut sent = Sent::default();
        assert_eq!(sent.replay(), Some(Bytes::new()), "nothing went yet");
        sent.keep(None, true);
        sent.keep(Some(&Bytes::from_static(b"<hello")), true);
        assert_eq!(sent.replay().as_deref(), Some(&b"<hello"[..]));
        sent.keep(Some(&Bytes::from_static(b" world")), true);
        assert_eq!(sent.replay().as_deref(), Some(&b"<hello world"[..]));
        sent.keep(Some(&Bytes::from_static(b"!")), false);
        assert_eq!(sent.replay(), None, "Pingora no longer keeps the body");
        sent.keep(Some(&Bytes::from_static(b"?")), true);
        assert_eq!(sent.replay(), None, "and that stays so");

        let mut large = Sent::default();
        large.keep(Some(&Bytes::from(vec![0; LIMIT])), true);
        assert_eq!(large.replay().map(|b| b.len()), Some(LIMIT));
        large.keep(Some(&Bytes::from_static(b"x")), true);
        assert_eq!(large.replay(), None, "more than is kept");
    }
}
