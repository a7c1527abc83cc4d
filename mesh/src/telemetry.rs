//! Istio's standard traffic labels, built once for both proxies.
//!
//! Every Istio metric about traffic (`istio_requests_total`, `istio_tcp_*`) names its two ends
//! with the same eight labels each (`source_workload` … `source_cluster`, then the destination's)
//! and the destination service with three. ztunnel and the waypoint label their metrics from the
//! same model and the same CONNECT headers, so what each label means is decided here, and each
//! proxy's label set is [`Traffic`] flattened between its own labels (`reporter` first,
//! `request_protocol` … `connection_security_policy` after), which keeps Istio's order.

use std::fmt::{self, Write};

use hbone::Identity;
use hbone::headers::Baggage;
use prometheus_client::encoding::{
    EncodeLabel, EncodeLabelKey, EncodeLabelSet, LabelKeyEncoder, LabelSetEncoder,
};

use crate::model::{Service, Workload};

/// What a label holds when its end is not known.
pub const UNKNOWN: &str = "unknown";

/// Who talked to whom: the labels both ends and the destination service take.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Traffic {
    /// `source_*`.
    pub source: Peer,
    /// `destination_service*`.
    pub service: ServiceLabels,
    /// `destination_*`.
    pub destination: Peer,
}

impl Traffic {
    /// Traffic from `source` to `destination`, addressed to `service` when the caller named one.
    pub fn new(source: Peer, service: Option<&Service>, destination: Peer) -> Self {
        Self {
            source,
            service: ServiceLabels::new(service),
            destination,
        }
    }
}

impl EncodeLabelSet for Traffic {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        self.source.encode("source", encoder)?;
        self.service.encode(encoder)?;
        self.destination.encode("destination", encoder)
    }
}

/// One end of the traffic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The controller's name (a Deployment's, say), not the pod's.
    pub workload: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub workload_namespace: String,
    /// The SPIFFE identity, `spiffe://` included, as Istio's metrics show it.
    pub principal: String,
    /// Istio fills `*_app` and `*_version` from the canonical service and revision.
    pub app: String,
    pub version: String,
    pub cluster: String,
}

impl Peer {
    /// A workload of this cluster (`cluster`), or `unknown` throughout.
    pub fn new(workload: Option<&Workload>, cluster: &str) -> Self {
        let principal = workload.map_or(UNKNOWN.to_owned(), |w| w.identity.to_string());
        Self::with_principal(workload, cluster, principal)
    }

    fn with_principal(workload: Option<&Workload>, cluster: &str, principal: String) -> Self {
        let text = |s: Option<&str>| s.unwrap_or(UNKNOWN).to_owned();
        Self {
            workload: text(workload.map(|w| &*w.workload_name)),
            canonical_service: text(workload.map(|w| &*w.canonical_name)),
            canonical_revision: text(workload.map(|w| &*w.canonical_revision)),
            workload_namespace: text(workload.map(|w| &*w.namespace)),
            principal,
            app: text(workload.map(|w| &*w.canonical_name)),
            version: text(workload.map(|w| &*w.canonical_revision)),
            cluster: text(workload.map(|_| cluster)),
        }
    }

    /// A caller that mTLS proved to be `proven`, as upstream ztunnel labels it: the workload its
    /// address names when the configuration knows one (`known`); otherwise its namespace from
    /// the identity and the rest from the `baggage` its ztunnel sent (a peer behind a gateway, in
    /// another cluster, or dialling from an address that is not its workload's). Baggage is the
    /// caller's own word, so it never overrides a known workload and is used for telemetry only.
    /// The principal is always the proven identity, `principal` (as the caller already holds it
    /// in text).
    pub fn caller(
        known: Option<&Workload>,
        proven: &Identity,
        principal: &str,
        baggage: Option<&Baggage>,
        cluster: &str,
    ) -> Self {
        let mut peer = Self::with_principal(known, cluster, principal.to_owned());
        if known.is_some() {
            return peer;
        }
        proven.namespace().clone_into(&mut peer.workload_namespace);
        let Some(b) = baggage else {
            return peer;
        };
        let set = |label: &mut String, value: Option<&String>| {
            if let Some(v) = value {
                v.clone_into(label);
            }
        };
        set(
            &mut peer.workload,
            b.workload.as_ref().map(|(_, name)| name),
        );
        set(&mut peer.canonical_service, b.service_name.as_ref());
        set(&mut peer.app, b.service_name.as_ref());
        set(&mut peer.canonical_revision, b.service_version.as_ref());
        set(&mut peer.version, b.service_version.as_ref());
        set(&mut peer.cluster, b.cluster.as_ref());
        peer
    }

    /// Writes the labels as `side_workload`, `side_canonical_service` and so on, for label sets
    /// that carry one end of the traffic among labels of their own.
    pub fn encode(&self, side: &'static str, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        for (name, value) in [
            ("workload", &self.workload),
            ("canonical_service", &self.canonical_service),
            ("canonical_revision", &self.canonical_revision),
            ("workload_namespace", &self.workload_namespace),
            ("principal", &self.principal),
            ("app", &self.app),
            ("version", &self.version),
            ("cluster", &self.cluster),
        ] {
            (Key(side, name), value.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// The destination service: its hostname, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceLabels {
    pub hostname: String,
    pub namespace: String,
    pub name: String,
}

impl ServiceLabels {
    /// `service`'s labels, or `unknown` throughout when the caller addressed none.
    pub fn new(service: Option<&Service>) -> Self {
        let text = |s: Option<&str>| s.unwrap_or(UNKNOWN).to_owned();
        Self {
            hostname: text(service.map(|s| &*s.hostname)),
            namespace: text(service.map(|s| &*s.namespace)),
            name: text(service.map(|s| &*s.name)),
        }
    }

    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        for (name, value) in [
            ("destination_service", &self.hostname),
            ("destination_service_namespace", &self.namespace),
            ("destination_service_name", &self.name),
        ] {
            (name, value.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// A label name written as `<side>_<name>`, with no string built for it.
struct Key(&'static str, &'static str);

impl EncodeLabelKey for Key {
    fn encode(&self, encoder: &mut LabelKeyEncoder<'_>) -> fmt::Result {
        encoder.write_str(self.0)?;
        encoder.write_char('_')?;
        encoder.write_str(self.1)
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::registry::Registry;

    use super::*;

    fn rendered(traffic: &Traffic) -> String {
        let family = Family::<Traffic, Counter>::default();
        family.get_or_create(traffic).inc();
        let mut registry = Registry::default();
        registry.register("t", "t", family);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        text.lines()
            .find(|l| l.starts_with("t_total{"))
            .expect("sample")
            .to_owned()
    }

    #[test]
    fn labels_render_in_istio_order_with_unknown_ends() {
        let line = rendered(&Traffic::new(
            Peer::new(None, "c"),
            None,
            Peer::new(None, "c"),
        ));
        let names: Vec<&str> = line["t_total{".len()..]
            .split(',')
            .map(|kv| kv.split('=').next().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "source_workload",
                "source_canonical_service",
                "source_canonical_revision",
                "source_workload_namespace",
                "source_principal",
                "source_app",
                "source_version",
                "source_cluster",
                "destination_service",
                "destination_service_namespace",
                "destination_service_name",
                "destination_workload",
                "destination_canonical_service",
                "destination_canonical_revision",
                "destination_workload_namespace",
                "destination_principal",
                "destination_app",
                "destination_version",
                "destination_cluster",
            ]
        );
        assert_eq!(line.matches("\"unknown\"").count(), 19, "{line}");
    }
}
