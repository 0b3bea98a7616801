//! The routing sink: a BIRD that advertises kube-lb0's addresses. lbagent renders BIRD's
//! config from its own, checks it, and reloads BIRD over its control socket; in managed mode
//! it also runs and supervises BIRD. Address changes never reach this sink: BIRD's direct
//! protocol follows kube-lb0 by itself.
//!
//! Its pass hands BIRD a newly rendered config when the routing section, the node's labels or
//! its default gateways changed; a task of its own supervises BIRD and reads its protocols, and
//! the sink reports what that task last saw. BIRD starts with the first pass, so that it never
//! runs protocols the node's labels, not yet known, would not select.

pub mod control;
pub mod gateway;
pub mod marks;
pub mod model;
pub mod plan;
pub mod render;
pub mod selector;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use rtnetlink::sys::AsyncSocket as _;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
    sync::{mpsc, watch},
};
use tracing::{debug, error, info, warn};

use self::{
    control::{Control, ControlError, ProtocolStatus, parse_protocols},
    model::{FieldError, IfaceName, Mode, RoutingConfig},
};
use super::{Noticed, Report, Sink, Wanted};
use crate::files::write_atomically;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("{binary} is not installed or not on PATH: install bird2, or set routing.bird")]
    NoBird { binary: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("BIRD rejected the config: {0}")]
    Rejected(String),
    #[error("routing.routerId: this node has no IPv4 address to default to; set one")]
    NoRouterId,
    #[error(transparent)]
    Field(#[from] FieldError),
    #[error("reading the default routes: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
}

/// Where a managed BIRD keeps its files.
#[derive(Clone, Debug)]
pub struct BirdPaths {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub next: PathBuf,
    pub socket: PathBuf,
    pub pid: PathBuf,
    /// Present once a BGP session has been established: the next BIRD starts with `-R`, so
    /// that peers holding its routes through a graceful restart see the restart bit.
    pub announced: PathBuf,
}

impl BirdPaths {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            config: dir.join("bird.conf"),
            next: dir.join("bird.conf.next"),
            socket: dir.join("bird.ctl"),
            pid: dir.join("bird.pid"),
            announced: dir.join("announced"),
        }
    }
}

/// What `lbagent status` shows about routing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutingStatus {
    pub mode: String,
    pub bird: String,
    pub restarts: u64,
    pub last_reload: Option<String>,
    pub protocols: Vec<ProtocolStatus>,
}

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A BIRD that ran this long is healthy again: the next failure restarts it after 1 s.
const STABLE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_secs(2);
/// How long BIRD may leave a command unanswered before it counts as hung and is restarted.
/// Far above what a healthy BIRD takes (milliseconds; a reconfiguration of a thousand
/// sessions, well under a second), and far below BGP's default hold time (BIRD: 240 s), so
/// peers that hold lbagent's routes through a graceful restart see a new BIRD in time.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry of a config BIRD could not be handed (not one it rejected); doubles up to
/// [`MAX_BACKOFF`].
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// Runs BIRD as a child, applies every new config it is given, restarts it with exponential
/// backoff when it exits, and stops it with a graceful restart when `stop` fires: a planned
/// stop, so peers keep the routes until BIRD is back (`stop` true: with `down`, so that they
/// withdraw them).
async fn run_managed(
    binary: PathBuf,
    paths: BirdPaths,
    mut configs: watch::Receiver<String>,
    mut stop: watch::Receiver<bool>,
    published: watch::Sender<RoutingStatus>,
    running: watch::Sender<String>,
) -> Result<(), RoutingError> {
    std::fs::create_dir_all(&paths.dir).map_err(|source| RoutingError::Io {
        path: paths.dir.clone(),
        source,
    })?;
    // What an earlier lbagent left half-way through a reload is no config of anyone's.
    let _ = std::fs::remove_file(&paths.next);
    let mut status = RoutingStatus {
        mode: "managed".into(),
        bird: "starting".into(),
        ..Default::default()
    };
    let mut backoff = FIRST_BACKOFF;
    tokio::select! {
        first = configs.wait_for(|text| !text.is_empty()) => if first.is_err() { return Ok(()) },
        _ = stop.changed() => return Ok(()),
    }
    // Whether `paths.config` holds a config that passed the check in this run.
    let mut checked = false;
    loop {
        let text = configs.borrow_and_update().clone();
        match check_file(&binary, &paths, &text).await {
            // The BIRD started next runs it.
            Ok(()) => {
                checked = true;
                running.send_replace(text);
            }
            // A restart (BIRD crashed or hung) keeps the routes with the config that ran.
            Err(err) if checked => {
                error!(%err, "new routing config not applied; BIRD restarts with the previous one");
                status.last_reload = Some(err.to_string());
            }
            Err(err) => {
                error!(%err, "not starting BIRD until the routing config is fixed");
                status.bird = "waiting for a valid config".into();
                status.last_reload = Some(err.to_string());
                publish(&published, &status);
                tokio::select! {
                    _ = configs.changed() => continue,
                    _ = stop.changed() => return Ok(()),
                }
            }
        }
        if let Some(holder) = socket_holder(&paths.socket) {
            let why = format!(
                "{holder} holds BIRD's control socket {}; BIRD cannot start until it lets go",
                paths.socket.display()
            );
            if status.bird != why {
                error!("{why}");
            }
            status.bird = why;
            status.protocols.clear();
            publish(&published, &status);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return Ok(()),
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        let recovering = paths.announced.exists();
        let mut child = spawn(&binary, &paths, recovering)?;
        let started = Instant::now();
        info!(pid = child.id(), recovering, "BIRD started");
        status.bird = "running".into();

        let exit = supervise(
            &mut child,
            &paths,
            &mut configs,
            &mut stop,
            &mut status,
            &published,
            &running,
        )
        .await;
        match exit {
            Supervised::Stopped => return Ok(()),
            Supervised::ShutDown => {
                // Someone asked BIRD to stop (`lbagent cleanup`, `birdc down`): restarting it
                // would fight them. A new routing config starts it again.
                warn!(
                    "BIRD was shut down from outside lbagent; not restarting it until the routing config changes"
                );
                status.protocols.clear();
                status.bird = "shut down from outside lbagent".into();
                publish(&published, &status);
                tokio::select! {
                    _ = configs.changed() => continue,
                    _ = stop.changed() => return Ok(()),
                }
            }
            Supervised::Exited(why) => {
                status.restarts += 1;
                // Its sessions went with it: never show a dead BIRD's state as current.
                status.protocols.clear();
                if started.elapsed() > STABLE {
                    backoff = FIRST_BACKOFF;
                }
                error!(%why, restart_in = ?backoff, "BIRD exited; restarting it");
                status.bird = format!("restarting ({why})");
                publish(&published, &status);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

enum Supervised {
    /// lbagent stopped it.
    Stopped,
    /// It exited cleanly on someone else's request.
    ShutDown,
    /// It crashed or was killed.
    Exited(String),
}

async fn supervise(
    child: &mut Child,
    paths: &BirdPaths,
    configs: &mut watch::Receiver<String>,
    stop: &mut watch::Receiver<bool>,
    status: &mut RoutingStatus,
    published: &watch::Sender<RoutingStatus>,
    running: &watch::Sender<String>,
) -> Supervised {
    let mut control = match wait_for_socket(child, &paths.socket).await {
        Ok(control) => control,
        Err(why) => return Supervised::Exited(why),
    };
    let mut poll = tokio::time::interval(POLL);
    // The config BIRD could not be handed (not one it rejected) is handed again, with
    // backoff, until it is applied or a newer one replaces it.
    let mut retry: Option<(tokio::time::Instant, Duration)> = None;
    loop {
        let retry_at = retry.map_or_else(tokio::time::Instant::now, |(at, _)| at);
        let handing = tokio::select! {
            exit = child.wait() => {
                return match exit {
                    Ok(status) if status.success() => Supervised::ShutDown,
                    Ok(status) => Supervised::Exited(status.to_string()),
                    Err(err) => Supervised::Exited(err.to_string()),
                };
            }
            changed = configs.changed() => {
                if changed.is_err() {
                    continue;
                }
                retry = None;
                true
            }
            () = tokio::time::sleep_until(retry_at), if retry.is_some() => true,
            _ = poll.tick() => false,
            _ = stop.changed() => {
                let withdraw = *stop.borrow();
                stop_gracefully(child, &mut control, withdraw).await;
                status.bird = "stopped".into();
                status.protocols.clear();
                publish(published, status);
                return Supervised::Stopped;
            }
        };
        let mut handed = Ok(true);
        if handing {
            let text = configs.borrow_and_update().clone();
            handed = hand_over(&mut control, paths, text, status, running).await;
        }
        let outcome = match handed {
            Ok(applied) => refresh(&mut control, paths, status, published)
                .await
                .map(|()| applied),
            Err(err) => Err(err),
        };
        let applied = match outcome {
            Ok(applied) => applied,
            Err(err) => {
                // A connection that timed out or went wrong cannot be trusted to pair the
                // next reply with its command: a fresh one, or a fresh BIRD.
                let fresh = match err {
                    ControlError::Timeout { .. } => None,
                    _ => Control::connect_within(&paths.socket, ANSWER_TIMEOUT)
                        .await
                        .ok(),
                };
                let Some(fresh) = fresh else {
                    let why =
                        format!("BIRD did not answer its control socket ({err}); restarting it");
                    error!(pid = child.id(), "{why}");
                    publish(published, status);
                    // SIGKILL: a stopped BIRD can do nothing else. Its peers see the session
                    // close and keep the routes, as through any graceful restart, until the
                    // next BIRD (started with -R) takes them over.
                    let _ = child.kill().await;
                    return Supervised::Exited(why);
                };
                warn!(%err, "reconnected to BIRD's control socket");
                control = fresh;
                !handing
            }
        };
        if handing && !applied {
            let delay = retry.map_or(FIRST_RETRY, |(_, d)| (d * 2).min(MAX_BACKOFF));
            warn!(retry_in = ?delay, "the routing config will be handed to BIRD again");
            retry = Some((tokio::time::Instant::now() + delay, delay));
        } else if handing {
            retry = None;
        }
    }
}

/// Asks BIRD for a graceful restart (peers keep the routes until the next BIRD is up), or with
/// `withdraw` for `down` (they drop them now), and kills it if it does not answer or does not
/// exit.
async fn stop_gracefully(child: &mut Child, control: &mut Control, withdraw: bool) {
    let command = if withdraw { "down" } else { "graceful restart" };
    let asked = match control.command(command).await {
        Ok(reply) => {
            info!(command, bird = %reply.message(), "stopping BIRD");
            true
        }
        Err(err) => {
            warn!(command, %err, "cannot ask BIRD to stop; killing it");
            false
        }
    };
    if !asked
        || tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Hands BIRD `text` through the safe reload cycle, and says on `running` once BIRD runs it.
/// `Ok(true)`: applied, or rejected by BIRD (handing it again would change nothing);
/// `Ok(false)`: not handed over, to retry; `Err`: the control connection failed (the config
/// is retried too).
async fn hand_over(
    control: &mut Control,
    paths: &BirdPaths,
    text: String,
    status: &mut RoutingStatus,
    running: &watch::Sender<String>,
) -> Result<bool, ControlError> {
    let outcome = reload(control, &paths.next, &paths.config, &text).await;
    status.last_reload = Some(match &outcome {
        Ok(message) => {
            info!(bird = %message, "BIRD reconfigured");
            running.send_replace(text);
            message.clone()
        }
        Err(err) => {
            error!(%err, "new routing config not applied; BIRD keeps running the previous one");
            err.to_string()
        }
    });
    match outcome {
        Ok(_) | Err(RoutingError::Rejected(_)) => Ok(true),
        Err(RoutingError::Control(err)) => Err(err),
        Err(_) => Ok(false),
    }
}

/// Reads `show protocols all` into the status, and marks a managed BIRD as having announced once
/// any BGP session is up.
async fn refresh(
    control: &mut Control,
    paths: &BirdPaths,
    status: &mut RoutingStatus,
    published: &watch::Sender<RoutingStatus>,
) -> Result<(), ControlError> {
    let reply = control.command("show protocols all").await;
    if let Ok(reply) = &reply {
        let protocols = parse_protocols(reply);
        for protocol in protocols.iter().filter(|p| p.export_limit_hit) {
            let before = status
                .protocols
                .iter()
                .any(|p| p.name == protocol.name && p.export_limit_hit);
            if !before {
                warn!(protocol = %protocol.name, exported = protocol.exported, "export ceiling reached (routing.export.maxRoutes): BIRD advertises no more routes to this neighbour");
            }
        }
        status.protocols = protocols;
        let announced = status
            .protocols
            .iter()
            .any(|p| p.proto == "BGP" && p.is_up());
        if announced && !paths.announced.exists() {
            let _ = std::fs::write(&paths.announced, b"");
        }
    }
    publish(published, status);
    reply.map(|_| ())
}

/// The safe reload cycle: write the new config beside the live one, have BIRD reconfigure
/// from it, and only once BIRD runs it rename it into place. A config BIRD rejects never
/// replaces the live one (which a restarted BIRD reads).
pub async fn reload(
    control: &mut Control,
    next: &Path,
    live: &Path,
    text: &str,
) -> Result<String, RoutingError> {
    let result = configure_from(control, next, live, text).await;
    // Whatever went wrong before the rename (a timeout, a write error) leaves no half-made
    // config behind; after it, there is nothing at `next`.
    let _ = std::fs::remove_file(next);
    result
}

async fn configure_from(
    control: &mut Control,
    next: &Path,
    live: &Path,
    text: &str,
) -> Result<String, RoutingError> {
    write(next, text)?;
    // `configure "file"` parses the file and either reconfigures from it or rejects it and
    // keeps running what it ran: the check a `configure check` would make, in the same
    // round trip. BIRD still reads the live path when it starts.
    let reply = control
        .command(&format!("configure \"{}\"", next.display()))
        .await?;
    if reply.is_error() {
        return Err(RoutingError::Rejected(reply.message().to_owned()));
    }
    std::fs::rename(next, live).map_err(|source| RoutingError::Io {
        path: live.to_owned(),
        source,
    })?;
    Ok(reply.message().to_owned())
}

/// External mode: the operator's BIRD includes `include`. Writes it and reloads; if BIRD
/// rejects the result, the previous include is put back.
pub async fn apply_external(
    include: &Path,
    socket: &Path,
    text: &str,
) -> Result<String, RoutingError> {
    let previous = std::fs::read_to_string(include).ok();
    write(include, text)?;
    let mut control = Control::connect(socket).await?;
    let check = control.command("configure check").await?;
    if check.is_error() {
        match &previous {
            Some(previous) => write(include, previous)?,
            None => {
                let _ = std::fs::remove_file(include);
            }
        }
        return Err(RoutingError::Rejected(check.message().to_owned()));
    }
    let reply = control.command("configure").await?;
    if reply.is_error() {
        return Err(RoutingError::Rejected(reply.message().to_owned()));
    }
    Ok(reply.message().to_owned())
}

/// External mode: applies the include at start and on every change.
async fn run_external(
    include: PathBuf,
    socket: PathBuf,
    mut configs: watch::Receiver<String>,
    published: watch::Sender<RoutingStatus>,
    running: watch::Sender<String>,
) {
    let mut status = RoutingStatus {
        mode: "external".into(),
        bird: "operator's".into(),
        ..Default::default()
    };
    if configs.wait_for(|text| !text.is_empty()).await.is_err() {
        return;
    }
    loop {
        let text = configs.borrow_and_update().clone();
        status.last_reload = Some(match apply_external(&include, &socket, &text).await {
            Ok(message) => {
                info!(bird = %message, include = %include.display(), "BIRD reconfigured");
                running.send_replace(text);
                message
            }
            Err(err) => {
                error!(%err, "routing config not applied to the external BIRD");
                err.to_string()
            }
        });
        if let Ok(mut control) = Control::connect(&socket).await
            && let Ok(reply) = control.command("show protocols").await
        {
            status.protocols = parse_protocols(&reply);
        }
        publish(&published, &status);
        if configs.changed().await.is_err() {
            return;
        }
    }
}

/// Asks a BIRD to shut down (`down`): peers withdraw the routes at once.
pub async fn down(socket: &Path) -> Result<bool, RoutingError> {
    if !socket.exists() {
        return Ok(false);
    }
    match Control::connect(socket).await {
        Ok(mut control) => {
            control.command("down").await?;
            Ok(true)
        }
        // A socket without a BIRD behind it (BIRD was killed): nothing to stop.
        Err(ControlError::Connect { .. }) => Ok(false),
        Err(err) => Err(err.into()),
    }
}

/// After a graceful stop, peers hold lbagent's routes as stale until their restart timer runs
/// out (FRR: 120 s). To withdraw them now, BIRD starts once more without `-R`: a peer that
/// sees a session come back without the restart bit flushes what it kept, and with kube-lb0
/// gone there is nothing to announce. Then `down`. Returns whether anything had to be done.
pub async fn withdraw_stale(binary: &Path, paths: &BirdPaths) -> Result<bool, RoutingError> {
    if !paths.announced.exists() || !paths.config.exists() {
        return Ok(false);
    }
    which(binary)?;
    let mut child = spawn(binary, paths, false)?;
    let mut control = match wait_for_socket(&mut child, &paths.socket).await {
        Ok(control) => control,
        Err(why) => return Err(RoutingError::Rejected(why)),
    };
    // Until every BGP session is up (each flush happens as its session opens), at most 15 s.
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let reply = control.command("show protocols").await?;
        let protocols = parse_protocols(&reply);
        if protocols
            .iter()
            .filter(|p| p.proto == "BGP")
            .all(ProtocolStatus::is_up)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    control.command("down").await?;
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    let _ = std::fs::remove_file(&paths.announced);
    Ok(true)
}

/// Before BIRD runs there is no socket to check through: `bird -p` parses the file. Only a
/// config that passes replaces the live one.
async fn check_file(binary: &Path, paths: &BirdPaths, text: &str) -> Result<(), RoutingError> {
    write(&paths.next, text)?;
    let output = Command::new(binary)
        .args(["-p", "-c"])
        .arg(&paths.next)
        .output()
        .await;
    let result = match output {
        Ok(output) if output.status.success() => std::fs::rename(&paths.next, &paths.config)
            .map_err(|source| RoutingError::Io {
                path: paths.config.clone(),
                source,
            }),
        Ok(output) => Err(RoutingError::Rejected(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        )),
        Err(source) => Err(RoutingError::Io {
            path: binary.to_owned(),
            source,
        }),
    };
    let _ = std::fs::remove_file(&paths.next);
    result
}

fn spawn(binary: &Path, paths: &BirdPaths, recovering: bool) -> Result<Child, RoutingError> {
    // setpriv makes the kernel kill BIRD when lbagent dies (PR_SET_PDEATHSIG), so an
    // orphaned BIRD can never hold the socket against the next lbagent.
    let mut command = Command::new("setpriv");
    command
        .args(["--pdeathsig", "KILL", "--"])
        .arg(binary)
        .arg("-f")
        .arg("-c")
        .arg(&paths.config)
        .arg("-s")
        .arg(&paths.socket)
        .arg("-P")
        .arg(&paths.pid);
    if recovering {
        command.arg("-R");
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| RoutingError::Io {
            path: binary.to_owned(),
            source,
        })?;
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                log_bird_line(&line);
            }
        });
    }
    Ok(child)
}

/// BIRD's stderr lines (`2026-11-23 20:30:00.123 <INFO> message`) as lbagent log events.
fn log_bird_line(line: &str) {
    let (level, message) = bird_level(line);
    match level {
        "ERR" | "BUG" => error!(target: "bird", "{message}"),
        "WARN" => warn!(target: "bird", "{message}"),
        "TRACE" | "DBG" => debug!(target: "bird", "{message}"),
        _ => info!(target: "bird", "{message}"),
    }
}

/// Splits a BIRD log line into its level and message; a line without a level is INFO.
fn bird_level(line: &str) -> (&str, &str) {
    line.split_once(" <")
        .and_then(|(_, rest)| rest.split_once("> "))
        .filter(|(level, _)| !level.is_empty() && level.chars().all(|c| c.is_ascii_uppercase()))
        .unwrap_or(("INFO", line))
}

async fn wait_for_socket(child: &mut Child, socket: &Path) -> Result<Control, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited during start-up ({status})"));
        }
        match Control::connect_within(socket, ANSWER_TIMEOUT).await {
            Ok(control) => return Ok(control),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(err) => {
                let _ = child.kill().await;
                return Err(format!("its control socket never answered: {err}"));
            }
        }
    }
}

/// Who listens on `socket`, if anyone does: BIRD would only say "I found another BIRD
/// running" and exit. Named from /proc when the listener is in this network namespace.
fn socket_holder(socket: &Path) -> Option<String> {
    std::os::unix::net::UnixStream::connect(socket).ok()?;
    let described = listening_inode(socket).and_then(|inode| {
        let target = format!("socket:[{inode}]");
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .find_map(|entry| {
                let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
                let holds = std::fs::read_dir(entry.path().join("fd"))
                    .ok()?
                    .flatten()
                    .any(|fd| {
                        std::fs::read_link(fd.path()).is_ok_and(|link| link == Path::new(&target))
                    });
                holds.then(|| {
                    let comm =
                        std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                    format!("another process ({}, pid {pid})", comm.trim())
                })
            })
    });
    Some(described.unwrap_or_else(|| "another process".to_owned()))
}

/// The inode of the socket listening at `path`, from /proc/net/unix (this network
/// namespace's): `Num RefCount Protocol Flags Type St Inode Path`.
fn listening_inode(path: &Path) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Flags 00010000: __SO_ACCEPTCON, a listening socket.
        (fields.len() >= 8 && fields[3] == "00010000" && Path::new(fields[7]) == path)
            .then(|| fields[6].parse().ok())
            .flatten()
    })
}

/// Whether `binary` is there to run (a path, or a name on PATH).
pub fn which(binary: &Path) -> Result<(), RoutingError> {
    let found = if binary.components().count() > 1 {
        binary.is_file()
    } else {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(binary).is_file()))
    };
    if found {
        Ok(())
    } else {
        Err(RoutingError::NoBird {
            binary: binary.display().to_string(),
        })
    }
}

fn write(path: &Path, text: &str) -> Result<(), RoutingError> {
    write_atomically(path, text).map_err(|source| RoutingError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Publishes `status` when it differs from what was published last.
fn publish(published: &watch::Sender<RoutingStatus>, status: &RoutingStatus) {
    published.send_if_modified(|current| {
        let changed = current != status;
        if changed {
            status.clone_into(current);
        }
        changed
    });
}

/// The routing sink: hands BIRD the config its routing section renders to, and reports what
/// the task that runs or feeds BIRD last saw.
pub struct RoutingSink {
    router_id_default: Option<std::net::Ipv4Addr>,
    interface: IfaceName,
    netlink: rtnetlink::Handle,
    /// Wakes when a default route changes: a gateway neighbour follows it.
    route_changes: mpsc::Receiver<()>,
    /// What the last pass warned about, so each warning is logged once.
    warned: Vec<String>,
    /// The kernel table of the marks (per-Service attributes), as last configured.
    marks_table: u32,
    /// The attribute sets the config BIRD was handed maps, with their ids.
    sets: marks::AttributeSets,
    /// The attribute sets of the config BIRD runs, as far as the sink knows: those of the
    /// last config the task said it runs.
    running_sets: marks::AttributeSets,
    /// Marks wait for BIRD to run the config that maps their sets: a pass follows it.
    waiting: bool,
    /// The config BIRD is handed; the task applies each new one.
    handed: watch::Sender<String>,
    /// The config BIRD runs (managed: also the one it starts with), as the task last said.
    running: watch::Receiver<String>,
    status: watch::Receiver<RoutingStatus>,
}

/// The task that runs or feeds BIRD.
pub struct Bird {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), RoutingError>>,
}

impl Bird {
    /// Stops a managed BIRD with a graceful restart (peers keep the routes meanwhile), and
    /// waits up to 15 s for it.
    pub async fn stop(self) {
        self.end(false).await;
    }

    /// Stops a managed BIRD with `down`: its peers withdraw the routes at once (the config
    /// no longer has routing).
    pub async fn shut_down(self) {
        self.end(true).await;
    }

    async fn end(self, withdraw: bool) {
        let _ = self.stop.send(withdraw);
        if tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .is_err()
        {
            warn!("BIRD did not stop within 15 s");
        }
    }

    /// Resolves when routing stopped by itself, with why (a state directory that cannot be
    /// made); never while it runs.
    pub async fn failed(&mut self) -> String {
        match (&mut self.task).await {
            Ok(Err(err)) => err.to_string(),
            Ok(Ok(())) => std::future::pending().await,
            Err(join) => join.to_string(),
        }
    }
}

impl RoutingSink {
    /// Renders `config` and starts BIRD with it (managed mode) or hands it to the operator's
    /// BIRD (external mode). `router_id_default` serves when the config sets no router id.
    pub fn start(
        config: &RoutingConfig,
        interface: &str,
        router_id_default: Option<std::net::Ipv4Addr>,
    ) -> Result<(Self, Bird), RoutingError> {
        let interface = IfaceName::new(interface, "addresses.interface")?;
        config
            .router_id
            .or(router_id_default)
            .ok_or(RoutingError::NoRouterId)?;
        let (mut connection, netlink, _) =
            rtnetlink::new_connection().map_err(RoutingError::Socket)?;
        // Each pass reads the marks table, the default routes and kube-lb0's addresses: with
        // strict checking the kernel filters those dumps, instead of sending the local route of
        // every address on the node to be dropped here. A kernel without it (before 4.20)
        // sends everything, and the readers' own filters keep the same routes.
        if let Err(err) = connection
            .socket_mut()
            .socket_ref()
            .set_netlink_get_strict_chk(true)
        {
            debug!(%err, "netlink strict checking unavailable; filtering dumps here");
        }
        tokio::spawn(connection);
        let route_changes = gateway::follow().map_err(RoutingError::Socket)?;
        // Empty until the first pass: the task starts BIRD with the first real config.
        let (handed, configs) = watch::channel(String::new());
        let (published, status) = watch::channel(RoutingStatus::default());
        let (runs, running) = watch::channel(String::new());
        let (stop, stopped) = watch::channel(false);
        let task = match config.mode.clone() {
            Mode::Managed { binary, state_dir } => {
                which(&binary)?;
                let paths = BirdPaths::new(&state_dir);
                tokio::spawn(run_managed(
                    binary, paths, configs, stopped, published, runs,
                ))
            }
            Mode::External { include, socket } => tokio::spawn(async move {
                run_external(include, socket, configs, published, runs).await;
                Ok(())
            }),
        };
        let sink = Self {
            router_id_default,
            interface,
            netlink,
            route_changes,
            warned: Vec::new(),
            marks_table: config
                .service_attributes
                .as_ref()
                .map_or(model::DEFAULT_MARKS_TABLE, |attributes| attributes.table),
            sets: marks::AttributeSets::new(),
            running_sets: marks::AttributeSets::new(),
            waiting: false,
            handed,
            running,
            status,
        };
        Ok((sink, Bird { stop, task }))
    }
}

/// How long a pass waits for BIRD to run a new config before the marks that need it are left
/// to the pass that follows the reload. A reload takes milliseconds; this bounds how long
/// a slow or restarting BIRD holds up the other sinks.
const RELOAD_WAIT: Duration = Duration::from_secs(1);

impl RoutingSink {
    /// Notes the sets of the config BIRD runs, when that is the config it was last handed.
    fn follow_running(&mut self) {
        if *self.running.borrow_and_update() == *self.handed.borrow() {
            self.running_sets.clone_from(&self.sets);
        }
    }

    /// Waits (at most [`RELOAD_WAIT`]) until BIRD runs the config it was last handed.
    async fn wait_for_reload(&mut self) -> bool {
        let handed = self.handed.borrow().clone();
        let ran = tokio::time::timeout(
            RELOAD_WAIT,
            self.running.wait_for(|running| *running == handed),
        )
        .await
        .is_ok_and(|reply| reply.is_ok());
        self.follow_running();
        ran
    }

    /// Applies the marks `plan` moves in `table`: those BIRD's running config maps at once,
    /// the rest once it runs the one just handed.
    async fn apply_marks(&mut self, table: u32, index: u32, plan: &marks::MarkPlan) -> Vec<String> {
        let (now, later) = marks::until_reloaded(plan, &self.running_sets);
        let mut errors = marks::apply(&self.netlink, table, index, &now).await;
        self.waiting = false;
        if later.add.is_empty() && later.remove.is_empty() {
            return errors;
        }
        if self.wait_for_reload().await {
            let (now, later) = marks::until_reloaded(&later, &self.running_sets);
            errors.extend(marks::apply(&self.netlink, table, index, &now).await);
            if later.add.is_empty() && later.remove.is_empty() {
                return errors;
            }
        }
        self.waiting = true;
        errors.push(format!(
            "{} marks wait until BIRD runs the config that maps their attribute sets; their addresses keep the attributes they had",
            later.add.len()
        ));
        errors
    }
}

/// What the routing sink finds: the config BIRD was last handed, the node's default
/// gateways, the marks table and the addresses on the load-balancer interface.
pub struct ObservedRouting {
    pub handed: String,
    pub gateways: gateway::Gateways,
    pub marks: marks::Marks,
    /// The interface's index and addresses (`None`: it is not there).
    pub interface: Option<(u32, std::collections::BTreeSet<std::net::IpAddr>)>,
}

impl Sink for RoutingSink {
    type Observed = ObservedRouting;
    type Plan = plan::Plan;
    type Error = RoutingError;

    async fn observe(&mut self) -> Result<ObservedRouting, RoutingError> {
        self.follow_running();
        let interface = match gateway::index_of(&self.netlink, self.interface.as_str()).await? {
            Some(index) => Some((index, marks::addresses_on(&self.netlink, index).await?)),
            None => None,
        };
        Ok(ObservedRouting {
            handed: self.handed.borrow().clone(),
            gateways: gateway::read(&self.netlink).await?,
            marks: marks::read(&self.netlink, self.marks_table).await?,
            interface,
        })
    }

    fn plan(&self, wanted: &Wanted<'_>, observed: &ObservedRouting) -> plan::Plan {
        let none = std::collections::BTreeSet::new();
        let on_interface = observed.interface.as_ref().map_or(&none, |(_, a)| a);
        let marks = plan::plan_marks(
            wanted.routing,
            wanted.desired,
            on_interface,
            &self.sets,
            &observed.marks,
        );
        plan::Plan {
            marks: marks.clone(),
            ..plan::plan(
                wanted.routing,
                &wanted.desired.node_labels,
                &observed.gateways,
                self.router_id_default,
                &self.interface,
                &observed.handed,
                &marks.sets,
            )
        }
    }

    async fn apply(
        &mut self,
        plan: plan::Plan,
        observed: ObservedRouting,
        wanted: &Wanted<'_>,
    ) -> Vec<String> {
        for warning in &plan.warnings {
            if !self.warned.contains(warning) {
                warn!("{warning}");
            }
        }
        self.warned = plan.warnings;
        if let Some(text) = plan.config {
            if self.handed.borrow().is_empty() {
                info!("first routing config for this node; BIRD starts with it");
            } else {
                info!("routing config changed; reconfiguring BIRD");
            }
            self.handed.send_replace(text);
        }
        if plan.marks.sets != self.sets {
            info!(
                sets = plan.marks.sets.len(),
                "Services' BGP attribute sets changed"
            );
        }
        self.sets = plan.marks.sets.clone();
        let Some((index, _)) = observed.interface else {
            return Vec::new();
        };
        let table = wanted
            .routing
            .and_then(|r| r.service_attributes.as_ref())
            .map_or(self.marks_table, |attributes| attributes.table);
        if table == self.marks_table {
            return self.apply_marks(table, index, &plan.marks).await;
        }
        // The table moved: fill the new one once BIRD learns it, then empty the old one.
        let fill = marks::MarkPlan {
            add: plan.marks.wanted.iter().map(|(a, id)| (*a, *id)).collect(),
            ..marks::MarkPlan::default()
        };
        let mut errors = Vec::new();
        if !self.wait_for_reload().await {
            self.waiting = true;
            errors.push(format!(
                "routing.serviceAttributes.kernelTable: {table}: the marks move there once BIRD runs the config that learns it"
            ));
            return errors;
        }
        errors.extend(marks::apply(&self.netlink, table, index, &fill).await);
        let empty = marks::MarkPlan {
            remove: observed
                .marks
                .iter()
                .flat_map(|(address, metrics)| metrics.iter().map(|m| (*address, *m)))
                .collect(),
            ..marks::MarkPlan::default()
        };
        errors.extend(marks::apply(&self.netlink, self.marks_table, index, &empty).await);
        self.marks_table = table;
        errors
    }

    fn report(&self) -> Report {
        Report::Routing(self.status.borrow().clone())
    }

    async fn noticed(&mut self) -> Noticed {
        tokio::select! {
            Some(()) = self.route_changes.recv() => Noticed::Drift,
            // BIRD runs a new config: the marks that waited for it go out.
            Ok(()) = self.running.changed(), if self.waiting => Noticed::Drift,
            Ok(()) = self.status.changed() => Noticed::Report,
            // The task ended: nothing more to notice.
            else => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bird_log_lines_split_into_level_and_message() {
        assert_eq!(
            bird_level("2026-11-23 20:30:00.123 <WARN> rtr: Connect delayed by 1 seconds"),
            ("WARN", "rtr: Connect delayed by 1 seconds")
        );
        assert_eq!(
            bird_level("bird: I found another BIRD running."),
            ("INFO", "bird: I found another BIRD running.")
        );
        // A '<' inside the message is not a level.
        assert_eq!(
            bird_level("no level: a <b> c"),
            ("INFO", "no level: a <b> c")
        );
    }

    #[test]
    fn a_missing_bird_is_named() {
        let err = which(Path::new("/nonexistent/bird")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/bird is not installed"),
            "{err}"
        );
        let err = which(Path::new("no-such-bird-binary")).unwrap_err();
        assert!(err.to_string().contains("no-such-bird-binary"), "{err}");
        assert!(
            which(Path::new("bird")).is_ok(),
            "bird2 is installed (cargo xtask setup)"
        );
    }
}
