//! Label selectors with the API's rules, from their two forms: the string form a client sends
//! (`app=web,tier!=db,env in (prod,staging),!legacy`) and the `LabelSelector` object of a spec
//! (`matchLabels` and `matchExpressions`). A null selector object matches nothing and an empty
//! one everything; an empty string matches everything.

use std::{collections::BTreeMap, fmt};

#[cfg(feature = "k8s-openapi")]
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

pub type Labels = BTreeMap<String, String>;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key=value`, `key==value`, `key in (a,b)`: the label is there with one of the values.
    In(String, Vec<String>),
    /// `key!=value`, `key notin (a,b)`: the label is absent or has none of the values.
    NotIn(String, Vec<String>),
    /// `key`
    Exists(String),
    /// `!key`
    DoesNotExist(String),
    /// `key>5`, `key<5`: the label is there and, read as an integer, greater or less.
    Gt(String, i64),
    Lt(String, i64),
}

impl Requirement {
    pub fn key(&self) -> &str {
        match self {
            Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::DoesNotExist(k)
            | Requirement::Gt(k, _)
            | Requirement::Lt(k, _) => k,
        }
    }

    /// Whether a label `value` (None: the label is absent) meets this requirement.
    pub fn matches_value(&self, value: Option<&str>) -> bool {
        let number = || value.and_then(|v| v.parse::<i64>().ok());
        match self {
            Requirement::In(_, values) => value.is_some_and(|v| values.iter().any(|x| x == v)),
            Requirement::NotIn(_, values) => value.is_none_or(|v| !values.iter().any(|x| x == v)),
            Requirement::Exists(_) => value.is_some(),
            Requirement::DoesNotExist(_) => value.is_none(),
            Requirement::Gt(_, bound) => number().is_some_and(|n| n > *bound),
            Requirement::Lt(_, bound) => number().is_some_and(|n| n < *bound),
        }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.matches_value(labels.get(self.key()).map(String::as_str))
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::In(k, v) if v.len() == 1 => write!(f, "{k}={}", v[0]),
            Requirement::NotIn(k, v) if v.len() == 1 => write!(f, "{k}!={}", v[0]),
            Requirement::In(k, v) => write!(f, "{k} in ({})", v.join(",")),
            Requirement::NotIn(k, v) => write!(f, "{k} notin ({})", v.join(",")),
            Requirement::Exists(k) => write!(f, "{k}"),
            Requirement::DoesNotExist(k) => write!(f, "!{k}"),
            Requirement::Gt(k, n) => write!(f, "{k}>{n}"),
            Requirement::Lt(k, n) => write!(f, "{k}<{n}"),
        }
    }
}

/// A label selector: all of its requirements must hold. `None` requirements match nothing (a
/// null or invalid selector object).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    requirements: Option<Vec<Requirement>>,
}

/// Why a selector's string form was refused, in the API server's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unable to parse requirement: {0}")]
pub struct ParseError(String);

impl Selector {
    pub fn everything() -> Self {
        Selector {
            requirements: Some(Vec::new()),
        }
    }

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

    /// A spec's selector object; an expression with an unknown operator makes it select nothing.
    #[cfg(feature = "k8s-openapi")]
    pub fn from_label_selector(selector: Option<&LabelSelector>) -> Self {
        let Some(selector) = selector else {
            return Selector::nothing();
        };
        let mut out = Vec::new();
        for (k, v) in selector.match_labels.iter().flatten() {
            out.push(Requirement::In(k.clone(), vec![v.clone()]));
        }
        for e in selector.match_expressions.iter().flatten() {
            match expression(e) {
                Some(r) => out.push(r),
                None => return Selector::nothing(),
            }
        }
        Selector {
            requirements: Some(out),
        }
    }

    /// The string form, as `kubectl get -l` sends it.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let requirements = split_requirements(text)?
            .into_iter()
            .map(parse_requirement)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Selector {
            requirements: Some(requirements),
        })
    }

    pub fn push(&mut self, r: Requirement) {
        if let Some(reqs) = &mut self.requirements {
            reqs.push(r);
        }
    }

    /// Adds every requirement of `other` (both must then hold).
    pub fn extend(&mut self, other: Selector) {
        match (&mut self.requirements, other.requirements) {
            (Some(mine), Some(theirs)) => mine.extend(theirs),
            (_, None) => self.requirements = None,
            (None, Some(_)) => {}
        }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.matches_by(|k| labels.get(k).map(String::as_str))
    }

    /// Matches labels looked up by `label` (for objects that are not a `Labels` map).
    pub fn matches_by<'a>(&self, label: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.requirements
            .as_ref()
            .is_some_and(|reqs| reqs.iter().all(|r| r.matches_value(label(r.key()))))
    }

    /// A null or invalid selector object: it matches no labels at all.
    pub fn is_nothing(&self) -> bool {
        self.requirements.is_none()
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.as_ref().is_some_and(Vec::is_empty)
    }

    pub fn requirements(&self) -> &[Requirement] {
        self.requirements.as_deref().unwrap_or_default()
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(reqs) = &self.requirements else {
            return write!(f, "<none>");
        };
        let parts: Vec<String> = reqs.iter().map(ToString::to_string).collect();
        write!(f, "{}", parts.join(","))
    }
}

#[cfg(feature = "k8s-openapi")]
fn expression(e: &LabelSelectorRequirement) -> Option<Requirement> {
    let values = e.values.clone().unwrap_or_default();
    Some(match e.operator.as_str() {
        "In" => Requirement::In(e.key.clone(), values),
        "NotIn" => Requirement::NotIn(e.key.clone(), values),
        "Exists" => Requirement::Exists(e.key.clone()),
        "DoesNotExist" => Requirement::DoesNotExist(e.key.clone()),
        _ => return None,
    })
}

/// The requirements of a selector string: split at commas outside parentheses.
fn split_requirements(text: &str) -> Result<Vec<&str>, ParseError> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' if depth == 0 => depth = 1,
            '(' => return Err(ParseError(format!("nested parenthesis in {text:?}"))),
            ')' if depth == 1 => depth = 0,
            ')' => return Err(ParseError(format!("unmatched ')' in {text:?}"))),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(ParseError(format!("unclosed '(' in {text:?}")));
    }
    parts.push(&text[start..]);
    let parts: Vec<&str> = parts.into_iter().map(str::trim).collect();
    if parts.len() == 1 && parts[0].is_empty() {
        return Ok(Vec::new());
    }
    if let Some(empty) = parts.iter().position(|p| p.is_empty()) {
        return Err(ParseError(format!(
            "found an empty requirement at position {empty} of {text:?}"
        )));
    }
    Ok(parts)
}

fn parse_requirement(part: &str) -> Result<Requirement, ParseError> {
    let bad = |why: String| ParseError(format!("{part:?}: {why}"));
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        check_key(key).map_err(bad)?;
        return Ok(Requirement::DoesNotExist(key.to_string()));
    }
    // Set-based: `key in (...)`, `key notin (...)`.
    if let Some(open) = part.find('(') {
        let head = part[..open].trim_end();
        let (key, negated) = if let Some(k) = head.strip_suffix(" notin") {
            (k.trim(), true)
        } else if let Some(k) = head.strip_suffix(" in") {
            (k.trim(), false)
        } else {
            return Err(bad("expected `in` or `notin` before '('".into()));
        };
        check_key(key).map_err(bad)?;
        let inner = part[open + 1..]
            .strip_suffix(')')
            .ok_or_else(|| bad("nothing may follow ')'".into()))?;
        let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
        if inner.trim().is_empty() {
            return Err(bad(
                "for 'in', 'notin' operators, values set can't be empty".into(),
            ));
        }
        for v in &values {
            check_value(v).map_err(bad)?;
        }
        return Ok(if negated {
            Requirement::NotIn(key.to_string(), values)
        } else {
            Requirement::In(key.to_string(), values)
        });
    }
    for (op, negated) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((key, value)) = part.split_once(op) {
            let (key, value) = (key.trim(), value.trim());
            check_key(key).map_err(bad)?;
            check_value(value).map_err(bad)?;
            let values = vec![value.to_string()];
            return Ok(if negated {
                Requirement::NotIn(key.to_string(), values)
            } else {
                Requirement::In(key.to_string(), values)
            });
        }
    }
    for op in ['>', '<'] {
        if let Some((key, value)) = part.split_once(op) {
            let key = key.trim();
            check_key(key).map_err(bad)?;
            let n: i64 = value
                .trim()
                .parse()
                .map_err(|_| bad(format!("for '{op}', the value must be an integer")))?;
            return Ok(if op == '>' {
                Requirement::Gt(key.to_string(), n)
            } else {
                Requirement::Lt(key.to_string(), n)
            });
        }
    }
    check_key(part).map_err(bad)?;
    Ok(Requirement::Exists(part.to_string()))
}

/// A label key: an optional DNS subdomain prefix and `/`, then a name of at most 63 characters.
fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if prefix.is_empty() || prefix.len() > 253 || !prefix.split('.').all(label_ok) {
            return Err(format!(
                "key {key:?}: the prefix must be a DNS subdomain (lower case, '-' and '.')"
            ));
        }
    }
    if name.is_empty() {
        return Err(format!("key {key:?}: the name part must not be empty"));
    }
    check_name(name).map_err(|why| format!("key {key:?}: {why}"))
}

/// A label value: empty, or a name of at most 63 characters.
fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    check_name(value).map_err(|why| format!("value {value:?}: {why}"))
}

fn check_name(name: &str) -> Result<(), String> {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    if name.len() > 63 {
        return Err("must be at most 63 characters".into());
    }
    let edges = name.starts_with(alnum) && name.ends_with(alnum);
    if !edges || !name.chars().all(|c| alnum(c) || "-_.".contains(c)) {
        return Err(
            "must be alphanumeric characters, '-', '_' or '.', starting and ending with an alphanumeric"
                .into(),
        );
    }
    Ok(())
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

    #[test]
    fn the_string_form_parses_equality_sets_existence_and_comparisons() {
        let s = Selector::parse(
            " app = web , tier!=db, env in (prod, staging),zone notin (a),!legacy,gpu,cores>4,mem<9",
        )
        .unwrap();
        assert_eq!(
            s.requirements(),
            [
                Requirement::In("app".into(), vec!["web".into()]),
                Requirement::NotIn("tier".into(), vec!["db".into()]),
                Requirement::In("env".into(), vec!["prod".into(), "staging".into()]),
                Requirement::NotIn("zone".into(), vec!["a".into()]),
                Requirement::DoesNotExist("legacy".into()),
                Requirement::Exists("gpu".into()),
                Requirement::Gt("cores".into(), 4),
                Requirement::Lt("mem".into(), 9),
            ]
        );
        assert_eq!(
            s.to_string(),
            "app=web,tier!=db,env in (prod,staging),zone!=a,!legacy,gpu,cores>4,mem<9"
        );
        assert_eq!(Selector::parse(&s.to_string()).unwrap(), s);
        assert!(Selector::parse("").unwrap().is_everything());
        assert_eq!(
            Selector::parse("example.com/role==x")
                .unwrap()
                .requirements(),
            [Requirement::In("example.com/role".into(), vec!["x".into()])]
        );
        assert_eq!(
            Selector::parse("app=").unwrap().requirements(),
            [Requirement::In("app".into(), vec!["".into()])]
        );
    }

    #[test]
    fn malformed_selectors_are_refused_with_the_part_at_fault() {
        for bad in [
            "app in ()",
            "app in (a,(b))",
            "app in (a",
            "app in a)",
            "app=web,",
            ",app",
            "app inn (a)",
            "-app",
            "app=-x",
            "Example.com/a=b",
            "a/=b",
            "cores>four",
            "app in (a) x",
            &format!("{}=b", "k".repeat(64)),
        ] {
            let e = Selector::parse(bad).expect_err(bad);
            assert!(
                e.to_string().starts_with("unable to parse requirement: "),
                "{e}"
            );
        }
    }

    #[test]
    fn matching_follows_the_api_rules() {
        let l = labels(&[("app", "web"), ("env", "prod"), ("cores", "8")]);
        let yes = |text: &str| Selector::parse(text).unwrap().matches(&l);
        assert!(yes("app in (db,web),env!=dev"));
        assert!(yes("zone notin (a)"), "an absent label is not in any set");
        assert!(yes("zone!=a"));
        assert!(!yes("zone in (a)"));
        assert!(yes("!zone") && !yes("!app") && yes("app"));
        assert!(yes("cores>4") && !yes("cores<4") && !yes("app>1"));
        assert!(yes(""));
    }

    #[test]
    #[cfg(feature = "k8s-openapi")]
    fn selector_objects_follow_the_api_rules() {
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
        let unknown = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "Near".into(),
                values: None,
            }]),
        };
        assert!(!Selector::from_label_selector(Some(&unknown)).matches(&l));
        assert!(!Selector::from_map(&Labels::new()).matches(&l));
        let mut both = Selector::parse("app=db").unwrap();
        both.extend(Selector::parse("tier=front").unwrap());
        assert!(!both.matches(&l));
    }
}
