//! What the API server does to objects of each kind on the way in: defaulting and validation on
//! create, and on update the rules about what a write may change (server-owned metadata, the
//! status subresource, immutable fields).

use serde_json::{json, Value};

use super::{resources::Resource, status::ApiError};

/// Causes of a 422: (field path, message), worded as Kubernetes words them.
type Causes = Vec<(String, String)>;

fn required(causes: &mut Causes, field: &str) {
    causes.push((field.to_string(), "Required value".to_string()));
}

fn invalid(kind: &str, object: &Value, causes: Causes) -> Result<(), ApiError> {
    if causes.is_empty() {
        Ok(())
    } else {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        Err(ApiError::invalid(kind, name, causes))
    }
}

fn set_default(object: &mut Value, field: &str, value: Value) {
    if object.get(field).is_none_or(Value::is_null) {
        object[field] = value;
    }
}

/// Whether `name` is a DNS-1123 label (container and port names).
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Defaults and validation for a new object (metadata is already settled).
pub fn prepare_create(resource: &Resource, object: &mut Value) -> Result<(), ApiError> {
    match resource.kind {
        "Pod" => {
            object["status"] = json!({"phase": "Pending"});
            default_pod_spec(&mut object["spec"]);
            let causes = validate_pod_spec(&object["spec"], "spec");
            object["status"]["qosClass"] = qos_class(&object["spec"]).into();
            invalid("Pod", object, causes)
        }
        "Service" => {
            object["status"] = json!({"loadBalancer": {}});
            default_service_spec(&mut object["spec"]);
            let causes = validate_service_spec(&object["spec"]);
            invalid("Service", object, causes)
        }
        "ServiceCIDR" => {
            let causes = validate_service_cidr(&object["spec"]);
            invalid("ServiceCIDR", object, causes)?;
            // Ready is the service-cidr controller's to say.
            object["status"] = json!({});
            Ok(())
        }
        "IPAddress" => {
            let causes = validate_ip_address(object);
            invalid("IPAddress", object, causes)
        }
        "Namespace" => {
            object["status"] = json!({"phase": "Active"});
            object["spec"] = json!({"finalizers": ["kubernetes"]});
            Ok(())
        }
        "Node" => {
            if !object["spec"].is_object() {
                object["spec"] = json!({});
            }
            Ok(())
        }
        "Job" => {
            object["status"] = json!({});
            prepare_job(object)
        }
        "Secret" => prepare_secret(object),
        "Role" | "ClusterRole" => {
            let mut causes = Causes::new();
            for (i, rule) in object["rules"].as_array().into_iter().flatten().enumerate() {
                if rule["verbs"].as_array().is_none_or(Vec::is_empty) {
                    required(&mut causes, &format!("rules[{i}].verbs"));
                }
                let resources = rule["resources"].as_array().is_some_and(|r| !r.is_empty());
                let urls = rule["nonResourceURLs"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty());
                if !resources && !urls {
                    causes.push((
                        format!("rules[{i}].resources"),
                        "Required value: resource rules must supply at least one resource".into(),
                    ));
                }
            }
            invalid(resource.kind, object, causes)
        }
        "RoleBinding" | "ClusterRoleBinding" => {
            let mut causes = Causes::new();
            let allowed: &[&str] = if resource.kind == "RoleBinding" {
                &["Role", "ClusterRole"]
            } else {
                &["ClusterRole"]
            };
            match object["roleRef"]["kind"].as_str() {
                Some(kind) if allowed.contains(&kind) => {}
                Some(kind) => causes.push((
                    "roleRef.kind".into(),
                    format!("Unsupported value: {kind:?}: supported values: {allowed:?}"),
                )),
                None => required(&mut causes, "roleRef.kind"),
            }
            if object["roleRef"]["name"].as_str().is_none_or(str::is_empty) {
                required(&mut causes, "roleRef.name");
            }
            for (i, subject) in object["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                if subject["name"].as_str().is_none_or(str::is_empty) {
                    required(&mut causes, &format!("subjects[{i}].name"));
                }
                if !matches!(
                    subject["kind"].as_str(),
                    Some("User" | "Group" | "ServiceAccount")
                ) {
                    causes.push((
                        format!("subjects[{i}].kind"),
                        format!(
                            "Unsupported value: {}: supported values: \"ServiceAccount\", \"User\", \"Group\"",
                            subject["kind"]
                        ),
                    ));
                }
            }
            invalid(resource.kind, object, causes)
        }
        "EndpointSlice" => {
            let mut causes = Causes::new();
            match object["addressType"].as_str() {
                Some("IPv4" | "IPv6" | "FQDN") => {}
                Some(other) => causes.push((
                    "addressType".into(),
                    format!("Unsupported value: {other:?}: supported values: \"FQDN\", \"IPv4\", \"IPv6\""),
                )),
                None => required(&mut causes, "addressType"),
            }
            if !object["endpoints"].is_array() {
                object["endpoints"] = json!([]);
            }
            invalid("EndpointSlice", object, causes)
        }
        _ => Ok(()),
    }
}

fn default_pod_spec(spec: &mut Value) {
    if !spec.is_object() {
        *spec = json!({});
    }
    set_default(spec, "restartPolicy", "Always".into());
    set_default(spec, "terminationGracePeriodSeconds", 30.into());
    set_default(spec, "dnsPolicy", "ClusterFirst".into());
    set_default(spec, "schedulerName", "default-scheduler".into());
    set_default(spec, "serviceAccountName", "default".into());
    set_default(spec, "securityContext", json!({}));
    set_default(spec, "enableServiceLinks", true.into());
    set_default(spec, "priority", 0.into());
    set_default(spec, "preemptionPolicy", "PreemptLowerPriority".into());
    // DefaultTolerationSeconds: 300 s for each of not-ready and unreachable that the Pod does
    // not tolerate already (by that key or an empty one, with NoExecute or any effect).
    if !spec["tolerations"].is_array() {
        spec["tolerations"] = json!([]);
    }
    if let Some(list) = spec["tolerations"].as_array_mut() {
        for key in [
            "node.kubernetes.io/not-ready",
            "node.kubernetes.io/unreachable",
        ] {
            let tolerated = list.iter().any(|t| {
                matches!(t["key"].as_str(), None | Some("")) || t["key"].as_str() == Some(key)
            } && matches!(t["effect"].as_str(), None | Some("") | Some("NoExecute")));
            if !tolerated {
                list.push(
                    json!({"key": key, "operator": "Exists", "effect": "NoExecute",
                    "tolerationSeconds": 300}),
                );
            }
        }
    }
    for list in ["containers", "initContainers"] {
        if let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) {
            for c in containers {
                let image = c["image"].as_str().unwrap_or_default();
                let tag = image.rsplit('/').next().unwrap_or_default();
                let pull =
                    if image.contains('@') || (tag.contains(':') && !tag.ends_with(":latest")) {
                        "IfNotPresent"
                    } else {
                        "Always"
                    };
                set_default(c, "imagePullPolicy", pull.into());
                set_default(c, "terminationMessagePath", "/dev/termination-log".into());
                set_default(c, "terminationMessagePolicy", "File".into());
                set_default(c, "resources", json!({}));
                if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports {
                        set_default(p, "protocol", "TCP".into());
                    }
                }
            }
        }
    }
}

fn validate_pod_spec(spec: &Value, path: &str) -> Causes {
    let mut causes = Causes::new();
    match spec["containers"].as_array() {
        Some(containers) if !containers.is_empty() => {
            let mut names = Vec::new();
            for (i, c) in containers.iter().enumerate() {
                let at = format!("{path}.containers[{i}]");
                match c["name"].as_str() {
                    None | Some("") => required(&mut causes, &format!("{at}.name")),
                    Some(name) if !is_dns_label(name) => causes.push((
                        format!("{at}.name"),
                        format!("Invalid value: {name:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"),
                    )),
                    Some(name) if names.contains(&name) => causes.push((
                        format!("{at}.name"),
                        format!("Duplicate value: {name:?}"),
                    )),
                    Some(name) => names.push(name),
                }
                if c["image"].as_str().is_none_or(str::is_empty) {
                    required(&mut causes, &format!("{at}.image"));
                }
                for (j, p) in c["ports"].as_array().into_iter().flatten().enumerate() {
                    let port = p["containerPort"].as_i64().unwrap_or(0);
                    if !(1..=65535).contains(&port) {
                        causes.push((
                            format!("{at}.ports[{j}].containerPort"),
                            format!(
                                "Invalid value: {port}: must be between 1 and 65535, inclusive"
                            ),
                        ));
                    }
                }
            }
        }
        _ => required(&mut causes, &format!("{path}.containers")),
    }
    match spec["restartPolicy"].as_str() {
        Some("Always" | "OnFailure" | "Never") | None => {}
        Some(other) => causes.push((
            format!("{path}.restartPolicy"),
            format!("Unsupported value: {other:?}: supported values: \"Always\", \"OnFailure\", \"Never\""),
        )),
    }
    causes
}

/// Guaranteed when every container sets equal CPU and memory requests and limits, BestEffort when
/// none sets any, Burstable otherwise.
fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let any = containers.iter().any(|c| {
        ["requests", "limits"]
            .iter()
            .any(|k| c["resources"][k].as_object().is_some_and(|m| !m.is_empty()))
    });
    if !any {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        ["cpu", "memory"].iter().all(|r| {
            let limit = &c["resources"]["limits"][r];
            let request = &c["resources"]["requests"][r];
            !limit.is_null() && (request.is_null() || request == limit)
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

fn default_service_spec(spec: &mut Value) {
    if !spec.is_object() {
        *spec = json!({});
    }
    set_default(spec, "type", "ClusterIP".into());
    set_default(spec, "sessionAffinity", "None".into());
    let external_name = spec["type"] == "ExternalName";
    if !external_name {
        set_default(spec, "internalTrafficPolicy", "Cluster".into());
        // ipFamilies and ipFamilyPolicy depend on the cluster's ranges: the allocator sets them.
    }
    if matches!(spec["type"].as_str(), Some("NodePort" | "LoadBalancer")) {
        set_default(spec, "externalTrafficPolicy", "Cluster".into());
    }
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports {
            set_default(p, "protocol", "TCP".into());
            if p.get("targetPort").is_none_or(Value::is_null) {
                p["targetPort"] = p["port"].clone();
            }
        }
    }
}

/// A ServiceCIDR's `spec.cidrs`: one range, or two of different families.
fn validate_service_cidr(spec: &Value) -> Causes {
    let mut causes = Causes::new();
    let cidrs: Vec<&str> = spec["cidrs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if cidrs.is_empty() {
        required(&mut causes, "spec.cidrs");
    }
    if cidrs.len() > 2 {
        causes.push((
            "spec.cidrs".into(),
            format!("Too many: {}: must have at most 2 items", cidrs.len()),
        ));
    }
    let mut families = Vec::new();
    for (i, cidr) in cidrs.iter().enumerate() {
        match super::alloc::IpRange::parse(cidr) {
            Ok(range) if families.contains(&range.family) => causes.push((
                "spec.cidrs".into(),
                format!("Invalid value: {cidrs:?}: may specify no more than one IP for each IP family, i.e 192.168.0.0/24 and 2001:db8::/64"),
            )),
            Ok(range) => families.push(range.family),
            Err(e) => causes.push((
                format!("spec.cidrs[{i}]"),
                format!("Invalid value: {cidr:?}: {e}"),
            )),
        }
    }
    causes
}

/// An IPAddress: named by an address in canonical form, with a parentRef.
fn validate_ip_address(object: &Value) -> Causes {
    let mut causes = Causes::new();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.to_string() == name => {}
        Ok(ip) => causes.push((
            "metadata.name".into(),
            format!("Invalid value: {name:?}: must be a canonical format IP address ({ip})"),
        )),
        Err(_) => causes.push((
            "metadata.name".into(),
            format!("Invalid value: {name:?}: must be a valid IP address"),
        )),
    }
    let parent = &object["spec"]["parentRef"];
    if !parent.is_object() {
        required(&mut causes, "spec.parentRef");
    } else {
        for field in ["resource", "name"] {
            if parent[field].as_str().is_none_or(str::is_empty) {
                required(&mut causes, &format!("spec.parentRef.{field}"));
            }
        }
    }
    causes
}

fn validate_service_spec(spec: &Value) -> Causes {
    let mut causes = Causes::new();
    let kind = spec["type"].as_str().unwrap_or("ClusterIP");
    if !matches!(
        kind,
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        causes.push((
            "spec.type".into(),
            format!("Unsupported value: {kind:?}: supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""),
        ));
    }
    if kind == "ExternalName" && spec["externalName"].as_str().is_none_or(str::is_empty) {
        required(&mut causes, "spec.externalName");
    }
    let headless = spec["clusterIP"] == "None";
    let ports = spec["ports"].as_array().cloned().unwrap_or_default();
    if ports.is_empty() && !headless && kind != "ExternalName" {
        required(&mut causes, "spec.ports");
    }
    let mut names = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        let port = p["port"].as_i64().unwrap_or(0);
        if !(1..=65535).contains(&port) {
            causes.push((
                format!("{at}.port"),
                format!("Invalid value: {port}: must be between 1 and 65535, inclusive"),
            ));
        }
        match p["protocol"].as_str() {
            Some("TCP" | "UDP" | "SCTP") => {}
            other => causes.push((
                format!("{at}.protocol"),
                format!(
                    "Unsupported value: {:?}: supported values: \"SCTP\", \"TCP\", \"UDP\"",
                    other.unwrap_or_default()
                ),
            )),
        }
        let name = p["name"].as_str().unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            required(&mut causes, &format!("{at}.name"));
        } else if !name.is_empty() {
            if names.contains(&name) {
                causes.push((format!("{at}.name"), format!("Duplicate value: {name:?}")));
            }
            names.push(name);
        }
        if let Some(node_port) = p["nodePort"].as_i64() {
            if !matches!(kind, "NodePort" | "LoadBalancer") && node_port != 0 {
                causes.push((
                    format!("{at}.nodePort"),
                    "Forbidden: may not be used when `type` is 'ClusterIP'".into(),
                ));
            }
        }
    }
    match spec["sessionAffinity"].as_str() {
        Some("None" | "ClientIP") | None => {}
        Some(other) => causes.push((
            "spec.sessionAffinity".into(),
            format!("Unsupported value: {other:?}: supported values: \"ClientIP\", \"None\""),
        )),
    }
    causes
}

fn prepare_job(job: &mut Value) -> Result<(), ApiError> {
    let uid = job["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let name = job["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !job["spec"].is_object() {
        job["spec"] = json!({});
    }
    let spec = &mut job["spec"];
    set_default(spec, "parallelism", 1.into());
    set_default(spec, "completions", 1.into());
    set_default(spec, "backoffLimit", 6.into());
    set_default(spec, "completionMode", "NonIndexed".into());
    set_default(spec, "suspend", false.into());
    set_default(spec, "podReplacementPolicy", "TerminatingOrFailed".into());
    // The selector and template labels tie the Job's pods to it, as kube-apiserver generates them.
    if spec["manualSelector"] != true {
        let labels = json!({"batch.kubernetes.io/controller-uid": uid, "controller-uid": uid,
                            "batch.kubernetes.io/job-name": name, "job-name": name});
        spec["selector"] = json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
        if !spec["template"]["metadata"].is_object() {
            spec["template"]["metadata"] = json!({});
        }
        let template_labels = &mut spec["template"]["metadata"]["labels"];
        if !template_labels.is_object() {
            *template_labels = json!({});
        }
        if let (Some(target), Some(extra)) = (template_labels.as_object_mut(), labels.as_object()) {
            for (k, v) in extra {
                target.insert(k.clone(), v.clone());
            }
        }
    }
    default_pod_spec(&mut spec["template"]["spec"]);
    let mut causes = validate_pod_spec(&spec["template"]["spec"], "spec.template.spec");
    if !matches!(
        spec["template"]["spec"]["restartPolicy"].as_str(),
        Some("OnFailure" | "Never")
    ) {
        causes.push((
            "spec.template.spec.restartPolicy".into(),
            "Required value: valid values: \"OnFailure\", \"Never\"".into(),
        ));
    }
    for field in ["parallelism", "completions", "backoffLimit"] {
        if spec[field].as_i64().is_some_and(|v| v < 0) {
            causes.push((
                format!("spec.{field}"),
                format!(
                    "Invalid value: {}: must be greater than or equal to 0",
                    spec[field]
                ),
            ));
        }
    }
    invalid("Job", job, causes)
}

/// `stringData` is folded into `data` (base64), and `data` must be base64.
fn prepare_secret(secret: &mut Value) -> Result<(), ApiError> {
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::STANDARD;
    set_default(secret, "type", "Opaque".into());
    if let Some(strings) = secret.as_object_mut().and_then(|o| o.remove("stringData")) {
        if !secret["data"].is_object() {
            secret["data"] = json!({});
        }
        for (k, v) in strings.as_object().into_iter().flatten() {
            secret["data"][k] = engine.encode(v.as_str().unwrap_or_default()).into();
        }
    }
    let mut causes = Causes::new();
    for (k, v) in secret["data"].as_object().into_iter().flatten() {
        if v.as_str().is_none_or(|s| engine.decode(s).is_err()) {
            causes.push((
                format!("data[{k}]"),
                "Invalid value: \"<secret contents redacted>\": illegal base64 data".into(),
            ));
        }
    }
    invalid("Secret", secret, causes)
}

/// Kinds whose status is written only through the status subresource.
pub fn has_status_subresource(kind: &str) -> bool {
    matches!(kind, "Namespace" | "Node" | "Pod" | "Service" | "Job")
}

/// The object an update writes, from what is stored and what the client sent: metadata the server
/// owns is kept, a status-subresource write changes only the status (and a main write never
/// does), immutable fields stay as they were.
pub fn prepare_update(
    resource: &Resource,
    subresource: Option<&str>,
    current: &Value,
    mut new: Value,
) -> Result<Value, ApiError> {
    if !new["metadata"].is_object() {
        new["metadata"] = json!({});
    }
    for field in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generateName",
        "managedFields",
    ] {
        match current["metadata"].get(field) {
            Some(v) => new["metadata"][field] = v.clone(),
            None => {
                if let Some(meta) = new["metadata"].as_object_mut() {
                    meta.remove(field);
                }
            }
        }
    }
    new["kind"] = current["kind"].clone();
    new["apiVersion"] = current["apiVersion"].clone();
    if subresource == Some("status") {
        let mut object = current.clone();
        object["status"] = new["status"].clone();
        if let Some(rv) = new["metadata"].get("resourceVersion") {
            object["metadata"]["resourceVersion"] = rv.clone();
        }
        return Ok(object);
    }
    if has_status_subresource(resource.kind) {
        match current.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => {
                if let Some(o) = new.as_object_mut() {
                    o.remove("status");
                }
            }
        }
    }
    match resource.kind {
        "Pod" => {
            default_pod_spec(&mut new["spec"]);
            let mut stored = current["spec"].clone();
            default_pod_spec(&mut stored);
            let causes = pod_update_causes(&stored, &new["spec"]);
            invalid("Pod", &new, causes)?;
        }
        "ServiceCIDR" => {
            // A range may gain its other family; it never loses or changes one.
            let (old, sent) = (&current["spec"]["cidrs"], &new["spec"]["cidrs"]);
            let grows = old.as_array().is_some_and(|o| o.len() == 1)
                && sent
                    .as_array()
                    .is_some_and(|n| n.len() == 2 && n[0] == old[0]);
            let mut causes = validate_service_cidr(&new["spec"]);
            if sent != old && !grows {
                causes.push((
                    "spec.cidrs".into(),
                    format!("Invalid value: {sent}: field is immutable"),
                ));
            }
            invalid("ServiceCIDR", &new, causes)?;
        }
        "IPAddress" if new["spec"] != current["spec"] => {
            invalid(
                "IPAddress",
                &new,
                vec![(
                    "spec.parentRef".into(),
                    "Invalid value: field is immutable".into(),
                )],
            )?;
        }
        "Service" => {
            // An update that leaves the cluster IP out keeps it; one that changes it is refused.
            let spec = &mut new["spec"];
            if !spec.is_object() {
                *spec = json!({});
            }
            for field in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
                if spec.get(field).is_none_or(Value::is_null)
                    || spec[field] == "" && current["spec"][field] != ""
                {
                    spec[field] = current["spec"][field].clone();
                }
            }
            default_service_spec(spec);
            let mut causes = validate_service_spec(spec);
            if spec["clusterIP"] != current["spec"]["clusterIP"]
                && spec["type"] != "ExternalName"
                && current["spec"]["type"] != "ExternalName"
            {
                causes.push((
                    "spec.clusterIPs[0]".into(),
                    format!(
                        "Invalid value: {}: may not change once set",
                        spec["clusterIP"]
                    ),
                ));
            }
            invalid("Service", &new, causes)?;
        }
        "Job" => {
            for field in ["selector", "completions", "completionMode"] {
                if new["spec"].get(field).is_none_or(Value::is_null) {
                    new["spec"][field] = current["spec"][field].clone();
                } else if new["spec"][field] != current["spec"][field] {
                    invalid(
                        "Job",
                        &new,
                        vec![(
                            format!("spec.{field}"),
                            "Invalid value: field is immutable".into(),
                        )],
                    )?;
                }
            }
        }
        "Secret" => prepare_secret(&mut new)?,
        "RoleBinding" | "ClusterRoleBinding" if new["roleRef"] != current["roleRef"] => {
            invalid(
                resource.kind,
                &new,
                vec![(
                    "roleRef".into(),
                    format!("Invalid value: {}: cannot change roleRef", new["roleRef"]),
                )],
            )?;
        }
        _ => {}
    }
    Ok(new)
}

/// A pod's spec may change only in container images, activeDeadlineSeconds, added tolerations
/// and terminationGracePeriodSeconds (Kubernetes' rule); everything else is refused.
fn pod_update_causes(current: &Value, new: &Value) -> Causes {
    let strip = |spec: &Value| {
        let mut spec = spec.clone();
        for list in ["containers", "initContainers"] {
            if let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) {
                for c in containers {
                    if let Some(c) = c.as_object_mut() {
                        c.remove("image");
                    }
                }
            }
        }
        if let Some(o) = spec.as_object_mut() {
            for field in [
                "activeDeadlineSeconds",
                "tolerations",
                "terminationGracePeriodSeconds",
            ] {
                o.remove(field);
            }
        }
        spec
    };
    if strip(current) == strip(new) {
        Causes::new()
    } else {
        vec![(
            "spec".into(),
            "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, \
             `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` \
             (only additions to existing tolerations) or `spec.terminationGracePeriodSeconds` \
             (allow it to be set to 1 if it was previously negative)"
                .into(),
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::resources::find;

    #[test]
    fn pods_are_defaulted_and_validated() {
        let pods = find("", "v1", "pods").unwrap();
        let mut pod = json!({"metadata": {"name": "p"},
                             "spec": {"containers": [{"name": "c", "image": "nginx:1.27"}]}});
        prepare_create(pods, &mut pod).unwrap();
        assert_eq!(pod["spec"]["restartPolicy"], "Always");
        assert_eq!(
            pod["spec"]["containers"][0]["imagePullPolicy"],
            "IfNotPresent"
        );
        assert_eq!(pod["status"]["phase"], "Pending");
        assert_eq!(pod["status"]["qosClass"], "BestEffort");
        // DefaultTolerationSeconds: 300 s for not-ready and unreachable, unless tolerated
        // already by key or by an empty key (which tolerates every taint).
        let keys = |pod: &Value| -> Vec<(String, Value)> {
            pod["spec"]["tolerations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t["key"].as_str().unwrap_or("").to_string(),
                        t["tolerationSeconds"].clone(),
                    )
                })
                .collect()
        };
        assert_eq!(
            keys(&pod),
            [
                ("node.kubernetes.io/not-ready".to_string(), json!(300)),
                ("node.kubernetes.io/unreachable".to_string(), json!(300)),
            ]
        );
        let mut own = json!({"metadata": {"name": "p"}, "spec": {
            "containers": [{"name": "c", "image": "nginx:1.27"}],
            "tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 5}]}});
        prepare_create(pods, &mut own).unwrap();
        assert_eq!(
            keys(&own),
            [
                ("node.kubernetes.io/unreachable".to_string(), json!(5)),
                ("node.kubernetes.io/not-ready".to_string(), json!(300)),
            ]
        );
        let mut all = json!({"metadata": {"name": "p"}, "spec": {
            "containers": [{"name": "c", "image": "nginx:1.27"}],
            "tolerations": [{"operator": "Exists"}]}});
        prepare_create(pods, &mut all).unwrap();
        assert_eq!(keys(&all), [(String::new(), Value::Null)]);
        let mut no_schedule = json!({"metadata": {"name": "p"}, "spec": {
            "containers": [{"name": "c", "image": "nginx:1.27"}],
            "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}]}});
        prepare_create(pods, &mut no_schedule).unwrap();
        assert_eq!(
            keys(&no_schedule).len(),
            3,
            "NoSchedule only: the defaults still added"
        );
        let mut bad = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "C"}]}});
        let err = prepare_create(pods, &mut bad).unwrap_err();
        assert!(
            err.message
                .contains("spec.containers[0].image: Required value"),
            "{}",
            err.message
        );
        assert!(
            err.message
                .contains("spec.containers[0].name: Invalid value"),
            "{}",
            err.message
        );
    }

    #[test]
    fn status_writes_change_only_the_status() {
        let pods = find("", "v1", "pods").unwrap();
        let current = json!({"kind": "Pod", "apiVersion": "v1",
                             "metadata": {"name": "p", "uid": "u", "labels": {"a": "1"}},
                             "spec": {"containers": [{"name": "c", "image": "x"}]},
                             "status": {"phase": "Pending"}});
        let mut sent = current.clone();
        sent["status"]["phase"] = "Running".into();
        sent["metadata"]["labels"]["a"] = "2".into();
        let out = prepare_update(pods, Some("status"), &current, sent.clone()).unwrap();
        assert_eq!(out["status"]["phase"], "Running");
        assert_eq!(out["metadata"]["labels"]["a"], "1");
        let out = prepare_update(pods, None, &current, sent).unwrap();
        assert_eq!(out["status"]["phase"], "Pending");
        assert_eq!(out["metadata"]["labels"]["a"], "2");
    }

    #[test]
    fn service_cluster_ips_are_immutable() {
        let services = find("", "v1", "services").unwrap();
        let current = json!({"kind": "Service", "apiVersion": "v1", "metadata": {"name": "s"},
                             "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                                      "ports": [{"port": 80}]}});
        let mut sent = current.clone();
        sent["spec"]["clusterIP"] = "".into();
        let kept = prepare_update(services, None, &current, sent).unwrap();
        assert_eq!(kept["spec"]["clusterIP"], "10.96.0.10");
        let mut sent = current.clone();
        sent["spec"]["clusterIP"] = "10.96.0.11".into();
        assert!(prepare_update(services, None, &current, sent).is_err());
    }
}
