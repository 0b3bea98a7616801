//! With routing on, the agent itself killed (SIGKILL) or stopped (SIGTERM): its BIRD dies with
//! it (no orphan), the upstream router keeps the route through BGP graceful restart, and
//! traffic from a client behind the router to the address keeps flowing, counted ping by ping,
//! until a new agent has taken over.

use std::time::Duration;

use lbagent_tests::{
    Agent, NetNs, TempDir,
    routers::{FRR_ROUTER, Fabric, Frr, next_hops},
    veth, wait_until,
};

const V4: &str = "203.0.113.10";
const CLIENT: &str = "10.9.0.2";
const PINGS: &str = "400";

/// A fabric of one node running lbagent with BGP to an FRR router, and a client namespace
/// routed through that router.
struct Scene {
    fabric: Fabric,
    _frr: Frr,
    client: NetNs,
    dir: TempDir,
    agent: Option<Agent>,
}

impl Scene {
    fn start() -> Self {
        let fabric = Fabric::new(1);
        let frr = Frr::start(&fabric.router, FRR_ROUTER, true);
        let client = NetNs::new("lbt-client");
        veth((&client, "eth0"), (&fabric.router, "cl0"));
        fabric
            .router
            .ip(&["addr", "add", "10.9.0.1/24", "dev", "cl0"]);
        fabric.router.ip(&["link", "set", "cl0", "up"]);
        client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"]);
        client.ip(&["link", "set", "eth0", "up"]);
        client.ip(&["route", "add", "default", "via", "10.9.0.1"]);

        let dir = TempDir::new("lbt-fwd");
        dir.write(
            "services.yaml",
            &format!("services:\n- {{name: web, addresses: [{V4}]}}\n"),
        );
        dir.write(
            "lbagent.yaml",
            &format!(
                "source: {{file: {{path: services.yaml}}}}\nstatus: {{path: {}}}\n\
                 routing:\n  stateDir: {}\n  bgp:\n    - {{name: up4, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, holdTime: 9s, keepaliveTime: 1s, connectRetryTime: 1s, connectDelayTime: 1s}}\n",
                dir.path().join("status.json").display(),
                dir.path().join("bird").display()
            ),
        );
        let mut scene = Self {
            fabric,
            _frr: frr,
            client,
            dir,
            agent: None,
        };
        scene.start_agent("agent.log");
        scene.wait_announced();
        scene
    }

    fn start_agent(&mut self, log: &str) {
        self.agent = Some(Agent::start(
            &self.fabric.nodes[0],
            &self.dir.path().join("lbagent.yaml"),
            self.dir.path().join(log),
        ));
    }

    fn log(&self) -> String {
        self.agent.as_ref().map(Agent::log).unwrap_or_default()
    }

    /// The session is up, the router has the route, and BIRD marked it as announced (so the
    /// next one starts with -R).
    fn wait_announced(&self) {
        assert!(
            wait_until(Duration::from_secs(30), || next_hops(
                &self.fabric.router,
                &format!("{V4}/32")
            ) == [Fabric::node_v4(1)]
                && self.dir.path().join("bird/announced").exists()),
            "route {:?}\n{}",
            next_hops(&self.fabric.router, &format!("{V4}/32")),
            self.log()
        );
    }

    /// Pings from the client at 20 ms while `interrupt` runs; returns ping's summary.
    fn pings_across(&mut self, interrupt: impl FnOnce(&mut Self)) -> String {
        let client = self.client.name().to_owned();
        let pings = std::thread::spawn(move || {
            lbagent_tests::run(
                "ip",
                &[
                    "netns", "exec", &client, "ping", "-c", PINGS, "-i", "0.02", "-W", "1", "-q",
                    V4,
                ],
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        interrupt(self);
        let output = pings.join().expect("ping thread");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn bird_processes(&self) -> Vec<u32> {
        self.fabric.nodes[0].processes("bird")
    }

    /// Stops the agent with `signal`; its BIRD must be gone with it, the route must stay; then
    /// a new agent starts.
    fn stop_and_restart(&mut self, signal: nix::sys::signal::Signal, log: &str) {
        let mut agent = self.agent.take().expect("running");
        assert_eq!(self.bird_processes().len(), 1, "{}", agent.log());
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.pid() as i32), signal)
            .expect("signal the agent");
        assert!(
            wait_until(Duration::from_secs(20), || agent.exited().is_some()),
            "the agent did not exit on {signal}"
        );
        assert!(
            wait_until(Duration::from_secs(5), || self.bird_processes().is_empty()),
            "BIRD outlived the agent ({signal}): {:?}\n{}",
            self.bird_processes(),
            agent.log()
        );
        assert_eq!(
            next_hops(&self.fabric.router, &format!("{V4}/32")),
            [Fabric::node_v4(1)],
            "the router dropped the route when the agent stopped ({signal})"
        );
        std::thread::sleep(Duration::from_millis(500));
        self.start_agent(log);
    }
}

fn all_answered(summary: &str) {
    assert!(
        summary.contains(&format!("{PINGS} packets transmitted, {PINGS} received")),
        "{summary}"
    );
}

/// A scene whose agent was stopped with `signal` and started again while the client pinged
/// the address through the router, every ping answered.
fn restarted_under_pings(signal: nix::sys::signal::Signal) -> Scene {
    let mut scene = Scene::start();
    let summary = scene.pings_across(|scene| scene.stop_and_restart(signal, "agent2.log"));
    all_answered(&summary);
    scene
}

#[test]
fn a_killed_agent_takes_its_bird_along_and_the_router_keeps_forwarding() {
    let scene = restarted_under_pings(nix::sys::signal::Signal::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(10), || scene
            .log()
            .contains("recovering=true")),
        "the new BIRD did not start with -R:\n{}",
        scene.log()
    );
    scene.wait_announced();
    assert_eq!(scene.bird_processes().len(), 1);
}

#[test]
fn a_stopped_agent_takes_its_bird_along_and_the_router_keeps_forwarding() {
    let scene = restarted_under_pings(nix::sys::signal::Signal::SIGTERM);
    scene.wait_announced();
    assert_eq!(scene.bird_processes().len(), 1);
}
