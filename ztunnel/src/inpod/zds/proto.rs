//! The `istio.workload.zds` messages, written by hand with prost's derive.
//!
//! Field numbers and the oneof layout are the wire contract with istio-cni's `zds.proto`; names
//! are ours. Unknown fields (newer CNIs) are skipped by prost, as proto3 requires.

/// ZDS protocol version; ztunnel announces it in [`ZdsHello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    /// proto3's mandatory zero value; never sent on purpose.
    NotUsed = 0,
    /// The only version so far.
    V1 = 1,
}

/// First message on a connection, ztunnel → CNI, so the CNI knows what ztunnel speaks.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ZdsHello {
    /// The highest [`Version`] ztunnel speaks.
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

/// Who a captured pod is, for logs and metrics before workload discovery knows it.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct WorkloadInfo {
    /// Pod name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Kubernetes namespace.
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// Service account the pod runs as.
    #[prost(string, tag = "3")]
    pub service_account: String,
}

/// CNI → ztunnel: start serving a pod. The pod's netns fd travels beside it as `SCM_RIGHTS`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AddWorkload {
    /// Kubernetes pod UID, the key of every later message about this pod.
    #[prost(string, tag = "1")]
    pub uid: String,
    /// Pod identity, when the CNI knows it.
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

/// CNI → ztunnel: during a snapshot replay, keep a pod ztunnel already serves (no new netns fd).
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeepWorkload {
    /// Pod UID.
    #[prost(string, tag = "1")]
    pub uid: String,
}

/// CNI → ztunnel: stop serving a pod and close its listeners.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DelWorkload {
    /// Pod UID. Tag 2, not 1, as in `zds.proto`.
    #[prost(string, tag = "2")]
    pub uid: String,
}

/// CNI → ztunnel: every current pod has been sent; any pod ztunnel serves that was not in the
/// replay is gone and can be dropped.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct SnapshotSent {}

/// One CNI → ztunnel message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadRequest {
    /// What the CNI asks for; `None` when the message is of a kind this ztunnel does not know.
    #[prost(oneof = "workload_request::Payload", tags = "1, 2, 3, 5")]
    pub payload: Option<workload_request::Payload>,
}

/// The oneof of [`WorkloadRequest`].
pub mod workload_request {
    /// The request kinds; tag 4 is unused in `zds.proto`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        /// Start serving a pod.
        #[prost(message, tag = "1")]
        Add(super::AddWorkload),
        /// Stop serving a pod.
        #[prost(message, tag = "2")]
        Del(super::DelWorkload),
        /// End of the replay after a (re)connect.
        #[prost(message, tag = "3")]
        SnapshotSent(super::SnapshotSent),
        /// Keep serving a pod across a reconnect.
        #[prost(message, tag = "5")]
        Keep(super::KeepWorkload),
    }
}

/// ztunnel → CNI: the answer to every [`WorkloadRequest`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadResponse {
    /// The only response kind.
    #[prost(oneof = "workload_response::Payload", tags = "1")]
    pub payload: Option<workload_response::Payload>,
}

/// The oneof of [`WorkloadResponse`].
pub mod workload_response {
    /// The response kinds.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        /// The request was handled (or not, see the error).
        #[prost(message, tag = "1")]
        Ack(super::Ack),
    }
}

/// Outcome of a request: empty `error` means done; otherwise the CNI logs it and, for an add,
/// retries or fails the pod's sandbox creation.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Ack {
    /// Why the request failed; empty on success.
    #[prost(string, tag = "1")]
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::workload_request::Payload;
    use super::*;
    use prost::Message;

    fn request(payload: Payload) -> Vec<u8> {
        WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec()
    }

    /// Hand-assembled protobuf: (message, expected bytes). Tag byte = field << 3 | wire type.
    #[test]
    fn field_numbers_match_zds_proto() {
        let uid = || "u".to_owned();
        let cases: Vec<(&str, Vec<u8>, &[u8])> = vec![
            (
                "hello v1",
                ZdsHello {
                    version: Version::V1.into(),
                }
                .encode_to_vec(),
                &[0x08, 0x01],
            ),
            (
                "add",
                request(Payload::Add(AddWorkload {
                    uid: uid(),
                    workload_info: None,
                })),
                &[0x0a, 0x03, 0x0a, 0x01, b'u'],
            ),
            (
                "add with info",
                request(Payload::Add(AddWorkload {
                    uid: uid(),
                    workload_info: Some(WorkloadInfo {
                        name: "n".into(),
                        namespace: "ns".into(),
                        service_account: "sa".into(),
                    }),
                })),
                &[
                    0x0a, 0x10, // WorkloadRequest.add, 16 bytes
                    0x0a, 0x01, b'u', // AddWorkload.uid
                    0x12, 0x0b, // AddWorkload.workload_info, 11 bytes
                    0x0a, 0x01, b'n', // name
                    0x12, 0x02, b'n', b's', // namespace
                    0x1a, 0x02, b's', b'a', // service_account
                ],
            ),
            (
                "del",
                request(Payload::Del(DelWorkload { uid: uid() })),
                &[0x12, 0x03, 0x12, 0x01, b'u'],
            ),
            (
                "snapshot sent",
                request(Payload::SnapshotSent(SnapshotSent {})),
                &[0x1a, 0x00],
            ),
            (
                "keep",
                request(Payload::Keep(KeepWorkload { uid: uid() })),
                &[0x2a, 0x03, 0x0a, 0x01, b'u'],
            ),
            (
                "ack ok",
                WorkloadResponse {
                    payload: Some(workload_response::Payload::Ack(Ack::default())),
                }
                .encode_to_vec(),
                &[0x0a, 0x00],
            ),
            (
                "ack error",
                WorkloadResponse {
                    payload: Some(workload_response::Payload::Ack(Ack { error: "e".into() })),
                }
                .encode_to_vec(),
                &[0x0a, 0x03, 0x0a, 0x01, b'e'],
            ),
        ];
        for (name, encoded, expected) in cases {
            assert_eq!(encoded, expected, "{name}");
        }
    }

    #[test]
    fn round_trips() {
        let requests = [
            Payload::Add(AddWorkload {
                uid: "pod-1".into(),
                workload_info: Some(WorkloadInfo {
                    name: "web".into(),
                    namespace: "default".into(),
                    service_account: "web-sa".into(),
                }),
            }),
            Payload::Del(DelWorkload {
                uid: "pod-1".into(),
            }),
            Payload::Keep(KeepWorkload {
                uid: "pod-2".into(),
            }),
            Payload::SnapshotSent(SnapshotSent {}),
        ];
        for payload in requests {
            let msg = WorkloadRequest {
                payload: Some(payload),
            };
            let decoded = WorkloadRequest::decode(msg.encode_to_vec().as_slice()).expect("decode");
            assert_eq!(decoded, msg);
        }
        let hello = ZdsHello {
            version: Version::V1.into(),
        };
        assert_eq!(
            ZdsHello::decode(hello.encode_to_vec().as_slice())
                .expect("decode")
                .version(),
            Version::V1
        );
    }

    #[test]
    fn unknown_fields_and_kinds_are_tolerated() {
        // AddWorkload{uid: "u", 4: "x"} (a field this ztunnel does not know) inside field 1.
        let add = [0x0a, 0x06, 0x0a, 0x01, b'u', 0x22, 0x01, b'x'];
        let decoded = WorkloadRequest::decode(&add[..]).expect("unknown field skipped");
        assert_eq!(
            decoded.payload,
            Some(Payload::Add(AddWorkload {
                uid: "u".into(),
                workload_info: None
            }))
        );
        // A payload kind this ztunnel does not know (tag 9) decodes to no payload.
        let unknown = [0x4a, 0x00];
        assert_eq!(
            WorkloadRequest::decode(&unknown[..])
                .expect("decode")
                .payload,
            None
        );
    }

    #[test]
    fn garbage_is_an_error() {
        for garbage in [&[0xff_u8, 0xff, 0xff][..], &[0x0a, 0x05, 0x0a], &[0x0b]] {
            assert!(WorkloadRequest::decode(garbage).is_err(), "{garbage:02x?}");
        }
    }
}
