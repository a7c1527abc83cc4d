//! SPIFFE workload identities as Istio uses them: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
//!
//! Identities travel in certificate URI SANs; policies name them as *principals*, which are the
//! same string without the `spiffe://` prefix (`cluster.local/ns/default/sa/reviews`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

const SCHEME: &str = "spiffe://";

/// A workload identity. Cheap to clone: the three parts share one allocation.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    inner: Arc<Parts>,
}

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    trust_domain: Box<str>,
    namespace: Box<str>,
    service_account: Box<str>,
}

/// Why a string is not a SPIFFE identity of the form Istio issues.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The string does not start with `spiffe://`.
    #[error("identity {0:?} does not start with \"spiffe://\"")]
    Scheme(String),
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error(
        "identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Shape(String),
    /// A segment is empty or holds characters SPIFFE does not allow.
    #[error("identity {id:?} has an invalid {part}: {value:?}")]
    Segment {
        /// The whole identity.
        id: String,
        /// Which part is wrong (trust domain, namespace, service account).
        part: &'static str,
        /// The offending value.
        value: String,
    },
}

impl Identity {
    /// Builds an identity from its parts, validating each of them.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let id = || format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        check_trust_domain(trust_domain).map_err(|()| IdentityError::Segment {
            id: id(),
            part: "trust domain",
            value: trust_domain.to_owned(),
        })?;
        for (part, value) in [
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            check_path_segment(value).map_err(|()| IdentityError::Segment {
                id: id(),
                part,
                value: value.to_owned(),
            })?;
        }
        Ok(Identity {
            inner: Arc::new(Parts {
                trust_domain: trust_domain.into(),
                namespace: namespace.into(),
                service_account: service_account.into(),
            }),
        })
    }

    /// Parses a principal as written in AuthorizationPolicy (`td/ns/x/sa/y`, no scheme).
    pub fn from_principal(principal: &str) -> Result<Self, IdentityError> {
        format!("{SCHEME}{principal}").parse()
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.inner.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.inner.service_account
    }

    /// The identity as policies name it: without the `spiffe://` prefix.
    pub fn principal(&self) -> String {
        let Parts {
            trust_domain,
            namespace,
            service_account,
        } = &*self.inner;
        format!("{trust_domain}/ns/{namespace}/sa/{service_account}")
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::Scheme(s.to_owned()))?;
        let mut parts = rest.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => {
                Identity::new(td, ns, sa)
            }
            _ => Err(IdentityError::Shape(s.to_owned())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Parts {
            trust_domain,
            namespace,
            service_account,
        } = &*self.inner;
        write!(
            f,
            "{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
        )
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// SPIFFE trust domains are lowercase letters, digits, `.`, `-` and `_`.
fn check_trust_domain(td: &str) -> Result<(), ()> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok { Ok(()) } else { Err(()) }
}

/// SPIFFE path segments: letters, digits, `.`, `-`, `_`; not empty, not `.` or `..`.
fn check_path_segment(seg: &str) -> Result<(), ()> {
    let ok = !seg.is_empty()
        && seg != "."
        && seg != ".."
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok { Ok(()) } else { Err(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let s = "spiffe://cluster.local/ns/default/sa/reviews";
        let id: Identity = s.parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "reviews");
        assert_eq!(id.to_string(), s);
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/reviews");
        assert_eq!(Identity::from_principal(&id.principal()).unwrap(), id);
        assert_eq!(
            Identity::new("cluster.local", "default", "reviews").unwrap(),
            id
        );
    }

    #[test]
    fn compares_by_value() {
        let a: Identity = "spiffe://td/ns/a/sa/x".parse().unwrap();
        let b: Identity = "spiffe://td/ns/a/sa/x".parse().unwrap();
        let c: Identity = "spiffe://td/ns/a/sa/y".parse().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a < c);
    }

    #[test]
    fn rejects_malformed() {
        let cases = [
            ("", "scheme"),
            ("http://cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe://cluster.local", "shape"),
            ("spiffe://cluster.local/ns/a", "shape"),
            ("spiffe://cluster.local/ns/a/sa", "shape"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "shape"),
            ("spiffe://cluster.local/sa/a/ns/b", "shape"),
            ("spiffe://cluster.local/ns//sa/b", "segment"),
            ("spiffe://cluster.local/ns/a/sa/", "segment"),
            ("spiffe:///ns/a/sa/b", "segment"),
            ("spiffe://Cluster.Local/ns/a/sa/b", "segment"),
            ("spiffe://cluster.local/ns/a b/sa/b", "segment"),
            ("spiffe://cluster.local/ns/../sa/b", "segment"),
        ];
        for (input, kind) in cases {
            let err = input.parse::<Identity>().unwrap_err();
            let got = match err {
                IdentityError::Scheme(_) => "scheme",
                IdentityError::Shape(_) => "shape",
                IdentityError::Segment { .. } => "segment",
            };
            assert_eq!(got, kind, "{input:?}: {err}");
        }
    }
}
