//! The status file: the published status, written after every change for `lbagent status` and
//! other processes to read.

use std::path::{Path, PathBuf};

use tokio::sync::watch;
use tracing::warn;

use crate::{files::write_atomically, reconcile::Status};

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

pub fn write(path: &Path, status: &Status) -> Result<(), StatusError> {
    let json = serde_json::to_vec_pretty(status).map_err(|source| StatusError::Parse {
        path: path.to_owned(),
        source,
    })?;
    write_atomically(path, json).map_err(|source| StatusError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes every status the reconciler publishes to `path`, until it publishes no more.
pub async fn write_each(path: PathBuf, mut published: watch::Receiver<Option<Status>>) {
    while published.changed().await.is_ok() {
        let status = published.borrow_and_update().clone();
        if let Some(status) = status
            && let Err(err) = write(&path, &status)
        {
            warn!(%err, "cannot write the status file");
        }
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
    use crate::{
        desired::{AddressState, AddressStatus, Rejected},
        reconcile::LastReconcile,
    };

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
                neighbour: Some(crate::desired::NeighbourOutcome::AnsweredBy { owner: "m".into() }),
            }],
            rejected: vec![Rejected {
                service: "bad".into(),
                reason: "why".into(),
            }],
            errors: vec![],
            routing: None,
            neighbours: Some(crate::sinks::neighbours::NeighbourReport {
                members_file: "/run/lbagent/members.json".into(),
                members: Some(vec!["n".into(), "m".into()]),
                addresses: vec![crate::sinks::neighbours::plan::Election {
                    address: "10.0.0.5".parse().unwrap(),
                    owner: Some("m".into()),
                    candidates: vec!["m".into(), "n".into()],
                    answering: false,
                }],
                ..Default::default()
            }),
        };
        write(&path, &status).unwrap();
        assert_eq!(read(&path).unwrap(), status);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
