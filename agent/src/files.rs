//! Files lbagent writes for others to read: written beside their place and renamed into it,
//! so that a reader sees the old content or the new, never half.

use std::path::{Path, PathBuf};

use serde::{Serialize, de::DeserializeOwned};

/// Replaces `path` with `contents`, creating its directory if need be.
pub fn write_atomically(path: &Path, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// A JSON state file that could not be read, parsed or written.
#[derive(Debug, thiserror::Error)]
pub enum JsonFileError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} does not parse: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Reads a JSON file written by [`write_json`]; `None` when there is none.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, JsonFileError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(JsonFileError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| JsonFileError::Parse {
            path: path.to_owned(),
            source,
        })
}

/// Replaces `path` with `value` as indented JSON (people read these files too).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), JsonFileError> {
    let io = |source| JsonFileError::Io {
        path: path.to_owned(),
        source,
    };
    let text = serde_json::to_vec_pretty(value).map_err(|err| io(std::io::Error::other(err)))?;
    write_atomically(path, text).map_err(io)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_one() {
        let dir = std::env::temp_dir().join(format!("lbagent-files-{}", std::process::id()));
        let path = dir.join("sub/file.json");
        write_atomically(&path, "one").unwrap();
        write_atomically(&path, "two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn json_round_trips_and_a_missing_or_broken_file_is_told_apart() {
        let dir = std::env::temp_dir().join(format!("lbagent-json-{}", std::process::id()));
        let path = dir.join("state.json");
        assert!(matches!(
            read_json::<BTreeMap<String, u32>>(&path),
            Ok(None)
        ));
        let value = BTreeMap::from([("one".to_owned(), 1u32)]);
        write_json(&path, &value).unwrap();
        assert_eq!(read_json(&path).unwrap(), Some(value));
        std::fs::write(&path, "{").unwrap();
        let err = read_json::<BTreeMap<String, u32>>(&path).unwrap_err();
        assert!(matches!(err, JsonFileError::Parse { .. }), "{err}");
        assert!(err.to_string().starts_with(&path.display().to_string()));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
