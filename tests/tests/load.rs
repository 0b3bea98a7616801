//! Heavy work never stalls healing or health: a storm of `/metrics` scrapes of a node with
//! 10,000 addresses, and hostile services files, while kube-lb0 is deleted under the agent.
//! Healing and `/healthz` must answer in their normal time, memory must stay bounded, and a
//! file that is too big, too deep or full of aliases is refused naming the limit, keeping
//! the last good state.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use lbagent_tests::{NetNs, ServedNode, addresses_on, http_get, memory_kb, wait_until};

const HTTP: &str = "127.0.0.1:9658";
const ADDRESSES: usize = 10_000;
/// Far above what a scrape, a heal or a probe takes when nothing stalls them (milliseconds),
/// far below the stalls this file reproduces (tens of seconds).
const PROMPTLY: Duration = Duration::from_secs(5);

fn http() -> SocketAddr {
    HTTP.parse().unwrap()
}

fn address(i: usize) -> String {
    format!("198.18.{}.{}", i / 256, i % 256)
}

fn many_services(n: usize) -> String {
    let mut text = String::from("services:\n");
    for i in 0..n {
        text.push_str(&format!(
            "- {{name: s{i}, addresses: [{}], ports: [{{port: 80}}]}}\n",
            address(i)
        ));
    }
    text
}

/// A field of /proc/PID/status, in kB.
fn link_exists(ns: &NetNs, name: &str) -> bool {
    ns.exec("ip", &["link", "show", "dev", name])
        .status
        .success()
}

/// Probes `/healthz` as a kubelet would, `n` times; each must answer 200 within
/// `http_get`'s read timeout.
fn healthz_answers(node: &ServedNode, n: usize) {
    for probe in 0..n {
        let answer = http_get(&node.pair.node, http(), "/healthz");
        assert_eq!(
            answer.as_ref().map(|a| a.0),
            Some(200),
            "probe {probe}: {answer:?}\n{}",
            node.agent.log()
        );
    }
}

/// Scrapers on their own threads in the node's namespace, each scraping `/metrics` in a loop
/// and reading every byte, until dropped.
struct Scrapers {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Scrapers {
    fn start(ns: &NetNs, n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let threads = (0..n)
            .map(|_| {
                let (stop, done) = (stop.clone(), done.clone());
                let netns = format!("/run/netns/{}", ns.name());
                std::thread::spawn(move || {
                    let file = std::fs::File::open(&netns).expect("open netns");
                    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                    let mut body = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(mut stream) =
                            std::net::TcpStream::connect_timeout(&http(), Duration::from_secs(1))
                        else {
                            continue;
                        };
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
                        let request = format!(
                            "GET /metrics HTTP/1.1\r\nHost: {HTTP}\r\nConnection: close\r\n\r\n"
                        );
                        body.clear();
                        if stream.write_all(request.as_bytes()).is_ok()
                            && stream.read_to_end(&mut body).is_ok()
                            && body.starts_with(b"HTTP/1.1 200")
                        {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            done,
            threads,
        }
    }

    fn done(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }
}

impl Drop for Scrapers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Waits until the agent's `/readyz` answers 200, failing with its log after `within`.
fn wait_ready(node: &ServedNode, within: Duration) {
    assert!(
        wait_until(within, || {
            http_get(&node.pair.node, http(), "/readyz").is_some_and(|(code, _)| code == 200)
        }),
        "{}",
        node.agent.log()
    );
}

#[test]
fn healing_and_healthz_answer_while_fifty_scrapes_of_ten_thousand_addresses_run_at_once() {
    let node = ServedNode::start(
        &address(0),
        &many_services(ADDRESSES),
        &format!("http: {{address: \"{HTTP}\"}}\n"),
    );
    let ns = &node.pair.node;
    wait_ready(&node, Duration::from_secs(180));
    assert!(
        wait_until(Duration::from_secs(240), || addresses_on(ns, "kube-lb0")
            .len()
            == ADDRESSES),
        "{}",
        node.agent.log()
    );
    let pid = node.agent.pid();
    let before = memory_kb(pid, "VmRSS");

    let scrapers = Scrapers::start(ns, 50);
    assert!(
        wait_until(Duration::from_secs(120), || scrapers.done() >= 1),
        "no scrape finished\n{}",
        node.agent.log()
    );
    healthz_answers(&node, 10);
    ns.ip(&["link", "del", "kube-lb0"]);
    assert!(
        wait_until(PROMPTLY, || link_exists(ns, "kube-lb0")
            && !addresses_on(ns, "kube-lb0").is_empty()),
        "kube-lb0 not re-created and refilled while scrapes run\n{}",
        node.agent.log()
    );
    healthz_answers(&node, 10);
    // The kernel adds an address in time linear in those it has: 10,000 take a while.
    assert!(
        wait_until(Duration::from_secs(240), || addresses_on(ns, "kube-lb0")
            .len()
            == ADDRESSES),
        "{}",
        node.agent.log()
    );
    let scraped = scrapers.done();
    drop(scrapers);
    assert!(scraped >= 50, "only {scraped} scrapes were answered");

    // Fifty scrapes at once cost about what one does: they share one encoding, not fifty.
    let peak = memory_kb(pid, "VmHWM");
    assert!(
        peak < before + 150 * 1024,
        "peak RSS {peak} kB, {before} kB before the scrapes"
    );
    // And what the scrapes used is given back.
    assert!(
        wait_until(PROMPTLY, || memory_kb(pid, "VmRSS") < before + 64 * 1024),
        "RSS {} kB after the scrapes, {before} kB before",
        memory_kb(pid, "VmRSS")
    );
}

/// Files that cost minutes of CPU or gigabytes to parse unbounded: each is refused with an
/// error naming the limit it breaks, the last good state stays, and meanwhile healing and
/// `/healthz` answer.
#[test]
fn hostile_services_files_are_refused_naming_their_limit_while_healing_goes_on() {
    let vip = "203.0.113.10";
    let good = format!("services:\n- {{name: web, addresses: [{vip}], ports: [{{port: 80}}]}}\n");
    let node = ServedNode::start(vip, &good, &format!("http: {{address: \"{HTTP}\"}}\n"));
    let ns = &node.pair.node;
    wait_ready(&node, Duration::from_secs(30));
    let held = || addresses_on(ns, "kube-lb0").contains(&format!("{vip}/32"));
    assert!(held());

    let mut alias_bomb =
        String::from("services:\n- name: s0\n  addresses: [198.18.0.1]\n  ports: &ports [");
    alias_bomb.push_str(
        &(1..=2_000)
            .map(|p| format!("{{port: {p}}}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    alias_bomb.push_str("]\n");
    for i in 1..2_000 {
        alias_bomb.push_str(&format!(
            "- {{name: s{i}, addresses: [198.18.{}.{}], ports: *ports}}\n",
            i / 256,
            i % 256
        ));
    }
    // Empty entries: the count is refused before any entry is looked at.
    let too_many = format!("services:\n{}", "- {}\n".repeat(100_001));
    let too_big = format!(
        "services: []\n{}",
        "# padding\n".repeat(17 * 1024 * 1024 / 10)
    );
    let hostile: [(&str, String, &str); 5] = [
        (
            "100,000 [",
            format!("services:\n- {}", "[".repeat(100_000)),
            "nested deeper than the limit of 16 levels",
        ),
        (
            "50,000 {a:",
            format!("services:\n- {}", "{a: ".repeat(50_000)),
            "nested deeper than the limit of 16 levels",
        ),
        (
            "an anchor of 2,000 ports aliased by 2,000 services",
            alias_bomb,
            "anchors and aliases (&name, *name) are not allowed here",
        ),
        (
            "100,001 services",
            too_many,
            "more than the limit of 100000 services",
        ),
        ("17 MiB", too_big, "over the limit of 16777216 bytes"),
    ];
    for (what, text, limit) in hostile {
        let logged = node.agent.log().len();
        node.dir.write("services.yaml", &text);
        drop(text);
        assert!(
            wait_until(Duration::from_secs(60), || node.agent.log()[logged..]
                .contains(limit)),
            "{what}: no error naming the limit ({limit})\n{}",
            node.agent.log()
        );
        healthz_answers(&node, 3);
        ns.ip(&["link", "del", "kube-lb0"]);
        assert!(
            wait_until(PROMPTLY, held),
            "{what}: kube-lb0 not healed with the last good state\n{}",
            node.agent.log()
        );
    }
    // And a good file still applies after all that.
    node.dir.write(
        "services.yaml",
        "services:\n- {name: web, addresses: [203.0.113.11], ports: [{port: 80}]}\n",
    );
    assert!(
        wait_until(PROMPTLY, || addresses_on(ns, "kube-lb0")
            == ["203.0.113.11/32".to_owned()].into()),
        "{}",
        node.agent.log()
    );
}

/// Connections that send half a request, far more of them than the endpoint serves at once:
/// each is closed by the agent after the header timeout, none is left open, and `/healthz`
/// answers afterwards.
#[test]
fn half_sent_requests_are_closed_and_the_connections_counted_back() {
    let vip = "203.0.113.10";
    let node = ServedNode::start(
        vip,
        &format!("services:\n- {{name: web, addresses: [{vip}]}}\n"),
        &format!("http: {{address: \"{HTTP}\"}}\n"),
    );
    let ns = &node.pair.node;
    wait_ready(&node, Duration::from_secs(30));
    let pid = node.agent.pid();
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    let before = fds();

    let count = lbagent::MAX_CONNECTIONS + 100;
    let (made, closed) = lbagent_tests::in_netns(ns, move || {
        let streams: Vec<std::net::TcpStream> = (0..count)
            .filter_map(|_| {
                let mut stream =
                    std::net::TcpStream::connect_timeout(&http(), Duration::from_secs(1)).ok()?;
                stream
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: lbagent\r\n")
                    .ok()?;
                Some(stream)
            })
            .collect();
        let made = streams.len();
        // Each must see the agent close it: those over the limit once one before them
        // went. Generous against the header timeout, well short of forever.
        let deadline =
            std::time::Instant::now() + lbagent::HEADER_TIMEOUT * 4 + Duration::from_secs(10);
        let closed = streams
            .into_iter()
            .filter(|mut stream| {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let _ = stream.set_read_timeout(Some(left.max(Duration::from_millis(1))));
                let mut byte = [0u8; 1];
                // End of stream, or a reset: closed by the agent.
                !matches!(stream.read(&mut byte), Err(err) if err.kind() == std::io::ErrorKind::WouldBlock || err.kind() == std::io::ErrorKind::TimedOut)
            })
            .count();
        (made, closed)
    });
    assert!(
        made > lbagent::MAX_CONNECTIONS,
        "only {made} connections made"
    );
    assert_eq!(closed, made, "connections the agent closed, of those made");
    healthz_answers(&node, 3);
    assert!(
        wait_until(PROMPTLY, || fds() <= before),
        "{} open file descriptors, {before} before",
        fds()
    );
}
