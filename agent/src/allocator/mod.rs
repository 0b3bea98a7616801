//! `lbagent allocator`: assigns LoadBalancer addresses from `AddressPool`s, so lbagent needs no
//! other load balancer. It runs as its own Deployment; replicas elect a leader through a Lease
//! ([`lease`]) and only the leader runs the [`controller`], which keeps the pure [`books`].

pub mod books;
pub mod controller;
pub mod lease;
pub mod pool;
pub mod request;
pub mod service;

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use kube::Client;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::sources::kubernetes::{self, ApiAccess, KubernetesSource};

pub use pool::{AddressPool, AddressPoolSpec, AddressPoolStatus, crds_yaml};

/// The name the allocator reports Events under.
pub const CONTROLLER: &str = "lbagent-allocator";

/// Every call the allocator makes; its ClusterRole grants exactly these (a test checks it).
pub const API_ACCESS: &[ApiAccess] = &[
    // A 409 on a status write is resolved by reading the Service again.
    ApiAccess {
        group: "",
        resource: "services",
        verbs: &["get", "list", "watch"],
    },
    ApiAccess {
        group: "",
        resource: "services/status",
        verbs: &["patch"],
    },
    ApiAccess {
        group: "",
        resource: "namespaces",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "lbagent.io",
        resource: "addresspools",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "lbagent.io",
        resource: "addresspools/status",
        verbs: &["patch"],
    },
    ApiAccess {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["create", "get", "update"],
    },
    ApiAccess {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
    },
];

/// How `lbagent allocator` runs (its command line, in `cli/allocator.rs`).
#[derive(Clone, Debug)]
pub struct Settings {
    /// `None`: `$KUBECONFIG`, `~/.kube/config`, then the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// Serve Services of this `spec.loadBalancerClass` (none: Services without a class).
    pub load_balancer_class: Option<String>,
    pub lease_namespace: String,
    pub lease_name: String,
    /// This replica's name in the Lease (default: the host name and process id).
    pub identity: Option<String>,
    pub lease_duration: Duration,
    /// Shorter than `lease_duration`.
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// A client as the agent makes one: `kubeconfig`, or else the usual places.
pub async fn client(kubeconfig: Option<PathBuf>) -> Result<Client> {
    let source = KubernetesSource {
        load_balancer_class: None,
        kubeconfig,
    };
    Ok(kubernetes::client(&source).await?)
}

/// Takes part in the election and runs the controller while leading, until SIGTERM or Ctrl-C.
pub async fn serve(args: Settings) -> Result<()> {
    let client = client(args.kubeconfig.clone()).await?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "allocator".into());
        format!("{host}-{}", std::process::id())
    });
    let settings = controller::Settings {
        load_balancer_class: args.load_balancer_class.clone(),
        identity: identity.clone(),
    };
    info!(
        %identity,
        class = settings.load_balancer_class.as_deref().unwrap_or("(none)"),
        lease = %format!("{}/{}", args.lease_namespace, args.lease_name),
        "allocator starting"
    );
    let (leading_tx, mut leading) = watch::channel(false);
    let election = tokio::spawn(lease::elect(
        client.clone(),
        lease::LeaseConfig {
            namespace: args.lease_namespace,
            name: args.lease_name,
            identity,
            duration: args.lease_duration,
            renew_deadline: args.renew_deadline,
            retry_period: args.retry_period,
        },
        leading_tx,
    ));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        // Standing by: nothing is watched or written.
        tokio::select! {
            changed = leading.wait_for(|leads| *leads) => { changed?; }
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        // A new leader starts from a fresh list, never from what it saw as a standby.
        let controller = controller::Controller::new(client.clone(), settings.clone());
        tokio::select! {
            result = controller.run() => {
                result?;
            }
            changed = leading.wait_for(|leads| !*leads) => {
                changed?;
                warn!("no longer leading: stopped writing");
            }
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    info!("stopping");
    drop(leading);
    let _ = tokio::time::timeout(Duration::from_secs(5), election).await;
    Ok(())
}

/// Now, as a condition's lastTransitionTime.
pub fn now() -> String {
    use k8s_openapi::jiff::{Timestamp, Unit};
    Timestamp::now()
        .round(Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}
