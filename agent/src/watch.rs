//! Following a file's content with inotify, for the services file and lbagent's own config.
//!
//! Watches the directory, not the file: editors replace files, and a projected ConfigMap
//! swaps a `..data` symlink, neither of which a watch on the old file would see. When the
//! path is a symlink, the directory of its target is watched too.

use std::{
    collections::BTreeSet,
    ops::ControlFlow,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::StreamExt as _;
use inotify::{Inotify, WatchMask};

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
    /// It could be read before and no longer can.
    Unreadable(std::io::Error),
}

/// Calls `on_event` with the file's content now and after every change, until it breaks.
pub async fn follow(
    path: &Path,
    mut on_event: impl FnMut(FileEvent) -> ControlFlow<()>,
) -> Result<(), WatchError> {
    let watch_err = |source| WatchError {
        path: path.to_owned(),
        source,
    };
    let inotify = Inotify::init().map_err(watch_err)?;
    let mask = WatchMask::CREATE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::CLOSE_WRITE
        | WatchMask::DELETE
        | WatchMask::ATTRIB;
    let mut watched = BTreeSet::new();
    let mut events = inotify.into_event_stream([0u8; 4096]).map_err(watch_err)?;
    let mut last: Option<String> = None;
    let mut readable = true;
    loop {
        for dir in directories_of(path) {
            if !watched.contains(&dir) {
                events
                    .watches()
                    .add(&dir, mask)
                    .map_err(|source| WatchError {
                        path: dir.clone(),
                        source,
                    })?;
                watched.insert(dir);
            }
        }
        let flow = match std::fs::read_to_string(path) {
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
        // Wait for a change, then let a burst of events (a ConfigMap swap is several) settle.
        match events.next().await {
            Some(Ok(_)) => {}
            Some(Err(source)) => return Err(watch_err(source)),
            None => return Ok(()),
        }
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(5), events.next()).await
        {
        }
    }
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
