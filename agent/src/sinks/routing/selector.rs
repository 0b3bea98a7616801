//! Kubernetes label selectors (`matchLabels`, `matchExpressions`) for routing protocols: which
//! nodes run a BGP neighbour, an OSPF or a RIP entry. Kubernetes semantics: every `matchLabels`
//! pair and every expression must hold; an empty selector selects every node.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::model::FieldError;

use crate::desired::NodeLabels as Labels;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl NodeSelector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            // As Kubernetes: a node without the key is "not in" any set.
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<RawRequirement>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRequirement {
    key: String,
    operator: String,
    #[serde(default)]
    values: Vec<String>,
}

const KEY_ALLOWED: &str = "a label key: an optional DNS prefix and '/', then 1-63 letters, digits, '-', '_', '.', starting and ending with a letter or digit";
const VALUE_ALLOWED: &str = "a label value: at most 63 letters, digits, '-', '_', '.', starting and ending with a letter or digit";

impl RawSelector {
    /// `field` names the selector (`routing.bgp[0].nodeSelector`).
    pub fn validate(self, field: &str) -> Result<NodeSelector, FieldError> {
        let mut match_labels = BTreeMap::new();
        for (key, value) in self.match_labels {
            label_key(&key, &format!("{field}.matchLabels"))?;
            label_value(&value, &format!("{field}.matchLabels.{key}"))?;
            match_labels.insert(key, value);
        }
        let mut match_expressions = Vec::new();
        for (i, raw) in self.match_expressions.into_iter().enumerate() {
            let at = |f: &str| format!("{field}.matchExpressions[{i}].{f}");
            label_key(&raw.key, &at("key"))?;
            let operator = match raw.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(FieldError::new(
                        at("operator"),
                        format!("{other:?}"),
                        "In, NotIn, Exists or DoesNotExist",
                    ));
                }
            };
            match operator {
                Operator::In | Operator::NotIn if raw.values.is_empty() => {
                    return Err(FieldError::new(
                        at("values"),
                        "[]",
                        "at least one value for In and NotIn",
                    ));
                }
                Operator::Exists | Operator::DoesNotExist if !raw.values.is_empty() => {
                    return Err(FieldError::new(
                        at("values"),
                        format!("{:?}", raw.values),
                        "no values for Exists and DoesNotExist",
                    ));
                }
                _ => {}
            }
            for (j, value) in raw.values.iter().enumerate() {
                label_value(value, &at(&format!("values[{j}]")))?;
            }
            match_expressions.push(Requirement {
                key: raw.key,
                operator,
                values: raw.values,
            });
        }
        Ok(NodeSelector {
            match_labels,
            match_expressions,
        })
    }
}

/// Checks a label key as Kubernetes does; `field` names where it sits.
pub fn label_key(key: &str, field: &str) -> Result<(), FieldError> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        (1..=253).contains(&p.len())
            && p.split('.').all(|part| {
                (1..=63).contains(&part.len())
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    if prefix_ok && !name.is_empty() && is_label_value(name) {
        Ok(())
    } else {
        Err(FieldError::new(field, format!("{key:?}"), KEY_ALLOWED))
    }
}

/// Checks a label value as Kubernetes does; `field` names where it sits.
pub fn label_value(value: &str, field: &str) -> Result<(), FieldError> {
    if is_label_value(value) {
        Ok(())
    } else {
        Err(FieldError::new(field, format!("{value:?}"), VALUE_ALLOWED))
    }
}

fn is_label_value(value: &str) -> bool {
    value.is_empty()
        || (value.len() <= 63
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(yaml: &str) -> Result<NodeSelector, FieldError> {
        crate::yaml::from_str::<RawSelector>(yaml, crate::config::LIMITS)
            .unwrap()
            .validate("s")
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn kubernetes_semantics() {
        let rack_a = labels(&[("rack", "a"), ("tier", "edge")]);
        let rack_b = labels(&[("rack", "b")]);
        let none = Labels::new();
        for (yaml, a, b, empty) in [
            ("{}", true, true, true),
            ("{matchLabels: {rack: a}}", true, false, false),
            (
                "{matchExpressions: [{key: rack, operator: In, values: [a, c]}]}",
                true,
                false,
                false,
            ),
            (
                "{matchExpressions: [{key: rack, operator: NotIn, values: [a]}]}",
                false,
                true,
                true,
            ),
            (
                "{matchExpressions: [{key: tier, operator: Exists}]}",
                true,
                false,
                false,
            ),
            (
                "{matchExpressions: [{key: tier, operator: DoesNotExist}]}",
                false,
                true,
                true,
            ),
            (
                "{matchLabels: {rack: a}, matchExpressions: [{key: tier, operator: DoesNotExist}]}",
                false,
                false,
                false,
            ),
        ] {
            let s = selector(yaml).unwrap();
            assert_eq!(
                (s.matches(&rack_a), s.matches(&rack_b), s.matches(&none)),
                (a, b, empty),
                "{yaml}"
            );
        }
    }

    #[test]
    fn a_selector_that_does_not_parse_names_the_field_and_value() {
        for (yaml, field, value) in [
            (
                "{matchExpressions: [{key: rack, operator: Equals, values: [a]}]}",
                "s.matchExpressions[0].operator",
                "\"Equals\"",
            ),
            (
                "{matchExpressions: [{key: rack, operator: In}]}",
                "s.matchExpressions[0].values",
                "[]",
            ),
            (
                "{matchExpressions: [{key: rack, operator: Exists, values: [a]}]}",
                "s.matchExpressions[0].values",
                "[\"a\"]",
            ),
            (
                "{matchExpressions: [{key: \"Bad Key\", operator: Exists}]}",
                "s.matchExpressions[0].key",
                "\"Bad Key\"",
            ),
            (
                "{matchLabels: {rack: \"a b\"}}",
                "s.matchLabels.rack",
                "\"a b\"",
            ),
            (
                "{matchLabels: {\"-rack\": a}}",
                "s.matchLabels",
                "\"-rack\"",
            ),
        ] {
            let err = selector(yaml).unwrap_err();
            assert_eq!(
                (err.field.as_str(), err.value.as_str()),
                (field, value),
                "{yaml}"
            );
        }
        assert!(label_key("topology.kubernetes.io/zone", "k").is_ok());
        assert!(label_key("Example.com/zone", "k").is_err());
    }
}
