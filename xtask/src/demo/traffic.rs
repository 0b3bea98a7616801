//! The services of the demo, and the traffic it sends them: socat servers on the nodes,
//! socat requests from the clients, and what the clients' kernels say they sent.

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use super::lab::{Host, Lab};
use crate::cmd;

/// A service in the demo's services file: an IPv4 and an IPv6 address, one port.
pub struct Service {
    pub name: &'static str,
    pub addresses: [&'static str; 2],
    pub port: u16,
    pub tcp: bool,
}

pub static WEB: Service = Service {
    name: "web",
    addresses: ["203.0.113.10", "2001:db8:ff::10"],
    port: 80,
    tcp: true,
};
pub static GAME: Service = Service {
    name: "game",
    addresses: ["203.0.113.20", "2001:db8:ff::20"],
    port: 7777,
    tcp: false,
};
/// The client's networks: the only sources the services accept.
const SOURCE_RANGES: &str = "[198.51.100.0/24, \"2001:db8:c1::/64\"]";

impl Service {
    fn yaml(&self) -> String {
        format!(
            "  - name: {}\n    addresses: [{}, \"{}\"]\n    ports: [{{port: {}, protocol: {}}}]\n    sourceRanges: {SOURCE_RANGES}\n",
            self.name,
            self.addresses[0],
            self.addresses[1],
            self.port,
            if self.tcp { "TCP" } else { "UDP" }
        )
    }

    pub fn v4(&'static self) -> Target {
        Target {
            service: self,
            address: self.addresses[0],
        }
    }

    pub fn v6(&'static self) -> Target {
        Target {
            service: self,
            address: self.addresses[1],
        }
    }
}

/// One address of a service, and how the demo talks to it.
pub struct Target {
    pub service: &'static Service,
    pub address: &'static str,
}

impl Target {
    /// The address and port as socat and people write them.
    fn socket(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.service.port)
        } else {
            format!("{}:{}", self.address, self.service.port)
        }
    }

    pub fn describe(&self) -> String {
        let protocol = if self.service.tcp { "tcp" } else { "udp" };
        format!(
            "{:<5}{:<27}",
            self.service.name,
            format!("{}/{protocol}", self.socket())
        )
    }

    /// socat's listening address for a server of this target.
    pub fn listen(&self) -> String {
        let family = if self.address.contains(':') { "6" } else { "4" };
        let (kind, options) = if self.service.tcp {
            ("TCP", ",fork,reuseaddr")
        } else {
            ("UDP", ",fork")
        };
        let bind = self.socket();
        let bind = bind
            .rsplit_once(':')
            .map_or(bind.as_str(), |(host, _)| host);
        format!(
            "{kind}{family}-{}:{},bind={bind}{options}",
            if self.service.tcp {
                "LISTEN"
            } else {
                "RECVFROM"
            },
            self.service.port
        )
    }

    /// What a server on `node` runs for each connection or datagram. Over UDP it reads the
    /// datagram first: socat hands it over, and must find someone to take it.
    pub fn answer(&self, node: &str) -> String {
        let read = if self.service.tcp {
            ""
        } else {
            "read -r line; "
        };
        format!("SYSTEM:{read}echo hello from {node}")
    }

    /// One request from `host`: socat sends a line (UDP) or nothing (TCP, where the server
    /// speaks first) and prints the answer, waiting at most a second for it.
    pub fn request(&self, lab: &Lab, host: &Host) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &lab.ns(host.name), "socat", "-t", "1", "-"])
            .arg(if self.service.tcp {
                format!("TCP:{},connect-timeout=0.5", self.socket())
            } else {
                format!("UDP:{}", self.socket())
            });
        command
    }

    /// `count` requests at once from `host`: each answer ("-" for none), and how many
    /// frames the host's kernel sent for them.
    pub fn requests(&self, lab: &Lab, host: &Host, count: usize) -> Result<(Vec<String>, u64)> {
        let before = Sent::read(lab, host)?;
        let mut children = Vec::new();
        for _ in 0..count {
            let mut child = self
                .request(lab, host)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot run socat (is it installed? `cargo xtask setup` installs it)")?;
            let mut stdin = child.stdin.take().context("socat's stdin")?;
            if !self.service.tcp {
                stdin.write_all(b"hello\n")?;
            }
            drop(stdin);
            children.push(child);
        }
        let mut answers = Vec::new();
        for child in children {
            let out = child.wait_with_output()?;
            let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            answers.push(if answer.is_empty() {
                "-".to_owned()
            } else {
                answer
            });
        }
        let after = Sent::read(lab, host)?;
        let frames = match (self.service.tcp, self.address.contains(':')) {
            (true, _) => after.tcp - before.tcp,
            (false, false) => after.udp4 - before.udp4,
            (false, true) => after.udp6 - before.udp6,
        };
        Ok((answers, frames))
    }
}

/// What a namespace's kernel has sent, from its SNMP counters. TCP's are shared by both
/// families, so the demo sends to one address at a time.
struct Sent {
    tcp: u64,
    udp4: u64,
    udp6: u64,
}

impl Sent {
    fn read(lab: &Lab, host: &Host) -> Result<Self> {
        let text = cmd::output(
            lab.in_ns(host.name, "cat")
                .args(["/proc/net/snmp", "/proc/net/snmp6"]),
        )?;
        // /proc/net/snmp: a line of names, then a line of values, per protocol.
        let table = |name: &str, field: &str| -> Option<u64> {
            let prefix = format!("{name}:");
            let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
            let (names, values) = (rows.next()?, rows.next()?);
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == field)?
                .1
                .parse()
                .ok()
        };
        let snmp6 = |field: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(field)?.trim().parse().ok())
        };
        let missing = || anyhow::anyhow!("unexpected /proc/net/snmp in {}", host.name);
        Ok(Self {
            tcp: table("Tcp", "OutSegs").ok_or_else(missing)?
                + table("Tcp", "RetransSegs").ok_or_else(missing)?,
            udp4: table("Udp", "OutDatagrams").ok_or_else(missing)?,
            udp6: snmp6("Udp6OutDatagrams").ok_or_else(missing)?,
        })
    }
}

/// Writes the services file whole, by renaming, as a careful tool would.
pub fn write_services(path: &Path, services: &[&Service]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let entries: String = services.iter().map(|s| s.yaml()).collect();
    std::fs::write(&tmp, format!("services:\n{entries}"))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
