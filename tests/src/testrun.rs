//! The XDP program loaded from the agent's embedded object, with its maps filled by hand,
//! run on frames through BPF_PROG_TEST_RUN.

use std::net::IpAddr;

use aya::{
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions, TestRunResult,
    programs::{ProgramError, Xdp},
};
use lbagent::{DataplaneSink, Lease, Maps, NeighbourMaps, PortId, VipPolicy};
use lbagent_common::{VipStats, XDP_PROGRAM};

use crate::require_root;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// The program, and its maps as the agent writes them.
pub struct Harness {
    ebpf: Ebpf,
    sink: DataplaneSink,
    neighbours: NeighbourMaps,
    lease: Lease,
}

impl Harness {
    pub fn new() -> Self {
        require_root();
        let mut ebpf = EbpfLoader::new()
            .load(lbagent::object())
            .expect("load object");
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .expect("program")
            .try_into()
            .expect("xdp");
        program.load().expect("verifier accepts the program");
        let maps = Maps::from_ebpf(&mut ebpf).expect("maps");
        let sink = DataplaneSink::new(maps).expect("sink");
        let neighbours = NeighbourMaps::from_ebpf(&mut ebpf).expect("neighbour maps");
        let lease = Lease::from_ebpf(&mut ebpf).expect("lease map");
        Self {
            ebpf,
            sink,
            neighbours,
            lease,
        }
    }

    /// The neighbour responder's maps, as the neighbours sink writes them.
    pub fn neighbours(&mut self) -> &mut NeighbourMaps {
        &mut self.neighbours
    }

    /// The neighbour responder's answering lease, as `lbagent membership` renews it.
    pub fn lease(&mut self) -> &mut Lease {
        &mut self.lease
    }

    /// The maps, for what the helpers below do not cover.
    pub fn maps(&mut self) -> &mut Maps {
        self.sink.maps_mut()
    }

    /// The reconciler's sink over the same maps.
    pub fn sink(&mut self) -> &mut DataplaneSink {
        &mut self.sink
    }

    /// An address that is only counted (no policy).
    pub fn count_only(&mut self, vip: IpAddr) {
        self.add_vip(vip, false, 0);
    }

    pub fn add_vip(&mut self, vip: IpAddr, enforce: bool, fragment_ranges: u32) {
        self.maps()
            .add_vip(
                vip,
                VipPolicy {
                    enforce,
                    fragment_ranges,
                },
            )
            .expect("add address");
    }

    pub fn add_port(&mut self, vip: IpAddr, protocol: u8, port: u16, ranges: u32) {
        self.maps()
            .add_port(port_id(vip, protocol, port), ranges)
            .expect("add port");
    }

    /// Adds `address/prefix` to range set `set`.
    pub fn add_range(&mut self, set: u32, address: IpAddr, prefix: u8) {
        let range = ipnet::IpNet::new(address, prefix).expect("range");
        self.maps().set_range(set, range, true).expect("add range");
    }

    /// The address's counters summed over CPUs.
    pub fn stats(&self, vip: IpAddr) -> VipStats {
        let maps = self.sink.maps();
        let slot = maps.vip_slot(vip).expect("address in the maps");
        maps.vip_stats(slot).expect("stats")
    }

    /// (packets, bytes) received for the address.
    pub fn counted(&self, vip: IpAddr) -> (u64, u64) {
        let stats = self.stats(vip);
        (stats.packets, stats.bytes)
    }

    pub fn port_stats(&self, vip: IpAddr, protocol: u8, port: u16) -> (u64, u64) {
        let maps = self.sink.maps();
        let slot = maps
            .port_slot(port_id(vip, protocol, port))
            .expect("port in the maps");
        let stats = maps.port_stats(slot).expect("port stats");
        (stats.packets, stats.bytes)
    }

    pub fn try_run(&self, frame: &[u8], out: &mut [u8]) -> Result<TestRunResult, ProgramError> {
        let program: &Xdp = self
            .ebpf
            .program(XDP_PROGRAM)
            .expect("program")
            .try_into()
            .expect("xdp");
        program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(out),
            repeat: 1,
            ..Default::default()
        })
    }

    /// Runs the program once; returns the verdict, after checking the frame came back
    /// unchanged (the program rewrites only the ARP and NDP requests it answers).
    pub fn verdict(&self, frame: &[u8]) -> u32 {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .try_run(frame, &mut out)
            .unwrap_or_else(|err| panic!("test run of a {}-byte frame: {err}", frame.len()));
        assert_eq!(
            &out[..result.data_size_out as usize],
            frame,
            "the program must not modify frames"
        );
        result.return_value
    }

    pub fn run_pass(&self, frame: &[u8]) {
        assert_eq!(self.verdict(frame), XDP_PASS, "verdict for {frame:02x?}");
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

fn port_id(address: IpAddr, protocol: u8, port: u16) -> PortId {
    PortId {
        address,
        protocol,
        port,
    }
}

/// Total drops of all reasons.
pub fn drops(stats: &VipStats) -> u64 {
    stats.drop_port
        + stats.drop_source
        + stats.drop_protocol
        + stats.drop_icmp
        + stats.drop_malformed
}
