//! Request bodies in Kubernetes' protobuf encoding (`application/vnd.kubernetes.protobuf`), which
//! kubectl's typed commands send (`kubectl create configmap|secret|serviceaccount|namespace|token|
//! role|rolebinding|job`, `kubectl auth can-i`, `kubectl auth whoami`): decoded to the JSON the
//! rest of the server works with. Responses stay JSON, which those clients also accept.
//!
//! The envelope is the magic `k8s\0` followed by a `runtime.Unknown` message (type meta and the
//! raw object). Objects are decoded with field tables for the kinds those commands send (field
//! numbers from Kubernetes' generated.proto files); other kinds are refused with 415.

use base64::Engine as _;
use serde_json::{json, Map, Value};

const MAGIC: &[u8] = b"k8s\0";

#[derive(Clone, Copy)]
enum Ty {
    Str,
    /// Bytes, as JSON's base64.
    Bytes,
    Int,
    /// An integer Go writes even when zero, where zero means "not set" (metadata.generation).
    Count,
    Bool,
    /// meta/v1 Time (seconds, nanos) as RFC 3339.
    Time,
    IntOrString,
    Msg(&'static [Field]),
    /// A message whose every non-zero field must be known: one this server cannot read is refused
    /// (415) rather than dropped. Go's encoding writes every non-pointer field, so zero values
    /// (empty strings, lists and messages, 0, false) of unknown fields pass.
    Strict(&'static str, &'static [Field]),
    MapStr,
    MapBytes,
}

#[derive(Clone, Copy)]
struct Field {
    tag: u64,
    name: &'static str,
    ty: Ty,
    repeated: bool,
}

const fn f(tag: u64, name: &'static str, ty: Ty) -> Field {
    Field {
        tag,
        name,
        ty,
        repeated: false,
    }
}

const fn list(tag: u64, name: &'static str, ty: Ty) -> Field {
    Field {
        tag,
        name,
        ty,
        repeated: true,
    }
}

const OWNER_REFERENCE: &[Field] = &[
    f(1, "kind", Ty::Str),
    f(3, "name", Ty::Str),
    f(4, "uid", Ty::Str),
    f(5, "apiVersion", Ty::Str),
    f(6, "controller", Ty::Bool),
    f(7, "blockOwnerDeletion", Ty::Bool),
];

const OBJECT_META: &[Field] = &[
    f(1, "name", Ty::Str),
    f(2, "generateName", Ty::Str),
    f(3, "namespace", Ty::Str),
    f(5, "uid", Ty::Str),
    f(6, "resourceVersion", Ty::Str),
    f(7, "generation", Ty::Count),
    f(8, "creationTimestamp", Ty::Time),
    f(9, "deletionTimestamp", Ty::Time),
    f(10, "deletionGracePeriodSeconds", Ty::Int),
    f(11, "labels", Ty::MapStr),
    f(12, "annotations", Ty::MapStr),
    list(13, "ownerReferences", Ty::Msg(OWNER_REFERENCE)),
    list(14, "finalizers", Ty::Str),
];

const NAME_REFERENCE: &[Field] = &[f(1, "name", Ty::Str)];

const OBJECT_REFERENCE: &[Field] = &[
    f(1, "kind", Ty::Str),
    f(2, "namespace", Ty::Str),
    f(3, "name", Ty::Str),
    f(4, "uid", Ty::Str),
    f(5, "apiVersion", Ty::Str),
    f(6, "resourceVersion", Ty::Str),
    f(7, "fieldPath", Ty::Str),
];

const CONFIG_MAP: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "data", Ty::MapStr),
    f(3, "binaryData", Ty::MapBytes),
    f(4, "immutable", Ty::Bool),
];

const SECRET: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "data", Ty::MapBytes),
    f(3, "type", Ty::Str),
    f(4, "stringData", Ty::MapStr),
    f(5, "immutable", Ty::Bool),
];

const SERVICE_ACCOUNT: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    list(2, "secrets", Ty::Msg(OBJECT_REFERENCE)),
    list(3, "imagePullSecrets", Ty::Msg(NAME_REFERENCE)),
    f(4, "automountServiceAccountToken", Ty::Bool),
];

const NAMESPACE: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(2, "spec", Ty::Msg(&[list(1, "finalizers", Ty::Str)])),
];

const SERVICE_PORT: &[Field] = &[
    f(1, "name", Ty::Str),
    f(2, "protocol", Ty::Str),
    f(3, "port", Ty::Int),
    f(4, "targetPort", Ty::IntOrString),
    f(5, "nodePort", Ty::Int),
    f(6, "appProtocol", Ty::Str),
];

const SERVICE: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(
        2,
        "spec",
        Ty::Msg(&[
            list(1, "ports", Ty::Msg(SERVICE_PORT)),
            f(2, "selector", Ty::MapStr),
            f(3, "clusterIP", Ty::Str),
            f(4, "type", Ty::Str),
            list(5, "externalIPs", Ty::Str),
            f(7, "sessionAffinity", Ty::Str),
            f(10, "externalName", Ty::Str),
            f(11, "externalTrafficPolicy", Ty::Str),
            f(13, "publishNotReadyAddresses", Ty::Bool),
            f(17, "ipFamilyPolicy", Ty::Str),
            list(18, "clusterIPs", Ty::Str),
            list(19, "ipFamilies", Ty::Str),
            f(22, "internalTrafficPolicy", Ty::Str),
        ]),
    ),
];

const RESOURCE_ATTRIBUTES: &[Field] = &[
    f(1, "namespace", Ty::Str),
    f(2, "verb", Ty::Str),
    f(3, "group", Ty::Str),
    f(4, "version", Ty::Str),
    f(5, "resource", Ty::Str),
    f(6, "subresource", Ty::Str),
    f(7, "name", Ty::Str),
];

const NON_RESOURCE_ATTRIBUTES: &[Field] = &[f(1, "path", Ty::Str), f(2, "verb", Ty::Str)];

const SELF_SUBJECT_ACCESS_REVIEW: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(
        2,
        "spec",
        Ty::Msg(&[
            f(1, "resourceAttributes", Ty::Msg(RESOURCE_ATTRIBUTES)),
            f(2, "nonResourceAttributes", Ty::Msg(NON_RESOURCE_ATTRIBUTES)),
        ]),
    ),
];

const SUBJECT_ACCESS_REVIEW: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(
        2,
        "spec",
        Ty::Msg(&[
            f(1, "resourceAttributes", Ty::Msg(RESOURCE_ATTRIBUTES)),
            f(2, "nonResourceAttributes", Ty::Msg(NON_RESOURCE_ATTRIBUTES)),
            f(3, "user", Ty::Str),
            list(4, "groups", Ty::Str),
            f(6, "uid", Ty::Str),
        ]),
    ),
];

const SELF_SUBJECT_REVIEW: &[Field] = &[f(1, "metadata", Ty::Msg(OBJECT_META))];

const TOKEN_REQUEST: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(
        2,
        "spec",
        Ty::Msg(&[
            list(1, "audiences", Ty::Str),
            f(
                3,
                "boundObjectRef",
                Ty::Msg(&[
                    f(1, "kind", Ty::Str),
                    f(2, "apiVersion", Ty::Str),
                    f(3, "name", Ty::Str),
                    f(4, "uid", Ty::Str),
                ]),
            ),
            f(4, "expirationSeconds", Ty::Int),
        ]),
    ),
];

const TOKEN_REVIEW: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(
        2,
        "spec",
        Ty::Msg(&[f(1, "token", Ty::Str), list(2, "audiences", Ty::Str)]),
    ),
];

const POLICY_RULE: &[Field] = &[
    list(1, "verbs", Ty::Str),
    list(2, "apiGroups", Ty::Str),
    list(3, "resources", Ty::Str),
    list(4, "resourceNames", Ty::Str),
    list(5, "nonResourceURLs", Ty::Str),
];

const ROLE: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    list(2, "rules", Ty::Msg(POLICY_RULE)),
];

const SUBJECT: &[Field] = &[
    f(1, "kind", Ty::Str),
    f(2, "apiGroup", Ty::Str),
    f(3, "name", Ty::Str),
    f(4, "namespace", Ty::Str),
];

const ROLE_BINDING: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    list(2, "subjects", Ty::Msg(SUBJECT)),
    f(
        3,
        "roleRef",
        Ty::Msg(&[
            f(1, "apiGroup", Ty::Str),
            f(2, "kind", Ty::Str),
            f(3, "name", Ty::Str),
        ]),
    ),
];

// batch/v1 Job as `kubectl create job` sends it: the pod template's fields a Job commonly sets
// are read; any other non-zero field of the spec, the template's spec or a container is refused.
const LABEL_SELECTOR: &[Field] = &[
    f(1, "matchLabels", Ty::MapStr),
    list(
        2,
        "matchExpressions",
        Ty::Msg(&[
            f(1, "key", Ty::Str),
            f(2, "operator", Ty::Str),
            list(3, "values", Ty::Str),
        ]),
    ),
];

const CONTAINER: &[Field] = &[
    f(1, "name", Ty::Str),
    f(2, "image", Ty::Str),
    list(3, "command", Ty::Str),
    list(4, "args", Ty::Str),
    f(5, "workingDir", Ty::Str),
    list(
        6,
        "ports",
        Ty::Strict(
            "ContainerPort",
            &[
                f(1, "name", Ty::Str),
                f(2, "hostPort", Ty::Int),
                f(3, "containerPort", Ty::Int),
                f(4, "protocol", Ty::Str),
                f(5, "hostIP", Ty::Str),
            ],
        ),
    ),
    list(
        7,
        "env",
        Ty::Strict("EnvVar", &[f(1, "name", Ty::Str), f(2, "value", Ty::Str)]),
    ),
    f(13, "terminationMessagePath", Ty::Str),
    f(14, "imagePullPolicy", Ty::Str),
    f(20, "terminationMessagePolicy", Ty::Str),
];

const TOLERATION: &[Field] = &[
    f(1, "key", Ty::Str),
    f(2, "operator", Ty::Str),
    f(3, "value", Ty::Str),
    f(4, "effect", Ty::Str),
    f(5, "tolerationSeconds", Ty::Int),
];

const POD_SPEC: &[Field] = &[
    list(2, "containers", Ty::Strict("Container", CONTAINER)),
    f(3, "restartPolicy", Ty::Str),
    f(4, "terminationGracePeriodSeconds", Ty::Int),
    f(5, "activeDeadlineSeconds", Ty::Int),
    f(6, "dnsPolicy", Ty::Str),
    f(7, "nodeSelector", Ty::MapStr),
    f(8, "serviceAccountName", Ty::Str),
    f(10, "nodeName", Ty::Str),
    f(16, "hostname", Ty::Str),
    f(17, "subdomain", Ty::Str),
    f(19, "schedulerName", Ty::Str),
    list(20, "initContainers", Ty::Strict("Container", CONTAINER)),
    list(22, "tolerations", Ty::Strict("Toleration", TOLERATION)),
    f(24, "priorityClassName", Ty::Str),
];

const JOB: &[Field] = &[
    f(1, "metadata", Ty::Msg(OBJECT_META)),
    f(
        2,
        "spec",
        Ty::Strict(
            "JobSpec",
            &[
                f(1, "parallelism", Ty::Int),
                f(2, "completions", Ty::Int),
                f(3, "activeDeadlineSeconds", Ty::Int),
                f(4, "selector", Ty::Msg(LABEL_SELECTOR)),
                f(5, "manualSelector", Ty::Bool),
                f(
                    6,
                    "template",
                    Ty::Strict(
                        "PodTemplateSpec",
                        &[
                            f(1, "metadata", Ty::Msg(OBJECT_META)),
                            f(2, "spec", Ty::Strict("PodSpec", POD_SPEC)),
                        ],
                    ),
                ),
                f(7, "backoffLimit", Ty::Int),
                f(8, "ttlSecondsAfterFinished", Ty::Int),
                f(9, "completionMode", Ty::Str),
                f(10, "suspend", Ty::Bool),
                f(14, "podReplacementPolicy", Ty::Str),
                f(15, "managedBy", Ty::Str),
            ],
        ),
    ),
];

fn schema(kind: &str) -> Option<&'static [Field]> {
    Some(match kind {
        "ConfigMap" => CONFIG_MAP,
        "Secret" => SECRET,
        "ServiceAccount" => SERVICE_ACCOUNT,
        "Namespace" => NAMESPACE,
        "Service" => SERVICE,
        "SelfSubjectAccessReview" => SELF_SUBJECT_ACCESS_REVIEW,
        "SubjectAccessReview" => SUBJECT_ACCESS_REVIEW,
        "SelfSubjectReview" => SELF_SUBJECT_REVIEW,
        "TokenRequest" => TOKEN_REQUEST,
        "TokenReview" => TOKEN_REVIEW,
        "Role" | "ClusterRole" => ROLE,
        "RoleBinding" | "ClusterRoleBinding" => ROLE_BINDING,
        "Job" => JOB,
        _ => return None,
    })
}

/// Why a protobuf body could not be read.
#[derive(Debug, PartialEq)]
pub enum DecodeError {
    /// Well-formed, but of a kind this server reads only as JSON.
    Unsupported(String),
    Malformed(String),
}

/// Decodes a protobuf request body into the object's JSON.
pub fn decode(body: &[u8]) -> Result<Value, DecodeError> {
    let bad = |m: &str| DecodeError::Malformed(m.to_string());
    let envelope = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("the body does not start with the protobuf magic k8s\\0"))?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    let mut reader = Reader(envelope);
    while let Some((tag, value)) = reader.field().map_err(|e| bad(&e))? {
        match (tag, value) {
            (1, Wire::Len(meta)) => {
                let mut meta = Reader(meta);
                while let Some((tag, value)) = meta.field().map_err(|e| bad(&e))? {
                    match (tag, value) {
                        (1, Wire::Len(v)) => api_version = utf8(v)?,
                        (2, Wire::Len(v)) => kind = utf8(v)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Len(bytes)) => raw = bytes,
            (3, Wire::Len(encoding)) if !encoding.is_empty() => {
                return Err(DecodeError::Unsupported(format!(
                    "content encoding {:?}",
                    String::from_utf8_lossy(encoding)
                )))
            }
            _ => {}
        }
    }
    let fields = schema(&kind).ok_or_else(|| DecodeError::Unsupported(format!("kind {kind:?}")))?;
    let mut object = message(raw, fields, None)?;
    object.insert("apiVersion".into(), api_version.into());
    object.insert("kind".into(), kind.into());
    Ok(Value::Object(object))
}

fn utf8(bytes: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| DecodeError::Malformed("a string field is not UTF-8".into()))
}

enum Wire<'a> {
    Varint(u64),
    Len(&'a [u8]),
    Fixed,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.0.split_first().ok_or("truncated varint")?;
            self.0 = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint too long".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated field".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn field(&mut self) -> Result<Option<(u64, Wire<'a>)>, String> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "length too large")?;
                Wire::Len(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Wire::Fixed
            }
            other => return Err(format!("unsupported wire type {other}")),
        };
        Ok(Some((key >> 3, value)))
    }
}

/// Decodes one message; `strict` names it when its unknown non-zero fields are refused.
fn message(
    bytes: &[u8],
    fields: &[Field],
    strict: Option<&str>,
) -> Result<Map<String, Value>, DecodeError> {
    let mut out = Map::new();
    let mut reader = Reader(bytes);
    let malformed = DecodeError::Malformed;
    while let Some((tag, wire)) = reader.field().map_err(malformed)? {
        let Some(field) = fields.iter().find(|f| f.tag == tag) else {
            let zero = matches!(wire, Wire::Varint(0) | Wire::Len([]));
            if let (Some(name), false) = (strict, zero) {
                return Err(DecodeError::Unsupported(format!(
                    "{name} field {tag} in protobuf (send application/json)"
                )));
            }
            continue;
        };
        let value = match (field.ty, wire) {
            // An empty string is Go's zero value: the same as leaving the field out.
            (Ty::Str, Wire::Len([])) if !field.repeated => continue,
            (Ty::Str, Wire::Len(v)) => Value::String(utf8(v)?),
            (Ty::Bytes, Wire::Len(v)) => base64::engine::general_purpose::STANDARD.encode(v).into(),
            (Ty::Int, Wire::Varint(v)) => json!(v as i64),
            (Ty::Count, Wire::Varint(0)) => continue,
            (Ty::Count, Wire::Varint(v)) => json!(v as i64),
            (Ty::Bool, Wire::Varint(v)) => json!(v != 0),
            (Ty::Time, Wire::Len(v)) => {
                let time = message(v, &[f(1, "seconds", Ty::Int)], None)?;
                // Go writes a zero Time (an unset creationTimestamp) as an empty message.
                match time.get("seconds").and_then(Value::as_i64) {
                    None | Some(0) => continue,
                    Some(seconds) => chrono::DateTime::from_timestamp(seconds, 0)
                        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                        .map_or(Value::Null, Value::String),
                }
            }
            (Ty::IntOrString, Wire::Len(v)) => {
                let parts = message(
                    v,
                    &[
                        f(1, "type", Ty::Int),
                        f(2, "intVal", Ty::Int),
                        f(3, "strVal", Ty::Str),
                    ],
                    None,
                )?;
                if parts.get("type").and_then(Value::as_i64) == Some(1) {
                    parts.get("strVal").cloned().unwrap_or_default()
                } else {
                    parts.get("intVal").cloned().unwrap_or(json!(0))
                }
            }
            (Ty::Msg(inner), Wire::Len(v)) => Value::Object(message(v, inner, None)?),
            (Ty::Strict(name, inner), Wire::Len(v)) => {
                Value::Object(message(v, inner, Some(name))?)
            }
            (ty @ (Ty::MapStr | Ty::MapBytes), Wire::Len(v)) => {
                let value_ty = if matches!(ty, Ty::MapStr) {
                    Ty::Str
                } else {
                    Ty::Bytes
                };
                let entry = message(v, &[f(1, "k", Ty::Str), f(2, "v", value_ty)], None)?;
                let key = entry
                    .get("k")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let value = entry.get("v").cloned().unwrap_or_else(|| json!(""));
                let map = out
                    .entry(field.name)
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Some(map) = map.as_object_mut() {
                    map.insert(key, value);
                }
                continue;
            }
            _ => {
                return Err(DecodeError::Malformed(format!(
                    "field {} has an unexpected wire type",
                    field.name
                )))
            }
        };
        if field.repeated {
            let list = out
                .entry(field.name)
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Some(list) = list.as_array_mut() {
                list.push(value);
            }
        } else {
            out.insert(field.name.to_string(), value);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal protobuf writer for the tests.
    fn key(tag: u64, wire: u64, out: &mut Vec<u8>) {
        varint((tag << 3) | wire, out);
    }
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn bytes(tag: u64, data: &[u8], out: &mut Vec<u8>) {
        key(tag, 2, out);
        varint(data.len() as u64, out);
        out.extend_from_slice(data);
    }

    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let mut type_meta = Vec::new();
        bytes(1, api_version.as_bytes(), &mut type_meta);
        bytes(2, kind.as_bytes(), &mut type_meta);
        let mut unknown = Vec::new();
        bytes(1, &type_meta, &mut unknown);
        bytes(2, raw, &mut unknown);
        let mut body = MAGIC.to_vec();
        body.extend(unknown);
        body
    }

    #[test]
    fn config_maps_decode_with_metadata_and_maps() {
        let mut meta = Vec::new();
        bytes(1, b"web", &mut meta);
        let mut label = Vec::new();
        bytes(1, b"app", &mut label);
        bytes(2, b"web", &mut label);
        bytes(11, &label, &mut meta);
        let mut cm = Vec::new();
        bytes(1, &meta, &mut cm);
        for (k, v) in [("a", "1"), ("b", "2")] {
            let mut entry = Vec::new();
            bytes(1, k.as_bytes(), &mut entry);
            bytes(2, v.as_bytes(), &mut entry);
            bytes(2, &entry, &mut cm);
        }
        key(4, 0, &mut cm);
        varint(1, &mut cm);
        let value = decode(&envelope("v1", "ConfigMap", &cm)).unwrap();
        assert_eq!(
            value,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "immutable": true,
                   "metadata": {"name": "web", "labels": {"app": "web"}},
                   "data": {"a": "1", "b": "2"}})
        );
    }

    /// A Job as Go encodes it: every non-pointer field written, zero or not.
    fn job(extra_pod_spec_field: Option<(u64, &[u8])>) -> Vec<u8> {
        let mut container = Vec::new();
        bytes(1, b"hello", &mut container);
        bytes(2, b"busybox", &mut container);
        bytes(3, b"echo", &mut container);
        bytes(3, b"hi", &mut container);
        bytes(5, b"", &mut container); // workingDir
        bytes(8, b"", &mut container); // resources {}
        key(16, 0, &mut container); // stdin false
        varint(0, &mut container);
        let mut pod_spec = Vec::new();
        bytes(2, &container, &mut pod_spec);
        bytes(3, b"Never", &mut pod_spec);
        key(11, 0, &mut pod_spec); // hostNetwork false
        varint(0, &mut pod_spec);
        if let Some((tag, value)) = extra_pod_spec_field {
            bytes(tag, value, &mut pod_spec);
        }
        let mut template_meta = Vec::new();
        bytes(8, b"", &mut template_meta); // a zero creationTimestamp
        key(7, 0, &mut template_meta); // generation 0
        varint(0, &mut template_meta);
        let mut template = Vec::new();
        bytes(1, &template_meta, &mut template);
        bytes(2, &pod_spec, &mut template);
        let mut spec = Vec::new();
        key(7, 0, &mut spec); // backoffLimit 0: set, and kept
        varint(0, &mut spec);
        bytes(6, &template, &mut spec);
        let mut meta = Vec::new();
        bytes(1, b"hello", &mut meta);
        let mut object = Vec::new();
        bytes(1, &meta, &mut object);
        bytes(2, &spec, &mut object);
        envelope("batch/v1", "Job", &object)
    }

    #[test]
    fn jobs_decode_as_kubectl_create_job_sends_them_and_unknown_fields_are_refused() {
        let value = decode(&job(None)).unwrap();
        assert_eq!(
            value,
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "hello"},
                   "spec": {"backoffLimit": 0, "template": {"metadata": {}, "spec": {
                       "containers": [{"name": "hello", "image": "busybox",
                                       "command": ["echo", "hi"]}],
                       "restartPolicy": "Never"}}}})
        );
        // An empty field this server does not read is Go's zero value: nothing is lost.
        assert!(decode(&job(Some((18, b"")))).is_ok());
        // A set one (affinity, field 18) would be lost: refused.
        let refused = decode(&job(Some((18, b"\x0a\x00"))));
        assert_eq!(
            refused,
            Err(DecodeError::Unsupported(
                "PodSpec field 18 in protobuf (send application/json)".into()
            ))
        );
    }

    #[test]
    fn unknown_kinds_and_garbage_are_refused() {
        assert!(matches!(
            decode(&envelope("apps/v1", "Deployment", &[])),
            Err(DecodeError::Unsupported(_))
        ));
        assert!(matches!(decode(b"{}"), Err(DecodeError::Malformed(_))));
        let mut truncated = envelope("v1", "ConfigMap", &[]);
        truncated.extend([0x12, 0x05, 0x01]);
        assert!(matches!(decode(&truncated), Err(DecodeError::Malformed(_))));
    }
}
