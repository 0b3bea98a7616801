//! YAML as lbagent reads it (serde-saphyr): a budget set before parsing bounds nesting, the
//! number of nodes and alias expansion, so that no file can make a parse take unbounded time
//! or memory; an error is one line that names the limit it broke.

use serde::de::DeserializeOwned;
use serde_saphyr::{
    Budget, ExternalMessageSource, Options, budget::BudgetBreach, granit_parser::ErrorKind,
};

/// How much one document may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Nesting of sequences and mappings.
    pub depth: usize,
    /// Scalars, sequences and mappings, counted as written (an alias counts once).
    pub nodes: usize,
    /// Whether anchors (`&name`) and aliases (`*name`) are allowed at all. When they are,
    /// their expansion stays bounded by the parser's own alias limits.
    pub aliases: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct YamlError(String);

/// Parses one YAML document within `limits`.
pub fn from_str<T: DeserializeOwned>(text: &str, limits: Limits) -> Result<T, YamlError> {
    let mut budget = Budget::default();
    budget.max_depth = limits.depth;
    // The scanner refuses deep flow nesting (`[[[[`) before the depth count sees it.
    budget.flow_nesting_limit = limits.depth;
    budget.max_nodes = limits.nodes;
    // Every node is an event, every collection one more (its end), and a few frame the
    // document.
    budget.max_events = limits.nodes.saturating_mul(2).saturating_add(8);
    budget.max_documents = 1;
    if !limits.aliases {
        budget.max_anchors = 0;
        budget.max_aliases = 0;
    }
    let mut options = Options::default();
    options.budget = Some(budget);
    options.with_snippet = false;
    serde_saphyr::from_str_with_options(text, options).map_err(|err| {
        let broken = match &err {
            serde_saphyr::Error::Budget { breach, .. } => match breach {
                BudgetBreach::Depth { .. } => Some(format!(
                    "nested deeper than the limit of {} levels",
                    limits.depth
                )),
                BudgetBreach::Nodes { .. } | BudgetBreach::Events { .. } => Some(format!(
                    "more than the limit of {} YAML nodes",
                    limits.nodes
                )),
                BudgetBreach::Anchors { .. } | BudgetBreach::Aliases { .. } if !limits.aliases => {
                    Some("anchors and aliases (&name, *name) are not allowed here".to_owned())
                }
                _ => None,
            },
            serde_saphyr::Error::ExternalMessage { source, .. } => match source.as_ref() {
                ExternalMessageSource::Parser(scan)
                    if *scan.kind() == ErrorKind::RecursionLimitExceeded =>
                {
                    Some(format!(
                        "nested deeper than the limit of {} levels",
                        limits.depth
                    ))
                }
                _ => None,
            },
            _ => None,
        };
        YamlError(broken.unwrap_or_else(|| one_line(&err.to_string())))
    })
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const LIMITS: Limits = Limits {
        depth: 8,
        nodes: 1_000,
        aliases: false,
    };

    fn parse(text: &str) -> Result<serde_json::Value, String> {
        from_str(text, LIMITS).map_err(|err| err.to_string())
    }

    #[test]
    fn a_plain_document_parses() {
        let value = parse("a: [1, {b: c}]\n").unwrap();
        assert_eq!(value, serde_json::json!({"a": [1, {"b": "c"}]}));
    }

    #[test]
    fn each_broken_limit_is_named() {
        let deep_flow = "[".repeat(100_000);
        let deep_maps = "{a: ".repeat(50_000);
        let deep_block = (0..20)
            .map(|i| format!("{}k:\n", "  ".repeat(i)))
            .collect::<String>();
        let wide = format!("[{}]", vec!["1"; 2_000].join(","));
        for (text, expected) in [
            (
                deep_flow.as_str(),
                "nested deeper than the limit of 8 levels",
            ),
            (
                deep_maps.as_str(),
                "nested deeper than the limit of 8 levels",
            ),
            (
                deep_block.as_str(),
                "nested deeper than the limit of 8 levels",
            ),
            (wide.as_str(), "more than the limit of 1000 YAML nodes"),
            (
                "a: &x [1]\nb: *x\n",
                "anchors and aliases (&name, *name) are not allowed here",
            ),
            (
                "a: &x 1\n",
                "anchors and aliases (&name, *name) are not allowed here",
            ),
        ] {
            assert_eq!(parse(text).unwrap_err(), expected, "{:.40}", text);
        }
    }

    #[test]
    fn aliases_where_allowed_stay_bounded() {
        let limits = Limits {
            aliases: true,
            ..LIMITS
        };
        let value: BTreeMap<String, Vec<u8>> = from_str("a: &x [1]\nb: *x\n", limits).unwrap();
        assert_eq!(value["b"], [1]);
    }

    #[test]
    fn other_errors_are_one_line() {
        let err = parse("a: [\n  1,\n").unwrap_err();
        assert!(!err.contains('\n'), "{err}");
    }
}
