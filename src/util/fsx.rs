//! Files and folders that appear complete or not at all: written under a temporary sibling name, synced to
//! disk, then renamed into place (a rename within one folder is atomic on POSIX filesystems), and the folder
//! synced so the rename itself survives a crash.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// A temporary sibling of `path` that no other process or earlier run uses: `.<name>.tmp-<pid>-<nanos>`.
/// Starts with a dot so globs over a folder's data files never see it; [`is_temp_name`] recognises it.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    path.with_file_name(format!(".{name}.tmp-{}-{nanos}", std::process::id()))
}

/// Whether a file name is one of [`temp_sibling`]'s (what a crash can leave behind).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// Removes the [`temp_sibling`]s of `path` (files a process killed while writing it left behind); call it only
/// where no live process can be writing `path`.
pub fn remove_temp_siblings(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            tracing::info!(file = %entry.path().display(), "removing a partial file left by a dead process");
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Writes `bytes` to `path` atomically: a reader sees the old file or the whole new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        commit(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Renames a finished temporary file or folder into place, then syncs the parent folder. When `tmp` is a
/// folder, an existing folder at `dest` is removed first (rename cannot replace a non-empty folder); a file never
/// replaces a folder. The parent's sync is best effort: the rename has happened, and not every filesystem
/// can sync a folder.
pub fn commit(tmp: &Path, dest: &Path) -> io::Result<()> {
    if tmp.is_dir() && dest.is_dir() {
        fs::remove_dir_all(dest)?;
    }
    fs::rename(tmp, dest)?;
    let _ = sync_dir(dest.parent().unwrap_or(Path::new(".")));
    Ok(())
}

/// fsync of a folder: makes the entries created or renamed in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

/// fsync of every file under `dir`, recursively, then of the folders themselves.
pub fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_file() {
            File::open(entry.path())?.sync_all()?;
        } else if kind.is_dir() {
            sync_tree(&entry.path())?;
        }
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_siblings_of_one_file_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a.parquet");
        let (t1, t2) = (temp_sibling(&out), dir.path().join(".a.parquet.tmp-1-2"));
        let other = temp_sibling(&dir.path().join("b.parquet"));
        for p in [&t1, &t2, &other, &out] {
            fs::write(p, b"x").unwrap();
        }
        remove_temp_siblings(&out);
        assert!(!t1.exists() && !t2.exists());
        assert!(other.exists() && out.exists());
    }

    #[test]
    fn write_atomic_replaces_whole_files_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second, longer").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second, longer");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "temporaries left behind: {names:?}");
    }

    #[test]
    fn commit_replaces_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("checkpoint-2");
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("old"), b"x").unwrap();
        let tmp = temp_sibling(&dest);
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join("new"), b"y").unwrap();
        sync_tree(&tmp).unwrap();
        commit(&tmp, &dest).unwrap();
        assert!(dest.join("new").exists() && !dest.join("old").exists() && !tmp.exists());
    }

    #[test]
    fn a_file_never_replaces_a_folder_and_temps_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("checkpoint-3");
        fs::create_dir(&dest).unwrap();
        assert!(write_atomic(&dest, b"x").is_err());
        assert!(dest.is_dir());
        let tmp = temp_sibling(&dest);
        let name = tmp.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            is_temp_name(&name)
                && !is_temp_name("checkpoint-3")
                && !is_temp_name("train-0.parquet")
        );
    }

    #[test]
    fn a_failed_write_names_no_file_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing-folder").join("x");
        assert!(write_atomic(&p, b"x").is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
