//! Hot reload through the real directory watcher: changes apply atomically, invalid changes are
//! rejected and the last good snapshot stays in force.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use mesh::Store;
use support::{BOOKINFO, Scratch};

const DEBOUNCE: Duration = Duration::from_millis(50);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

const RATINGS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: bookinfo}
spec: {clusterIP: 10.96.0.40, selector: {app: ratings}, ports: [{port: 9080}]}
"#;

/// Waits until `check` holds, for up to 10 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn changes_apply_and_bad_changes_are_rejected() {
    let dir = Scratch::new();
    dir.write("bookinfo.yaml", BOOKINFO);
    let mut config = dir.dir();
    let store = Store::open(&mut config).expect("initial load");
    let mut changes = store.subscribe();
    let _watch = store.watch(config, DEBOUNCE).expect("watch");
    let before = store.load();
    assert_eq!(before.version(), 1);

    // A new file is picked up.
    dir.write("ratings/service.yaml", RATINGS);
    eventually("ratings to appear", || {
        store.snapshot().service_by_vip(ip("10.96.0.40")).is_some()
    })
    .await;
    let version = store.snapshot().version();
    assert!(version > 1);
    changes.changed().await.expect("notified");
    assert_eq!(*changes.borrow_and_update(), version);
    // A snapshot held by a connection is not disturbed.
    assert!(before.service_by_vip(ip("10.96.0.40")).is_none());

    // An invalid change is rejected; the last good snapshot stays.
    dir.write(
        "ratings/service.yaml",
        &RATINGS.replace("clusterIP: 10.96.0.40", "clusterIP: 10.96.0.400"),
    );
    eventually("the change to be rejected", || store.stats().rejected == 1).await;
    let error = store.last_error().expect("error kept");
    assert!(
        error.contains(
            "ratings/service.yaml (document 0): Service bookinfo/ratings: spec.clusterIP"
        ),
        "{error}"
    );
    assert_eq!(store.snapshot().version(), version);
    assert!(store.snapshot().service_by_vip(ip("10.96.0.40")).is_some());

    // Fixing it applies again and clears the error; removing a file removes its resources.
    dir.write(
        "ratings/service.yaml",
        &RATINGS.replace("10.96.0.40", "10.96.0.41"),
    );
    eventually("the fix", || {
        store.snapshot().service_by_vip(ip("10.96.0.41")).is_some()
    })
    .await;
    assert!(store.last_error().is_none());
    dir.remove("ratings/service.yaml");
    eventually("removal", || {
        store.snapshot().service_by_vip(ip("10.96.0.41")).is_none()
    })
    .await;
    assert!(store.snapshot().service_by_vip(ip("10.96.0.20")).is_some());
    let stats = store.stats();
    assert_eq!(stats.rejected, 1);
    assert!(stats.applied >= 4, "{stats:?}");
}

#[tokio::test]
async fn a_burst_of_writes_is_applied_once() {
    let dir = Scratch::new();
    dir.write("bookinfo.yaml", BOOKINFO);
    let mut config = dir.dir();
    let store = Store::open(&mut config).expect("initial load");
    // A quiet time far longer than the gaps between the writes, even on a stalled machine.
    let debounce = Duration::from_secs(2);
    let _watch = store.watch(config, debounce).expect("watch");
    for i in 0..10 {
        dir.write(
            &format!("svc-{i}.yaml"),
            &RATINGS
                .replace("ratings", &format!("svc-{i}"))
                .replace("10.96.0.40", &format!("10.96.5.{i}")),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eventually("all ten services", || {
        store.snapshot().service_by_vip(ip("10.96.5.9")).is_some()
    })
    .await;
    // Long enough for a second reload to have come, had there been one.
    tokio::time::sleep(debounce + Duration::from_millis(500)).await;
    assert_eq!(store.stats().applied, 2, "debounced into one reload");
}

#[test]
fn reload_reports_io_errors() {
    let dir = Scratch::new();
    dir.write("bookinfo.yaml", BOOKINFO);
    let mut config = dir.dir();
    let store = Store::open(&mut config).expect("initial load");
    std::fs::remove_dir_all(dir.root()).expect("rm");
    let e = store.reload(&mut config).expect_err("directory is gone");
    assert!(e.to_string().contains("cannot read"), "{e}");
    assert_eq!(store.snapshot().version(), 1);
    assert_eq!(store.stats().rejected, 1);
}
