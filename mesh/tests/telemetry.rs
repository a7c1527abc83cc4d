//! Istio's traffic labels for the callers a proxy meets: known by address, or known only by
//! the identity mTLS proved and the baggage their ztunnel sent.

mod support;

use hbone::Identity;
use hbone::headers::Baggage;
use mesh::telemetry::{Peer, Traffic};
use support::{BOOKINFO, snapshot};

fn identity(ns: &str, sa: &str) -> Identity {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
        .parse()
        .expect("identity")
}

fn baggage() -> Baggage {
    Baggage::parse(
        "k8s.cluster.name=east,k8s.namespace.name=lie,k8s.deployment.name=ratings,\
         service.name=ratings-svc,service.version=v2",
    )
}

#[test]
fn an_unknown_caller_is_named_by_its_identity_and_baggage() {
    let ratings = identity("bookinfo", "ratings");
    let principal = ratings.to_string();
    let peer = Peer::caller(None, &ratings, &principal, Some(&baggage()), "west");
    assert_eq!(peer.workload, "ratings");
    assert_eq!(
        (&*peer.canonical_service, &*peer.app),
        ("ratings-svc", "ratings-svc")
    );
    assert_eq!((&*peer.canonical_revision, &*peer.version), ("v2", "v2"));
    assert_eq!(peer.cluster, "east");
    // Namespace and principal are what mTLS proved, whatever the baggage says.
    assert_eq!(peer.workload_namespace, "bookinfo");
    assert_eq!(
        peer.principal,
        "spiffe://cluster.local/ns/bookinfo/sa/ratings"
    );

    let bare = Peer::caller(None, &ratings, &principal, None, "west");
    assert_eq!(
        (&*bare.workload, &*bare.workload_namespace, &*bare.cluster),
        ("unknown", "bookinfo", "unknown")
    );
}

#[test]
fn a_caller_known_by_address_is_named_by_the_configuration_whatever_its_baggage() {
    let s = snapshot(BOOKINFO);
    let cluster = &s.options().cluster_id;
    let reviews = s
        .workload_by_ip("", "10.0.1.2".parse().expect("ip"))
        .expect("reviews");
    let principal = reviews.identity.to_string();
    let peer = Peer::caller(
        Some(reviews),
        &reviews.identity,
        &principal,
        Some(&baggage()),
        cluster,
    );
    assert_eq!(peer, Peer::new(Some(reviews), cluster));
    assert_eq!(peer.workload, "reviews-v1");
    assert_eq!(peer.cluster, &**cluster);

    let service = s.services().iter().find(|svc| &*svc.name == "reviews");
    let traffic = Traffic::new(Peer::new(None, cluster), service, peer);
    assert_eq!(traffic.source.principal, "unknown");
    assert_eq!(
        traffic.service.hostname,
        "reviews.bookinfo.svc.cluster.local"
    );
    assert_eq!(traffic.service.name, "reviews");
}
