//! The allocator's books: which Service (or sharing group) owns which address, kept pure so
//! tests drive it directly. The controller feeds it pools and Services and writes what it says.
//!
//! Every address has at most one owner: a Service alone, or the Services of one namespace that
//! carry the same sharing key. Books are rebuilt from the addresses Services already hold
//! (oldest Service first, so of two holding one address the older keeps it) before anything
//! new is assigned.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use super::{
    pool::{Addr, AddressPoolSpec, Family, Pool, PoolError, is_buggy},
    request::{FamilyPolicy, POOL_ANNOTATION, Request, SHARING_ANNOTATION, ServiceKey},
};

/// The outcome of a Service entered but not yet given its addresses.
const PENDING: &str = "not placed yet";

/// A pool resource as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolInput {
    pub name: String,
    pub created: String,
    pub spec: AddressPoolSpec,
}

/// What a Service gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Its addresses (in the order of its families) with their pools; `note` says why a
    /// PreferDualStack Service has only one family.
    Assigned {
        addresses: Vec<(IpAddr, String)>,
        note: Option<String>,
    },
    /// No address, and why (naming the field and value).
    Failed(String),
}

impl Outcome {
    pub fn addresses(&self) -> Vec<IpAddr> {
        match self {
            Self::Assigned { addresses, .. } => addresses.iter().map(|(ip, _)| *ip).collect(),
            Self::Failed(_) => Vec::new(),
        }
    }
}

/// Two Services held one address without sharing it: the older keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub address: IpAddr,
    pub kept_by: ServiceKey,
    pub taken_from: ServiceKey,
}

/// A pool's use, for its status and `lbagent allocator pools`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolReport {
    pub name: String,
    /// (family, addresses it hands out, addresses in use) for each family it has.
    pub families: Vec<(Family, u128, u64)>,
    pub error: Option<PoolError>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Owner {
    Shared { namespace: String, key: String },
    Alone(ServiceKey),
}

#[derive(Debug, Default)]
struct Group {
    addresses: BTreeMap<Family, (Addr, usize)>,
    members: BTreeSet<ServiceKey>,
}

struct Entry {
    request: Request,
    outcome: Outcome,
    owner: Option<Owner>,
}

struct PoolEntry {
    pool: Pool,
    /// Per range: every address below is taken (a lower bound for the next free one).
    cursors: Vec<u128>,
    in_use: BTreeMap<Family, u64>,
}

#[derive(Default)]
pub struct Books {
    pools: Vec<PoolEntry>,
    refused: BTreeMap<String, (Option<Pool>, PoolError)>,
    by_name: HashMap<String, usize>,
    /// Automatic pools in the order they are tried.
    auto_order: Vec<usize>,
    owners: HashMap<Addr, Owner>,
    groups: HashMap<Owner, Group>,
    /// Boxed: a map's nodes are half empty after ordered inserts, which for entries this
    /// large was megabytes of nothing at 10,000 Services.
    services: BTreeMap<ServiceKey, Box<Entry>>,
    namespaces: HashMap<String, BTreeMap<String, String>>,
    conflicts: Vec<Conflict>,
    /// Services without an address that may get one when addresses free up.
    failed: BTreeSet<ServiceKey>,
    /// Outcomes before the current operation, of the Services it touched.
    before: HashMap<ServiceKey, Option<Outcome>>,
}

impl Books {
    /// Books with these pools and namespace labels, and no Service yet.
    pub fn new(pools: &[PoolInput], namespaces: HashMap<String, BTreeMap<String, String>>) -> Self {
        let mut inputs: Vec<&PoolInput> = pools.iter().collect();
        inputs.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
        let mut books = Self {
            namespaces,
            ..Self::default()
        };
        for input in inputs {
            let pool = match Pool::parse(&input.name, &input.created, &input.spec) {
                Ok(pool) => pool,
                Err(err) => {
                    books.refused.insert(input.name.clone(), (None, err));
                    continue;
                }
            };
            let overlap = pool.ranges.iter().find_map(|range| {
                books.pools.iter().find_map(|other| {
                    let theirs = other.pool.ranges.iter().find(|o| o.overlaps(range))?;
                    Some(PoolError {
                        field: format!("spec.addresses[{}]", range.index),
                        value: range.text.clone(),
                        problem: format!(
                            "overlaps {:?} of pool {:?}, which was there first",
                            theirs.text, other.pool.name
                        ),
                        reason: "Overlap",
                    })
                })
            });
            if let Some(err) = overlap {
                books.refused.insert(input.name.clone(), (Some(pool), err));
                continue;
            }
            books.by_name.insert(pool.name.clone(), books.pools.len());
            books.pools.push(PoolEntry {
                cursors: pool.ranges.iter().map(|r| r.first).collect(),
                in_use: BTreeMap::new(),
                pool,
            });
        }
        let mut auto: Vec<usize> = (0..books.pools.len())
            .filter(|&i| books.pools[i].pool.auto_assign)
            .collect();
        auto.sort_by(|&a, &b| {
            let (a, b) = (&books.pools[a].pool, &books.pools[b].pool);
            (a.priority, &a.name).cmp(&(b.priority, &b.name))
        });
        books.auto_order = auto;
        books
    }

    /// Books rebuilt from the cluster: each Service keeps the addresses its status shows where
    /// they are still valid (the oldest Service first), then the rest get new ones.
    pub fn rebuild(
        pools: &[PoolInput],
        namespaces: HashMap<String, BTreeMap<String, String>>,
        requests: Vec<Request>,
    ) -> Self {
        let mut books = Self::new(pools, namespaces);
        let placed = requests
            .into_iter()
            .map(|request| {
                let current = request.current.clone();
                (request, current)
            })
            .collect();
        books.place_all(placed);
        books
    }

    /// The same Services placed again under new pools or namespace labels, keeping what
    /// they hold where it is still valid. Returns the Services whose outcome changed.
    pub fn reconfigure(
        &mut self,
        pools: &[PoolInput],
        namespaces: HashMap<String, BTreeMap<String, String>>,
    ) -> BTreeSet<ServiceKey> {
        let mut books = Self::new(pools, namespaces);
        let placed = self
            .services
            .values()
            .map(|entry| (entry.request.clone(), entry.outcome.addresses()))
            .collect();
        books.place_all(placed);
        let changed = self
            .services
            .iter()
            .filter(|(key, entry)| books.outcome(key) != Some(&entry.outcome))
            .map(|(key, _)| key.clone())
            .collect();
        *self = books;
        changed
    }

    pub fn namespaces(&self) -> &HashMap<String, BTreeMap<String, String>> {
        &self.namespaces
    }

    /// Adds or updates a Service. Returns every Service whose outcome changed.
    pub fn upsert(&mut self, request: Request) -> BTreeSet<ServiceKey> {
        let key = request.key.clone();
        // Its status catching up with what the books hold is no change.
        if let Some(entry) = self.services.get_mut(&key)
            && same_ask(&entry.request, &request)
        {
            entry.request = request;
            return BTreeSet::new();
        }
        let candidates = match self.services.get(&key) {
            Some(entry) => entry.outcome.addresses(),
            None => request.current.clone(),
        };
        self.before.clear();
        self.leave(&key);
        self.adopt(request, &candidates);
        self.complete(&key);
        // What it freed, or a sharing group it left, may serve others now.
        self.retry_failed();
        let mut changed = self.changed();
        changed.insert(key);
        changed
    }

    /// Forgets a Service (deleted, or no longer of type LoadBalancer or of our class).
    /// Returns the other Services whose outcome changed (its addresses freed for them).
    pub fn remove(&mut self, key: &ServiceKey) -> BTreeSet<ServiceKey> {
        if !self.services.contains_key(key) {
            return BTreeSet::new();
        }
        self.before.clear();
        self.leave(key);
        self.services.remove(key);
        self.failed.remove(key);
        self.retry_failed();
        let mut changed = self.changed();
        changed.remove(key);
        changed
    }

    pub fn outcome(&self, key: &ServiceKey) -> Option<&Outcome> {
        self.services.get(key).map(|entry| &entry.outcome)
    }

    pub fn contains(&self, key: &ServiceKey) -> bool {
        self.services.contains_key(key)
    }

    pub fn services(&self) -> impl Iterator<Item = (&ServiceKey, &Outcome)> {
        self.services
            .iter()
            .map(|(key, entry)| (key, &entry.outcome))
    }

    /// Conflicts found since the last call.
    pub fn take_conflicts(&mut self) -> Vec<Conflict> {
        std::mem::take(&mut self.conflicts)
    }

    /// Every pool, accepted or refused, by name.
    pub fn pool_reports(&self) -> Vec<PoolReport> {
        let usage = |pool: &Pool, in_use: Option<&BTreeMap<Family, u64>>| {
            [Family::V4, Family::V6]
                .into_iter()
                .filter(|&family| pool.has_family(family))
                .map(|family| {
                    let used = in_use.and_then(|u| u.get(&family)).copied().unwrap_or(0);
                    (family, pool.size(family), used)
                })
                .collect()
        };
        let mut reports: Vec<PoolReport> = self
            .pools
            .iter()
            .map(|entry| PoolReport {
                name: entry.pool.name.clone(),
                families: usage(&entry.pool, Some(&entry.in_use)),
                error: None,
            })
            .chain(self.refused.iter().map(|(name, (pool, err))| PoolReport {
                name: name.clone(),
                families: pool.as_ref().map(|p| usage(p, None)).unwrap_or_default(),
                error: Some(err.clone()),
            }))
            .collect();
        reports.sort_by(|a, b| a.name.cmp(&b.name));
        reports
    }

    /// The Services the current operation touched whose outcome differs from before it.
    fn changed(&mut self) -> BTreeSet<ServiceKey> {
        std::mem::take(&mut self.before)
            .into_iter()
            .filter(|(key, before)| self.outcome(key) != before.as_ref())
            .map(|(key, _)| key)
            .collect()
    }

    /// Records a Service's entry (its outcome before the operation first).
    fn enter(&mut self, key: ServiceKey, entry: Entry) {
        if !self.before.contains_key(&key) {
            let old = self.services.get(&key).map(|e| e.outcome.clone());
            self.before.insert(key.clone(), old);
        }
        self.settle(&key, &entry.outcome, entry.request.invalid.is_some());
        self.services.insert(key, Box::new(entry));
    }

    fn settle(&mut self, key: &ServiceKey, outcome: &Outcome, invalid: bool) {
        if matches!(outcome, Outcome::Failed(_)) && !invalid {
            self.failed.insert(key.clone());
        } else {
            self.failed.remove(key);
        }
    }

    /// Places Services in creation order: first every one keeps what it holds, then the
    /// ones missing an address get one.
    fn place_all(&mut self, mut placed: Vec<(Request, Vec<IpAddr>)>) {
        placed.sort_by(|(a, _), (b, _)| (&a.created, &a.key).cmp(&(&b.created, &b.key)));
        let keys: Vec<ServiceKey> = placed.iter().map(|(r, _)| r.key.clone()).collect();
        for (request, candidates) in placed {
            self.adopt(request, &candidates);
        }
        for key in &keys {
            self.complete(key);
        }
    }

    /// Enters a Service and gives it those of `candidates` it may keep.
    fn adopt(&mut self, request: Request, candidates: &[IpAddr]) {
        let key = request.key.clone();
        if let Some(invalid) = &request.invalid {
            let outcome = Outcome::Failed(invalid.clone());
            self.enter(
                key,
                Entry {
                    request,
                    outcome,
                    owner: None,
                },
            );
            return;
        }
        let owner = match &request.sharing_key {
            Some(sharing) => Owner::Shared {
                namespace: key.namespace.clone(),
                key: sharing.clone(),
            },
            None => Owner::Alone(key.clone()),
        };
        if let Some(refusal) = self.sharing_refusal(&request, &owner) {
            self.enter(
                key,
                Entry {
                    request,
                    outcome: Outcome::Failed(refusal),
                    owner: None,
                },
            );
            return;
        }
        self.groups
            .entry(owner.clone())
            .or_default()
            .members
            .insert(key.clone());
        for &ip in candidates {
            let addr = Addr::from(ip);
            if !request.families.contains(&addr.family)
                || self.groups[&owner].addresses.contains_key(&addr.family)
            {
                continue;
            }
            let requested = request
                .requested
                .iter()
                .find(|(r, _)| Family::of(*r) == addr.family);
            if requested.is_some_and(|(r, _)| *r != ip) {
                continue;
            }
            let Some(pool) = self.pool_of(addr).filter(|&p| self.may_use(&request, p)) else {
                continue;
            };
            if requested.is_none() && self.pools[pool].pool.avoid_buggy_ips && is_buggy(addr) {
                continue;
            }
            // A pool that assigns only on request keeps an address for a Service only while
            // it asks for it or names the pool: one that stopped asking would otherwise hold
            // it against the next Service that asks (the soak found one refused for good).
            if requested.is_none() && request.pool.is_none() && !self.pools[pool].pool.auto_assign {
                continue;
            }
            match self.owners.get(&addr) {
                Some(holder) if *holder != owner => {
                    let kept_by = self.first_member(holder);
                    self.conflicts.push(Conflict {
                        address: ip,
                        kept_by,
                        taken_from: key.clone(),
                    });
                }
                Some(_) => {}
                None => self.take(addr, pool, &owner),
            }
        }
        self.enter(
            key,
            Entry {
                request,
                outcome: Outcome::Failed(PENDING.into()),
                owner: Some(owner),
            },
        );
    }

    /// Gives an entered Service an address for each family it still lacks, and settles its
    /// outcome.
    fn complete(&mut self, key: &ServiceKey) {
        let Some(entry) = self.services.get(key) else {
            return;
        };
        let Some(owner) = entry.owner.clone() else {
            return;
        };
        let request = entry.request.clone();
        let mut errors = Vec::new();
        let mut granted = Vec::new();
        for &family in &request.families {
            if let Some(&(held, pool)) = self.groups[&owner].addresses.get(&family) {
                // A member shares only what it may hold itself: the group's address can come
                // from a pool whose selectors or name exclude this member.
                if let Some(refusal) = self.shared_pool_refusal(&request, &owner, held, pool) {
                    errors.push(refusal);
                    continue;
                }
                let asked = request
                    .requested
                    .iter()
                    .find(|(r, _)| Family::of(*r) == family);
                if let Some((ip, field)) = asked.filter(|(r, _)| Addr::from(*r) != held) {
                    errors.push(format!(
                        "{field}: \"{ip}\": its sharing key's Services hold {held} instead"
                    ));
                }
                granted.push((held, pool));
                continue;
            }
            match self.pick(&request, family, &owner) {
                Ok((addr, pool)) => {
                    self.take(addr, pool, &owner);
                    granted.push((addr, pool));
                }
                Err(err) => errors.push(err),
            }
        }
        let addresses: Vec<(IpAddr, String)> = granted
            .into_iter()
            .map(|(addr, pool)| (IpAddr::from(addr), self.pools[pool].pool.name.clone()))
            .collect();
        let all_or_none = request.policy != FamilyPolicy::PreferDual;
        let outcome = if addresses.is_empty() || (all_or_none && !errors.is_empty()) {
            self.leave(key);
            Outcome::Failed(errors.join("; "))
        } else {
            Outcome::Assigned {
                addresses,
                note: (!errors.is_empty()).then(|| errors.join("; ")),
            }
        };
        self.settle(key, &outcome, false);
        if let Some(entry) = self.services.get_mut(key) {
            entry.outcome = outcome;
        }
    }

    /// An address of `family` for `request`: the one it asks for, or the next free one of the
    /// pools it may use.
    fn pick(
        &mut self,
        request: &Request,
        family: Family,
        owner: &Owner,
    ) -> Result<(Addr, usize), String> {
        if let Some((ip, field)) = request
            .requested
            .iter()
            .find(|(r, _)| Family::of(*r) == family)
        {
            let addr = Addr::from(*ip);
            let Some(pool) = self.pool_of(addr).filter(|&p| self.may_use(request, p)) else {
                return Err(format!(
                    "{field}: \"{ip}\" is outside every pool the Service may use"
                ));
            };
            return match self.owners.get(&addr) {
                Some(holder) if holder != owner => Err(format!(
                    "{field}: \"{ip}\" is already taken by {}",
                    self.first_member(holder)
                )),
                _ => Ok((addr, pool)),
            };
        }
        let candidates: Vec<usize> = match &request.pool {
            Some(name) => {
                let field = format!("metadata.annotations[\"{POOL_ANNOTATION}\"]");
                let Some(&pool) = self.by_name.get(name) else {
                    return Err(match self.refused.get(name) {
                        Some((_, err)) => format!("{field}: {name:?}: the pool is refused: {err}"),
                        None => format!("{field}: {name:?}: no such pool"),
                    });
                };
                if !self.may_use(request, pool) {
                    return Err(format!(
                        "{field}: {name:?}: the pool's selectors do not admit this Service"
                    ));
                }
                if !self.pools[pool].pool.has_family(family) {
                    return Err(format!(
                        "spec.ipFamilies: {family}: pool {name:?} has no {family} addresses"
                    ));
                }
                vec![pool]
            }
            None => self
                .auto_order
                .iter()
                .copied()
                .filter(|&p| self.may_use(request, p) && self.pools[p].pool.has_family(family))
                .collect(),
        };
        if candidates.is_empty() {
            return Err(format!(
                "spec.ipFamilies: {family}: no automatic pool this Service may use has {family} \
                 addresses"
            ));
        }
        for &pool in &candidates {
            if let Some(addr) = self.free_in(pool, family) {
                return Ok((addr, pool));
            }
        }
        let names: Vec<&str> = candidates
            .iter()
            .map(|&p| self.pools[p].pool.name.as_str())
            .collect();
        Err(format!(
            "spec.ipFamilies: {family}: every pool this Service may use is exhausted ({})",
            names.join(", ")
        ))
    }

    fn free_in(&mut self, pool: usize, family: Family) -> Option<Addr> {
        let entry = &mut self.pools[pool];
        let avoid = entry.pool.avoid_buggy_ips;
        for (i, range) in entry.pool.ranges.iter().enumerate() {
            if range.family != family {
                continue;
            }
            let mut value = entry.cursors[i].max(range.first);
            while value <= range.last {
                let addr = Addr { family, value };
                if !(self.owners.contains_key(&addr) || avoid && is_buggy(addr)) {
                    entry.cursors[i] = value;
                    return Some(addr);
                }
                match value.checked_add(1) {
                    Some(next) => value = next,
                    None => break,
                }
            }
            entry.cursors[i] = value;
        }
        None
    }

    fn take(&mut self, addr: Addr, pool: usize, owner: &Owner) {
        self.owners.insert(addr, owner.clone());
        if let Some(group) = self.groups.get_mut(owner) {
            group.addresses.insert(addr.family, (addr, pool));
        }
        *self.pools[pool].in_use.entry(addr.family).or_default() += 1;
    }

    /// Takes a Service out of its group; the group's addresses go with its last member.
    /// Returns whether addresses were freed.
    fn leave(&mut self, key: &ServiceKey) -> bool {
        let Some(owner) = self
            .services
            .get_mut(key)
            .and_then(|entry| entry.owner.take())
        else {
            return false;
        };
        let Some(group) = self.groups.get_mut(&owner) else {
            return false;
        };
        group.members.remove(key);
        // The group keeps the addresses its remaining members hold, or will hold once placed.
        let wanted: BTreeSet<Family> = group
            .members
            .iter()
            .filter_map(|member| self.services.get(member))
            .flat_map(|entry| match &entry.outcome {
                Outcome::Failed(reason) if reason == PENDING => entry.request.families.clone(),
                outcome => outcome.addresses().into_iter().map(Family::of).collect(),
            })
            .collect();
        let unwanted: Vec<Family> = group
            .addresses
            .keys()
            .filter(|family| !wanted.contains(family))
            .copied()
            .collect();
        let freed: Vec<(Addr, usize)> = unwanted
            .iter()
            .filter_map(|family| group.addresses.remove(family))
            .collect();
        if group.members.is_empty() {
            self.groups.remove(&owner);
        }
        for &(addr, pool) in &freed {
            self.release(addr, pool);
        }
        !freed.is_empty()
    }

    fn release(&mut self, addr: Addr, pool: usize) {
        self.owners.remove(&addr);
        let entry = &mut self.pools[pool];
        if let Some(used) = entry.in_use.get_mut(&addr.family) {
            *used = used.saturating_sub(1);
        }
        if let Some(range) = entry.pool.range_of(addr)
            && addr.value < entry.cursors[range]
        {
            entry.cursors[range] = addr.value;
        }
    }

    /// Places again every Service that got nothing, now that addresses were freed.
    fn retry_failed(&mut self) {
        let failed: Vec<ServiceKey> = self.failed.iter().cloned().collect();
        for key in failed {
            let Some(entry) = self.services.get(&key) else {
                continue;
            };
            let request = entry.request.clone();
            self.adopt(request, &[]);
            self.complete(&key);
        }
    }

    fn sharing_refusal(&self, request: &Request, owner: &Owner) -> Option<String> {
        let Owner::Shared { key: sharing, .. } = owner else {
            return None;
        };
        let field = format!("metadata.annotations[\"{SHARING_ANNOTATION}\"]");
        let group = self.groups.get(owner)?;
        for member in group.members.iter().filter(|m| **m != request.key) {
            let Some(other) = self.services.get(member) else {
                continue;
            };
            if other.request.local_traffic != request.local_traffic {
                let policy = |local| if local { "Local" } else { "Cluster" };
                return Some(format!(
                    "{field}: {sharing:?}: sharing refused: externalTrafficPolicy {} differs from \
                     {member}'s {}",
                    policy(request.local_traffic),
                    policy(other.request.local_traffic)
                ));
            }
            if let Some((protocol, port)) = request
                .ports
                .iter()
                .find(|port| other.request.ports.contains(port))
            {
                return Some(format!(
                    "{field}: {sharing:?}: sharing refused: port {protocol}/{port} is also used \
                     by {member}"
                ));
            }
        }
        None
    }

    /// Why a member of a sharing group may not hold the group's `held` address of `pool`.
    fn shared_pool_refusal(
        &self,
        request: &Request,
        owner: &Owner,
        held: Addr,
        pool: usize,
    ) -> Option<String> {
        let Owner::Shared { key: sharing, .. } = owner else {
            return None;
        };
        if self.may_use(request, pool) {
            return None;
        }
        let held_by = self
            .groups
            .get(owner)
            .and_then(|g| g.members.iter().find(|m| **m != request.key))
            .map_or_else(|| self.first_member(owner), Clone::clone);
        Some(format!(
            "metadata.annotations[\"{SHARING_ANNOTATION}\"]: {sharing:?}: sharing refused: \
             {held} (held by {held_by}) is from pool {:?}, which this Service may not use",
            self.pools[pool].pool.name
        ))
    }

    fn first_member(&self, owner: &Owner) -> ServiceKey {
        match owner {
            Owner::Alone(key) => key.clone(),
            Owner::Shared { namespace, key } => self
                .groups
                .get(owner)
                .and_then(|g| g.members.first().cloned())
                .unwrap_or_else(|| ServiceKey::new(namespace, &format!("(sharing key {key})"))),
        }
    }

    fn pool_of(&self, addr: Addr) -> Option<usize> {
        self.pools
            .iter()
            .position(|entry| entry.pool.range_of(addr).is_some())
    }

    fn may_use(&self, request: &Request, pool: usize) -> bool {
        let pool = &self.pools[pool].pool;
        let empty = BTreeMap::new();
        let namespace_labels = self
            .namespaces
            .get(&request.key.namespace)
            .unwrap_or(&empty);
        request.pool.as_ref().is_none_or(|name| *name == pool.name)
            && pool.admits(&request.labels, namespace_labels)
    }
}

/// Whether two reads of a Service ask for the same (its status may differ).
fn same_ask(a: &Request, b: &Request) -> bool {
    let mut a = a.clone();
    a.current.clone_from(&b.current);
    a == *b
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::allocator::request::FamilyPolicy;

    fn pool(name: &str, created: &str, addresses: &[&str]) -> PoolInput {
        PoolInput {
            name: name.into(),
            created: created.into(),
            spec: crate::allocator::pool::tests::spec(addresses),
        }
    }

    fn request(name: &str, created: &str) -> Request {
        Request {
            key: ServiceKey::new("default", name),
            created: created.into(),
            labels: BTreeMap::new(),
            families: vec![Family::V4],
            policy: FamilyPolicy::Single,
            pool: None,
            requested: Vec::new(),
            sharing_key: None,
            ports: [("TCP".to_owned(), 80)].into(),
            local_traffic: false,
            current: Vec::new(),
            invalid: None,
        }
    }

    fn ips(books: &Books, name: &str) -> Vec<String> {
        books
            .outcome(&ServiceKey::new("default", name))
            .map(|o| o.addresses().iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    fn failure(books: &Books, name: &str) -> String {
        match books.outcome(&ServiceKey::new("default", name)) {
            Some(Outcome::Failed(reason)) => reason.clone(),
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn dual_stack_policies_take_one_address_per_family() {
        let pools = [
            pool("v4", "1", &["192.0.2.0/31"]),
            pool("v6", "2", &["2001:db8::/127"]),
        ];
        let mut books = Books::new(&pools, HashMap::new());
        let mut dual = request("dual", "1");
        dual.families = vec![Family::V6, Family::V4];
        dual.policy = FamilyPolicy::RequireDual;
        books.upsert(dual);
        assert_eq!(ips(&books, "dual"), ["2001:db8::", "192.0.2.0"]);

        let only_v4 = [pool("v4", "1", &["192.0.2.0/31"])];
        let mut books = Books::new(&only_v4, HashMap::new());
        let mut require = request("require", "1");
        require.families = vec![Family::V4, Family::V6];
        require.policy = FamilyPolicy::RequireDual;
        let mut prefer = require.clone();
        prefer.key.name = "prefer".into();
        prefer.policy = FamilyPolicy::PreferDual;
        books.upsert(require);
        books.upsert(prefer);
        assert_eq!(
            failure(&books, "require"),
            "spec.ipFamilies: IPv6: no automatic pool this Service may use has IPv6 addresses"
        );
        // All or nothing: the IPv4 address it would have had is the one `prefer` got.
        assert_eq!(ips(&books, "prefer"), ["192.0.2.0"]);
    }

    #[test]
    fn requested_addresses_are_given_or_refused_by_field_and_value() {
        let mut books = Books::new(&[pool("p", "1", &["192.0.2.0/30"])], HashMap::new());
        let mut asks = request("asks", "1");
        asks.requested = vec![("192.0.2.2".parse().unwrap(), "spec.loadBalancerIP".into())];
        books.upsert(asks.clone());
        assert_eq!(ips(&books, "asks"), ["192.0.2.2"]);
        asks.key.name = "also".into();
        books.upsert(asks.clone());
        assert_eq!(
            failure(&books, "also"),
            "spec.loadBalancerIP: \"192.0.2.2\" is already taken by default/asks"
        );
        asks.key.name = "outside".into();
        asks.requested = vec![("10.0.0.1".parse().unwrap(), "spec.loadBalancerIP".into())];
        books.upsert(asks);
        assert_eq!(
            failure(&books, "outside"),
            "spec.loadBalancerIP: \"10.0.0.1\" is outside every pool the Service may use"
        );
        // Freed, the address goes to the one that asked for it.
        books.remove(&ServiceKey::new("default", "asks"));
        assert_eq!(ips(&books, "also"), ["192.0.2.2"]);
    }

    #[test]
    fn an_address_of_a_request_only_pool_goes_back_when_no_longer_asked_for() {
        let mut manual = pool("manual", "1", &["198.51.100.0/30"]);
        manual.spec.auto_assign = false;
        let pools = [manual, pool("auto", "2", &["192.0.2.0/30"])];
        let mut books = Books::new(&pools, HashMap::new());
        let mut asks = request("first", "1");
        asks.requested = vec![(
            "198.51.100.2".parse().unwrap(),
            "spec.loadBalancerIP".into(),
        )];
        books.upsert(asks.clone());
        asks.key.name = "second".into();
        books.upsert(asks.clone());
        assert_eq!(
            failure(&books, "second"),
            "spec.loadBalancerIP: \"198.51.100.2\" is already taken by default/first"
        );
        let mut stopped = request("first", "1");
        stopped.current = vec!["198.51.100.2".parse().unwrap()];
        let changed = books.upsert(stopped.clone());
        assert_eq!(ips(&books, "first"), ["192.0.2.0"]);
        assert_eq!(ips(&books, "second"), ["198.51.100.2"]);
        assert!(changed.contains(&ServiceKey::new("default", "second")));
        // Rebuilt from statuses that still show it, the one asking gets it, though younger.
        let mut second = asks;
        second.created = "2".into();
        let books = Books::rebuild(&pools, HashMap::new(), vec![stopped.clone(), second]);
        assert_eq!(ips(&books, "second"), ["198.51.100.2"]);
        assert_eq!(ips(&books, "first"), ["192.0.2.0"]);
        // Naming the pool is asking for its addresses: what it holds stays.
        let mut named = stopped;
        named.pool = Some("manual".into());
        let books = Books::rebuild(&pools, HashMap::new(), vec![named]);
        assert_eq!(ips(&books, "first"), ["198.51.100.2"]);
    }

    #[test]
    fn sharing_needs_distinct_ports_and_the_same_traffic_policy() {
        let mut books = Books::new(&[pool("p", "1", &["192.0.2.0/30"])], HashMap::new());
        let shared = |name: &str, port: i32, local: bool| {
            let mut r = request(name, "1");
            r.sharing_key = Some("k".into());
            r.ports = [("TCP".to_owned(), port)].into();
            r.local_traffic = local;
            r
        };
        books.upsert(shared("a", 80, false));
        books.upsert(shared("b", 443, false));
        books.upsert(shared("c", 80, false));
        books.upsert(shared("d", 53, true));
        assert_eq!(ips(&books, "a"), ips(&books, "b"));
        assert_eq!(
            failure(&books, "c"),
            "metadata.annotations[\"lbagent.io/sharing-key\"]: \"k\": sharing refused: port \
             TCP/80 is also used by default/a"
        );
        assert!(failure(&books, "d").contains("externalTrafficPolicy Local differs"));
        // The address stays while one member holds it.
        books.remove(&ServiceKey::new("default", "a"));
        assert_eq!(ips(&books, "b"), ["192.0.2.0"]);
        assert_eq!(
            ips(&books, "c"),
            ["192.0.2.0"],
            "its port no longer clashes"
        );
    }

    #[test]
    fn a_member_the_groups_pool_excludes_is_refused_and_joins_once_admitted() {
        let pools = || {
            let mut team = pool("team", "1", &["192.0.2.0/30"]);
            team.spec.service_selector = Some(
                serde_json::from_value(serde_json::json!({"matchLabels": {"team": "a"}})).unwrap(),
            );
            let mut general = pool("general", "2", &["203.0.113.0/30"]);
            general.spec.priority = 10;
            [team, general]
        };
        let shared = |name: &str, port: i32, team: bool| {
            let mut r = request(name, "1");
            r.sharing_key = Some("k".into());
            r.ports = [("TCP".to_owned(), port)].into();
            if team {
                r.labels.insert("team".into(), "a".into());
            }
            r
        };
        let mut books = Books::new(&pools(), HashMap::new());
        books.upsert(shared("a", 80, true));
        books.upsert(shared("b", 443, false));
        assert_eq!(ips(&books, "a"), ["192.0.2.0"]);
        assert_eq!(
            failure(&books, "b"),
            "metadata.annotations[\"lbagent.io/sharing-key\"]: \"k\": sharing refused: \
             192.0.2.0 (held by default/a) is from pool \"team\", which this Service may not use"
        );
        assert_eq!(books.pool_reports()[0].families, [(Family::V4, 4, 0)]);
        // Admitted by the pool, it shares.
        books.upsert(shared("b", 443, true));
        assert_eq!(ips(&books, "b"), ["192.0.2.0"]);

        // Rebuilt with the excluded member older: it founds the group from `general`, which
        // admits both, and the other shares that.
        let mut older = shared("b", 443, false);
        older.created = "0".into();
        let books = Books::rebuild(&pools(), HashMap::new(), vec![shared("a", 80, true), older]);
        assert_eq!(ips(&books, "b"), ["203.0.113.0"]);
        assert_eq!(ips(&books, "a"), ["203.0.113.0"]);
        assert_eq!(books.pool_reports()[1].families, [(Family::V4, 4, 0)]);
    }

    #[test]
    fn exhaustion_recovers_when_the_pool_grows() {
        let mut books = Books::new(&[pool("p", "1", &["192.0.2.1"])], HashMap::new());
        books.upsert(request("a", "1"));
        books.upsert(request("b", "2"));
        assert_eq!(
            failure(&books, "b"),
            "spec.ipFamilies: IPv4: every pool this Service may use is exhausted (p)"
        );
        let changed =
            books.reconfigure(&[pool("p", "1", &["192.0.2.1-192.0.2.2"])], HashMap::new());
        assert_eq!(changed, [ServiceKey::new("default", "b")].into());
        assert_eq!(ips(&books, "a"), ["192.0.2.1"]);
        assert_eq!(ips(&books, "b"), ["192.0.2.2"]);
    }

    #[test]
    fn an_address_the_pool_no_longer_covers_is_replaced() {
        let mut books = Books::new(&[pool("p", "1", &["192.0.2.0/30"])], HashMap::new());
        books.upsert(request("a", "1"));
        assert_eq!(ips(&books, "a"), ["192.0.2.0"]);
        books.reconfigure(&[pool("p", "1", &["198.51.100.0/30"])], HashMap::new());
        assert_eq!(ips(&books, "a"), ["198.51.100.0"]);
    }

    #[test]
    fn the_later_of_two_overlapping_pools_is_refused_by_name() {
        let books = Books::new(
            &[
                pool("late", "2", &["192.0.2.128/25"]),
                pool("early", "1", &["192.0.2.0/24"]),
            ],
            HashMap::new(),
        );
        let reports = books.pool_reports();
        assert_eq!(reports[0].name, "early");
        assert_eq!(reports[0].error, None);
        assert_eq!(reports[0].families, [(Family::V4, 256, 0)]);
        assert_eq!(
            reports[1]
                .error
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            Some(
                "spec.addresses[0]: \"192.0.2.128/25\": overlaps \"192.0.2.0/24\" of pool \
                 \"early\", which was there first"
            )
        );
    }

    #[test]
    fn a_rebuild_keeps_what_services_hold_and_the_older_wins_a_duplicate() {
        let pools = [pool("p", "1", &["192.0.2.0/29"])];
        let mut a = request("a", "2026-01-01T00:00:00Z");
        a.current = vec!["192.0.2.5".parse().unwrap()];
        let mut b = request("b", "2026-01-02T00:00:00Z");
        b.current = vec!["192.0.2.5".parse().unwrap()];
        let mut c = request("c", "2026-01-03T00:00:00Z");
        c.current = vec!["192.0.2.0".parse().unwrap()];
        let mut books = Books::rebuild(&pools, HashMap::new(), vec![b, c, a]);
        assert_eq!(ips(&books, "a"), ["192.0.2.5"]);
        assert_eq!(ips(&books, "c"), ["192.0.2.0"]);
        assert_eq!(ips(&books, "b"), ["192.0.2.1"]);
        assert_eq!(
            books.take_conflicts(),
            [Conflict {
                address: "192.0.2.5".parse().unwrap(),
                kept_by: ServiceKey::new("default", "a"),
                taken_from: ServiceKey::new("default", "b"),
            }]
        );
    }

    #[test]
    fn selectors_and_the_pool_annotation_choose_the_pool() {
        let mut team = pool("team", "1", &["192.0.2.0/30"]);
        team.spec.namespace_selector = Some(
            serde_json::from_value(serde_json::json!({"matchLabels": {"team": "a"}})).unwrap(),
        );
        let mut manual = pool("manual", "2", &["198.51.100.0/30"]);
        manual.spec.auto_assign = false;
        let mut general = pool("general", "3", &["203.0.113.0/30"]);
        general.spec.priority = 10;
        let namespaces = HashMap::from([(
            "default".to_owned(),
            BTreeMap::from([("team".to_owned(), "a".to_owned())]),
        )]);
        let mut books = Books::new(&[team, manual, general], namespaces);
        books.upsert(request("auto", "1"));
        let mut named = request("named", "1");
        named.pool = Some("manual".into());
        books.upsert(named);
        let mut missing = request("missing", "1");
        missing.pool = Some("nope".into());
        books.upsert(missing);
        assert_eq!(ips(&books, "auto"), ["192.0.2.0"]);
        assert_eq!(ips(&books, "named"), ["198.51.100.0"]);
        assert_eq!(
            failure(&books, "missing"),
            "metadata.annotations[\"lbagent.io/pool\"]: \"nope\": no such pool"
        );
        // Another namespace is not admitted to `team`: it falls to `general`.
        let mut other = request("elsewhere", "1");
        other.key.namespace = "other".into();
        books.upsert(other);
        assert_eq!(
            books
                .outcome(&ServiceKey::new("other", "elsewhere"))
                .map(Outcome::addresses),
            Some(vec!["203.0.113.0".parse().unwrap()])
        );
    }

    #[test]
    fn avoiding_buggy_addresses_skips_dot_zero_and_dot_255() {
        let mut p = pool("p", "1", &["192.0.2.255-192.0.3.1"]);
        p.spec.avoid_buggy_ips = true;
        let mut books = Books::new(&[p], HashMap::new());
        books.upsert(request("a", "1"));
        assert_eq!(ips(&books, "a"), ["192.0.3.1"]);
    }

    #[test]
    fn status_catching_up_is_no_change() {
        let mut books = Books::new(&[pool("p", "1", &["192.0.2.0/30"])], HashMap::new());
        let first = books.upsert(request("a", "1"));
        assert_eq!(first, [ServiceKey::new("default", "a")].into());
        let mut caught_up = request("a", "1");
        caught_up.current = vec!["192.0.2.0".parse().unwrap()];
        assert!(books.upsert(caught_up).is_empty());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Upsert {
            name: u8,
            sharing: Option<u8>,
            port: i32,
            requested: Option<u8>,
            current: Option<u8>,
            dual: bool,
        },
        Remove(u8),
        Pools(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..12, proptest::option::of(0u8..2), 0i32..3, proptest::option::of(0u8..12),
                proptest::option::of(0u8..12), any::<bool>())
                .prop_map(|(name, sharing, port, requested, current, dual)| Op::Upsert {
                    name, sharing, port, requested, current, dual
                }),
            2 => (0u8..12).prop_map(Op::Remove),
            1 => (0u8..4).prop_map(Op::Pools),
        ]
    }

    fn pools_for(variant: u8) -> Vec<PoolInput> {
        match variant {
            0 => vec![pool("a", "1", &["192.0.2.0-192.0.2.3", "2001:db8::/126"])],
            1 => vec![
                pool("a", "1", &["192.0.2.0-192.0.2.5"]),
                pool("b", "2", &["192.0.2.4-192.0.2.9", "2001:db8::/127"]),
            ],
            2 => vec![pool("b", "1", &["192.0.2.6-192.0.2.9"])],
            _ => vec![pool("a", "1", &["192.0.2.0-192.0.2.11", "2001:db8::/125"])],
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Whatever happens, no address has two owners (unless they share it by key), every
        /// assigned address lies in an accepted pool, and the pools count exactly what is held.
        #[test]
        fn never_two_owners_for_one_address(
            ops in proptest::collection::vec(op(), 1..60)
        ) {
            let mut pools = pools_for(0);
            let mut books = Books::new(&pools, HashMap::new());
            for op in ops {
                match op {
                    Op::Upsert { name, sharing, port, requested, current, dual } => {
                        let mut r = request(&format!("s{name}"), &format!("{name:02}"));
                        r.sharing_key = sharing.map(|k| format!("k{k}"));
                        r.ports = [("TCP".to_owned(), 80 + port)].into();
                        let ip = |n: u8| format!("192.0.2.{n}").parse().unwrap();
                        r.requested = requested
                            .map(|n| (ip(n), "spec.loadBalancerIP".into()))
                            .into_iter()
                            .collect();
                        r.current = current.map(ip).into_iter().collect();
                        if dual {
                            r.families = vec![Family::V4, Family::V6];
                            r.policy = FamilyPolicy::PreferDual;
                        }
                        books.upsert(r);
                    }
                    Op::Remove(name) => {
                        books.remove(&ServiceKey::new("default", &format!("s{name}")));
                    }
                    Op::Pools(variant) => {
                        pools = pools_for(variant);
                        books.reconfigure(&pools, HashMap::new());
                    }
                }
                let mut owners: HashMap<IpAddr, (Option<String>, ServiceKey)> = HashMap::new();
                let mut held: HashMap<String, u64> = HashMap::new();
                for (key, outcome) in books.services() {
                    let sharing = books.services[key].request.sharing_key.clone();
                    if let Outcome::Assigned { addresses, .. } = outcome {
                        for (ip, pool) in addresses {
                            match owners.get(ip) {
                                Some((Some(k), _)) if sharing.as_ref() == Some(k) => {}
                                Some((_, other)) => prop_assert!(
                                    false, "{ip} held by {other} and {key}"
                                ),
                                None => {
                                    owners.insert(*ip, (sharing.clone(), key.clone()));
                                    *held.entry(pool.clone()).or_default() += 1;
                                }
                            }
                            let accepted = books.pool_reports().into_iter()
                                .any(|r| r.name == *pool && r.error.is_none());
                            prop_assert!(accepted, "{ip} from {pool}, not an accepted pool");
                            prop_assert!(books.pools[books.by_name[pool]].pool
                                .range_of(Addr::from(*ip)).is_some());
                        }
                    }
                }
                for report in books.pool_reports() {
                    let counted: u64 = report.families.iter().map(|(_, _, used)| used).sum();
                    prop_assert_eq!(counted, held.get(&report.name).copied().unwrap_or(0),
                        "pool {}", report.name);
                }
            }
        }
    }
}
