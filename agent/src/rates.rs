//! `lbagent counters --watch`: per-address rates between two reads of the counters, and the
//! table that shows them. Pure, so the sorting and arithmetic are tested without a kernel.

use std::{collections::BTreeMap, io::Write, net::IpAddr, time::Duration};

use clap::ValueEnum;
use serde::Serialize;

use crate::dataplane::VipCounters;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SortBy {
    /// Received packets per second, highest first.
    Rate,
    /// Dropped packets per second, highest first.
    Drops,
    Address,
}

/// One address between two reads; rates are `None` on the first read.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub address: IpAddr,
    pub packets: u64,
    pub bytes: u64,
    pub tx_packets: u64,
    pub drops: u64,
    pub rx_pps: Option<f64>,
    pub rx_bps: Option<f64>,
    pub tx_pps: Option<f64>,
    pub drops_ps: Option<f64>,
}

fn total_drops(c: &VipCounters) -> u64 {
    let d = &c.drops;
    d.port + d.source + d.protocol + d.icmp + d.malformed
}

/// Rows for `now`, with rates against `before` (read `elapsed` earlier). An address new since
/// then, or whose counters went back (removed and added again), has no rate yet.
pub fn rows(
    before: Option<&[VipCounters]>,
    now: &[VipCounters],
    elapsed: Duration,
    sort: SortBy,
) -> Vec<Row> {
    let before: BTreeMap<IpAddr, &VipCounters> = before
        .unwrap_or_default()
        .iter()
        .map(|c| (c.address, c))
        .collect();
    let seconds = elapsed.as_secs_f64();
    let mut rows: Vec<Row> = now
        .iter()
        .map(|c| {
            let earlier = before.get(&c.address).filter(|b| {
                b.packets <= c.packets && b.tx_packets <= c.tx_packets && seconds > 0.0
            });
            let rate = |now: u64, then: fn(&VipCounters) -> u64| {
                earlier.map(|b| (now - then(b)) as f64 / seconds)
            };
            Row {
                address: c.address,
                packets: c.packets,
                bytes: c.bytes,
                tx_packets: c.tx_packets,
                drops: total_drops(c),
                rx_pps: rate(c.packets, |b| b.packets),
                rx_bps: rate(c.bytes, |b| b.bytes).map(|bytes| bytes * 8.0),
                tx_pps: rate(c.tx_packets, |b| b.tx_packets),
                drops_ps: earlier.and_then(|b| {
                    total_drops(c)
                        .checked_sub(total_drops(b))
                        .map(|n| n as f64 / seconds)
                }),
            }
        })
        .collect();
    let key = |rate: Option<f64>| std::cmp::Reverse(ordered(rate.unwrap_or(-1.0)));
    match sort {
        SortBy::Address => rows.sort_by_key(|r| r.address),
        SortBy::Rate => rows.sort_by_key(|r| (key(r.rx_pps), r.address)),
        SortBy::Drops => rows.sort_by_key(|r| (key(r.drops_ps), r.address)),
    }
    rows
}

/// Rates are finite and non-negative (or -1 for none), so their bits order as they do.
fn ordered(rate: f64) -> i64 {
    (rate * 1000.0) as i64
}

fn rate(value: Option<f64>) -> String {
    match value {
        None => "-".to_owned(),
        Some(v) if v >= 1e9 => format!("{:.1}G", v / 1e9),
        Some(v) if v >= 1e6 => format!("{:.1}M", v / 1e6),
        Some(v) if v >= 1e3 => format!("{:.1}k", v / 1e3),
        Some(v) => format!("{v:.0}"),
    }
}

pub fn write_table(out: &mut impl Write, rows: &[Row]) -> std::io::Result<()> {
    let width = rows
        .iter()
        .map(|r| r.address.to_string().len())
        .chain(["ADDRESS".len()])
        .max()
        .unwrap_or(0);
    writeln!(
        out,
        "{:<width$}  {:>8}  {:>8}  {:>8}  {:>8}  {:>14}  {:>12}",
        "ADDRESS", "RX PPS", "RX BPS", "TX PPS", "DROP/S", "PACKETS", "DROPS"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:<width$}  {:>8}  {:>8}  {:>8}  {:>8}  {:>14}  {:>12}",
            r.address.to_string(),
            rate(r.rx_pps),
            rate(r.rx_bps),
            rate(r.tx_pps),
            rate(r.drops_ps),
            r.packets,
            r.drops
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(address: &str, packets: u64, dropped: u64) -> VipCounters {
        let mut counters = VipCounters {
            address: address.parse().unwrap(),
            slot: 1,
            packets,
            bytes: packets * 100,
            tx_packets: packets / 2,
            tx_bytes: 0,
            drops: Default::default(),
        };
        counters.drops.source = dropped;
        counters
    }

    #[test]
    fn rates_are_the_difference_over_the_interval_and_sort_highest_first() {
        let before = [
            counters("203.0.113.1", 100, 0),
            counters("203.0.113.2", 100, 10),
        ];
        let now = [
            counters("203.0.113.1", 300, 0),
            counters("203.0.113.2", 150, 40),
            counters("203.0.113.3", 5, 0),
        ];
        let rows = rows(Some(&before), &now, Duration::from_secs(2), SortBy::Rate);
        let summary: Vec<_> = rows
            .iter()
            .map(|r| (r.address.to_string(), r.rx_pps, r.drops_ps))
            .collect();
        assert_eq!(
            summary,
            [
                ("203.0.113.1".to_owned(), Some(100.0), Some(0.0)),
                ("203.0.113.2".to_owned(), Some(25.0), Some(15.0)),
                ("203.0.113.3".to_owned(), None, None),
            ]
        );
        assert_eq!(rows[0].rx_bps, Some(100.0 * 100.0 * 8.0));
        assert_eq!(rows[0].tx_pps, Some(50.0));

        let by_drops = super::rows(Some(&before), &now, Duration::from_secs(2), SortBy::Drops);
        assert_eq!(by_drops[0].address.to_string(), "203.0.113.2");
        let first = super::rows(None, &now, Duration::ZERO, SortBy::Address);
        assert!(first.iter().all(|r| r.rx_pps.is_none()));
        assert_eq!(first[2].address.to_string(), "203.0.113.3");
    }

    #[test]
    fn counters_that_went_back_have_no_rate() {
        let rows = rows(
            Some(&[counters("203.0.113.1", 500, 0)]),
            &[counters("203.0.113.1", 3, 0)],
            Duration::from_secs(1),
            SortBy::Rate,
        );
        assert_eq!(rows[0].rx_pps, None);
    }

    #[test]
    fn the_table_is_aligned_and_scales_units() {
        let rows = rows(
            Some(&[counters("203.0.113.1", 0, 0)]),
            &[
                counters("2001:db8::1", 2_500_000, 0),
                counters("203.0.113.1", 1500, 0),
            ],
            Duration::from_secs(1),
            SortBy::Rate,
        );
        let mut out = Vec::new();
        write_table(&mut out, &rows).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{text}");
        assert!(
            lines[1].starts_with("203.0.113.1 ") && lines[1].contains(" 1.5k "),
            "{text}"
        );
        assert!(
            lines[2].starts_with("2001:db8::1 ") && lines[2].contains(" - "),
            "{text}"
        );
    }
}
