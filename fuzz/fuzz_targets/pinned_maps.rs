//! The pinned maps as a restarted agent finds them: whatever words the tables, the slot
//! configurations and the range tries hold (an older lbagent's, a writer killed between two
//! stores, or garbage), opening them, reading them back, repairing them and writing to them
//! never panics, and what the readers report is what the lookups find.
//!
//! Real maps: the agent's own `dataplane::prepare` creates and pins them on bpffs (root
//! needed, as for every dataplane test), under `$LBAGENT_FUZZ_PIN_ROOT` (`cargo xtask fuzz`
//! sets and removes it) or `/sys/fs/bpf/lbagent-fuzz-<pid>`.
#![no_main]

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{Mutex, OnceLock},
};

use aya::maps::{Array, LpmTrie, Map, MapData, lpm_trie::Key};
use lbagent::{
    Maps, PortId, VipPolicy,
    fuzzing::{PinLayout, prepare},
};
use lbagent_common::{RangeKeyV4, RangeKeyV6, maps};
use libfuzzer_sys::fuzz_target;

/// The maps as raw words, opened a second time beside the agent's handle: the fuzzer's pen.
struct Raw {
    pins: PinLayout,
    vips_v4: Array<MapData, [u64; 8]>,
    vips_v6: Array<MapData, [u64; 8]>,
    vip_config: Array<MapData, [u64; 3]>,
    ports: Array<MapData, [u64; 8]>,
    port_config: Array<MapData, [u64; 2]>,
    ranges_v4: LpmTrie<MapData, RangeKeyV4, u8>,
    ranges_v6: LpmTrie<MapData, RangeKeyV6, u8>,
}

fn raw() -> &'static Mutex<Raw> {
    static RAW: OnceLock<Mutex<Raw>> = OnceLock::new();
    RAW.get_or_init(|| {
        let root = std::env::var_os("LBAGENT_FUZZ_PIN_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| format!("/sys/fs/bpf/lbagent-fuzz-{}", std::process::id()).into());
        let _ = std::fs::remove_dir_all(&root);
        let pins = PinLayout::new(&root);
        prepare(&pins)
            .unwrap_or_else(|err| panic!("pinning the maps under {}: {err}", root.display()));
        let open = |name: &str| {
            let data = MapData::from_pin(pins.map(name))
                .unwrap_or_else(|err| panic!("opening {name}: {err}"));
            Map::from_map_data(data).unwrap_or_else(|err| panic!("{name}: {err}"))
        };
        Mutex::new(Raw {
            vips_v4: open(maps::VIPS_V4).try_into().expect("array"),
            vips_v6: open(maps::VIPS_V6).try_into().expect("array"),
            vip_config: open(maps::VIP_CONFIG).try_into().expect("array"),
            ports: open(maps::PORTS).try_into().expect("array"),
            port_config: open(maps::PORT_CONFIG).try_into().expect("array"),
            ranges_v4: open(maps::RANGES_V4).try_into().expect("LPM trie"),
            ranges_v6: open(maps::RANGES_V6).try_into().expect("LPM trie"),
            pins,
        })
    })
}

/// Stores `value` at word `word` of element `index` of `array` (indexes wrap to the array).
fn poke<const N: usize>(
    array: &mut Array<MapData, [u64; N]>,
    index: u32,
    word: usize,
    value: u64,
    touched: &mut BTreeSet<u32>,
) {
    let index = index % array.len();
    let mut element = array.get(&index, 0).expect("element in range");
    element[word % N] = value;
    array.set(index, element, 0).expect("store");
    touched.insert(index);
}

fn zero<const N: usize>(array: &mut Array<MapData, [u64; N]>, touched: &BTreeSet<u32>) {
    for index in touched {
        array.set(*index, [0; N], 0).expect("zero");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut raw = raw()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let raw = &mut *raw;
    // Records of 14 bytes: which map, element, word in the element, value.
    let mut touched: [BTreeSet<u32>; 5] = Default::default();
    let (mut v4_keys, mut v6_keys) = (Vec::new(), Vec::new());
    for record in data.chunks_exact(14) {
        let index = u32::from_le_bytes(record[1..5].try_into().expect("4 bytes"));
        let word = usize::from(record[5]);
        let value = u64::from_le_bytes(record[6..14].try_into().expect("8 bytes"));
        match record[0] % 7 {
            0 => poke(&mut raw.vips_v4, index, word, value, &mut touched[0]),
            1 => poke(&mut raw.vips_v6, index, word, value, &mut touched[1]),
            2 => poke(&mut raw.vip_config, index, word, value, &mut touched[2]),
            3 => poke(&mut raw.ports, index, word, value, &mut touched[3]),
            4 => poke(&mut raw.port_config, index, word, value, &mut touched[4]),
            5 => {
                let bytes = value.to_le_bytes();
                let key = Key::new(
                    index % 65,
                    RangeKeyV4 {
                        set: bytes[..4].try_into().expect("4 bytes"),
                        addr: bytes[4..].try_into().expect("4 bytes"),
                    },
                );
                if raw.ranges_v4.insert(&key, 1, 0).is_ok() {
                    v4_keys.push(key);
                }
            }
            _ => {
                let bytes = value.to_le_bytes();
                let mut addr = [0u8; 16];
                addr[..4].copy_from_slice(&bytes[4..]);
                addr[12..].copy_from_slice(&bytes[4..]);
                let key = Key::new(
                    index % 161,
                    RangeKeyV6 {
                        set: bytes[..4].try_into().expect("4 bytes"),
                        addr,
                    },
                );
                if raw.ranges_v6.insert(&key, 1, 0).is_ok() {
                    v6_keys.push(key);
                }
            }
        }
    }

    check(&raw.pins);

    zero(&mut raw.vips_v4, &touched[0]);
    zero(&mut raw.vips_v6, &touched[1]);
    zero(&mut raw.vip_config, &touched[2]);
    zero(&mut raw.ports, &touched[3]);
    zero(&mut raw.port_config, &touched[4]);
    for key in &v4_keys {
        let _ = raw.ranges_v4.remove(key);
    }
    for key in &v6_keys {
        let _ = raw.ranges_v6.remove(key);
    }
});

/// What a restarted agent does with the maps it finds.
fn check(pins: &PinLayout) {
    let mut maps = Maps::open(pins).expect("open the pinned maps");
    // Readers first (`lbagent vip list`, `counters`, metrics read without writing).
    let vips = maps.vips();
    for (address, entry) in &vips {
        assert_eq!(maps.vip_slot(*address), Some(entry.slot), "{address}");
        maps.vip_stats(entry.slot).expect("stats of a listed slot");
    }
    for (port, entry) in maps.ports() {
        assert!(
            vips.contains_key(&port.address),
            "{port:?} of no listed address"
        );
        assert_eq!(maps.port_slot(port), Some(entry.slot), "{port:?}");
        maps.port_stats(entry.slot).expect("stats of a listed slot");
    }
    maps.ranges().expect("read the range tries");

    // Then the writer: the lock repairs what it finds, and the maps take new entries.
    maps.take_writer_lock().expect("the writer's lock");
    let address = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    let added = maps.add_vip(address, VipPolicy::default());
    if let Ok(slot) = added {
        assert_eq!(maps.vip_slot(address), Some(slot));
        let port = PortId {
            address,
            protocol: 6,
            port: 443,
        };
        if let Ok(slot) = maps.add_port(port, 0) {
            assert_eq!(maps.port_slot(port), Some(slot));
            assert!(maps.remove_port(port).expect("remove the port"));
        }
        assert!(maps.remove_vip(address).expect("remove the address"));
    }
    assert_eq!(maps.vip_slot(address), None);
}
