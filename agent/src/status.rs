//! The status file: what the agent holds and why, written after every reconcile and read by
//! `lbagent status`. Written to a temporary file and renamed, so a reader never sees half.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::desired::Rejected;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub node: String,
    pub interface: String,
    pub reconciles: u64,
    pub last_reconcile: LastReconcile,
    pub addresses: Vec<AddressStatus>,
    pub rejected: Vec<Rejected>,
    /// Errors of the last reconcile; empty when everything applied.
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastReconcile {
    pub trigger: String,
    pub duration_ms: f64,
    pub added: usize,
    pub removed: usize,
    pub repairs: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressStatus {
    pub address: IpAddr,
    pub state: AddressState,
    /// For a local address, the node's subnet it lies in.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub prefix: Option<IpNet>,
    pub services: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressState {
    /// On the load-balancer interface.
    Virtual,
    /// Inside one of the node's subnets: reachable without the interface.
    Local,
    /// IPv6 on a node without IPv6.
    Unsupported,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a status file: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

pub struct StatusWriter {
    path: PathBuf,
}

impl StatusWriter {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn write(&self, status: &Status) -> Result<(), StatusError> {
        let io = |source| StatusError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let json = serde_json::to_vec_pretty(status).map_err(|source| StatusError::Parse {
            path: self.path.clone(),
            source,
        })?;
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        std::fs::write(&tmp, json).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
    }
}

pub fn read(path: &Path) -> Result<Status, StatusError> {
    let text = std::fs::read(path).map_err(|source| StatusError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| StatusError::Parse {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_status_reads_back() {
        let path =
            std::env::temp_dir().join(format!("lbagent-status-{}/s.json", std::process::id()));
        let status = Status {
            node: "n".into(),
            interface: "kube-lb0".into(),
            reconciles: 3,
            last_reconcile: LastReconcile {
                trigger: "periodic resync".into(),
                duration_ms: 1.5,
                added: 1,
                removed: 0,
                repairs: 0,
            },
            addresses: vec![AddressStatus {
                address: "10.0.0.5".parse().unwrap(),
                state: AddressState::Local,
                prefix: Some("10.0.0.0/24".parse().unwrap()),
                services: vec!["web".into()],
            }],
            rejected: vec![Rejected {
                service: "bad".into(),
                reason: "why".into(),
            }],
            errors: vec![],
        };
        StatusWriter::new(&path).write(&status).unwrap();
        assert_eq!(read(&path).unwrap(), status);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
