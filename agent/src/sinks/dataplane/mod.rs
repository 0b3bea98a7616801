//! The dataplane sink: the eBPF maps that carry each address's policy (ports, protocols,
//! source ranges), filled from the desired state. The programs and their attachments belong
//! to `crate::dataplane`; this sink only keeps the map entries right.
//!
//! Changes are ordered so that no service that stays sees a moment without its entries:
//! addresses that go entirely (and their ports) go first, freeing their slots for what
//! comes; then new range entries, addresses and ports go in, changed policies are updated
//! in place, and only then do the ports and ranges that addresses which stay no longer want
//! go. A new address filters only once all its ports are in: until then it is counted and
//! passes everything.
//!
//! An entry that does not fit (a full map) is named in the log with what happens instead,
//! and the rest is applied: an address that does not fit passes unfiltered and uncounted;
//! an address one of whose ports does not fit is counted but not filtered. Each such
//! failure is logged once, when it first happens, not again on every retry.

mod follow;
pub mod plan;

use std::{collections::BTreeSet, net::IpAddr};

use tracing::{debug, error, info};

use self::follow::PIN_CHECK;
pub use self::follow::{DataplaneConfig, Refusal, Refused, start};
use self::plan::{Entries, Observed, Plan};
use super::{Noticed, Report, Sink, Wanted, node_has_ipv6};
use crate::dataplane::{DataplaneError, Maps, PinLayout, VipPolicy};

/// The pinned policy maps.
pub struct DataplaneSink {
    maps: Maps,
    /// What the last write could not do, as logged: the same failure on the next retry is
    /// not logged again.
    failing: BTreeSet<String>,
}

impl DataplaneSink {
    /// Opens the maps pinned by an attach.
    pub fn open(pins: &PinLayout) -> Result<Self, DataplaneError> {
        Self::new(Maps::open(pins)?)
    }

    /// Writes through `maps`, which stay this sink's alone.
    pub fn new(mut maps: Maps) -> Result<Self, DataplaneError> {
        // Take the writer's lock now, so that a second writer is refused from the start.
        maps.take_writer_lock()?;
        Ok(Self {
            maps,
            failing: BTreeSet::new(),
        })
    }

    /// The maps this sink writes.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The maps this sink writes, for tests that set a scene.
    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// What the maps hold now.
    pub fn entries(&self) -> Result<Entries, DataplaneError> {
        Ok(Entries {
            vips: self
                .maps
                .vips()
                .into_iter()
                .map(|(address, entry)| (address, entry.policy))
                .collect(),
            ports: self
                .maps
                .ports()
                .into_iter()
                .map(|(port, entry)| (port, entry.ranges))
                .collect(),
            ranges: self.maps.ranges()?,
        })
    }

    /// Applies `changes` in their safe order. An entry that cannot be written is logged with
    /// its fallback and the rest still applied; the result names the first failure.
    pub fn write(&mut self, changes: &Plan) -> Result<(), DataplaneError> {
        let mut failures = Vec::new();
        // What failed, with what happens instead, as the log says it.
        let mut failing = BTreeSet::new();
        let maps = &mut self.maps;
        let leaving: BTreeSet<IpAddr> = changes.remove_vips.iter().copied().collect();
        for address in &changes.remove_vips {
            if let Err(err) = maps.remove_vip(*address) {
                failures.push(err);
            }
        }
        for port in changes
            .remove_ports
            .iter()
            .filter(|port| leaving.contains(&port.address))
        {
            if let Err(err) = maps.remove_port(*port) {
                failures.push(err);
            }
        }
        for (set, range) in &changes.add_ranges {
            if let Err(err) = maps.set_range(*set, *range, true) {
                failing.insert(format!(
                    "source range not added: its sources are refused until it fits: {err}"
                ));
                failures.push(err);
            }
        }
        // Addresses that filter once their ports are in.
        let mut to_enforce = Vec::new();
        for (address, policy, new) in &changes.set_vips {
            let now = VipPolicy {
                enforce: policy.enforce && !*new,
                ..*policy
            };
            let result = if *new {
                maps.add_vip(*address, now).map(|_| ())
            } else {
                maps.set_vip_policy(*address, now)
            };
            match result {
                Ok(()) if policy.enforce && *new => to_enforce.push((*address, *policy)),
                Ok(()) => {}
                Err(err) => {
                    failing.insert(format!("LB address {address} not in the dataplane: its traffic passes unfiltered and uncounted: {err}"));
                    failures.push(err);
                }
            }
        }
        let mut unfiltered = BTreeSet::new();
        for (port, ranges, new) in &changes.set_ports {
            let result = if *new {
                maps.add_port(*port, *ranges).map(|_| ())
            } else {
                maps.set_port_ranges(*port, *ranges)
            };
            if let Err(err) = result {
                if maps.vip_slot(port.address).is_some() {
                    failing.insert(format!("port not in the dataplane: LB address {} is counted but not filtered until it fits: {err}", port.address));
                    unfiltered.insert(port.address);
                }
                failures.push(err);
            }
        }
        for (address, policy) in to_enforce {
            if !unfiltered.contains(&address)
                && let Err(err) = maps.set_vip_policy(address, policy)
            {
                failures.push(err);
            }
        }
        for address in unfiltered {
            let policy = VipPolicy {
                enforce: false,
                ..maps
                    .vips()
                    .get(&address)
                    .map(|e| e.policy)
                    .unwrap_or_default()
            };
            if let Err(err) = maps.set_vip_policy(address, policy) {
                failures.push(err);
            }
        }
        for port in changes
            .remove_ports
            .iter()
            .filter(|port| !leaving.contains(&port.address))
        {
            if let Err(err) = maps.remove_port(*port) {
                failures.push(err);
            }
        }
        for (set, range) in &changes.remove_ranges {
            if let Err(err) = maps.set_range(*set, *range, false) {
                failures.push(err);
            }
        }
        for line in &failing {
            if self.failing.contains(line) {
                debug!("{line} (still)");
            } else {
                error!("{line}");
            }
        }
        self.failing = failing;
        match failures.into_iter().next() {
            Some(first) => Err(first),
            None => Ok(()),
        }
    }
}

impl Sink for DataplaneSink {
    type Observed = Observed;
    type Plan = Plan;
    type Error = DataplaneError;

    async fn observe(&mut self) -> Result<Observed, DataplaneError> {
        self.relock()?;
        Ok(Observed {
            entries: self.entries()?,
            ipv6: node_has_ipv6(),
        })
    }

    fn plan(&self, wanted: &Wanted<'_>, observed: &Observed) -> Plan {
        plan::plan(wanted.desired, observed)
    }

    async fn apply(&mut self, plan: Plan, _: Observed, _: &Wanted<'_>) -> Vec<String> {
        if plan.is_empty() {
            self.failing.clear();
            return Vec::new();
        }
        info!(
            vips = plan.set_vips.len(),
            ports = plan.set_ports.len(),
            removed_ports = plan.remove_ports.len(),
            removed_vips = plan.remove_vips.len(),
            ranges = plan.add_ranges.len(),
            "updating the dataplane's policy maps"
        );
        match self.write(&plan) {
            Ok(()) => Vec::new(),
            Err(err) => vec![err.to_string()],
        }
    }

    fn report(&self) -> Report {
        Report::Dataplane
    }

    /// Looks every second whether the pin directory was replaced (removed from outside
    /// lbagent, and made again as its pins were restored), to lock the new one.
    async fn noticed(&mut self) -> Noticed {
        loop {
            tokio::time::sleep(PIN_CHECK).await;
            match self.relock() {
                Ok(true) => return Noticed::Report,
                Ok(false) => {}
                Err(err) => {
                    error!(%err, "cannot take the writer's lock on the new pin directory");
                    return Noticed::Drift;
                }
            }
        }
    }
}

impl DataplaneSink {
    fn relock(&mut self) -> Result<bool, DataplaneError> {
        let relocked = self.maps.relock_if_replaced()?;
        if relocked {
            info!("the pin directory was made again: took the writer's lock on the new one");
        }
        Ok(relocked)
    }
}
