//! The HTTP(S) client: one HTTP/1.1 connection per GET, redirects, time and size limits, TLS.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{self, HeaderMap};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{FetchError, FetchOptions, invalid};

/// How much of a non-2xx answer is kept, to explain it.
const MAX_ERROR_BODY: u64 = 16 << 10;
const USER_AGENT: &str = concat!("mesh-plugins/", env!("CARGO_PKG_VERSION"));

/// An absolute `http` or `https` URL with a host and no credentials.
pub(super) fn parse_http(url: &str) -> Result<Uri, FetchError> {
    let uri: Uri = url.parse().map_err(|e| invalid(url, format!("{e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(invalid(url, "only http and https are fetched")),
    }
    let Some(authority) = uri.authority() else {
        return Err(invalid(url, "no host"));
    };
    if authority.as_str().contains('@') {
        return Err(invalid(url, "credentials in URLs are not supported"));
    }
    if authority.host().is_empty() {
        return Err(invalid(url, "no host"));
    }
    Ok(uri)
}

/// Where a redirect's `Location` points, relative to the URL that answered.
fn resolve(base: &Uri, location: &str) -> Result<Uri, FetchError> {
    let location = location.trim();
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base.authority().map_or("", |a| a.as_str());
    let absolute = match location.split_once("://") {
        Some((s, _))
            if !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')) =>
        {
            location.to_owned()
        }
        _ if location.starts_with("//") => format!("{scheme}:{location}"),
        _ if location.starts_with('/') => format!("{scheme}://{authority}{location}"),
        _ => {
            let path = base.path();
            let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
            let dir = if dir.is_empty() { "/" } else { dir };
            format!("{scheme}://{authority}{dir}{location}")
        }
    };
    parse_http(&absolute)
}

/// Scheme, host and port: the origin credentials are scoped to.
fn origin(uri: &Uri) -> (Option<&str>, Option<&str>, Option<u16>) {
    (uri.scheme_str(), uri.host(), uri.port_u16())
}

/// An HTTP answer, its body read.
#[derive(Debug)]
pub(super) struct Reply {
    /// The URL that answered.
    url: Uri,
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Vec<u8>,
}

impl Reply {
    /// The body, shortened to explain an error: a registry's error code and message when it
    /// sent the standard JSON, else the start of the text.
    pub(super) fn detail(&self) -> String {
        #[derive(Deserialize)]
        struct Errors {
            errors: Vec<RegistryError>,
        }
        #[derive(Deserialize)]
        struct RegistryError {
            #[serde(default)]
            code: String,
            #[serde(default)]
            message: String,
        }
        if let Ok(e) = serde_json::from_slice::<Errors>(&self.body)
            && !e.errors.is_empty()
        {
            return e
                .errors
                .iter()
                .map(|e| format!("{} {}", e.code, e.message).trim().to_owned())
                .collect::<Vec<_>>()
                .join("; ");
        }
        let text = String::from_utf8_lossy(&self.body);
        let text: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(200)
            .collect();
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    pub(super) fn http_error(&self) -> FetchError {
        FetchError::Http {
            url: self.url.to_string(),
            status: self.status.as_u16(),
            detail: self.detail(),
        }
    }
}

/// Aborts the connection task when the exchange ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type TlsResult = Result<Arc<ClientConfig>, String>;

/// The TLS client configuration: Mozilla's roots plus `extra`.
fn tls_config(extra: &[CertificateDer<'static>]) -> TlsResult {
    fn build(extra: &[CertificateDer<'static>]) -> TlsResult {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for cert in extra {
            roots
                .add(cert.clone())
                .map_err(|e| format!("extra root certificate: {e}"))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
    static DEFAULT: OnceLock<TlsResult> = OnceLock::new();
    if extra.is_empty() {
        DEFAULT.get_or_init(|| build(&[])).clone()
    } else {
        build(extra)
    }
}

/// One fetch's HTTP client: a connection per exchange (fetches are rare).
#[derive(Debug)]
pub(super) struct Client<'o> {
    pub(super) options: &'o FetchOptions,
}

impl Client<'_> {
    /// A GET, following redirects; the final answer whatever its status. A 2xx body longer
    /// than `limit` is an error; other bodies are cut to a few KiB.
    pub(super) async fn get(
        &self,
        uri: Uri,
        mut headers: HeaderMap,
        limit: u64,
    ) -> Result<Reply, FetchError> {
        let first = uri.to_string();
        let mut uri = uri;
        for _ in 0..=self.options.max_redirects {
            let reply = self.exchange(&uri, &headers, limit).await?;
            let redirect = matches!(reply.status.as_u16(), 301 | 302 | 303 | 307 | 308);
            let location = reply
                .headers
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok());
            let (true, Some(location)) = (redirect, location) else {
                return Ok(reply);
            };
            let next = resolve(&uri, location)?;
            tracing::debug!(from = %uri, to = %next, "following redirect");
            if origin(&next) != origin(&uri) {
                // Blob downloads are redirected to storage that must not see the token.
                headers.remove(header::AUTHORIZATION);
            }
            uri = next;
        }
        Err(FetchError::TooManyRedirects {
            url: first,
            max: self.options.max_redirects,
        })
    }

    /// One request and its answer, within the time limit.
    async fn exchange(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        limit: u64,
    ) -> Result<Reply, FetchError> {
        let after = self.options.timeout;
        match tokio::time::timeout(after, self.exchange_untimed(uri, headers, limit)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout {
                url: uri.to_string(),
                after,
            }),
        }
    }

    async fn exchange_untimed(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        limit: u64,
    ) -> Result<Reply, FetchError> {
        let url = uri.to_string();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(FetchError::Unsupported(url)),
        };
        let Some(authority) = uri.authority() else {
            return Err(invalid(&url, "no host"));
        };
        let host = authority.host();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });

        let mut request = Request::builder()
            .method(Method::GET)
            .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::HOST, authority.as_str())
            .header(header::USER_AGENT, USER_AGENT)
            .body(Empty::<Bytes>::new())
            .map_err(|e| invalid(&url, e.to_string()))?;
        for (name, value) in headers {
            request.headers_mut().append(name, value.clone());
        }

        let tcp = TcpStream::connect((bare, port))
            .await
            .map_err(|source| FetchError::Connect {
                url: url.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        if https {
            let config = tls_config(&self.options.extra_roots).map_err(|why| FetchError::Tls {
                url: url.clone(),
                source: std::io::Error::other(why),
            })?;
            let name = ServerName::try_from(bare.to_owned())
                .map_err(|e| invalid(&url, format!("TLS server name {bare:?}: {e}")))?;
            let tls = TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|source| FetchError::Tls {
                    url: url.clone(),
                    source,
                })?;
            send(tls, request, uri, limit).await
        } else {
            send(tcp, request, uri, limit).await
        }
    }
}

/// Sends `request` over `io` (HTTP/1.1) and reads the answer.
async fn send<T>(
    io: T,
    request: Request<Empty<Bytes>>,
    uri: &Uri,
    limit: u64,
) -> Result<Reply, FetchError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let transport = |e: hyper::Error| FetchError::Transport {
        url: uri.to_string(),
        source: Box::new(e),
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(transport)?;
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let response = sender.send_request(request).await.map_err(transport)?;
    let (parts, mut body) = response.into_parts();
    let success = parts.status.is_success();
    let limit = if success { limit } else { MAX_ERROR_BODY };
    let too_large = || FetchError::TooLarge {
        url: uri.to_string(),
        limit,
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if success && declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let capacity = declared.unwrap_or(0).min(limit).min(16 << 20);
    let mut buf = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(transport)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let room = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .saturating_sub(buf.len());
        if data.len() > room {
            if success {
                return Err(too_large());
            }
            buf.extend_from_slice(&data[..room]);
            break;
        }
        buf.extend_from_slice(&data);
    }
    Ok(Reply {
        url: uri.clone(),
        status: parts.status,
        headers: parts.headers,
        body: buf,
    })
}
