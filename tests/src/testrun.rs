//! The XDP program loaded from the agent's embedded object, with its maps filled by hand,
//! run on frames through BPF_PROG_TEST_RUN.

use std::net::IpAddr;

use aya::{
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions, TestRunResult,
    maps::{HashMap, LpmTrie, PerCpuHashMap, PerCpuValues, lpm_trie::Key},
    programs::{ProgramError, Xdp},
};
use lbagent_common::{
    PortKey, PortPolicy, PortStats, RangeKeyV4, RangeKeyV6, VIP_ENFORCE, VipConfig, VipKey,
    VipStats, XDP_PROGRAM, maps,
};

use crate::require_root;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

pub struct Harness {
    ebpf: Ebpf,
}

impl Harness {
    pub fn new() -> Self {
        require_root();
        let mut ebpf = EbpfLoader::new()
            .load(lbagent::dataplane::object())
            .expect("load object");
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .expect("program")
            .try_into()
            .expect("xdp");
        program.load().expect("verifier accepts the program");
        Self { ebpf }
    }

    /// An address that is only counted (no policy).
    pub fn count_only(&mut self, vip: IpAddr) {
        self.add_vip(vip, false, 0);
    }

    pub fn add_vip(&mut self, vip: IpAddr, enforce: bool, fragment_ranges: u32) {
        let key = VipKey::from(vip);
        let mut stats: PerCpuHashMap<_, VipKey, VipStats> =
            PerCpuHashMap::try_from(self.ebpf.map_mut(maps::VIP_STATS).expect("map"))
                .expect("type");
        stats.insert(key, zeroed(), 0).expect("insert stats");
        let mut vips: HashMap<_, VipKey, VipConfig> =
            HashMap::try_from(self.ebpf.map_mut(maps::VIPS).expect("map")).expect("type");
        let config = VipConfig {
            flags: if enforce { VIP_ENFORCE } else { 0 },
            fragment_ranges,
        };
        vips.insert(key, config, 0).expect("insert vip");
    }

    pub fn add_port(&mut self, vip: IpAddr, protocol: u8, port: u16, ranges: u32) {
        let key = PortKey::new(VipKey::from(vip), protocol, port);
        let mut stats: PerCpuHashMap<_, PortKey, PortStats> =
            PerCpuHashMap::try_from(self.ebpf.map_mut(maps::PORT_STATS).expect("map"))
                .expect("type");
        stats.insert(key, zeroed(), 0).expect("insert port stats");
        let mut ports: HashMap<_, PortKey, PortPolicy> =
            HashMap::try_from(self.ebpf.map_mut(maps::PORTS).expect("map")).expect("type");
        ports
            .insert(key, PortPolicy { ranges }, 0)
            .expect("insert port");
    }

    /// Adds `address/prefix` to range set `set`.
    pub fn add_range(&mut self, set: u32, address: IpAddr, prefix: u8) {
        match address {
            IpAddr::V4(v4) => {
                let mut trie: LpmTrie<_, RangeKeyV4, u8> =
                    LpmTrie::try_from(self.ebpf.map_mut(maps::RANGES_V4).expect("map"))
                        .expect("type");
                let key = Key::new(
                    32 + u32::from(prefix),
                    RangeKeyV4 {
                        set: set.to_be_bytes(),
                        addr: v4.octets(),
                    },
                );
                trie.insert(&key, 1, 0).expect("insert v4 range");
            }
            IpAddr::V6(v6) => {
                let mut trie: LpmTrie<_, RangeKeyV6, u8> =
                    LpmTrie::try_from(self.ebpf.map_mut(maps::RANGES_V6).expect("map"))
                        .expect("type");
                let key = Key::new(
                    32 + u32::from(prefix),
                    RangeKeyV6 {
                        set: set.to_be_bytes(),
                        addr: v6.octets(),
                    },
                );
                trie.insert(&key, 1, 0).expect("insert v6 range");
            }
        }
    }

    /// The address's counters summed over CPUs.
    pub fn stats(&self, vip: IpAddr) -> VipStats {
        let stats: PerCpuHashMap<_, VipKey, VipStats> =
            PerCpuHashMap::try_from(self.ebpf.map(maps::VIP_STATS).expect("map")).expect("type");
        stats
            .get(&VipKey::from(vip), 0)
            .expect("stats entry exists")
            .iter()
            .fold(VipStats::default(), |a, s| VipStats {
                packets: a.packets + s.packets,
                bytes: a.bytes + s.bytes,
                tx_packets: a.tx_packets + s.tx_packets,
                tx_bytes: a.tx_bytes + s.tx_bytes,
                drop_port: a.drop_port + s.drop_port,
                drop_source: a.drop_source + s.drop_source,
                drop_protocol: a.drop_protocol + s.drop_protocol,
                drop_icmp: a.drop_icmp + s.drop_icmp,
                drop_malformed: a.drop_malformed + s.drop_malformed,
            })
    }

    /// (packets, bytes) received for the address.
    pub fn counted(&self, vip: IpAddr) -> (u64, u64) {
        let stats = self.stats(vip);
        (stats.packets, stats.bytes)
    }

    pub fn port_stats(&self, vip: IpAddr, protocol: u8, port: u16) -> (u64, u64) {
        let stats: PerCpuHashMap<_, PortKey, PortStats> =
            PerCpuHashMap::try_from(self.ebpf.map(maps::PORT_STATS).expect("map")).expect("type");
        stats
            .get(&PortKey::new(VipKey::from(vip), protocol, port), 0)
            .expect("port stats entry exists")
            .iter()
            .fold((0, 0), |(p, b), s| (p + s.packets, b + s.bytes))
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
    /// unchanged (the program never rewrites).
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

fn zeroed<T: aya::Pod + Default + Clone>() -> PerCpuValues<T> {
    let cpus = aya::util::nr_cpus().expect("cpus");
    PerCpuValues::try_from(vec![T::default(); cpus]).expect("per-cpu values")
}

/// Total drops of all reasons.
pub fn drops(stats: &VipStats) -> u64 {
    stats.drop_port
        + stats.drop_source
        + stats.drop_protocol
        + stats.drop_icmp
        + stats.drop_malformed
}
