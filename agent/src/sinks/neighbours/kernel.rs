//! The kernel's own responder, on an interface that refused the XDP program.
//!
//! There the program can neither answer nor keep the kernel silent, so the kernel answers,
//! set so that it answers for exactly the local addresses this node owns:
//! - `arp_ignore=1`: ARP is answered only for an address held on the interface the request
//!   came in on, so the LB addresses kube-proxy's IPVS mode puts on `kube-ipvs0` (or lbagent
//!   on kube-lb0) are not answered there. IPv6 needs nothing: the kernel answers a
//!   solicitation only for an address on the interface it arrived on.
//! - `arp_announce=2`: the node's own ARP requests name its primary address, never an LB
//!   address, so they claim nothing.
//! - the owner holds each address it owns there as a host address (/32, /128 `nodad`), and
//!   drops it when another node takes it.
//!
//! What was there before is kept in a state file (the sysctls' previous values and the
//! addresses added), so a restarted agent adopts it, and the end of the fallback (the
//! interface takes the program, or no local address needs it) or `lbagent cleanup` puts it
//! back. Not covered by the answering lease: a frozen node's kernel goes on answering.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::plan::{KernelInterface, Link};
use crate::{
    files::{JsonFileError, read_json, write_json},
    sinks::addresses::netlink::{add_address, remove_address},
};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the kernel responder's state {0}")]
    State(#[from] JsonFileError),
    #[error("netlink: {0}")]
    Netlink(std::io::Error),
    #[error("{verb} {address} on {interface}: {source}")]
    Address {
        verb: &'static str,
        address: IpAddr,
        interface: String,
        source: Box<rtnetlink::Error>,
    },
}

/// The sysctls set on an interface in the fallback, with the values they get.
const SYSCTLS: [(&str, &str); 2] = [("arp_ignore", "1"), ("arp_announce", "2")];

/// What the fallback changed, by interface name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub interfaces: BTreeMap<String, Held>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Held {
    pub ifindex: u32,
    /// The sysctls' values before the fallback, by name.
    pub saved: BTreeMap<String, String>,
    /// The addresses the fallback added there.
    pub addresses: BTreeSet<IpAddr>,
}

/// Where the state is kept: beside the member list (`members.json` → `members.kernel.json`),
/// a directory both the agent and `lbagent cleanup` know.
pub fn state_path(members_file: &Path) -> PathBuf {
    members_file.with_extension("kernel.json")
}

impl State {
    pub fn load(path: &Path) -> Result<Self, KernelError> {
        Ok(read_json(path)?.unwrap_or_default())
    }

    /// Written whole and renamed into place; removed when empty.
    fn store(&self, path: &Path) -> Result<(), KernelError> {
        if !self.interfaces.is_empty() {
            return Ok(write_json(path, self)?);
        }
        match std::fs::remove_file(path) {
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                Err(KernelError::File {
                    path: path.to_owned(),
                    source,
                })
            }
            _ => Ok(()),
        }
    }
}

/// The kernel responder's changes, kept in step with the plan's `kernel` interfaces.
pub struct KernelResponder {
    handle: rtnetlink::Handle,
    path: PathBuf,
    state: State,
}

impl KernelResponder {
    /// Adopts what a previous agent left in `path`. Must run inside a tokio runtime.
    pub fn start(path: PathBuf) -> Result<Self, KernelError> {
        let state = State::load(&path)?;
        let (connection, handle, _) = rtnetlink::new_connection().map_err(KernelError::Netlink)?;
        tokio::spawn(connection);
        Ok(Self {
            handle,
            path,
            state,
        })
    }

    /// Puts the kernel's responder where `wanted` says and takes it away elsewhere; returns
    /// what failed (the next pass tries again).
    pub async fn apply(
        &mut self,
        wanted: &BTreeMap<String, KernelInterface>,
        links: &[Link],
    ) -> Vec<String> {
        let mut failed = Vec::new();
        for kernel in wanted.values() {
            if let Err(err) = self.keep(kernel, links).await {
                failed.push(format!("kernel responder on {}: {err}", kernel.interface));
            }
        }
        let ended: Vec<String> = self
            .state
            .interfaces
            .keys()
            .filter(|name| !wanted.contains_key(*name))
            .cloned()
            .collect();
        for name in ended {
            if let Err(err) = self.end(&name).await {
                failed.push(format!("ending the kernel responder on {name}: {err}"));
            }
        }
        failed
    }

    async fn keep(&mut self, kernel: &KernelInterface, links: &[Link]) -> Result<(), KernelError> {
        let name = &kernel.interface;
        if self
            .state
            .interfaces
            .get(name)
            .is_some_and(|held| held.ifindex != kernel.ifindex)
        {
            // Replaced: the new interface has its own sysctls and none of the addresses.
            self.state.interfaces.remove(name);
        }
        if !self.state.interfaces.contains_key(name) {
            let mut saved = BTreeMap::new();
            for (sysctl, _) in SYSCTLS {
                saved.insert(sysctl.to_owned(), read_sysctl(name, sysctl)?);
            }
            self.state.interfaces.insert(
                name.clone(),
                Held {
                    ifindex: kernel.ifindex,
                    saved,
                    addresses: BTreeSet::new(),
                },
            );
            self.state.store(&self.path)?;
            warn!(
                iface = %name,
                reason = %kernel.reason,
                "the XDP program was refused on this interface: the kernel answers ARP and NDP there for the local addresses this node owns (arp_ignore=1, arp_announce=2); the responder's counters are not kept there"
            );
        }
        for (sysctl, value) in SYSCTLS {
            if read_sysctl(name, sysctl)? != value {
                write_sysctl(name, sysctl, value)?;
            }
        }
        let present = links
            .iter()
            .find(|link| link.ifindex == kernel.ifindex)
            .map(|link| link.hosts.clone())
            .unwrap_or_default();
        let held = self.state.interfaces.get(name).map(|h| h.addresses.clone());
        let held = held.unwrap_or_default();
        for address in &kernel.owned {
            if !held.contains(address)
                && let Some(entry) = self.state.interfaces.get_mut(name)
            {
                // Recorded before it is added: a crash in between leaves nothing unknown.
                entry.addresses.insert(*address);
                self.state.store(&self.path)?;
            }
            if !present.contains(address) {
                self.add(kernel.ifindex, name, *address).await?;
                info!(iface = %name, %address, "the kernel answers for this local address here");
            }
        }
        for address in held.difference(&kernel.owned) {
            self.remove(kernel.ifindex, name, *address).await?;
            if let Some(entry) = self.state.interfaces.get_mut(name) {
                entry.addresses.remove(address);
            }
            self.state.store(&self.path)?;
        }
        Ok(())
    }

    /// The fallback ends on `name`: its addresses go and its sysctls get their old values.
    async fn end(&mut self, name: &str) -> Result<(), KernelError> {
        let Some(held) = self.state.interfaces.get(name).cloned() else {
            return Ok(());
        };
        undo(&self.handle, name, &held).await?;
        self.state.interfaces.remove(name);
        self.state.store(&self.path)?;
        info!(iface = %name, "the kernel responder ends on this interface: its sysctls are restored");
        Ok(())
    }

    async fn add(&self, ifindex: u32, name: &str, address: IpAddr) -> Result<(), KernelError> {
        add_address(&self.handle, ifindex, address.into())
            .await
            .map_err(|source| address_error("adding", address, name, source))
    }

    async fn remove(&self, ifindex: u32, name: &str, address: IpAddr) -> Result<(), KernelError> {
        remove(&self.handle, ifindex, name, address).await
    }
}

/// Takes the fallback away from every interface `path` records (for `lbagent cleanup`);
/// returns the interfaces restored.
pub async fn undo_all(path: &Path) -> Result<Vec<String>, KernelError> {
    let mut state = State::load(path)?;
    if state.interfaces.is_empty() {
        return Ok(Vec::new());
    }
    let (connection, handle, _) = rtnetlink::new_connection().map_err(KernelError::Netlink)?;
    let connection = tokio::spawn(connection);
    let mut restored = Vec::new();
    for (name, held) in std::mem::take(&mut state.interfaces) {
        if let Err(err) = undo(&handle, &name, &held).await {
            state.interfaces.insert(name, held);
            state.store(path)?;
            connection.abort();
            return Err(err);
        }
        restored.push(name);
    }
    connection.abort();
    state.store(path)?;
    Ok(restored)
}

/// Removes what the fallback added on `name` and puts the sysctls back, if the interface
/// is still the one it was set on (a vanished one took both with it).
async fn undo(handle: &rtnetlink::Handle, name: &str, held: &Held) -> Result<(), KernelError> {
    let current = nix::net::if_::if_nametoindex(name).ok();
    if current != Some(held.ifindex) {
        return Ok(());
    }
    for address in &held.addresses {
        remove(handle, held.ifindex, name, *address).await?;
    }
    for (sysctl, value) in &held.saved {
        write_sysctl(name, sysctl, value)?;
    }
    Ok(())
}

async fn remove(
    handle: &rtnetlink::Handle,
    ifindex: u32,
    name: &str,
    address: IpAddr,
) -> Result<(), KernelError> {
    remove_address(handle, ifindex, address.into())
        .await
        .map_err(|source| address_error("removing", address, name, source))
}

fn address_error(
    verb: &'static str,
    address: IpAddr,
    interface: &str,
    source: rtnetlink::Error,
) -> KernelError {
    KernelError::Address {
        verb,
        address,
        interface: interface.to_owned(),
        source: Box::new(source),
    }
}

fn sysctl_path(interface: &str, sysctl: &str) -> PathBuf {
    Path::new("/proc/sys/net/ipv4/conf")
        .join(interface)
        .join(sysctl)
}

fn read_sysctl(interface: &str, sysctl: &str) -> Result<String, KernelError> {
    let path = sysctl_path(interface, sysctl);
    std::fs::read_to_string(&path)
        .map(|text| text.trim().to_owned())
        .map_err(|source| KernelError::File { path, source })
}

fn write_sysctl(interface: &str, sysctl: &str, value: &str) -> Result<(), KernelError> {
    let path = sysctl_path(interface, sysctl);
    std::fs::write(&path, value).map_err(|source| KernelError::File { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_sits_beside_the_member_list_and_round_trips() {
        assert_eq!(
            state_path(Path::new("/run/lbagent/members.json")),
            Path::new("/run/lbagent/members.kernel.json")
        );
        let state = State {
            interfaces: BTreeMap::from([(
                "eth0".to_owned(),
                Held {
                    ifindex: 2,
                    saved: BTreeMap::from([
                        ("arp_ignore".to_owned(), "0".to_owned()),
                        ("arp_announce".to_owned(), "1".to_owned()),
                    ]),
                    addresses: BTreeSet::from(["10.0.0.100".parse().unwrap()]),
                },
            )]),
        };
        let text = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<State>(&text).unwrap(), state);
    }
}
