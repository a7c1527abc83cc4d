//! `when` conditions: the attribute keys Istio accepts, and what each one matches here.
//!
//! | key | matches | layer |
//! |---|---|---|
//! | `source.ip`, `destination.ip` | peer / local address, IP or CIDR | L4 |
//! | `destination.port` | destination (target) port | L4 |
//! | `source.principal`, `source.namespace`, `source.trustDomain` | peer identity parts | L4 |
//! | `source.serviceAccount` | `<ns>/<sa>` of the peer, exactly | L4 |
//! | `remote.ip` | original client (`X-Forwarded-For`) | L7 |
//! | `connection.sni` | TLS server name of the downstream connection | L7 |
//! | `request.headers[<name>]` | any value of the header | L7 |
//! | `request.auth.*` | never present (no JWT authentication here) | L7 |
//! | `experimental.envoy.filters.*[...]` | never present (no Envoy filter metadata here) | L7 |
//!
//! An attribute that is never present fails `values` and passes `notValues`: with no
//! RequestAuthentication, Istio too sees no request principal, so a DENY on
//! `request.auth.principal notValues ["*"]` denies every request rather than none.

use http::HeaderName;

use crate::FieldError;

use super::compile::{set, string};
use super::matcher::{ServiceAccount, parse_ip_block, parse_port};
use super::policy::{Alternative, Check};
use super::spec::ConditionSpec;

const KNOWN_KEYS: &str = "request.headers[<name>], source.ip, remote.ip, source.namespace, \
    source.principal, source.serviceAccount, source.trustDomain, destination.ip, \
    destination.port, connection.sni, request.auth.principal, request.auth.audiences, \
    request.auth.presenter, request.auth.claims[<claim>], \
    experimental.envoy.filters.<filter>[<key>]";

/// Compiles one condition into an alternative holding a single check.
pub(super) fn condition(
    spec: &ConditionSpec,
    policy_namespace: &str,
    errors: &mut Vec<FieldError>,
) -> Alternative {
    if spec.values.is_empty() && spec.not_values.is_empty() {
        errors.push(FieldError::new(
            "values",
            format!("condition {:?} needs values or notValues", spec.key),
        ));
    }
    let values = ("values", spec.values.as_slice());
    let not_values = ("notValues", spec.not_values.as_slice());
    let key = spec.key.as_str();
    let check = match key {
        "source.ip" => set(errors, values, not_values, parse_ip_block).map(Check::SourceIp),
        "remote.ip" => set(errors, values, not_values, parse_ip_block).map(Check::RemoteIp),
        "destination.ip" => {
            set(errors, values, not_values, parse_ip_block).map(Check::DestinationIp)
        }
        "destination.port" => {
            set(errors, values, not_values, parse_port).map(Check::DestinationPort)
        }
        "source.namespace" => set(errors, values, not_values, string).map(Check::Namespace),
        "source.principal" => set(errors, values, not_values, string).map(Check::Principal),
        "source.trustDomain" => set(errors, values, not_values, string).map(Check::TrustDomain),
        "source.serviceAccount" => set(errors, values, not_values, |v| {
            ServiceAccount::parse(v, policy_namespace)
        })
        .map(Check::ServiceAccount),
        "connection.sni" => set(errors, values, not_values, string).map(Check::Sni),
        "request.auth.principal" | "request.auth.audiences" | "request.auth.presenter" => {
            set(errors, values, not_values, string).map(Check::Absent)
        }
        _ if bracketed(key, "request.auth.claims").is_some() => {
            set(errors, values, not_values, string).map(Check::Absent)
        }
        _ if is_filter_metadata(key) => set(errors, values, not_values, string).map(Check::Absent),
        _ => match bracketed(key, "request.headers") {
            Some(name) => match HeaderName::from_bytes(name.as_bytes()) {
                Ok(name) => set(errors, values, not_values, string)
                    .map(|values| Check::Header(name, values)),
                Err(_) => {
                    errors.push(FieldError::new(
                        "key",
                        format!("{name:?} is not a valid HTTP header name"),
                    ));
                    None
                }
            },
            None => {
                errors.push(FieldError::new(
                    "key",
                    format!("unknown condition key {key:?}; expected one of {KNOWN_KEYS}"),
                ));
                None
            }
        },
    };
    Alternative {
        checks: check.into_iter().collect(),
    }
}

/// The `name` of `prefix[name]`, when `key` has that shape with a non-empty name.
fn bracketed<'k>(key: &'k str, prefix: &str) -> Option<&'k str> {
    key.strip_prefix(prefix)?
        .strip_prefix('[')?
        .strip_suffix(']')
        .filter(|name| !name.is_empty())
}

/// `experimental.envoy.filters.<filter>[<key>]`, as Istio validates it.
fn is_filter_metadata(key: &str) -> bool {
    key.strip_prefix("experimental.envoy.filters.")
        .and_then(|rest| rest.split_once('['))
        .is_some_and(|(filter, tail)| !filter.is_empty() && tail.len() > 1 && tail.ends_with(']'))
}
