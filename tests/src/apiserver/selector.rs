//! Label and field selectors.

use std::collections::HashMap;

use serde_json::Value;

use super::http::Status;

/// Which objects a list or watch wants: a resource, maybe one namespace, and selectors.
pub(super) struct Filter {
    pub(super) resource: usize,
    namespace: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

/// `field=value` (`equal`) or `field!=value`, on metadata.name or metadata.namespace.
struct FieldRequirement {
    field: String,
    equal: bool,
    value: String,
}

enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Filter {
    pub(super) fn new(
        resource: usize,
        namespace: Option<String>,
        params: &HashMap<String, String>,
    ) -> Result<Self, Status> {
        let labels = match params.get("labelSelector") {
            Some(selector) => parse_label_selector(selector)
                .map_err(|err| Status::bad_request(format!("labelSelector {selector:?}: {err}")))?,
            None => Vec::new(),
        };
        let fields = match params.get("fieldSelector") {
            Some(selector) => parse_field_selector(selector)?,
            None => Vec::new(),
        };
        Ok(Self {
            resource,
            namespace,
            labels,
            fields,
        })
    }

    pub(super) fn matches(&self, object: &Value) -> bool {
        let metadata = &object["metadata"];
        if let Some(namespace) = &self.namespace
            && metadata["namespace"].as_str() != Some(namespace)
        {
            return false;
        }
        let fields_match = self.fields.iter().all(|requirement| {
            let actual = match requirement.field.as_str() {
                "metadata.name" => metadata["name"].as_str(),
                _ => metadata["namespace"].as_str(),
            };
            (actual.unwrap_or_default() == requirement.value) == requirement.equal
        });
        let label = |key: &str| metadata["labels"][key].as_str();
        fields_match
            && self.labels.iter().all(|requirement| match requirement {
                LabelRequirement::Equals(k, v) => label(k) == Some(v),
                LabelRequirement::NotEquals(k, v) => label(k) != Some(v),
                LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
                LabelRequirement::NotIn(k, vs) => {
                    !label(k).is_some_and(|l| vs.iter().any(|v| v == l))
                }
                LabelRequirement::Exists(k) => label(k).is_some(),
                LabelRequirement::NotExists(k) => label(k).is_none(),
            })
    }
}

/// `a=b`, `a==b`, `a!=b`, `a in (b,c)`, `a notin (b,c)`, `a`, `!a`, joined by commas.
fn parse_label_selector(selector: &str) -> Result<Vec<LabelRequirement>, String> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    let key = |k: &str| {
        let k = k.trim();
        if k.is_empty() || k.contains(char::is_whitespace) || k.contains(['=', '!', '(', ')']) {
            Err(format!("invalid label key {k:?}"))
        } else {
            Ok(k.to_owned())
        }
    };
    let values = |v: &str| {
        let v = v.trim();
        v.strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .map(|v| v.split(',').map(|v| v.trim().to_owned()).collect())
            .ok_or_else(|| format!("expected a parenthesized list, got {v:?}"))
    };
    terms
        .into_iter()
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .map(|term| {
            Ok(if let Some(k) = term.strip_prefix('!') {
                LabelRequirement::NotExists(key(k)?)
            } else if let Some((k, v)) = term.split_once(" notin ") {
                LabelRequirement::NotIn(key(k)?, values(v)?)
            } else if let Some((k, v)) = term.split_once(" in ") {
                LabelRequirement::In(key(k)?, values(v)?)
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelRequirement::NotEquals(key(k)?, v.trim().to_owned())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                LabelRequirement::Equals(key(k)?, v.trim().to_owned())
            } else {
                LabelRequirement::Exists(key(term)?)
            })
        })
        .collect()
}

/// `metadata.name` and `metadata.namespace` with `=`, `==` or `!=`, joined by commas.
fn parse_field_selector(selector: &str) -> Result<Vec<FieldRequirement>, Status> {
    selector
        .split(',')
        .filter(|term| !term.trim().is_empty())
        .map(|term| {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(Status::bad_request(format!(
                    "invalid field selector term {term:?}"
                )));
            };
            let field = field.trim();
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(Status::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            Ok(FieldRequirement {
                field: field.to_owned(),
                equal,
                value: value.trim().to_owned(),
            })
        })
        .collect()
}
