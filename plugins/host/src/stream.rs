//! One request's passage through one plugin: the stream context's callbacks, as the embedder
//! calls them from its request lifecycle.
//!
//! Headers and bodies are lent to the instance for the duration of a callback and handed back;
//! a callback that pauses keeps them until the plugin continues (or answers), so a later
//! callback, such as an HTTP call's answer, can still change them.

use std::sync::Arc;

use bytes::Bytes;

use crate::Headers;
use crate::error::Failure;
use crate::vm::{Instance, Map, Outcome, Resume, Step};

/// A response the plugin produced instead of the upstream's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers the plugin added.
    pub headers: Headers,
    /// Body.
    pub body: Bytes,
    /// Why, as the plugin said (Envoy's response code details).
    pub details: String,
    /// The plugin closed the stream (`proxy_close_stream`): reset it rather than answer.
    pub reset: bool,
}

impl LocalResponse {
    pub(crate) fn reset() -> Self {
        LocalResponse {
            status: 503,
            headers: Headers::new(),
            body: Bytes::new(),
            details: "closed_by_plugin".into(),
            reset: true,
        }
    }

    /// The body a plugin buffered grew past its limit: 413 for a request (Envoy's answer),
    /// 500 for a response that already started upstream.
    pub(crate) fn too_large(response: bool) -> Self {
        let (status, details) = if response {
            (500, "response_payload_too_large")
        } else {
            (413, "request_payload_too_large")
        };
        LocalResponse {
            status,
            headers: Headers::new(),
            body: Bytes::from_static(b"payload too large for the plugin's buffer\n"),
            details: details.into(),
            reset: false,
        }
    }
}

/// What a callback decided.
#[derive(Debug)]
pub enum Verdict {
    /// Go on to the next plugin and on to the upstream.
    Continue,
    /// Answer with this instead.
    Local(LocalResponse),
    /// The plugin failed; the embedder applies its fail strategy.
    Failed(Failure),
}

/// A request's stream context in one instance of one plugin. Dropping it ends the context
/// (`on_done`, `on_log`, `on_delete`).
#[derive(Debug)]
pub struct Stream {
    instance: Arc<Instance>,
    ctx: u32,
}

impl Stream {
    pub(crate) fn new(instance: Arc<Instance>, ctx: u32) -> Self {
        Stream { instance, ctx }
    }

    /// `proxy_on_request_headers`. May wait while the plugin pauses.
    pub async fn request_headers(&mut self, headers: &mut Headers, end_of_stream: bool) -> Verdict {
        self.headers(headers, end_of_stream, Map::RequestHeaders)
            .await
    }

    /// `proxy_on_request_trailers`: the request's trailers, at its end (Envoy calls it only for
    /// a request that has trailers). May wait while the plugin pauses.
    pub async fn request_trailers(&mut self, trailers: &mut Headers) -> Verdict {
        self.headers(trailers, true, Map::RequestTrailers).await
    }

    /// `proxy_on_response_headers`. May wait while the plugin pauses.
    pub async fn response_headers(
        &mut self,
        headers: &mut Headers,
        end_of_stream: bool,
    ) -> Verdict {
        self.headers(headers, end_of_stream, Map::ResponseHeaders)
            .await
    }

    /// `proxy_on_response_trailers`: the response's trailers, at its end. May wait while the
    /// plugin pauses.
    pub async fn response_trailers(&mut self, trailers: &mut Headers) -> Verdict {
        self.headers(trailers, true, Map::ResponseTrailers).await
    }

    async fn headers(&mut self, headers: &mut Headers, eos: bool, which: Map) -> Verdict {
        let lent = std::mem::take(headers);
        let result = self.instance.headers(self.ctx, which, lent, eos);
        let Outcome { step, back, waiter } = match result {
            Ok(r) => r,
            Err(failure) => {
                self.restore_headers(headers, which);
                return Verdict::Failed(failure);
            }
        };
        if let Some(back) = back {
            *headers = back;
        }
        match (step, waiter) {
            (Step::Continue, _) => Verdict::Continue,
            (Step::Local(r), _) => Verdict::Local(r),
            (Step::Pause, Some(waiter)) => {
                let resume = waiter.await;
                self.restore_headers(headers, which);
                resumed(resume)
            }
            (Step::Pause, None) => Verdict::Continue,
        }
    }

    fn restore_headers(&self, headers: &mut Headers, which: Map) {
        if let Some(h) = self.instance.take_headers(self.ctx, which) {
            *headers = h;
        }
    }

    /// `proxy_on_request_body` for one chunk. While the plugin pauses before the end of the
    /// stream, chunks are buffered and `body` comes back `None`; when it continues, `body` holds
    /// everything buffered. At the end of the stream a pause waits for the plugin.
    pub async fn request_body(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) -> Verdict {
        self.body(false, body, end_of_stream).await
    }

    /// `proxy_on_response_body` for one chunk, as [`Self::request_body`]. The future is ready at
    /// once unless the plugin paused at the end of the stream to wait for an event (an HTTP
    /// call's answer, a queue), so an embedder whose response hook is synchronous can poll it
    /// once and only block when it must; one that cannot block drops it and takes the buffered
    /// body with [`Self::take_response_body`].
    pub async fn response_body(
        &mut self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> Verdict {
        self.body(true, body, end_of_stream).await
    }

    /// The response body the plugin buffered, for an embedder that gave up waiting on a pause.
    pub fn take_response_body(&mut self) -> Option<Bytes> {
        self.instance.take_body(self.ctx, true).map(Bytes::from)
    }

    async fn body(&mut self, response: bool, body: &mut Option<Bytes>, eos: bool) -> Verdict {
        let had_chunk = body.is_some();
        let chunk = body.take().unwrap_or_default();
        match self.instance.body(self.ctx, response, &chunk, eos) {
            Err(failure) => {
                *body = self
                    .instance
                    .take_body(self.ctx, response)
                    .map(Bytes::from)
                    .or(Some(chunk));
                Verdict::Failed(failure)
            }
            Ok(Outcome {
                waiter: Some(waiter),
                ..
            }) => {
                let resume = waiter.await;
                *body = self.instance.take_body(self.ctx, response).map(Bytes::from);
                resumed(resume)
            }
            Ok(Outcome {
                step,
                back: buffered,
                ..
            }) => {
                *body = released(buffered, had_chunk);
                step_verdict(step)
            }
        }
    }
}

/// What a body callback hands on: the buffer it released, but no empty chunk where the call
/// brought none (a bare end of stream stays bare).
fn released(buffered: Option<Vec<u8>>, had_chunk: bool) -> Option<Bytes> {
    buffered
        .filter(|b| had_chunk || !b.is_empty())
        .map(Bytes::from)
}

fn step_verdict(step: Step) -> Verdict {
    match step {
        Step::Local(r) => Verdict::Local(r),
        Step::Continue | Step::Pause => Verdict::Continue,
    }
}

fn resumed(resume: Result<Resume, tokio::sync::oneshot::error::RecvError>) -> Verdict {
    match resume {
        Ok(Resume::Continue) => Verdict::Continue,
        Ok(Resume::Local(r)) => Verdict::Local(r),
        Ok(Resume::Failed(f)) => Verdict::Failed(f),
        Err(_) => Verdict::Failed(Failure::Trapped("the paused stream was abandoned".into())),
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.instance.finish_stream(self.ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_end_of_stream_stays_bare() {
        assert_eq!(released(Some(Vec::new()), false), None);
        assert_eq!(released(Some(Vec::new()), true), Some(Bytes::new()));
        assert_eq!(
            released(Some(b"held".to_vec()), false).as_deref(),
            Some(&b"held"[..])
        );
        assert_eq!(released(None, true), None);
    }
}
