//! BIRD 2 configuration, built as code from the validated model: no user string reaches the
//! output except through a type that has already refused what BIRD would misread.
//!
//! The filters match the direct protocol by name and keep only host routes, so they never
//! change when addresses do: BIRD follows kube-lb0 by netlink, and address changes need no
//! reload.

use std::{fmt::Write as _, net::Ipv4Addr};

use ipnet::IpNet;

use super::model::{BgpNeighbor, Family, IfaceName, Ospf, OspfType, Peer, Rip, RoutingConfig};

pub const DEVICE: &str = "lbagent_device";
pub const DIRECT: &str = "lbagent_direct";
pub const BFD: &str = "lbagent_bfd";
pub const EXPORT: &str = "lbagent_export";
pub const EXPORT_BGP: &str = "lbagent_export_bgp";

/// Whether the output is BIRD's whole config (lbagent runs BIRD) or a file for the
/// operator's config to include (their BIRD already has a router id, a log and a device
/// protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    WholeConfig,
    Include,
}

/// The config for `config`'s mode: BIRD's whole config when lbagent runs BIRD, an include
/// for the operator's BIRD otherwise.
pub fn render_for_mode(
    config: &RoutingConfig,
    router_id: Ipv4Addr,
    interface: &IfaceName,
) -> String {
    let scope = match config.mode {
        super::model::Mode::Managed { .. } => Scope::WholeConfig,
        super::model::Mode::External { .. } => Scope::Include,
    };
    render(config, router_id, interface, scope)
}

pub fn render(
    config: &RoutingConfig,
    router_id: Ipv4Addr,
    interface: &IfaceName,
    scope: Scope,
) -> String {
    let mut w = Writer::default();
    w.line("# Written by lbagent from its config; changes here are overwritten.");
    if scope == Scope::WholeConfig {
        w.line("log stderr all;");
        w.line(&format!("router id {router_id};"));
        // After a restart with -R, exports wait for the peers' End-of-RIB at most this long.
        w.line("graceful restart wait 30;");
        // A short scan bounds how late BIRD catches up when a burst of address changes
        // overflows its netlink socket.
        w.block(&format!("protocol device {DEVICE}"), "", |w| {
            w.line("scan time 2;")
        });
    }
    w.block(&format!("protocol direct {DIRECT}"), "", |w| {
        w.line("ipv4;");
        w.line("ipv6;");
        w.line(&format!("interface \"{}\";", interface.as_str()));
    });
    w.block(&format!("filter {EXPORT}"), "", |w| {
        export_checks(w, &config.export.prefixes)
    });
    w.block(&format!("filter {EXPORT_BGP}"), "", |w| {
        export_checks_without_accept(w, &config.export.prefixes);
        for (asn, value) in &config.export.communities {
            w.line(&format!("bgp_community.add(({asn}, {value}));"));
        }
        w.line("accept;");
    });
    // Neighbours with a MED or local preference get a filter per set of values (named by
    // them, so it stays put while nodes and addresses change): the same checks, then the
    // attributes. Still no address in it, so addresses never reload BIRD.
    let attributes: std::collections::BTreeSet<(Option<u32>, Option<u32>)> = config
        .bgp
        .iter()
        .map(|n| (n.med, n.local_pref))
        .filter(|&(med, local_pref)| med.is_some() || local_pref.is_some())
        .collect();
    for (med, local_pref) in attributes {
        w.block(
            &format!("filter {}", attribute_filter(med, local_pref)),
            "",
            |w| {
                export_checks_without_accept(w, &config.export.prefixes);
                for (asn, value) in &config.export.communities {
                    w.line(&format!("bgp_community.add(({asn}, {value}));"));
                }
                if let Some(med) = med {
                    w.line(&format!("bgp_med = {med};"));
                }
                if let Some(local_pref) = local_pref {
                    w.line(&format!("bgp_local_pref = {local_pref};"));
                }
                w.line("accept;");
            },
        );
    }
    if config.bgp.iter().any(|n| n.bfd) {
        w.block(&format!("protocol bfd {BFD}"), "", |_| {});
    }
    let limit = config.export.max_routes;
    for neighbor in &config.bgp {
        bgp(&mut w, neighbor, limit);
    }
    for ospf_config in &config.ospf {
        ospf(&mut w, ospf_config, limit);
    }
    for rip_config in &config.rip {
        rip(&mut w, rip_config, limit);
    }
    w.out
}

/// Only kube-lb0's host routes: the direct protocol by name, /32 and /128, and inside the
/// allowed prefixes if any are set.
fn export_checks(w: &mut Writer, prefixes: &[IpNet]) {
    export_checks_without_accept(w, prefixes);
    w.line("accept;");
}

fn export_checks_without_accept(w: &mut Writer, prefixes: &[IpNet]) {
    w.line(&format!("if proto != \"{DIRECT}\" then reject;"));
    w.line("if net.type = NET_IP4 && net.len != 32 then reject;");
    w.line("if net.type = NET_IP6 && net.len != 128 then reject;");
    if prefixes.is_empty() {
        return;
    }
    for (kind, host) in [("NET_IP4", 32), ("NET_IP6", 128)] {
        let set: Vec<String> = prefixes
            .iter()
            .filter(|p| (host == 32) == matches!(p, IpNet::V4(_)))
            .map(|p| format!("{p}{{{host},{host}}}"))
            .collect();
        if set.is_empty() {
            w.line(&format!("if net.type = {kind} then reject;"));
        } else {
            w.line(&format!(
                "if net.type = {kind} && !(net ~ [ {} ]) then reject;",
                set.join(", ")
            ));
        }
    }
}

/// `limit`: the export ceiling; BIRD blocks the routes over it and logs that it was hit.
fn channels(w: &mut Writer, families: &[Family], filter: &str, limit: Option<u32>) {
    let limit = limit.map_or_else(String::new, |n| format!(" export limit {n} action block;"));
    for family in families {
        let name = match family {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        };
        w.line(&format!(
            "{name} {{ import none; export filter {filter};{limit} }};"
        ));
    }
}

fn attribute_filter(med: Option<u32>, local_pref: Option<u32>) -> String {
    let med = med.map_or_else(String::new, |m| format!("_med{m}"));
    let local_pref = local_pref.map_or_else(String::new, |l| format!("_lp{l}"));
    format!("{EXPORT_BGP}{med}{local_pref}")
}

/// Only a gateway entry has no address, and the plan expands those before rendering.
fn bgp(w: &mut Writer, n: &BgpNeighbor, limit: Option<u32>) {
    let Peer::Address(address) = n.peer else {
        return;
    };
    w.block(&format!("protocol bgp {}", n.name.as_str()), "", |w| {
        match n.source_address {
            Some(source) => w.line(&format!("local {source} as {};", n.local_asn)),
            None => w.line(&format!("local as {};", n.local_asn)),
        }
        w.line(&format!("neighbor {address} port {} as {};", n.port, n.asn));
        if let Some(interface) = &n.interface {
            w.line(&format!("interface \"{}\";", interface.as_str()));
        }
        if let Some(password) = &n.password {
            w.line(&format!("password \"{}\";", password.as_str()));
        }
        if let Some(hops) = n.multihop {
            w.line(&format!("multihop {hops};"));
        }
        w.line(&format!("hold time {};", n.hold_time.as_secs()));
        if let Some(keepalive) = n.keepalive_time {
            w.line(&format!("keepalive time {};", keepalive.as_secs()));
        }
        if let Some(retry) = n.connect_retry_time {
            w.line(&format!("connect retry time {};", retry.as_secs()));
        }
        if let Some(delay) = n.connect_delay_time {
            w.line(&format!("connect delay time {};", delay.as_secs()));
        }
        if n.bfd {
            // A BFD-detected failure starts a graceful restart instead of a withdrawal.
            w.line(if n.graceful_restart {
                "bfd graceful;"
            } else {
                "bfd on;"
            });
        }
        w.line(if n.graceful_restart {
            "graceful restart on;"
        } else {
            "graceful restart aware;"
        });
        if n.med.is_none() && n.local_pref.is_none() {
            channels(w, &n.families, EXPORT_BGP, limit);
        } else {
            channels(
                w,
                &n.families,
                &attribute_filter(n.med, n.local_pref),
                limit,
            );
        }
    });
}

fn ospf(w: &mut Writer, o: &Ospf, limit: Option<u32>) {
    let version = match o.family {
        Family::Ipv4 => "v2",
        Family::Ipv6 => "v3",
    };
    w.block(
        &format!("protocol ospf {version} {}", o.name.as_str()),
        "",
        |w| {
            channels(w, &[o.family], EXPORT, limit);
            w.block(&format!("area {}", o.area), ";", |w| {
                for iface in &o.interfaces {
                    w.block(
                        &format!("interface \"{}\"", iface.name.as_str()),
                        ";",
                        |w| {
                            if let Some(cost) = iface.cost {
                                w.line(&format!("cost {cost};"));
                            }
                            match iface.kind {
                                Some(OspfType::Broadcast) => w.line("type broadcast;"),
                                Some(OspfType::PointToPoint) => w.line("type ptp;"),
                                None => {}
                            }
                            if let Some(hello) = iface.hello {
                                w.line(&format!("hello {hello};"));
                            }
                            if let Some(dead) = iface.dead {
                                w.line(&format!("dead {dead};"));
                            }
                        },
                    );
                }
            });
        },
    );
}

fn rip(w: &mut Writer, r: &Rip, limit: Option<u32>) {
    let kind = match r.family {
        Family::Ipv4 => "rip",
        Family::Ipv6 => "rip ng",
    };
    w.block(&format!("protocol {kind} {}", r.name.as_str()), "", |w| {
        channels(w, &[r.family], EXPORT, limit);
        for iface in &r.interfaces {
            w.block(&format!("interface \"{}\"", iface.as_str()), ";", |w| {
                if let Some(update) = r.update_time {
                    w.line(&format!("update time {update};"));
                }
            });
        }
    });
}

#[derive(Default)]
struct Writer {
    out: String,
    depth: usize,
}

impl Writer {
    fn line(&mut self, text: &str) {
        let _ = writeln!(self.out, "{:indent$}{text}", "", indent = self.depth * 2);
    }

    fn block(&mut self, head: &str, terminator: &str, body: impl FnOnce(&mut Self)) {
        self.line(&format!("{head} {{"));
        self.depth += 1;
        body(self);
        self.depth -= 1;
        self.line(&format!("}}{terminator}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::routing::model::RawRouting;

    fn config(yaml: &str) -> RoutingConfig {
        crate::yaml::from_str::<RawRouting>(yaml, crate::config::LIMITS)
            .unwrap()
            .validate()
            .unwrap()
    }

    fn kube_lb0() -> IfaceName {
        IfaceName::new("kube-lb0", "t").unwrap()
    }

    /// BIRD itself parses the rendered file (`bird -p`): the test needs bird2 installed,
    /// which `cargo xtask setup` does.
    fn bird_accepts(text: &str) {
        let path = std::env::temp_dir().join(format!(
            "lbagent-render-{}-{:p}.conf",
            std::process::id(),
            text
        ));
        std::fs::write(&path, text).unwrap();
        let output = std::process::Command::new("bird")
            .args(["-p", "-c"])
            .arg(&path)
            .output();
        let _ = std::fs::remove_file(&path);
        let output = output.expect("bird is installed (cargo xtask setup)");
        assert!(
            output.status.success(),
            "bird rejected:\n{text}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    const FULL: &str = "
routerId: 10.0.0.11
export: {prefixes: [203.0.113.0/24, 2001:db8:ff::/64], communities: [\"64512:100\"], maxRoutes: 100}
bgp:
  - {name: uplink4, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, holdTime: 9s, keepaliveTime: 1s, password: \"s3cret pass\", bfd: true}
  - {name: uplink6, neighbor: \"fd00::1\", asn: 64500, localAsn: 64512, sourceAddress: \"fd00::11\", multihop: 2, port: 1179, gracefulRestart: false}
  - {name: mp, neighbor: 10.0.0.2, asn: 64501, localAsn: 64512, families: [ipv4, ipv6], connectRetryTime: 2s, connectDelayTime: 1s, med: 50, localPref: 200}
ospf:
  - {name: o4, family: ipv4, area: 0, interfaces: [{name: eth0, cost: 10, type: broadcast, hello: 1, dead: 4}]}
  - {name: o6, family: ipv6, area: \"0.0.0.1\", interfaces: [{name: eth1, type: ptp}]}
rip:
  - {name: r4, family: ipv4, interfaces: [eth0], updateTime: 5}
  - {name: r6, family: ipv6, interfaces: [eth0]}
";

    #[test]
    fn every_protocol_renders_and_bird_accepts_it() {
        let text = render(
            &config(FULL),
            Ipv4Addr::new(10, 0, 0, 11),
            &kube_lb0(),
            Scope::WholeConfig,
        );
        for needle in [
            "router id 10.0.0.11;",
            "interface \"kube-lb0\";",
            "if proto != \"lbagent_direct\" then reject;",
            "!(net ~ [ 203.0.113.0/24{32,32} ])",
            "!(net ~ [ 2001:db8:ff::/64{128,128} ])",
            "bgp_community.add((64512, 100));",
            "protocol bfd lbagent_bfd",
            "neighbor 10.0.0.1 port 179 as 64500;",
            "password \"s3cret pass\";",
            "bfd graceful;",
            "connect retry time 2;",
            "connect delay time 1;",
            "local fd00::11 as 64512;",
            "graceful restart aware;",
            "protocol ospf v3 o6",
            "area 0.0.0.1 {",
            "type ptp;",
            "protocol rip ng r6",
            "import none;",
            "export limit 100 action block;",
            "filter lbagent_export_bgp_med50_lp200 {",
            "bgp_med = 50;",
            "bgp_local_pref = 200;",
            "export filter lbagent_export_bgp_med50_lp200;",
        ] {
            assert!(text.contains(needle), "no {needle:?} in\n{text}");
        }
        bird_accepts(&text);
    }

    #[test]
    fn the_include_leaves_out_what_the_operators_bird_has() {
        let text = render(
            &config(FULL),
            Ipv4Addr::new(10, 0, 0, 11),
            &kube_lb0(),
            Scope::Include,
        );
        assert!(
            !text.contains("router id")
                && !text.contains("protocol device")
                && !text.contains("log ")
        );
        // The include must parse inside a config that has those.
        bird_accepts(&format!(
            "router id 10.0.0.11;\nprotocol device {{ }}\n{text}"
        ));
    }

    #[test]
    fn an_empty_routing_section_still_makes_a_valid_config() {
        bird_accepts(&render(
            &config("{}"),
            Ipv4Addr::new(192, 0, 2, 1),
            &kube_lb0(),
            Scope::WholeConfig,
        ));
    }

    #[test]
    fn a_link_local_gateway_session_names_its_interface() {
        use crate::sinks::routing::gateway::{Gateway, Gateways};
        let racks = config(
            "bgp: [{name: tor, neighbor: gateway, asn: 64500, localAsn: 64512, families: [ipv6]}]",
        );
        let gateways = Gateways::from([(
            Family::Ipv6,
            [Gateway {
                address: "fe80::1".parse().unwrap(),
                interface: Some("eth0".into()),
            }]
            .into(),
        )]);
        let (node, _) =
            crate::sinks::routing::plan::for_node(&racks, &Default::default(), &gateways);
        let text = render(&node, Ipv4Addr::LOCALHOST, &kube_lb0(), Scope::WholeConfig);
        assert!(
            text.contains("protocol bgp tor_fe80__1 {")
                && text.contains("neighbor fe80::1 port 179 as 64500;")
                && text.contains("interface \"eth0\";"),
            "{text}"
        );
        bird_accepts(&text);
    }

    #[test]
    fn only_one_family_allowed_rejects_the_other() {
        let text = render(
            &config("export: {prefixes: [203.0.113.0/24]}"),
            Ipv4Addr::LOCALHOST,
            &kube_lb0(),
            Scope::WholeConfig,
        );
        assert!(
            text.contains("if net.type = NET_IP6 then reject;"),
            "{text}"
        );
        bird_accepts(&text);
    }
}
