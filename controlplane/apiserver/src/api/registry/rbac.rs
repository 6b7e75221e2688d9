//! RBAC objects: the rules of Roles and ClusterRoles, and the roleRef (fixed once written) and
//! subjects of their bindings. Who may write them (the escalation check) is authorization's, in
//! `security::rbac`.

use serde_json::Value;

use super::strategy::{invalid, required, Causes, Strategy};
use crate::api::status::ApiError;

/// Role or ClusterRole.
pub struct Roles(pub &'static str);

impl Strategy for Roles {
    fn prepare_create(&self, object: &mut Value) -> Result<(), ApiError> {
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
        invalid(self.0, object, causes)
    }
}

/// RoleBinding (to a Role or ClusterRole) or ClusterRoleBinding (to a ClusterRole).
pub struct Bindings {
    pub kind: &'static str,
    pub role_kinds: &'static [&'static str],
}

impl Strategy for Bindings {
    fn prepare_create(&self, object: &mut Value) -> Result<(), ApiError> {
        let mut causes = Causes::new();
        let allowed = self.role_kinds;
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
        invalid(self.kind, object, causes)
    }

    fn prepare_update(&self, current: &Value, new: &mut Value) -> Result<(), ApiError> {
        if new["roleRef"] == current["roleRef"] {
            return Ok(());
        }
        invalid(
            self.kind,
            new,
            vec![(
                "roleRef".into(),
                format!("Invalid value: {}: cannot change roleRef", new["roleRef"]),
            )],
        )
    }
}
