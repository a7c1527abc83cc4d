//! A scratch configuration directory per test.

#![allow(dead_code, unreachable_pub)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use mesh::{ConfigDir, ConfigError, Options, Snapshot};

/// A directory under the system temp dir, removed on drop.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "mesh-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create scratch dir");
        Self { path }
    }

    /// Writes `text` to `name` (creating subdirectories), replacing it atomically like
    /// `kubectl cp`/editors that write then rename.
    pub fn write(&self, name: &str, text: &str) -> &Self {
        let path = self.path.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        let tmp = self.path.join(format!(".{}.tmp", name.replace('/', "_")));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
        self
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.path.join(name)).expect("remove");
    }

    pub fn dir(&self) -> ConfigDir {
        ConfigDir::new(&self.path, Options::default())
    }

    pub fn load(&self) -> Result<Snapshot, ConfigError> {
        self.dir().load(1)
    }

    pub fn root(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Loads `yaml` as one file and returns the snapshot, panicking with the problems if invalid.
pub fn snapshot(yaml: &str) -> Snapshot {
    let dir = Scratch::new();
    dir.write("mesh.yaml", yaml);
    dir.load()
        .unwrap_or_else(|e| panic!("configuration should be valid: {e}"))
}

/// Loads `yaml` and returns the error, panicking if it is valid.
pub fn problems(yaml: &str) -> ConfigError {
    let dir = Scratch::new();
    dir.write("mesh.yaml", yaml);
    match dir.load() {
        Ok(_) => panic!("configuration should be invalid"),
        Err(e) => e,
    }
}

/// A small ambient mesh: namespace `bookinfo` (ambient), a waypoint bound to the namespace,
/// services `productpage` and `reviews` (two versions, named target port), and an uncaptured
/// namespace `legacy` with one pod.
pub const BOOKINFO: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: bookinfo
  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: bookinfo
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.2
  selector: {gateway.networking.k8s.io/gateway-name: waypoint}
  ports: [{name: mesh, port: 15008}]
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-6f8c9-abcde
  namespace: bookinfo
  labels: {gateway.networking.k8s.io/gateway-name: waypoint, pod-template-hash: 6f8c9}
spec: {nodeName: node-b, serviceAccountName: waypoint}
status: {podIP: 10.0.2.1, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: productpage, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: productpage}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.20
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: productpage-v1, namespace: bookinfo, labels: {app: productpage, version: v1}}
spec: {nodeName: node-a, serviceAccountName: productpage}
status: {podIP: 10.0.1.1, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: bookinfo, labels: {app: reviews, version: v1}}
spec:
  nodeName: node-a
  serviceAccountName: reviews
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.0.1.2, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: bookinfo, labels: {app: reviews, version: v2}}
spec:
  nodeName: node-b
  serviceAccountName: reviews
  containers: [{name: app, ports: [{name: http, containerPort: 8081}]}]
status: {podIP: 10.0.2.2, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v3, namespace: bookinfo, labels: {app: reviews, version: v3}}
spec: {nodeName: node-b, serviceAccountName: reviews}
status:
  podIP: 10.0.2.3
  phase: Running
  conditions: [{type: Ready, status: "False"}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: legacy, labels: {app: client}}
spec: {nodeName: node-a}
status: {podIP: 10.0.1.9, phase: Running}
"#;
