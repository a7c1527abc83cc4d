//! Table-driven tests of the authorization engine. Policies are written as YAML, the way users
//! write them, and every case asserts a real outcome.

mod conditions;
mod decision;
mod dump;
mod lowering;
mod operation;
mod source;
mod validation;

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};

use super::{Attributes, AuthorizationPolicySpec, HttpAttributes, Policy};
use crate::FieldError;

/// The namespace every test policy lives in.
const POLICY_NAMESPACE: &str = "app";

fn spec(yaml: &str) -> AuthorizationPolicySpec {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
}

/// Compiles a policy named `name` that must be valid.
fn named(name: &str, yaml: &str) -> Policy {
    Policy::compile(POLICY_NAMESPACE, name, &spec(yaml), false)
        .unwrap_or_else(|e| panic!("{yaml}: {e:?}"))
}

fn policy(yaml: &str) -> Policy {
    named("test", yaml)
}

fn dry_run(name: &str, yaml: &str) -> Policy {
    Policy::compile(POLICY_NAMESPACE, name, &spec(yaml), true)
        .unwrap_or_else(|e| panic!("{yaml}: {e:?}"))
}

/// The problems of a policy that must be invalid.
fn errors(yaml: &str) -> Vec<FieldError> {
    match Policy::compile(POLICY_NAMESPACE, "bad", &spec(yaml), false) {
        Ok(_) => panic!("{yaml}: should be invalid"),
        Err(errors) => errors,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// An owned connection or request that lends out [`Attributes`].
struct Request {
    identity: Option<hbone::Identity>,
    source_ip: IpAddr,
    remote_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u16,
    sni: Option<&'static str>,
    http: Option<Http>,
}

struct Http {
    method: &'static str,
    path: &'static str,
    host: &'static str,
    headers: HeaderMap,
}

impl Request {
    /// `GET /api/v1/items?limit=1` to `App.Example.COM` from `client-ns/client-sa` over mTLS,
    /// 10.0.0.1 → 10.0.0.2:8080, original client 192.168.1.1, with `x-token: secret`.
    fn http() -> Self {
        let mut headers = HeaderMap::new();
        headers.insert("x-token", HeaderValue::from_static("secret"));
        Request {
            http: Some(Http {
                method: "GET",
                path: "/api/v1/items?limit=1",
                host: "App.Example.COM",
                headers,
            }),
            remote_ip: ip("192.168.1.1"),
            ..Request::tcp()
        }
    }

    /// The same connection at L4: no HTTP, the remote IP is the peer's.
    fn tcp() -> Self {
        Request {
            identity: Some(identity("client-ns", "client-sa")),
            source_ip: ip("10.0.0.1"),
            remote_ip: ip("10.0.0.1"),
            destination_ip: ip("10.0.0.2"),
            destination_port: 8080,
            sni: Some("app.example.com"),
            http: None,
        }
    }

    fn attrs(&self) -> Attributes<'_> {
        Attributes {
            source: self.identity.as_ref(),
            source_ip: self.source_ip,
            remote_ip: self.remote_ip,
            destination_ip: self.destination_ip,
            destination_port: self.destination_port,
            sni: self.sni,
            http: self.http.as_ref().map(|h| HttpAttributes {
                method: h.method,
                path: h.path,
                host: h.host,
                headers: &h.headers,
            }),
        }
    }
}

fn identity(namespace: &str, service_account: &str) -> hbone::Identity {
    hbone::Identity::new("cluster.local", namespace, service_account)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// (what, YAML spliced into a policy template at `$`, change to the default HTTP request,
/// whether the policy matches)
type Case = (&'static str, &'static str, fn(&mut Request), bool);

/// Checks whether the policy `template` (with `$` replaced by each case's YAML) matches.
fn run(template: &str, cases: &[Case]) {
    for (what, yaml, change, want) in cases {
        let yaml = template.replace('$', yaml);
        let mut request = Request::http();
        change(&mut request);
        let got = policy(&yaml).matches(&request.attrs());
        assert_eq!(got, *want, "{what}: {yaml}");
    }
}

fn as_is(_: &mut Request) {}

fn plaintext(r: &mut Request) {
    r.identity = None;
}

fn l4(r: &mut Request) {
    r.http = None;
}
