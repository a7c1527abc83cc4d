//! The embedded default (`deploy/local/`) does what the README says it does.

use std::path::Path;
use std::time::Duration;

use local::LocalMesh;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_routes_and_authorizes_through_its_waypoint() {
    // deploy/local names its Wasm plugin by a path relative to the repository root, where the
    // local mesh runs; this is the only test in this binary.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::set_current_dir(&root).expect("cd to the repository root");
    plugins::examples::build("add_header");
    let dir = root.join("deploy/local");
    let mesh = LocalMesh::start(&dir).await.expect("the local mesh starts");
    assert_eq!(mesh.waypoints.len(), 1, "deploy/local has one waypoint");
    let sleep = "127.0.1.1".parse().unwrap();
    let reviews = "reviews.default.svc.cluster.local";

    let l4 = mesh
        .get(
            sleep,
            "productpage.default.svc.cluster.local",
            9080,
            "/",
            &[],
        )
        .await
        .unwrap();
    assert!(l4.contains("hello from default/productpage-v1"), "{l4}");
    // Each backend sees its caller's address, as in a pod: the client here, the waypoint below.
    assert!(l4.contains("(connection from 127.0.1.1:"), "{l4}");
    assert!(
        !l4.contains("x-wasm-plugin"),
        "no waypoint, no plugin: {l4}"
    );

    let v1 = mesh.get(sleep, reviews, 9080, "/r", &[]).await.unwrap();
    assert!(v1.contains("hello from default/reviews-v1"), "{v1}");
    assert!(v1.contains("x-wasm-plugin: add_header"), "{v1}");
    assert!(v1.contains("(connection from 127.0.3.1:"), "{v1}");
    let v2 = mesh
        .get(sleep, reviews, 9080, "/r", &[("end-user", "jason")])
        .await
        .unwrap();
    assert!(v2.contains("hello from default/reviews-v2"), "{v2}");
    let denied = mesh.get(sleep, reviews, 9080, "/admin", &[]).await.unwrap();
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    assert!(denied.contains("RBAC: access denied"), "{denied}");
    // The plugin runs after authorization, so the denied request never reached it; its answer
    // still passes the plugin's response callback, as Envoy's local replies do.
    assert!(denied.contains("x-wasm-plugin: add_header"), "{denied}");

    // One certificate cache for the whole mesh, which the admin endpoint shows: the client's,
    // the waypoint's and the endpoints' certificates all issued by now.
    let identities: Vec<String> = (mesh.certs.certificates().iter())
        .map(|c| c.identity().to_string())
        .collect();
    for sa in ["sleep", "waypoint", "reviews"] {
        let want = format!("spiffe://cluster.local/ns/default/sa/{sa}");
        assert!(identities.contains(&want), "{want} in {identities:?}");
    }

    mesh.shutdown(Duration::from_secs(1)).await;
}
