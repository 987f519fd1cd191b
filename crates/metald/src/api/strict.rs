//! Strict JSON for the VM configuration: protobuf's JSON mapping ignores unknown fields, which
//! would turn a typo like `"vcpus": 4` into a silent default. CreateVm bodies are checked
//! against the known fields (snake_case or camelCase) before decoding.

use serde_json::Value;

/// A known field and what it contains (opaque outside this module).
pub struct Field {
    name: &'static str,
    json_name: &'static str,
    inner: Inner,
}

enum Inner {
    Scalar,
    Message(&'static [Field]),
    Repeated(&'static [Field]),
    /// A map with free-form keys.
    Map,
}

const fn f(name: &'static str, json_name: &'static str, inner: Inner) -> Field {
    Field {
        name,
        json_name,
        inner,
    }
}

const CPU: &[Field] = &[f("vcpu_count", "vcpuCount", Inner::Scalar)];
const MEMORY: &[Field] = &[f("size_bytes", "sizeBytes", Inner::Scalar)];
const IMAGE: &[Field] = &[f("image_id", "imageId", Inner::Scalar)];
const DRIVE: &[Field] = &[
    f("drive_id", "driveId", Inner::Scalar),
    f("image_id", "imageId", Inner::Scalar),
    f("read_only", "readOnly", Inner::Scalar),
];
const RATE_LIMIT: &[Field] = &[
    f(
        "bandwidth_bytes_per_sec",
        "bandwidthBytesPerSec",
        Inner::Scalar,
    ),
    f("burst_bytes", "burstBytes", Inner::Scalar),
];
const NETWORK: &[Field] = &[
    f("rx_rate_limit", "rxRateLimit", Inner::Message(RATE_LIMIT)),
    f("tx_rate_limit", "txRateLimit", Inner::Message(RATE_LIMIT)),
];
const VM_CONFIG: &[Field] = &[
    f("cpu", "cpu", Inner::Message(CPU)),
    f("memory", "memory", Inner::Message(MEMORY)),
    f("kernel", "kernel", Inner::Message(IMAGE)),
    f("rootfs", "rootfs", Inner::Message(IMAGE)),
    f("drives", "drives", Inner::Repeated(DRIVE)),
    f("kernel_args", "kernelArgs", Inner::Scalar),
    f("metadata", "metadata", Inner::Map),
    f("network", "network", Inner::Message(NETWORK)),
];
/// `CreateVmRequest`.
pub const CREATE_VM_REQUEST: &[Field] = &[
    f("config", "config", Inner::Message(VM_CONFIG)),
    f("from_snapshot", "fromSnapshot", Inner::Scalar),
];

/// Why a body was refused: the field path and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrictError {
    /// Path of the offending field.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for StrictError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Parses `body` as JSON and checks that every object key is a known field.
pub fn check(body: &[u8], fields: &'static [Field]) -> Result<(), StrictError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| StrictError {
        field: "body".into(),
        reason: format!("malformed JSON: {e}"),
    })?;
    check_message(&value, fields, "")
}

fn check_message(v: &Value, fields: &'static [Field], path: &str) -> Result<(), StrictError> {
    let obj = match v {
        Value::Object(o) => o,
        // null means "unset", which protobuf JSON allows for any message.
        Value::Null => return Ok(()),
        _ => {
            return Err(StrictError {
                field: display_path(path),
                reason: "must be a JSON object".into(),
            })
        }
    };
    for (key, value) in obj {
        let Some(field) = fields.iter().find(|f| f.name == key || f.json_name == key) else {
            let known: Vec<&str> = fields.iter().map(|f| f.name).collect();
            return Err(StrictError {
                field: join(path, key),
                reason: format!("unknown field (known here: {})", known.join(", ")),
            });
        };
        let here = join(path, field.name);
        match (&field.inner, value) {
            (Inner::Scalar | Inner::Map, _) => {}
            (Inner::Message(sub), _) => check_message(value, sub, &here)?,
            (Inner::Repeated(sub), Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    check_message(item, sub, &format!("{here}[{i}]"))?;
                }
            }
            (Inner::Repeated(_), Value::Null) => {}
            (Inner::Repeated(_), _) => {
                return Err(StrictError {
                    field: here,
                    reason: "must be a JSON array".into(),
                })
            }
        }
    }
    Ok(())
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn display_path(path: &str) -> String {
    if path.is_empty() {
        "body".into()
    } else {
        path.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_readme_request_in_both_spellings() {
        let body = br#"{"config": {"cpu": {"vcpu_count": 2}, "memory": {"sizeBytes": 1073741824},
            "kernel": {"image_id": "k"}, "rootfs": {"imageId": "r"}, "kernelArgs": "quiet",
            "drives": [{"drive_id": "d", "image_id": "x", "read_only": true}],
            "metadata": {"anything": "goes"}}}"#;
        assert_eq!(check(body, CREATE_VM_REQUEST), Ok(()));
    }

    #[test]
    fn names_unknown_fields_with_their_path() {
        let err = check(br#"{"config": {"cpu": {"vcpus": 2}}}"#, CREATE_VM_REQUEST).unwrap_err();
        assert_eq!(err.field, "config.cpu.vcpus");
        assert!(err.reason.contains("known here: vcpu_count"));
        let err = check(
            br#"{"config": {"drives": [{}, {"size": 1}]}}"#,
            CREATE_VM_REQUEST,
        )
        .unwrap_err();
        assert_eq!(err.field, "config.drives[1].size");
        let err = check(br#"{"cfg": {}}"#, CREATE_VM_REQUEST).unwrap_err();
        assert_eq!(err.field, "cfg");
    }

    #[test]
    fn rejects_malformed_json_and_wrong_shapes() {
        assert_eq!(check(b"{", CREATE_VM_REQUEST).unwrap_err().field, "body");
        assert!(check(b"{", CREATE_VM_REQUEST)
            .unwrap_err()
            .reason
            .starts_with("malformed JSON"));
        assert_eq!(check(b"[]", CREATE_VM_REQUEST).unwrap_err().field, "body");
        assert_eq!(
            check(br#"{"config": 3}"#, CREATE_VM_REQUEST)
                .unwrap_err()
                .field,
            "config"
        );
    }
}
