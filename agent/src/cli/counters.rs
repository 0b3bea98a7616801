//! `lbagent counters`: packets and bytes per load-balancer address, once or refreshed in place.

use std::{
    io::Write,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;

use super::Output;
use crate::{
    dataplane::{PinLayout, VipCounters, VipTable},
    rates::{self, SortBy},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Refresh in place with rates, until interrupted (JSON: one line per refresh).
    #[arg(short, long)]
    watch: bool,
    /// Time between refreshes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, requires = "watch")]
    interval: Duration,
    #[arg(long, value_enum, default_value_t = SortBy::Rate, requires = "watch")]
    sort: SortBy,
    /// Stop after this many refreshes.
    #[arg(long, requires = "watch")]
    count: Option<u64>,
}

pub fn run(args: Args, pins: &PinLayout, out: &mut impl Write) -> Result<()> {
    if args.watch {
        return watch(pins, out, &args);
    }
    let counters = VipTable::open(pins)?.counters()?;
    match args.output {
        Output::Table => write_table(out, &counters)?,
        Output::Json => {
            serde_json::to_writer_pretty(&mut *out, &serde_json::json!({ "vips": counters }))?;
            writeln!(out)?;
        }
    }
    Ok(())
}

fn watch(pins: &PinLayout, out: &mut impl Write, args: &Args) -> Result<()> {
    let table = VipTable::open(pins)?;
    let in_place =
        std::io::IsTerminal::is_terminal(&std::io::stdout()) && args.output == Output::Table;
    let mut before: Option<(Instant, Vec<VipCounters>)> = None;
    let mut refreshes = 0;
    loop {
        // Taken before the read: every packet counted by then is in it. A loaded machine
        // stretches the time between reads, so the rates divide by the time measured here,
        // and a JSON line says what that was.
        let read_at = Instant::now();
        let read_at_wall = SystemTime::now();
        let now = table.counters()?;
        let elapsed = before.as_ref().map(|(at, _)| read_at - *at);
        let rows = rates::rows(
            before.as_ref().map(|(_, counters)| counters.as_slice()),
            &now,
            elapsed.unwrap_or_default(),
            args.sort,
        );
        match args.output {
            Output::Json => {
                serde_json::to_writer(
                    &mut *out,
                    &serde_json::json!({
                        "read_at": humantime::format_rfc3339_micros(read_at_wall).to_string(),
                        "elapsed_s": elapsed.map(|e| e.as_secs_f64()),
                        "vips": rows,
                    }),
                )?;
                writeln!(out)?;
            }
            Output::Table => {
                if in_place {
                    // Home and clear: the table is redrawn where it was.
                    write!(out, "\x1b[H\x1b[2J")?;
                }
                writeln!(
                    out,
                    "every {}, sorted by {}; Ctrl-C to stop",
                    humantime::format_duration(args.interval),
                    format!("{:?}", args.sort).to_lowercase()
                )?;
                rates::write_table(out, &rows)?;
                if !in_place {
                    writeln!(out)?;
                }
            }
        }
        out.flush()?;
        refreshes += 1;
        if args.count.is_some_and(|count| refreshes >= count) {
            return Ok(());
        }
        before = Some((read_at, now));
        // Reads keep to the interval's beat: the time spent reading and writing is not added.
        std::thread::sleep((read_at + args.interval).saturating_duration_since(Instant::now()));
    }
}

fn write_table(out: &mut impl Write, counters: &[VipCounters]) -> std::io::Result<()> {
    let addresses: Vec<String> = counters.iter().map(|c| c.address.to_string()).collect();
    let width = super::column_width("ADDRESS", addresses.iter().map(String::as_str));
    writeln!(
        out,
        "{:<width$}  {:>14}  {:>16}",
        "ADDRESS", "PACKETS", "BYTES"
    )?;
    for (c, address) in counters.iter().zip(&addresses) {
        writeln!(out, "{address:<width$}  {:>14}  {:>16}", c.packets, c.bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_table_aligns_columns() {
        let counters = [
            VipCounters {
                address: "203.0.113.10".parse().unwrap(),
                slot: 1,
                packets: 3,
                bytes: 294,
                tx_packets: 0,
                tx_bytes: 0,
                drops: Default::default(),
            },
            VipCounters {
                address: "2001:db8:ff::10".parse().unwrap(),
                slot: 1,
                packets: 12,
                bytes: 1_500,
                tx_packets: 0,
                tx_bytes: 0,
                drops: Default::default(),
            },
        ];
        let mut out = Vec::new();
        write_table(&mut out, &counters).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ADDRESS"));
        assert!(lines[1].starts_with("203.0.113.10 ") && lines[1].ends_with(" 294"));
        assert!(lines[2].starts_with("2001:db8:ff::10 ") && lines[2].ends_with(" 1500"));
        assert!(lines.iter().all(|l| l.len() == lines[0].len()));
    }
}
