//! The XDP program run through BPF_PROG_TEST_RUN: real verifier, real maps, hand-built frames.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lbagent_tests::{
    frame::{ETHERTYPE_8021AD, ETHERTYPE_8021Q, Frame},
    testrun::Harness,
};

const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const VIP4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const OTHER4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x10);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x11);

/// A harness with count-only addresses.
struct H(Harness);

impl H {
    fn new(vips: &[IpAddr]) -> Self {
        let mut harness = Harness::new();
        for vip in vips {
            harness.count_only(*vip);
        }
        Self(harness)
    }

    fn stats(&self, vip: IpAddr) -> (u64, u64) {
        self.0.counted(vip)
    }

    fn run_pass(&self, frame: &[u8]) {
        self.0.run_pass(frame);
    }

    fn try_run(
        &self,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<aya::TestRunResult, aya::programs::ProgramError> {
        self.0.try_run(frame, out)
    }
}

#[test]
fn ipv4_vip_hit_is_counted_with_frame_length() {
    let h = H::new(&[VIP4.into()]);
    let frame = Frame::udp4(CLIENT4, VIP4, 100).bytes();
    h.run_pass(&frame);
    h.run_pass(&frame);
    assert_eq!(h.stats(VIP4.into()), (2, 2 * frame.len() as u64));
}

#[test]
fn ipv4_miss_passes_uncounted() {
    let h = H::new(&[VIP4.into()]);
    h.run_pass(&Frame::udp4(CLIENT4, OTHER4, 100).bytes());
    // The VIP as source (a reply) is not a hit either: only destinations count.
    h.run_pass(&Frame::udp4(VIP4, CLIENT4, 100).bytes());
    assert_eq!(h.stats(VIP4.into()), (0, 0));
}

#[test]
fn ipv6_vip_hit_and_miss() {
    let h = H::new(&[VIP6.into(), VIP4.into()]);
    let hit = Frame::udp6(CLIENT6, VIP6, 64).bytes();
    h.run_pass(&hit);
    h.run_pass(&Frame::udp6(CLIENT6, OTHER6, 64).bytes());
    assert_eq!(h.stats(VIP6.into()), (1, hit.len() as u64));
    assert_eq!(h.stats(VIP4.into()), (0, 0), "families never mix");
}

#[test]
fn ipv4_mapped_ipv6_destination_does_not_hit_the_ipv4_vip() {
    let h = H::new(&[VIP4.into()]);
    h.run_pass(&Frame::udp6(CLIENT6, VIP4.to_ipv6_mapped(), 10).bytes());
    assert_eq!(h.stats(VIP4.into()), (0, 0));
}

#[test]
fn vlan_tagged_frames_are_counted() {
    let h = H::new(&[VIP4.into(), VIP6.into()]);
    let dot1q = Frame::udp4(CLIENT4, VIP4, 20)
        .tagged(ETHERTYPE_8021Q, 42)
        .bytes();
    let qinq = Frame::udp6(CLIENT6, VIP6, 20)
        .tagged(ETHERTYPE_8021AD, 7)
        .tagged(ETHERTYPE_8021Q, 42)
        .bytes();
    h.run_pass(&dot1q);
    h.run_pass(&qinq);
    assert_eq!(h.stats(VIP4.into()), (1, dot1q.len() as u64));
    assert_eq!(h.stats(VIP6.into()), (1, qinq.len() as u64));
}

#[test]
fn tagged_miss_passes_uncounted() {
    let h = H::new(&[VIP4.into()]);
    h.run_pass(
        &Frame::udp4(CLIENT4, OTHER4, 20)
            .tagged(ETHERTYPE_8021Q, 42)
            .bytes(),
    );
    assert_eq!(h.stats(VIP4.into()), (0, 0));
}

#[test]
fn non_ip_frames_pass_untouched() {
    let h = H::new(&[VIP4.into()]);
    h.run_pass(&Frame::arp().bytes());
    h.run_pass(&Frame::arp().tagged(ETHERTYPE_8021Q, 5).bytes());
    assert_eq!(h.stats(VIP4.into()), (0, 0));
}

/// Every truncation of every frame shape passes; a frame is counted only when the whole IP
/// header is present.
#[test]
fn truncated_frames_pass_and_count_only_with_a_whole_ip_header() {
    let h = H::new(&[VIP4.into(), VIP6.into()]);
    let cases = [
        (Frame::udp4(CLIENT4, VIP4, 8), IpAddr::from(VIP4), 20),
        (Frame::udp6(CLIENT6, VIP6, 8), VIP6.into(), 40),
        (
            Frame::udp4(CLIENT4, VIP4, 8).tagged(ETHERTYPE_8021Q, 1),
            VIP4.into(),
            20,
        ),
        (
            Frame::udp6(CLIENT6, VIP6, 8)
                .tagged(ETHERTYPE_8021AD, 1)
                .tagged(ETHERTYPE_8021Q, 2),
            VIP6.into(),
            40,
        ),
    ];
    // Shorter than an Ethernet header, a frame never reaches the program.
    for len in 0..14 {
        let frame = vec![0u8; len];
        assert!(
            h.try_run(&frame, &mut [0u8; 64]).is_err(),
            "kernel ran a {len}-byte frame"
        );
    }
    for (frame, vip, ip_header) in cases {
        let full = frame.bytes();
        let whole_header = frame.l3_offset() + ip_header;
        for len in 14..=full.len() {
            let before = h.stats(vip);
            h.run_pass(&full[..len]);
            let after = h.stats(vip);
            if len >= whole_header {
                assert_eq!(after, (before.0 + 1, before.1 + len as u64), "len {len}");
            } else {
                assert_eq!(after, before, "len {len} must not be counted");
            }
        }
    }
}

#[test]
fn a_full_address_map_refuses_one_more_by_name_and_the_others_keep_counting() {
    let mut h = Harness::new();
    let capacity = lbagent_common::maps::MAX_VIPS - 1;
    let address = |i: u32| IpAddr::from(Ipv4Addr::from(0x6440_0000 + i));
    for i in 0..capacity {
        h.maps()
            .add_vip(address(i), Default::default())
            .unwrap_or_else(|err| panic!("address {i}: {err}"));
    }
    let extra = IpAddr::from(VIP4);
    let err = h
        .maps()
        .add_vip(extra, Default::default())
        .expect_err("one more than the capacity");
    assert_eq!(
        err.to_string(),
        format!("map LB_VIP_CONFIG is full ({capacity} entries): {extra} was not added")
    );
    // Its traffic passes uncounted; the others' is counted.
    h.run_pass(&Frame::udp4(CLIENT4, VIP4, 10).bytes());
    let last = address(capacity - 1);
    let IpAddr::V4(last4) = last else {
        unreachable!()
    };
    h.run_pass(&Frame::udp4(CLIENT4, last4, 10).bytes());
    assert_eq!(h.counted(last).0, 1);
    // A removed address frees its slot for the next one, whose counters start at zero.
    assert!(h.maps().remove_vip(last).unwrap());
    h.maps().add_vip(extra, Default::default()).unwrap();
    assert_eq!(h.counted(extra), (0, 0));
    h.run_pass(&Frame::udp4(CLIENT4, VIP4, 10).bytes());
    assert_eq!(h.counted(extra).0, 1);
}

#[test]
fn addresses_sharing_a_filter_counter_stay_found_when_one_goes() {
    // The filter indexes the last four bytes: this IPv6 address ends like VIP4.
    let twin = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0xcb00, 0x710a);
    assert_eq!(
        lbagent_common::filter_index_of(twin.into()),
        lbagent_common::filter_index_of(VIP4.into())
    );
    let mut h = H::new(&[VIP4.into(), twin.into()]);
    let v4 = Frame::udp4(CLIENT4, VIP4, 10).bytes();
    let v6 = Frame::udp6(CLIENT6, twin, 10).bytes();
    h.run_pass(&v4);
    h.run_pass(&v6);
    assert_eq!(h.stats(VIP4.into()).0, 1);
    assert_eq!(h.stats(twin.into()).0, 1);

    // Removing one counts it out; the other still has its count, and is still found.
    assert!(h.0.maps().remove_vip(twin.into()).expect("remove"));
    h.run_pass(&v4);
    assert_eq!(h.stats(VIP4.into()).0, 2);

    // Removing the last one leaves the counter at 0 (a sure miss), and adding it back
    // counts it in again.
    assert!(h.0.maps().remove_vip(VIP4.into()).expect("remove"));
    h.run_pass(&v4);
    h.0.count_only(VIP4.into());
    h.run_pass(&v4);
    assert_eq!(h.stats(VIP4.into()), (1, v4.len() as u64));
}
