//! The READMEs are checked against the code, so they cannot drift: every lbagent YAML example
//! goes through the real config or services parser, every `lbagent ...` command line through
//! the real CLI, and every pin path names the pin layout the code uses.

use std::path::{Path, PathBuf};

use clap::Parser as _;
use lbagent::{Cli, Config, parse_services};
use lbagent_common::PIN_LAYOUT_VERSION;

const DOCS: &[&str] = &["README.md", "deploy/README.md"];
/// Files with pin paths besides the READMEs: what an operator copies from.
const PIN_PATH_FILES: &[&str] = &[
    "README.md",
    "deploy/README.md",
    "deploy/daemonset.yaml",
    "deploy/configmap.yaml",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo().join(relative))
        .unwrap_or_else(|err| panic!("reading {relative}: {err}"))
}

/// A fenced code block: its info string, first line number and text.
struct Block {
    info: String,
    line: usize,
    text: String,
}

fn blocks(markdown: &str) -> Vec<Block> {
    let mut found = Vec::new();
    let mut open: Option<Block> = None;
    for (index, line) in markdown.lines().enumerate() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(info)) => {
                open = Some(Block {
                    info: info.trim().to_owned(),
                    line: index + 2,
                    text: String::new(),
                })
            }
            (Some(_), Some(_)) => found.extend(open.take()),
            (Some(block), None) => {
                block.text.push_str(line);
                block.text.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "an unclosed code block");
    found
}

/// The top-level keys of lbagent.yaml: a YAML example with only these is a config fragment.
const CONFIG_KEYS: &[&str] = &[
    "node",
    "source",
    "addresses",
    "status",
    "log",
    "http",
    "routing",
    "dataplane",
    "neighbours",
];

fn top_level_keys(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| !line.starts_with([' ', '#', '-']) && !line.trim().is_empty())
        .filter_map(|line| line.split_once(':').map(|(key, _)| key.trim().to_owned()))
        .collect()
}

/// A fragment is completed with a file source (the one thing every config needs), unless it
/// names its own source.
fn completed_config(fragment: &str) -> String {
    if top_level_keys(fragment).iter().any(|key| key == "source") {
        fragment.to_owned()
    } else {
        format!("source: {{file: {{path: services.yaml}}}}\n{fragment}")
    }
}

#[test]
fn every_yaml_example_in_the_readmes_goes_through_the_real_parser() {
    let mut checked = 0;
    for doc in DOCS {
        for block in blocks(&read(doc)).into_iter().filter(|b| b.info == "yaml") {
            let keys = top_level_keys(&block.text);
            let place = format!("{doc}:{}", block.line);
            if keys == ["services"] {
                parse_services(&block.text, Path::new("services.yaml"))
                    .unwrap_or_else(|err| panic!("{place}: the services example fails: {err}"));
                checked += 1;
            } else if keys.iter().all(|key| CONFIG_KEYS.contains(&key.as_str())) {
                Config::parse(
                    &completed_config(&block.text),
                    Path::new("/etc/lbagent/lbagent.yaml"),
                    Some("node-a"),
                )
                .unwrap_or_else(|err| panic!("{place}: the config example fails: {err}"));
                checked += 1;
            } else {
                // Not lbagent's own format: Kubernetes objects and kustomizations, which
                // tests/tests/deploy.rs parses where they are real manifests.
                assert!(
                    keys.iter()
                        .any(|key| ["apiVersion", "images", "resources"].contains(&key.as_str())),
                    "{place}: a YAML example that is neither lbagent's config, its services file \
                     nor a Kubernetes object: {keys:?}"
                );
            }
        }
    }
    assert!(
        checked >= 5,
        "only {checked} examples checked: did the fences change?"
    );
}

/// `lbagent ...` as a shell line: after a prompt or `--` (kubectl exec), before a comment.
fn command_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim().trim_start_matches("$ ");
            let start = if line.starts_with("lbagent ") {
                0
            } else {
                line.find("-- lbagent ")? + 3
            };
            let command = &line[start..];
            let command = command.split(" #").next().unwrap_or(command);
            Some(command.trim().to_owned())
        })
        .collect()
}

#[test]
fn every_lbagent_command_line_in_the_readmes_parses_with_the_real_cli() {
    let mut checked = 0;
    for doc in DOCS {
        for block in blocks(&read(doc))
            .into_iter()
            .filter(|b| ["sh", "console", "bash", ""].contains(&b.info.as_str()))
        {
            for command in command_lines(&block.text) {
                let words: Vec<&str> = command.split_whitespace().collect();
                if let Err(err) = Cli::try_parse_from(&words) {
                    panic!(
                        "{doc} (block at line {}): `{command}` does not parse:\n{err}",
                        block.line
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "only {checked} command lines checked");
}

#[test]
fn every_pin_path_shown_names_the_layout_the_code_uses() {
    let expected = format!("/sys/fs/bpf/lbagent/v{PIN_LAYOUT_VERSION}/");
    for relative in PIN_PATH_FILES {
        let text = read(relative);
        for (index, _) in text.match_indices("/sys/fs/bpf/lbagent/v") {
            let shown: String = text[index..]
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '`')
                .collect();
            assert!(
                shown.starts_with(&expected),
                "{relative}: `{shown}` is not under {expected}"
            );
        }
    }
}
