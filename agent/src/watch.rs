//! Following a file's content with inotify, for the services file and lbagent's own config.
//!
//! Watches the directory, not the file: editors replace files, and a projected ConfigMap
//! swaps a `..data` symlink, neither of which a watch on the old file would see. When the
//! path is a symlink, the directory of its target is watched too. Watches are kept on what
//! the paths name now: a directory removed and made again, or moved away and replaced, is
//! watched anew (while it is missing, its nearest existing ancestor is watched to see it come
//! back). A re-read can also be asked for (SIGHUP), whatever inotify said.

use std::{
    collections::BTreeMap,
    io::Read as _,
    ops::ControlFlow,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::StreamExt as _;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
#[error("watching {}: {source}", path.display())]
pub struct WatchError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// What happened to the file.
pub enum FileEvent {
    /// Its content, the first time and whenever it differs from the last seen.
    Changed(String),
    /// It could be read before and no longer can (or is over its size limit).
    Unreadable(std::io::Error),
}

/// Reads a whole text file of at most `max_bytes`; a bigger one is an error that names the
/// limit, found before anything is read, and never more than the limit is read.
pub fn read_limited(path: &Path, max_bytes: u64) -> std::io::Result<String> {
    let too_big = |size: u64| {
        std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!("{size} bytes or more, over the limit of {max_bytes} bytes"),
        )
    };
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    if size > max_bytes {
        return Err(too_big(size));
    }
    let mut text = String::new();
    file.take(max_bytes + 1).read_to_string(&mut text)?;
    if text.len() as u64 > max_bytes {
        return Err(too_big(text.len() as u64));
    }
    Ok(text)
}

/// Calls `on_event` with the file's content now, after every change, and whenever `reread`
/// changes, until it breaks. A file over `max_bytes` is `Unreadable`.
pub async fn follow(
    path: &Path,
    max_bytes: u64,
    mut reread: watch::Receiver<u64>,
    mut on_event: impl FnMut(FileEvent) -> ControlFlow<()>,
) -> Result<(), WatchError> {
    let watch_err = |source| WatchError {
        path: path.to_owned(),
        source,
    };
    let inotify = Inotify::init().map_err(watch_err)?;
    let mut events = inotify.into_event_stream([0u8; 4096]).map_err(watch_err)?;
    let mut watched = Watched::default();
    let mut last: Option<String> = None;
    let mut readable = true;
    let mut reread_open = true;
    loop {
        watched.update(&mut events.watches(), path)?;
        let flow = match read_limited(path, max_bytes) {
            Ok(text) if last.as_ref() == Some(&text) => ControlFlow::Continue(()),
            Ok(text) => {
                readable = true;
                last = Some(text.clone());
                on_event(FileEvent::Changed(text))
            }
            Err(err) if readable => {
                readable = false;
                on_event(FileEvent::Unreadable(err))
            }
            Err(_) => ControlFlow::Continue(()),
        };
        if flow.is_break() {
            return Ok(());
        }
        // Wait for a change, then let a burst of events (a ConfigMap swap is several) settle,
        // unless it ends in one that leaves the file whole: a rename onto its name, or a write
        // to it closed (what other names in its directory do cannot change it after that).
        let mut whole = false;
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(event)) => {
                    watched.saw(&event);
                    whole = completes(&event, path);
                }
                Some(Err(source)) => return Err(watch_err(source)),
                None => return Ok(()),
            },
            changed = reread.changed(), if reread_open => reread_open = changed.is_ok(),
        }
        while !whole
            && let Ok(Some(Ok(event))) =
                tokio::time::timeout(Duration::from_millis(5), events.next()).await
        {
            watched.saw(&event);
            whole = completes(&event, path);
        }
    }
}

/// Whether `event` leaves the file at `path` whole: renamed onto, or written and closed.
fn completes<S: AsRef<std::ffi::OsStr>>(event: &inotify::Event<S>, path: &Path) -> bool {
    event
        .mask
        .intersects(EventMask::MOVED_TO | EventMask::CLOSE_WRITE)
        && event.name.as_ref().map(AsRef::as_ref) == path.file_name()
}

/// The watches, by the directory (device, inode) each is on.
#[derive(Default)]
struct Watched(BTreeMap<(u64, u64), WatchDescriptor>);

impl Watched {
    /// Forgets a watch the kernel removed (its directory is gone). A directory made again
    /// may get the same inode number: it must still get a watch of its own.
    fn saw<S>(&mut self, event: &inotify::Event<S>) {
        if event.mask.contains(EventMask::IGNORED) {
            self.0.retain(|_, wd| *wd != event.wd);
        }
    }

    /// Watches what `path`'s directories are now, and nothing else.
    fn update(&mut self, watches: &mut Watches, path: &Path) -> Result<(), WatchError> {
        let mask = WatchMask::CREATE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::CLOSE_WRITE
            | WatchMask::DELETE
            | WatchMask::ATTRIB
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF;
        let mut wanted = BTreeMap::new();
        for dir in directories_of(path) {
            let Some((dir, id)) = existing(&dir) else {
                continue;
            };
            if let Some(wd) = self.0.get(&id) {
                wanted.insert(id, wd.clone());
                continue;
            }
            let wd = watches.add(&dir, mask).map_err(|source| WatchError {
                path: dir.clone(),
                source,
            })?;
            wanted.insert(id, wd);
        }
        for (id, wd) in std::mem::take(&mut self.0) {
            // A directory gone or moved away; the same inode under a new path keeps its watch.
            if !wanted.contains_key(&id) && !wanted.values().any(|w| *w == wd) {
                let _ = watches.remove(wd);
            }
        }
        self.0 = wanted;
        Ok(())
    }
}

/// `dir`, or while it does not exist its nearest existing ancestor, with its (device, inode).
fn existing(dir: &Path) -> Option<(PathBuf, (u64, u64))> {
    dir.ancestors().find_map(|candidate| {
        let candidate = if candidate.as_os_str().is_empty() {
            Path::new(".")
        } else {
            candidate
        };
        let metadata = std::fs::metadata(candidate).ok()?;
        metadata
            .is_dir()
            .then(|| (candidate.to_owned(), (metadata.dev(), metadata.ino())))
    })
}

/// The directories whose entries decide what `path` reads: its own, and its target's.
fn directories_of(path: &Path) -> Vec<PathBuf> {
    let parent = |p: &Path| {
        p.parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    };
    let mut dirs = vec![parent(path)];
    if let Ok(target) = std::fs::canonicalize(path) {
        let dir = parent(&target);
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}
