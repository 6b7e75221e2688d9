//! Node selector terms (node affinity) and taint tolerations, with the API's rules (as
//! component-helpers' scheduling/corev1): node selector terms are ORed and an empty term
//! matches nothing.

use k8s_openapi::api::core::v1::{NodeSelectorRequirement, NodeSelectorTerm, Taint, Toleration};

use crate::labels::{Labels, Requirement};

/// A node selector requirement as a label requirement; None for an unknown operator or a `Gt`
/// or `Lt` without exactly one integer, which match no node.
fn node_requirement(r: &NodeSelectorRequirement) -> Option<Requirement> {
    let values = r.values.clone().unwrap_or_default();
    let key = r.key.clone();
    let bound = || match values.as_slice() {
        [one] => one.trim().parse::<i64>().ok(),
        _ => None,
    };
    Some(match r.operator.as_str() {
        "In" => Requirement::In(key, values),
        "NotIn" => Requirement::NotIn(key, values),
        "Exists" => Requirement::Exists(key),
        "DoesNotExist" => Requirement::DoesNotExist(key),
        "Gt" => Requirement::Gt(key, bound()?),
        "Lt" => Requirement::Lt(key, bound()?),
        _ => return None,
    })
}

fn node_requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    node_requirement(r).is_some_and(|req| req.matches_value(value))
}

/// Whether a node (its name and labels) matches one node selector term: every expression on
/// its labels and every field (`metadata.name`) on its name; a term with neither matches no
/// node.
pub fn term_matches(term: &NodeSelectorTerm, name: &str, labels: &Labels) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    expressions
        .iter()
        .all(|e| node_requirement_matches(e, labels.get(&e.key).map(String::as_str)))
        && fields
            .iter()
            .all(|f| f.key == "metadata.name" && node_requirement_matches(f, Some(name)))
}

/// Whether `toleration` tolerates `taint` (core/v1 `Toleration.ToleratesTaint`).
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect = toleration.effect.as_deref().unwrap_or_default();
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or_default();
    if !key.is_empty() && key != taint.key {
        return false;
    }
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => true,
        "" | "Equal" => {
            toleration.value.as_deref().unwrap_or_default()
                == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

pub fn tolerated(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| tolerates(t, taint))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn node_req(key: &str, op: &str, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn node_selector_terms_match_labels_and_names() {
        let l = labels(&[("disk", "ssd"), ("gpus", "4")]);
        let term = |reqs: Vec<NodeSelectorRequirement>| NodeSelectorTerm {
            match_expressions: Some(reqs),
            match_fields: None,
        };
        assert!(term_matches(
            &term(vec![node_req("disk", "In", &["ssd", "nvme"])]),
            "n",
            &l
        ));
        assert!(!term_matches(
            &term(vec![node_req("disk", "NotIn", &["ssd"])]),
            "n",
            &l
        ));
        assert!(term_matches(
            &term(vec![node_req("zone", "NotIn", &["a"])]),
            "n",
            &l
        ));
        assert!(term_matches(
            &term(vec![node_req("gpus", "Gt", &["2"])]),
            "n",
            &l
        ));
        assert!(!term_matches(
            &term(vec![node_req("gpus", "Lt", &["2"])]),
            "n",
            &l
        ));
        assert!(term_matches(
            &term(vec![node_req("zone", "DoesNotExist", &[])]),
            "n",
            &l
        ));
        assert!(!term_matches(&term(vec![]), "n", &l), "an empty term");
        let by_name = NodeSelectorTerm {
            match_expressions: None,
            match_fields: Some(vec![node_req("metadata.name", "In", &["n"])]),
        };
        assert!(term_matches(&by_name, "n", &l));
        assert!(!term_matches(&by_name, "m", &l));
    }

    #[test]
    fn tolerations_match_key_value_and_effect() {
        let taint = Taint {
            key: "dedicated".into(),
            value: Some("gpu".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        };
        let t = |key: Option<&str>, op: Option<&str>, value: Option<&str>, effect: Option<&str>| {
            Toleration {
                key: key.map(Into::into),
                operator: op.map(Into::into),
                value: value.map(Into::into),
                effect: effect.map(Into::into),
                toleration_seconds: None,
            }
        };
        assert!(tolerates(
            &t(Some("dedicated"), None, Some("gpu"), None),
            &taint
        ));
        assert!(!tolerates(
            &t(Some("dedicated"), None, Some("db"), None),
            &taint
        ));
        assert!(tolerates(
            &t(Some("dedicated"), Some("Exists"), None, Some("NoSchedule")),
            &taint
        ));
        assert!(!tolerates(
            &t(Some("dedicated"), Some("Exists"), None, Some("NoExecute")),
            &taint
        ));
        assert!(
            tolerates(&t(None, Some("Exists"), None, None), &taint),
            "tolerates everything"
        );
    }
}
