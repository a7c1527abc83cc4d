//! Test support: the example plugins, built from source once per test process.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;

use plugins::{Headers, Host, NoCalls, NodeInfo, Plugin, PluginConfig, StreamInfo};

/// The bytes of example plugin `name`, built from source.
pub fn example(name: &str) -> Vec<u8> {
    let path = plugins::examples::build(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("example plugin {}: {e}", path.display()))
}

/// Loads example `name` with `config` on a fresh host with no upstreams.
pub fn load(name: &str, config: &str) -> (Host, Plugin) {
    let host = Host::new(NodeInfo::default(), Arc::new(NoCalls)).unwrap();
    let plugin = load_on(&host, &example(name), name, config);
    (host, plugin)
}

/// Loads module `bytes` on `host`.
pub fn load_on(host: &Host, bytes: &[u8], name: &str, config: &str) -> Plugin {
    let module = host.compile(bytes).unwrap();
    let mut cfg = PluginConfig::new(format!("default.{name}"), name, config.as_bytes());
    cfg.instances = 1;
    host.load(&module, cfg).unwrap()
}

/// Facts about a request from a sleep pod to a service.
pub fn info() -> Arc<StreamInfo> {
    let src: SocketAddr = "10.0.0.1:40000".parse().unwrap();
    let dst: SocketAddr = "10.96.0.5:8080".parse().unwrap();
    Arc::new(StreamInfo::new(
        src,
        dst,
        Some("spiffe://cluster.local/ns/default/sa/sleep".into()),
    ))
}

/// A GET request's headers.
pub fn request(path: &str, extra: &[(&str, &str)]) -> Headers {
    let mut h = Headers::new();
    h.push(":method", "GET");
    h.push(":scheme", "http");
    h.push(":path", path);
    h.push(":authority", "reviews:9080");
    for (n, v) in extra {
        h.push(n, *v);
    }
    h
}

/// A 200 response's headers.
pub fn response() -> Headers {
    let mut h = Headers::new();
    h.push(":status", "200");
    h.push("content-type", "text/plain");
    h
}
