//! Label selectors (`matchLabels` / `matchExpressions`), node selector terms (node affinity) and
//! taint tolerations, with the API's rules: a null label selector matches nothing and an empty
//! one everything; node selector terms are ORed and an empty term matches nothing.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{NodeSelectorRequirement, NodeSelectorTerm, Taint, Toleration},
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement},
};

pub type Labels = BTreeMap<String, String>;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::In(k, values) => labels.get(k).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(k, values) => labels.get(k).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// A parsed label selector; `None` requirements means it matches nothing (an invalid or null
/// selector).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    requirements: Option<Vec<Requirement>>,
}

impl Selector {
    pub fn nothing() -> Self {
        Selector { requirements: None }
    }

    /// `matchLabels` as a map (a Service's selector). An empty map selects nothing, as a
    /// Service without a selector has no pods of its own.
    pub fn from_map(map: &Labels) -> Self {
        if map.is_empty() {
            return Selector::nothing();
        }
        Selector {
            requirements: Some(
                map.iter()
                    .map(|(k, v)| Requirement::In(k.clone(), vec![v.clone()]))
                    .collect(),
            ),
        }
    }

    pub fn from_label_selector(selector: Option<&LabelSelector>) -> Self {
        let Some(selector) = selector else {
            return Selector::nothing();
        };
        let mut out = Vec::new();
        for (k, v) in selector.match_labels.iter().flatten() {
            out.push(Requirement::In(k.clone(), vec![v.clone()]));
        }
        for e in selector.match_expressions.iter().flatten() {
            match requirement(e) {
                Some(r) => out.push(r),
                None => return Selector::nothing(),
            }
        }
        Selector {
            requirements: Some(out),
        }
    }

    pub fn push(&mut self, r: Requirement) {
        if let Some(reqs) = &mut self.requirements {
            reqs.push(r);
        }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements
            .as_ref()
            .is_some_and(|reqs| reqs.iter().all(|r| r.matches(labels)))
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.as_ref().is_some_and(Vec::is_empty)
    }
}

fn requirement(e: &LabelSelectorRequirement) -> Option<Requirement> {
    let values = e.values.clone().unwrap_or_default();
    Some(match e.operator.as_str() {
        "In" => Requirement::In(e.key.clone(), values),
        "NotIn" => Requirement::NotIn(e.key.clone(), values),
        "Exists" => Requirement::Exists(e.key.clone()),
        "DoesNotExist" => Requirement::DoesNotExist(e.key.clone()),
        _ => return None,
    })
}

fn node_requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.trim().parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(number),
                values.first().and_then(|b| number(b)),
            ) else {
                return false;
            };
            if values.len() != 1 {
                return false;
            }
            if r.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
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
    fn label_selectors_follow_the_api_rules() {
        let l = labels(&[("app", "db"), ("tier", "back")]);
        assert!(!Selector::from_label_selector(None).matches(&l));
        assert!(Selector::from_label_selector(Some(&LabelSelector::default())).matches(&l));
        let s = LabelSelector {
            match_labels: Some([("app".to_string(), "db".to_string())].into()),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "NotIn".into(),
                values: Some(vec!["front".into()]),
            }]),
        };
        assert!(Selector::from_label_selector(Some(&s)).matches(&l));
        assert!(!Selector::from_label_selector(Some(&s)).matches(&labels(&[("app", "web")])));
        assert!(!Selector::from_map(&Labels::new()).matches(&l));
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
