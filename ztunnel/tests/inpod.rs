//! In-pod capture against real network namespaces, veth pairs and iptables.
//!
//! Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN), `ip` (iproute2) and the iptables package. Without
//! them the tests fail with a message saying so rather than skip: a capture test that silently
//! does nothing proves nothing.
//!
//! Every namespace is named after this process's pid and the test, and deleted on drop, so
//! parallel tests and parallel runs do not collide.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use prost::Message;
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::time::timeout;
use ztunnel::inpod::zds::proto::{WorkloadInfo, WorkloadResponse, workload_response};
use ztunnel::inpod::{
    IptablesBackend, NetNs, PodRules, WorkloadEvent, ZTUNNEL_MARK, ZdsClient, ZdsError, ZdsServer,
    bind_listener, connect_socket,
};

const WAIT: Duration = Duration::from_secs(5);

// === test fixtures ===

/// A named network namespace (`ip netns add`), with loopback up; deleted on drop.
struct TestNetns {
    ns: NetNs,
    name: String,
    _delete: DeleteNetns,
}

/// Deletes the named namespace on drop; armed right after `ip netns add`, so a test failing
/// while still setting up does not leave it behind.
struct DeleteNetns(String);

impl Drop for DeleteNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .output();
    }
}

impl TestNetns {
    fn new(test: &str) -> Self {
        let name = format!("zt-{}-{test}", std::process::id());
        // A namespace left over from a crashed run with the same pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "delete", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2): {e}"));
        assert!(
            out.status.success(),
            "cannot create network namespace {name}: {}\nthe in-pod tests need root \
             (CAP_SYS_ADMIN, CAP_NET_ADMIN); run them as root, e.g. \
             `sudo -E cargo test -p ztunnel --test inpod`",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let delete = DeleteNetns(name.clone());
        let ns = NetNs::open(PathBuf::from("/run/netns").join(&name))
            .unwrap_or_else(|e| panic!("open netns {name}: {e}"));
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self {
            ns,
            name,
            _delete: delete,
        }
    }
}

/// A veth pair: `host` (198.18.X.1/30) in the test's namespace, the peer (198.18.X.2/30) in the
/// pod's. 198.18.0.0/15 is the benchmarking range: routed nowhere, so nothing real is hit.
struct Veth {
    host_name: String,
    host: Ipv4Addr,
    pod: Ipv4Addr,
}

impl Veth {
    fn new(pod: &TestNetns) -> Self {
        let pid = std::process::id();
        let subnet = u8::try_from(pid % 256).expect("< 256");
        let (host, pod_ip) = (
            Ipv4Addr::new(198, 18, subnet, 1),
            Ipv4Addr::new(198, 18, subnet, 2),
        );
        let host_name = format!("zt{pid}h");
        let pod_name = format!("zt{pid}p");
        let _ = Command::new("ip")
            .args(["link", "delete", &host_name])
            .output();
        ip(&[
            "link", "add", &host_name, "type", "veth", "peer", "name", &pod_name, "netns",
            &pod.name,
        ]);
        let this = Self {
            host_name,
            host,
            pod: pod_ip,
        };
        ip(&["addr", "add", &format!("{host}/30"), "dev", &this.host_name]);
        ip(&["link", "set", &this.host_name, "up"]);
        ip(&[
            "-n",
            &pod.name,
            "addr",
            "add",
            &format!("{pod_ip}/30"),
            "dev",
            &pod_name,
        ]);
        ip(&["-n", &pod.name, "link", "set", &pod_name, "up"]);
        this
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "delete", &self.host_name])
            .output();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command inside the namespace and returns its stdout.
fn output_in(ns: &TestNetns, program: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, program])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn socket_path(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ztunnel-zds-{}-{test}.sock", std::process::id()))
}

// === (a) entering a namespace ===

#[test]
fn run_in_enters_the_namespace_and_leaves_the_caller_alone() {
    let pod = TestNetns::new("enter");
    let host = NetNs::current().expect("host netns");
    assert_ne!(
        pod.ns.inode(),
        host.inode(),
        "a new namespace has its own inode"
    );

    let inside = pod
        .ns
        .run_in(NetNs::current)
        .expect("run_in")
        .expect("netns inside");
    assert_eq!(inside, pod.ns);
    assert_eq!(inside.inode(), pod.ns.inode());

    let after = NetNs::current().expect("host netns");
    assert_eq!(after, host, "the calling thread never changes namespace");

    // The namespace's interfaces are what a thread inside sees: only `lo`.
    let links = pod
        .ns
        .run_in(|| std::fs::read_to_string("/proc/thread-self/net/dev"))
        .expect("run_in")
        .expect("read net/dev");
    let names: Vec<&str> = links
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(names, ["lo"], "{links}");
}

// === (b) listeners live in the pod ===

#[test]
fn listener_is_reachable_only_inside_the_namespace() {
    let pod = TestNetns::new("listen");
    let (listener, addr) = loop {
        let listener = bind_listener(&pod.ns, "127.0.0.1:0".parse().expect("addr"), false)
            .expect("bind in pod");
        let addr = listener.local_addr().expect("addr");
        // The same port must be free on the host, or "refused from the host" would prove nothing.
        if std::net::TcpListener::bind(addr).is_ok() {
            break (listener, addr);
        }
    };
    assert_eq!(SockRef::from(&listener).mark().expect("mark"), ZTUNNEL_MARK);

    let inside = pod
        .ns
        .run_in(|| TcpStream::connect_timeout(&addr, WAIT))
        .expect("run_in");
    let mut inside = inside.expect("connect from inside the pod");
    listener.set_nonblocking(false).expect("blocking");
    let (mut accepted, _) = listener.accept().expect("accept");
    inside.write_all(b"ping").expect("write");
    let mut buf = [0; 4];
    accepted.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"ping");

    let err =
        TcpStream::connect_timeout(&addr, WAIT).expect_err("the pod's loopback is not the host's");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

// === (c) ZDS with a real pod namespace ===

#[tokio::test]
async fn zds_hands_over_the_pod_namespace() {
    let pod = TestNetns::new("zds");
    let server = ZdsServer::bind(socket_path("zds")).expect("bind");
    let path = server.path().to_owned();
    let pod_ns = NetNs::open(PathBuf::from("/run/netns").join(&pod.name)).expect("open");
    let agent = tokio::spawn(async move {
        let mut conn = server.accept().await.expect("accept");
        conn.hello().await.expect("hello");
        let info = WorkloadInfo {
            name: "web-0".into(),
            namespace: "default".into(),
            service_account: "web".into(),
        };
        conn.add("pod-a", Some(info), &pod_ns)
            .await
            .expect("add acked");
        conn.del("pod-a").await.expect("del acked");
        conn.snapshot_sent().await.expect("snapshot acked");
    });

    let mut client = timeout(WAIT, ZdsClient::connect(&path))
        .await
        .expect("in time")
        .expect("connect");
    let event = timeout(WAIT, client.next())
        .await
        .expect("in time")
        .expect("next");
    let Some(WorkloadEvent::Add { uid, info, netns }) = event else {
        panic!("expected an add, got {event:?}");
    };
    assert_eq!(uid, "pod-a");
    assert_eq!(info.map(|i| i.name).as_deref(), Some("web-0"));
    assert_eq!(
        netns.inode(),
        pod.ns.inode(),
        "the fd names the pod's namespace"
    );
    assert_ne!(netns.inode(), NetNs::current().expect("host").inode());

    // The received handle is usable: a listener bound through it is in the pod.
    let listener = bind_listener(&netns, "127.0.0.1:0".parse().expect("addr"), true).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connected = pod
        .ns
        .run_in(|| TcpStream::connect_timeout(&addr, WAIT))
        .expect("run_in");
    connected.expect("connect inside the pod to the listener bound via the received fd");
    client.ack(None).await.expect("ack");

    let event = timeout(WAIT, client.next())
        .await
        .expect("in time")
        .expect("next");
    assert!(
        matches!(&event, Some(WorkloadEvent::Del { uid }) if uid == "pod-a"),
        "{event:?}"
    );
    client.ack(None).await.expect("ack");
    let event = timeout(WAIT, client.next())
        .await
        .expect("in time")
        .expect("next");
    assert!(
        matches!(event, Some(WorkloadEvent::SnapshotSent)),
        "{event:?}"
    );
    client.ack(None).await.expect("ack");
    timeout(WAIT, agent).await.expect("in time").expect("agent");
}

/// A hand-driven agent sends what a buggy or hostile one could; the client rejects each with an
/// ack carrying the error, and carries on.
#[tokio::test]
async fn zds_rejects_malformed_requests_and_carries_on() {
    let path = socket_path("garbage");
    let _ = std::fs::remove_file(&path);
    let listener = Socket::new(Domain::UNIX, Type::SEQPACKET, None).expect("socket");
    listener
        .bind(&SockAddr::unix(&path).expect("addr"))
        .expect("bind");
    listener.listen(1).expect("listen");

    // A regular file of this test's own, sent where a namespace belongs: the fds received for it
    // can be told apart from those the other tests of this binary open meanwhile.
    let marker = std::env::temp_dir().join(format!("zds-not-a-netns-{}", std::process::id()));
    std::fs::write(&marker, "").expect("marker");
    let sent = marker.clone();
    let agent = std::thread::spawn(move || -> Vec<String> {
        let marker = sent;
        let (conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(WAIT)).expect("timeout");
        let recv = || {
            let mut buf = [0u8; 256];
            let n = std::io::Read::read(&mut &conn, &mut buf).expect("recv");
            buf[..n].to_vec()
        };
        assert_eq!(recv(), [0x08, 0x01], "hello: version V1");
        let ack = |bytes: Vec<u8>| match WorkloadResponse::decode(bytes.as_slice())
            .expect("ack decodes")
            .payload
        {
            Some(workload_response::Payload::Ack(ack)) => ack.error,
            None => panic!("response without an ack"),
        };
        let not_a_netns = std::fs::File::open(&marker).expect("open");
        let add_u = [0x0a, 0x03, 0x0a, 0x01, b'u'];
        let huge = vec![0u8; 2000];
        let file = not_a_netns.as_raw_fd();
        let mut errors = Vec::new();
        for (bytes, fds) in [
            (&[0xff, 0xff, 0xff][..], vec![]), // not protobuf
            (&add_u[..], vec![]),              // AddWorkload{uid: "u"} without its fd
            (&add_u[..], vec![file]),          // ... with a regular file as the fd
            (&huge[..], vec![]),               // over the 1 KiB limit
            (&add_u[..], vec![file; 6]),       // ... with six fds, each arriving as a new one
            (&[0x1a, 0x00][..], vec![]),       // SnapshotSent: valid
        ] {
            let cmsgs: Vec<_> = if fds.is_empty() {
                vec![]
            } else {
                vec![nix::sys::socket::ControlMessage::ScmRights(&fds)]
            };
            nix::sys::socket::sendmsg::<()>(
                conn.as_raw_fd(),
                &[std::io::IoSlice::new(bytes)],
                &cmsgs,
                nix::sys::socket::MsgFlags::empty(),
                None,
            )
            .expect("send");
            errors.push(ack(recv()));
        }
        errors
    });

    let mut client = timeout(WAIT, ZdsClient::connect(&path))
        .await
        .expect("in time")
        .expect("connect");
    let decode = timeout(WAIT, client.next())
        .await
        .expect("in time")
        .expect_err("garbage");
    assert!(
        matches!(decode, ZdsError::Decode(_)) && decode.is_protocol(),
        "{decode:?}"
    );
    let missing = timeout(WAIT, client.next())
        .await
        .expect("in time")
        .expect_err("no fd");
    assert!(
        matches!(&missing, ZdsError::MissingNetns { uid } if uid == "u"),
        "{missing:?}"
    );
    let bad = timeout(WAIT, client.next())
        .await
        .expect("in time")
        .expect_err("bad fd");
    assert!(
        matches!(&bad, ZdsError::BadNetns { uid, .. } if uid == "u"),
        "{bad:?}"
    );
    let huge = timeout(WAIT, client.next())
        .await
        .expect("in time")
        .expect_err("oversized");
    assert!(matches!(huge, ZdsError::Oversized), "{huge:?}");
    // Every fd that arrived is closed, however many came.
    let open_fds = || {
        (std::fs::read_dir("/proc/self/fd").expect("fds").flatten())
            .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|to| to == marker))
            .count()
    };
    let before = open_fds();
    let many = timeout(WAIT, client.next())
        .await
        .expect("in time")
        .expect_err("six fds");
    assert!(
        matches!(many, ZdsError::UnexpectedFds { count: 6 }),
        "{many:?}"
    );
    assert_eq!(open_fds(), before, "the six fds are closed");
    let ok = timeout(WAIT, client.next())
        .await
        .expect("in time")
        .expect("valid request");
    assert!(matches!(ok, Some(WorkloadEvent::SnapshotSent)), "{ok:?}");
    client.ack(None).await.expect("ack");

    let errors = agent.join().expect("agent");
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&marker);
    assert_eq!(errors.len(), 6);
    assert!(errors[0].contains("undecodable"), "{errors:?}");
    assert!(errors[1].contains("no network namespace"), "{errors:?}");
    assert!(errors[2].contains("is not a namespace"), "{errors:?}");
    assert!(errors[3].contains("larger than 1024 bytes"), "{errors:?}");
    assert!(errors[4].contains("6 unexpected file"), "{errors:?}");
    assert_eq!(errors[5], "", "the valid request is acked without error");
}

// === (d) the iptables rules capture what ztunnel expects ===

#[tokio::test]
async fn pod_rules_redirect_outbound_and_tproxy_inbound() {
    let backends = IptablesBackend::installed();
    assert!(
        !backends.is_empty(),
        "no iptables-nft-restore / iptables-legacy-restore on PATH; install the iptables package"
    );
    let pod = TestNetns::new("rules");
    let veth = Veth::new(&pod);
    for backend in backends {
        check_capture(&pod, &veth, backend).await;
    }
}

async fn check_capture(pod: &TestNetns, veth: &Veth, backend: IptablesBackend) {
    let rules = PodRules::new(backend);
    rules
        .install(&pod.ns)
        .unwrap_or_else(|e| panic!("{backend:?}: install: {e}"));
    rules
        .install(&pod.ns)
        .unwrap_or_else(|e| panic!("{backend:?}: reinstall: {e}"));
    let save = match backend {
        IptablesBackend::Nft => "iptables-nft-save",
        IptablesBackend::Legacy => "iptables-legacy-save",
    };
    let saved = output_in(pod, save, &[]);
    for jump in ["-A PREROUTING -j ISTIO_PRERT", "-A OUTPUT -j ISTIO_OUTPUT"] {
        let count = saved.lines().filter(|l| *l == jump).count();
        // mangle, nat and (with DNS capture) raw OUTPUT each jump to an ISTIO_OUTPUT; mangle and
        // raw PREROUTING to an ISTIO_PRERT.
        let expected = if jump.contains("OUTPUT") { 3 } else { 2 };
        assert_eq!(
            count, expected,
            "{backend:?}: reinstall must not duplicate `{jump}`:\n{saved}"
        );
    }
    assert_eq!(
        IptablesBackend::detect(&pod.ns).expect("detect"),
        backend,
        "detect follows existing rules"
    );
    let ip_rules = output_in(pod, "ip", &["rule", "show"]);
    assert_eq!(
        ip_rules.matches("fwmark 0x111/0xfff lookup 100").count(),
        1,
        "{ip_rules}"
    );
    // The same for IPv6: istio-cni's ip6tables twin.
    let save6 = save.replacen("iptables", "ip6tables", 1);
    let saved6 = output_in(pod, &save6, &[]);
    for (jump, expected) in [
        ("-A PREROUTING -j ISTIO_PRERT", 2),
        ("-A OUTPUT -j ISTIO_OUTPUT", 3),
    ] {
        let count = saved6.lines().filter(|l| *l == jump).count();
        assert_eq!(count, expected, "{backend:?}: `{jump}` in\n{saved6}");
    }
    assert!(
        saved6.contains("--on-ip :: ") && saved6.contains("! -d ::1/128"),
        "{backend:?}: IPv6's addresses:\n{saved6}"
    );
    let ip6_rules = output_in(pod, "ip", &["-6", "rule", "show"]);
    assert_eq!(
        ip6_rules.matches("fwmark 0x111/0xfff lookup 100").count(),
        1,
        "{ip6_rules}"
    );
    let ip6_route = output_in(pod, "ip", &["-6", "route", "show", "table", "100"]);
    assert!(ip6_route.contains("local default dev lo"), "{ip6_route}");

    let dst = SocketAddr::V4(SocketAddrV4::new(veth.host, 80));
    let upstream = TcpListener::bind(dst)
        .await
        .unwrap_or_else(|e| panic!("bind {dst} on the host side: {e}"));
    let outbound =
        bind_listener(&pod.ns, "0.0.0.0:15001".parse().expect("addr"), false).expect("bind 15001");
    let outbound = TcpListener::from_std(outbound).expect("register");

    // The app's connection: created in the pod, unmarked, so nat OUTPUT redirects it to 15001.
    let app = pod
        .ns
        .run_in(|| TcpStream::connect_timeout(&dst, WAIT))
        .expect("run_in");
    let mut app = app.unwrap_or_else(|e| panic!("{backend:?}: app connect to {dst}: {e}"));
    let (mut captured, peer) = timeout(WAIT, outbound.accept())
        .await
        .expect("captured by 15001 in time")
        .expect("accept");
    let original = SockRef::from(&captured)
        .original_dst_v4()
        .expect("SO_ORIGINAL_DST");
    assert_eq!(
        original.as_socket(),
        Some(dst),
        "{backend:?}: original destination"
    );
    assert_eq!(peer.ip(), veth.pod, "the app's own address is the source");
    app.write_all(b"hi").expect("write");
    let mut buf = [0; 2];
    captured.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"hi");

    // ztunnel's own upstream connection: marked 0x539, so it leaves the pod as is.
    let socket = connect_socket(&pod.ns, dst, None).expect("socket");
    let upstream_conn = TcpSocket::from_std_stream(socket.into());
    let mut to_upstream = timeout(WAIT, upstream_conn.connect(dst))
        .await
        .expect("in time")
        .expect("marked connect");
    let (mut at_upstream, peer) = timeout(WAIT, upstream.accept())
        .await
        .expect("reaches the host")
        .expect("accept");
    assert_eq!(peer.ip(), veth.pod);
    to_upstream.write_all(b"up").await.expect("write");
    at_upstream.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"up");
    assert!(
        timeout(Duration::from_millis(200), outbound.accept())
            .await
            .is_err(),
        "{backend:?}: a marked connection must not be redirected"
    );

    // Inbound: the host dials the pod on a port nobody listens on; TPROXY hands it to 15006,
    // with the original destination as the accepted socket's local address.
    let inbound =
        bind_listener(&pod.ns, "0.0.0.0:15006".parse().expect("addr"), true).expect("bind 15006");
    let inbound = TcpListener::from_std(inbound).expect("register");
    let pod_port = SocketAddr::V4(SocketAddrV4::new(veth.pod, 9080));
    let mut from_host = timeout(WAIT, tokio::net::TcpStream::connect(pod_port))
        .await
        .expect("in time")
        .unwrap_or_else(|e| panic!("{backend:?}: inbound connect to {pod_port}: {e}"));
    let (mut at_pod, peer) = timeout(WAIT, inbound.accept())
        .await
        .expect("tproxied in time")
        .expect("accept");
    assert_eq!(
        at_pod.local_addr().expect("local"),
        pod_port,
        "{backend:?}: TPROXY keeps the destination"
    );
    assert_eq!(peer.ip(), veth.host);
    from_host.write_all(b"in").await.expect("write");
    at_pod.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"in");

    drop((
        app,
        captured,
        to_upstream,
        at_upstream,
        from_host,
        at_pod,
        outbound,
        inbound,
        upstream,
    ));
    rules
        .remove(&pod.ns)
        .unwrap_or_else(|e| panic!("{backend:?}: remove: {e}"));
    rules
        .remove(&pod.ns)
        .unwrap_or_else(|e| panic!("{backend:?}: remove again: {e}"));
    let saved = output_in(pod, save, &[]);
    assert!(
        !saved.contains("ISTIO"),
        "{backend:?}: rules left behind:\n{saved}"
    );
    let ip_rules = output_in(pod, "ip", &["rule", "show"]);
    assert!(!ip_rules.contains("0x111"), "{ip_rules}");
    let saved6 = output_in(pod, &save6, &[]);
    assert!(
        !saved6.contains("ISTIO"),
        "{backend:?}: IPv6 rules left behind:\n{saved6}"
    );
    let ip6_rules = output_in(pod, "ip", &["-6", "rule", "show"]);
    assert!(!ip6_rules.contains("0x111"), "{ip6_rules}");

    // IPv4 only, as istio-cni without `ENABLE_INBOUND_IPV6`: no ip6tables rules, no IPv6 route.
    let v4_only = PodRules::new(backend).capturing_ipv6(false);
    v4_only
        .install(&pod.ns)
        .unwrap_or_else(|e| panic!("{backend:?}: install IPv4 only: {e}"));
    assert!(output_in(pod, save, &[]).contains("ISTIO_OUTPUT"));
    let saved6 = output_in(pod, &save6, &[]);
    assert!(
        !saved6.contains("ISTIO"),
        "{backend:?}: IPv6 rules:\n{saved6}"
    );
    let ip6_rules = output_in(pod, "ip", &["-6", "rule", "show"]);
    assert!(!ip6_rules.contains("0x111"), "{ip6_rules}");
    v4_only
        .remove(&pod.ns)
        .unwrap_or_else(|e| panic!("{backend:?}: remove IPv4 only: {e}"));
}
