//! Prometheus metrics, all under `lbagent_`. Counters the kernel keeps (the pinned maps) and
//! the published status (addresses, BIRD's protocols) are read at scrape time, so a scrape
//! always sees the same figures as `lbagent counters` and `lbagent status`; only the
//! reconciler's own passes are counted as they happen.

use std::{path::PathBuf, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::Registry,
};
use tokio::sync::watch;

use crate::{
    dataplane::{NeighbourCounters, NeighbourMaps, PinLayout, PortCounters, VipCounters, VipTable},
    desired::AddressState,
    reconcile::{ReconcileMetrics, Status},
    sinks::routing::control::ProtocolStatus,
};

pub const PREFIX: &str = "lbagent";

/// Where the scrape-time collectors read from.
pub struct Sources {
    pub status: watch::Receiver<Option<Status>>,
    /// The dataplane's pin root, when the dataplane is on.
    pub pins: Option<PathBuf>,
}

pub fn registry(reconcile: &ReconcileMetrics, sources: Sources) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register(
        "build",
        "lbagent's version",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    registry.register(
        "reconciles",
        "Reconcile runs, by what triggered them",
        reconcile.runs.clone(),
    );
    registry.register(
        "reconcile_failures",
        "Reconcile runs in which a step failed (and was retried)",
        reconcile.failures.clone(),
    );
    registry.register_with_unit(
        "reconcile_duration",
        "How long a reconcile run took",
        prometheus_client::registry::Unit::Seconds,
        reconcile.duration.clone(),
    );
    registry.register_collector(Box::new(StateCollector(Arc::new(sources))));
    registry
}

#[derive(Debug)]
struct StateCollector(Arc<Sources>);

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("pins", &self.pins)
            .finish_non_exhaustive()
    }
}

type Labels = Vec<(&'static str, String)>;

/// One metric without labels.
fn single<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: M,
) -> Result<(), std::fmt::Error> {
    value.encode(encoder.encode_descriptor(name, help, None, value.metric_type())?)
}

/// A counter family of the dataplane: its name, its help, and what it counts of each `T`.
type Family<T> = (&'static str, &'static str, fn(&T) -> u64);

/// One metric with its labelled values.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    values: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in values {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sources = &self.0;
        let status = sources.status.borrow().clone();
        if let Some(status) = &status {
            let held = |state: AddressState| {
                status.addresses.iter().filter(|a| a.state == state).count() as i64
            };
            family(
                &mut encoder,
                "addresses",
                "Load-balancer addresses the node holds: virtual (on the interface), local (in a node subnet), unsupported (a family the node lacks)",
                MetricType::Gauge,
                [
                    ("virtual", held(AddressState::Virtual)),
                    ("local", held(AddressState::Local)),
                    ("unsupported", held(AddressState::Unsupported)),
                ]
                .map(|(state, n)| (vec![("state", state.to_owned())], ConstGauge::new(n))),
            )?;
            single(
                &mut encoder,
                "services_rejected",
                "Services the source skipped because of what they hold (see lbagent status)",
                ConstGauge::new(status.rejected.len() as i64),
            )?;
        }
        if let Some(root) = &sources.pins {
            // A dataplane not loaded yet has no counters; that is not a scrape error.
            let table = VipTable::open(&PinLayout::new(root)).ok();
            if let Some(ports) = table.as_ref().and_then(|t| t.port_counters().ok()) {
                let per = |value: fn(&PortCounters) -> u64| {
                    ports
                        .iter()
                        .map(move |p| {
                            (
                                vec![
                                    ("address", p.address.to_string()),
                                    ("protocol", p.protocol.to_owned()),
                                    ("port", p.port.to_string()),
                                ],
                                ConstCounter::new(value(p)),
                            )
                        })
                        .collect::<Vec<_>>()
                };
                let families: [Family<PortCounters>; 2] = [
                    (
                        "dataplane_port_received_packets",
                        "Packets to a service port of a load-balancer address that the XDP program let through",
                        |p| p.packets,
                    ),
                    (
                        "dataplane_port_received_bytes",
                        "Bytes to a service port of a load-balancer address that the XDP program let through",
                        |p| p.bytes,
                    ),
                ];
                for (name, help, value) in families {
                    family(&mut encoder, name, help, MetricType::Counter, per(value))?;
                }
            }
            if let Some(counters) = table.as_ref().and_then(|t| t.counters().ok()) {
                let per = |value: fn(&VipCounters) -> u64| {
                    counters
                        .iter()
                        .map(move |c| {
                            (
                                vec![("address", c.address.to_string())],
                                ConstCounter::new(value(c)),
                            )
                        })
                        .collect::<Vec<_>>()
                };
                let families: [Family<VipCounters>; 4] = [
                    (
                        "dataplane_received_packets",
                        "Packets to a load-balancer address seen by the XDP program",
                        |c| c.packets,
                    ),
                    (
                        "dataplane_received_bytes",
                        "Bytes to a load-balancer address seen by the XDP program",
                        |c| c.bytes,
                    ),
                    (
                        "dataplane_sent_packets",
                        "Packets from a load-balancer address seen by the tc egress program",
                        |c| c.tx_packets,
                    ),
                    (
                        "dataplane_sent_bytes",
                        "Bytes from a load-balancer address seen by the tc egress program",
                        |c| c.tx_bytes,
                    ),
                ];
                for (name, help, value) in families {
                    family(&mut encoder, name, help, MetricType::Counter, per(value))?;
                }
                let drops = counters.iter().flat_map(|c| {
                    let d = &c.drops;
                    [
                        ("port", d.port),
                        ("source", d.source),
                        ("protocol", d.protocol),
                        ("icmp", d.icmp),
                        ("malformed", d.malformed),
                    ]
                    .map(|(reason, n)| {
                        (
                            vec![
                                ("address", c.address.to_string()),
                                ("reason", reason.to_owned()),
                            ],
                            ConstCounter::new(n),
                        )
                    })
                });
                family(
                    &mut encoder,
                    "dataplane_dropped_packets",
                    "Packets to a load-balancer address dropped by the XDP program, by reason",
                    MetricType::Counter,
                    drops.collect::<Vec<_>>(),
                )?;
            }
        }
        if let Some(neighbours) = status.as_ref().and_then(|s| s.neighbours.as_ref()) {
            let counters = sources
                .pins
                .as_ref()
                .and_then(|root| NeighbourMaps::open(&PinLayout::new(root)).ok());
            encode_neighbours(&mut encoder, neighbours, counters.as_ref())?;
        }
        if let Some(routing) = status.as_ref().and_then(|s| s.routing.as_ref()) {
            let label =
                |p: &ProtocolStatus| vec![("name", p.name.clone()), ("protocol", p.proto.clone())];
            let routing_protocols = routing.protocols.iter().filter(|p| p.has_neighbours());
            family(
                &mut encoder,
                "routing_session_up",
                "1 while a BGP session is established or an OSPF/RIP protocol is up, per neighbour",
                MetricType::Gauge,
                routing_protocols
                    .clone()
                    .map(|p| (label(p), ConstGauge::new(i64::from(p.is_up()))))
                    .collect::<Vec<_>>(),
            )?;
            family(
                &mut encoder,
                "routing_export_limit_hit",
                "1 while the neighbour's export ceiling (routing.export.maxRoutes) holds routes back",
                MetricType::Gauge,
                routing_protocols
                    .clone()
                    .map(|p| (label(p), ConstGauge::new(i64::from(p.export_limit_hit))))
                    .collect::<Vec<_>>(),
            )?;
            family(
                &mut encoder,
                "routing_routes_exported",
                "Routes BIRD exports to the neighbour",
                MetricType::Gauge,
                routing_protocols
                    .map(|p| {
                        (
                            label(p),
                            ConstGauge::new(i64::try_from(p.exported).unwrap_or(i64::MAX)),
                        )
                    })
                    .collect::<Vec<_>>(),
            )?;
            single(
                &mut encoder,
                "bird_restarts",
                "Times lbagent restarted its BIRD",
                ConstCounter::new(routing.restarts),
            )?;
        }
        Ok(())
    }
}

/// Local addresses: who answers (from the published status) and what the XDP responder
/// counted (from its pinned map, at scrape time).
fn encode_neighbours(
    encoder: &mut DescriptorEncoder,
    report: &crate::sinks::neighbours::NeighbourReport,
    maps: Option<&NeighbourMaps>,
) -> Result<(), std::fmt::Error> {
    let label = |address: &std::net::IpAddr| vec![("address", address.to_string())];
    family(
        encoder,
        "neighbour_owner",
        "1 while this node answers ARP / neighbour discovery for the local address, 0 while another node does",
        MetricType::Gauge,
        report
            .addresses
            .iter()
            .map(|e| (label(&e.address), ConstGauge::new(i64::from(e.answering))))
            .collect::<Vec<_>>(),
    )?;
    family(
        encoder,
        "neighbour_candidates",
        "Live nodes that may answer for the local address (the owner and its successors)",
        MetricType::Gauge,
        report
            .addresses
            .iter()
            .map(|e| {
                let n = i64::try_from(e.candidates.len()).unwrap_or(i64::MAX);
                (label(&e.address), ConstGauge::new(n))
            })
            .collect::<Vec<_>>(),
    )?;
    let Some(maps) = maps else {
        return Ok(());
    };
    let counters: Vec<_> = report
        .addresses
        .iter()
        .filter_map(|e| Some((e.address, maps.counters(e.address).ok()??)))
        .collect();
    let per = |value: fn(&NeighbourCounters) -> u64| {
        counters
            .iter()
            .map(|(address, c)| (label(address), ConstCounter::new(value(c))))
            .collect::<Vec<_>>()
    };
    family(
        encoder,
        "neighbour_answered",
        "ARP replies and neighbour advertisements the XDP responder sent for the local address",
        MetricType::Counter,
        per(|c| c.answered),
    )?;
    family(
        encoder,
        "neighbour_silenced",
        "Requests for the local address the XDP responder dropped (another node owns it, or the answering lease lapsed)",
        MetricType::Counter,
        per(|c| c.silenced),
    )?;
    family(
        encoder,
        "neighbour_foreign",
        "Answers for a local address this node owns from another hardware address (split brain)",
        MetricType::Counter,
        per(|c| c.foreign),
    )
}

pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}
