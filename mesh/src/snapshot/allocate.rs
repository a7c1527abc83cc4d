//! Addresses for ServiceEntry hosts that declare none, as istiod's IP auto-allocation gives them.
//!
//! A pod that dials `api.example.com` needs an address that names that host and no other:
//! its real addresses are shared with every other name behind the same load balancer, and TCP
//! carries no hostname. So each eligible host gets one address from `240.240.0.0/16` (reserved,
//! never routed) and one from `2001:2::/48` (benchmarking, RFC 5180); the DNS proxy answers
//! with them and ztunnel and the waypoint route them as the host's VIPs.
//!
//! istiod writes its allocation into `status.addresses` and keeps it there. A configuration
//! directory has no such store, and every proxy builds its own snapshot from it, so here an
//! address is a pure function of the configuration: the slot a hash of namespace, name and host
//! picks, or the next free one after it, taken in the order of those keys. Every proxy reading
//! the same files agrees; a host keeps its address unless another host's hash lands on the same
//! slot and sorts before it. Addresses already in `status.addresses` (a configuration exported
//! from a cluster) are kept as they are.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::Service;

/// The label by which a ServiceEntry opts out (`"false"`).
pub(super) const OPT_OUT: &str = "networking.istio.io/enable-autoallocate-ip";

/// Slots: 256 values of the third octet times 254 of the fourth (none ending in 0 or 255, which
/// some stacks still treat as network or broadcast addresses).
const SLOTS: u32 = 256 * 254;

/// Gives every service marked `wanted` a free IPv4 and IPv6 address, in the slice's (sorted)
/// order. Addresses any service already has are never handed out. Returns the hostnames left
/// without addresses, once every slot is taken.
pub(super) fn assign(services: &mut [(Service, bool)]) -> Vec<String> {
    let mut taken: HashSet<IpAddr> = (services.iter())
        .flat_map(|(s, _)| s.vips.iter().copied())
        .collect();
    let mut exhausted = Vec::new();
    for (service, _) in services.iter_mut().filter(|(_, wanted)| *wanted) {
        let start = slot_of(&service.namespace, &service.name, &service.hostname);
        let free = (0..SLOTS)
            .map(|i| (start + i) % SLOTS)
            .map(addresses)
            .find(|pair| pair.iter().all(|ip| !taken.contains(ip)));
        match free {
            Some(pair) => {
                taken.extend(pair);
                service.vips = pair.into();
            }
            None => exhausted.push(service.hostname.to_string()),
        }
    }
    exhausted
}

/// The slot a host hashes to: FNV-1a, whose output is fixed by its definition, so every build
/// of every proxy computes the same one.
fn slot_of(namespace: &str, name: &str, host: &str) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let key = [namespace, "/", name, "/", host];
    let hash = (key.iter().flat_map(|part| part.bytes())).fold(OFFSET, |h, b| {
        (h ^ u64::from(b.to_ascii_lowercase())).wrapping_mul(PRIME)
    });
    (hash % u64::from(SLOTS)) as u32
}

/// A slot's addresses: `240.240.x.y` and `2001:2::x:y`, the same two numbers in both.
fn addresses(slot: u32) -> [IpAddr; 2] {
    let (x, y) = ((slot / 254) as u8, (slot % 254 + 1) as u8);
    [
        IpAddr::V4(Ipv4Addr::new(240, 240, x, y)),
        IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, x.into(), y.into())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cover_the_ranges_without_network_or_broadcast_addresses() {
        assert_eq!(
            addresses(0),
            [ip("240.240.0.1"), ip("2001:2::1")],
            "the first slot"
        );
        assert_eq!(addresses(253), [ip("240.240.0.254"), ip("2001:2::fe")]);
        assert_eq!(addresses(254), [ip("240.240.1.1"), ip("2001:2::1:1")]);
        assert_eq!(
            addresses(SLOTS - 1),
            [ip("240.240.255.254"), ip("2001:2::ff:fe")]
        );
    }

    #[test]
    fn the_slot_is_fixed_by_the_key_and_ignores_case() {
        // FNV-1a of "ns/se/api.example.com", reduced: every proxy, of every version, must
        // compute the same, or their DNS answers and routes disagree.
        let slot = slot_of("ns", "se", "api.example.com");
        assert_eq!(slot, 58_199);
        assert_eq!(addresses(slot)[0], ip("240.240.229.34"));
        assert_eq!(slot, slot_of("ns", "se", "API.Example.com"));
        assert_ne!(slot, slot_of("ns", "se", "api.example.org"));
        assert_ne!(slot, slot_of("other", "se", "api.example.com"));
        assert!(slot < SLOTS);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
}
